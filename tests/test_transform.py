"""Rule-based quantization of Flax parameter trees (Linen and NNX)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csq_jax import transform
from csq_jax.models import create_model
from csq_jax.quantizers import csq
from csq_jax.quantizers.csq import CSQWeight
from csq_jax.quantizers.ste import STEWeight
from csq_jax.methods import csq as csq_method
from csq_jax.transform import QuantizeSpec, Rule

DEFAULT_RULES = transform.rules_from_config(
    [(".*shortcut_conv/kernel", "float"), (".*kernel", "quantize")])


def _flat(tree):
  return {transform.path_str(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=transform.is_leaf)[0]}


# ---------------------------------------------------------------- rules


def test_rules_match_in_full_first_match_wins():
  rules = transform.rules_from_config([("conv", "quantize"), (".*kernel", "float")])
  assert transform.match_rule("conv0/kernel", rules) == 1  # 'conv' is only a partial match
  assert transform.match_rule("conv", rules) == 0
  assert transform.match_rule("conv0/bias", rules) is None
  rules = transform.rules_from_config([(".*kernel", "float"), ("conv0/kernel", "quantize")])
  assert transform.match_rule("conv0/kernel", rules) == 0
  assert transform.match_rule("xconv0/kernel_y", rules) is None


def test_rule_and_spec_validation():
  assert Rule("a", "fixed", 4) == transform.rules_from_config([("a", "fixed", 4)])[0]
  assert Rule("a").action == "quantize" and Rule("a").bits is None
  with pytest.raises(ValueError):
    Rule("a", "prune")
  with pytest.raises(ValueError, match=r"Rule 'conv\[': the pattern is not a valid regular expression"):
    Rule("conv[", "float")
  with pytest.raises(ValueError):
    QuantizeSpec(method="bogus")
  with pytest.raises(ValueError):
    QuantizeSpec(options={"init": "bogus"})
  for n in (0, 17):
    with pytest.raises(ValueError):
      QuantizeSpec(n_bits=n)


def _small_params():
  rng = np.random.default_rng(0)
  return {
      "conv0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                "bias": jnp.zeros((4,), jnp.float32)},
      "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
  }


def test_partial_match_does_not_count_and_unused_rules_reported():
  rules = transform.rules_from_config(
      [("conv", "quantize"), ("conv0/kernel", "fixed", 4), ("nomatch.*", "float")])
  params = _small_params()
  q, report = transform.quantize_params(params, rules, QuantizeSpec())
  assert q["dense"]["kernel"] is params["dense"]["kernel"]  # float leaves pass through
  assert q["conv0"]["bias"] is params["conv0"]["bias"]
  assert report.unused_rules == [rules[0], rules[2]]
  assert report.actions == {
      "conv0/bias": ("float", None),
      "conv0/kernel": ("fixed", 4),
      "dense/kernel": ("float", None),  # no rule matches -> float
  }
  assert report.quantized_paths() == ["conv0/kernel"]
  assert isinstance(q["conv0"]["kernel"], STEWeight) and q["conv0"]["kernel"].bits == 4
  assert not transform.is_leaf(q["dense"]["kernel"])
  np.testing.assert_array_equal(np.asarray(q["dense"]["kernel"]),
                                np.asarray(_small_params()["dense"]["kernel"]))
  _, report = transform.quantize_params(_small_params(), DEFAULT_RULES, QuantizeSpec())
  assert report.unused_rules == [DEFAULT_RULES[0]]  # no shortcut conv here


def test_fixed_rule_default_bits_and_quantize_rule_bits():
  rules = transform.rules_from_config([("conv0/kernel", "fixed"), ("dense/kernel", "quantize", 3)])
  q, report = transform.quantize_params(_small_params(), rules, QuantizeSpec("csq", 6))
  assert isinstance(q["conv0"]["kernel"], STEWeight) and q["conv0"]["kernel"].bits == 8
  assert isinstance(q["dense"]["kernel"], CSQWeight) and q["dense"]["kernel"].n_bits == 3
  assert report.actions["dense/kernel"] == ("quantize", 3)


def test_method_uses_spec_bits():
  rules = [Rule(".*kernel")]
  q, report = transform.quantize_params(_small_params(), rules, QuantizeSpec("ste", 5))
  assert isinstance(q["dense"]["kernel"], STEWeight) and q["dense"]["kernel"].bits == 5
  assert report.actions["dense/kernel"] == ("quantize", 5)
  q, _ = transform.quantize_params(_small_params(), rules, QuantizeSpec("csq_uniform", 5))
  w = q["dense"]["kernel"]
  assert isinstance(w, CSQWeight) and w.n_bits == 5 and w.mask_mode == "none"


def test_rule_bits_out_of_range_raise():
  with pytest.raises(ValueError):
    transform.quantize_params({"k": jnp.ones((3, 4))}, [Rule(".*", "quantize", 40)],
                              QuantizeSpec("csq"))


@pytest.mark.parametrize("pattern", [".*", "conv0/bias", ".*bias"])
def test_rule_selecting_rank1_leaf_raises(pattern):
  with pytest.raises(ValueError, match="rank"):
    transform.quantize_params(_small_params(), [Rule(pattern, "quantize")], QuantizeSpec())
  with pytest.raises(ValueError):
    transform.quantize_params(_small_params(), [Rule(pattern, "fixed", 4)], QuantizeSpec())


def test_random_init_needs_key_and_has_he_scale():
  spec = QuantizeSpec("csq", 4, {"init": "random"})
  rules = [Rule(".*kernel")]
  with pytest.raises(ValueError):
    transform.quantize_params(_small_params(), rules, spec)
  # An "rbg" key: the caller's choice of PRNG, and much faster to compile than threefry.
  q = jax.jit(lambda p, k: transform.quantize_params(p, rules, spec, key=k)[0])(
      _small_params(), jax.random.key(0, impl="rbg"))
  w, d = q["conv0"]["kernel"], q["dense"]["kernel"]
  assert isinstance(w, CSQWeight) and w.n_bits == 4 and isinstance(d, CSQWeight)
  np.testing.assert_allclose(float(jnp.std(csq.materialize(w, 1.0))), np.sqrt(2.0 / 18), rtol=1e-3)
  np.testing.assert_allclose(float(jnp.std(csq.materialize(d, 1.0))), np.sqrt(2.0 / 4), rtol=1e-3)
  # Different layers get different keys.
  assert not np.allclose(np.asarray(w.pos_logits[0, 0, 0, 0, :3]), np.asarray(d.pos_logits[0, 0]))


# ---------------------------------------------------------------- ResNet-20


@pytest.fixture(scope="module")
def resnet_params():
  # The parameter tree of the real model, from an abstract init (no compile);
  # values are drawn here so that the fixture stays fast.
  model = create_model("resnet20", 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape).astype(s.dtype)), shapes)


def abstract_quantize(params, rules, spec, key=None):
  """quantize_params traced abstractly (no compile): leaf types, static fields and shapes."""
  reports = []

  def f(p):
    q, report = transform.quantize_params(p, rules, spec, key)
    reports.append(report)
    return q

  return jax.eval_shape(f, params), reports[0]


def test_resnet20_default_rules(resnet_params):
  flat = _flat(resnet_params)
  kernels = {k: v for k, v in flat.items() if k.endswith("kernel")}
  convs = [k for k, v in kernels.items() if v.ndim == 4]
  shortcut = sorted(k for k in convs if "shortcut_conv" in k)
  # conv_init + 9 blocks x 2 convs + 2 shortcut convs; plus the dense head.
  assert len(convs) == 21 and len(kernels) == 22
  assert shortcut == ["stage2_block0/shortcut_conv/kernel", "stage3_block0/shortcut_conv/kernel"]

  q, report = abstract_quantize(resnet_params, DEFAULT_RULES, QuantizeSpec())
  quantized = sorted(report.quantized_paths())
  assert len(quantized) == 20
  assert quantized == sorted(set(kernels) - set(shortcut))
  assert "conv_init/kernel" in quantized and "head/kernel" in quantized
  assert report.unused_rules == []
  assert report.actions[shortcut[0]] == ("float", None)
  assert set(report.actions) == set(flat)
  leaves = transform.quantized_leaves(q)
  assert sorted(leaves) == quantized
  for k, v in leaves.items():
    assert isinstance(v, CSQWeight) and v.mask_mode == "learned" and v.n_bits == 8
    assert v.shape == flat[k].shape
  qflat = _flat(q)
  for k in shortcut:
    assert not transform.is_leaf(qflat[k]) and qflat[k].shape == flat[k].shape


def test_resnet20_round_trip(resnet_params):
  # One jitted program: compiling every op eagerly for each kernel shape is slow.
  q, _ = abstract_quantize(resnet_params, DEFAULT_RULES, QuantizeSpec())
  quantized = set(transform.quantized_leaves(q))
  assert len(quantized) == 20
  mat = jax.jit(lambda p: transform.materialize(
      transform.quantize_params(p, DEFAULT_RULES, QuantizeSpec())[0], 1.0, hard=True))(
          resnet_params)
  assert jax.tree.structure(mat) == jax.tree.structure(resnet_params)
  flat, mflat = _flat(resnet_params), _flat(mat)
  for k, v in flat.items():
    m = np.asarray(mflat[k])
    assert m.shape == v.shape and m.dtype == v.dtype, k
    v = np.asarray(v)
    if k not in quantized:
      np.testing.assert_array_equal(m, v, err_msg=k)
      continue
    s = np.max(np.abs(v))
    step = s / np.float32(255.0)
    ref = np.round(np.abs(v) / s * np.float32(255.0)) * np.sign(v) * step  # 8-bit rounding
    np.testing.assert_allclose(m, ref, rtol=0, atol=1e-3 * step, err_msg=k)
    assert np.max(np.abs(m - v)) <= 0.5 * step * (1 + 1e-4), k
    assert len(np.unique(np.round(m / step))) > 10


def test_resnet20_fp_leaves_everything_float(resnet_params):
  q, report = transform.quantize_params(resnet_params, DEFAULT_RULES, QuantizeSpec("fp"))
  assert transform.quantized_leaves(q) == {} and report.quantized_paths() == []
  assert all(a == ("float", None) for a in report.actions.values())
  assert jax.tree.structure(q) == jax.tree.structure(resnet_params)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(resnet_params)):
    assert a is b
  # Materializing a tree without quantized leaves is the identity.
  for a, b in zip(jax.tree.leaves(transform.materialize(q, 1.0)), jax.tree.leaves(resnet_params)):
    assert a is b


@pytest.mark.parametrize("method", ["ste", "csq_uniform", "csq"])
def test_resnet20_methods(resnet_params, method):
  q, report = abstract_quantize(resnet_params, DEFAULT_RULES, QuantizeSpec(method, 4))
  leaves = transform.quantized_leaves(q)
  assert len(leaves) == 20
  assert all(report.actions[k] == ("quantize", 4) for k in leaves)
  if method == "ste":
    assert all(isinstance(v, STEWeight) and v.bits == 4 for v in leaves.values())
  else:
    mode = "none" if method == "csq_uniform" else "learned"
    assert all(isinstance(v, CSQWeight) and v.mask_mode == mode and v.n_bits == 4
               for v in leaves.values())


def test_resnet20_fixed_rule(resnet_params):
  rules = transform.rules_from_config(
      [("head/kernel", "fixed", 4), (".*shortcut_conv/kernel", "float"), (".*kernel", "quantize")])
  q, report = abstract_quantize(resnet_params, rules, QuantizeSpec("csq", 8))
  head = q["head"]["kernel"]
  assert isinstance(head, STEWeight) and head.bits == 4
  assert report.actions["head/kernel"] == ("fixed", 4)
  assert sum(isinstance(v, CSQWeight) for v in transform.quantized_leaves(q).values()) == 19


def test_set_mask_mode():
  params = {
      "a": {"kernel": csq.init_from_float(np.ones((2, 3), np.float32), 4)},
      "b": {"kernel": csq.init_from_float(np.ones((2, 3), np.float32), 4, mask_mode="none")},
      "c": {"kernel": STEWeight(jnp.ones((2, 3)), 4)},
      "d": jnp.ones((3,)),
  }
  frozen = csq_method.set_mask_mode(params, "frozen")
  assert frozen["a"]["kernel"].mask_mode == "frozen"
  assert frozen["b"]["kernel"].mask_mode == "none"
  assert frozen["c"]["kernel"] is params["c"]["kernel"]
  assert frozen["d"] is params["d"]
  back = csq_method.set_mask_mode(frozen, "learned")
  assert back["a"]["kernel"].mask_mode == "learned" and back["b"]["kernel"].mask_mode == "none"
  with pytest.raises(ValueError):
    csq_method.set_mask_mode(params, "bogus")


def test_path_str_sequences():
  tree = {"layers": [{"kernel": jnp.ones((2, 2))}, {"kernel": jnp.ones((2, 3))}]}
  q, report = transform.quantize_params(tree, [Rule("layers/1/kernel", "fixed", 2)],
                                        QuantizeSpec())
  assert report.actions == {"layers/0/kernel": ("float", None), "layers/1/kernel": ("fixed", 2)}
  assert isinstance(q["layers"][1]["kernel"], STEWeight)


# ---------------------------------------------------------------- NNX


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.l = nnx.Linear(3, 4, rngs=rngs)

  def __call__(self, x):
    return self.l(x)


def test_nnx_state_round_trip():
  graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
  q, report = transform.quantize_params(state, DEFAULT_RULES, QuantizeSpec("csq", 4))
  assert report.actions == {"l/bias": ("float", None), "l/kernel": ("quantize", 4)}
  assert list(transform.quantized_leaves(q)) == ["l/kernel"]
  mat = transform.materialize(q, 1.0, hard=True)
  assert jax.tree.structure(mat) == jax.tree.structure(state)
  model = nnx.merge(graphdef, mat)
  x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
  y = np.asarray(model(jnp.asarray(x)))
  k = np.asarray(jax.tree.leaves(state)[1])
  assert k.shape == (3, 4)
  step = np.max(np.abs(k)) / 15.0
  kq = np.round(k / step) * step
  np.testing.assert_allclose(y, x @ kq, rtol=1e-5, atol=1e-5)  # bias is zero
  assert not np.allclose(y, x @ k, atol=1e-6)
