"""Run outputs: ``summary.json`` and the figures of a run.

* ``layer_bits.png``: final precision of every counted layer (the paper's Fig. 4);
* ``avg_bits.png``: average precision over training against the target
  (Figs. 2-3), with the hard-quantized test accuracy on a second axis.

Files are written to a temporary name and renamed, so a workdir never holds a
half-written summary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from csq_jax import budget, metric_writers, quantizers, transform


def atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def make_summary(config, ds, model, state, accuracy: float, loss: float, rules_report) -> dict[str, Any]:
  """The run's result: method, budget, compression, hard-quantized accuracy, per-layer bits."""
  params = state.params
  bits = {k: int(v) for k, v in budget.layer_precisions(params).items()}
  sizes = budget.layer_sizes(params)
  variables = {"params": transform.materialize(params, 1.0, hard=True), "batch_stats": state.batch_stats}
  macs = budget.layer_macs(model, variables, jnp.zeros((1,) + tuple(ds.image_shape)), train=False)
  act_bits = int(config.act_bits)
  fp = config.get("fp_accuracy", -1.0)
  return {
      "method": config.method,
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
  plot_layer_bits(summary, os.path.join(workdir, "layer_bits.png"))
  plot_avg_bits(metric_writers.read_metrics(os.path.join(workdir, "metrics.jsonl")), summary,
                os.path.join(workdir, "avg_bits.png"))


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str) -> None:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  os.replace(tmp, path)


def plot_layer_bits(summary: dict[str, Any], path: str) -> None:
  """Per-layer precision bars (Fig. 4)."""
  plt = _pyplot()
  layers = summary["layers"]
  names = [l["name"].removesuffix("/kernel") for l in layers]
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
  ax.bar(range(len(names)), [l["bits"] for l in layers], color="tab:blue")
  ax.axhline(summary["avg_bits"], color="tab:red", ls="--", label=f"average {summary['avg_bits']:.2f} bits")
  ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=8)
  ax.set_ylabel("weight precision (bits)")
  ax.set_xlabel("layer")
  ax.set_title(f"{summary['method'].upper()} {summary['model']} on {summary['dataset']}: "
               f"target {summary['target_bits']:g} bits, acc {100 * summary['test_accuracy']:.2f}%")
  ax.legend()
  _save(fig, path)
  plt.close(fig)


def plot_avg_bits(records: list[dict[str, Any]], summary: dict[str, Any], path: str) -> None:
  """Average precision over training vs the target (Figs. 2-3)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  epochs = [r["epoch"] for r in records]
  ax.plot(epochs, [r["avg_bits"] for r in records], color="tab:blue", label="average precision")
  ax.axhline(summary["target_bits"], color="tab:red", ls="--", label=f"target {summary['target_bits']:g}")
  ax.set_xlabel("epoch")
  ax.set_ylabel("average weight precision (bits)")
  ax.set_title(f"{summary['method'].upper()} {summary['model']}: precision during training")
  handles = ax.get_lines()
  acc = [(r["epoch"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
  if acc:
    ax2 = ax.twinx()
    handles += ax2.plot(*zip(*[(e, 100 * a) for e, a in acc]), color="tab:green", alpha=0.6,
                        label="test accuracy, hard-quantized")
    ax2.set_ylabel("test accuracy, hard-quantized (%)")
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
  _save(fig, path)
  plt.close(fig)
