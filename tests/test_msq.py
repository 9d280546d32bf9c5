"""MSQ round-clamp quantizer, LSB slicing and pruning, against numpy references."""

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from csq_jax import configlib, methods, quantizers
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



def test_lsb_k_is_capped_and_regularizer_uses_it():
  w = msq.init_from_float(jax.random.normal(jax.random.key(5), (8, 8)), 4)
  assert msq.with_lsb_k(w, 9).lsb_k == 3 and msq.with_lsb_k(w, 0).lsb_k == 1
  w2 = msq.with_lsb_k(w, 2)
  np.testing.assert_allclose(msq.regularizer(w2), msq.lsb_regularizer(w, 2))
  assert msq.prune(w2, 2).lsb_k == 1  # a 2-bit layer has one LSB left to prune
  assert float(msq.regularizer(msq.prune(w, 3))) == 0.0  # 1 bit: nothing to penalize


# ---------------------------------------------------------------- the paper's formulas
#
# Each test below checks one formula of the MSQ paper summaries against an
# independent numpy float64 computation:
#   S1 = /work/shared/papers/001_e74be2f7f62201af.txt (abstract),
#   S2 = /work/shared/papers/002_07063d6097919719.txt ("Technical Details",
#        items 1-3, and "Methodology").

# A hand-checked example, s = max|W| = 1: 2^3 W = [8, 2.4, -4.4, 0.56, 6.4, -3.04].
PAPER_W = np.array([1.0, 0.3, -0.55, 0.07, 0.8, -0.38])


def _np_round_clamp(w, m):
  """float64 ``clip(round(2^m W / max|W|), +-(2^m - 1))`` (numpy rounds half to even, like jnp)."""
  w = np.asarray(w, np.float64)
  return np.clip(np.round(w / np.max(np.abs(w)) * 2.0**m), -(2.0**m - 1), 2.0**m - 1)


def test_paper_round_clamp_quantizer():
  """S2, Technical Details 1 ("RoundClamp quantizer with a scaling factor of
  2^n"), S1 ("round-clamp quantizer"): ``W_n = clip(round(2^n W / s),
  -(2^n - 1), 2^n - 1)``, ``W^_n = s W_n / 2^n``, ``s = max|W|``; the hand
  example gives W_3 = [7, 2, -4, 1, 6, -3] (8 clamped to 7)."""
  np.testing.assert_array_equal(_np_round_clamp(PAPER_W, 3), [7, 2, -4, 1, 6, -3])
  w = msq.init_from_float(PAPER_W.astype(np.float32), 3)
  np.testing.assert_array_equal(np.asarray(msq.integer_weights(w)), [7, 2, -4, 1, 6, -3])
  rng = np.random.default_rng(30)
  for n in (1, 2, 4, 8):
    lat = rng.normal(0, 0.3, (5, 7))
    w = msq.init_from_float(lat.astype(np.float32), n)
    lat32 = np.asarray(w.latent, np.float64)
    q = _np_round_clamp(lat32, n)
    np.testing.assert_array_equal(np.asarray(msq.integer_weights(w)), q)
    s = np.max(np.abs(lat32))
    np.testing.assert_allclose(np.asarray(msq.materialize(w), np.float64), s * q / 2.0**n, rtol=1e-6, atol=1e-9)
    assert float(msq.step_size(w)) == pytest.approx(s / 2.0**n, rel=1e-6)


@pytest.mark.parametrize("n,k", [(3, 1), (3, 2), (6, 2), (8, 3)])
def test_paper_lsb_extraction(n, k):
  """S2, Technical Details 1 ("Bipartite Bit Slicing"): ``B_k = W_n - 2^k
  W_{n-k}``, both round-clamps with the same ``s``; hand example (n=3, k=2):
  W_1 = clip(round(2W), +-1) = [1, 1, -1, 0, 1, -1], B_2 = W_3 - 4 W_1 =
  [3, -2, 0, 1, 2, 1]."""
  if (n, k) == (3, 2):
    np.testing.assert_array_equal(_np_round_clamp(PAPER_W, 1), [1, 1, -1, 0, 1, -1])
    np.testing.assert_array_equal(np.asarray(msq.lsb(msq.init_from_float(PAPER_W.astype(np.float32), 3), 2)),
                                  [3, -2, 0, 1, 2, 1])
  lat = np.random.default_rng(31 + n + k).normal(0, 0.4, (9, 4)).astype(np.float32)
  w = msq.init_from_float(lat, n)
  expected = _np_round_clamp(lat, n) - 2.0**k * _np_round_clamp(lat, n - k)
  np.testing.assert_array_equal(np.asarray(msq.lsb(w, k), np.float64), expected)


def test_paper_l1_objective_on_lsbs():
  """S2, Technical Details 3 (``L = L_ce + lambda R(B)``, "L1 regularization
  on LSB values"), S1 ("regularization to induce sparsity in these LSBs"):
  the MSQ method's penalty is ``lambda sum_l (1/N_l) sum_i |B_{k_l,i}|`` with
  each layer's own ``k_l`` (a per-layer mean, choice 3 of msq.py), 0 once the
  budget is met."""
  cfg = configlib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
  cfg.update(method="msq", target_bits=2.0)
  cfg.msq.reg_strength = 0.05
  rng = np.random.default_rng(32)
  la, lb = rng.normal(0, 0.5, (12, 5)).astype(np.float32), rng.normal(0, 0.5, (3, 3, 2, 4)).astype(np.float32)
  params = {"a": {"kernel": msq.with_lsb_k(msq.init_from_float(la, 6), 2)},
            "b": {"kernel": msq.init_from_float(lb, 4)}, "b_bias": jnp.zeros(4)}
  penalty, _ = methods.get(cfg).regularizer(params, None)
  ref = 0.05 * (np.mean(np.abs(_np_round_clamp(la, 6) - 4 * _np_round_clamp(la, 4)))
                + np.mean(np.abs(_np_round_clamp(lb, 4) - 2 * _np_round_clamp(lb, 3))))
  assert float(penalty) == pytest.approx(ref, rel=1e-6)
  cfg.target_bits = 6.0  # within budget: no penalty
  assert float(methods.get(cfg).regularizer(params, None)[0]) == 0.0


def test_paper_lsb_sparsity_measure():
  """S1 ("induce sparsity in these LSBs, enabling effective precision
  reduction"), S2 Methodology: the sparsity a layer must reach before its
  LSBs are pruned is the fraction of weights with ``B_k = 0``; with
  ``exclude_max`` the weights at ``|W| = s`` (always ``+-(2^k - 1)``) are
  left out. Hand example, n=3, k=2: B = [3, -2, 0, 1, 2, 1] -> 1/6, and 1/5
  without the max weight."""
  w = msq.init_from_float(PAPER_W.astype(np.float32), 3)
  assert float(msq.lsb_sparsity(w, 2)) == pytest.approx(1 / 6)
  assert float(msq.lsb_sparsity(w, 2, exclude_max=True)) == pytest.approx(1 / 5)
  rng = np.random.default_rng(33)
  lat = (np.round(rng.normal(0, 8, (20, 10))) / 16).astype(np.float32)  # many weights on a coarse grid
  for n, k in ((5, 1), (5, 2), (6, 3)):
    b = _np_round_clamp(lat, n) - 2.0**k * _np_round_clamp(lat, n - k)
    keep = np.abs(lat) < np.max(np.abs(lat))
    w = msq.init_from_float(lat, n)
    assert float(msq.lsb_sparsity(w, k)) == pytest.approx(np.mean(b == 0), abs=1e-7)
    assert float(msq.lsb_sparsity(w, k, exclude_max=True)) == pytest.approx(np.mean(b[keep] == 0), abs=1e-7)


def test_paper_pruning_drops_k_lsbs():
  """S2, Technical Details 2 ("simultaneous pruning of multiple LSBs"), S1:
  pruning ``k`` LSBs leaves the layer at ``n - k`` bits with weights
  ``s W_{n-k} / 2^(n-k)`` (same ``s``): hand example, n=3, k=2 ->
  [1, 1, -1, 0, 1, -1] / 2; where ``B_k = 0`` the weight does not move."""
  w = msq.init_from_float(PAPER_W.astype(np.float32), 3)
  p = msq.prune(w, 2)
  assert p.bits == 1 and int(msq.precision(p)) == 1
  np.testing.assert_allclose(np.asarray(msq.materialize(p)), [0.5, 0.5, -0.5, 0.0, 0.5, -0.5], rtol=1e-7)
  lat = np.random.default_rng(34).normal(0, 0.5, (8, 8)).astype(np.float32)
  for n, k in ((8, 1), (8, 2), (4, 2)):
    w = msq.init_from_float(lat, n)
    s = np.max(np.abs(lat.astype(np.float64)))
    got = np.asarray(msq.materialize(msq.prune(w, k)), np.float64)
    np.testing.assert_allclose(got, s * _np_round_clamp(lat, n - k) / 2.0 ** (n - k), rtol=1e-6, atol=1e-9)
    zero = (_np_round_clamp(lat, n) - 2.0**k * _np_round_clamp(lat, n - k)) == 0
    np.testing.assert_array_equal(got[zero], np.asarray(msq.materialize(w), np.float64)[zero])


def test_paper_k_rule_and_its_margin():
  """S2, Technical Details 2: ``k = 2`` for layers below the mean
  sensitivity, ``k = 1`` for the others. With standard errors and margin
  ``z`` (choice 7 of msq.py): ``k = 2`` iff ``Omega_l - mean < -z sigma_l``,
  ``sigma_l^2`` the variance of ``Omega_l - mean`` for independent
  estimates, here from the covariance ``C diag(se^2) C^T``, ``C = I -
  1 1^T / L`` (numpy float64)."""
  rng = np.random.default_rng(35)
  for trial in range(20):
    L = int(rng.integers(2, 9))
    om = rng.lognormal(0, 1, L)
    se = om * rng.uniform(0, 0.3, L)
    names = [f"l{i}" for i in range(L)]
    C = np.eye(L) - np.ones((L, L)) / L
    sd = np.sqrt(np.diag(C @ np.diag(se**2) @ C.T))
    for z in (0.0, 1.0, 3.0):
      expected = {n: 2 if d < -z * s else 1 for n, d, s in zip(names, C @ om, sd)}
      got = msq.prune_amounts(dict(zip(names, om)), stderr=dict(zip(names, se)), z=z)
      assert got == expected, (trial, z)
      # The layers that get more probes: neither side of the mean is significant.
      assert msq.undecided(dict(zip(names, om)), dict(zip(names, se)), z) == [
          n for n, d, s in zip(names, C @ om, sd) if abs(d) <= z * s and z * s > 0]
    assert msq.prune_amounts(dict(zip(names, om))) == {n: 2 if o < om.mean() else 1 for n, o in zip(names, om)}


class _TinyCNN(nn.Module):
  """conv 3x3 (1 -> 4), conv 3x3 (4 -> 4), BN-free, dense head: 36, 144 and 40 weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv0")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x))
    return nn.Dense(10, use_bias=False, name="head")(jnp.mean(x, axis=(1, 2)))


def _digits(n, seed):
  from sklearn.datasets import load_digits

  d = load_digits()
  idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
  return (d.images[idx] / 16.0).astype(np.float32)[..., None], d.target[idx].astype(np.int32)


@pytest.fixture(scope="module")
def trained_tiny_cnn():
  """``(model, float params, batch of 64)``: the tiny CNN after 300 SGD steps on 512 digits."""
  model = _TinyCNN()
  x, y = _digits(512, 0)
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = optax.sgd(0.1, momentum=0.9)

  @jax.jit
  def step(p, o, xb, yb):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean())(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt = tx.init(params)
  for i in range(300):
    j = (i * 64) % 512
    params, opt = step(params, opt, x[j:j + 64], y[j:j + 64])
  return model, params, {"image": x[:64], "label": y[:64]}


def test_paper_sensitivity_omega_with_exact_hessian_traces(trained_tiny_cnn):
  """S2, Technical Details 2: ``Omega_l = Tr(H_l) ||W_n^(l) - W^(l)||_2``.
  ``MSQ.sensitivities`` on a trained tiny CNN at 4 bits, with a Hutch++
  sketch as large as every layer (so its traces are exact), against
  ``Tr(H_l)`` of ``jax.hessian`` in float64 at the hard 4-bit weights and the
  numpy float64 norm of ``W^_n - W``; ``lsb_k`` is the paper's rule on those
  exact ``Omega`` (z = 0)."""
  model, params, batch = trained_tiny_cnn
  qparams = {k: {"kernel": msq.init_from_float(v["kernel"], 4)} for k, v in params.items()}
  cfg = configlib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
  cfg.method = "msq"
  cfg.msq.update(hessian_sketch=144, hessian_probes=2, hessian_z=0.0, hessian_batches=1)
  ctx = methods.AdjustContext(1, 10, model, {}, lambda: iter([batch]), jax.random.key(1))
  info = methods.get(cfg).sensitivities(qparams, ctx)
  with jax.enable_x64(True):
    hard = {k: {"kernel": jnp.asarray(np.asarray(msq.materialize(v["kernel"]), np.float64))} for k, v in qparams.items()}
    flat, unravel = ravel_pytree(hard)
    x, y = jnp.asarray(batch["image"], jnp.float64), jnp.asarray(batch["label"])
    ce = lambda f: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": unravel(f)}, x), y).mean()
    H = np.asarray(jax.jit(jax.hessian(ce))(flat))
  omegas, off = {}, 0
  for name in hard:  # ravel_pytree order: sorted keys
    n = hard[name]["kernel"].size
    tr = np.trace(H[off:off + n, off:off + n])
    off += n
    path = f"{name}/kernel"
    err = np.linalg.norm(np.asarray(hard[name]["kernel"]) - np.asarray(params[name]["kernel"], np.float64))
    assert info["trace"][path] == pytest.approx(tr, rel=2e-3), path
    assert info["trace_stderr"][path] == 0.0
    omegas[path] = tr * err
    assert info["sensitivity"][path] == pytest.approx(omegas[path], rel=2e-3), path
  mean = np.mean(list(omegas.values()))
  assert info["lsb_k"] == {p: 2 if o < mean else 1 for p, o in omegas.items()}


def test_hessian_aware_k_does_not_follow_the_probe_seed(trained_tiny_cnn):
  """Issue 10: with the default estimator (``msq.hessian_sketch``,
  ``msq.hessian_probes``, ``msq.hessian_z`` of configlib) three probe seeds
  give the same ``k`` per layer on the trained tiny CNN, and every ``k = 2``
  layer is below the mean of the exact ``Omega`` (previous test's check)."""
  model, params, batch = trained_tiny_cnn
  qparams = {k: {"kernel": msq.init_from_float(v["kernel"], 4)} for k, v in params.items()}
  cfg = configlib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
  cfg.update(method="msq")
  exact_cfg = cfg.copy_and_resolve_references()
  exact_cfg.msq.update(hessian_sketch=144, hessian_probes=2, hessian_z=0.0)
  ctx = lambda seed: methods.AdjustContext(1, 10, model, {}, lambda: iter([batch]), jax.random.key(seed))
  exact = methods.get(exact_cfg).sensitivities(qparams, ctx(0))
  infos = [methods.get(cfg).sensitivities(qparams, ctx(seed)) for seed in (11, 12, 13)]
  ks = [info["lsb_k"] for info in infos]
  assert ks[0] == ks[1] == ks[2]
  # What MSQ.adjust writes to metrics.jsonl (as adjust_<name>), one value per layer.
  assert set(infos[0]) == {"trace", "trace_stderr", "sensitivity", "sensitivity_stderr", "lsb_k", "hessian_probes"}
  assert all(set(v) == set(ks[0]) for v in infos[0].values())
  json.dumps(infos[0])
  for p, k in ks[0].items():
    if k == 2:
      assert exact["lsb_k"][p] == 2, p
