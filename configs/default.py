"""The default job: CSQ on scikit-learn's 8x8 digits with a small CNN.

150 CSQ epochs, then 15 epochs with the bit selection frozen (Alg. 1's
mixed-precision finetune). Runs in a few minutes on 2 CPU cores, with no
download. Every knob of the paper's recipe is here; override any of them on
the command line, e.g. ``--config.target_bits=2``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to train.
  c.model = "small_cnn"  # see csq_jax/models: small_cnn, resnet20, resnet32, resnet56
  c.dataset = "digits"  # digits | npz:PATH | tfds:NAME (then set data_dir)
  c.data_dir = ""  # tfds data_dir holding the prepared data set
  c.method = "csq"  # csq | csq_uniform | ste | fp | bsq | msq (README: methods)
  c.seed = 0
  # Workdir of a finished float run (--config.method=fp) of the same model and
  # data set to start from, instead of the random init ("" = random init).
  c.init_from = ""

  # Quantization (Sec. III). n_bits bit planes per layer; the budget is the
  # parameter-weighted average precision of the counted layers.
  c.n_bits = 8
  c.target_bits = 3.0  # T; for csq_uniform / ste the fixed precision
  c.reg_strength = 0.3  # lambda of Eq. (7); the paper finds 1e-3..1 all reach the target
  c.budget_weighting = "params"  # params (paper) | layers (authors' code)
  c.beta0 = 1.0  # initial gate temperature
  c.beta_max = 200.0  # temperature reached at the end of each phase
  c.csq_init = "float"  # float: bit planes of the model's He init; random: random bit logits
  c.logit_init = 1.0  # magnitude of the initial bit logits (the authors' code: bits 0/1)
  c.decay_mask_logits = False  # weight decay on m_B would pull masks toward the 0 boundary
  # SGD momentum of the mask logits. The budget term flips sign with Delta_S
  # (a bang-bang controller); without momentum the precision settles at the
  # target instead of overshooting it by whole layers.
  c.mask_momentum = 0.0
  # Path rules (regex on the /-joined param path, first full match wins):
  # (pattern, "quantize" | "float" | "fixed"[, bits]). Unmatched params stay float.
  c.rules = (
      (".*shortcut_conv/kernel", "float"),  # 1x1 downsample convs: float, not counted
      (".*kernel", "quantize"),  # every other conv and dense kernel, first and last included
  )
  # BSQ (method="bsq", ref. [8] of CSQ): 8-bit planes of the init, clamped to
  # [0, 2]; bit-level group Lasso of strength bsq_alpha, on for the highest-
  # precision layers whose one-bit drops fit the budget (checked every step,
  # off at the target); re-quantization and precision adjustment
  # every bsq_requant_every search epochs; LSB planes with at most
  # bsq_threshold non-zero entries are dropped.
  c.bsq_alpha = 2.0
  c.bsq_requant_every = 5
  c.bsq_threshold = 0.0
  # MSQ (method="msq"): L1 of strength msq_lambda on each layer's LSBs (on
  # while above the target); every msq_prune_every search epochs, layers whose
  # penalized LSBs are zero for at least msq_threshold of their weights drop
  # them: 2 bits at once where the Hessian-aware sensitivity is below the mean
  # (msq_hessian; Hutchinson with msq_hessian_probes probes on
  # msq_hessian_batches training batches), else 1.
  c.msq_lambda = 0.05
  c.msq_prune_every = 5
  c.msq_threshold = 0.6
  c.msq_hessian = True
  c.msq_hessian_probes = 8
  c.msq_hessian_batches = 1
  # BSQ/MSQ precision moves in whole-bit steps of a layer: how far below the
  # target (average bits) those steps may take it.
  c.budget_tolerance = 0.25
  c.act_bits = 32  # activation precision (A-bits); 32 = float ReLU
  c.act_quantizer = "pact"  # pact | relu6 | maxabs

  # Optimization (Sec. IV-A): SGD momentum 0.9, cosine learning rate.
  c.num_epochs = 150
  c.batch_size = 64
  c.eval_batch_size = 256
  c.learning_rate = 0.1
  c.warmup_epochs = 0
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_decay = "cosine"  # cosine | step (lr_step_factor at each of lr_step_epochs)
  c.lr_step_epochs = ()
  c.finetune_lr_step_epochs = ()
  c.lr_step_factor = 0.1
  # Mixed-precision finetune (Alg. 1): masks frozen, no budget term.
  c.finetune_epochs = 15
  c.finetune_learning_rate = 0.01
  # Alg. 1 rewinds beta to 1 and grows it by 200 again; here, as in the last
  # epochs of the authors' CIFAR code, beta stays at 200 and only the bits
  # next to their threshold, the scales and BN still move.
  c.finetune_beta0 = 200.0
  c.finetune_beta_max = 1.0
  # Passes over the training data that re-estimate BN statistics under the
  # final hard-quantized weights (0: keep the running statistics of training).
  c.bn_recalibration_epochs = 1

  # Bookkeeping.
  c.eval_soft = True  # also evaluate with soft gates (the gap to the hard model)
  c.eval_every = 1  # epochs
  c.keep_checkpoints = 2
  c.tensorboard = True
  c.progress = True
  c.fp_accuracy = -1.0  # float baseline accuracy for the summary, if known (-1: unknown)

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
  return c
