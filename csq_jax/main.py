"""Entry point: ``python -m csq_jax.main --config=configs/default.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.target_bits=2``;
``--dry_run`` checks the flags and the config and prints what the run would
do. A run resumes from the latest checkpoint in ``DIR`` when that checkpoint
is intact (checksums) and of the same config (``checkpoint.py``). On SIGTERM (preemption) it
saves the current step and exits with status 143; rerunning resumes there.
Started as one of several processes (``launch/``), it first joins them
(``distributed.maybe_initialize``).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from csq_jax import checkpoint, cli, data, distributed, train

EXIT_PREEMPTED = 143
USER_ERRORS = (train.ConfigError, data.DataError, checkpoint.CheckpointError, train.NonFiniteLossError,
               distributed.DistributedError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the flags and the config, print what the run would do"
                             " (one line) and exit without training.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  if _DRY_RUN.value:
    try:
      train.validate_config(_CONFIG.value)
    except USER_ERRORS as e:
      sys.exit(f"csq_jax: error: {e}")
    print(train.run_plan(_CONFIG.value, _WORKDIR.value))
    return
  try:
    distributed.maybe_initialize(_CONFIG.value)  # before anything touches a device
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    # Bad input: one line that says what to do, no traceback.
    sys.exit(f"csq_jax: error: {e}")
  except train.Preempted as e:
    # 128 + SIGTERM, as if killed, so that schedulers requeue the job; the step is saved.
    print(f"csq_jax: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  brief = {k: summary[k] for k in ("method", "model", "dataset", "target_bits", "avg_bits", "compression", "test_accuracy")}
  print(json.dumps(brief))


if __name__ == "__main__":
  cli.run(main, __doc__, ["csq_jax.main", "__main__"])
