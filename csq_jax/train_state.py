"""Training state and phases: the state pytree, Alg. 1's phases with their
schedules and optimizers, the model and its quantized initial state.

Everything method-specific comes from the method (``csq_jax/methods``): its
leaves (``quantize_spec``), optimizer labels and groups, search rounds, and
the state changes between phases (``start_round``, ``start_finetune``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from csq_jax import gates, methods, models, pretrained, transform
from csq_jax.quantizers import activations


class TrainState(struct.PyTreeNode):
  """Everything that changes during training (checkpointed as one pytree)."""

  step: jax.Array  # step within the current phase
  params: Any  # quantizer parameters + float parameters (see transform.py)
  batch_stats: Any
  opt_state: Any


OPTIMIZERS = ("sgd", "adamw")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_optimizer(config, lr_schedule: optax.Schedule, method=None) -> optax.GradientTransformation:
  """SGD with coupled weight decay (PyTorch's SGD ``weight_decay``), or AdamW
  (``optimizer="adamw"``, decoupled decay; the transformers' recipe), for
  every leaf the method labels ``"weights"``; the method's own groups
  (``Method.optimizer_groups``, e.g. CSQ's mask logits) use SGD."""
  method = method or methods.get(config)

  def sgd(momentum, decay):
    parts = [optax.add_decayed_weights(config.weight_decay)] if decay and config.weight_decay else []
    return optax.chain(*parts, optax.sgd(lr_schedule, momentum=momentum or None))

  def weights_tx():
    if config.get("optimizer", "sgd") == "adamw":
      return optax.adamw(lr_schedule, b1=config.momentum, weight_decay=config.weight_decay)
    return sgd(config.momentum, True)

  return optax.multi_transform({"weights": weights_tx(), **method.optimizer_groups(sgd)}, method.param_labels)


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


def phase_epochs(config, method=None) -> list[tuple[str, int]]:
  """``(name, epochs)`` of each phase ``make_phases`` makes: the search
  (named after the method; in ``search_rounds`` rounds for the authors'
  multi-round recipe), then the finetune."""
  method = method or methods.get(config)
  rounds = method.search_rounds()
  out = [(config.method if rounds == 1 else f"{config.method}_round{r + 1}",
          config.num_epochs // rounds + (r < config.num_epochs % rounds)) for r in range(rounds)]
  return out + ([("finetune", config.finetune_epochs)] if config.finetune_epochs > 0 else [])


def make_phases(config, steps_per_epoch: int, method=None) -> list[Phase]:
  """Alg. 1's phases (``phase_epochs``), each with beta restarted; the
  method's penalty is on in its search phases."""
  method = method or methods.get(config)
  phases = []
  for i, (name, epochs) in enumerate(phase_epochs(config, method)):
    search = name != "finetune"
    lr, warmup, step_epochs = ((config.learning_rate, config.warmup_epochs if i == 0 else 0, config.lr_step_epochs)
                               if search else (config.finetune_learning_rate, 0, config.finetune_lr_step_epochs))
    beta0, beta_max = (config.beta0, config.beta_max) if search else (config.finetune_beta0, config.finetune_beta_max)
    lr_fn = lr_schedule(lr, epochs, steps_per_epoch, warmup, config.lr_decay, step_epochs, config.lr_step_factor)
    phases.append(Phase(name, epochs, gates.beta_schedule(epochs * steps_per_epoch, beta0, beta_max), lr_fn,
                        make_optimizer(config, lr_fn, method), search and method.searches))
  return phases


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
  run's weights), quantized by the config's rules into the method's leaves.

  The float init and the optimizer's init (``init_opt_state``) are jitted:
  run op by op, each initializer compiles once per parameter shape
  (ResNet-50: 6 s of ``truncated_normal`` compilations on a CPU). Their values
  are the same bits either way (``tests/test_train.py``). The quantizer leaves are jitted per
  kernel shape where the method allows it (``transform.quantize_params``,
  ``Method.jit_init``): not LSQ, whose step, a mean, differs in the last bit
  under jit, which would change the README's LSQ runs."""
  init_key, q_key = jax.random.split(key)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, dummy, train=False))(init_key)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if config.get("init_from"):
    float_state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, init_opt_state(phase.tx, params))
    params, batch_stats = pretrained.restore_init(config, float_state)
  qparams, report_ = transform.quantize_params(
      params, transform.rules_from_config(config.rules), methods.get(config).quantize_spec(), q_key
  )
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=qparams,
      batch_stats=batch_stats,
      opt_state=init_opt_state(phase.tx, qparams),
  )
  return state, report_


def start_round(state: TrainState, phase: Phase, method, rewind: dict) -> TrainState:
  """A later search round of a multi-round recipe: the method's merge of the
  parameters now and those rewound to ``rewind`` (``{"params",
  "batch_stats"}`` saved after ``method.rewind_epoch()`` epochs), fresh
  optimizer, beta restarted (step 0)."""
  params = method.start_round(state.params, rewind["params"])
  return TrainState(jnp.zeros((), jnp.int32), params, rewind["batch_stats"], init_opt_state(phase.tx, params))


def start_finetune(state: TrainState, phase: Phase, method) -> TrainState:
  """Alg. 1's second phase: the method fixes its scheme (CSQ freezes the bit
  selection), each searched layer moves to an allowed width (``allowed_bits``),
  fresh optimizer, beta rewound (step 0)."""
  params = method.fit_allowed(method.start_finetune(state.params))
  return TrainState(jnp.zeros((), jnp.int32), params, state.batch_stats, init_opt_state(phase.tx, params))


def init_opt_state(tx: optax.GradientTransformation, params):
  """``tx.init(params)``, jitted: op by op it compiles once per leaf shape;
  its values (zeros, a step count) are the same."""
  return jax.jit(tx.init)(params)


def carry_opt_state(tx: optax.GradientTransformation, opt_state, params):
  """Optimizer state for ``params`` after a precision change (BSQ's planes,
  MSQ's static bits): each leaf of the old state whose shape still fits is
  kept (momentum of unchanged layers survives), the others start at zero."""
  fresh = init_opt_state(tx, params)
  old = jax.tree_util.tree_leaves(opt_state)
  new, treedef = jax.tree_util.tree_flatten(fresh)
  if len(old) != len(new):
    return fresh
  return jax.tree_util.tree_unflatten(
      treedef, [o if np.shape(o) == np.shape(n) and o.dtype == n.dtype else n for o, n in zip(old, new)])
