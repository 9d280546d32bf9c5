"""Cost-table budgets (``budget_weighting=table:PATH``) and the cost-table
maker (``python -m csq_jax.profile``)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config, shortened_default_job
from csq_jax import allowed_bits, budget, profile, train
from csq_jax.quantizers import csq

LAYERS = ("conv0/kernel", *(f"conv{i}/kernel" for i in range(1, 7)), "head/kernel")


def _write(tmp_path, layers, unit="ms", name="costs.json"):
  path = tmp_path / name
  path.write_text(json.dumps({"unit": unit, "layers": layers}))
  return str(path)


def _affine_table(tmp_path, seed=0):
  """Each layer of the default job at ``a_l + s_l b`` ms for b in 1..8."""
  rng = np.random.default_rng(seed)
  coef = {k: (float(rng.uniform(0.01, 0.05)), float(rng.uniform(0.001, 0.02))) for k in LAYERS}
  layers = {k: {str(b): a + s * b for b in range(1, 9)} for k, (a, s) in coef.items()}
  return _write(tmp_path, layers), coef


def test_costs_interpolate_between_widths_and_slopes_are_least_squares(tmp_path):
  path = _write(tmp_path, {"a": {"2": 1.0, "4": 2.0, "8": {"median": 2.5, "p10": 2.4}}, "b": {"4": 3.0, "8": 3.0}})
  table = budget.load_cost_table(f"table:{path}")
  assert table.unit == "ms"
  for bits in (1, 2, 3, 4, 6, 8, 9):
    assert table.cost("a", bits) == pytest.approx(np.interp(bits, [2, 4, 8], [1.0, 2.0, 2.5]))
  top = np.polyfit([2, 4, 8], [1.0, 2.0, 2.5], 1)[0]
  assert table.slope("a") == pytest.approx(top)
  assert table.slope("b") == pytest.approx(1e-3 * top)  # a flat layer: not free, nearly
  with pytest.raises(budget.CostTableError, match="no entry for layer c"):
    table.cost("c", 4)


@pytest.mark.parametrize("layers, message", [
    (None, "no such file"),
    ({"a": {"4": "fast"}}, "is not"),
    ({"a": {"4": 1.0}}, "at least two widths"),
    ({"a": {"4": 2.0, "8": 1.0}, "b": {"4": 1.0, "8": 1.0}}, "cannot choose precisions"),
    ({"a": {"4": 2.0, "8": 1.0}, "b": {"4": 1.0, "8": 1.5}}, "1 of 2 layers cost the same or less"),
])
def test_a_table_that_cannot_steer_is_refused_with_the_reason(tmp_path, layers, message):
  path = str(tmp_path / "missing.json") if layers is None else _write(tmp_path, layers)
  with pytest.raises(budget.CostTableError, match=message):
    budget.load_cost_table(f"table:{path}")
  c = load_config("default")
  c.budget_weighting = f"table:{path}"
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(c)


def _csq_params(bits_per_layer):
  rng = np.random.default_rng(0)
  params = {}
  for name, b in zip(LAYERS, bits_per_layer):
    w = csq.init_from_float(rng.normal(size=(3, 3, 4, 4)).astype(np.float32))
    logits = np.where(np.arange(8) < b, 1.0, -1.0).astype(np.float32)
    params[name.split("/")[0]] = {"kernel": w.replace(mask_logits=logits)}
  return params


def test_the_average_is_slope_weighted_and_the_cost_is_the_tables(tmp_path):
  """Against numpy: the search's average precision weights each layer by its
  slope; for an affine table, ``cost <= sum cost_l(T)`` exactly when that
  average is ``<= T``."""
  path, coef = _affine_table(tmp_path)
  table = budget.load_cost_table(path)
  bits = [5, 3, 4, 6, 2, 7, 3, 8]
  params = _csq_params(bits)
  slopes = np.array([coef[k][1] for k in LAYERS])
  avg = float(np.sum(slopes * bits) / slopes.sum())
  assert float(budget.average_bits(params, f"table:{path}", table=table)) == pytest.approx(avg, rel=1e-5)
  cost = sum(coef[k][0] + coef[k][1] * b for k, b in zip(LAYERS, bits))
  assert budget.table_cost(params, table) == pytest.approx(cost)
  for target in (3.0, avg, 6.0):
    under = budget.table_cost(params, table) <= budget.table_cost(params, table, target) + 1e-9
    assert under == (avg <= target + 1e-9)


def test_allowed_widths_under_a_table_keep_its_cost_under_the_budget(tmp_path):
  """A step-shaped table (a kernel per width: int4 cost at 1-3 bits, int8 at
  4-7): ``fit`` puts every layer on (3, 7) and the table's own cost at most
  that of every layer at the target."""
  layers = {k: {"3": 1.0 + i, "7": 2.0 + 2 * i} for i, k in enumerate(LAYERS)}
  path = _write(tmp_path, layers)
  table = budget.load_cost_table(path)
  params = _csq_params([5, 3, 4, 6, 2, 7, 3, 8])
  weights = budget.layer_weights(params, f"table:{path}", table=table)
  out = allowed_bits.fit(params, (3, 7), 5.0, weights, table)
  got = {k: int(b) for k, b in budget.layer_precisions(out).items()}
  assert set(got.values()) <= {3, 7}
  assert budget.table_cost(out, table) <= budget.table_cost(params, table, 5.0) + 1e-9


def test_profile_times_every_counted_layer_at_every_precision():
  """The default job's eight counted layers, three precisions each, in
  ONNX Runtime (few repeats: the figures are in the README)."""
  c = load_config("default")
  table = profile.profile(c, (3, 4, 7), repeats=3, warmup=1)
  assert set(table["layers"]) == set(LAYERS) and set(table["float"]) == set(LAYERS)
  for name, widths in table["layers"].items():
    assert set(widths) == {"3", "4", "7"}
    for stats in widths.values():
      assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]
  geometry = profile.counted_layers(c, train.create_model(c, 10, (8, 8, 1)), (8, 8, 1))
  assert geometry["conv0/kernel"]["kernel_shape"] == (3, 3, 1, 32)
  assert geometry["head/kernel"]["kind"] == "dense"


def test_a_layer_graph_computes_the_layer():
  """One layer's ONNX graph at 3 bits in ONNX Runtime equals the Flax conv of
  ``step * q`` (numpy reference through jax.lax.conv)."""
  from csq_jax import onnx_export

  geometry = {"kind": "conv", "input_shape": (8, 8, 4), "kernel_shape": (3, 3, 4, 5), "strides": 2,
              "padding": "SAME", "groups": 1}
  q = np.random.default_rng(1).integers(-7, 8, size=(3, 3, 4, 5))
  proto, x_shape = profile.layer_graph("c/kernel", geometry, q, 2)
  x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
  y = onnx_export.session(proto).run(None, {"x": x})[0]
  ref = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), (0.01 * q).astype(np.float32), (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, np.asarray(ref).transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_profile_cli_writes_a_table(tmp_path):
  out = tmp_path / "costs.json"
  r = subprocess.run([sys.executable, "-m", "csq_jax.profile", "--config=configs/default.py", f"--out={out}",
                      "--bits=int4_int8", "--repeats=3", "--warmup=1"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  table = json.loads(out.read_text())
  assert table["unit"] == "ms" and table["bits"] == [3, 7] and len(table["layers"]) == 8
  assert json.loads(r.stdout.strip().splitlines()[-1])["out"] == str(out)


@pytest.mark.slow
def test_csq_meets_a_cost_table_budget_on_a_short_default_job(tmp_path):
  """CSQ steered by an affine latency table: the table's cost of the result
  within 2% of the budget (every layer at 3 bits), the search's
  slope-weighted average within 0.05 bit of the target."""
  path, _ = _affine_table(tmp_path)
  c = shortened_default_job(budget_weighting=f"table:{path}", target_bits=3.0)
  s = train.train_and_evaluate(c, str(tmp_path / "run"))
  b = s["budget"]
  assert b["kind"] == "table" and b["unit"] == "ms" and os.path.samefile(b["table"], path)
  assert abs(b["achieved_bits"] - 3.0) <= 0.05, s["layers"]
  assert abs(b["achieved_cost"] - b["target_cost"]) <= 0.02 * b["target_cost"], b


def test_the_roofline_example_writes_a_table_that_steers(tmp_path, monkeypatch):
  """``examples/roofline_costs.py``: each layer's cost is the roofline's
  ``launch + N b / 8 / bandwidth + MACs b a / rate`` (numpy from the
  model's sizes and MACs), affine in the bits, so its slopes are exact."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
  import roofline_costs

  c = load_config("default")
  raw = roofline_costs.roofline_table(c, launch_ms=0.005, bandwidth=1e6, bit_ops_per_ms=1e9)
  path = _write(tmp_path, raw["layers"])
  table = budget.load_cost_table(path)
  assert set(table.layers) == set(LAYERS)
  model = train.create_model(c, 10, (8, 8, 1))
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False)
  macs = budget.layer_macs(model, variables, np.zeros((1, 8, 8, 1), np.float32), train=False)
  n = int(np.prod(variables["params"]["conv1"]["kernel"].shape))
  assert table.cost("conv1/kernel", 3) == pytest.approx(0.005 + n * 3 / 8 / 1e6 + macs["conv1/kernel"] * 3 * 32 / 1e9)
  assert table.slope("conv1/kernel") == pytest.approx(n / 8 / 1e6 + macs["conv1/kernel"] * 32 / 1e9)


def test_profile_imports_beside_other_command_modules():
  """``csq_jax.profile`` defines its flags only when run as a script: CI
  once failed to collect this file because it and ``csq_jax.sweep`` both
  defined ``--config`` at import in one pytest worker."""
  import importlib

  for name in ("csq_jax.sweep", "csq_jax.compare", "csq_jax.profile"):
    importlib.import_module(name)
