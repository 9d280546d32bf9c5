"""Exact integer export of the final hard-quantized model, and its loader.

One ``.csqx`` file holds what inference needs and nothing else: every
quantized layer's integers bit-packed at the layer's own precision plus a
sign, its step (the weight value of one integer unit, the layer's
dequantization scale), and the float tensors that stay float (BN parameters
and statistics, biases, kept layers, PACT clips) as float32. The layout is
specified in ``docs/export_format.md`` and is readable with numpy and the
Python standard library (``json``, ``struct``, ``zlib``) alone.

Precision and size. Every method's hard weight is ``W = step * q`` with an
integer ``q`` that is a signed sum of the layer's place values ``2^p``: the
grid ``[-(2^n - 1), 2^n - 1]`` of CSQ's Eq. (1) for an ``n``-bit layer, and
for CSQ the sums of its selected planes (Eq. 4). The budget
(``budget.model_size_bits``) counts ``n`` bits per weight: the magnitude. The
grid has ``2^(n+1) - 1`` levels, so a lossless fixed-length code needs a sign
on top, and the export stores ``n + 1`` bits per weight (sign-magnitude). The
theoretical size is defined to match:

    theoretical bits = sum_l N_l (b_l + [b_l > 0]) + 32 L + 32 F

over the ``L`` quantized layers (``N_l`` weights at ``b_l`` bits, one float32
step each) and the ``F`` float values kept. A 0-bit layer (CSQ with no bit
plane selected) is all zeros and takes no bits.

CSQ's signed digits can leave that grid: a weight with digit ``+1`` at one
selected plane and ``-1`` at another sums to a value between the place values
when the selected planes are not contiguous (e.g. ``2^5 - 2^0 = 31`` with
planes {0, 5, 6, 7}), which no ``b_l + 1``-bit code of the layer's grid holds
(BSQ's integers are clamped to ``2^n - 1``, so BSQ never escapes). Such weights
(at most 0.2% of the weights in the default job's CSQ runs) are escaped and
stored exactly in a short side stream, the only excess over the theoretical
size besides the header.

Exactness. The loader returns ``step * q`` in float32, equal bit for bit to
the hard weights the training run evaluated: ``jax.jit`` of
``transform.materialize(params, None, hard=True)``, as in
``train.make_eval_step``. Under ``jit`` XLA rewrites ``s / (2^n - 1)`` as
``s * (1 / (2^n - 1))``, which can differ by one ulp from the eager division,
so the step stored is the one that reproduces the jitted weights, and
``export_model`` checks that every layer's ``step * q`` equals them.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

import jax
import numpy as np

from csq_jax import quantizers, transform

MAGIC = b"CSQX"
VERSION = 1
FILENAME = "model.csqx"
_PREFIX = struct.Struct("<4sIQ")  # magic, format version, header length


class ExportError(ValueError):
  """An export that cannot be written or read; the message says what to do."""


# ----------------------------------------------------------------------------
# Integer codes (numpy only)


def _pack(bits: np.ndarray) -> bytes:
  """Rows of a ``[count, width]`` 0/1 matrix, bit 0 first, as one
  little-endian bit stream (stream bit ``i`` is bit ``i % 8`` of byte
  ``i // 8``), zero-padded to a whole byte."""
  return np.packbits(np.asarray(bits, np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack(buf, count: int, width: int) -> np.ndarray:
  """Inverse of ``_pack``: the ``[count, width]`` uint8 bit matrix."""
  bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=count * width, bitorder="little")
  return bits.reshape(count, width)


def _sign_magnitude_bits(q: np.ndarray, places: np.ndarray) -> np.ndarray:
  """``[N, len(places) + 1]``: bit ``j`` of ``|q|`` at place ``places[j]``,
  then the sign (1 for negative)."""
  mag = np.abs(q)[:, None] >> places[None, :]
  return np.concatenate([mag & 1, (q < 0)[:, None]], axis=1).astype(np.uint8)


def _sign_magnitude_values(bits: np.ndarray, places: np.ndarray) -> np.ndarray:
  """Inverse of ``_sign_magnitude_bits`` (int64); a zero-width matrix is all zeros."""
  if bits.shape[1] == 0:
    return np.zeros(bits.shape[0], np.int64)
  mag = (bits[:, :-1].astype(np.int64) << places.astype(np.int64)).sum(1)
  return np.where(bits[:, -1] == 1, -mag, mag)


def encode_integers(q: np.ndarray, places) -> tuple[bytes, dict[str, Any]]:
  """Bit-pack one layer's signed integers, sign-magnitude over its bit planes.

  A layer's grid is the set of signed sums of its place values ``2^p``,
  ``p`` in ``places`` (``0..n-1`` for an ``n``-bit layer; a CSQ layer's
  selected planes): each integer is coded in ``width = len(places) + 1`` bits,
  one per place then the sign. An integer off that grid (a CSQ weight whose
  digits of opposite signs sum to a value between non-contiguous places) is
  coded as the unused
  "negative zero" (sign 1, magnitude 0) and stored, in order, in an escape
  stream of plain sign-magnitude integers of ``escape_width`` bits.

  Returns:
    ``(main stream + escape stream, {"places", "width", "escapes", "escape_width"})``.
  """
  q = np.asarray(q, np.int64).reshape(-1)
  places = np.asarray(sorted(int(p) for p in places), np.int64)
  grid_mask = int(sum(1 << int(p) for p in places))
  off_grid = (np.abs(q) & ~grid_mask) != 0
  escaped = q[off_grid]
  width = len(places) + 1 if len(places) or escaped.size else 0
  main = _sign_magnitude_bits(np.where(off_grid, 0, q), places)
  main[off_grid, -1] = 1  # the escape code
  escape_width = int(np.abs(escaped).max()).bit_length() + 1 if escaped.size else 0
  escapes = _sign_magnitude_bits(escaped, np.arange(escape_width - 1)) if escaped.size else np.zeros((0, 0))
  code = {"places": places.tolist(), "width": width, "escapes": int(escaped.size), "escape_width": escape_width}
  return _pack(main[:, :width]) + _pack(escapes), code


def stream_bytes(count: int, width: int) -> int:
  """Bytes of ``count`` codes of ``width`` bits."""
  return (count * width + 7) // 8


def decode_integers(buf, shape, places, width: int, escapes: int, escape_width: int) -> np.ndarray:
  """Inverse of ``encode_integers``: int64 array of ``shape``."""
  count = int(np.prod(shape, dtype=np.int64))
  main = _unpack(buf, count, width)
  q = _sign_magnitude_values(main, np.asarray(places, np.int64))
  if escapes:
    values = _unpack(buf[stream_bytes(count, width):], escapes, escape_width)
    q[(main[:, -1] == 1) & (q == 0)] = _sign_magnitude_values(values, np.arange(escape_width - 1))
  return q.reshape(shape)


# ----------------------------------------------------------------------------
# Size


def stored_bits(bits: int) -> int:
  """Bits per weight of a ``bits``-bit layer on the grid ``[-(2^n-1), 2^n-1]``:
  the magnitude bits and a sign (none for a 0-bit, all-zero layer)."""
  return int(bits) + 1 if bits > 0 else 0


def theoretical_bits(params: Any, batch_stats: Any = None) -> int:
  """``sum_l N_l (b_l + [b_l > 0]) + 32 L + 32 F`` (see the module docstring):
  the quantized layers at their precision plus a sign, a float32 step per
  layer and every float value kept (params and BN statistics)."""
  total = 0
  for leaf in transform.quantized_leaves(params).values():
    total += quantizers.num_weights(leaf) * stored_bits(int(quantizers.precision(leaf))) + 32
  floats = [x for x in jax.tree_util.tree_leaves(params, is_leaf=transform.is_leaf) if not transform.is_leaf(x)]
  floats += jax.tree_util.tree_leaves(batch_stats or {})
  return total + 32 * sum(int(np.size(x)) for x in floats)


# ----------------------------------------------------------------------------
# Writing


def _host(x) -> np.ndarray:
  """A host copy; arrays sharded over several processes are all-gathered
  (a collective: every process must call ``export_model``)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@jax.jit
def _hard_weights(params):
  """The hard weights as the jitted eval step computes them."""
  return transform.materialize(params, None, hard=True)


def _step_for(leaf, q: np.ndarray, weight: np.ndarray) -> tuple[np.float32, np.ndarray]:
  """``(step, q)`` with ``step * q == weight`` exactly (see the module docstring).

  ``q`` is the quantizer's ``integer_weights``, or, where a weight sits on a
  rounding tie that the jitted ``materialize`` resolved the other way (XLA
  rewrites ``x / s`` as ``x * (1/s)``; seen in 3 of DeiT-S's 50 STE layers),
  ``rint(weight / step)``: the integers of the weights the run evaluated."""
  candidates = (jax.jit(quantizers.step_size)(leaf), quantizers.step_size(leaf))
  for step in candidates:
    step = np.float32(_host(step))
    for ints in (q, np.rint(weight / step).astype(np.int64) if step else q):
      if np.array_equal(step * ints.astype(np.float32), weight) and np.abs(ints - q).max(initial=0) <= 1:
        return step, ints
  raise ExportError(
      f"A {type(leaf).__name__} layer's hard weights are not its step times its integers;"
      " it is not exactly quantized (finalize the method's parameters before exporting)."
  )


def grid_places(leaf) -> list[int]:
  """Exponents ``p`` of the place values ``2^p`` whose signed sums form the
  layer's grid (``quantizers.grid_places``: a CSQ layer's selected bit planes,
  ``0..n-1`` for an ``n``-bit STE, BSQ, MSQ or LSQ layer). Their number is
  the layer's precision."""
  return quantizers.grid_places(jax.tree_util.tree_map(_host, leaf))


def _float_entries(prefix: str, tree: Any) -> list[tuple[str, np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=transform.is_leaf)[0]
  return [(f"{prefix}/{transform.path_str(p)}", x) for p, x in flat if not transform.is_leaf(x)]


def _exact_float(x: np.float32) -> float:
  """``x`` as the shortest decimal that reads back as the same float32 (a
  compact header), or the exact double when that fails."""
  short = float(str(np.float32(x)))
  return short if np.float32(short).view(np.uint32) == np.float32(x).view(np.uint32) else float(x)


def encode(params: Any, batch_stats: Any, meta: dict[str, Any]) -> bytes:
  """The bytes of a ``.csqx`` file (see ``docs/export_format.md``)."""
  return _encode(params, batch_stats, meta)[0]


def storage(layers: list[dict[str, Any]]) -> dict[str, Any]:
  """What the export really stores per weight, next to the counted precision.

  The budget counts a layer's selected planes ``b`` (the paper's precision);
  its integers need a sign on top (``b + 1`` bits), and a CSQ layer whose
  selected planes are not contiguous holds signed-digit sums between its
  place values (up to ``3^b`` levels: 9 for 2 planes), escaped into a side
  stream. ``export_layer_bits`` is each layer's stored bits per weight (main
  and escape streams), ``export_bits_per_weight`` their weight-count-weighted
  average, ``export_layer_levels`` the distinct integers of each layer.
  """
  count = {l["name"]: int(np.prod(l["shape"])) for l in layers}
  stored = {l["name"]: count[l["name"]] * l["width"] + l["escapes"] * l["escape_width"] for l in layers}
  total = sum(count.values())
  return {
      "export_bits_per_weight": sum(stored.values()) / total if total else None,
      "export_layer_bits": {n.removeprefix("params/"): stored[n] / count[n] for n in stored},
      "export_layer_levels": {l["name"].removeprefix("params/"): l["levels"] for l in layers},
  }


def _encode(params: Any, batch_stats: Any, meta: dict[str, Any]) -> tuple[bytes, list[dict[str, Any]]]:
  """``(the file's bytes, its layer table with each layer's number of levels)``."""
  weight_of = dict(_float_entries("params", _hard_weights(params)))
  floats = _float_entries("params", params) + _float_entries("batch_stats", batch_stats or {})
  chunks = [np.concatenate([_host(x).astype("<f4").reshape(-1) for _, x in floats] or [np.zeros(0, "<f4")]).tobytes()]
  layers, levels = [], []
  for path, leaf in transform.quantized_leaves(params).items():
    name = f"params/{path}"
    bits = int(_host(quantizers.precision(leaf)))
    q = _host(quantizers.integer_weights(leaf)).astype(np.int64)
    step, q = _step_for(leaf, q, _host(weight_of[name]))
    packed, code = encode_integers(q, grid_places(leaf))
    layers.append({"name": name, "shape": list(q.shape), "bits": bits, **code, "step": _exact_float(step)})
    levels.append(int(np.unique(q).size))
    chunks.append(packed)
  data = b"".join(chunks)
  header = {
      "meta": meta,
      "floats": [[name, list(np.shape(x))] for name, x in floats],
      "layers": layers,
      "data_bytes": len(data),
      "data_crc32": zlib.crc32(data),
  }
  packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
  blob = _PREFIX.pack(MAGIC, VERSION, len(packed_header)) + packed_header + data
  return blob, [{**l, "levels": n} for l, n in zip(layers, levels)]


def export_model(path: str, params: Any, batch_stats: Any, meta: dict[str, Any]) -> dict[str, Any]:
  """Write the hard-quantized model to ``path`` (atomically: temp file + rename).

  Args:
    path: the file to write (``.csqx`` by convention; ``FILENAME`` in a workdir).
    params: quantizer + float parameters (``TrainState.params``), finalized.
    batch_stats: BN statistics.
    meta: JSON-able identity of the model (see ``run_meta``), stored as the
      manifest's ``meta``.

  Every process must call it (sharded arrays are gathered); only process 0
  writes.

  Returns:
    ``{"export_bytes", "export_theoretical_bytes"}``: the file's size and the
    theoretical size of the module docstring, in bytes, and the stored bits
    per weight of ``storage``.
  """
  blob, layers = _encode(params, batch_stats, meta)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
  return {"export_bytes": len(blob), "export_theoretical_bytes": theoretical_bits(params, batch_stats) / 8.0,
          **storage(layers)}


def run_meta(config, num_classes: int, image_shape, test_accuracy: float | None = None) -> dict[str, Any]:
  """The manifest's identity of a run's model: what rebuilds and checks it."""
  return {
      "model": config.model, "method": config.method, "dataset": config.dataset,
      "num_classes": int(num_classes), "image_shape": [int(d) for d in image_shape],
      "act_bits": int(config.act_bits), "act_quantizer": config.act_quantizer,
      "test_accuracy": None if test_accuracy is None else float(test_accuracy),
  }


# ----------------------------------------------------------------------------
# Reading


def _read(path: str) -> tuple[dict[str, Any], memoryview]:
  """``(header, data section)`` of a ``.csqx`` file, checked."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ExportError(f"Cannot read export {path!r} ({e.strerror}); pass the model.csqx of a finished run.") from e
  if len(raw) < _PREFIX.size or raw[:4] != MAGIC:
    raise ExportError(f"{path!r} is not a csq_jax export (no CSQX header); pass the model.csqx of a finished run.")
  _, version, hlen = _PREFIX.unpack_from(raw)
  if version != VERSION:
    raise ExportError(f"{path!r} is export format version {version}; this csq_jax reads version {VERSION}.")
  try:
    header = json.loads(zlib.decompress(raw[_PREFIX.size:_PREFIX.size + hlen]))
    data = memoryview(raw)[_PREFIX.size + hlen:]
    complete = len(data) == header["data_bytes"] and zlib.crc32(data) == header["data_crc32"]
  except (zlib.error, ValueError, KeyError, TypeError) as e:
    raise ExportError(f"{path!r} has a corrupt header ({type(e).__name__}: {e}); export the run again.") from e
  if not complete:
    raise ExportError(f"{path!r} is truncated or corrupt (data size or checksum mismatch); export the run again.")
  return header, data


def read_manifest(path: str) -> dict[str, Any]:
  """The header of a ``.csqx`` file: ``meta``, ``floats``, ``layers``."""
  return _read(path)[0]


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, x in flat.items():
    *parents, last = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = x
  return out


def _tensors(header: dict[str, Any], data) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``({name: float32 array}, {name: int64 q})``: the float tensors, then the
  quantized layers, stored back to back in header order."""
  floats, ints, pos = {}, {}, 0
  for name, shape in header["floats"]:
    n = int(np.prod(shape, dtype=np.int64))
    floats[name] = np.frombuffer(data, "<f4", n, pos).reshape(shape).astype(np.float32)
    pos += 4 * n
  for layer in header["layers"]:
    count = int(np.prod(layer["shape"], dtype=np.int64))
    nbytes = stream_bytes(count, layer["width"]) + stream_bytes(layer["escapes"], layer["escape_width"])
    ints[layer["name"]] = decode_integers(data[pos:pos + nbytes], layer["shape"], layer["places"], layer["width"],
                                          layer["escapes"], layer["escape_width"])
    pos += nbytes
  if pos != len(data):
    raise ValueError(f"the header describes {pos} data bytes, the file holds {len(data)}")
  return floats, ints


def _decoded(path: str):
  header, data = _read(path)
  try:
    floats, ints = _tensors(header, data)
  except (KeyError, ValueError, TypeError) as e:
    raise ExportError(f"{path!r} has an inconsistent header ({type(e).__name__}: {e}); export the run again.") from e
  return header, floats, ints


def load_export(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Rebuild the float parameters of a ``.csqx`` file.

  Returns:
    ``(params, batch_stats, manifest)``: nested dicts of float32 numpy arrays
    for ``model.apply({"params": params, "batch_stats": batch_stats}, x)``,
    each quantized kernel ``step * q`` (the run's hard weights, exactly), and
    the header.

  Raises:
    ExportError: missing, truncated or corrupt file.
  """
  header, tensors, ints = _decoded(path)
  steps = {layer["name"]: np.float32(layer["step"]) for layer in header["layers"]}
  tensors.update({name: steps[name] * q.astype(np.float32) for name, q in ints.items()})
  tree = _nest(tensors)
  return tree.get("params", {}), tree.get("batch_stats", {}), header


def load_integers(path: str) -> dict[str, np.ndarray]:
  """``{"params/<path>": int64 q}`` of every quantized layer of a ``.csqx`` file."""
  return _decoded(path)[2]


# ----------------------------------------------------------------------------
# Command line

CLI_DOC = """Export a finished run: ``python -m csq_jax.export --workdir=RUN [--format=csqx|onnx]``.

``--format=csqx`` (the default) checks the run's ``model.csqx`` (written when
the run finishes) and prints its size and layers; ``--format=onnx`` writes
``RUN/model.onnx`` from it, for ONNX Runtime (``docs/onnx_export.md``), and
prints its size against the float ONNX model's.
"""

FORMATS = ("csqx", "onnx")


def export_workdir(workdir: str, fmt: str = "csqx", out: str | None = None) -> dict[str, Any]:
  """What ``python -m csq_jax.export`` prints (one JSON object)."""
  path = os.path.join(workdir, FILENAME)
  if fmt == "onnx":
    from csq_jax import onnx_export

    return onnx_export.export_workdir(workdir, out)
  if fmt != "csqx":
    raise ExportError(f"Unknown export format {fmt!r}; expected one of {FORMATS}.")
  header = read_manifest(path)
  load_integers(path)  # decodes every layer: a complete, consistent file
  return {"export": path, "format": "csqx", "export_bytes": os.path.getsize(path),
          "quantized_layers": len(header["layers"]), "meta": header["meta"]}


def _main(argv, flag_values) -> None:
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir, fmt, out = (f.value for f in flag_values)
  if not workdir:
    raise app.UsageError("--workdir is required (the directory of a finished run).")
  try:
    print(json.dumps(export_workdir(workdir, fmt, out)))
  except ExportError as e:
    raise SystemExit(f"csq_jax: error: {e}") from None


if __name__ == "__main__":
  from absl import flags

  from csq_jax import cli
  from csq_jax import export as _export  # the module others import: its ExportError is the one raised

  _flags = (flags.DEFINE_string("workdir", None, "Directory of a finished run (holds model.csqx)."),
            flags.DEFINE_enum("format", "csqx", FORMATS, "csqx: check the run's model.csqx; onnx: write model.onnx."),
            flags.DEFINE_string("out", None, "ONNX file to write (default: WORKDIR/model.onnx)."))
  cli.run(lambda argv: _export._main(argv, _flags), CLI_DOC, ["csq_jax.export", "__main__"])
