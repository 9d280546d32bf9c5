"""The jitted steps: training, evaluation and BN re-estimation, on one device
or sharded over a mesh (``sharding.py``). Method-agnostic: the method's
regularizer and ``after_update`` are called, never named.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csq_jax import data, sharding, transform
from csq_jax.models import conv
from csq_jax.train_state import Phase, TrainState


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


def _options_chooser(fn, batch_arg: int) -> Callable[..., dict | None]:
  """``args -> conv.compiler_options`` of ``fn`` called on ``args``: decided at
  the first call (images of ``args[batch_arg]``, ``fn``'s jaxpr) and kept,
  since neither a precision change nor a phase adds a grouped convolution."""
  chosen = []

  def choose(*args):
    if not chosen:
      chosen.append(conv.compiler_options(np.shape(args[batch_arg]["image"])[1:],
                                          lambda: str(jax.make_jaxpr(fn)(*args))))
    return chosen[0]

  return choose


def _jit(fn, batch_arg: int, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` compiled with ``conv.compiler_options``
  (``_options_chooser``), known at the first call; ``.lower(*args)`` as
  ``jax.jit``'s."""
  choose = _options_chooser(fn, batch_arg)
  jitted = []

  def get(args):
    if not jitted:
      jitted.append(jax.jit(fn, compiler_options=choose(*args), **jit_kwargs))
    return jitted[0]

  def call(*args):
    return get(args)(*args)

  call.lower = lambda *args: get(args).lower(*args)
  return call


def _on_mesh(fn, mesh, state_args: tuple[int, ...], batch_arg: int, outs=None, donate=()):
  """``fn`` jitted over ``mesh``: the args in ``state_args`` on their state
  sharding, the host batch at ``batch_arg`` split over the data axes, other
  args replicated; outputs replicated, or ``outs(replicated, in_shardings)``."""

  def shardings(*args):
    rep = sharding.replicated(mesh)
    ins = [sharding.state_sharding(mesh, a) if i in state_args else rep for i, a in enumerate(args)]
    ins[batch_arg] = sharding.batch_sharding(mesh)
    return tuple(ins), (rep if outs is None else outs(rep, ins))

  jitted = sharding.jit_sharded(fn, shardings, donate, _options_chooser(fn, batch_arg))

  def to_device(args):
    return args[:batch_arg] + (device_batch(args[batch_arg], mesh),) + args[batch_arg + 1:]

  def call(*args):
    return jitted(*to_device(args))

  call.lower = lambda *args: jitted.lower(*to_device(args))
  return call


def make_train_step(model, phase: Phase, method, mesh=None) -> Callable:
  """``(state, batch) -> (state, metrics)``, jitted with the state donated
  (and, on a CPU, ``conv.compiler_options``).

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
  return _jit(train_step, batch_arg=1, donate_argnums=0)


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
  return _jit(eval_step, batch_arg=2)


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
    update = _jit(update, batch_arg=2)
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
