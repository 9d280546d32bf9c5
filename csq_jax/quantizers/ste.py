"""Uniform quantization-aware training with a straight-through estimator.

The STE-Uniform baseline of the CSQ paper (Table IV, following Polino et al.):
a float latent weight is linearly quantized in the forward pass and the
gradient passes through the rounding unchanged. It also serves the "fixed"
transform rule, which holds a layer at a set precision outside the budget
search.

Precision convention shared with CSQ: ``n`` bits are ``n`` magnitude bits plus
a sign, i.e. integers in ``[-(2^n - 1), 2^n - 1]`` (Eq. 1's grid), so that a
CSQ layer with ``n`` selected bits and an STE layer at ``n`` bits have the same
grid and the same size accounting.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import struct

from csq_jax import quantizers


@struct.dataclass
class STEWeight:
  """A float latent weight quantized at a fixed precision in the forward pass.

  Attributes:
    latent: the float weight, the trained parameter.
    bits: magnitude bits ``n`` (static).
  """

  latent: jax.Array
  bits: int = struct.field(pytree_node=False, default=8)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.latent.shape)


def _levels(bits: int) -> float:
  return 2.0**bits - 1.0


def scale_of(w: STEWeight) -> jax.Array:
  """Per-layer symmetric scale ``max|W|``, held constant for the gradient."""
  s = jax.lax.stop_gradient(jnp.max(jnp.abs(w.latent)))
  return jnp.where(s > 0, s, 1.0)


def round_ste(x: jax.Array) -> jax.Array:
  """``round(x)`` forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def integer_weights(w: STEWeight) -> jax.Array:
  """Signed integers ``q`` with ``W_q = scale / (2^n - 1) * q``."""
  x = jnp.clip(w.latent / scale_of(w), -1.0, 1.0) * _levels(w.bits)
  return jnp.round(x).astype(jnp.int32)


def materialize(w: STEWeight, beta=None, hard: bool = False) -> jax.Array:
  """``s/(2^n-1) * round(W/s (2^n-1))`` with ``s = max|W|`` and a
  straight-through gradient (the identity). ``beta``/``hard`` are accepted for
  a uniform interface; the forward pass is always exactly quantized."""
  del beta, hard
  s = scale_of(w)
  levels = _levels(w.bits)
  # |W| <= s = max|W|, so no clip is needed (and none halves the gradient of
  # the largest weight at the clip boundary).
  return round_ste(w.latent / s * levels) * (s / levels)


def step_size(w: STEWeight) -> jax.Array:
  """Weight value of one integer unit: ``W_q = step_size * integer_weights``."""
  return scale_of(w) / _levels(w.bits)


def precision(w: STEWeight) -> jax.Array:
  return jnp.asarray(w.bits, jnp.int32)


def init_from_float(kernel: jax.Array, bits: int = 8) -> STEWeight:
  if not 1 <= bits <= 16:
    raise ValueError(f"STE bits must be in 1..16, got {bits}.")
  return STEWeight(latent=jnp.asarray(kernel, jnp.float32), bits=bits)



def static_precision(w) -> int:
  """Bits from the leaf's structure alone (``quantizers.static_precision``)."""
  return int(w.bits)


quantizers.register(STEWeight, sys.modules[__name__])
