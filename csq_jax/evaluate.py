"""Evaluate an exported model: ``python -m csq_jax.evaluate --export=FILE --config=CONFIG``.

A ``.csqx`` file: builds the config's model, loads the integer export
(``export.load_export``: each quantized kernel is ``step * q``, exactly the
run's hard weights), checks that the export belongs to that model and data
set, evaluates the test split with the training run's eval step and prints
one JSON line, e.g.

  python -m csq_jax.evaluate --export=runs/default/model.csqx --config=configs/default.py

A ``.onnx`` file (``python -m csq_jax.export --workdir=RUN --format=onnx``):
runs it in ONNX Runtime on the CPU over the same test batches instead
(``docs/onnx_export.md``); the accuracy equals the run's.

Config overrides (``--config.dataset=...``) work as for ``csq_jax.main``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from csq_jax import cli, data, export, train

# Manifest fields that must agree with the config (and the data set) for the
# export to be this model; the method does not change the forward pass.
_CHECKED = ("model", "dataset", "num_classes", "act_bits", "act_quantizer")


def _check_identity(manifest: dict[str, Any], config, num_classes: int, path: str) -> None:
  expected = {"model": config.model, "dataset": config.dataset, "num_classes": num_classes,
              "act_bits": int(config.act_bits), "act_quantizer": config.act_quantizer}
  found = manifest.get("meta", {})
  diff = {k: (found.get(k), expected[k]) for k in _CHECKED if found.get(k) != expected[k]}
  if diff:
    raise export.ExportError(
        f"{path!r} is an export of another model: {diff} (export vs config). Pass the config of the run"
        " that wrote it, or override those fields (e.g. --config.model=...)."
    )


def _check_structure(loaded: dict[str, Any], expected: dict[str, Any], what: str, path: str) -> None:
  """Every array of the model's init is in the export with its shape (and nothing else)."""
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  if got != want:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    raise export.ExportError(
        f"{path!r} does not fit this config's model ({what}: missing {missing[:3]}, unexpected {extra[:3]},"
        f" other shapes {[(k, got[k], want[k]) for k in shapes[:3]]}). Pass the config of the run that wrote it."
    )


def evaluate_export(config, path: str) -> dict[str, Any]:
  """Test accuracy and loss of the export at ``path`` under ``config``'s model and data.

  Raises:
    export.ExportError: missing/corrupt file, or an export of another model.
    data.DataError: the config's data set cannot be loaded.
  """
  train.validate_config(config)
  manifest = export.read_manifest(path)
  ds = data.load_dataset(config)
  _check_identity(manifest, config, ds.num_classes, path)
  params, batch_stats, manifest = export.load_export(path)
  model = train.create_model(config, ds.num_classes, ds.image_shape)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + tuple(ds.image_shape)), train=False))
  _check_structure(params, init["params"], "params", path)
  _check_structure(batch_stats, init.get("batch_stats", {}), "batch_stats", path)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, batch_stats, None)
  accuracy, loss = train.evaluate(train.make_eval_step(model, hard=True), state, ds, config.eval_batch_size)
  meta = manifest["meta"]
  return {
      "export": path, "model": meta.get("model"), "method": meta.get("method"), "dataset": meta.get("dataset"),
      "test_accuracy": float(accuracy), "test_loss": float(loss), "num_test": ds.num_test,
      "run_test_accuracy": meta.get("test_accuracy"),
  }


def evaluate_onnx(config, path: str) -> dict[str, Any]:
  """Test accuracy and loss of the ONNX model at ``path`` in ONNX Runtime
  (CPU, weights dequantized at load: ``onnx_export.session``), on ``config``'s test split
  in its eval batches.

  Raises:
    export.ExportError: missing/unreadable file, not a csq_jax ONNX model, or
      one of another model; onnxruntime not installed.
    data.DataError: the config's data set cannot be loaded.
  """
  from csq_jax import onnx_export

  train.validate_config(config)
  info = onnx_export.read_info(onnx_export.load(path))
  ds = data.load_dataset(config)
  _check_identity(info, config, ds.num_classes, path)
  meta = info["meta"]
  if list(meta.get("image_shape", [])) != [int(d) for d in ds.image_shape]:
    raise export.ExportError(f"{path!r} takes {meta.get('image_shape')} images; the config's data set has"
                             f" {list(ds.image_shape)}. Pass the config of the run that wrote it.")
  sess = onnx_export.session(path)
  correct = loss = count = 0.0
  for batch in data.eval_batches(ds, config.eval_batch_size):
    mask = np.asarray(batch["mask"], np.float64)
    logits = onnx_export.run(sess, np.asarray(batch["image"]))
    correct += float(np.sum((logits.argmax(-1) == np.asarray(batch["label"])) * mask))
    loss += float(np.sum(np.asarray(train.cross_entropy(logits, batch["label"]), np.float64) * mask))
    count += float(mask.sum())
  return {
      "export": path, "format": "onnx", "model": meta.get("model"), "method": meta.get("method"),
      "dataset": meta.get("dataset"), "test_accuracy": correct / count, "test_loss": loss / count,
      "num_test": ds.num_test, "run_test_accuracy": meta.get("test_accuracy"),
  }


def evaluate_file(config, path: str) -> dict[str, Any]:
  """``evaluate_onnx`` for a ``.onnx`` file, else ``evaluate_export``."""
  return evaluate_onnx(config, path) if path.endswith(".onnx") else evaluate_export(config, path)


def _define_flags():
  """The CLI's flags, defined only when run as a script (``csq_jax.main``
  defines its own ``--config``)."""
  config = config_flags.DEFINE_config_file("config", None, "Config of the run that wrote the export.",
                                           lock_config=True)
  path = flags.DEFINE_string("export", None, "The .csqx file (a run's workdir/model.csqx), or a .onnx file"
                             " (python -m csq_jax.export --workdir=RUN --format=onnx), run in ONNX Runtime.")
  flags.mark_flags_as_required(["config", "export"])
  return config, path


def main(argv, config_flag, export_flag):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    result = evaluate_file(config_flag.value, export_flag.value)
  except (export.ExportError, data.DataError, train.ConfigError) as e:
    sys.exit(f"csq_jax: error: {e}")
  print(json.dumps(result))


if __name__ == "__main__":
  _flags = _define_flags()
  cli.run(lambda argv: main(argv, *_flags), __doc__, ["csq_jax.evaluate", "__main__"])
