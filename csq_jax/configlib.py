"""Shared pieces of the experiment configs in ``configs/``.

``common()`` holds every knob with the paper's value and a comment saying what
it means; each config file overrides what its experiment changes (model, data,
schedule) and stays a complete description when read with this file.
``apply_args`` parses the config-file argument that big_vision-style configs
take, e.g. ``configs/imagenet_r50.py:msq,runlocal``.
"""

from __future__ import annotations

import importlib.util
import os
import re

import ml_collections

from csq_jax.methods import registry

METHOD_ARGS = registry.names()
_BITS_ARG = re.compile(r"([ta])(\d+(?:\.\d+)?)")  # t2: target 2 bits, a3: 3-bit activations


def common() -> ml_collections.ConfigDict:
  """Every knob, at the CSQ paper's CIFAR-10 values (Sec. IV-A)."""
  c = ml_collections.ConfigDict()
  # What to train.
  c.model = "resnet20"  # csq_jax/models: small_cnn, resnet20/32/56, resnet18/34/50, vgg19_bn, ...
  c.dataset = "digits"  # digits | npz:PATH | tfds:NAME (then set data_dir)
  c.data_dir = ""  # tfds data_dir holding the prepared data set (ArrayRecord, see README)
  c.image_size = 224  # crop side of data sets whose images vary in size (ImageNet)
  c.data_workers = 0  # grain worker processes decoding batches (0: threads in this process)
  c.prefetch_batches = 2  # batches prepared ahead of the step (host and device)
  c.method = "csq"  # a name of csq_jax/methods/registry.py (README: methods) or your own "module:Class"
  c.seed = 0
  # Where the float weights start: "" (random init), the workdir of a finished
  # --config.method=fp run, or a pretrained file (.safetensors/.pth, torchvision names).
  c.init_from = ""
  c.init_from_keep = ()  # regexes of params kept at their init on import (e.g. ("head/.*",) for other classes)
  c.model_kwargs = {}  # further model fields, e.g. {"window_size": 4} for Swin at small sizes
  c.compute_dtype = "float32"  # float32 | bfloat16: activations and matmuls (quantizer params stay float32)

  # Quantization (Sec. III). n_bits bit planes per layer; the budget is the
  # parameter-weighted average precision of the counted layers.
  c.n_bits = 8
  c.target_bits = 2.0  # T; for the fixed-precision methods (ste, lsq, csq_uniform) the precision
  c.budget_weighting = "params"  # params (paper) | layers (authors' code) | macs (a BOPs budget)
  # Bit-widths the target's kernels run (allowed_bits.PROFILES): any | int8 | int4_int8 | int2_int4_int8,
  # or a tuple "(4, 8)". A search ends with every searched layer at one of them, within the budget.
  c.allowed_bits = "any"
  c.budget_tolerance = 0.25  # BSQ/MSQ: how far below the target whole-bit steps may go
  c.beta0 = 1.0  # initial gate temperature (CSQ, CSQ-Uniform)
  c.beta_max = 200.0  # temperature reached at the end of each phase
  # Path rules (regex on the /-joined param path, first full match wins):
  # (pattern, "quantize" | "float" | "fixed"[, bits]). Unmatched params stay float.
  c.rules = (
      (".*shortcut_conv/kernel", "float"),  # 1x1 downsample convs: float, not counted
      (".*kernel", "quantize"),  # every other conv and dense kernel, first and last included
  )
  c.act_bits = 32  # A-bits: 32 = float activations
  c.act_quantizer = "pact"  # pact | relu6 | maxabs

  # Optimization (Sec. IV-A): SGD momentum 0.9, cosine learning rate.
  c.optimizer = "sgd"  # sgd | adamw (then momentum is Adam's b1); the mask logits always use SGD
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
  c.checkpoint_every_steps = 0  # also save every this many steps mid-epoch (0: epoch ends only)
  # Save at the end of every this many epochs (and always at a phase's last
  # epoch). An orbax save takes ~0.22 s on a CPU, half of a default-job
  # epoch's 0.43 s of train steps: runs of short epochs may save less often.
  c.checkpoint_every_epochs = 1
  # A workdir's checkpoints record the run's config; resuming (or rerunning a
  # finished run) with a config that differs in a field that changes the result
  # is refused. allow_resume_changes lists the fields (comma-separated, e.g.
  # "num_epochs,learning_rate") that may differ when resuming deliberately.
  c.allow_resume_changes = ""
  # A checkpoint whose files fail their checksums is refused; True: set it
  # aside (workdir/corrupt_checkpoints) and resume from the newest earlier one.
  c.checkpoint_fallback = False
  c.check_finite_every_steps = 100  # how often the loss is checked for NaN/Inf (a host sync)
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

  # Each method's own knobs, in a section named after it, with the method's
  # defaults and their meaning (csq_jax/methods/<method>.py: defaults()), e.g.
  # --config.csq.reg_strength=0.1, --config.bsq.alpha=0.25, --config.msq.threshold=0.6.
  for name in registry.names():
    method = registry.resolve(name)
    if method.section and method.section not in c:
      c[method.section] = ml_collections.ConfigDict(method.defaults())
  return c


def load(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file at ``path``, loaded as
  ``--config=path[:arg]`` loads it (for scripts, benchmarks and tests)."""
  spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_args(arg: str, extra: tuple[str, ...] = ()) -> set[str]:
  """The comma-separated config argument as a set; unknown words are an error.

  Known: one method name (registered, or a user's ``module:Class``, whose
  config section then exists for ``--config.<section>.*`` overrides),
  ``runlocal``, ``tN`` (target bits N), ``aN`` (activation bits N), and the
  config's own ``extra`` words.
  """
  args = {a.strip() for a in arg.split(",") if a.strip()}
  named = {a for a in args if _is_method(a)}
  unknown = {a for a in args if not _is_method(a) and a not in ("runlocal",) + extra and not _BITS_ARG.fullmatch(a)}
  if unknown or len(named) > 1:
    raise ValueError(f"Config arguments {sorted(args)}: expected at most one of {', '.join(METHOD_ARGS)},"
                     f" and optionally runlocal, tN (target bits), aN (activation bits)"
                     + (f", {', '.join(extra)}" if extra else "") + ".")
  return args


def _is_method(word: str) -> bool:
  return word in METHOD_ARGS or (":" in word and registry.is_known(word))


def apply_args(c: ml_collections.ConfigDict, args: set[str], recipes=None) -> ml_collections.ConfigDict:
  """Set the method (then its recipe, ``recipes[method](c)``), ``tN``, ``aN``
  and, last, ``runlocal``: 2 epochs (1 finetune), tiny batches, every periodic
  action each epoch (MSQ's Hessian with 2 + 2 probes per layer), so any
  experiment becomes a smoke test."""
  for a in args:
    bits = _BITS_ARG.fullmatch(a)
    if _is_method(a):
      c.method = a
      registry.resolve(a).add_section(c)
    elif bits and bits.group(1) == "t":
      c.target_bits = float(bits.group(2))
    elif bits:
      c.act_bits = int(float(bits.group(2)))
  if recipes and c.method in recipes:
    recipes[c.method](c)
  if "runlocal" in args:
    c.num_epochs = 2
    c.finetune_epochs = min(c.finetune_epochs, 1)
    c.warmup_epochs = 0
    c.eval_every = 1
    c.bsq.requant_every = 1
    c.msq.prune_every = 1
    c.msq.hessian_sketch = min(c.msq.hessian_sketch, 2)  # the Hessian path runs, on a small budget
    c.msq.hessian_probes = min(c.msq.hessian_probes, 2)
    c.msq.hessian_max_probes = min(c.msq.hessian_max_probes, 4)
  return c


def imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ImageNet-1k defaults (CSQ Sec. IV-A): tfds ``imagenet2012`` (ArrayRecord
  in ``data_dir``), 224 crops, batch 256, 5 warm-up epochs, weight decay
  1e-4, 200 CSQ epochs + 100 finetune epochs with beta rewound (Alg. 1)."""
  c.dataset = "tfds:imagenet2012"
  c.image_size = 224
  c.data_workers = 8  # JPEG decoding is the input bottleneck: use the host's cores
  c.batch_size = 256  # global, over all devices and hosts
  c.eval_batch_size = 500
  c.learning_rate = 0.1  # for batch 256; scale linearly with the batch
  c.warmup_epochs = 5
  c.weight_decay = 1e-4
  c.num_epochs = 200
  c.finetune_epochs = 100
  c.finetune_learning_rate = 0.01
  c.eval_every = 5
  c.bn_recalibration_epochs = 0  # a full pass over ImageNet; the finetune phase already settles BN
  c.checkpoint_every_steps = 2000  # ~2/5 of an epoch at batch 256
  c.compute_dtype = "float32"  # bfloat16 on TPUs and Ampere+ GPUs (quantizer params stay float32)
  return c


def imagenet_transformer(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ImageNet defaults for MSQ on vision transformers (DeiT's recipe, from a
  float model): AdamW (b1 0.9), lr 5e-4 for batch 512 with cosine decay and
  5 warm-up epochs, weight decay 0.05, 100 + 10 finetune epochs, LSB pruning
  checked every 5 epochs."""
  imagenet(c)
  c.method = "msq"
  c.optimizer = "adamw"
  c.momentum = 0.9  # Adam's b1
  c.batch_size = 512
  c.learning_rate = 5e-4
  c.finetune_learning_rate = 5e-5
  c.weight_decay = 0.05
  c.num_epochs = 100
  c.finetune_epochs = 10
  c.msq.prune_every = 5
  return c


def runlocal_imagenet(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``runlocal`` for ImageNet configs: small crops and batches (with the
  2 epochs of ``apply_args``) for a smoke test of the pipeline."""
  c.image_size = 64
  c.batch_size = 8
  c.eval_batch_size = 8
  c.data_workers = 0
  c.checkpoint_every_steps = 0
  return c
