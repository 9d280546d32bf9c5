"""Training methods: what each one adds to the method-agnostic loop of train.py.

Every method is a quantizer (the leaf type that ``transform.quantize_params``
puts in place of each selected kernel) plus a few hooks the loop calls at
fixed points. The loop never branches on the method name.

=============  ==========================  =====================================
hook           called                      used by
=============  ==========================  =====================================
regularizer    in the loss, every step     CSQ (Eq. 7), BSQ (group Lasso),
               of the search phase         MSQ (L1 on LSBs)
after_update   after every optimizer step  BSQ (clamp the planes to [0, 2];
                                           finetune latents to [-1, 1])
adjust         on the host, after every    BSQ (re-quantization and precision
               search epoch                adjustment), MSQ (Hessian-aware LSB
                                           pruning)
start_finetune at the finetune phase       CSQ (freeze the bit selection, Eq. 4),
                                           BSQ (last precision adjustment, then
                                           float latents at fixed precision)
finalize       before the final model is   BSQ (exact binary planes, precision
               evaluated and reported      unchanged after a finetune)
=============  ==========================  =====================================

Precision changes of BSQ and MSQ alter the *structure* of the parameter tree
(BSQ's number of bit planes is a shape, MSQ's precision a static field): the
jitted step re-traces, ``structure``/``restructure`` describe the change for
checkpoints, and the loop carries the optimizer state of unchanged leaves over.

Budget control. CSQ's Eq. (7) pushes the average precision toward the target
from both sides. BSQ and MSQ only ever lower precision; here their penalty is
on while the average precision is above the target and off once it is
reached (BSQ: the precision a re-quantization would leave, checked every
step; MSQ: the current precision), and precision is lowered only by their own
mechanism (re-quantization, LSB pruning), so both stop at the target instead
of going wherever a fixed strength takes them. That gating is this project's
addition, so that every method is compared at the same budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from csq_jax import budget, hessian, quantizers, transform
from csq_jax.quantizers import bsq, csq, msq
from csq_jax.quantizers.bsq import BSQWeight
from csq_jax.quantizers.csq import CSQWeight
from csq_jax.quantizers.msq import MSQWeight

# Method name -> one-line description (README's methods table has the details).
METHODS = {
    "fp": "full precision: float kernels, nothing quantized",
    "ste": "uniform QAT: float latent, round-to-n-bits with a straight-through estimator",
    "csq_uniform": "CSQ bit planes with soft gates, every bit kept (Eq. 3)",
    "csq": "CSQ mixed precision: soft bit planes and bit masks, budget-aware penalty (Eqs. 5-7)",
    "bsq": "BSQ: STE-rounded float bit planes, group Lasso, periodic re-quantization (Eq. 1)",
    "msq": "MSQ: round-clamp LSBs of float weights, L1 on LSBs, Hessian-aware pruning",
}


@dataclasses.dataclass(frozen=True)
class AdjustContext:
  """What ``Method.adjust`` may look at after a search epoch.

  Attributes:
    epoch: search epochs completed so far (1 after the first).
    epochs: search epochs in total.
    model: the Flax model (``apply(variables, x, train=False)``).
    batch_stats: its BN statistics.
    batches: ``batches()`` yields training batches ``{"image", "label"}``.
    key: a PRNG key for this epoch.
  """

  epoch: int
  epochs: int
  model: Any
  batch_stats: Any
  batches: Callable[[], Iterable[dict]]
  key: jax.Array


def static_precisions(params: Any) -> dict[str, int]:
  """``{path: bits}`` known without running anything (``None`` values for
  layers whose precision is data, such as CSQ's learned masks)."""
  out = {}
  for path, leaf in transform.quantized_leaves(params).items():
    if isinstance(leaf, BSQWeight):
      out[path] = leaf.n_bits
    elif isinstance(leaf, MSQWeight):
      out[path] = leaf.bits
    elif hasattr(leaf, "bits"):  # STE
      out[path] = leaf.bits
    else:
      out[path] = None
  return out


def static_average_bits(params: Any) -> float:
  """Parameter-weighted average precision from static structure (a Python
  float, usable to gate a penalty at trace time)."""
  bits = static_precisions(params)
  sizes = budget.layer_sizes(params)
  if any(b is None for b in bits.values()):
    raise ValueError("static_average_bits needs layers of static precision (not CSQ).")
  total = sum(sizes.values())
  return sum(sizes[k] * bits[k] for k in bits) / total if total else 32.0


class Method:
  """The no-op method: float or fixed-precision training (FP, STE, CSQ-Uniform)."""

  name = "fp"
  searches = False  # whether it has a search phase with a budget

  def __init__(self, config):
    self.target = float(config.target_bits)
    self.weighting = config.budget_weighting

  def delta_s(self, params) -> jax.Array:
    """Average precision minus the target, no gradient (0 without counted layers)."""
    if not transform.quantized_leaves(params):
      return jnp.zeros((), jnp.float32)
    return jax.lax.stop_gradient(budget.average_bits(params, self.weighting) - self.target)

  def regularizer(self, params, beta) -> tuple[jax.Array, jax.Array]:
    """``(penalty, delta_s)`` added to the loss in the search phase (traced)."""
    del beta
    return jnp.zeros((), jnp.float32), self.delta_s(params)

  def after_update(self, params):
    """Applied to the parameters after every optimizer step (traced)."""
    return params

  def adjust(self, params, ctx: AdjustContext) -> tuple[Any, dict[str, Any]]:
    """Host-side change between search epochs: ``(params, info)``."""
    del ctx
    return params, {}

  def start_finetune(self, params):
    return params

  def finalize(self, params):
    return params

  def structure(self, params) -> dict[str, list[int]]:
    """Static per-layer structure that a checkpoint must record (JSON-able)."""
    del params
    return {}

  def restructure(self, params, structure: dict[str, list[int]]):
    """``params`` reshaped to ``structure`` (values are placeholders)."""
    del structure
    return params


class CSQ(Method):
  """CSQ mixed precision (Alg. 1): the budget-aware penalty of Eq. (7), then
  the bit selection frozen for the finetune (Eq. 4)."""

  name = "csq"
  searches = True

  def __init__(self, config):
    super().__init__(config)
    self.strength = float(config.reg_strength)
    self.min_bits = int(config.get("min_layer_bits", 1))

  def regularizer(self, params, beta):
    return budget.budget_penalty(params, beta, self.target, self.strength, self.weighting)

  def _with_min_bits(self, params):
    return _map_type(lambda q: csq.with_min_bits(q, self.min_bits), CSQWeight, params)

  def after_update(self, params):
    """Every layer keeps ``min_layer_bits`` during the search too: the
    projection runs after each step, so the budget term sees the bits a layer
    cannot lose and prunes others instead (a layer cut to 0 bits in the
    search and restored at the freeze overshot the target: 2.198 bits at
    target 2 on the default job)."""
    return self._with_min_bits(params)

  def start_finetune(self, params):
    """Freeze the selection (Eq. 4), each layer keeping ``min_layer_bits``."""
    return transform.set_mask_mode(self._with_min_bits(params), "frozen")

  def finalize(self, params):
    return self._with_min_bits(params)

  def start_round(self, params, rewind_params, mask_clamp: float):
    """The authors' multi-round recipe: keep the bit selection found so far,
    its mask logits clipped to ``[-mask_clamp, mask_clamp]`` so that they can
    move again under the restarted temperature, and rewind everything else
    (bit planes, scales, float layers) to ``rewind_params``."""

    def merge(now, early):
      if isinstance(now, CSQWeight):
        return early.replace(mask_logits=jnp.clip(now.mask_logits, -mask_clamp, mask_clamp))
      return early

    return jax.tree_util.tree_map(merge, params, rewind_params, is_leaf=transform.is_leaf)


def _map_type(fn, leaf_type, params):
  return transform.map_quantized(lambda q: fn(q) if isinstance(q, leaf_type) else q, params)


def _over_budget(params, target: float) -> bool:
  return static_average_bits(params) > target + 1e-9


class BSQ(Method):
  """BSQ (Yang et al. 2021), as the authors' code runs it: group Lasso on the
  bit planes weighted by memory (``bsq.weighted_group_lasso``), planes clamped
  to [0, 2] after each step, re-quantization and precision adjustment every
  ``bsq_requant_every`` search epochs (``bsq.requantize``); then a last
  adjustment and the finetune of ``cifar_finetune.py``: each layer a float
  latent rounded at its fixed precision (``bsq.BSQFinetuneWeight``), clamped
  to [-1, 1] after each step, written back as exact planes by ``finalize``.
  No precision changes after the search."""

  name = "bsq"
  searches = True

  def __init__(self, config):
    super().__init__(config)
    self.alpha = float(config.bsq_alpha)
    self.tolerance = float(config.budget_tolerance)
    self.every = int(config.bsq_requant_every)
    self.threshold = float(config.bsq_threshold)

  def regularizer(self, params, beta):
    """``alpha * sum_l g_l N_l n_l B_GL(W^l) / sum_k N_k`` with a per-layer
    gate ``g_l`` (the sum over counted layers ``k``, as the authors'
    ``total_param()``).

    The gate (this project's addition, for a budget) looks at the
    *effective* precision of each layer (``bsq.effective_precision``: what a
    re-quantization would keep), every step. Left alone, the Lasso empties
    the same plane of every layer in lock-step and one re-quantization drops
    a whole bit from the model. So the layers are ranked, highest effective
    precision first (larger layers first among equals), and the Lasso acts on
    the leading layers whose one-bit drops together fit in
    ``average - (target - budget_tolerance)`` (at least the first one while
    the average is above the target; none once it is at or below it).
    """
    del beta
    counted = transform.quantized_leaves(params)
    names = [k for k, v in counted.items() if isinstance(v, BSQWeight)]
    if not names:
      return jnp.zeros((), jnp.float32), self.delta_s(params)
    bits = jnp.stack([bsq.effective_precision(v) if isinstance(v, BSQWeight) else quantizers.precision(v)
                      for v in counted.values()]).astype(jnp.float32)
    sizes = np.asarray([quantizers.num_weights(v) for v in counted.values()], np.float32)
    frac = jnp.asarray(sizes / sizes.sum())
    delta = jax.lax.stop_gradient(jnp.sum(frac * bits) - self.target)
    is_bsq = jnp.asarray([isinstance(v, BSQWeight) for v in counted.values()])
    order = jnp.argsort(-(bits + frac) - jnp.where(is_bsq, 0.0, 1e3))  # fixed layers last
    drop = jnp.where(is_bsq, frac, jnp.inf)[order]
    fits = jnp.cumsum(drop) <= delta + self.tolerance
    ranked_on = (fits | (jnp.arange(len(order)) == 0)) & (delta > 0) & is_bsq[order]
    gate = jnp.zeros(len(order), bool).at[order].set(ranked_on)
    weights = bsq.memory_weights({k: counted[k] for k in names}, int(sizes.sum()))
    index = {k: i for i, k in enumerate(counted)}
    total = sum((jnp.where(gate[index[k]], weights[k] * bsq.group_lasso(counted[k]), 0.0) for k in names),
                jnp.zeros((), jnp.float32))
    return self.alpha * total, delta

  def after_update(self, params):
    """Planes clamped to [0, 2] (search), latents to [-1, 1] (finetune)."""
    params = _map_type(bsq.clamp_planes, BSQWeight, params)
    return _map_type(bsq.clamp_latent, bsq.BSQFinetuneWeight, params)

  def _requantize(self, params, threshold):
    return _map_type(lambda w: bsq.requantize(w, threshold), BSQWeight, params)

  def adjust(self, params, ctx):
    if self.every <= 0 or ctx.epoch % self.every or ctx.epoch == ctx.epochs:
      return params, {}  # the last search epoch is followed by start_finetune's
    before = static_average_bits(params)
    params = self._requantize(params, self.threshold)
    return params, {"requantized": True, "avg_bits_before": before}

  def start_finetune(self, params):
    """The last precision adjustment, then the finetune leaves (fixed precision)."""
    return _map_type(bsq.to_finetune, BSQWeight, self._requantize(params, self.threshold))

  def finalize(self, params):
    """Exact binary planes: a finetuned layer at its fixed precision
    (``finetune_to_planes``); without a finetune, the authors' last
    ``quant`` + ``pruning(threshold=0)`` (clip, drop all-zero planes only)."""
    def final(w):
      if isinstance(w, bsq.BSQFinetuneWeight):
        return bsq.finetune_to_planes(w)
      return bsq.requantize(w, 0.0) if isinstance(w, BSQWeight) else w

    return transform.map_quantized(final, params)

  def structure(self, params):
    return {k: [v.n_bits] for k, v in transform.quantized_leaves(params).items()
            if isinstance(v, (BSQWeight, bsq.BSQFinetuneWeight))}

  def restructure(self, params, structure):
    def reshape(path, w):
      n = structure[path][0]
      if isinstance(w, bsq.BSQFinetuneWeight):
        return w.replace(bits=n)
      planes = jnp.zeros((n,) + w.shape, jnp.float32)
      return BSQWeight(planes, planes, jnp.zeros((), jnp.float32))

    params = _map_with_path(params, BSQWeight, structure, reshape)
    return _map_with_path(params, bsq.BSQFinetuneWeight, structure, reshape)


class MSQ(Method):
  """MSQ (Han et al. 2025): L1 on each layer's ``lsb_k`` LSBs; every
  ``msq_prune_every`` search epochs, layers whose LSB sparsity reached
  ``msq_threshold`` drop those bits, ``k`` chosen per layer by Hessian-aware
  sensitivity (``msq_hessian``: layerwise Hutch++ traces, ``k = 2`` below the
  mean sensitivity by ``msq_hessian_z`` standard errors) or 1."""

  name = "msq"
  searches = True

  def __init__(self, config):
    super().__init__(config)
    self.strength = float(config.msq_lambda)
    self.every = int(config.msq_prune_every)
    self.threshold = float(config.msq_threshold)
    self.use_hessian = bool(config.msq_hessian)
    self.probes = int(config.msq_hessian_probes)
    self.sketch = int(config.get("msq_hessian_sketch", 0))
    self.z = float(config.get("msq_hessian_z", 0.0))
    self.max_probes = int(config.get("msq_hessian_max_probes", 0)) or None
    self.hessian_batches = int(config.msq_hessian_batches)
    self.tolerance = float(config.budget_tolerance)

  def regularizer(self, params, beta):
    del beta
    leaves = [v for v in transform.quantized_leaves(params).values() if isinstance(v, MSQWeight)]
    if not leaves or not _over_budget(params, self.target):
      return jnp.zeros((), jnp.float32), self.delta_s(params)
    total = sum((msq.regularizer(w) for w in leaves), jnp.zeros((), jnp.float32))
    return self.strength * total, self.delta_s(params)

  def sensitivities(self, params, ctx: AdjustContext) -> dict[str, dict[str, Any]]:
    """Per-layer Hessian measurements, ``{name: {path: value}}``: ``trace``
    (``Tr(H_l)``: layerwise Hutch++ with ``msq_hessian_sketch`` sketch
    vectors and ``msq_hessian_probes`` probes per layer, or simultaneous
    Hutchinson with ``msq_hessian_probes`` probes when the sketch is 0),
    ``trace_stderr``, ``sensitivity`` (``Omega_l``), ``sensitivity_stderr``,
    ``lsb_k`` (``msq.prune_amounts`` with margin ``msq_hessian_z``) and
    ``hessian_probes`` (probes per layer: layers ``msq.undecided`` leaves
    get more, up to ``msq_hessian_max_probes``); ``{}`` without the
    Hessian."""
    leaves = {k: v for k, v in transform.quantized_leaves(params).items() if isinstance(v, MSQWeight)}
    if not self.use_hessian or not leaves:
      return {}
    batches = [b for _, b in zip(range(self.hessian_batches), ctx.batches())]
    variables = {"params": transform.materialize(params, None, hard=True), "batch_stats": ctx.batch_stats}
    # Omega is linear in the trace, so its standard error is ||W_n - W|| times the trace's.
    norms = {k: float(msq.sensitivity(1.0, w)) for k, w in leaves.items()}

    def omegas_of(est):
      return ({k: est.mean[k] * e for k, e in norms.items()}, {k: est.stderr[k] * e for k, e in norms.items()})

    traces = hessian.layer_traces_for_model(ctx.model, variables, batches, ctx.key, self.probes,
                                            select_fn=lambda p: p in leaves, sketch=self.sketch,
                                            refine=lambda est: msq.undecided(*omegas_of(est), self.z),
                                            max_probes=self.max_probes)
    omegas, errors = omegas_of(traces)
    ks = msq.prune_amounts(omegas, {k: w.bits for k, w in leaves.items()}, errors, self.z)
    return {"trace": dict(traces.mean), "trace_stderr": dict(traces.stderr), "sensitivity": omegas,
            "sensitivity_stderr": errors, "lsb_k": ks,
            "hessian_probes": {k: len(traces.samples[k]) for k in leaves}}

  def lsb_amounts(self, params, ctx: AdjustContext) -> tuple[dict[str, int], dict[str, float]]:
    """``({path: k}, {path: Omega})``: the Hessian-aware ``k`` of
    ``sensitivities``, or ``k = 1`` everywhere without the Hessian."""
    info = self.sensitivities(params, ctx)
    if not info:
      return {k: 1 for k, v in transform.quantized_leaves(params).items() if isinstance(v, MSQWeight)}, {}
    return info["lsb_k"], info["sensitivity"]

  def adjust(self, params, ctx):
    if self.every <= 0 or ctx.epoch % self.every or not _over_budget(params, self.target):
      return params, {}
    measured = self.sensitivities(params, ctx)
    omegas = measured.get("sensitivity", {})
    ks = measured.get("lsb_k") or {k: 1 for k, v in transform.quantized_leaves(params).items()
                                   if isinstance(v, MSQWeight)}
    leaves = transform.quantized_leaves(params)
    sizes = budget.layer_sizes(params)
    total = sum(sizes.values())
    avg = static_average_bits(params)
    sparsity = {p: float(msq.lsb_sparsity(leaves[p], leaves[p].lsb_k, exclude_max=True))
                for p, w in leaves.items() if isinstance(w, MSQWeight) and w.bits > 1}
    # Prune the layers whose penalized LSBs are sparse enough, least sensitive
    # first, until the budget is met; never more than `tolerance` below it.
    order = sorted(sparsity, key=lambda p: (omegas.get(p, 0.0), -sparsity[p]))
    pruned = {}
    for path in order:
      if avg <= self.target + 1e-9:
        break
      w = leaves[path]
      if sparsity[path] < self.threshold:
        continue
      for k in range(w.lsb_k, 0, -1):
        new_avg = avg - k * sizes[path] / total
        if new_avg >= self.target - self.tolerance - 1e-9:
          pruned[path] = k
          avg = new_avg
          break
    def update(path, w):
      w = msq.prune(w, pruned.get(path, 0))
      return msq.with_lsb_k(w, ks.get(path, 1))

    params = _map_with_path(params, MSQWeight, None, update)
    if pruned:
      logging.info("MSQ pruned %s (avg bits now %.3f).", pruned, avg)
    info = {"pruned_bits": sum(pruned.values()), "lsb_sparsity_min": min(sparsity.values()) if sparsity else 1.0}
    # {path: value} dicts into metrics.jsonl as adjust_<name>: adjust_trace,
    # adjust_trace_stderr, adjust_sensitivity (Omega_l, the report plots it),
    # adjust_sensitivity_stderr and adjust_lsb_k.
    info.update(measured)
    return params, info

  def structure(self, params):
    return {k: [v.bits, v.lsb_k] for k, v in transform.quantized_leaves(params).items()
            if isinstance(v, MSQWeight)}

  def restructure(self, params, structure):
    return _map_with_path(params, MSQWeight, structure,
                          lambda p, w: w.replace(bits=structure[p][0], lsb_k=structure[p][1]))


def _map_with_path(params, leaf_type, structure, fn):
  """``fn(path, leaf)`` on every quantized leaf of ``leaf_type`` (and, when
  ``structure`` is given, recorded in it)."""

  def visit(path, x):
    if not isinstance(x, leaf_type):
      return x
    name = transform.path_str(path)
    if structure is not None and name not in structure:
      return x
    return fn(name, x)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=transform.is_leaf)


_CLASSES = {"fp": Method, "ste": Method, "csq_uniform": Method, "csq": CSQ, "bsq": BSQ, "msq": MSQ}


def get(config) -> Method:
  """The method named by ``config.method``."""
  try:
    cls = _CLASSES[config.method]
  except KeyError:
    raise ValueError(f"Unknown method {config.method!r}; expected one of {tuple(METHODS)}.") from None
  method = cls(config)
  method.name = config.method
  return method


def trainable_params(params: Any) -> int:
  """Number of trained scalars in a parameter tree (quantizer and float leaves)."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
