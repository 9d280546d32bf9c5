r"""Run several methods on one config and budget, and tabulate them.

  python -m csq_jax.compare --config=configs/default.py --workdir=runs/compare \
      --methods=fp,ste,csq_uniform,csq,bsq,msq --targets=2,3,4

Every run is ``python -m csq_jax.main`` in its own process (so peak memory is
its own) with ``--config.method`` and ``--config.target_bits`` set, in
``workdir/<method>_t<target>`` (``workdir/fp`` once for the float baseline);
any ``--config.<field>=value`` given here is passed to every run. A run whose
``summary.json`` exists is not repeated, and an interrupted one resumes from
its checkpoint. The result is ``comparison.md`` (the table, as in Table IV of
the CSQ paper), ``comparison.csv``, ``comparison.json`` and
``accuracy_vs_compression.png`` in ``workdir``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from typing import Any, Sequence

from absl import app, flags

from csq_jax import report, transform

_CONFIG = flags.DEFINE_string("config", "configs/default.py", "Config file (as for csq_jax.main).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the table.", required=True)
_METHODS = flags.DEFINE_list("methods", ["fp", "ste", "csq_uniform", "csq", "bsq", "msq"], "Methods to run.")
_TARGETS = flags.DEFINE_list("targets", ["2", "3", "4"], "Target average bits (fixed bits for ste/csq_uniform).")

COLUMNS = (
    ("method", "method"),
    ("target_bits", "target"),
    ("avg_bits", "avg bits"),
    ("compression", "compression"),
    ("test_accuracy", "accuracy"),
    ("trainable_params", "trainable params"),
    ("epoch_time_s", "s / epoch"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("peak_device_mib", "peak device MiB"),
)


def run_dir(workdir: str, method: str, target: float | None) -> str:
  return os.path.join(workdir, method if target is None else f"{method}_t{target:g}")


def plan(methods: Sequence[str], targets: Sequence[float]) -> list[tuple[str, float | None]]:
  """``(method, target)`` pairs; the float baseline runs once, with no target."""
  runs = []
  for m in methods:
    if m not in transform.METHODS:
      raise app.UsageError(f"Unknown method {m!r}; expected some of {transform.METHODS}.")
    runs.extend([(m, None)] if m == "fp" else [(m, t) for t in targets])
  return runs


def run_one(config: str, workdir: str, method: str, target: float | None, overrides: Sequence[str]) -> dict[str, Any]:
  """The run's summary, training it first unless it has one."""
  wd = run_dir(workdir, method, target)
  path = os.path.join(wd, "summary.json")
  if not os.path.exists(path):
    cmd = [sys.executable, "-m", "csq_jax.main", f"--config={config}", f"--workdir={wd}",
           f"--config.method={method}", *overrides]
    if target is not None:
      cmd.append(f"--config.target_bits={target}")
    print(f"[compare] {method} target={target}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
      raise RuntimeError(f"The {method} run (target {target}) failed with exit code {proc.returncode};"
                         f" its log and checkpoints are in {wd}. Fix the cause and rerun this command:"
                         " finished runs are kept and not repeated.")
  with open(path) as f:
    return json.load(f)


def rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for s in summaries:
    row = {key: s.get(key) for key, _ in COLUMNS}
    if s["method"] == "fp":
      row["target_bits"] = 32
    out.append(row)
  return out


def _fmt(key: str, v) -> str:
  if v is None:
    return "-"
  if key == "test_accuracy":
    return f"{100 * v:.2f}%"
  if key == "compression":
    return f"{v:.2f}x"
  if key in ("avg_bits", "epoch_time_s"):
    return f"{v:.3f}"
  if key in ("peak_rss_mib", "peak_device_mib"):
    return f"{v:.0f}"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def markdown(table: Sequence[dict[str, Any]]) -> str:
  head = "| " + " | ".join(name for _, name in COLUMNS) + " |"
  rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
  body = ["| " + " | ".join(_fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in table]
  return "\n".join([head, rule, *body]) + "\n"


def csv_text(table: Sequence[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, [k for k, _ in COLUMNS])
  w.writeheader()
  w.writerows(table)
  return buf.getvalue()


def plot(table: Sequence[dict[str, Any]], path: str) -> None:
  """Accuracy against compression, one line per method (targets as points)."""
  plt = report._pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in dict.fromkeys(r["method"] for r in table):
    pts = sorted((r["compression"], 100 * r["test_accuracy"]) for r in table if r["method"] == method)
    if method == "fp":
      ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="fp")
      continue
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
  ax.set_xlabel("compression vs 32-bit weights (x)")
  ax.set_ylabel("test accuracy, exactly quantized (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  report._save(fig, path)


def main(argv: Sequence[str]) -> None:
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  extra = [a for a in argv[1:] if not a.startswith("--config.")]
  if extra:
    raise app.UsageError(f"Unexpected arguments {extra}; only --config.<field>=value overrides are passed on.")
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  runs = plan(_METHODS.value, [float(t) for t in _TARGETS.value])
  summaries = [run_one(_CONFIG.value, workdir, m, t, overrides) for m, t in runs]
  table = rows(summaries)
  report.atomic_write_text(os.path.join(workdir, "comparison.md"), markdown(table))
  report.atomic_write_text(os.path.join(workdir, "comparison.csv"), csv_text(table))
  report.atomic_write_text(os.path.join(workdir, "comparison.json"), json.dumps(table, indent=2) + "\n")
  plot(table, os.path.join(workdir, "accuracy_vs_compression.png"))
  print(markdown(table), end="")


def run() -> None:
  # absl would reject the --config.<field> overrides as unknown flags: take
  # them out before it parses, and hand them to main with the rest of argv.
  argv = sys.argv
  passed = [a for a in argv[1:] if a.startswith("--config.")]
  sys.argv = [a for a in argv if not a.startswith("--config.")]
  app.run(lambda rest: main(list(rest) + passed))


if __name__ == "__main__":
  run()
