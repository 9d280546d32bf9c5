"""ONNX Runtime CPU latency and file size: the quantized ONNX export vs the float model.

What it measures
  For each model, two ONNX files of the same network (``csq_jax/onnx_export.py``):

    quantized  every quantized kernel as INT4/INT8/INT16 integers and
               ``DequantizeLinear`` (the ``--format=onnx`` export)
    float      the same graph with each kernel stored as float32 (the hard
               weights ``step * q``: numerically the same model)

  and their ONNX Runtime CPU latency per call, at batch 1 and at a larger
  batch, in three sessions: ``float``; ``quantized`` as csq_jax runs it
  (``onnx_export.session``: fused integer matmuls compute in float32, so the
  logits are the JAX model's); ``quantized, ORT default`` (ONNX Runtime's own
  default, whose fused ``MatMulNBits`` quantizes the matmul inputs to int8:
  faster, not exact). Sizes: the serialized files, and the ``.csqx`` export.

Weights
  ``--workdir=RUN`` takes a finished run's ``model.csqx`` (its model only);
  otherwise each model of ``--models`` gets random weights quantized by STE at
  ``--bits`` bits (3 bits: integers in [-7, 7], INT4 everywhere), through
  ``transform.quantize_params`` and the model's default rules.

How
  Sessions use ``--threads`` intra-op threads (default 1: a shared machine
  disturbs one thread least), all graph optimizations (ONNX Runtime's
  default level). Random normal inputs; ``--warmup`` calls, then ``--repeats``
  timed calls; the table shows the median wall time and, in brackets, the
  interquartile range, plus the median process CPU time.

Usage (from the repository root)
  python benchmarks/onnx_latency.py [--models=small_cnn,resnet20] [--workdir=RUN]
      [--batch=64] [--bits=3] [--threads=1] [--repeats=50] [--warmup=5] [--json=PATH]

  ``--models`` also takes resnet18 and deit_s (224x224, 1000 classes; use a
  smaller ``--batch``, e.g. 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from csq_jax import export, models, onnx_export, transform  # noqa: E402

SETTINGS = {  # model: (input shape HWC, classes)
    "small_cnn": ((8, 8, 1), 10),
    "resnet20": ((32, 32, 3), 10),
    "resnet18": ((224, 224, 3), 1000),
    "deit_s": ((224, 224, 3), 1000),
}


def csv_choices(choices):
  def parse(s):
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items or any(x not in choices for x in items):
      raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}; got {s!r}")
    return items

  return parse


def random_csqx(name: str, bits: int, path: str) -> None:
  """``path``: a ``.csqx`` export of ``name`` with random weights quantized by STE at ``bits`` bits."""
  shape, classes = SETTINGS[name]
  model = models.create_model(name, classes, image_size=shape[0])
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape))
  rng = np.random.default_rng(0)

  def fill(p, s):
    leaf = p[-1].key
    if leaf in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    if leaf in ("bias", "mean"):
      return np.zeros(s.shape, np.float32)
    return (rng.standard_normal(s.shape) / np.sqrt(max(int(np.prod(s.shape[:-1])), 1))).astype(np.float32)

  v = jax.tree_util.tree_map_with_path(fill, abstract)
  q, _ = transform.quantize_params(v["params"], transform.rules_from_config(models.DEFAULT_RULES[name]),
                                   transform.QuantizeSpec("ste", bits), jax.random.key(0))
  meta = {"model": name, "method": "ste", "num_classes": classes, "image_shape": list(shape),
          "act_bits": 32, "act_quantizer": "pact"}
  export.export_model(path, q, v.get("batch_stats", {}), meta)


def time_session(sess, x: np.ndarray, warmup: int, repeats: int) -> dict:
  for _ in range(warmup):
    onnx_export.run(sess, x)
  wall, cpu = [], []
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    onnx_export.run(sess, x)
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  q = statistics.quantiles(wall, n=4)
  return {"median_ms": 1e3 * statistics.median(wall), "iqr_ms": 1e3 * (q[2] - q[0]),
          "cpu_median_ms": 1e3 * statistics.median(cpu)}


def measure(csqx_path: str, args) -> dict:
  manifest = export.read_manifest(csqx_path)
  meta = manifest["meta"]
  quantized = onnx_export.from_csqx(csqx_path)
  float_model = onnx_export.from_csqx(csqx_path, quantized=False)
  types = onnx_export.read_info(quantized)["layer_types"]
  sessions = {
      "float": onnx_export.session(float_model, args.threads),
      "quantized": onnx_export.session(quantized, args.threads),
      "quantized_ort_default": onnx_export.session(quantized, args.threads, exact=False),
  }
  rows = []
  for batch in sorted({1, args.batch}):
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(meta["image_shape"])).astype(np.float32)
    logits = {k: onnx_export.run(s, x) for k, s in sessions.items()}
    scale = np.abs(logits["float"]).max()
    rows.append({
        "batch": batch,
        **{k: time_session(s, x, args.warmup, args.repeats) for k, s in sessions.items()},
        "max_rel_diff_quantized": float(np.abs(logits["quantized"] - logits["float"]).max() / scale),
        "max_rel_diff_ort_default": float(np.abs(logits["quantized_ort_default"] - logits["float"]).max() / scale),
    })
  return {
      "model": meta["model"], "method": meta.get("method"), "csqx_bytes": os.path.getsize(csqx_path),
      "onnx_bytes": quantized.ByteSize(), "float_onnx_bytes": float_model.ByteSize(),
      "layer_types": {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))},
      "rows": rows,
  }


def print_table(results: list[dict], threads: int) -> None:
  print(f"ONNX Runtime CPU latency, {threads or 'default'} intra-op thread(s); median ms per call [IQR];"
        " cpu = median process CPU ms")
  print(f"{'model':10} {'batch':>5} {'float':>18} {'quantized':>18} {'quant/float':>11} {'ORT default':>18}"
        f" {'cpu float':>10} {'cpu quant':>10} {'cpu ORT def':>11}")
  for r in results:
    for row in r["rows"]:
      f, q, d = row["float"], row["quantized"], row["quantized_ort_default"]
      cell = lambda t: f"{t['median_ms']:9.3f} [{t['iqr_ms']:6.3f}]"  # noqa: E731
      print(f"{r['model']:10} {row['batch']:5d} {cell(f):>18} {cell(q):>18} {q['median_ms'] / f['median_ms']:11.2f}"
            f" {cell(d):>18} {f['cpu_median_ms']:10.3f} {q['cpu_median_ms']:10.3f} {d['cpu_median_ms']:11.3f}")
  print()
  print(f"{'model':10} {'float .onnx':>12} {'int .onnx':>12} {'ratio':>6} {'.csqx':>10}  integer types")
  for r in results:
    print(f"{r['model']:10} {r['float_onnx_bytes']:12,d} {r['onnx_bytes']:12,d}"
          f" {r['float_onnx_bytes'] / r['onnx_bytes']:6.2f} {r['csqx_bytes']:10,d}  {r['layer_types']}")
  print()
  for r in results:
    for row in r["rows"]:
      print(f"{r['model']} batch {row['batch']}: logits vs float model, max |diff| / max |logit|:"
            f" quantized {row['max_rel_diff_quantized']:.2e}, ORT default {row['max_rel_diff_ort_default']:.2e}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=csv_choices(tuple(SETTINGS)), default=["small_cnn", "resnet20"])
  p.add_argument("--workdir", default=None, help="a finished run: benchmark its model.csqx instead of --models")
  p.add_argument("--batch", type=int, default=64, help="the larger batch (batch 1 is always measured)")
  p.add_argument("--bits", type=int, default=3, help="STE bits of the random-weight models")
  p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args()
  results = []
  if args.workdir:
    results.append(measure(os.path.join(args.workdir, export.FILENAME), args))
  else:
    with tempfile.TemporaryDirectory() as tmp:
      for name in args.models:
        path = os.path.join(tmp, f"{name}.csqx")
        random_csqx(name, args.bits, path)
        results.append(measure(path, args))
  print_table(results, args.threads)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
