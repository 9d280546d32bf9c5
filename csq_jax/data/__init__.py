"""Input pipelines, chosen by ``config.dataset``.

* ``digits``: scikit-learn's 8x8 handwritten digits (shipped inside the
  package, no download), a fixed stratified 80/20 split, training images
  shifted by up to one pixel.
* ``npz:PATH``: a user's arrays ``x_train, y_train, x_test, y_test``; images
  NHWC (or NHW) uint8 or float, any size and channel count; the number of
  classes is read off the labels. Both splits must share a dtype (uint8 is
  scaled from [0, 255], once for both) and hold only finite values (checked at
  load, naming the split and index); classes found only in the test split are
  named in a warning.
* ``tfds:NAME`` (e.g. ``tfds:cifar10``): a data set prepared in
  ``config.data_dir`` in the ArrayRecord format, read with tensorflow-datasets'
  ``data_source`` (random access, no TensorFlow) and the standard CIFAR
  augmentation (4-pixel pad, random crop, horizontal flip).
* ``tfds:imagenet2012`` and other tfds sets whose images vary in size: JPEG
  bytes decoded with Pillow and cropped per example to ``config.image_size``
  (default 224; see ``data/imagenet.py``); the evaluation set is the
  ``validation`` split for ``imagenet2012*``, else ``test``.

Every pipeline is a ``grain.MapDataset``: shuffled with a seed that depends on
the epoch, transformed per example (``Dataset.train_map``, for images of
varying size), batched, then augmented batch-wise (``Dataset.augment``) with a
per-batch random generator. Batch ``i`` of an epoch is a pure function of
``(seed, epoch, i)``: a run resumes mid-epoch at any batch (``start``), and
``process_count`` hosts together read exactly the single-host global batches.
Iterate with ``to_iterator`` (bounded prefetch, optional worker processes)
and ``prefetch_to_device``; iterating a ``MapDataset`` directly uses grain's
default read-ahead of up to 500 elements.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import grain
import numpy as np
from absl import logging

from csq_jax.data import augment, imagenet


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


def _standardizer(mean, std, scale: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
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


def _array_dataset(name, x_train, y_train, x_test, y_test, augment_fn=None) -> Dataset:
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
      normalize=_standardizer(mean, std, scale),
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
  """A tfds data_source with only the image (an array, or the encoded bytes
  when read with ``SkipDecoding``) and the label kept."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    ex = self._source[i]
    image = ex["image"]
    return {"image": image if isinstance(image, bytes) else np.asarray(image), "label": np.int32(ex["label"])}


def _base_name(name: str) -> str:
  """``imagenet2012`` of ``imagenet2012``, ``imagenet2012:5.1.0`` or ``imagenet2012/config``."""
  return name.split(":")[0].split("/")[0]


def prepare_command(name: str, data_dir: str) -> str:
  """The one-time command that prepares tfds data set ``name`` in ``data_dir``
  in the ArrayRecord format (TensorFlow is needed for this step only). For a
  data set with manual downloads (``imagenet2012``) the archives must first be
  put in ``data_dir/downloads/manual`` (see ``_how_to_prepare``)."""
  cmd = f"pip install tensorflow && tfds build {name} --data_dir={data_dir}"
  if _base_name(name) in imagenet.MANUAL_DOWNLOADS:
    cmd += f" --manual_dir={os.path.join(data_dir, 'downloads', 'manual')}"
  return cmd + " --file_format=array_record"


def _how_to_prepare(name: str, data_dir: str) -> str:
  files = imagenet.MANUAL_DOWNLOADS.get(_base_name(name))
  where = ""
  if files:
    where = (f" (first put {' and '.join(files)}, from https://image-net.org/download-images, in"
             f" {os.path.join(data_dir, 'downloads', 'manual')})")
  return f"Prepare it once{where} with: {prepare_command(name, data_dir)}"


def _convert_command(name: str, data_dir: str) -> str:
  return (f"pip install tensorflow && tfds convert_format --dataset_dir={os.path.join(data_dir, _base_name(name))}"
          " --out_file_format=array_record")


def load_tfds_dataset(
    name: str,
    data_dir: str | None,
    train_split: str = "train",
    test_split: str | None = None,
    image_size: int = 224,
) -> Dataset:
  """A tfds image classification data set, prepared as ArrayRecord in ``data_dir``.

  Images of a fixed size are decoded by tfds and batched as they are (CIFAR
  gets its pad-crop-flip augmentation). Images of varying size (ImageNet) are
  read as encoded bytes and cropped per example to ``image_size`` x
  ``image_size`` (``data/imagenet.py``). ``test_split`` defaults to
  ``validation`` for ``imagenet2012*`` (its ``test`` split has no labels),
  else to ``test``.
  """
  import tensorflow_datasets as tfds

  if not data_dir:
    raise DataError(
        f"dataset 'tfds:{name}' needs config.data_dir, the folder that holds the prepared data."
        f" {_how_to_prepare(name, 'DATA_DIR')}"
    )
  how = _how_to_prepare(name, data_dir)
  try:
    features = tfds.builder(name, data_dir=data_dir).info.features
  except Exception as e:  # DatasetNotFoundError and friends
    raise DataError(f"tfds has no data set {name!r} ({e}).") from e
  shape = tuple(features["image"].shape)
  varying = None in shape[:2]
  decoders = {"image": tfds.decode.SkipDecoding()} if varying else None
  if test_split is None:
    test_split = "validation" if _base_name(name).startswith("imagenet2012") else "test"
  try:
    sources = {
        split: tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
        for split in (train_split, test_split)
    }
  except Exception as e:
    if not os.path.isdir(os.path.join(data_dir, _base_name(name))):
      raise DataError(f"No prepared {name!r} in data_dir {data_dir!r}. {how}") from e
    if isinstance(e, NotImplementedError):  # prepared as TFRecord: no random access.
      raise DataError(
          f"{name!r} in {data_dir!r} is not in the ArrayRecord format. Convert it once in place with:"
          f" {_convert_command(name, data_dir)} (or rebuild it: {prepare_command(name, data_dir)})"
      ) from e
    raise DataError(f"Could not read {name!r} from {data_dir!r} ({e}). {how}") from e
  num_classes = features["label"].num_classes
  train, test = _TfdsSource(sources[train_split]), _TfdsSource(sources[test_split])
  if varying:
    channels = shape[-1] or 3
    stats = (imagenet.MEAN_RGB, imagenet.STD_RGB) if channels == 3 else ((0.5,), (0.25,))
    return Dataset(
        name=f"tfds:{name}", train=train, test=test, num_classes=num_classes,
        image_shape=(image_size, image_size, channels), normalize=_standardizer(*stats),
        train_map=imagenet.train_map(image_size, channels), eval_map=imagenet.eval_map(image_size, channels),
    )
  is_cifar = name.startswith("cifar")
  mean, std = (_CIFAR_MEAN, _CIFAR_STD) if is_cifar else ((0.5,) * shape[-1], (0.25,) * shape[-1])
  return Dataset(
      name=f"tfds:{name}", train=train, test=test, num_classes=num_classes, image_shape=shape,
      normalize=_standardizer(mean, std), augment=augment.pad_crop_flip if is_cifar else None,
  )


def load_dataset(config) -> Dataset:
  """The data set named by ``config.dataset`` (see the module docstring);
  ``config.image_size`` (default 224) sizes the crops of varying-size sets."""
  spec = config.dataset
  if spec == "digits":
    return load_digits_dataset()
  if spec.startswith("npz:"):
    return load_npz_dataset(spec[len("npz:"):])
  if spec.startswith("tfds:"):
    return load_tfds_dataset(spec[len("tfds:"):], config.get("data_dir"), image_size=config.get("image_size", 224))
  raise DataError(f"Unknown dataset {spec!r}; expected 'digits', 'npz:PATH' or 'tfds:NAME'.")


def _to_batch(ds: Dataset, batch, rng=None, train: bool = False):
  images = batch["image"]
  if train and ds.augment is not None:
    images = ds.augment(images, rng)
  return {"image": ds.normalize(images), "label": batch["label"].astype(np.int32)}


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise DataError(
        f"batch_size {batch_size} is not divisible by the {process_count} processes; use a multiple of {process_count}."
    )
  return batch_size // process_count


def train_batches(
    ds: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """This process's training batches of the epoch, from batch ``start`` on.

  ``batch_size`` is the global batch. Global batch ``i`` is a pure function of
  ``(seed, epoch, i)``: the epoch's shuffle and the random transforms are
  seeded by ``(seed, epoch)`` and the example's position (per-example
  ``train_map``) or the batch's index (batch-wise ``augment``). Process
  ``process_index`` of ``process_count`` gets rows ``[p * b, (p + 1) * b)``,
  ``b = batch_size / process_count``, of each, so the processes together see
  exactly the single-process batches. The first ``start`` batches are skipped
  by index, without reading or transforming them (resuming mid-epoch). The
  last incomplete global batch is dropped, so every step sees ``batch_size``
  examples and the step is compiled once. ``len()`` is
  ``steps_per_epoch - start``.
  """
  rows = _rows_per_process(batch_size, process_index, process_count)
  if ds.num_train < batch_size:
    raise DataError(f"{ds.name} has {ds.num_train} training examples, fewer than batch_size={batch_size}.")
  num_batches = steps_per_epoch(ds, batch_size)
  if not 0 <= start <= num_batches:
    raise DataError(f"start={start} is outside the {num_batches} batches of an epoch of {ds.name}.")
  s = epoch_seed(seed, epoch)
  examples = grain.MapDataset.source(ds.train).shuffle(seed=s)
  if ds.train_map is None:
    # One generator per global batch: every process makes the whole global
    # batch and keeps its rows (the in-memory sets augmented batch-wise are small).
    batches = examples.batch(batch_size, drop_remainder=True).random_map(
        lambda b, rng: _to_batch(ds, b, rng, train=True), seed=s
    )
    if process_count > 1:
      lo = process_index * rows
      batches = batches.map(lambda b: {k: v[lo:lo + rows] for k, v in b.items()})
  else:
    # One generator per example: a process reads and transforms only its rows,
    # the sub-batches p, p + P, p + 2P, ... of size b.
    batches = (
        examples.random_map(ds.train_map, seed=s)
        .batch(rows, drop_remainder=True)[process_index::process_count][:num_batches]
        .map(lambda b: _to_batch(ds, b))
    )
  return batches[start:]


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  return ds.num_train // batch_size


def _masked_batch(ds: Dataset, batch) -> dict[str, np.ndarray]:
  """Normalized batch with the padding rows (``mask == 0``) zeroed."""
  mask = batch["mask"]
  b = _to_batch(ds, batch)
  out = {k: np.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)) > 0, v, np.zeros((), v.dtype)) for k, v in b.items()}
  out["mask"] = mask
  return out


def eval_batches(ds: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Test batches padded to ``batch_size``; ``mask`` marks the real examples
  (padding rows are zeros). With ``process_count`` processes, process ``p``
  gets rows ``[p * b, (p + 1) * b)`` of each global batch, as in
  ``train_batches``."""
  rows = _rows_per_process(batch_size, process_index, process_count)
  n = ds.num_test
  examples = grain.MapDataset.source(ds.test)
  if ds.eval_map is not None:
    examples = examples.map(ds.eval_map)
  num_batches = -(-n // batch_size)
  # Padding rows repeat a real example (no shape to guess) and are zeroed after.
  padded = grain.MapDataset.range(num_batches * batch_size).map(
      lambda g: {**examples[g % n], "mask": np.float32(g < n)}
  )
  return padded.batch(rows)[process_index::process_count].map(lambda b: _masked_batch(ds, b))


def to_iterator(batches: grain.MapDataset, workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """Iterate ``batches`` in order, making up to ``prefetch`` batches ahead in
  as many threads of this process (``workers=0``), or in ``workers`` processes
  (grain's ``mp_prefetch``; worker ``k`` makes batches ``k, k + workers, ...``).

  The config knobs are ``data_workers`` and ``prefetch_batches``. Scripts that
  use workers need an ``if __name__ == "__main__":`` guard (workers are
  spawned and re-import ``__main__``); ``close()`` the iterator to stop them
  early.
  """
  prefetch = max(int(prefetch), 0)
  if workers <= 0:
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
  from absl import flags

  if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults outside absl.app)
    flags.FLAGS.mark_as_parsed()
  per_worker = max(1, -(-prefetch // workers))
  return iter(
      batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=per_worker)
      )
  )


def prefetch_to_device(iterator: Iterable[Any], size: int = 2, sharding=None) -> Iterator[Any]:
  """Yield the batches of ``iterator`` as device arrays, keeping ``size``
  transfers in flight ahead of the consumer.

  Without ``sharding`` each batch goes to the default device
  (``jax.device_put``); with a ``jax.sharding.Sharding`` over the batch axis
  each process's rows become its part of one global array
  (``jax.make_array_from_process_local_data``).
  """
  import jax

  if sharding is None:
    put = jax.device_put
  else:
    def put(batch):
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  queue = collections.deque()
  it = iter(iterator)

  def enqueue(k: int):
    for _ in range(k):
      batch = next(it, None)
      if batch is None:
        return
      queue.append(put(batch))

  enqueue(max(size, 1))
  while queue:
    yield queue.popleft()
    enqueue(1)
