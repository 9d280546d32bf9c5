"""ResNet-20 for CIFAR-10 (He et al. 2016, Sec. 4.2): 3 stages of 3x3 basic
blocks, 16/32/64 channels, global average pooling and one dense layer.

Downsampling shortcuts are 1x1 convolutions with BN (option B), as in the
authors' BSQ/CSQ code; the default transform rules keep them float.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.quantizers.activations import ReLU

ModuleDef = Callable[[], nn.Module]


class BasicBlock(nn.Module):
  """Two 3x3 convs and a projection shortcut when the shape changes; also the
  block of the ImageNet ResNet-18/34."""

  channels: int
  strides: int
  act: ModuleDef
  dtype: jnp.dtype = jnp.float32
  expansion = 1  # output channels per ``channels``

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
    )
    conv = lambda c, k, s, name: Conv(
        c, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False,
        kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name=name,
    )
    y = conv(self.channels, 3, self.strides, "conv1")(x)
    y = self.act()(bn("bn1")(y))
    y = conv(self.channels, 3, 1, "conv2")(y)
    y = bn("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = bn("shortcut_bn")(conv(self.channels, 1, self.strides, "shortcut_conv")(x))
    return self.act()(x + y)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs; ``blocks_per_stage=3`` is ResNet-20."""

  num_classes: int = 10
  blocks_per_stage: int = 3
  widths: Sequence[int] = (16, 32, 64)
  act: ModuleDef = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
             kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name="conv_init")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, name="bn_init")(x)
    x = self.act()(x)
    for i, width in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, strides, self.act, self.dtype, name=f"stage{i + 1}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
