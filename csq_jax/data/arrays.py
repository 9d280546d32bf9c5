"""Data sets held in memory as numpy arrays: scikit-learn's digits and a
user's ``.npz`` file.

``array_dataset`` checks the arrays (shape, dtype, labels, finite values) when
they are loaded, so malformed data fails with a ``DataError`` that names the
split and the example, not mid-training with a shape error or a NaN loss.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from csq_jax.data import augment
from csq_jax.data.dataset import DataError, Dataset, standardizer


@dataclasses.dataclass
class ArraySource:
  """Random-access source over in-memory arrays (grain's source protocol)."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def array_dataset(name, x_train, y_train, x_test, y_test, augment_fn=None) -> Dataset:
  """A ``Dataset`` of in-memory splits, normalized with the training set's
  per-channel statistics; ``DataError`` for malformed arrays."""
  x_train, x_test = (_as_nhwc(name, x) for x in (x_train, x_test))
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape.")
  y_train, y_test = (_as_labels(name, y, len(x)) for y, x in ((y_train, x_train), (y_test, x_test)))
  if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
    raise DataError(
        f"{name}: train images are {x_train.dtype} and test images {x_test.dtype}, so their value ranges may"
        " differ ([0, 255] for uint8); store both splits with the same dtype and range, e.g."
        " x_test.astype(x_train.dtype).")
  for split, x in (("x_train", x_train), ("x_test", x_test)):
    _check_finite(name, split, x)
  # One scale for both splits, from the declared range: uint8 is [0, 255].
  scale = 255.0 if x_train.dtype == np.uint8 else 1.0
  scaled = x_train.astype(np.float32) / scale
  mean = scaled.mean(axis=(0, 1, 2))
  std = scaled.std(axis=(0, 1, 2)) + 1e-6
  unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
  if unseen:
    logging.warning("%s: classes %s occur in the test set but not in the training set; the model gets outputs"
                    " for them that are never trained, and their test examples count as errors.", name, unseen)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  return Dataset(
      name=name,
      train=ArraySource(x_train, y_train),
      test=ArraySource(x_test, y_test),
      num_classes=num_classes,
      image_shape=tuple(x_train.shape[1:]),
      normalize=standardizer(mean, std, scale),
      augment=augment_fn,
  )


def _as_nhwc(name: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or min(x.shape) == 0:
    raise DataError(f"{name}: images must be a non-empty NHWC (or NHW) array, got shape {x.shape}.")
  if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
    raise DataError(f"{name}: images must be uint8 or float, got {x.dtype}.")
  return x if x.dtype == np.uint8 else x.astype(np.float32)


def _check_finite(name: str, split: str, x: np.ndarray) -> None:
  """A ``DataError`` naming the split and the first example holding NaN or Inf."""
  if x.dtype == np.uint8:
    return
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise DataError(
        f"{name}: {split}[{bad[0]}] holds NaN or Inf ({len(bad)} example(s) of {split} do, indices"
        f" {bad[:5].tolist()}{'...' if len(bad) > 5 else ''}); fix or drop them before training.")


def _as_labels(name: str, y: np.ndarray, n: int) -> np.ndarray:
  y = np.asarray(y).reshape(-1)
  if len(y) != n:
    raise DataError(f"{name}: {n} images but {len(y)} labels.")
  if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
    raise DataError(f"{name}: labels must be non-negative integers, got dtype {y.dtype}.")
  return y.astype(np.int32)


def load_digits_dataset() -> Dataset:
  """scikit-learn's 1797 8x8 digits (values 0..16), stratified 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
  )
  return array_dataset("digits", x_tr, y_tr, x_te, y_te, augment.random_shift)


def load_npz_dataset(path: str) -> Dataset:
  if not os.path.isfile(path):
    raise DataError(
        f"npz data set {path!r} does not exist. Save one with numpy.savez(PATH,"
        " x_train=..., y_train=..., x_test=..., y_test=...) and pass dataset='npz:PATH'."
    )
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile/pickle errors: the file is not an npz.
    raise DataError(f"{path!r} is not a readable .npz file ({e}).") from e
  missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
  if missing:
    raise DataError(f"{path!r} lacks arrays {missing}; it has {sorted(arrays)}.")
  return array_dataset(
      f"npz:{path}", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
  )
