"""Per-layer Hessian traces by Hutchinson's estimator, for MSQ's LSB pruning.

MSQ (Han et al.) chooses how many least significant bits to prune from each
layer by a Hessian-aware sensitivity, as in HAWQ-V2 (Dong et al. 2020):

    Omega_l = Tr(H_l) * ||W_n^(l) - W^(l)||_2,

where ``H_l`` is the diagonal block of the loss Hessian belonging to layer
``l``'s kernel ``W^(l)`` and ``W_n^(l)`` the kernel with ``n`` LSBs pruned.
This module estimates every ``Tr(H_l)`` without forming any Hessian.

Hutchinson (1989): for a random vector ``v`` with independent Rademacher
(+-1) entries, ``E[v^T A v] = Tr(A)``. Split ``v = (v_1, ..., v_L)`` by layer
(one block per selected parameter leaf) and take the block of a full
Hessian-vector product,

    v_l . (H v)_l = v_l^T H_ll v_l + sum_{m != l} v_l^T H_lm v_m.

The blocks are independent with ``E[v_l v_m^T] = 0`` for ``m != l``, so every
cross term has expectation zero and ``E[v_l . (H v)_l] = Tr(H_ll)``: *one*
Hessian-vector product per probe, over all layers at once, gives an unbiased
estimate of every layer's block trace. The price is variance, not bias:

    Var[v_l . (H v)_l] = 2 sum_{i != j in l} (H_ll)_ij^2 + sum_{m != l} ||H_lm||_F^2,

A Hessian whose blocks are diagonal gives the exact trace from every single
probe. The second sum is the cost of sharing probes: for a Hessian of
effective rank ``r`` it is about ``Tr(H_ll) (Tr(H) - Tr(H_ll)) / r``, so
a layer whose trace is a small share of the whole gets a large relative
error (in a ReLU network with eval-mode BN ``H_ll`` is the PSD Gauss-Newton
block, but the cross blocks also carry the indefinite residual term, which
is large at initialization or with wrong labels). ``layerwise=True`` probes
each layer in its own HVP instead (``L`` HVPs per probe) and leaves only the
first sum. ``TraceEstimate.stderr`` reports the sample standard error, so
callers see how many probes their model needs
(``hutchinson_trace_until_converged`` adds probes until it is small enough).

Hessian-vector products are forward-over-reverse,
``jax.jvp(jax.grad(loss), (params,), (v,))``, evaluated as
``jax.linearize(jax.grad(loss), params)`` applied to each probe: the primal
part of that pass (the loss's forward and backward pass) runs once per
compiled program, and only the tangent part once per probe (for ResNet-20 on
CPU, about one SGD train step). Probes are generated inside the compiled
program (never materialized all at once) and vmapped over the probe axis in
chunks of ``probe_batch`` HVPs, which bounds memory; a program runs
``max(1, HVPS_PER_PROGRAM // probe_batch)`` chunks behind one linearization,
and a host loop dispatches the programs (asynchronously) and fetches the
results once.

Probe ``i`` is drawn from ``jax.random.fold_in(key, i)``: results do not
depend on ``probe_batch``, and an estimate grown batch by batch equals the
one computed in one call with the same key and total probe count.

Everything here is a pure function of its arguments. Compiled programs are
cached by ``jax.jit`` keyed on the identity (or, for hashable callables,
value) of ``loss_fn``: pass the same function object to reuse a compilation,
and pass data through ``loss_args`` rather than closing over it, so that it
is an input of the program rather than a constant baked into it.

References:
  M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Comm. Statist. Simulation
    Comput. 18(3), 1989.
  Z. Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of
    Neural Networks", NeurIPS 2020.
  S. Han et al., "MSQ: Memory-Efficient Bit Sparsification Quantization".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csq_jax.transform import path_str


def default_probe_batch() -> int:
  """HVPs per vmapped chunk when ``probe_batch`` is ``None``: 1 on CPU, 16 elsewhere.

  XLA:CPU runs the vmapped HVP of a conv net slower than a loop of single
  ones (with a probe axis, the kernel-gradient convolutions of the tangent
  pass run about 2x slower per probe): ResNet-20, batch 128, 8 probes took
  20.5 s in one chunk of 8 vs 8.9 s one at a time, on 2 cores where an SGD
  train step took 1.1 s (``benchmarks/hessian_cost.py --probe-batch``).
  """
  return 1 if jax.default_backend() == "cpu" else 16


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
  """Per-layer Hutchinson estimates of ``Tr(H_l)``.

  Attributes:
    mean: ``{path: float}``, the estimate of each selected leaf's block trace
      (sample mean over the probes), in parameter-tree flatten order.
    stderr: ``{path: float}``, the standard error of ``mean`` (sample
      standard deviation, ``ddof=1``, over ``sqrt(num_probes)``); ``inf``
      with a single probe.
    num_probes: number of probes ``P`` behind every estimate.
    samples: ``{path: np.ndarray of shape (P,)}``, the per-probe values
      ``v_l . (H v)_l`` whose mean is ``mean``.
  """

  mean: dict[str, float]
  stderr: dict[str, float]
  num_probes: int
  samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

  def relative_stderr(self) -> dict[str, float]:
    """``{path: stderr / |mean|}``; 0 where the stderr is 0 (exact), inf where the mean is 0."""
    out = {}
    for p, m in self.mean.items():
      s = self.stderr[p]
      out[p] = 0.0 if s == 0.0 else (s / abs(m) if m != 0.0 else math.inf)
    return out


# ----------------------------------------------------------------------------
# Core


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _selection(params: Any, select: Callable[[str], bool] | None):
  """``(paths, leaves, treedef, sel)``: ``sel`` indexes the probed float leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  sel = tuple(i for i, (p, x) in enumerate(zip(paths, leaves))
              if _is_float(x) and (select is None or select(p)))
  if not sel:
    raise ValueError("hutchinson_trace: no floating-point parameter leaf is selected.")
  return paths, leaves, treedef, sel


def _restricted_loss(loss_fn, treedef, sel, leaves, loss_args):
  """The loss as a function of the selected leaves only (the others are held fixed)."""

  def f(selected):
    full = list(leaves)
    for i, x in zip(sel, selected):
      full[i] = x
    return loss_fn(jax.tree_util.tree_unflatten(treedef, full), *loss_args)

  return f


def _probe(key, index, selected):
  """Probe ``index``: a Rademacher (+-1) array like each selected leaf.

  One ``jax.random.bits`` call under ``fold_in(key, index)`` supplies 32
  signs per random word for all leaves (cheaper to run and to compile than
  a ``rademacher`` call per leaf).
  """
  sizes = [x.size for x in selected]
  total = sum(sizes)
  words = jax.random.bits(jax.random.fold_in(key, index), ((total + 31) // 32,), jnp.uint32)
  bits = ((words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).reshape(-1)
  probes, offset = [], 0
  for x, n in zip(selected, sizes):
    signs = 2 * bits[offset:offset + n].astype(jnp.int32) - 1
    probes.append(signs.astype(x.dtype).reshape(x.shape))
    offset += n
  return probes


def _block_forms(probes, hv):
  """``[L]`` float32: ``v_l . (H v)_l`` for one probe ``v`` and its product ``H v`` (lists like ``selected``)."""
  return jnp.stack([jnp.sum(v.astype(jnp.float32) * h.astype(jnp.float32)) for v, h in zip(probes, hv)])


def _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args):
  """``(selected leaves, v -> H v)``: the gradient of the restricted loss, linearized once.

  ``jax.linearize(jax.grad(f), params)`` runs the forward-over-reverse pass
  ``jax.jvp(jax.grad(f), (params,), (v,))`` split in two: the primal part
  (the loss's forward and backward pass and every residual the tangents
  need) is evaluated once, and the returned linear function is only the
  tangent part, so every Hessian-vector product after the first costs the
  tangent pass alone. The same products, up to float rounding.
  """
  selected = [leaves[i] for i in sel]
  grad_f = jax.grad(_restricted_loss(loss_fn, treedef, sel, leaves, loss_args))
  _, hvp = jax.linearize(grad_f, selected)
  return selected, hvp


# Hessian-vector products per compiled program, behind one linearization (at
# least one chunk of ``probe_batch``): the primal pass is shared by all of
# them, but each chunk adds its own tangent pass to the program (the chunks
# are unrolled: a loop inside the program, ``lax.map``/``scan``, ran a
# ResNet-20 HVP 15-20x slower on XLA:CPU), so compile time grows with the
# number of chunks, and so does memory (XLA:CPU interleaves the independent
# chunks, keeping all their tangent activations live: ResNet-20, batch 128,
# needs 0.3 GB of temporaries for one HVP, 1.0 GB for 8). With one HVP per
# chunk (CPU), 8 cut the primal's share of the cost of 8 ResNet-20 probes from
# a third to a sixteenth; a vmapped chunk of 16 (GPU) already amortizes it
# and stays one chunk per program.
HVPS_PER_PROGRAM = 8


def _rows(a, start, stop):
  return a[start:stop]


@functools.partial(jax.jit, static_argnames=("loss_fn", "treedef", "sel", "chunk"))
def _program_samples(loss_fn, treedef, sel, leaves, loss_args, key, probe_index, layer_index, chunk):
  """Hessian-vector products behind one linearization, in unrolled chunks of ``chunk``.

  Args:
    probe_index: ``[N]`` uint32, the probe of each HVP.
    layer_index: ``None`` (simultaneous: ``[N, L]`` samples, every layer of
      each probe) or ``[N]`` int32 (layerwise: probe restricted to that
      layer, ``[N]`` samples of that layer).
    chunk: HVPs vmapped together (``1``: one by one, no batched
      convolutions); the last chunk may be shorter.
  """
  selected, hvp = _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args)

  if layer_index is None:
    def one(i):
      v = _probe(key, i, selected)
      return _block_forms(v, hvp(v))

    xs = probe_index
  else:
    # Probe i restricted to layer l (every other block zero): all pairs share
    # one compiled HVP (the layer is a traced index), and layer l's block of
    # probe i is the same v_l as in the simultaneous estimator.
    def one(il):
      i, l = il
      v = [jnp.where(l == j, x, jnp.zeros_like(x)) for j, x in enumerate(_probe(key, i, selected))]
      return _block_forms(v, hvp(v))[l]  # the other entries are zero

    xs = (probe_index, layer_index)
  n = probe_index.shape[0]
  out = []
  for start in range(0, n, chunk):
    part = jax.tree_util.tree_map(functools.partial(_rows, start=start, stop=min(start + chunk, n)), xs)
    if min(chunk, n - start) == 1:  # no batched (vmapped) convolutions to compile
      out.append(one(jax.tree_util.tree_map(lambda a: a[0], part))[None])
    else:
      out.append(jax.vmap(one)(part))
  return out[0] if len(out) == 1 else jnp.concatenate(out)


def _sample_batch(loss_fn, params, key, num_probes, select, probe_batch, loss_args, layerwise, start=0):
  """``(paths of the selected leaves, np.ndarray [num_probes, L])`` for probes
  ``start .. start + num_probes - 1``.

  The HVPs (one per probe, or per probe and layer) run in programs of
  ``max(1, HVPS_PER_PROGRAM // probe_batch)`` chunks of ``probe_batch``, each
  program linearizing the gradient once; a host loop dispatches the programs
  asynchronously and fetches the results once. A shorter last program
  compiles once more.
  """
  if num_probes < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
  if probe_batch is None:
    probe_batch = default_probe_batch()
  if probe_batch < 1:
    raise ValueError(f"probe_batch must be >= 1, got {probe_batch}.")
  paths, leaves, treedef, sel = _selection(params, select)
  num_layers = len(sel)
  probes = np.arange(start, start + num_probes, dtype=np.uint32)
  if layerwise:
    probe_index = np.repeat(probes, num_layers)
    layer_index = np.tile(np.arange(num_layers, dtype=np.int32), num_probes)
  else:
    probe_index, layer_index = probes, None
  loss_args = tuple(loss_args)
  per_program = probe_batch * max(1, HVPS_PER_PROGRAM // probe_batch)
  parts = []
  for c in range(0, len(probe_index), per_program):
    part_layers = None if layer_index is None else layer_index[c:c + per_program]
    parts.append(_program_samples(loss_fn, treedef, sel, leaves, loss_args, key,
                                  probe_index[c:c + per_program], part_layers, chunk=probe_batch))
  samples = np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(parts)])
  return [paths[i] for i in sel], samples.reshape(num_probes, num_layers)


def _summarize(paths: Sequence[str], samples: np.ndarray) -> TraceEstimate:
  n = samples.shape[0]
  mean = samples.mean(axis=0)
  stderr = samples.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(len(paths), np.inf)
  return TraceEstimate(
      mean={p: float(m) for p, m in zip(paths, mean)},
      stderr={p: float(s) for p, s in zip(paths, stderr)},
      num_probes=n,
      samples={p: samples[:, j].copy() for j, p in enumerate(paths)},
  )


# ----------------------------------------------------------------------------
# Public API


def hutchinson_trace(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    key: jax.Array,
    num_probes: int,
    select: Callable[[str], bool] | None = None,
    probe_batch: int | None = None,
    loss_args: Sequence[Any] = (),
    layerwise: bool = False,
) -> TraceEstimate:
  """Hutchinson estimates of every selected leaf's Hessian block trace.

  Args:
    loss_fn: scalar loss, ``loss_fn(params, *loss_args) -> []``; twice
      differentiable in ``params``. Cached compilations are keyed on it.
    params: a pytree of arrays (a Linen ``params`` dict of float weights;
      materialize quantizer parameters first). A leaf of shape ``S_l`` owns
      the ``prod(S_l) x prod(S_l)`` block ``H_ll``.
    key: PRNG key; probe ``i`` uses ``fold_in(key, i)``.
    num_probes: number of Rademacher probes ``P``; the cost is ``P``
      forward-over-reverse Hessian-vector products, whatever the number of
      layers, sharing their primal pass (see the module docstring): for
      ResNet-20 on CPU (batch 128) about 0.5 SGD train steps per program and
      1 per probe, 8 probes about 8 train steps
      (``benchmarks/hessian_cost.py``).
    select: ``select(path) -> bool`` on the ``/``-joined leaf path
      (``transform.path_str``); ``None`` probes every floating-point leaf.
      Unselected leaves are held fixed (not differentiated).
    probe_batch: Hessian-vector products vmapped together per chunk; peak
      memory grows about linearly with it (and with the number of chunks
      per program, ``HVPS_PER_PROGRAM // probe_batch``). ``1`` runs them one
      by one, 8 to a program; ``None``: ``default_probe_batch()``.
    loss_args: extra (traced) arguments of ``loss_fn``, e.g. a data batch.
    layerwise: ``False`` (default): one HVP per probe, all layers at once
      (cross-block terms add variance, see the module docstring). ``True``:
      one HVP per probe *and layer*, the probe restricted to that layer, so
      the variance is only ``2 sum_{i != j} (H_ll)_ij^2``; ``L`` times the
      cost per probe, but far fewer probes for layers whose trace is small
      next to the whole Hessian's (those the simultaneous estimate gets
      wrong first).

  Returns:
    ``TraceEstimate`` with ``mean[path]`` ~ ``Tr(H_ll)``, its ``stderr`` and
    the ``[P]`` per-probe samples of each selected leaf.
  """
  paths, samples = _sample_batch(loss_fn, params, key, num_probes, select, probe_batch, loss_args, layerwise)
  return _summarize(paths, samples)


def hutchinson_trace_until_converged(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    key: jax.Array,
    max_probes: int,
    tol: float,
    probe_batch: int | None = None,
    select: Callable[[str], bool] | None = None,
    loss_args: Sequence[Any] = (),
    min_probes: int = 2,
    layerwise: bool = False,
) -> TraceEstimate:
  """Add batches of ``probe_batch`` probes until every layer is accurate to ``tol``.

  Stops as soon as at least ``min_probes`` (>= 2, for a standard error) have
  been drawn and every selected leaf's relative standard error
  ``stderr / |mean|`` is below ``tol`` (a zero stderr counts as converged),
  or when ``max_probes`` probes have been drawn (the last batch is cut
  short so that exactly ``max_probes`` are used). Probes are indexed as in
  ``hutchinson_trace``, so the result equals ``hutchinson_trace`` with the
  same key and the returned ``num_probes``.

  Args:
    loss_fn, params, key, select, loss_args, layerwise: as in
      ``hutchinson_trace``.
    max_probes: the most probes to draw.
    tol: target relative standard error, e.g. ``0.05``.
    probe_batch: probes per batch (and HVPs per vmapped chunk); ``None``:
      ``default_probe_batch()``.
    min_probes: the fewest probes to draw before testing convergence.

  Returns:
    ``TraceEstimate`` over all probes drawn.
  """
  if max_probes < 1:
    raise ValueError(f"max_probes must be >= 1, got {max_probes}.")
  min_probes = max(2, min_probes)
  probe_batch = default_probe_batch() if probe_batch is None else probe_batch
  paths, chunks, done = None, [], 0
  while done < max_probes:
    n = min(probe_batch, max_probes - done)
    paths, samples = _sample_batch(loss_fn, params, key, n, select, probe_batch, loss_args, layerwise, start=done)
    chunks.append(samples)
    done += n
    if done >= min_probes:
      est = _summarize(paths, np.concatenate(chunks))
      if all(r < tol for r in est.relative_stderr().values()):
        return est
  return _summarize(paths, np.concatenate(chunks))


def rademacher_probes(
    params: Any,
    key: jax.Array,
    indices: Sequence[int],
    select: Callable[[str], bool] | None = None,
) -> dict[str, jax.Array]:
  """``{path: [P, *S_l]}``: the probes ``hutchinson_trace`` draws for ``indices`` (length ``P``).

  Only the selected leaves are probed; for checking and reuse of the exact
  probes behind an estimate (see ``hvp_block_forms``).
  """
  paths, leaves, _, sel = _selection(params, select)
  probes = _probes_jit(key, jnp.asarray(indices, jnp.uint32), [leaves[i] for i in sel])
  return {paths[i]: v for i, v in zip(sel, probes)}


@jax.jit
def _probes_jit(key, indices, selected):
  return jax.vmap(lambda i: _probe(key, i, selected))(indices)


@functools.partial(jax.jit, static_argnames=("loss_fn", "treedef", "sel"))
def _forms_jit(loss_fn, treedef, sel, leaves, loss_args, probes):
  _, hvp = _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args)
  return jax.vmap(lambda v: _block_forms(v, hvp(v)))(probes)


def hvp_block_forms(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    probes: dict[str, jax.Array],
    loss_args: Sequence[Any] = (),
) -> dict[str, jax.Array]:
  """``{path: [P]}`` values ``v_l . (H v)_l`` for given probes, vmapped over ``P``.

  Args:
    loss_fn, params, loss_args: as in ``hutchinson_trace``.
    probes: ``{path: [P, *S_l]}`` for the leaves to probe (the selection);
      every other leaf is held fixed.

  Useful for checking the estimator with known probes (e.g. all ``2^n`` sign
  vectors, whose average is exactly ``Tr(H_ll)``) and for other probe
  distributions; ``hutchinson_trace`` draws its own.
  """
  paths, leaves, treedef, sel = _selection(params, lambda p: p in probes)
  missing = set(probes) - {paths[i] for i in sel}
  if missing:
    raise ValueError(f"probes for unknown or non-float leaves: {sorted(missing)}")
  forms = _forms_jit(loss_fn, treedef, sel, leaves, tuple(loss_args), [probes[paths[i]] for i in sel])
  return {paths[i]: forms[:, j] for j, i in enumerate(sel)}


# ----------------------------------------------------------------------------
# Flax Linen classifiers


def kernel_paths(path: str) -> bool:
  """The default layer selection: leaves whose path ends in ``kernel``."""
  return path.endswith("kernel")


@dataclasses.dataclass(frozen=True)
class ClassifierLoss:
  """Mean softmax cross-entropy of a Linen classifier in eval mode, averaged over batches.

  ``__call__(params, batch_stats, images [K, B, ...], labels [K, B])``: the
  mean over the ``K`` stacked batches of each batch's mean cross-entropy,
  ``model.apply(..., train=False)`` with the given BN statistics. A hashable
  (frozen, model-valued) callable, so equal models share one compilation.

  In eval mode no example affects another and the batches are of one size,
  so this equals the mean cross-entropy of all ``K * B`` examples; by
  default they go through the model as one batch (activation memory grows
  with ``K * B``). ``scan=True`` scans over the ``K`` batches instead (memory
  of one batch), which XLA:CPU runs far slower inside an HVP.
  """

  model: Any
  scan: bool = False

  def __call__(self, params, batch_stats, images, labels):
    variables = {"params": params}
    if jax.tree_util.tree_leaves(batch_stats):
      variables["batch_stats"] = batch_stats

    def batch_loss(xy):
      x, y = xy
      logits = self.model.apply(variables, x, train=False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))

    if self.scan and images.shape[0] > 1:
      return jnp.mean(jax.lax.map(batch_loss, (images, labels)))
    return batch_loss((images.reshape((-1,) + images.shape[2:]), labels.reshape(-1)))


def _images_labels(batch) -> tuple[Any, Any]:
  if isinstance(batch, dict):
    return batch["image"], batch["label"]
  images, labels = batch
  return images, labels


def layer_traces_for_model(
    model: Any,
    variables: dict[str, Any],
    batches: Sequence[Any],
    key: jax.Array,
    num_probes: int,
    select_fn: Callable[[str], bool] = kernel_paths,
    num_batches: int | None = None,
    probe_batch: int | None = None,
    layerwise: bool = False,
    scan_batches: bool = False,
) -> TraceEstimate:
  """Per-layer ``Tr(H_l)`` of a Linen classifier's cross-entropy.

  The loss is the mean softmax cross-entropy with integer labels,
  ``model.apply(variables, images, train=False)`` (BN uses
  ``variables["batch_stats"]``), averaged over the first ``num_batches`` of
  ``batches`` (all by default); its Hessian is w.r.t. ``variables["params"]``
  only.

  Args:
    model: a Flax Linen classifier, ``apply(..., x, train=False) -> [B, C]``.
    variables: ``{"params": ..., "batch_stats": ...}`` (float weights).
    batches: a sequence of ``{"image": [B, ...], "label": [B]}`` dicts or
      ``(images, labels)`` pairs, all of one shape (stacked to
      ``[K, B, ...]``).
    key: PRNG key of the probes.
    num_probes: Rademacher probes (Hessian-vector products over all ``K``
      batches each).
    select_fn: ``select_fn(path) -> bool`` picks the layers; default every
      ``.../kernel``.
    num_batches: how many of ``batches`` to use; ``None`` uses all.
    probe_batch: Hessian-vector products vmapped together (``None``:
      ``default_probe_batch()``).
    layerwise: probe one layer per HVP (see ``hutchinson_trace``).
    scan_batches: scan over the batches (memory of one batch, slow on CPU)
      rather than apply the model to all ``K * B`` examples at once (see
      ``ClassifierLoss``).

  Returns:
    ``TraceEstimate`` keyed by the selected parameter paths, e.g.
    ``"conv0/kernel"``.
  """
  batches = list(batches)[: num_batches if num_batches is not None else None]
  if not batches:
    raise ValueError("layer_traces_for_model needs at least one batch.")
  pairs = [_images_labels(b) for b in batches]
  images = jnp.stack([jnp.asarray(x) for x, _ in pairs])
  labels = jnp.stack([jnp.asarray(y) for _, y in pairs])
  batch_stats = variables.get("batch_stats", {})
  return hutchinson_trace(ClassifierLoss(model, scan_batches), variables["params"], key, num_probes, select=select_fn,
                          probe_batch=probe_batch, loss_args=(batch_stats, images, labels), layerwise=layerwise)
