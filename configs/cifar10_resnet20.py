"""CSQ on CIFAR-10 with ResNet-20: the paper's setup (Sec. IV-A, Table I).

600 epochs from scratch, SGD momentum 0.9, lr 0.1 with cosine annealing,
weight decay 5e-4, lambda 0.01, beta 1 -> 200, 8 bit planes, no finetune.
Pick the budget and the activation precision by override:

  python -m csq_jax.main --config=configs/cifar10_resnet20.py --workdir=runs/r20_t2a3 \
      --config.data_dir=$HOME/tensorflow_datasets --config.target_bits=2 --config.act_bits=3

``--config=configs/cifar10_resnet20.py:runlocal`` shrinks it to a 2-epoch smoke test.

The rival methods' recipes are selected the same way (comma-separated, e.g.
``:bsq,runlocal``):

* ``:bsq`` -- BSQ's reference ResNet-20 setup (its public code): start from
  a float model's 8-bit quantization (``init_from``: the workdir of a
  ``--config.method=fp`` run), 350 epochs, lr 0.1 stepped x0.1 at epoch 250,
  weight decay 1e-4, alpha 0.01, re-quantization every 100 epochs, threshold
  0, then 300 finetune epochs at lr 0.01 with the scheme fixed.
* ``:msq`` -- MSQ (no public code; our choices, documented in
  ``csq_jax/quantizers/msq.py``): 350 epochs, cosine lr 0.1, weight decay
  5e-4, lambda 0.05, LSB sparsity checked every 10 epochs with threshold
  0.6, Hessian-aware k from 8 probes on 2 batches, 30 finetune epochs.
* ``:ste``, ``:csq_uniform``, ``:fp`` -- the baselines on CSQ's schedule.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = {a.strip() for a in arg.split(",") if a.strip()}
  methods = args & {"bsq", "msq", "ste", "csq_uniform", "fp", "csq"}
  unknown = args - methods - {"runlocal"}
  if unknown or len(methods) > 1:
    raise ValueError(f"Config arguments {sorted(args)}: expected at most one of bsq, msq, ste, csq_uniform,"
                     " fp, csq, and optionally runlocal.")
  c = ml_collections.ConfigDict()
  # What to train.
  c.model = "resnet20"  # He et al.'s 3x3 basic-block ResNet-20, 0.27M params
  c.dataset = "tfds:cifar10"
  c.data_dir = ""  # tfds data_dir holding cifar10 prepared as ArrayRecord (see README)
  c.method = "csq"  # csq | csq_uniform | ste | fp | bsq | msq (README: methods)
  c.seed = 0
  c.init_from = ""  # workdir of a finished fp run to start from ("" = random init)

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
  # BSQ and MSQ knobs (see configs/default.py for what each means).
  c.bsq_alpha = 0.01
  c.bsq_requant_every = 100
  c.bsq_threshold = 0.0
  c.msq_lambda = 0.05
  c.msq_prune_every = 10
  c.msq_threshold = 0.6
  c.msq_hessian = True
  c.msq_hessian_probes = 8
  c.msq_hessian_batches = 2
  c.budget_tolerance = 0.25
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
  c.lr_decay = "cosine"  # cosine | step (lr_step_factor at each of lr_step_epochs)
  c.lr_step_epochs = ()
  c.finetune_lr_step_epochs = ()
  c.lr_step_factor = 0.1
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

  # Devices (csq_jax/sharding.py). The mesh: (axis, size) pairs, size -1 = the
  # rest of the devices. "data" splits the batch over devices (XLA all-reduces
  # the materialized weights' gradient, not the bit planes'); "fsdp" splits the
  # batch too and shards each large state leaf (bit planes, latent weights and
  # their optimizer state) along one axis, dividing its memory per device by
  # the fsdp size. batch_size and eval_batch_size must be multiples of
  # data x fsdp. E.g. --config.mesh="(('data', -1), ('fsdp', 2))".
  c.mesh = (("data", -1), ("fsdp", 1))
  # Multi-host (csq_jax/distributed.py, launch/): init "env" joins the other
  # processes when launch/local.py's CSQ_COORDINATOR/CSQ_NUM_PROCESSES/
  # CSQ_PROCESS_ID or JAX_COORDINATOR_ADDRESS are set (else one process),
  # "auto" always (JAX detects TPU pods and SLURM; launch/tpu_pod.sh and
  # launch/slurm.sbatch set it), "off" never. coordinator (host:port of
  # process 0), num_processes and process_id set it explicitly (""/0/-1: unset).
  c.distributed = ml_collections.ConfigDict(
      {"init": "env", "coordinator": "", "num_processes": 0, "process_id": -1})
  if methods:
    c.method = methods.pop()
  if c.method == "bsq":
    c.num_epochs = 350
    c.lr_decay = "step"
    c.lr_step_epochs = (250,)
    c.weight_decay = 1e-4
    c.finetune_epochs = 300
    c.finetune_learning_rate = 0.01
  elif c.method == "msq":
    c.num_epochs = 350
    c.finetune_epochs = 30
  if "runlocal" in args:
    c.num_epochs = 2
    c.finetune_epochs = min(c.finetune_epochs, 1)
    c.eval_every = 1
    c.bsq_requant_every = 1
    c.msq_prune_every = 1
  return c
