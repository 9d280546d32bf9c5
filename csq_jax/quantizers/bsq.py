"""BSQ: bit-level sparsity quantization (Yang et al., ICLR 2021; ref. [8] of CSQ).

The baseline of the CSQ paper's Sec. II-A, ported from the authors' public
code (yanghr/BSQ: ``models/cifar/bit.py``, ``models/cifar/resnet.py``,
``cifar_prune_STE.py``, ``cifar_finetune.py``) and written anew here.

Search phase. A weight tensor is a signed sum of ``n`` float bit planes with
constant place values ``2^b``, clamped to the layer's range, rounded with a
straight-through estimator and scaled by a trainable ``s``:

    q = clip(Round[sum_b (W_p^(b) - W_n^(b)) 2^b], -(2^n - 1), 2^n - 1)
    W = s / (2^n - 1) * q                                               (Eq. 1)

(``bit_STE`` in ``bit.py`` clamps the normalized sum to [-1, 1] before it
rounds; the gradient passes straight through both.) The planes ``W_p``,
``W_n`` are float variables clamped to ``[0, 2]`` after every optimizer step
(``clamp_planes``); they start binary (``init_from_float``, the authors'
``ini2bit``) and drift away from ``{0, 1}``. Bit-level sparsity is induced by
a group Lasso over each bit plane (``group_lasso``, ``L1reg``), weighted by
the layer's memory over the model's parameter count
(``weighted_group_lasso``). Every few epochs, outside the jitted step,
``requantize`` re-binarizes the planes, clipping at the layer's range
(``quant``), and removes all-zero (or sparse) MSB and LSB planes
(``pruning``): that is BSQ's precision adjustment, and the layer's precision
is its number of planes. It never grows.

Finetune phase (``cifar_finetune.py``, ``to_finetune``). Each layer becomes a
``BSQFinetuneWeight``: a float latent ``w = q / (2^n - 1)`` in ``[-1, 1]`` at
the precision the search left, trained with

    W = s / (2^n - 1) * Round[clip(w, -1, 1) (2^n - 1)]

(straight-through) and clamped to ``[-1, 1]`` after every step
(``clamp_latent``); the precision is a static field and never changes. At the
end ``finetune_to_planes`` (``finetune_to_bit``) writes it back as exact
binary planes at that precision.

Precision convention shared with CSQ and STE: ``n`` planes are ``n`` magnitude
bits plus a sign, integers in ``[-(2^n - 1), 2^n - 1]``.

Threshold units: the authors' ``--thre`` is a percentage of non-zero weights
in a plane; ``threshold`` here is the same quantity as a fraction
(``--thre 1.0`` is ``threshold=0.01``).
"""

from __future__ import annotations

import sys

from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csq_jax import quantizers

PLANE_MIN = 0.0
PLANE_MAX = 2.0
GROUP_EPS = 1e-8  # inside each group's square root, as the authors' L1reg


@struct.dataclass
class BSQWeight:
  """Bit-plane parameters of one weight tensor (Eq. 1), the search phase.

  Attributes:
    pos_planes: ``W_p``, shape ``[n_bits, *kernel_shape]``, float32 in
      ``[0, 2]``; plane ``b`` has place value ``2^b``.
    neg_planes: ``W_n``, same shape, the negative part.
    scale: ``s``, a float32 scalar, trained; the magnitude of the integer
      ``2^n - 1``.
  """

  pos_planes: jax.Array
  neg_planes: jax.Array
  scale: jax.Array

  @property
  def n_bits(self) -> int:
    return self.pos_planes.shape[0]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.pos_planes.shape[1:])

  @property
  def num_weights(self) -> int:
    return int(np.prod(self.shape))


@struct.dataclass
class BSQFinetuneWeight:
  """One layer in BSQ's finetune phase, its precision fixed by the search.

  Attributes:
    latent: the float weight ``w`` in ``[-1, 1]`` (units of ``s``), kernel
      shape, trained.
    scale: ``s``, a float32 scalar, trained.
    bits: the precision ``n`` (static): the grid is
      ``s/(2^n - 1) * {-(2^n - 1), ..., 2^n - 1}``.
  """

  latent: jax.Array
  scale: jax.Array
  bits: int = struct.field(pytree_node=False, default=8)

  @property
  def n_bits(self) -> int:
    return self.bits

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.latent.shape)

  @property
  def num_weights(self) -> int:
    return int(np.prod(self.shape))


def place_values(n_bits: int, dtype=jnp.float32) -> jax.Array:
  """Constant place values ``2^b`` for ``b = 0..n_bits-1``, shape ``[n_bits]``."""
  return jnp.asarray(2.0 ** np.arange(n_bits), dtype)


def _levels(n_bits: int) -> float:
  return 2.0**n_bits - 1.0


def plane_sum(w: BSQWeight) -> jax.Array:
  """``sum_b (W_p^(b) - W_n^(b)) 2^b``, the unrounded, unclamped integer of
  Eq. (1), shape ``w.shape``. One contraction over the bit axis."""
  diff = w.pos_planes - w.neg_planes
  return jnp.tensordot(place_values(w.n_bits, diff.dtype), diff, axes=1)


def _unscaled(w) -> jax.Array:
  """The layer's real-valued integer before rounding, ``(2^n - 1)`` times
  the authors' normalized weight: the plane sum, or ``latent (2^n - 1)``."""
  if isinstance(w, BSQFinetuneWeight):
    return w.latent * _levels(w.bits)
  return plane_sum(w)


def _clip_round_ste(x: jax.Array, levels: float) -> jax.Array:
  """``clip(round(x), -levels, levels)`` forward, identity backward (the
  authors' ``bit_STE``: clamp and round, gradient passed through both)."""
  return x + jax.lax.stop_gradient(jnp.clip(jnp.round(x), -levels, levels) - x)


def materialize(w, beta=None, hard: bool = False) -> jax.Array:
  """The layer's weight: ``s/(2^n-1) * clip(Round[x], -(2^n-1), 2^n-1)`` with
  ``x`` the plane sum (search, Eq. 1) or ``latent (2^n - 1)`` (finetune).

  Rounding and clamp pass the gradient straight through, as the authors'
  ``bit_STE``: ``dW/dW_p^(b) = 2^b s/(2^n-1)`` (minus that for ``W_n^(b)``),
  ``dW/dlatent = s``, and ``dW/ds = q/(2^n-1)``. ``beta``/``hard`` are
  accepted for the uniform quantizer interface; the forward pass is always
  exactly quantized.

  Returns:
    The weight, shape ``w.shape``, dtype of the parameters.
  """
  del beta, hard
  levels = _levels(w.n_bits)
  return (w.scale / levels) * _clip_round_ste(_unscaled(w), levels)


def integer_weights(w) -> jax.Array:
  """Signed integers ``q`` (int32) in ``[-(2^n - 1), 2^n - 1]`` with
  ``materialize(w) = s/(2^n-1) * q``."""
  levels = _levels(w.n_bits)
  return jnp.clip(jnp.round(_unscaled(w)), -levels, levels).astype(jnp.int32)


def step_size(w) -> jax.Array:
  """Weight value of one integer unit: ``materialize(w) = step_size * integer_weights``."""
  return w.scale / _levels(w.n_bits)


def precision(w) -> jax.Array:
  """Bits the layer uses: its number of planes ``n`` (int32 scalar).

  The planes are pruned only by ``requantize``, so in the search this is the
  precision as of the last re-quantization; in the finetune it is fixed.
  Static (from the shape or the static field).
  """
  return jnp.asarray(w.n_bits, jnp.int32)


def effective_precision(w: BSQWeight) -> jax.Array:
  """Planes the layer would keep if re-quantized now (threshold 0):
  ``bitlength(max|q|)``, at least 1, an int32 scalar; traceable. Between
  re-quantizations this is where the group Lasso has taken the layer
  (``precision`` only follows at the next ``requantize``)."""
  m = jnp.max(jnp.abs(jax.lax.stop_gradient(integer_weights(w)))).astype(jnp.float32)
  return jnp.maximum(jnp.ceil(jnp.log2(m + 1.0)), 1.0).astype(jnp.int32)


def _binary_planes(q: np.ndarray, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact binary decomposition of ``|q|`` into the plane of ``q``'s sign.

  Returns ``(pos, neg)`` float32 arrays of shape ``[n_bits, *q.shape]`` with
  entries in ``{0, 1}``; requires ``|q| < 2^n_bits``.
  """
  mag = np.abs(q).astype(np.int64)
  shifts = np.arange(n_bits, dtype=np.int64).reshape((-1,) + (1,) * q.ndim)
  bits = ((mag[None] >> shifts) & 1).astype(np.float32)
  positive = (q >= 0)[None]
  return np.where(positive, bits, 0.0).astype(np.float32), np.where(positive, 0.0, bits).astype(np.float32)


def init_from_float(kernel: jax.Array, bits: int = 8) -> BSQWeight:
  """Binary planes of the ``bits``-bit symmetric linear quantization of
  ``kernel`` (the authors' ``ini2bit``).

  ``s = max|W|`` (1 for an all-zero kernel) and ``|q| = round(|W| (2^n-1) / s)``;
  bit ``b`` of ``|q|`` is 1 in the plane of the weight's sign and 0 elsewhere,
  so the planes are exactly 0/1 and ``materialize`` equals the rounded kernel.
  Traceable (as CSQ's initializer).
  """
  if not 1 <= bits <= 16:
    raise ValueError(f"BSQ bits must be in 1..16, got {bits}.")
  kernel = jnp.asarray(kernel, jnp.float32)
  scale = jnp.max(jnp.abs(kernel))
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.round(jnp.abs(kernel) / scale * _levels(bits)).astype(jnp.int32)
  shifts = jnp.arange(bits, dtype=jnp.int32).reshape((-1,) + (1,) * kernel.ndim)
  on = ((q[None] >> shifts) & 1).astype(jnp.float32)
  positive = (kernel >= 0)[None]
  return BSQWeight(
      pos_planes=jnp.where(positive, on, 0.0),
      neg_planes=jnp.where(positive, 0.0, on),
      scale=scale.astype(jnp.float32),
  )


def clamp_planes(w: BSQWeight) -> BSQWeight:
  """Project the planes onto ``[0, 2]`` (BSQ's clamp after every optimizer
  step in ``cifar_prune_STE.py``); the scale is left alone. Traceable."""
  return w.replace(
      pos_planes=jnp.clip(w.pos_planes, PLANE_MIN, PLANE_MAX),
      neg_planes=jnp.clip(w.neg_planes, PLANE_MIN, PLANE_MAX),
  )


def plane_norms(w: BSQWeight) -> jax.Array:
  """``sqrt(eps + ||W_p^(b)||^2 + ||W_n^(b)||^2)`` for each bit ``b``, shape
  ``[n_bits]``, with the authors' ``eps = 1e-8`` (``L1reg``): finite, and a
  zero gradient at an all-zero plane."""
  axes = tuple(range(1, w.pos_planes.ndim))
  sq = jnp.sum(jnp.square(w.pos_planes), axis=axes) + jnp.sum(jnp.square(w.neg_planes), axis=axes)
  return jnp.sqrt(GROUP_EPS + sq)


def group_lasso(w: BSQWeight) -> jax.Array:
  """BSQ's bit-level group Lasso of one layer (scalar):

      B_GL(W) = sum_b sqrt(eps + sum(W_p^(b)^2) + sum(W_n^(b)^2)),

  one group per bit plane, holding its positive and negative planes together
  (the authors' ``L1reg`` without its memory factor).
  """
  return jnp.sum(plane_norms(w))


def memory_weights(leaves: Mapping[str, BSQWeight], num_params: int | None = None) -> dict[str, float]:
  """Each layer's memory weight ``N_l n_l / sum_k N_k`` (the authors' ``L1reg``
  factor ``total_weight * Nbits`` over ``total_param()``).

  ``N_l`` is the layer's number of weights and ``n_l`` its precision (planes);
  ``sum_k N_k`` is ``num_params`` (the parameter count of every counted layer,
  fixed-precision ones included) or, by default, that of ``leaves``. The
  weights sum to the average precision (8 for an 8-bit model), so the
  pressure of a fixed ``alpha`` falls only as the layers lose bits, and
  ``alpha`` means what the authors' ``--decay`` means. Python floats,
  constants for the gradient.
  """
  if num_params is None:
    num_params = sum(w.num_weights for w in leaves.values())
  if num_params <= 0:
    return {k: 0.0 for k in leaves}
  return {k: float(w.num_weights) * float(w.n_bits) / float(num_params) for k, w in leaves.items()}


def weighted_group_lasso(
    leaves: Mapping[str, BSQWeight],
    alpha,
    weights: Mapping[str, float] | None = None,
) -> jax.Array:
  """BSQ's memory-aware regularizer (its Eq. 5 as coded):
  ``alpha * sum_l N_l n_l B_GL(W^l) / sum_k N_k``.

  Args:
    leaves: ``{path: BSQWeight}`` of the regularized layers.
    alpha: regularization strength (the authors' ``--decay``).
    weights: per-layer weights ``{path: weight}``; by default
      ``memory_weights(leaves)``.

  Returns:
    A float32 scalar.
  """
  if weights is None:
    weights = memory_weights(leaves)
  total = jnp.zeros((), jnp.float32)
  for k, w in leaves.items():
    total = total + weights[k] * group_lasso(w)
  return alpha * total


def requantize(w: BSQWeight, threshold: float = 0.0) -> BSQWeight:
  """BSQ's periodic re-quantization and precision adjustment (the authors'
  ``quant`` then ``pruning(threshold, drop=True)``).

  Runs between epochs on concrete arrays (numpy; not traceable). It may lower
  the number of planes, never raise it, so the returned leaf may have a new
  shape: the training step re-traces and the optimizer state of this leaf
  must be re-initialized.

  With ``n`` planes, ``q = integer_weights(w)`` (the rounded sum clipped to
  ``2^n - 1``, exactly what the forward pass computes) and ``f_b`` the
  fraction of weights with bit ``b`` of ``|q|`` set:

  1. Re-binarize: the planes become the exact binary decomposition of ``|q|``
     in the plane of ``q``'s sign; a sum above ``2^n - 1`` is clipped (the
     layer does not grow).
  2. MSB: from the top plane down, a plane with ``f_b = 0`` is dropped; one
     with ``0 < f_b < threshold`` is dropped too and the magnitudes that
     used it saturate at the new maximum, ``|q| <- min(|q|, 2^b - 1)`` (the
     authors add the sparse MSB plane to every lower plane and clamp them to
     1, which is that saturation); the first plane above the threshold stops.
  3. LSB: from bit 0 up, each plane with ``f_b <= threshold`` is dropped and
     its bits truncated, ``|q'| = |q| >> k`` for ``k`` dropped planes (exact
     when they are all zero); the first plane above the threshold stops.
  At least one plane is kept (an all-zero layer keeps one zero plane).
  ``threshold`` is a fraction (the authors' ``--thre`` percentage / 100).

  Scale: with ``n'`` planes kept and ``k`` LSB planes dropped,

      s' = s * 2^k * (2^n' - 1) / (2^n - 1),

  so ``s'/(2^n'-1) * q' = s/(2^n-1) * 2^k q'``: every weight keeps its
  represented value when the dropped planes are zero, and otherwise loses
  only its saturated high or truncated low bits.

  Args:
    w: the layer's planes.
    threshold: non-zero fraction below which an MSB plane, and at or below
      which an LSB plane, is dropped.

  Returns:
    A ``BSQWeight`` with ``n' <= n`` binary planes, shape ``[n', *w.shape]``.
  """
  q = np.asarray(integer_weights(w), np.int64)
  n = w.n_bits
  mag = np.abs(q)

  def used(b):
    return float(np.mean(((mag >> b) & 1) != 0)) if mag.size else 0.0

  top = n  # planes 0..top-1 are kept
  while top > 1:
    f = used(top - 1)
    if f > 0.0 and f >= threshold:
      break
    if f > 0.0:
      mag = np.minimum(mag, 2 ** (top - 1) - 1)
    top -= 1
  low = 0
  while top - low > 1 and used(low) <= threshold:
    low += 1
  n_new = top - low
  q_new = np.sign(q) * (mag >> low)
  pos, neg = _binary_planes(q_new, n_new)
  s = float(np.asarray(w.scale, np.float64))
  s_new = s * 2.0**low * _levels(n_new) / _levels(n)
  return BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(s_new, jnp.float32))


def with_precision(w, bits: int):
  """The layer at ``bits`` bits, each weight kept as close as that grid allows.

  Finetune leaf: the same latent on the ``bits``-bit grid (the precision is
  static, ``materialize`` rounds ``latent (2^bits - 1)``). Planes (a search
  that ends without a finetune): ``q`` moves by ``k = |bits - n|`` place
  values, ``|q'| = min(round(|q| / 2^k), 2^bits - 1)`` down (round half up)
  or ``|q'| = |q| 2^k`` up, and the scale follows as in ``requantize``,
  ``s' = s 2^(n - bits) (2^bits - 1) / (2^n - 1)``, so an unchanged
  magnitude keeps its value. Host side (numpy) for planes.
  """
  if bits < 1:
    raise ValueError(f"A BSQ layer needs at least 1 bit, got {bits}.")
  if isinstance(w, BSQFinetuneWeight):
    return w.replace(bits=bits)
  n = w.n_bits
  if bits == n:
    return w
  q = np.asarray(integer_weights(w), np.int64)
  mag = np.abs(q)
  if bits < n:
    k = n - bits
    mag = np.minimum((mag + (1 << (k - 1))) >> k, 2**bits - 1)
  else:
    mag = mag << (bits - n)
  pos, neg = _binary_planes(np.sign(q) * mag, bits)
  s_new = float(np.asarray(w.scale, np.float64)) * 2.0 ** (n - bits) * _levels(bits) / _levels(n)
  return BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(s_new, jnp.float32))


def to_finetune(w: BSQWeight) -> BSQFinetuneWeight:
  """The finetune leaf of a (re-quantized) layer (the authors' ``to_finetune``):
  ``latent = q / (2^n - 1)`` with ``q = integer_weights(w)``, the scale kept,
  ``bits = n``; the weight is unchanged. Traceable."""
  levels = _levels(w.n_bits)
  latent = integer_weights(w).astype(jnp.float32) / levels
  return BSQFinetuneWeight(latent=latent, scale=jnp.asarray(w.scale, jnp.float32), bits=w.n_bits)


def clamp_latent(w: BSQFinetuneWeight) -> BSQFinetuneWeight:
  """Project the latent onto ``[-1, 1]`` (the clamp after every step of
  ``cifar_finetune.py``); the scale is left alone. Traceable."""
  return w.replace(latent=jnp.clip(w.latent, -1.0, 1.0))


def finetune_to_planes(w: BSQFinetuneWeight) -> BSQWeight:
  """Exact binary planes of a finetuned layer at its fixed precision (the
  authors' ``finetune_to_bit``): ``q = integer_weights(w)``, the scale kept,
  ``w.bits`` planes, so ``materialize`` is unchanged bit for bit."""
  pos, neg = _binary_planes(np.asarray(integer_weights(w), np.int64), w.bits)
  return BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(w.scale, jnp.float32))


def check_shapes(w) -> None:
  """Assert the documented shapes (``W_p``/``W_n`` alike, scalar ``s``)."""
  if isinstance(w, BSQFinetuneWeight):
    chex.assert_shape(w.scale, ())
    return
  chex.assert_equal_shape([w.pos_planes, w.neg_planes])
  chex.assert_shape(w.scale, ())


# Fields whose axis 0 is the bit axis (``quantizers.bit_fields``: sharding keeps it whole).
BIT_FIELDS = ("pos_planes", "neg_planes")


def static_precision(w) -> int:
  """Bits from the leaf's structure alone (``quantizers.static_precision``)."""
  return int(w.n_bits)


quantizers.register(BSQWeight, sys.modules[__name__])
quantizers.register(BSQFinetuneWeight, sys.modules[__name__])
