"""BSQ: bit-level sparsity quantization (Yang et al., 2021; ref. [8] of CSQ).

The baseline of the CSQ paper's Sec. II-A. A weight tensor is a signed sum of
``n`` float bit planes with constant place values ``2^b``, rounded to an
integer with a straight-through estimator and scaled by a trainable ``s``:

    W = s / (2^n - 1) * Round[sum_b (W_p^(b) - W_n^(b)) 2^b]          (Eq. 1)

The planes ``W_p``, ``W_n`` are float variables clamped to ``[0, 2]`` after
every optimizer step (``clamp_planes``); they start binary (``init_from_float``)
and drift away from ``{0, 1}`` during training. Bit-level sparsity is induced
by a group Lasso over each bit plane (``group_lasso``), reweighted by the
layer's share of the model memory (``weighted_group_lasso``). Every few epochs,
outside the jitted step, ``requantize`` re-binarizes the planes, grows a plane
when a magnitude overflows ``2^n - 1`` and removes all-zero MSB and (nearly)
all-zero LSB planes: that removal is BSQ's precision adjustment, and the
layer's precision is its number of planes.

Precision convention shared with CSQ and STE: ``n`` planes are ``n`` magnitude
bits plus a sign, integers in ``[-(2^n - 1), 2^n - 1]`` after re-quantization.
Between re-quantizations the rounded sum can exceed that range (planes go up
to 2), and the weight is still Eq. (1) evaluated as written.
"""

from __future__ import annotations

from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csq_jax.quantizers.ste import round_ste

PLANE_MIN = 0.0
PLANE_MAX = 2.0


@struct.dataclass
class BSQWeight:
  """Bit-plane parameters of one weight tensor (Eq. 1).

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


def place_values(n_bits: int, dtype=jnp.float32) -> jax.Array:
  """Constant place values ``2^b`` for ``b = 0..n_bits-1``, shape ``[n_bits]``."""
  return jnp.asarray(2.0 ** np.arange(n_bits), dtype)


def _levels(n_bits: int) -> float:
  return 2.0**n_bits - 1.0


def plane_sum(w: BSQWeight) -> jax.Array:
  """``sum_b (W_p^(b) - W_n^(b)) 2^b``, the unrounded integer of Eq. (1),
  shape ``w.shape``. One contraction over the bit axis."""
  diff = w.pos_planes - w.neg_planes
  return jnp.tensordot(place_values(w.n_bits, diff.dtype), diff, axes=1)


def materialize(w: BSQWeight, beta=None, hard: bool = False) -> jax.Array:
  """The weight of Eq. (1): ``s/(2^n-1) * Round[sum_b (W_p^b - W_n^b) 2^b]``.

  The rounding passes the gradient straight through, so
  ``dW/dW_p^(b) = 2^b s/(2^n-1)`` (and minus that for ``W_n^(b)``), and
  ``dW/ds = Round[...]/(2^n-1)``. ``beta``/``hard`` are accepted for the
  uniform quantizer interface; the forward pass is always exactly quantized.

  Returns:
    The weight, shape ``w.shape``, dtype of the planes.
  """
  del beta, hard
  return (w.scale / _levels(w.n_bits)) * round_ste(plane_sum(w))


def integer_weights(w: BSQWeight) -> jax.Array:
  """Signed integers ``q = Round[sum_b (W_p^b - W_n^b) 2^b]`` (int32) with
  ``materialize(w) = s/(2^n-1) * q``. Before ``requantize``, ``|q|`` may
  exceed ``2^n - 1`` (at most ``2^(n+1) - 2``)."""
  return jnp.round(plane_sum(w)).astype(jnp.int32)


def step_size(w: BSQWeight) -> jax.Array:
  """Weight value of one integer unit: ``materialize(w) = step_size * integer_weights``."""
  return w.scale / _levels(w.n_bits)


def precision(w: BSQWeight) -> jax.Array:
  """Bits the layer uses: its number of planes ``n`` (int32 scalar).

  The planes are pruned only by ``requantize``, so this is the precision as of
  the last re-quantization; it is static (from the shape).
  """
  return jnp.asarray(w.n_bits, jnp.int32)


def effective_precision(w: BSQWeight) -> jax.Array:
  """Planes the layer would keep if re-quantized now, ``bitlength(max|q|)``
  (at least 1), an int32 scalar; traceable. Between re-quantizations this is
  where the group Lasso has taken the layer (``precision`` only follows at
  the next ``requantize``)."""
  m = jnp.max(jnp.abs(jnp.round(jax.lax.stop_gradient(plane_sum(w)))))
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
  """Binary planes of the ``bits``-bit symmetric linear quantization of ``kernel``.

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
  step); the scale is left alone. Traceable, shape-preserving."""
  return w.replace(
      pos_planes=jnp.clip(w.pos_planes, PLANE_MIN, PLANE_MAX),
      neg_planes=jnp.clip(w.neg_planes, PLANE_MIN, PLANE_MAX),
  )


def _safe_norm(sq: jax.Array) -> jax.Array:
  """``sqrt(sq)`` with gradient 0 (a subgradient) instead of NaN at ``sq = 0``."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def plane_norms(w: BSQWeight) -> jax.Array:
  """``||[W_p^(b); W_n^(b)]||_2`` for each bit ``b``, shape ``[n_bits]``."""
  axes = tuple(range(1, w.pos_planes.ndim))
  sq = jnp.sum(jnp.square(w.pos_planes), axis=axes) + jnp.sum(jnp.square(w.neg_planes), axis=axes)
  return _safe_norm(sq)


def group_lasso(w: BSQWeight) -> jax.Array:
  """BSQ's bit-level group Lasso of one layer (scalar):

      B_GL(W) = sum_b sqrt(sum(W_p^(b)^2) + sum(W_n^(b)^2)),

  one group per bit plane, holding its positive and negative planes together.
  The gradient of an all-zero group is taken as 0.
  """
  return jnp.sum(plane_norms(w))


def memory_shares(leaves: Mapping[str, BSQWeight]) -> dict[str, float]:
  """Each layer's share of the model memory, ``N_l n_l / sum_k N_k n_k``.

  ``N_l`` is the layer's number of weights and ``n_l`` its precision (planes).
  Python floats, summing to 1 (empty for no layers); constants for the
  gradient, and they change only when ``requantize`` changes a precision.
  """
  bits = {k: float(v.num_weights) * float(v.n_bits) for k, v in leaves.items()}
  total = sum(bits.values())
  if total <= 0:
    return {k: 0.0 for k in bits}
  return {k: b / total for k, b in bits.items()}


def weighted_group_lasso(
    leaves: Mapping[str, BSQWeight],
    alpha,
    shares: Mapping[str, float] | None = None,
) -> jax.Array:
  """BSQ's memory-aware regularizer ``alpha * sum_l share_l * B_GL(W^l)``.

  Args:
    leaves: ``{path: BSQWeight}`` of the regularized layers.
    alpha: regularization strength.
    shares: per-layer weights ``{path: share}``; by default
      ``memory_shares(leaves)`` (memory of the layer over memory of the given
      layers). Pass shares computed over a larger set of layers (e.g.
      including fixed-precision ones) to change the denominator.

  Returns:
    A float32 scalar.
  """
  if shares is None:
    shares = memory_shares(leaves)
  total = jnp.zeros((), jnp.float32)
  for k, w in leaves.items():
    total = total + shares[k] * group_lasso(w)
  return alpha * total


def requantize(w: BSQWeight, threshold: float = 0.0) -> BSQWeight:
  """BSQ's periodic re-quantization and precision adjustment.

  Runs between epochs on concrete arrays (numpy; not traceable). It may change
  the number of planes, so the returned leaf has a new shape: the training
  step re-traces and the optimizer state of this leaf must be re-initialized.

  With ``q = integer_weights(w)`` (Eq. 1's rounded sum) and ``m = max|q|``:

  1. Re-binarize: rewrite the planes as the exact binary decomposition of
     ``|q|`` placed in the plane of ``q``'s sign (the other plane is 0).
  2. Overflow / MSB drop: keep exactly ``bitlength(m)`` planes. When
     ``m > 2^n - 1`` (planes up to 2 reach ``2^(n+1) - 2``) this adds a plane
     instead of clipping; when the top planes of ``|q|`` are all zero they are
     dropped.
  3. LSB drop: from bit 0 upwards, drop each plane whose fraction of non-zero
     entries (over all weights) is ``<= threshold``, stopping at the first
     plane above it; ``threshold=0`` drops only all-zero planes. The dropped
     bits are truncated: ``|q'| = |q| >> k`` for ``k`` dropped planes, exact
     when those planes are all zero.
  At least one plane is kept (an all-zero layer keeps one zero plane).

  Scale: with ``n'`` planes kept and ``k`` LSB planes dropped, the new integer
  is ``q' = sign(q) (|q| >> k)`` and

      s' = s * 2^k * (2^n' - 1) / (2^n - 1),

  so ``s'/(2^n'-1) * q' = s/(2^n-1) * 2^k q'``: every weight keeps its
  represented value ``s/(2^n-1) * q`` exactly when the dropped LSB planes are
  zero, and otherwise loses only its dropped low bits (``2^k q'`` is ``q``
  with bits below ``k`` cleared). Steps 1-2 alone (``k = 0``) give
  ``s' = s (2^n' - 1)/(2^n - 1)`` with ``q' = q``.

  Args:
    w: the layer's planes.
    threshold: largest non-zero fraction of an LSB plane that is dropped.

  Returns:
    A ``BSQWeight`` with ``n'`` binary planes, shape ``[n', *w.shape]``.
  """
  q = np.asarray(integer_weights(w), np.int64)
  n = w.n_bits
  mag = np.abs(q)
  m = int(mag.max()) if mag.size else 0
  top = max(m.bit_length(), 1)  # planes 0..top-1 hold |q|; higher ones are zero
  low = 0
  while low < top - 1 and np.mean(((mag >> low) & 1) != 0) <= threshold:
    low += 1
  n_new = top - low
  q_new = np.sign(q) * (mag >> low)
  pos, neg = _binary_planes(q_new, n_new)
  s = float(np.asarray(w.scale, np.float64))
  s_new = s * 2.0**low * _levels(n_new) / _levels(n)
  return BSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(s_new, jnp.float32))


def check_shapes(w: BSQWeight) -> None:
  """Assert the documented shapes (``W_p``/``W_n`` alike, scalar ``s``)."""
  chex.assert_equal_shape([w.pos_planes, w.neg_planes])
  chex.assert_shape(w.scale, ())
