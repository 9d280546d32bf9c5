"""The 2-D convolution every model of the zoo uses: XLA's, with a CPU backward
pass that does not fall into XLA:CPU's slow weight gradient.

Why: XLA:CPU computes a convolution's weight gradient as a convolution over
transposed copies of the input ``x`` and of the output cotangent ``g``
(batch moved to the minor dimension). The CPU fusion pass builds those copies
by fusing the *producers* of ``x`` into the transpose: for a ResNet that is
the chain of batch-norm, ReLU and residual additions of every earlier block,
recomputed element by element in transposed (cache-hostile) order instead of
read once from the buffer the forward pass already wrote. On ResNet-20 these
copies took most of the backward pass.

What: :func:`conv_general_dilated` has ``lax.conv_general_dilated``'s
signature. On a CPU backend, for 2-D NHWC/HWIO convolutions, it is a
``jax.custom_vjp`` whose forward pass and input gradient are XLA's own; its
weight gradient is XLA's own as well, but computed from a copy of ``x`` whose
batch is split into ``_PIECES`` (> 8) chunks concatenated in reverse order,
and from ``g`` permuted the same way by a gather with constant indices.
XLA:CPU never fuses a concatenation of more than 8 operands
(``kMaxConcatenateArguments`` in ``cpu_instruction_fusion.cc``), so the copy
of ``x`` is one sequential pass that the transpose then reads; the gather is
fused into the transpose of ``g`` (no copy of ``g``). The weight gradient, a
sum over the batch, is unchanged by permuting the batch of both operands (up
to float summation order; the permutation is the one an earlier version's
materialized copy of ``g`` had, and the results are bit for bit the same).
Copying ``g`` as well cost time: ResNet-20's CIFAR train step took 419 / 434
ms (FP / CSQ) with both copies against 393 / 399 ms with the gather, in one
interleaved run (the default job's step and MobileNetV3's took the same
either way). The alternatives tried (nine
shifted-slice matmuls, im2col matmuls in row- or channel-major layout,
``lax.optimization_barrier``, which XLA:CPU removes before fusion, and an
identity 1x1 matmul as a barrier, whose cost grows with channels squared)
were slower or no better; ``benchmarks/vs_pytorch.py`` times the result.

Where the fast path does not apply XLA's convolution is used unchanged: any
backend other than CPU (GPU/TPU keep their own kernels), more than one device
(in ``auto`` mode: the batch permutation would cross the shards of a batch
split over devices or processes; on the tiny default job over 8 CPU devices it
cost 140 all-to-alls per step and 30 s compilations), inputs dilation,
``batch_group_count != 1``, ``preferred_element_type``, layouts other than
NHWC/HWIO, non-2-D convolutions, and batches under ``_PIECES`` examples.

The same rule (a CPU backend, one device, ``auto``), for images of at least
32x32 pixels and programs without grouped convolutions, gives the jitted steps
(``train_steps.py``) :func:`compiler_options`: XLA:CPU's YNNPACK library
fusions keep dots and reductions but leave single convolutions to XLA's own
(Eigen) kernels (inference graphs of convolutions and batch norms can still be
fused into YNNPACK, with or without the options). YNNPACK takes every
convolution of more than 16 channels by default (jaxlib 0.10) and runs each on
one thread, where Eigen uses all cores: on the 2-core machine of the README,
ResNet-20's 16x16 32->32 convolution took 7.1 / 6.4 / 10.5 ms (forward / input
grad / weight grad) in YNNPACK and 3.8 / 3.5 / 6.9 ms in Eigen, and the
ResNet-20 CIFAR train step 537 against 440 ms. On the default job's 8x8 digits
the train steps were no faster (59.0 against 58.7 s over 165 epochs) and the
float results differed, hence the image-size floor, which keeps every digits
run bit for bit as it was. Programs with grouped (depthwise) convolutions keep
YNNPACK's: MobileNetV3-Large's FP step at 224x224, batch 16, took 5.5 s
without them against 4.3 s with them (ResNet-18 at the same size: 1.40 against
1.60 s). Turning YNNPACK off altogether was no better, since its reductions
(batch-norm statistics) beat XLA's reduce-windows.

Knob: the environment variable ``CSQ_JAX_CONV`` is read at trace time (so it
takes effect for functions traced after it is set): ``auto`` (default) uses
the fast backward pass and :func:`compiler_options` on a CPU backend, ``xla``
always uses ``lax.conv_general_dilated`` and XLA's options as they are (the
"before" of the benchmarks), and
``custom`` uses the custom backward pass on every backend (for tests).

:class:`Conv` is ``flax.linen.Conv`` with this function as its
``conv_general_dilated`` field: same parameters, same names, same
``isinstance(m, nn.Conv)``, so checkpoints, import tables, quantization rules
and ``budget.layer_macs`` see no difference.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ENV_VAR = "CSQ_JAX_CONV"
_MODES = ("auto", "xla", "custom")
_NHWC = ("NHWC", "HWIO", "NHWC")
# jaxlib 0.10's default YNNPACK fusions (individual dots and convolutions,
# reductions), convolutions taken out.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# Images of fewer pixels keep XLA's default options (module docstring).
_MIN_IMAGE_PIXELS = 32 * 32
# A grouped convolution in a jaxpr (the weight gradient of one has batch groups).
_GROUPED = re.compile(r"(feature|batch)_group_count=([2-9]|[1-9]\d+)")
# Chunks of the batch in the materialized copies: more than XLA:CPU's limit of
# 8 operands for a fusible concatenation.
_PIECES = 9


def conv_mode() -> str:
  """The value of ``CSQ_JAX_CONV`` (``auto`` when unset), checked."""
  mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if mode not in _MODES:
    raise ValueError(f"{ENV_VAR}={mode!r}; expected one of {_MODES}.")
  return mode


def _fast_path_backend() -> bool:
  """Whether ``auto`` means the fast path here: a CPU backend with one device."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def compiler_options(image_shape, program: Callable[[], str]) -> dict[str, str] | None:
  """``jax.jit``'s ``compiler_options`` for a step that runs the zoo's
  convolutions on images of ``image_shape`` (``(H, W, C)``); ``program()``
  gives the step's jaxpr as text, asked for only when the other conditions
  hold. In ``auto`` mode on a CPU backend with one device, for images of at
  least 32x32 pixels and a program without grouped convolutions: YNNPACK
  without convolutions (module docstring). Otherwise, or where this jaxlib
  does not know the option, ``None`` (XLA's defaults)."""
  if (conv_mode() != "auto" or not _fast_path_backend()
      or int(np.prod(tuple(image_shape)[:2])) < _MIN_IMAGE_PIXELS
      or _GROUPED.search(program())):
    return None
  return _ynn_without_convolutions()


@functools.cache
def _ynn_without_convolutions() -> dict[str, str] | None:
  """The YNNPACK option if this jaxlib compiles with it (one tiny compilation
  per process), else ``None``."""
  options = {_YNN_OPTION: _YNN_WITHOUT_CONVOLUTIONS}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception:  # noqa: BLE001 - an older or newer jaxlib: an unknown option or enum value
    return None
  return options


def _chunk_bounds(n: int) -> list[tuple[int, int]]:
  """``(start, stop)`` of the ``_PIECES`` chunks of a batch of ``n``."""
  bounds = np.linspace(0, n, _PIECES + 1).astype(int)
  return list(zip(bounds[:-1], bounds[1:]))


def _batch_reversed(a: jax.Array) -> jax.Array:
  """``a`` with its batch (axis 0) cut into ``_PIECES`` chunks put back in
  reverse order: a permutation of the examples that XLA:CPU materializes as
  one buffer (a concatenation of more than 8 operands is never fused), so
  later transposes read it instead of recomputing its producers."""
  chunks = [lax.slice_in_dim(a, lo, hi, axis=0) for lo, hi in _chunk_bounds(a.shape[0])]
  return lax.concatenate(chunks[::-1], 0)


def _batch_reversed_fusible(a: jax.Array) -> jax.Array:
  """The permutation of :func:`_batch_reversed` as a gather with constant
  indices, which XLA fuses into its consumer (no copy of ``a``)."""
  order = np.concatenate([np.arange(lo, hi) for lo, hi in _chunk_bounds(a.shape[0])][::-1])
  return jnp.take(a, order, axis=0)


def _xla_conv(x, w, strides, padding, dilation, groups, precision):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC,
                                  feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, w, strides, padding, dilation, groups, precision):
  """NHWC x HWIO -> NHWC; the backward pass is ``_conv_bwd``."""
  return _xla_conv(x, w, strides, padding, dilation, groups, precision)


def _conv_fwd(x, w, strides, padding, dilation, groups, precision):
  return _xla_conv(x, w, strides, padding, dilation, groups, precision), (x, w)


def _conv_bwd(strides, padding, dilation, groups, precision, residuals, g):
  """Input gradient: XLA's transposed convolution. Weight gradient: XLA's,
  from a batch-permuted materialized copy of ``x`` and ``g`` permuted the same
  way inside the fusion that reads it (see module docstring); the same
  permutation on both leaves the sum over the batch unchanged."""
  x, w = residuals
  conv = functools.partial(_xla_conv, strides=strides, padding=padding, dilation=dilation, groups=groups,
                           precision=precision)
  (dx,) = jax.vjp(lambda x_: conv(x_, w), x)[1](g)
  x_perm, g_perm = _batch_reversed(x), _batch_reversed_fusible(g)
  (dw,) = jax.vjp(lambda w_: conv(x_perm, w_), w)[1](g_perm)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def _hashable_padding(padding):
  return padding if isinstance(padding, str) else tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """``lax.conv_general_dilated`` with a fast CPU backward pass.

  Same arguments and result as ``lax.conv_general_dilated``. For a 2-D
  NHWC/HWIO convolution (strides, SAME/VALID/explicit padding, kernel
  dilation, feature groups, any float dtype) of at least ``_PIECES``
  examples, on a CPU backend with one device (``CSQ_JAX_CONV=auto``) or anywhere
  (``CSQ_JAX_CONV=custom``), the custom-VJP convolution ``_conv``; otherwise
  XLA's convolution unchanged.
  """
  mode = conv_mode()
  fast = (
      mode == "custom" or (mode == "auto" and _fast_path_backend())
  ) and (
      _is_nhwc(lhs, rhs, dimension_numbers)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and batch_group_count == 1
      and preferred_element_type is None
      and lhs.shape[0] >= _PIECES
  )
  if not fast:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), _hashable_padding(padding),
               tuple(int(d) for d in (rhs_dilation or (1, 1))), int(feature_group_count), precision)


class Conv(nn.Conv):
  """``flax.linen.Conv`` computed with :func:`conv_general_dilated`; the
  parameters (``kernel``, ``bias``), their shapes and names are those of
  ``nn.Conv``."""

  conv_general_dilated: Callable = conv_general_dilated
