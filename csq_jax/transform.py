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
import re
from typing import Any, Callable, Iterable, Literal, Sequence

import jax
import numpy as np
from absl import logging

from csq_jax import quantizers
from csq_jax.quantizers import bsq, csq, msq, ste

Action = Literal["quantize", "float", "fixed"]
ACTIONS = ("quantize", "float", "fixed")
METHODS = ("csq", "csq_uniform", "ste", "fp", "bsq", "msq")


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
    method: ``csq`` (Eq. 5, learned bit mask), ``csq_uniform`` (Eq. 3),
      ``ste`` (uniform STE QAT), ``bsq`` (bit planes of Eq. 1, from the
      kernel's ``n_bits`` quantization), ``msq`` (the float kernel at
      ``n_bits``) or ``fp`` (leave float).
    n_bits: CSQ/BSQ bit planes or MSQ's initial precision; the fixed
      precision for ``csq_uniform``/``ste``.
    init: CSQ initialization, ``"float"`` (decompose the given kernel's
      ``n_bits`` quantization) or ``"random"`` (random bit logits, He scale).
    logit_init: initial logit of a set CSQ bit (``init="float"``), or the
      range of the random logits (``init="random"``).
    off_logit: initial logit of every other CSQ bit (``init="float"``): 0 as
      in the authors' code, ``-logit_init`` for the symmetric start.
  """

  method: str = "csq"
  n_bits: int = 8
  init: str = "float"
  logit_init: float = 1.0
  off_logit: float = 0.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Unknown method {self.method!r}; expected one of {METHODS}.")
    if self.init not in ("float", "random"):
      raise ValueError(f"Unknown CSQ init {self.init!r}; expected 'float' or 'random'.")
    if not 1 <= self.n_bits <= 16:
      raise ValueError(f"n_bits must be in 1..16, got {self.n_bits}.")


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


def _fan_in(shape: tuple[int, ...]) -> int:
  return int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


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
  if rule.action == "float" or spec.method == "fp":  # the FP baseline is float throughout
    return leaf, ("float", None)
  if np.ndim(leaf) < 2:
    raise ValueError(
        f"Rule {rule.pattern!r} selects {name} of shape {np.shape(leaf)}; only"
        " kernels (rank >= 2) can be quantized. Narrow the rule, e.g. to '.*/kernel'."
    )
  if rule.action == "fixed":
    bits = 8 if rule.bits is None else rule.bits
    return ste.init_from_float(leaf, bits), ("fixed", bits)
  bits = spec.n_bits if rule.bits is None else rule.bits
  if spec.method == "ste":
    return ste.init_from_float(leaf, bits), ("quantize", bits)
  if spec.method == "bsq":
    return bsq.init_from_float(leaf, bits), ("quantize", bits)
  if spec.method == "msq":
    return msq.init_from_float(leaf, bits), ("quantize", bits)
  mode = "none" if spec.method == "csq_uniform" else "learned"
  if spec.init == "random":
    if key is None:
      raise ValueError("CSQ init='random' needs a PRNG key.")
    q = csq.init_random(key, np.shape(leaf), _fan_in(np.shape(leaf)), bits, spec.logit_init, mode)
  else:
    q = csq.init_from_float(leaf, bits, spec.logit_init, mode, spec.off_logit)
  return q, ("quantize", bits)


def is_leaf(x) -> bool:
  return quantizers.is_quantized(x)


def map_quantized(fn: Callable[[Any], Any], qparams: Any) -> Any:
  """Apply ``fn`` to every quantized leaf; float leaves pass through."""
  return jax.tree_util.tree_map(lambda x: fn(x) if is_leaf(x) else x, qparams, is_leaf=is_leaf)


def materialize(qparams: Any, beta, hard: bool = False) -> Any:
  """Float parameter tree for ``model.apply``: every quantized leaf materialized."""
  return map_quantized(lambda q: quantizers.materialize(q, beta, hard), qparams)


def quantized_leaves(qparams: Any) -> dict[str, Any]:
  """``{path: quantized leaf}`` in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_leaf)[0]
  return {path_str(p): leaf for p, leaf in flat if is_leaf(leaf)}


def set_mask_mode(qparams: Any, mask_mode: str) -> Any:
  """Switch every learned/frozen CSQ mask to ``mask_mode`` (Alg. 1's finetune
  freezes the selection: ``set_mask_mode(q, "frozen")``)."""

  def switch(leaf):
    if isinstance(leaf, csq.CSQWeight) and leaf.mask_mode != "none":
      return csq.with_mask_mode(leaf, mask_mode)
    return leaf

  return map_quantized(switch, qparams)
