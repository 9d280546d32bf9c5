"""Training: state, pure jitted steps, and one loop for every method.

The loop is Algorithm 1 of CSQ, with the method's hooks (``methods.py``) at
fixed points. Phase 1 (the search, named after the method) trains every
quantizer parameter with the task loss plus the method's regularizer (CSQ:
the budget-aware objective of Eq. 7) while the gate temperature grows as
``beta0 * beta_max^(t/T)``; after each of its epochs the method may adjust
the quantizers on the host (BSQ re-quantizes, MSQ prunes LSBs). Phase 2
(``finetune_epochs > 0``) fixes the scheme (CSQ freezes each layer's bit
selection to ``I(m_B >= 0)``, Eq. 4), rewinds beta and trains with the task
loss alone. The final model is evaluated exactly quantized (every gate a unit
step), after its BN statistics are re-estimated under those hard weights
(``bn_recalibration_epochs``).

The model never holds quantized weights: ``train_step`` materializes them from
the quantizer parameters (``transform.materialize``) and hands them to a plain
``model.apply``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import signal
import statistics
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from csq_jax import budget, checkpoint, data, distributed, export, gates, methods, metric_writers, models
from csq_jax import pretrained, report, sharding, transform
from csq_jax.quantizers import activations
from csq_jax.quantizers.csq import CSQWeight


class TrainState(struct.PyTreeNode):
  """Everything that changes during training (checkpointed as one pytree)."""

  step: jax.Array  # step within the current phase
  params: Any  # quantizer parameters + float parameters (see transform.py)
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM (preemption) arrived: a checkpoint of the current step was saved;
  rerunning the same command resumes from it."""


class ConfigError(ValueError):
  """A config value that cannot run; the message says what to choose instead."""


# ----------------------------------------------------------------------------
# Config checks

SEARCH_METHODS = ("csq", "bsq", "msq")  # mixed precision found under the budget
FIXED_METHODS = ("ste", "csq_uniform")  # every quantized layer at target_bits


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _int_at_least(lo: int):
  return lambda x, c: isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _at_least(lo: float, strict: bool = False):
  return lambda x, c: _number(x) and (x > lo if strict else x >= lo)


def _fraction(x, c) -> bool:
  return _number(x) and 0.0 <= x < 1.0


# (field, check(value, config), what is expected): numeric fields validated up front.
FIELD_RANGES = (
    ("seed", _int_at_least(0), "an integer >= 0"),
    ("image_size", _int_at_least(1), "an integer >= 1"),
    ("data_workers", _int_at_least(0), "an integer >= 0 (0: threads in this process)"),
    ("prefetch_batches", _int_at_least(0), "an integer >= 0"),
    ("num_epochs", _int_at_least(1), "an integer >= 1"),
    ("finetune_epochs", _int_at_least(0), "an integer >= 0"),
    ("batch_size", _int_at_least(1), "an integer >= 1"),
    ("eval_batch_size", _int_at_least(1), "an integer >= 1 (test examples per evaluation batch)"),
    ("learning_rate", _at_least(0.0, strict=True), "a number > 0"),
    ("finetune_learning_rate", lambda x, c: c.finetune_epochs == 0 or _at_least(0.0, True)(x, c),
     "a number > 0 when finetune_epochs > 0"),
    ("warmup_epochs", lambda x, c: _number(x) and 0 <= x < c.num_epochs, "a number in [0, num_epochs)"),
    ("momentum", _fraction, "a number in [0, 1)"),
    ("mask_momentum", _fraction, "a number in [0, 1)"),
    ("weight_decay", _at_least(0.0), "a number >= 0"),
    ("lr_step_factor", _at_least(0.0, strict=True), "a number > 0"),
    ("reg_strength", _at_least(0.0), "a number >= 0 (lambda of Eq. 7)"),
    ("beta0", _at_least(0.0, strict=True), "a number > 0"),
    ("beta_max", _at_least(0.0, strict=True), "a number > 0"),
    ("finetune_beta0", _at_least(0.0, strict=True), "a number > 0"),
    ("finetune_beta_max", _at_least(0.0, strict=True), "a number > 0"),
    ("min_layer_bits", lambda x, c: _int_at_least(0)(x, c) and x <= c.n_bits, "an integer in [0, n_bits]"),
    ("csq_init", lambda x, c: x in ("float", "random"), "'float' or 'random'"),
    ("logit_init", _at_least(0.0, strict=True), "a number > 0"),
    ("csq_mask_clamp", _at_least(0.0, strict=True), "a number > 0"),
    ("bsq_alpha", _at_least(0.0), "a number >= 0"),
    ("bsq_requant_every", _int_at_least(1), "an integer >= 1 (epochs)"),
    ("msq_lambda", _at_least(0.0), "a number >= 0"),
    ("msq_prune_every", _int_at_least(1), "an integer >= 1 (epochs)"),
    ("msq_hessian_probes", _int_at_least(1), "an integer >= 1"),
    ("msq_hessian_batches", _int_at_least(1), "an integer >= 1"),
    ("budget_tolerance", _at_least(0.0), "a number >= 0"),
    ("act_bits", lambda x, c: isinstance(x, int) and 1 <= x <= 32, "an integer in [1, 32] (32: float activations)"),
    ("bn_recalibration_epochs", _int_at_least(0), "an integer >= 0"),
    ("eval_every", _int_at_least(1), "an integer >= 1 (epochs)"),
    ("keep_checkpoints", _int_at_least(1), "an integer >= 1"),
    ("checkpoint_every_steps", _int_at_least(0), "an integer >= 0 (0: at epoch ends only)"),
    ("check_finite_every_steps", _int_at_least(1), "an integer >= 1"),
    ("fp_accuracy", lambda x, c: _number(x) and (x == -1 or 0 <= x <= 1), "-1 (unknown) or a fraction in [0, 1]"),
    ("allow_resume_changes", lambda x, c: isinstance(x, str), "comma-separated config fields"),
)
LR_DECAYS = ("cosine", "step")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise one clear ``ConfigError`` for a config that cannot run."""
  if config.model not in models.MODELS:
    raise ConfigError(f"Unknown model {config.model!r}; expected one of {sorted(models.MODELS)}.")
  if config.method not in transform.METHODS:
    raise ConfigError(f"Unknown method {config.method!r}; expected one of {transform.METHODS}.")
  if not 1 <= config.n_bits <= 16:
    raise ConfigError(f"n_bits must be in 1..16, got {config.n_bits}.")
  if config.method in SEARCH_METHODS and not 1 <= config.target_bits <= config.n_bits:
    raise ConfigError(
        f"target_bits={config.target_bits} is impossible with n_bits={config.n_bits} bit planes:"
        f" choose a target in [1, {config.n_bits}] (or raise n_bits)."
    )
  if config.method in FIXED_METHODS and not (1 <= config.target_bits <= config.n_bits
                                             and float(config.target_bits).is_integer()):
    raise ConfigError(
        f"target_bits={config.target_bits} cannot be the fixed precision of method {config.method}: choose a whole"
        f" number of bits in [1, {config.n_bits}] (n_bits={config.n_bits}; raise n_bits for more)."
    )
  if config.budget_weighting not in budget.WEIGHTINGS:
    raise ConfigError(f"Unknown budget_weighting {config.budget_weighting!r}; expected one of {budget.WEIGHTINGS}.")
  if config.act_bits != 32 and config.act_quantizer not in activations.ACTIVATIONS:
    raise ConfigError(f"Unknown act_quantizer {config.act_quantizer!r}; expected one of {activations.ACTIVATIONS}.")
  if config.num_epochs < 1 or config.finetune_epochs < 0:
    raise ConfigError("num_epochs must be >= 1 and finetune_epochs >= 0.")
  if config.batch_size < 1 or config.learning_rate <= 0:
    raise ConfigError("batch_size and learning_rate must be positive.")
  if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise ConfigError(f"Unknown compute_dtype {config.compute_dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}.")
  if config.get("optimizer", "sgd") not in OPTIMIZERS:
    raise ConfigError(f"Unknown optimizer {config.optimizer!r}; expected one of {OPTIMIZERS}.")
  rounds = config.get("csq_rounds", 1)
  if rounds != 1 and (config.method != "csq" or not 1 <= rounds <= config.num_epochs):
    raise ConfigError(f"csq_rounds={rounds}: the multi-round recipe is CSQ's (method csq) and needs at most"
                      f" num_epochs={config.num_epochs} rounds; use csq_rounds=1 otherwise.")
  if rounds != 1 and not 0 <= config.csq_rewind_epoch < config.num_epochs // rounds:
    raise ConfigError(f"csq_rewind_epoch={config.csq_rewind_epoch} must fall in the first round"
                      f" (0..{config.num_epochs // rounds - 1}).")
  if config.lr_decay not in LR_DECAYS:
    raise ConfigError(f"Unknown lr_decay {config.lr_decay!r}; expected one of {LR_DECAYS}.")
  if config.method == "msq" and not 0.0 <= config.msq_threshold <= 1.0:
    raise ConfigError(f"msq_threshold is a fraction of weights, in [0, 1]; got {config.msq_threshold}.")
  if config.method == "bsq" and not 0.0 <= config.bsq_threshold < 1.0:
    raise ConfigError(f"bsq_threshold is a fraction of weights, in [0, 1); got {config.bsq_threshold}.")
  for field, ok, expected in FIELD_RANGES:
    if field in config and not ok(config[field], config):
      raise ConfigError(f"{field}={config[field]!r} is out of range: expected {expected}.")
  try:
    mesh = sharding.mesh_shape(config.get("mesh", sharding.DEFAULT_MESH), jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from e
  ways = mesh["data"] * mesh.get("fsdp", 1)
  if config.batch_size % ways or config.eval_batch_size % ways:
    raise ConfigError(f"batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be"
                      f" multiples of the {ways} data-parallel devices (mesh {mesh}); change them or the mesh.")
  try:
    transform.rules_from_config(config.rules)
    quantize_spec(config)
  except (ValueError, TypeError, re.error) as e:
    raise ConfigError(str(e)) from e


def check_rules_quantize(config, rules_report: transform.TransformReport) -> None:
  """A quantizing method whose rules select no parameter would train (and
  report) a float model: a ``ConfigError`` naming the model's kernels."""
  if config.method == "fp" or rules_report.quantized_paths():
    return
  kernels = [p for p in rules_report.actions if p.endswith("kernel")] or list(rules_report.actions)
  raise ConfigError(
      f"config.rules {[tuple(r) for r in config.rules]} quantize no parameter of {config.model}, so method"
      f" {config.method} would train a float model. Write rules that match its kernels (e.g."
      f" {', '.join(kernels[:3])}; pattern '.*kernel' matches all), or use --config.method=fp."
  )


def uniform_bits(config) -> int:
  """Bits of the fixed-precision methods (CSQ-Uniform, STE): the target."""
  return int(round(config.target_bits))


def quantize_spec(config) -> transform.QuantizeSpec:
  n_bits = config.n_bits if config.method in SEARCH_METHODS else uniform_bits(config)
  return transform.QuantizeSpec(config.method, n_bits, config.csq_init, config.logit_init,
                                config.get("csq_off_logit", 0.0))


# ----------------------------------------------------------------------------
# State and optimizer


def param_labels(params: Any) -> Any:
  """``"mask"`` for CSQ bit-mask logits, ``"weights"`` for every other leaf."""

  def leaf_labels(x):
    if isinstance(x, CSQWeight):
      return CSQWeight("weights", "weights", "mask", "weights", x.mask_mode)
    return jax.tree_util.tree_map(lambda _: "weights", x)

  return jax.tree_util.tree_map(leaf_labels, params, is_leaf=transform.is_leaf)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(config, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with coupled weight decay (PyTorch's SGD ``weight_decay``), or AdamW
  (``optimizer="adamw"``, decoupled decay; the transformers' recipe).

  The bit-mask logits get their own momentum (``mask_momentum``) and no weight
  decay unless ``decay_mask_logits``: the budget term acts on them like a
  bang-bang controller (its sign flips with Delta_S), and heavy momentum
  carries many masks past the target after each flip.
  """

  def sgd(momentum, decay):
    parts = [optax.add_decayed_weights(config.weight_decay)] if decay and config.weight_decay else []
    return optax.chain(*parts, optax.sgd(lr_schedule, momentum=momentum or None))

  def weights_tx():
    if config.get("optimizer", "sgd") == "adamw":
      return optax.adamw(lr_schedule, b1=config.momentum, weight_decay=config.weight_decay)
    return sgd(config.momentum, True)

  return optax.multi_transform(
      {
          "weights": weights_tx(),
          "mask": sgd(config.mask_momentum, config.decay_mask_logits),
      },
      param_labels,
  )


def lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
                decay: str = "cosine", step_epochs=(), step_factor: float = 0.1) -> optax.Schedule:
  """Cosine annealing over the phase with optional linear warm-up, or
  (``decay="step"``) ``base_lr`` times ``step_factor`` at each of
  ``step_epochs`` (BSQ's recipe: 0.1 at epoch 250 of 350)."""
  total = max(epochs * steps_per_epoch, 1)
  if decay == "step":
    return optax.piecewise_constant_schedule(
        base_lr, {int(e * steps_per_epoch): step_factor for e in step_epochs if 0 < e < epochs})
  warmup = int(warmup_epochs * steps_per_epoch)
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, total)
  return optax.cosine_decay_schedule(base_lr, total)


@dataclasses.dataclass
class Phase:
  """One phase of Alg. 1: its epochs, schedules and optimizer."""

  name: str  # the method's name (phase 1, the search) or "finetune"
  epochs: int
  beta: optax.Schedule
  lr: optax.Schedule
  tx: optax.GradientTransformation
  penalty: bool  # whether Eq. (7)'s budget term is on


def make_phases(config, steps_per_epoch: int) -> list[Phase]:
  """Alg. 1's phases: the search (``csq_rounds`` rounds of it, each with beta
  restarted, for the authors' multi-round recipe), then the finetune."""
  rounds = int(config.get("csq_rounds", 1))
  spec = [(config.method if rounds == 1 else f"{config.method}_round{r + 1}",
           config.num_epochs // rounds + (r < config.num_epochs % rounds), config.learning_rate,
           config.warmup_epochs if r == 0 else 0, config.beta0, config.beta_max,
           config.method in SEARCH_METHODS, config.lr_step_epochs) for r in range(rounds)]
  if config.finetune_epochs > 0:
    spec.append(("finetune", config.finetune_epochs, config.finetune_learning_rate, 0,
                 config.finetune_beta0, config.finetune_beta_max, False, config.finetune_lr_step_epochs))
  phases = []
  for name, epochs, lr, warmup, beta0, beta_max, penalty, step_epochs in spec:
    total = epochs * steps_per_epoch
    lr_fn = lr_schedule(lr, epochs, steps_per_epoch, warmup, config.lr_decay, step_epochs, config.lr_step_factor)
    phases.append(Phase(name, epochs, gates.beta_schedule(total, beta0, beta_max), lr_fn,
                        make_optimizer(config, lr_fn), penalty))
  return phases


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config, num_classes: int, image_shape=None):
  """The config's model; ``compute_dtype`` sets its activations' dtype, while
  its parameters (and so every quantizer parameter) stay float32;
  ``model_kwargs`` are further fields (e.g. Swin's ``window_size``)."""
  act = activations.activation_factory(config.act_quantizer, config.act_bits)
  dtype = COMPUTE_DTYPES[config.get("compute_dtype", "float32")]
  kwargs = dict(config.get("model_kwargs", {}))
  return models.create_model(config.model, num_classes, act, dtype,
                             image_size=image_shape[0] if image_shape else None, **kwargs)


def init_state(config, model, image_shape, phase: Phase, key: jax.Array):
  """The model's float init (or, with ``config.init_from``, a trained float
  run's weights), quantized by the config's rules."""
  init_key, q_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if config.get("init_from"):
    float_state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, phase.tx.init(params))
    params, batch_stats = pretrained.restore_init(config, float_state)
  qparams, report_ = transform.quantize_params(
      params, transform.rules_from_config(config.rules), quantize_spec(config), q_key
  )
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=qparams,
      batch_stats=batch_stats,
      opt_state=phase.tx.init(qparams),
  )
  return state, report_


def start_round(state: TrainState, phase: Phase, method: methods.Method, rewind: dict, config) -> TrainState:
  """A later search round of the multi-round recipe: the masks found so far
  (clipped to ``csq_mask_clamp``) on the weights rewound to ``rewind``
  (``{"params", "batch_stats"}`` saved after epoch ``csq_rewind_epoch``),
  fresh optimizer, beta restarted (step 0)."""
  params = method.start_round(state.params, rewind["params"], float(config.csq_mask_clamp))
  return TrainState(jnp.zeros((), jnp.int32), params, rewind["batch_stats"], phase.tx.init(params))


def start_finetune(state: TrainState, phase: Phase, method: methods.Method) -> TrainState:
  """Alg. 1's second phase: the method fixes its scheme (CSQ freezes the bit
  selection), fresh optimizer, beta rewound (step 0)."""
  params = method.start_finetune(state.params)
  return TrainState(jnp.zeros((), jnp.int32), params, state.batch_stats, phase.tx.init(params))


def carry_opt_state(tx: optax.GradientTransformation, opt_state, params):
  """Optimizer state for ``params`` after a precision change (BSQ's planes,
  MSQ's static bits): each leaf of the old state whose shape still fits is
  kept (momentum of unchanged layers survives), the others start at zero."""
  fresh = tx.init(params)
  old = jax.tree_util.tree_leaves(opt_state)
  new, treedef = jax.tree_util.tree_flatten(fresh)
  if len(old) != len(new):
    return fresh
  return jax.tree_util.tree_unflatten(
      treedef, [o if np.shape(o) == np.shape(n) and o.dtype == n.dtype else n for o, n in zip(old, new)])


# ----------------------------------------------------------------------------
# Steps


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def device_batch(batch, mesh):
  """This process's rows of a global batch (``data.train_batches`` /
  ``eval_batches`` with ``process_rows()``; with one process, the whole batch)
  as global device arrays split over the mesh's data axes."""
  return sharding.shard_batch(batch, sharding.batch_sharding(mesh))


def process_rows() -> dict[str, int]:
  """The data pipeline's arguments for this process's rows of every batch."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def _on_mesh(fn, mesh, state_args: tuple[int, ...], batch_arg: int, outs=None, donate=()):
  """``fn`` jitted over ``mesh``: the args in ``state_args`` on their state
  sharding, the host batch at ``batch_arg`` split over the data axes, other
  args replicated; outputs replicated, or ``outs(replicated, in_shardings)``."""

  def shardings(*args):
    rep = sharding.replicated(mesh)
    ins = [sharding.state_sharding(mesh, a) if i in state_args else rep for i, a in enumerate(args)]
    ins[batch_arg] = sharding.batch_sharding(mesh)
    return tuple(ins), (rep if outs is None else outs(rep, ins))

  jitted = sharding.jit_sharded(fn, shardings, donate)

  def to_device(args):
    return args[:batch_arg] + (device_batch(args[batch_arg], mesh),) + args[batch_arg + 1:]

  def call(*args):
    return jitted(*to_device(args))

  call.lower = lambda *args: jitted.lower(*to_device(args))
  return call


def make_train_step(model, phase: Phase, method: methods.Method, mesh=None) -> Callable:
  """``(state, batch) -> (state, metrics)``, jitted with the state donated.

  The loss is the cross-entropy plus, in the search phase, the method's
  regularizer; the method's ``after_update`` follows the optimizer step.
  With a ``mesh`` (``sharding.make_mesh``) the step takes global host
  batches, splits them over the data axes and keeps the state on its
  sharding (``sharding.state_sharding``); XLA all-reduces the gradient.
  """

  def train_step(state: TrainState, batch):
    beta = phase.beta(state.step)

    def loss_fn(params):
      weights = transform.materialize(params, beta)
      if mesh is not None:
        weights = sharding.constrain_weights(weights, params, mesh)
      logits, updates = model.apply(
          {"params": weights, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"],
      )
      ce = jnp.mean(cross_entropy(logits, batch["label"]))
      if phase.penalty:
        penalty, delta_s = method.regularizer(params, beta)
      else:
        penalty, delta_s = jnp.zeros(()), method.delta_s(params)
      aux = dict(logits=logits, batch_stats=updates["batch_stats"], ce=ce, penalty=penalty, delta_s=delta_s)
      return ce + penalty, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = phase.tx.update(grads, state.opt_state, state.params)
    params = method.after_update(optax.apply_updates(state.params, updates))
    new_state = TrainState(state.step + 1, params, aux["batch_stats"], opt_state)
    metrics = dict(
        loss=loss, ce=aux["ce"], penalty=aux["penalty"], delta_s=aux["delta_s"],
        accuracy=jnp.mean(jnp.argmax(aux["logits"], -1) == batch["label"]),
        beta=beta, lr=phase.lr(state.step),
    )
    return new_state, metrics

  if mesh is not None:
    return _on_mesh(train_step, mesh, state_args=(0,), batch_arg=1, outs=lambda rep, ins: (ins[0], rep), donate=0)
  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model, hard: bool, mesh=None) -> Callable:
  """``(params, batch_stats, batch, beta) -> (correct, loss_sum, count)``;
  with ``hard`` every gate is a unit step (the exactly quantized model).
  With a ``mesh``, sharded as ``make_train_step``."""

  def eval_step(params, batch_stats, batch, beta):
    weights = transform.materialize(params, beta, hard=hard)
    if mesh is not None:
      weights = sharding.constrain_weights(weights, params, mesh)
    logits = model.apply({"params": weights, "batch_stats": batch_stats}, batch["image"], train=False)
    mask = batch["mask"]
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask)
    loss = jnp.sum(cross_entropy(logits, batch["label"]) * mask)
    return correct, loss, jnp.sum(mask)

  if mesh is not None:
    return _on_mesh(eval_step, mesh, state_args=(0, 1), batch_arg=2)
  return jax.jit(eval_step)


def recalibrate_batch_norm(model, state: TrainState, ds: data.Dataset, config, mesh=None) -> TrainState:
  """Re-estimate BN running statistics under the hard-quantized weights.

  The running statistics are averaged over training steps whose soft weights
  kept changing (bits and masks flip while beta grows); the exactly quantized
  weights deserve statistics of their own. BN parameters are float and not
  counted, so this changes no quantized value. ``bn_recalibration_epochs``
  passes over the (augmented) training data in train mode, no gradient.
  With a ``mesh``, the batches are split over its data axes.
  """
  if config.bn_recalibration_epochs <= 0 or not jax.tree_util.tree_leaves(state.batch_stats):
    return state
  weights = transform.materialize(state.params, None, hard=True)

  def update(weights, batch_stats, batch):
    _, new = model.apply({"params": weights, "batch_stats": batch_stats}, batch["image"], train=True,
                         mutable=["batch_stats"])
    return new["batch_stats"]

  if mesh is None:
    update = jax.jit(update)
  else:
    update = _on_mesh(update, mesh, state_args=(0, 1), batch_arg=2, outs=lambda rep, ins: ins[1])
  batch_stats = state.batch_stats
  for i in range(config.bn_recalibration_epochs):
    for batch in data.train_batches(ds, config.batch_size, config.seed + 1, i, **process_rows()):
      batch_stats = update(weights, batch_stats, {"image": batch["image"]})
  return state.replace(batch_stats=batch_stats)


def evaluate(eval_step, state: TrainState, ds: data.Dataset, batch_size: int, beta=1.0):
  """``(accuracy, mean loss)`` over the whole test split."""
  totals = np.zeros(3)
  for batch in data.eval_batches(ds, batch_size, **process_rows()):
    totals += np.asarray(jax.device_get(eval_step(state.params, state.batch_stats, batch, beta)))
  correct, loss, n = totals
  return correct / n, loss / n


# ----------------------------------------------------------------------------
# The loop


def _echo(line: str) -> None:
  """Print a line above the progress bar."""
  from tqdm.auto import tqdm

  tqdm.write(line)


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def _phase_of(epoch: int, phases: list[Phase]) -> tuple[int, int]:
  """``(phase index, epoch within phase)`` of global epoch ``epoch``."""
  for i, p in enumerate(phases):
    if epoch < p.epochs:
      return i, epoch
    epoch -= p.epochs
  raise IndexError(epoch)


def restore_state(mngr, step: int, init: TrainState, phases: list[Phase], method: methods.Method,
                  config) -> TrainState:
  """The state saved after ``step`` train steps, in the structure it was
  saved with: ``init`` moved to the checkpoint's phase (finetune: the
  method's fixed scheme) and to the per-layer precisions it recorded (BSQ
  planes, MSQ bits), then filled from the checkpoint."""
  return restore_state_and_meta(mngr, step, init, phases, method, config)[0]


def restore_state_and_meta(mngr, step: int, init: TrainState, phases: list[Phase], method: methods.Method,
                           config) -> tuple[TrainState, dict]:
  """``restore_state`` and the checkpoint's ``meta``."""

  def template(meta):
    phase = phases[meta["phase_index"]]
    t = start_finetune(init, phase, method) if phase.name == "finetune" else init
    params = method.restructure(t.params, meta.get("structure", {}))
    return t.replace(params=params, opt_state=phase.tx.init(params))

  return checkpoint.restore(mngr, step, template, config)


def restore_latest(mngr, init: TrainState, phases: list[Phase], method: methods.Method, config):
  """``(state, meta, step)`` of the latest checkpoint (``(init, {}, 0)`` if
  none). A corrupt one (checksum mismatch) is refused, unless
  ``config.checkpoint_fallback``: then it is moved to ``corrupt_checkpoints/``
  and the newest earlier intact one is restored."""
  while True:
    step = checkpoint.latest_step(mngr) or 0
    if not step:
      return init, {}, 0
    try:
      state, meta = restore_state_and_meta(mngr, step, init, phases, method, config)
      return state, meta, step
    except checkpoint.ChecksumError as e:
      if not config.get("checkpoint_fallback", False):
        raise
      moved = checkpoint.set_aside(mngr, step)
      logging.warning("%s Falling back (checkpoint_fallback): moved it to %s.", str(e).split(" Nothing")[0], moved)


class PreemptionGuard:
  """Records SIGTERM instead of dying, so the loop can save the current step
  and exit cleanly (a preempted TPU VM or a SLURM job gets SIGTERM first).

  On several processes the hosts must stop at the same step: there JAX's
  preemption sync point (``mngr.reached_preemption``, armed by
  ``jax.distributed.initialize``) decides instead of the local flag.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint after this step.")
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, mngr, global_step: int) -> bool:
    if jax.process_count() > 1:
      return bool(mngr.reached_preemption(global_step))
    return self.requested


class _EpochSums:
  """Running sums of the epoch's per-step train metrics, added in step order
  in float64 on the host, so that the mean over an epoch resumed mid-way
  (the sums carried in the checkpoint's ``meta``) equals the uninterrupted one."""

  def __init__(self, sums: dict[str, float] | None = None, steps: int = 0):
    self.sums = dict(sums or {})
    self.steps = int(steps)

  @classmethod
  def from_meta(cls, meta: dict) -> "_EpochSums":
    return cls(meta.get("train_sums"), meta.get("train_steps", 0))

  def to_meta(self) -> dict:
    return {"train_sums": dict(self.sums), "train_steps": self.steps}

  def add(self, values: dict[str, np.ndarray]) -> None:
    n = 0
    for k, v in values.items():
      total = self.sums.get(k, 0.0)
      for x in np.asarray(v, np.float64).reshape(-1):
        total += float(x)
      self.sums[k] = total
      n = np.size(v)
    self.steps += n

  def means(self) -> dict[str, float]:
    return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def _pulled(per_step: list[dict[str, jax.Array]], first_step: int, epoch: int, phase: Phase,
            mngr, saved_step: int) -> dict[str, np.ndarray]:
  """The metrics of ``per_step`` on the host (one transfer), ``{name: [steps]}``,
  after ``_check_finite``."""
  if not per_step:
    return {}
  values = jax.device_get({k: jnp.stack([m[k] for m in per_step]) for k in per_step[0]})
  _check_finite(values["loss"], first_step, epoch, phase, mngr, saved_step)
  return values


def _check_finite(losses, first_step: int, epoch: int, phase: Phase, mngr, saved_step: int) -> None:
  """Raise ``NonFiniteLossError`` naming the first step of ``losses``
  (global steps ``first_step, first_step + 1, ...``) whose loss is NaN/Inf."""
  losses = np.asarray(losses)
  if losses.size == 0:
    return
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size == 0:
    return
  i = int(bad[0])
  raise NonFiniteLossError(
      f"The training loss became {losses[i]} at step {first_step + i} (epoch {epoch + 1}, {phase.name}"
      " phase). Training stopped; "
      + (f"the last good checkpoint (step {saved_step}) in {mngr.directory} is kept."
         if saved_step else "no checkpoint had been saved yet.")
      + " Lower learning_rate or the method's penalty strength (reg_strength, bsq_alpha, msq_lambda)"
      " and rerun."
  )


def phase_epochs(config) -> list[tuple[str, int]]:
  """``(name, epochs)`` of each phase ``make_phases`` makes."""
  rounds = int(config.get("csq_rounds", 1))
  out = [(config.method if rounds == 1 else f"{config.method}_round{r + 1}",
          config.num_epochs // rounds + (r < config.num_epochs % rounds)) for r in range(rounds)]
  return out + ([("finetune", config.finetune_epochs)] if config.finetune_epochs > 0 else [])


def run_plan(config, workdir: str, ds: data.Dataset | None = None, first_epoch: int = 0, saved_step: int = 0) -> str:
  """One line saying what the run will do: method, data, budget, phases,
  where the outputs go (and where it resumes)."""
  if config.method == "fp":
    budget_text = "float weights (no quantization)"
  elif config.method in SEARCH_METHODS:
    budget_text = f"mixed precision searched for an average of {config.target_bits:g} bits ({config.n_bits} bit planes)"
  else:
    budget_text = f"every quantized layer at {uniform_bits(config)} bits"
  phases = phase_epochs(config)
  steps = " + ".join(f"{n} {name} epoch{'s' if n != 1 else ''}" for name, n in phases)
  tail = ", then BN recalibration" if config.bn_recalibration_epochs > 0 else ""
  total = sum(n for _, n in phases)
  resume = ("" if not saved_step else
            f" Resuming after step {saved_step} (epoch {first_epoch + 1} of {total})." if first_epoch < total else
            f" Its training finished (step {saved_step}): only the final evaluation and export run again.")
  data_text = f"{ds.name} ({config.model}, {ds.num_train} training images)" if ds else f"{config.dataset} ({config.model})"
  return (f"csq_jax: {config.method} on {data_text}, {budget_text}:"
          f" {steps}{tail}, evaluation of the {'float' if config.method == 'fp' else 'exactly quantized'} model"
          f" and export. Outputs in {workdir}"
          f" (summary.json, model.csqx, metrics.jsonl).{resume}")


def epoch_line(epoch: int, total: int, metrics: dict[str, Any], config) -> str:
  """The terminal line of an epoch: the task loss and the method's penalty
  apart (CSQ's budget term is negative while the model is under budget), test
  accuracy of the hard-quantized and of the soft model, and the precision."""
  m = metrics
  parts = [f"epoch {epoch}/{total} {m['phase']}:", f"task loss {m['train_ce']:.4f}"]
  if m["phase"] != "finetune" and config.method in SEARCH_METHODS:
    parts.append(f"penalty {m['train_penalty']:+.4f}")
  parts.append(f"train acc {100 * m['train_accuracy']:.1f}%")
  if "test_accuracy" in m:
    test = f"test acc hard {100 * m['test_accuracy']:.1f}%"
    if "test_accuracy_soft" in m:
      test += f" soft {100 * m['test_accuracy_soft']:.1f}%"
    parts.append(test)
  if config.method != "fp":
    parts.append(f"avg bits {m['avg_bits']:.3f}" + (f" (target {config.target_bits:g})"
                                                      if config.method in SEARCH_METHODS else ""))
    parts.append(f"compression {m['compression']:.2f}x" if "compression" in m
                 else "every bit pruned for now (the search regrows them)")
    if config.method not in ("ste",):
      parts.append(f"beta {m['beta']:.3g}")
  return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def _peak_memory() -> dict[str, float]:
  """Peak host RSS of this process and, where the backend reports it, peak
  accelerator memory, in MiB."""
  out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run the configured experiment in ``workdir``, resuming from its latest
  checkpoint, and return the summary (also written to ``workdir/summary.json``)."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  ds = data.load_dataset(config)
  spe = data.steps_per_epoch(ds, config.batch_size)
  if spe == 0:
    raise data.DataError(f"{ds.name}: batch_size {config.batch_size} exceeds the {ds.num_train} training examples.")
  method = methods.get(config)
  phases = make_phases(config, spe)
  total_epochs = sum(p.epochs for p in phases)
  model = create_model(config, ds.num_classes, ds.image_shape)
  mesh = sharding.make_mesh(config.get("mesh", sharding.DEFAULT_MESH))
  state, rules_report = init_state(config, model, ds.image_shape, phases[0], jax.random.key(config.seed))
  check_rules_quantize(config, rules_report)
  state = sharding.place(state, sharding.state_sharding(mesh, state))  # also the template a restore fills
  identity = {**checkpoint.run_identity(config), "config": checkpoint.config_fields(config)}

  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  chief = distributed.is_chief()  # only process 0 writes metrics, the summary and plots
  # checkpoints are numbered by global train step; a refused one stops here, before anything is written
  state, saved_meta, saved = restore_latest(mngr, state, phases, method, config)
  if saved:
    logging.info("Resumed from %s after step %d.", mngr.directory, saved)
  first_epoch, resume_batch = divmod(saved, spe)
  writer = (metric_writers.MetricWriter(workdir, tensorboard=config.tensorboard, echo=False) if chief
            else metric_writers.NullWriter())
  writer.truncate(first_epoch)
  if chief:
    print(run_plan(config, workdir, ds, first_epoch, saved), flush=True)
  # Running sums of this epoch's train metrics (carried in mid-epoch checkpoints).
  sums = _EpochSums.from_meta(saved_meta) if resume_batch else _EpochSums()

  def save(global_step: int):
    meta = {**identity, "step": global_step, "epoch": global_step / spe, "phase_index": pi,
            "structure": method.structure(state.params),
            **(sums.to_meta() if global_step % spe else _EpochSums().to_meta())}
    checkpoint.save(mngr, global_step, state, meta)

  eval_hard = make_eval_step(model, hard=True, mesh=mesh)
  eval_soft = make_eval_step(model, hard=False, mesh=mesh)
  steps = [make_train_step(model, p, method, mesh) for p in phases]
  check_every = max(int(config.get("check_finite_every_steps", 100)), 1)
  rounds = int(config.get("csq_rounds", 1))
  save_every = int(config.get("checkpoint_every_steps", 0))
  epoch_times = []
  with PreemptionGuard() as guard:
    for epoch in range(first_epoch, total_epochs):
      pi, pe = _phase_of(epoch, phases)
      phase = phases[pi]
      start = resume_batch if epoch == first_epoch else 0
      if pi > 0 and pe == 0 and start == 0:
        if phase.name == "finetune":
          state = start_finetune(state, phase, method)
        else:
          state = start_round(state, phase, method, checkpoint.load_rewind(workdir, state), config)
      if rounds > 1 and epoch == config.csq_rewind_epoch and start == 0:  # the early weights later rounds rewind to
        checkpoint.save_rewind(workdir, state)
      t0 = time.perf_counter()
      pending, done = [], 0  # metrics of steps not yet pulled to the host; steps run here
      if start == 0:
        sums = _EpochSums()
      first_step = epoch * spe + start + 1  # global step number of this process's first step here
      batches = data.to_iterator(
          data.train_batches(ds, config.batch_size, config.seed, epoch, start=start, **process_rows()),
          config.get("data_workers", 0), config.get("prefetch_batches", 2))
      with _progress(spe, f"{phase.name} epoch {epoch + 1}/{total_epochs}", config.progress and chief) as bar:
        bar.update(start)
        for batch in batches:
          state, m = steps[pi](state, batch)
          pending.append(m)
          done += 1
          bar.update(1)
          global_step = first_step + done - 1
          stop = guard.should_stop(mngr, global_step)
          periodic = save_every > 0 and global_step % save_every == 0 and global_step % spe != 0
          if stop or periodic or len(pending) >= check_every:
            sums.add(_pulled(pending, first_step + done - len(pending), epoch, phase, mngr, saved))
            pending = []
          if stop or periodic:
            save(global_step)
            saved = global_step
          if stop:
            raise Preempted(
                f"Preempted (SIGTERM) at step {global_step} (epoch {epoch + 1}); the checkpoint of"
                f" that step is saved in {mngr.directory}. Rerun the same command to resume.")
      sums.add(_pulled(pending, first_step + done - len(pending), epoch, phase, mngr, saved))
      train = sums.means()  # over every step of the epoch, those before a resume included
      epoch_time = time.perf_counter() - t0
      epoch_times.append(epoch_time)
      metrics = {f"train_{k}": v for k, v in train.items()}
      if phase.penalty:  # the method's between-epoch change (BSQ re-quantization, MSQ pruning)
        ctx = methods.AdjustContext(
            epoch=pe + 1, epochs=phase.epochs, model=model, batch_stats=state.batch_stats,
            batches=lambda: data.train_batches(ds, config.batch_size, config.seed + 2, epoch),
            key=jax.random.fold_in(jax.random.key(config.seed + 3), epoch),
        )
        whole = sharding.replicate(state.params, mesh)  # host code reads whole arrays (fsdp)
        params, info = method.adjust(whole, ctx)
        if params is not whole:
          state = state.replace(params=params, opt_state=carry_opt_state(phase.tx, state.opt_state, params))
          state = sharding.place(state, sharding.state_sharding(mesh, state))  # saved below: global arrays
        metrics.update({f"adjust_{k}": v for k, v in info.items()})
      if (epoch + 1) % config.eval_every == 0 or epoch + 1 == total_epochs:
        metrics["test_accuracy"], metrics["test_loss"] = evaluate(eval_hard, state, ds, config.eval_batch_size)
        if config.eval_soft:  # the model as trained, gates at the current temperature
          beta = phase.beta(state.step)
          metrics["test_accuracy_soft"], _ = evaluate(eval_soft, state, ds, config.eval_batch_size, beta)
      size_bits = float(budget.model_size_bits(state.params))
      metrics.update(
          phase=phase.name, beta=float(phase.beta(state.step)),
          avg_bits=float(budget.average_bits(state.params, "params")),
          model_size_bits=size_bits,
          epoch_time_s=epoch_time,
      )
      if size_bits > 0 or not budget.layer_sizes(state.params):  # no compression of a model with no bit left
        metrics["compression"] = float(budget.compression(state.params))
      writer.write(epoch + 1, metrics)
      if chief:
        _echo(epoch_line(epoch + 1, total_epochs, metrics, config))
      save((epoch + 1) * spe)
      saved = (epoch + 1) * spe
  writer.close()

  state = sharding.replicate(state, mesh)  # host code below reads whole arrays (fsdp)
  state = state.replace(params=method.finalize(state.params))
  accuracy_before, _ = evaluate(eval_hard, state, ds, config.eval_batch_size)
  state = recalibrate_batch_norm(model, state, ds, config, mesh)
  accuracy, loss = evaluate(eval_hard, state, ds, config.eval_batch_size)
  summary = report.make_summary(config, ds, model, state, accuracy, loss, rules_report)
  summary["test_accuracy_before_bn_recalibration"] = float(accuracy_before)
  summary["trainable_params"] = methods.trainable_params(state.params)
  # Median epoch time of this process (the first epoch includes compilation).
  summary["epoch_time_s"] = statistics.median(epoch_times[1:] or epoch_times) if epoch_times else None
  summary.update(_peak_memory())
  # The exact integer model (every process gathers, process 0 writes).
  summary.update(export.export_model(os.path.join(workdir, export.FILENAME), state.params, state.batch_stats,
                                     export.run_meta(config, ds.num_classes, ds.image_shape, accuracy)))
  if chief:
    report.write_outputs(workdir, summary)
  mngr.close()
  return summary
