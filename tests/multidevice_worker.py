"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the pytest process
itself has one device).

``steps OUT MESH...``: a few train steps and one eval step of the tiny default
config on one device and on each mesh (``data=8``, ``data=4,fsdp=2``), saved
to OUT.npz: per-step losses, eval sums, final params and momentum, and the
shard shapes of a bit-plane leaf and of its momentum.
``hlo``: prints ``HLO {json}``, the collective bytes of the compiled FP and
CSQ train steps on ``data=8`` and ``data=4,fsdp=2``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import load_config  # noqa: E402
from csq_jax import data, methods, sharding, train  # noqa: E402

STEPS = 4


def parse_mesh(spec: str):
  return tuple((name, int(size)) for name, size in (item.split("=") for item in spec.split(",")))


def setup(method="csq"):
  c = load_config("default")
  c.method = method
  ds = data.load_dataset(c)
  phases = train.make_phases(c, data.steps_per_epoch(ds, c.batch_size))
  model = train.create_model(c, ds.num_classes)
  return c, ds, phases, model


def run_steps(mesh):
  c, ds, phases, model = setup()
  state, _ = train.init_state(c, model, ds.image_shape, phases[0], jax.random.key(0))
  step = train.make_train_step(model, phases[0], methods.get(c), mesh)
  losses = []
  for _, batch in zip(range(STEPS), data.train_batches(ds, c.batch_size, c.seed, 0)):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  eval_step = train.make_eval_step(model, hard=True, mesh=mesh)
  evals = train.evaluate(eval_step, state, ds, c.eval_batch_size)
  conv1 = state.params["conv1"]["kernel"]
  momentum = state.opt_state.inner_states["weights"].inner_state[1][0].trace["conv1"]["kernel"]
  out = {"losses": np.asarray(losses), "eval": np.asarray(evals),
         "plane_shard": np.asarray(conv1.pos_logits.addressable_shards[0].data.shape),
         "momentum_shard": np.asarray(momentum.pos_logits.addressable_shards[0].data.shape),
         "mask_shard": np.asarray(conv1.mask_logits.addressable_shards[0].data.shape)}
  for i, leaf in enumerate(jax.tree_util.tree_leaves((state.params, state.opt_state, state.batch_stats))):
    out[f"leaf{i}"] = np.asarray(leaf)
  return out


def hlo_bytes(method, mesh):
  c, ds, phases, model = setup(method)
  state, _ = train.init_state(c, model, ds.image_shape, phases[0], jax.random.key(0))
  step = train.make_train_step(model, phases[0], methods.get(c), mesh)
  batch = next(iter(data.train_batches(ds, c.batch_size, c.seed, 0)))
  return sharding.collective_bytes(step.lower(state, batch).compile().as_text())


def main():
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  if sys.argv[1] == "steps":
    results = {"single": run_steps(sharding.make_mesh((("data", 1),), devices=jax.devices()[:1]))}
    for spec in sys.argv[3:]:
      results[spec] = run_steps(sharding.make_mesh(parse_mesh(spec)))
    np.savez(sys.argv[2], **{f"{k}/{n}": v for k, r in results.items() for n, v in r.items()})
  else:
    out = {f"{method} {spec}": hlo_bytes(method, sharding.make_mesh(parse_mesh(spec)))
           for spec in ("data=8", "data=4,fsdp=2") for method in ("fp", "csq")}
    print("HLO " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
