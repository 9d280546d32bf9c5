"""Allowed precisions (``allowed_bits``): profiles, the width assignment
against brute force, each method's move to a width against an independent
numpy computation, config checks, and the default job ending on the widths.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from csq_jax import allowed_bits, budget, quantizers, train, transform
from csq_jax.quantizers import bsq, csq, msq, ste


def test_profiles_and_tuples_parse_and_bad_text_is_refused():
  assert allowed_bits.parse("any") == ()
  assert allowed_bits.parse("int8") == (7,)  # n magnitude bits and a sign: [-127, 127] fits int8
  assert allowed_bits.parse("int4_int8") == allowed_bits.parse("(7, 3)") == allowed_bits.parse("3,7") == (3, 7)
  assert allowed_bits.parse((1, 3, 7)) == allowed_bits.parse("int2_int4_int8") == (1, 3, 7)
  assert allowed_bits.parse("(4, 8)") == (4, 8)
  for bad in ("int3", "(4, 0)", "(4.5,)", "four"):
    with pytest.raises(ValueError, match="allowed_bits"):
      allowed_bits.parse(bad)


def _brute_force(wanted, allowed, weights, budget_):
  """Every assignment: the feasible ones, and the largest feasible spend."""
  names = list(wanted)
  feasible = []
  for combo in itertools.product(allowed, repeat=len(names)):
    spent = sum(weights[n] * b for n, b in zip(names, combo))
    if spent <= budget_ + 1e-9:
      feasible.append((spent, dict(zip(names, combo))))
  return feasible


@pytest.mark.parametrize("seed", range(30))
def test_assign_is_the_nearest_nearly_fullest_assignment_by_brute_force(seed):
  """Random layers (sizes, searched bits, targets, profiles), against every
  assignment enumerated: within the budget whenever one exists (else the
  error), on allowed widths, spending within ``SPEND_BAND`` of the most any
  feasible assignment spends (to the knapsack's resolution), and as near the
  searched bits as the nearest assignment in that band."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 7))
  allowed = [(4, 8), (2, 4, 8), (8,), (2, 3, 4)][seed % 4]
  weights = {f"l{i}": float(rng.choice([288, 1000, 9216, 320, 50_000])) for i in range(n)}
  wanted = {k: int(rng.integers(1, 9)) for k in weights}
  target = float(rng.uniform(min(allowed), max(allowed) + 0.5))
  budget_ = target * sum(weights.values())
  feasible = _brute_force(wanted, allowed, weights, budget_)
  cost = lambda p, b: weights[p] * b  # noqa: E731
  if not feasible:
    with pytest.raises(allowed_bits.ImpossibleBudgetError, match="raise target_bits"):
      allowed_bits.assign(wanted, allowed, cost, budget_)
    return
  got = allowed_bits.assign(wanted, allowed, cost, budget_)
  spent = sum(cost(p, b) for p, b in got.items())
  assert set(got.values()) <= set(allowed) and spent <= budget_ + 1e-6
  most = max(s for s, _ in feasible)
  slack = n * budget_ / 20_000  # the knapsack's rounding of each cost up to a unit
  assert spent >= (1 - allowed_bits.SPEND_BAND) * most - slack
  dist = lambda a: sum(abs(a[p] - wanted[p]) for p in a)  # noqa: E731
  in_band = [a for s, a in feasible if s >= (1 - allowed_bits.SPEND_BAND) * (most - slack) + slack]
  assert dist(got) <= min(dist(a) for a in in_band)


def test_assign_on_the_default_jobs_layers():
  """The default job's eight layers (288, 6 x 9216, 320 weights) at (4, 8),
  target 5: by parameters no assignment lands nearer than 4.70 below the
  ceiling (the next, 5.36, is over it); by layers it lands on 5 exactly.
  The 8-bit widths go where the search wanted the most bits."""
  sizes = {"conv0": 288, **{f"conv{i}": 9216 for i in range(1, 7)}, "head": 320}
  wanted = {"conv0": 6, "conv1": 5, "conv2": 4, "conv3": 4, "conv4": 5, "conv5": 7, "conv6": 5, "head": 6}
  by_params = allowed_bits.assign(wanted, (4, 8), lambda p, b: sizes[p] * b, 5 * sum(sizes.values()))
  avg = sum(sizes[p] * b for p, b in by_params.items()) / sum(sizes.values())
  assert avg == pytest.approx(4.7029, abs=1e-4) and by_params["conv5"] == 8
  by_layers = allowed_bits.assign(wanted, (4, 8), lambda p, b: b, 5 * 8)
  assert sum(by_layers.values()) / 8 == 5.0
  eights = {p for p, b in by_layers.items() if b == 8}
  assert len(eights) == 2 and "conv5" in eights and eights <= {"conv5", "conv0", "head"}


def test_csq_keeps_the_window_of_consecutive_planes_of_largest_mask_logit():
  """lawsonX/CSQ ``bits/bitcs.py`` counts a layer's bits as ``sum I(m_B >= 0)``:
  after the move exactly ``bits`` consecutive planes are >= 0, the window of
  largest summed logit (brute force over windows), and the hard weight is
  Eq. (4)'s sum over them (numpy, float64): ``2^p`` times integers that fit
  ``bits`` magnitude bits."""
  kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
  w = csq.init_from_float(jnp.asarray(kernel), 8)
  logits = np.array([0.3, -0.2, 1.5, 0.1, -0.7, 0.9, 0.05, -0.01], np.float32)
  w = w.replace(mask_logits=jnp.asarray(logits))
  for bits in (1, 2, 3, 4, 7, 8):
    moved = csq.with_precision(w, bits)
    sums = {p: logits[p:p + bits].sum() for p in range(9 - bits)}
    start = max(sums, key=lambda p: (sums[p], p))
    kept = set(range(start, start + bits))
    assert int(csq.precision(moved)) == bits
    assert set(np.nonzero(np.asarray(moved.mask_logits) >= 0)[0]) == kept
    pos = (np.asarray(w.pos_logits) > 0).astype(np.float64)
    neg = (np.asarray(w.neg_logits) > 0).astype(np.float64)
    place = np.array([2.0**b if b in kept else 0.0 for b in range(8)])
    expected = float(w.scale) / 255.0 * np.tensordot(place, pos - neg, axes=1)
    np.testing.assert_allclose(np.asarray(csq.materialize(moved, 1.0, hard=True)), expected, rtol=1e-6, atol=1e-7)
    ints = np.asarray(csq.integer_weights(moved))
    assert np.all(ints % 2**start == 0) and np.abs(ints // 2**start).max() <= 2**bits - 1


def test_bsq_planes_move_by_place_values_and_the_finetune_leaf_rerounds():
  """yanghr/BSQ ``pruning`` keeps ``s/(2^n-1) q`` when it drops planes; the
  move to ``a`` bits does the same: ``|q'| = min(round_half_up(|q| / 2^k),
  2^a - 1)`` and ``s' = s 2^k (2^a-1)/(2^n-1)`` down, ``q 2^k`` up (numpy)."""
  kernel = np.random.default_rng(1).normal(size=(3, 3, 4, 6)).astype(np.float32)
  w = bsq.init_from_float(jnp.asarray(kernel), 6)
  q = np.asarray(bsq.integer_weights(w), np.int64)
  s = float(w.scale)
  for bits in (2, 4, 6, 8):
    moved = bsq.with_precision(w, bits)
    k = 6 - bits
    if k >= 0:
      mag = np.minimum(np.floor(np.abs(q) / 2.0**k + 0.5), 2**bits - 1)
    else:
      mag = np.abs(q) * 2.0**-k
    expected = s * 2.0**k * (2**bits - 1) / 63.0 / (2**bits - 1) * np.sign(q) * mag
    assert int(bsq.precision(moved)) == bits
    np.testing.assert_allclose(np.asarray(bsq.materialize(moved)), expected, rtol=1e-5, atol=1e-7)
  ft = bsq.to_finetune(w)
  moved = bsq.with_precision(ft, 3)
  latent = np.asarray(ft.latent, np.float64)
  np.testing.assert_allclose(np.asarray(bsq.materialize(moved)), s / 7.0 * np.clip(np.round(latent * 7), -7, 7),
                             rtol=1e-5, atol=1e-7)


def test_msq_moves_down_by_pruning_and_up_by_rounding_the_latent_again():
  kernel = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 4, 6)).astype(np.float32))
  w = msq.init_from_float(kernel, 8)
  down = msq.with_precision(w, 4)
  assert down.bits == 4 and down == msq.prune(w, 4)
  up = msq.with_precision(down, 8)
  np.testing.assert_array_equal(np.asarray(msq.materialize(up, None, hard=True)),
                                np.asarray(msq.materialize(w, None, hard=True)))
  with pytest.raises(ValueError):
    msq.with_precision(w.replace(max_bits=8), 9)


def test_fit_moves_searched_layers_and_keeps_fixed_ones():
  """A tree with a fixed 8-bit STE layer and three CSQ layers: the fixed one
  counts as it is, the others land on allowed widths, the average stays at
  or under the target."""
  rng = np.random.default_rng(3)
  k = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
  params = {"a": {"kernel": ste.init_from_float(k(3, 3, 1, 8), 8)},
            "b": {"kernel": csq.init_from_float(k(3, 3, 8, 8))},
            "c": {"kernel": csq.init_from_float(k(3, 3, 8, 16))},
            "d": {"kernel": csq.init_from_float(k(16, 10))}}
  for name, logits in (("b", [1, 1, 1, 1, 1, -1, -1, -1]), ("c", [1, 1, 1, -1, -1, -1, -1, -1]),
                       ("d", [1] * 7 + [-1])):
    params[name]["kernel"] = params[name]["kernel"].replace(mask_logits=jnp.asarray(logits, jnp.float32))
  weights = budget.layer_weights(params, "params")
  out = allowed_bits.fit(params, (4, 8), 5.0, weights)
  bits = {p: int(b) for p, b in budget.layer_precisions(out).items()}
  assert bits["a/kernel"] == 8 and set(bits.values()) <= {4, 8}
  assert float(budget.average_bits(out, "params")) <= 5.0
  again = {p: int(b) for p, b in budget.layer_precisions(allowed_bits.fit(out, (4, 8), 5.0, weights)).items()}
  assert again == bits  # idempotent: the end of the run may fit again


def _config(**kw):
  c = load_config("default")
  for key, value in kw.items():
    c[key] = value
  return c


@pytest.mark.parametrize("kw, message", [
    (dict(allowed_bits="int5"), "neither a profile"),
    (dict(allowed_bits="(4, 8)", target_bits=3.0), "below the smallest allowed width"),
    (dict(allowed_bits="(4, 8)", n_bits=6, target_bits=5.0), "above n_bits"),
    (dict(allowed_bits="int8", method="ste", target_bits=4.0), "does not allow"),
    (dict(allowed_bits="(4, 8)", target_bits=5.0, rules=(("conv0/kernel", "fixed", 6), (".*kernel", "quantize"))),
     "rules fix"),
])
def test_config_checks(kw, message):
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(_config(**kw))


def test_csq_min_layer_bits_above_the_smallest_width_is_refused():
  c = _config(allowed_bits="(2, 4, 8)", target_bits=4.0)
  c.csq.min_layer_bits = 3
  with pytest.raises(train.ConfigError, match="min_layer_bits"):
    train.validate_config(c)


@pytest.mark.extended
@pytest.mark.parametrize("method", ["csq", "bsq", "msq"])
def test_a_short_default_job_ends_on_allowed_widths(tmp_path, method):
  """The mechanism end to end (a short schedule; the full default job's
  figures are in the README): every counted layer at 4 or 8 bits, the
  layer-weighted average at most the target of 5, summary.json saying so.
  CI runs CSQ with the int4_int8 profile below; BSQ's and MSQ's moves are
  checked in the contract tests and by the README's full runs."""
  c = _config(method=method, allowed_bits="(4, 8)", target_bits=5.0, budget_weighting="layers",
              num_epochs=6, finetune_epochs=2, progress=False, tensorboard=False)
  if method == "msq":
    c.msq.hessian = False
  s = train.train_and_evaluate(c, str(tmp_path))
  bits = [layer["bits"] for layer in s["layers"]]
  assert set(bits) <= {4, 8}, bits
  assert s["budget"]["all_layers_allowed"] and s["budget"]["allowed_bits"] == [4, 8]
  assert s["budget"]["achieved_bits"] <= 5.0 + 1e-6 and s["exactly_quantized"]


@pytest.mark.slow
def test_the_int4_int8_profile_exports_int4_and_int8_onnx_weights_only(tmp_path):
  """``int4_int8`` allows precisions 3 and 7 (a sign and 3 or 7 magnitude
  bits fit [-8, 7] and [-128, 127]): after a short CSQ search at a target
  of 4, every layer is at 3 or 7 bits, the layer-weighted average at most 4,
  and every layer of the ONNX export an INT4 or INT8 initializer (CSQ's
  planes made consecutive)."""
  from csq_jax import onnx_export

  c = _config(method="csq", allowed_bits="int4_int8", target_bits=4.0, budget_weighting="layers",
              num_epochs=6, finetune_epochs=2, progress=False, tensorboard=False)
  s = train.train_and_evaluate(c, str(tmp_path))
  assert {layer["bits"] for layer in s["layers"]} <= {3, 7} and s["budget"]["all_layers_allowed"]
  assert s["budget"]["allowed_bits"] == [3, 7] and s["budget"]["achieved_bits"] <= 4.0 + 1e-6
  assert s["exactly_quantized"]
  info = onnx_export.export_workdir(str(tmp_path))
  assert set(info["layer_types"]) <= {"INT4", "INT8"} and sum(info["layer_types"].values()) == len(s["layers"])
