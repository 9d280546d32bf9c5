"""A small VGG-style CNN sized for 8x8 images (scikit-learn's digits).

Five 3x3 conv layers (16-32 | 32-64 | 64 channels, 2x2 max-pool between
groups), BN + activation after each, global average pooling and a dense head:
70k weights in six quantized layers of different sizes, so the mixed-precision
search has real choices to make and still runs in minutes on a CPU.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.quantizers.activations import ReLU


class SmallCNN(nn.Module):
  num_classes: int = 10
  stages: Sequence[Sequence[int]] = ((16, 32), (32, 64), (64,))
  act: Callable[[], nn.Module] = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = 0
    for s, widths in enumerate(self.stages):
      if s > 0 and min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for width in widths:
        x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False,
                    kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name=f"conv{k}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name=f"bn{k}")(x)
        x = self.act()(x)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
