"""Tests of the exact integer export (csq_jax/export.py) and the evaluate CLI."""

import json
import os
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config, restore_final_state
from csq_jax import data, evaluate, export, methods, models, quantizers, train, transform
from csq_jax.quantizers import bsq, msq


# The numpy-only decoder of docs/export_format.md, verbatim.
def read_csqx(path):
  """({name: float32 array}, {name: int64 integers}, header) of a .csqx file."""
  raw = open(path, "rb").read()
  magic, version, header_len = struct.unpack("<4sIQ", raw[:16])
  assert magic == b"CSQX" and version == 1, "not a version-1 .csqx file"
  header = json.loads(zlib.decompress(raw[16:16 + header_len]))
  data, pos = np.frombuffer(raw, np.uint8, offset=16 + header_len), 0
  assert len(data) == header["data_bytes"] and zlib.crc32(data) == header["data_crc32"], "corrupt"

  def bits(count, width):  # the next bit stream, as a [count, width] matrix
    nonlocal pos
    nbytes = (count * width + 7) // 8
    b = np.unpackbits(data[pos:pos + nbytes], count=count * width, bitorder="little")
    pos += nbytes
    return b.reshape(count, width).astype(np.int64)

  def sign_magnitude(b, places):  # bit j is worth 2**places[j]; the last bit is the sign
    mag = (b[:, :-1] << np.asarray(places, np.int64)).sum(1)
    return np.where(b[:, -1] == 1, -mag, mag)

  tensors, integers = {}, {}
  for name, shape in header["floats"]:
    n = int(np.prod(shape))
    tensors[name] = data[pos:pos + 4 * n].view("<f4").reshape(shape)
    pos += 4 * n
  for layer in header["layers"]:
    n, e = int(np.prod(layer["shape"])), layer["escape_width"]
    q = np.zeros(n, np.int64)
    if layer["width"]:  # width 0: a 0-bit layer, all zeros
      b = bits(n, layer["width"])
      q = sign_magnitude(b, layer["places"])
      if layer["escapes"]:  # "negative zero" codes take their values from the escape stream
        q[(b[:, -1] == 1) & (q == 0)] = sign_magnitude(bits(layer["escapes"], e), range(e - 1))
    integers[layer["name"]] = q.reshape(layer["shape"])
    tensors[layer["name"]] = np.float32(layer["step"]) * integers[layer["name"]].astype(np.float32)
  return tensors, integers, header


def _flat(tree, prefix):
  return {f"{prefix}/{transform.path_str(p)}": np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bitwise_equal(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _jit_hard(params):
  """The hard weights as the run's jitted eval step computes them (independent of export.py)."""
  return jax.jit(lambda p: transform.materialize(p, None, hard=True))(params)


# ----------------------------------------------------------------------------
# Leaf level, every quantizer, no training


def _small_model_params():
  """A four-conv CNN's variables, random normal (shapes from an abstract init: no compile)."""
  model = models.small_cnn.SmallCNN(num_classes=3, stages=((4, 4), (4, 6)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # variances > 0
  return model, variables["params"], variables["batch_stats"]


RULES = transform.rules_from_config([
    ("conv1/kernel", "fixed", 4),  # STE at 4 bits inside any method
    ("conv2/kernel", "float"),  # kept float
    (".*kernel", "quantize"),
])


def _quantized(method):
  """The small CNN's params under ``method``, with the edge cases each quantizer has."""
  _, params, batch_stats = _small_model_params()
  q, _ = transform.quantize_params(params, RULES, transform.QuantizeSpec(method, 5))
  if method == "csq":
    # conv0: 0-bit (no plane selected); head: planes {0, 2, 3} with random signed
    # digits, so some weights leave the sign-magnitude grid (escapes).
    q["conv0"]["kernel"] = q["conv0"]["kernel"].replace(mask_logits=-jnp.ones(5))
    head = q["head"]["kernel"]
    k1, k2 = jax.random.split(jax.random.key(1))
    q["head"]["kernel"] = head.replace(
        pos_logits=jax.random.normal(k1, head.pos_logits.shape), neg_logits=jax.random.normal(k2, head.neg_logits.shape),
        mask_logits=jnp.array([1.0, -1.0, 0.5, 2.0, -3.0]))
  if method == "bsq":
    # Planes off {0, 1} (as between re-quantizations): sums up to 2^(n+1) - 2,
    # clamped to 2^n - 1 as the forward pass does (no escapes); and conv0 in
    # its finetune form (a float latent at fixed precision), off its grid.
    w = q["head"]["kernel"]
    noise = jax.random.uniform(jax.random.key(2), w.pos_planes.shape, minval=0.0, maxval=2.0)
    q["head"]["kernel"] = bsq.clamp_planes(w.replace(pos_planes=w.pos_planes + noise))
    f = bsq.to_finetune(q["conv0"]["kernel"])
    q["conv0"]["kernel"] = f.replace(latent=f.latent * 1.3 + 0.01)
  if method == "msq":
    q["conv3"]["kernel"] = msq.prune(q["conv3"]["kernel"], 2)
  return q, batch_stats


@pytest.mark.parametrize("method", ["csq", "csq_uniform", "ste", "bsq", "msq", "fp"])
def test_leaf_round_trip_every_method(method, tmp_path):
  params, batch_stats = _quantized(method)
  path = str(tmp_path / "m.csqx")
  info = export.export_model(path, params, batch_stats, {"method": method})
  assert info["export_bytes"] == os.path.getsize(path)
  loaded, loaded_stats, manifest = export.load_export(path)

  # Float weights: bit for bit the jitted hard weights; float leaves untouched.
  want = _flat(_jit_hard(params), "params")
  got = _flat(loaded, "params")
  assert set(got) == set(want)
  for name in want:
    assert _bitwise_equal(got[name], want[name]), name
  stats_want, stats_got = _flat(batch_stats, "batch_stats"), _flat(loaded_stats, "batch_stats")
  assert set(stats_got) == set(stats_want)
  assert all(_bitwise_equal(stats_got[k], stats_want[k]) for k in stats_want)

  # Integers: the quantizer's own, through the package loader and the numpy decoder.
  leaves = transform.quantized_leaves(params)
  ints = export.load_integers(path)
  tensors, np_ints, header = read_csqx(path)
  assert sorted(ints) == sorted(np_ints) == sorted(f"params/{p}" for p in leaves)
  for p, leaf in leaves.items():
    q = np.asarray(quantizers.integer_weights(leaf))
    np.testing.assert_array_equal(ints[f"params/{p}"], q)
    np.testing.assert_array_equal(np_ints[f"params/{p}"], q)
  for name in want:
    assert _bitwise_equal(tensors[name], want[name]), name

  # Each layer at exactly its precision plus a sign: the data section is the
  # float32 values plus ceil(N (b + 1) / 8) bytes per layer, plus escapes only.
  layers = {l["name"]: l for l in header["layers"]}
  n_floats = sum(np.size(x) for x in jax.tree_util.tree_leaves(stats_want)) + sum(
      np.size(got[k]) for k in got if k[len("params/"):] not in leaves)
  expected = 4 * n_floats
  for p, leaf in leaves.items():
    b = int(quantizers.precision(leaf))
    layer = layers[f"params/{p}"]
    assert layer["bits"] == b and len(layer["places"]) == b
    n = int(np.prod(leaf.shape))
    expected += (n * (b + 1 if b else 0) + 7) // 8 + (layer["escapes"] * layer["escape_width"] + 7) // 8
  assert header["data_bytes"] == expected
  if method == "csq":
    assert layers["params/conv0/kernel"]["width"] == 0 and not np.any(ints["params/conv0/kernel"])
    assert layers["params/head/kernel"]["places"] == [0, 2, 3]
    assert layers["params/head/kernel"]["escapes"] > 0
    assert layers["params/conv1/kernel"]["bits"] == 4  # the "fixed" STE layer
  if method == "bsq":
    assert all(l["escapes"] == 0 for l in layers.values())
    assert layers["params/head/kernel"]["bits"] == layers["params/conv0/kernel"]["bits"] == 5
    assert isinstance(params["conv0"]["kernel"], bsq.BSQFinetuneWeight)
  if method in ("csq_uniform", "ste", "msq"):
    assert all(l["escapes"] == 0 for l in layers.values())
  if method == "msq":
    assert layers["params/conv3/kernel"]["bits"] == 3
  if method == "fp":
    assert not layers and header["data_bytes"] == 4 * n_floats


def test_encode_integers_reference():
  """Sign-magnitude over the given places, LSB first, sign last, little-endian stream."""
  q = np.array([5, -3, 0, -1, 2])  # places {0, 1, 2}: width 4
  buf, code = export.encode_integers(q, [0, 1, 2])
  assert code == {"places": [0, 1, 2], "width": 4, "escapes": 0, "escape_width": 0}
  # codes: 5 -> 0101, -3 -> 1011, 0 -> 0000, -1 -> 1001, 2 -> 0010 (sign is bit 3)
  stream = 0b0101 | 0b1011 << 4 | 0b0000 << 8 | 0b1001 << 12 | 0b0010 << 16
  assert buf == stream.to_bytes(3, "little")
  # Places {1, 3}: 31 = 2^5 - 1 is off the grid and escapes as "-0".
  q = np.array([10, -2, 31, 0, -8])
  buf, code = export.encode_integers(q, [1, 3])
  assert code == {"places": [1, 3], "width": 3, "escapes": 1, "escape_width": 6}
  np.testing.assert_array_equal(export.decode_integers(buf, (5,), **{k: code[k] for k in code}), q)


# ----------------------------------------------------------------------------
# Corrupt files


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
  params, batch_stats = _quantized("csq")
  path = str(tmp_path_factory.mktemp("small") / "m.csqx")
  export.export_model(path, params, batch_stats, {"model": "small_cnn"})
  return path


def test_corrupt_or_missing_files_raise_clear_errors(small_export, tmp_path):
  raw = open(small_export, "rb").read()
  hlen = struct.unpack("<Q", raw[8:16])[0]

  def with_header(text: bytes) -> bytes:
    packed = zlib.compress(text)
    return raw[:8] + struct.pack("<Q", len(packed)) + packed + raw[16 + hlen:]

  header = json.loads(zlib.decompress(raw[16:16 + hlen]))
  header["floats"][0][1] = [2 * header["floats"][0][1][0]]  # a shape the data does not hold
  cases = {
      "truncated": (raw[:-3], "truncated or corrupt"),
      "flipped": (raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:], "truncated or corrupt"),
      "bad_header": (raw[:16] + b"x" * hlen + raw[16 + hlen:], "corrupt header"),
      "not_json": (with_header(b"{"), "corrupt header"),
      "inconsistent": (with_header(json.dumps(header).encode()), "inconsistent header"),
      "bad_magic": (b"PK\x03\x04" + raw[4:], "not a csq_jax export"),
      "version": (raw[:4] + struct.pack("<I", 7) + raw[8:], "format version 7"),
      "empty": (b"", "not a csq_jax export"),
  }
  for name, (blob, message) in cases.items():
    path = tmp_path / f"{name}.csqx"
    path.write_bytes(blob)
    with pytest.raises(export.ExportError, match=message):
      export.load_export(str(path))
  with pytest.raises(export.ExportError, match="Cannot read"):
    export.load_export(str(tmp_path / "nope.csqx"))


# ----------------------------------------------------------------------------
# A tiny trained run: the summary's accuracy, exactly


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  c = load_config("default")
  c.num_epochs, c.finetune_epochs, c.progress, c.tensorboard = 2, 0, False, False
  workdir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(c, str(workdir))
  # The run's final state: last checkpoint, finalized, BN re-estimated (deterministic).
  ds = data.load_dataset(c)
  model = train.create_model(c, ds.num_classes)
  state = restore_final_state(c, workdir)
  state = state.replace(params=methods.get(c).finalize(state.params))
  state = train.recalibrate_batch_norm(model, state, ds, c)
  return c, workdir, summary, state, ds, model


def test_run_export_reproduces_the_hard_model(tiny_run):
  c, workdir, summary, state, ds, model = tiny_run
  path = str(workdir / export.FILENAME)
  params, batch_stats, manifest = export.load_export(path)
  assert manifest["meta"]["model"] == "small_cnn" and manifest["meta"]["num_classes"] == 10
  assert manifest["meta"]["test_accuracy"] == summary["test_accuracy"]
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(_bitwise_equal, batch_stats, jax.device_get(state.batch_stats)))

  # Logits of the run's jitted hard model (materialize inside jit) vs the export.
  @jax.jit
  def run_logits(p, bs, x):
    return model.apply({"params": transform.materialize(p, None, hard=True), "batch_stats": bs}, x, train=False)

  @jax.jit
  def export_logits(p, bs, x):
    return model.apply({"params": p, "batch_stats": bs}, x, train=False)

  for batch in data.eval_batches(ds, c.eval_batch_size):
    a = np.asarray(run_logits(state.params, state.batch_stats, batch["image"]))
    b = np.asarray(export_logits(params, batch_stats, batch["image"]))
    assert _bitwise_equal(a, b)
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))

  fake = train.TrainState(jnp.zeros((), jnp.int32), params, batch_stats, None)
  accuracy, _ = train.evaluate(train.make_eval_step(model, hard=True), fake, ds, c.eval_batch_size)
  assert accuracy == summary["test_accuracy"]


def test_run_export_size_is_theoretical_plus_escapes(tiny_run):
  c, workdir, summary, state, ds, model = tiny_run
  size = os.path.getsize(workdir / export.FILENAME)
  assert summary["export_bytes"] == size
  # Independently: each counted layer at its bits plus a sign, a float32 step
  # per layer, every float parameter and BN statistic as float32.
  layers = summary["layers"]
  bits = sum(l["params"] * (l["bits"] + 1 if l["bits"] else 0) + 32 for l in layers)
  counted = {l["name"] for l in layers}
  floats = sum(np.size(x) for p, x in jax.tree_util.tree_flatten_with_path(
      state.params, is_leaf=transform.is_leaf)[0] if transform.path_str(p) not in counted)
  floats += sum(np.size(x) for x in jax.tree_util.tree_leaves(state.batch_stats))
  theoretical = (bits + 32 * floats) / 8
  assert summary["export_theoretical_bytes"] == theoretical
  # CSQ's signed digits off the layer's grid (opposite signs on non-contiguous
  # selected planes) are escaped: count them from the integers and the planes.
  escape_bits, weight_bits = 0, 0
  for path, leaf in transform.quantized_leaves(state.params).items():
    q = np.asarray(quantizers.integer_weights(leaf)).reshape(-1).astype(np.int64)
    grid = sum(1 << p for p in export.grid_places(leaf))
    off = q[(np.abs(q) & ~grid) != 0]
    escape_bits += off.size * (int(np.abs(off).max()).bit_length() + 1 if off.size else 0)
    places = export.grid_places(leaf)
    weight_bits += q.size * (len(places) + 1 if places or off.size else 0)
  stored = theoretical + escape_bits / 8
  assert stored <= size <= 1.02 * stored, size / stored
  n = sum(l["params"] for l in layers)
  np.testing.assert_allclose(summary["export_bits_per_weight"], (weight_bits + escape_bits) / n, rtol=1e-12)
  assert summary["export_bits_per_weight"] >= summary["avg_bits"] + 1 - 1e-9  # a sign on top, at least


def test_numpy_decoder_reads_the_run_export(tiny_run):
  c, workdir, summary, state, ds, model = tiny_run
  tensors, ints, header = read_csqx(str(workdir / export.FILENAME))
  for p, leaf in transform.quantized_leaves(state.params).items():
    np.testing.assert_array_equal(ints[f"params/{p}"], np.asarray(quantizers.integer_weights(leaf)))
  want = {**_flat(_jit_hard(state.params), "params"), **_flat(state.batch_stats, "batch_stats")}
  assert set(tensors) == set(want)
  assert all(_bitwise_equal(tensors[k], want[k]) for k in want)
  assert [l["bits"] for l in header["layers"]] == [l["bits"] for l in summary["layers"]]


def test_evaluate_refuses_an_export_of_another_model(tiny_run):
  c, workdir, *_ = tiny_run
  other = c.copy_and_resolve_references()
  other.model = "resnet20"
  with pytest.raises(export.ExportError, match="another model"):
    evaluate.evaluate_export(other, str(workdir / export.FILENAME))
  params, _, _ = export.load_export(str(workdir / export.FILENAME))
  fewer = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(export.ExportError, match="does not fit") as e:
    evaluate._check_structure(fewer, params, "params", "m.csqx")
  assert "['head']['bias']" in str(e.value) and "['head']['kernel']" in str(e.value)


def test_evaluate_cli_prints_the_run_accuracy(tiny_run, tmp_path):
  c, workdir, summary, *_ = tiny_run
  cmd = [sys.executable, "-m", "csq_jax.evaluate", f"--export={workdir / export.FILENAME}",
         "--config=configs/default.py"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["test_accuracy"] == summary["test_accuracy"]
  assert result["method"] == "csq" and result["num_test"] == tiny_run[4].num_test
  missing = subprocess.run(cmd[:3] + [f"--export={tmp_path / 'nope.csqx'}", cmd[4]], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
  assert missing.returncode != 0
  assert "csq_jax: error: Cannot read export" in missing.stderr
