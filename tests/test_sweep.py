"""The sweep command (csq_jax/sweep.py): axes, plan, command lines, and two
tiny runs end to end (one of them failing)."""

import json
import subprocess
import sys

import pytest
from absl import app

from conftest import ROOT, load_config
from csq_jax import sweep


def test_parse_axis():
  assert sweep.parse_axis("target_bits=1,2, 3,2") == ("target_bits", ["1", "2", "3"])
  assert sweep.parse_axis("method=csq") == ("method", ["csq"])
  for bad in ("target_bits", "target_bits=", "=1,2", "a b=1"):
    with pytest.raises(app.UsageError, match="FIELD=V1,V2"):
      sweep.parse_axis(bad)


def test_plan_is_the_product_without_runs_that_differ_in_ignored_fields():
  runs = sweep.plan([("method", ["fp", "csq", "msq"]), ("target_bits", ["2", "3.0"]),
                     ("msq.reg_strength", ["0.01", "0.1"])])
  assert [r.name for r in runs] == [
      "fp",  # once: FP ignores the target and MSQ's lambda
      "csq_t2", "csq_t3",  # CSQ ignores MSQ's section
      "msq_t2_msq.reg_strength0.01", "msq_t2_msq.reg_strength0.1", "msq_t3_msq.reg_strength0.01",
      "msq_t3_msq.reg_strength0.1",
  ]
  assert runs[0].overrides == (("method", "fp"),)
  assert runs[2].overrides == (("method", "csq"), ("target_bits", "3.0"))
  assert runs[4].overrides == (("method", "msq"), ("target_bits", "2"), ("msq.reg_strength", "0.1"))
  assert [r.name for r in sweep.plan([("csq.reg_strength", ["0.01", "1"])])] == ["csq.reg_strength0.01",
                                                                                  "csq.reg_strength1"]
  assert [r.name for r in sweep.plan([])] == ["run"]
  with pytest.raises(app.UsageError, match="Unknown method 'hawq'"):
    sweep.plan([("method", ["csq", "hawq"])])
  with pytest.raises(app.UsageError, match="swept twice"):
    sweep.plan([("target_bits", ["2"]), ("target_bits", ["3"])])


def test_command_and_field_checks():
  run = sweep.plan([("target_bits", ["2"])])[0]
  cmd = sweep.command("configs/default.py", "runs/x/t2", run, ["--config.num_epochs=1"])
  assert cmd[1:] == ["-m", "csq_jax.main", "--config=configs/default.py", "--workdir=runs/x/t2",
                     "--config.progress=False", "--config.target_bits=2", "--config.num_epochs=1"]
  config = load_config("default")
  sweep.check_fields(config, ["target_bits", "method"])
  with pytest.raises(app.UsageError, match="no field 'targt_bits'"):
    sweep.check_fields(config, ["targt_bits"])
  with pytest.raises(app.UsageError, match="only --config"):
    sweep.split_overrides(["prog", "--config.num_epochs=1", "extra"])


@pytest.mark.slow
def test_sweep_trains_reports_keeps_going_after_a_failure_and_reuses(tmp_path):
  # Target 9 is impossible with 8 bit planes: that run fails at once.
  cmd = [sys.executable, "-m", "csq_jax.sweep", "--config=configs/default.py", f"--workdir={tmp_path}",
         "--sweep=target_bits=3,9", "--parallel=2", "--config.num_epochs=1", "--config.finetune_epochs=0",
         "--config.tensorboard=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "1 of 2 runs failed: t9 (exit code 1" in out.stderr
  assert "[sweep] t3: done" in out.stdout and "[sweep] t9: FAILED" in out.stdout
  assert "target_bits=9.0 is impossible" in (tmp_path / "t9" / "train.log").read_text()
  s = json.loads((tmp_path / "t3" / "summary.json").read_text())
  assert s["config"]["num_epochs"] == 1 and s["target_bits"] == 3.0
  md = (tmp_path / "report.md").read_text()
  assert (f"| t3 | csq | 3 | {s['avg_bits']:.3f} | 32 | {s['compression']:.2f}x | {100 * s['test_accuracy']:.2f}%"
          f" | {s['export_bits_per_weight']:.3f} | yes |") in md
  assert "## Failed runs\n\n- `t9`: exit code 1" in md
  assert (tmp_path / "precision_per_layer.png").stat().st_size > 10_000
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert "[sweep] t3:" not in again.stdout and "0 trained, 1 reused, 1 failed." in again.stdout


def _fake_finished_run(run_dir, config):
  """A finished run's summary.json, as training writes it, for ``config``."""
  run_dir.mkdir(parents=True)
  (run_dir / "summary.json").write_text(json.dumps({"method": config.method,
                                                    "config": json.loads(config.to_json_best_effort())}))


def test_finished_runs_are_reused_only_with_the_requested_config(tmp_path):
  """A 6-epoch run is not reused for a 150-epoch request: the sweep refuses
  before training anything, naming the run and the differing fields, or
  trains into t3.2 when asked; a later sweep reuses the run of its config."""
  config = "configs/default.py"
  (run,) = sweep.plan([("target_bits", ["3"])])
  six = sweep.requested_config(f"{ROOT}/{config}", run, ["--config.num_epochs=6"])
  _fake_finished_run(tmp_path / "t3", six)
  same = sweep.place_runs(f"{ROOT}/{config}", str(tmp_path), [run], ["--config.num_epochs=6",
                                                                      "--config.progress=True"])
  assert same == [str(tmp_path / "t3")]  # bookkeeping fields do not matter
  with pytest.raises(app.UsageError, match=r"t3 was trained with another config: num_epochs: 6 \(stored\) vs 150"
                                           r" \(now\).*--on_changed_config=new_dir"):
    sweep.place_runs(f"{ROOT}/{config}", str(tmp_path), [run], [])
  assert sweep.place_runs(f"{ROOT}/{config}", str(tmp_path), [run], [], "new_dir") == [str(tmp_path / "t3.2")]
  _fake_finished_run(tmp_path / "t3.2", sweep.requested_config(f"{ROOT}/{config}", run, []))
  assert sweep.place_runs(f"{ROOT}/{config}", str(tmp_path), [run], []) == [str(tmp_path / "t3.2")]
  with pytest.raises(app.UsageError, match="no field 'num_epoch'"):
    sweep.place_runs(f"{ROOT}/{config}", str(tmp_path), [run], ["--config.num_epoch=6"])


def test_sweep_command_refuses_a_finished_run_of_another_config(tmp_path):
  (run,) = sweep.plan([("target_bits", ["3"])])
  _fake_finished_run(tmp_path / "t3", sweep.requested_config(f"{ROOT}/configs/default.py", run,
                                                             ["--config.num_epochs=6"]))
  cmd = [sys.executable, "-m", "csq_jax.sweep", "--config=configs/default.py", f"--workdir={tmp_path}",
         "--sweep=target_bits=3"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "num_epochs: 6 (stored) vs 150 (now)" in out.stderr
  assert not (tmp_path / "t3" / "train.log").exists()  # nothing trained


def test_plan_drops_another_methods_section_so_no_run_repeats():
  """The cases of the architecture issue: a field of CSQ's section swept
  next to BSQ runs BSQ once, without the field (it used to run BSQ twice, or
  fail BSQ's validation with csq_rounds)."""
  runs = sweep.plan([("method", ["csq", "bsq"]), ("csq.min_layer_bits", ["0", "1"])])
  assert [r.name for r in runs] == ["csq_csq.min_layer_bits0", "csq_csq.min_layer_bits1", "bsq"]
  runs = sweep.plan([("method", ["csq", "bsq"]), ("csq.rounds", ["1", "4"])])
  assert [r.overrides for r in runs] == [(("method", "csq"), ("csq.rounds", "1")),
                                         (("method", "csq"), ("csq.rounds", "4")), (("method", "bsq"),)]
  # csq_uniform reads CSQ's section (its init); a user method's own section is its own.
  runs = sweep.plan([("method", ["csq_uniform", "msq"]), ("csq.logit_init", ["1", "2"])])
  assert [r.name for r in runs] == ["csq_uniform_csq.logit_init1", "csq_uniform_csq.logit_init2", "msq"]
