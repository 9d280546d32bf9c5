"""Training: one loop for every method.

The loop is Algorithm 1 of CSQ, with the method's hooks (``methods/base.py``) at
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
``model.apply``. The state and phases live in ``train_state.py``, the jitted
steps in ``train_steps.py``, the config checks in ``train_checks.py``; this
module is the epoch loop, its checkpoints and its terminal output, and it
names no method: it reads the method's attributes and calls its hooks.
"""

from __future__ import annotations

import os
import resource
import signal
import statistics
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from csq_jax import budget, checkpoint, data, distributed, export, methods, metric_writers, sharding, summary
from csq_jax import transform
# The loop's building blocks, re-exported: state and phases, the jitted steps, the config checks.
from csq_jax.train_checks import ConfigError, check_rules_quantize, validate_config  # noqa: F401
from csq_jax.train_state import (  # noqa: F401
    COMPUTE_DTYPES, OPTIMIZERS, Phase, TrainState, carry_opt_state, create_model, init_opt_state, init_state,
    lr_schedule, make_optimizer, make_phases, phase_epochs, start_finetune, start_round)
from csq_jax.train_steps import (  # noqa: F401
    cross_entropy, device_batch, evaluate, make_eval_step, make_train_step, process_rows, recalibrate_batch_norm)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


class Preempted(RuntimeError):
  """SIGTERM (preemption) arrived: a checkpoint of the current step was saved;
  rerunning the same command resumes from it."""


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


def restore_state(mngr, step: int, init: TrainState, phases: list[Phase], method,
                  config) -> TrainState:
  """The state saved after ``step`` train steps, in the structure it was
  saved with: ``init`` moved to the checkpoint's phase (finetune: the
  method's fixed scheme) and to the per-layer precisions it recorded (BSQ
  planes, MSQ bits), then filled from the checkpoint."""
  return restore_state_and_meta(mngr, step, init, phases, method, config)[0]


def restore_state_and_meta(mngr, step: int, init: TrainState, phases: list[Phase], method,
                           config) -> tuple[TrainState, dict]:
  """``restore_state`` and the checkpoint's ``meta``."""

  def template(meta):
    phase = phases[meta["phase_index"]]
    t = start_finetune(init, phase, method) if phase.name == "finetune" else init
    params = method.restructure(t.params, meta.get("structure", {}))
    return t.replace(params=params, opt_state=init_opt_state(phase.tx, params))

  return checkpoint.restore(mngr, step, template, config)


def restore_latest(mngr, init: TrainState, phases: list[Phase], method, config):
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
      + " Lower learning_rate or the strength of the method's penalty (in its config section, e.g."
      " --config.<method>.reg_strength) and rerun."
  )


def run_plan(config, workdir: str, ds: data.Dataset | None = None, first_epoch: int = 0, saved_step: int = 0) -> str:
  """One line saying what the run will do: method, data, budget, phases,
  where the outputs go (and where it resumes)."""
  method = methods.get(config)
  if not method.quantizes:
    budget_text = "float weights (no quantization)"
  elif method.searches:
    budget_text = f"mixed precision searched for an average of {config.target_bits:g} bits ({config.n_bits} bit planes)"
    if method.allowed:
      budget_text += f", each layer then at one of {'/'.join(map(str, method.allowed))} bits"
  else:
    budget_text = f"every quantized layer at {method.leaf_bits} bits"
  phases = phase_epochs(config, method)
  steps = " + ".join(f"{n} {name} epoch{'s' if n != 1 else ''}" for name, n in phases)
  tail = ", then BN recalibration" if config.bn_recalibration_epochs > 0 else ""
  total = sum(n for _, n in phases)
  resume = ("" if not saved_step else
            f" Resuming after step {saved_step} (epoch {first_epoch + 1} of {total})." if first_epoch < total else
            f" Its training finished (step {saved_step}): only the final evaluation and export run again.")
  data_text = f"{ds.name} ({config.model}, {ds.num_train} training images)" if ds else f"{config.dataset} ({config.model})"
  return (f"csq_jax: {config.method} on {data_text}, {budget_text}:"
          f" {steps}{tail}, evaluation of the {'exactly quantized' if method.quantizes else 'float'} model"
          f" and export. Outputs in {workdir}"
          f" (summary.json, model.csqx, metrics.jsonl).{resume}")


def epoch_line(epoch: int, total: int, metrics: dict[str, Any], config) -> str:
  """The terminal line of an epoch: the task loss and the method's penalty
  apart (CSQ's budget term is negative while the model is under budget), test
  accuracy of the hard-quantized and of the soft model, and the precision."""
  method = methods.resolve(config.method)
  m = metrics
  parts = [f"epoch {epoch}/{total} {m['phase']}:", f"task loss {m['train_ce']:.4f}"]
  if m["phase"] != "finetune" and method.searches:
    parts.append(f"penalty {m['train_penalty']:+.4f}")
  parts.append(f"train acc {100 * m['train_accuracy']:.1f}%")
  if "test_accuracy" in m:
    test = f"test acc hard {100 * m['test_accuracy']:.1f}%"
    if "test_accuracy_soft" in m:
      test += f" soft {100 * m['test_accuracy_soft']:.1f}%"
    parts.append(test)
  if method.quantizes:
    parts.append(f"avg bits {m['avg_bits']:.3f}")
    if method.searches:
      weighted = m.get("budget_bits", m["avg_bits"])
      kind = "cost-table" if budget.is_table(config.budget_weighting) else config.budget_weighting
      parts[-1] += (f" (target {config.target_bits:g})" if kind == "params" else
                    f", {kind}-weighted {weighted:.3f} (target {config.target_bits:g})")
    parts.append(f"compression {m['compression']:.2f}x" if "compression" in m
                 else "every bit pruned for now (the search regrows them)")
    if method.uses_temperature:
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
  phases = make_phases(config, spe, method)
  total_epochs = sum(p.epochs for p in phases)
  model = create_model(config, ds.num_classes, ds.image_shape)
  mesh = sharding.make_mesh(config.get("mesh", sharding.DEFAULT_MESH))
  state, rules_report = init_state(config, model, ds.image_shape, phases[0], jax.random.key(config.seed))
  check_rules_quantize(config, rules_report)
  if config.budget_weighting == "macs":  # the budget's per-layer costs: MACs per example
    variables = {"params": transform.materialize(state.params, 1.0, hard=True), "batch_stats": state.batch_stats}
    method.macs = budget.layer_macs(model, variables, jnp.zeros((1,) + tuple(ds.image_shape)), train=False)
  if budget.is_table(config.budget_weighting):  # the budget's per-layer costs: a measured table
    method.table = budget.load_cost_table(config.budget_weighting)
    method.budget_weights(state.params)  # a counted layer missing from the table: its error now
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
  rewind_epoch = method.rewind_epoch()  # multi-round search: the weights later rounds rewind to
  save_every = int(config.get("checkpoint_every_steps", 0))
  save_every_epochs = int(config.get("checkpoint_every_epochs", 1))
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
          state = start_round(state, phase, method, checkpoint.load_rewind(workdir, state))
      if epoch == rewind_epoch and start == 0:
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
          budget_bits=float(budget.average_bits(state.params, config.budget_weighting, method.macs, method.table)),
          model_size_bits=size_bits,
          epoch_time_s=epoch_time,
      )
      if size_bits > 0 or not budget.layer_sizes(state.params):  # no compression of a model with no bit left
        metrics["compression"] = float(budget.compression(state.params))
      writer.write(epoch + 1, metrics)
      if chief:
        _echo(epoch_line(epoch + 1, total_epochs, metrics, config))
      if (epoch + 1) % save_every_epochs == 0 or pe + 1 == phase.epochs:
        save((epoch + 1) * spe)
        saved = (epoch + 1) * spe
  writer.close()

  state = sharding.replicate(state, mesh)  # host code below reads whole arrays (fsdp)
  # allowed_bits: a no-op after a finetune (start_finetune fitted), the fit itself without one
  state = state.replace(params=method.finalize(method.fit_allowed(state.params)))
  accuracy_before, _ = evaluate(eval_hard, state, ds, config.eval_batch_size)
  state = recalibrate_batch_norm(model, state, ds, config, mesh)
  accuracy, loss = evaluate(eval_hard, state, ds, config.eval_batch_size)
  out = summary.make_summary(config, ds, model, state, accuracy, loss, rules_report, method)
  out["test_accuracy_before_bn_recalibration"] = float(accuracy_before)
  out["trainable_params"] = methods.trainable_params(state.params)
  # Median epoch time of this process (the first epoch includes compilation).
  out["epoch_time_s"] = statistics.median(epoch_times[1:] or epoch_times) if epoch_times else None
  out.update(_peak_memory())
  # The exact integer model (every process gathers, process 0 writes).
  out.update(export.export_model(os.path.join(workdir, export.FILENAME), state.params, state.batch_stats,
                                 export.run_meta(config, ds.num_classes, ds.image_shape, accuracy)))
  if chief:
    summary.write_outputs(workdir, out)
  mngr.close()
  return out
