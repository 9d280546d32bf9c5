"""Every config field is checked up front, with one line that says what to do
(issue 13, items 5, 8 and 9)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from csq_jax import train


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"eval_batch_size": 0}, r"eval_batch_size=0 is out of range: expected an integer >= 1"),
        ({"method": "ste", "target_bits": 0.0}, r"target_bits=0.0 cannot be the fixed precision of method ste"),
        ({"method": "csq_uniform", "target_bits": -1.0}, r"target_bits=-1.0 cannot be the fixed precision"),
        ({"method": "ste", "target_bits": 9.0}, r"target_bits=9.0 .*whole number of bits in \[1, 8\]"),
        ({"method": "ste", "target_bits": 2.5}, r"target_bits=2.5 cannot be the fixed precision"),
        ({"method": "csq", "target_bits": 9.0}, r"target_bits=9.0 is impossible with n_bits=8"),
        ({"eval_every": 0}, r"eval_every=0 is out of range"),
        ({"keep_checkpoints": 0}, r"keep_checkpoints=0 is out of range"),
        ({"momentum": 1.5}, r"momentum=1.5 is out of range: expected a number in \[0, 1\)"),
        ({"beta0": 0.0}, r"beta0=0.0 is out of range"),
        ({"act_bits": 0}, r"act_bits=0 is out of range"),
        ({"csq.min_layer_bits": 9}, r"csq.min_layer_bits=9 is out of range: expected an integer in \[0, n_bits\]"),
        ({"csq.init": "zeros"}, r"csq.init='zeros' is out of range"),
        ({"learning_rate": float("nan")}, r"learning_rate=nan is out of range"),
    ],
)
def test_bad_field_values_are_refused_up_front_in_one_line(tiny_config, fields, message):
  for k, v in fields.items():  # dotted: a method's section
    *section, name = k.split(".")
    (tiny_config[section[0]] if section else tiny_config)[name] = v
  with pytest.raises(train.ConfigError, match=message) as e:
    train.validate_config(tiny_config)
  assert "\n" not in str(e.value) and "n_bits must" not in str(e.value)


def test_every_shipped_config_passes_validation():
  from conftest import load_config

  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py"):
      train.validate_config(load_config(name[:-3]))


def test_malformed_rule_regex_names_the_rule(tiny_config):
  tiny_config.rules = ((".*kernel", "quantize"), ("conv[0-9/kernel", "float"))
  with pytest.raises(train.ConfigError, match=r"Rule 'conv\[0-9/kernel': the pattern is not a valid regular"
                                              r" expression \(unterminated character set at position 4\)"):
    train.validate_config(tiny_config)
  tiny_config.rules = (".*kernel",)
  with pytest.raises(train.ConfigError, match=r"Rule 0 '.\*kernel': write \(pattern, action\[, bits\]\)"):
    train.validate_config(tiny_config)


def test_rules_that_quantize_nothing_are_an_error_for_a_quantizing_method(tiny_config, tmp_path):
  tiny_config.rules = ((".*conv_typo/kernel", "quantize"),)
  with pytest.raises(train.ConfigError, match=r"quantize no parameter of small_cnn, so method csq would train a"
                                              r" float model.*conv0/kernel"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  tiny_config.rules = ((".*kernel", "float"),)
  with pytest.raises(train.ConfigError, match="quantize no parameter"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))


def test_unknown_config_field_on_the_command_line_is_one_line(tmp_path):
  cmd = [sys.executable, "-m", "csq_jax.main", "--config=configs/default.py", f"--workdir={tmp_path}",
         "--config.targt_bits=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == ["csq_jax: error: --config.targt_bits=2: the config has no field 'targt_bits'"
                   " (did you mean target_bits?); see --help for the fields."], out.stderr
