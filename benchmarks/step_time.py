"""FP vs CSQ train-step time and peak memory for ResNet-20 on CIFAR-shaped batches.

What it measures
  One jitted training step (``csq_jax.train.make_train_step``) of ResNet-20
  (32x32x3 images, 10 classes) for the float baseline (``method='fp'``) and
  for CSQ (``method='csq'``, ``n_bits`` bit planes, learned bit masks, budget
  penalty on), built exactly as ``train.train_and_evaluate`` builds them:
  ``configs/default.py:get_config()`` -> ``make_phases`` -> ``create_model``
  -> ``init_state`` -> ``make_train_step`` (state donated).

How
  * Each method runs in a fresh subprocess of this script (hidden flag
    ``--only=fp|csq``), so its peak memory is its own.
  * One batch of random normal images and random labels is generated once and
    put on the device before timing.
  * The step is compiled ahead (``lower().compile()``, timed as "compile"; the
    jitted function reuses that executable), its first call is timed alone,
    ``--warmup`` more steps are run, then ``--steps`` steps are timed one by
    one, each ended with ``jax.block_until_ready``; the table shows the median
    (and the minimum, the least disturbed step). On a CPU backend it also
    shows the median process CPU time per step (all threads), which other
    processes on the machine disturb far less than the wall time.
  * Peak memory: on an accelerator, ``device.memory_stats()['peak_bytes_in_use']``.
    Where ``memory_stats()`` is unavailable (CPU), the peak resident set size of
    the subprocess (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS after
    imports and backend start-up; this includes host-side work such as XLA
    compilation, so it is an upper bound on what the step itself needs. The
    row "host RSS growth in steps" (peak RSS minus the RSS just before the
    first call of the already compiled step) leaves compilation out.
  * Also shown for each method: the analytic size of the train state (nbytes
    of every leaf of params + opt_state + batch_stats) and XLA's own estimate
    of the compiled step's buffers (``compiled.memory_analysis()``: temporaries
    plus the non-aliased outputs).
  * ``--interleave`` adds a third subprocess that alternates FP and CSQ steps
    and reports the median of the per-pair time ratios: both methods then
    see the same background load, which matters on a shared machine.
  * The allowed CSQ overhead ("no more than the bit-plane parameters, their
    gradients and optimizer state require") is
    ``3 * (CSQ param bytes - FP param bytes)`` (params + grads + momentum);
    it is printed next to the measured overheads.

Usage
  python benchmarks/step_time.py [--batch_size=128] [--steps=20] [--warmup=3] [--interleave] [--json]

With ``--json`` the last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("fp", "csq")
TARGET_RATIO = 1.3
CIFAR10_TRAIN_EXAMPLES = 50_000
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
_RESULT_TAG = "STEP_TIME_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=128, help="examples per step (default 128)")
  p.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported (default 20)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation and the first call (default 3)")
  p.add_argument("--n_bits", type=int, default=8, help="CSQ bit planes per layer (default 8)")
  p.add_argument("--model", default="resnet20", help="model name in csq_jax.models (default resnet20)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="end stdout with one JSON object of the results")
  p.add_argument("--interleave", action="store_true",
                 help="also time FP and CSQ alternately in one process (robust ratio on a busy machine)")
  p.add_argument("--only", choices=METHODS + ("interleaved",), help=argparse.SUPPRESS)  # child process
  args = p.parse_args(argv)
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    p.error("--batch_size and --steps must be >= 1, --warmup >= 0")
  return args


# ----------------------------------------------------------------------------
# Child: the measurements, in this (fresh) process.


def csv_choices(choices):
  """argparse type: a comma-separated, non-empty subset of ``choices`` as a list."""

  def parse(s):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in choices]
    if bad or not items:
      raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}; got {s!r}")
    return items

  return parse


def _maxrss_bytes() -> int:
  import resource

  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int | None:
  """Resident set size now (Linux /proc); None where unavailable."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def _describe(device) -> str:
  kind = getattr(device, "device_kind", "")
  if device.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores)"
  return f"{device.platform} ({kind})" if kind else device.platform


def _tree_bytes(tree) -> int:
  import jax

  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def build(method: str, args: argparse.Namespace):
  """``(step, state)`` of ``method``, made as ``train.train_and_evaluate`` makes them."""
  import jax

  from configs import default as default_config
  from csq_jax import methods, train

  config = default_config.get_config()
  config.model = args.model
  config.method = method
  config.n_bits = args.n_bits
  config.batch_size = args.batch_size
  config.seed = args.seed
  train.validate_config(config)
  phases = train.make_phases(config, steps_per_epoch=CIFAR10_TRAIN_EXAMPLES // args.batch_size)
  model = train.create_model(config, NUM_CLASSES)
  state, _ = train.init_state(config, model, IMAGE_SHAPE, phases[0], jax.random.key(config.seed))
  step = train.make_train_step(model, phases[0], methods.get(config))
  return step, jax.block_until_ready(state)


def random_batch(args: argparse.Namespace, device):
  """Random normal images and random labels, generated once and put on ``device``."""
  import jax
  import numpy as np

  rng = np.random.default_rng(args.seed)
  batch = {
      "image": rng.standard_normal((args.batch_size,) + IMAGE_SHAPE, dtype=np.float32),
      "label": rng.integers(0, NUM_CLASSES, size=(args.batch_size,), dtype=np.int32),
  }
  return jax.block_until_ready(jax.device_put(batch, device))


def timed_step(step, state, batch):
  """One step, blocked until done: ``(new state, metrics, (wall s, process CPU s))``.

  The process CPU time (all threads) is the work done; on a CPU backend it is
  far less sensitive than the wall time to other processes on the machine.
  """
  import jax

  t0, c0 = time.perf_counter(), time.process_time()
  state, metrics = jax.block_until_ready(step(state, batch))
  return state, metrics, (time.perf_counter() - t0, time.process_time() - c0)


def timed_run(step, state, batch, warmup: int, steps: int):
  """First call, ``warmup`` untimed calls, then ``steps`` timed ones:
  ``(state, last metrics, first call s, [wall s], [process CPU s])``."""
  state, _, (first_call_s, _) = timed_step(step, state, batch)
  for _ in range(warmup):
    state, _, _ = timed_step(step, state, batch)
  wall, cpu = [], []
  metrics = None
  for _ in range(steps):
    state, metrics, (w, c) = timed_step(step, state, batch)
    wall.append(w)
    cpu.append(c)
  return state, metrics, first_call_s, wall, cpu


def measure(method: str, args: argparse.Namespace) -> dict:
  """Time and size one method's train step in this (fresh) process."""
  import jax
  import numpy as np

  device = jax.devices()[0]
  rss_after_imports = _maxrss_bytes()

  step, state = build(method, args)
  batch = random_batch(args, device)
  param_bytes = _tree_bytes(state.params)
  state_bytes = param_bytes + _tree_bytes(state.opt_state) + _tree_bytes(state.batch_stats)

  # Compile ahead of the first call (the jitted function reuses this executable)
  # and read XLA's static buffer estimate and flop count of the step.
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  xla_bytes = flops = None
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      xla_bytes = int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else None
  except Exception:  # best effort: not every backend implements these analyses
    pass

  rss_before_steps = _current_rss_bytes()
  state, metrics, first_call_s, times, cpu_times = timed_run(step, state, batch, args.warmup, args.steps)

  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak_bytes, peak_source = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  else:
    peak_bytes, peak_source = _maxrss_bytes() - rss_after_imports, "peak RSS - RSS after imports"
  # Host RSS added by running the compiled step (CPU: its buffers), compilation excluded.
  step_rss_bytes = None if rss_before_steps is None else _maxrss_bytes() - rss_before_steps

  return dict(
      method=method,
      ms=1e3 * float(np.median(times)),
      ms_min=1e3 * float(np.min(times)),
      cpu_ms=1e3 * float(np.median(cpu_times)),
      compile_s=compile_s,
      first_call_s=first_call_s,
      step_rss_bytes=step_rss_bytes,
      peak_bytes=peak_bytes,
      peak_source=peak_source,
      param_bytes=param_bytes,
      state_bytes=state_bytes,
      xla_bytes=xla_bytes,
      flops=flops,
      loss=float(metrics["loss"]),
      device=_describe(device),
  )


def measure_interleaved(args: argparse.Namespace) -> dict:
  """FP and CSQ steps alternated in one process: both see the same machine load,
  so the median of the per-pair ratios is robust on a busy host."""
  import jax
  import numpy as np

  device = jax.devices()[0]
  batch = random_batch(args, device)
  runs = {m: build(m, args) for m in METHODS}
  for m, (step, state) in runs.items():
    for _ in range(1 + args.warmup):
      state, _, _ = timed_step(step, state, batch)
    runs[m] = (step, state)
  wall = {m: [] for m in METHODS}
  for _ in range(args.steps):
    for m, (step, state) in runs.items():
      state, _, (dt, _) = timed_step(step, state, batch)
      runs[m] = (step, state)
      wall[m].append(dt)
  pair = np.asarray(wall["csq"]) / np.asarray(wall["fp"])
  return dict(fp_ms=1e3 * float(np.median(wall["fp"])), csq_ms=1e3 * float(np.median(wall["csq"])),
              ratio=float(np.median(pair)))


# ----------------------------------------------------------------------------
# Parent: one subprocess per method, then the table.


def run_child(what: str, args: argparse.Namespace) -> dict:
  """Run this script with ``--only=what`` in a fresh interpreter; its result dict."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--only={what}",
         f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--n_bits={args.n_bits}", f"--model={args.model}", f"--seed={args.seed}"]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_TAG)]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stderr)
    raise RuntimeError(f"The {what} measurement failed (exit code {proc.returncode}).")
  return json.loads(lines[-1][len(_RESULT_TAG):])


def _mib(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _ratio(a, b) -> str:
  return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def _diff(a, b):
  return None if a is None or b is None else a - b


def report(fp: dict, csq: dict, inter: dict | None, args: argparse.Namespace) -> dict:
  """Print the table and verdicts; return the JSON summary."""
  ratio = csq["ms"] / fp["ms"]
  rows = [  # (label, FP, CSQ, CSQ/FP)
      ("step time (median)", f"{fp['ms']:.1f} ms", f"{csq['ms']:.1f} ms", _ratio(csq["ms"], fp["ms"])),
      ("step time (min)", f"{fp['ms_min']:.1f} ms", f"{csq['ms_min']:.1f} ms", _ratio(csq["ms_min"], fp["ms_min"])),
      ("compile", f"{fp['compile_s']:.1f} s", f"{csq['compile_s']:.1f} s", _ratio(csq["compile_s"], fp["compile_s"])),
      ("first call (compiled)", f"{fp['first_call_s']:.2f} s", f"{csq['first_call_s']:.2f} s",
       _ratio(csq["first_call_s"], fp["first_call_s"])),
      ("peak memory (measured)", _mib(fp["peak_bytes"]), _mib(csq["peak_bytes"]),
       _ratio(csq["peak_bytes"], fp["peak_bytes"])),
      ("host RSS growth in steps", _mib(fp["step_rss_bytes"]), _mib(csq["step_rss_bytes"]),
       _ratio(csq["step_rss_bytes"], fp["step_rss_bytes"])),
      ("XLA step buffers", _mib(fp["xla_bytes"]), _mib(csq["xla_bytes"]), _ratio(csq["xla_bytes"], fp["xla_bytes"])),
      ("param bytes", _mib(fp["param_bytes"]), _mib(csq["param_bytes"]), _ratio(csq["param_bytes"], fp["param_bytes"])),
      ("train state bytes", _mib(fp["state_bytes"]), _mib(csq["state_bytes"]),
       _ratio(csq["state_bytes"], fp["state_bytes"])),
  ]
  if fp["device"].startswith("cpu"):
    rows.insert(2, ("process CPU time / step", f"{fp['cpu_ms']:.1f} ms", f"{csq['cpu_ms']:.1f} ms",
                    _ratio(csq["cpu_ms"], fp["cpu_ms"])))
  if inter:
    rows.insert(2, ("step time (interleaved)", f"{inter['fp_ms']:.1f} ms", f"{inter['csq_ms']:.1f} ms",
                    f"{inter['ratio']:.2f}x"))
  if fp["flops"] and csq["flops"]:
    rows.append(("XLA flops / step", f"{fp['flops'] / 1e9:.2f} G", f"{csq['flops'] / 1e9:.2f} G",
                 _ratio(csq["flops"], fp["flops"])))
  head = ("", "FP", f"CSQ ({args.n_bits} bits)", "CSQ/FP")
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]

  def line(r):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

  print(f"{args.model}, batch {args.batch_size}x{'x'.join(map(str, IMAGE_SHAPE))}, {NUM_CLASSES} classes,"
        f" device {fp['device']}; median of {args.steps} steps after compile + {args.warmup} warm-up steps")
  print(f"peak memory (measured) = {fp['peak_source']}")
  print(line(head))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(line(r))

  # Memory overhead of CSQ over FP, against what the issue allows.
  allowed = 3 * (csq["param_bytes"] - fp["param_bytes"])
  measured = csq["peak_bytes"] - fp["peak_bytes"]
  step_rss = _diff(csq["step_rss_bytes"], fp["step_rss_bytes"])
  xla = _diff(csq["xla_bytes"], fp["xla_bytes"])
  xla_state = None if xla is None else xla + csq["state_bytes"] - fp["state_bytes"]
  print()
  print("memory overhead CSQ - FP:")
  print(f"  allowed: 3 x (CSQ - FP param bytes) = {_mib(allowed)}  (bit-plane params + grads + momentum)")
  print(f"  measured, {fp['peak_source']}: {_mib(measured)}  ({_ratio(measured, allowed)} of allowed)")
  print(f"  measured, host RSS growth in steps: {_mib(step_rss)}  ({_ratio(step_rss, allowed)} of allowed)")
  print(f"  XLA step buffers + train state: {_mib(xla_state)}  ({_ratio(xla_state, allowed)} of allowed)")
  met = ratio <= TARGET_RATIO
  print(f"target: CSQ step <= {TARGET_RATIO}x FP step -> {ratio:.2f}x, {'MET' if met else 'NOT MET'}")
  if inter:
    print(f"  interleaved (median of per-pair ratios): {inter['ratio']:.2f}x,"
          f" {'MET' if inter['ratio'] <= TARGET_RATIO else 'NOT MET'}")
  return dict(
      fp_ms=fp["ms"], csq_ms=csq["ms"], ratio=ratio, target_ratio=TARGET_RATIO, target_met=met,
      fp_ms_min=fp["ms_min"], csq_ms_min=csq["ms_min"], fp_cpu_ms=fp["cpu_ms"], csq_cpu_ms=csq["cpu_ms"],
      fp_peak_bytes=fp["peak_bytes"], csq_peak_bytes=csq["peak_bytes"], peak_source=fp["peak_source"],
      fp_state_bytes=fp["state_bytes"], csq_state_bytes=csq["state_bytes"],
      fp_param_bytes=fp["param_bytes"], csq_param_bytes=csq["param_bytes"],
      fp_xla_bytes=fp["xla_bytes"], csq_xla_bytes=csq["xla_bytes"],
      fp_step_rss_bytes=fp["step_rss_bytes"], csq_step_rss_bytes=csq["step_rss_bytes"],
      allowed_overhead_bytes=allowed, measured_overhead_bytes=measured, xla_state_overhead_bytes=xla_state,
      fp_compile_s=fp["compile_s"], csq_compile_s=csq["compile_s"],
      fp_flops=fp["flops"], csq_flops=csq["flops"],
      device=fp["device"], batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
      n_bits=args.n_bits, model=args.model,
      ratio_interleaved=inter["ratio"] if inter else None,
  )


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.only:
    # Importable as `configs.default` / `csq_jax` when run from anywhere.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = measure_interleaved(args) if args.only == "interleaved" else measure(args.only, args)
    print(_RESULT_TAG + json.dumps(result), flush=True)
    return
  results = {}
  for method in METHODS:  # FP first; each in a fresh process, so each peak is its own
    print(f"measuring {method} ...", file=sys.stderr, flush=True)
    results[method] = run_child(method, args)
  inter = None
  if args.interleave:
    print("measuring fp and csq interleaved ...", file=sys.stderr, flush=True)
    inter = run_child("interleaved", args)
  summary = report(results["fp"], results["csq"], inter, args)
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
