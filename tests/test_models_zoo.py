"""Model zoo: VGG19-BN, MobileNetV3-Large, DeiT-S, Swin-T.

Parameter counts and multiply-adds against arithmetic on the published layer
shapes and the papers' figures, output shapes, the quantization rules, a
jitted CSQ training step, and attention and Swin's window machinery against
brute-force references.

Parameters are NumPy-filled from ``jax.eval_shape`` instead of a compiled
init: XLA:CPU spends up to a minute compiling MobileNetV3's 300 random
initializers, while a forward pass at 224x224 takes seconds. The CSQ training
step runs on reduced variants (same code and parameter names, fewer and
narrower layers: its compile time grows with the number of CSQ layers); the
full models' steps are marked slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csq_jax import budget, models, transform
from csq_jax.models import mobilenet_v3, swin, vgg, vit
from csq_jax.quantizers import activations, csq

NEW = ("vgg19_bn", "mobilenet_v3_large", "deit_s", "swin_t")

# Reduced variants that keep every layer kind (and so every QUANT_RULES
# pattern) in as few layers as possible (XLA:CPU compile time grows with the
# number of CSQ layers): VGG with three convs; MobileNetV3 with a ReLU block
# without expansion, with a residual, and a strided hardswish block with
# expansion and SE; a one-block ViT; Swin at 32x32 with a shifted, masked
# stage and a one-window stage after a patch merging.
SMALL = {
    "vgg19_bn": dict(cfg=(16, "M", 32, 32, "M")),
    "mobilenet_v3_large": dict(blocks=((3, 16, 16, False, "RE", 1), (5, 48, 24, True, "HS", 2)),
                               last_channels=64),
    "deit_s": dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2),
    "swin_t": dict(img_size=32, embed_dim=32, depths=(2, 1), num_heads=(1, 2), window_size=4),
}
SMALL_SIZE = 32


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(model, size):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _full(name, **kw):
  classes = 10 if name == "vgg19_bn" else 1000
  return models.create_model(name, classes) if not kw else models.MODELS[name](num_classes=classes, **kw)


def _full_size(name):
  return 32 if name == "vgg19_bn" else 224


def _numpy_variables(abstract, seed=0):
  """Variables of the given shapes without compiling the model's init: norm
  scales/variances 1, biases/means 0, other leaves N(0, 1/fan_in)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if leaf in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    fan_in = max(int(np.prod(s.shape[:-1])), 1)
    return (rng.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def _small_variables(name):
  """The reduced variant and its variables (NumPy-filled, see the docstring)."""
  m = models.MODELS[name](num_classes=10, **SMALL[name])
  return m, _numpy_variables(_abstract(m, SMALL_SIZE))


# ---- parameter counts, from the layer shapes of the reference implementations


def _vgg19_bn_count(classes):
  cfg = [64, 64, 128, 128] + [256] * 4 + [512] * 8  # the 16 convs
  n, c = 0, 3
  for v in cfg:
    n += 9 * c * v + v + 2 * v  # 3x3 kernel, bias, BN scale/bias
    c = v
  return n + 512 * classes + classes


def _mobilenet_v3_large_count(classes):
  # torchvision's table: (in, kernel, expanded, out, squeeze channels or 0).
  table = [(16, 3, 16, 16, 0), (16, 3, 64, 24, 0), (24, 3, 72, 24, 0), (24, 5, 72, 40, 24),
           (40, 5, 120, 40, 32), (40, 5, 120, 40, 32), (40, 3, 240, 80, 0), (80, 3, 200, 80, 0),
           (80, 3, 184, 80, 0), (80, 3, 184, 80, 0), (80, 3, 480, 112, 120), (112, 3, 672, 112, 168),
           (112, 5, 672, 160, 168), (160, 5, 960, 160, 240), (160, 5, 960, 160, 240)]
  n = 27 * 16 + 2 * 16  # stem conv + BN
  for cin, k, exp, out, sq in table:
    if exp != cin:
      n += cin * exp + 2 * exp
    n += k * k * exp + 2 * exp  # depthwise
    if sq:
      n += exp * sq + sq + sq * exp + exp
    n += exp * out + 2 * out
  n += 160 * 960 + 2 * 960  # last conv
  return n + 960 * 1280 + 1280 + 1280 * classes + classes


def _deit_s_count(classes, img=224, patch=16, d=384, depth=12):
  tokens = (img // patch) ** 2 + 1
  block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  return 3 * patch * patch * d + d + d + tokens * d + depth * block + 2 * d + d * classes + classes


def _swin_t_count(classes):
  n, d = 48 * 96 + 96 + 2 * 96, 96  # 4x4 patch conv, patch norm
  for s, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
    if s > 0:
      n += 2 * 4 * d + 4 * d * 2 * d  # merge: norm, bias-free reduction
      d *= 2
    n += depth * (2 * d + 13 * 13 * heads + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d
                  + (d * 4 * d + 4 * d) + (4 * d * d + d))
  return n + 2 * d + d * classes + classes


@pytest.mark.parametrize("name, expected, reference", [
    ("vgg19_bn", 20_040_522, _vgg19_bn_count(10)),
    ("mobilenet_v3_large", 5_483_032, _mobilenet_v3_large_count(1000)),
    ("deit_s", 22_050_664, _deit_s_count(1000)),
    ("swin_t", 28_288_354, _swin_t_count(1000)),
])
def test_param_count_matches_reference(name, expected, reference):
  assert reference == expected
  assert _count(_abstract(_full(name), _full_size(name))["params"]) == expected


def test_deit_pos_embed_follows_img_size():
  v = _abstract(_full("deit_s", img_size=32), 32)["params"]
  assert v["pos_embed"].shape == (1, 5, 384)
  assert _count(v) == _deit_s_count(1000, img=32)


def test_mobilenet_v3_squeeze_widths_and_expansions():
  assert [mobilenet_v3.make_divisible(c // 4) for c in (72, 120, 480, 672, 960)] == [24, 32, 120, 168, 240]
  p = _abstract(_full("mobilenet_v3_large"), 32)["params"]
  assert "expand_conv" not in p["block0"] and "se" not in p["block0"]
  assert p["block3"]["se"]["fc1"]["kernel"].shape == (72, 24)
  assert p["block14"]["dw_conv"]["kernel"].shape == (5, 5, 1, 960)
  assert p["pre_logits"]["kernel"].shape == (960, 1280)


def _attention_macs(tokens_per_window, windows, dim, blocks):
  return blocks * 2 * windows * tokens_per_window**2 * dim  # q @ k^T and probs @ v


def _published_macs(name):
  if name == "vgg19_bn":  # exact: 3x3 convs at 32, 16, 8, 4, 2 pixels, and the head
    convs = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8)] + [(256, 256, 8)] * 3
    convs += [(256, 512, 4)] + [(512, 512, 4)] * 3 + [(512, 512, 2)] * 4
    return sum(9 * a * b * r * r for a, b, r in convs) + 512 * 10, 0.0
  if name == "mobilenet_v3_large":
    return 219e6, 0.02  # Howard et al. 2019, Table 3: 219M MAdds
  if name == "deit_s":  # Touvron et al. 2021, Table 1: 4.6 GFLOPs (multiply-adds), attention included
    return 4.6e9 - _attention_macs(197, 1, 384, 12), 0.01
  # Liu et al. 2021, Table 1: 4.5G FLOPs (multiply-adds), window attention included
  attn = sum(_attention_macs(49, (56 // 7 // 2**s) ** 2, 96 * 2**s, d) for s, d in enumerate((2, 2, 6, 2)))
  return 4.5e9 - attn, 0.01


@pytest.mark.parametrize("name", NEW)
def test_layer_macs_match_published_figures(name):
  """budget.layer_macs (used for BOPs) sees every counted layer, and its
  total matches the papers' multiply-adds: the spatial layout is right."""
  m, size = _full(name), _full_size(name)
  v = _abstract(m, size)
  macs = budget.layer_macs(m, v, jnp.zeros((1, size, size, 3)))
  counted = _rule_report(models.DEFAULT_RULES[name], v["params"]).quantized_paths()
  assert set(counted) <= set(macs)
  expected, rtol = _published_macs(name)
  np.testing.assert_allclose(sum(macs.values()), expected, rtol=rtol)


@pytest.mark.parametrize("name, expected", [
    ("vgg19_bn", 16),  # after every conv
    ("mobilenet_v3_large", 1 + 5 * 2),  # the ReLU blocks 0-5: depthwise (+ expand in 1-5)
    ("deit_s", 0),  # no ReLU: act unused, activations float
    ("swin_t", 0),
])
def test_activation_quantizer_replaces_the_relus(name, expected):
  m = models.create_model(name, 10, activations.activation_factory("pact", 4))
  p = _abstract(m, _full_size(name))["params"]
  alphas = [k for k, _ in jax.tree_util.tree_flatten_with_path(p)[0] if k[-1].key == "alpha"]
  assert len(alphas) == expected


# ---- quantization rules


def _rule_report(rules, abstract_params):
  """``quantize_params``'s report for CSQ on abstract params (no compute)."""
  out = {}

  def run(p):
    q, out["report"] = transform.quantize_params(
        p, transform.rules_from_config(rules), transform.QuantizeSpec("csq", 8))
    return q

  jax.eval_shape(run, abstract_params)
  return out["report"]


@pytest.mark.parametrize("name, fixed, quantized", [
    ("vgg19_bn", {"conv0/kernel", "head/kernel"}, 15),
    # stem, head and 15 depthwise fixed; 14 expand + 15 project + 8x2 SE + last conv + pre-logits searched
    ("mobilenet_v3_large", {"stem_conv/kernel", "head/kernel"} | {f"block{i}/dw_conv/kernel" for i in range(15)}, 47),
    ("deit_s", {"patch_embed/kernel", "head/kernel"}, 12 * 4),
    ("swin_t", {"patch_embed/kernel", "head/kernel"}, 12 * 4 + 3),  # + 3 patch merging reductions
])
def test_quant_rules_select_intended_layers(name, fixed, quantized):
  rules = models.DEFAULT_RULES[name]
  assert rules is getattr({"vgg19_bn": vgg, "mobilenet_v3_large": mobilenet_v3, "deit_s": vit,
                           "swin_t": swin}[name], "QUANT_RULES")
  report = _rule_report(rules, _abstract(_full(name), _full_size(name))["params"])
  assert report.unused_rules == []
  acts = report.actions
  assert {p for p, (a, _) in acts.items() if a == "fixed"} == fixed
  assert all(bits == 8 for a, bits in acts.values() if a == "fixed")
  assert len([p for p, (a, _) in acts.items() if a == "quantize"]) == quantized
  # Exactly the kernels are counted; embeddings, norms, biases, bias tables stay float.
  assert {p for p, (a, _) in acts.items() if a != "float"} == {p for p in acts if p.endswith("/kernel")}
  if name == "mobilenet_v3_large":
    assert acts["block3/se/fc1/kernel"][0] == acts["block0/project_conv/kernel"][0] == "quantize"
  if name == "swin_t":
    assert acts["stage1_block0/relative_position_bias_table"] == ("float", None)


@pytest.mark.parametrize("name", NEW)
def test_quant_rules_all_match_the_small_variants(name):
  m = models.MODELS[name](num_classes=10, **SMALL[name])
  report = _rule_report(models.DEFAULT_RULES[name], _abstract(m, SMALL_SIZE)["params"])
  assert report.unused_rules == []


@pytest.mark.parametrize("name, size", [
    ("small_cnn", 8), ("resnet20", 32), ("resnet32", 32), ("resnet56", 32),
    ("resnet18", 32), ("resnet34", 32), ("resnet50", 32),
])
def test_default_rules_of_existing_models(name, size):
  report = _rule_report(models.DEFAULT_RULES[name], _abstract(models.create_model(name, 10), size)["params"])
  assert report.unused_rules == []
  kernels = {p: a for p, (a, _) in report.actions.items() if p.endswith("/kernel")}
  assert all((a == "float") == p.endswith("shortcut_conv/kernel") for p, a in kernels.items())


def test_every_model_has_default_rules():
  assert set(models.DEFAULT_RULES) == set(models.MODELS)
  for rules in models.DEFAULT_RULES.values():
    transform.rules_from_config(rules)


# ---- forward passes


@pytest.mark.parametrize("name", NEW)
def test_small_variant_shapes_and_bfloat16(name):
  # Params stay float32 whatever the compute dtype.
  abstract = _abstract(models.MODELS[name](num_classes=10, dtype=jnp.bfloat16, **SMALL[name]), SMALL_SIZE)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(abstract))
  m, v = _small_variables(name)
  x = np.random.default_rng(1).standard_normal((3, SMALL_SIZE, SMALL_SIZE, 3), dtype=np.float32)
  out = jax.jit(m.apply)(v, x)
  assert out.shape == (3, 10) and out.dtype == jnp.float32 and jnp.all(jnp.isfinite(out))
  # bfloat16 compute with the same float32 params: close to, not equal to, float32.
  mb = models.MODELS[name](num_classes=10, dtype=jnp.bfloat16, **SMALL[name])
  out_b = jax.jit(mb.apply)(v, x)
  assert out_b.dtype == jnp.float32
  assert not np.array_equal(out_b, out)
  scale = float(jnp.max(jnp.abs(out)))
  np.testing.assert_allclose(out_b, out, atol=0.1 * scale + 1e-3)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "deit_s", "swin_t"])
def test_forward_at_224(name):
  m = _full(name)
  v = _numpy_variables(_abstract(m, 224))
  x = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
  out = jax.jit(m.apply)(v, x)
  assert out.shape == (1, 1000) and jnp.all(jnp.isfinite(out))


def test_input_size_errors():
  with pytest.raises(ValueError, match="set img_size"):
    _abstract(_full("deit_s"), 32)
  with pytest.raises(ValueError, match="set img_size"):
    _abstract(_full("swin_t"), 32)
  with pytest.raises(ValueError, match="not a multiple of window_size"):
    _abstract(_full("swin_t", img_size=64), 64)  # stage 1 is 16x16, windows 7x7


# ---- one CSQ training step


def _csq_step_check(model, rules, variables, x, labels):
  """Quantize with CSQ (8 bits, float init), take two jitted normalized
  gradient steps through ``materialize``; the loss must fall and every
  quantized layer must get a finite, non-zero gradient."""
  out = {}

  @jax.jit  # one compile instead of one per op and kernel shape
  def quantize(params):
    qp, out["report"] = transform.quantize_params(
        params, transform.rules_from_config(rules), transform.QuantizeSpec("csq", 8))
    return qp

  def loss_fn(qp, beta):
    weights = transform.materialize(qp, beta)
    logits, updates = model.apply({"params": weights, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), updates

  @functools.partial(jax.jit, donate_argnums=0)
  def step(qp):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(qp, 1.0)
    norm = optax.global_norm(grads)
    # Per quantized layer: all gradients finite, and the main one (bit logits
    # or STE latent) not all zero. Computed here so no gradient leaves the step.
    checks = {
        path: (jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(g)])),
               jnp.any((g.pos_logits if isinstance(g, csq.CSQWeight) else g.latent) != 0))
        for path, g in transform.quantized_leaves(grads).items()
    }
    return loss, checks, jax.tree.map(lambda p, g: p - 0.1 * g / norm, qp, grads), updates

  batch_stats = variables.get("batch_stats", {})
  loss0, checks, qp1, updates = step(quantize(variables["params"]))
  report = out["report"]
  assert report.unused_rules == []
  loss1 = step(qp1)[0]
  assert np.isfinite(loss0) and loss1 < loss0
  assert set(updates.get("batch_stats", {})) == set(batch_stats)
  assert set(checks) == set(report.quantized_paths())
  for path, (finite, nonzero) in checks.items():
    assert finite and nonzero, path


@pytest.mark.parametrize("name", NEW)
def test_csq_training_step_small_variant(name):
  m, v = _small_variables(name)
  x = jax.random.normal(jax.random.key(1), (2, SMALL_SIZE, SMALL_SIZE, 3))
  _csq_step_check(m, models.DEFAULT_RULES[name], v, x, jnp.array([3, 7]))


@pytest.mark.extended  # test_configs runs the full models' configs' steps in CI
@pytest.mark.parametrize("name, size, kw", [
    ("vgg19_bn", 32, {}),
    ("mobilenet_v3_large", 64, {}),
    ("deit_s", 32, dict(img_size=32)),
    ("swin_t", 64, dict(img_size=64, window_size=4)),
])
def test_csq_training_step_full_model(name, size, kw):
  m = _full(name, **kw)
  v = _numpy_variables(_abstract(m, size))
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  _csq_step_check(m, models.DEFAULT_RULES[name], v, x, jnp.array([3, 7]))


# ---- attention and Swin windows against brute force


def test_attention_matches_jax_reference():
  attn = vit.Attention(num_heads=2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, 8), dtype=np.float32)  # [batch, windows, tokens, dim]
  bias = rng.standard_normal((3, 2, 5, 5), dtype=np.float32)  # [windows, heads, N, N]
  v = _numpy_variables(jax.eval_shape(attn.init, jax.random.key(0), x, bias))

  @jax.jit
  def both(v):
    p = v["params"]
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(6, 5, 3, 2, 4)
    full_bias = jnp.broadcast_to(bias, (2, 3, 2, 5, 5)).reshape(6, 2, 5, 5)
    ref = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=full_bias)
    return attn.apply(v, x, bias), ref.reshape(2, 3, 5, 8) @ p["proj"]["kernel"] + p["proj"]["bias"]

  out, ref = both(v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_relative_position_index_brute_force():
  for w in (2, 3, 7):
    idx = swin.relative_position_index(w)
    pos = [(y, x) for y in range(w) for x in range(w)]
    ref = [[(a[0] - b[0] + w - 1) * (2 * w - 1) + (a[1] - b[1] + w - 1) for b in pos] for a in pos]
    np.testing.assert_array_equal(idx, ref)
  assert swin.relative_position_index(7).max() == 13 * 13 - 1


def test_window_partition_roundtrip():
  x = np.arange(2 * 8 * 12 * 3).reshape(2, 8, 12, 3)
  w = swin.window_partition(x, 4)
  assert w.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(w[1, 4, 5], x[1, 4 + 1, 4 + 1])  # window (1, 1), row 1, col 1
  np.testing.assert_array_equal(swin.window_reverse(w, 4, 8, 12), x)


def test_shift_mask_keeps_wrapped_regions_apart():
  h = w = 8
  ws, shift = 4, 2
  mask = swin.shift_mask(h, w, ws, shift)
  assert mask.shape == (4, 16, 16)
  for win in range(4):
    wy, wx = divmod(win, 2)
    cells = [(wy * ws + i, wx * ws + j) for i in range(ws) for j in range(ws)]  # rolled coordinates
    wrapped = [(y >= h - shift, x >= w - shift) for y, x in cells]
    ref = [[0.0 if a == b else -100.0 for b in wrapped] for a in wrapped]
    np.testing.assert_array_equal(mask[win], ref)


@pytest.mark.parametrize("shift, affected", [
    (0, {(y, x) for y in range(4) for x in range(4)}),  # window (0, 0)
    (2, {(0, 0), (0, 1), (1, 0), (1, 1)}),  # wrapped corner region only: the mask works
])
def test_swin_block_receptive_field(shift, affected):
  """Perturb one channel of token (0, 0) of an 8x8 map: only tokens in its
  (shifted) window and region may change."""
  block = swin.SwinBlock(num_heads=2, window=4, shift=shift)
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 8), dtype=np.float32)
  x[1] = x[0]
  x[1, 0, 0, 0] += 1.0
  v = _numpy_variables(jax.eval_shape(lambda k: block.init(k, x, False), jax.random.key(1)))
  out = jax.jit(lambda v: block.apply(v, x, False))(v)
  diff = np.max(np.abs(np.asarray(out[1] - out[0])), axis=-1)
  assert {(int(y), int(x)) for y, x in zip(*np.nonzero(diff > 1e-5))} == affected


def test_drop_path():
  x = np.random.default_rng(0).standard_normal((64, 3, 4), dtype=np.float32)
  f = jax.jit(lambda x, key: vit.DropPath(0.25).apply({}, x, True, rngs={"dropout": key}))
  y = np.asarray(f(x, jax.random.key(0)))
  kept = np.all(np.isclose(y, x / 0.75), axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped) and 5 <= dropped.sum() <= 30  # Binomial(64, 0.25): mean 16
  assert not np.array_equal(f(x, jax.random.key(1)), y)
  np.testing.assert_array_equal(vit.DropPath(0.25).apply({}, x, False), x)
