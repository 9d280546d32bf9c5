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
* BOPs ``sum_l MACs_l * b_l * a_bits``;
* a cost table (``weighting="table:PATH"``, e.g. latency measured on the
  target by ``python -m csq_jax.profile``): each layer's cost at each width,
  ``cost_l(b)`` interpolated linearly between the widths it lists (constant
  beyond them). The budget is ``sum_l cost_l(target)``, what the model costs
  with every layer at the target. The search steers by the table's slopes
  (``CostTable.slope``: each layer's least-squares cost per bit), an average
  precision weighted by them, which is the table's cost exactly when the
  costs are affine in the bits; ``allowed_bits`` and the summary use the
  table's own costs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csq_jax import quantizers, transform

WEIGHTINGS = ("params", "layers", "macs", "table:PATH")
TABLE_PREFIX = "table:"


class CostTableError(ValueError):
  """A cost table that cannot steer a budget; the message says why."""


def is_table(weighting: str) -> bool:
  return isinstance(weighting, str) and weighting.startswith(TABLE_PREFIX)


def check_weighting(weighting: str) -> None:
  """``ValueError`` unless ``weighting`` is one of ``WEIGHTINGS`` (a table: one that loads)."""
  if is_table(weighting):
    load_cost_table(weighting)
  elif weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown budget_weighting {weighting!r}; expected one of {WEIGHTINGS}.")


@dataclasses.dataclass(frozen=True)
class CostTable:
  """Each layer's cost per weight width, in ``unit`` (``load_cost_table``)."""

  path: str
  unit: str
  layers: Mapping[str, Mapping[int, float]]

  def _points(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
    if layer not in self.layers:
      raise CostTableError(f"The cost table {self.path} has no entry for layer {layer}; profile this model"
                           " (python -m csq_jax.profile --config=...) or add it.")
    widths = sorted(self.layers[layer])
    return np.asarray(widths, np.float64), np.asarray([self.layers[layer][b] for b in widths], np.float64)

  def cost(self, layer: str, bits: float) -> float:
    """``cost_l(bits)``, linear between the listed widths, constant beyond."""
    widths, costs = self._points(layer)
    return float(np.interp(bits, widths, costs))

  def slope(self, layer: str) -> float:
    """Least-squares cost per bit over the listed widths (at least 1e-3 of
    the table's largest slope, so that no layer's bits are free). A table
    whose slopes sum to 0 or less (the model as a whole no dearer at more
    bits) is refused."""
    self._points(layer)  # a layer missing from the table: its error
    return self.slopes[layer]

  @functools.cached_property
  def slopes(self) -> dict[str, float]:
    raw = {k: float(np.polyfit(*self._points(k), 1)[0]) for k in self.layers}
    top = max(raw.values())
    scale = max(abs(c) for widths in self.layers.values() for c in widths.values())
    if sum(raw.values()) <= 1e-9 * scale:  # flat within float error, or cheaper at more bits
      falling = sorted(k for k, v in raw.items() if v <= 0)
      raise CostTableError(f"The model does not cost more at more bits by the cost table {self.path} ({len(falling)}"
                           f" of {len(raw)} layers cost the same or less, e.g. {falling[:2]}): such a budget cannot"
                           " choose precisions (use budget_weighting=params or macs).")
    return {k: max(v, 1e-3 * top) for k, v in raw.items()}


def load_cost_table(weighting_or_path: str) -> CostTable:
  """The JSON cost table of ``"table:PATH"`` (or ``PATH``):
  ``{"unit": "ms", "layers": {"conv1/kernel": {"4": 0.12, "8": 0.15}, ...}}``,
  a cost a number or ``{"median": ...}`` (``csq_jax.profile`` writes both the
  median and its spread). Every layer needs at least two widths."""
  path = weighting_or_path[len(TABLE_PREFIX):] if is_table(weighting_or_path) else weighting_or_path
  try:
    with open(path) as f:
      raw = json.load(f)
    layers = {name: {int(b): float(v["median"] if isinstance(v, dict) else v) for b, v in widths.items()}
              for name, widths in raw["layers"].items()}
  except FileNotFoundError:
    raise CostTableError(f"budget_weighting={TABLE_PREFIX}{path}: no such file; write one with"
                         " python -m csq_jax.profile --config=... --out=costs.json.") from None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CostTableError(f"The cost table {path} is not {{'unit': ..., 'layers': {{layer: {{bits: cost}}}}}}"
                         f" ({type(e).__name__}: {e}).") from None
  few = [k for k, v in layers.items() if len(v) < 2]
  if not layers or few:
    raise CostTableError(f"The cost table {path} needs at least two widths per layer ({few[:3] or 'no layers'}).")
  table = CostTable(path, str(raw.get("unit", "cost")), layers)
  table.slopes  # noqa: B018 (refuse a table that cannot steer now, not mid-run)
  return table


def layer_precisions(qparams: Any) -> dict[str, jax.Array]:
  """``{path: bits}`` (int32 scalars) of every counted layer."""
  return {k: quantizers.precision(v) for k, v in transform.quantized_leaves(qparams).items()}


def layer_sizes(qparams: Any) -> dict[str, int]:
  """``{path: number of weights}`` of every counted layer."""
  return {k: quantizers.num_weights(v) for k, v in transform.quantized_leaves(qparams).items()}


def layer_weights(qparams: Any, weighting: str = "params", macs: dict[str, int] | None = None,
                  table: CostTable | None = None) -> dict[str, float]:
  """Each counted layer's weight in the budget's average precision: its
  number of weights (``params``, the paper), 1 (``layers``, the authors'
  code), its multiply-accumulates per example (``macs``: the average is
  then MAC-weighted, and ``target * sum MACs * a_bits`` is a BOPs budget) or
  its cost per bit in a cost table (``table:PATH``, ``CostTable.slope``)."""
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
  if is_table(weighting):
    if table is None:
      raise ValueError(f"budget_weighting={weighting!r} needs its table (budget.load_cost_table).")
    return {k: table.slope(k) for k in sizes}
  raise ValueError(f"Unknown budget weighting {weighting!r}; expected one of {WEIGHTINGS}.")


def average_bits(qparams: Any, weighting: str = "params", macs: dict[str, int] | None = None,
                 table: CostTable | None = None) -> jax.Array:
  """Average precision of the counted layers under ``layer_weights``
  (float32 scalar); traceable."""
  leaves = transform.quantized_leaves(qparams)
  weights = layer_weights(qparams, weighting, macs, table)
  if not leaves:
    return jnp.asarray(32.0, jnp.float32)
  bits = jnp.stack([quantizers.precision(q) for q in leaves.values()]).astype(jnp.float32)
  w = jnp.asarray([weights[k] for k in leaves], jnp.float32)
  return jnp.sum(w * bits) / jnp.sum(w)


def table_cost(qparams: Any, table: CostTable, bits: float | None = None) -> float:
  """``sum_l cost_l(b_l)`` over counted layers, at their precisions or, with
  ``bits``, all at ``bits`` (the budget: ``bits = target``); host side."""
  return sum(table.cost(k, float(b) if bits is None else bits) for k, b in layer_precisions(qparams).items())


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
    table: CostTable | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The budget-aware regularizer of Eq. (7).

  ``lambda * Delta_S * sum_layers sum_b f_beta(m_B^b)``, with ``Delta_S`` the
  current (hard-counted) average precision minus the target, treated as a
  constant: positive when the model is over budget (the penalty prunes bits),
  negative when under (it grows them).

  Returns:
    ``(penalty, delta_s)``.
  """
  delta_s = jax.lax.stop_gradient(average_bits(qparams, weighting, macs, table) - target_bits)
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
