"""The figures of a run and of a set of runs (PNG, matplotlib's Agg backend).

Of one run (written by training, ``summary.write_outputs``):

* ``plot_layer_bits``: final precision of every counted layer (CSQ's Fig. 4);
* ``plot_avg_bits``: average precision over training against the target
  (Figs. 2-3), hard-quantized test accuracy on a second axis.

Of several runs (``python -m csq_jax.report``):

* ``plot_precision_per_layer``: Fig. 4 with one bar per run and layer;
* ``plot_precision_during_training``: Figs. 2-3, one line per run, its target
  dotted, and the test accuracy below;
* ``plot_accuracy_vs_compression``: one marker per run, the Pareto front drawn;
* ``plot_sensitivity``: MSQ's Hessian-aware sensitivity ``Omega_l`` per layer.

A run is handed over as a dict: ``label`` (legend text), ``summary`` (its
``summary.json``), ``records`` (its ``metrics.jsonl``). Every file is saved
to a temporary name and renamed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from csq_jax.methods import registry

Run = dict[str, Any]

# Colour and marker of each registered method, by its place in the registry
# (fp, ste, lsq, csq_uniform, csq, bsq, msq), so that every figure agrees;
# methods outside the registry share the last style.
_STYLES = (("black", "*"), ("tab:gray", "v"), ("tab:red", "X"), ("tab:purple", "s"), ("tab:blue", "o"),
           ("tab:orange", "D"), ("tab:green", "^"), ("tab:cyan", "p"), ("tab:olive", "h"))
_OTHER_STYLE = ("tab:brown", "P")


def method_style(method: str) -> tuple[str, str]:
  """``(colour, marker)`` of a method in the report's figures."""
  names = registry.names()
  return _STYLES[names.index(method)] if method in names and names.index(method) < len(_STYLES) else _OTHER_STYLE
MAX_GROUPED_RUNS = 8  # more runs (or different layers) get one panel each


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig, path: str) -> None:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120, bbox_inches="tight")
  os.replace(tmp, path)
  pyplot().close(fig)


def _layer_name(name: str) -> str:
  return name.removesuffix("/kernel")


def _run_colors(n: int) -> list:
  cmap = pyplot().get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------
# One run


def plot_layer_bits(summary: dict[str, Any], path: str) -> None:
  """Per-layer precision bars of one run (Fig. 4)."""
  plt = pyplot()
  layers = summary["layers"]
  names = [_layer_name(l["name"]) for l in layers]
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
  ax.bar(range(len(names)), [l["bits"] for l in layers], color="tab:blue")
  ax.axhline(summary["avg_bits"], color="tab:red", ls="--", label=f"average {summary['avg_bits']:.2f} bits")
  ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=8)
  ax.set_ylabel("weight precision (bits)")
  ax.set_xlabel("layer")
  ax.set_title(f"{summary['method'].upper()} {summary['model']} on {summary['dataset']}: "
               f"target {summary['target_bits']:g} bits, acc {100 * summary['test_accuracy']:.2f}%")
  ax.legend()
  save(fig, path)


def plot_avg_bits(records: list[dict[str, Any]], summary: dict[str, Any], path: str) -> None:
  """Average precision of one run over training vs its target (Figs. 2-3)."""
  plt = pyplot()
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
  save(fig, path)


# ----------------------------------------------------------------------------
# Several runs


def plot_precision_per_layer(runs: Sequence[Run], path: str) -> None:
  """Final precision of every layer of every run (Fig. 4).

  Runs over the same layers (at most ``MAX_GROUPED_RUNS``) share one axis,
  one bar per run in each layer group; otherwise each run gets a panel.
  Runs without counted layers (FP) are left out.
  """
  plt = pyplot()
  runs = [r for r in runs if r["summary"]["layers"]]
  if not runs:
    raise ValueError("No run has counted layers to plot.")
  layer_lists = {tuple(l["name"] for l in r["summary"]["layers"]) for r in runs}
  colors = _run_colors(len(runs))
  if len(layer_lists) == 1 and len(runs) <= MAX_GROUPED_RUNS:
    names = [_layer_name(n) for n in next(iter(layer_lists))]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(names) * (1 + 0.3 * len(runs)) + 2), 4.5))
    for i, (r, c) in enumerate(zip(runs, colors)):
      s = r["summary"]
      x = [j - 0.4 + width * (i + 0.5) for j in range(len(names))]
      ax.bar(x, [l["bits"] for l in s["layers"]], width, color=c,
             label=f"{r['label']}: avg {s['avg_bits']:.2f} bits, {100 * s['test_accuracy']:.2f}%")
    ax.set_xticks(range(len(names)), names, rotation=70 if len(names) > 8 else 0,
                  ha="right" if len(names) > 8 else "center", fontsize=8)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("weight precision (bits)")
    ax.set_ylim(0, max(l["bits"] for r in runs for l in r["summary"]["layers"]) + 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Per-layer weight precision of each run (CSQ Fig. 4)")
    save(fig, path)
    return
  ncols = min(3, len(runs))
  nrows = math.ceil(len(runs) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
  for ax, r, c in zip(axes.flat, runs, colors):
    s = r["summary"]
    names = [_layer_name(l["name"]) for l in s["layers"]]
    ax.bar(range(len(names)), [l["bits"] for l in s["layers"]], color=c)
    ax.axhline(s["avg_bits"], color="tab:red", ls="--", lw=1, label=f"average {s['avg_bits']:.2f} bits")
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=6)
    ax.set_title(f"{r['label']}: {100 * s['test_accuracy']:.2f}%", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("weight precision (bits)")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(runs):]:
    ax.set_visible(False)
  fig.suptitle("Per-layer weight precision of each run (CSQ Fig. 4)")
  fig.tight_layout()
  save(fig, path)


def plot_precision_during_training(runs: Sequence[Run], path: str) -> None:
  """Average precision over the epochs of every run, its target dotted in the
  same colour and starred at the end (Figs. 2-3); below, the hard-quantized
  test accuracy. The first finetune epoch is marked. FP runs are left out."""
  plt = pyplot()
  runs = [r for r in runs if r["summary"]["layers"] and r["records"]]
  if not runs:
    raise ValueError("No run has per-epoch metrics of counted layers to plot.")
  fig, (ax, ax_acc) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(2, 1))
  finetune_starts = set()
  for r, c in zip(runs, _run_colors(len(runs))):
    recs = r["records"]
    epochs = [x["epoch"] for x in recs]
    ax.plot(epochs, [x["avg_bits"] for x in recs], color=c, lw=1.5, label=r["label"])
    target = r["summary"]["target_bits"]
    ax.axhline(target, color=c, ls=":", lw=1)
    ax.plot([epochs[-1]], [target], marker="*", ms=11, color=c, mec="k", mew=0.5, ls="none")
    acc = [(x["epoch"], 100 * x["test_accuracy"]) for x in recs if "test_accuracy" in x]
    if acc:
      ax_acc.plot(*zip(*acc), color=c, lw=1)
    finetune_starts.update([x["epoch"] for x in recs if x.get("phase") == "finetune"][:1])
  for e in sorted(finetune_starts):
    for a in (ax, ax_acc):
      a.axvline(e - 0.5, color="0.5", ls="--", lw=0.8)
  ax.plot([], [], "k*", ms=9, ls="none", label="target (dotted line)")
  if finetune_starts:
    ax.plot([], [], color="0.5", ls="--", lw=0.8, label="finetune starts")
  ax.set_ylabel("average weight precision (bits)")
  ax.set_title("Average precision during training (CSQ Figs. 2-3)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax_acc.set_xlabel("epoch")
  ax_acc.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax_acc.set_ylabel("test accuracy,\nhard-quantized (%)")
  ax_acc.grid(alpha=0.3)
  fig.tight_layout()
  save(fig, path)


def plot_accuracy_vs_compression(points: Sequence[dict[str, Any]], path: str,
                                 front: Sequence[int] | None = None) -> None:
  """Accuracy against compression, one marker style per method, each point
  labelled; ``front`` (indices into ``points``, by increasing compression)
  is drawn as the Pareto front. A point needs ``method``, ``compression``,
  ``test_accuracy`` and may have ``label``."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for method in dict.fromkeys(p["method"] for p in points):
    color, marker = method_style(method)
    pts = sorted((p["compression"], 100 * p["test_accuracy"]) for p in points if p["method"] == method)
    ax.plot(*zip(*pts), marker=marker, color=color, ls="-" if len(pts) > 1 else "none", lw=0.8,
            alpha=0.8, ms=8 if method == "fp" else 6, label=method)
  for p in points:
    if p.get("label"):
      ax.annotate(p["label"], (p["compression"], 100 * p["test_accuracy"]), fontsize=7,
                  xytext=(4, 4), textcoords="offset points")
  if front:
    fx = [points[i]["compression"] for i in front]
    fy = [100 * points[i]["test_accuracy"] for i in front]
    # The boundary of the region the front dominates: down at each point, then across.
    ax.step(fx, fy, where="pre", color="tab:red", lw=2, alpha=0.5, zorder=0)
    ax.plot(fx, fy, "o", ms=13, mfc="none", mec="tab:red", mew=1.5, label="Pareto front")
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(pyplot().FuncFormatter(lambda v, _: f"{v:g}x"))
  ax.set_xlabel("compression vs 32-bit weights (log scale)")
  ax.set_ylabel("test accuracy, exactly quantized (%)")
  ax.set_title("Accuracy vs compression")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="lower left")
  save(fig, path)


def plot_sensitivity(runs: Sequence[Run], path: str) -> None:
  """MSQ's Hessian-aware sensitivity ``Omega_l = Tr(H_l) ||W_n - W||_2`` per
  layer, as last measured in each run: one bar per run and layer (log scale
  when all are positive), the run's mean dashed (layers below it drop 2 bits
  at a time). A run needs ``sensitivity`` (``{layer: Omega}``) and
  ``sensitivity_epoch``."""
  plt = pyplot()
  runs = [r for r in runs if r.get("sensitivity")]
  if not runs:
    raise ValueError("No run has MSQ sensitivities to plot.")
  names = list(dict.fromkeys(k for r in runs for k in r["sensitivity"]))
  width = 0.8 / len(runs)
  fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(names) * (1 + 0.3 * len(runs)) + 2), 4.5))
  for i, (r, c) in enumerate(zip(runs, _run_colors(len(runs)))):
    om = r["sensitivity"]
    x = [j - 0.4 + width * (i + 0.5) for j, n in enumerate(names) if n in om]
    ax.bar(x, [om[n] for n in names if n in om], width, color=c,
           label=f"{r['label']} (epoch {r['sensitivity_epoch']})")
    mean = sum(om.values()) / len(om)
    ax.axhline(mean, color=c, ls="--", lw=1)
  ax.plot([], [], color="0.3", ls="--", lw=1, label="mean over layers (k=2 below)")
  positive = all(v > 0 for r in runs for v in r["sensitivity"].values())
  if positive:  # Hutchinson's trace estimate can come out negative on a tiny sample
    ax.set_yscale("log")
  ax.set_xticks(range(len(names)), [_layer_name(n) for n in names], rotation=70 if len(names) > 8 else 0,
                ha="right" if len(names) > 8 else "center", fontsize=8)
  ax.set_xlabel("layer (input to output)")
  ax.set_ylabel(r"sensitivity $\Omega_l = Tr(H_l)\,\|W_n - W\|_2$" + (" (log)" if positive else ""))
  ax.set_title("MSQ Hessian-aware sensitivity per layer, last measurement")
  ax.grid(axis="y", alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save(fig, path)
