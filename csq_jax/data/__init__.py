"""Input pipelines, chosen by ``config.dataset``.

* ``digits``: scikit-learn's 8x8 handwritten digits (shipped inside the
  package, no download), a fixed stratified 80/20 split, training images
  shifted by up to one pixel.
* ``npz:PATH``: a user's arrays ``x_train, y_train, x_test, y_test``; images
  NHWC (or NHW) uint8 or float, any size and channel count; the number of
  classes is read off the labels.
* ``tfds:NAME`` (e.g. ``tfds:cifar10``): a data set prepared in
  ``config.data_dir`` in the ArrayRecord format, read with tensorflow-datasets'
  ``data_source`` (random access, no TensorFlow) and the standard CIFAR
  augmentation (4-pixel pad, random crop, horizontal flip).

Every pipeline is a ``grain.MapDataset``: shuffled with a seed that depends on
the epoch, batched, then augmented batch-wise with a per-batch random
generator, so an epoch's batches are a pure function of ``(seed, epoch)`` and
resuming at an epoch boundary replays exactly the same data.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import grain
import numpy as np

from csq_jax.data import augment


class DataError(ValueError):
  """Missing or malformed data; the message says what to do."""


@dataclasses.dataclass
class ArraySource:
  """Random-access source over in-memory arrays (grain's source protocol)."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


@dataclasses.dataclass
class Dataset:
  """A classification data set: two random-access sources and their metadata.

  ``normalize`` maps a batch of raw images (uint8 or float, NHWC) to float32
  model inputs; ``augment`` (or None) maps ``(batch images, rng)`` to
  augmented raw images.
  """

  name: str
  train: Any
  test: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  normalize: Callable[[np.ndarray], np.ndarray]
  augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def num_test(self) -> int:
    return len(self.test)


def _standardizer(mean, std) -> Callable[[np.ndarray], np.ndarray]:
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def normalize(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
      x = x / 255.0
    return (x - mean) / std

  return normalize


def _array_dataset(name, x_train, y_train, x_test, y_test, augment_fn=None) -> Dataset:
  x_train, x_test = (_as_nhwc(name, x) for x in (x_train, x_test))
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape.")
  y_train, y_test = (_as_labels(name, y, len(x)) for y, x in ((y_train, x_train), (y_test, x_test)))
  scaled = x_train.astype(np.float32) / (255.0 if x_train.dtype == np.uint8 else 1.0)
  mean = scaled.mean(axis=(0, 1, 2))
  std = scaled.std(axis=(0, 1, 2)) + 1e-6
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  return Dataset(
      name=name,
      train=ArraySource(x_train, y_train),
      test=ArraySource(x_test, y_test),
      num_classes=num_classes,
      image_shape=tuple(x_train.shape[1:]),
      normalize=_standardizer(mean, std),
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
  return _array_dataset("digits", x_tr, y_tr, x_te, y_te, augment.random_shift)


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
  return _array_dataset(
      f"npz:{path}", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
  )


# CIFAR-10 per-channel statistics of the training set.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _TfdsSource:
  """A tfds data_source with only the image and label kept."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    ex = self._source[i]
    return {"image": np.asarray(ex["image"]), "label": np.int32(ex["label"])}


def prepare_command(name: str, data_dir: str) -> str:
  return (
      f"pip install tensorflow && tfds build {name} --data_dir={data_dir}"
      " --file_format=array_record"
  )


def load_tfds_dataset(name: str, data_dir: str | None, train_split="train", test_split="test") -> Dataset:
  """A tfds image classification data set, prepared as ArrayRecord in ``data_dir``."""
  import tensorflow_datasets as tfds

  if not data_dir:
    raise DataError(f"dataset 'tfds:{name}' needs config.data_dir, the folder that holds the prepared data.")
  how = f"Prepare it once with: {prepare_command(name, data_dir)}"
  try:
    sources = {
        split: tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        for split in (train_split, test_split)
    }
  except Exception as e:
    if not os.path.isdir(os.path.join(data_dir, name)):
      raise DataError(f"No prepared {name!r} in data_dir {data_dir!r}. {how}") from e
    if isinstance(e, NotImplementedError):  # prepared as TFRecord: no random access.
      raise DataError(f"{name!r} in {data_dir!r} is not in the ArrayRecord format. {how}") from e
    raise DataError(f"Could not read {name!r} from {data_dir!r} ({e}). {how}") from e
  train = sources[train_split]
  info = train.dataset_info
  shape = tuple(info.features["image"].shape)
  is_cifar = name.startswith("cifar")
  mean, std = (_CIFAR_MEAN, _CIFAR_STD) if is_cifar else ((0.5,) * shape[-1], (0.25,) * shape[-1])
  return Dataset(
      name=f"tfds:{name}",
      train=_TfdsSource(train),
      test=_TfdsSource(sources[test_split]),
      num_classes=info.features["label"].num_classes,
      image_shape=shape,
      normalize=_standardizer(mean, std),
      augment=augment.pad_crop_flip if is_cifar else None,
  )


def load_dataset(config) -> Dataset:
  """The data set named by ``config.dataset`` (see the module docstring)."""
  spec = config.dataset
  if spec == "digits":
    return load_digits_dataset()
  if spec.startswith("npz:"):
    return load_npz_dataset(spec[len("npz:"):])
  if spec.startswith("tfds:"):
    return load_tfds_dataset(spec[len("tfds:"):], config.get("data_dir"))
  raise DataError(f"Unknown dataset {spec!r}; expected 'digits', 'npz:PATH' or 'tfds:NAME'.")


def _to_batch(ds: Dataset, batch, rng=None, train: bool = False):
  images = batch["image"]
  if train and ds.augment is not None:
    images = ds.augment(images, rng)
  return {"image": ds.normalize(images), "label": batch["label"].astype(np.int32)}


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_batches(ds: Dataset, batch_size: int, seed: int, epoch: int) -> grain.MapDataset:
  """The epoch's training batches: a pure function of ``(seed, epoch)``.

  The last incomplete batch is dropped, so every step sees ``batch_size``
  examples and the step is compiled once.
  """
  if ds.num_train < batch_size:
    raise DataError(f"{ds.name} has {ds.num_train} training examples, fewer than batch_size={batch_size}.")
  s = epoch_seed(seed, epoch)
  return (
      grain.MapDataset.source(ds.train)
      .shuffle(seed=s)
      .batch(batch_size, drop_remainder=True)
      .random_map(lambda b, rng: _to_batch(ds, b, rng, train=True), seed=s)
  )


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  return ds.num_train // batch_size


def eval_batches(ds: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Test batches padded to ``batch_size``; ``mask`` marks the real examples."""
  batches = grain.MapDataset.source(ds.test).batch(batch_size, drop_remainder=False)
  for batch in batches:
    b = _to_batch(ds, batch)
    n = len(b["label"])
    pad = batch_size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if pad:
      b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
    b["mask"] = mask
    yield b
