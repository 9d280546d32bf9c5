"""Multi-host start-up: ``jax.distributed.initialize`` when the config or the
environment asks for it, a no-op single-process run otherwise.

``config.distributed.init`` chooses (see configs/default.py):

* ``"env"`` (default): initialize when this process was started as one of
  several: ``CSQ_COORDINATOR`` (``host:port`` of process 0),
  ``CSQ_NUM_PROCESSES`` and ``CSQ_PROCESS_ID`` (set by ``launch/local.py``),
  or JAX's own ``JAX_COORDINATOR_ADDRESS`` (the rest then detected by JAX).
  Explicit ``config.distributed.coordinator`` / ``num_processes`` /
  ``process_id`` take precedence over the environment.
* ``"auto"``: always initialize, letting JAX detect the cluster (Cloud TPU
  pods, SLURM with one process per GPU, Open MPI, Kubernetes);
  ``launch/tpu_pod.sh`` and ``launch/slurm.sbatch`` use it.
* ``"off"``: never (a single process, whatever the environment says).

It must run before anything touches a JAX device; ``csq_jax.main`` calls it
first. On CPU, cross-process collectives go through gloo.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

ENV_COORDINATOR = "CSQ_COORDINATOR"
ENV_NUM_PROCESSES = "CSQ_NUM_PROCESSES"
ENV_PROCESS_ID = "CSQ_PROCESS_ID"
MODES = ("env", "auto", "off")


class DistributedError(ValueError):
  """An inconsistent multi-host setting; the message says what to set."""


def _int(value, name: str) -> int | None:
  if value in (None, "", -1):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer.") from None


def init_kwargs(config, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Keyword arguments for ``jax.distributed.initialize``, or ``None`` for a
  single-process run (see the module docstring for the rules)."""
  environ = os.environ if environ is None else environ
  d = config.get("distributed") or {}
  mode = d.get("init", "env")
  if mode not in MODES:
    raise DistributedError(f"distributed.init={mode!r}; expected one of {MODES}.")
  if mode == "off":
    return None
  coordinator = d.get("coordinator") or environ.get(ENV_COORDINATOR) or None
  num = _int(d.get("num_processes") or environ.get(ENV_NUM_PROCESSES), "num_processes")  # 0: unset
  pid = d.get("process_id", -1)  # -1: unset (0 is process 0)
  pid = _int(environ.get(ENV_PROCESS_ID) if pid in (None, -1) else pid, "process_id")
  if coordinator:
    if num is None or pid is None:
      raise DistributedError(
          f"Coordinator {coordinator} given without the number of processes and this process's id: set"
          f" {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or distributed.num_processes and distributed.process_id).")
    if not 0 <= pid < num:
      raise DistributedError(f"process id {pid} is not in [0, {num}); ids run from 0 to num_processes - 1.")
    return dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
  if mode == "auto" or environ.get("JAX_COORDINATOR_ADDRESS"):
    # JAX fills in what is unset from the cluster (TPU metadata, SLURM, MPI).
    return {k: v for k, v in (("num_processes", num), ("process_id", pid)) if v is not None}
  return None


def maybe_initialize(config, environ: Mapping[str, str] | None = None) -> bool:
  """Call ``jax.distributed.initialize`` if ``config``/the environment ask for
  it (and it has not been called yet); returns whether this is a
  multi-process run."""
  kwargs = init_kwargs(config, environ)
  if kwargs is None:
    return jax.distributed.is_initialized()
  if not jax.distributed.is_initialized():
    # CPU processes exchange collectives over gloo (the default in current
    # JAX; set explicitly so an older default of "none" cannot hang a run).
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
  return True


def is_chief() -> bool:
  """Process 0, the one that writes metrics, the summary and plots."""
  return jax.process_index() == 0
