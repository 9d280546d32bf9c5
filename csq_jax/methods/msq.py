"""MSQ (Han et al. 2025): LSB sparsity of round-clamped float weights.

No bit splitting: a round-clamp quantizer (``quantizers/msq.py``) gives each
layer's least-significant bits from its float weights, an L1 on those LSBs
makes them sparse, and every ``msq.prune_every`` search epochs layers whose
LSBs are sparse enough drop them, 1 or 2 at a time as a Hessian-aware
sensitivity decides (``hessian.py``). Reads ``config.msq``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from absl import logging

from csq_jax import hessian, transform
from csq_jax.methods import base
from csq_jax.quantizers import msq
from csq_jax.quantizers.msq import MSQWeight


class MSQ(base.Method):
  """MSQ (Han et al. 2025): L1 on each layer's ``lsb_k`` LSBs; every
  ``msq.prune_every`` search epochs, layers whose LSB sparsity reached
  ``msq.threshold`` drop those bits, ``k`` chosen per layer by Hessian-aware
  sensitivity (``msq.hessian``: layerwise Hutch++ traces, ``k = 2`` below the
  mean sensitivity by ``hessian_z`` standard errors) or 1."""

  searches = True
  section = "msq"
  fields = (
      ("reg_strength", base.at_least(0.0), "a number >= 0 (lambda of the L1 on LSBs)"),
      ("prune_every", base.int_at_least(1), "an integer >= 1 (epochs)"),
      ("threshold", lambda x, c: base.number(x) and 0.0 <= x <= 1.0, "a fraction of weights in [0, 1]"),
      ("hessian_sketch", base.int_at_least(0), "an integer >= 0 (0: simultaneous Hutchinson)"),
      ("hessian_probes", base.int_at_least(1), "an integer >= 1"),
      ("hessian_z", base.at_least(0.0), "a number >= 0 (standard errors)"),
      ("hessian_max_probes", base.int_at_least(0), "an integer >= 0 (0: no refinement)"),
      ("hessian_batches", base.int_at_least(1), "an integer >= 1"),
  )

  @classmethod
  def defaults(cls):
    return dict(
        reg_strength=0.05,  # lambda of the L1 on each layer's lsb_k LSBs
        prune_every=10,  # search epochs between LSB-pruning checks
        threshold=0.6,  # LSB sparsity at which a layer's LSBs are pruned
        # Hessian-aware k from per-layer traces on training batches: layerwise
        # Hutch++ (hessian.hutchpp_trace) with hessian_sketch sketch vectors and
        # hessian_probes deflated probes per layer (L * (2 sketch + probes)
        # Hessian-vector products; sketch 0: simultaneous Hutchinson, one HVP
        # per probe, far noisier); k = 2 only for layers below the mean
        # sensitivity by hessian_z standard errors (0: the paper's plain
        # "below the mean"); layers within that margin get more probes, up to
        # hessian_max_probes.
        hessian=True,
        hessian_sketch=8,
        hessian_probes=8,
        hessian_z=3.0,
        hessian_max_probes=32,
        hessian_batches=2,
    )

  @classmethod
  def jit_init(cls, options):
    return True

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    del key, options
    return msq.init_from_float(kernel, bits)

  def __init__(self, config):
    super().__init__(config)
    o = self.opts
    self.strength = float(o["reg_strength"])
    self.every = int(o["prune_every"])
    self.threshold = float(o["threshold"])
    self.use_hessian = bool(o["hessian"])
    self.probes = int(o["hessian_probes"])
    self.sketch = int(o["hessian_sketch"])
    self.z = float(o["hessian_z"])
    self.max_probes = int(o["hessian_max_probes"]) or None
    self.hessian_batches = int(o["hessian_batches"])
    self.tolerance = float(config.budget_tolerance)

  def regularizer(self, params, beta):
    del beta
    leaves = [v for v in transform.quantized_leaves(params).values() if isinstance(v, MSQWeight)]
    if not leaves or not base.over_budget(params, self.target, self.budget_weights(params)):
      return jnp.zeros((), jnp.float32), self.delta_s(params)
    total = sum((msq.regularizer(w) for w in leaves), jnp.zeros((), jnp.float32))
    return self.strength * total, self.delta_s(params)

  def sensitivities(self, params, ctx: base.AdjustContext) -> dict[str, dict[str, Any]]:
    """Per-layer Hessian measurements, ``{name: {path: value}}``: ``trace``
    (``Tr(H_l)``: layerwise Hutch++ with ``hessian_sketch`` sketch
    vectors and ``hessian_probes`` probes per layer, or simultaneous
    Hutchinson with ``hessian_probes`` probes when the sketch is 0),
    ``trace_stderr``, ``sensitivity`` (``Omega_l``), ``sensitivity_stderr``,
    ``lsb_k`` (``msq.prune_amounts`` with margin ``hessian_z``) and
    ``hessian_probes`` (probes per layer: layers ``msq.undecided`` leaves
    get more, up to ``hessian_max_probes``); ``{}`` without the
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

  def lsb_amounts(self, params, ctx: base.AdjustContext) -> tuple[dict[str, int], dict[str, float]]:
    """``({path: k}, {path: Omega})``: the Hessian-aware ``k`` of
    ``sensitivities``, or ``k = 1`` everywhere without the Hessian."""
    info = self.sensitivities(params, ctx)
    if not info:
      return {k: 1 for k, v in transform.quantized_leaves(params).items() if isinstance(v, MSQWeight)}, {}
    return info["lsb_k"], info["sensitivity"]

  def adjust(self, params, ctx):
    if self.every <= 0 or ctx.epoch % self.every or not base.over_budget(params, self.target,
                                                                         self.budget_weights(params)):
      return params, {}
    measured = self.sensitivities(params, ctx)
    omegas = measured.get("sensitivity", {})
    ks = measured.get("lsb_k") or {k: 1 for k, v in transform.quantized_leaves(params).items()
                                   if isinstance(v, MSQWeight)}
    leaves = transform.quantized_leaves(params)
    sizes = self.budget_weights(params)  # each layer's weight in the budget's average
    total = sum(sizes.values())
    avg = base.static_average_bits(params, sizes)
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

    params = base.map_with_path(params, MSQWeight, None, update)
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
    return base.map_with_path(params, MSQWeight, structure,
                          lambda p, w: w.replace(bits=structure[p][0], lsb_k=structure[p][1]))
