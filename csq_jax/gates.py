"""Gate functions of continuous sparsification and the temperature schedule.

CSQ (Xiao et al.) relaxes every binary choice -- a bit's value and whether a
bit is used at all -- with the temperature sigmoid of Eq. (2),
``f_beta(x) = sigmoid(beta * x)``, which tends to the unit step ``I(x >= 0)``
as ``beta -> inf``. The temperature grows exponentially over training:
``beta(t) = beta0 * beta_max ** (t / T)`` (Algorithm 1).

The step at exactly 0. The sigmoid is 1/2 there, so the limit leaves the
value at 0 open, and the two hard gates settle it differently:

* a bit *value* (``m_p``, ``m_n``) is on when its logit is positive,
  ``I(x > 0)`` (:func:`hard_bit`), as in the authors' ``ticket`` path
  (``(weight > 0).float()``): their ``ini2bit`` starts a set bit at 1 and
  every other logit at exactly 0, which must read as an unset bit so that the
  hard model at initialization is the rounded kernel;
* a bit *selection* (``m_B``) is on at 0, ``I(x >= 0)`` (:func:`hard_gate`):
  the masks start at 0 (the authors' ``mask_initial_value``) and every bit is
  used until the budget term moves them.
"""

from __future__ import annotations

import jax
import optax


def soft_gate(logits: jax.Array, beta: jax.Array | float) -> jax.Array:
  """Temperature sigmoid ``f_beta(x) = sigmoid(beta * x)`` (Eq. 2)."""
  return jax.nn.sigmoid(beta * logits)


def hard_gate(logits: jax.Array) -> jax.Array:
  """Selection step ``I(x >= 0)``, the limit of :func:`soft_gate` with the
  boundary selected; same dtype as ``logits``."""
  return (logits >= 0).astype(logits.dtype)


def hard_bit(logits: jax.Array) -> jax.Array:
  """Bit-value step ``I(x > 0)``, the limit of :func:`soft_gate` with the
  boundary unset (see the module docstring); same dtype as ``logits``."""
  return (logits > 0).astype(logits.dtype)


def gate(logits: jax.Array, beta: jax.Array | float, hard: bool = False) -> jax.Array:
  """Soft gate at temperature ``beta``, or the hard step when ``hard``."""
  return hard_gate(logits) if hard else soft_gate(logits, beta)


def beta_schedule(
    total_steps: int, beta0: float = 1.0, beta_max: float = 200.0
) -> optax.Schedule:
  """Exponential temperature schedule ``beta0 * beta_max ** (t / T)`` (Alg. 1).

  Evaluated per step, so beta grows smoothly instead of once per epoch; it is
  ``beta0`` at step 0 and ``beta0 * beta_max`` at step ``total_steps`` and
  stays there afterwards.

  Args:
    total_steps: T, the number of steps over which beta grows.
    beta0: the initial temperature.
    beta_max: the growth factor reached at ``total_steps`` (200 in the paper,
      with ``beta0 = 1`` so the final temperature is 200).

  Returns:
    An optax schedule ``step -> beta``.
  """
  if total_steps <= 0:
    raise ValueError(f"beta_schedule needs total_steps > 0, got {total_steps}.")
  if beta0 <= 0 or beta_max < 1:
    raise ValueError(
        f"beta_schedule needs beta0 > 0 and beta_max >= 1, got {beta0}, {beta_max}."
    )
  return optax.exponential_decay(
      init_value=beta0,
      transition_steps=total_steps,
      decay_rate=beta_max,
      end_value=beta0 * beta_max,
  )
