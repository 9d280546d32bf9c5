"""The baselines users compare against: full precision and uniform STE QAT."""

from __future__ import annotations

from csq_jax.methods import base
from csq_jax.quantizers import ste


class FullPrecision(base.Method):
  """Float training throughout: ``quantize`` rules leave the kernels float
  and nothing counts in a budget."""

  quantizes = False


class STE(base.Method):
  """Uniform QAT: every quantized layer a float latent rounded to
  ``target_bits`` at its max-abs scale, the rounding passed straight through
  (``quantizers/ste.py``)."""

  @classmethod
  def jit_init(cls, options):
    return True

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    del key, options
    return ste.init_from_float(kernel, bits)
