"""Training methods: one module per method, one table of names.

``registry`` (importable without JAX) maps each method name to its class;
``base.Method`` says what a method is and which hooks the loop calls;
``baselines`` (FP, STE), ``lsq``, ``csq`` (CSQ, CSQ-Uniform), ``bsq`` and
``msq`` implement them. ``methods.get(config)`` builds the method a config
names, a registered one or a user's ``"module:Class"``.

The classes and helpers of ``base`` are loaded on first use, so that
``from csq_jax import methods`` and ``methods.registry`` stay free of JAX.
"""

from __future__ import annotations

import importlib

from csq_jax.methods.registry import METHODS, UnknownMethodError, get, is_known, names, resolve

_BASE = ("AdjustContext", "Method", "static_precisions", "static_average_bits", "trainable_params")


def __getattr__(name: str):
  if name in _BASE:
    return getattr(importlib.import_module("csq_jax.methods.base"), name)
  raise AttributeError(f"module 'csq_jax.methods' has no attribute {name!r}")


__all__ = ["METHODS", "UnknownMethodError", "get", "is_known", "names", "resolve", *_BASE]
