"""Batch-wise image augmentations (vectorized numpy, one generator per batch)."""

from __future__ import annotations

import numpy as np


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
  """Zero-pad by ``pad``, random crop back to the original size, and (with
  ``flip``) random horizontal flip; ``images`` is NHWC. ``pad=4, flip=True`` is
  the standard CIFAR augmentation."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None, :]  # [n, h]
  cols = dx[:, None] + np.arange(w)[None, :]  # [n, w]
  if flip:
    flipped = rng.random(n) < 0.5
    cols = np.where(flipped[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Shift by up to one pixel in each direction, no flip (digits are not
  mirror-symmetric): the augmentation of the 8x8 digits."""
  return pad_crop_flip(images, rng, pad=1, flip=False)
