"""LSQ (Esser et al., ICLR 2020): uniform QAT with a learned step per layer.

A fixed-precision baseline, stronger than STE's max-abs scale: each layer's
step ``s`` is trained with its gradient scaled by ``1 / sqrt(N_W Q_P)``
(``quantizers/lsq.py``, Eqs. 1-3 and Sec. 2.2). Every quantized layer is at
``target_bits``; the step's weight decay follows the weights' optimizer.
"""

from __future__ import annotations

from csq_jax.methods import base
from csq_jax.quantizers import lsq


class LSQ(base.Method):
  """Uniform ``target_bits`` with learned steps (see the module docstring)."""

  # No jit_init: the initial step is a mean, whose jitted reduction differs
  # in the last bit (up to 3e-8), which would move the README's LSQ rows.

  @classmethod
  def init_leaf(cls, kernel, bits, key, options):
    del key, options
    return lsq.init_from_float(kernel, bits)
