"""Weight quantizers: one module per method, each pure functions over a leaf type.

A quantized layer is a single pytree leaf-like dataclass (``CSQWeight``,
``STEWeight``, ``BSQWeight`` and, in BSQ's finetune, ``BSQFinetuneWeight``,
``MSQWeight``) that replaces the float kernel
in the parameter tree. The functions here dispatch on that type, so code
that walks a tree (transform, budget, export) never needs to know which
method produced a leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csq_jax.quantizers import bsq, csq, msq, ste
from csq_jax.quantizers.bsq import BSQFinetuneWeight, BSQWeight
from csq_jax.quantizers.csq import CSQWeight
from csq_jax.quantizers.msq import MSQWeight
from csq_jax.quantizers.ste import STEWeight

_MODULES = {CSQWeight: csq, STEWeight: ste, BSQWeight: bsq, BSQFinetuneWeight: bsq, MSQWeight: msq}
QUANTIZED_TYPES = tuple(_MODULES)


def is_quantized(x) -> bool:
  return isinstance(x, QUANTIZED_TYPES)


def _module(leaf):
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


def num_weights(leaf) -> int:
  size = 1
  for d in leaf.shape:
    size *= d
  return size


def mask_regularizer(leaf, beta) -> jax.Array:
  """Eq. (6) for CSQ leaves with a learned mask; zero for every other leaf."""
  if isinstance(leaf, CSQWeight):
    return csq.mask_regularizer(leaf, beta)
  return jnp.zeros((), jnp.float32)


__all__ = [
    "BSQFinetuneWeight",
    "BSQWeight",
    "CSQWeight",
    "MSQWeight",
    "STEWeight",
    "QUANTIZED_TYPES",
    "bsq",
    "csq",
    "msq",
    "ste",
    "integer_weights",
    "is_quantized",
    "mask_regularizer",
    "materialize",
    "num_weights",
    "precision",
    "step_size",
]
