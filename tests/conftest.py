"""Shared fixtures: tiny configs that run the real pipeline in seconds."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = ""):
  """``get_config`` of ``configs/<name>.py``, loaded by path as config_flags does."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.fixture
def tiny_config():
  """The default job shrunk: same model, data and method, a few epochs."""
  c = load_config("default")
  c.num_epochs = 2
  c.finetune_epochs = 0
  c.progress = False
  c.tensorboard = False
  return c


def pytest_collection_modifyitems(config, items):
  """Slow tests first, so that pytest-xdist starts the long ones early and
  the workers finish together."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
