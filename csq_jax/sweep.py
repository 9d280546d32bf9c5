r"""Run one config over a grid of config values, then report them all.

  python -m csq_jax.sweep --config=configs/default.py --workdir=runs/table5 \
      --sweep=target_bits=1,2,3,4,5

Each ``--sweep=FIELD=V1,V2,...`` is an axis; several axes run their product
(``--sweep=method=fp,csq,msq --sweep=target_bits=2,3``; a combination that
differs only in a field its method ignores runs once, so FP runs once). Every
run is ``python -m csq_jax.main`` in its own process (its own peak memory), in
``workdir/<name>`` (``csq_t2``, ``fp``, ``reg_strength0.01``: the values of
the axes), its output in ``train.log`` there. ``--parallel=N`` runs N at a
time (default 1: one after the other). A run whose ``summary.json`` exists is
not repeated when its stored config equals the one requested now (every field
that changes the result); one finished with another config is refused before
anything trains, listing the differing fields, or, with
``--on_changed_config=new_dir``, trained again in ``<name>.2`` (``.3``, ...).
An interrupted run resumes from its checkpoint; a failed run is reported and
the others go on. Any ``--config.<field>=value`` given here is
passed to every run. At the end, ``report.md`` and its figures
(``csq_jax.report``) are written in ``workdir`` for this sweep's runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from csq_jax import checkpoint, cli, methods, report

CONFIG = flags.DEFINE_string("config", "configs/default.py", "Config file (as for csq_jax.main).")
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the report.", required=True)
SWEEP = flags.DEFINE_multi_string("sweep", [], "An axis FIELD=V1,V2,...; several axes run their product.")
PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time, each its own process.", lower_bound=1)
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the flags and every run's config, print each run's"
                            " directory and whether it is reused or trained, and exit without training.")
ON_CHANGED_CONFIG = flags.DEFINE_enum(
    "on_changed_config", "refuse", ["refuse", "new_dir"],
    "A run directory that holds a finished run of another config: refuse (list the differing fields, train"
    " nothing) or new_dir (train this config in <name>.2, .3, ...; a later sweep reuses it).")

Axis = tuple[str, list[str]]


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its directory name and its config overrides."""

  name: str
  overrides: tuple[tuple[str, str], ...]  # (field, value), in axis order

  def value(self, field: str) -> str | None:
    return dict(self.overrides).get(field)


@dataclasses.dataclass
class Outcome:
  run: Run
  workdir: str
  summary: dict[str, Any] | None = None  # None when it failed
  error: str | None = None
  trained: bool = False  # False: an earlier summary was reused


def parse_axis(spec: str) -> Axis:
  """``"target_bits=1,2,3"`` -> ``("target_bits", ["1", "2", "3"])``."""
  field, sep, values = spec.partition("=")
  items = [v.strip() for v in values.split(",") if v.strip()]
  if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", field.strip()) or not items:
    raise app.UsageError(f"--sweep={spec!r}: write FIELD=V1,V2,... (e.g. --sweep=target_bits=2,3,4).")
  return field.strip(), list(dict.fromkeys(items))


def _fmt(value: str) -> str:
  try:
    return f"{float(value):g}"
  except ValueError:
    return value


def run_name(overrides: Sequence[tuple[str, str]]) -> str:
  """Directory name of a run: the method, ``t<target>``, ``<field><value>``
  for other fields, joined by ``_`` (``csq_t2``, ``msq_t3_msq_lambda0.1``)."""
  parts = []
  for field, value in overrides:
    if field == "method":
      parts.append(value)
    elif field == "target_bits":
      parts.append(f"t{_fmt(value)}")
    else:
      parts.append(f"{field}{_fmt(value)}")
  return re.sub(r"[^\w.+-]", "-", "_".join(parts)) or "run"


def plan(axes: Sequence[Axis]) -> list[Run]:
  """The product of the axes, the first axis varying slowest. Fields a run's
  method ignores (``report.method_ignores``: FP's target, another method's
  knobs) are dropped and the duplicates this leaves run once."""
  classes = {}
  for field, values in axes:
    if field == "method":
      for m in values:
        try:
          classes[m] = methods.resolve(m)
        except methods.UnknownMethodError as e:
          raise app.UsageError(str(e)) from None
  owned = sorted({x for cls in classes.values() for x in cls.sections()})
  fields = [f for f, _ in axes]
  if len(set(fields)) < len(fields):
    raise app.UsageError(f"A field is swept twice in {fields}: give each field one --sweep.")
  runs = {}
  for combo in itertools.product(*[values for _, values in axes]):
    overrides = tuple(zip(fields, combo))
    method = dict(overrides).get("method")
    if method is not None:
      cls = classes[method]
      overrides = tuple((f, v) for f, v in overrides
                        if not report.method_ignores(f, cls.sections(), cls.quantizes, owned))
    run = Run(run_name(overrides), overrides)
    runs.setdefault(run.name, run)
  return list(runs.values())


def load_config(spec: str):
  """``get_config()`` of a config file given as for ``--config`` (``PATH[:ARG]``)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise app.UsageError(f"No config file {path!r}; give --config=configs/<name>.py.")
  module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_fields(config, fields: Sequence[str]) -> None:
  """A one-line error for a swept field the config does not have."""
  for field in fields:
    node = config
    for part in field.split("."):
      if part not in node:
        raise app.UsageError(f"--sweep: the config has no field {field!r} (fields: {', '.join(sorted(config))}).")
      node = node[part]


def run_config_spec(config: str, run: Run) -> str:
  """``config`` (``PATH[:ARG]``) for ``run``: a user's ``module:Class`` method
  goes into the config argument, so that its config section exists before
  the ``--config.<section>.*`` overrides are applied."""
  method = run.value("method")
  if method is None or ":" not in method:
    return config
  path, colon, arg = config.partition(":")
  return f"{path}:{arg + ',' if arg else ''}{method}"


def command(config: str, workdir: str, run: Run, common: Sequence[str]) -> list[str]:
  """The run's ``csq_jax.main`` command line (progress bars off in the log
  unless ``common`` turns them on)."""
  return [sys.executable, "-m", "csq_jax.main", f"--config={run_config_spec(config, run)}", f"--workdir={workdir}",
          "--config.progress=False", *(f"--config.{f}={v}" for f, v in run.overrides), *common]


def requested_config(config: str, run: Run, common: Sequence[str] = ()):
  """The config ``run`` trains with: the file ``config`` (``PATH[:ARG]``)
  with the run's and the ``common`` overrides, parsed as ``csq_jax.main``
  parses them (``config_flags``)."""
  argv = ["sweep", f"--config={run_config_spec(config, run)}", *(f"--config.{f}={v}" for f, v in run.overrides),
          *common]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def stored_config_differences(run_dir: str, wanted) -> list[str] | None:
  """``[description of the differing fields]`` where the finished run in
  ``run_dir`` differs from the config ``wanted``, ``[]`` for the same run,
  None if none finished there."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f).get("config")
  if not stored:
    return ["its summary.json records no config (written by an older version)"]
  current = checkpoint.config_fields(wanted)
  diff = checkpoint.config_differences(stored, current, wanted.method)
  return [checkpoint.describe_differences(stored, current, diff)] if diff else []


def place_runs(config: str, workdir: str, runs: Sequence[Run], common: Sequence[str] = (),
               on_changed: str = "refuse") -> list[str]:
  """The directory of each run: the first of ``workdir/<name>``,
  ``<name>.2``, ``<name>.3``, ... that is empty, unfinished or a finished run
  of this very config (reused). Where every existing one finished with another
  config, a new ``<name>.N`` with ``on_changed="new_dir"``; else the sweep is
  refused (``app.UsageError`` listing every such run and its differing
  fields) before anything trains."""
  dirs, refused = [], []
  for run in runs:
    try:
      wanted = requested_config(config, run, common)
    except Exception as e:  # noqa: BLE001  (a bad override: one line)
      args = ["sweep", *(f"--config.{f}={v}" for f, v in run.overrides), *common]
      raise app.UsageError(cli.unknown_override(args, config)
                           or f"{run.name}: the config does not load with its overrides ({e}).") from None
    base = os.path.join(workdir, run.name)
    candidate, n, first_diff = base, 1, None
    while True:
      diff = stored_config_differences(candidate, wanted)
      if not diff:  # empty or unfinished (trains or resumes there), or the same config (reused)
        break
      first_diff = first_diff or diff[0]
      n += 1
      candidate = f"{base}.{n}"
      if not os.path.exists(candidate) and on_changed != "new_dir":
        refused.append(f"{base} was trained with another config: {first_diff}")
        break
    dirs.append(candidate)
  if refused:
    raise app.UsageError(
        "Finished runs would be reused with a config other than the one requested: " + "; ".join(refused)
        + ". Use a new --workdir, rerun with the stored settings, or pass --on_changed_config=new_dir to train"
        " the requested config in a new directory next to each.")
  return dirs


def dry_run(config: str, workdir: str, runs: Sequence[Run], common: Sequence[str] = (),
            on_changed: str = "refuse", prefix: str = "[sweep]") -> None:
  """Print where each run would go and whether it would be reused or trained;
  exit with an error naming the runs whose config ``csq_jax.main`` would refuse."""
  from csq_jax import train  # noqa: PLC0415  (the training stack, for its config checks)

  invalid = []
  for run, wd in zip(runs, place_runs(config, workdir, runs, common, on_changed)):
    finished = os.path.exists(os.path.join(wd, "summary.json"))
    print(f"{prefix} {run.name}: {'reuse the finished run in' if finished else 'train in'} {wd}")
    try:
      train.validate_config(requested_config(config, run, common))
    except train.ConfigError as e:
      invalid.append(f"{run.name} ({e})")
  if invalid:
    sys.exit(f"csq_jax: error: {len(invalid)} of {len(runs)} runs have a config that cannot run: "
             + "; ".join(invalid))


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def execute(config: str, workdir: str, runs: Sequence[Run], common: Sequence[str] = (), parallel: int = 1,
            prefix: str = "[sweep]", echo: Callable[[str], None] = print,
            on_changed: str = "refuse") -> list[Outcome]:
  """Train every run lacking a ``summary.json`` of its config (``parallel``
  at a time, directories from ``place_runs``), in the order of ``runs``; a
  failure is recorded and the others go on. Returns one ``Outcome`` per run,
  in that order."""
  places = dict(zip(runs, place_runs(config, workdir, runs, common, on_changed)))
  lock = threading.Lock()

  def say(msg):
    with lock:
      echo(f"{prefix} {msg}")
      sys.stdout.flush()

  stop = threading.Event()  # set on an interrupt: start nothing more
  procs = set()  # the runs' processes now running
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if parallel > 1:  # several processes on one accelerator: no process may grab most of its memory
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  def one(run: Run) -> Outcome:
    wd = places[run]
    path = os.path.join(wd, "summary.json")
    out = Outcome(run, wd)
    if not os.path.exists(path):
      if stop.is_set():
        out.error = "not started: the sweep was interrupted"
        return out
      os.makedirs(wd, exist_ok=True)
      log = os.path.join(wd, "train.log")
      cmd = command(config, wd, run, common)
      say(f"{os.path.relpath(wd, workdir)}: training, log in {log}")
      t0 = time.time()
      with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        procs.add(proc)
        rc = proc.wait()
        procs.discard(proc)
      if rc != 0 or not os.path.exists(path):
        out.error = f"exit code {rc}; log: {log}"
        say(f"{run.name}: FAILED ({out.error}); its last lines:\n{_tail(log)}")
        return out
      out.trained = True
      with open(path) as f:
        s = json.load(f)
      say(f"{run.name}: done in {time.time() - t0:.0f} s: avg bits {s['avg_bits']:.3f},"
          f" accuracy {100 * s['test_accuracy']:.2f}%")
    with open(path) as f:
      out.summary = json.load(f)
    return out

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    return list(pool.map(one, runs))
  except BaseException:  # Ctrl-C: stop the runs (they resume from their checkpoints next time)
    stop.set()
    for proc in list(procs):
      proc.terminate()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def finish(workdir: str, outcomes: Sequence[Outcome]) -> None:
  """Write the report of the finished runs; exit with an error naming the
  failed ones (after the report, so that nothing finished is lost)."""
  done = [o for o in outcomes if o.summary is not None]
  failed = [o for o in outcomes if o.summary is None]
  if done:
    path = report.write_report([o.workdir for o in done], workdir,
                               failures=[(o.run.name, o.error) for o in failed])
    print(f"Report: {path}")
  print(f"{sum(o.trained for o in done)} trained, {sum(not o.trained for o in done)} reused,"
        f" {len(failed)} failed.")
  if failed:
    sys.exit(f"csq_jax: error: {len(failed)} of {len(outcomes)} runs failed: "
             + ", ".join(f"{o.run.name} ({o.error})" for o in failed)
             + ". Fix the cause and rerun the same command: finished runs are reused.")


def split_overrides(argv: Sequence[str]) -> list[str]:
  """The ``--config.<field>=value`` arguments; a one-line error for others."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  extra = [a for a in argv[1:] if not a.startswith("--config.")]
  if extra:
    raise app.UsageError(f"Unexpected arguments {extra}; only --config.<field>=value overrides are passed on.")
  return overrides


def exit_on_sigterm() -> None:
  """A ``kill`` of the sweep ends its runs too (through ``execute``'s cleanup)."""
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"csq_jax: terminated by signal {signum}."))


def main(argv: Sequence[str]) -> None:
  exit_on_sigterm()
  common = split_overrides(argv)
  axes = [parse_axis(s) for s in SWEEP.value]
  config = load_config(CONFIG.value)
  for field, values in axes:  # the sections of swept methods of the user's own exist for the check
    if field == "method":
      for m in values:
        if methods.is_known(m):
          with config.unlocked():
            methods.resolve(m).add_section(config)
  check_fields(config, [f for f, _ in axes])
  clash = [f for f, _ in axes if any(a.startswith(f"--config.{f}=") for a in common)]
  if clash:
    raise app.UsageError(f"{clash[0]} is both swept and set by --config.{clash[0]}: give it once.")
  runs = plan(axes)
  os.makedirs(WORKDIR.value, exist_ok=True)
  print(f"[sweep] {len(runs)} runs in {WORKDIR.value}: {', '.join(r.name for r in runs)}", flush=True)
  if DRY_RUN.value:
    dry_run(CONFIG.value, WORKDIR.value, runs, common, ON_CHANGED_CONFIG.value)
    return
  finish(WORKDIR.value, execute(CONFIG.value, WORKDIR.value, runs, common, PARALLEL.value,
                                on_changed=ON_CHANGED_CONFIG.value))


def run_app(main_fn: Callable[[list[str]], None], doc: str = __doc__,
            modules: Sequence[str] = ("csq_jax.sweep",)) -> None:
  """``app.run(main_fn)`` with the ``--config.<field>`` arguments kept out of
  absl's parser (it would reject them as unknown flags) and handed to
  ``main_fn`` with the rest of argv."""
  cli.run(main_fn, doc, [*modules, "__main__"], keep_overrides_out=True)


if __name__ == "__main__":
  run_app(main)
