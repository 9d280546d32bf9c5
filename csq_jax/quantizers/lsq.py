"""LSQ: learned step size quantization (Esser et al., ICLR 2020).

A float latent weight ``v`` and a learned per-layer step ``s``:

    v_bar = round(clip(v / s, -Q_N, Q_P))          (Eq. 1)
    v_hat = v_bar * s                               (Eq. 2)

The rounding passes the gradient straight through, and the step's gradient
(Eq. 3) is ``-v/s + round(v/s)`` inside the range and ``-Q_N`` / ``Q_P``
outside it; it is scaled by ``g = 1 / sqrt(N_W Q_P)`` (Sec. 2.2, ``N_W`` the
layer's weight count). The step starts at ``2 <|v|> / sqrt(Q_P)`` (Sec. 2.1).

Grid. The paper quantizes signed weights to ``b``-bit two's complement,
``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``. csq_jax counts ``n`` magnitude bits
plus a sign for every method (STE, CSQ, BSQ, MSQ: integers in
``[-(2^n - 1), 2^n - 1]``), so LSQ at ``n`` bits here uses that same grid,
``Q_N = Q_P = 2^n - 1``: an LSQ row and an STE row at the same target have
the same integers and the same size accounting. This is a deliberate
deviation from the paper's grid (one level more on the negative side there).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csq_jax import quantizers


@struct.dataclass
class LSQWeight:
  """A float latent weight and its learned step, at a fixed precision.

  Attributes:
    latent: ``v``, the float weight.
    step: ``s``, a positive scalar (the weight value of one integer unit).
    bits: magnitude bits ``n`` (static); ``Q_N = Q_P = 2^n - 1``.
  """

  latent: jax.Array
  step: jax.Array
  bits: int = struct.field(pytree_node=False, default=8)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.latent.shape)


def q_p(bits: int) -> float:
  """``Q_P = Q_N = 2^n - 1`` (see the module docstring)."""
  return 2.0**bits - 1.0


def grad_scale(x: jax.Array, g) -> jax.Array:
  """``x`` forward, gradient times ``g`` backward (Sec. 2.2)."""
  return jax.lax.stop_gradient(x - x * g) + x * g


def round_pass(x: jax.Array) -> jax.Array:
  """``round(x)`` forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def materialize(w: LSQWeight, beta=None, hard: bool = False) -> jax.Array:
  """``v_hat = round(clip(v / s, -Q, Q)) * s`` (Eqs. 1-2) with the step's
  gradient of Eq. (3) scaled by ``1 / sqrt(N_W Q_P)``; always exactly
  quantized (``beta``/``hard`` keep the uniform interface)."""
  del beta, hard
  q = q_p(w.bits)
  s = grad_scale(w.step, 1.0 / np.sqrt(np.prod(w.shape) * q))
  return round_pass(jnp.clip(w.latent / s, -q, q)) * s


def integer_weights(w: LSQWeight) -> jax.Array:
  """``v_bar`` of Eq. (1) as int32."""
  q = q_p(w.bits)
  return jnp.round(jnp.clip(w.latent / w.step, -q, q)).astype(jnp.int32)


def step_size(w: LSQWeight) -> jax.Array:
  return w.step


def precision(w: LSQWeight) -> jax.Array:
  return jnp.asarray(w.bits, jnp.int32)


def init_from_float(kernel: jax.Array, bits: int = 8) -> LSQWeight:
  """The latent is the kernel; the step ``2 mean|v| / sqrt(Q_P)`` (Sec. 2.1)."""
  if not 1 <= bits <= 16:
    raise ValueError(f"LSQ bits must be in 1..16, got {bits}.")
  kernel = jnp.asarray(kernel, jnp.float32)
  step = 2.0 * jnp.mean(jnp.abs(kernel)) / np.sqrt(q_p(bits))
  return LSQWeight(latent=kernel, step=jnp.where(step > 0, step, 1.0).astype(jnp.float32), bits=bits)



def static_precision(w) -> int:
  """Bits from the leaf's structure alone (``quantizers.static_precision``)."""
  return int(w.bits)


quantizers.register(LSQWeight, sys.modules[__name__])
