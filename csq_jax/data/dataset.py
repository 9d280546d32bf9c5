"""What every loader returns: a ``Dataset`` (two random-access sources and
how to normalize and augment their images), the ``DataError`` it raises, and
the per-channel standardization they share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


class DataError(ValueError):
  """Missing or malformed data; the message says what to do."""


@dataclasses.dataclass
class Dataset:
  """A classification data set: two random-access sources and their metadata.

  ``normalize`` maps a batch of raw images (uint8 or float, NHWC) to float32
  model inputs; ``augment`` (or None) maps ``(batch images, rng)`` to
  augmented raw images. For sources whose images vary in size, ``train_map``
  maps ``(example, rng)`` and ``eval_map`` maps ``example`` to an example whose
  image has ``image_shape``, before batching; None keeps the stored images.
  ``augment`` is applied only when ``train_map`` is None.
  """

  name: str
  train: Any
  test: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  normalize: Callable[[np.ndarray], np.ndarray]
  augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
  train_map: Callable[[dict, np.random.Generator], dict] | None = None
  eval_map: Callable[[dict], dict] | None = None

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def num_test(self) -> int:
    return len(self.test)


def standardizer(mean, std, scale: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """``(images / scale - mean) / std``. ``scale`` is decided once for the data
  set (255 for uint8 images); None: 255 for uint8 batches, 1 for float ones."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def normalize(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    s = scale if scale is not None else (255.0 if images.dtype == np.uint8 else 1.0)
    if s != 1.0:
      x = x / np.float32(s)
    return (x - mean) / std

  return normalize
