"""MSQ on ImageNet with MobileNetV3-Large (MSQ paper: 5.36x at 74.29% and
10.30x at 73.58%, i.e. ~6.0 and ~3.1 average bits).

MSQ quantization-aware training starts from a float model: pass torchvision's
weights with ``--config.init_from=mobilenet_v3_large.safetensors`` (or the
workdir of a ``:fp`` run). 90 epochs, cosine lr 0.02 with 1 warm-up epoch,
weight decay 1e-5 (MobileNets overfit little and their depthwise layers
suffer from decay), L1 on the LSBs checked every 5 epochs, 10 finetune
epochs (csq_jax/configlib.py: ``imagenet`` for the rest). Rows: ``:t6``
(5.36x) and ``:t3.1`` (10.30x); any method by argument; ``runlocal`` for a
smoke test.
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.imagenet(configlib.common())
  c.model = "mobilenet_v3_large"  # torchvision layout, 5.48M params
  c.method = "msq"
  c.rules = models.DEFAULT_RULES["mobilenet_v3_large"]
  c.target_bits = 6.0
  c.num_epochs = 90
  c.finetune_epochs = 10
  c.learning_rate = 0.02
  c.finetune_learning_rate = 0.002
  c.warmup_epochs = 1
  c.weight_decay = 1e-5
  c.msq.prune_every = 5
  c.fp_accuracy = 0.7527  # torchvision's float MobileNetV3-Large (IMAGENET1K_V1)
  args = configlib.parse_args(arg)
  if "runlocal" in args:
    configlib.runlocal_imagenet(c)
  return configlib.apply_args(c, args)
