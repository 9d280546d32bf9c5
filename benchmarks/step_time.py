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
  * The first call (trace + compile + run) is timed separately, then
    ``--warmup`` steps are run, then ``--steps`` steps are timed one by one,
    each ended with ``jax.block_until_ready``; the table shows the median.
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
  * The allowed CSQ overhead ("no more than the bit-plane parameters, their
    gradients and optimizer state require") is
    ``3 * (CSQ param bytes - FP param bytes)`` (params + grads + momentum);
    it is printed next to the measured overheads.

Usage
  python benchmarks/step_time.py [--batch_size=128] [--steps=20] [--warmup=3] [--json]

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
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) call")
  p.add_argument("--n_bits", type=int, default=8, help="CSQ bit planes per layer (default 8)")
  p.add_argument("--model", default="resnet20", help="model name in csq_jax.models (default resnet20)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="end stdout with one JSON object of the results")
  p.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # child process: one method
  args = p.parse_args(argv)
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    p.error("--batch_size and --steps must be >= 1, --warmup >= 0")
  return args


# ----------------------------------------------------------------------------
# Child: measure one method in this process.


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


def _tree_bytes(tree) -> int:
  import jax

  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def measure(method: str, args: argparse.Namespace) -> dict:
  """Time and size one method's train step; returns a dict of results."""
  import jax
  import numpy as np

  from configs import default as default_config
  from csq_jax import train

  device = jax.devices()[0]
  rss_after_imports = _maxrss_bytes()

  config = default_config.get_config()
  config.model = args.model
  config.method = method
  config.n_bits = args.n_bits
  config.batch_size = args.batch_size
  config.seed = args.seed
  train.validate_config(config)

  steps_per_epoch = CIFAR10_TRAIN_EXAMPLES // args.batch_size
  phases = train.make_phases(config, steps_per_epoch=steps_per_epoch)
  model = train.create_model(config, NUM_CLASSES)
  state, _ = train.init_state(config, model, IMAGE_SHAPE, phases[0], jax.random.key(config.seed))
  step = train.make_train_step(model, phases[0], config)

  rng = np.random.default_rng(args.seed)
  batch = {
      "image": rng.standard_normal((args.batch_size,) + IMAGE_SHAPE, dtype=np.float32),
      "label": rng.integers(0, NUM_CLASSES, size=(args.batch_size,), dtype=np.int32),
  }
  batch = jax.device_put(batch, device)
  state = jax.block_until_ready(state)

  param_bytes = _tree_bytes(state.params)
  state_bytes = param_bytes + _tree_bytes(state.opt_state) + _tree_bytes(state.batch_stats)

  # Compile ahead of the first call (the jitted function reuses this executable)
  # and read XLA's static buffer estimate and flop count of the step.
  xla_bytes = None
  flops = None
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      xla_bytes = int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else None
  except Exception:  # analysis is best effort; the timing below is what matters
    pass

  rss_before_steps = _current_rss_bytes()
  t0 = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, batch))
  first_call_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = jax.block_until_ready(step(state, batch))

  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])

  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak_bytes, peak_source = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  else:
    peak_bytes, peak_source = _maxrss_bytes() - rss_after_imports, "peak RSS - RSS after imports"
  # Host RSS the steps themselves added (CPU: buffers of the step; excludes compilation).
  step_rss_bytes = None if rss_before_steps is None else _maxrss_bytes() - rss_before_steps

  return dict(
      method=method,
      ms=1e3 * float(np.median(times)),
      ms_min=1e3 * float(np.min(times)),
      ms_mean=1e3 * float(np.mean(times)),
      compile_s=compile_s,
      first_call_s=first_call_s,
      step_rss_bytes=step_rss_bytes,
      peak_bytes=peak_bytes,
      peak_source=peak_source,
      param_bytes=param_bytes,
      state_bytes=state_bytes,
      xla_bytes=xla_bytes,
      flops=flops,
      loss=loss,
      device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
  )


# ----------------------------------------------------------------------------
# Parent: one subprocess per method, then the table.


def run_child(method: str, args: argparse.Namespace) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--only={method}",
         f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--n_bits={args.n_bits}", f"--model={args.model}", f"--seed={args.seed}"]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(_RESULT_TAG)]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stderr)
    raise RuntimeError(f"The {method} measurement failed (exit code {proc.returncode}).")
  return json.loads(lines[-1][len(_RESULT_TAG):])


def _mib(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def report(fp: dict, csq: dict, args: argparse.Namespace) -> dict:
  ratio = csq["ms"] / fp["ms"]
  allowed = 3 * (csq["param_bytes"] - fp["param_bytes"])
  rows = [
      ("step time (median)", f"{fp['ms']:.1f} ms", f"{csq['ms']:.1f} ms", f"{ratio:.2f}x"),
      ("step time (min)", f"{fp['ms_min']:.1f} ms", f"{csq['ms_min']:.1f} ms",
       f"{csq['ms_min'] / fp['ms_min']:.2f}x"),
      ("compile", f"{fp['compile_s']:.1f} s", f"{csq['compile_s']:.1f} s",
       f"{csq['compile_s'] / fp['compile_s']:.2f}x"),
      ("first call (compiled)", f"{fp['first_call_s']:.2f} s", f"{csq['first_call_s']:.2f} s",
       f"{csq['first_call_s'] / fp['first_call_s']:.2f}x"),
      ("peak memory (measured)", _mib(fp["peak_bytes"]), _mib(csq["peak_bytes"]),
       f"{csq['peak_bytes'] / max(fp['peak_bytes'], 1):.2f}x"),
      ("host RSS growth in steps", _mib(fp["step_rss_bytes"]), _mib(csq["step_rss_bytes"]),
       "n/a" if not fp["step_rss_bytes"] or csq["step_rss_bytes"] is None
       else f"{csq['step_rss_bytes'] / fp['step_rss_bytes']:.2f}x"),
      ("XLA step buffers", _mib(fp["xla_bytes"]), _mib(csq["xla_bytes"]),
       "n/a" if not fp["xla_bytes"] or csq["xla_bytes"] is None else f"{csq['xla_bytes'] / fp['xla_bytes']:.2f}x"),
      ("param bytes", _mib(fp["param_bytes"]), _mib(csq["param_bytes"]),
       f"{csq['param_bytes'] / fp['param_bytes']:.2f}x"),
      ("train state bytes", _mib(fp["state_bytes"]), _mib(csq["state_bytes"]),
       f"{csq['state_bytes'] / fp['state_bytes']:.2f}x"),
  ]
  if fp["flops"] and csq["flops"]:
    rows.append(("XLA flops / step", f"{fp['flops'] / 1e9:.2f} G", f"{csq['flops'] / 1e9:.2f} G",
                 f"{csq['flops'] / fp['flops']:.2f}x"))
  head = ("", "FP", f"CSQ ({args.n_bits} bits)", "CSQ/FP")
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
  fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

  print(f"{args.model}, batch {args.batch_size}x{'x'.join(map(str, IMAGE_SHAPE))}, {NUM_CLASSES} classes,"
        f" device {fp['device']}; median of {args.steps} steps after compile + {args.warmup} warm-up steps")
  print(f"peak memory: {fp['peak_source']}")
  print(fmt(head))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(fmt(r))
  print()
  measured_overhead = csq["peak_bytes"] - fp["peak_bytes"]
  xla_overhead = None if fp["xla_bytes"] is None or csq["xla_bytes"] is None else (
      csq["xla_bytes"] + csq["state_bytes"] - fp["xla_bytes"] - fp["state_bytes"])
  print(f"memory overhead allowed: 3 x (CSQ - FP param bytes) = {_mib(allowed)}"
        " (bit-plane params + grads + momentum)")
  print(f"memory overhead measured: {_mib(measured_overhead)} ({fp['peak_source']})"
        f"{'' if xla_overhead is None else f'; XLA buffers + state: {_mib(xla_overhead)}'}")
  met = ratio <= TARGET_RATIO
  print(f"target: CSQ step <= {TARGET_RATIO}x FP step: {ratio:.2f}x -> {'MET' if met else 'NOT MET'}")
  return dict(
      fp_ms=fp["ms"], csq_ms=csq["ms"], ratio=ratio, target_ratio=TARGET_RATIO, target_met=met,
      fp_peak_bytes=fp["peak_bytes"], csq_peak_bytes=csq["peak_bytes"], peak_source=fp["peak_source"],
      fp_state_bytes=fp["state_bytes"], csq_state_bytes=csq["state_bytes"],
      fp_param_bytes=fp["param_bytes"], csq_param_bytes=csq["param_bytes"],
      fp_xla_bytes=fp["xla_bytes"], csq_xla_bytes=csq["xla_bytes"],
      allowed_overhead_bytes=allowed, measured_overhead_bytes=measured_overhead,
      fp_compile_s=fp["compile_s"], csq_compile_s=csq["compile_s"],
      fp_step_rss_bytes=fp["step_rss_bytes"], csq_step_rss_bytes=csq["step_rss_bytes"],
      device=fp["device"], batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
      n_bits=args.n_bits, model=args.model,
  )


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.only:
    # Importable as `configs.default` / `csq_jax` when run from anywhere.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(_RESULT_TAG + json.dumps(measure(args.only, args)), flush=True)
    return
  results = {m: run_child(m, args) for m in METHODS}  # FP first, each in a fresh process
  summary = report(results["fp"], results["csq"], args)
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
