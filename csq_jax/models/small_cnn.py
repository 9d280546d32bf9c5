"""A small VGG-style CNN sized for 8x8 images (scikit-learn's digits).

Seven 3x3 conv layers of 32 channels in three groups (8x8, 4x4, 2x2; 2x2
max-pool between groups), BN + activation after each, global average pooling
and a dense head: 56k weights in eight quantized layers. Six of them hold 16%
of the weights each, so one bit of one layer moves the average precision by
at most 0.17 bit and a budget can be met closely; the first conv and the head
are small, as in ResNets. It runs in minutes on a CPU.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.quantizers.activations import ReLU


class SmallCNN(nn.Module):
  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((32, 32, 32), (32, 32), (32, 32))
  act: Callable[[], nn.Module] = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = 0
    for s, widths in enumerate(self.stages):
      if s > 0 and min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for width in widths:
        x = Conv(width, (3, 3), padding="SAME", use_bias=False,
                 kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name=f"conv{k}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name=f"bn{k}")(x)
        x = self.act()(x)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
