"""A latency cost table for ``budget_weighting=table:PATH``:
``python -m csq_jax.profile --config=CONFIG --out=costs.json``.

For each layer the config's rules count (``quantize`` and ``fixed`` kernels:
Conv and Dense), one ONNX graph of that layer alone, as the ONNX export
writes it (``onnx_export.Graph``: the kernel's integers at the narrowest
ONNX integer type, INT4 where they fit, and ``DequantizeLinear``), at each
precision of ``--bits`` (default: the config's ``allowed_bits``, else 1 to
``n_bits``), with random integers filling that precision's grid
``[-(2^n - 1), 2^n - 1]``, on an input of the layer's own shape (found by
tracing the model once). Each is timed in ONNX Runtime on this machine's CPU:
``--warmup`` calls, then ``--repeats`` timed calls; the table keeps the
median in milliseconds and the spread (10th and 90th percentiles), and the
float32 layer for reference.

The JSON it writes is what ``budget.load_cost_table`` reads::

  {"unit": "ms", "runtime": "onnxruntime 1.x (CPUExecutionProvider)", "cpu": ..., "threads": 1,
   "batch": 1, "model": ..., "bits": [...],
   "layers": {"conv1/kernel": {"3": {"median": 0.021, "p10": ..., "p90": ...}, ...}, ...},
   "float": {"conv1/kernel": {"median": ..., ...}, ...}}

On the target device: install the package with the ``onnx`` extra there
(``pip install -e '.[onnx]'``), run the same command with the run's config,
copy ``costs.json`` back and train with
``--config.budget_weighting=table:costs.json``. ``--session=default`` (the
default) times ONNX Runtime's own graph optimizations, as a deployment runs
the file; ``--session=exact`` the dequantize-at-load session that
``csq_jax.evaluate`` uses.

Measured here (README): on a CPU, ONNX Runtime has no integer kernel for a
convolution whose activations are float, so a weight-only quantized layer
costs about the same at every precision; a table of such costs cannot steer a
budget, and ``load_cost_table`` says so.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from csq_jax import allowed_bits, cli, export, onnx_export, train, transform


def counted_layers(config, model, image_shape) -> dict[str, dict[str, Any]]:
  """``{kernel path: geometry}`` of every Conv/Dense kernel the rules count
  (``quantize`` or ``fixed``): kernel shape, per-example input shape,
  strides, padding and groups, from one abstract forward pass."""
  rules = transform.rules_from_config(config.rules)
  layers: dict[str, dict[str, Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
      path = "/".join(mod.scope.path) + "/kernel"
      i = transform.match_rule(path, rules)
      if i is not None and rules[i].action in ("quantize", "fixed"):
        conv = isinstance(mod, nn.Conv)
        strides = mod.strides if conv else 1
        layers[path] = {
            "kind": "conv" if conv else "dense", "input_shape": tuple(args[0].shape[1:]),
            "kernel_shape": tuple(mod.variables["params"]["kernel"].shape),
            "strides": int(strides if isinstance(strides, int) else strides[0]),
            "padding": mod.padding if conv else None,
            "groups": int(mod.feature_group_count) if conv else 1,
        }
    return next_fun(*args, **kwargs)

  def run(inp):
    variables = model.init(jax.random.key(0), inp, train=False)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, inp, train=False)

  jax.eval_shape(run, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return layers


def layer_graph(name: str, geometry: dict[str, Any], q: np.ndarray | None, batch: int, quantized: bool = True):
  """The ONNX model of one layer: ``x`` (NCHW, or ``[batch, ..., in]`` for a
  Dense) -> the layer with kernel ``step * q`` (integers + DequantizeLinear,
  or float32 with ``quantized=False``) -> ``y``."""
  onnx = onnx_export._onnx()
  key, scope = f"params/{name}", name.removesuffix("/kernel")  # name: a counted kernel's path
  g = onnx_export.Graph({}, {key: q}, {key: np.float32(0.01)}, quantized)
  shape = geometry["input_shape"]
  if geometry["kind"] == "conv":
    if geometry["groups"] != 1:
      raise export.ExportError(f"{name}: grouped convolutions have no ONNX emitter here.")
    h, w, c = shape
    y, _ = g.conv("x", (h, w), scope, geometry["strides"], geometry["padding"])
    x_shape = [batch, c, h, w]
  else:
    y = g.dense("x", scope) if len(shape) == 1 else g.dense_nd("x", scope)
    x_shape = [batch, *shape]
  g.nodes.append(onnx.helper.make_node("Identity", [y], ["y"], name="y"))
  graph = onnx.helper.make_graph(g.nodes, f"layer_{scope}",
                                 [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                                 [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                 g.initializers)
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)])
  proto.ir_version = 10
  return proto, x_shape


def time_session(sess, x: np.ndarray, warmup: int, repeats: int) -> dict[str, float]:
  """Median, 10th and 90th percentile of ``repeats`` calls, in ms."""
  feed = {"x": x}
  for _ in range(warmup):
    sess.run(None, feed)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sess.run(None, feed)
    times.append(1e3 * (time.perf_counter() - t0))
  p10, median, p90 = np.percentile(times, [10, 50, 90])
  return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def profile(config, bits: tuple[int, ...], batch: int = 1, threads: int = 1, warmup: int = 10,
            repeats: int = 100, exact: bool = False, image_shape=None, num_classes: int | None = None,
            echo=None) -> dict[str, Any]:
  """The cost table (module docstring) of ``config``'s counted layers."""
  import onnxruntime as ort

  if image_shape is None or num_classes is None:
    from csq_jax import data
    ds = data.load_dataset(config)
    image_shape, num_classes = ds.image_shape, ds.num_classes
  model = train.create_model(config, num_classes, image_shape)
  layers = counted_layers(config, model, image_shape)
  rng = np.random.default_rng(0)
  table: dict[str, Any] = {
      "unit": "ms", "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
      "session": "exact" if exact else "default", "cpu": platform.processor() or platform.machine(),
      "threads": threads, "batch": batch, "model": config.model, "bits": list(bits), "layers": {}, "float": {}}
  for name, geometry in layers.items():
    table["layers"][name] = {}
    x = None
    for b in (None, *bits):  # None: the float32 layer
      top = 2**(b or 8) - 1
      q = rng.integers(-top, top + 1, size=geometry["kernel_shape"])
      proto, x_shape = layer_graph(name, geometry, q, batch, quantized=b is not None)
      x = rng.standard_normal(x_shape).astype(np.float32) if x is None else x
      sess = onnx_export.session(proto, threads, exact=exact)
      stats = time_session(sess, x, warmup, repeats)
      if b is None:
        table["float"][name] = stats
      else:
        table["layers"][name][str(b)] = stats
    if echo:
      row = " ".join(f"{b}b {table['layers'][name][str(b)]['median']:.4f}" for b in bits)
      echo(f"{name}: float {table['float'][name]['median']:.4f} ms | {row}")
  return table


def _define_flags():
  """The CLI's flags, defined only when run as a script (other modules that
  define ``--config``, as ``csq_jax.sweep``, may be imported beside this one)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "The run's config (its model, rules and data shape).",
                                             lock_config=True),
      out=flags.DEFINE_string("out", "costs.json", "Where to write the cost table (JSON)."),
      bits=flags.DEFINE_string("bits", None, "Precisions to time, e.g. '3,7' or a profile name (default: the"
                               " config's allowed_bits, else 1..n_bits)."),
      batch=flags.DEFINE_integer("batch", 1, "Examples per call."),
      threads=flags.DEFINE_integer("threads", 1, "ONNX Runtime intra-op threads."),
      warmup=flags.DEFINE_integer("warmup", 10, "Untimed calls per layer and precision."),
      repeats=flags.DEFINE_integer("repeats", 100, "Timed calls per layer and precision."),
      session=flags.DEFINE_enum("session", "default", ["default", "exact"],
                                "ONNX Runtime's own optimizations (default) or dequantize-at-load (exact)."),
  )


def main(argv, f) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = f["config"].value
  try:
    train.validate_config(config)
    bits = allowed_bits.parse(f["bits"].value) if f["bits"].value else allowed_bits.parse(config.allowed_bits)
    bits = bits or tuple(range(1, config.n_bits + 1))
    table = profile(config, bits, f["batch"].value, f["threads"].value, f["warmup"].value, f["repeats"].value,
                    f["session"].value == "exact", echo=print)
  except (ValueError, export.ExportError) as e:
    sys.exit(f"csq_jax: error: {e}")
  except ImportError:
    sys.exit("csq_jax: error: profiling runs ONNX Runtime: pip install -e '.[onnx]'.")
  with open(f["out"].value, "w") as out:
    json.dump(table, out, indent=1)
  print(json.dumps({"out": f["out"].value, "layers": len(table["layers"]), "bits": list(bits)}))


if __name__ == "__main__":
  _flags = _define_flags()
  cli.run(lambda argv: main(argv, _flags), __doc__, ["csq_jax.profile", "__main__"])
