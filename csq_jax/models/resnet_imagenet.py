"""ImageNet ResNet-18/34/50 (He et al. 2016), torchvision layout: a 7x7
stride-2 stem with 3x3 max pooling, four stages of basic or bottleneck blocks
(64/128/256/512 base channels), global average pooling and one dense layer.

Bottleneck blocks stride on the 3x3 conv (torchvision v1.5). Downsampling
shortcuts are 1x1 convolutions with BN; the default transform rules keep
``shortcut_conv`` float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.models.resnet_cifar import BasicBlock
from csq_jax.quantizers.activations import ReLU

ModuleDef = Callable[[], nn.Module]


def _bn(train: bool, dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def _conv(c: int, k: int, s: int, dtype, name: str) -> nn.Conv:
  return Conv(
      c, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False,
      kernel_init=nn.initializers.he_normal(), dtype=dtype, name=name,
  )


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convs; output channels = 4 * ``channels``."""

  channels: int
  strides: int
  act: ModuleDef
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = self.channels * self.expansion
    y = _conv(self.channels, 1, 1, self.dtype, "conv1")(x)
    y = self.act()(_bn(train, self.dtype, "bn1")(y))
    y = _conv(self.channels, 3, self.strides, self.dtype, "conv2")(y)
    y = self.act()(_bn(train, self.dtype, "bn2")(y))
    y = _conv(out, 1, 1, self.dtype, "conv3")(y)
    y = _bn(train, self.dtype, "bn3")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.strides, self.dtype, "shortcut_conv")(x)
      x = _bn(train, self.dtype, "shortcut_bn")(x)
    return self.act()(x + y)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ImageNetResNet(nn.Module):
  """ResNet for 224x224 inputs; the defaults are ResNet-50."""

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  act: ModuleDef = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in BLOCKS:
      raise ValueError(f"Unknown block {self.block!r}; expected one of {sorted(BLOCKS)}.")
    block_cls = BLOCKS[self.block]
    x = Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
             kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name="conv_init")(x)
    x = _bn(train, self.dtype, "bn_init")(x)
    x = self.act()(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = block_cls(self.width * 2**i, strides, self.act, self.dtype,
                      name=f"stage{i + 1}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
