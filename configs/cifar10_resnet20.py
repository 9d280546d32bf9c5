"""CSQ on CIFAR-10 with ResNet-20: the paper's setup (Sec. IV-A, Tables I and V).

600 epochs from scratch, SGD momentum 0.9, lr 0.1 with cosine annealing,
weight decay 5e-4, lambda 0.01, beta 1 -> 200, 8 bit planes, no finetune
(every knob: csq_jax/configlib.py). Pick a row of Table I with the config
argument: ``tN`` is the target (W-bits), ``aN`` the activation bits (PACT;
32 = float), e.g.

  python -m csq_jax.main --config=configs/cifar10_resnet20.py:t2,a3 --workdir=runs/r20_t2a3 \
      --config.data_dir=$HOME/tensorflow_datasets

``runlocal`` shrinks it to a 2-epoch smoke test. The rival methods' recipes
are selected the same way (e.g. ``:bsq,t3,runlocal``):

* ``:bsq`` -- BSQ's reference ResNet-20 setup (its public code): start from
  a float model's 8-bit quantization (``init_from``: the workdir of a
  ``--config.method=fp`` run), 350 epochs, lr 0.1 stepped x0.1 at epoch 250,
  weight decay 1e-4, alpha 0.01, re-quantization every 50 epochs, threshold
  0, then 250 finetune epochs at a constant lr 1e-4 with the precision fixed.
* ``:msq`` -- MSQ (no public code; our choices, documented in
  ``csq_jax/quantizers/msq.py``): 350 epochs, cosine lr 0.1, weight decay
  5e-4, lambda 0.05, LSB sparsity checked every 10 epochs with threshold
  0.6, Hessian-aware k from 8 probes on 2 batches, 30 finetune epochs.
* ``:ste``, ``:csq_uniform``, ``:fp`` -- the baselines on CSQ's schedule.
"""

from csq_jax import configlib


def bsq_recipe(c):
  """yanghr/BSQ's README commands, flag by flag. Search (cifar_prune_STE.py):
  --epochs 350 --lr 0.1 --schedule 250 --gamma 0.1 --wd 1e-4 --decay 0.01
  --Prun_Int 50 --thre 0.0 --Nbits 8. Finetune (cifar_finetune.py): --epochs
  250 --lr 0.0001 --schedule 250 --gamma 0.1 --wd 1e-4; its step at epoch 250
  of 250 never fires, so the finetune learning rate is a constant 1e-4."""
  c.num_epochs = 350
  c.lr_decay = "step"
  c.lr_step_epochs = (250,)
  c.weight_decay = 1e-4
  c.bsq.alpha = 0.01
  c.bsq.requant_every = 50
  c.bsq.threshold = 0.0
  c.finetune_epochs = 250
  c.finetune_learning_rate = 1e-4
  c.finetune_lr_step_epochs = (250,)


def msq_recipe(c):
  c.num_epochs = 350
  c.finetune_epochs = 30


def get_config(arg: str = ""):
  c = configlib.common()
  c.model = "resnet20"  # He et al.'s 3x3 basic-block ResNet-20, 0.27M params
  c.dataset = "tfds:cifar10"  # prepared as ArrayRecord in data_dir (README)
  c.fp_accuracy = 0.9262  # the paper's float ResNet-20 (Table I)
  return configlib.apply_args(c, configlib.parse_args(arg), {"bsq": bsq_recipe, "msq": msq_recipe})
