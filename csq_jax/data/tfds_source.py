"""tfds image classification sets, read from ArrayRecord files with
tensorflow-datasets' ``data_source`` (random access, no TensorFlow at run time).

Sets of fixed-size images are decoded by tfds; sets whose images vary in size
(ImageNet) are read as encoded bytes and cropped per example by
``data/imagenet.py``. Preparing a set needs TensorFlow once
(``prepare_command``), so every failure to read one says how to prepare or
convert it.
"""

from __future__ import annotations

import os

import numpy as np

from csq_jax.data import augment, imagenet
from csq_jax.data.dataset import DataError, Dataset, standardizer


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
        image_shape=(image_size, image_size, channels), normalize=standardizer(*stats),
        train_map=imagenet.train_map(image_size, channels), eval_map=imagenet.eval_map(image_size, channels),
    )
  is_cifar = name.startswith("cifar")
  mean, std = (_CIFAR_MEAN, _CIFAR_STD) if is_cifar else ((0.5,) * shape[-1], (0.25,) * shape[-1])
  return Dataset(
      name=f"tfds:{name}", train=train, test=test, num_classes=num_classes, image_shape=shape,
      normalize=standardizer(mean, std), augment=augment.pad_crop_flip if is_cifar else None,
  )
