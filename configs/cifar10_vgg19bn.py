"""CSQ on CIFAR-10 with VGG19-BN (Table II): 300 CSQ epochs from scratch, no
finetune, otherwise the ResNet-20 recipe (csq_jax/configlib.py). Table II's
rows: ``:t2`` (A32), ``:t3,a8``, ``:t3,a4``; any method by argument
(``:msq``, ``:bsq``, ...), ``runlocal`` for a smoke test, e.g.

  python -m csq_jax.main --config=configs/cifar10_vgg19bn.py:t2 --workdir=runs/vgg_t2 \
      --config.data_dir=$HOME/tensorflow_datasets
"""

from csq_jax import configlib, models


def get_config(arg: str = ""):
  c = configlib.common()
  c.model = "vgg19_bn"  # 16 3x3 convs with BN + one dense layer, 20.04M params
  c.dataset = "tfds:cifar10"
  c.num_epochs = 300
  c.rules = models.DEFAULT_RULES["vgg19_bn"]
  c.fp_accuracy = 0.9422  # the paper's float VGG19-BN (Table II)
  return configlib.apply_args(c, configlib.parse_args(arg))
