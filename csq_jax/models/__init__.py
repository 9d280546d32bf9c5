"""Plain Flax models. They know nothing of quantization except the activation
module factory they are handed (``act``)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models.resnet_cifar import CifarResNet
from csq_jax.models.resnet_imagenet import ImageNetResNet
from csq_jax.models.small_cnn import SmallCNN

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": lambda **kw: CifarResNet(blocks_per_stage=3, **kw),
    "resnet32": lambda **kw: CifarResNet(blocks_per_stage=5, **kw),
    "resnet56": lambda **kw: CifarResNet(blocks_per_stage=9, **kw),
    "resnet18": lambda **kw: ImageNetResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kw),
    "resnet34": lambda **kw: ImageNetResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kw),
    "resnet50": lambda **kw: ImageNetResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kw),
}


def create_model(name: str, num_classes: int, act=None, dtype=jnp.float32) -> nn.Module:
  """Build a model by name; ``act`` is the activation module factory."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
  kwargs = dict(num_classes=num_classes, dtype=dtype)
  if act is not None:
    kwargs["act"] = act
  return MODELS[name](**kwargs)
