"""Model-size accounting and the budget-aware regularizer of CSQ (Sec. III-B).

Which layers count is decided by the transform rules: every quantized leaf
(rule action ``quantize`` or ``fixed``) counts with its precision; leaves kept
float (BN, biases, PACT clips and, by the default rules, the 1x1 downsample
convolutions, as in the authors' BSQ and CSQ code) are not counted. The first
convolution and the last dense layer are quantized and counted by default.

* average precision: ``sum_l N_l b_l / sum_l N_l`` over counted layers
  (``weighting="params"``, the paper's "average precision of all elements"),
  ``sum_l b_l / L`` (``weighting="layers"``, the authors' code, which pools
  mask bits over layers unweighted), or ``sum_l M_l b_l / sum_l M_l`` with
  ``M_l`` the layer's MACs (``weighting="macs"``: a budget of bit operations,
  ``target * sum_l M_l * a_bits`` BOPs);
* ``Delta_S = average precision - target`` (Eq. 7), held constant for the
  gradient;
* penalty ``lambda * Delta_S * sum_l R(m_B^l)`` with ``R`` of Eq. (6);
* model size ``sum_l N_l b_l`` bits and compression ``32 sum_l N_l / size``;
* BOPs ``sum_l MACs_l * b_l * a_bits``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csq_jax import quantizers, transform

WEIGHTINGS = ("params", "layers", "macs")


def layer_precisions(qparams: Any) -> dict[str, jax.Array]:
  """``{path: bits}`` (int32 scalars) of every counted layer."""
  return {k: quantizers.precision(v) for k, v in transform.quantized_leaves(qparams).items()}


def layer_sizes(qparams: Any) -> dict[str, int]:
  """``{path: number of weights}`` of every counted layer."""
  return {k: quantizers.num_weights(v) for k, v in transform.quantized_leaves(qparams).items()}


def layer_weights(qparams: Any, weighting: str = "params", macs: dict[str, int] | None = None) -> dict[str, float]:
  """Each counted layer's weight in the budget's average precision: its
  number of weights (``params``, the paper), 1 (``layers``, the authors'
  code) or its multiply-accumulates per example (``macs``: the average is
  then MAC-weighted, and ``target * sum MACs * a_bits`` is a BOPs budget)."""
  sizes = layer_sizes(qparams)
  if weighting == "params":
    return {k: float(v) for k, v in sizes.items()}
  if weighting == "layers":
    return {k: 1.0 for k in sizes}
  if weighting == "macs":
    if macs is None:
      raise ValueError("budget_weighting='macs' needs the layers' MACs (budget.layer_macs of the model).")
    missing = [k for k in sizes if k not in macs]
    if missing:
      raise ValueError(f"budget_weighting='macs': no MACs for the counted layers {missing[:3]}; only Conv and"
                       " Dense kernels have them (keep other parameters float or use budget_weighting='params').")
    return {k: float(macs[k]) for k in sizes}
  raise ValueError(f"Unknown budget weighting {weighting!r}; expected one of {WEIGHTINGS}.")


def average_bits(qparams: Any, weighting: str = "params", macs: dict[str, int] | None = None) -> jax.Array:
  """Average precision of the counted layers under ``layer_weights``
  (float32 scalar); traceable."""
  leaves = transform.quantized_leaves(qparams)
  weights = layer_weights(qparams, weighting, macs)
  if not leaves:
    return jnp.asarray(32.0, jnp.float32)
  bits = jnp.stack([quantizers.precision(q) for q in leaves.values()]).astype(jnp.float32)
  w = jnp.asarray([weights[k] for k in leaves], jnp.float32)
  return jnp.sum(w * bits) / jnp.sum(w)


def mask_sum(qparams: Any, beta) -> jax.Array:
  """``sum_layers R(m_B)`` with ``R`` of Eq. (6)."""
  leaves = transform.quantized_leaves(qparams).values()
  return sum((quantizers.mask_regularizer(q, beta) for q in leaves), jnp.zeros((), jnp.float32))


def budget_penalty(
    qparams: Any,
    beta,
    target_bits: float,
    strength: float,
    weighting: str = "params",
    macs: dict[str, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The budget-aware regularizer of Eq. (7).

  ``lambda * Delta_S * sum_layers sum_b f_beta(m_B^b)``, with ``Delta_S`` the
  current (hard-counted) average precision minus the target, treated as a
  constant: positive when the model is over budget (the penalty prunes bits),
  negative when under (it grows them).

  Returns:
    ``(penalty, delta_s)``.
  """
  delta_s = jax.lax.stop_gradient(average_bits(qparams, weighting, macs) - target_bits)
  return strength * delta_s * mask_sum(qparams, beta), delta_s


def model_size_bits(qparams: Any) -> jax.Array:
  """``sum_l N_l b_l`` over counted layers (float32, exact below 2^24 per layer)."""
  total = jnp.zeros((), jnp.float32)
  for q in transform.quantized_leaves(qparams).values():
    total = total + quantizers.num_weights(q) * quantizers.precision(q).astype(jnp.float32)
  return total


def compression(qparams: Any) -> jax.Array:
  """Compression of the counted layers vs 32-bit floats: ``32 sum N_l / size``."""
  n = sum(layer_sizes(qparams).values())
  if n == 0:
    return jnp.asarray(1.0, jnp.float32)
  return 32.0 * n / jnp.maximum(model_size_bits(qparams), 1.0)


def layer_macs(model: nn.Module, variables: Any, x: jax.Array, **apply_kwargs) -> dict[str, int]:
  """Multiply-accumulates per example of each Conv/Dense, keyed by kernel path.

  Found by intercepting the layers' calls in one abstract forward pass
  (``jax.eval_shape``), so no compute is spent.
  """
  macs: dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
      kernel = mod.variables["params"]["kernel"]
      spatial = int(np.prod(out.shape[1:-1])) if out.ndim > 2 else 1
      macs["/".join(mod.scope.path) + "/kernel"] = int(np.prod(kernel.shape)) * spatial
    return out

  def run(v, inp):
    with nn.intercept_methods(interceptor):
      return model.apply(v, inp, **apply_kwargs)

  jax.eval_shape(run, variables, x[:1])
  return macs


def bops(qparams: Any, macs: dict[str, int], act_bits: int) -> float:
  """Bit operations ``sum_l MACs_l * b_l * a_bits`` over counted layers with
  known MACs (per example)."""
  total = 0.0
  for name, bits in layer_precisions(qparams).items():
    if name in macs:
      total += macs[name] * float(bits) * act_bits
  return total
