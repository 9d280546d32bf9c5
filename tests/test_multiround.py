"""The authors' multi-round CSQ recipe (``csq.rounds``): masks kept and
clipped, every other weight rewound, beta restarted each round."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import kill_after_epoch, restore_final_state
from csq_jax import checkpoint, methods, train, transform
from csq_jax.methods.csq import CSQ
from csq_jax.quantizers.csq import CSQWeight


def _csq_params(key):
  kernel = jax.random.normal(key, (3, 3, 4, 8))
  rules = transform.rules_from_config([(".*kernel", "quantize")])
  q, _ = transform.quantize_params({"conv": {"kernel": kernel, "bias": jnp.zeros(8)}}, rules,
                                   transform.QuantizeSpec("csq", 8))
  return q


def test_start_round_clips_masks_and_rewinds_everything_else(tiny_config):
  now, early = _csq_params(jax.random.key(0)), _csq_params(jax.random.key(1))
  masks = jnp.linspace(-5.0, 5.0, 8)
  now["conv"]["kernel"] = now["conv"]["kernel"].replace(mask_logits=masks)
  now["conv"]["bias"] = jnp.ones(8)
  tiny_config.csq.mask_clamp = 1.5
  out = CSQ(tiny_config).start_round(now, early)
  leaf = out["conv"]["kernel"]
  assert isinstance(leaf, CSQWeight)
  np.testing.assert_array_equal(leaf.mask_logits, np.clip(np.asarray(masks), -1.5, 1.5))
  np.testing.assert_array_equal(leaf.pos_logits, early["conv"]["kernel"].pos_logits)
  np.testing.assert_array_equal(leaf.neg_logits, early["conv"]["kernel"].neg_logits)
  np.testing.assert_array_equal(leaf.scale, early["conv"]["kernel"].scale)
  np.testing.assert_array_equal(out["conv"]["bias"], early["conv"]["bias"])


def _rounds_config(c):
  c.num_epochs = 2
  c.finetune_epochs = 1
  c.csq.rounds = 2
  c.csq.rewind_epoch = 0
  c.csq.mask_clamp = 1.0
  return c


def test_two_rounds_restart_beta_and_resume_across_a_round(tiny_config, tmp_path, monkeypatch):
  c = _rounds_config(tiny_config)
  train.train_and_evaluate(c, str(tmp_path / "full"))
  records = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records] == ["csq_round1", "csq_round2", "finetune"]
  assert all(r["beta"] == pytest.approx(200.0) for r in records)  # each round ends at beta_max
  assert records[1]["train_penalty"] != 0.0  # the budget term is on in the later round too
  assert (tmp_path / "full" / "rewind").is_dir()

  real_save = kill_after_epoch(monkeypatch, 1)  # the end of round 1
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path / "resumed"))
  monkeypatch.setattr(checkpoint, "save", real_save)
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  for a, b in zip(jax.tree_util.tree_leaves(restore_final_state(c, tmp_path / "full")),
                  jax.tree_util.tree_leaves(restore_final_state(c, tmp_path / "resumed"))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field,value,message", [
    ("method", "csq_uniform", "the multi-round recipe searches masks"),
    ("csq.rewind_epoch", 1, r"csq.rewind_epoch=1 is out of range: expected an epoch of the first round"),
])
def test_multiround_config_errors(tiny_config, field, value, message):
  c = _rounds_config(tiny_config)
  *section, name = field.split(".")
  (c[section[0]] if section else c)[name] = value
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(c)
