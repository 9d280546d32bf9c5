"""MobileNetV3-Large (Howard et al. 2019, Table 1), torchvision layout.

A 3x3 stride-2 stem (16 channels, hardswish), fifteen inverted residual
blocks (1x1 expand -> kxk depthwise -> optional squeeze-excitation -> 1x1
linear projection; identity shortcut when the shape is kept), a 1x1 conv to
960 channels, global average pooling, a 960 -> 1280 dense layer with hardswish
and the classifier. BN uses torchvision's eps 1e-3 and momentum 0.01 (Flax
0.99). 5,483,032 parameters for 1000 classes.

Activations: ``act`` (the activation quantizer) replaces the network's ReLUs,
i.e. the expand/depthwise activations of the first six blocks ("RE" in
Table 1). The hardswish activations are kept as they are, in floating point:
they are signed (down to -3/8), and csq_jax's activation quantizers are
unsigned clipped ReLUs that would change the function. The squeeze-excitation
ReLU and hard-sigmoid also stay float: they act on pooled ``[B, C]`` vectors
that gate channels, not on feature maps.

``dropout_rate`` (torchvision trains with 0.2 before the classifier) is 0 by
default because the training loop passes no dropout PRNG; with a rate > 0,
``apply(..., train=True, rngs={"dropout": key})``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.quantizers.activations import ReLU

ModuleDef = Callable[[], nn.Module]

# Table 1 of the paper: (kernel, expanded channels, output channels,
# squeeze-excitation, activation "RE" (ReLU) | "HS" (hardswish), stride).
LARGE_BLOCKS = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)

# Which kernels are quantized (transform.rules_from_config format; first full
# match wins). BN, biases stay float (no rule matches them).
QUANT_RULES = (
    # First layer and classifier: fixed 8 bits, counted, never searched (the
    # first/last-layer heuristic, CSQ Sec. II, refs [14], [15]).
    ("stem_conv/kernel", "fixed", 8),
    ("head/kernel", "fixed", 8),
    # Depthwise kernels: fixed 8 bits. One scale per layer over channels whose
    # ranges differ by orders of magnitude rounds whole channels to zero at low
    # precision (Krishnamoorthi 2018 on per-layer scales for MobileNets), and
    # they hold 1.7% of the weights, so searching them would buy little size.
    (r"block\d+/dw_conv/kernel", "fixed", 8),
    # Squeeze-excitation dense layers: searched. They hold 27% of the weights
    # (a size budget that ignored them would be wrong) and compute almost
    # nothing; the search keeps them at high precision if they are sensitive.
    (r"block\d+/se/fc[12]/kernel", "quantize"),
    (r"block\d+/(expand|project)_conv/kernel", "quantize"),  # pointwise convs
    ("last_conv/kernel", "quantize"),
    ("pre_logits/kernel", "quantize"),  # 960 -> 1280 dense (1.2M weights)
)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: round to a multiple of ``divisor``,
  never more than 10% below ``v``."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_init():
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision: kaiming fan_out


class SqueezeExcitation(nn.Module):
  """``x * hardsigmoid(fc2(relu(fc1(mean(x)))))``; the dense layers are the 1x1
  convs (with bias) of torchvision on the pooled vector."""

  squeeze_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(self.squeeze_channels, kernel_init=_conv_init(), dtype=self.dtype, name="fc1")(s))
    s = nn.Dense(x.shape[-1], kernel_init=_conv_init(), dtype=self.dtype, name="fc2")(s)
    return x * jax.nn.hard_sigmoid(s)[:, None, None, :]


class InvertedResidual(nn.Module):
  """One MobileNetV3 block; params ``expand_conv`` (absent when the expansion
  is 1), ``dw_conv``, ``se`` (optional), ``project_conv`` with their BNs."""

  kernel: int
  expanded: int
  out: int
  use_se: bool
  activation: str
  strides: int
  act: ModuleDef
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                                   dtype=self.dtype, name=name)
    nonlin = lambda y: self.act()(y) if self.activation == "RE" else jax.nn.hard_swish(y)
    y = x
    if self.expanded != x.shape[-1]:
      y = Conv(self.expanded, (1, 1), use_bias=False, kernel_init=_conv_init(), dtype=self.dtype,
               name="expand_conv")(y)
      y = nonlin(bn("expand_bn")(y))
    p = (self.kernel - 1) // 2
    y = Conv(self.expanded, (self.kernel, self.kernel), (self.strides, self.strides),
             padding=((p, p), (p, p)), feature_group_count=self.expanded, use_bias=False,
             kernel_init=_conv_init(), dtype=self.dtype, name="dw_conv")(y)
    y = nonlin(bn("dw_bn")(y))
    if self.use_se:
      y = SqueezeExcitation(make_divisible(self.expanded // 4), self.dtype, name="se")(y)
    y = Conv(self.out, (1, 1), use_bias=False, kernel_init=_conv_init(), dtype=self.dtype,
             name="project_conv")(y)
    y = bn("project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.out:
      y = y + x
    return y


class MobileNetV3(nn.Module):
  """MobileNetV3 for ``[B, H, W, 3]`` inputs (224x224 on ImageNet; any size
  with H, W >= 32 works); the defaults are MobileNetV3-Large. Output
  ``[B, num_classes]`` float32 logits."""

  num_classes: int = 1000
  blocks: Sequence[tuple] = LARGE_BLOCKS
  stem_channels: int = 16
  last_channels: int = 1280
  dropout_rate: float = 0.0
  act: ModuleDef = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                                   dtype=self.dtype, name=name)
    dense_init = nn.initializers.normal(0.01)
    x = Conv(self.stem_channels, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
             kernel_init=_conv_init(), dtype=self.dtype, name="stem_conv")(x)
    x = jax.nn.hard_swish(bn("stem_bn")(x))
    for i, (k, exp, out, se, activation, s) in enumerate(self.blocks):
      x = InvertedResidual(k, exp, out, se, activation, s, self.act, self.dtype, name=f"block{i}")(x, train)
    x = Conv(6 * x.shape[-1], (1, 1), use_bias=False, kernel_init=_conv_init(), dtype=self.dtype,
             name="last_conv")(x)
    x = jax.nn.hard_swish(bn("last_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.last_channels, kernel_init=dense_init, dtype=self.dtype, name="pre_logits")(x)
    x = jax.nn.hard_swish(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0)(x)
    x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
