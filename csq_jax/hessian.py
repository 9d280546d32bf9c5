"""Per-layer Hessian traces (Hutchinson, Hutch++), for MSQ's LSB pruning.

MSQ (Han et al.) chooses how many least significant bits to prune from each
layer by a Hessian-aware sensitivity, as in HAWQ-V2 (Dong et al. 2020):

    Omega_l = Tr(H_l) * ||W_n^(l) - W^(l)||_2,

where ``H_l = H_ll`` is the diagonal block of the loss Hessian belonging to
layer ``l``'s kernel ``W^(l)``. This module estimates every ``Tr(H_ll)``
from Hessian-vector products, without forming any Hessian.

Hutchinson (1989): for ``v`` with independent Rademacher (+-1) entries,
``E[v^T A v] = Tr(A)``, ``Var[v^T A v] = 2 sum_{i != j} A_ij^2``.

``hutchinson_trace`` (simultaneous): split one probe ``v = (v_1, ..., v_L)``
by layer and take the block of one full product ``H v``,

    v_l . (H v)_l = v_l^T H_ll v_l + sum_{m != l} v_l^T H_lm v_m,

whose cross terms have mean zero: one HVP per probe estimates every block
trace, without bias but with the extra variance ``sum_{m != l}
||H_lm||_F^2``, large for a layer whose trace is a small share of the whole.

``hutchpp_trace`` (layerwise Hutch++, Meyer et al. 2021, applied to each
block ``A = H_ll`` with products restricted to layer ``l``): with ``k``
Rademacher sketch vectors ``S`` and ``Q = orth(A S)`` (``n_l x k``),

    Tr(A) = Tr(Q^T A Q) + Tr((I - Q Q^T) A (I - Q Q^T)),

the first term exact from ``A Q`` (``k`` HVPs), the second estimated by
Hutchinson with ``m`` deflated probes ``g' = (I - Q Q^T) g``:

    t_l = sum_i q_i^T A q_i + (1/m) sum_j g'_j^T A g'_j,    E[t_l | Q] = Tr(A),

standard error ``std_j(g'_j^T A g'_j) / sqrt(m)``. No cross-block variance,
and the dominant eigen-directions, which carry most of a trained network's
block trace and nearly all of Hutchinson's variance, are taken exactly: on
the default job (small CNN, digits) the top 3 Ritz values of a conv block
hold ~75% of its trace, and 24 HVPs per layer gave a 2-3% relative standard
error by Hutch++ against 12-14% by layerwise Hutchinson and ~20% (up to
100% for the small layers) by 24 simultaneous probes. A layer with
``n_l <= k`` weights gets its exact trace (``Q`` spans the block). Cost:
``L (2k + m)`` HVPs in two rounds (``A S``, then ``A Q`` and ``A g'``).

Hessian-vector products are forward-over-reverse,
``jax.jvp(jax.grad(loss), (params,), (v,))``, evaluated as
``jax.linearize(jax.grad(loss), params)`` applied to each vector: the
primal part (the loss's forward and backward pass) runs once per compiled
program and only the tangent part once per vector. A program runs
``max(1, HVPS_PER_PROGRAM // probe_batch)`` chunks of ``probe_batch`` HVPs
(vmapped within a chunk) behind one linearization; a host loop dispatches
the programs asynchronously and fetches the results once. The layerwise
products of all layers share one compiled program (the layer is a traced
index), and every round is padded to whole programs, so a model compiles
it once.

Probe ``i`` of ``hutchinson_trace`` is drawn from ``jax.random.fold_in(key,
i)``, so results do not depend on ``probe_batch``; ``hutchpp_trace`` draws
layer ``l``'s sketch and probes from ``fold_in(key, l)``.

Everything here is a pure function of its arguments. Compiled programs are
cached by ``jax.jit`` keyed on the identity (or, for hashable callables,
value) of ``loss_fn``: pass the same function object to reuse a compilation,
and pass data through ``loss_args`` rather than closing over it, so that it
is an input of the program rather than a constant baked into it.

References:
  M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Comm. Statist. Simulation
    Comput. 18(3), 1989.
  R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal
    Stochastic Trace Estimation", SOSA 2021.
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
  """Per-layer estimates of ``Tr(H_ll)``.

  Attributes:
    mean: ``{path: float}``, each selected leaf's block-trace estimate (the
      mean of its ``samples``), in parameter-tree flatten order.
    stderr: ``{path: float}``, the standard error of ``mean`` (sample
      standard deviation, ``ddof=1``, over the square root of the number of
      samples); 0 for an exact trace (Hutch++ of a layer of at most
      ``sketch`` weights), ``inf`` from a single random sample.
    num_probes: random probes per layer (Hutchinson's ``P``, Hutch++'s
      deflated ``m``).
    sketch: Hutch++'s sketch size ``k`` per layer; 0 for Hutchinson.
    samples: ``{path: np.ndarray}``, per-probe values whose mean is
      ``mean``: Hutchinson's ``v_l . (H v)_l``; Hutch++'s
      ``Tr(Q^T H_ll Q) + g'^T H_ll g'`` (one value, the exact trace, for a
      layer of at most ``sketch`` weights).
  """

  mean: dict[str, float]
  stderr: dict[str, float]
  num_probes: int
  sketch: int = 0
  samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)


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
    raise ValueError("hessian: no floating-point parameter leaf is selected.")
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


def _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args):
  """``(selected leaves, v -> H v)``: the gradient of the restricted loss, linearized once.

  ``jax.linearize(jax.grad(f), params)`` runs the forward-over-reverse pass
  ``jax.jvp(jax.grad(f), (params,), (v,))`` split in two: the primal part
  (the loss's forward and backward pass and every residual the tangents
  need) is evaluated once, and the returned linear function is only the
  tangent part, so every Hessian-vector product after the first costs the
  tangent pass alone.
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


def _chunked(one, xs, n, chunk):
  """``one`` over the leading axis of the arrays ``xs`` (length ``n``), in
  unrolled chunks of ``chunk`` (vmapped when longer than 1)."""
  out = []
  for start in range(0, n, chunk):
    part = jax.tree_util.tree_map(lambda a: a[start:min(start + chunk, n)], xs)
    if min(chunk, n - start) == 1:  # no batched (vmapped) convolutions to compile
      out.append(one(*jax.tree_util.tree_map(lambda a: a[0], part))[None])
    else:
      out.append(jax.vmap(one)(*part))
  return out[0] if len(out) == 1 else jnp.concatenate(out)


def _per_program(probe_batch):
  if probe_batch is None:
    probe_batch = default_probe_batch()
  if probe_batch < 1:
    raise ValueError(f"probe_batch must be >= 1, got {probe_batch}.")
  return probe_batch, probe_batch * max(1, HVPS_PER_PROGRAM // probe_batch)


@functools.partial(jax.jit, static_argnames=("loss_fn", "treedef", "sel", "chunk"))
def _simultaneous_program(loss_fn, treedef, sel, leaves, loss_args, key, probe_index, chunk):
  """``[N, L]`` float32: ``v_l . (H v)_l`` of probes ``probe_index`` ``[N]``, behind one linearization."""
  selected, hvp = _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args)

  def one(i):
    v = _probe(key, i, selected)
    return jnp.stack([jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32)) for a, b in zip(v, hvp(v))])

  return _chunked(one, (probe_index,), probe_index.shape[0], chunk)


@functools.partial(jax.jit, static_argnames=("loss_fn", "treedef", "sel", "chunk"))
def _layer_program(loss_fn, treedef, sel, leaves, loss_args, vectors, layer_index, chunk):
  """``[N, W]``: ``H_ll v`` for ``v = vectors[j, :n_l]`` on layer ``l = layer_index[j]``.

  Each row of ``vectors`` ``[N, W]`` (``W`` the largest selected leaf size)
  holds one layer's flattened vector, zero-padded; the tangent is that vector
  on its layer and zero elsewhere, and the result is the same layer's block
  of the product, zero-padded. One program serves every layer: ``l`` is a
  traced index.
  """
  selected, hvp = _linearized_hvp(loss_fn, treedef, sel, leaves, loss_args)
  width = vectors.shape[1]

  def one(v, l):
    tangent = [jnp.where(l == j, v[:x.size].reshape(x.shape).astype(x.dtype), jnp.zeros_like(x))
               for j, x in enumerate(selected)]
    out = jnp.zeros((width,), vectors.dtype)
    for j, h in enumerate(hvp(tangent)):
      out = jnp.where(l == j, jnp.pad(h.reshape(-1).astype(vectors.dtype), (0, width - h.size)), out)
    return out

  return _chunked(one, (vectors, layer_index), vectors.shape[0], chunk)


def _layer_products(loss_fn, treedef, sel, leaves, loss_args, vectors, layer_index, probe_batch):
  """``np.ndarray [N, W]`` (float64) of ``_layer_program`` over all rows,
  in whole programs (the last one padded with zero vectors, so that one
  compilation serves every round)."""
  chunk, per_program = _per_program(probe_batch)
  n = vectors.shape[0]
  pad = -n % per_program
  vectors = np.concatenate([vectors, np.zeros((pad, vectors.shape[1]), vectors.dtype)])
  layer_index = np.concatenate([layer_index, np.zeros(pad, np.int32)]).astype(np.int32)
  parts = [_layer_program(loss_fn, treedef, sel, leaves, loss_args, vectors[c:c + per_program],
                          layer_index[c:c + per_program], chunk=chunk)
           for c in range(0, len(vectors), per_program)]
  return np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(parts)])[:n]


def _summarize(paths: Sequence[str], samples: Sequence[np.ndarray], num_probes: int, sketch: int = 0,
               exact: Sequence[bool] = ()) -> TraceEstimate:
  mean, stderr = {}, {}
  for j, (p, s) in enumerate(zip(paths, samples)):
    mean[p] = float(np.mean(s))
    if exact and exact[j]:
      stderr[p] = 0.0
    else:
      stderr[p] = float(np.std(s, ddof=1) / math.sqrt(len(s))) if len(s) > 1 else math.inf
  return TraceEstimate(mean=mean, stderr=stderr, num_probes=num_probes, sketch=sketch,
                       samples={p: np.array(s, np.float64) for p, s in zip(paths, samples)})


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
) -> TraceEstimate:
  """Simultaneous Hutchinson estimates of every selected leaf's block trace.

  Args:
    loss_fn: scalar loss, ``loss_fn(params, *loss_args) -> []``; twice
      differentiable in ``params``. Cached compilations are keyed on it.
    params: a pytree of arrays (a Linen ``params`` dict of float weights;
      materialize quantizer parameters first). A leaf of shape ``S_l`` owns
      the ``prod(S_l) x prod(S_l)`` block ``H_ll``.
    key: PRNG key; probe ``i`` uses ``fold_in(key, i)``.
    num_probes: Rademacher probes ``P``: ``P`` Hessian-vector products,
      whatever the number of layers (for ResNet-20 on CPU, batch 128, about
      one SGD train step each, ``benchmarks/hessian_cost.py``).
    select: ``select(path) -> bool`` on the ``/``-joined leaf path
      (``transform.path_str``); ``None`` probes every floating-point leaf.
      Unselected leaves are held fixed (not differentiated).
    probe_batch: HVPs vmapped together per chunk (memory grows about
      linearly with it); ``None``: ``default_probe_batch()``.
    loss_args: extra (traced) arguments of ``loss_fn``, e.g. a data batch.

  Returns:
    ``TraceEstimate`` with ``mean[path]`` ~ ``Tr(H_ll)``, its ``stderr`` and
    the ``[P]`` per-probe samples ``v_l . (H v)_l`` (cross-block terms add
    variance, see the module docstring; ``hutchpp_trace`` has none).
  """
  if num_probes < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
  paths, leaves, treedef, sel = _selection(params, select)
  chunk, per_program = _per_program(probe_batch)
  probes = np.arange(num_probes, dtype=np.uint32)
  loss_args = tuple(loss_args)
  parts = [_simultaneous_program(loss_fn, treedef, sel, leaves, loss_args, key, probes[c:c + per_program],
                                 chunk=chunk) for c in range(0, num_probes, per_program)]
  samples = np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(parts)])
  return _summarize([paths[i] for i in sel], list(samples.T), num_probes)


def hutchpp_trace(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    key: jax.Array,
    sketch: int,
    num_probes: int,
    select: Callable[[str], bool] | None = None,
    probe_batch: int | None = None,
    loss_args: Sequence[Any] = (),
    refine: Callable[[TraceEstimate], Sequence[str]] | None = None,
    max_probes: int | None = None,
) -> TraceEstimate:
  """Layerwise Hutch++ estimates of every selected leaf's block trace ``Tr(H_ll)``.

  For each layer ``l`` (``A = H_ll``, ``n_l`` weights, ``k = min(sketch,
  n_l)``): ``Q = orth(A S)`` for ``k`` Rademacher vectors ``S``, then

      t_l = sum_i q_i^T A q_i + (1/m) sum_j g'_j^T A g'_j,  g'_j = (I - Q Q^T) g_j,

  with ``m = num_probes`` Rademacher ``g_j``; unbiased given ``Q`` (see the
  module docstring). Every product is restricted to one layer (no
  cross-block variance). QR and the projections run on the host in float64;
  a layer with ``n_l <= sketch`` gets its exact trace and no probes.

  Args:
    loss_fn, params, select, probe_batch, loss_args: as in
      ``hutchinson_trace``.
    key: PRNG key; layer ``l`` (in selection order) draws ``S`` and ``g``
      from ``fold_in(key, l)``.
    sketch: ``k >= 1``, sketch vectors per layer.
    num_probes: ``m >= 2``, deflated Hutchinson probes per layer.
    refine: optional ``refine(estimate) -> paths``: after the first
      estimate, each path it returns gets ``num_probes`` more deflated
      probes (same ``Q``; round ``r`` draws from ``fold_in(fold_in(key, l),
      r)``), and ``refine`` is asked again, until it returns none or those
      layers hold ``max_probes`` probes. For spending HVPs only on the
      layers whose estimate is not yet good enough for the caller.
    max_probes: the most deflated probes per layer with ``refine``
      (default ``4 * num_probes``).

  Returns:
    ``TraceEstimate`` (``sketch = k``, ``num_probes = m``); a layer's
    ``samples`` are ``Tr(Q^T A Q) + g'_j^T A g'_j``, ``stderr`` their
    standard error (0 where exact). Cost: ``L (2k + m)`` HVPs in two rounds,
    in programs of ``HVPS_PER_PROGRAM`` (``probe_batch``).
  """
  if sketch < 1 or num_probes < 2:
    raise ValueError(f"hutchpp_trace needs sketch >= 1 and num_probes >= 2, got {sketch}, {num_probes}.")
  paths, leaves, treedef, sel = _selection(params, select)
  sizes = [int(leaves[i].size) for i in sel]
  width = max(sizes)
  dtype = np.dtype(jnp.result_type(*[leaves[i] for i in sel]))  # of the products: float32 (float64 with x64)
  loss_args = tuple(loss_args)
  ks = [min(sketch, n) for n in sizes]
  # Rademacher signs from the low bit of uint32 words: the same with or without x64.
  randoms = [2.0 * (np.asarray(jax.random.bits(jax.random.fold_in(key, l), (n, k + num_probes), jnp.uint32)) & 1)
             - 1.0 for l, (n, k) in enumerate(zip(sizes, ks))]

  def rows(blocks):  # [(layer, [n_l, c])] -> (vectors [sum c, W] of dtype, layer index)
    vecs = [np.pad(b.T, ((0, 0), (0, width - b.shape[0]))) for _, b in blocks]
    return (np.concatenate(vecs).astype(dtype),
            np.concatenate([np.full(b.shape[1], l, np.int32) for l, b in blocks]))

  def products(blocks):  # [n_l, c] per layer -> A_l @ block, [n_l, c] float64
    out = _layer_products(loss_fn, treedef, sel, leaves, loss_args, *rows(list(enumerate(blocks))), probe_batch)
    res, r = [], 0
    for b in blocks:
      res.append(out[r:r + b.shape[1], :b.shape[0]].T)
      r += b.shape[1]
    return res

  # Round 1: A S.  Round 2: A Q and A g' for the layers not spanned by Q.
  ys = products([x[:, :k] for x, k in zip(randoms, ks)])
  qs = [np.linalg.qr(y)[0] for y in ys]
  exact = [k >= n for k, n in zip(ks, sizes)]
  gs = [np.zeros((n, 0)) if e else x[:, k:] - q @ (q.T @ x[:, k:])
        for x, q, k, n, e in zip(randoms, qs, ks, sizes, exact)]
  aqg = products([np.concatenate([q, g], axis=1) for q, g in zip(qs, gs)])
  samples, tops = [], []
  for q, g, a, k in zip(qs, gs, aqg, ks):
    tops.append(float(np.sum(q * a[:, :k])))
    samples.append(tops[-1] + np.sum(g * a[:, k:], axis=0) if g.shape[1] else np.array([tops[-1]]))
  names = [paths[i] for i in sel]
  est = _summarize(names, samples, num_probes, sketch, exact)
  limit = 4 * num_probes if max_probes is None else max_probes
  for r in range(1, 1 + (limit - 1) // num_probes if refine is not None else 1):
    wanted = set(refine(est))
    more = [l for l, p in enumerate(names) if p in wanted and not exact[l] and len(samples[l]) < limit]
    if not more:
      break
    counts = {l: min(num_probes, limit - len(samples[l])) for l in more}
    extra = {l: 2.0 * (np.asarray(jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, l), r),
                                                  (sizes[l], c), jnp.uint32)) & 1) - 1.0 for l, c in counts.items()}
    extra = {l: g - qs[l] @ (qs[l].T @ g) for l, g in extra.items()}
    blocks = [extra.get(l, np.zeros((n, 0))) for l, n in enumerate(sizes)]
    for l, (g, a) in enumerate(zip(blocks, products(blocks))):
      if g.shape[1]:
        samples[l] = np.concatenate([samples[l], tops[l] + np.sum(g * a, axis=0)])
    est = _summarize(names, samples, num_probes, sketch, exact)
  return est


# ----------------------------------------------------------------------------
# Flax Linen classifiers


def kernel_paths(path: str) -> bool:
  """The default layer selection: leaves whose path ends in ``kernel``."""
  return path.endswith("kernel")


@dataclasses.dataclass(frozen=True)
class ClassifierLoss:
  """Mean softmax cross-entropy of a Linen classifier in eval mode.

  ``__call__(params, batch_stats, images [K, B, ...], labels [K, B])``: the
  mean cross-entropy of all ``K * B`` examples (in eval mode no example
  affects another), ``model.apply(..., train=False)`` with the given BN
  statistics, the batches through the model as one. A hashable (frozen,
  model-valued) callable, so equal models share one compilation.
  """

  model: Any

  def __call__(self, params, batch_stats, images, labels):
    variables = {"params": params}
    if jax.tree_util.tree_leaves(batch_stats):
      variables["batch_stats"] = batch_stats
    logits = self.model.apply(variables, images.reshape((-1,) + images.shape[2:]), train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.reshape(-1)))


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
    probe_batch: int | None = None,
    sketch: int = 0,
    refine: Callable[[TraceEstimate], Sequence[str]] | None = None,
    max_probes: int | None = None,
) -> TraceEstimate:
  """Per-layer ``Tr(H_l)`` of a Linen classifier's cross-entropy.

  The loss is ``ClassifierLoss``: the mean softmax cross-entropy with
  integer labels over all of ``batches``, ``model.apply(variables, images,
  train=False)`` (BN uses ``variables["batch_stats"]``); its Hessian is
  w.r.t. ``variables["params"]`` only.

  Args:
    model: a Flax Linen classifier, ``apply(..., x, train=False) -> [B, C]``.
    variables: ``{"params": ..., "batch_stats": ...}`` (float weights).
    batches: a sequence of ``{"image": [B, ...], "label": [B]}`` dicts or
      ``(images, labels)`` pairs, all of one shape.
    key: PRNG key of the probes.
    num_probes: Hutchinson probes ``P`` (``sketch = 0``) or Hutch++'s
      deflated probes ``m`` per layer.
    select_fn: ``select_fn(path) -> bool`` picks the layers; default every
      ``.../kernel``.
    probe_batch: HVPs vmapped together (``None``: ``default_probe_batch()``).
    sketch: 0: ``hutchinson_trace`` (simultaneous); ``k > 0``:
      ``hutchpp_trace`` with ``k`` sketch vectors per layer.
    refine, max_probes: Hutch++'s extra probes (see ``hutchpp_trace``).

  Returns:
    ``TraceEstimate`` keyed by the selected parameter paths, e.g.
    ``"conv0/kernel"``.
  """
  if not batches:
    raise ValueError("layer_traces_for_model needs at least one batch.")
  pairs = [_images_labels(b) for b in batches]
  images = jnp.stack([jnp.asarray(x) for x, _ in pairs])
  labels = jnp.stack([jnp.asarray(y) for _, y in pairs])
  args = dict(select=select_fn, probe_batch=probe_batch,
              loss_args=(variables.get("batch_stats", {}), images, labels))
  if sketch:
    return hutchpp_trace(ClassifierLoss(model), variables["params"], key, sketch, num_probes, refine=refine,
                         max_probes=max_probes, **args)
  return hutchinson_trace(ClassifierLoss(model), variables["params"], key, num_probes, **args)
