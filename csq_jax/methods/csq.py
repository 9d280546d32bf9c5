"""CSQ (Xiao et al.): soft bit planes and bit masks under a budget (Alg. 1).

``CSQ`` searches each layer's precision with the budget-aware penalty of
Eq. (7), then freezes the bit selection for the finetune (Eq. 4);
``CSQUniform`` keeps every bit plane (Eq. 3) at ``target_bits``. Both read
the ``config.csq`` section; the quantizer is ``quantizers/csq.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from csq_jax import allowed_bits, budget, transform
from csq_jax.methods import base
from csq_jax.quantizers import csq
from csq_jax.quantizers.csq import CSQWeight

INITS = ("float", "random")


def _fan_in(shape) -> int:
  return int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


def set_mask_mode(qparams, mask_mode: str):
  """Switch every learned/frozen CSQ mask to ``mask_mode`` (Alg. 1's finetune
  freezes the selection: ``set_mask_mode(q, "frozen")``)."""

  def switch(leaf):
    if isinstance(leaf, CSQWeight) and leaf.mask_mode != "none":
      return csq.with_mask_mode(leaf, mask_mode)
    return leaf

  return transform.map_quantized(switch, qparams)


class _CSQFamily(base.Method):
  """What CSQ and CSQ-Uniform share: the section, the leaf, the temperature."""

  section = "csq"
  uses_temperature = True
  mask_mode = "learned"
  fields = (
      ("reg_strength", base.at_least(0.0), "a number >= 0 (lambda of Eq. 7)"),
      ("min_layer_bits", lambda x, c: base.int_at_least(0)(x, c) and x <= c.n_bits,
       "an integer in [0, n_bits]"),
      ("init", lambda x, c: x in INITS, f"one of {INITS}"),
      ("logit_init", base.at_least(0.0, strict=True), "a number > 0"),
      ("mask_momentum", base.fraction, "a number in [0, 1)"),
      ("rounds", lambda x, c: base.int_at_least(1)(x, c) and x <= c.num_epochs,
       "an integer in [1, num_epochs]"),
      ("rewind_epoch", lambda x, c: c.csq.rounds == 1 or 0 <= x < c.num_epochs // c.csq.rounds,
       "an epoch of the first round (0 .. num_epochs // rounds - 1)"),
      ("mask_clamp", base.at_least(0.0, strict=True), "a number > 0"),
  )

  @classmethod
  def defaults(cls):
    return dict(
        reg_strength=0.01,  # lambda of Eq. (7)
        # Bits every layer keeps, enforced after every search step (so the
        # budget term's Delta_S counts them) and at the freeze: Eq. (7) alone
        # can prune a layer's last bit, and a 0-bit layer cuts the network.
        min_layer_bits=1,
        init="float",  # float: bit planes of the model's (or init_from's) weights; random: random logits
        # Initial bit logits (init="float"): a set bit at logit_init, every other
        # logit (unset bits, the opposite sign's plane) at off_logit. The
        # authors' ini2bit: 1 and 0, so undecided bits sit on the gate's
        # boundary (-logit_init: the symmetric start, measured worse, README).
        logit_init=1.0,
        off_logit=0.0,
        decay_mask_logits=False,  # weight decay on m_B would pull masks toward the 0 boundary
        mask_momentum=0.9,  # SGD momentum of the mask logits (the paper: 0.9)
        # The authors' multi-round recipe: the search split into `rounds`
        # rounds; each later round keeps the masks (logits clipped to
        # +-mask_clamp), rewinds every other weight to its value after
        # rewind_epoch epochs and restarts beta. 1: the paper's single search.
        rounds=1,
        rewind_epoch=0,
        mask_clamp=1.0,
    )

  @classmethod
  def check_options(cls, options):
    if options.get("init", "float") not in INITS:
      raise ValueError(f"Unknown CSQ init {options['init']!r}; expected one of {INITS}.")

  @classmethod
  def jit_init(cls, options):
    """Not the random init: its scale divides by a standard deviation, a
    reduction whose jitted result differs in the last bit."""
    return options.get("init", "float") != "random"

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    shape = np.shape(kernel)
    if options["init"] == "random":
      if key is None:
        raise ValueError("CSQ init='random' needs a PRNG key.")
      return csq.init_random(key, shape, _fan_in(shape), bits, options["logit_init"], cls.mask_mode)
    return csq.init_from_float(kernel, bits, options["logit_init"], cls.mask_mode, options["off_logit"])

  def leaf_labels(self, leaf):
    """The mask logits have their own optimizer (``optimizer_groups``).
    Layers that a rule fixes at a precision are STE leaves: base labels."""
    if not isinstance(leaf, CSQWeight):
      return super().leaf_labels(leaf)
    return CSQWeight("weights", "weights", "mask", "weights", leaf.mask_mode)

  def optimizer_groups(self, sgd):
    """SGD on the mask logits with ``mask_momentum``, and no weight decay
    unless ``decay_mask_logits``: the budget term acts on them like a
    bang-bang controller (its sign flips with Delta_S), and heavy momentum
    carries many masks past the target after each flip."""
    return {"mask": sgd(float(self.opts["mask_momentum"]), bool(self.opts["decay_mask_logits"]))}


class CSQUniform(_CSQFamily):
  """CSQ-Uniform (Eq. 3): every bit plane of a ``target_bits``-bit layer
  kept, soft gates annealed as CSQ's."""

  mask_mode = "none"

  @classmethod
  def validate(cls, config):
    super().validate(config)
    if config.csq.rounds != 1:
      raise ValueError(f"csq.rounds={config.csq.rounds}: the multi-round recipe searches masks (method csq);"
                       " use csq.rounds=1 with csq_uniform.")


class CSQ(_CSQFamily):
  """CSQ mixed precision (Alg. 1): the budget-aware penalty of Eq. (7), then
  the bit selection frozen for the finetune (Eq. 4)."""

  searches = True

  def __init__(self, config):
    super().__init__(config)
    self.strength = float(self.opts["reg_strength"])
    self.min_bits = int(self.opts["min_layer_bits"])

  @classmethod
  def validate(cls, config):
    super().validate(config)
    allowed = allowed_bits.parse(config.get("allowed_bits", "any"))
    if allowed and config.csq.min_layer_bits > allowed[0]:
      raise ValueError(f"csq.min_layer_bits={config.csq.min_layer_bits} would raise a layer above its allowed width"
                       f" {allowed[0]} at the end (allowed_bits {allowed}); set it to at most {allowed[0]}.")

  def search_rounds(self):
    return int(self.opts["rounds"])

  def rewind_epoch(self):
    return int(self.opts["rewind_epoch"]) if self.search_rounds() > 1 else None

  def regularizer(self, params, beta):
    return budget.budget_penalty(params, beta, self.target, self.strength, self.weighting, self.macs,
                                 self.table)

  def _with_min_bits(self, params):
    return base.map_type(lambda q: csq.with_min_bits(q, self.min_bits), CSQWeight, params)

  def after_update(self, params):
    """Every layer keeps ``min_layer_bits`` during the search too: the
    projection runs after each step, so the budget term sees the bits a layer
    cannot lose and prunes others instead (a layer cut to 0 bits in the
    search and restored at the freeze overshot the target: 2.198 bits at
    target 2 on the default job)."""
    return self._with_min_bits(params)

  def start_finetune(self, params):
    """Freeze the selection (Eq. 4), each layer keeping ``min_layer_bits``."""
    return set_mask_mode(self._with_min_bits(params), "frozen")

  def finalize(self, params):
    return self._with_min_bits(params)

  def start_round(self, params, rewind_params):
    """The authors' multi-round recipe: keep the bit selection found so far,
    its mask logits clipped to ``[-mask_clamp, mask_clamp]`` so that they can
    move again under the restarted temperature, and rewind everything else
    (bit planes, scales, float layers) to ``rewind_params``."""
    clamp = float(self.opts["mask_clamp"])

    def merge(now, early):
      if isinstance(now, CSQWeight):
        return early.replace(mask_logits=jnp.clip(now.mask_logits, -clamp, clamp))
      return early

    return jax.tree_util.tree_map(merge, params, rewind_params, is_leaf=transform.is_leaf)
