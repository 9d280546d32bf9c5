"""MSQ on ImageNet with DeiT-S (ViT-S/16; MSQ paper: 9.58x at 80.64%, i.e.
~3.34 average bits).

Starts from a float DeiT-S (``--config.init_from=...``). AdamW (b1 0.9),
lr 5e-4 x batch/512 with cosine decay and 5 warm-up epochs, weight decay
0.05, 100 epochs + 10 finetune epochs, the transformers' recipe; the patch
embedding and the classifier stay at 8 bits, attention softmax and
LayerNorm in float (models.DEFAULT_RULES). Rows: ``:t3.34``; any method by
argument; ``runlocal`` for a smoke test; ``--config.compute_dtype=bfloat16``
on TPUs and Ampere+ GPUs.
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.imagenet_transformer(configlib.common())
  c.model = "deit_s"  # ViT-S/16, 22.05M params
  c.rules = models.DEFAULT_RULES["deit_s"]
  c.target_bits = 3.34
  c.fp_accuracy = 0.798  # DeiT-S (Touvron et al. 2021)
  args = configlib.parse_args(arg)
  if "runlocal" in args:
    configlib.runlocal_imagenet(c)
    c.image_size = 32  # 2x2 patches of 16
  return configlib.apply_args(c, args)
