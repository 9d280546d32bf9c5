"""Vision Transformer, DeiT-S by default (Dosovitskiy et al. 2021; Touvron et
al. 2021), timm layout: 16x16 patch embedding (a strided conv), a class token
and learned position embeddings, 12 pre-LayerNorm encoder blocks (6-head
self-attention, 4x MLP with GELU), a final LayerNorm and a dense classifier
on the class token. 22,050,664 parameters for 1000 classes at 224x224.

Activations: a transformer has no ReLU, so ``act`` is accepted (every csq_jax
model takes one) and not used. GELU outputs and LayerNorm/attention inputs
are signed, and csq_jax's activation quantizers are unsigned clipped ReLUs;
activations stay float (A-bits 32). The attention softmax and LayerNorm are
computed in float32 whatever ``dtype`` is.

``drop_path_rate`` (stochastic depth; DeiT-S trains with 0.1) is 0 by default
because the training loop passes no dropout PRNG; with a rate > 0,
``apply(..., train=True, rngs={"dropout": key})``.

``Attention``, ``Mlp`` and ``DropPath`` are shared with the Swin Transformer.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from csq_jax.models.conv import Conv
from csq_jax.quantizers.activations import ReLU

# Which kernels are quantized (transform.rules_from_config format; first full
# match wins). The class token, position embeddings, LayerNorms and biases
# stay float (no rule matches them).
QUANT_RULES = (
    # First layer and classifier: fixed 8 bits, counted, never searched (the
    # first/last-layer heuristic, CSQ Sec. II, refs [14], [15]).
    ("patch_embed/kernel", "fixed", 8),
    ("head/kernel", "fixed", 8),
    (r"block\d+/attn/(qkv|proj)/kernel", "quantize"),
    (r"block\d+/mlp/fc[12]/kernel", "quantize"),
)

dense_init = nn.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02)


class DropPath(nn.Module):
  """Stochastic depth: zero a sample's residual branch with probability
  ``rate`` in training, scaling the kept ones by ``1 / (1 - rate)``."""

  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention over the second-to-last axis.

  ``x``: ``[..., N, D]`` (any leading axes: batch, windows); ``bias``: added
  to the float32 attention logits ``[..., H, N, N]`` (Swin's relative
  position bias and shift mask), or None. Params ``qkv`` (one ``D -> 3D``
  dense layer, timm's layout) and ``proj``.
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias=None):
    d = x.shape[-1]
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, kernel_init=dense_init, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(x.shape[:-1] + (3, self.num_heads, hd))
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [..., N, H, hd]
    logits = jnp.einsum("...qhd,...khd->...hqk", q * hd**-0.5, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v).reshape(x.shape)
    return nn.Dense(d, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """``fc2(gelu(fc1(x)))`` with exact (erf) GELU, as in PyTorch."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], kernel_init=dense_init, dtype=self.dtype, name="fc2")(y)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class EncoderBlock(nn.Module):
  """Pre-LN block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

  num_heads: int
  mlp_hidden: int
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = layer_norm(1e-6, "norm1")(x).astype(self.dtype)
    x = x + DropPath(self.drop_path)(Attention(self.num_heads, self.dtype, name="attn")(y), train)
    y = layer_norm(1e-6, "norm2")(x).astype(self.dtype)
    return x + DropPath(self.drop_path)(Mlp(self.mlp_hidden, self.dtype, name="mlp")(y), train)


class VisionTransformer(nn.Module):
  """ViT classifier for ``[B, img_size, img_size, C]`` inputs; the defaults
  are DeiT-S. Params ``patch_embed``, ``cls_token`` ``[1, 1, D]``,
  ``pos_embed`` ``[1, 1 + (img_size / patch_size)^2, D]``, ``block{i}``,
  ``norm``, ``head``. Output ``[B, num_classes]`` float32 logits."""

  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  act: Callable[[], nn.Module] = ReLU  # unused: see the module docstring
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.img_size % self.patch_size:
      raise ValueError(f"ViT: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}.")
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"ViT built for {self.img_size}x{self.img_size} inputs got {x.shape[1]}x{x.shape[2]};"
                       " set img_size to the input resolution.")
    p, d = self.patch_size, self.embed_dim
    x = Conv(d, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, d)
    cls = self.param("cls_token", dense_init, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos_embed", dense_init, (1, x.shape[1], d)).astype(x.dtype)
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)  # linear in depth, as in timm
      x = EncoderBlock(self.num_heads, int(d * self.mlp_ratio), rate, self.dtype, name=f"block{i}")(x, train)
    x = layer_norm(1e-6, "norm")(x[:, 0]).astype(self.dtype)
    return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype, name="head")(x).astype(jnp.float32)
