"""BSQ against an independent numpy (float64) port of the authors' reference code.

Every expected value below comes from the reference formulas of yanghr/BSQ,
re-implemented here in their own layout (bit axis last, MSB first, place
values ``2^(N-1-i) / (2^N - 1)``: ``self.exps`` in ``models/cifar/bit.py``)
and compared with csq_jax's ``quantizers/bsq.py`` and ``methods/bsq.py`` (bit
axis first, LSB first, integer place values).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from csq_jax import methods, transform
from csq_jax.quantizers import bsq
from csq_jax.quantizers.bsq import BSQFinetuneWeight, BSQWeight

# ---------------------------------------------------------------- the reference, in numpy


def ref_exps(n):
  """``self.exps`` of ``Bit_ConvNd.__init__`` / ``set_Nbits``: MSB first."""
  return 2.0 ** np.arange(n - 1, -1, -1) / (2.0**n - 1)


def ref_ini2bit(ini, n, ft=False):
  """``Bit_ConvNd.ini2bit``: ``S = max|ini|`` (1 when ``ft``), magnitudes
  ``round(|x| (2^N - 1) / S)`` split greedily from the MSB into the plane of
  the sign (``ini <= 0`` goes to the negative plane). Returns ``(p, n, S)``."""
  ini = np.asarray(ini, np.float64)
  s = 1.0 if ft else float(np.max(np.abs(ini)))
  p = np.zeros(ini.shape + (n,))
  m = np.zeros(ini.shape + (n,))
  if s == 0:
    return p, m, s
  step = 2.0**n - 1
  rp = np.round(np.where(ini > 0, ini, 0.0) * step / s)
  rn = np.round(np.where(ini <= 0, -ini, 0.0) * step / s)
  for i in range(n):
    ex = 2.0 ** (n - i - 1)
    p[..., i] = np.floor(rp / ex)
    m[..., i] = np.floor(rn / ex)
    rp = rp - np.floor(rp / ex) * ex
    rn = rn - np.floor(rn / ex) * ex
  return p, m, s


def ref_bit_ste(w, n):
  """``bit_STE.forward``: clamp to [-1, 1], ``round(|w| (2^N-1)) / (2^N-1) * sign(w)``."""
  w = np.clip(np.asarray(w, np.float64), -1.0, 1.0)
  step = 2.0**n - 1
  return np.round(np.abs(w) * step) / step * np.sign(w)


def ref_forward(p, m, scale, n):
  """``BitConv2d.forward`` in the ``bin`` mode: ``bit_STE(sum((p - n) exps)) * scale``."""
  return ref_bit_ste(np.sum((p - m) * ref_exps(n), axis=-1), n) * scale


def ref_l1reg(p, m, n):
  """``BitConv2d.L1reg``: ``total_weight * Nbits * sum_i sqrt(1e-8 + sum(cat(p, n)[..., i]^2))``."""
  total_weight = np.prod(p.shape[:-1])
  axes = tuple(range(p.ndim - 1))
  return total_weight * n * np.sum(np.sqrt(1e-8 + np.sum(p**2, axis=axes) + np.sum(m**2, axis=axes)))


def ref_quant(p, m, n):
  """``BitConv2d.quant``: re-binarize ``sum((p - n) exps)``, magnitudes rounded
  at ``2^N - 1`` and clipped to it; the scale is unchanged."""
  w = np.sum((p - m) * ref_exps(n), axis=-1)
  step = 2.0**n - 1
  rp = np.minimum(np.round(np.where(w > 0, w, 0.0) * step), step)
  rn = np.minimum(np.round(np.where(w <= 0, -w, 0.0) * step), step)
  p, m = np.zeros_like(p), np.zeros_like(m)
  for i in range(n):
    ex = 2.0 ** (n - i - 1)
    p[..., i] = np.floor(rp / ex)
    m[..., i] = np.floor(rn / ex)
    rp = rp - np.floor(rp / ex) * ex
    rn = rn - np.floor(rn / ex) * ex
  return p, m


def ref_pruning(p, m, scale, n, threshold):
  """``ResNet.pruning(threshold, drop=True)`` for one weight tensor
  (``threshold`` in percent, as ``--thre``). Returns ``(p, n, scale, N)``."""
  if n <= 1:
    return p, m, scale, n
  n0 = n
  nonz = np.array([np.count_nonzero((p - m)[..., i]) * 100 for i in range(n)]) / (p.size / n)
  big_p, big_m = p, m
  for i in range(n0):  # Remove MSB
    if nonz[i] == 0:
      p, m = big_p[..., i + 1:n0], big_m[..., i + 1:n0]
      n -= 1
      if n == 1:
        break
    elif nonz[i] < threshold:
      p = big_p[..., i + 1:n0] + big_p[..., i:i + 1]
      m = big_m[..., i + 1:n0] + big_m[..., i:i + 1]
      n -= 1
      if n == 1:
        break
      p, m = np.minimum(p, 1.0), np.minimum(m, 1.0)
    else:
      break
  nonz = np.array([np.count_nonzero((p - m)[..., i]) * 100 for i in range(n)]) / (p.size / n)
  big_p, big_m, k = p, m, n
  if n > 1:  # Remove LSB
    for i in range(k):
      if nonz[k - 1 - i] <= threshold:
        p, m = big_p[..., 0:k - 1 - i], big_m[..., 0:k - 1 - i]
        n -= 1
        scale = scale * 2
        if n == 1:
          break
      else:
        break
  scale = scale * (2.0**n - 1) / (2.0**n0 - 1)
  return p, m, scale, n


def ref_finetune_step_clamp(w):
  """``cifar_finetune.py``'s ``train``: every non-BN weight clamped to [-1, 1] after the step."""
  return np.clip(w, -1.0, 1.0)


# ---------------------------------------------------------------- layout conversion


def to_ours(p, m, scale):
  """Authors' ``[..., N]`` MSB-first planes as a ``BSQWeight`` (``[N, ...]``, LSB first)."""
  pos = np.moveaxis(p[..., ::-1], -1, 0)
  neg = np.moveaxis(m[..., ::-1], -1, 0)
  return BSQWeight(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32), jnp.asarray(scale, jnp.float32))


def to_theirs(w):
  """A ``BSQWeight`` in the authors' layout, float64: ``(p, n, scale, N)``."""
  p = np.moveaxis(np.asarray(w.pos_planes, np.float64), 0, -1)[..., ::-1]
  m = np.moveaxis(np.asarray(w.neg_planes, np.float64), 0, -1)[..., ::-1]
  return p, m, float(w.scale), w.n_bits


def random_planes(seed, n, shape=(4, 3, 3, 2), scale=0.37):
  """Planes in [0, 2] as between re-quantizations (sums up to 2 (2^N - 1))."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 2, shape + (n,)), rng.uniform(0, 2, shape + (n,)), scale


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("n", [8, 4, 1])
def test_init_matches_ini2bit(n):
  """yanghr/BSQ models/cifar/bit.py, ``Bit_ConvNd.ini2bit`` (and ``to_bin``):
  planes and scale of the initial bit decomposition."""
  kernel = np.random.default_rng(n).normal(0, 0.2, (3, 3, 4, 5)).astype(np.float32)
  p, m, s = ref_ini2bit(kernel, n)
  w = bsq.init_from_float(kernel, n)
  rp, rm, rs, rn = to_theirs(w)
  assert rn == n
  np.testing.assert_array_equal(rp, p)
  np.testing.assert_array_equal(rm, m)
  assert rs == pytest.approx(s, rel=1e-7)


@pytest.mark.parametrize("n,seed", [(8, 0), (5, 1), (3, 2), (1, 3)])
def test_materialize_matches_bit_ste_forward(n, seed):
  """yanghr/BSQ models/cifar/bit.py, ``BitConv2d.forward`` (``bin`` mode) with
  ``bit_STE.forward``: the normalized plane sum clamped to [-1, 1], rounded at
  ``2^N - 1``, times the scale; planes up to 2 overflow and are clamped."""
  p, m, s = random_planes(seed, n)
  want = ref_forward(p, m, s, n)
  assert np.any(np.abs(np.sum((p - m) * ref_exps(n), -1)) > 1)  # the clamp is exercised
  w = to_ours(p, m, s)
  for fn in (bsq.materialize, jax.jit(bsq.materialize)):
    np.testing.assert_allclose(np.asarray(fn(w), np.float64), want, rtol=1e-6, atol=1e-7)


def test_ste_gradient_passes_through_round_and_clamp():
  """yanghr/BSQ models/cifar/bit.py, ``bit_STE.backward`` (returns ``g``) and
  ``BitConv2d.forward``: ``dW/dp_i = scale * exps_i``, ``dW/dn_i = -scale *
  exps_i`` for every weight, clamped ones included; ``dW/dscale = bit_STE(...)``."""
  n = 4
  p, m, s = random_planes(7, n, shape=(5, 6))
  u = np.random.default_rng(8).normal(size=(5, 6))
  g = jax.grad(lambda w: jnp.sum(bsq.materialize(w) * jnp.asarray(u, jnp.float32)))(to_ours(p, m, s))
  gp, gm, _, _ = to_theirs(g.replace(scale=jnp.zeros(())))
  want = s * u[..., None] * ref_exps(n)
  np.testing.assert_allclose(gp, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gm, -want, rtol=1e-5, atol=1e-7)
  want_scale = np.sum(ref_bit_ste(np.sum((p - m) * ref_exps(n), -1), n) * u)
  np.testing.assert_allclose(float(g.scale), want_scale, rtol=1e-5)


def test_regularizer_matches_l1reg_over_total_param():
  """yanghr/BSQ models/cifar/bit.py ``BitConv2d.L1reg``, models/cifar/resnet.py
  ``ResNet.total_param`` and cifar_prune_STE.py ``train``
  (``loss + decay * reg / TP``): each layer's group Lasso weighted by
  ``N_l n_l``, the sum over the model's parameter count, times ``--decay``.
  Layers at 8 and 3 bits; the budget gate is fully open (target 1)."""
  layers = {"a/kernel": random_planes(11, 8, shape=(3, 3, 4, 6)), "b/kernel": random_planes(12, 3, shape=(24, 10))}
  decay = 0.01
  tp = sum(np.prod(p.shape[:-1]) for p, _, _ in layers.values())
  want = decay * sum(ref_l1reg(p, m, p.shape[-1]) for p, m, _ in layers.values()) / tp
  params = {k.split("/")[0]: {"kernel": to_ours(*v)} for k, v in layers.items()}
  leaves = transform.quantized_leaves(params)
  np.testing.assert_allclose(float(bsq.weighted_group_lasso(leaves, decay)), want, rtol=1e-5)
  c = load_config("default")
  c.update(method="bsq", target_bits=1.0)
  c.bsq.alpha = decay
  pen, _ = jax.jit(methods.get(c).regularizer)(params, None)
  np.testing.assert_allclose(float(pen), want, rtol=1e-5)


def _check_requantize(p, m, s, n, threshold_percent):
  qp, qm = ref_quant(p, m, n)
  want_p, want_m, want_s, want_n = ref_pruning(qp, qm, s, n, threshold_percent)
  r = bsq.requantize(to_ours(p, m, s), threshold_percent / 100.0)
  rp, rm, rs, rn = to_theirs(r)
  assert rn == want_n <= n
  np.testing.assert_array_equal(rp, want_p)
  np.testing.assert_array_equal(rm, want_m)
  assert rs == pytest.approx(want_s, rel=1e-6)
  np.testing.assert_allclose(np.asarray(bsq.materialize(r), np.float64), ref_forward(want_p, want_m, want_s, want_n),
                             rtol=1e-6, atol=1e-7)
  return r


@pytest.mark.parametrize("seed", range(4))
def test_requantize_matches_quant_then_pruning_on_drifted_planes(seed):
  """yanghr/BSQ models/cifar/bit.py ``BitConv2d.quant`` then models/cifar/resnet.py
  ``ResNet.pruning(threshold=0.0, drop=True)`` (cifar_prune_STE.py, every
  ``--Prun_Int`` epochs): planes drifted in [0, 2] with the top and bottom
  planes shrunk, so sums overflow (clipped at ``2^N - 1``, the layer does not
  grow) and MSB/LSB planes empty."""
  rng = np.random.default_rng(seed)
  n = 6
  p, m, s = random_planes(100 + seed, n)
  shrink = np.ones(n)
  shrink[: rng.integers(0, 3)] = 0.0  # MSBs (index 0 first in the reference layout)
  p, m = p * shrink, m * shrink * rng.uniform(0.0, 0.3)
  _check_requantize(p, m, s, n, 0.0)


@pytest.mark.parametrize("n", [8, 3])
def test_requantize_overflow_clips_at_the_layer_precision(n):
  """yanghr/BSQ models/cifar/bit.py ``BitConv2d.quant``: ``Rp = min(round(.), 2^N - 1)``:
  an 8-bit layer (the largest the search starts from) whose sums overflow
  stays at 8 bits, as does any narrower layer, and its magnitudes clip."""
  p, m, s = random_planes(20 + n, n)
  p[..., 0] = 2.0  # every magnitude above 2^N - 1 before the clip
  r = _check_requantize(p, m, s, n, 0.0)
  assert r.n_bits == n
  assert np.max(np.abs(np.asarray(bsq.integer_weights(r)))) == 2**n - 1


def test_requantize_drops_zero_msbs_and_lsbs_and_rescales():
  """yanghr/BSQ models/cifar/resnet.py ``ResNet.pruning``: all-zero MSB planes
  are removed, all-zero LSB planes are removed with ``scale *= 2`` each, then
  ``scale *= (2^N - 1) / (2^N0 - 1)``."""
  q = np.array([[4, -12, 0], [8, 0, -4], [12, 4, 8]])  # 7 planes -> bits 2..3
  p, m = ref_ini2bit(q / 127.0, 7, ft=True)[:2]  # |q| <= 12 in 7 planes
  r = _check_requantize(p, m, 0.8, 7, 0.0)
  assert r.n_bits == 2
  np.testing.assert_array_equal(np.asarray(bsq.integer_weights(r)), q // 4)


@pytest.mark.parametrize("threshold_percent", [3.0, 10.0])
def test_requantize_sparse_msb_saturates_as_the_merge(threshold_percent):
  """yanghr/BSQ models/cifar/resnet.py ``ResNet.pruning`` with ``--thre`` > 0
  (percent): an MSB plane with fewer non-zero weights than the threshold is
  added to every lower plane, which is clamped to 1 (the weights that used it
  saturate at the new maximum); an LSB plane at or below it is dropped."""
  rng = np.random.default_rng(5)
  mag = rng.integers(0, 8, (10, 10))  # bit 3 unused...
  mag[1:] &= ~1  # bit 0 set only in the first row
  mag[0, :2] = [13, 9]  # ...but by 2 of 100 weights (2% < threshold)
  q = np.where(rng.uniform(size=mag.shape) < 0.5, -mag, mag)
  assert 0 < np.mean(mag & 1) <= 0.1
  p, m = ref_ini2bit(q / 15.0, 4, ft=True)[:2]
  r = _check_requantize(p, m, 0.5, 4, threshold_percent)
  assert r.n_bits == (3 if threshold_percent < 10 else 2)


def test_finetune_leaf_matches_to_finetune_and_bit_ste():
  """yanghr/BSQ models/cifar/bit.py ``BitConv2d.to_finetune`` (latent
  ``sum((p - n) exps)``, scale kept) and ``BitConv2d.forward`` in the ``ft``
  mode (``bit_STE(weight, Nbits) * scale``), with cifar_finetune.py ``train``'s
  clamp to [-1, 1] after each step; the precision is fixed."""
  n = 3
  p, m, s = random_planes(30, n)
  qp, qm = ref_quant(p, m, n)
  latent = np.sum((qp - qm) * ref_exps(n), -1)
  f = bsq.to_finetune(bsq.requantize(to_ours(p, m, s)))
  assert isinstance(f, BSQFinetuneWeight) and f.bits == n
  np.testing.assert_allclose(np.asarray(f.latent, np.float64), latent, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(bsq.materialize(f), np.float64), ref_bit_ste(latent, n) * s, rtol=1e-6)
  # A training step moves the latent past [-1, 1] and off the grid.
  moved = latent + np.random.default_rng(31).normal(0, 0.4, latent.shape)
  g = f.replace(latent=jnp.asarray(moved, jnp.float32), scale=jnp.asarray(0.41, jnp.float32))
  np.testing.assert_allclose(np.asarray(jax.jit(bsq.materialize)(g), np.float64), ref_bit_ste(moved, n) * 0.41,
                             rtol=1e-6, atol=1e-7)
  c = bsq.clamp_latent(g)
  np.testing.assert_allclose(np.asarray(c.latent, np.float64), ref_finetune_step_clamp(moved), rtol=1e-6, atol=1e-7)
  assert c.bits == n and int(bsq.precision(c)) == n
  # STE: dW/dlatent = scale everywhere (bit_STE.backward), dW/dscale = bit_STE(latent).
  u = np.random.default_rng(32).normal(size=latent.shape)
  grad = jax.grad(lambda w: jnp.sum(bsq.materialize(w) * jnp.asarray(u, jnp.float32)))(g)
  np.testing.assert_allclose(np.asarray(grad.latent, np.float64), 0.41 * u, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(grad.scale), np.sum(ref_bit_ste(moved, n) * u), rtol=1e-5)


def test_finetune_to_planes_matches_finetune_to_bit():
  """yanghr/BSQ models/cifar/bit.py ``BitConv2d.finetune_to_bit``: the latent
  clamped to [-1, 1] and decomposed by ``ini2bit(w, ft=True)`` (``S = 1``) at
  the fixed ``Nbits``, the scale kept; the weight is unchanged bit for bit."""
  n = 5
  latent = np.random.default_rng(40).uniform(-1.3, 1.3, (6, 7))
  f = BSQFinetuneWeight(jnp.asarray(latent, jnp.float32), jnp.asarray(0.23, jnp.float32), n)
  p, m, _ = ref_ini2bit(np.clip(np.asarray(f.latent, np.float64), -1, 1), n, ft=True)
  r = bsq.finetune_to_planes(f)
  rp, rm, rs, rn = to_theirs(r)
  assert rn == n
  np.testing.assert_array_equal(rp, p)
  np.testing.assert_array_equal(rm, m)
  assert rs == pytest.approx(0.23, rel=1e-7)
  np.testing.assert_array_equal(np.asarray(jax.jit(bsq.materialize)(r)), np.asarray(jax.jit(bsq.materialize)(f)))
