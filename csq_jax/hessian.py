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
``jax.jvp(jax.grad(loss), (params,), (v,))``; probes are generated inside the
compiled program (never materialized all at once) and vmapped over the
probe axis in jitted chunks of ``probe_batch`` HVPs, which bounds memory; a
host loop dispatches the chunks (asynchronously) and fetches the results once.

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csq_jax.transform import path_str

def default_probe_batch() -> int:
  """HVPs per vmapped chunk when ``probe_batch`` is ``None``: 1 on CPU, 16 elsewhere.

  XLA:CPU runs the vmapped HVP of a conv net slower than a loop of single
  ones (probe-batched tangent kernels become grouped convolutions): ResNet-20,
  batch 128, 8 probes took 14.9 s in chunks of 8 vs 8.7 s one at a time.
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


def _block_forms(grad_f, selected, probes):
  """``[L]`` float32: ``v_l . (H v)_l`` for one probe ``v`` (a list like ``selected``)."""
  _, hv = jax.jvp(grad_f, (selected,), (probes,))
  return jnp.stack([jnp.sum(v.astype(jnp.float32) * h.astype(jnp.float32)) for v, h in zip(probes, hv)])


@functools.partial(jax.jit, static_argnames=("loss_fn", "treedef", "sel"))
def _chunk_samples(loss_fn, treedef, sel, leaves, loss_args, key, probe_index, layer_index):
  """One chunk of ``C`` Hessian-vector products, vmapped (``C > 1``) or single.

  Args:
    probe_index: ``[C]`` uint32, the probe of each HVP.
    layer_index: ``None`` (simultaneous: ``[C, L]`` samples, every layer of
      each probe) or ``[C]`` int32 (layerwise: probe restricted to that
      layer, ``[C]`` samples of that layer).
  """
  selected = [leaves[i] for i in sel]
  grad_f = jax.grad(_restricted_loss(loss_fn, treedef, sel, leaves, loss_args))

  if layer_index is None:
    def one(i):
      return _block_forms(grad_f, selected, _probe(key, i, selected))

    xs = probe_index
  else:
    # Probe i restricted to layer l (every other block zero): all pairs share
    # one compiled HVP (the layer is a traced index), and layer l's block of
    # probe i is the same v_l as in the simultaneous estimator.
    def one(il):
      i, l = il
      v = [jnp.where(l == j, x, jnp.zeros_like(x)) for j, x in enumerate(_probe(key, i, selected))]
      return _block_forms(grad_f, selected, v)[l]  # the other entries are zero

    xs = (probe_index, layer_index)
  if probe_index.shape[0] == 1:  # no batched (vmapped) convolutions to compile
    return jax.tree_util.tree_map(lambda a: a[None], one(jax.tree_util.tree_map(lambda a: a[0], xs)))
  return jax.vmap(one)(xs)


def _sample_batch(loss_fn, params, key, num_probes, select, probe_batch, loss_args, layerwise, start=0):
  """``(paths of the selected leaves, np.ndarray [num_probes, L])`` for probes
  ``start .. start + num_probes - 1``.

  The HVPs (one per probe, or per probe and layer) run in jitted chunks of
  ``probe_batch`` from a host loop, dispatched asynchronously and fetched
  once; a shorter last chunk compiles once more. (A ``lax.map``/scan over
  the chunks inside one program was measured 15-20x slower per HVP on
  XLA:CPU for ResNet-20.)
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
  chunks = []
  for c in range(0, len(probe_index), probe_batch):
    chunk_layers = None if layer_index is None else layer_index[c:c + probe_batch]
    chunks.append(_chunk_samples(loss_fn, treedef, sel, leaves, loss_args, key,
                                 probe_index[c:c + probe_batch], chunk_layers))
  samples = np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(chunks)])
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
      layers (each about 1.4 SGD train steps for ResNet-20 on CPU).
    select: ``select(path) -> bool`` on the ``/``-joined leaf path
      (``transform.path_str``); ``None`` probes every floating-point leaf.
      Unselected leaves are held fixed (not differentiated).
    probe_batch: Hessian-vector products vmapped together per jitted chunk;
      peak memory grows about linearly with it. ``1`` runs them one by one
      (the cheapest to compile); ``None``: ``default_probe_batch()``.
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
  selected = [leaves[i] for i in sel]
  grad_f = jax.grad(_restricted_loss(loss_fn, treedef, sel, leaves, loss_args))
  return jax.vmap(lambda v: _block_forms(grad_f, selected, v))(probes)


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
