"""CSQ against an independent float64 numpy re-implementation of the authors' code.

Reference: lawsonX/CSQ, ``bits/bitcs.py`` (class ``Bit_ConvNd``/``BitLinear``:
``ini2bit``, ``forward``, ``compute_mask``) and ``main_cifar.py`` (the budget
term). The authors store bit ``i`` of a weight at place ``2^(N-1-i)`` (most
significant first); csq_jax stores bit ``b`` at ``2^b``, so the tests flip the
bit axis. Their place values ``exps`` are ``nn.Parameter``s; the paper (and
csq_jax) keep them constant, so the references use their initial values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from csq_jax import budget, gates, methods, transform
from csq_jax.quantizers import csq


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def authors_ini2bit(ini: np.ndarray, n_bits: int):
  """lawsonX/CSQ ``bits/bitcs.py``, ``Bit_ConvNd.ini2bit`` (weights, not ft):
  ``S = max|ini|``; the positive part ``ini > 0`` and the negative part
  ``-ini`` where ``ini <= 0`` are rounded to ``round(x (2^N-1) / S)`` and split
  most significant bit first by repeated floor division. Returns
  ``(pweight, nweight, S)`` with the bit axis last, MSB first."""
  s = np.max(np.abs(ini))
  step = 2.0**n_bits - 1
  rp = np.round(np.where(ini > 0, ini, 0.0) * step / s)
  rn = np.round(np.where(ini <= 0, -ini, 0.0) * step / s)
  p = np.zeros(ini.shape + (n_bits,))
  n = np.zeros(ini.shape + (n_bits,))
  for i in range(n_bits):
    ex = 2.0 ** (n_bits - i - 1)
    p[..., i], n[..., i] = np.floor(rp / ex), np.floor(rn / ex)
    rp, rn = rp - np.floor(rp / ex) * ex, rn - np.floor(rn / ex) * ex
  return p, n, s


def authors_forward_weight(p, n, mask, scale, temp, ticket=False):
  """lawsonX/CSQ ``bits/bitcs.py``, ``BitConv2d.forward`` (``bin=True``):
  ``sum_i (sigmoid(T p_i) - sigmoid(T n_i)) exps_i mask_i * scale`` with
  ``exps_i = 2^(N-1-i) / (2^N - 1)`` and ``mask = sigmoid(T m)``
  (``compute_mask``; ``ticket``: ``m > 0``). Bit axis last, MSB first."""
  n_bits = p.shape[-1]
  exps = 2.0 ** np.arange(n_bits - 1, -1, -1) / (2.0**n_bits - 1)
  m = (mask > 0).astype(np.float64) if ticket else _sigmoid(temp * mask)
  return np.sum((_sigmoid(temp * p) - _sigmoid(temp * n)) * exps * m, axis=-1) * scale


def _ours(p_msb_last, n_msb_last, mask_msb_first, scale, mode="learned"):
  """csq_jax's CSQWeight of the authors' tensors (bit axis first, LSB first)."""
  to_ours = lambda x: jnp.asarray(np.moveaxis(x[..., ::-1], -1, 0), jnp.float32)
  return csq.CSQWeight(to_ours(p_msb_last), to_ours(n_msb_last), jnp.asarray(mask_msb_first[::-1], jnp.float32),
                       jnp.asarray(scale, jnp.float32), mode)


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_init_equals_the_authors_ini2bit(n_bits):
  """lawsonX/CSQ ``bits/bitcs.py`` ``ini2bit``: a set bit's logit is 1, every
  other logit (unset bits, the opposite sign's plane) exactly 0, the scale is
  ``max|W|`` and the masks start at ``mask_initial_value = 0``."""
  kernel = np.random.default_rng(n_bits).normal(size=(3, 3, 4, 5)) * 0.2
  kernel[0, 0, 0, :2] = 0.0
  p, n, s = authors_ini2bit(kernel, n_bits)
  w = csq.init_from_float(jnp.asarray(kernel, jnp.float32), n_bits)
  np.testing.assert_array_equal(np.asarray(w.pos_logits), np.moveaxis(p[..., ::-1], -1, 0))
  np.testing.assert_array_equal(np.asarray(w.neg_logits), np.moveaxis(n[..., ::-1], -1, 0))
  np.testing.assert_allclose(float(w.scale), s, rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(w.mask_logits), np.zeros(n_bits))


@pytest.mark.parametrize("temp", [1.0, 7.3, 200.0])
@pytest.mark.parametrize("mode", ["learned", "none"])
def test_soft_weight_equals_the_authors_forward(temp, mode):
  """lawsonX/CSQ ``bits/bitcs.py`` ``BitConv2d.forward`` at temperature T
  (Eq. 5; ``mode="none"``: every mask gate 1, Eq. 3), on random logits."""
  rng = np.random.default_rng(1)
  n_bits = 6
  p, n = rng.normal(size=(2, 3, 3, 4, 5, n_bits)) * 0.5
  mask = rng.normal(size=n_bits) * 0.5
  scale = 0.37
  expected = authors_forward_weight(p, n, mask if mode == "learned" else np.full(n_bits, np.inf), scale, temp)
  got = csq.materialize(_ours(p, n, mask, scale, mode), temp)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-7)


def test_soft_weight_at_init_is_the_rounded_kernel_times_the_gates():
  """At the authors' init the soft weight is the rounded kernel times
  ``sigmoid(T) - sigmoid(0)`` (set bits; undecided bits give 0) times the
  mask gate ``sigmoid(0) = 1/2`` (``bits/bitcs.py`` ``forward`` after ``ini2bit``)."""
  kernel = np.random.default_rng(2).normal(size=(3, 3, 2, 4))
  p, n, s = authors_ini2bit(kernel, 8)
  for temp in (1.0, 3.0):
    expected = authors_forward_weight(p, n, np.zeros(8), s, temp)
    got = csq.materialize(csq.init_from_float(jnp.asarray(kernel, jnp.float32), 8), temp)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-7)
    rounded = np.sign(kernel) * np.round(np.abs(kernel) * 255 / s) * s / 255
    np.testing.assert_allclose(expected, rounded * (_sigmoid(temp) - 0.5) * 0.5, rtol=1e-12)


@pytest.mark.parametrize("mode", ["learned", "none"])
@pytest.mark.parametrize("n_bits", [1, 3, 8])
def test_hard_model_at_init_is_the_rounded_kernel(mode, n_bits):
  """The hard path agrees with the authors' init: a bit with ``m_p = 1, m_n =
  0`` reads 1, a bit with both logits at 0 reads 0 (``I(m > 0)``), every mask
  at 0 is selected (``I(m_B >= 0)``), so the hard weight is
  ``S/(2^n-1) round(|W| (2^n-1)/S) sign(W)``, its integers are the rounded
  ones, and the precision is ``n``."""
  kernel = np.random.default_rng(n_bits).normal(size=(3, 3, 3, 8))
  levels = 2.0**n_bits - 1
  s = np.abs(kernel).max()
  q = np.sign(kernel) * np.round(np.abs(kernel) * levels / s)
  w = csq.init_from_float(jnp.asarray(kernel, jnp.float32), n_bits, mask_mode=mode)
  np.testing.assert_array_equal(np.asarray(csq.integer_weights(w)), q.astype(np.int32))
  np.testing.assert_allclose(np.asarray(csq.materialize(w, None, hard=True)), q * s / levels, rtol=1e-6, atol=1e-7)
  assert int(csq.precision(w)) == n_bits


def test_gate_convention_at_zero():
  """``gates.hard_bit(0) = 0`` (the authors' ``ticket``: ``weight > 0``) and
  ``gates.hard_gate(0) = 1`` (a mask at its initial 0 keeps its bit)."""
  x = jnp.asarray([-1e-3, 0.0, 1e-3])
  np.testing.assert_array_equal(np.asarray(gates.hard_bit(x)), [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(gates.hard_gate(x)), [0.0, 1.0, 1.0])


def test_symmetric_init_is_kept_as_an_option():
  """``off_logit=-logit_init``: the former start, every bit decided; the same
  hard model, and the soft weight ``tanh(beta logit_init / 2) * 1/2`` times it."""
  kernel = np.random.default_rng(3).normal(size=(4, 6))
  w0 = csq.init_from_float(jnp.asarray(kernel, jnp.float32), 4)
  w1 = csq.init_from_float(jnp.asarray(kernel, jnp.float32), 4, logit_init=2.0, off_logit=-2.0)
  np.testing.assert_array_equal(np.asarray(csq.integer_weights(w0)), np.asarray(csq.integer_weights(w1)))
  hard = np.asarray(csq.materialize(w1, None, hard=True))
  np.testing.assert_allclose(np.asarray(csq.materialize(w1, 0.7)), np.tanh(0.7) * 0.5 * hard, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="off_logit"):
    csq.init_from_float(jnp.asarray(kernel, jnp.float32), 4, off_logit=0.5)


def _two_layer_params(mask_a, mask_b, shape_a=(3, 3, 4, 8), shape_b=(8, 10)):
  rng = np.random.default_rng(0)
  a = csq.init_from_float(jnp.asarray(rng.normal(size=shape_a), jnp.float32), len(mask_a))
  b = csq.init_from_float(jnp.asarray(rng.normal(size=shape_b), jnp.float32), len(mask_b))
  return {"conv": {"kernel": a.replace(mask_logits=jnp.asarray(mask_a, jnp.float32))},
          "dense": {"kernel": b.replace(mask_logits=jnp.asarray(mask_b, jnp.float32))}}


@pytest.mark.parametrize("weighting", ["params", "layers"])
def test_budget_penalty_equals_eq7(weighting):
  """Eq. (7): ``lambda (avg_bits - T) sum_l sum_b sigmoid(beta m_B)``, the
  average over the counted layers by weight count (the paper) or per layer.
  The authors' ``main_cifar.py`` writes it per layer in units of the mask
  ratio, ``lmbda (ratio_one - T/N) sum |mask|``: the same term with
  ``lambda = lmbda / N`` under ``weighting="layers"``."""
  ma, mb = np.array([0.3, -0.2, 1.1, -0.7]), np.array([-0.4, 0.9, 0.05, 0.2])
  params = _two_layer_params(ma, mb)
  beta, target, lam = 3.0, 2.0, 0.7
  sizes = np.array([3 * 3 * 4 * 8, 80.0])
  bits = np.array([(ma >= 0).sum(), (mb >= 0).sum()], np.float64)
  avg = (sizes * bits).sum() / sizes.sum() if weighting == "params" else bits.mean()
  masks = _sigmoid(beta * ma).sum() + _sigmoid(beta * mb).sum()
  penalty, delta = budget.budget_penalty(params, beta, target, lam, weighting)
  np.testing.assert_allclose(float(delta), avg - target, rtol=1e-6)
  np.testing.assert_allclose(float(penalty), lam * (avg - target) * masks, rtol=1e-5)
  if weighting == "layers":  # main_cifar.py's form with lmbda = lambda * N (N = 4 planes here)
    ratio_one = bits.sum() / (2 * 4)
    authors = (lam * 4) * (ratio_one - target / 4) * masks
    np.testing.assert_allclose(float(penalty), authors, rtol=1e-5)


def test_min_layer_bits_hold_during_the_search():
  """``CSQ.after_update`` (every search step) keeps ``csq.min_layer_bits`` per
  layer by raising its largest mask logits to 0, so ``Delta_S`` of the budget
  term counts the bit a layer keeps; layers with enough bits are untouched."""
  config = ConfigDict({"method": "csq", "target_bits": 1.0, "budget_weighting": "params", "n_bits": 4,
                       "csq": {"reg_strength": 0.3, "min_layer_bits": 1}})
  method = methods.get(config)
  params = _two_layer_params([-0.5, -0.1, -0.9, -2.0], np.float32([0.2, -0.3, 0.4, -1.0]))
  assert {k: int(v) for k, v in budget.layer_precisions(params).items()} == {"conv/kernel": 0, "dense/kernel": 2}
  projected = jax.jit(method.after_update)(params)
  assert {k: int(v) for k, v in budget.layer_precisions(projected).items()} == {"conv/kernel": 1, "dense/kernel": 2}
  conv, dense = projected["conv"]["kernel"], projected["dense"]["kernel"]
  np.testing.assert_array_equal(np.asarray(conv.mask_logits), np.float32([-0.5, 0.0, -0.9, -2.0]))
  np.testing.assert_array_equal(np.asarray(dense.mask_logits), np.float32([0.2, -0.3, 0.4, -1.0]))
  _, delta = method.regularizer(projected, 5.0)
  sizes = np.array([288.0, 80.0])
  np.testing.assert_allclose(float(delta), (sizes * [1, 2]).sum() / sizes.sum() - 1.0, rtol=1e-6)
