"""Gradient all-reduce bytes per train step, data parallel, read off the compiled HLO.

What it measures
  The train step of ``csq_jax.train.make_train_step`` on a mesh
  (``csq_jax.sharding.make_mesh``; default ``data=8`` over 8 fake CPU
  devices), for ResNet-20 on CIFAR-shaped batches, per method (FP, CSQ, BSQ,
  MSQ by default), built as ``train.train_and_evaluate`` builds it. The step
  is lowered and compiled for the mesh (``step.lower(state, batch).compile()``)
  and every collective of the optimized HLO is summed
  (``sharding.collective_bytes``: result bytes of each all-reduce,
  reduce-scatter, all-gather, once per step). No step is run.

What to expect
  Under CSQ the parameters are 2 x n_bits bit-plane logits per weight (16x
  the float weights at 8 bits), but only the materialized weight enters the
  model: the per-device partial gradient is the materialized weight's, XLA
  all-reduces that, and the bit planes' gradients follow pointwise on every
  device. So the all-reduce bytes of CSQ should match FP's (the issue's bound:
  at most 1.2x). BN's batch statistics add small all-reduces to every method.

Usage
  python benchmarks/allreduce.py [--devices=8] [--mesh=data=8] [--methods=fp,csq,bsq,msq]
      [--model=resnet20] [--batch_size=128] [--json=PATH]

``--mesh=data=4,fsdp=2`` also shards the large state leaves (all-gathers of
the materialized weights and reduce-scatters of their gradients appear).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from benchmarks.step_time import csv_choices  # noqa: E402

METHODS = ("fp", "ste", "csq", "csq_uniform", "bsq", "msq")
TARGET_RATIO = 1.2  # CSQ all-reduce bytes / FP's, the bound
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
STEPS_PER_EPOCH = 390  # CIFAR-10 at batch 128; only shapes the schedules


def _mesh_arg(s: str):
  """``data=8`` or ``data=4,fsdp=2`` -> ``(("data", 8), ("fsdp", 2))``."""
  try:
    return tuple((name.strip(), int(size)) for name, size in (item.split("=") for item in s.split(",")))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected e.g. data=8 or data=4,fsdp=2, got {s!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices when on CPU (default 8)")
  p.add_argument("--mesh", type=_mesh_arg, default=None, help="mesh axes (default data=<all devices>)")
  p.add_argument("--methods", type=csv_choices(METHODS), default=["fp", "csq", "bsq", "msq"],
                 help="comma-separated methods (default fp,csq,bsq,msq; fp is always added)")
  p.add_argument("--model", default="resnet20", help="model in csq_jax.models (default resnet20)")
  p.add_argument("--batch_size", type=int, default=128, help="global batch (default 128)")
  p.add_argument("--n_bits", type=int, default=8, help="bit planes of csq/bsq, start bits of msq (default 8)")
  p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
  args = p.parse_args(argv)
  if "fp" not in args.methods:
    args.methods = ["fp"] + args.methods
  return args


def measure(method: str, mesh, args) -> dict:
  """Collective bytes of one method's compiled train step on ``mesh``."""
  import jax
  import numpy as np

  from configs import default as default_config
  from csq_jax import methods, sharding, train, transform

  config = default_config.get_config()
  config.model, config.method, config.n_bits = args.model, method, args.n_bits
  config.batch_size, config.target_bits = args.batch_size, 4.0
  phases = train.make_phases(config, STEPS_PER_EPOCH)
  model = train.create_model(config, NUM_CLASSES)
  state, _ = train.init_state(config, model, IMAGE_SHAPE, phases[0], jax.random.key(0))
  step = train.make_train_step(model, phases[0], methods.get(config), mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((args.batch_size,) + IMAGE_SHAPE, dtype=np.float32),
           "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)}
  t0 = time.perf_counter()
  hlo = step.lower(state, batch).compile().as_text()
  compile_s = time.perf_counter() - t0
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
  weights = jax.eval_shape(lambda p: transform.materialize(p, 1.0), state.params)
  return {
      "method": method,
      "collectives": sharding.collective_bytes(hlo),
      "param_bytes": nbytes(state.params),
      "materialized_bytes": nbytes(weights),
      "compile_s": compile_s,
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  # Fake devices must be requested before JAX starts its CPU backend.
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  from absl import logging

  from csq_jax import sharding

  logging.set_verbosity(logging.ERROR)  # the 1x1-shortcut rule matches nothing in small models
  mesh = sharding.make_mesh(args.mesh or (("data", -1),))
  print(f"{args.model}, global batch {args.batch_size}, mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}")
  results = [measure(m, mesh, args) for m in args.methods]
  fp = results[0]["collectives"]["all-reduce"]["bytes"]
  mib = lambda b: b / 2**20
  print(f"{'method':<12}{'all-reduce':>11}{'MiB/step':>10}{'x FP':>7}{'reduce-scatter MiB':>20}"
        f"{'all-gather MiB':>16}{'param MiB':>11}{'weight MiB':>12}{'compile s':>11}")
  for r in results:
    c = r["collectives"]
    r["allreduce_ratio_to_fp"] = c["all-reduce"]["bytes"] / fp if fp else None
    print(f"{r['method']:<12}{c['all-reduce']['count']:>11}{mib(c['all-reduce']['bytes']):>10.3f}"
          f"{r['allreduce_ratio_to_fp']:>7.3f}{mib(c['reduce-scatter']['bytes']):>20.3f}"
          f"{mib(c['all-gather']['bytes']):>16.3f}{mib(r['param_bytes']):>11.3f}"
          f"{mib(r['materialized_bytes']):>12.3f}{r['compile_s']:>11.1f}")
  print("all-reduce: ops and bytes per device per step; param MiB: the trained parameters (bit planes for"
        " csq/bsq); weight MiB: the materialized float weights the model sees.")
  ok = True
  for r in results:
    if r["method"] == "csq":
      ratio = r["allreduce_ratio_to_fp"]
      ok = ratio <= TARGET_RATIO
      print(f"CSQ / FP all-reduce bytes: {ratio:.3f} (target <= {TARGET_RATIO}: {'met' if ok else 'MISSED'})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "batch_size": args.batch_size, "mesh": dict(mesh.shape),
                 "results": results}, f, indent=2)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
