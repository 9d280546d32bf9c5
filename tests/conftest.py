"""Shared fixtures: tiny configs that run the real pipeline in seconds."""

import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole session: the many
  tests that train the same tiny model (in this process, in pytest-xdist's
  workers and in the CLI subprocesses, which inherit the environment) compile
  each step once. Set before JAX is imported by any test module; the
  controller's environment reaches the workers it starts."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    config._csq_jax_cache = tempfile.mkdtemp(prefix="csq_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._csq_jax_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  """The session's cache goes with it (only the process that made it removes it)."""
  cache = getattr(config, "_csq_jax_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


def load_config(name: str, arg: str = ""):
  """``get_config`` of ``configs/<name>.py``, loaded by path as config_flags does."""
  from csq_jax import configlib

  return configlib.load(os.path.join(ROOT, "configs", f"{name}.py"), arg)


@pytest.fixture
def tiny_config():
  """The default job shrunk: same model, data and method, a few epochs."""
  c = load_config("default")
  c.num_epochs = 2
  c.finetune_epochs = 0
  c.progress = False
  c.tensorboard = False
  return c


def shortened_default_job(**fields):
  """The default job shortened to 60 + 6 epochs for a test of its result
  (the budget met, exact quantization): checkpoints at the phases' ends and
  the hard model's test accuracy at the end only, which the result does not
  depend on (BSQ/MSQ precision changes would also compile the eval steps
  again at every 5-epoch evaluation); ``fields`` override the config."""
  c = load_config("default")
  c.update(dict(num_epochs=60, finetune_epochs=6, progress=False, tensorboard=False,
                checkpoint_every_epochs=100, eval_every=100, eval_soft=False, **fields))
  return c


def pytest_collection_modifyitems(config, items):
  """Slow tests first, so that pytest-xdist starts the long ones early and
  the workers finish together."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def restore_final_state(config, workdir):
  """The state in the last checkpoint of a finished run of ``config``."""
  import jax

  from csq_jax import checkpoint, data, methods, train

  ds = data.load_dataset(config)
  spe = data.steps_per_epoch(ds, config.batch_size)
  phases = train.make_phases(config, spe)
  model = train.create_model(config, ds.num_classes, ds.image_shape)
  state, _ = train.init_state(config, model, ds.image_shape, phases[0], jax.random.key(0))
  total = (config.num_epochs + config.finetune_epochs) * spe
  return train.restore_state(checkpoint.manager(str(workdir)), total, state, phases, methods.get(config), config)


def kill_after_epoch(monkeypatch, epoch: int):
  """Make ``checkpoint.save`` raise ``KeyboardInterrupt`` right after saving
  the end of ``epoch`` (a simulated kill); returns the real ``save`` to restore."""
  from csq_jax import checkpoint

  real_save = checkpoint.save

  def save_then_die(mngr, step, state, meta):
    real_save(mngr, step, state, meta)
    if meta["epoch"] == epoch:
      raise KeyboardInterrupt(f"simulated kill after epoch {epoch}")

  monkeypatch.setattr(checkpoint, "save", save_then_die)
  return real_save
