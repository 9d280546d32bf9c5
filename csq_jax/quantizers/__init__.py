"""Weight quantizers: one module per method, each pure functions over a leaf type.

A quantized layer is a single pytree leaf-like dataclass (``CSQWeight``,
``STEWeight``, ``BSQWeight`` and, in BSQ's finetune, ``BSQFinetuneWeight``,
``MSQWeight``, ``LSQWeight``) that replaces the float kernel in the parameter
tree. Each quantizer module registers its leaf types here at import
(``register``), and the functions below dispatch on the type, so code that
walks a tree (transform, budget, sharding, export) never names a method's
type or fields. A module registers with the functions it must define
(``materialize``, ``precision``, ``integer_weights``, ``step_size``) and
may define:

* ``BIT_FIELDS``: its fields with a leading bit axis (sharding keeps that
  axis whole; the materialized weight is pinned like their kernel axes);
* ``grid_places(leaf)``: exponents of the place values whose signed sums form
  the layer's grid (default: ``0..precision-1``; CSQ: its selected planes);
* ``mask_regularizer(leaf, beta)``: Eq. (6)'s soft bit count (default 0);
* ``static_precision(leaf)``: its bits as a Python int, where the structure
  fixes them (STE, BSQ, MSQ, LSQ; not CSQ, whose masks are data);
* ``with_precision(leaf, bits)``: the layer moved to ``bits`` by the
  method's own means (host side), for leaves whose precision a search sets
  (CSQ, BSQ, MSQ); ``allowed_bits`` uses it. Leaves without it (STE, LSQ)
  keep their precision.

The built-in modules are imported below; a user's own quantizer registers
when its module is imported (``docs/adding_a_method.md``).
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp

_MODULES: dict[type, ModuleType] = {}
_REQUIRED = ("materialize", "precision", "integer_weights", "step_size")


def register(leaf_type: type, module: ModuleType) -> None:
  """Dispatch ``leaf_type`` to the functions of ``module`` (see above)."""
  missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
  if missing:
    raise TypeError(f"Quantizer module {module.__name__} lacks {', '.join(missing)}.")
  _MODULES[leaf_type] = module


def is_quantized(x) -> bool:
  return type(x) in _MODULES


def _module(leaf) -> ModuleType:
  try:
    return _MODULES[type(leaf)]
  except KeyError:
    raise TypeError(f"Not a quantized weight: {type(leaf).__name__}") from None


def materialize(leaf, beta, hard: bool = False) -> jax.Array:
  """The float weight tensor a layer computes with (see each method's docs)."""
  return _module(leaf).materialize(leaf, beta, hard)


def precision(leaf) -> jax.Array:
  """Bits per weight the layer uses now (int32 scalar)."""
  return _module(leaf).precision(leaf)


def integer_weights(leaf) -> jax.Array:
  """Signed integers of the exactly quantized weight (int32)."""
  return _module(leaf).integer_weights(leaf)


def step_size(leaf) -> jax.Array:
  """Weight value of one integer unit of the exactly quantized weight."""
  return _module(leaf).step_size(leaf)


def static_precision(leaf) -> int | None:
  """Bits known from the leaf's structure alone, a Python int usable at trace
  time (``None`` where precision is data, as CSQ's learned bit masks)."""
  fn = getattr(_module(leaf), "static_precision", None)
  return None if fn is None else int(fn(leaf))


def can_set_precision(leaf) -> bool:
  """Whether the leaf's module defines ``with_precision`` (its precision is
  the search's to set)."""
  return callable(getattr(_module(leaf), "with_precision", None))


def with_precision(leaf, bits: int):
  """The layer at ``bits`` bits by its method's means (see each module's
  ``with_precision``); host side, on concrete arrays."""
  fn = getattr(_module(leaf), "with_precision", None)
  if fn is None:
    raise TypeError(f"The precision of a {type(leaf).__name__} layer is fixed.")
  return fn(leaf, int(bits))


def bit_fields(leaf) -> tuple[str, ...]:
  """Names of the leaf's fields whose axis 0 is a bit axis."""
  return tuple(getattr(_module(leaf), "BIT_FIELDS", ()))


def grid_places(leaf) -> list[int]:
  """Exponents ``p`` of the place values ``2^p`` whose signed sums form the
  layer's grid; their number is the layer's precision (host values)."""
  fn = getattr(_module(leaf), "grid_places", None)
  if fn is not None:
    return fn(leaf)
  return list(range(int(jax.device_get(precision(leaf)))))


def num_weights(leaf) -> int:
  size = 1
  for d in leaf.shape:
    size *= d
  return size


def mask_regularizer(leaf, beta) -> jax.Array:
  """Eq. (6) for leaves with a learned bit mask (CSQ); zero for the others."""
  fn = getattr(_module(leaf), "mask_regularizer", None)
  return fn(leaf, beta) if fn is not None else jnp.zeros((), jnp.float32)


# The built-in quantizers (each registers its leaf types at import).
from csq_jax.quantizers import bsq, csq, msq, ste  # noqa: E402
from csq_jax.quantizers.bsq import BSQFinetuneWeight, BSQWeight  # noqa: E402
from csq_jax.quantizers.csq import CSQWeight  # noqa: E402
from csq_jax.quantizers.msq import MSQWeight  # noqa: E402
from csq_jax.quantizers.ste import STEWeight  # noqa: E402

__all__ = [
    "BSQFinetuneWeight", "BSQWeight", "CSQWeight", "MSQWeight", "STEWeight",
    "bsq", "csq", "msq", "ste",
    "bit_fields", "can_set_precision", "grid_places", "integer_weights", "is_quantized", "mask_regularizer",
    "materialize", "num_weights", "precision", "register", "static_precision", "step_size", "with_precision",
]
