"""Model shapes and parameter counts."""

import jax
import jax.numpy as jnp
import pytest

from csq_jax import models
from csq_jax.quantizers import activations


def _count(params):
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_resnet20_has_0_27m_params_and_20_weight_layers():
  m = models.create_model("resnet20", 10)
  v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  n = _count(v["params"])
  assert 0.26e6 < n < 0.28e6
  kernels = [p for p, x in jax.tree_util.tree_flatten_with_path(v["params"])[0] if p[-1].key == "kernel"]
  assert len(kernels) == 22  # 19 3x3 convs + 2 1x1 shortcuts + dense head
  out = m.apply(v, jnp.zeros((4, 32, 32, 3)))
  assert out.shape == (4, 10)


def test_small_cnn_adapts_to_input_and_classes():
  for shape, classes in [((8, 8, 1), 10), ((28, 28, 3), 7), ((5, 5, 2), 2)]:
    m = models.create_model("small_cnn", classes)
    v = m.init(jax.random.key(0), jnp.zeros((1,) + shape))
    assert m.apply(v, jnp.zeros((3,) + shape)).shape == (3, classes)


def test_activation_quantizer_is_inserted():
  m = models.create_model("small_cnn", 10, activations.activation_factory("pact", 3))
  v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  alphas = [x for p, x in jax.tree_util.tree_flatten_with_path(v["params"])[0] if p[-1].key == "alpha"]
  assert len(alphas) == 7 and all(float(a) == 10.0 for a in alphas)


def test_unknown_model():
  with pytest.raises(ValueError, match="Unknown model"):
    models.create_model("vgg99", 10)
