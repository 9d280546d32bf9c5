"""ImageNet ResNets: torchvision parameter counts, layer counts, shapes, names."""

import re

import jax
import jax.numpy as jnp
import pytest

from csq_jax import models


def _count(params):
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def _abstract_params(name, classes=1000, size=224):
  m = models.create_model(name, classes)
  v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return v["params"]


def _kernel_paths(params):
  return [
      "/".join(k.key for k in p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
      if p[-1].key == "kernel"
  ]


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
])
def test_param_count_matches_torchvision(name, expected):
  assert _count(_abstract_params(name)) == expected


@pytest.mark.parametrize("name, convs, shortcuts", [
    ("resnet18", 20, 3),
    ("resnet50", 53, 4),
])
def test_kernel_leaves_and_shortcut_names(name, convs, shortcuts):
  kernels = _kernel_paths(_abstract_params(name, size=64))
  assert len(kernels) == convs + 1  # + dense head
  rule = re.compile(".*shortcut_conv/kernel")
  assert len([k for k in kernels if rule.fullmatch(k)]) == shortcuts
  assert "conv_init/kernel" in kernels and "head/kernel" in kernels


def test_resnet50_block_layout():
  params = _abstract_params("resnet50", size=64)
  block = params["stage2_block0"]
  assert set(block) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut_conv", "shortcut_bn"}
  assert block["conv1"]["kernel"].shape == (1, 1, 256, 128)
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)  # stride on the 3x3 conv (v1.5)
  assert block["conv3"]["kernel"].shape == (1, 1, 128, 512)
  assert "shortcut_conv" not in params["stage2_block1"]
  assert params["conv_init"]["kernel"].shape == (7, 7, 3, 64)


@pytest.mark.parametrize("name, classes", [("resnet18", 10), ("resnet50", 7)])
def test_output_shape_and_train_mode(name, classes):
  # Jitted: op by op, every layer shape compiles each op (17 s against 14 s on ResNet-50).
  m = models.create_model(name, classes)
  v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out = jax.jit(m.apply)(v, x)
  assert out.shape == (2, classes) and out.dtype == jnp.float32
  out, updates = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert out.shape == (2, classes) and jnp.all(jnp.isfinite(out))
  assert set(updates["batch_stats"]) == set(v["batch_stats"])


def test_bfloat16_output_is_float32():
  m = models.create_model("resnet18", 10, dtype=jnp.bfloat16)
  v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.jit(m.apply)(v, jnp.zeros((2, 32, 32, 3))).dtype == jnp.float32
