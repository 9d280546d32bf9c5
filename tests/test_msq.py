"""MSQ round-clamp quantizer, LSB slicing and pruning, against numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax import quantizers
from csq_jax.quantizers import msq
from csq_jax.quantizers.msq import MSQWeight


# ---------------------------------------------------------------- references


def ref_round_clamp(lat, bits, scale=None):
  """``clip(round(2^m W / s), +-(2^m - 1))`` in float64, ``s = max|W|``."""
  lat = np.asarray(lat, np.float64)
  s = float(np.max(np.abs(lat))) if scale is None else scale
  s = s if s > 0 else 1.0
  top = 2**bits - 1
  return np.clip(np.round(lat / s * 2.0**bits), -top, top).astype(np.int64), s


def ref_lsb(lat, n, k):
  qn, _ = ref_round_clamp(lat, n)
  qc, _ = ref_round_clamp(lat, n - k)
  return qn - 2**k * qc


def _latent(seed=0, shape=(6, 8)):
  return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


# ---------------------------------------------------------------- forward


class MSQForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_integer_grid_matches_reference(self):
    for bits in (1, 3, 8):
      lat = _latent(bits)
      w = msq.init_from_float(lat, bits)
      q_ref, s = ref_round_clamp(lat, bits)
      ints = np.asarray(self.variant(msq.integer_weights)(w))
      assert ints.dtype == np.int32
      np.testing.assert_array_equal(ints, q_ref)
      assert np.all(np.abs(ints) <= 2**bits - 1)
      got = np.asarray(self.variant(lambda w: msq.materialize(w))(w), np.float64)
      np.testing.assert_allclose(got, q_ref * s / 2.0**bits, rtol=1e-6, atol=1e-8)
      # Exactly on the grid: materialize / (s / 2^n) are the integers.
      np.testing.assert_allclose(got / (s / 2.0**bits), ints, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lsbs_recombine_exactly(k):
  n = 6
  lat = _latent(10 + k)
  w = msq.init_from_float(lat, n)
  b = np.asarray(msq.lsb(w, k))
  assert b.dtype == np.float32 and b.shape == lat.shape
  np.testing.assert_array_equal(b, np.round(b))  # integer valued
  wn = np.asarray(msq.integer_weights(w)).astype(np.int64)
  wc = np.asarray(msq.integer_weights(msq.prune(w, k))).astype(np.int64)
  np.testing.assert_array_equal(wn, 2**k * wc + b.astype(np.int64))
  np.testing.assert_array_equal(b.astype(np.int64), ref_lsb(lat, n, k))
  # Small: |B_k| <= 2^(k-1) where the (n-k)-bit quantizer does not clamp,
  # <= 2^k - 1 everywhere.
  s = np.max(np.abs(lat))
  unclamped = np.abs(np.round(lat / s * 2.0 ** (n - k))) <= 2 ** (n - k) - 1
  assert np.all(np.abs(b[unclamped]) <= 2 ** (k - 1))
  assert np.all(np.abs(b) <= 2**k - 1)
  # The max-|W| weight sits at the clamp: B_k = +-(2^k - 1).
  i = np.unravel_index(np.argmax(np.abs(lat)), lat.shape)
  assert abs(b[i]) == 2**k - 1


@pytest.mark.parametrize("n", [3, 5])
def test_coarse_bin_boundaries_fall_on_fine_bin_midpoints(n):
  # A dense grid of W in [-1, 1]; the endpoints make s = max|W| = 1.
  x = np.linspace(-1.0, 1.0, 2**n * 64 + 1).astype(np.float32)
  w = msq.init_from_float(x[None, :], n)
  fine = np.asarray(msq.integer_weights(w))[0]
  coarse = np.asarray(msq.integer_weights(msq.prune(w, 1)))[0]
  changes = np.nonzero(np.diff(coarse))[0]
  # Every (n-1)-bit level is reached, the clamp hides no boundary.
  assert len(changes) == 2 * (2 ** (n - 1) - 1)
  for a in changes:
    # The n-bit value is constant across the (n-1)-bit boundary (it is no
    # n-bit boundary), it is an odd n-bit level, and its bin centre lies
    # within the step of the dense grid where the boundary is.
    assert fine[a] == fine[a + 1]
    assert fine[a] % 2 == 1
    centre = fine[a] / 2.0**n
    assert x[a] <= centre <= x[a + 1]
  # The same check fails for the 2^n - 1 scale (STE/DoReFa grid).
  top = 2.0**n - 1
  fine_ste = np.round(x * top)
  coarse_ste = np.round(x * (2.0 ** (n - 1) - 1))
  bad = [a for a in np.nonzero(np.diff(coarse_ste))[0] if not x[a] <= fine_ste[a] / top <= x[a + 1]]
  assert bad


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prune_lowers_precision_and_rounds_to_coarse_grid(k):
  n = 5
  lat = _latent(20 + k)
  w = msq.init_from_float(lat, n)
  p = msq.prune(w, k)
  assert int(msq.precision(p)) == int(msq.precision(w)) - k == n - k
  assert msq.precision(p).dtype == jnp.int32
  assert p.max_bits == n and p.shape == w.shape
  np.testing.assert_array_equal(np.asarray(p.latent), lat)  # the latent is kept
  q_ref, s = ref_round_clamp(lat, n - k)
  step = s / 2.0 ** (n - k)
  got = np.asarray(msq.materialize(p), np.float64)
  np.testing.assert_allclose(got, q_ref * step, rtol=1e-6, atol=1e-8)
  err = np.abs(got - lat)
  assert np.all(err <= step * (1 + 1e-6))
  # Half a step away from the clamp (only the max weight is clamped here).
  unclamped = np.abs(np.round(lat / s * 2.0 ** (n - k))) <= 2 ** (n - k) - 1
  assert np.all(err[unclamped] <= 0.5 * step * (1 + 1e-6))
  # Where B_k = 0, pruning does not move the weight.
  b = np.asarray(msq.lsb(w, k))
  np.testing.assert_array_equal(got[b == 0], np.asarray(msq.materialize(w), np.float64)[b == 0])


def test_prune_validation():
  w = msq.init_from_float(_latent(), 3)
  assert msq.prune(w, 0) is w
  assert msq.prune(w, 2).bits == 1
  for k in (3, 4, -1):
    with pytest.raises(ValueError):
      msq.prune(w, k)
  for k in (0, 3):
    with pytest.raises(ValueError):
      msq.lsb(w, k)
  with pytest.raises(ValueError):
    msq.lsb(msq.prune(w, 2), 1)  # a 1-bit layer has no LSB to slice


@pytest.mark.parametrize("bits", [0, 17])
def test_bits_validation(bits):
  with pytest.raises(ValueError):
    msq.init_from_float(_latent(), bits)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("bits", [2, 6])
def test_materialize_straight_through_is_identity(bits):
  lat = _latent(3)
  g = np.random.default_rng(4).normal(size=lat.shape).astype(np.float32)
  f = jax.jit(lambda l: jnp.sum(msq.materialize(MSQWeight(l, bits)) * jnp.asarray(g)))
  grad = np.asarray(jax.grad(f)(jnp.asarray(lat)))
  # Identity everywhere, the clamped max-|W| weight included.
  np.testing.assert_allclose(grad, g, rtol=1e-6)


def test_lsb_regularizer_value_and_descent_direction():
  n, k = 4, 1
  s = 1.0
  # 2^n W / s: 16 (the max, clamped), exact even levels, odd levels (ties of
  # the 3-bit rounding go to even) and weights between levels.
  y = np.array([16.0, 6.0, 5.0, -7.0, 3.2, -2.0, 0.0, 9.4], np.float32)
  lat = y * s / 2**n
  w = MSQWeight(jnp.asarray(lat), n)
  b_ref = ref_lsb(lat, n, k)
  np.testing.assert_array_equal(b_ref, [1, 0, 1, 1, -1, 0, 0, -1])
  reg = msq.lsb_regularizer(w, k)
  np.testing.assert_allclose(float(reg), np.mean(np.abs(b_ref)), rtol=1e-7)
  grad = np.asarray(jax.grad(lambda l: msq.lsb_regularizer(MSQWeight(l, n), k))(w.latent))
  expected = np.sign(b_ref) * 2.0**n / (s * lat.size)
  expected[0] = 0.0  # the max weight is clamped: no pull on the scale
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
  assert np.all(grad[1:][b_ref[1:] != 0] != 0)
  # Descent moves each weight with a nonzero LSB toward its (n-1)-bit value
  # and, with a step of one n-bit level, zeroes its LSB.
  target = np.asarray(msq.dequantized(w, n - k))
  lr = (s / 2**n) / np.max(np.abs(grad))
  new = lat - lr * grad
  moved = (b_ref != 0) & (grad != 0)
  assert np.all(np.abs(new - target)[moved] < np.abs(lat - target)[moved])
  b_new = ref_lsb(np.concatenate([new, [s]]), n, k)[:-1]  # keep s fixed
  assert np.all(np.abs(b_new[moved]) < np.abs(b_ref[moved]))
  assert np.all(b_new[moved] == 0)


def test_lsb_gradient_is_zero_where_full_ste_cancels_is_avoided():
  # With an STE on both roundings dB/dW would be 2^n/s - 2^k 2^(n-k)/s = 0;
  # the estimator used gives 2^n / s inside the clamp range.
  n, k = 5, 2
  lat = _latent(7)
  s = float(np.max(np.abs(lat)))
  jac = jax.grad(lambda l: jnp.sum(msq.lsb(MSQWeight(l, n), k)))(jnp.asarray(lat))
  jac = np.asarray(jac)
  inside = np.abs(lat) < s
  np.testing.assert_allclose(jac[inside], 2.0**n / s, rtol=1e-6)
  assert np.all(jac[~inside] == 0)


# ---------------------------------------------------------------- sparsity


def test_lsb_sparsity_of_a_coarse_kernel():
  n = 5
  s = 0.8
  rng = np.random.default_rng(5)
  # Exact (n-1)-bit values 2m s / 2^n, |2m| <= 2^n - 2, plus the max |W| = s.
  m = rng.integers(-(2 ** (n - 1) - 1), 2 ** (n - 1), size=(6, 8))
  lat = (2 * m * s / 2**n).astype(np.float32)
  lat[0, 0] = s
  w = msq.init_from_float(lat, n)
  np.testing.assert_array_equal(np.asarray(msq.lsb(w, 1))[lat != s], 0)
  assert float(msq.lsb_sparsity(w, 1, exclude_max=True)) == 1.0
  # The max weight's B_1 = 1 by construction (it is always clamped).
  np.testing.assert_allclose(float(msq.lsb_sparsity(w, 1)), (lat.size - 1) / lat.size, rtol=1e-7)
  # Pruning such a kernel leaves every other weight where it was.
  same = lat != s
  np.testing.assert_array_equal(
      np.asarray(msq.materialize(msq.prune(w, 1)))[same], np.asarray(msq.materialize(w))[same])


def test_lsb_sparsity_matches_reference_and_jits():
  lat = _latent(6)
  w = msq.init_from_float(lat, 6)
  for k in (1, 2):
    got = float(jax.jit(msq.lsb_sparsity, static_argnums=(1, 2))(w, k, False))
    assert got == pytest.approx(np.mean(ref_lsb(lat, 6, k) == 0), abs=1e-7)
  zero = msq.init_from_float(np.zeros((6, 8), np.float32), 4)
  assert float(msq.lsb_sparsity(zero, 2)) == 1.0
  assert float(msq.lsb_sparsity(zero, 2, exclude_max=True)) == 1.0
  assert float(msq.lsb_regularizer(zero, 2)) == 0.0
  grad = jax.grad(lambda l: msq.lsb_regularizer(MSQWeight(l, 4), 2))(zero.latent)
  assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- Hessian-aware pruning


def test_sensitivity_matches_reference():
  lat = _latent(8)
  w = msq.init_from_float(lat, 4)
  for k in (0, 2):
    q, s = ref_round_clamp(lat, 4 - k)
    ref = 2.5 * np.linalg.norm(q * s / 2.0 ** (4 - k) - lat.astype(np.float64))
    np.testing.assert_allclose(float(msq.sensitivity(2.5, w, k)), ref, rtol=1e-5)
  # Fewer bits, larger error.
  assert float(msq.sensitivity(1.0, w, 2)) > float(msq.sensitivity(1.0, w))


def test_prune_amounts():
  omegas = {"a": 1.0, "b": jnp.asarray(2.0), "c": 3.0, "d": 10.0}  # mean 4
  assert msq.prune_amounts(omegas) == {"a": 2, "b": 2, "c": 2, "d": 1}
  assert msq.prune_amounts({"a": 3.0, "b": 3.0}) == {"a": 1, "b": 1}
  assert msq.prune_amounts({}) == {}
  capped = msq.prune_amounts(omegas, bits={"a": 2, "b": 1, "c": 8, "d": 1})
  assert capped == {"a": 1, "b": 0, "c": 2, "d": 0}


# ---------------------------------------------------------------- pytree


def test_single_trainable_leaf():
  kernel = _latent(9, (3, 3, 2, 4))
  w = msq.init_from_float(kernel, 6)
  leaves = jax.tree.leaves(w)
  assert len(leaves) == 1
  assert leaves[0] is w.latent
  assert sum(x.size for x in leaves) == kernel.size == w.num_weights
  assert w.shape == (3, 3, 2, 4)
  same = jax.tree.map(lambda x: x, msq.prune(w, 2))
  assert (same.bits, same.max_bits) == (4, 6)
  # bits is static: pruning changes the tree structure (the step re-traces).
  assert jax.tree.structure(w) != jax.tree.structure(msq.prune(w, 1))


def test_dispatch_step_size_reconstructs_the_weight():
  w = msq.init_from_float(jax.random.normal(jax.random.key(4), (6, 7)), 5)
  assert quantizers.is_quantized(w)
  np.testing.assert_array_equal(quantizers.materialize(w, None), quantizers.integer_weights(w) * quantizers.step_size(w))
  assert int(quantizers.precision(w)) == 5 and quantizers.num_weights(w) == 42


def test_lsb_k_is_capped_and_regularizer_uses_it():
  w = msq.init_from_float(jax.random.normal(jax.random.key(5), (8, 8)), 4)
  assert msq.with_lsb_k(w, 9).lsb_k == 3 and msq.with_lsb_k(w, 0).lsb_k == 1
  w2 = msq.with_lsb_k(w, 2)
  np.testing.assert_allclose(msq.regularizer(w2), msq.lsb_regularizer(w, 2))
  assert msq.prune(w2, 2).lsb_k == 1  # a 2-bit layer has one LSB left to prune
  assert float(msq.regularizer(msq.prune(w, 3))) == 0.0  # 1 bit: nothing to penalize
