"""CSQ on CIFAR-10 with ResNet-20: the paper's setup (Sec. IV-A, Table I).

600 epochs from scratch, SGD momentum 0.9, lr 0.1 with cosine annealing,
weight decay 5e-4, lambda 0.01, beta 1 -> 200, 8 bit planes, no finetune.
Pick the budget and the activation precision by override:

  python -m csq_jax.main --config=configs/cifar10_resnet20.py --workdir=runs/r20_t2a3 \
      --config.data_dir=$HOME/tensorflow_datasets --config.target_bits=2 --config.act_bits=3

``--config=configs/cifar10_resnet20.py:runlocal`` shrinks it to a 2-epoch smoke test.
"""

import ml_collections


def get_config(runlocal: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to train.
  c.model = "resnet20"  # He et al.'s 3x3 basic-block ResNet-20, 0.27M params
  c.dataset = "tfds:cifar10"
  c.data_dir = ""  # tfds data_dir holding cifar10 prepared as ArrayRecord (see README)
  c.method = "csq"  # csq (mixed precision) | csq_uniform | ste | fp
  c.seed = 0

  # Quantization (Sec. III). n_bits bit planes per layer; the budget is the
  # parameter-weighted average precision of the counted layers.
  c.n_bits = 8
  c.target_bits = 2.0  # T of Tables I and V: override with --config.target_bits
  c.reg_strength = 0.01  # lambda of Eq. (7)
  c.budget_weighting = "params"  # params (paper) | layers (authors' code)
  c.beta0 = 1.0  # initial gate temperature
  c.beta_max = 200.0  # temperature reached at the end of each phase
  c.csq_init = "float"  # float: bit planes of the model's He init; random: random bit logits
  c.logit_init = 1.0  # magnitude of the initial bit logits (the authors' code: bits 0/1)
  c.decay_mask_logits = False  # weight decay on m_B would pull masks toward the 0 boundary
  c.mask_momentum = 0.9  # SGD momentum of the mask logits (the paper: plain SGD, 0.9)
  # Path rules (regex on the /-joined param path, first full match wins):
  # (pattern, "quantize" | "float" | "fixed"[, bits]). Unmatched params stay float.
  c.rules = (
      (".*shortcut_conv/kernel", "float"),  # 1x1 downsample convs: float, not counted
      (".*kernel", "quantize"),  # every other conv and dense kernel, first and last included
  )
  c.act_bits = 32  # A-bits of Table I: 32, 3 or 2 (PACT)
  c.act_quantizer = "pact"  # pact | relu6 | maxabs

  # Optimization (Sec. IV-A): SGD momentum 0.9, cosine learning rate.
  c.num_epochs = 600
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.learning_rate = 0.1
  c.warmup_epochs = 0
  c.momentum = 0.9
  c.weight_decay = 5e-4
  # Optional mixed-precision finetune (Alg. 1): masks frozen, beta rewound.
  c.finetune_epochs = 0
  c.finetune_learning_rate = 0.01
  c.finetune_beta0 = 1.0  # Alg. 1 rewinds beta to beta0 ...
  c.finetune_beta_max = 200.0  # ... and grows it again by this factor
  # Passes over the training data that re-estimate BN statistics under the
  # final hard-quantized weights (0: keep the running statistics of training).
  c.bn_recalibration_epochs = 1

  # Bookkeeping.
  c.eval_soft = True  # also evaluate with soft gates (the gap to the hard model)
  c.eval_every = 5  # epochs
  c.keep_checkpoints = 2
  c.tensorboard = True
  c.progress = True
  c.fp_accuracy = 0.9262  # the paper's float ResNet-20 (Table I)
  if runlocal:
    c.num_epochs = 2
    c.eval_every = 1
  return c
