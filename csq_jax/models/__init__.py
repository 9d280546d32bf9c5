"""Plain Flax models. They know nothing of quantization except the activation
module factory they are handed (``act``)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from csq_jax.models import mobilenet_v3, swin, vgg, vit
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
    "vgg19_bn": vgg.VGG,
    "mobilenet_v3_large": mobilenet_v3.MobileNetV3,
    "deit_s": vit.VisionTransformer,
    "swin_t": swin.SwinTransformer,
}

# Transform rules (configs' ``rules`` format) per model: which kernels are
# quantized, fixed or float. The ResNets use those of configs/default.py
# (downsample shortcuts float, every other kernel searched); the small CNN has
# no shortcut, so only the second rule.
_RESNET_RULES = ((".*shortcut_conv/kernel", "float"), (".*kernel", "quantize"))
DEFAULT_RULES: dict[str, tuple] = {
    "small_cnn": _RESNET_RULES[1:],
    **{name: _RESNET_RULES for name in ("resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50")},
    "vgg19_bn": vgg.QUANT_RULES,
    "mobilenet_v3_large": mobilenet_v3.QUANT_RULES,
    "deit_s": vit.QUANT_RULES,
    "swin_t": swin.QUANT_RULES,
}


# Models whose parameters depend on the input side (position embeddings, windows).
SIZED_MODELS = ("deit_s", "swin_t")


def create_model(name: str, num_classes: int, act=None, dtype=jnp.float32, image_size: int | None = None,
                 **model_kwargs) -> nn.Module:
  """Build a model by name; ``act`` is the activation module factory,
  ``image_size`` the input side of the transformers (``img_size``), and
  ``model_kwargs`` any other field of the model (e.g. Swin's ``window_size``)."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
  kwargs = dict(num_classes=num_classes, dtype=dtype, **model_kwargs)
  if act is not None:
    kwargs["act"] = act
  if image_size is not None and name in SIZED_MODELS:
    kwargs["img_size"] = image_size
  return MODELS[name](**kwargs)
