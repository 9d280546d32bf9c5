"""Per-example transforms for tfds image sets whose images vary in size
(ImageNet): decode, crop to a fixed size, flip.

Images arrive as encoded bytes (JPEG for ``imagenet2012``; read with
``tfds.decode.SkipDecoding`` and decoded here with Pillow, no TensorFlow) and
leave as uint8 ``[size, size, channels]`` arrays, so that they can be batched;
normalization with ``MEAN_RGB``/``STD_RGB`` happens batch-wise afterwards.

* Training: Inception-style random-resized crop (a box of 8%..100% of the
  image area and aspect ratio 3/4..4/3, resized to ``size`` x ``size``) and a
  random horizontal flip, drawn from the example's generator.
* Evaluation: resize the shorter side to ``size / 0.875`` (256 for 224), then
  center-crop ``size`` x ``size``.

Resizing is Pillow's antialiased bilinear filter, as in torchvision's
``RandomResizedCrop``/``Resize`` on PIL images.

Preparing ``imagenet2012`` (once, needs TensorFlow): put
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` (from
https://image-net.org/download-images) in ``DATA_DIR/downloads/manual``, then::

  pip install tensorflow && tfds build imagenet2012 --data_dir=DATA_DIR \\
      --manual_dir=DATA_DIR/downloads/manual --file_format=array_record

(``csq_jax.data.prepare_command`` writes this command for any data set.)
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image

# ImageNet per-channel statistics of the training set (RGB, images in [0, 1]).
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
# Evaluation resizes the shorter side to size / CENTER_CROP_FRACTION (224 -> 256).
CENTER_CROP_FRACTION = 0.875
# The data sets that need their archives downloaded by hand, and those archives.
MANUAL_DOWNLOADS = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def decode(image: bytes | np.ndarray, channels: int = 3) -> Image.Image:
  """Encoded image bytes (or a decoded HWC/HW array) as a Pillow image with
  ``channels`` (1 or 3) channels; grayscale and CMYK images are converted."""
  mode = "RGB" if channels == 3 else "L"
  if isinstance(image, np.ndarray):
    img = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
  else:
    img = Image.open(io.BytesIO(image))
  return img if img.mode == mode else img.convert(mode)


def _as_array(img: Image.Image) -> np.ndarray:
  x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
  """The Inception crop box ``(top, left, box_height, box_width)`` in an image
  of ``height`` x ``width`` pixels (Szegedy et al., "Going deeper with
  convolutions", Sec. 6; torchvision's ``RandomResizedCrop``).

  ``attempts`` candidate boxes of area ``U(scale) * height * width`` and aspect
  ratio (width / height) log-uniform in ``ratio`` are drawn at once; the first
  that fits is placed uniformly at random. If none fits, the central box of the
  whole image with its aspect ratio clamped to ``ratio`` is returned.
  """
  area = rng.uniform(scale[0], scale[1], attempts) * (height * width)
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), attempts))
  ws = np.rint(np.sqrt(area * aspect)).astype(np.int64)
  hs = np.rint(np.sqrt(area / aspect)).astype(np.int64)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  if fits.any():
    k = int(np.argmax(fits))
    h, w = int(hs[k]), int(ws[k])
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, min(height, int(round(width / ratio[0])))
  elif in_ratio > ratio[1]:
    h, w = height, min(width, int(round(height * ratio[1])))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image, rng: np.random.Generator, size: int, channels: int = 3) -> np.ndarray:
  """Random-resized crop to ``size`` x ``size`` and a random horizontal flip:
  uint8 ``[size, size, channels]``. Draws the box, then the flip, from ``rng``."""
  img = decode(image, channels)
  top, left, h, w = random_resized_crop_box(img.height, img.width, rng)
  x = _as_array(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
  if rng.random() < 0.5:
    x = x[:, ::-1]
  return np.ascontiguousarray(x)


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
  """``(height, width)`` after resizing the shorter side to ``shorter``
  (the longer side rounded down, as torchvision's ``Resize``)."""
  if height <= width:
    return shorter, int(shorter * width / height)
  return int(shorter * height / width), shorter


def eval_transform(image, size: int, channels: int = 3, resize: int | None = None) -> np.ndarray:
  """Resize the shorter side to ``resize`` (default ``round(size / 0.875)``),
  then center-crop ``size`` x ``size``: uint8 ``[size, size, channels]``."""
  resize = resize or int(round(size / CENTER_CROP_FRACTION))
  img = decode(image, channels)
  rh, rw = resized_shape(img.height, img.width, resize)
  top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
  # Resample only the crop: its box in source pixels keeps the full resize's
  # scale, so the pixels are those of resizing everything, then cropping.
  sy, sx = img.height / rh, img.width / rw
  box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
  return np.ascontiguousarray(_as_array(img.resize((size, size), Image.BILINEAR, box=box)))


def train_map(size: int, channels: int = 3) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]:
  """The per-example training transform of ``{"image": bytes, "label"}``."""

  def fn(example, rng):
    return {"image": train_transform(example["image"], rng, size, channels), "label": example["label"]}

  return fn


def eval_map(size: int, channels: int = 3) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """The per-example evaluation transform of ``{"image": bytes, "label"}``."""

  def fn(example):
    return {"image": eval_transform(example["image"], size, channels), "label": example["label"]}

  return fn
