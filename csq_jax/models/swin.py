"""Swin Transformer, Swin-T by default (Liu et al. 2021), layout of the
authors' code: a 4x4 patch embedding with LayerNorm, four stages of 2/2/6/2
blocks at 96/192/384/768 channels (3/6/12/24 heads), window attention
(7x7 windows) with a learned relative position bias table, every second block
on windows shifted by half a window (with the attention mask that keeps
wrapped-around regions apart), 2x2 patch merging (LayerNorm + bias-free
``4C -> 2C`` dense) before stages 2-4, a final LayerNorm, average pooling and
a dense classifier. 28,288,354 parameters for 1000 classes at 224x224.

Every stage's resolution must be a multiple of ``window_size`` or at most
``window_size`` (then, as in the authors' code, the window is the whole map
and nothing is shifted). For small tests use e.g. ``img_size=32,
window_size=4``.

Activations: as for the ViT (see ``vit.py``), ``act`` is accepted and not
used; GELU and LayerNorm outputs are signed and stay float. The attention
softmax and LayerNorm are computed in float32.

``drop_path_rate`` (Swin-T trains with 0.2) is 0 by default because the
training loop passes no dropout PRNG; with a rate > 0,
``apply(..., train=True, rngs={"dropout": key})``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from csq_jax.models.conv import Conv
from csq_jax.models.vit import Attention, DropPath, Mlp, dense_init
from csq_jax.quantizers.activations import ReLU

# Which kernels are quantized (transform.rules_from_config format; first full
# match wins). Relative position bias tables (rank 2, but not kernels),
# LayerNorms and biases stay float (no rule matches them).
QUANT_RULES = (
    # First layer and classifier: fixed 8 bits, counted, never searched (the
    # first/last-layer heuristic, CSQ Sec. II, refs [14], [15]).
    ("patch_embed/kernel", "fixed", 8),
    ("head/kernel", "fixed", 8),
    (r"stage\d_block\d+/attn/(qkv|proj)/kernel", "quantize"),
    (r"stage\d_block\d+/mlp/fc[12]/kernel", "quantize"),
    (r"stage\d_merge/reduction/kernel", "quantize"),  # patch merging: an ordinary dense layer
)


def relative_position_index(window: int) -> np.ndarray:
  """``[N, N]`` row of the bias table for each (query, key) pair of a window,
  ``N = window^2``: the offset ``(dy, dx)`` in ``[-(w-1), w-1]^2`` flattened."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x, window: int):
  """``[B, H, W, C] -> [B, nW, window^2, C]``, windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, -1, window * window, c)


def window_reverse(x, window: int, h: int, w: int):
  """Inverse of :func:`window_partition`."""
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """``[nW, N, N]`` additive mask for shifted windows: -100 between tokens that
  came from different regions of the cyclically shifted map (authors' code)."""
  regions = np.zeros((1, h, w, 1), np.float32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
    regions[:, hs, ws, :] = i
  ids = window_partition(regions, window)[0, :, :, 0]  # [nW, N]
  return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
  """``x + attn(norm1(x))`` on (shifted) windows, then ``x + mlp(norm2(x))``.

  ``x``: ``[B, H, W, C]``. Params ``norm1``, ``attn`` (``qkv``, ``proj``,
  ``relative_position_bias_table`` ``[(2w-1)^2, heads]``), ``norm2``, ``mlp``.
  """

  num_heads: int
  window: int
  shift: int
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    _, h, w, c = x.shape
    ws, shift = self.window, self.shift
    table = self.param("relative_position_bias_table", dense_init, ((2 * ws - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(ws)].transpose(2, 0, 1)  # [heads, N, N]
    y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="norm1")(x).astype(self.dtype)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      bias = bias[None] + shift_mask(h, w, ws, shift)[:, None]  # [nW, heads, N, N]
    # The bias table is a param of the block (stage*_block*/relative_position_bias_table),
    # added to the float32 logits inside "attn".
    y = Attention(self.num_heads, self.dtype, name="attn")(window_partition(y, ws), bias)
    y = window_reverse(y, ws, h, w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + DropPath(self.drop_path)(y, train)
    y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="norm2")(x).astype(self.dtype)
    return x + DropPath(self.drop_path)(Mlp(4 * c, self.dtype, name="mlp")(y), train)


class PatchMerging(nn.Module):
  """``[B, H, W, C] -> [B, H/2, W/2, 2C]``: the 2x2 neighbours concatenated in
  the authors' order, LayerNorm, then a bias-free dense ``reduction``."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="norm")(x).astype(self.dtype)
    return nn.Dense(2 * c, use_bias=False, kernel_init=dense_init, dtype=self.dtype, name="reduction")(x)


class SwinTransformer(nn.Module):
  """Swin classifier for ``[B, img_size, img_size, C]`` inputs; the defaults
  are Swin-T. Params ``patch_embed``, ``patch_norm``, ``stage{s}_block{j}``,
  ``stage{s}_merge`` (s = 2..4), ``norm``, ``head``. Output
  ``[B, num_classes]`` float32 logits."""

  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  drop_path_rate: float = 0.0
  act: Callable[[], nn.Module] = ReLU  # unused: see the module docstring
  dtype: jnp.dtype = jnp.float32

  def _windows(self) -> list[tuple[int, int]]:
    """(window, shift of the odd blocks) per stage, checked against the resolution."""
    if self.img_size % (self.patch_size * 2 ** (len(self.depths) - 1)):
      raise ValueError(f"Swin: img_size {self.img_size} must be a multiple of patch_size * 2^(stages-1)"
                       f" = {self.patch_size * 2 ** (len(self.depths) - 1)}.")
    out = []
    for s in range(len(self.depths)):
      res = self.img_size // self.patch_size // 2**s
      if res <= self.window_size:
        out.append((res, 0))
      elif res % self.window_size:
        raise ValueError(f"Swin: stage {s + 1} resolution {res} is not a multiple of window_size"
                         f" {self.window_size}; choose img_size and window_size so that it is.")
      else:
        out.append((self.window_size, self.window_size // 2))
    return out

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"Swin built for {self.img_size}x{self.img_size} inputs got {x.shape[1]}x{x.shape[2]};"
                       " set img_size to the input resolution.")
    windows = self._windows()
    p = self.patch_size
    x = Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="patch_norm")(x).astype(self.dtype)
    total, k = sum(self.depths), 0
    for s, (depth, heads, (window, shift)) in enumerate(zip(self.depths, self.num_heads, windows)):
      if s > 0:
        x = PatchMerging(self.dtype, name=f"stage{s + 1}_merge")(x)
      for j in range(depth):
        rate = self.drop_path_rate * k / max(total - 1, 1)  # linear in depth, as in the authors' code
        x = SwinBlock(heads, window, shift if j % 2 else 0, rate, self.dtype,
                      name=f"stage{s + 1}_block{j}")(x, train)
        k += 1
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="norm")(x)
    x = jnp.mean(x, axis=(1, 2)).astype(self.dtype)
    return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="head")(x).astype(jnp.float32)
