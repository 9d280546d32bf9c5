"""Allowed precisions (hardware profiles): the search's result moved onto the
bit-widths a target's kernels run (``config.allowed_bits``).

A searching method (CSQ, BSQ, MSQ) finds any precision from 1 to ``n_bits``
per layer. Integer kernels exist for a few widths only (int8; int4 and int8
on recent NPUs and GPUs), so a deployment engineer asks for a profile:

=================  ============  ==========================================
``allowed_bits``   bit-widths    for
=================  ============  ==========================================
``"any"``          1..n_bits     the paper's setting (no constraint)
``"int8"``         8             int8-only accelerators
``"int4_int8"``    4, 8          int4/int8 kernels (e.g. ONNX INT4 + INT8)
``"int2_int4_int8"``  2, 4, 8    bit-serial or LUT kernels
=================  ============  ==========================================

or a tuple such as ``"(4, 8)"``. Layers that must stay at one width (the
first and the last at 8 bits) are transform rules, ``(pattern, "fixed", 8)``;
their width must be allowed too.

When the search ends (Alg. 1's freeze, before the finetune; or at the end of
a run without one) each searched layer is moved to an allowed width by
``assign``, a knapsack solved exactly: of the assignments within the budget,
the one that spends the most of it, and among those the one nearest the
searched precisions. The budget is a ceiling: the result is never above the
target. The finetune then trains at those widths.
The move itself is each method's (``quantizers.with_precision``): CSQ keeps
the planes of largest mask logit, BSQ shifts its integers by the dropped or
added place values, MSQ re-rounds its float latent.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np

from csq_jax import quantizers, transform

PROFILES: dict[str, tuple[int, ...]] = {
    "any": (),
    "int8": (8,),
    "int4_int8": (4, 8),
    "int2_int4_int8": (2, 4, 8),
}


class ImpossibleBudgetError(ValueError):
  """Even every searched layer at its smallest allowed width is over budget."""


def parse(value: Any) -> tuple[int, ...]:
  """``allowed_bits`` as a sorted tuple of widths (``()``: any precision).

  Accepts a profile name (``PROFILES``), a tuple or list of ints, or their
  text (``"(4, 8)"``, ``"4,8"``, ``"8"``)."""
  if isinstance(value, str):
    text = value.strip()
    if text in PROFILES:
      return PROFILES[text]
    try:
      value = ast.literal_eval(text if text.startswith(("(", "[")) else f"({text},)")
    except (ValueError, SyntaxError):
      raise ValueError(f"allowed_bits={text!r} is neither a profile ({', '.join(PROFILES)}) nor a tuple of"
                       " bit-widths such as '(4, 8)'.") from None
  widths = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in widths):
    raise ValueError(f"allowed_bits={value!r}: bit-widths must be integers >= 1.")
  return tuple(sorted(set(widths)))


def assign(wanted: Mapping[str, int], allowed: Sequence[int], cost: Callable[[str, int], float],
           budget: float, resolution: int = 20_000) -> dict[str, int]:
  """An allowed width per layer, the summed ``cost`` at most ``budget``.

  A knapsack solved exactly by dynamic programming over the budget cut into
  ``resolution`` units (each layer's cost rounded up to whole units, so the
  result is always within the budget): the assignment that spends the most
  of the budget (more bits where they fit), and among those the one nearest
  the searched precisions (least ``sum |width - wanted|``).

  Args:
    wanted: each layer's searched precision.
    allowed: the allowed widths.
    cost: ``cost(layer, bits) > 0``, the layer's share of the budget at
      ``bits`` (for an average-precision budget, ``weight * bits``).
    budget: the ceiling on the summed cost.

  Returns:
    ``{layer: width}``.

  Raises:
    ImpossibleBudgetError: no assignment is within ``budget``.
  """
  levels = sorted(allowed)
  names = list(wanted)
  smallest = sum(cost(p, levels[0]) for p in names)
  if budget <= 0 or smallest > budget * (1 + 1e-9):
    raise ImpossibleBudgetError(
        f"every searched layer at {levels[0]} bits (the smallest allowed width) costs {smallest:.6g}, over the"
        f" budget of {budget:.6g}: raise target_bits or allow a smaller width.")
  unit = budget / resolution
  units = np.array([[int(np.ceil(cost(p, b) / unit - 1e-6)) for b in levels] for p in names])
  # best[c]: the least distance to `wanted` of the layers so far spending exactly c units.
  best = np.full(resolution + 1, np.inf)
  best[0] = 0.0
  picks = np.zeros((len(names), resolution + 1), np.int8)
  for i, p in enumerate(names):
    new = np.full_like(best, np.inf)
    for j, b in enumerate(levels):
      c = units[i, j]
      if c > resolution:
        continue
      cand = np.full_like(best, np.inf)
      cand[c:] = best[:resolution + 1 - c] + abs(b - wanted[p])
      better = cand < new
      new[better], picks[i, better] = cand[better], j
    best = new
  spent = int(np.nonzero(np.isfinite(best))[0].max())
  width = {}
  for i in reversed(range(len(names))):
    j = picks[i, spent]
    width[names[i]] = levels[j]
    spent -= units[i, j]
  return {p: width[p] for p in names}


def fit(params: Any, allowed: Sequence[int], target_bits: float, weights: Mapping[str, float]) -> Any:
  """``params`` with every searched layer at an allowed width, the
  ``weights``-weighted average precision at most ``target_bits``.

  Layers whose precision is not the search's (``fixed`` rules: STE leaves)
  keep theirs and count as they are. Host side, on concrete arrays.
  """
  leaves = transform.quantized_leaves(params)
  searched = {p: leaf for p, leaf in leaves.items() if quantizers.can_set_precision(leaf)}
  if not allowed or not searched:
    return params
  bits = {p: int(quantizers.precision(leaf)) for p, leaf in leaves.items()}
  fixed_cost = sum(weights[p] * bits[p] for p in leaves if p not in searched)
  budget = target_bits * sum(weights[p] for p in leaves) - fixed_cost
  width = assign({p: bits[p] for p in searched}, allowed, lambda p, b: weights[p] * b, budget)
  moved = {p: (bits[p], b) for p, b in width.items() if b != bits[p]}
  if moved:
    logging.info("allowed_bits %s: layers moved (searched -> allowed bits): %s", tuple(allowed), moved)
  return transform.map_quantized_with_path(
      lambda p, leaf: quantizers.with_precision(leaf, width[p]) if p in moved else leaf, params)
