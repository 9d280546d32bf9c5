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

Layout: ``dataset.py`` (``Dataset``, ``DataError``), ``arrays.py`` (digits,
npz, and the checks on user arrays), ``tfds_source.py`` (tfds sets and how to
prepare them), ``imagenet.py`` (per-example crops of varying-size images),
``augment.py`` (batch-wise augmentations), ``batches.py`` (batching and
iteration). This module re-exports the public names, so callers write
``data.train_batches``, and dispatches ``config.dataset`` (``load_dataset``).
"""

from __future__ import annotations

from csq_jax.data import augment, imagenet
from csq_jax.data.arrays import ArraySource, load_digits_dataset, load_npz_dataset
from csq_jax.data.batches import (
    epoch_seed,
    eval_batches,
    prefetch_to_device,
    steps_per_epoch,
    to_iterator,
    train_batches,
)
from csq_jax.data.dataset import DataError, Dataset
from csq_jax.data.tfds_source import load_tfds_dataset, prepare_command

__all__ = [
    "ArraySource", "DataError", "Dataset", "augment", "epoch_seed", "eval_batches", "imagenet",
    "load_dataset", "load_digits_dataset", "load_npz_dataset", "load_tfds_dataset", "prefetch_to_device",
    "prepare_command", "steps_per_epoch", "to_iterator", "train_batches",
]


# Defined here rather than in a submodule: it calls the loaders through this
# namespace, so patching ``data.load_npz_dataset`` (etc.) reaches it.
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
