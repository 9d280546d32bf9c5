"""The README's library API example runs as written."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_library_api_example_runs_and_reaches_its_budget(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("## Library API"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  script = tmp_path / "example.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  precisions, avg = lines[1].rsplit(" ", 1)
  assert precisions == "{'fc1/kernel': 3}" and float(avg) == 3.0  # the 3-bit target of the example
  assert "fc1/kernel" in lines[2] and "head/kernel" in lines[2]


def _readme_commands():
  """Every ``python -m csq_jax.*`` command of the README, as written: the
  bash blocks' lines (continuations joined, ``&&`` chains split, the command
  after a launcher's ``--``, the TPU and SLURM launchers' csq_jax.main
  arguments) and the inline ones with flags. Usage synopses
  with ``[optional ...]`` parts are left out."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  lines = []
  for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
    lines += block.replace("\\\n", " ").splitlines()
  lines += [c for c in re.findall(r"`(python -m csq_jax\.[^`]*)`", readme) if " --" in c]
  commands = []
  for line in lines:
    for part in line.split("&&"):
      part = " ".join(part.split())
      if " -- python -m csq_jax." in part:
        part = part.split(" -- ", 1)[1]
      elif part.startswith("launch/tpu_pod.sh"):  # its arguments after -- go to csq_jax.main
        part = "python -m csq_jax.main " + part.split(" -- ", 1)[1]
      elif "launch/slurm.sbatch " in part:
        part = "python -m csq_jax.main " + part.split("launch/slurm.sbatch ", 1)[1]
      if part.startswith("python -m csq_jax.") and "[" not in part:
        commands.append(part)
  return list(dict.fromkeys(commands))


def _as_written(command, tmp_path):
  """``command``'s arguments with ``$HOME`` and the ``runs/`` outputs moved under ``tmp_path``."""
  args = command.replace("$HOME", str(tmp_path / "home")).split()[1:]
  return [sys.executable] + [re.sub(r"^(--(?:workdir|export)=)runs/", rf"\g<1>{tmp_path}/runs/", a) for a in args]


def test_readme_commands_parse_and_their_configs_validate(tmp_path):
  """Each training, sweep and comparison command of the README, as written,
  with --dry_run: its flags parse, its config (and every run's) validates."""
  commands = [c for c in _readme_commands() if c.split()[2] in ("csq_jax.main", "csq_jax.sweep", "csq_jax.compare")]
  modules = {c.split()[2] for c in commands}
  assert modules == {"csq_jax.main", "csq_jax.sweep", "csq_jax.compare"}, commands
  assert len(commands) >= 8, commands
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for command in commands:
    out = subprocess.run(_as_written(command, tmp_path) + ["--dry_run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"


def test_readme_quickstart_and_evaluate_run_as_written(tmp_path):
  """The quickstart's training command (one epoch) and the evaluation of its
  export, as the README writes them."""
  commands = _readme_commands()
  train_cmd = next(c for c in commands if "--workdir=runs/default" in c)
  evaluate_cmd = next(c for c in commands if c.startswith("python -m csq_jax.evaluate"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  quick = ["--config.num_epochs=1", "--config.finetune_epochs=0", "--config.bn_recalibration_epochs=0",
           "--config.progress=False", "--config.tensorboard=False"]
  out = subprocess.run(_as_written(train_cmd, tmp_path) + quick, cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("csq_jax: csq on digits (small_cnn, 1437 training images)")
  out = subprocess.run(_as_written(evaluate_cmd, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]


def test_every_config_takes_the_tN_and_method_arguments():
  """The README: every config takes the tN (target bits) argument."""
  from csq_jax import configlib

  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py"):
      path = os.path.join(ROOT, "configs", name)
      assert configlib.load(path, "t2").target_bits == 2.0, name
      assert configlib.load(path, "ste,t4").method == "ste", name
