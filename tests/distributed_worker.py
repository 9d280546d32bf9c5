"""One process of a multi-process run, started by tests/test_distributed.py
through launch/local.py: trains the tiny default config in the workdir given
as argv[1], restores the final checkpoint and prints ``DIGEST {json}``."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import load_config  # noqa: E402
from csq_jax import distributed  # noqa: E402


def tiny_config(epochs: int):
  c = load_config("default")
  c.num_epochs = epochs
  c.finetune_epochs = 0
  c.progress = False
  c.tensorboard = False
  c.eval_soft = False
  return c


def final_params(config, workdir):
  """The last checkpoint's params, restored as the loop resumes (into the
  state's sharding on the mesh), as float64 host arrays."""
  import jax
  import numpy as np

  from csq_jax import checkpoint, data, methods, sharding, train

  ds = data.load_dataset(config)
  phases = train.make_phases(config, data.steps_per_epoch(ds, config.batch_size))
  model = train.create_model(config, ds.num_classes)
  state, _ = train.init_state(config, model, ds.image_shape, phases[0], jax.random.key(config.seed))
  mesh = sharding.make_mesh(config.mesh)
  state = sharding.place(state, sharding.state_sharding(mesh, state))
  mngr = checkpoint.manager(workdir)
  state = train.restore_state(mngr, mngr.latest_step(), state, phases, methods.get(config), config)
  mngr.close()
  state = sharding.replicate(state, mesh)
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(state.params)]


def main():
  workdir, epochs = sys.argv[1], int(sys.argv[2])
  config = tiny_config(epochs)
  multi = distributed.maybe_initialize(config)
  import jax

  from csq_jax import train

  summary = train.train_and_evaluate(config, workdir)
  params = final_params(config, workdir)
  print("DIGEST " + json.dumps({
      "multi": multi, "process": jax.process_index(), "processes": jax.process_count(),
      "devices": jax.device_count(), "test_loss": summary["test_loss"],
      "test_accuracy": summary["test_accuracy"], "avg_bits": summary["avg_bits"],
      "param_sums": [float(p.sum()) for p in params], "param_abs_sums": [float(abs(p).sum()) for p in params],
  }), flush=True)


if __name__ == "__main__":
  main()
