"""Uniform activation quantizers, handed to models as a module factory.

CSQ quantizes weights only; activations are quantized uniformly at a fixed
precision (the "A-Bits" column of the paper's tables). Two variants:

* :class:`PACT` (Choi et al.): ``y = clip(x, 0, alpha)`` with a learnable clip
  ``alpha`` (initialized at 10), quantized to ``2^k - 1`` levels with a
  straight-through estimator; ``alpha`` gets the PACT gradient
  ``dy/dalpha = I(x >= alpha)``.
* :class:`ClippedReLUQuant`: ReLU clipped at a fixed value (6, ReLU6) or at the
  batch's max-abs when ``clip`` is None, quantized with an STE.

``activation_factory(kind, bits)`` returns a zero-argument constructor; 32 bits
means a plain ReLU.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from csq_jax.quantizers.ste import round_ste

ACTIVATIONS = ("pact", "relu6", "maxabs")


def quantize_unsigned(y: jax.Array, clip: jax.Array, bits: int) -> jax.Array:
  """Round ``y`` in ``[0, clip]`` to ``2^bits - 1`` uniform levels, STE gradient."""
  levels = 2.0**bits - 1.0
  step = clip / levels
  return round_ste(y / step) * step


class ReLU(nn.Module):
  """Full-precision activation (A-bits 32)."""

  @nn.compact
  def __call__(self, x):
    return nn.relu(x)


class PACT(nn.Module):
  """PACT activation quantizer with a learnable clip value."""

  bits: int = 4
  alpha_init: float = 10.0

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ()).astype(x.dtype)
    # PACT's gradient: dy/dalpha = I(x >= alpha), dy/dx = I(0 < x < alpha); the
    # quantization step is held constant so rounding adds nothing to dalpha.
    y = jnp.where(x >= alpha, alpha, nn.relu(x))
    return quantize_unsigned(y, jax.lax.stop_gradient(alpha), self.bits)


class ClippedReLUQuant(nn.Module):
  """ReLU clipped at ``clip`` (or at the batch max when None), STE-quantized."""

  bits: int = 4
  clip: float | None = 6.0

  @nn.compact
  def __call__(self, x):
    y = nn.relu(x)
    if self.clip is None:
      c = jax.lax.stop_gradient(jnp.maximum(jnp.max(y), 1e-8))
    else:
      c = jnp.asarray(self.clip, x.dtype)
      y = jnp.minimum(y, c)
    return quantize_unsigned(y, c, self.bits)


def activation_factory(kind: str = "pact", bits: int = 32) -> Callable[[], nn.Module]:
  """Constructor of the activation module a model inserts after each ReLU."""
  if kind not in ACTIVATIONS:
    raise ValueError(f"Unknown activation quantizer {kind!r}; expected one of {ACTIVATIONS}.")
  if bits >= 32:
    return ReLU
  if not 1 <= bits <= 16:
    raise ValueError(f"Activation bits must be 32 or in 1..16, got {bits}.")
  if kind == "pact":
    return lambda: PACT(bits=bits)
  if kind == "relu6":
    return lambda: ClippedReLUQuant(bits=bits, clip=6.0)
  if kind == "maxabs":
    return lambda: ClippedReLUQuant(bits=bits, clip=None)
