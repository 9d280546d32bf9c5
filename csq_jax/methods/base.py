"""What a training method is: the ``Method`` base class every method extends.

A method is a quantizer (the leaf type that ``transform.quantize_params``
puts in place of each selected kernel, made by ``init_leaf``) plus a few
hooks the method-agnostic loop of ``train.py`` calls at fixed points. The
loop never branches on a method's name; it reads the attributes below.

=============== ========================== =====================================
hook            called                     used by
=============== ========================== =====================================
regularizer     in the loss, every step    CSQ (Eq. 7), BSQ (group Lasso),
                of the search phase        MSQ (L1 on LSBs)
after_update    after every optimizer step CSQ (``min_layer_bits``), BSQ (clamp
                                           the planes; finetune latents)
adjust          on the host, after every   BSQ (re-quantization and precision
                search epoch               adjustment), MSQ (Hessian-aware LSB
                                           pruning)
start_round     a later search round       CSQ's multi-round recipe
start_finetune  at the finetune phase      CSQ (freeze the bit selection, Eq. 4),
                                           BSQ (fixed-precision latents)
finalize        before the final model is  CSQ, BSQ (exact binary planes)
                evaluated and reported
structure /     checkpoints of a changed   BSQ (planes), MSQ (static bits)
restructure     parameter structure
=============== ========================== =====================================

Each method also owns its config section (``section``: ``config.csq.*``,
``config.bsq.*``, ... with ``defaults()`` and ``validate``), its optimizer
labels (``leaf_labels``, ``optimizer_groups``) and which sections it reads
(``reads``), so that ``report`` and ``sweep`` know which fields a run
ignores without a hand-kept list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from csq_jax import allowed_bits, budget, quantizers, transform

# (field, check(value, config), what is expected): range checks of config fields.
FieldCheck = tuple[str, Callable[[Any, Any], bool], str]


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


def number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def int_at_least(lo: int):
  return lambda x, c: isinstance(x, int) and not isinstance(x, bool) and x >= lo


def at_least(lo: float, strict: bool = False):
  return lambda x, c: number(x) and (x > lo if strict else x >= lo)


def fraction(x, c) -> bool:
  return number(x) and 0.0 <= x < 1.0


def static_precisions(params: Any) -> dict[str, int | None]:
  """``{path: bits}`` known without running anything (``None`` for layers
  whose precision is data, such as CSQ's learned masks)."""
  return {k: quantizers.static_precision(v) for k, v in transform.quantized_leaves(params).items()}


def static_average_bits(params: Any, weights: dict[str, float] | None = None) -> float:
  """Average precision from static structure (a Python float, usable to gate
  a penalty at trace time), weighted by ``weights`` (``budget.layer_weights``;
  default: each layer's number of weights)."""
  bits = static_precisions(params)
  weights = weights or {k: float(v) for k, v in budget.layer_sizes(params).items()}
  if any(b is None for b in bits.values()):
    raise ValueError("static_average_bits needs layers of static precision (not CSQ).")
  total = sum(weights[k] for k in bits)
  return sum(weights[k] * bits[k] for k in bits) / total if total else 32.0


def over_budget(params, target: float, weights: dict[str, float] | None = None) -> bool:
  return static_average_bits(params, weights) > target + 1e-9


def map_type(fn, leaf_type, params):
  """``fn`` on every quantized leaf of ``leaf_type``; other leaves pass."""
  return transform.map_quantized(lambda q: fn(q) if isinstance(q, leaf_type) else q, params)


def map_with_path(params, leaf_type, structure, fn):
  """``fn(path, leaf)`` on every quantized leaf of ``leaf_type`` (and, when
  ``structure`` is given, recorded in it)."""

  def visit(name, x):
    if not isinstance(x, leaf_type) or (structure is not None and name not in structure):
      return x
    return fn(name, x)

  return transform.map_quantized_with_path(visit, params)


def trainable_params(params: Any) -> int:
  """Number of trained scalars in a parameter tree (quantizer and float leaves)."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


class Method:
  """The base method: float training of the selected kernels' quantizer, no
  search. Subclasses set the class attributes and override what they use.

  Class attributes:
    name: the registry name (set by ``registry.get`` to ``config.method``).
    searches: mixed precision searched under ``target_bits`` (a search phase
      with the regularizer and ``adjust``); otherwise every quantized layer
      is at ``target_bits`` (or float, if not ``quantizes``).
    quantizes: whether ``quantize`` rules make quantizer leaves (FP: no).
    uses_temperature: whether the gates' temperature beta matters (CSQ).
    section: the config section this method owns (``config.<section>.*``)
      with ``defaults()``; ``None`` for none.
    reads: sections it reads (defaults to its own).
    fields: range checks of its section, ``(field, check, expected)``.
  """

  name = ""
  searches = False
  quantizes = True
  uses_temperature = False
  section: str | None = None
  reads: tuple[str, ...] | None = None
  fields: tuple[FieldCheck, ...] = ()

  # -- config ----------------------------------------------------------------

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """The section's fields with their default values (and a comment each
    in the subclass)."""
    return {}

  @classmethod
  def sections(cls) -> tuple[str, ...]:
    """The config sections this method reads."""
    if cls.reads is not None:
      return tuple(cls.reads)
    return (cls.section,) if cls.section else ()

  @classmethod
  def add_section(cls, config: ml_collections.ConfigDict) -> None:
    """Give ``config`` this method's section with its defaults if it lacks it
    (a user's method named on the command line)."""
    if cls.section and cls.section not in config:
      with config.unlocked():
        config[cls.section] = ml_collections.ConfigDict(cls.defaults())

  @classmethod
  def options(cls, config) -> Mapping[str, Any]:
    """The section's values in ``config``, over its defaults."""
    merged = dict(cls.defaults())
    for s in cls.sections():
      if s in config:
        merged.update(config[s].to_dict() if hasattr(config[s], "to_dict") else dict(config[s]))
    return merged

  @classmethod
  def validate(cls, config) -> None:
    """Raise ``ValueError`` saying what to choose for a config this method
    cannot run: the budget (searching: a target in ``[1, n_bits]``; fixed: a
    whole number of bits) and its section's ranges."""
    if cls.quantizes and cls.searches and not 1 <= config.target_bits <= config.n_bits:
      raise ValueError(
          f"target_bits={config.target_bits} is impossible with n_bits={config.n_bits} bit planes:"
          f" choose a target in [1, {config.n_bits}] (or raise n_bits).")
    if cls.quantizes and not cls.searches and not (1 <= config.target_bits <= config.n_bits
                                                   and float(config.target_bits).is_integer()):
      raise ValueError(
          f"target_bits={config.target_bits} cannot be the fixed precision of method {config.method}: choose a"
          f" whole number of bits in [1, {config.n_bits}] (n_bits={config.n_bits}; raise n_bits for more).")
    if cls.section and cls.section in config:
      section = config[cls.section]
      for field, ok, expected in cls.fields:
        if field in section and not ok(section[field], config):
          raise ValueError(f"{cls.section}.{field}={section[field]!r} is out of range: expected {expected}.")

  @classmethod
  def check_options(cls, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for ``init_leaf`` options it cannot use."""
    del options

  # -- quantizer leaves --------------------------------------------------------

  def __init__(self, config):
    self.config = config
    self.target = float(config.target_bits)
    self.weighting = config.budget_weighting
    self.macs: dict[str, int] | None = None  # per-layer MACs, set by the loop for budget_weighting="macs"
    self.table: budget.CostTable | None = None  # set by the loop for budget_weighting="table:PATH"
    self.allowed = allowed_bits.parse(config.get("allowed_bits", "any"))
    self.opts = self.options(config)

  @property
  def leaf_bits(self) -> int:
    """Bits of a ``quantize`` rule without its own: the bit planes
    (``n_bits``) of a searching method, the target of a fixed one."""
    return int(self.config.n_bits) if self.searches else int(round(self.target))

  def quantize_spec(self) -> transform.QuantizeSpec:
    """How ``quantize`` rules turn this run's kernels into leaves."""
    return transform.QuantizeSpec(self.name or self.config.method, self.leaf_bits, self.opts)

  @classmethod
  def jit_init(cls, options: Mapping[str, Any]) -> bool:
    """Whether ``quantize_params`` may jit ``init_leaf`` with ``options`` (one
    compilation per kernel shape instead of one per op and shape). True only
    where ``init_leaf`` is traceable and its jitted values are its op-by-op
    values; False by default, so a user's method that reads its kernel on
    the host still works."""
    del options
    return False

  @classmethod
  def init_leaf(cls, kernel: jax.Array, bits: int, key: jax.Array | None, options: Mapping[str, Any]):
    """The quantizer leaf of a float ``kernel`` at ``bits`` (``key``: a PRNG
    key for random inits; ``options``: the method's section)."""
    raise NotImplementedError(f"{cls.__name__} makes no quantizer leaves.")

  def leaf_labels(self, leaf) -> Any:
    """Optimizer label of each field of a quantizer leaf (``"weights"``:
    the weights' optimizer; other labels name a group of ``optimizer_groups``)."""
    return jax.tree_util.tree_map(lambda _: "weights", leaf)

  def param_labels(self, params: Any) -> Any:
    """Labels for ``optax.multi_transform``: ``leaf_labels`` of every
    quantizer leaf, ``"weights"`` for float leaves."""
    return jax.tree_util.tree_map(
        lambda x: self.leaf_labels(x) if transform.is_leaf(x) else jax.tree_util.tree_map(lambda _: "weights", x),
        params, is_leaf=transform.is_leaf)

  def optimizer_groups(self, sgd: Callable[[float, bool], optax.GradientTransformation]
                       ) -> dict[str, optax.GradientTransformation]:
    """Optimizers of labels other than ``"weights"`` (``sgd(momentum,
    weight_decay_on)`` makes an SGD on the phase's schedule)."""
    del sgd
    return {}

  # -- schedule ----------------------------------------------------------------

  def search_rounds(self) -> int:
    """Rounds the search is split into (beta restarted in each)."""
    return 1

  def rewind_epoch(self) -> int | None:
    """Epoch after which the weights later rounds rewind to are saved."""
    return None

  # -- hooks -------------------------------------------------------------------

  def budget_weights(self, params) -> dict[str, float]:
    """Each counted layer's weight in the budget (``budget.layer_weights``)."""
    return budget.layer_weights(params, self.weighting, self.macs, self.table)

  def delta_s(self, params) -> jax.Array:
    """Average precision (in the budget's weighting) minus the target, no
    gradient (0 without counted layers)."""
    if not transform.quantized_leaves(params):
      return jnp.zeros((), jnp.float32)
    return jax.lax.stop_gradient(budget.average_bits(params, self.weighting, self.macs, self.table) - self.target)

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

  def start_round(self, params, rewind_params):
    """Parameters for a later search round (default: rewound)."""
    del params
    return rewind_params

  def start_finetune(self, params):
    return params

  def fit_allowed(self, params):
    """Every searched layer moved to an allowed width within the budget
    (``allowed_bits.fit``), when the search ends; host side."""
    if not self.searches or not self.allowed:
      return params
    return allowed_bits.fit(params, self.allowed, self.target, self.budget_weights(params), self.table)

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
