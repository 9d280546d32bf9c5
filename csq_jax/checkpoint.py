"""Orbax ``CheckpointManager`` wiring: one checkpoint per epoch, resume, and
refusal of checkpoints that belong to another run.

Checkpoints are numbered by global train step (one at the end of every
epoch, one every ``checkpoint_every_steps``, and one when SIGTERM arrives), so
a run resumes mid-epoch. Each holds the train state and a JSON ``meta`` item
(model, method, data set, bit planes, step, epoch, phase, quantizer
structure). Restoring checks ``meta`` against the
current config so that a workdir of another model or method is refused with a
clear error instead of being silently reinitialized or mis-restored. Saving is
synchronous: the train step donates its input buffers, and a background save
must not read buffers that the next step reuses.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Config fields that must agree between a checkpoint and the run resuming it.
IDENTITY_KEYS = ("model", "method", "dataset", "n_bits")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used by this run; the message says what to do."""


def run_identity(config) -> dict[str, Any]:
  return {k: config[k] for k in IDENTITY_KEYS}


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Save the state after ``step`` train steps (counted over all phases)."""
  mngr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
  )
  mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, template: Any, config) -> tuple[Any, dict]:
  """Restore the state saved after ``step`` train steps into ``template``'s structure.

  ``template`` is a state pytree, or ``template(meta) -> state`` when the
  structure depends on what the checkpoint recorded (precisions changed by
  BSQ re-quantization or MSQ pruning, ``meta["structure"]``).

  Raises:
    CheckpointError: the checkpoint belongs to another model/method/data set,
      or is unreadable (corrupt, truncated, from an incompatible version).
  """
  directory = mngr.directory
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(
        f"Checkpoint {step} in {directory} is unreadable ({type(e).__name__}: {e}). Delete that"
        " step's folder to resume from an earlier one, or use a new --workdir."
    ) from e
  expected = run_identity(config)
  found = {k: meta.get(k) for k in IDENTITY_KEYS}
  if found != expected:
    diff = {k: (found[k], expected[k]) for k in IDENTITY_KEYS if found[k] != expected[k]}
    raise CheckpointError(
        f"The workdir's checkpoints belong to another run: {diff} (checkpoint vs config)."
        " Use a new --workdir, or run with the checkpoint's settings to resume it."
    )
  if callable(template):
    try:
      template = template(meta)
    except (KeyError, ValueError, TypeError) as e:
      raise CheckpointError(
          f"Checkpoint {step} in {directory} records a quantizer structure this run cannot rebuild"
          f" ({type(e).__name__}: {e}). Use a new --workdir."
      ) from e
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
  except Exception as e:
    raise CheckpointError(
        f"Checkpoint {step} in {directory} does not fit this run's state ({type(e).__name__}: {e})."
        " It is corrupt or was written by an incompatible config; delete that step's folder"
        " or use a new --workdir."
    ) from e
  return restored, meta


def restore_float_weights(workdir: str, template: Any, config) -> tuple[Any, Any]:
  """``(params, batch_stats)`` of the latest checkpoint of a float (``fp``) run.

  ``template`` is that run's state structure (an ``fp`` init state of the same
  model). Used by ``config.init_from`` to start quantization from a trained
  float model (BSQ starts from a pretrained one).

  Raises:
    CheckpointError: no checkpoint there, not a float run of this model and
      data set, or unreadable.
  """
  mngr = manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(
        f"init_from={workdir!r} holds no checkpoint. Train the float model first"
        f" (--config.method=fp --workdir={workdir}) or clear init_from."
    )
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  wanted = {"method": "fp", "model": config.model, "dataset": config.dataset}
  found = {k: meta.get(k) for k in wanted}
  if found != wanted:
    raise CheckpointError(
        f"init_from={workdir!r} is a run of {found}, not a float run of {wanted}."
        " Point init_from at the workdir of a --config.method=fp run of this model and data set."
    )
  state, _ = restore(mngr, step, template, _with(config, method="fp", n_bits=meta.get("n_bits")))
  mngr.close()
  return state.params, state.batch_stats


def _rewind_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "rewind")


def save_rewind(workdir: str, state: Any) -> None:
  """Keep ``{"params", "batch_stats"}`` of ``state`` as the weights later
  CSQ rounds rewind to (once; a resumed run finds it on disk)."""
  path = _rewind_dir(workdir)
  if os.path.exists(path):
    return
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"params": state.params, "batch_stats": state.batch_stats})


def load_rewind(workdir: str, state: Any) -> dict[str, Any]:
  """The saved rewind weights, in the structure of ``state``."""
  path = _rewind_dir(workdir)
  template = {"params": state.params, "batch_stats": state.batch_stats}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, abstract)
  except Exception as e:
    raise CheckpointError(
        f"The rewind weights of the multi-round recipe in {path} are missing or unreadable"
        f" ({type(e).__name__}: {e}). Rerun with a new --workdir."
    ) from e


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  c.update(fields)
  return c
