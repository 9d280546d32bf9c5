"""ONNX export of the exactly quantized model, for ONNX Runtime.

``export_onnx(csqx_path, onnx_path)`` turns a run's ``model.csqx`` (the exact
integers ``q`` and step of every quantized layer, the float tensors) into an
ONNX graph (opset 21) that ONNX Runtime runs:

* each quantized kernel is an integer initializer at the narrowest ONNX type
  that holds its integers exactly (INT4 for ``[-8, 7]``, INT8 for
  ``[-128, 127]``, INT16 beyond: CSQ's 8-bit integers reach ``+-255``),
  followed by ``DequantizeLinear`` with the layer's step as scale and zero
  point 0; ``DequantizeLinear`` computes ``float32(q) * step``, one float32
  multiplication, so the weights that reach Conv/Gemm/MatMul are bit for bit
  the run's hard weights (``W = step * q``, ``docs/export_format.md``);
* float tensors (BN parameters and statistics, biases, layers kept float,
  position embeddings, LayerNorms) are float32 initializers;
* activation quantizers (``act_bits`` < 32) are ``Clip`` and a
  ``QuantizeLinear``/``DequantizeLinear`` pair at the quantizer's step (see
  ``_activation``).

The graph is written node by node with ``onnx.helper`` from the Flax model's
structure (one emitter per architecture: ``EMITTERS``). jax2onnx (0.17.1)
was tried first: it failed on the small CNN (its ``nn.max_pool`` patch
rejects positional window arguments) and wrote a ResNet-20 graph that ONNX
Runtime rejects (an ``Add`` with incompatible shapes); it converts float
weights only, so the integer initializers and QDQ pairs would have been a
rewrite of its graph anyway; and it pins ``orbax-checkpoint<0.11.37``, below
the version csq_jax uses. ``docs/onnx_export.md`` documents the graph.

The graph takes the data set's NHWC float32 images (``image``, any batch
size) and returns float32 ``logits``; it computes in float32 (a model built
with another ``dtype`` is refused).

Exactness in ONNX Runtime. ``session`` (``EXACT_OPTIONS``) has ONNX Runtime
dequantize the weights once at load; its logits then equal the JAX hard
model's up to float32 summation order (measured: below 2e-6 of the largest
logit). An activation quantizer reproduces the JAX one bit for bit on the
same input, but a pre-activation within an ulp of a rounding midpoint can
round to the neighbouring level when ONNX Runtime's summation order differs
from XLA's (ResNet-20 with random weights at 4-bit activations: 1 of 131,072
values in the seventh quantizer, then more downstream).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from csq_jax import export, models
from csq_jax.quantizers import activations

OPSET = 21
FILENAME = "model.onnx"
FLOAT_FILENAME = "model_float.onnx"
META_KEY = "csq_jax"  # metadata_props key: JSON of the .csqx meta and the layer types


def _onnx():
  try:
    import onnx  # noqa: F401
  except ImportError as e:  # pragma: no cover - depends on the install
    raise export.ExportError("ONNX export needs the onnx package: pip install -e '.[onnx]'.") from e
  return onnx


# ----------------------------------------------------------------------------
# Integer types


def integer_type(q: np.ndarray) -> str:
  """The narrowest ONNX integer type holding every value of ``q`` exactly:
  ``"INT4"`` (``[-8, 7]``), ``"INT8"``, ``"INT16"`` or ``"INT32"``."""
  lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
  for name, bits in (("INT4", 4), ("INT8", 8), ("INT16", 16), ("INT32", 32)):
    if -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1:
      return name
  raise export.ExportError(f"Integers in [{lo}, {hi}] do not fit in INT32.")


def shifted(q: np.ndarray, step: np.float32) -> tuple[np.ndarray, np.float32]:
  """``(q / 2^s, step * 2^s)`` for the largest ``s`` with every ``q``
  divisible by ``2^s``: the same float32 weights, bit for bit (a power-of-two
  scaling of the step is exact, so ``float32(step 2^s) * float32(q / 2^s)``
  and ``float32(step) * float32(q)`` round the same real number), in fewer
  bits. A CSQ layer whose lowest selected bit plane is ``p`` has integers
  that are multiples of ``2^p`` (Eq. 4 sums ``+-2^b`` over the selected
  planes ``b >= p``): planes {5, 6, 7} hold ``+-224`` (INT16) as ``32 * q'``
  with ``q'`` in ``[-7, 7]`` (INT4)."""
  q = np.asarray(q, np.int64)
  bits = int(np.bitwise_or.reduce(np.abs(q).reshape(-1))) if q.size else 0
  s = (bits & -bits).bit_length() - 1 if bits else 0
  scale = np.float32(np.ldexp(np.float32(step), s))
  if s and not np.array_equal((scale * (q >> s).astype(np.float32)).view(np.uint32),
                              (np.float32(step) * q.astype(np.float32)).view(np.uint32)):
    s, scale = 0, np.float32(step)  # overflow or subnormals: keep the integers as they are
  return q >> s, scale


_NUMPY_INT = {"INT4": ml_dtypes.int4, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32}


# ----------------------------------------------------------------------------
# The graph


class Graph:
  """Nodes and initializers of one ONNX graph, named after Flax paths.

  ``tensors`` maps every Flax variable (``params/...``, ``batch_stats/...``)
  to its float32 value; ``ints`` and ``steps`` the quantized kernels to their
  integers and float32 step. With ``quantized=False`` every kernel is a
  float32 initializer ``step * q`` (the same model, float storage).
  """

  def __init__(self, tensors, ints, steps, quantized: bool = True):
    self.onnx = _onnx()
    self.tensors, self.ints, self.steps, self.quantized = tensors, ints, steps, quantized
    self.nodes: list = []
    self.initializers: list = []
    self.layer_types: dict[str, str] = {}
    self._names: set[str] = set()
    self.used: set[str] = set()  # variables read: every one must be, or the emitter is not the model
    self._act_count: dict[str, int] = {}

  def fresh(self, base: str) -> str:
    name, k = base, 0
    while name in self._names:
      k += 1
      name = f"{base}_{k}"
    self._names.add(name)
    return name

  def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
    out = self.fresh(name)
    self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
    return out

  def const(self, name: str, value) -> str:
    name = self.fresh(name)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def has(self, name: str) -> bool:
    return name in self.tensors or name in self.ints

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.ints[name].shape if name in self.ints else self.tensors[name].shape)

  def weight(self, name: str, perm: tuple[int, ...] | None = None) -> str:
    """The float32 tensor ``name`` (Flax layout transposed by ``perm``): a
    float initializer, or for a quantized kernel an integer initializer and
    ``DequantizeLinear`` (scale ``step``, zero point 0)."""
    self.used.add(name)
    if name not in self.ints:
      x = np.asarray(self.tensors[name], np.float32)
      return self.const(name, x if perm is None else x.transpose(perm))
    q = np.asarray(self.ints[name], np.int64)
    q = q if perm is None else q.transpose(perm)
    step = np.float32(self.steps[name])
    if not self.quantized:
      return self.const(name, step * q.astype(np.float32))
    q, scale_value = shifted(q, step)
    kind = integer_type(q)
    self.layer_types[name] = kind
    q_name = self.const(f"{name}:q", q.astype(_NUMPY_INT[kind]))
    scale = self.const(f"{name}:step", scale_value)
    zero = self.const(f"{name}:zero_point", np.zeros((), _NUMPY_INT[kind]))
    return self.node("DequantizeLinear", [q_name, scale, zero], name)

  # --- layers (NCHW activations) ----------------------------------------------

  def conv(self, x: str, hw: tuple[int, int], name: str, strides: int = 1, padding: Any = "SAME"):
    """Flax ``nn.Conv`` (kernel ``[kh, kw, in, out]``) as ONNX ``Conv``;
    returns ``(output, output spatial shape)``."""
    kh, kw, _, _ = self.shape(f"params/{name}/kernel")
    if padding == "VALID":
      pads = ((0, 0), (0, 0))
    elif padding == "SAME":  # XLA's SAME: total max((out - 1) s + k - in, 0), the smaller half first
      pads = tuple(((t := max((-(-n // strides) - 1) * strides + k - n, 0)) // 2, t - t // 2)
                   for n, k in zip(hw, (kh, kw)))
    else:
      pads = tuple(tuple(p) for p in padding)
    inputs = [x, self.weight(f"params/{name}/kernel", (3, 2, 0, 1))]
    if self.has(f"params/{name}/bias"):
      inputs.append(self.weight(f"params/{name}/bias"))
    out = self.node("Conv", inputs, name, kernel_shape=[kh, kw], strides=[strides, strides],
                    pads=[pads[0][0], pads[1][0], pads[0][1], pads[1][1]])
    hw = tuple((n + lo + hi - k) // strides + 1 for n, (lo, hi), k in zip(hw, pads, (kh, kw)))
    return out, hw

  def batch_norm(self, x: str, name: str, epsilon: float = 1e-5) -> str:
    """Flax ``nn.BatchNorm`` in inference mode (running statistics)."""
    ins = [x] + [self.weight(f"{c}/{name}/{v}") for c, v in
                 (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))]
    return self.node("BatchNormalization", ins, name, epsilon=epsilon)

  def dense(self, x: str, name: str) -> str:
    """Flax ``nn.Dense`` on ``[N, in]`` (``Gemm``) or ``[..., in]`` (``MatMul`` + ``Add``)."""
    w = self.weight(f"params/{name}/kernel")
    b = [self.weight(f"params/{name}/bias")] if self.has(f"params/{name}/bias") else []
    return self.node("Gemm", [x, w] + b, name)

  def dense_nd(self, x: str, name: str) -> str:
    y = self.node("MatMul", [x, self.weight(f"params/{name}/kernel")], f"{name}/matmul")
    if self.has(f"params/{name}/bias"):
      y = self.node("Add", [y, self.weight(f"params/{name}/bias")], name)
    return y

  def layer_norm(self, x: str, name: str, epsilon: float) -> str:
    ins = [x, self.weight(f"params/{name}/scale"), self.weight(f"params/{name}/bias")]
    return self.node("LayerNormalization", ins, name, axis=-1, epsilon=epsilon)

  def pool_flatten(self, x: str, name: str) -> str:
    """``jnp.mean(x, axis=(1, 2))`` of NHWC as NCHW global average pooling."""
    return self.node("Flatten", [self.node("GlobalAveragePool", [x], f"{name}/avg")], name)

  def act(self, x: str, scope: str, factory: Callable) -> str:
    """The model's activation module ``factory()`` called in Flax module
    ``scope`` (its params are ``params/<scope>/<Class>_<k>/...``, ``k`` its
    call index there)."""
    module = factory()
    prefix = f"{scope}/" if scope else ""
    key = f"{prefix}{type(module).__name__}"
    k = self._act_count.get(key, 0)
    self._act_count[key] = k + 1
    return _activation(self, x, module, f"params/{key}_{k}")


# ----------------------------------------------------------------------------
# Activation quantizers


def _quantizer_step(module, clip: np.float32, bits: int) -> tuple[np.float32, np.float32 | None]:
  """``(step, reciprocal)``: the float32 step ``clip / (2^bits - 1)`` and how
  ``x / step`` is rounded, exactly as the jitted model computes them.

  XLA multiplies a traced ``clip`` by the rounded reciprocal
  ``1 / (2^bits - 1)`` (PACT) but folds a constant one (ReLU6) as a
  division, and it may turn the division ``x / step`` by a constant step
  into a multiplication by ``float32(1 / step)`` (then returned as
  ``reciprocal``; None: a true division). The combination that reproduces
  the jitted module on a probe (a grid and every rounding midpoint and its
  neighbours) is taken, as ``export`` picks the weights' step.
  """
  levels = np.float32(2.0**bits - 1.0)
  steps = [np.float32(clip / levels), np.float32(clip * np.float32(1.0 / levels))]
  grid = np.linspace(-0.1, 1.1, 4099, dtype=np.float32) * clip
  mids = [(np.arange(int(levels)) + np.float32(0.5)).astype(np.float32) * s for s in steps]
  probe = np.concatenate([grid] + mids + [np.nextafter(m, np.float32(np.inf)) for m in mids]
                         + [np.nextafter(m, np.float32(0)) for m in mids]).astype(np.float32)
  variables = {"params": {"alpha": jnp.float32(clip)}} if isinstance(module, activations.PACT) else {}
  want = np.asarray(jax.jit(module.apply)(variables, probe))
  clipped = np.clip(probe, np.float32(0), clip)
  for step in steps:
    if np.array_equal(np.round(clipped / step) * step, want):
      return step, None
    reciprocal = np.float32(np.float32(1.0) / step)
    if np.array_equal(np.round(clipped * reciprocal) * step, want):
      return step, reciprocal
  raise export.ExportError(f"The {type(module).__name__} activation at {bits} bits is not reproduced by"
                           " clip then round(x / step) * step with a float32 step; it cannot be exported as QDQ.")


def _activation(g: Graph, x: str, module, name: str) -> str:
  """``module``'s forward pass (inference) on ``x``.

  * ReLU (A-bits 32): ``Relu``.
  * PACT: ``clip(x, 0, alpha)`` (equal to PACT's ``where(x >= alpha, alpha,
    relu(x))`` for ``alpha > 0``), then ``QuantizeLinear`` (uint8 up to 8
    bits, uint16 beyond; ``round(x / step)``, half to even, as ``jnp.round``)
    and ``DequantizeLinear`` (``q * step``) at the step of
    ``_quantizer_step``; where XLA computes ``y / step`` as ``y * (1 / step)``,
    ``Mul`` by that reciprocal, ``QuantizeLinear`` at scale 1 and
    ``DequantizeLinear`` at ``step``.
  * ReLU6 (``ClippedReLUQuant`` with a clip): the same with the fixed clip.
  * max-abs (``ClippedReLUQuant`` without a clip): the clip is the max of the
    ReLU output over the whole batch (as in the JAX model, so a sample's
    output depends on its batch): ``Relu``, ``ReduceMax``, ``Max(., 1e-8)``,
    the step, then ``QuantizeLinear``/``DequantizeLinear`` with that computed
    scale.
  """
  if isinstance(module, activations.ReLU):
    return g.node("Relu", [x], name)
  bits = int(module.bits)
  qtype = np.uint8 if bits <= 8 else np.uint16
  zero = g.const(f"{name}:zero_point", np.zeros((), qtype))
  if isinstance(module, activations.PACT) or module.clip is not None:
    g.used.add(f"{name}/alpha")
    clip = np.float32(g.tensors[f"{name}/alpha"] if isinstance(module, activations.PACT) else module.clip)
    if not clip > 0:
      raise export.ExportError(f"{name}: a clip of {clip} (<= 0) is not a ReLU clip; it has no QDQ form here.")
    step_value, reciprocal = _quantizer_step(module, clip, bits)
    step = g.const(f"{name}:step", step_value)
    y = g.node("Clip", [x, g.const(f"{name}:min", np.float32(0)), g.const(f"{name}:max", clip)], f"{name}/clip")
    if reciprocal is not None:  # round(y * (1 / step)): quantize y / step at scale 1, dequantize at step
      y = g.node("Mul", [y, g.const(f"{name}:reciprocal", reciprocal)], f"{name}/scale")
      q = g.node("QuantizeLinear", [y, g.const(f"{name}:one", np.float32(1.0)), zero], f"{name}/quantize")
      return g.node("DequantizeLinear", [q, step, zero], name)
  else:
    y = g.node("Relu", [x], f"{name}/relu")
    c = g.node("Max", [g.node("ReduceMax", [y], f"{name}/max", keepdims=0), g.const(f"{name}:eps", np.float32(1e-8))],
               f"{name}/clip")
    levels = np.float32(2.0**bits - 1.0)
    step = g.node("Mul", [c, g.const(f"{name}:inv_levels", np.float32(1.0 / levels))], f"{name}/step")
  q = g.node("QuantizeLinear", [y, step, zero], f"{name}/quantize")
  return g.node("DequantizeLinear", [q, step, zero], name)


# ----------------------------------------------------------------------------
# Architectures (mirror csq_jax/models)


def _small_cnn(g: Graph, m, x: str, hw):
  k = 0
  for s, widths in enumerate(m.stages):
    if s > 0 and min(hw) >= 2:
      x = g.node("MaxPool", [x], f"pool{s}", kernel_shape=[2, 2], strides=[2, 2])
      hw = (hw[0] // 2, hw[1] // 2)
    for _ in widths:
      x, hw = g.conv(x, hw, f"conv{k}", 1, "SAME")
      x = g.act(g.batch_norm(x, f"bn{k}"), "", m.act)
      k += 1
  return g.dense(g.pool_flatten(x, "avg"), "head")


def _vgg(g: Graph, m, x: str, hw):
  k = 0
  for v in m.cfg:
    if v == "M":
      x = g.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
      hw = (hw[0] // 2, hw[1] // 2)
      continue
    x, hw = g.conv(x, hw, f"conv{k}", 1, ((1, 1), (1, 1)))
    x = g.act(g.batch_norm(x, f"bn{k}"), "", m.act)
    k += 1
  return g.dense(g.pool_flatten(x, "avg"), "head")


def _shortcut(g: Graph, x: str, hw, scope: str, strides: int) -> str:
  """The 1x1 projection (conv + BN) of a residual block whose shape changes."""
  x, _ = g.conv(x, hw, f"{scope}/shortcut_conv", strides, ((0, 0), (0, 0)))
  return g.batch_norm(x, f"{scope}/shortcut_bn")


def _basic_block(g: Graph, x: str, hw, scope: str, channels: int, strides: int, act, cin: int):
  y, hw2 = g.conv(x, hw, f"{scope}/conv1", strides, ((1, 1), (1, 1)))
  y = g.act(g.batch_norm(y, f"{scope}/bn1"), scope, act)
  y, hw2 = g.conv(y, hw2, f"{scope}/conv2", 1, ((1, 1), (1, 1)))
  y = g.batch_norm(y, f"{scope}/bn2")
  if strides != 1 or cin != channels:
    x = _shortcut(g, x, hw, scope, strides)
  return g.act(g.node("Add", [x, y], f"{scope}/add"), scope, act), hw2, channels


def _bottleneck_block(g: Graph, x: str, hw, scope: str, channels: int, strides: int, act, cin: int):
  out = 4 * channels
  y, hw2 = g.conv(x, hw, f"{scope}/conv1", 1, ((0, 0), (0, 0)))
  y = g.act(g.batch_norm(y, f"{scope}/bn1"), scope, act)
  y, hw2 = g.conv(y, hw2, f"{scope}/conv2", strides, ((1, 1), (1, 1)))
  y = g.act(g.batch_norm(y, f"{scope}/bn2"), scope, act)
  y, hw2 = g.conv(y, hw2, f"{scope}/conv3", 1, ((0, 0), (0, 0)))
  y = g.batch_norm(y, f"{scope}/bn3")
  if strides != 1 or cin != out:
    x = _shortcut(g, x, hw, scope, strides)
  return g.act(g.node("Add", [x, y], f"{scope}/add"), scope, act), hw2, out


def _resnet_cifar(g: Graph, m, x: str, hw):
  x, hw = g.conv(x, hw, "conv_init", 1, ((1, 1), (1, 1)))
  x = g.act(g.batch_norm(x, "bn_init"), "", m.act)
  cin = m.widths[0]
  for i, width in enumerate(m.widths):
    for j in range(m.blocks_per_stage):
      strides = 2 if (i > 0 and j == 0) else 1
      x, hw, cin = _basic_block(g, x, hw, f"stage{i + 1}_block{j}", width, strides, m.act, cin)
  return g.dense(g.pool_flatten(x, "avg"), "head")


def _resnet_imagenet(g: Graph, m, x: str, hw):
  block = {"basic": _basic_block, "bottleneck": _bottleneck_block}[m.block]
  x, hw = g.conv(x, hw, "conv_init", 2, ((3, 3), (3, 3)))
  x = g.act(g.batch_norm(x, "bn_init"), "", m.act)
  x = g.node("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
  hw = tuple((n + 2 - 3) // 2 + 1 for n in hw)
  cin = m.width
  for i, n_blocks in enumerate(m.stage_sizes):
    for j in range(n_blocks):
      strides = 2 if (i > 0 and j == 0) else 1
      x, hw, cin = block(g, x, hw, f"stage{i + 1}_block{j}", m.width * 2**i, strides, m.act, cin)
  return g.dense(g.pool_flatten(x, "avg"), "head")


def _attention(g: Graph, x: str, scope: str, tokens: int, dim: int, heads: int) -> str:
  hd = dim // heads
  qkv = g.dense_nd(x, f"{scope}/qkv")  # [N, T, 3D]
  qkv = g.node("Reshape", [qkv, g.const(f"{scope}:qkv_shape", np.array([0, tokens, 3, heads, hd], np.int64))],
               f"{scope}/split_heads")
  qkv = g.node("Transpose", [qkv], f"{scope}/heads_first", perm=[2, 0, 3, 1, 4])  # [3, N, H, T, hd]
  q, k, v = (g.node("Gather", [qkv, g.const(f"{scope}:{n}_index", np.array(i, np.int64))], f"{scope}/{n}", axis=0)
             for i, n in enumerate("qkv"))
  q = g.node("Mul", [q, g.const(f"{scope}:scale", np.float32(hd**-0.5))], f"{scope}/q_scaled")
  logits = g.node("MatMul", [q, g.node("Transpose", [k], f"{scope}/k_t", perm=[0, 1, 3, 2])], f"{scope}/logits")
  probs = g.node("Softmax", [logits], f"{scope}/softmax", axis=-1)
  out = g.node("Transpose", [g.node("MatMul", [probs, v], f"{scope}/mix")], f"{scope}/tokens_first",
               perm=[0, 2, 1, 3])
  out = g.node("Reshape", [out, g.const(f"{scope}:out_shape", np.array([0, tokens, dim], np.int64))],
               f"{scope}/merge_heads")
  return g.dense_nd(out, f"{scope}/proj")


def _vit(g: Graph, m, x: str, hw):
  d = m.embed_dim
  x, hw = g.conv(x, hw, "patch_embed", m.patch_size, "VALID")  # [N, D, h, w]
  tokens = hw[0] * hw[1] + 1
  x = g.node("Reshape", [x, g.const("patches:shape", np.array([0, d, tokens - 1], np.int64))], "patches")
  x = g.node("Transpose", [x], "patch_tokens", perm=[0, 2, 1])  # [N, T-1, D]
  batch = g.node("Slice", [g.node("Shape", [x], "shape"), g.const("batch:start", np.array([0], np.int64)),
                           g.const("batch:end", np.array([1], np.int64))], "batch")
  cls_shape = g.node("Concat", [batch, g.const("cls:shape", np.array([1, d], np.int64))], "cls_shape", axis=0)
  cls = g.node("Expand", [g.weight("params/cls_token"), cls_shape], "cls")
  x = g.node("Concat", [cls, x], "tokens", axis=1)
  x = g.node("Add", [x, g.weight("params/pos_embed")], "embed")
  for i in range(m.depth):
    s = f"block{i}"
    y = g.layer_norm(x, f"{s}/norm1", 1e-6)
    x = g.node("Add", [x, _attention(g, y, f"{s}/attn", tokens, d, m.num_heads)], f"{s}/residual1")
    y = g.layer_norm(x, f"{s}/norm2", 1e-6)
    y = g.node("Gelu", [g.dense_nd(y, f"{s}/mlp/fc1")], f"{s}/mlp/gelu", approximate="none")
    x = g.node("Add", [x, g.dense_nd(y, f"{s}/mlp/fc2")], f"{s}/residual2")
  x = g.node("Gather", [x, g.const("cls:index", np.array(0, np.int64))], "cls_out", axis=1)  # [N, D]
  return g.dense(g.layer_norm(x, "norm", 1e-6), "head")


EMITTERS: dict[type, Callable] = {
    models.small_cnn.SmallCNN: _small_cnn,
    models.vgg.VGG: _vgg,
    models.resnet_cifar.CifarResNet: _resnet_cifar,
    models.resnet_imagenet.ImageNetResNet: _resnet_imagenet,
    models.vit.VisionTransformer: _vit,
}


# ----------------------------------------------------------------------------
# Building, writing, reading


def build(model, tensors: dict[str, np.ndarray], ints: dict[str, np.ndarray], steps: dict[str, np.float32],
          image_shape, meta: dict[str, Any] | None = None, quantized: bool = True):
  """The ``onnx.ModelProto`` of ``model`` (a csq_jax Flax model) with the
  given variables (see ``Graph``); input ``image`` ``[N, H, W, C]`` float32,
  output ``logits`` ``[N, num_classes]`` float32."""
  onnx = _onnx()
  emit = EMITTERS.get(type(model))
  if emit is None:
    raise export.ExportError(
        f"No ONNX emitter for {type(model).__name__}; supported: {sorted(t.__name__ for t in EMITTERS)}"
        " (small_cnn, vgg19_bn, resnet20/32/56, resnet18/34/50, deit_s).")
  if getattr(model, "dtype", jnp.float32) != jnp.float32:
    raise export.ExportError("The ONNX graph computes in float32; rebuild the model with dtype float32.")
  g = Graph(tensors, ints, steps, quantized)
  h, w, c = (int(d) for d in image_shape)
  x = g.node("Transpose", ["image"], "nchw", perm=[0, 3, 1, 2])
  logits = emit(g, model, x, (h, w))
  g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits"))
  num_classes = g.shape("params/head/kernel")[-1]
  graph = onnx.helper.make_graph(
      g.nodes, f"csq_jax_{meta.get('model', 'model') if meta else 'model'}",
      [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", h, w, c])],
      [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", num_classes])],
      g.initializers)
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                 producer_name="csq_jax")
  proto.ir_version = 10  # opset 21; readable by ONNX Runtime >= 1.20
  if missing := sorted((set(tensors) | set(ints)) - g.used):
    raise export.ExportError(f"The ONNX emitter for {type(model).__name__} left variables unused: {missing[:5]}.")
  info = {"format": "csq_jax onnx 1", "quantized": quantized, "meta": meta or {}, "layer_types": g.layer_types}
  onnx.helper.set_model_props(proto, {META_KEY: json.dumps(info)})
  onnx.checker.check_model(proto)
  return proto


def model_for(meta: dict[str, Any], model_kwargs: dict[str, Any] | None = None):
  """The Flax model a ``.csqx`` manifest's ``meta`` describes."""
  act = activations.activation_factory(meta.get("act_quantizer", "pact"), int(meta.get("act_bits", 32)))
  shape = meta["image_shape"]
  return models.create_model(meta["model"], int(meta["num_classes"]), act, image_size=int(shape[0]),
                             **dict(model_kwargs or {}))


def _flat(tree: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + "/" + "/".join(str(k.key) for k in p): np.asarray(x, np.float32) for p, x in flat}


def from_csqx(path: str, model=None, model_kwargs: dict[str, Any] | None = None, quantized: bool = True):
  """The ONNX model of a ``.csqx`` export (``model``: the Flax model; by
  default the one its manifest names, with ``model_kwargs``)."""
  params, batch_stats, manifest = export.load_export(path)
  ints = export.load_integers(path)
  steps = {layer["name"]: np.float32(layer["step"]) for layer in manifest["layers"]}
  tensors = {k: v for k, v in {**_flat(params, "params"), **_flat(batch_stats, "batch_stats")}.items()
             if k not in ints}
  meta = manifest["meta"]
  model = model if model is not None else model_for(meta, model_kwargs)
  return build(model, tensors, ints, steps, meta["image_shape"], meta, quantized)


def from_params(model, params, batch_stats, image_shape, meta: dict[str, Any] | None = None, quantized: bool = True):
  """The ONNX model of quantizer params (``transform.quantize_params``,
  finalized) through an in-memory ``.csqx`` round trip, so that its integers
  and steps are the export's (``export.encode`` checks they are exact)."""
  meta = dict(meta or {}, image_shape=[int(d) for d in image_shape])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, export.FILENAME)
    export.export_model(path, params, batch_stats, meta)
    return from_csqx(path, model, quantized=quantized)


def save(proto, path: str) -> int:
  """Write ``proto`` to ``path`` atomically; returns its size in bytes."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto.SerializeToString())
  os.replace(tmp, path)
  return os.path.getsize(path)


def export_onnx(csqx_path: str, onnx_path: str, model_kwargs: dict[str, Any] | None = None,
                float_path: str | None = None) -> dict[str, Any]:
  """Write the ONNX model of ``csqx_path`` to ``onnx_path`` and report its
  size against the float ONNX model (the same graph with float32 kernels),
  which is written to ``float_path`` when given.

  Returns:
    ``{"onnx", "onnx_bytes", "float_onnx_bytes", "onnx_size_ratio", "layer_types"}``.
  """
  proto = from_csqx(csqx_path, model_kwargs=model_kwargs)
  size = save(proto, onnx_path)
  float_proto = from_csqx(csqx_path, model_kwargs=model_kwargs, quantized=False)
  float_size = save(float_proto, float_path) if float_path else float_proto.ByteSize()
  types = read_info(proto)["layer_types"]
  counts = {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}
  return {"onnx": onnx_path, "onnx_bytes": size, "float_onnx_bytes": float_size,
          "onnx_size_ratio": float_size / size, "layer_types": counts}


def read_info(proto) -> dict[str, Any]:
  """The csq_jax metadata of an ONNX model (``build``'s ``info``)."""
  props = {p.key: p.value for p in proto.metadata_props}
  if META_KEY not in props:
    raise export.ExportError("Not an ONNX model written by csq_jax (no csq_jax metadata); export the run with"
                             " python -m csq_jax.export --workdir=RUN --format=onnx.")
  return json.loads(props[META_KEY])


def load(path: str):
  """The ``onnx.ModelProto`` at ``path``, checked."""
  onnx = _onnx()
  try:
    return onnx.load(path)
  except Exception as e:  # noqa: BLE001  (OSError, protobuf's DecodeError, onnx's own errors)
    raise export.ExportError(f"Cannot read ONNX model {path!r} ({type(e).__name__}: {e}).") from e


def integer_weights(proto) -> dict[str, tuple[np.ndarray, str, np.float32]]:
  """``{flax kernel name: (q in Flax layout as int64, ONNX type, step)}`` of
  every integer initializer feeding a ``DequantizeLinear``."""
  onnx = _onnx()
  inits = {i.name: i for i in proto.graph.initializer}
  out = {}
  for n in proto.graph.node:
    if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
      continue
    init = inits[n.input[0]]
    q = onnx.numpy_helper.to_array(init).astype(np.int64)
    q = q.transpose(2, 3, 1, 0) if q.ndim == 4 else q  # ONNX Conv [out, in, kh, kw] -> Flax [kh, kw, in, out]
    step = np.float32(onnx.numpy_helper.to_array(inits[n.input[1]]))
    out[n.output[0]] = (q, onnx.TensorProto.DataType.Name(init.data_type), step)
  return out


# ONNX Runtime options of ``session``. By default ONNX Runtime keeps a weight's
# DequantizeLinear in the graph and runs it at every call (it expects QDQ
# models to be lowered to integer kernels, and a Conv with float activations
# has none), and it fuses DequantizeLinear + MatMul/Gemm into MatMulNBits,
# which (accuracy level 4) quantizes the matmul inputs to int8 on the fly:
# slower than the float model on the convolutional nets here and no longer
# exact. With QDQ handling off, constant folding dequantizes every weight once
# when the session is created (then fuses BN into Conv as for the float model):
# the file keeps its integers, the session runs the float32 hard weights. The
# accuracy level is set too, for runtimes that still fuse.
EXACT_OPTIONS = {"session.disable_quant_qdq": "1", "session.qdq_matmulnbits_accuracy_level": "1"}


def session(model, threads: int | None = None, exact: bool = True):
  """An ONNX Runtime CPU session of ``model`` (a path or a ModelProto).

  With ``exact`` (the default: ``EXACT_OPTIONS``) the integer weights are
  dequantized once at load, and the logits equal the JAX hard model's up to
  float32 summation order. ``exact=False`` keeps ONNX Runtime's defaults
  (``DequantizeLinear`` at every call, int8 matmul inputs)."""
  try:
    import onnxruntime as ort
  except ImportError as e:  # pragma: no cover - depends on the install
    raise export.ExportError("Running ONNX models needs onnxruntime: pip install -e '.[onnx]'.") from e
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
  opts.log_severity_level = 3
  for key, value in (EXACT_OPTIONS.items() if exact else ()):
    opts.add_session_config_entry(key, value)
  src = model if isinstance(model, str) else model.SerializeToString()
  return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(sess, images: np.ndarray) -> np.ndarray:
  """``[N, num_classes]`` logits of NHWC float32 ``images``."""
  return sess.run(["logits"], {"image": np.ascontiguousarray(images, np.float32)})[0]


def export_workdir(workdir: str, out: str | None = None) -> dict[str, Any]:
  """Write ``WORKDIR/model.onnx`` (or ``out``) from the run's ``model.csqx``;
  the model's extra fields (``model_kwargs``) come from its ``summary.json``."""
  kwargs = {}
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      kwargs = dict((json.load(f).get("config") or {}).get("model_kwargs") or {})
  info = export_onnx(os.path.join(workdir, export.FILENAME), out or os.path.join(workdir, FILENAME), kwargs)
  return {"format": "onnx", **info}
