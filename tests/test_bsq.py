"""BSQ bit-plane quantizer (Eq. 1 of CSQ, Yang et al. 2021) against numpy references.

tests/test_bsq_parity.py compares it with a port of the authors' code."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax import quantizers
from csq_jax.quantizers import bsq
from csq_jax.quantizers.bsq import BSQWeight


# ---------------------------------------------------------------- references


def ref_integers(pos, neg):
  """``clip(Round[sum_b (p_b - n_b) 2^b], -(2^n-1), 2^n-1)`` as an explicit loop, float64."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  acc = np.zeros(pos.shape[1:], np.float64)
  for b in range(pos.shape[0]):
    acc = acc + (pos[b] - neg[b]) * 2.0**b
  levels = 2.0 ** pos.shape[0] - 1
  return np.clip(np.round(acc), -levels, levels)


def ref_materialize(pos, neg, scale):
  n = np.shape(pos)[0]
  return float(scale) / (2.0**n - 1.0) * ref_integers(pos, neg)


def dequant(w):
  """``s/(2^n-1) * q`` in float64 from the module's integers."""
  return float(w.scale) / (2.0**w.n_bits - 1.0) * np.asarray(bsq.integer_weights(w), np.float64)


def from_integers(q, n_bits, scale=0.9, noise=0.0, seed=0):
  """Planes of the binary decomposition of ``q``, optionally made non-binary by
  adding ``U(0, noise)`` to both planes (keeps the rounded sum when
  ``noise * (2^n - 1) < 0.5``)."""
  q = np.asarray(q, np.int64)
  mag = np.abs(q)
  bits = np.stack([(mag >> b) & 1 for b in range(n_bits)]).astype(np.float64)
  pos = np.where(q >= 0, bits, 0.0)
  neg = np.where(q >= 0, 0.0, bits)
  rng = np.random.default_rng(seed)
  pos = pos + rng.uniform(0, noise, pos.shape)
  neg = neg + rng.uniform(0, noise, neg.shape)
  return BSQWeight(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32),
                   jnp.asarray(scale, jnp.float32))


def random_weight(seed=0, n_bits=4, shape=(3, 5), scale=0.7):
  rng = np.random.default_rng(seed)
  pos = rng.uniform(0, 2, (n_bits,) + shape).astype(np.float32)
  neg = rng.uniform(0, 2, (n_bits,) + shape).astype(np.float32)
  return BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(scale, jnp.float32))


def ref_group_lasso(w):
  p, n = np.asarray(w.pos_planes, np.float64), np.asarray(w.neg_planes, np.float64)
  return sum(np.sqrt(1e-8 + np.sum(p[b] ** 2) + np.sum(n[b] ** 2)) for b in range(p.shape[0]))


def assert_binary(w):
  p, n = np.asarray(w.pos_planes), np.asarray(w.neg_planes)
  assert set(np.unique(p)) <= {0.0, 1.0} and set(np.unique(n)) <= {0.0, 1.0}
  assert not np.any((p == 1) & (n == 1))
  bsq.check_shapes(w)


# ---------------------------------------------------------------- Eq. (1)


def test_materialize_matches_numpy_loop():
  w2 = random_weight(10, n_bits=2)  # planes up to 2 overflow 2^n - 1: the clamp is exercised
  raw = np.round(np.tensordot(2.0 ** np.arange(2), np.asarray(w2.pos_planes - w2.neg_planes, np.float64), 1))
  assert np.any(np.abs(raw) > 3)
  np.testing.assert_allclose(np.asarray(jax.jit(bsq.materialize)(w2), np.float64),
                             0.7 / 3.0 * np.clip(raw, -3, 3), rtol=1e-6, atol=1e-7)
  w = random_weight(0)
  ref = ref_materialize(w.pos_planes, w.neg_planes, w.scale)
  for fn in (bsq.materialize, jax.jit(bsq.materialize)):
    got = np.asarray(fn(w), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  # beta/hard are interface-only: the forward pass is always quantized.
  np.testing.assert_array_equal(np.asarray(bsq.materialize(w, 3.0, True)), np.asarray(bsq.materialize(w)))
  ints = np.asarray(bsq.integer_weights(w))
  assert ints.dtype == np.int32
  np.testing.assert_array_equal(ints, ref_integers(w.pos_planes, w.neg_planes))
  assert bsq.materialize(w).shape == w.shape == (3, 5)
  assert int(bsq.precision(w)) == 4 == w.n_bits


def test_ste_gradients_are_analytic():
  w = random_weight(1, n_bits=3, shape=(2, 4), scale=1.3)
  u = np.random.default_rng(2).normal(size=w.shape).astype(np.float32)
  g = jax.jit(jax.grad(lambda w: jnp.sum(bsq.materialize(w) * u)))(w)
  levels = 2.0**3 - 1.0
  expected = np.stack([2.0**b * 1.3 / levels * u for b in range(3)])
  np.testing.assert_allclose(np.asarray(g.pos_planes), expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g.neg_planes), -expected, rtol=1e-6)
  q = ref_integers(w.pos_planes, w.neg_planes)  # clipped: the clamp passes the gradient of s too
  np.testing.assert_allclose(float(g.scale), np.sum(q / levels * u), rtol=1e-5)


def test_init_from_float_is_8bit_rounding():
  kernel = np.random.default_rng(3).normal(0, 0.3, (3, 3, 2, 4)).astype(np.float32)
  init = jax.jit(bsq.init_from_float, static_argnums=1)  # traceable, as CSQ's
  w = init(kernel, 8)
  assert w.n_bits == 8 and w.pos_planes.shape == (8, 3, 3, 2, 4)
  assert_binary(w)
  s = float(np.max(np.abs(kernel)))
  q = np.round(kernel.astype(np.float64) / s * 255.0)
  np.testing.assert_allclose(np.asarray(bsq.materialize(w, hard=True), np.float64), s / 255.0 * q,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(w)), q)
  w4 = init(kernel, 4)
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(w4)), np.round(kernel / s * 15.0))
  assert inspect.signature(bsq.init_from_float).parameters["bits"].default == 8
  zero = init(np.zeros((3, 3, 2, 4), np.float32), 8)
  assert float(zero.scale) == 1.0 and not np.any(np.asarray(zero.pos_planes) + np.asarray(zero.neg_planes))
  with pytest.raises(ValueError):
    bsq.init_from_float(kernel, 0)


def test_clamp_planes():
  rng = np.random.default_rng(4)
  w = BSQWeight(jnp.asarray(rng.uniform(-1, 3, (3, 4)), jnp.float32),
                jnp.asarray(rng.uniform(-1, 3, (3, 4)), jnp.float32), jnp.asarray(0.5, jnp.float32))
  c = jax.jit(bsq.clamp_planes)(w)
  np.testing.assert_array_equal(np.asarray(c.pos_planes), np.clip(np.asarray(w.pos_planes), 0, 2))
  np.testing.assert_array_equal(np.asarray(c.neg_planes), np.clip(np.asarray(w.neg_planes), 0, 2))
  assert float(c.scale) == 0.5


# ---------------------------------------------------------------- re-quantization


def check_requant(w, threshold=0.0):
  r = bsq.requantize(w, threshold)
  assert_binary(r)
  assert r.shape == w.shape
  return r


def test_requantize_rebinarizes_non_binary_planes():
  q = np.array([[7, -5, 3], [0, 1, -6]])
  w = from_integers(q, 3, noise=0.06)  # 0.06 * 7 < 0.5: same rounded integers
  assert not set(np.unique(np.asarray(w.pos_planes))) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(w)), q)
  r = check_requant(w)
  assert r.n_bits == 3
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), q)
  assert float(r.scale) == float(w.scale)
  np.testing.assert_allclose(np.asarray(bsq.materialize(r)), np.asarray(bsq.materialize(w)), rtol=1e-6)


def test_requantize_overflow_clips_not_grows():
  # Planes at 2 sum to 2 * (2^3 - 1) = 14 > 7: the forward pass already clamps
  # it to 7 and re-quantization keeps three planes, clipped (the authors' quant).
  pos = np.zeros((3, 2, 2), np.float32)
  neg = np.zeros((3, 2, 2), np.float32)
  pos[:, 0, 0] = 2.0
  neg[:, 1, 1] = [1.0, 1.0, 2.0]  # -(1 + 2 + 8) = -11
  pos[0, 0, 1] = 1.0
  w = BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(0.8, jnp.float32))
  q = np.array([[7, 1], [0, -7]])
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(w)), q)
  np.testing.assert_allclose(np.asarray(bsq.materialize(w)), 0.8 / 7.0 * q, rtol=1e-6)
  r = check_requant(w)
  assert r.n_bits == 3 == int(bsq.precision(w))
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), q)
  assert float(r.scale) == pytest.approx(0.8)
  np.testing.assert_array_equal(np.asarray(bsq.materialize(r)), np.asarray(bsq.materialize(w)))
  assert int(bsq.effective_precision(w)) == 3


def test_requantize_drops_zero_msb_planes():
  q = np.array([[5, -3, 1], [0, -4, 2]])  # |q| <= 5: three of five planes used
  w = from_integers(q, 5, scale=1.1)
  r = check_requant(w)
  assert r.n_bits == 3 and int(bsq.precision(w)) - int(bsq.precision(r)) == 2
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), q)
  np.testing.assert_allclose(float(r.scale), 1.1 * 7.0 / 31.0, rtol=1e-6)
  np.testing.assert_allclose(dequant(r), dequant(w), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bsq.materialize(r)), np.asarray(bsq.materialize(w)), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_requantize_drops_zero_lsb_planes_and_rescales(k):
  base = np.array([[7, -5, 3], [0, 1, -6]])
  q = base * 2**k  # the k lowest planes are all zero; the top plane is used
  n = 3 + k
  w = from_integers(q, n, scale=0.6, noise=0.3 / (2.0**n - 1))
  r = check_requant(w)
  assert r.n_bits == 3 and int(bsq.precision(w)) - int(bsq.precision(r)) == k
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), base)
  # s' = s * 2^k * (2^n' - 1) / (2^n - 1)
  np.testing.assert_allclose(float(r.scale), 0.6 * 2**k * 7.0 / (2.0**n - 1), rtol=1e-6)
  np.testing.assert_allclose(dequant(r), dequant(w), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bsq.materialize(r)), np.asarray(bsq.materialize(w)), rtol=1e-6)


def test_requantize_drops_msb_and_lsb_together():
  q = np.array([[4, -12], [8, 0]])  # 6 planes -> bits 2..3 used
  w = from_integers(q, 6, scale=2.0)
  r = check_requant(w)
  assert r.n_bits == 2
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), q // 4)
  np.testing.assert_allclose(float(r.scale), 2.0 * 4 * 3.0 / 63.0, rtol=1e-6)
  np.testing.assert_allclose(dequant(r), dequant(w), rtol=1e-6)


def test_requantize_threshold_truncates_sparse_lsb():
  q = np.array([[6, -4, 2, 5], [0, -6, 4, 2]])  # bit 0 set in 1 of 8 weights
  w = from_integers(q, 3, scale=0.7)
  assert check_requant(w, 0.0).n_bits == 3  # plane 0 is not all zero
  r = check_requant(w, 0.125)
  assert r.n_bits == 2
  kept = np.sign(q) * ((np.abs(q) >> 1) << 1)  # q with its dropped bit cleared
  np.testing.assert_allclose(dequant(r), 0.7 / 7.0 * kept, rtol=1e-6)
  # Every weight without a bit in the dropped plane keeps its value exactly.
  same = (np.abs(q) & 1) == 0
  np.testing.assert_allclose(dequant(r)[same], dequant(w)[same], rtol=1e-6)


def test_requantize_random_planes_preserve_weights():
  w = random_weight(5, n_bits=4, shape=(4, 6))
  r = check_requant(w)
  q = np.asarray(bsq.integer_weights(w)).astype(np.int64)
  used = int(np.bitwise_or.reduce(np.abs(q).ravel()))  # bit b set iff plane b is non-zero
  lowest = (used & -used).bit_length() - 1
  assert r.n_bits == used.bit_length() - lowest
  np.testing.assert_allclose(dequant(r), dequant(w), rtol=1e-6, atol=1e-7)
  # The new shape re-traces the jitted forward pass.
  np.testing.assert_allclose(np.asarray(jax.jit(bsq.materialize)(r), np.float64), dequant(w),
                             rtol=1e-6, atol=1e-7)
  # A second pass is the identity.
  r2 = bsq.requantize(r)
  assert r2.n_bits == r.n_bits and float(r2.scale) == float(r.scale)
  np.testing.assert_array_equal(np.asarray(r2.pos_planes), np.asarray(r.pos_planes))


def test_requantize_all_zero_layer_keeps_one_plane():
  w = from_integers(np.zeros((2, 3), np.int64), 4)
  r = check_requant(w)
  assert r.n_bits == 1 and not np.any(dequant(r))


# ---------------------------------------------------------------- regularizer


def test_group_lasso_matches_numpy_and_has_gradient():
  w = random_weight(6, n_bits=3, shape=(2, 3, 4))
  p, n = np.asarray(w.pos_planes, np.float64), np.asarray(w.neg_planes, np.float64)
  np.testing.assert_allclose(float(jax.jit(bsq.group_lasso)(w)), ref_group_lasso(w), rtol=1e-6)
  grad = jax.jit(jax.grad(bsq.group_lasso))
  g = grad(w)
  norms = np.sqrt(np.sum(p**2, axis=(1, 2, 3)) + np.sum(n**2, axis=(1, 2, 3)))
  np.testing.assert_allclose(np.asarray(g.pos_planes), p / norms[:, None, None, None], rtol=1e-5)
  assert np.all(np.abs(np.asarray(g.neg_planes)) > 0)
  # An all-zero plane contributes sqrt(1e-8) with a zero (not NaN) gradient.
  z = w.replace(pos_planes=w.pos_planes.at[1].set(0.0), neg_planes=w.neg_planes.at[1].set(0.0))
  np.testing.assert_allclose(float(bsq.plane_norms(z)[1]), 1e-4, rtol=1e-3)
  gz = grad(z)
  assert np.all(np.isfinite(np.asarray(gz.pos_planes)))
  assert not np.any(np.asarray(gz.pos_planes[1]))


def test_memory_weights_and_weighted_group_lasso():
  leaves = {"a": random_weight(7, 4, (3, 5)), "b": random_weight(8, 2, (6, 2)), "c": random_weight(9, 8, (1, 2))}
  weights = bsq.memory_weights(leaves)
  mem = {"a": 15 * 4, "b": 12 * 2, "c": 2 * 8}
  total = 15 + 12 + 2  # parameters, not bits: the weights sum to the average precision
  assert sum(weights.values()) == pytest.approx(sum(mem.values()) / total)
  for k in leaves:
    assert weights[k] == pytest.approx(mem[k] / total)
  assert bsq.memory_weights(leaves, 58)["a"] == pytest.approx(60 / 58)  # a larger counted model
  ref = 0.3 * sum(mem[k] / total * ref_group_lasso(leaves[k]) for k in leaves)
  custom = {"a": 1.0, "b": 0.0, "c": 2.0}
  ref2 = 0.5 * (ref_group_lasso(leaves["a"]) + 2.0 * ref_group_lasso(leaves["c"]))

  @jax.jit
  def run(ls):
    return (bsq.weighted_group_lasso(ls, 0.3), bsq.weighted_group_lasso(ls, 0.5, custom),
            jax.grad(lambda x: bsq.weighted_group_lasso(x, 0.3))(ls))

  val, val2, g = run(leaves)
  np.testing.assert_allclose(float(val), ref, rtol=1e-6)
  np.testing.assert_allclose(float(val2), ref2, rtol=1e-6)
  assert all(np.any(np.asarray(g[k].pos_planes)) for k in leaves)
  assert bsq.memory_weights({}) == {}



def test_requantize_sparse_msb_saturates_with_threshold():
  # bit 2 set in 1 of 8 weights (12.5%): kept at threshold 0.1, dropped at
  # 0.2 with that weight saturated at 3 (the new maximum).
  q = np.array([[5, -3, 2, 1], [0, -1, 3, -2]])
  w = from_integers(q, 3, scale=0.7)
  assert check_requant(w, 0.1).n_bits == 3
  r = check_requant(w, 0.2)
  assert r.n_bits == 2
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), np.clip(q, -3, 3))
  np.testing.assert_allclose(float(r.scale), 0.7 * 3.0 / 7.0, rtol=1e-6)
  np.testing.assert_allclose(dequant(r), 0.7 / 7.0 * np.clip(q, -3, 3), rtol=1e-6)


# ---------------------------------------------------------------- finetune leaf


def test_finetune_leaf_keeps_the_weight_and_its_precision():
  q = np.array([[7, -5, 3], [0, 1, -6]])
  w = from_integers(q, 3, scale=0.9)
  f = jax.jit(bsq.to_finetune)(w)
  assert isinstance(f, bsq.BSQFinetuneWeight) and quantizers.is_quantized(f)
  assert f.bits == 3 and f.shape == (2, 3) and quantizers.num_weights(f) == 6
  np.testing.assert_allclose(np.asarray(f.latent), q / 7.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(quantizers.materialize(f, None)), np.asarray(bsq.materialize(w)))
  np.testing.assert_array_equal(np.asarray(quantizers.integer_weights(f)), q)
  assert int(quantizers.precision(f)) == 3
  # Training moves the latent anywhere; the integers stay on the 3-bit grid.
  g = f.replace(latent=f.latent * 3.0 - 0.2)
  ints = np.asarray(quantizers.integer_weights(g))
  assert np.abs(ints).max() == 7 and int(quantizers.precision(g)) == 3
  np.testing.assert_allclose(np.asarray(quantizers.materialize(g, None)),
                             np.asarray(quantizers.step_size(g)) * ints, rtol=1e-6)
  c = bsq.clamp_latent(g)
  assert float(jnp.max(jnp.abs(c.latent))) == 1.0
  np.testing.assert_array_equal(np.asarray(bsq.materialize(c)), np.asarray(bsq.materialize(g)))
  # Back to exact planes at the same precision, the weight bit for bit.
  r = bsq.finetune_to_planes(g)
  assert_binary(r)
  assert r.n_bits == 3
  np.testing.assert_array_equal(np.asarray(jax.jit(bsq.materialize)(r)), np.asarray(jax.jit(bsq.materialize)(g)))
  # An all-zero top plane is kept: precision never changes after the search.
  small = bsq.finetune_to_planes(f.replace(latent=f.latent * 0.2))
  assert small.n_bits == 3 and not np.any(np.asarray(small.pos_planes[2]))
