"""Model-size accounting and the budget-aware regularizer (Sec. III-B, Eqs. 6-7)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax import budget, transform
from csq_jax.quantizers.csq import CSQWeight
from csq_jax.quantizers.ste import STEWeight


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _csq(shape, mask, mode="learned", seed=0):
  n = len(mask)
  rng = np.random.default_rng(seed)
  return CSQWeight(
      jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
      jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
      jnp.asarray(mask, jnp.float32),
      jnp.asarray(0.5, jnp.float32),
      mode,
  )


MASK_A = [1.0, -1.0, 0.5, -2.0]  # 2 bits
MASK_B = [0.3, 0.0, 1.0, -0.7]   # 3 bits (0 counts)


def hand_params():
  """Layers a: 12 weights x 2 bits, b: 20 x 3 (CSQ), c: 10 x 6 (STE); bn: float."""
  return {
      "a": {"kernel": _csq((3, 4), MASK_A, seed=1)},
      "b": {"kernel": _csq((2, 2, 1, 5), MASK_B, seed=2)},
      "c": {"kernel": STEWeight(jnp.ones((5, 2), jnp.float32), 6)},
      "bn": {"scale": jnp.ones((7,), jnp.float32), "bias": jnp.zeros((7,), jnp.float32)},
  }


N = {"a/kernel": 12, "b/kernel": 20, "c/kernel": 10}
B = {"a/kernel": 2, "b/kernel": 3, "c/kernel": 6}
AVG_PARAMS = (12 * 2 + 20 * 3 + 10 * 6) / 42.0
AVG_LAYERS = (2 + 3 + 6) / 3.0


def test_layer_tables():
  q = hand_params()
  assert {k: int(v) for k, v in budget.layer_precisions(q).items()} == B
  assert budget.layer_sizes(q) == N


def test_average_bits():
  q = hand_params()
  np.testing.assert_allclose(float(budget.average_bits(q, "params")), AVG_PARAMS, rtol=1e-6)
  np.testing.assert_allclose(float(budget.average_bits(q)), AVG_PARAMS, rtol=1e-6)
  np.testing.assert_allclose(float(budget.average_bits(q, "layers")), AVG_LAYERS, rtol=1e-6)
  jitted = jax.jit(lambda q: budget.average_bits(q, "params"))(q)
  np.testing.assert_allclose(float(jitted), AVG_PARAMS, rtol=1e-6)
  assert budget.average_bits(q).dtype == jnp.float32
  with pytest.raises(ValueError):
    budget.average_bits(q, "bogus")


def test_average_bits_without_quantized_layers():
  assert float(budget.average_bits({"w": jnp.ones((3, 3))})) == 32.0


def test_mask_sum_only_learned_masks():
  q = hand_params()
  beta = 2.0
  expected = np.sum(np_sigmoid(beta * np.array(MASK_A))) + np.sum(np_sigmoid(beta * np.array(MASK_B)))
  np.testing.assert_allclose(float(budget.mask_sum(q, beta)), expected, rtol=1e-6)
  q["b"]["kernel"] = q["b"]["kernel"].replace(mask_mode="frozen")
  np.testing.assert_allclose(float(budget.mask_sum(q, beta)),
                             np.sum(np_sigmoid(beta * np.array(MASK_A))), rtol=1e-6)


@pytest.mark.parametrize("weighting,avg", [("params", AVG_PARAMS), ("layers", AVG_LAYERS)])
@pytest.mark.parametrize("target", [2.0, 5.5])
def test_budget_penalty_value_and_gradient(weighting, avg, target):
  q = hand_params()
  beta, lam = 1.5, 0.01
  penalty, delta = budget.budget_penalty(q, beta, target, lam, weighting)
  np.testing.assert_allclose(float(delta), avg - target, rtol=1e-6)
  masks = [np.array(MASK_A), np.array(MASK_B)]
  mask_total = sum(np.sum(np_sigmoid(beta * m)) for m in masks)
  np.testing.assert_allclose(float(penalty), lam * (avg - target) * mask_total, rtol=1e-5)

  grads = jax.grad(lambda q: budget.budget_penalty(q, beta, target, lam, weighting)[0])(q)
  for name, m in (("a", masks[0]), ("b", masks[1])):
    gm = np.asarray(grads[name]["kernel"].mask_logits, np.float64)
    sig = np_sigmoid(beta * m)
    # Delta_S is a constant: the gradient is lambda * delta * beta * sigma'(beta m).
    np.testing.assert_allclose(gm, lam * (avg - target) * beta * sig * (1 - sig), rtol=1e-5)
    if avg > target:  # over budget: descent lowers the mask logits (prunes)
      assert np.all(gm > 0)
    else:  # under budget: descent raises them (grows)
      assert np.all(gm < 0)
    np.testing.assert_array_equal(np.asarray(grads[name]["kernel"].pos_logits), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[name]["kernel"].neg_logits), 0.0)
    assert float(grads[name]["kernel"].scale) == 0.0
  np.testing.assert_array_equal(np.asarray(grads["c"]["kernel"].latent), 0.0)
  np.testing.assert_array_equal(np.asarray(grads["bn"]["scale"]), 0.0)


def test_penalty_descent_moves_precision_toward_target():
  q = hand_params()
  over = jax.grad(lambda q: budget.budget_penalty(q, 1.0, 1.0, 1.0)[0])(q)
  under = jax.grad(lambda q: budget.budget_penalty(q, 1.0, 8.0, 1.0)[0])(q)
  lr = 100.0
  step = lambda q, g: jax.tree.map(lambda p, d: p - lr * d, q, g)
  assert float(budget.average_bits(step(q, over))) < AVG_PARAMS
  assert float(budget.average_bits(step(q, under))) > AVG_PARAMS


def test_model_size_and_compression():
  q = hand_params()
  size = 12 * 2 + 20 * 3 + 10 * 6
  assert float(budget.model_size_bits(q)) == size
  np.testing.assert_allclose(float(budget.compression(q)), 32.0 * 42 / size, rtol=1e-6)


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="SAME", use_bias=False, name="conv")(x)
    x = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", name="down")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(5, name="head")(x)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  x = jnp.ones((2, 8, 8, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
  return model, variables, x


def test_layer_macs(tiny):
  model, variables, x = tiny
  macs = budget.layer_macs(model, variables, x)
  assert macs == {
      "conv/kernel": 3 * 3 * 3 * 4 * 64,  # 8x8 output
      "down/kernel": 3 * 3 * 4 * 6 * 16,  # stride 2 -> 4x4 output
      "head/kernel": 6 * 5,
  }


def test_bops(tiny):
  model, variables, x = tiny
  macs = budget.layer_macs(model, variables, x)
  rules = transform.rules_from_config([("down/kernel", "fixed", 5), (".*kernel", "quantize")])
  q, _ = transform.quantize_params(variables["params"], rules, transform.QuantizeSpec("csq", 4))
  q["conv"]["kernel"] = q["conv"]["kernel"].replace(
      mask_logits=jnp.array([1.0, -1.0, -1.0, 1.0]))  # 2 bits
  bits = {"conv/kernel": 2, "down/kernel": 5, "head/kernel": 4}
  expected = sum(macs[k] * bits[k] * 4 for k in bits)
  assert budget.bops(q, macs, 4) == pytest.approx(expected)
  # Layers with unknown MACs are skipped.
  partial = {k: v for k, v in macs.items() if k != "head/kernel"}
  assert budget.bops(q, partial, 4) == pytest.approx(expected - macs["head/kernel"] * 4 * 4)


def test_layer_macs_keys_are_resnet20_param_paths():
  from csq_jax.models import create_model

  model = create_model("resnet20", 10)
  x = jnp.ones((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # abstract: no compile
  macs = budget.layer_macs(model, variables, x)
  kernels = {transform.path_str(p): v.shape for p, v in
             jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if transform.path_str(p).endswith("kernel")}
  assert set(macs) == set(kernels)  # the keys bops looks up are the parameter paths
  assert macs["conv_init/kernel"] == 3 * 3 * 3 * 16 * 32 * 32
  assert macs["stage1_block2/conv2/kernel"] == 3 * 3 * 16 * 16 * 32 * 32
  assert macs["stage2_block0/conv1/kernel"] == 3 * 3 * 16 * 32 * 16 * 16  # stride 2
  assert macs["stage2_block0/shortcut_conv/kernel"] == 16 * 32 * 16 * 16
  assert macs["stage3_block2/conv1/kernel"] == 3 * 3 * 64 * 64 * 8 * 8
  assert macs["head/kernel"] == 64 * 10


def test_macs_weighting_is_the_mac_weighted_average_and_a_bops_budget():
  """``budget_weighting="macs"``: ``sum_l M_l b_l / sum_l M_l`` (numpy), so
  that ``target * sum M_l * a_bits`` is the BOPs of a model at the target."""
  from csq_jax.quantizers import ste

  rng = np.random.default_rng(0)
  q = {"a": {"kernel": ste.init_from_float(rng.normal(size=(3, 3, 4, 8)).astype(np.float32), 2)},
       "b": {"kernel": ste.init_from_float(rng.normal(size=(8, 10)).astype(np.float32), 6)}}
  macs = {"a/kernel": 288 * 64, "b/kernel": 80}
  expected = (288 * 64 * 2 + 80 * 6) / (288 * 64 + 80)
  assert float(budget.average_bits(q, "macs", macs)) == pytest.approx(expected, rel=1e-6)
  assert float(budget.average_bits(q, "params")) == pytest.approx((288 * 2 + 80 * 6) / 368, rel=1e-6)
  assert budget.bops(q, macs, 8) == pytest.approx(expected * sum(macs.values()) * 8, rel=1e-6)
  with pytest.raises(ValueError, match="needs the layers' MACs"):
    budget.average_bits(q, "macs")
  with pytest.raises(ValueError, match="no MACs for the counted layers"):
    budget.layer_weights(q, "macs", {"a/kernel": 1})
