"""Tests of the ONNX export (csq_jax/onnx_export.py) in ONNX Runtime, its CLI
(``python -m csq_jax.export --format=onnx``) and ``evaluate --export=*.onnx``.

Models other than the trained small CNN get random (untrained) quantized
parameters through ``transform.quantize_params``, NumPy-filled from
``jax.eval_shape`` (no compiled init); the ImageNet ResNets and DeiT run on
reduced widths and small inputs by default, at full size under ``-m extended``.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import ROOT, load_config  # noqa: E402
from csq_jax import data, evaluate, export, models, onnx_export, quantizers, train, transform  # noqa: E402
from csq_jax.quantizers import activations  # noqa: E402

RTOL = 1e-4  # logits: |ORT - JAX| <= RTOL * max |JAX logit| of the sample


def _variables(model, size, channels, seed=0):
  """Variables of ``model`` without a compiled init: BN scales/variances
  near 1, biases/means small, PACT clips 2.5, other leaves N(0, 1/fan_in)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, channels)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf in ("scale", "var"):
      return (1.0 + 0.2 * rng.random(s.shape)).astype(np.float32)
    if leaf in ("bias", "mean"):
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if leaf == "alpha":
      return np.float32(2.5)
    fan_in = max(int(np.prod(s.shape[:-1])), 1)
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _quantized(model, name, size, channels, method="csq", bits=4, seed=0):
  v = _variables(model, size, channels, seed)
  rules = transform.rules_from_config(models.DEFAULT_RULES[name])
  q, _ = transform.quantize_params(v["params"], rules, transform.QuantizeSpec(method, bits), jax.random.key(seed))
  return q, v.get("batch_stats", {})


def _hard_logits(model, params, batch_stats, x):
  """The JAX hard-quantized model's logits, as the run's jitted eval step computes them."""
  f = jax.jit(lambda p, bs, x: model.apply({"params": transform.materialize(p, None, hard=True), "batch_stats": bs},
                                           x, train=False))
  return np.asarray(f(params, batch_stats, x))


def _assert_logits_close(got, want):
  scale = np.abs(want).max(-1, keepdims=True)
  err = np.abs(got - want) / scale
  assert err.max() <= RTOL, f"max relative error {err.max():.3g}"
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def _with_outputs(proto, names):
  """A copy of ``proto`` that also outputs the tensors ``names``."""
  m = onnx.ModelProto()
  m.CopyFrom(proto)
  for n in names:
    m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
  return m


# ----------------------------------------------------------------------------
# Integer storage


def test_integer_type_is_the_narrowest_that_holds_the_integers():
  assert onnx_export.integer_type(np.array([-8, 7])) == "INT4"
  assert onnx_export.integer_type(np.array([-9, 0])) == "INT8"
  assert onnx_export.integer_type(np.array([0, 8])) == "INT8"
  assert onnx_export.integer_type(np.array([-128, 127])) == "INT8"
  assert onnx_export.integer_type(np.array([-255, 255])) == "INT16"
  assert onnx_export.integer_type(np.zeros(0, np.int64)) == "INT4"


def test_shifted_integers_give_the_same_float32_weights():
  rng = np.random.default_rng(0)
  step = np.float32(0.0123)
  # CSQ planes {5, 6, 7}: signed digit sums, multiples of 32 up to +-224.
  digits = rng.integers(-1, 2, size=(1000, 3))
  q = (digits * np.array([32, 64, 128])).sum(1)
  stored, scale = onnx_export.shifted(q, step)
  assert scale == np.float32(step * 32) and np.abs(stored).max() <= 7
  np.testing.assert_array_equal(stored * 32, q)
  np.testing.assert_array_equal((scale * stored.astype(np.float32)).view(np.uint32),
                                (step * q.astype(np.float32)).view(np.uint32))
  # Odd integers and all-zero layers are kept as they are.
  odd = np.array([3, -5, 32])
  assert onnx_export.shifted(odd, step)[1] == step
  np.testing.assert_array_equal(onnx_export.shifted(odd, step)[0], odd)
  zeros, s = onnx_export.shifted(np.zeros(5, np.int64), step)
  assert s == step and not zeros.any()


@pytest.mark.parametrize("method,bits", [("csq", 8), ("csq_high_planes", 8), ("ste", 3), ("ste", 4)])
def test_graph_stores_the_exact_integers_and_dequantizes_to_the_hard_weights(method, bits):
  model = models.create_model("small_cnn", 10)
  params, batch_stats = _quantized(model, "small_cnn", 8, 1, method.replace("_high_planes", ""), bits)
  if method == "csq_high_planes":  # conv1: planes {5, 6, 7} only (integers 32 q', q' in [-7, 7]); conv2: {0, 7}
    for layer, logits in (("conv1", [-1.0] * 5 + [1.0] * 3), ("conv2", [1.0] + [-1.0] * 6 + [1.0])):
      params[layer]["kernel"] = params[layer]["kernel"].replace(mask_logits=jnp.array(logits))
  proto = onnx_export.from_params(model, params, batch_stats, (8, 8, 1), {"model": "small_cnn"})
  inits = {i.name: i for i in proto.graph.initializer}
  dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
  leaves = transform.quantized_leaves(params)
  assert set(dq) == {f"params/{p}" for p in leaves}

  # The stored integers times 2^shift are the quantizer's integers (and the
  # .csqx export's); the scale is the .csqx step times 2^shift.
  info = onnx_export.read_info(proto)
  stored = onnx_export.integer_weights(proto)
  hard = jax.jit(lambda p: transform.materialize(p, None, hard=True))(params)
  for path, leaf in leaves.items():
    name = f"params/{path}"
    q = np.asarray(quantizers.integer_weights(leaf), np.int64)
    q_onnx, kind, scale = stored[name]
    step = np.float32(jax.device_get(quantizers.step_size(leaf)))
    shift = int(round(np.log2(scale / step))) if q.any() else 0
    np.testing.assert_array_equal(q_onnx << shift, q)
    lo, hi = int(q_onnx.min()), int(q_onnx.max())
    assert kind == ("INT4" if -8 <= lo and hi <= 7 else "INT8" if -128 <= lo and hi <= 127 else "INT16"), name
    assert info["layer_types"][name] == kind
    zero = onnx.numpy_helper.to_array(inits[dq[name].input[2]])
    assert zero.shape == () and int(zero) == 0 and inits[dq[name].input[2]].data_type == inits[dq[name].input[0]].data_type
    # INT4 is packed two per byte.
    if kind == "INT4":
      assert len(inits[dq[name].input[0]].raw_data) == (q.size + 1) // 2
  kinds = set(info["layer_types"].values())
  if method == "csq":
    assert kinds == {"INT16"}  # every plane selected at init: +-255
  if method == "csq_high_planes":
    assert info["layer_types"]["params/conv1/kernel"] == "INT4"
    assert info["layer_types"]["params/conv2/kernel"] == "INT16"  # 128 +- 1: no common power of two
  if method == "ste" and bits == 3:
    assert kinds == {"INT4"}  # [-7, 7]
  if method == "ste" and bits == 4:
    assert kinds == {"INT8"}  # [-15, 15]

  # What DequantizeLinear hands to Conv/Gemm in ONNX Runtime: the run's hard weights, bit for bit.
  names = sorted(dq)
  outs = onnx_export.session(_with_outputs(proto, names)).run(names, {"image": np.zeros((1, 8, 8, 1), np.float32)})
  for name, w in zip(names, outs):
    want = _leaf(hard, name)
    want = want.transpose(3, 2, 0, 1) if want.ndim == 4 else want
    np.testing.assert_array_equal(w.view(np.uint32), want.view(np.uint32))

  # Float tensors stay float32 initializers.
  for name in ("params/bn0/scale", "batch_stats/bn0/var", "params/head/bias"):
    assert inits[name].data_type == onnx.TensorProto.FLOAT


def _leaf(tree, name):
  node = {"params": tree}
  for k in name.split("/"):
    node = node[k]
  return np.asarray(node, np.float32)


# ----------------------------------------------------------------------------
# ONNX Runtime vs JAX


def _imagenet_resnet(block):
  # One block per stage, 8 base channels: the ImageNet stem, every stage's
  # downsampling shortcut and the block kind, in few layers (fast to compile).
  return lambda act: models.resnet_imagenet.ImageNetResNet(num_classes=10, stage_sizes=(1, 1, 1, 1), block=block,
                                                           width=8, act=act)


CASES = {
    # name: (model builder, rules of, input side, channels, method); the small
    # CNN and ResNet-20 at full size, the rest reduced.
    "small_cnn": (lambda act: models.create_model("small_cnn", 10, act), "small_cnn", 8, 1, "csq"),
    "resnet20": (lambda act: models.create_model("resnet20", 10, act), "resnet20", 32, 3, "csq"),
    "resnet18_narrow": (_imagenet_resnet("basic"), "resnet18", 64, 3, "ste"),
    "resnet50_narrow": (_imagenet_resnet("bottleneck"), "resnet50", 64, 3, "ste"),
    "deit_s_small": (lambda act: models.MODELS["deit_s"](num_classes=10, act=act, img_size=32, patch_size=8,
                                                         embed_dim=64, depth=1, num_heads=2), "deit_s", 32, 3, "ste"),
    "vgg_small": (lambda act: models.MODELS["vgg19_bn"](num_classes=10, act=act, cfg=(16, "M", 32, 32, "M")),
                  "vgg19_bn", 32, 3, "ste"),
}


def _check_against_jax(model, rules_name, size, channels, method="csq", bits=4, batch=6):
  params, batch_stats = _quantized(model, rules_name, size, channels, method, bits)
  proto = onnx_export.from_params(model, params, batch_stats, (size, size, channels), {"model": rules_name})
  x = np.random.default_rng(1).standard_normal((batch, size, size, channels)).astype(np.float32)
  got = onnx_export.run(onnx_export.session(proto), x)
  _assert_logits_close(got, _hard_logits(model, params, batch_stats, x))
  return proto


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_runtime_logits_equal_the_jax_hard_model(case):
  build, rules, size, channels, method = CASES[case]
  proto = _check_against_jax(build(activations.ReLU), rules, size, channels, method)
  assert {n.op_type for n in proto.graph.node} >= {"DequantizeLinear"}


@pytest.mark.parametrize("kind", activations.ACTIVATIONS)
def test_small_cnn_with_quantized_activations_in_onnx_runtime(kind):
  build, rules, size, channels, _ = CASES["small_cnn"]
  proto = _check_against_jax(build(activations.activation_factory(kind, 4)), rules, size, channels, bits=3)
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("QuantizeLinear") == 7 and ops.count("DequantizeLinear") == 7 + 8  # 7 activations, 8 kernels


@pytest.mark.extended
@pytest.mark.parametrize("name", ["resnet18", "deit_s"])
def test_full_size_imagenet_models_in_onnx_runtime(name):
  model = models.create_model(name, 1000)
  _check_against_jax(model, name, 224, 3, "ste", batch=2)


@pytest.mark.parametrize("kind,bits", [("pact", 2), ("pact", 4), ("pact", 8), ("relu6", 4), ("relu6", 8),
                                       ("maxabs", 4), ("pact", 12)])
def test_activation_quantizer_qdq_equals_the_jax_module_bit_for_bit(kind, bits):
  """The quantizer alone, on inputs at and next to every rounding midpoint."""
  module = activations.activation_factory(kind, bits)()
  alpha = np.float32(3.7)
  variables = {"params": {"alpha": jnp.float32(alpha)}} if kind == "pact" else {}
  clip = {"pact": alpha, "relu6": np.float32(6.0), "maxabs": np.float32(5.0)}[kind]
  levels = 2**bits - 1
  step = np.float32(clip / levels)
  mids = (np.arange(min(levels, 5000)) + 0.5).astype(np.float32) * step
  x = np.concatenate([np.linspace(-1, 1.2 * clip, 20001, dtype=np.float32), mids,
                      np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf)), [clip]])
  x = x.astype(np.float32).reshape(1, -1)
  g = onnx_export.Graph({"params/Q_0/alpha": alpha} if kind == "pact" else {}, {}, {})
  out = onnx_export._activation(g, "x", module, "params/Q_0")
  graph = onnx.helper.make_graph(
      g.nodes, "act", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
      [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, list(x.shape))], g.initializers)
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)])
  proto.ir_version = 10
  got = onnx_export.session(proto).run([out], {"x": x})[0]
  want = np.asarray(jax.jit(module.apply)(variables, x))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  ops = [n.op_type for n in g.nodes]
  assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1


def test_unsupported_model_and_dtype_raise_clear_errors():
  model = models.create_model("swin_t", 10, image_size=32, window_size=4)
  with pytest.raises(export.ExportError, match="No ONNX emitter for SwinTransformer"):
    onnx_export.build(model, {}, {}, {}, (32, 32, 3))
  with pytest.raises(export.ExportError, match="float32"):
    onnx_export.build(models.create_model("small_cnn", 10, dtype=jnp.bfloat16), {}, {}, {}, (8, 8, 1))


# ----------------------------------------------------------------------------
# Size


def test_quantized_file_is_smaller_than_the_float_model_by_its_integer_storage():
  model = models.create_model("resnet20", 10)
  params, batch_stats = _quantized(model, "resnet20", 32, 3, "ste", 3)  # [-7, 7]: INT4 everywhere
  meta = {"model": "resnet20"}
  q = onnx_export.from_params(model, params, batch_stats, (32, 32, 3), meta)
  f = onnx_export.from_params(model, params, batch_stats, (32, 32, 3), meta, quantized=False)
  n_quantized = sum(quantizers.num_weights(leaf) for leaf in transform.quantized_leaves(params).values())
  saved = q.ByteSize() - f.ByteSize()
  # Each quantized weight: 4 bytes float32 -> half a byte INT4 (plus a scale, a zero point, a node and their names per layer).
  assert -n_quantized * 3.5 <= saved <= -n_quantized * 3.5 + 500 * len(transform.quantized_leaves(params)), saved
  assert f.ByteSize() / q.ByteSize() > 4


# ----------------------------------------------------------------------------
# A tiny trained run: CLI export, ORT vs JAX over the test set, evaluate CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  c = load_config("default")
  c.num_epochs, c.finetune_epochs, c.progress, c.tensorboard = 2, 0, False, False
  workdir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(c, str(workdir))
  return c, workdir, summary


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_export_cli_writes_model_onnx_that_reproduces_the_run(tiny_run):
  c, workdir, summary = tiny_run
  out = _cli("csq_jax.export", f"--workdir={workdir}", "--format=onnx")
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.loads(out.stdout.strip().splitlines()[-1])
  path = workdir / onnx_export.FILENAME
  assert info["onnx"] == str(path) and info["onnx_bytes"] == path.stat().st_size
  assert info["float_onnx_bytes"] > 3 * info["onnx_bytes"]
  assert set(info["layer_types"]) <= {"INT4", "INT8"} and sum(info["layer_types"].values()) == len(summary["layers"])

  # Its integers are the .csqx integers (times 2^shift), its steps the .csqx steps (times 2^shift).
  proto = onnx.load(str(path))
  ints = export.load_integers(str(workdir / export.FILENAME))
  steps = {l["name"]: np.float32(l["step"]) for l in export.read_manifest(str(workdir / export.FILENAME))["layers"]}
  stored = onnx_export.integer_weights(proto)
  assert set(stored) == set(ints)
  for name, (q, _, scale) in stored.items():
    shift = int(round(np.log2(scale / steps[name]))) if ints[name].any() else 0
    assert np.float32(np.ldexp(steps[name], shift)) == scale
    np.testing.assert_array_equal(q << shift, ints[name])

  # ORT on the whole test set vs the export's JAX model (bit for bit the run's hard model: test_export.py).
  ds = data.load_dataset(c)
  params, batch_stats, _ = export.load_export(str(workdir / export.FILENAME))
  model = train.create_model(c, ds.num_classes, ds.image_shape)
  apply = jax.jit(lambda x: model.apply({"params": params, "batch_stats": batch_stats}, x, train=False))
  sess = onnx_export.session(str(path))
  correct = count = 0
  for batch in data.eval_batches(ds, c.eval_batch_size):
    got, want = onnx_export.run(sess, batch["image"]), np.asarray(apply(batch["image"]))
    _assert_logits_close(got, want)
    mask = np.asarray(batch["mask"]) > 0
    correct += int((got.argmax(-1) == np.asarray(batch["label"]))[mask].sum())
    count += int(mask.sum())
  assert correct / count == summary["test_accuracy"]

  # The default format checks the .csqx the run wrote.
  out = _cli("csq_jax.export", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["export_bytes"] == summary["export_bytes"]


def test_evaluate_cli_runs_the_onnx_file_with_the_run_accuracy(tiny_run, tmp_path):
  c, workdir, summary = tiny_run
  path = workdir / onnx_export.FILENAME
  if not path.exists():
    onnx_export.export_workdir(str(workdir))
  out = _cli("csq_jax.evaluate", f"--export={path}", "--config=configs/default.py")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["format"] == "onnx" and result["test_accuracy"] == summary["test_accuracy"]
  other = c.copy_and_resolve_references()
  other.model = "resnet20"
  with pytest.raises(export.ExportError, match="another model"):
    evaluate.evaluate_onnx(other, str(path))
  (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
  bad = _cli("csq_jax.evaluate", f"--export={tmp_path / 'bad.onnx'}", "--config=configs/default.py")
  assert bad.returncode != 0 and "csq_jax: error:" in bad.stderr


def test_cli_help_lists_the_flags_and_exits_zero():
  for module, expected in (("csq_jax.evaluate", ("--export", "--config")),
                           ("csq_jax.export", ("--workdir", "--format", "--out"))):
    out = _cli(module, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(flag in out.stdout for flag in expected), out.stdout[-2000:]
  missing = _cli("csq_jax.export", "--workdir=/nonexistent/run", "--format=onnx")
  assert missing.returncode != 0 and "csq_jax: error: Cannot read export" in missing.stderr
