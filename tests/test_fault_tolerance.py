"""Fault tolerance: preemption mid-epoch, SIGTERM, periodic checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config, restore_final_state
from csq_jax import checkpoint, data, train


def _assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _steps_per_epoch(config):
  return data.steps_per_epoch(data.load_dataset(config), config.batch_size)


def test_preemption_mid_epoch_saves_that_step_and_resumes_bit_identically(tiny_config, tmp_path, monkeypatch):
  tiny_config.num_epochs = 2
  tiny_config.finetune_epochs = 1
  full = train.train_and_evaluate(tiny_config, str(tmp_path / "full"))

  spe = _steps_per_epoch(tiny_config)
  stop_at = 2 * spe + 3  # three steps into the finetune epoch
  real = train.PreemptionGuard.should_stop
  monkeypatch.setattr(train.PreemptionGuard, "should_stop", lambda self, mngr, step: step == stop_at)
  with pytest.raises(train.Preempted, match=f"step {stop_at} "):
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  assert checkpoint.manager(str(tmp_path / "resumed")).latest_step() == stop_at
  assert not (tmp_path / "resumed" / "summary.json").exists()

  monkeypatch.setattr(train.PreemptionGuard, "should_stop", real)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  assert resumed["test_accuracy"] == full["test_accuracy"]
  _assert_bitwise_equal(restore_final_state(tiny_config, tmp_path / "full"),
                        restore_final_state(tiny_config, tmp_path / "resumed"))
  # The resumed epoch's train averages cover the steps before the preemption
  # too (their running sums are carried in the checkpoint).
  full_records, resumed_records = (
      [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "resumed"))
  assert [r["epoch"] for r in resumed_records] == [1, 2, 3]
  for f, r in zip(full_records, resumed_records):
    assert {k: v for k, v in f.items() if k.startswith("train_")} == {k: v for k, v in r.items() if k.startswith("train_")}


def test_periodic_checkpoints_are_numbered_by_global_step(tiny_config, tmp_path):
  tiny_config.num_epochs = 1
  tiny_config.keep_checkpoints = 10
  spe = _steps_per_epoch(tiny_config)
  tiny_config.checkpoint_every_steps = 5
  train.train_and_evaluate(tiny_config, str(tmp_path))
  steps = checkpoint.manager(str(tmp_path)).all_steps()
  assert steps == sorted(set(range(5, spe, 5)) | {spe})


def test_checkpoint_every_epochs_saves_every_nth_epoch_and_each_phase_end(tiny_config, tmp_path):
  """``checkpoint_every_epochs=4`` on 3 search + 3 finetune epochs: saves
  after epochs 3 (the search's last), 4 and 6 (the run's last), not 1, 2, 5."""
  tiny_config.num_epochs, tiny_config.finetune_epochs = 3, 3
  tiny_config.keep_checkpoints = 10
  tiny_config.checkpoint_every_epochs = 4
  spe = _steps_per_epoch(tiny_config)
  train.train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpoint.manager(str(tmp_path)).all_steps() == [3 * spe, 4 * spe, 6 * spe]


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "csq_jax.main", f"--config={ROOT}/configs/default.py", f"--workdir={workdir}",
          "--config.finetune_epochs=0", "--config.progress=False", "--config.tensorboard=False",
          "--config.eval_soft=False", *overrides]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_rerun_matches(tmp_path):
  """A real SIGTERM to the CLI: status 143, one line naming the saved step,
  and the rerun ends with the same parameters as an uninterrupted run."""
  epochs = "--config.num_epochs=6"  # the same in the config below
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  uninterrupted = subprocess.run(_cli(tmp_path / "full", epochs), env=env, capture_output=True, text=True,
                                 timeout=600)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

  proc = subprocess.Popen(_cli(tmp_path / "run", epochs), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.05)  # first epoch done: the step is compiled and training
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "Traceback" not in err
  step = int(re.search(r"Preempted \(SIGTERM\) at step (\d+)", err).group(1))
  assert checkpoint.manager(str(tmp_path / "run")).latest_step() == step
  assert not (tmp_path / "run" / "summary.json").exists()

  rerun = subprocess.run(_cli(tmp_path / "run", epochs), env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  config = load_config("default")
  config.num_epochs, config.finetune_epochs = 6, 0
  _assert_bitwise_equal(restore_final_state(config, tmp_path / "full"), restore_final_state(config, tmp_path / "run"))



def _garble_largest_state_file(step_dir):
  """Change 64 bytes in the middle of the checkpoint's largest array file
  (same size): orbax restores such a file without error, with other values."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0x55 for b in chunk))
  assert os.path.getsize(path) == size


def test_garbled_checkpoint_of_unchanged_size_is_refused_and_nothing_is_overwritten(tiny_config, tmp_path):
  """A checkpoint whose bytes changed (size unchanged) fails its checksum:
  one line naming the step and what to do, and summary.json, model.csqx and
  metrics.jsonl are kept. With checkpoint_fallback it is set aside and the
  run resumes from the previous step, to the same result."""
  full = train.train_and_evaluate(tiny_config, str(tmp_path))  # 2 epochs: 2 checkpoints
  outputs = {n: (tmp_path / n).read_bytes() for n in ("summary.json", "model.csqx", "metrics.jsonl")}
  last = checkpoint.manager(str(tmp_path)).latest_step()
  _garble_largest_state_file(tmp_path / "checkpoints" / str(last))
  with pytest.raises(checkpoint.CheckpointError, match=rf"Checkpoint {last} in .* is corrupt: 1 file\(s\) differ"
                                                      r".*--config.checkpoint_fallback=True") as e:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert "\n" not in str(e.value)
  for name, content in outputs.items():
    assert (tmp_path / name).read_bytes() == content, name

  tiny_config.checkpoint_fallback = True
  again = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert again["test_accuracy"] == full["test_accuracy"] and again["avg_bits"] == full["avg_bits"]
  assert (tmp_path / "corrupt_checkpoints" / str(last)).is_dir()
  assert checkpoint.manager(str(tmp_path)).latest_step() == last
