"""The report of several runs (csq_jax/report.py, csq_jax/figures.py)."""

import json
import os

import numpy as np
import pytest

from csq_jax import report, train

FIGURES = ("precision_per_layer.png", "precision_during_training.png", "accuracy_vs_compression.png")


def _brute_force_front(points):
  """Non-dominated points by the definition, one pair at a time."""
  keep = []
  for i, (c, a) in enumerate(points):
    if not any(c2 >= c and a2 >= a and (c2 > c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
      keep.append(i)
  return sorted(keep, key=lambda i: (points[i][0], -points[i][1]))


def test_pareto_front_on_hand_made_points():
  points = [(1, 0.99), (8, 0.97), (8, 0.95), (10.7, 0.97), (16, 0.96), (16, 0.96), (32, 0.90), (4, 0.98),
            (2, 0.98)]
  # (8, .97) loses to (10.7, .97), (8, .95) to several, (2, .98) to (4, .98);
  # the two equal (16, .96) points dominate neither each other nor are dominated.
  assert report.pareto_front(points) == [0, 7, 3, 4, 5, 6]
  assert report.pareto_front([]) == []
  assert report.pareto_front([(3.0, 0.5)]) == [0]
  rng = np.random.default_rng(0)
  for _ in range(20):
    pts = [tuple(p) for p in rng.integers(0, 6, (12, 2)).astype(float)]  # many ties
    assert report.pareto_front(pts) == _brute_force_front(pts)


def test_method_ignores_other_methods_sections_and_a_float_model_the_budget():
  """Structural: a field of a section the method does not read (a section
  named after a registered method, or one that ``method_sections`` names)."""
  csq, msq, bsq, fp = ("csq",), ("msq",), ("bsq",), ()
  assert report.method_ignores("target_bits", fp, quantizes=False) and not report.method_ignores("target_bits", csq)
  assert report.method_ignores("csq.reg_strength", msq) and not report.method_ignores("csq.reg_strength", csq)
  assert report.method_ignores("msq.reg_strength", csq) and not report.method_ignores("msq.reg_strength", msq)
  assert report.method_ignores("bsq.alpha", msq) and not report.method_ignores("bsq.alpha", bsq)
  assert not report.method_ignores("num_epochs", csq) and not report.method_ignores("num_epochs", fp, False)
  assert not report.method_ignores("distributed.init", csq)  # a shared section
  assert not report.method_ignores("mine.x", csq) and report.method_ignores("mine.x", csq, True, ("mine",))
  # Old runs: flat knobs renamed, the built-ins' sections known.
  assert report.run_method({"method": "csq_uniform"}) == (("csq",), True)
  assert report.run_method({"method": "fp"}) == ((), False)
  assert report.run_config({"summary": {"config": {"bsq_alpha": 0.2, "seed": 1}}}) == {"bsq.alpha": 0.2, "seed": 1}


def _fake_run(root, name, method, target, acc, bits, reg_strength=0.3, epochs=3, seed=None):
  """A finished run's files, written by hand: eight 100-weight layers."""
  d = root / name
  d.mkdir(parents=True)
  layers = [] if method == "fp" else [{"name": f"conv{i}/kernel", "params": 100, "bits": b} for i, b in enumerate(bits)]
  avg = float(np.mean(bits)) if layers else 32.0
  config = {"method": method, "target_bits": target, "csq": {"reg_strength": reg_strength}, "num_epochs": epochs,
            "progress": False, "rules": [[".*kernel", "quantize"]], **({} if seed is None else {"seed": seed})}
  summary = {"config": config, "method": method, "model": "small_cnn", "dataset": "digits", "target_bits": target,
             "act_bits": 32, "avg_bits": avg, "compression": 32.0 / avg, "test_accuracy": acc, "layers": layers}
  (d / "summary.json").write_text(json.dumps(summary))
  records = [{"epoch": e + 1, "phase": "csq" if e < epochs - 1 else "finetune", "avg_bits": 8.0 - e * (8 - avg) / 2,
              "test_accuracy": acc - 0.1 / (e + 1)} for e in range(epochs)]
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return summary


def _assert_png(path, min_colors=20):
  import matplotlib.image

  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
  assert len(np.unique(rgb, axis=0)) >= min_colors  # text, lines, bars: not a blank canvas
  assert rgb.std() > 10


def test_report_table_order_columns_and_table_v_layout(tmp_path):
  runs = tmp_path / "sweep"
  _fake_run(runs, "csq_t4", "csq", 4.0, 0.97, [4, 4, 4, 4, 4, 4, 4, 4])
  _fake_run(runs, "msq_t2", "msq", 2.0, 0.96, [3, 2, 2, 2, 2, 2, 2, 1])
  _fake_run(runs, "csq_t2", "csq", 2.0, 0.95, [2, 2, 2, 2, 2, 2, 3, 1])
  _fake_run(runs, "fp", "fp", 3.0, 0.99, [])
  _fake_run(runs, "lam/csq_t2_reg_strength0.01", "csq", 2.0, 0.90, [2, 2, 2, 2, 2, 2, 2, 2], reg_strength=0.01)
  path = report.write_report([str(runs)])
  assert path == os.path.join(str(runs), "report.md")
  md = open(path).read()
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  assert lines[0] == ("| run | method | target | W-bits (avg) | A-bits | compression | accuracy | stored bits/w"
                      " | csq.reg_strength | Pareto front |")
  # fp first; then csq by target, lambda 0.01 before 0.3; then msq. reg_strength
  # varies among the CSQ runs; fp and msq ignore it ("-").
  assert lines[1:6] == [
      "| fp | fp | - | 32.000 | 32 | 1.00x | 99.00% | - | - | yes |",
      "| lam/csq_t2_reg_strength0.01 | csq | 2 | 2.000 | 32 | 16.00x | 90.00% | - | 0.01 |  |",
      "| csq_t2 | csq | 2 | 2.000 | 32 | 16.00x | 95.00% | - | 0.3 |  |",
      "| csq_t4 | csq | 4 | 4.000 | 32 | 8.00x | 97.00% | - | 0.3 | yes |",
      "| msq_t2 | msq | 2 | 2.000 | 32 | 16.00x | 96.00% | - | - | yes |",
  ]
  # CSQ has two runs at target 2 (lambdas): no Table V layout for it; MSQ has one run.
  assert "Table V's layout" not in md
  for name in FIGURES:
    assert f"]({name})" in md
    _assert_png(runs / name)
  assert not (runs / "sensitivity.png").exists() and "sensitivity.png" not in md
  csv_lines = (runs / "report.csv").read_text().splitlines()
  assert csv_lines[0].split(",")[:3] == ["run", "method", "target_bits"] and len(csv_lines) == 6

  # Targets only (and FP): Table V's layout, targets as columns, FP last.
  only = tmp_path / "table5"
  for t, acc in ((1, 0.90), (3, 0.95), (2, 0.93)):
    _fake_run(only, f"csq_t{t}", "csq", float(t), acc, [t] * 8)
  _fake_run(only, "fp", "fp", 3.0, 0.99, [])
  md = open(report.write_report([str(only)], str(tmp_path / "out"))).read()
  assert ("| Target | 1-bit | 2-bit | 3-bit | FP |\n|---|---|---|---|---|\n| Avg. prec. | 1.00 | 2.00 | 3.00 | 32 |\n"
          "| Comp (x) | 32.00 | 16.00 | 10.67 | 1.00 |\n| CSQ acc. (%) | 90.00 | 93.00 | 95.00 | 99.00 |") in md
  assert (tmp_path / "out" / "precision_per_layer.png").exists()


def test_runs_differing_only_in_seed_are_one_row_with_mean_and_std(tmp_path):
  """A seed sweep's report: one row per (method, target, other fields) with
  the mean ± population std of accuracy, bits and compression over its seeds,
  then every run."""
  runs = tmp_path / "seeds"
  accs = {0: 0.98, 1: 0.99, 2: 0.96}
  for seed, acc in accs.items():
    _fake_run(runs, f"csq_t2_seed{seed}", "csq", 2.0, acc, [2] * 7 + [2 + seed], seed=seed)
    _fake_run(runs, f"ste_t2_seed{seed}", "ste", 2.0, acc - 0.05, [2] * 8, seed=seed)
  _fake_run(runs, "csq_t3_seed0", "csq", 3.0, 0.97, [3] * 8, seed=0)
  md = open(report.write_report([str(runs)])).read()
  grouped = md.split("Every run:")[0]
  rows = [l for l in grouped.splitlines() if l.startswith("| ")]
  assert rows[0] == ("| run | method | target | W-bits (avg) | A-bits | compression | accuracy | stored bits/w"
                     " | seeds |")
  bits = [2 + s / 8 for s in accs]
  acc = list(accs.values())
  csq_t2 = [r for r in rows if r.startswith("| csq T2 ")]
  assert len(csq_t2) == 1 and len(rows) == 4  # header, ste T2, csq T2, csq T3
  assert csq_t2[0] == (f"| csq T2 | csq | 2 | {np.mean(bits):.3f} ± {np.std(bits):.3f} | 32 |"
                       f" {np.mean([32 / b for b in bits]):.2f}x ± {np.std([32 / b for b in bits]):.2f}x |"
                       f" {100 * np.mean(acc):.2f}% ± {100 * np.std(acc):.2f}% | - | 0, 1, 2 |")
  assert "| csq T3 | csq | 3 | 3.000 ± 0.000 | 32 | 10.67x ± 0.00x | 97.00% ± 0.00% | - | 0 |" in rows
  assert len([l for l in md.split("Every run:")[1].splitlines() if l.startswith("| ") and "_seed" in l]) == 7


def test_report_errors_say_what_to_give(tmp_path):
  with pytest.raises(report.ReportError, match="No summary.json"):
    report.find_runs([str(tmp_path)])
  with pytest.raises(report.ReportError, match="not a directory"):
    report.find_runs([str(tmp_path / "missing")])
  with pytest.raises(SystemExit, match="csq_jax: error: No summary.json"):
    report.main([str(tmp_path)])


@pytest.mark.slow
def test_report_of_two_tiny_runs(tiny_config, tmp_path, capsys):
  """CSQ at target 2 and MSQ (Hessian-aware) at target 4, 2 epochs each."""
  csq = tiny_config.copy_and_resolve_references()
  csq.target_bits = 2.0
  msq = tiny_config.copy_and_resolve_references()
  msq.update(method="msq", target_bits=4.0)
  msq.msq.update(prune_every=1, threshold=0.0, hessian_probes=2, hessian_sketch=2)
  summaries = {name: train.train_and_evaluate(c, str(tmp_path / "runs" / name))
               for name, c in (("csq_t2", csq), ("msq_t4", msq))}
  report.main([str(tmp_path / "runs"), f"--out={tmp_path / 'report'}"])
  printed = capsys.readouterr().out
  md = (tmp_path / "report" / "report.md").read_text()
  for name, s in summaries.items():
    row = (f"| {name} | {s['method']} | {s['target_bits']:g} | {s['avg_bits']:.3f} | 32 | {s['compression']:.2f}x"
           f" | {100 * s['test_accuracy']:.2f}% |")
    assert row in md and row in printed
    assert s["config"]["target_bits"] == s["target_bits"]  # the config travels in summary.json
  for name in FIGURES + ("sensitivity.png",):
    _assert_png(tmp_path / "report" / name)
  # MSQ's Omega_l reached metrics.jsonl: one positive number per counted layer.
  run = report.load_run(str(tmp_path / "runs" / "msq_t4"))
  assert set(run["sensitivity"]) == {l["name"] for l in summaries["msq_t4"]["layers"]}
  assert all(np.isfinite(v) for v in run["sensitivity"].values()) and run["sensitivity_epoch"] == 2


def test_a_budget_in_macs_gets_a_column_in_its_own_unit(tmp_path):
  runs = tmp_path / "runs"
  _fake_run(runs, "csq_params", "csq", 3.0, 0.95, [3] * 8)
  _fake_run(runs, "csq_macs", "csq", 3.0, 0.96, [3] * 8)
  path = runs / "csq_macs" / "summary.json"
  s = json.loads(path.read_text())
  s["budget"] = {"kind": "macs", "target_bits": 3.0, "achieved_bits": 2.883, "target_gbops": 0.1504,
                 "achieved_gbops": 0.1446}
  path.write_text(json.dumps(s))
  md = open(report.write_report([str(runs)])).read()
  assert "| budget (achieved / target) |" in md
  assert "| macs: 0.1446 / 0.1504 GBOPs (2.883 / 3 bits) |" in md
