"""Uniform STE quantizer (STE-Uniform baseline and the "fixed" rule)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax import quantizers
from csq_jax.quantizers import ste
from csq_jax.quantizers.ste import STEWeight


def _latent(seed=0, shape=(4, 6)):
  return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


class STEForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_materialize_on_integer_grid(self):
    for bits in (1, 3, 8):
      lat = _latent(bits)
      w = ste.init_from_float(lat, bits)
      got = np.asarray(self.variant(lambda w: ste.materialize(w))(w), np.float64)
      # numpy reference
      s = float(np.max(np.abs(lat)))
      levels = 2.0**bits - 1.0
      q = np.round(np.clip(lat / s, -1, 1) * levels)
      np.testing.assert_allclose(got, q * s / levels, rtol=1e-6, atol=1e-7)
      ints = np.asarray(ste.integer_weights(w))
      assert ints.dtype == np.int32
      np.testing.assert_array_equal(ints, q.astype(np.int32))
      np.testing.assert_array_equal(np.asarray(quantizers.integer_weights(w)), ints)
      assert np.all(np.abs(ints) <= levels)
      # The max-abs weight sits at the end of the grid.
      i = np.argmax(np.abs(lat))
      assert abs(ints.flat[i]) == levels
      np.testing.assert_allclose(got / (s / levels), ints, atol=1e-4)

  def test_beta_and_hard_are_ignored(self):
    w = ste.init_from_float(_latent(1), 4)
    a = np.asarray(quantizers.materialize(w, 0.1, hard=False))
    b = np.asarray(quantizers.materialize(w, 100.0, hard=True))
    np.testing.assert_array_equal(a, b)

  def test_zero_latent(self):
    w = ste.init_from_float(np.zeros((2, 3), np.float32), 4)
    np.testing.assert_array_equal(np.asarray(ste.materialize(w)), np.zeros((2, 3)))
    grad = jax.grad(lambda l: jnp.sum(ste.materialize(STEWeight(l, 4))))(w.latent)
    assert np.all(np.isfinite(np.asarray(grad)))


def _grad(lat, g, bits):
  return np.asarray(jax.grad(
      lambda l: jnp.sum(ste.materialize(STEWeight(l, bits)) * jnp.asarray(g)))(jnp.asarray(lat)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_straight_through_gradient_is_identity_inside_clip_range(bits):
  lat = _latent(3)
  g = np.random.default_rng(4).normal(size=lat.shape).astype(np.float32)
  grad = _grad(lat, g, bits)
  inside = np.abs(lat) < np.max(np.abs(lat))  # strictly inside [-s, s]
  assert inside.sum() == lat.size - 1
  np.testing.assert_allclose(grad[inside], g[inside], rtol=1e-6)
  # Not the gradient of the rounded function (which is zero almost everywhere).
  assert np.all(grad[inside] != 0)


def test_straight_through_gradient_at_max_abs_weight():
  lat = _latent(3)
  g = np.random.default_rng(4).normal(size=lat.shape).astype(np.float32)
  grad = _grad(lat, g, 4)
  i = np.unravel_index(np.argmax(np.abs(lat)), lat.shape)
  np.testing.assert_allclose(grad[i], g[i], rtol=1e-6)


def test_precision_and_shape():
  w = ste.init_from_float(_latent(0, (3, 3, 2, 4)), 5)
  assert int(ste.precision(w)) == 5 and ste.precision(w).dtype == jnp.int32
  assert int(quantizers.precision(w)) == 5
  assert w.shape == (3, 3, 2, 4)
  assert quantizers.num_weights(w) == 72
  assert len(jax.tree.leaves(w)) == 1  # bits is static
  assert jax.tree.map(lambda x: x, w).bits == 5


@pytest.mark.parametrize("bits", [0, -1, 17, 32])
def test_bits_validation(bits):
  with pytest.raises(ValueError):
    ste.init_from_float(_latent(), bits)


@pytest.mark.parametrize("bits", [1, 16])
def test_bits_bounds_accepted(bits):
  w = ste.init_from_float(_latent(), bits)
  assert w.bits == bits
  assert quantizers.mask_regularizer(w, 1.0).shape == ()
  assert float(quantizers.mask_regularizer(w, 1.0)) == 0.0
