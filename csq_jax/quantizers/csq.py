"""CSQ: bi-level continuous sparsification of bit planes (Xiao et al.).

A weight tensor is the signed sum of ``n`` relaxed bit planes, each weighted by
its constant place value ``2^b`` and by a relaxed per-layer bit-selection gate:

    W = s / (2^n - 1) * sum_b (f(m_p^b) - f(m_n^b)) * 2^b * f(m_B^b)    (Eq. 5)

with ``f = f_beta`` the temperature sigmoid (Eq. 2). Freezing the selection to
``I(m_B >= 0)`` gives Eq. (4), used by the mixed-precision finetune of Alg. 1;
dropping it gives Eq. (3), CSQ-Uniform. With every gate a unit step the weight
is exactly ``s / (2^n - 1)`` times a signed integer built from the selected
bits, so the trained model is exactly quantized without any rounding.

Unlike the authors' PyTorch code the place values are constants, not trainable
parameters that weight decay shrinks. A bit value reads ``I(m > 0)`` and a
bit selection ``I(m_B >= 0)`` when hard (``gates``: the step at exactly 0).
"""

from __future__ import annotations

import sys

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csq_jax import gates, quantizers

MaskMode = Literal["learned", "frozen", "none"]
MASK_MODES = ("learned", "frozen", "none")


@struct.dataclass
class CSQWeight:
  """Bit-level parameters of one weight tensor.

  Attributes:
    pos_logits: ``m_p``, shape ``[n_bits, *kernel_shape]``; bit ``b`` of the
      positive part is ``f_beta(m_p[b])``.
    neg_logits: ``m_n``, same shape, the negative part.
    mask_logits: ``m_B``, shape ``[n_bits]``; bit ``b`` is used by the layer
      when ``m_B[b] >= 0``.
    scale: ``s``, a scalar; the largest representable magnitude.
    mask_mode: ``"learned"`` (Eq. 5), ``"frozen"`` (Eq. 4: the selection is
      ``I(m_B >= 0)`` and receives no gradient) or ``"none"`` (Eq. 3: every bit
      is used). Static, so changing it re-traces the step.
  """

  pos_logits: jax.Array
  neg_logits: jax.Array
  mask_logits: jax.Array
  scale: jax.Array
  mask_mode: MaskMode = struct.field(pytree_node=False, default="learned")

  @property
  def n_bits(self) -> int:
    return self.pos_logits.shape[0]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.pos_logits.shape[1:])

  @property
  def num_weights(self) -> int:
    return int(np.prod(self.shape))


def place_values(n_bits: int, dtype=jnp.float32) -> jax.Array:
  """Constant place values ``2^b`` for ``b = 0..n_bits-1``."""
  return jnp.asarray(2.0 ** np.arange(n_bits), dtype)


def bit_selection(w: CSQWeight, beta, hard: bool = False) -> jax.Array:
  """Gate of each bit plane, shape ``[n_bits]``: ``f_beta(m_B)`` (Eq. 5),
  ``I(m_B >= 0)`` without gradient (Eq. 4), or ones (Eq. 3)."""
  if w.mask_mode == "none":
    return jnp.ones_like(w.mask_logits)
  if w.mask_mode == "frozen":
    return gates.hard_gate(jax.lax.stop_gradient(w.mask_logits))
  return gates.gate(w.mask_logits, beta, hard)


def materialize(w: CSQWeight, beta, hard: bool = False) -> jax.Array:
  """The weight tensor of Eqs. (3)-(5); with ``hard`` every gate is a unit step.

  The soft path has a custom gradient that keeps nothing of shape
  ``[n_bits, *kernel]`` from the forward pass: the backward pass recomputes
  the gates from the logits (which are alive anyway as parameters), so
  training holds no more than the bit-plane parameters, their gradients and
  optimizer state beyond what the float model needs. Being a ``custom_vjp``,
  it supports reverse-mode differentiation only.

  Args:
    w: the layer's bit-level parameters.
    beta: gate temperature (ignored when ``hard``).
    hard: use ``I(x >= 0)`` for every gate, giving an exactly quantized weight.

  Returns:
    The weight, shape ``w.shape``, dtype of the logits.
  """
  n = w.n_bits
  if hard:
    bits = gates.hard_bit(w.pos_logits) - gates.hard_bit(w.neg_logits)
    coeff = place_values(n, bits.dtype) * bit_selection(w, beta, hard=True)
    return (w.scale / (2.0**n - 1.0)) * jnp.tensordot(coeff, bits, axes=1)
  dtype = w.pos_logits.dtype
  beta = jnp.asarray(beta, dtype)
  coeff = place_values(n, dtype) * bit_selection(w, beta)
  return _soft_weight(w.pos_logits, w.neg_logits, coeff, w.scale, beta)


@jax.custom_vjp
def _soft_weight(pos, neg, coeff, scale, beta):
  """``scale/(2^n-1) * sum_b coeff[b] (f(pos[b]) - f(neg[b]))``, summed plane by
  plane (the bit axis is static) so no ``[n_bits, ...]`` array is formed."""
  acc = jnp.zeros(pos.shape[1:], pos.dtype)
  for b in range(pos.shape[0]):
    acc = acc + coeff[b] * (gates.soft_gate(pos[b], beta) - gates.soft_gate(neg[b], beta))
  return (scale / (2.0 ** pos.shape[0] - 1.0)) * acc


def _soft_weight_fwd(pos, neg, coeff, scale, beta):
  return _soft_weight(pos, neg, coeff, scale, beta), (pos, neg, coeff, scale, beta)


def _soft_weight_bwd(residuals, g):
  pos, neg, coeff, scale, beta = residuals
  n = pos.shape[0]
  k = scale / (2.0**n - 1.0)
  # Everything keeps the kernel's shape ([n_bits, *kernel]; no flattening),
  # so a kernel axis sharded over devices (fsdp) stays sharded: a reshape
  # to [n_bits, N] would make XLA gather the bit planes.
  per_bit = (k * coeff).reshape((n,) + (1,) * g.ndim)
  kcg = per_bit * g[None]
  sp, sn = gates.soft_gate(pos, beta), gates.soft_gate(neg, beta)
  dsp, dsn = sp * (1 - sp), sn * (1 - sn)  # sigma' of Eq. (2), up to the factor beta
  # The gates of sum_i bits_b * g are written as 0.5 + 0.5 tanh(x/2) (the same
  # sigmoid) so that XLA does not share them with sp/sn: shared, they depend on
  # the logits alone and XLA:CPU computes them in the forward pass, keeping every
  # layer's [n_bits, N] copy alive at the activation peak.
  tanh_gate = lambda x: 0.5 + 0.5 * jnp.tanh(0.5 * x)
  # The sum over weights as a contraction with ones over every kernel axis:
  # XLA:CPU fuses it with the product instead of materializing [n_bits, N]
  # for a reduction (and is ~3x faster).
  kernel_axes = tuple(range(1, pos.ndim))
  contract = lambda x: jax.lax.dot_general(x, jnp.ones_like(g), ((kernel_axes, tuple(range(g.ndim))), ((), ())))
  raw = contract((tanh_gate(beta * pos) - tanh_gate(beta * neg)) * g[None])
  return (
      beta * dsp * kcg,
      -beta * dsn * kcg,
      k * raw,
      (jnp.dot(coeff, raw) / (2.0**n - 1.0)).astype(scale.dtype),
      jnp.reshape(jnp.sum((pos * dsp - neg * dsn) * kcg), jnp.shape(beta)).astype(beta.dtype),
  )


_soft_weight.defvjp(_soft_weight_fwd, _soft_weight_bwd)


def integer_weights(w: CSQWeight) -> jax.Array:
  """Signed integers ``q`` of the hard-quantized weight ``W = s/(2^n-1) * q``.

  Each ``q`` is a sum of ``d_b 2^b`` over the selected bits with digits
  ``d_b`` in ``{-1, 0, 1}``, so ``|q| <= sum of the selected place values``.
  """
  digits = (gates.hard_bit(w.pos_logits) - gates.hard_bit(w.neg_logits)).astype(jnp.int32)
  mask = bit_selection(w, None, hard=True).astype(jnp.int32)
  places = (2 ** jnp.arange(w.n_bits, dtype=jnp.int32)) * mask
  return jnp.tensordot(places, digits, axes=1)


def step_size(w: CSQWeight) -> jax.Array:
  """Weight value of one integer unit: ``W = step_size * integer_weights`` (hard)."""
  return w.scale / (2.0**w.n_bits - 1.0)


def precision(w: CSQWeight) -> jax.Array:
  """Bits the layer uses: ``sum_b I(m_B^b >= 0)`` (Sec. III-B), an int32 scalar."""
  if w.mask_mode == "none":
    return jnp.asarray(w.n_bits, jnp.int32)
  return jnp.sum(w.mask_logits >= 0).astype(jnp.int32)


def mask_regularizer(w: CSQWeight, beta) -> jax.Array:
  """``R(m_B) = sum_b f_beta(m_B^b)`` (Eq. 6); zero unless the mask is learned."""
  if w.mask_mode != "learned":
    return jnp.zeros((), w.mask_logits.dtype)
  return jnp.sum(gates.soft_gate(w.mask_logits, beta))


def init_from_float(
    kernel: jax.Array,
    n_bits: int = 8,
    logit_init: float = 1.0,
    mask_mode: MaskMode = "learned",
    off_logit: float = 0.0,
) -> CSQWeight:
  """Bit planes of the ``n_bits`` symmetric linear quantization of ``kernel``.

  ``s = max|W|`` and ``q = round(|W| (2^n - 1) / s)``; bit ``b`` of ``q`` set
  gives logit ``logit_init`` in the plane of the weight's sign, and every
  other logit (unset bits, the opposite plane) is ``off_logit``. With the
  defaults this is the authors' ``ini2bit`` (lawsonX/CSQ ``bits/bitcs.py``:
  set bits 1, everything else exactly 0, so unset bits and the opposite plane
  start on the gate's boundary, free to move either way); ``off_logit =
  -logit_init`` is the symmetric start (every bit decided). Mask logits start
  at 0 (``mask_initial_value``): every bit is selected. Either way the hard
  materialization (``I(m > 0)`` per bit) equals the rounded kernel exactly.
  At temperature beta the soft weight is the rounded kernel times
  ``sigmoid(beta logit_init) - sigmoid(beta off_logit)`` times the mask gate
  ``1/2``.
  """
  _check_mode(mask_mode)
  concrete = isinstance(off_logit, (int, float)) and isinstance(logit_init, (int, float))
  if concrete and not off_logit <= 0 < logit_init:
    raise ValueError(f"CSQ init needs off_logit <= 0 < logit_init (a set bit reads 1, any other 0); got"
                     f" logit_init={logit_init}, off_logit={off_logit}.")
  kernel = jnp.asarray(kernel, jnp.float32)
  levels = 2.0**n_bits - 1.0
  scale = jnp.max(jnp.abs(kernel))
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.round(jnp.abs(kernel) / scale * levels).astype(jnp.int32)
  bits = (q[None] >> jnp.arange(n_bits).reshape((-1,) + (1,) * kernel.ndim)) & 1
  on = jnp.where(bits == 1, logit_init, off_logit).astype(jnp.float32)
  off = jnp.full_like(on, off_logit, dtype=jnp.float32)
  positive = (kernel >= 0)[None]
  return CSQWeight(
      pos_logits=jnp.where(positive, on, off),
      neg_logits=jnp.where(positive, off, on),
      mask_logits=jnp.zeros((n_bits,), jnp.float32),
      scale=scale.astype(jnp.float32),
      mask_mode=mask_mode,
  )


def init_random(
    key: jax.Array,
    shape: tuple[int, ...],
    fan_in: int,
    n_bits: int = 8,
    logit_init: float = 2.0,
    mask_mode: MaskMode = "learned",
) -> CSQWeight:
  """Training from scratch: independent random bit logits.

  Every logit of ``m_p`` and ``m_n`` is drawn from ``U(-logit_init,
  logit_init)``; the scale is then set so that the soft weight at ``beta = 1``
  has the He-normal standard deviation ``sqrt(2 / fan_in)``.
  """
  _check_mode(mask_mode)
  kp, kn = jax.random.split(key)
  full = (n_bits,) + tuple(shape)
  pos = jax.random.uniform(kp, full, jnp.float32, -logit_init, logit_init)
  neg = jax.random.uniform(kn, full, jnp.float32, -logit_init, logit_init)
  w = CSQWeight(pos, neg, jnp.zeros((n_bits,), jnp.float32), jnp.ones((), jnp.float32), mask_mode)
  std = jnp.std(materialize(w, 1.0))
  scale = jnp.sqrt(2.0 / fan_in) / jnp.maximum(std, 1e-12)
  return w.replace(scale=scale)


def with_min_bits(w: CSQWeight, min_bits: int) -> CSQWeight:
  """The layer with at least ``min_bits`` selected bits: where fewer are
  selected, the ``min_bits`` bits with the largest mask logits are switched
  on (their logits raised to 0). A 0-bit layer outputs zeros and cuts the
  network; the budget penalty of Eq. (7) alone can prune a layer's last bit.
  Layers that already have enough bits are unchanged. Traceable: applied
  after every search step, it is a projection onto the feasible masks, so
  the budget term's ``Delta_S`` always counts the bits the layer keeps."""
  if w.mask_mode == "none" or min_bits <= 0:
    return w
  k = min(min_bits, w.mask_logits.shape[0])
  kth_largest = jnp.sort(w.mask_logits)[-k]
  raised = jnp.where(w.mask_logits >= kth_largest, jnp.maximum(w.mask_logits, 0.0), w.mask_logits)
  return w.replace(mask_logits=jnp.where(precision(w) < k, raised, w.mask_logits))


def with_precision(w: CSQWeight, bits: int) -> CSQWeight:
  """The layer with exactly ``bits`` selected planes, and consecutive ones:
  the window ``p .. p + bits - 1`` of largest summed mask logit (among equal
  sums the higher window, whose planes carry the magnitude), every other
  plane switched off. Consecutive planes make the integers ``2^p`` times
  integers in ``[-(2^bits - 1), 2^bits - 1]``, which an integer kernel of
  that width runs (the ONNX export moves ``2^p`` into the scale); a search's
  own selection can have gaps (planes {0, 1, 2, 7}: integers up to 135).
  A selected logit is raised to at least 0, an unselected one lowered below
  0 (``-1e-3`` at most), so the hard selection ``I(m_B >= 0)`` (Eq. 4) is
  exactly the window. Used to move a searched layer to an allowed precision
  (``allowed_bits``), also one already at an allowed count of planes.

  Raises:
    ValueError: ``bits`` outside ``1..n_bits``, or a CSQ-Uniform layer (no
      mask) asked for other than its ``n_bits``.
  """
  if not 1 <= bits <= w.n_bits:
    raise ValueError(f"A CSQ layer of {w.n_bits} planes cannot select {bits}.")
  if w.mask_mode == "none":
    if bits != w.n_bits:
      raise ValueError(f"A CSQ-Uniform layer keeps all {w.n_bits} planes; it cannot be set to {bits} bits.")
    return w
  logits = np.asarray(jax.device_get(w.mask_logits), np.float64)
  sums = np.convolve(logits, np.ones(bits), mode="valid")  # sums[p]: planes p .. p + bits - 1
  start = len(sums) - 1 - int(np.argmax(sums[::-1]))  # the highest of the best windows
  keep = (np.arange(w.n_bits) >= start) & (np.arange(w.n_bits) < start + bits)
  chosen = np.where(keep, np.maximum(logits, 0.0), np.minimum(logits, -1e-3))
  return w.replace(mask_logits=jnp.asarray(chosen, jnp.float32))


def with_mask_mode(w: CSQWeight, mask_mode: MaskMode) -> CSQWeight:
  """The same parameters under another bit-selection mode (e.g. Alg. 1's finetune)."""
  _check_mode(mask_mode)
  return w.replace(mask_mode=mask_mode)


def _check_mode(mask_mode: str) -> None:
  if mask_mode not in MASK_MODES:
    raise ValueError(f"Unknown CSQ mask_mode {mask_mode!r}; expected one of {MASK_MODES}.")


def check_shapes(w: CSQWeight) -> None:
  """Assert the documented shapes (``m_p``/``m_n`` alike, ``m_B`` ``[n_bits]``)."""
  chex.assert_equal_shape([w.pos_logits, w.neg_logits])
  chex.assert_shape(w.mask_logits, (w.n_bits,))
  chex.assert_shape(w.scale, ())


# Fields whose axis 0 is the bit axis (``quantizers.bit_fields``: sharding keeps it whole).
BIT_FIELDS = ("pos_logits", "neg_logits")


def grid_places(w: CSQWeight) -> list[int]:
  """The selected planes (Eq. 4's ``I(m_B >= 0)``; every plane for CSQ-Uniform):
  the place values whose signed sums form the layer's grid (host ints)."""
  selected = np.asarray(jax.device_get(bit_selection(w, None, hard=True)))
  return [int(p) for p in np.nonzero(selected)[0]]


quantizers.register(CSQWeight, sys.modules[__name__])
