"""Tests of csq_jax/sharding.py: mesh and partition rules (this process, one
device), and train/eval steps on 8 fake CPU devices against one device, and
the compiled program's collectives (subprocesses: tests/multidevice_worker.py)."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, load_config
from csq_jax import sharding, train

WORKER = os.path.join(ROOT, "tests", "multidevice_worker.py")


def _run_worker(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


# ----------------------------------------------------------------------------
# Rules, in this process


@pytest.mark.parametrize("axes,devices,expected", [
    ((("data", -1), ("fsdp", 1)), 8, {"data": 8, "fsdp": 1}),
    ((("data", -1), ("fsdp", 2)), 8, {"data": 4, "fsdp": 2}),
    ((("fsdp", 4), ("data", 2)), 8, {"fsdp": 4, "data": 2}),
    ((("data", 1),), 1, {"data": 1}),
])
def test_mesh_shape_resolves_the_rest(axes, devices, expected):
  assert sharding.mesh_shape(axes, devices) == expected


@pytest.mark.parametrize("axes,message", [
    ((("data", -1), ("fsdp", 3)), "not divisible by 3"),
    ((("data", 4),), "uses 4 devices but there are 8"),
    ((("data", -1), ("fsdp", -1)), "at most one -1"),
    ((("model", 8),), "expected"),
    ((("fsdp", 8),), "data required"),
])
def test_mesh_shape_errors_say_what_to_change(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(axes, 8)


def test_bad_mesh_or_batch_is_a_config_error(tiny_config):
  tiny_config.mesh = (("data", 3),)
  with pytest.raises(train.ConfigError, match="uses 3 devices but there are 1"):
    train.validate_config(tiny_config)
  tiny_config.mesh = (("data", -1),)
  train.validate_config(tiny_config)


def test_leaf_spec_shards_the_largest_kernel_axis_never_the_bit_axis():
  # Bit planes [n_bits, kh, kw, cin, cout]: the bit axis is skipped even when largest.
  assert sharding.leaf_spec((16, 3, 3, 8, 8), 2, bit_axis=True) == P(None, None, None, None, "fsdp")
  assert sharding.leaf_spec((8, 3, 3, 64, 32), 2, bit_axis=True) == P(None, None, None, "fsdp")
  # Latent or float kernels: any axis; the largest divisible one, the last among equals.
  assert sharding.leaf_spec((3, 3, 32, 32), 2) == P(None, None, None, "fsdp")
  assert sharding.leaf_spec((100, 64), 4) == P("fsdp")
  assert sharding.leaf_spec((99, 64), 2) == P(None, "fsdp")
  # Small leaves, indivisible leaves and fsdp=1: replicated.
  assert sharding.leaf_spec((64,), 2) == P()
  assert sharding.leaf_spec((8, 3, 3, 33, 33), 2, bit_axis=True) == P()
  assert sharding.leaf_spec((100, 64), 1) == P()


def test_state_rules_shard_planes_and_their_momentum_alike():
  """On the default job's real state: every plane array and its momentum are
  split along the output channels, masks/scales/BN replicated."""
  c = load_config("default")
  phase = train.make_phases(c, 10)[0]
  model = train.create_model(c, 10)
  state, _ = train.init_state(c, model, (8, 8, 1), phase, jax.random.key(0))
  bit_axis = sharding._bit_axis_paths(state)  # the quantizer's BIT_FIELDS, in params and momentum
  specs = {jax.tree_util.keystr(p): sharding.leaf_spec(np.shape(x), 2, bit_axis=p in bit_axis)
           for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  planes = {k: v for k, v in specs.items() if k.endswith(("pos_logits", "neg_logits"))}
  assert len(planes) == 2 * 8 * 2  # 8 layers, pos+neg, params + momentum
  for k, v in planes.items():
    expected = P(None, "fsdp") if "head" in k else P(None, None, None, None, "fsdp")  # head: [8, 32, 10]
    assert v == expected, k
  assert all(v == P() for k, v in specs.items() if k not in planes)


class _FakeSharding:
  """What ``process_rows`` reads of a sharding: the rows each local device holds."""

  def __init__(self, blocks):
    self.blocks = blocks

  def addressable_devices_indices_map(self, shape):
    return {i: (slice(a, b),) for i, (a, b) in enumerate(self.blocks)}


def test_process_rows_follow_the_local_devices():
  assert sharding.process_rows(32, _FakeSharding([(8, 12), (12, 16)])) == slice(8, 16)
  assert sharding.process_rows(32, _FakeSharding([(24, 28), (8, 12), (8, 12)])).tolist() == (
      list(range(8, 12)) + list(range(24, 28)))  # sorted, replicas once
  batch = {"image": np.arange(32 * 2).reshape(32, 2), "label": np.arange(32)}
  local = sharding.process_local_rows(batch, _FakeSharding([(4, 8)]))
  np.testing.assert_array_equal(local["label"], np.arange(4, 8))
  np.testing.assert_array_equal(local["image"], batch["image"][4:8])


def test_collective_bytes_reads_sync_async_and_tuple_collectives():
  hlo = "\n".join([
      "  %all-reduce.1 = (f32[16]{0}, f32[3,3,16,16]{3,2,1,0}) all-reduce(%a, %b), channel_id=1, to_apply=%add",
      "  %all-reduce.2 = bf16[10]{0} all-reduce(%c), channel_id=2",
      "  %ars = f32[8]{0} all-reduce-start(%d), channel_id=3",
      "  %ard = f32[8]{0} all-reduce-done(%ars)",
      "  %ag = ((f32[4,2]{1,0}), f32[8,2]{1,0}) all-gather-start(%e), dimensions={0}",
      "  %agd = f32[8,2]{1,0} all-gather-done(%ag)",
      "  %rs = f32[2]{0} reduce-scatter(%f), dimensions={0}",
      "  %add = f32[16]{0} add(%a, %b)",
  ])
  out = sharding.collective_bytes(hlo)
  assert out["all-reduce"] == {"count": 3, "bytes": 4 * (16 + 9 * 256) + 2 * 10 + 4 * 8}
  assert out["all-gather"] == {"count": 1, "bytes": 4 * 16}
  assert out["reduce-scatter"] == {"count": 1, "bytes": 8}


def test_place_and_shard_batch_on_one_device():
  mesh = sharding.make_mesh()
  tree = {"w": np.arange(6.0).reshape(2, 3), "s": np.float32(2)}
  placed = sharding.place(tree, sharding.replicated(mesh))
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(placed))
  assert sharding.place(placed, sharding.replicated(mesh))["w"] is placed["w"]  # already there: untouched
  assert sharding.replicate(placed, mesh) is placed
  batch = sharding.shard_batch({"x": np.arange(8)}, sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(8))


def test_the_train_step_compiles_once_from_the_placed_init_state(tiny_config, caplog):
  """The init state placed as ``train_and_evaluate`` places it and the
  step's own outputs have the same types: three steps, one compilation (the
  init state once stayed on a single-device sharding, equivalent to the
  mesh's but typed differently, and the second step compiled again)."""
  import logging

  from csq_jax import data, methods

  ds = data.load_dataset(tiny_config)
  phases = train.make_phases(tiny_config, data.steps_per_epoch(ds, tiny_config.batch_size))
  model = train.create_model(tiny_config, ds.num_classes, ds.image_shape)
  state, _ = train.init_state(tiny_config, model, ds.image_shape, phases[0], jax.random.key(0))
  mesh = sharding.make_mesh()
  state = sharding.place(state, sharding.state_sharding(mesh, state))
  step = train.make_train_step(model, phases[0], methods.get(tiny_config), mesh)
  batches = data.train_batches(ds, tiny_config.batch_size, 0, 0)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for _, batch in zip(range(3), batches):
      state, _ = step(state, batch)
  compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:300] for r in compiles]


# ----------------------------------------------------------------------------
# 8 fake devices, in a subprocess


@pytest.mark.slow
def test_data_parallel_and_fsdp_steps_match_one_device(tmp_path):
  """A few train steps and the eval of the tiny default job: data=8 and
  data=4 x fsdp=2 give the 1-device losses, eval sums and final state to
  float tolerance; fsdp halves each bit-plane leaf and its momentum along
  the output channels and replicates the masks."""
  out = str(tmp_path / "steps.npz")
  _run_worker("steps", out, "data=8", "data=4,fsdp=2")
  r = np.load(out)
  leaves = sorted(k.split("/")[1] for k in r.files if k.startswith("single/leaf"))
  assert len(leaves) > 50
  for mesh in ("data=8", "data=4,fsdp=2"):
    np.testing.assert_allclose(r[f"{mesh}/losses"], r["single/losses"], rtol=1e-5)
    np.testing.assert_allclose(r[f"{mesh}/eval"], r["single/eval"], rtol=1e-5)
    chex.assert_trees_all_close({k: r[f"{mesh}/{k}"] for k in leaves}, {k: r[f"single/{k}"] for k in leaves},
                                rtol=1e-5, atol=1e-6)
  # The steps changed the state (a comparison of two untouched inits would pass trivially).
  assert len(set(np.round(r["single/losses"], 3))) > 1
  assert r["data=8/plane_shard"].tolist() == [8, 3, 3, 32, 32]
  assert r["data=4,fsdp=2/plane_shard"].tolist() == [8, 3, 3, 32, 16]
  assert r["data=4,fsdp=2/momentum_shard"].tolist() == [8, 3, 3, 32, 16]
  assert r["data=4,fsdp=2/mask_shard"].tolist() == [8]


@pytest.mark.slow
def test_csq_all_reduces_the_materialized_weight_gradient_not_the_bit_planes():
  """From the compiled HLO of the tiny job (8 quantized layers, 16 x 56k
  plane logits): CSQ's all-reduce bytes per step are FP's (within the
  issue's 1.2x), far below the planes' size; with fsdp, CSQ gathers the
  materialized weights, not the planes (all-gather bytes within 1.2x of FP)."""
  line = next(l for l in _run_worker("hlo").splitlines() if l.startswith("HLO "))
  b = json.loads(line[4:])
  fp, csq = b["fp data=8"]["all-reduce"]["bytes"], b["csq data=8"]["all-reduce"]["bytes"]
  plane_bytes = 2 * 8 * 4 * 56_000
  assert 0 < fp and csq <= 1.2 * fp and csq < plane_bytes / 10
  assert b["csq data=8"]["all-gather"]["bytes"] == 0
  # No all-to-all: the CPU conv's batch permutation is off with several devices
  # (it crossed the batch's shards: 140 all-to-alls, 30 s compilations).
  assert b["fp data=8"]["all-to-all"]["count"] == b["csq data=8"]["all-to-all"]["count"] == 0
  fsdp_fp, fsdp_csq = b["fp data=4,fsdp=2"], b["csq data=4,fsdp=2"]
  assert 0 < fsdp_fp["all-gather"]["bytes"] and fsdp_csq["all-gather"]["bytes"] <= 1.2 * fsdp_fp["all-gather"]["bytes"]
  assert fsdp_csq["all-reduce"]["bytes"] <= 1.2 * fsdp_fp["all-reduce"]["bytes"]
