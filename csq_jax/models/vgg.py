"""VGG19 with BatchNorm for CIFAR (Simonyan & Zisserman 2015; the common CIFAR
variant, e.g. kuangliu/pytorch-cifar): sixteen 3x3 convs (with bias) + BN +
ReLU in five groups of 64, 128, 256, 512, 512 channels, 2x2 max pooling after
each group, and one dense layer on the 512 features left at 1x1. The CSQ paper
(Sec. IV, Table II) calls it VGG19BN; 20,040,522 parameters for 10 classes.

``act`` replaces every ReLU (the activation quantizer, A-bits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.quantizers.activations import ReLU

# Output channels of each 3x3 conv; "M" is a 2x2 max pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# Which kernels are quantized (transform.rules_from_config format; first full
# match wins). Conv biases and BN stay float (no rule matches them).
QUANT_RULES = (
    # First layer and classifier: fixed 8 bits, counted, never searched (the
    # first/last-layer heuristic, CSQ Sec. II, refs [14], [15]).
    ("conv0/kernel", "fixed", 8),
    ("head/kernel", "fixed", 8),
    (r"conv\d+/kernel", "quantize"),  # the other 15 convs: searched
)


class VGG(nn.Module):
  """VGG with BN for 32x32 inputs; the defaults are VGG19-BN for CIFAR-10.

  Params ``conv{k}``/``bn{k}`` for the k-th conv (k = 0..15) and ``head``.
  Input ``[B, H, W, C]``; output ``[B, num_classes]`` float32 logits.
  """

  num_classes: int = 10
  cfg: Sequence[int | str] = VGG19_CFG
  act: Callable[[], nn.Module] = ReLU
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = 0
    for v in self.cfg:
      if v == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      x = Conv(v, (3, 3), padding=((1, 1), (1, 1)), kernel_init=nn.initializers.he_normal(),
               dtype=self.dtype, name=f"conv{k}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name=f"bn{k}")(x)
      x = self.act()(x)
      k += 1
    x = jnp.mean(x, axis=(1, 2))  # 1x1 at 32x32 input: the flatten of the CIFAR VGG
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
