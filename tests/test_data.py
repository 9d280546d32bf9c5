"""Input pipelines: digits, user npz arrays, tfds data_source (mocked)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import load_config
from csq_jax import data, train
from csq_jax.data import augment


def test_digits_split_and_normalization():
  ds = data.load_digits_dataset()
  assert (ds.num_train, ds.num_test, ds.num_classes, ds.image_shape) == (1437, 360, 10, (8, 8, 1))
  batch = next(iter(data.train_batches(ds, 64, seed=0, epoch=0)))
  assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  all_x = ds.normalize(ds.train.images)
  np.testing.assert_allclose(all_x.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(all_x.std(), 1.0, atol=1e-3)


def test_train_batches_are_a_pure_function_of_seed_and_epoch():
  ds = data.load_digits_dataset()
  labels = lambda seed, epoch: np.concatenate([b["label"] for b in data.train_batches(ds, 64, seed, epoch)])
  np.testing.assert_array_equal(labels(0, 3), labels(0, 3))
  assert not np.array_equal(labels(0, 3), labels(0, 4))
  epoch = labels(0, 0)
  assert len(epoch) == (1437 // 64) * 64
  assert len(np.unique(np.concatenate([b["image"].reshape(64, -1) for b in data.train_batches(ds, 64, 0, 0)]), axis=0)) > 1000


def test_eval_batches_cover_the_test_set_once_with_padding():
  ds = data.load_digits_dataset()
  batches = list(data.eval_batches(ds, 128))
  assert all(b["image"].shape[0] == 128 for b in batches)
  assert sum(b["mask"].sum() for b in batches) == ds.num_test
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, ds.test.labels)


def test_npz_any_size_channels_and_classes(tmp_path, tiny_config):
  rng = np.random.default_rng(0)
  path = tmp_path / "mine.npz"
  np.savez(path, x_train=rng.integers(0, 256, (96, 12, 10, 3), dtype=np.uint8),
           y_train=rng.integers(0, 3, 96), x_test=rng.integers(0, 256, (20, 12, 10, 3), dtype=np.uint8),
           y_test=rng.integers(0, 3, 20))
  ds = data.load_npz_dataset(str(path))
  assert (ds.num_classes, ds.image_shape) == (3, (12, 10, 3))
  tiny_config.dataset = f"npz:{path}"
  tiny_config.num_epochs = 1
  tiny_config.batch_size = 32
  summary = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  # A grayscale NHW float set works too.
  np.savez(path, x_train=rng.random((40, 8, 8)), y_train=np.arange(40) % 4,
           x_test=rng.random((8, 8, 8)), y_test=np.arange(8) % 4)
  ds = data.load_npz_dataset(str(path))
  assert (ds.num_classes, ds.image_shape) == (4, (8, 8, 1))


@pytest.mark.parametrize(
    "arrays,message",
    [
        (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4, int)), "lacks arrays"),
        (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(3, int), x_test=np.zeros((2, 8, 8, 1)),
              y_test=np.zeros(2, int)), "4 images but 3 labels"),
        (dict(x_train=np.zeros((4, 8)), y_train=np.zeros(4, int), x_test=np.zeros((2, 8)),
              y_test=np.zeros(2, int)), "NHWC"),
        (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.full(4, 0.5), x_test=np.zeros((2, 8, 8, 1)),
              y_test=np.zeros(2, int)), "non-negative integers"),
    ],
)
def test_malformed_npz_raises_clear_error(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(data.DataError, match=message):
    data.load_npz_dataset(str(path))


def test_not_an_npz_file(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_text("hello")
  with pytest.raises(data.DataError, match="not a readable"):
    data.load_npz_dataset(str(path))


def test_tfds_cifar10_through_data_source_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=70, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_tfds_dataset("cifar10", str(tmp_path))
    assert (ds.num_classes, ds.image_shape) == (10, (32, 32, 3))
    assert ds.augment is augment.pad_crop_flip
    batch = next(iter(data.train_batches(ds, 32, 0, 0)))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
    assert sum(b["mask"].sum() for b in data.eval_batches(ds, 32)) == ds.num_test


@pytest.mark.parametrize("arg", ["runlocal", "msq,runlocal"])
def test_cifar_config_runs_two_steps_on_mock_data(tmp_path, arg):
  c = load_config("cifar10_resnet20", arg)
  c.data_dir = str(tmp_path)
  c.num_epochs = 1
  c.finetune_epochs = 0
  c.batch_size = 32
  c.eval_batch_size = 32
  c.msq.hessian_batches = 1
  # MSQ's pruning path on the CIFAR ResNet-20; its Hessian (compiling 8 unrolled
  # ResNet-20 HVPs costs ~2 CPU minutes) is checked on ResNets in test_hessian.py
  # and inside MSQ's loop in test_methods.py.
  c.msq.hessian = False
  c.progress = False
  c.tensorboard = False
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    s = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert s["model"] == "resnet20" and len(s["layers"]) == 20
  assert not any("shortcut_conv" in l["name"] for l in s["layers"])


def test_pad_crop_flip_is_a_shifted_window():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
  y = augment.pad_crop_flip(x, np.random.default_rng(1), pad=2)
  assert y.shape == x.shape and y.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):  # each output is some crop of the padded image, maybe flipped
    found = any(
        np.array_equal(y[i], win) or np.array_equal(y[i], win[:, ::-1])
        for dy in range(5) for dx in range(5)
        for win in [padded[i, dy:dy + 8, dx:dx + 8]]
    )
    assert found


def test_digits_resume_and_processes_reproduce_the_global_batches():
  """Batch-wise augmentation: batch k of a resumed epoch and the rows of two
  processes equal the uninterrupted single-process batches."""
  ds = data.load_digits_dataset()
  full = data.train_batches(ds, 64, seed=2, epoch=1)
  resumed = data.train_batches(ds, 64, seed=2, epoch=1, start=5)
  assert len(resumed) == len(full) - 5
  np.testing.assert_array_equal(resumed[0]["image"], full[5]["image"])
  halves = [data.train_batches(ds, 64, 2, 1, start=5, process_index=p, process_count=2) for p in range(2)]
  for i in (0, len(resumed) - 1):
    for key in ("image", "label"):
      assert halves[0][i][key].shape[0] == 32
      np.testing.assert_array_equal(np.concatenate([h[i][key] for h in halves]), full[5 + i][key])
  evals = [list(data.eval_batches(ds, 128, p, 2)) for p in range(2)]
  for i, b in enumerate(data.eval_batches(ds, 128)):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([e[i][key] for e in evals]), b[key])
  with pytest.raises(data.DataError, match="not divisible"):
    data.train_batches(ds, 64, 0, 0, process_count=3)


def _save_npz(path, x_train, y_train, x_test, y_test):
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return str(path)


def test_mixed_image_dtypes_are_refused_and_one_scale_serves_both_splits(tmp_path):
  """Float [0, 255] train images with uint8 test images: refused (the test
  images were once normalized to a constant). Within one dtype, the same
  pixels normalize the same in both splits."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (16, 6, 6, 1), dtype=np.uint8)
  labels = np.arange(16) % 2
  path = _save_npz(tmp_path / "mixed.npz", pixels.astype(np.float32), labels, pixels, labels)
  with pytest.raises(data.DataError, match=r"train images are float32 and test images uint8.*same dtype"):
    data.load_npz_dataset(path)
  for dtype in (np.uint8, np.float32):
    ds = data.load_npz_dataset(_save_npz(tmp_path / "same.npz", pixels.astype(dtype), labels,
                                         pixels.astype(dtype), labels))
    test = np.concatenate([b["image"] for b in data.eval_batches(ds, 16)])
    np.testing.assert_allclose(test, ds.normalize(pixels.astype(dtype)), rtol=1e-6)
    assert test.std() > 0.5  # standardized, not one value


@pytest.mark.parametrize("split,index", [("x_train", 3), ("x_test", 1)])
def test_non_finite_images_are_refused_at_load_naming_split_and_index(tmp_path, split, index):
  arrays = {"x_train": np.zeros((8, 4, 4, 1), np.float32), "x_test": np.zeros((4, 4, 4, 1), np.float32)}
  arrays[split][index, 2, 1, 0] = np.nan if split == "x_train" else np.inf
  path = _save_npz(tmp_path / "bad.npz", arrays["x_train"], np.arange(8) % 2, arrays["x_test"], np.arange(4) % 2)
  with pytest.raises(data.DataError, match=rf"{split}\[{index}\] holds NaN or Inf"):
    data.load_npz_dataset(path)


def test_a_class_present_only_in_the_test_set_is_named_in_a_warning(tmp_path, caplog):
  x = np.zeros((8, 4, 4, 1), np.float32)
  path = _save_npz(tmp_path / "c.npz", x, np.arange(8) % 3, x[:4], np.array([0, 1, 5, 7]))
  with caplog.at_level("WARNING"):
    ds = data.load_npz_dataset(path)
  assert ds.num_classes == 8
  assert "classes [5, 7] occur in the test set but not in the training set" in caplog.text
