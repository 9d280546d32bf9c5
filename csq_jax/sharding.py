"""Sharding: the device mesh, and where the batch and the train state live.

jit over a mesh, as Flax's Gemma example and big_vision do (no pmap). The mesh
comes from ``config.mesh``, a tuple of ``(axis name, size)`` with one size
``-1`` for "the rest of the devices":

* ``data``: data parallelism. The batch is split over it, the state is
  replicated, and XLA all-reduces the gradient. Under CSQ the all-reduce is on
  the gradient of the *materialized* weight (the size of the float weights),
  not on the 16 bit planes: the planes' gradients are a pointwise function of
  that gradient (``quantizers.csq._soft_weight_bwd``) and of replicated
  logits, so every device computes them after the reduction
  (``benchmarks/allreduce.py`` measures it from the compiled HLO).
* ``fsdp`` (optional): the batch is split over it too, and every large state
  leaf (bit planes, latent weights and their optimizer state; ``min_size``
  elements or more) is split along its largest axis that the axis size
  divides. Bit-plane arrays ``[n_bits, *kernel]`` are split along a kernel
  axis, never the bit axis, so the materialized weight is split the same way
  and only it is gathered for the convolution. Small leaves are replicated.

Batches are built per process with ``jax.make_array_from_process_local_data``,
so the same code runs on one device, on 8 fake CPU devices, and on a
multi-host pod.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from csq_jax import quantizers, transform

AXES = ("data", "fsdp")  # batch axes, in mesh order
DEFAULT_MESH = (("data", -1), ("fsdp", 1))
# Leaves with fewer elements stay replicated under fsdp (BN, scales, masks):
# their all-gather would cost more in latency than they save in memory.
FSDP_MIN_SIZE = 1024


def mesh_shape(axes: Sequence[Sequence[Any]], num_devices: int) -> dict[str, int]:
  """``{axis: size}`` of ``axes`` (``((name, size), ...)``, one size may be -1)
  on ``num_devices`` devices; raises ``ValueError`` saying what to change."""
  axes = tuple(tuple(a) for a in axes)
  names = [a[0] for a in axes]
  if any(len(a) != 2 for a in axes) or set(names) - set(AXES) or len(set(names)) != len(names) or "data" not in names:
    raise ValueError(f"mesh={axes}: expected ((\"data\", size), (\"fsdp\", size)) pairs with the axes {AXES}"
                     " (each at most once, data required), e.g. (('data', -1), ('fsdp', 1)).")
  sizes = [int(a[1]) for a in axes]
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"mesh={axes}: sizes must be positive, with at most one -1 (the rest of the devices).")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"mesh={axes}: {num_devices} devices are not divisible by {fixed}; choose axis sizes"
                       f" whose product divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh={axes} uses {fixed} devices but there are {num_devices}; make the sizes multiply to"
                     f" {num_devices} or set one of them to -1.")
  return dict(zip(names, sizes))


def make_mesh(axes: Sequence[Sequence[Any]] = DEFAULT_MESH, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices, axes in ``AXES`` order. Axes are
  ``Auto``: XLA propagates the shardings from the jit boundary."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(axes, len(devices))
  names = tuple(a for a in AXES if a in shape)
  return jax.make_mesh(tuple(shape[a] for a in names), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in AXES if a in mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data (and fsdp), the rest whole."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE, bit_axis: bool = False) -> P:
  """Partition spec of one state leaf (see the module docstring).

  Args:
    shape: the leaf's shape.
    fsdp: size of the fsdp axis (1: everything replicated).
    min_size: leaves with fewer elements are replicated.
    bit_axis: whether axis 0 is a bit axis (``quantizers.bit_fields``),
      which stays whole.
  """
  shape = tuple(shape)
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  first = 1 if bit_axis else 0
  axes = [a for a in range(first, len(shape)) if shape[a] % fsdp == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: (shape[a], a))  # the largest; the last among equals
  return P(*([None] * axis + ["fsdp"]))


def _bit_axis_paths(tree: Any) -> set:
  """Key paths of the fields with a bit axis, in every quantizer leaf of
  ``tree`` (parameters, and optimizer states that mirror them)."""
  paths = set()
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=transform.is_leaf)[0]:
    if transform.is_leaf(x):
      paths.update(path + (jax.tree_util.GetAttrKey(f),) for f in quantizers.bit_fields(x))
  return paths


def state_sharding(mesh: Mesh, tree: Any, min_size: int = FSDP_MIN_SIZE) -> Any:
  """``NamedSharding`` of every leaf of ``tree`` (a train state, params,
  optimizer state; arrays, tracers or ``ShapeDtypeStruct``)."""
  fsdp = mesh.shape.get("fsdp", 1)
  bit_axis = _bit_axis_paths(tree)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp, min_size, p in bit_axis)), tree)


def constrain_weights(weights: Any, params: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """Inside a jitted step: pin each materialized weight (``weights =
  transform.materialize(params, ...)``) to the fsdp sharding of the
  parameters it comes from, the planes' kernel axes. Left to itself, XLA
  all-gathers the bit planes (16x the weight) and materializes the whole
  weight on every device; pinned, each device materializes its shard and only
  the weight is gathered for the layer (and its gradient reduce-scattered).
  A no-op without an fsdp axis."""
  if mesh.shape.get("fsdp", 1) == 1:
    return weights
  specs = state_sharding(mesh, params, min_size)

  def pin(q, q_sharding, w):
    if not transform.is_leaf(q):
      return w  # a float leaf: its parameter sharding already applies
    planes = quantizers.bit_fields(q)
    if planes:
      spec = getattr(q_sharding, planes[0]).spec[1:]
    else:  # the field shaped as the kernel (a float latent)
      same = [f.name for f in dataclasses.fields(q) if np.shape(getattr(q, f.name)) == np.shape(w)]
      spec = getattr(q_sharding, same[0]).spec if same else ()
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P(*spec)))

  return jax.tree_util.tree_map(pin, params, specs, weights, is_leaf=transform.is_leaf)


def _put(x, s: jax.sharding.Sharding):
  if isinstance(x, jax.Array):
    if x.sharding == s:
      return x
    # An equivalent sharding is put too: a jitted step compiled for
    # arrays typed with the mesh would compile again for the same values on a
    # single-device sharding (the first step of every run did).
    if x.sharding.is_equivalent_to(s, x.ndim) or not x.is_fully_addressable or jax.process_count() == 1:
      return jax.device_put(x, s)
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, s, lambda index: value[index])


def place(tree: Any, shardings: Any) -> Any:
  """``tree`` with each leaf on its sharding (a pytree of shardings, or a
  prefix of one: a single sharding for every leaf). Leaves already there are
  returned as they are; a process-local value (numpy, or an array on this
  process's devices) must be the same on every process, as an init or a
  restored checkpoint is."""
  return jax.tree_util.tree_map(_put, tree, jax.tree.broadcast(shardings, tree))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated on every device of ``mesh`` (host code such as BSQ's
  re-quantization reads whole arrays); ``tree`` itself when it already is."""
  rep = replicated(mesh)
  leaves = jax.tree_util.tree_leaves(tree)
  if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(rep, x.ndim) for x in leaves):
    return tree
  return place(tree, rep)


def process_rows(global_size: int, sharding: NamedSharding) -> np.ndarray | slice:
  """The rows of a global batch of ``global_size`` that this process feeds
  to its devices under ``sharding``, in the order
  ``make_array_from_process_local_data`` expects (a slice when contiguous)."""
  blocks = sorted({(i[0].start or 0, global_size if i[0].stop is None else i[0].stop)
                   for i in sharding.addressable_devices_indices_map((global_size,)).values()})
  if all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])):
    return slice(blocks[0][0], blocks[-1][1])
  return np.concatenate([np.arange(a, b) for a, b in blocks])


def process_local_rows(batch: Any, sharding: NamedSharding) -> Any:
  """This process's part of a global host batch (every process holds the
  same global batch; with one process, all of it)."""
  n = len(jax.tree_util.tree_leaves(batch)[0])
  rows = process_rows(n, sharding)
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch)


def shard_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Global device arrays from this process's rows of the batch
  (``jax.make_array_from_process_local_data``: correct on several hosts)."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def jit_sharded(fn: Callable, shardings: Callable[..., tuple[Any, Any]],
                donate_argnums: int | tuple[int, ...] = (),
                compiler_options: Callable[..., dict | None] | None = None) -> Callable:
  """``fn`` jitted with ``in_shardings``/``out_shardings`` from
  ``shardings(*args) -> (in_shardings, out_shardings)``, one program per
  structure of the arguments (BSQ/MSQ precision changes and the finetune's
  frozen masks change it), compiled with ``compiler_options(*args)`` if
  given. Arguments not yet on their sharding are placed (``place``) first.
  ``.lower(*args)`` lowers the program ``args`` would run.
  """
  cache: dict[Any, tuple[Callable, list]] = {}

  def placed(args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((x.shape, x.dtype) if hasattr(x, "dtype") else type(x) for x in leaves))
    if key not in cache:
      ins, outs = shardings(*args)
      flat = treedef.flatten_up_to(jax.tree.broadcast(ins, args))
      cache[key] = jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=donate_argnums,
                           compiler_options=compiler_options and compiler_options(*args)), flat
    jitted, flat = cache[key]
    # The steady state (outputs of the last call fed back) is already placed.
    if not all(isinstance(x, jax.Array) and x.sharding == s for x, s in zip(leaves, flat)):
      args = jax.tree_util.tree_unflatten(treedef, [_put(x, s) for x, s in zip(leaves, flat)])
    return jitted, args

  def call(*args):
    jitted, args = placed(args)
    return jitted(*args)

  def lower(*args):
    jitted, args = placed(args)
    return jitted.lower(*args)

  call.lower = lower
  return call


# ----------------------------------------------------------------------------
# Reading the compiled program

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """``{op: {"count": ops, "bytes": result bytes}}`` of the collectives in a
  compiled HLO module (``jit(f).lower(...).compile().as_text()``): what each
  device sends through them once per call. Async pairs count once (their
  ``-start``); an async all-gather's result is the last array of its tuple."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    arrays = _ARRAY.findall(m.group(1))
    if m.group(3) and m.group(2) == "all-gather":
      arrays = arrays[-1:]
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += sum(_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                                    for t, dims in arrays)
  return out
