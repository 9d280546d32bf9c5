"""Tests of csq_jax/distributed.py and launch/local.py, and a 2-process CPU
run through the local launcher (tests/distributed_worker.py) against one
process."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, load_config
from csq_jax import distributed

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def _local_launcher():
  spec = importlib.util.spec_from_file_location("launch_local", os.path.join(ROOT, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local = _local_launcher()
ENV = {"CSQ_COORDINATOR": "10.0.0.1:1234", "CSQ_NUM_PROCESSES": "4", "CSQ_PROCESS_ID": "2"}


# ----------------------------------------------------------------------------
# When jax.distributed.initialize is called, and with what


def test_single_process_unless_asked():
  c = load_config("default")
  assert distributed.init_kwargs(c, {}) is None
  assert distributed.init_kwargs(c, {"SLURM_NTASKS": "8"}) is None  # SLURM needs init="auto"
  c.distributed.init = "off"
  assert distributed.init_kwargs(c, ENV) is None


def test_launcher_environment_and_config_set_the_processes():
  c = load_config("default")
  assert distributed.init_kwargs(c, ENV) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
  c.distributed.process_id = 0  # the config wins, and 0 is a process id, not "unset"
  c.distributed.coordinator = "head:99"
  assert distributed.init_kwargs(c, ENV) == dict(coordinator_address="head:99", num_processes=4, process_id=0)


def test_auto_and_jax_environment_leave_the_rest_to_jax():
  c = load_config("default")
  assert distributed.init_kwargs(c, {"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
  c.distributed.init = "auto"
  assert distributed.init_kwargs(c, {}) == {}
  assert distributed.init_kwargs(c, {"CSQ_NUM_PROCESSES": "2"}) == {"num_processes": 2}


@pytest.mark.parametrize("env,message", [
    ({"CSQ_COORDINATOR": "h:1"}, "CSQ_NUM_PROCESSES and CSQ_PROCESS_ID"),
    ({"CSQ_COORDINATOR": "h:1", "CSQ_NUM_PROCESSES": "2", "CSQ_PROCESS_ID": "2"}, r"not in \[0, 2\)"),
    ({"CSQ_COORDINATOR": "h:1", "CSQ_NUM_PROCESSES": "two", "CSQ_PROCESS_ID": "0"}, "not an integer"),
])
def test_inconsistent_settings_raise_clear_errors(env, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.init_kwargs(load_config("default"), env)


def test_single_process_maybe_initialize_is_a_no_op():
  assert distributed.maybe_initialize(load_config("default"), {}) is False
  assert distributed.is_chief()


# ----------------------------------------------------------------------------
# launch/local.py


def test_local_launcher_environment():
  env = local.process_env(1, 3, 555, cpu_devices=4, gpu_each=True,
                          base={"XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=8"})
  assert (env["CSQ_COORDINATOR"], env["CSQ_NUM_PROCESSES"], env["CSQ_PROCESS_ID"]) == ("localhost:555", "3", "1")
  assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_LOCAL_DEVICE_IDS"] == "1"


def test_local_launcher_prefixes_output_and_propagates_a_failure():
  """Process 1 fails at once while process 0 would sleep for a minute: the
  launcher stops process 0 and returns process 1's status, quickly."""
  code = ("import os, sys, time; i = int(os.environ['CSQ_PROCESS_ID']);"
          " print('hello from', i, 'of', os.environ['CSQ_NUM_PROCESSES']);"
          " time.sleep(0.5 if i else 60); sys.exit(3 if i else 0)")
  out = io.StringIO()
  t0 = time.monotonic()
  assert local.run([sys.executable, "-c", code], 2, out=out) == 3
  assert time.monotonic() - t0 < 30
  lines = out.getvalue().splitlines()
  assert "[p0] hello from 0 of 2" in lines and "[p1] hello from 1 of 2" in lines
  ok = "import os; print('ok', os.environ['CSQ_PROCESS_ID'])"
  out = io.StringIO()
  assert local.run([sys.executable, "-c", ok], 3, out=out) == 0
  assert sorted(out.getvalue().splitlines()) == ["[p0] ok 0", "[p1] ok 1", "[p2] ok 2"]


# ----------------------------------------------------------------------------
# Two CPU processes through the launcher


def _digests(stdout: str) -> dict[int, dict]:
  found = [json.loads(line.split("DIGEST ", 1)[1]) for line in stdout.splitlines() if "DIGEST " in line]
  return {d["process"]: d for d in found}


@pytest.mark.slow
def test_two_processes_train_one_model_as_one_process_does(tmp_path):
  """One epoch of the tiny default job as 2 CPU processes (1 device each,
  gradients all-reduced over gloo, each feeding its half of every batch)
  through launch/local.py: both processes end with the same model, and it is
  the model a single process trains (so each fed the right rows); only
  process 0 wrote metrics."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--",
         sys.executable, WORKER, str(tmp_path / "two"), "1"]
  two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  one = subprocess.run([sys.executable, WORKER, str(tmp_path / "one"), "1"], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
  assert one.returncode == 0, one.stderr[-3000:]
  d = _digests(two.stdout)
  ref = _digests(one.stdout)[0]
  assert sorted(d) == [0, 1] and ref["processes"] == 1
  assert all(x["multi"] and x["processes"] == 2 and x["devices"] == 2 for x in d.values())
  assert d[0] == {**d[1], "process": 0}  # the processes agree exactly
  for key in ("param_sums", "param_abs_sums"):
    np.testing.assert_allclose(d[0][key], ref[key], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d[0]["test_loss"], ref["test_loss"], rtol=1e-5)
  assert d[0]["avg_bits"] == ref["avg_bits"]
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    assert [json.loads(l)["epoch"] for l in f] == [1]  # written once, by process 0
  assert (tmp_path / "two" / "summary.json").stat().st_size > 0
