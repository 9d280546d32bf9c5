"""CSQ on ImageNet with ResNet-18 (Table III): 200 CSQ epochs + 100 finetune
epochs with the scheme frozen and beta rewound (Alg. 1), 5 warm-up epochs,
weight decay 1e-4, SGD 0.9, batch 256 (csq_jax/configlib.py: ``imagenet``).
Table III's rows: ``:t3,a8`` and ``:t2,a4``; any method by argument; start
from torchvision weights with ``--config.init_from=resnet18.safetensors``;
``runlocal`` for a smoke test. On TPUs / Ampere+ GPUs add
``--config.compute_dtype=bfloat16``.

  python -m csq_jax.main --config=configs/imagenet_r18.py:t3,a8 --workdir=runs/r18_t3 \
      --config.data_dir=$HOME/tensorflow_datasets
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.imagenet(configlib.common())
  c.model = "resnet18"  # torchvision layout, 11.69M params
  c.rules = models.DEFAULT_RULES["resnet18"]
  c.target_bits = 3.0
  c.act_bits = 8
  c.fp_accuracy = 0.6976  # torchvision's float ResNet-18 (Table III)
  args = configlib.parse_args(arg)
  if "runlocal" in args:
    configlib.runlocal_imagenet(c)
  return configlib.apply_args(c, args)
