"""Activation quantizers: PACT, clipped-ReLU STE and the factory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax.quantizers import activations
from csq_jax.quantizers.activations import PACT, ClippedReLUQuant, ReLU


def ref_quant(x, clip, bits):
  x = np.asarray(x, np.float64)
  step = clip / (2.0**bits - 1.0)
  return np.round(np.clip(x, 0.0, clip) / step) * step


# Avoids the kinks (0, alpha) and the rounding ties.
X = np.array([-5.0, -0.3, 0.07, 0.43, 1.13, 2.23, 2.87, 3.71, 4.43, 12.0], np.float32)


def _pact(bits, alpha):
  m = PACT(bits=bits)
  return m, {"params": {"alpha": jnp.asarray(alpha, jnp.float32)}}


def test_pact_alpha_initialized_at_10():
  m = PACT(bits=4)
  v = m.init(jax.random.key(0), jnp.ones((2, 3)))
  assert jax.tree.structure(v) == jax.tree.structure({"params": {"alpha": 0}})
  assert v["params"]["alpha"].shape == ()
  assert float(v["params"]["alpha"]) == 10.0
  assert float(PACT(bits=4, alpha_init=3.0).init(jax.random.key(0), jnp.ones(2))
               ["params"]["alpha"]) == 3.0


@pytest.mark.parametrize("bits,alpha", [(2, 4.0), (4, 3.0), (8, 10.0)])
def test_pact_forward(bits, alpha):
  step = alpha / (2.0**bits - 1.0)
  frac = np.mod(np.clip(X, 0, alpha) / step, 1.0)
  assert np.all(np.abs(frac - 0.5) > 0.01)  # no rounding ties: the reference is unambiguous
  m, v = _pact(bits, alpha)
  got = np.asarray(m.apply(v, jnp.asarray(X)), np.float64)
  np.testing.assert_allclose(got, ref_quant(X, alpha, bits), rtol=1e-6, atol=1e-6)
  assert len(np.unique(np.round(got, 5))) <= 2**bits


def _pact_grads(bits, alpha, x, g):
  m, v = _pact(bits, alpha)
  f = lambda v, x: jnp.sum(m.apply(v, x) * jnp.asarray(g))
  gv, gx = jax.grad(f, argnums=(0, 1))(v, jnp.asarray(x))
  return float(gv["params"]["alpha"]), np.asarray(gx)


def test_pact_input_gradient_is_one_inside_clip_range():
  alpha = 4.0
  g = np.random.default_rng(0).normal(size=X.shape).astype(np.float32)
  _, gx = _pact_grads(4, alpha, X, g)
  inside = (X > 0) & (X < alpha)
  np.testing.assert_allclose(gx, np.where(inside, g, 0.0), rtol=1e-6)
  assert inside.any() and (~inside).any()


def test_pact_alpha_gradient_from_clipped_inputs():
  # Every input is either clipped at alpha or negative: the PACT rule gives
  # dL/dalpha = sum of the upstream gradient where x >= alpha.
  x = np.array([-2.0, -0.1, 4.5, 6.0, 100.0], np.float32)
  g = np.array([1.0, 2.0, 0.5, -1.5, 3.0], np.float32)
  ga, _ = _pact_grads(3, 4.0, x, g)
  np.testing.assert_allclose(ga, g[x >= 4.0].sum(), rtol=1e-6)
  ga1, _ = _pact_grads(3, 4.0, x, np.ones_like(x))
  np.testing.assert_allclose(ga1, 3.0, rtol=1e-6)


def test_pact_alpha_gradient_rule_with_unclipped_inputs():
  alpha, bits = 4.0, 2
  g = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)
  ga, _ = _pact_grads(bits, alpha, X, g)
  np.testing.assert_allclose(ga, g[X >= alpha].sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_relu6_forward_and_gradient(bits):
  m = ClippedReLUQuant(bits=bits, clip=6.0)
  x = np.array([-3.0, 0.1, 0.7, 2.3, 4.1, 5.5, 6.5, 30.0], np.float32)
  v = m.init(jax.random.key(0), jnp.asarray(x))
  assert jax.tree.leaves(v) == []  # nothing to learn
  got = np.asarray(m.apply(v, jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, ref_quant(x, 6.0, bits), rtol=1e-6, atol=1e-6)
  gx = np.asarray(jax.grad(lambda x: jnp.sum(m.apply(v, x)))(jnp.asarray(x)))
  np.testing.assert_array_equal(gx, ((x > 0) & (x < 6.0)).astype(np.float32))


def test_maxabs_forward():
  bits = 3
  m = ClippedReLUQuant(bits=bits, clip=None)
  x = np.random.default_rng(2).normal(0, 2, (4, 5)).astype(np.float32)
  v = m.init(jax.random.key(0), jnp.asarray(x))
  got = np.asarray(m.apply(v, jnp.asarray(x)), np.float64)
  c = float(np.max(np.maximum(x, 0)))
  np.testing.assert_allclose(got, ref_quant(x, c, bits), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got.max(), c, rtol=1e-6)
  # Scaling the input scales the output: the clip follows the batch.
  got2 = np.asarray(m.apply(v, jnp.asarray(10 * x)), np.float64)
  np.testing.assert_allclose(got2, 10 * got, rtol=1e-5, atol=1e-5)


def test_quantize_unsigned():
  y = np.array([0.0, 0.2, 0.5, 0.74, 1.0], np.float32)
  got = np.asarray(activations.quantize_unsigned(jnp.asarray(y), jnp.asarray(1.0), 2))
  np.testing.assert_allclose(got, ref_quant(y, 1.0, 2), rtol=1e-6)


def _make(factory):
  m = factory()
  x = jnp.asarray(X)
  v = m.init(jax.random.key(0), x)
  return m, np.asarray(m.apply(v, x))


@pytest.mark.parametrize("kind", ["pact", "relu6", "maxabs"])
def test_factory_full_precision_is_plain_relu(kind):
  for bits in (32, 64):
    factory = activations.activation_factory(kind, bits)
    assert factory is ReLU
    _, y = _make(factory)
    np.testing.assert_array_equal(y, np.maximum(X, 0))


def test_factory_quantizers():
  m, y = _make(activations.activation_factory("pact", 4))
  assert isinstance(m, PACT) and m.bits == 4
  np.testing.assert_allclose(y, ref_quant(X, 10.0, 4), rtol=1e-6, atol=1e-6)
  m, y = _make(activations.activation_factory("relu6", 3))
  assert isinstance(m, ClippedReLUQuant) and m.bits == 3 and m.clip == 6.0
  np.testing.assert_allclose(y, ref_quant(X, 6.0, 3), rtol=1e-6, atol=1e-6)
  m, _ = _make(activations.activation_factory("maxabs", 2))
  assert isinstance(m, ClippedReLUQuant) and m.bits == 2 and m.clip is None
  # Each call builds a fresh module.
  f = activations.activation_factory("pact", 4)
  assert f() is not f()


def test_factory_rejects_bad_arguments():
  with pytest.raises(ValueError):
    activations.activation_factory("bogus", 4)
  for bits in (0, 17):
    with pytest.raises(ValueError):
      activations.activation_factory("pact", bits)


def test_activation_inside_a_model():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return activations.activation_factory("pact", 2)()(nn.Dense(3, name="d")(x))

  v = Net().init(jax.random.key(0), jnp.ones((2, 4)))
  assert "alpha" in v["params"]["PACT_0"]
  y = np.asarray(Net().apply(v, jnp.ones((2, 4))))
  # 2 bits, alpha 10: outputs on the grid {0, 10/3, 20/3, 10}.
  np.testing.assert_allclose(y * 3 / 10, np.round(y * 3 / 10), atol=1e-5)
