r"""The report of a set of runs, from their JSON files alone (no JAX).

Each run's ``summary.json`` (written by ``csq_jax.summary`` at the end of
training: method, budget, compression, accuracy of the exactly quantized
model, per-layer bits, the config) and ``metrics.jsonl`` are read.

Of several runs::

  python -m csq_jax.report RUN_DIR... [--out=DIR]

RUN_DIRs are finished runs or directories above them (a sweep's workdir):
every ``summary.json`` below them is a run. ``DIR`` (default: the directory
common to the RUN_DIRs) receives ``report.md`` (a table as in the CSQ paper's
Tables III-V: method, target, W-bits, A-bits, compression, accuracy, the config
fields that differ between runs and the Pareto front; and Table V's layout per
method), ``report.csv`` and the figures of ``csq_jax.figures``:
``precision_per_layer.png`` (Fig. 4), ``precision_during_training.png``
(Figs. 2-3), ``accuracy_vs_compression.png`` and, with MSQ runs,
``sensitivity.png`` (Omega_l per layer).

Files are written to a temporary name and renamed, so a directory never holds
a half-written summary or report.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from csq_jax import figures, metric_writers
from csq_jax.methods import registry


def atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# The report of several runs


class ReportError(ValueError):
  """Nothing to report from the given paths; the message says what to give."""


METHOD_ORDER = registry.names()  # the registry's order: baselines first
# Config fields that never change a result (logging, evaluation cadence, data
# workers, devices, resume policy): not columns of the table, and not compared
# when a checkpoint is resumed (checkpoint.py).
BOOKKEEPING_FIELDS = ("progress", "tensorboard", "keep_checkpoints", "eval_every", "eval_soft", "fp_accuracy",
                      "data_dir", "data_workers", "prefetch_batches", "eval_batch_size", "checkpoint_every_steps",
                      "checkpoint_every_epochs", "check_finite_every_steps", "mesh", "distributed",
                      "allow_resume_changes", "checkpoint_fallback")
# The budget: a method that keeps float weights ignores it.
BUDGET_FIELDS = ("target_bits", "n_bits", "budget_weighting", "budget_tolerance", "allowed_bits")
# Runs written before methods had config sections: their flat knobs, renamed
# to the sections' fields, and the sections each built-in method read.
LEGACY_FIELDS = {
    "reg_strength": "csq.reg_strength", "min_layer_bits": "csq.min_layer_bits", "csq_init": "csq.init",
    "logit_init": "csq.logit_init", "csq_off_logit": "csq.off_logit", "decay_mask_logits": "csq.decay_mask_logits",
    "mask_momentum": "csq.mask_momentum", "csq_rounds": "csq.rounds", "csq_rewind_epoch": "csq.rewind_epoch",
    "csq_mask_clamp": "csq.mask_clamp", "bsq_alpha": "bsq.alpha", "bsq_requant_every": "bsq.requant_every",
    "bsq_threshold": "bsq.threshold", "msq_lambda": "msq.reg_strength", "msq_prune_every": "msq.prune_every",
    "msq_threshold": "msq.threshold", "msq_hessian": "msq.hessian", "msq_hessian_sketch": "msq.hessian_sketch",
    "msq_hessian_probes": "msq.hessian_probes", "msq_hessian_z": "msq.hessian_z",
    "msq_hessian_max_probes": "msq.hessian_max_probes", "msq_hessian_batches": "msq.hessian_batches",
}
LEGACY_SECTIONS = {"csq": ("csq",), "csq_uniform": ("csq",), "bsq": ("bsq",), "msq": ("msq",)}


def method_ignores(field: str, reads: Sequence[str], quantizes: bool = True,
                   method_sections: Sequence[str] = ()) -> bool:
  """Whether a run of a method ignores the config field ``field`` (dotted):
  a field of another method's section (``csq.*`` for all but the methods
  that read ``csq``, ...) or, for a method that keeps float weights, the
  budget (``BUDGET_FIELDS``).

  Args:
    field: a dotted config field, e.g. ``bsq.alpha`` or ``target_bits``.
    reads: the config sections the method reads (``Method.sections()``;
      recorded in ``summary.json`` as ``method_sections``).
    quantizes: whether the method quantizes (FP: no).
    method_sections: sections of methods outside the registry (a section
      named after a registered method is a method's section).
  """
  head = field.split(".")[0] if "." in field else None
  if head is not None and head not in reads and (head in registry.METHODS or head in method_sections):
    return True
  return not quantizes and field in BUDGET_FIELDS


def run_method(summary: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
  """``(sections read, quantizes)`` of a run's method as its summary records
  them (runs from before the record: the built-ins' legacy sections)."""
  if "method_sections" in summary:
    return tuple(summary["method_sections"]), bool(summary.get("method_quantizes", True))
  return LEGACY_SECTIONS.get(summary["method"], ()), summary["method"] != "fp"


def _run_ignores(run: dict[str, Any], field: str) -> bool:
  reads, quantizes = run_method(run["summary"])
  return method_ignores(field, reads, quantizes, run.get("owned_sections", ()))


def find_runs(paths: Sequence[str]) -> list[str]:
  """Directories holding a ``summary.json`` at or below ``paths``, in order
  given and then sorted, each once."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      raise ReportError(f"{path} is not a directory: give run directories or a sweep's workdir.")
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard"))
      if "summary.json" in files:
        found.append(os.path.normpath(root))
  found = list(dict.fromkeys(found))
  if not found:
    raise ReportError(f"No summary.json at or below {', '.join(paths)}: give finished runs (training writes"
                      " summary.json at its end) or a directory above them.")
  return found


def load_run(run_dir: str) -> dict[str, Any]:
  """``{"dir", "summary", "records", "sensitivity", "sensitivity_epoch"}`` of
  a finished run; the sensitivities are MSQ's last ``adjust_sensitivity``."""
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  records = metric_writers.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  measured = [r for r in records if r.get("adjust_sensitivity")]
  return {"dir": run_dir, "summary": summary, "records": records,
          "sensitivity": measured[-1]["adjust_sensitivity"] if measured else None,
          "sensitivity_epoch": measured[-1]["epoch"] if measured else None}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = json.dumps(v) if isinstance(v, list) else v
  return out


def run_config(run: dict[str, Any]) -> dict[str, Any]:
  """The run's config as ``{dotted field: value}``; a run from before config
  sections has its flat method knobs renamed (``LEGACY_FIELDS``)."""
  flat = _flat(run["summary"].get("config") or {})
  return {LEGACY_FIELDS.get(k, k): v for k, v in flat.items()}


def config_value(run: dict[str, Any], field: str):
  """The run's value of a config field; ``None`` where its method ignores it
  or the summary has no config (runs written before the config was saved)."""
  if _run_ignores(run, field):
    return None
  return run_config(run).get(field)


def varying_fields(runs: Sequence[dict[str, Any]]) -> list[str]:
  """Config fields, other than method and target, whose values differ among
  the runs that use them (in config order)."""
  fields = dict.fromkeys(k for r in runs for k in run_config(r))
  out = []
  for f in fields:
    if f in ("method", "target_bits") or f.split(".")[0] in BOOKKEEPING_FIELDS:
      continue
    values = {json.dumps(config_value(r, f)) for r in runs
              if r["summary"].get("config") and not _run_ignores(r, f)}
    if len(values) > 1:
      out.append(f)
  return out


def run_label(run: dict[str, Any], fields: Sequence[str] = ()) -> str:
  """``fp``, or ``<method> T<target>``, then the varying fields it uses."""
  s = run["summary"]
  label = "fp" if s["method"] == "fp" else f"{s['method']} T{s['target_bits']:g}"
  extra = [f"{f}={format_value(f, config_value(run, f))}" for f in fields if config_value(run, f) is not None]
  return " ".join([label, *extra])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points ``(compression, accuracy)`` that no other point
  dominates (at least as high in both, higher in one), by increasing
  compression (then decreasing accuracy)."""
  if not len(points):
    return []
  p = np.asarray(points, np.float64).reshape(-1, 2)
  ge = (p[None, :, 0] >= p[:, None, 0]) & (p[None, :, 1] >= p[:, None, 1])  # [i, j]: j at least as good as i
  gt = (p[None, :, 0] > p[:, None, 0]) | (p[None, :, 1] > p[:, None, 1])
  dominated = np.any(ge & gt, axis=1)
  keep = np.flatnonzero(~dominated)
  return sorted(keep.tolist(), key=lambda i: (p[i, 0], -p[i, 1]))


def _sort_key(run: dict[str, Any], fields: Sequence[str]):
  s = run["summary"]
  rank = METHOD_ORDER.index(s["method"]) if s["method"] in METHOD_ORDER else len(METHOD_ORDER)

  def sortable(v):
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))

  return (rank, s["method"], s["target_bits"] if s["method"] != "fp" else 0.0,
          tuple(sortable(config_value(run, f)) for f in fields), run["name"])


def format_value(key: str, v) -> str:
  """A table cell: accuracy in %, compression with an x, bits to 3 decimals."""
  if v is None:
    return "-"
  if isinstance(v, tuple):  # (mean, std) over seeds
    return f"{format_value(key, v[0])} ± {format_value(key, v[1])}"
  if isinstance(v, bool):
    return "yes" if v else ""
  if key in ("test_accuracy", "fp_accuracy"):
    return f"{100 * v:.2f}%"
  if key == "compression":
    return f"{v:.2f}x"
  if key in ("avg_bits", "epoch_time_s", "export_bits_per_weight"):
    return f"{v:.3f}"
  if key in ("peak_rss_mib", "peak_device_mib"):
    return f"{v:.0f}"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """``columns``: ``(row key, header)`` pairs."""
  head = "| " + " | ".join(name for _, name in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(format_value(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
  return "\n".join([head, rule, *body]) + "\n"


def csv_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, [k for k, _ in columns], extrasaction="ignore")
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


COLUMNS = (
    ("run", "run"),
    ("method", "method"),
    ("target_bits", "target"),
    ("avg_bits", "W-bits (avg)"),
    ("act_bits", "A-bits"),
    ("compression", "compression"),
    ("test_accuracy", "accuracy"),
    ("export_bits_per_weight", "stored bits/w"),
)
# Summary values averaged over the seeds of a group (mean ± std).
SEED_MEANS = ("avg_bits", "compression", "test_accuracy", "export_bits_per_weight")


def table_rows(runs: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[dict[str, Any]]:
  """One row per run (in the order given): the columns of ``COLUMNS``, the
  varying ``fields`` and ``pareto`` (on the accuracy-compression front)."""
  front = set(pareto_front([(r["summary"]["compression"], r["summary"]["test_accuracy"]) for r in runs]))
  rows = []
  for i, r in enumerate(runs):
    s = r["summary"]
    row = {key: s.get(key) for key, _ in COLUMNS}
    row.update(run=r["name"], target_bits=None if s["method"] == "fp" else s["target_bits"], pareto=i in front,
               budget=budget_text(s))
    row.update({f: config_value(r, f) for f in fields})
    rows.append(row)
  return rows


def budget_text(summary: dict[str, Any]) -> str | None:
  """The budget in its own terms, e.g. ``macs: 0.145 / 0.150 GBOPs (2.883 /
  3 bits)``; ``None`` for runs without one (FP, runs before the record)."""
  b = summary.get("budget")
  if not b or "achieved_bits" not in b:
    return None
  bits = f"{b['achieved_bits']:.3f} / {b['target_bits']:g} bits"
  if b.get("allowed_bits"):
    bits += f", widths {'/'.join(map(str, b['allowed_bits']))}"
  if "achieved_gbops" in b:
    return f"{b['kind']}: {b['achieved_gbops']:.4g} / {b['target_gbops']:.4g} GBOPs ({bits})"
  if "achieved_cost" in b:
    return f"{b['kind']}: {b['achieved_cost']:.4g} / {b['target_cost']:.4g} {b['unit']} ({bits})"
  if "achieved_bytes" in b:
    return f"{b['kind']}: {b['achieved_bytes']:.0f} / {b['target_bytes']:.0f} bytes ({bits})"
  return f"{b['kind']}: {bits}"


def seed_groups(runs: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[list[dict[str, Any]]]:
  """Runs that differ only in ``seed``, grouped (in order of first appearance):
  same method, target and value of every other varying field."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in runs:
    s = r["summary"]
    key = json.dumps([s["method"], None if s["method"] == "fp" else s["target_bits"], s.get("act_bits"),
                      *(config_value(r, f) for f in fields if f != "seed")])
    groups.setdefault(key, []).append(r)
  return list(groups.values())


def seed_rows(groups: Sequence[Sequence[dict[str, Any]]], fields: Sequence[str]) -> list[dict[str, Any]]:
  """One row per seed group: ``SEED_MEANS`` as ``(mean, std)`` (population
  std over the group's seeds; 0 for one seed), ``seeds`` the seeds, and the
  group's other varying fields."""
  rows = []
  for group in groups:
    first = group[0]["summary"]
    row = {key: first.get(key) for key, _ in COLUMNS}
    for key in SEED_MEANS:
      values = [r["summary"].get(key) for r in group]
      row[key] = None if any(v is None for v in values) else (float(np.mean(values)), float(np.std(values)))
    seeds = [config_value(r, "seed") for r in group]
    row.update(run=group[0]["label"].split(" seed=")[0], target_bits=None if first["method"] == "fp" else
               first["target_bits"], seeds=", ".join("-" if x is None else str(x) for x in seeds))
    row.update({f: config_value(group[0], f) for f in fields if f != "seed"})
    rows.append(row)
  return rows


def tradeoff_tables(runs: Sequence[dict[str, Any]]) -> str:
  """Table V's layout for each method run at two or more distinct targets
  (and nothing else varying): targets as columns, then FP when one FP run is
  present; rows average precision, compression, accuracy."""
  fps = [r["summary"] for r in runs if r["summary"]["method"] == "fp"]
  out = []
  for method in dict.fromkeys(r["summary"]["method"] for r in runs):
    sums = sorted((r["summary"] for r in runs if r["summary"]["method"] == method), key=lambda s: s["target_bits"])
    targets = [s["target_bits"] for s in sums]
    if method == "fp" or len(sums) < 2 or len(set(targets)) < len(targets):
      continue
    cols = [f"{t:g}-bit" for t in targets] + (["FP"] if len(fps) == 1 else [])
    cells = sums + fps[:1] if len(fps) == 1 else sums
    lines = [
        "| Target | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        "| Avg. prec. | " + " | ".join(f"{s['avg_bits']:.2f}" if s["method"] != "fp" else "32" for s in cells) + " |",
        "| Comp (x) | " + " | ".join(f"{s['compression']:.2f}" for s in cells) + " |",
        f"| {method.upper()} acc. (%) | " + " | ".join(f"{100 * s['test_accuracy']:.2f}" for s in cells) + " |",
    ]
    out.append(f"{method.upper()}, accuracy-size trade-off under different targets (CSQ Table V's layout):\n\n"
               + "\n".join(lines) + "\n")
  return "\n".join(out)


FIGURE_NOTES = {
    "precision_per_layer.png": ("Per-layer precision", "Final weight precision of every counted layer, one bar per"
                                " run (CSQ Fig. 4); FP runs have no counted layers."),
    "precision_during_training.png": ("Average precision during training", "Parameter-weighted average precision"
                                      " (hard-counted bits) over the epochs of each run, its target dotted and"
                                      " starred (CSQ Figs. 2-3); below, the hard-quantized test accuracy."),
    "accuracy_vs_compression.png": ("Accuracy vs compression", "Each run's exactly quantized test accuracy against"
                                    " its compression; the circled runs form the Pareto front (no run is both"
                                    " smaller and more accurate)."),
    "sensitivity.png": ("MSQ sensitivity", "MSQ's Hessian-aware sensitivity Omega_l = Tr(H_l) ||W_n - W||_2 of"
                        " every layer at its last measurement; layers below the run's mean (dashed) drop two"
                        " LSBs at a time."),
}


def write_report(paths: Sequence[str], out: str | None = None,
                 failures: Sequence[tuple[str, str]] = ()) -> str:
  """Write ``report.md``, ``report.csv`` and the figures for the runs at or
  below ``paths`` into ``out`` (default: their common directory); ``failures``
  (``(run, message)`` pairs) are listed at the end. Returns report.md's path."""
  dirs = find_runs(paths)
  out = out or os.path.commonpath([os.path.abspath(p) for p in paths])
  os.makedirs(out, exist_ok=True)
  runs = [load_run(d) for d in dirs]
  owned = sorted({x for r in runs for x in run_method(r["summary"])[0]})  # user methods' sections too
  for r in runs:
    r["owned_sections"] = owned
  base = os.path.commonpath([os.path.abspath(d) for d in dirs])
  for r in runs:  # the path below the runs' common directory, or the run's own name
    rel = os.path.relpath(os.path.abspath(r["dir"]), base)
    r["name"] = os.path.basename(os.path.abspath(r["dir"])) if rel == "." else rel
  fields = varying_fields(runs)
  runs.sort(key=lambda r: _sort_key(r, fields))
  labels = [run_label(r, fields) for r in runs]
  for r, label in zip(runs, labels):
    r["label"] = label if labels.count(label) == 1 else f"{label} ({r['name']})"
  rows = table_rows(runs, fields)
  columns = [*COLUMNS, *((f, f) for f in fields), ("pareto", "Pareto front")]
  if any(r["summary"].get("budget", {}).get("kind", "params") != "params" or r["summary"].get("budget", {}).get(
      "allowed_bits") for r in runs):
    columns.insert(len(COLUMNS), ("budget", "budget (achieved / target)"))

  written = []
  points = [{"method": r["summary"]["method"], "label": r["label"], "compression": r["summary"]["compression"],
             "test_accuracy": r["summary"]["test_accuracy"]} for r in runs]
  front = pareto_front([(p["compression"], p["test_accuracy"]) for p in points])
  plots = [("precision_per_layer.png", any(r["summary"]["layers"] for r in runs),
            lambda p: figures.plot_precision_per_layer(runs, p)),
           ("precision_during_training.png", any(r["summary"]["layers"] and r["records"] for r in runs),
            lambda p: figures.plot_precision_during_training(runs, p)),
           ("accuracy_vs_compression.png", True, lambda p: figures.plot_accuracy_vs_compression(points, p, front)),
           ("sensitivity.png", any(r["sensitivity"] for r in runs), lambda p: figures.plot_sensitivity(runs, p))]
  for name, wanted, plot in plots:
    if wanted:
      plot(os.path.join(out, name))
      written.append(name)

  models = sorted({f"{r['summary']['model']} on {r['summary']['dataset']}" for r in runs})
  parts = [
      "# csq_jax report\n",
      f"{len(runs)} run{'s' * (len(runs) != 1)}: {'; '.join(models)}. Accuracy: test accuracy of the exactly"
      " quantized model (every gate a unit step). W-bits: parameter-weighted average weight precision of the"
      " counted layers (the paper's precision: selected bit planes); A-bits: activation precision (32 = float);"
      " compression: 32 x counted weights / their total bits; stored bits/w: what the exact export stores per"
      " counted weight (a sign on top of the magnitude bits, and CSQ's signed-digit sums off the layer's grid,"
      " docs/export_format.md).\n",
      markdown_table(rows, columns),
  ]
  if "seed" in fields:  # repeated runs: mean ± std over seeds first, every run below
    groups = seed_groups(runs, fields)
    seed_columns = [c for c in columns if c[0] not in ("seed", "pareto")] + [("seeds", "seeds")]
    parts.insert(2, f"Mean ± std over seeds ({len(runs)} runs in {len(groups)} groups; std over the seeds of"
                 " each group):\n\n" + markdown_table(seed_rows(groups, fields), seed_columns) + "\nEvery run:\n")
  tradeoff = tradeoff_tables(runs)
  if tradeoff:
    parts.append(tradeoff)
  for name in written:
    title, note = FIGURE_NOTES[name]
    parts.append(f"## {title}\n\n![{title}]({name})\n\n{note}\n")
  if failures:
    parts.append("## Failed runs\n\n" + "\n".join(f"- `{n}`: {msg}" for n, msg in failures) + "\n")
  path = os.path.join(out, "report.md")
  atomic_write_text(path, "\n".join(parts))
  atomic_write_text(os.path.join(out, "report.csv"), csv_table([{**r, "label": x["label"]} for r, x in
                                                                zip(rows, runs)], [*columns, ("label", "label")]))
  return path


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m csq_jax.report",
                                   description="Tables and figures of finished runs (report.md).")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="finished runs, or directories above them (every summary.json below is a run)")
  parser.add_argument("--out", default=None, help="directory for report.md and the figures"
                      " (default: the directory common to the RUN_DIRs)")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.run_dirs, args.out)
  except ReportError as e:
    sys.exit(f"csq_jax: error: {e}")
  with open(path) as f:
    print(f.read().split("\n## ")[0].rstrip())  # the tables, not the figures
  print(f"\nReport: {path}")


if __name__ == "__main__":
  main()
