"""Every experiment config builds, initializes, runs 2 train steps and 1 eval
step on mock data (a fake tfds data set in the ArrayRecord format)."""

import jax
import numpy as np
import pytest

from conftest import load_config
from csq_jax import data, methods, train, transform
from test_imagenet_data import encode, fake_imagenet_examples, write_fake_tfds


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A fake ``imagenet2012`` (JPEGs of varying size) and ``cifar10`` (32x32)."""
  d = tmp_path_factory.mktemp("tfds")
  write_fake_tfds(d, fake_imagenet_examples())
  rng = np.random.default_rng(0)
  cifar = {split: [{"id": f"{split}_{i}", "image": encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG"),
                    "label": int(rng.integers(0, 10))} for i in range(n)]
           for split, n in (("train", 24), ("test", 10))}
  write_fake_tfds(d, cifar, name="cifar10")
  return str(d)


def smoke(config, data_dir: str, batch_size: int, image_size: int | None = None):
  """``(losses of 2 train steps, eval (correct, loss, count))`` of ``config``."""
  config.data_dir = data_dir
  config.batch_size = config.eval_batch_size = batch_size
  if image_size:
    config.image_size = image_size
  train.validate_config(config)
  ds = data.load_dataset(config)
  phases = train.make_phases(config, data.steps_per_epoch(ds, batch_size))
  model = train.create_model(config, ds.num_classes, ds.image_shape)
  state, report = train.init_state(config, model, ds.image_shape, phases[0], jax.random.key(0))
  assert not report.unused_rules, [r.pattern for r in report.unused_rules]
  step = train.make_train_step(model, phases[0], methods.get(config))
  losses = []
  for batch in list(data.train_batches(ds, batch_size, 0, 0))[:2]:
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  batch = next(iter(data.eval_batches(ds, batch_size)))
  correct, loss, count = train.make_eval_step(model, hard=True)(state.params, state.batch_stats, batch, 1.0)
  return losses, (float(correct), float(loss), float(count))


# ResNet-50 and DeiT-S run in CI; the other ImageNet/VGG configs are
# `extended` (the same code paths at other sizes; run with -m extended).
CONFIGS = [
    pytest.param("default", "", 8, None, id="default"),
    pytest.param("cifar10_resnet20", "runlocal", 8, None, id="resnet20"),
    pytest.param("cifar10_resnet20", "bsq,t3,a3,runlocal", 8, None, id="resnet20-bsq-a3"),
    pytest.param("cifar10_resnet20", "msq,runlocal", 8, None, id="resnet20-msq"),
    pytest.param("cifar10_vgg19bn", "t2,runlocal", 4, None, id="vgg19bn", marks=pytest.mark.extended),
    pytest.param("imagenet_r18", "t3,a8,runlocal", 2, 64, id="r18", marks=pytest.mark.extended),
    pytest.param("imagenet_r50", "t2,runlocal", 2, 64, id="r50", marks=pytest.mark.slow),
    pytest.param("imagenet_r50", "rounds,runlocal", 2, 64, id="r50-rounds", marks=pytest.mark.extended),
    pytest.param("imagenet_mbv3", "runlocal", 2, 64, id="mbv3", marks=pytest.mark.extended),
    pytest.param("imagenet_deit_s", "runlocal", 2, None, id="deit_s", marks=pytest.mark.slow),
    pytest.param("imagenet_swin_t", "runlocal", 2, None, id="swin_t", marks=pytest.mark.extended),
]


@pytest.mark.parametrize("name,arg,batch,image_size", CONFIGS)
def test_config_trains_two_steps_and_evaluates(data_dir, name, arg, batch, image_size):
  config = load_config(name, arg) if arg else load_config(name)
  losses, (correct, loss, count) = smoke(config, data_dir, batch, image_size)
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  assert count > 0 and 0 <= correct <= count and np.isfinite(loss)


def test_bfloat16_compute_keeps_quantizer_parameters_float32(tiny_config, data_dir):
  tiny_config.compute_dtype = "bfloat16"
  losses, _ = smoke(tiny_config, data_dir, 8)
  assert np.all(np.isfinite(losses))
  ds = data.load_dataset(tiny_config)
  model = train.create_model(tiny_config, ds.num_classes)
  phases = train.make_phases(tiny_config, 10)
  state, _ = train.init_state(tiny_config, model, ds.image_shape, phases[0], jax.random.key(0))
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {np.dtype("float32")}
  variables = {"params": transform.materialize(state.params, 1.0), "batch_stats": state.batch_stats}
  logits = model.apply(variables, np.zeros((1,) + ds.image_shape, np.float32))
  assert logits.dtype == np.float32  # the head's output is cast back for the loss


def test_paper_rows_by_argument():
  r20 = load_config("cifar10_resnet20", "t3,a2")
  assert (r20.target_bits, r20.act_bits, r20.method) == (3.0, 2, "csq")
  r50 = load_config("imagenet_r50", "rounds")
  assert (r50.csq.rounds, r50.csq.rewind_epoch, r50.num_epochs, r50.finetune_epochs, r50.warmup_epochs,
          r50.weight_decay) == (4, 5, 200, 100, 5, 1e-4)
  assert load_config("imagenet_deit_s").optimizer == "adamw"
  with pytest.raises(ValueError, match="expected at most one"):
    load_config("imagenet_r18", "csq,msq")
