"""Orbax ``CheckpointManager`` wiring: one checkpoint per epoch, resume, and
refusal of checkpoints that belong to another run.

Checkpoints are numbered by global train step (one at the end of every
epoch, one every ``checkpoint_every_steps``, and one when SIGTERM arrives), so
a run resumes mid-epoch. Each holds the train state and a JSON ``meta`` item
(the run's config, step, epoch, phase, quantizer structure, the running sums
of the epoch's train metrics), and a ``checksums.json`` file with the SHA-256
of every file of the step. Restoring verifies the checksums (a garbled file of
unchanged size is refused, naming the step) and checks the config in ``meta``
against the current one (every field that changes the result,
``config_fields``), so that a workdir of another run is refused with the
differing fields instead of being silently continued or relabelled. Saving is
synchronous: the train step donates its input buffers, and a background save
must not read buffers that the next step reuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from csq_jax import cli, report

# Config fields that must agree between a checkpoint and the run resuming it
# (checkpoints written before the whole config was stored are checked on these).
IDENTITY_KEYS = ("model", "method", "dataset", "n_bits")
# Config fields that never change a run's result: they may differ on resume.
BOOKKEEPING_FIELDS = report.BOOKKEEPING_FIELDS
CHECKSUM_FILE = "checksums.json"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used by this run; the message says what to do."""


class ChecksumError(CheckpointError):
  """A checkpoint whose files do not match the checksums written with it."""


def run_identity(config) -> dict[str, Any]:
  return {k: config[k] for k in IDENTITY_KEYS}


def config_fields(config) -> dict[str, Any]:
  """The run's config as ``{dotted field: JSON value}``, bookkeeping fields
  (``BOOKKEEPING_FIELDS``: progress bars, logging, evaluation cadence, data
  workers, devices) left out: every field that changes the result."""
  values = cli.flat_fields(json.loads(config.to_json_best_effort()))
  return {k: v for k, v in values.items() if k.split(".")[0] not in BOOKKEEPING_FIELDS}


def _stored_fields(stored: dict[str, Any]) -> dict[str, Any]:
  """A stored config's dotted fields; a run saved before the methods' config
  sections has its flat knobs renamed (``bsq_alpha`` -> ``bsq.alpha``), so
  it resumes under the same values."""
  return {report.LEGACY_FIELDS.get(k, k): v for k, v in cli.flat_fields(stored).items()}


def config_differences(stored: dict[str, Any], current: dict[str, Any], method: str | None = None) -> list[str]:
  """Fields (dotted) whose values differ between two ``config_fields`` dicts
  (``stored`` may be a whole JSON config), skipping bookkeeping fields and
  fields that ``method`` ignores (another method's knobs, FP's target)."""
  from csq_jax import methods  # noqa: PLC0415

  ignores = lambda f: False  # noqa: E731
  if method and methods.is_known(method):
    try:
      cls = methods.resolve(method)
      ignores = lambda f: report.method_ignores(f, cls.sections(), cls.quantizes)  # noqa: E731
    except methods.UnknownMethodError:
      pass
  stored = {k: v for k, v in _stored_fields(stored).items() if k.split(".")[0] not in BOOKKEEPING_FIELDS}
  current = {k: v for k, v in cli.flat_fields(current).items() if k.split(".")[0] not in BOOKKEEPING_FIELDS}
  fields = list(dict.fromkeys([*current, *stored]))
  return [f for f in fields if stored.get(f, "<absent>") != current.get(f, "<absent>")
          and not ignores(f)]


def describe_differences(stored: dict[str, Any], current: dict[str, Any], fields: list[str]) -> str:
  """``"target_bits: 3.0 (stored) vs 2.0 (now), ..."``."""
  stored, current = _stored_fields(stored), cli.flat_fields(current)

  def show(d, f):
    return json.dumps(d[f]) if f in d else "absent"

  return ", ".join(f"{f}: {show(stored, f)} (stored) vs {show(current, f)} (now)" for f in fields)


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _file_digests(directory: str) -> dict[str, str]:
  """SHA-256 of every file below ``directory`` (relative paths), the checksum file excepted."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel in (CHECKSUM_FILE, CHECKSUM_FILE + ".tmp"):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def write_checksums(mngr: ocp.CheckpointManager, step: int) -> None:
  """Record the SHA-256 of every file of checkpoint ``step`` (process 0; written atomically)."""
  if jax.process_index() != 0:
    return
  directory = _step_dir(mngr, step)
  path = os.path.join(directory, CHECKSUM_FILE)
  digests = _file_digests(directory)
  with open(path + ".tmp", "w") as f:
    json.dump(digests, f, indent=0, sort_keys=True)
  os.replace(path + ".tmp", path)


def verify_checksums(mngr: ocp.CheckpointManager, step: int) -> None:
  """Raise ``ChecksumError`` when a file of checkpoint ``step`` is missing or
  its content differs from the checksum saved with it. A checkpoint without
  checksums (written before they were, or killed between the save and the
  checksum) is accepted with a warning."""
  directory = _step_dir(mngr, step)
  path = os.path.join(directory, CHECKSUM_FILE)
  if not os.path.exists(path):
    logging.warning("Checkpoint %d in %s has no %s: its content cannot be verified.", step, directory,
                    CHECKSUM_FILE)
    return
  try:
    with open(path) as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    expected = {CHECKSUM_FILE: f"unreadable ({e})"}
  found = _file_digests(directory)
  bad = sorted(k for k, v in expected.items() if found.get(k) != v)
  if bad:
    raise ChecksumError(
        f"Checkpoint {step} in {mngr.directory} is corrupt: {len(bad)} file(s) differ from the checksums saved"
        f" with it ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). Nothing was overwritten. Rerun with"
        " --config.checkpoint_fallback=True to resume from the newest earlier intact checkpoint (the corrupt one"
        " is moved to corrupt_checkpoints/), or use a new --workdir."
    )


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Move checkpoint ``step`` to ``<workdir>/corrupt_checkpoints/<step>``
  (kept for inspection, out of the manager's sight); returns the new path."""
  src = _step_dir(mngr, step)
  dst_dir = os.path.join(os.path.dirname(str(mngr.directory)), "corrupt_checkpoints")
  os.makedirs(dst_dir, exist_ok=True)
  dst = os.path.join(dst_dir, str(step))
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = os.path.join(dst_dir, f"{step}.{n}")
  os.replace(src, dst)
  mngr.reload()
  return dst


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
  write_checksums(mngr, step)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, template: Any, config,
            whole_config: bool = True) -> tuple[Any, dict]:
  """Restore the state saved after ``step`` train steps into ``template``'s structure.

  ``template`` is a state pytree, or ``template(meta) -> state`` when the
  structure depends on what the checkpoint recorded (precisions changed by
  BSQ re-quantization or MSQ pruning, ``meta["structure"]``). With
  ``whole_config`` every result-changing field of the config must equal the
  checkpoint's (but those listed in ``config.allow_resume_changes``); else only
  ``IDENTITY_KEYS``.

  Raises:
    ChecksumError: a file of the checkpoint differs from its checksum.
    CheckpointError: the checkpoint belongs to another run (config), or is
      unreadable (corrupt, truncated, from an incompatible version).
  """
  directory = mngr.directory
  verify_checksums(mngr, step)
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(
        f"Checkpoint {step} in {directory} is unreadable ({type(e).__name__}: {e}). Delete that"
        " step's folder to resume from an earlier one, or use a new --workdir."
    ) from e
  if whole_config and "config" in meta:
    check_same_config(meta["config"], config, f"The checkpoints in {directory}")
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


def allowed_changes(config) -> list[str]:
  """The fields of ``config.allow_resume_changes`` (comma-separated)."""
  return [f.strip() for f in str(config.get("allow_resume_changes", "") or "").split(",") if f.strip()]


def check_same_config(stored: dict[str, Any], config, what: str) -> None:
  """Raise ``CheckpointError`` listing the fields (but bookkeeping, ignored
  and ``allow_resume_changes`` ones) where ``config`` differs from ``stored``."""
  current = config_fields(config)
  allowed = allowed_changes(config)
  diff = [f for f in config_differences(stored, current, config.method)
          if f not in allowed and f.split(".")[0] not in allowed]
  if diff:
    raise CheckpointError(
        f"{what} belong to another run: the config differs in {describe_differences(stored, current, diff)}."
        " Nothing was overwritten. Start a new run with a new --workdir, or resume this one deliberately with"
        f" --config.allow_resume_changes={','.join(diff)}."
    )


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
  state, _ = restore(mngr, step, template, _with(config, method="fp", n_bits=meta.get("n_bits")),
                     whole_config=False)
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
