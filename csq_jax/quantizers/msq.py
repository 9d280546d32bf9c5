"""MSQ: memory-efficient bit sparsification quantization (Han et al., ICCV 2025).

arXiv 2507.22349. Bit-level mixed precision *without* bit-level parameters:
the only trained parameter of a layer is its float weight ``W`` (one latent per
weight, as in STE QAT, against ``2n`` bit planes per weight in BSQ/CSQ). Its
least significant bits are computed from ``W`` by a round-clamp quantizer,
made sparse by an L1 penalty and pruned, a Hessian-chosen number of bits at a
time.

Notation (the paper's, per layer ``l``; ``n`` the current precision):

* scale ``s = max|W|``, held constant for the gradient (``scale_of``, as
  ``ste.scale_of``);
* round-clamp quantizer with scale ``2^n`` (not ``2^n - 1``), the integer

      W_n = RoundClamp_n(W) = clip(round(2^n W / s), -(2^n - 1), 2^n - 1),

  the dequantized weight ``W^_n = s / 2^n * W_n`` (``materialize``). ``n``
  bits are ``n`` magnitude bits plus a sign, the grid ``[-(2^n-1), 2^n-1]``
  of Eq. (1) of CSQ, so ``precision`` and the size accounting mean the same
  thing as for CSQ/STE leaves; only the step differs (``s/2^n``, not
  ``s/(2^n-1)``);
* bipartite bit slicing: for ``1 <= k < n``,

      W_n = 2^k W_{n-k} + B_k,      B_k = W_n - 2^k W_{n-k}      (``lsb``)

  where ``W_{n-k} = RoundClamp_{n-k}(W)`` with the *same* ``s``, so ``B_k`` is
  the integer the ``k`` LSBs carry;
* objective ``L = L_ce + lambda R(B)`` with the L1 penalty
  ``R_l = (1/N_l) sum_i |B_k,i|`` (``lsb_regularizer``);
* Hessian-aware aggressive pruning: ``Omega_l = Tr(H_l) ||W^_n - W||_2``
  (``sensitivity``); ``k = 2`` bits pruned at once from layers below the mean
  ``Omega``, ``k = 1`` from the others (``prune_amounts``, ``prune``).

Why ``2^n``: the ``n``-bit bins are ``[j - 1/2, j + 1/2] s / 2^n``, centred on
``j s / 2^n``; the ``(n-1)``-bit boundaries are at ``(i + 1/2) s / 2^(n-1) =
(2i + 1) s / 2^n``, exactly the centres of the odd ``n``-bit bins (more
generally, the ``(n-k)``-bit boundaries are at odd multiples of ``2^(k-1)``
in ``n``-bit steps, all ``n``-bit centres). The grids nest: every
``(n-k)``-bit value is an ``n``-bit value (``2^k W_{n-k}``), a weight with
``B_k = 0`` keeps its exact value when ``k`` bits are pruned, and away from
the clamp ``|B_k| <= 2^(k-1)`` (``|B_1| <= 1``). With ``2^n - 1`` the
``(n-1)``-bit grid is not a subset of the ``n``-bit grid and its boundaries
fall anywhere inside the ``n``-bit bins.

Straight-through estimators (the forward pass is always exact):

* ``materialize``: ``dW^_n / dW = 1`` (identity through rounding *and* clamp,
  as ``ste.materialize``; ``max|W|`` is always clamped by one step here, and
  its CE gradient is not dropped);
* ``lsb``: ``dB_k / dW = 2^n / s`` where the ``n``-bit clamp is inactive
  (``|2^n W / s| <= 2^n - 1``) and 0 where it acts. That is an STE on the
  ``n``-bit rounding only; the coarse value ``2^k W_{n-k}`` is the target of
  the penalty and keeps its exact derivative, 0 almost everywhere. (An STE on
  both roundings gives ``2^n/s - 2^k 2^(n-k)/s = 0``: no gradient at all.)
  Then ``d|B_k|/dW = sign(B_k) 2^n / s``: gradient descent moves ``W`` toward
  its ``(n-k)``-bit value ``W^_{n-k}``, and does nothing where ``B_k = 0``.

Choices the papers (as summarized to us) leave open, made here:

1. Signed magnitude grid ``[-(2^n-1), 2^n-1]`` with a per-layer max-abs
   scale, recomputed from the latent every step (no trained scale, nothing
   but ``W`` trained); not the unsigned ``[0, 2^n - 1]`` DoReFa grid.
2. The gradient of ``B_k`` above (STE on ``W_n`` only, exact clamp).
3. ``R`` is a per-layer *mean* of ``|B_k|`` in integer LSB units: a layer's
   penalty is in ``[0, 2^(k-1)]`` away from the clamp whatever its size, so
   one ``lambda`` suits every layer and model width (a sum would let the
   largest layers dominate and tie ``lambda`` to the model size). The model's
   ``R(B)`` is the sum of the layer means. Its gradient on a weight is
   ``sign(B) 2^n / (s N_l)``.
4. The weight(s) with ``|W| = s`` set the scale, so ``2^n W / s = +-2^n``
   is always clamped to ``+-(2^n - 1)``: their ``B_k = +-(2^k - 1)`` is never
   0 and no training changes that (the scale follows them). They get no
   penalty gradient (exact clamp derivative), and ``lsb_sparsity`` can leave
   them out (``exclude_max=True``); otherwise a layer's sparsity is at most
   ``1 - (number of max weights) / N_l``. Pruning moves them by ``2^k - 1``
   ``n``-bit steps, to ``+-(2^(n-k) - 1) s / 2^(n-k)``, one ``(n-k)``-bit
   step from ``W = +-s`` (every other weight ends within half a step).
5. ``prune`` only lowers ``bits`` (static, so the step re-traces, like CSQ's
   ``mask_mode``); the latent is unchanged and keeps training. When to prune
   (epochs, a sparsity threshold) is the caller's choice.
6. ``Omega`` uses ``W^_n`` at the current precision (``k=0``; ``k > 0`` gives
   the error after pruning ``k`` bits), the plain, unsquared L2 norm, and the
   trace estimate as given (an estimate can be negative: that layer then
   counts as insensitive). "Below the mean" is strict: equal ``Omega`` for
   every layer prunes one bit from each.
7. The traces are estimates (``hessian.hutchpp_trace``, layerwise Hutch++),
   and on a trained network some layers sit within a few percent of the
   mean ``Omega``, where no affordable estimate decides the side. With
   their standard errors, ``prune_amounts`` gives ``k = 2`` only to layers
   below the mean by ``z`` standard errors (``msq.hessian_z``); the
   ``undecided`` layers first get more probes (``msq.hessian_max_probes``),
   and those still undecided keep ``k = 1``, as if sensitive. ``z = 0`` is
   the paper's rule.

Everything is a pure function of the leaf; ``bits`` and ``k`` are Python ints
(static under ``jit``).
"""

from __future__ import annotations

import sys

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csq_jax import quantizers

MAX_BITS = 16


@struct.dataclass
class MSQWeight:
  """The float weight of one layer and its current MSQ precision.

  Attributes:
    latent: ``W``, the float weight (kernel shape), the only trained array.
    bits: the current precision ``n`` (magnitude bits plus a sign), static:
      pruning changes the tree structure and re-traces the step.
    max_bits: the precision at initialization, for reporting how many bits
      were pruned; static; ``None`` when unknown.
    lsb_k: how many LSBs the L1 penalty acts on and the next pruning removes
      (the Hessian-aware ``k`` of ``prune_amounts``); static.
  """

  latent: jax.Array
  bits: int = struct.field(pytree_node=False, default=8)
  max_bits: int | None = struct.field(pytree_node=False, default=None)
  lsb_k: int = struct.field(pytree_node=False, default=1)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.latent.shape)

  @property
  def num_weights(self) -> int:
    return int(np.prod(self.shape))


def _check_bits(bits: int) -> None:
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"MSQ bits must be in 1..{MAX_BITS}, got {bits}.")


def _check_k(w: MSQWeight, k: int) -> None:
  if not 1 <= k < w.bits:
    raise ValueError(f"MSQ LSB count k must be in 1..{w.bits - 1} for a {w.bits}-bit layer, got {k}.")


def _straight_through(value: jax.Array, surrogate: jax.Array) -> jax.Array:
  """Exactly ``value`` forward (``x - x == 0`` in IEEE arithmetic), the
  derivative of ``surrogate`` backward."""
  return jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))


def scale_of(w: MSQWeight) -> jax.Array:
  """``s = max|W|``, float32 scalar, held constant for the gradient (1 for an
  all-zero kernel)."""
  s = jax.lax.stop_gradient(jnp.max(jnp.abs(w.latent))).astype(jnp.float32)
  return jnp.where(s > 0, s, 1.0)


def _unit(w: MSQWeight) -> jax.Array:
  """``W / s`` in float32, in ``[-1, 1]``; differentiable (``s`` is not)."""
  return w.latent.astype(jnp.float32) / scale_of(w)


def round_clamp(w: MSQWeight, bits: int | None = None) -> jax.Array:
  """``RoundClamp_m(W) = clip(round(2^m W / s), -(2^m - 1), 2^m - 1)``.

  Args:
    w: the layer.
    bits: ``m``, default the current precision ``w.bits``.

  Returns:
    Integer-valued float32 array of ``w.shape``, no gradient. ``2^m W / s``
    is computed as ``(W / s) * 2^m`` from one ``W / s``, so the grids of
    different ``m`` are exactly nested in floating point too. Ties round to
    even (``jnp.round``).
  """
  m = w.bits if bits is None else bits
  _check_bits(m)
  y = jax.lax.stop_gradient(_unit(w)) * (2.0**m)
  top = 2.0**m - 1.0
  return jnp.clip(jnp.round(y), -top, top)


def integer_weights(w: MSQWeight) -> jax.Array:
  """``W_n`` as int32, ``|W_n| <= 2^n - 1``, with ``W^_n = s / 2^n * W_n``."""
  return round_clamp(w).astype(jnp.int32)


def dequantized(w: MSQWeight, bits: int | None = None) -> jax.Array:
  """``W^_m = s / 2^m * RoundClamp_m(W)``, float32, no gradient (``m``
  defaults to ``w.bits``)."""
  m = w.bits if bits is None else bits
  return round_clamp(w, m) * (scale_of(w) / 2.0**m)


def materialize(w: MSQWeight, beta=None, hard: bool = False) -> jax.Array:
  """``W^_n = s / 2^n * RoundClamp_n(W)`` forward, ``dW^_n/dW = 1`` backward.

  ``beta``/``hard`` are accepted for the common quantizer interface; the
  forward pass is always exactly quantized.

  Returns:
    Shape ``w.shape``, dtype of the latent.
  """
  del beta, hard
  n = w.bits
  y = _unit(w) * (2.0**n)
  q = _straight_through(round_clamp(w, n), y)
  return (q * (scale_of(w) / 2.0**n)).astype(w.latent.dtype)


def step_size(w: MSQWeight) -> jax.Array:
  """Weight value of one integer unit, ``s / 2^n``: ``W^_n = step_size * W_n``."""
  return scale_of(w) / 2.0**w.bits


def precision(w: MSQWeight) -> jax.Array:
  """Bits the layer uses, ``n``: an int32 scalar."""
  return jnp.asarray(w.bits, jnp.int32)


def init_from_float(kernel: jax.Array, bits: int = 8) -> MSQWeight:
  """An ``bits``-bit MSQ layer whose latent is ``kernel`` (as float32)."""
  _check_bits(bits)
  return MSQWeight(latent=jnp.asarray(kernel, jnp.float32), bits=bits, max_bits=bits)


def lsb(w: MSQWeight, k: int) -> jax.Array:
  """The ``k`` least significant bits ``B_k = W_n - 2^k W_{n-k}``.

  Forward: exactly that integer (float32, shape ``w.shape``); ``|B_k| <=
  2^(k-1)`` where ``RoundClamp_{n-k}`` does not clamp, ``|B_k| <= 2^k - 1``
  everywhere. Backward: ``dB_k/dW = 2^n / s`` where ``|2^n W / s| <= 2^n - 1``
  and 0 elsewhere (STE on the ``n``-bit rounding, the coarse value ``2^k
  W_{n-k}`` piecewise constant; see the module docstring).

  Args:
    w: the layer, ``n = w.bits``.
    k: Python int, ``1 <= k < n``.
  """
  _check_k(w, k)
  n = w.bits
  value = round_clamp(w, n) - (2.0**k) * round_clamp(w, n - k)
  y = _unit(w) * (2.0**n)
  inside = jnp.abs(jax.lax.stop_gradient(y)) <= 2.0**n - 1.0
  surrogate = jnp.where(inside, y, jax.lax.stop_gradient(y))
  return _straight_through(value, surrogate)


def lsb_regularizer(w: MSQWeight, k: int) -> jax.Array:
  """``R_l = (1/N_l) sum_i |B_k,i|``, a float32 scalar (mean, see choice 3).

  The gradient of ``|B|`` is ``sign(B)`` (0 at ``B = 0``), so
  ``dR_l/dW_i = sign(B_k,i) 2^n / (s N_l)`` away from the clamp: a descent
  step moves each weight toward its ``(n-k)``-bit value.
  """
  b = lsb(w, k)
  return jnp.mean(b * jax.lax.stop_gradient(jnp.sign(b)))


def lsb_sparsity(w: MSQWeight, k: int, exclude_max: bool = False) -> jax.Array:
  """Fraction of weights whose ``k`` LSBs are zero (``B_k = 0``), float32 scalar.

  Args:
    w: the layer.
    k: Python int, ``1 <= k < w.bits``.
    exclude_max: leave out the weights with ``|W| = max|W|``, whose ``B_k``
      is ``+-(2^k - 1)`` by construction (choice 4); then a kernel already
      on the ``(n-k)``-bit grid has sparsity exactly 1. If nothing is left
      the result is 1.
  """
  b = jax.lax.stop_gradient(lsb(w, k))
  zero = (b == 0).astype(jnp.float32)
  if not exclude_max:
    return jnp.mean(zero)
  a = jnp.abs(w.latent)
  peak = jnp.max(a)
  keep = ((a < peak) | (peak == 0)).astype(jnp.float32)
  count = jnp.sum(keep)
  return jnp.where(count > 0, jnp.sum(zero * keep) / jnp.maximum(count, 1.0), 1.0)


def prune(w: MSQWeight, k: int) -> MSQWeight:
  """Drop the ``k`` LSBs: the same latent at precision ``n - k``.

  The layer then materializes ``W^_{n-k} = s/2^(n-k) RoundClamp_{n-k}(W)``
  (same ``s``), within half an ``(n-k)``-bit step ``s / 2^(n-k)`` of ``W``
  away from the clamp and within one step everywhere; equal to ``W^_n``
  where ``B_k = 0``. ``k = 0`` returns ``w``.

  Raises:
    ValueError: ``k < 0`` or ``n - k < 1``.
  """
  if k < 0:
    raise ValueError(f"Cannot prune a negative number of bits ({k}).")
  if w.bits - k < 1:
    raise ValueError(f"Pruning {k} bits from a {w.bits}-bit MSQ layer leaves fewer than 1 bit.")
  if k == 0:
    return w
  n = w.bits - k
  return w.replace(bits=n, lsb_k=max(1, min(w.lsb_k, n - 1)))


def with_lsb_k(w: MSQWeight, k: int) -> MSQWeight:
  """The same layer with ``k`` LSBs to penalize and prune next, capped to
  ``1..n-1`` (a 1-bit layer keeps ``k = 1`` and is never penalized)."""
  return w.replace(lsb_k=max(1, min(int(k), w.bits - 1)))


def with_precision(w: MSQWeight, bits: int) -> MSQWeight:
  """The layer at ``bits``: fewer bits are ``prune``'s LSB drop; more are the
  same float latent rounded on the finer grid (``RoundClamp_bits``), which
  MSQ can do since it never splits the weight into bits. At most
  ``max_bits`` (the precision it started at) when known."""
  _check_bits(bits)
  if w.max_bits is not None and bits > w.max_bits:
    raise ValueError(f"An MSQ layer that started at {w.max_bits} bits cannot be set to {bits}.")
  if bits <= w.bits:
    return prune(w, w.bits - bits)
  return w.replace(bits=bits)


def regularizer(w: MSQWeight) -> jax.Array:
  """The layer's penalty ``R_l`` on its ``lsb_k`` LSBs; 0 for a 1-bit layer."""
  if w.bits <= 1:
    return jnp.zeros((), jnp.float32)
  return lsb_regularizer(w, w.lsb_k)


def sensitivity(trace, w: MSQWeight, k: int = 0) -> jax.Array:
  """``Omega_l = Tr(H_l) ||W^_n - W||_2``, a float32 scalar, no gradient.

  Args:
    trace: ``Tr(H_l)``, e.g. ``hessian.layer_traces_for_model(...).mean[path]``.
    w: the layer; ``W^_n`` is its dequantized weight at ``n = w.bits``.
    k: Python int; ``k > 0`` measures ``||W^_{n-k} - W||_2`` instead, the
      error the layer would have after pruning ``k`` bits.
  """
  if k:
    _check_k(w, k)
  err = dequantized(w, w.bits - k) - jax.lax.stop_gradient(w.latent).astype(jnp.float32)
  return jnp.asarray(trace, jnp.float32) * jnp.sqrt(jnp.sum(err * err))


def prune_amounts(
    omegas: Mapping[str, float],
    bits: Mapping[str, int] | None = None,
    stderr: Mapping[str, float] | None = None,
    z: float = 0.0,
) -> dict[str, int]:
  """Hessian-aware aggressive pruning: bits to drop from each layer.

  The paper's rule: ``k = 2`` for layers with ``Omega_l`` strictly below the
  mean ``Omega_bar`` over ``omegas``, ``k = 1`` otherwise. With estimated
  traces (``stderr`` given and ``z > 0``) a layer gets ``k = 2`` only when it
  is below the mean by more than ``z`` standard errors of the difference,

      Omega_l - Omega_bar < -z sigma_l,
      sigma_l^2 = sum_m (delta_lm - 1/L)^2 sigma(Omega_m)^2

  (independent per-layer estimates), so a layer whose side of the mean the
  estimate cannot tell keeps the conservative ``k = 1``, and the choice
  does not follow the probe seed.

  Args:
    omegas: ``{path: Omega_l}`` (floats or scalar arrays).
    bits: optional ``{path: current precision}``; ``k`` is then capped at
      ``bits - 1`` so that no layer goes below 1 bit (a 1-bit layer gets 0).
    stderr: optional ``{path: standard error of Omega_l}``, e.g.
      ``sensitivity(trace_stderr, w)`` (``Omega`` is linear in the trace).
    z: the margin in standard errors; 0 is the paper's rule.

  Returns:
    ``{path: k}`` with Python ints, in the order of ``omegas``.
  """
  out = {}
  for name, (g, m) in _gaps_and_margins(omegas, stderr, z).items():
    k = 2 if g < -m else 1
    if bits is not None:
      k = max(0, min(k, int(bits[name]) - 1))
    out[name] = k
  return out


def _gaps_and_margins(omegas, stderr, z):
  """``{path: (Omega_l - mean, z sigma_l)}`` (margin 0 without ``stderr`` or ``z``)."""
  if not omegas:
    return {}
  names = list(omegas)
  values = np.array([float(omegas[n]) for n in names], np.float64)
  gap = values - values.mean()
  if stderr is not None and z > 0:
    var = np.array([float(stderr[n]) for n in names], np.float64) ** 2
    L = len(names)
    # Var(Omega_l - mean) = (1 - 2/L) var_l + sum_m var_m / L^2.
    margin = z * np.sqrt((1.0 - 2.0 / L) * var + var.sum() / L**2)
  else:
    margin = np.zeros_like(gap)
  return {n: (float(g), float(m)) for n, g, m in zip(names, gap, margin)}


def undecided(omegas: Mapping[str, float], stderr: Mapping[str, float], z: float) -> list[str]:
  """The layers whose side of the mean ``Omega`` the estimate cannot tell:
  ``|Omega_l - mean| <= z sigma_l`` (see ``prune_amounts``). A caller adds
  probes to them (``hessian.hutchpp_trace(refine=...)``); those left
  undecided get ``k = 1``."""
  return [n for n, (g, m) in _gaps_and_margins(omegas, stderr, z).items() if abs(g) <= m and m > 0]



def static_precision(w) -> int:
  """Bits from the leaf's structure alone (``quantizers.static_precision``)."""
  return int(w.bits)


quantizers.register(MSQWeight, sys.modules[__name__])
