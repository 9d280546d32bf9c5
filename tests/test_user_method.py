"""A method defined outside the package (``examples/dorefa_method.py``, the
example of ``docs/adding_a_method.md``) runs through the same sweep, loop,
report and export as the built-in ones, by its ``module:Class`` name."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

USER_METHOD = "dorefa_method:DoReFa"


@pytest.mark.slow
def test_a_method_outside_the_package_runs_through_sweep_report_and_export(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "examples"), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, "-m", "csq_jax.sweep", "--config=configs/default.py", f"--workdir={tmp_path}",
         f"--sweep=method=ste,{USER_METHOD}", "--sweep=dorefa.hold_max=true,false", "--parallel=2",
         "--config.num_epochs=2", "--config.finetune_epochs=0", "--config.target_bits=2", "--config.tensorboard=False"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  # ste ignores DoReFa's section: it runs once; DoReFa once per value.
  runs = sorted(p.parent.name for p in tmp_path.glob("*/summary.json"))
  assert runs == ["dorefa_method-DoReFa_dorefa.hold_maxfalse", "dorefa_method-DoReFa_dorefa.hold_maxtrue", "ste"]
  for name in runs:
    s = json.loads((tmp_path / name / "summary.json").read_text())
    assert s["exactly_quantized"] and s["avg_bits"] == 2.0 and s["test_accuracy"] > 0.5
    if name != "ste":
      assert s["method"] == USER_METHOD and s["method_sections"] == ["dorefa"]
      assert s["config"]["dorefa"]["hold_max"] == name.endswith("true")
  md = (tmp_path / "report.md").read_text()
  assert md.count(f"| {USER_METHOD} |") == 2 and "dorefa.hold_max" in md
  # The exact export and ONNX Runtime read it like any other run.
  run = tmp_path / runs[1]
  out = subprocess.run([sys.executable, "-m", "csq_jax.export", f"--workdir={run}", "--format=onnx"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (run / "model.onnx").stat().st_size > 0
  from csq_jax import export

  q = export.load_integers(str(run / "model.csqx"))
  assert q and all(np.abs(v).max() <= 3 and np.all(v % 2 == 1) for v in q.values())  # DoReFa's odd integers, 2 bits
