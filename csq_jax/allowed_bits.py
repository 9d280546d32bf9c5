"""Allowed precisions (hardware profiles): the search's result moved onto the
bit-widths a target's kernels run (``config.allowed_bits``).

A searching method (CSQ, BSQ, MSQ) finds any precision from 1 to ``n_bits``
per layer. Integer kernels exist for a few widths only (int8; int4 and int8
on recent NPUs and GPUs), so a deployment engineer asks for a profile. This
project's ``n`` bits are ``n`` magnitude bits and a sign (integers in
``[-(2^n - 1), 2^n - 1]``, Eq. 1's grid), so a two's-complement int4 kernel
(``[-8, 7]``) holds precisions up to 3 and an int8 one up to 7: the profiles
name the hardware types and allow the precisions that fit them, which the
ONNX export then stores as INT4 and INT8 (``onnx_export.integer_type``).

====================  ===========  =========================================
``allowed_bits``      precisions   for
====================  ===========  =========================================
``"any"``             1..n_bits    the paper's setting (no constraint)
``"int8"``            7            int8-only accelerators
``"int4_int8"``       3, 7         int4/int8 kernels (ONNX INT4 + INT8)
``"int2_int4_int8"``  1, 3, 7      int2 (``[-2, 1]`` holds ``+-1``) too
====================  ===========  =========================================

or a tuple of precisions such as ``"(4, 8)"``. Layers that must stay at one
width (the first and the last at 8 bits) are transform rules,
``(pattern, "fixed", bits)``; their width must be allowed too.

When the search ends (Alg. 1's freeze, before the finetune; or at the end of
a run without one) each searched layer is moved to an allowed width by
``assign``, a knapsack solved exactly: of the assignments within the budget
that spend within 1% of the most it allows, the one nearest the searched
precisions. The budget is a ceiling: the result is never above the
target. The finetune then trains at those widths.
The move itself is each method's (``quantizers.with_precision``): CSQ keeps
the window of consecutive planes of largest summed mask logit (an integer kernel
needs consecutive planes), BSQ shifts its integers by the dropped or added
place values, MSQ re-rounds its float latent.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import numpy as np

from csq_jax import budget, quantizers, transform

PROFILES: dict[str, tuple[int, ...]] = {  # precisions (magnitude bits) that fit the named integer types
    "any": (),
    "int8": (7,),
    "int4_int8": (3, 7),
    "int2_int4_int8": (1, 3, 7),
}


# How far below the most of the budget an assignment may spend and still be
# chosen for being nearer the search (a fraction of the largest value).
SPEND_BAND = 0.01


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
           ceiling: float, value: Callable[[str, int], float] | None = None,
           resolution: int = 20_000) -> dict[str, int]:
  """An allowed width per layer, the summed ``cost`` at most ``ceiling``.

  A knapsack solved exactly by dynamic programming over the budget cut into
  ``resolution`` units (each layer's cost rounded up to whole units, so the
  result is always within the budget): among the assignments whose summed
  ``value`` (default: the cost itself, i.e. the budget spent on bits) is
  within ``SPEND_BAND`` of the largest, the one nearest the searched
  precisions (least ``sum |width - wanted|``). The band keeps the search's
  choice where many assignments spend about the same: with the largest
  spend alone, a search 4.7% over a latency budget had 6 of its 8 layers
  rearranged (its 8-bit classifier cut to 1 bit) to land on the budget
  exactly.

  Args:
    wanted: each layer's searched precision.
    allowed: the allowed widths.
    cost: ``cost(layer, bits) > 0``, the layer's share of the budget at
      ``bits`` (for an average-precision budget, ``weight * bits``).
    ceiling: the budget, a ceiling on the summed cost.
    value: what more bits are worth (a cost table's budget: its slopes times
      the bits, since a measured cost need not grow with the bits).

  Returns:
    ``{layer: width}``.

  Raises:
    ImpossibleBudgetError: no assignment is within ``ceiling``.
  """
  value = value or cost
  levels = sorted(allowed)
  names = list(wanted)
  smallest = sum(min(cost(p, b) for b in levels) for p in names)
  if ceiling <= 0 or smallest > ceiling * (1 + 1e-9):
    raise ImpossibleBudgetError(
        f"every searched layer at its cheapest allowed width ({levels}) costs {smallest:.6g}, over the budget"
        f" of {ceiling:.6g}: raise target_bits or allow a smaller width.")
  unit = ceiling / resolution
  units = np.array([[max(int(np.ceil(cost(p, b) / unit - 1e-6)), 0) for b in levels] for p in names])
  worth = np.array([[value(p, b) for b in levels] for p in names], np.float64)
  tie = 1e-9 * max(float(np.abs(worth).sum()), 1.0)
  # At each spend c (units) of the layers so far: the best value, and its distance to `wanted`.
  best = np.full(resolution + 1, -np.inf)
  dist = np.zeros(resolution + 1)
  best[0] = 0.0
  picks = np.zeros((len(names), resolution + 1), np.int8)
  for i, p in enumerate(names):
    new_best, new_dist = np.full_like(best, -np.inf), np.zeros_like(dist)
    for j, b in enumerate(levels):
      c = units[i, j]
      if c > resolution:
        continue
      cand_best = np.full_like(best, -np.inf)
      cand_dist = np.zeros_like(dist)
      cand_best[c:] = best[:resolution + 1 - c] + worth[i, j]
      cand_dist[c:] = dist[:resolution + 1 - c] + abs(b - wanted[p])
      better = (cand_best > new_best + tie) | ((cand_best >= new_best - tie) & (cand_dist < new_dist))
      better &= np.isfinite(cand_best)
      new_best[better], new_dist[better], picks[i, better] = cand_best[better], cand_dist[better], j
    best, dist = new_best, new_dist
  reachable = np.nonzero(np.isfinite(best))[0]
  if not reachable.size:  # within the budget only before rounding each cost up to a unit
    raise ImpossibleBudgetError(f"the cheapest allowed widths ({levels}) fill the budget of {ceiling:.6g} to"
                                " within rounding: raise target_bits a little.")
  top = best[reachable].max()
  near = reachable[best[reachable] >= top - max(tie, SPEND_BAND * abs(top))]
  spent = int(near[np.lexsort((-best[near], dist[near]))[0]])  # nearest; among equals, the fullest
  width = {}
  for i in reversed(range(len(names))):
    j = picks[i, spent]
    width[names[i]] = levels[j]
    spent -= units[i, j]
  return {p: width[p] for p in names}


def fit(params: Any, allowed: Sequence[int], target_bits: float, weights: Mapping[str, float],
        table: budget.CostTable | None = None) -> Any:
  """``params`` with every searched layer at an allowed width within the
  budget: the ``weights``-weighted average precision at most
  ``target_bits`` or, with a cost ``table``, the table's cost at most that of
  every layer at ``target_bits``.

  Layers whose precision is not the search's (``fixed`` rules: STE leaves)
  keep theirs and count as they are. Host side, on concrete arrays.
  """
  leaves = transform.quantized_leaves(params)
  searched = {p: leaf for p, leaf in leaves.items() if quantizers.can_set_precision(leaf)}
  if not allowed or not searched:
    return params
  bits = {p: int(quantizers.precision(leaf)) for p, leaf in leaves.items()}
  fixed = [p for p in leaves if p not in searched]
  linear = lambda p, b: weights[p] * b  # noqa: E731
  if table is None:
    cost, value = linear, None
    ceiling = target_bits * sum(weights[p] for p in leaves)
  else:
    cost, value = table.cost, linear
    ceiling = sum(table.cost(p, target_bits) for p in leaves)
  width = assign({p: bits[p] for p in searched}, allowed, cost, ceiling - sum(cost(p, bits[p]) for p in fixed),
                 value)
  moved = {p: (bits[p], b) for p, b in width.items() if b != bits[p]}
  if moved:
    logging.info("allowed_bits %s: layers moved (searched -> allowed bits): %s", tuple(allowed), moved)
  # Every searched layer, moved or not: CSQ's planes must also become consecutive (quantizers/csq.py).
  return transform.map_quantized_with_path(
      lambda p, leaf: quantizers.with_precision(leaf, width[p]) if p in searched else leaf, params)
