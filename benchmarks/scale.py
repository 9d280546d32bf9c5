"""Training throughput at ImageNet scale: FP vs CSQ vs MSQ on ResNet-50 and DeiT-S.

What it measures
  For each model and method, the jitted search-phase train step exactly as
  ``train.train_and_evaluate`` builds it from ``configs/imagenet_r50.py`` /
  ``configs/imagenet_deit_s.py`` (method overridden), data-parallel over every
  device JAX sees (``sharding.make_mesh``: one ``data`` axis; the state placed
  with ``state_sharding``, global batches), on random 224x224 images:

  * images/second: global batch / median step time (``--steps`` timed steps
    after the first call and ``--warmup`` more);
  * model FLOPs per step: ``6 x MACs x batch`` with MACs those of every Conv
    and Dense of the float model's forward pass (``budget.layer_macs``;
    forward 2 FLOPs per MAC, backward twice that; attention's two
    activation matmuls are left out, about 8% of DeiT-S), the same for every
    method; and XLA's own count from the compiled step's cost analysis, which
    on a GPU leaves out the cuDNN/cuBLAS custom calls (measured on an H200:
    26.7 GFLOP for ResNet-50 at batch 64, against about 1,570 in the model);
  * on a GPU/TPU, model FLOPs utilization: model FLOPs/s over the devices'
    peak dense FLOPs for the compute dtype (a table below; unknown kinds print
    no MFU);
  * ratios to FP measured in the same run.

Each (model, method) runs in its own subprocess so that memory and compile
caches do not leak between them.

Usage (from the repository root)
  python benchmarks/scale.py [--models=resnet50,deit_s] [--methods=fp,csq,msq]
      [--batch=64] [--image-size=224] [--steps=10] [--warmup=2] [--bf16] [--quick]

  ``--quick``: batch 2 at 64x64 (DeiT-S at 32), 2 steps, a smoke test on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks.step_time import _describe, csv_choices, timed_run  # noqa: E402

CONFIGS = {"resnet50": "imagenet_r50", "deit_s": "imagenet_deit_s"}
METHODS = ("fp", "csq", "msq")
# Peak dense FLOP/s per device by (device_kind substring, dtype): vendor figures without sparsity.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,  # SXM; float32 without TF32
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v5", "bfloat16"): 459e12,
}
_TAG = "SCALE_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--models", type=csv_choices(tuple(CONFIGS)), default=list(CONFIGS))
  p.add_argument("--methods", type=csv_choices(METHODS), default=list(METHODS))
  p.add_argument("--batch", type=int, default=64, help="global batch (a multiple of the device count)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--bf16", action="store_true", help="compute_dtype=bfloat16")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--only", help=argparse.SUPPRESS)  # child: model:method
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.image_size, args.steps, args.warmup = 2, 64, 2, 1
  return args


def peak_flops(device, dtype: str) -> float | None:
  kind = getattr(device, "device_kind", "")
  for (name, dt), flops in PEAK_FLOPS.items():
    if name in kind and dt == dtype:
      return flops
  return None


def measure(model_name: str, method: str, args: argparse.Namespace) -> dict:
  import jax
  import numpy as np

  from csq_jax import budget, configlib, methods, sharding, train

  config = configlib.load(os.path.join(_ROOT, "configs", CONFIGS[model_name] + ".py"))
  config.method = method
  config.batch_size = args.batch
  config.image_size = args.image_size if model_name != "deit_s" or not args.quick else 32
  config.compute_dtype = "bfloat16" if args.bf16 else "float32"
  train.validate_config(config)
  size = config.image_size
  mesh = sharding.make_mesh(config.mesh)
  phases = train.make_phases(config, steps_per_epoch=1_281_167 // args.batch)
  model = train.create_model(config, 1000, (size, size, 3))
  state, _ = train.init_state(config, model, (size, size, 3), phases[0], jax.random.key(0))
  state = sharding.place(state, sharding.state_sharding(mesh, state))
  step = train.make_train_step(model, phases[0], methods.get(config), mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((args.batch, size, size, 3), dtype=np.float32),
           "label": rng.integers(0, 1000, args.batch, dtype=np.int32)}
  x1 = np.zeros((1, size, size, 3), np.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x1, train=False))
  model_flops = 6.0 * sum(budget.layer_macs(model, abstract, x1, train=False).values()) * args.batch
  flops = None
  try:
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # best effort: not every backend reports it
    pass
  state, _, first_s, wall, _ = timed_run(step, state, batch, args.warmup, args.steps)
  t = statistics.median(wall)
  devices = jax.devices()
  out = {"model": model_name, "method": method, "devices": len(devices), "device": _describe(devices[0]),
         "batch": args.batch, "image_size": size, "step_s": t, "images_per_s": args.batch / t,
         "first_call_s": first_s, "flops_per_step": flops, "model_flops_per_step": model_flops,
         "trainable_params": methods.trainable_params(state.params)}
  peak = peak_flops(devices[0], config.compute_dtype)
  if peak:
    out["mfu"] = model_flops / t / (peak * len(devices))
  return out


def run_child(model_name: str, method: str, args: argparse.Namespace) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--only={model_name}:{method}", f"--batch={args.batch}",
         f"--image-size={args.image_size}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  cmd += ["--bf16"] if args.bf16 else []
  cmd += ["--quick"] if args.quick else []
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith(_TAG):
      return json.loads(line[len(_TAG):])
  return {"model": model_name, "method": method, "error": (proc.stderr or proc.stdout)[-1500:]}


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.only:
    model_name, method = args.only.split(":")
    print(_TAG + json.dumps(measure(model_name, method, args)), flush=True)
    return
  print("| model | method | devices | batch | image | step (ms) | images/s | vs FP | model GFLOP/step |"
        " XLA GFLOP/step | MFU | trainable params |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for m in args.models:  # each row as soon as it is measured: a run cut short keeps what it has
    for meth in args.methods:
      rows.append(r := run_child(m, meth, args))
      print(format_row(r, rows), flush=True)


def format_row(r: dict, rows: list[dict]) -> str:
  if "error" in r:
    return f"| {r['model']} | {r['method']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} |"
  fp = next((x for x in rows if x.get("model") == r["model"] and x.get("method") == "fp" and "error" not in x), None)
  ratio = f"{r['images_per_s'] / fp['images_per_s']:.2f}x" if fp else "-"
  gflop = f"{r['flops_per_step'] / 1e9:.1f}" if r.get("flops_per_step") else "-"
  mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
  return (f"| {r['model']} | {r['method']} | {r['devices']} x {r['device']} | {r['batch']} | {r['image_size']} |"
          f" {1000 * r['step_s']:.0f} | {r['images_per_s']:.1f} | {ratio} | {r['model_flops_per_step'] / 1e9:.0f} |"
          f" {gflop} | {mfu} |"
          f" {r['trainable_params']:,} |")


if __name__ == "__main__":
  main()
