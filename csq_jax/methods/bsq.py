"""BSQ (Yang et al., ICLR 2021), as the authors' code (yanghr/BSQ) runs it.

Group Lasso on the bit planes weighted by memory
(``quantizers.bsq.weighted_group_lasso``), planes clamped to [0, 2] after
each step, re-quantization and precision adjustment every
``bsq.requant_every`` search epochs (``quantizers.bsq.requantize``); then a
last adjustment and the finetune of ``cifar_finetune.py``: each layer a float
latent rounded at its fixed precision (``BSQFinetuneWeight``), clamped to
[-1, 1] after each step, written back as exact planes by ``finalize``. No
precision changes after the search. Reads ``config.bsq``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from csq_jax import quantizers, transform
from csq_jax.methods import base
from csq_jax.quantizers import bsq
from csq_jax.quantizers.bsq import BSQFinetuneWeight, BSQWeight


class BSQ(base.Method):
  """BSQ with a budget (see the module docstring and ``regularizer``)."""

  searches = True
  section = "bsq"
  fields = (
      ("alpha", base.at_least(0.0), "a number >= 0"),
      ("requant_every", base.int_at_least(1), "an integer >= 1 (epochs)"),
      ("threshold", base.fraction, "a fraction of weights in [0, 1)"),
  )

  @classmethod
  def defaults(cls):
    # yanghr/BSQ's flags in brackets.
    return dict(
        # [--decay] group-Lasso strength; each layer's Lasso is weighted by
        # N_l n_l / sum_k N_k (its weights times its bits over the counted
        # weights), as the authors' code, so alpha means what --decay means.
        alpha=0.01,
        requant_every=50,  # [--Prun_Int] epochs between re-quantizations
        # [--thre / 100] a *fraction* of non-zero weights (theirs is a
        # percentage): an LSB plane at or below it is dropped, an MSB plane
        # below it dropped with saturation; 0 drops all-zero planes only.
        threshold=0.0,
    )

  @classmethod
  def jit_init(cls, options):
    return True

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    del key, options
    return bsq.init_from_float(kernel, bits)

  def __init__(self, config):
    super().__init__(config)
    self.alpha = float(self.opts["alpha"])
    self.every = int(self.opts["requant_every"])
    self.threshold = float(self.opts["threshold"])
    self.tolerance = float(config.budget_tolerance)

  def regularizer(self, params, beta):
    """``alpha * sum_l g_l N_l n_l B_GL(W^l) / sum_k N_k`` with a per-layer
    gate ``g_l`` (the sum over counted layers ``k``, as the authors'
    ``total_param()``).

    The gate (this project's addition, for a budget) looks at the
    *effective* precision of each layer (``bsq.effective_precision``: what a
    re-quantization would keep), every step. Left alone, the Lasso empties
    the same plane of every layer in lock-step and one re-quantization drops
    a whole bit from the model. So the layers are ranked, highest effective
    precision first (larger budget shares first among equals: weights, or
    MACs under ``budget_weighting="macs"``), and the Lasso acts on
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
    budget_weights = self.budget_weights(params)
    cost = np.asarray([budget_weights[k] for k in counted], np.float32)
    frac = jnp.asarray(cost / cost.sum())  # each layer's share of the budget's average
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
    params = base.map_type(bsq.clamp_planes, BSQWeight, params)
    return base.map_type(bsq.clamp_latent, BSQFinetuneWeight, params)

  def _requantize(self, params, threshold):
    return base.map_type(lambda w: bsq.requantize(w, threshold), BSQWeight, params)

  def adjust(self, params, ctx):
    if self.every <= 0 or ctx.epoch % self.every or ctx.epoch == ctx.epochs:
      return params, {}  # the last search epoch is followed by start_finetune's
    before = base.static_average_bits(params, self.budget_weights(params))
    params = self._requantize(params, self.threshold)
    return params, {"requantized": True, "avg_bits_before": before}

  def start_finetune(self, params):
    """The last precision adjustment, then the finetune leaves (fixed precision)."""
    return base.map_type(bsq.to_finetune, BSQWeight, self._requantize(params, self.threshold))

  def finalize(self, params):
    """Exact binary planes: a finetuned layer at its fixed precision
    (``finetune_to_planes``); without a finetune, the authors' last
    ``quant`` + ``pruning(threshold=0)`` (clip, drop all-zero planes only)."""
    def final(w):
      if isinstance(w, BSQFinetuneWeight):
        return bsq.finetune_to_planes(w)
      return bsq.requantize(w, 0.0) if isinstance(w, BSQWeight) else w

    return transform.map_quantized(final, params)

  def structure(self, params):
    return {k: [v.n_bits] for k, v in transform.quantized_leaves(params).items()
            if isinstance(v, (BSQWeight, BSQFinetuneWeight))}

  def restructure(self, params, structure):
    def reshape(path, w):
      n = structure[path][0]
      if isinstance(w, BSQFinetuneWeight):
        return w.replace(bits=n)
      planes = jnp.zeros((n,) + w.shape, jnp.float32)
      return BSQWeight(planes, planes, jnp.zeros((), jnp.float32))

    params = base.map_with_path(params, BSQWeight, structure, reshape)
    return base.map_with_path(params, BSQFinetuneWeight, structure, reshape)
