"""MSQ on ImageNet with Swin-T (MSQ paper: 9.14x at 81.38%, i.e. ~3.5
average bits).

Starts from a float Swin-T (``--config.init_from=...``). AdamW (b1 0.9), lr
5e-4 x batch/512, cosine with 5 warm-up epochs, weight decay 0.05, 100 + 10
finetune epochs; the patch embedding and the classifier at 8 bits, the
relative position bias, softmax and LayerNorm in float
(models.DEFAULT_RULES). Rows: ``:t3.5``; any method by argument;
``runlocal`` for a smoke test (64-pixel crops, so windows of 4 instead of 7:
every stage's side must be a multiple of the window); ``--config.compute_dtype=bfloat16``
on TPUs and Ampere+ GPUs.
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.imagenet_transformer(configlib.common())
  c.model = "swin_t"  # Swin-T, 28.29M params
  c.rules = models.DEFAULT_RULES["swin_t"]
  c.target_bits = 3.5
  c.fp_accuracy = 0.812  # Swin-T (Liu et al. 2021)
  args = configlib.parse_args(arg)
  if "runlocal" in args:
    configlib.runlocal_imagenet(c)
    c.model_kwargs = {"window_size": 4}
  return configlib.apply_args(c, args)
