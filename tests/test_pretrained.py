"""pretrained.py: float weights from PyTorch state_dicts (safetensors, torch.save
read without torch) and orbax checkpoints, into our Flax models.

The torchvision ResNet-18 names and shapes below are written out from
torchvision's architecture, and the expected Flax variables and logits are
computed from them by code of this file (an NCHW/OIHW forward with
``lax.conv_general_dilated``), not by the module's mapping tables.
"""

import os
import pickle
import zipfile

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import load_config
from safetensors.numpy import save_file

from csq_jax import checkpoint, models, pretrained, train, transform
from csq_jax.quantizers.csq import CSQWeight

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet18_shapes(num_classes=1000):
  """``{key: shape}`` of ``torchvision.models.resnet18().state_dict()``."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}
  shapes.update({f"bn1.{t}": (64,) for t in BN_TENSORS})
  c_in = 64
  for layer, c in zip((1, 2, 3, 4), (64, 128, 256, 512)):
    for block in (0, 1):
      p = f"layer{layer}.{block}"
      shapes[f"{p}.conv1.weight"] = (c, c_in, 3, 3)
      shapes.update({f"{p}.bn1.{t}": (c,) for t in BN_TENSORS})
      shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
      shapes.update({f"{p}.bn2.{t}": (c,) for t in BN_TENSORS})
      if layer > 1 and block == 0:
        shapes[f"{p}.downsample.0.weight"] = (c, c_in, 1, 1)
        shapes.update({f"{p}.downsample.1.{t}": (c,) for t in BN_TENSORS})
      c_in = c
  shapes["fc.weight"] = (num_classes, 512)
  shapes["fc.bias"] = (num_classes,)
  return {k: (() if k.endswith("num_batches_tracked") else s) for k, s in shapes.items()}


def random_state_dict(shapes, seed=0):
  """Random torch-layout weights with sane scales (He conv weights, BN
  statistics near the identity) so that a forward pass stays O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.array(123, np.int64)
    elif len(s) >= 2:  # conv and fc weights
      fan_in = int(np.prod(s[1:]))
      sd[k] = rng.standard_normal(s, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif k.endswith("running_var") or k.endswith(".weight"):  # BN variance and scale
      sd[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
    else:
      sd[k] = 0.1 * rng.standard_normal(s, dtype=np.float32)
  return sd


def expected_variables(sd):
  """Our ResNet-18 variables from a torchvision state_dict, written out by hand."""
  hwio = lambda w: np.transpose(w, (2, 3, 1, 0))
  params, stats = {}, {}

  def bn(name, prefix):
    params[name] = {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}
    stats[name] = {"mean": sd[f"{prefix}.running_mean"], "var": sd[f"{prefix}.running_var"]}

  params["conv_init"] = {"kernel": hwio(sd["conv1.weight"])}
  bn("bn_init", "bn1")
  for layer in (1, 2, 3, 4):
    for block in (0, 1):
      t, f = f"layer{layer}.{block}", f"stage{layer}_block{block}"
      p, s = {}, {}
      for i in (1, 2):
        p[f"conv{i}"] = {"kernel": hwio(sd[f"{t}.conv{i}.weight"])}
        p[f"bn{i}"] = {"scale": sd[f"{t}.bn{i}.weight"], "bias": sd[f"{t}.bn{i}.bias"]}
        s[f"bn{i}"] = {"mean": sd[f"{t}.bn{i}.running_mean"], "var": sd[f"{t}.bn{i}.running_var"]}
      if f"{t}.downsample.0.weight" in sd:
        p["shortcut_conv"] = {"kernel": hwio(sd[f"{t}.downsample.0.weight"])}
        p["shortcut_bn"] = {"scale": sd[f"{t}.downsample.1.weight"], "bias": sd[f"{t}.downsample.1.bias"]}
        s["shortcut_bn"] = {"mean": sd[f"{t}.downsample.1.running_mean"],
                            "var": sd[f"{t}.downsample.1.running_var"]}
      params[f], stats[f] = p, s
  params["head"] = {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]}
  return {"params": params, "batch_stats": stats}


def torch_layout_forward(sd, x_nchw):
  """torchvision ResNet-18 in eval mode, NCHW activations and OIHW weights."""
  hi = jax.lax.Precision.HIGHEST

  def conv(x, key, stride, pad):
    return jax.lax.conv_general_dilated(x, sd[key], (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=hi)

  def bn(x, p):
    c = lambda t: sd[f"{p}.{t}"][None, :, None, None]
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  relu = jax.nn.relu
  x = relu(bn(conv(x_nchw, "conv1.weight", 2, 3), "bn1"))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                            ((0, 0), (0, 0), (1, 1), (1, 1)))
  for layer in (1, 2, 3, 4):
    for block in (0, 1):
      t = f"layer{layer}.{block}"
      stride = 2 if layer > 1 and block == 0 else 1
      y = relu(bn(conv(x, f"{t}.conv1.weight", stride, 1), f"{t}.bn1"))
      y = bn(conv(y, f"{t}.conv2.weight", 1, 1), f"{t}.bn2")
      if f"{t}.downsample.0.weight" in sd:
        x = bn(conv(x, f"{t}.downsample.0.weight", stride, 0), f"{t}.downsample.1")
      x = relu(x + y)
  x = jnp.mean(x, axis=(2, 3))
  return jnp.dot(x, sd["fc.weight"].T, precision=hi) + sd["fc.bias"]


@pytest.fixture(scope="module")
def resnet18():
  """The model and its variables' shapes (``model.init`` would draw 11.7M
  random numbers that every loaded leaf replaces)."""
  model = models.create_model("resnet18", 1000)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.fixture(scope="module")
def torch_resnet18(tmp_path_factory):
  """A random torchvision-named ResNet-18 state_dict and its .safetensors file."""
  sd = random_state_dict(torchvision_resnet18_shapes())
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
  save_file(sd, path)
  return sd, path


def _assert_trees_equal(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=transform.path_str(path))


# ----------------------------------------------------------------------------
# torchvision names -> our ResNet-18


def test_torchvision_resnet18_has_122_tensors_and_our_parameter_count():
  shapes = torchvision_resnet18_shapes()
  assert len(shapes) == 122
  float_params = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k and "num_batches" not in k)
  assert float_params == 11_689_512  # torchvision's ResNet-18


def test_safetensors_resnet18_fills_every_leaf_exactly(resnet18, torch_resnet18):
  _, variables = resnet18
  sd, path = torch_resnet18
  loaded = pretrained.load_float_variables(path, "resnet18", variables)
  _assert_trees_equal(loaded, expected_variables(sd))
  # A few transposes spelled out element by element.
  k = np.asarray(loaded["params"]["stage2_block0"]["shortcut_conv"]["kernel"])
  assert k.shape == (1, 1, 64, 128)
  assert k[0, 0, 5, 7] == sd["layer2.0.downsample.0.weight"][7, 5, 0, 0]
  k = np.asarray(loaded["params"]["conv_init"]["kernel"])
  assert k.shape == (7, 7, 3, 64) and k[1, 4, 2, 9] == sd["conv1.weight"][9, 2, 1, 4]
  k = np.asarray(loaded["params"]["head"]["kernel"])
  assert k.shape == (512, 1000) and k[3, 17] == sd["fc.weight"][17, 3]
  assert np.asarray(loaded["batch_stats"]["stage4_block1"]["bn2"]["var"])[11] == sd["layer4.1.bn2.running_var"][11]


def test_imported_resnet18_logits_match_a_torch_layout_forward(resnet18, torch_resnet18):
  model, variables = resnet18
  sd, path = torch_resnet18
  loaded = pretrained.load_float_variables(path, "resnet18", variables)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  apply = jax.jit(model.apply)
  logits = np.asarray(apply(loaded, x))
  reference = np.asarray(jax.jit(torch_layout_forward)({k: jnp.asarray(v) for k, v in sd.items()},
                                                       jnp.transpose(x, (0, 3, 1, 2))))
  assert logits.shape == (2, 1000) and np.all(np.isfinite(logits))
  assert np.std(reference) > 0.1  # the weights do not wash the input out
  np.testing.assert_allclose(logits, reference, rtol=2e-3, atol=2e-3 * np.abs(reference).max())
  np.testing.assert_array_equal(logits, np.asarray(apply(loaded, x)))  # deterministic


def test_module_prefix_and_bfloat16(tmp_path, resnet18, torch_resnet18):
  _, variables = resnet18
  sd, _ = torch_resnet18
  import ml_dtypes

  wrapped = {f"module.{k}": (v.astype(ml_dtypes.bfloat16) if k == "fc.weight" else v) for k, v in sd.items()}
  path = str(tmp_path / "ddp.safetensors")
  save_file(wrapped, path)
  loaded = pretrained.load_float_variables(path, "resnet18", variables)
  head = loaded["params"]["head"]["kernel"]
  assert head.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(head), sd["fc.weight"].astype(ml_dtypes.bfloat16).astype(np.float32).T)
  np.testing.assert_array_equal(np.asarray(loaded["params"]["stage1_block0"]["conv1"]["kernel"]),
                                sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))


@pytest.mark.slow  # ~15 s of CPU, mostly model.init's 11.7M random numbers in init_state
def test_end_to_end_init_from_safetensors_with_csq(resnet18, torch_resnet18):
  sd, path = torch_resnet18
  expected = expected_variables(sd)
  config = _config(model="resnet18", method="csq", n_bits=8, init_from=path)
  # Quantize the stem, stage 1 and the head (the rest stays float to keep the test small).
  config.rules = ((".*shortcut_conv/kernel", "float"), ("(conv_init|stage1_.*|head)/kernel", "quantize"))
  model = train.create_model(config, 1000)
  phase = train.make_phases(config, 1)[0]
  state, _ = train.init_state(config, model, (32, 32, 3), phase, jax.random.key(0))
  quantized = transform.quantized_leaves(state.params)
  assert set(quantized) == {"conv_init/kernel", "head/kernel"} | {
      f"stage1_block{b}/conv{i}/kernel" for b in (0, 1) for i in (1, 2)}
  hard = transform.materialize(state.params, None, hard=True)
  for name, q in quantized.items():
    assert isinstance(q, CSQWeight) and q.n_bits == 8
    w = _get(expected["params"], name)
    step = np.abs(w).max() / 255.0
    np.testing.assert_allclose(float(q.scale), np.abs(w).max(), rtol=1e-6)
    err = np.abs(np.asarray(_get(hard, name)) - w)
    # Rounding to the nearest of 255 levels, up to float32 rounding of the level times the step.
    assert err.max() <= 0.5 * step + 4e-7 * np.abs(w).max(), name
    assert err.max() > 0  # really quantized
  # Float leaves (shortcuts, BN, the unquantized stages) and BN statistics: the imported values.
  np.testing.assert_array_equal(np.asarray(hard["stage3_block0"]["shortcut_conv"]["kernel"]),
                                expected["params"]["stage3_block0"]["shortcut_conv"]["kernel"])
  np.testing.assert_array_equal(np.asarray(hard["stage4_block1"]["conv2"]["kernel"]),
                                expected["params"]["stage4_block1"]["conv2"]["kernel"])
  _assert_trees_equal(state.batch_stats, expected["batch_stats"])


def _get(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def _config(**fields):
  c = load_config("default")
  c.update(fields)
  return c


# ----------------------------------------------------------------------------
# Errors


def test_resnet18_weights_into_resnet50_name_the_problems(torch_resnet18):
  _, path = torch_resnet18
  template = jax.eval_shape(models.create_model("resnet50", 1000).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(pretrained.PretrainedError) as e:
    pretrained.load_float_variables(path, "resnet50", template)
  msg = str(e.value)
  assert "leaves not filled" in msg and "params/stage1_block0/conv3/kernel" in msg
  assert "shape/dtype mismatches" in msg and "--config.model" in msg
  # resnet18's 3x3 where resnet50 has a 1x1:
  assert "layer1.0.conv1.weight (64, 64, 3, 3) -> params/stage1_block0/conv1/kernel: (3, 3, 64, 64)" in msg
  assert "\n" not in msg


def test_missing_unexpected_and_misshaped_keys(tmp_path, resnet18, torch_resnet18):
  _, variables = resnet18
  sd, _ = torch_resnet18
  broken = dict(sd)
  del broken["layer3.1.bn2.running_var"]
  broken["layer9.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  broken["fc.weight"] = np.zeros((10, 512), np.float32)
  path = str(tmp_path / "broken.safetensors")
  save_file(broken, path)
  with pytest.raises(pretrained.PretrainedError) as e:
    pretrained.load_float_variables(path, "resnet18", variables)
  msg = str(e.value)
  assert "1 leaves not filled (batch_stats/stage3_block1/bn2/var)" in msg
  assert "1 unexpected tensors (layer9.0.conv1.weight (1, 1, 1, 1) -> params/stage9_block0/conv1/kernel)" in msg
  assert "fc.weight (10, 512) -> params/head/kernel: (512, 10) float32, the model has (512, 1000)" in msg
  assert "keep_init=('head/.*',)" in msg


def test_keep_init_leaves_a_head_for_other_classes_at_its_init(resnet18, torch_resnet18):
  sd, path = torch_resnet18
  variables = jax.tree_util.tree_map(lambda x: x, resnet18[1])  # a copy of the dicts
  rng = np.random.default_rng(3)  # a 10-class head's init
  variables["params"]["head"] = {"kernel": jnp.asarray(rng.standard_normal((512, 10), np.float32)),
                                 "bias": jnp.zeros((10,))}
  with pytest.raises(pretrained.PretrainedError, match="shape/dtype mismatches"):
    pretrained.load_float_variables(path, "resnet18", variables)
  loaded = pretrained.load_float_variables(path, "resnet18", variables, keep_init=("head/.*",))
  _assert_trees_equal(loaded["params"]["head"], variables["params"]["head"])
  expected = expected_variables(sd)
  _assert_trees_equal(loaded["params"]["stage3_block0"], expected["params"]["stage3_block0"])
  _assert_trees_equal(loaded["batch_stats"], expected["batch_stats"])


def test_duplicate_keys_and_unknown_inputs(tmp_path, resnet18, torch_resnet18):
  _, variables = resnet18
  sd, path = torch_resnet18
  doubled = dict(sd)
  doubled["module.fc.bias"] = sd["fc.bias"]  # only some keys prefixed: not stripped
  dup = str(tmp_path / "dup.safetensors")
  save_file(doubled, dup)
  with pytest.raises(pretrained.PretrainedError, match="1 unexpected tensors \\(module.fc.bias\\)"):
    pretrained.load_float_variables(dup, "resnet18", variables)
  rules = pretrained.TORCHVISION_RESNET + (pretrained.NameRule(r"head", "head", "linear"),)
  mapped = pretrained.map_torch_names({"fc.bias": sd["fc.bias"], "head.bias": sd["fc.bias"]}, rules)
  assert mapped.duplicates == [("head.bias", "params/head/bias")]
  with pytest.raises(pretrained.PretrainedError, match="No PyTorch name mapping for model 'small_cnn'"):
    pretrained.load_float_variables(path, "small_cnn", variables)
  with pytest.raises(pretrained.PretrainedError, match="unknown weight file type"):
    pretrained.load_float_variables(str(tmp_path / "w.npz"), "resnet18", variables)
  with pytest.raises(pretrained.PretrainedError, match="do not exist"):
    pretrained.load_float_variables(str(tmp_path / "nope.pth"), "resnet18", variables)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(pretrained.PretrainedError, match="not a readable .safetensors"):
    pretrained.load_float_variables(str(garbage), "resnet18", variables)
  with pytest.raises(pretrained.PretrainedError, match="neither the workdir"):
    pretrained.restore_init(_config(model="resnet18", init_from=str(tmp_path / "missing")), None)


# ----------------------------------------------------------------------------
# torch.save files, read without torch


def test_torch_reader_matches_torch_output():
  """The fixture was written by torch 2.13 (tests/data/make_torch_fixture.py)."""
  expected = np.load(os.path.join(DATA, "torch_expected.npz"))
  keys = [k.removeprefix("value:") for k in expected.files if k.startswith("value:")]
  sd = pretrained.read_torch_state_dict(os.path.join(DATA, "torch_checkpoint.pt"))
  assert sorted(sd) == sorted(keys)  # "module." removed, "epoch"/"args" wrapper dropped
  for k in keys:
    want = expected[f"value:{k}"]
    assert str(sd[k].dtype) == str(expected[f"dtype:{k}"]), k
    assert sd[k].shape == want.shape and sd[k].flags.c_contiguous, k
    np.testing.assert_array_equal(sd[k].astype(want.dtype), want, err_msg=k)
  assert sd["1.num_batches_tracked"].shape == () and int(sd["1.num_batches_tracked"]) == 7
  np.testing.assert_array_equal(sd["view.transposed"], sd["view.base"].T)
  np.testing.assert_array_equal(sd["view.offset"], sd["view.base"][1:, 1:3])
  sd["view.base"][0, 0] = 99.0  # copies, not views of one another or of the file
  assert sd["view.transposed"][0, 0] != 99.0


def test_torch_reader_plain_state_dict_and_mapping_kinds():
  sd = pretrained.read_torch_state_dict(os.path.join(DATA, "torch_plain.pth"))
  full = pretrained.read_torch_state_dict(os.path.join(DATA, "torch_checkpoint.pt"))
  assert list(sd) == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                      "1.num_batches_tracked", "3.weight", "3.bias"]  # OrderedDict order kept
  for k in sd:
    np.testing.assert_array_equal(sd[k], full[k])
  rules = (pretrained.NameRule("0", "conv", "conv"), pretrained.NameRule("1", "bn", "batchnorm"),
           pretrained.NameRule("3", "dense", "linear"))
  mapped = pretrained.map_torch_names(sd, rules)
  assert not mapped.unexpected and not mapped.duplicates
  leaves = {p: v for p, (_, v) in mapped.leaves.items()}
  assert sorted(leaves) == ["batch_stats/bn/mean", "batch_stats/bn/var", "params/bn/bias", "params/bn/scale",
                            "params/conv/kernel", "params/dense/bias", "params/dense/kernel"]
  np.testing.assert_array_equal(leaves["params/conv/kernel"][2, 0, 1, 3], sd["0.weight"][3, 1, 2, 0])
  np.testing.assert_array_equal(leaves["params/dense/kernel"], sd["3.weight"].T)


class _TinyNet(nn.Module):
  """Flax twin of the fixture's torch net: Conv2d(3, 4, 3, bias=False),
  BatchNorm2d(4), Flatten, Linear(4, 2)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return nn.Dense(2, name="dense")(x.reshape((x.shape[0], -1)))


def test_pth_file_into_a_flax_twin_reproduces_torch_logits(monkeypatch):
  """A torch.save file through load_float_variables, with a family of its
  own: the Flax forward equals torch's own output (saved by the fixture
  script), so the kernel layouts are torch's, not only this file's idea."""
  rules = (pretrained.NameRule("0", "conv", "conv"), pretrained.NameRule("1", "bn", "batchnorm"),
           pretrained.NameRule("3", "dense", "linear"))
  monkeypatch.setitem(pretrained.FAMILIES, "tiny_torch", rules)
  monkeypatch.setitem(pretrained.MODEL_FAMILIES, "tiny", "tiny_torch")
  expected = np.load(os.path.join(DATA, "torch_expected.npz"))
  x = np.transpose(expected["forward:input"], (0, 2, 3, 1))  # NCHW -> NHWC
  model = _TinyNet()
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = pretrained.load_float_variables(os.path.join(DATA, "torch_plain.pth"), "tiny", template)
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), expected["forward:output"], rtol=1e-5, atol=1e-6)


def _torch_like_zip(path, obj):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    z.writestr("archive/byteorder", "little")


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_torch_reader_runs_no_code_and_explains_bad_files(tmp_path):
  evil = _Evil()
  evil.marker = str(tmp_path / "pwned")
  _torch_like_zip(tmp_path / "evil.pt", {"model": {"w": evil}})
  with pytest.raises(pretrained.PretrainedError, match="holds no state_dict"):
    pretrained.read_torch_state_dict(str(tmp_path / "evil.pt"))
  assert not os.path.exists(evil.marker)
  (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(pretrained.PretrainedError, match="not a zip archive"):
    pretrained.read_torch_state_dict(str(tmp_path / "legacy.pt"))
  with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
    z.writestr("m/data.pkl", b"")
    z.writestr("m/constants.pkl", b"")
  with pytest.raises(pretrained.PretrainedError, match="TorchScript"):
    pretrained.read_torch_state_dict(str(tmp_path / "script.pt"))


# ----------------------------------------------------------------------------
# Orbax checkpoints and our own float runs


def _small_cnn_variables(seed):
  """Random float variables of the digits CNN (non-trivial statistics, so
  that a swap of mean/var or of layers shows)."""
  model = models.create_model("small_cnn", 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)), shapes)


def test_orbax_pytree_checkpoint(tmp_path):
  saved = _small_cnn_variables(1)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(tmp_path / "plain"), saved)
  ckptr.save(str(tmp_path / "step" / "default"), {**saved, "step": 5, "opt_state": {"mu": jnp.ones(3)}})
  ckptr.wait_until_finished()
  template = _small_cnn_variables(2)
  for where in ("plain", "step"):
    loaded = pretrained.load_float_variables(str(tmp_path / where), "small_cnn", template)
    _assert_trees_equal(loaded, saved)
  config = _config(model="small_cnn", method="csq", init_from=str(tmp_path / "plain"))
  state = train.TrainState(jnp.zeros((), jnp.int32), template["params"], template["batch_stats"], None)
  params, batch_stats = pretrained.restore_init(config, state)
  _assert_trees_equal({"params": params, "batch_stats": batch_stats}, saved)
  bigger = {"params": template["params"], "batch_stats": {**template["batch_stats"], "bn9": {"mean": jnp.zeros(4)}}}
  with pytest.raises(pretrained.PretrainedError, match="1 leaves not filled \\(batch_stats/bn9/mean\\)"):
    pretrained.load_float_variables(str(tmp_path / "plain"), "small_cnn", bigger)
  with pytest.raises(pretrained.PretrainedError, match="1 unexpected tensors \\(params/head/bias -> params/head/bias\\)"):
    pretrained.load_float_variables(str(tmp_path / "plain"), "small_cnn",
                                    {**template, "params": {**template["params"], "head": {"kernel": template["params"]["head"]["kernel"]}}})
  (tmp_path / "empty").mkdir()
  with pytest.raises(pretrained.PretrainedError, match="not an orbax checkpoint directory"):
    pretrained.load_float_variables(str(tmp_path / "empty"), "small_cnn", template)


def test_workdir_of_a_float_run_goes_to_restore_float_weights(tmp_path):
  config = _config(model="small_cnn", method="fp")
  phase = train.make_phases(config, 1)[0]
  trained = _small_cnn_variables(4)
  state = train.TrainState(jnp.zeros((), jnp.int32), trained["params"], trained["batch_stats"],
                           phase.tx.init(trained["params"]))
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 1, state, {**checkpoint.run_identity(config), "epoch": 1, "structure": {}})
  mngr.close()
  csq_config = _config(model="small_cnn", method="csq", init_from=str(tmp_path))
  model = train.create_model(csq_config, 10)
  new_state, _ = train.init_state(csq_config, model, (8, 8, 1), phase, jax.random.key(0))
  _assert_trees_equal(new_state.batch_stats, trained["batch_stats"])
  # The run's step folder is an orbax checkpoint too (its "state" item).
  step = pretrained.load_float_variables(str(tmp_path / "checkpoints" / "1"), "small_cnn", _small_cnn_variables(5))
  _assert_trees_equal(step, trained)
  w = np.asarray(trained["params"]["conv3"]["kernel"])
  hard = np.asarray(transform.materialize(new_state.params, None, hard=True)["conv3"]["kernel"])
  assert np.abs(hard - w).max() <= 0.5 * np.abs(w).max() / 255 + 4e-7 * np.abs(w).max()
