r"""Run several methods on one config and budget, and tabulate them.

  python -m csq_jax.compare --config=configs/default.py --workdir=runs/compare \
      --methods=fp,ste,csq_uniform,csq,bsq,msq --targets=2,3,4

The sweep (``csq_jax.sweep``) of ``method`` x ``target_bits``: every run is
``python -m csq_jax.main`` in its own process, in
``workdir/<method>_t<target>`` (``workdir/fp`` once for the float baseline);
``--parallel``, reuse of finished runs, failure handling and
``--config.<field>=value`` as there. Besides the sweep's ``report.md`` and
figures (``accuracy_vs_compression.png`` among them), it writes
``comparison.md`` (the table, as in Table IV of the CSQ paper, with the cost
of each method), ``comparison.csv`` and ``comparison.json`` in ``workdir``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags

from csq_jax import figures, report, sweep
from csq_jax.methods import registry

_METHODS = flags.DEFINE_list("methods", list(registry.names()), "Methods to run (default: every registered one).")
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


def sweep_runs(methods: Sequence[str], targets: Sequence[float], axes: Sequence[sweep.Axis] = ()) -> list[sweep.Run]:
  """``method`` x ``target_bits`` (x any further ``--sweep`` axes)."""
  return sweep.plan([("method", list(methods)), ("target_bits", [f"{float(t):g}" for t in targets]), *axes])


def plan(methods: Sequence[str], targets: Sequence[float]) -> list[tuple[str, float | None]]:
  """``(method, target)`` pairs; the float baseline runs once, with no target."""
  runs = sweep_runs(methods, targets)
  return [(r.value("method"), None if r.value("target_bits") is None else float(r.value("target_bits")))
          for r in runs]


def rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for s in summaries:
    row = {key: s.get(key) for key, _ in COLUMNS}
    if s["method"] == "fp":
      row["target_bits"] = 32
    out.append(row)
  return out


def markdown(table: Sequence[dict[str, Any]]) -> str:
  return report.markdown_table(table, COLUMNS)


def csv_text(table: Sequence[dict[str, Any]]) -> str:
  return report.csv_table(table, COLUMNS)


def plot(table: Sequence[dict[str, Any]], path: str) -> None:
  """Accuracy against compression, one line per method, the Pareto front drawn."""
  front = report.pareto_front([(r["compression"], r["test_accuracy"]) for r in table])
  figures.plot_accuracy_vs_compression(table, path, front)


def main(argv: Sequence[str]) -> None:
  sweep.exit_on_sigterm()
  common = sweep.split_overrides(argv)
  workdir = sweep.WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  axes = [sweep.parse_axis(a) for a in sweep.SWEEP.value]
  runs = sweep_runs(_METHODS.value, [float(t) for t in _TARGETS.value], axes)
  if sweep.DRY_RUN.value:
    sweep.dry_run(sweep.CONFIG.value, workdir, runs, common, sweep.ON_CHANGED_CONFIG.value, prefix="[compare]")
    return
  outcomes = sweep.execute(sweep.CONFIG.value, workdir, runs, common, sweep.PARALLEL.value, prefix="[compare]",
                           on_changed=sweep.ON_CHANGED_CONFIG.value)
  table = rows([o.summary for o in outcomes if o.summary is not None])
  report.atomic_write_text(os.path.join(workdir, "comparison.md"), markdown(table))
  report.atomic_write_text(os.path.join(workdir, "comparison.csv"), csv_text(table))
  report.atomic_write_text(os.path.join(workdir, "comparison.json"), json.dumps(table, indent=2) + "\n")
  print(markdown(table), end="")
  sweep.finish(workdir, outcomes)  # report.md and its figures, accuracy_vs_compression.png among them


if __name__ == "__main__":
  sweep.run_app(main, __doc__, ("csq_jax.compare", "csq_jax.sweep"))
