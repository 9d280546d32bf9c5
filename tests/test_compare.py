"""The comparison command (csq_jax/compare.py)."""

import json
import subprocess
import sys

import pytest
from absl import app

from conftest import ROOT
from csq_jax import compare


def _summary(method, target, acc, bits):
  return {"method": method, "target_bits": target, "avg_bits": bits, "compression": 32 / bits,
          "test_accuracy": acc, "trainable_params": 100, "epoch_time_s": 0.5, "peak_rss_mib": 700.0}


def test_plan_runs_fp_once_and_rejects_unknown_methods():
  assert compare.plan(["fp", "msq"], [2.0, 3.0]) == [("fp", None), ("msq", 2.0), ("msq", 3.0)]
  with pytest.raises(app.UsageError, match="Unknown method"):
    compare.plan(["hawq"], [2.0])


def test_table_markdown_csv_and_plot(tmp_path):
  table = compare.rows([_summary("fp", 3.0, 0.99, 32.0), _summary("csq", 2.0, 0.95, 2.0),
                        _summary("csq", 3.0, 0.97, 3.0)])
  assert table[0]["target_bits"] == 32
  md = compare.markdown(table).splitlines()
  assert md[0].startswith("| method | target | avg bits | compression | accuracy | trainable params")
  assert md[3] == "| csq | 2 | 2.000 | 16.00x | 95.00% | 100 | 0.500 | 700 | - |"
  assert compare.csv_text(table).splitlines()[0].split(",")[:3] == ["method", "target_bits", "avg_bits"]
  compare.plot(table, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.extended  # test_sweep's end-to-end test runs the same sweep code
def test_compare_command_runs_methods_and_reuses_finished_runs(tmp_path):
  cmd = [sys.executable, "-m", "csq_jax.compare", "--config=configs/default.py", f"--workdir={tmp_path}",
         "--methods=ste,msq", "--targets=4", "--config.num_epochs=1", "--config.finetune_epochs=0",
         "--config.progress=False", "--config.tensorboard=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "comparison.json").read_text())
  assert [(r["method"], r["target_bits"]) for r in rows] == [("ste", 4.0), ("msq", 4.0)]
  assert rows[0]["avg_bits"] == 4.0 and rows[0]["trainable_params"] == rows[1]["trainable_params"]
  assert (tmp_path / "accuracy_vs_compression.png").exists()
  assert "| ste | 4 | 4.000 | 8.00x |" in out.stdout
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "[compare]" not in again.stdout  # nothing retrained


def test_compare_help_lists_every_flag_and_exits_0():
  out = subprocess.run([sys.executable, "-m", "csq_jax.compare", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  for flag in ("--workdir:", "--config:", "--parallel:", "--methods:", "--targets:", "--sweep:", "--[no]dry_run:",
               "--on_changed_config:", "--config.<field>=value"):
    assert flag in out.stdout, flag
