"""The one table of training methods: name -> where its class lives.

Importable without JAX (``report``, ``sweep`` and the CLI read it): a method
is named here by ``"module:Class"`` and imported only when a run needs it,
the way big_vision resolves evaluators by module name. A method that is not
in the table runs by its own ``"module:Class"`` name
(``--config.method=my_pkg.my_method:MyMethod``, ``docs/adding_a_method.md``).
"""

from __future__ import annotations

import importlib

# name -> ("module:Class", one line for --help and the README's methods table).
METHODS = {
    "fp": ("csq_jax.methods.baselines:FullPrecision", "full precision: float kernels, nothing quantized"),
    "ste": ("csq_jax.methods.baselines:STE",
            "uniform QAT: float latent, round-to-n-bits (max-abs scale) with a straight-through estimator"),
    "lsq": ("csq_jax.methods.lsq:LSQ", "uniform QAT with a learned step per layer (LSQ, Esser et al. 2020)"),
    "csq_uniform": ("csq_jax.methods.csq:CSQUniform", "CSQ bit planes with soft gates, every bit kept (Eq. 3)"),
    "csq": ("csq_jax.methods.csq:CSQ",
            "CSQ mixed precision: soft bit planes and bit masks, budget-aware penalty (Eqs. 5-7)"),
    "bsq": ("csq_jax.methods.bsq:BSQ",
            "BSQ: STE-rounded float bit planes, group Lasso, periodic re-quantization (Eq. 1)"),
    "msq": ("csq_jax.methods.msq:MSQ", "MSQ: round-clamp LSBs of float weights, L1 on LSBs, Hessian-aware pruning"),
}


class UnknownMethodError(ValueError):
  """A method name that is neither in the table nor an importable ``module:Class``."""


def names() -> tuple[str, ...]:
  """The registered method names, in the table's order."""
  return tuple(METHODS)


def is_known(name: str) -> bool:
  """Whether ``name`` is registered or written as ``module:Class`` (not imported)."""
  return name in METHODS or (isinstance(name, str) and name.count(":") == 1 and all(name.split(":")))


def target(name: str) -> str:
  """``"module:Class"`` of ``name``."""
  if name in METHODS:
    return METHODS[name][0]
  if is_known(name):
    return name
  raise UnknownMethodError(f"Unknown method {name!r}; expected one of {names()} or your own class as"
                           " 'module:Class' (docs/adding_a_method.md).")


def resolve(name: str) -> type:
  """The method class of ``name`` (imports its module)."""
  module_name, class_name = target(name).split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UnknownMethodError(f"Method {name!r}: cannot import module {module_name!r} ({e}); is it on"
                             " PYTHONPATH (or installed)?") from None
  try:
    cls = getattr(module, class_name)
  except AttributeError:
    raise UnknownMethodError(f"Method {name!r}: module {module_name!r} has no class {class_name!r}.") from None
  return cls


def get(config):
  """The method that ``config.method`` names, built from ``config`` (its
  config section is added with the method's defaults when the config lacks it)."""
  cls = resolve(config.method)
  cls.add_section(config)
  method = cls(config)
  method.name = config.method
  return method
