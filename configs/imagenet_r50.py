"""CSQ on ImageNet with ResNet-50 (Table III): 200 CSQ epochs + 100 finetune
epochs with the scheme frozen and beta rewound (Alg. 1), 5 warm-up epochs,
weight decay 1e-4, SGD 0.9, batch 256 (csq_jax/configlib.py: ``imagenet``).
Table III's rows: ``:t2`` and ``:t3`` (A32); any method by argument; start
from torchvision weights with ``--config.init_from=resnet50.safetensors``;
``runlocal`` for a smoke test; ``--config.compute_dtype=bfloat16`` on TPUs and
Ampere+ GPUs.

``:rounds`` selects the authors' code's multi-round recipe: the 200 search
epochs in 4 rounds of 50; after each round the mask logits are clipped to
[-1, 1], every other weight is rewound to its value after epoch 5, and beta
restarts (so the final round ends at beta_max with the masks it refined).

  python -m csq_jax.main --config=configs/imagenet_r50.py:t2 --workdir=runs/r50_t2 \
      --config.data_dir=$HOME/tensorflow_datasets
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.imagenet(configlib.common())
  c.model = "resnet50"  # torchvision layout (v1.5, stride on the 3x3), 25.56M params
  c.rules = models.DEFAULT_RULES["resnet50"]
  c.target_bits = 2.0
  c.fp_accuracy = 0.7613  # torchvision's float ResNet-50 (Table III)
  args = configlib.parse_args(arg, extra=("rounds",))
  if "rounds" in args:
    c.csq.rounds = 4
    c.csq.rewind_epoch = 5
    c.csq.mask_clamp = 1.0
  if "runlocal" in args:
    configlib.runlocal_imagenet(c)
    if "rounds" in args:  # 2 epochs: 2 rounds of one, rewinding to the init
      c.csq.rounds, c.csq.rewind_epoch = 2, 0
  return configlib.apply_args(c, args)
