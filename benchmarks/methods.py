"""Train-step time, memory and trainable parameters of every method (FP, STE, CSQ, BSQ, MSQ).

What it measures
  For each model setting and each method (``config.method``), the jitted
  training step of the search phase (phase 0 of ``train.make_phases``: the
  method's regularizer in the loss and its ``after_update`` after the
  optimizer step), built exactly as ``train.train_and_evaluate`` builds it:
  ``configs/default.py:get_config()`` -> ``make_phases`` -> ``create_model``
  -> ``init_state`` -> ``make_train_step(model, phases[0], methods.get(config))``
  (state donated). Model settings:

    resnet20  CIFAR shapes: 32x32x3 images, 10 classes, batch 128
    resnet50  ImageNet shapes: 224x224x3 images, 1000 classes, batch
              ``--resnet50-batch`` (default 32; use more on a GPU)

  Methods: ``fp`` (float), ``ste`` (uniform QAT at ``--target-bits`` bits),
  ``csq``, ``bsq``, ``msq`` (``--n-bits`` = 8 bit planes / bits at the start,
  budget target ``--target-bits``). The default path rules quantize every
  kernel but the 1x1 shortcut convolutions.

How
  * Each (model, method) runs in a fresh subprocess of this script (hidden
    flags ``--only-model`` / ``--only-method``), so its peak memory is its own.
  * One batch of random normal images and random labels is generated once and
    put on the device. The step is compiled ahead (``lower().compile()``,
    timed as "compile"), called once, run ``--warmup`` more times, then
    ``--steps`` times, each call ended with ``jax.block_until_ready``; the
    table shows the median wall time (on a CPU backend also the median process
    CPU time, which other jobs on the machine disturb less).
  * Trainable parameters: ``methods.trainable_params(state.params)`` (every
    scalar the optimizer updates: quantizer and float leaves).
  * Peak memory: ``device.memory_stats()['peak_bytes_in_use']`` where the
    backend reports it (GPU/TPU); otherwise (CPU) the peak resident set size
    of the subprocess minus its RSS after imports and backend start-up, as
    ``benchmarks/step_time.py`` does (this includes XLA compilation, so it is
    an upper bound). Also recorded: the host RSS growth while running the
    already compiled step, XLA's buffer estimate of the step and the bytes of
    the train state (params + optimizer state + BN statistics).
  * Targets, per model: MSQ trainable params <= 1/8 of CSQ's; MSQ step time
    <= 1.15x FP; CSQ step time <= 1.3x FP.

Usage (from the repository root)
  python benchmarks/methods.py [--models=resnet20,resnet50] [--methods=fp,ste,csq,bsq,msq]
      [--steps=10] [--warmup=2] [--resnet50-batch=32] [--json=PATH] [--quick]

  --quick is a smoke test: ResNet-50 at 64x64 with batch 2, 2 timed steps,
  1 warm-up step. ResNet-50 at 224x224 takes seconds per step on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

# Run as `python benchmarks/methods.py`: make the repository root importable
# (configs, csq_jax, benchmarks.step_time) and drop this script's folder from
# the path, whose methods.py would otherwise shadow any top-level `methods`.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks.step_time import (
    _current_rss_bytes,
    _describe,
    _maxrss_bytes,
    _mib,
    _ratio,
    _tree_bytes,
    csv_choices,
    timed_run,
)

METHODS = ("fp", "ste", "csq", "bsq", "msq")
# model -> (image size, classes, training examples per epoch (for the schedules))
SETTINGS = {
    "resnet20": (32, 10, 50_000),
    "resnet50": (224, 1000, 1_281_167),
}
RESNET20_BATCH = 128
TARGETS = {"msq_params_vs_csq": 1 / 8, "msq_step_vs_fp": 1.15, "csq_step_vs_fp": 1.3}
_RESULT_TAG = "METHODS_BENCH_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--models", type=csv_choices(tuple(SETTINGS)), default=list(SETTINGS),
                 help="comma-separated models (default resnet20,resnet50)")
  p.add_argument("--methods", type=csv_choices(METHODS), default=list(METHODS),
                 help="comma-separated methods (default fp,ste,csq,bsq,msq)")
  p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default 10)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call (default 2)")
  p.add_argument("--resnet50-batch", type=int, default=32, help="ResNet-50 batch size (default 32)")
  p.add_argument("--resnet50-image-size", type=int, default=224, help="ResNet-50 image side (default 224)")
  p.add_argument("--resnet20-batch", type=int, default=RESNET20_BATCH, help="ResNet-20 batch size (default 128)")
  p.add_argument("--n-bits", type=int, default=8, help="bit planes / start bits of csq, bsq, msq (default 8)")
  p.add_argument("--target-bits", type=float, default=4.0,
                 help="ste's fixed bits and the budget target of csq, bsq, msq (default 4)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", metavar="PATH", help="write all results to PATH as JSON")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: resnet50 at 64x64, batch 2; 2 steps, 1 warm-up step")
  p.add_argument("--only-model", choices=tuple(SETTINGS), help=argparse.SUPPRESS)  # child process
  p.add_argument("--only-method", choices=METHODS, help=argparse.SUPPRESS)  # child process
  p.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # child process
  p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)  # child process
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.resnet50_batch, args.resnet50_image_size = 2, 1, 2, 64
  if min(args.steps, args.resnet50_batch, args.resnet20_batch, args.resnet50_image_size) < 1 or args.warmup < 0:
    p.error("--steps, batch sizes and the image size must be >= 1, --warmup >= 0")
  return args


def model_shape(model: str, args: argparse.Namespace) -> tuple[int, int]:
  """``(batch, image side)`` of ``model`` under ``args``."""
  if model == "resnet50":
    return args.resnet50_batch, args.resnet50_image_size
  return args.resnet20_batch, SETTINGS[model][0]


# ----------------------------------------------------------------------------
# Child: one (model, method), in this (fresh) process.


def build(model_name: str, method_name: str, batch: int, image_size: int, args: argparse.Namespace):
  """``(step, state, config)`` as ``train.train_and_evaluate`` makes them."""
  import jax

  from configs import default as default_config
  from csq_jax import methods, train

  _, num_classes, examples = SETTINGS[model_name]
  config = default_config.get_config()
  config.model = model_name
  config.method = method_name
  config.n_bits = args.n_bits
  config.target_bits = args.target_bits
  config.batch_size = batch
  config.seed = args.seed
  train.validate_config(config)
  phases = train.make_phases(config, steps_per_epoch=max(examples // batch, 1))
  model = train.create_model(config, num_classes)
  shape = (image_size, image_size, 3)
  state, _ = train.init_state(config, model, shape, phases[0], jax.random.key(config.seed))
  step = train.make_train_step(model, phases[0], methods.get(config))
  return step, jax.block_until_ready(state)


def random_batch(batch: int, image_size: int, num_classes: int, seed: int, device):
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  data = {
      "image": rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32),
      "label": rng.integers(0, num_classes, size=(batch,), dtype=np.int32),
  }
  return jax.block_until_ready(jax.device_put(data, device))


def measure(args: argparse.Namespace) -> dict:
  import jax
  import numpy as np

  from csq_jax import methods

  model_name, method_name, batch, image_size = args.only_model, args.only_method, args.batch, args.image_size
  device = jax.devices()[0]
  rss_after_imports = _maxrss_bytes()

  step, state = build(model_name, method_name, batch, image_size, args)
  data = random_batch(batch, image_size, SETTINGS[model_name][1], args.seed, device)
  trainable = methods.trainable_params(state.params)
  param_bytes = _tree_bytes(state.params)
  state_bytes = param_bytes + _tree_bytes(state.opt_state) + _tree_bytes(state.batch_stats)

  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  try:  # best effort: not every backend implements it
    ma = compiled.memory_analysis()
    xla_bytes = int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
  except (AttributeError, NotImplementedError, RuntimeError, TypeError):
    xla_bytes = None

  rss_before_steps = _current_rss_bytes()
  state, metrics, first_call_s, wall, cpu = timed_run(compiled, state, data, args.warmup, args.steps)

  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  device_peak = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
  rss_peak = _maxrss_bytes() - rss_after_imports
  step_rss = None if rss_before_steps is None else _maxrss_bytes() - rss_before_steps
  peak, source = (device_peak, "device peak_bytes_in_use") if device_peak is not None else (
      rss_peak, "peak RSS - RSS after imports")
  return {
      "model": model_name, "method": method_name, "batch": batch, "image_size": image_size,
      "ms": 1e3 * float(np.median(wall)), "ms_min": 1e3 * float(np.min(wall)),
      "cpu_ms": 1e3 * float(np.median(cpu)), "compile_s": compile_s, "first_call_s": first_call_s,
      "trainable_params": trainable, "param_bytes": param_bytes, "state_bytes": state_bytes,
      "peak_bytes": peak, "peak_source": source, "device_peak_bytes": device_peak,
      "rss_peak_bytes": rss_peak, "step_rss_bytes": step_rss, "xla_bytes": xla_bytes,
      "loss": float(metrics["loss"]), "device": str(device), "device_desc": _describe(device),
  }


# ----------------------------------------------------------------------------
# Parent: one subprocess per (model, method), then the tables and targets.


def run_child(model: str, method: str, args: argparse.Namespace) -> dict:
  batch, image_size = model_shape(model, args)
  cmd = [sys.executable, os.path.abspath(__file__), f"--only-model={model}", f"--only-method={method}",
         f"--batch={batch}", f"--image-size={image_size}", f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--n-bits={args.n_bits}", f"--target-bits={args.target_bits}", f"--seed={args.seed}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_TAG)]
  if proc.returncode != 0 or not lines:
    tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
    sys.stderr.write(f"{model}/{method} failed (exit code {proc.returncode}):\n{tail}\n")
    return {"model": model, "method": method, "batch": batch, "image_size": image_size,
            "error": f"exit code {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"}
  result = json.loads(lines[-1][len(_RESULT_TAG):])
  result["wall_s"] = time.perf_counter() - t0
  return result


def _x(a, b):
  return None if a is None or b is None or b <= 0 else a / b


def _verdict(value, limit) -> str:
  return "n/a" if value is None else ("MET" if value <= limit + 1e-12 else "NOT MET")


def report_model(model: str, rows: dict[str, dict], args: argparse.Namespace) -> dict:
  """Print one model's table and targets; return its targets as a dict."""
  batch, image_size = model_shape(model, args)
  ok = {m: r for m, r in rows.items() if "error" not in r}
  fp = ok.get("fp")
  on_cpu = any(r["device_desc"].startswith("cpu") for r in ok.values())
  head = ["method", "step ms", "xFP", "trainable", "xFP", "peak mem", "xFP", "state"]
  if on_cpu:
    head += ["CPU ms", "xFP"]
  table = []
  for m, r in rows.items():
    if "error" in r:
      table.append([m, "FAILED"] + [""] * (len(head) - 2))
      continue
    line = [m, f"{r['ms']:.1f}", _ratio(r["ms"], fp and fp["ms"]),
            f"{r['trainable_params']:,}", _ratio(r["trainable_params"], fp and fp["trainable_params"]),
            _mib(r["peak_bytes"]), _ratio(r["peak_bytes"], fp and fp["peak_bytes"]), _mib(r["state_bytes"])]
    if on_cpu:
      line += [f"{r['cpu_ms']:.1f}", _ratio(r["cpu_ms"], fp and fp["cpu_ms"])]
    table.append(line)
  widths = [max(len(row[i]) for row in table + [head]) for i in range(len(head))]

  def fmt(row):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

  _, num_classes, _ = SETTINGS[model]
  print(f"\n== {model}: batch {batch}x{image_size}x{image_size}x3, {num_classes} classes;"
        f" median of {args.steps} steps after compile + 1 + {args.warmup} warm-up steps")
  if ok:
    print(f"peak mem = {next(iter(ok.values()))['peak_source']}; state = params + opt_state + batch_stats bytes"
          + ("; CPU ms = process CPU time per step (all threads)" if on_cpu else ""))
  print(fmt(head))
  print("  ".join("-" * w for w in widths))
  for row in table:
    print(fmt(row).rstrip())
  for m, r in rows.items():
    if "error" in r:
      print(f"  {m} failed: {r['error']}")

  def get(m, key):
    return ok[m][key] if m in ok else None

  checks = [
      ("MSQ trainable params <= 1/8 of CSQ's", "msq_params_vs_csq",
       _x(get("msq", "trainable_params"), get("csq", "trainable_params")),
       f"{get('msq', 'trainable_params')} vs {get('csq', 'trainable_params')}"),
      ("MSQ step time <= 1.15x FP", "msq_step_vs_fp", _x(get("msq", "ms"), get("fp", "ms")),
       f"{get('msq', 'ms') or 0:.1f} ms vs {get('fp', 'ms') or 0:.1f} ms"),
      ("CSQ step time <= 1.3x FP", "csq_step_vs_fp", _x(get("csq", "ms"), get("fp", "ms")),
       f"{get('csq', 'ms') or 0:.1f} ms vs {get('fp', 'ms') or 0:.1f} ms"),
  ]
  cpu_ratio = {"msq_step_vs_fp": _x(get("msq", "cpu_ms"), get("fp", "cpu_ms")),
               "csq_step_vs_fp": _x(get("csq", "cpu_ms"), get("fp", "cpu_ms"))}
  print("targets:")
  out = {}
  for text, key, value, detail in checks:
    limit = TARGETS[key]
    shown = "not measured" if value is None else f"{value:.3f}x ({detail})"
    extra = ""
    if on_cpu and key in cpu_ratio and cpu_ratio[key] is not None:
      extra = f"; by CPU time {cpu_ratio[key]:.2f}x"
    print(f"  {text}: {shown} -> {_verdict(value, limit)}{extra}")
    out[key] = {"value": value, "limit": limit, "met": None if value is None else value <= limit + 1e-12,
                "cpu_time_value": cpu_ratio.get(key)}
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.only_model:
    result = measure(args)
    print(_RESULT_TAG + json.dumps(result), flush=True)
    return 0

  command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)
  print(f"command: {command}", flush=True)
  methods = ["fp"] + [m for m in args.methods if m != "fp"] if "fp" in args.methods else list(args.methods)
  results: dict[str, dict[str, dict]] = {}
  device = None
  for model in args.models:
    results[model] = {}
    for method in methods:  # each in a fresh process, so each peak is its own
      batch, image_size = model_shape(model, args)
      print(f"measuring {model} / {method} (batch {batch}, {image_size}x{image_size}) ...",
            file=sys.stderr, flush=True)
      r = run_child(model, method, args)
      results[model][method] = r
      if device is None and "device" in r:
        device = r["device"]
        print(f"device: {device} ({r['device_desc']})", flush=True)
  targets = {model: report_model(model, rows, args) for model, rows in results.items()}
  failed = [f"{m}/{k}" for m, rows in results.items() for k, r in rows.items() if "error" in r]
  if args.json:
    summary = {"command": command, "device": device, "steps": args.steps, "warmup": args.warmup,
               "n_bits": args.n_bits, "target_bits": args.target_bits, "quick": args.quick,
               "results": results, "targets": targets, "failed": failed}
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
    print(f"\nresults written to {args.json}")
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
