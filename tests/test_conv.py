"""csq_jax.models.conv: values and gradients equal XLA's convolution (float64
reference), the fast path is the one taken on CPU, and every model of the zoo
builds its convolutions through it with unchanged parameters."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from csq_jax.models import conv, create_model

DN = ("NHWC", "HWIO", "NHWC")
BATCH = 10  # >= conv._PIECES: the custom backward pass applies

CASES = [
    # (name, in_ch, out_ch, kernel, strides, padding, dilation, groups)
    ("s1_same", 4, 6, 3, (1, 1), "SAME", (1, 1), 1),
    ("s2_same", 4, 6, 3, (2, 2), "SAME", (1, 1), 1),
    ("s1_valid", 3, 5, 3, (1, 1), "VALID", (1, 1), 1),
    ("s2_explicit", 4, 6, 3, (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ("asymmetric_pad", 4, 6, 3, (1, 2), ((0, 2), (1, 0)), (1, 1), 1),
    ("1x1_s2", 4, 8, 1, (2, 2), "VALID", (1, 1), 1),
    ("depthwise_s1", 6, 6, 3, (1, 1), ((1, 1), (1, 1)), (1, 1), 6),
    ("depthwise_s2_k5", 6, 12, 5, (2, 2), ((2, 2), (2, 2)), (1, 1), 6),
    ("groups2", 4, 6, 3, (1, 1), "SAME", (1, 1), 2),
    ("dilation2", 4, 6, 3, (1, 1), "SAME", (2, 2), 1),
    ("patch_embed", 3, 8, 4, (4, 4), "VALID", (1, 1), 1),
]


def _operands(cin, cout, k, groups, seed=0, size=9, batch=BATCH):
  r = np.random.default_rng(seed)
  x = r.standard_normal((batch, size, size, cin))
  w = r.standard_normal((k, k, cin // groups, cout)) / np.sqrt(k * k * cin / groups)
  return x, w


def _reference(x, w, g, strides, padding, dilation, groups):
  """Float64 output and (dx, dw) = vjp(g) of XLA's own convolution."""
  with jax.enable_x64(True):
    f = lambda x_, w_: lax.conv_general_dilated(x_, w_, strides, padding, rhs_dilation=dilation,
                                                dimension_numbers=DN, feature_group_count=groups)
    y, vjp = jax.vjp(f, jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64))
    dx, dw = vjp(jnp.asarray(g, jnp.float64))
    return np.asarray(y), np.asarray(dx), np.asarray(dw)


def _ours(x, w, g, strides, padding, dilation, groups, dtype, jit):
  f = lambda x_, w_: conv.conv_general_dilated(x_, w_, strides, padding, rhs_dilation=dilation,
                                               dimension_numbers=DN, feature_group_count=groups)

  def value_and_grads(x_, w_, g_):
    y, vjp = jax.vjp(f, x_, w_)
    return (y, *vjp(g_))

  fn = jax.jit(value_and_grads) if jit else value_and_grads
  out = fn(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(g, dtype))
  return [np.asarray(a, np.float64) for a in out]


def _assert_close(actual, desired, rtol, name):
  scale = np.max(np.abs(desired)) + 1e-30
  err = np.max(np.abs(actual - desired)) / scale
  assert err <= rtol, f"{name}: max error {err:.2e} of max |ref| exceeds {rtol:.0e}"


# Every case under jit; two also eagerly (op by op), which is slower to run.
_RUNS = [pytest.param(c, True, id=f"{c[0]}-jit") for c in CASES] + [
    pytest.param(c, False, id=f"{c[0]}-eager") for c in CASES if c[0] in ("s2_same", "depthwise_s2_k5")]


@pytest.mark.parametrize("case,jit", _RUNS)
def test_float32_value_and_gradients_match_float64_reference(case, jit):
  _, cin, cout, k, strides, padding, dilation, groups = case
  x, w = _operands(cin, cout, k, groups)
  with jax.enable_x64(True):
    y_shape = lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), strides, padding, rhs_dilation=dilation,
                                       dimension_numbers=DN, feature_group_count=groups).shape
  g = np.random.default_rng(1).standard_normal(y_shape)
  y_ref, dx_ref, dw_ref = _reference(x, w, g, strides, padding, dilation, groups)
  y, dx, dw = _ours(x, w, g, strides, padding, dilation, groups, jnp.float32, jit)
  assert y.shape == y_ref.shape and dx.shape == dx_ref.shape and dw.shape == dw_ref.shape
  for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
    _assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=["s2_same", "depthwise"])
def test_bfloat16_matches_reference_loosely(case):
  _, cin, cout, k, strides, padding, dilation, groups = case
  x, w = _operands(cin, cout, k, groups, seed=3)
  x, w = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w))  # exact in both
  with jax.enable_x64(True):
    y_shape = lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), strides, padding,
                                       dimension_numbers=DN, feature_group_count=groups).shape
  g = np.asarray(jnp.asarray(np.random.default_rng(4).standard_normal(y_shape), jnp.bfloat16), np.float64)
  refs = _reference(x, w, g, strides, padding, dilation, groups)
  outs = _ours(x, w, g, strides, padding, dilation, groups, jnp.bfloat16, jit=True)
  for name, a, b in zip(("y", "dx", "dw"), outs, refs):
    _assert_close(a, b, 3e-2, name)


def test_custom_backward_is_used_on_cpu_and_switched_off_by_the_knob(monkeypatch):
  x, w = _operands(4, 6, 3, 1)
  loss = lambda w_, x_: jnp.sum(conv.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=DN) ** 2)
  grad_jaxpr = lambda: str(jax.make_jaxpr(jax.grad(loss))(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)))
  assert jax.default_backend() == "cpu"
  # The custom backward pass shows as the batch-reversed copies (concatenate).
  monkeypatch.setenv(conv.ENV_VAR, "auto")
  assert "concatenate" in grad_jaxpr()
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert "concatenate" not in grad_jaxpr()
  monkeypatch.setenv(conv.ENV_VAR, "auto")
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)  # a batch split over devices: XLA's backward
  assert "concatenate" not in grad_jaxpr()
  monkeypatch.undo()
  monkeypatch.setenv(conv.ENV_VAR, "bogus")
  with pytest.raises(ValueError, match=conv.ENV_VAR):
    grad_jaxpr()


@pytest.mark.parametrize("n", [conv._PIECES, 10, 64, 137])
def test_the_gathered_permutation_of_g_is_the_concatenated_one_of_x(n):
  """The weight gradient pairs example i of ``x`` with example i of ``g`` only
  if both get the same permutation, built two ways."""
  a = jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3)
  copied, gathered = np.asarray(conv._batch_reversed(a)), np.asarray(conv._batch_reversed_fusible(a))
  np.testing.assert_array_equal(copied, gathered)
  assert not np.array_equal(copied, np.asarray(a))  # a real permutation
  assert sorted(copied[:, 0].tolist()) == np.asarray(a)[:, 0].tolist()


def test_the_weight_gradient_copies_x_once_and_gathers_g_inside_a_fusion():
  """Compiled on CPU: one concatenation (the copy of ``x``), and the gather
  that permutes ``g`` sits inside a fusion, not as a copy of its own."""
  x, w = _operands(4, 6, 3, 1)
  loss = lambda w_, x_: jnp.sum(jnp.tanh(conv.conv_general_dilated(jnp.maximum(x_, 0), w_, (1, 1), "SAME",
                                                                   dimension_numbers=DN)) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  assert hlo.count(" concatenate(") == 1 and " concatenate(" in entry
  assert " gather(" in hlo and " gather(" not in entry


def test_small_batches_and_unsupported_arguments_fall_back_to_xla(monkeypatch):
  monkeypatch.setenv(conv.ENV_VAR, "custom")
  x, w = _operands(4, 6, 3, 1, batch=conv._PIECES - 1)
  loss = lambda w_, x_: jnp.sum(conv.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=DN) ** 2)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)))
  assert "concatenate" not in jaxpr
  x, w = _operands(4, 6, 3, 1)
  xf, wf = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  dilated = conv.conv_general_dilated(xf, wf, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=DN)
  expected = lax.conv_general_dilated(xf, wf, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=DN)
  np.testing.assert_array_equal(np.asarray(dilated), np.asarray(expected))


def _conv_modules(model, x):
  """Every nn.Conv instance called while initializing ``model`` on ``x``."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      seen.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return seen, variables


@pytest.mark.parametrize("name,size", [("small_cnn", 32), ("resnet20", 32), ("resnet18", 32), ("vgg19_bn", 32),
                                       ("mobilenet_v3_large", 32), ("deit_s", 32), ("swin_t", 224)])
def test_every_zoo_conv_goes_through_the_fast_conv(name, size):
  model = create_model(name, num_classes=10, image_size=size)
  convs, _ = _conv_modules(model, jnp.zeros((1, size, size, 3)))
  assert convs, f"{name} has no convolution"
  assert all(type(m) is conv.Conv and m.conv_general_dilated is conv.conv_general_dilated for m in convs)


def test_resnet20_params_and_gradients_equal_with_xla_conv(monkeypatch):
  """Same parameter tree with either convolution, and the training gradient of
  ResNet-20 with the custom backward pass equals the one with XLA's."""
  model = create_model("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  variables = model.init(jax.random.key(0), x[:2], train=False)
  paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
  assert "['stage1_block0']['conv1']['kernel']" in paths
  assert "['stage2_block0']['shortcut_conv']['kernel']" in paths
  assert "['conv_init']['kernel']" in paths

  def grads():
    def loss(params):
      logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.jit(jax.grad(loss))(variables["params"])

  monkeypatch.setenv(conv.ENV_VAR, "auto")
  fast = grads()
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  reference = grads()
  assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(reference)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fast), jax.tree_util.tree_leaves(reference)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def _ynn_ops(compiled_text: str) -> set[str]:
  """The HLO opcodes inside the YNNPACK library fusions of a compiled program."""
  called = set(re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", compiled_text))
  blocks = [b for b in compiled_text.split("\n\n") if b.strip().split(" ")[0] in called]
  return {op for b in blocks for op in re.findall(r"\} ([a-z][\w-]*)\(", b)}


def test_steps_compile_without_ynnpack_convolutions_and_match_xla(monkeypatch):
  """In ``auto`` mode on this one-device CPU backend, for 32x32 images, the
  steps' compiler options leave convolutions to XLA's own kernels (YNNPACK
  runs each on one thread); the 32-channel convolution that YNNPACK would take
  gives XLA's float64 values and gradients to float32 precision; 8x8 images,
  programs with grouped convolutions and ``xla`` mode get no options."""
  monkeypatch.setenv(conv.ENV_VAR, "auto")
  plain = lambda: "conv_general_dilated[feature_group_count=1 batch_group_count=1]"
  options = conv.compiler_options((32, 32, 3), plain)
  assert options == {conv._YNN_OPTION: conv._YNN_WITHOUT_CONVOLUTIONS}
  assert conv.compiler_options((8, 8, 1), plain) is None  # the default job's digits: XLA's defaults, as before
  for grouped in ("feature_group_count=16", "batch_group_count=2"):  # depthwise: YNNPACK's are faster
    assert conv.compiler_options((224, 224, 3), lambda: f"conv_general_dilated[{grouped}]") is None
  x, w = _operands(32, 32, 3, 1, size=8)
  g = np.random.default_rng(5).standard_normal((BATCH, 8, 8, 32))
  f = lambda x_, w_, g_: (lambda y, vjp: (y, *vjp(g_)))(*jax.vjp(
      lambda a, b: conv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN), x_, w_))
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, g)]
  compiled = jax.jit(f, compiler_options=options).lower(*args).compile()
  assert "convolution" not in _ynn_ops(compiled.as_text())
  for name, a, b in zip(("y", "dx", "dw"), compiled(*args), _reference(x, w, g, (1, 1), "SAME", (1, 1), 1)):
    _assert_close(np.asarray(a, np.float64), b, 1e-5, name)
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert conv.compiler_options((32, 32, 3), plain) is None


class _Depthwise(nn.Module):
  """A 32-channel convolution (one YNNPACK would take) and a depthwise one."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv.Conv(32, (3, 3), name="conv0")(x)
    x = conv.Conv(32, (3, 3), feature_group_count=32, name="conv1")(x)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def test_the_train_step_gets_the_options_for_32x32_images_without_grouped_convolutions(tiny_config):
  """The options reach the compiled train step, on a one-device mesh (what
  ``train.py`` runs) and without one, for 32x32 images; not for the default
  job's 8x8 digits, nor for a model with a depthwise convolution."""
  from csq_jax import methods, sharding, train

  phases = train.make_phases(tiny_config, steps_per_epoch=2)

  def ynn_convolutions(model, size, mesh):
    state, _ = train.init_state(tiny_config, model, (size, size, 3), phases[0], jax.random.key(0))
    batch = {"image": np.zeros((16, size, size, 3), np.float32), "label": np.zeros((16,), np.int32)}
    step = train.make_train_step(model, phases[0], methods.get(tiny_config), mesh)
    return "convolution" in _ynn_ops(step.lower(state, batch).compile().as_text())

  small_cnn = create_model("small_cnn", num_classes=10)
  assert not ynn_convolutions(small_cnn, 32, sharding.make_mesh((("data", -1),)))
  assert ynn_convolutions(small_cnn, 8, None)
  assert ynn_convolutions(_Depthwise(), 32, None)
