"""One run's outputs, written at the end of training: ``summary.json``
(``make_summary``: method, budget, compression, accuracy of the exactly
quantized model, per-layer bits, the config), ``layer_bits.png`` (Fig. 4)
and ``avg_bits.png`` (Figs. 2-3). ``csq_jax.report`` reads them without JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from csq_jax import budget, figures, metric_writers, quantizers, transform
from csq_jax.report import atomic_write_text


def make_summary(config, ds, model, state, accuracy: float, loss: float, rules_report, method) -> dict[str, Any]:
  """The run's result: method (with the config sections it reads, so that the
  report knows which fields it ignores), budget, compression, hard-quantized
  accuracy, per-layer bits."""
  params = state.params
  bits = {k: int(v) for k, v in budget.layer_precisions(params).items()}
  sizes = budget.layer_sizes(params)
  variables = {"params": transform.materialize(params, 1.0, hard=True), "batch_stats": state.batch_stats}
  macs = budget.layer_macs(model, variables, jnp.zeros((1,) + tuple(ds.image_shape)), train=False)
  act_bits = int(config.act_bits)
  fp = config.get("fp_accuracy", -1.0)
  return {
      "config": json.loads(config.to_json_best_effort()),
      "method": config.method,
      "method_sections": list(method.sections()),
      "method_searches": bool(method.searches),
      "method_quantizes": bool(method.quantizes),
      "model": config.model,
      "dataset": config.dataset,
      "target_bits": float(config.target_bits),
      "n_bits": int(config.n_bits),
      "act_bits": act_bits,
      "avg_bits": float(budget.average_bits(params, "params")),
      "avg_bits_per_layer_mean": float(budget.average_bits(params, "layers")) if bits else 32.0,
      "compression": float(budget.compression(params)) if bits else 1.0,
      "model_size_bits": float(budget.model_size_bits(params)),
      "counted_params": int(sum(sizes.values())),
      "bops": budget.bops(params, macs, min(act_bits, 32)),
      "budget": budget_summary(config, params, macs, method.table, method.allowed),
      "test_accuracy": float(accuracy),
      "test_loss": float(loss),
      "fp_accuracy": float(fp) if fp is not None and fp >= 0 else None,
      "exactly_quantized": exactly_quantized(params),
      "layers": [
          {"name": k, "params": sizes[k], "bits": bits[k], "macs": macs.get(k)} for k in bits
      ],
      "float_params": [k for k, (a, _) in rules_report.actions.items() if a == "float"],
      "unused_rules": [r.pattern for r in rules_report.unused_rules],
  }


def budget_summary(config, params, macs: dict[str, int], table: budget.CostTable | None = None,
                   allowed: tuple[int, ...] = ()) -> dict[str, Any]:
  """The budget in its own terms: its kind (``budget_weighting``; ``table``
  for a cost table), the target and the achieved average precision under
  that weighting, and in its unit: bytes of the counted weights (params),
  GBOPs per example (macs), the table's unit (a cost table: the model's cost
  at its precisions against every layer at the target); with
  ``allowed`` (the method's parsed ``allowed_bits``), the widths allowed and
  whether every counted layer has one."""
  kind = "table" if budget.is_table(config.budget_weighting) else config.budget_weighting
  out = {"kind": kind, "target_bits": float(config.target_bits)}
  if allowed:
    out["allowed_bits"] = list(allowed)
  if not transform.quantized_leaves(params):
    return out
  if allowed:
    out["all_layers_allowed"] = all(int(b) in allowed for b in budget.layer_precisions(params).values())
  out["achieved_bits"] = float(budget.average_bits(params, config.budget_weighting, macs, table))
  sizes = budget.layer_sizes(params)
  if kind == "params":
    out.update(target_bytes=config.target_bits * sum(sizes.values()) / 8,
               achieved_bytes=float(budget.model_size_bits(params)) / 8)
  elif kind == "macs":
    a_bits = min(int(config.act_bits), 32)
    total = sum(macs[k] for k in sizes)
    out.update(target_gbops=config.target_bits * total * a_bits / 1e9,
               achieved_gbops=budget.bops(params, macs, a_bits) / 1e9)
  elif kind == "table":
    out.update(table=table.path, unit=table.unit, target_cost=budget.table_cost(params, table, config.target_bits),
               achieved_cost=budget.table_cost(params, table))
  return out


def exactly_quantized(params) -> bool:
  """Whether every counted layer's hard weight is its step (``s/(2^n-1)``;
  MSQ: ``s/2^n``) times an integer, checked by reconstructing it from the
  integers."""
  for leaf in transform.quantized_leaves(params).values():
    w = quantizers.materialize(leaf, None, hard=True)
    q = quantizers.integer_weights(leaf)
    if not bool(jnp.allclose(w, q * quantizers.step_size(leaf), rtol=1e-6, atol=1e-7)):
      return False
  return True


def write_outputs(workdir: str, summary: dict[str, Any]) -> None:
  atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n")
  figures.plot_layer_bits(summary, os.path.join(workdir, "layer_bits.png"))
  figures.plot_avg_bits(metric_writers.read_metrics(os.path.join(workdir, "metrics.jsonl")), summary,
                        os.path.join(workdir, "avg_bits.png"))
