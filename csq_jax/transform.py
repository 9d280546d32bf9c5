"""Apply a weight quantizer to any Flax parameter tree, chosen by path rules.

A model never holds quantized weights. ``quantize_params`` replaces selected
leaves of a float parameter tree (a Linen ``params`` dict or an NNX ``State``
from ``nnx.split``) with quantizer parameters; ``materialize`` maps them back
to float weights, inside the jitted step, for an ordinary ``model.apply``.

Rules follow qwix's design: a regex is matched in full against the leaf's
``/``-joined path (e.g. ``stage1_block0/conv1/kernel``); the first full match
wins; leaves no rule matches stay float; rules that match nothing are
reported so that a typo does not silently leave a layer unquantized.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from csq_jax import quantizers
from csq_jax.methods import registry  # names only, no JAX: the method modules load on use

Action = Literal["quantize", "float", "fixed"]
ACTIONS = ("quantize", "float", "fixed")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One path rule.

  Attributes:
    pattern: regex matched in full against the ``/``-joined parameter path.
    action: ``"quantize"`` (the run's method at ``bits``: the layer counts in
      the budget), ``"fixed"`` (uniform STE at ``bits``, counted, never
      searched), or ``"float"`` (kept in floating point, not counted).
    bits: for ``quantize``, the width of the bit planes (CSQ's ``n``) or the
      fixed precision (STE, CSQ-Uniform); for ``fixed``, the precision.
  """

  pattern: str
  action: Action = "quantize"
  bits: int | None = None

  @property
  def fixed_bits(self) -> int:
    """A ``fixed`` rule's precision (8 unless it names one)."""
    return 8 if self.bits is None else self.bits

  def __post_init__(self):
    if self.action not in ACTIONS:
      raise ValueError(f"Rule {self.pattern!r}: unknown action {self.action!r}; expected one of {ACTIONS}.")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule {self.pattern!r}: the pattern is not a valid regular expression ({e});"
                       " fix it in config.rules.") from None
    if self.bits is not None and not 1 <= self.bits <= 16:
      raise ValueError(f"Rule {self.pattern!r}: bits must be in 1..16, got {self.bits}.")


def rules_from_config(items: Iterable[Sequence[Any]]) -> tuple[Rule, ...]:
  """Rules from config tuples ``(pattern, action[, bits])``."""
  rules = []
  for i, item in enumerate(items):
    if isinstance(item, str) or not 1 <= len(item) <= 3:
      raise ValueError(f"Rule {i} {item!r}: write (pattern, action[, bits]), e.g. ('.*kernel', 'quantize').")
    rules.append(Rule(*item))
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
  """How ``quantize`` rules turn a kernel into quantizer parameters.

  Attributes:
    method: a method name (``methods.registry``) or ``"module:Class"``; its
      class's ``init_leaf`` makes each leaf (FP leaves kernels float).
    n_bits: bits of a rule without its own (CSQ/BSQ bit planes, MSQ's
      initial precision, the fixed precision of STE, LSQ, CSQ-Uniform).
    options: the method's config section (``config.csq``, ...) over its
      defaults, e.g. ``{"init": "random"}`` for CSQ's random logits.
  """

  method: str = "csq"
  n_bits: int = 8
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    cls = registry.resolve(self.method)
    object.__setattr__(self, "options", {**cls.defaults(), **dict(self.options)})
    cls.check_options(self.options)
    if not 1 <= self.n_bits <= 16:
      raise ValueError(f"n_bits must be in 1..16, got {self.n_bits}.")

  @property
  def method_class(self) -> type:
    return registry.resolve(self.method)


def path_str(path) -> str:
  """``/``-joined names of a key path; NNX's trailing ``.value`` is dropped."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    else:
      names.append(str(k))
  if names and names[-1] == "value":
    names.pop()
  return "/".join(names)


def match_rule(path: str, rules: Sequence[Rule]) -> int | None:
  """Index of the first rule whose pattern matches ``path`` in full."""
  for i, rule in enumerate(rules):
    if re.fullmatch(rule.pattern, path):
      return i
  return None


@dataclasses.dataclass
class TransformReport:
  """What each rule did: ``actions`` maps path -> (action, bits)."""

  actions: dict[str, tuple[str, int | None]]
  unused_rules: list[Rule]

  def quantized_paths(self) -> list[str]:
    return [p for p, (a, _) in self.actions.items() if a != "float"]


def quantize_params(
    params: Any,
    rules: Sequence[Rule],
    spec: QuantizeSpec,
    key: jax.Array | None = None,
) -> tuple[Any, TransformReport]:
  """Replace rule-selected leaves of ``params`` with quantizer parameters.

  Args:
    params: a float parameter pytree (Linen dict or NNX State).
    rules: path rules, first full match wins.
    spec: the method and its initialization.
    key: PRNG key, needed for ``init="random"``.

  Returns:
    ``(qparams, report)``: the tree with quantizer leaves (``CSQWeight``, ...) in
    place of the selected float arrays, and what was done (unused rules are
    also logged as a warning).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  used = set()
  actions = {}
  keys = iter(jax.random.split(key, len(flat))) if key is not None else None
  leaves = []
  for path, leaf in flat:
    name = path_str(path)
    idx = match_rule(name, rules)
    rule = rules[idx] if idx is not None else Rule(".*", "float")
    if idx is not None:
      used.add(idx)
    leaf_key = next(keys) if keys is not None else None
    new_leaf, action = _apply_rule(leaf, rule, spec, leaf_key, name)
    actions[name] = action
    leaves.append(new_leaf)
  unused = [r for i, r in enumerate(rules) if i not in used]
  for r in unused:
    logging.warning("Quantization rule %r matched no parameter.", r.pattern)
  return jax.tree_util.tree_unflatten(treedef, leaves), TransformReport(actions, unused)


def _apply_rule(leaf, rule: Rule, spec: QuantizeSpec, key, name: str):
  cls = spec.method_class
  if rule.action == "float" or not cls.quantizes:  # the FP baseline is float throughout
    return leaf, ("float", None)
  if np.ndim(leaf) < 2:
    raise ValueError(
        f"Rule {rule.pattern!r} selects {name} of shape {np.shape(leaf)}; only"
        " kernels (rank >= 2) can be quantized. Narrow the rule, e.g. to '.*/kernel'."
    )
  if rule.action == "fixed":  # uniform STE at the rule's bits, whatever the method
    return _init_leaf(registry.resolve("ste"), leaf, rule.fixed_bits, None, {}), ("fixed", rule.fixed_bits)
  bits = spec.n_bits if rule.bits is None else rule.bits
  return _init_leaf(cls, leaf, bits, key, spec.options), ("quantize", bits)


def _init_leaf(cls, kernel, bits: int, key, options: Mapping[str, Any]):
  """``cls.init_leaf``, jitted where the method allows it (``Method.jit_init``).

  Op by op, every operation of an initializer compiles once per kernel shape:
  ResNet-50's CSQ leaves took 17 s on a 2-core CPU, 5 s jitted. The jitted
  values are the op-by-op ones bit for bit on small_cnn (csq, csq_uniform,
  bsq, msq, ste: ``tests/test_train.py``) and on ResNet-20 (the same five,
  checked once). On ResNet-50, 1 to 4 values of 27 bit-logit arrays (of up
  to 16 M values) differ: there the fused and the op-by-op float32
  ``|W| / s * (2^n - 1)`` round a few weights to neighbouring integers.
  """
  frozen = _hashable(options) if cls.jit_init(options) else None
  if frozen is None:
    return cls.init_leaf(kernel, bits, key, options)
  return _jitted_init_leaf(cls, kernel, bits, key, frozen)


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _jitted_init_leaf(cls, kernel, bits, key, frozen_options):
  return cls.init_leaf(kernel, bits, key, dict(frozen_options))


def _hashable(options: Mapping[str, Any]):
  """``options`` as sorted ``(key, value)`` pairs, a static argument of
  ``jax.jit``; ``None`` if a value is unhashable."""
  frozen = tuple(sorted(options.items()))
  try:
    hash(frozen)
  except TypeError:
    return None
  return frozen


def is_leaf(x) -> bool:
  return quantizers.is_quantized(x)


def map_quantized(fn: Callable[[Any], Any], qparams: Any) -> Any:
  """Apply ``fn`` to every quantized leaf; float leaves pass through."""
  return jax.tree_util.tree_map(lambda x: fn(x) if is_leaf(x) else x, qparams, is_leaf=is_leaf)


def map_quantized_with_path(fn: Callable[[str, Any], Any], qparams: Any) -> Any:
  """``fn(path, leaf)`` on every quantized leaf (``path`` as in
  ``quantized_leaves``); float leaves pass through."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x) if is_leaf(x) else x, qparams,
                                          is_leaf=is_leaf)


def materialize(qparams: Any, beta, hard: bool = False) -> Any:
  """Float parameter tree for ``model.apply``: every quantized leaf materialized."""
  return map_quantized(lambda q: quantizers.materialize(q, beta, hard), qparams)


def quantized_leaves(qparams: Any) -> dict[str, Any]:
  """``{path: quantized leaf}`` in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_leaf)[0]
  return {path_str(p): leaf for p, leaf in flat if is_leaf(leaf)}
