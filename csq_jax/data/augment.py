"""Batch-wise image augmentations (vectorized numpy, one generator per batch)."""

from __future__ import annotations

import numpy as np


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Standard CIFAR augmentation: zero-pad by ``pad``, random crop back to the
  original size, random horizontal flip; ``images`` is NHWC."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None, :]  # [n, h]
  cols = dx[:, None] + np.arange(w)[None, :]  # [n, w]
  flip = rng.random(n) < 0.5
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
