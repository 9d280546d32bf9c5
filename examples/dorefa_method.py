"""A user's own method, outside the csq_jax package: DoReFa-Net weights.

DoReFa-Net (Zhou et al. 2016, Eq. 9) quantizes a layer's weights through a
``tanh`` squashing to ``k`` bits on ``[-1, 1]``::

    u   = tanh(w) / (2 max|tanh(w)|) + 1/2           in [0, 1]
    w_q = 2 round(u (2^k - 1)) / (2^k - 1) - 1        (rounding passed straight through)

so ``w_q`` is ``step = 1 / (2^k - 1)`` times the integer
``q = 2 round(u (2^k - 1)) - (2^k - 1)`` in ``[-(2^k - 1), 2^k - 1]``: the
grid every csq_jax method exports. Every quantized layer is at
``target_bits``, as the other fixed-precision baselines (STE, LSQ).

Run it with this directory on ``PYTHONPATH``::

  PYTHONPATH=examples python -m csq_jax.main --config=configs/default.py \
      --config.method=dorefa_method:DoReFa --config.target_bits=2 --workdir=runs/dorefa_t2

``docs/adding_a_method.md`` walks through this file. It has two parts: the
quantizer (a leaf type and four pure functions, registered with
``csq_jax.quantizers``) and the method (a ``csq_jax.methods.base.Method``
subclass that makes those leaves and, here, owns a config section).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import struct

from csq_jax import quantizers
from csq_jax.methods import base

# ----------------------------------------------------------------------------
# The quantizer: a leaf that replaces a float kernel, and its functions.


@struct.dataclass
class DoReFaWeight:
  """A float latent weight, quantized to ``bits`` on each use.

  Attributes:
    latent: ``w``, the float kernel (trained).
    bits: ``k`` (static: changing it re-traces the step).
    hold_max: whether ``max|tanh(w)|`` is a constant for the gradient.
  """

  latent: jax.Array
  bits: int = struct.field(pytree_node=False, default=4)
  hold_max: bool = struct.field(pytree_node=False, default=True)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.latent.shape)


def _levels(w: DoReFaWeight) -> float:
  return 2.0**w.bits - 1.0


def _unit(w: DoReFaWeight) -> jax.Array:
  """``u`` in [0, 1]."""
  t = jnp.tanh(w.latent)
  peak = jnp.max(jnp.abs(t))
  if w.hold_max:
    peak = jax.lax.stop_gradient(peak)
  return t / (2.0 * peak + 1e-12) + 0.5


def integer_weights(w: DoReFaWeight) -> jax.Array:
  """``q = 2 round(u L) - L`` with ``L = 2^k - 1`` (int32)."""
  return (2.0 * jnp.round(_unit(w) * _levels(w)) - _levels(w)).astype(jnp.int32)


def step_size(w: DoReFaWeight) -> jax.Array:
  return jnp.asarray(1.0 / _levels(w), jnp.float32)


def materialize(w: DoReFaWeight, beta=None, hard: bool = False) -> jax.Array:
  """``w_q`` of Eq. 9, the rounding's gradient passed straight through; always
  exactly quantized (``beta``/``hard`` keep the quantizers' interface)."""
  del beta, hard
  scaled = _unit(w) * _levels(w)
  rounded = scaled + jax.lax.stop_gradient(jnp.round(scaled) - scaled)
  return (2.0 * rounded - _levels(w)) / _levels(w)


def precision(w: DoReFaWeight) -> jax.Array:
  return jnp.asarray(w.bits, jnp.int32)


def static_precision(w: DoReFaWeight) -> int:
  return int(w.bits)


quantizers.register(DoReFaWeight, sys.modules[__name__])

# ----------------------------------------------------------------------------
# The method: how the loop makes and trains those leaves.


class DoReFa(base.Method):
  """DoReFa-Net weights at ``target_bits`` (a fixed-precision method: no
  search, so only ``init_leaf`` is needed; ``base.Method`` documents every
  hook a searching method can add)."""

  section = "dorefa"  # its knobs: --config.dorefa.<field>
  fields = (("hold_max", lambda x, config: isinstance(x, bool), "True or False"),)

  @classmethod
  def defaults(cls):
    return dict(
        # Whether max|tanh(w)| is a constant for the gradient (the common
        # implementation) or differentiated too.
        hold_max=True,
    )

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    del key
    return DoReFaWeight(latent=jnp.asarray(kernel, jnp.float32), bits=int(bits), hold_max=bool(options["hold_max"]))
