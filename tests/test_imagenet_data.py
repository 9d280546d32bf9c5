"""ImageNet pipeline: per-example crops, resumable and per-host batches, read
through tfds.data_source from a fake ``imagenet2012`` in the ArrayRecord
format (written here, no TensorFlow, no download)."""

import dataclasses
import io
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from csq_jax import data
from csq_jax.data import imagenet

SIZE = 16  # crop size of the smoke tests
SPLITS = {"train": 37, "validation": 13, "test": 5}


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format=fmt)
  return buf.getvalue()


def write_fake_tfds(data_dir, splits: dict[str, list[dict]], name="imagenet2012", file_format="array_record"):
  """Write ``splits`` (lists of feature dicts) as tfds data set ``name``
  prepared in ``data_dir`` in ``file_format``, with the dataset_info.json that
  ``tfds.data_source`` reads; no TensorFlow needed."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
  os.makedirs(builder.data_dir, exist_ok=True)
  infos = []
  for split, examples in splits.items():
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=builder.name, split=split, filetype_suffix=file_format,
    )
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    records = [builder.info.features.serialize_example(ex) for ex in examples]
    if file_format == "array_record":
      writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
      for r in records:
        writer.write(r)
      writer.close()
    else:  # only the metadata matters: tfds refuses random access before reading
      path.write_bytes(b"")
    infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(records)], num_bytes=sum(map(len, records)), filename_template=template,
    ))
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.write_to_directory(builder.data_dir)


def fake_imagenet_examples(seed=0) -> dict[str, list[dict]]:
  """JPEG images of varying size (one grayscale per split); test has label -1."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in SPLITS.items():
    exs = []
    for i in range(n):
      h, w = rng.integers(12, 48, 2)
      channels = 1 if i == 2 else 3
      image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
      label = -1 if split == "test" else int(rng.integers(0, 1000))
      exs.append({"image": encode(image), "label": label, "file_name": f"{split}_{i}.JPEG"})
    out[split] = exs
  return out


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  """(data_dir, examples) of a fake imagenet2012 in the ArrayRecord format."""
  data_dir = tmp_path_factory.mktemp("tfds")
  examples = fake_imagenet_examples()
  write_fake_tfds(data_dir, examples)
  return str(data_dir), examples


@pytest.fixture(scope="module")
def ds(fake):
  return data.load_tfds_dataset("imagenet2012", fake[0], image_size=SIZE)


def normalized(images: np.ndarray) -> np.ndarray:
  return (images / 255.0 - np.array(imagenet.MEAN_RGB)) / np.array(imagenet.STD_RGB)


def stack(batches, key="image"):
  return np.stack([b[key] for b in batches])


# --- transforms, against independent computations ------------------------------------------------

def test_random_resized_crop_box_bounds_area_and_ratio():
  for h, w in [(48, 64), (375, 500), (500, 333), (17, 17)]:
    for k in range(200):
      top, left, bh, bw = imagenet.random_resized_crop_box(h, w, np.random.default_rng(k))
      assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
      # Rounding the sides moves area and ratio by at most about one pixel per side.
      area = bh * bw / (h * w)
      slack = (bh + bw + 1) / (h * w)
      assert 0.08 - slack <= area <= 1.0 + 1e-9
      rel = 2 / min(bh, bw)
      assert 3 / 4 * (1 - rel) <= bw / bh <= 4 / 3 * (1 + rel)
  # A strip too wide for any candidate: the central box with the ratio clamped to 4/3.
  assert imagenet.random_resized_crop_box(10, 200, np.random.default_rng(0)) == (0, 93, 10, 13)
  assert imagenet.random_resized_crop_box(200, 10, np.random.default_rng(0)) == (93, 0, 13, 10)
  # Same generator state, same box; the positions spread over the image.
  boxes = {imagenet.random_resized_crop_box(375, 500, np.random.default_rng(k)) for k in range(50)}
  assert len(boxes) == 50
  assert imagenet.random_resized_crop_box(375, 500, np.random.default_rng(7)) == \
      imagenet.random_resized_crop_box(375, 500, np.random.default_rng(7))


def ramp(h: int, w: int) -> np.ndarray:
  """Red = column, green = row: a resize of it is known in closed form."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def test_train_transform_crops_resizes_and_flips_the_drawn_box():
  h, w, size = 150, 200, 32
  png = encode(ramp(h, w), "PNG")
  flips = 0
  for k in range(20):
    out = imagenet.train_transform(png, np.random.default_rng(k), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    rng = np.random.default_rng(k)  # the same draws: box, then flip
    top, left, bh, bw = imagenet.random_resized_crop_box(h, w, rng)
    flip = rng.random() < 0.5
    flips += flip
    centers = (np.arange(size) + 0.5) / size
    cols = left + centers * bw - 0.5
    rows = top + centers * bh - 0.5
    if flip:
      cols = cols[::-1]
    inner = slice(2, size - 2)  # the filter of a linear ramp is exact away from the image border
    np.testing.assert_allclose(out[inner, inner, 0], np.broadcast_to(cols[None, inner], (size - 4, size - 4)), atol=1.0)
    np.testing.assert_allclose(out[inner, inner, 1], np.broadcast_to(rows[inner, None], (size - 4, size - 4)), atol=1.0)
  assert 0 < flips < 20


def test_eval_transform_resizes_shorter_side_and_center_crops():
  # Shorter side already at the resize size: the center crop of the pixels, exactly.
  image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8)
  out = imagenet.eval_transform(encode(image, "PNG"), 32, resize=40)
  np.testing.assert_array_equal(out, image[4:36, 12:44])
  # Default resize = size / 0.875; a ramp gives the sampled coordinates.
  assert imagenet.resized_shape(375, 500, 256) == (256, 341)
  assert imagenet.resized_shape(500, 333, 256) == (384, 256)
  h, w, size = 150, 200, 28  # resize to 32 x 42, crop rows 2.., columns 7..
  out = imagenet.eval_transform(encode(ramp(h, w), "PNG"), size)
  assert out.shape == (size, size, 3)
  cols = (7 + np.arange(size) + 0.5) * (w / 42) - 0.5
  rows = (2 + np.arange(size) + 0.5) * (h / 32) - 0.5
  inner = slice(1, size - 1)
  np.testing.assert_allclose(out[inner, inner, 0], np.broadcast_to(cols[None, inner], (size - 2, size - 2)), atol=1.0)
  np.testing.assert_allclose(out[inner, inner, 1], np.broadcast_to(rows[inner, None], (size - 2, size - 2)), atol=1.0)
  # Equal (up to rounding) to resizing the whole image with Pillow, then cropping.
  rng = np.random.default_rng(1)
  for h, w in [(61, 90), (90, 61), (33, 33), (200, 47)]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rh, rw = (32, w * 32 // h) if h <= w else (h * 32 // w, 32)
    whole = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR)).astype(int)
    top, left = int(round((rh - 28) / 2)), int(round((rw - 28) / 2))
    out = imagenet.eval_transform(encode(image, "PNG"), 28)
    assert np.abs(out - whole[top:top + 28, left:left + 28]).max() <= 1


def test_grayscale_is_decoded_to_three_equal_channels():
  gray = np.random.default_rng(0).integers(0, 256, (20, 30, 1), dtype=np.uint8)
  out = imagenet.eval_transform(encode(gray, "PNG"), 20, resize=20)
  assert out.shape == (20, 20, 3)
  np.testing.assert_array_equal(out[..., 0], gray[:, 5:25, 0])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


# --- the tfds pipeline on the fake imagenet2012 ---------------------------------------------------

def test_load_reads_validation_as_test_split_with_imagenet_transforms(fake):
  data_dir, examples = fake
  c = ml_collections.ConfigDict({"dataset": "tfds:imagenet2012", "data_dir": data_dir, "image_size": SIZE})
  ds = data.load_dataset(c)
  assert (ds.num_train, ds.num_test, ds.num_classes) == (37, 13, 1000)
  assert ds.image_shape == (SIZE, SIZE, 3) and ds.augment is None
  assert ds.train[0]["image"] == examples["train"][0]["image"]  # the JPEG bytes, undecoded
  assert [ds.test[i]["label"] for i in range(13)] == [e["label"] for e in examples["validation"]]


def test_train_batches_shapes_and_determinism(ds):
  batches = data.train_batches(ds, 8, seed=0, epoch=0)
  assert len(batches) == 37 // 8
  b = batches[1]
  assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  lo, hi = normalized(np.zeros(3)), normalized(np.full(3, 255.0))
  assert np.all(b["image"] >= lo - 1e-5) and np.all(b["image"] <= hi + 1e-5)
  again = data.train_batches(ds, 8, seed=0, epoch=0)
  np.testing.assert_array_equal(stack(batches), stack(again))
  np.testing.assert_array_equal(stack(batches, "label"), stack(again, "label"))
  other = data.train_batches(ds, 8, seed=0, epoch=1)
  assert not np.array_equal(stack(batches, "label"), stack(other, "label"))
  # The epoch's examples are distinct training examples, each label from the set.
  train_labels = sorted(int(ds.train[i]["label"]) for i in range(37))
  seen = np.sort(stack(batches, "label").ravel())
  assert set(seen.tolist()) <= set(train_labels) and len(seen) == 32


def test_eval_batches_are_the_center_crops_in_order_with_padding(ds, fake):
  _, examples = fake
  batches = list(data.eval_batches(ds, 8))
  assert len(batches) == 2 and all(b["image"].shape == (8, SIZE, SIZE, 3) for b in batches)
  mask = stack(batches, "mask").ravel()
  np.testing.assert_array_equal(mask, np.arange(16) < 13)
  images = stack(batches).reshape(16, SIZE, SIZE, 3)
  expected = np.stack([imagenet.eval_transform(e["image"], SIZE) for e in examples["validation"]])
  np.testing.assert_allclose(images[:13], normalized(expected.astype(np.float32)), atol=1e-5)
  assert not images[13:].any() and not stack(batches, "label").ravel()[13:].any()
  np.testing.assert_array_equal(stack(batches, "label").ravel()[:13], [e["label"] for e in examples["validation"]])


class CountingSource:
  def __init__(self, source):
    self.source, self.reads = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads += 1
    return self.source[i]


def test_resume_at_batch_k_equals_the_uninterrupted_batch_and_skips_reading(ds):
  full = list(data.train_batches(ds, 8, seed=3, epoch=2))
  for k in (1, 3):
    counting = dataclasses.replace(ds, train=CountingSource(ds.train))
    resumed = data.train_batches(counting, 8, seed=3, epoch=2, start=k)
    assert len(resumed) == len(full) - k
    first = resumed[0]
    assert counting.train.reads == 8  # only batch k was read and decoded
    np.testing.assert_array_equal(first["image"], full[k]["image"])
    np.testing.assert_array_equal(stack(list(resumed), "label"), stack(full[k:], "label"))
  assert len(data.train_batches(ds, 8, 3, 2, start=len(full))) == 0
  with pytest.raises(data.DataError, match="outside"):
    data.train_batches(ds, 8, 3, 2, start=len(full) + 1)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_together_see_the_single_process_batches(ds, processes):
  single = data.train_batches(ds, 8, seed=1, epoch=0)
  parts = [data.train_batches(ds, 8, seed=1, epoch=0, start=1, process_index=p, process_count=processes)
           for p in range(processes)]
  assert all(len(p) == len(single) - 1 for p in parts)
  for i in range(len(single) - 1):
    for key in ("image", "label"):
      joined = np.concatenate([p[i][key] for p in parts])
      np.testing.assert_array_equal(joined, single[i + 1][key])
  eval_single = list(data.eval_batches(ds, 8))
  eval_parts = [list(data.eval_batches(ds, 8, p, processes)) for p in range(processes)]
  for i, b in enumerate(eval_single):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([p[i][key] for p in eval_parts]), b[key])


def test_batch_not_divisible_by_processes_is_a_data_error(ds):
  with pytest.raises(data.DataError, match="not divisible by the 3 processes"):
    data.train_batches(ds, 8, 0, 0, process_index=0, process_count=3)
  with pytest.raises(data.DataError, match="not divisible"):
    data.eval_batches(ds, 8, 1, 3)


def test_to_iterator_and_prefetch_to_device_keep_the_batches(ds):
  batches = data.train_batches(ds, 8, seed=0, epoch=0)
  expected = list(batches)
  for prefetch in (0, 3):
    got = list(data.to_iterator(batches, workers=0, prefetch=prefetch))
    np.testing.assert_array_equal(stack(got), stack(expected))
  on_device = list(data.prefetch_to_device(data.to_iterator(batches), size=2))
  assert len(on_device) == len(expected) and isinstance(on_device[0]["image"], jax.Array)
  np.testing.assert_array_equal(np.stack([np.asarray(b["image"]) for b in on_device]), stack(expected))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = list(data.prefetch_to_device(iter(expected), size=1, sharding=sharding))
  assert sharded[0]["label"].sharding == sharding
  np.testing.assert_array_equal(np.stack([np.asarray(b["label"]) for b in sharded]), stack(expected, "label"))


def test_worker_processes_make_the_same_batches(ds):
  batches = data.train_batches(ds, 8, seed=0, epoch=0, start=1)
  it = data.to_iterator(batches, workers=2, prefetch=2)
  try:
    got = list(it)
  finally:
    it.close()
  np.testing.assert_array_equal(stack(got), stack(list(batches)))


# --- errors --------------------------------------------------------------------------------------

def test_tfrecord_only_data_dir_names_the_conversion_and_prepare_commands(tmp_path):
  write_fake_tfds(tmp_path, {"train": [], "validation": []}, file_format="tfrecord")
  with pytest.raises(data.DataError, match="not in the ArrayRecord format") as e:
    data.load_tfds_dataset("imagenet2012", str(tmp_path))
  msg = str(e.value)
  assert (f"tfds convert_format --dataset_dir={tmp_path}/imagenet2012 --out_file_format=array_record" in msg)
  assert data.prepare_command("imagenet2012", str(tmp_path)) in msg


def test_missing_data_dir_names_the_manual_download_and_prepare_command(tmp_path):
  with pytest.raises(data.DataError, match="needs config.data_dir.*downloads/manual"):
    data.load_tfds_dataset("imagenet2012", "")
  empty = str(tmp_path / "nothing")
  with pytest.raises(data.DataError, match="No prepared 'imagenet2012'") as e:
    data.load_tfds_dataset("imagenet2012", empty)
  command = (f"pip install tensorflow && tfds build imagenet2012 --data_dir={empty}"
             f" --manual_dir={empty}/downloads/manual --file_format=array_record")
  assert data.prepare_command("imagenet2012", empty) == command
  assert command in str(e.value)
  assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in str(e.value)
  assert f"in {empty}/downloads/manual" in str(e.value)
