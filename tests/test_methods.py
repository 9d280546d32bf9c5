"""Method hooks (csq_jax/methods/): budget gating, BSQ re-quantization and
MSQ pruning inside the loop, structure records, optimizer-state carry-over."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import kill_after_epoch, load_config, restore_final_state
from csq_jax import budget, checkpoint, data, methods, models, quantizers, train, transform
from csq_jax.quantizers import bsq, msq


def _config(**overrides):
  c = load_config("default")
  c.progress = False
  c.tensorboard = False
  c.finetune_epochs = 0
  for k, v in overrides.items():  # "bsq_alpha": config.bsq.alpha (a method's section)
    section, _, field = k.partition("_")
    if section in ("csq", "bsq", "msq") and field:
      c[section][field] = v
    else:
      c[k] = v
  return c


def _two_layers(kind: str, bits=(8, 8), seed=0):
  """``{"a": {"kernel"}, "b": {"kernel"}}`` of 300 and 100 weights, quantized by ``kind``."""
  ka, kb = jax.random.split(jax.random.key(seed))
  params = {"a": {"kernel": jax.random.normal(ka, (30, 10))}, "b": {"kernel": jax.random.normal(kb, (10, 10))}}
  init = {"bsq": bsq.init_from_float, "msq": msq.init_from_float}[kind]
  return {"a": {"kernel": init(params["a"]["kernel"], bits[0])}, "b": {"kernel": init(params["b"]["kernel"], bits[1])}}


def test_static_average_bits_matches_budget():
  p = _two_layers("msq", bits=(8, 4))
  assert methods.static_average_bits(p) == pytest.approx((300 * 8 + 100 * 4) / 400)
  assert methods.static_average_bits(p) == pytest.approx(float(budget.average_bits(p)))
  q = _two_layers("bsq", bits=(6, 2))
  assert methods.static_average_bits(q) == pytest.approx(float(budget.average_bits(q)))


@pytest.mark.parametrize("kind", ["bsq", "msq"])
def test_penalty_is_on_above_the_target_and_off_at_it(kind):
  p = _two_layers(kind, bits=(4, 4))
  over = methods.get(_config(method=kind, target_bits=3.0))
  at = methods.get(_config(method=kind, target_bits=4.0))
  pen, delta = jax.jit(over.regularizer)(p, 1.0)
  assert float(pen) > 0 and float(delta) == pytest.approx(1.0)
  pen, delta = jax.jit(at.regularizer)(p, 1.0)
  assert float(pen) == 0.0 and float(delta) == 0.0


def test_bsq_penalty_is_alpha_times_memory_weighted_group_lasso():
  p = _two_layers("bsq", bits=(8, 8))
  m = methods.get(_config(method="bsq", bsq_alpha=0.3))
  pen, _ = m.regularizer(p, None)
  leaves = transform.quantized_leaves(p)
  # The authors' memory weights N_l n_l / sum_k N_k: 300 * 8 / 400 and 100 * 8 / 400.
  expected = 0.3 * (6.0 * float(bsq.group_lasso(leaves["a/kernel"])) + 2.0 * float(bsq.group_lasso(leaves["b/kernel"])))
  assert float(pen) == pytest.approx(expected, rel=1e-5)


def test_msq_penalty_is_lambda_times_sum_of_layer_lsb_means():
  p = _two_layers("msq", bits=(8, 5))
  m = methods.get(_config(method="msq", msq_reg_strength=0.2))
  pen, _ = m.regularizer(p, None)
  leaves = transform.quantized_leaves(p)
  expected = 0.2 * sum(float(jnp.mean(jnp.abs(msq.lsb(w, 1)))) for w in leaves.values())
  assert float(pen) == pytest.approx(expected, rel=1e-5)


def test_bsq_after_update_clamps_planes():
  p = _two_layers("bsq")
  p = jax.tree_util.tree_map(lambda x: x * 5.0 - 2.0, p)
  out = methods.get(_config(method="bsq")).after_update(p)
  for w in transform.quantized_leaves(out).values():
    assert float(w.pos_planes.min()) >= 0.0 and float(w.pos_planes.max()) <= 2.0
    assert float(w.neg_planes.min()) >= 0.0 and float(w.neg_planes.max()) <= 2.0


def _ctx(epoch, epochs=10):
  return methods.AdjustContext(epoch, epochs, None, {}, lambda: iter(()), jax.random.key(0))


def test_bsq_adjust_requantizes_on_schedule_and_keeps_the_weights():
  p = _two_layers("bsq")
  # Drift the planes off {0, 1} and shrink the top planes, as training does.
  rng = np.random.default_rng(0)

  def drift(w):
    noise = rng.uniform(0, 0.4, w.pos_planes.shape).astype(np.float32)
    top = np.ones((w.n_bits,) + (1,) * len(w.shape), np.float32)
    top[-2:] = 0.0  # empty the two MSB planes
    return bsq.clamp_planes(w.replace(pos_planes=(w.pos_planes + noise) * top, neg_planes=w.neg_planes * top))

  p = transform.map_quantized(drift, p)
  m = methods.get(_config(method="bsq", bsq_requant_every=3))
  same, info = m.adjust(p, _ctx(2))
  assert same is p and info == {}
  new, info = m.adjust(p, _ctx(3))
  assert info["requantized"]
  for k, w in transform.quantized_leaves(p).items():
    w2 = transform.quantized_leaves(new)[k]
    assert w2.n_bits < w.n_bits  # the emptied MSB planes are gone
    np.testing.assert_allclose(bsq.materialize(w2), bsq.materialize(w), rtol=1e-5, atol=1e-6)
    assert set(np.unique(np.asarray(w2.pos_planes))) <= {0.0, 1.0}
  assert m.structure(new) == {k: [w.n_bits] for k, w in transform.quantized_leaves(new).items()}
  rebuilt = m.restructure(p, m.structure(new))
  assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(new)
  assert [x.shape for x in jax.tree_util.tree_leaves(rebuilt)] == [x.shape for x in jax.tree_util.tree_leaves(new)]


def test_msq_adjust_prunes_sparse_layers_by_their_k_and_respects_the_budget():
  p = _two_layers("msq", bits=(6, 6))
  # Layer a sits on the 4-bit grid (its 2 LSBs are zero: multiples of 4 in
  # 6-bit units of s / 64, s = 1 set by one weight at 64), layer b is dense.
  q = 4 * np.random.default_rng(0).integers(-15, 16, (30, 10))
  q[0, 0] = 64
  a = transform.quantized_leaves(p)["a/kernel"]
  coarse = jnp.asarray(q / 64.0, jnp.float32)
  p["a"]["kernel"] = msq.with_lsb_k(a.replace(latent=coarse), 2)
  m = methods.get(_config(method="msq", target_bits=4.0, msq_prune_every=1, msq_threshold=0.99,
                          msq_hessian=False, budget_tolerance=0.25))
  new, info = m.adjust(p, _ctx(1))
  leaves = transform.quantized_leaves(new)
  assert leaves["a/kernel"].bits == 4 and leaves["b/kernel"].bits == 6  # b is not sparse
  assert info["pruned_bits"] == 2
  np.testing.assert_array_equal(msq.materialize(leaves["a/kernel"])[1:], coarse[1:])  # exact: LSBs were zero
  assert leaves["a/kernel"].lsb_k == 1  # without the Hessian, k = 1 from now on
  # At 4.5 bits avg > 4, but pruning b (1 bit, 100/400 of the weights) is
  # allowed: 4.25 >= 4 - 0.25. a cannot go below the tolerance: 4.5 - 0.75 < 3.75.
  new2, _ = m.adjust(new, _ctx(2))
  assert methods.static_average_bits(new2) >= 4.0 - 0.25
  # Structure round trip.
  rebuilt = m.restructure(p, m.structure(new))
  assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(new)


def test_msq_hessian_amounts_prune_two_bits_from_insensitive_layers():
  """On a small CNN the Hessian-aware k is 2 exactly for the layers with
  sensitivity below the mean (computed independently here)."""
  c = _config(method="msq", msq_hessian=True, msq_hessian_probes=4)
  model = models.create_model("small_cnn", 10)
  v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  qp, _ = transform.quantize_params(v["params"], transform.rules_from_config(c.rules),
                                    methods.get(c).quantize_spec(), jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, 16)}
  ctx = methods.AdjustContext(1, 10, model, v["batch_stats"], lambda: iter([batch]), jax.random.key(2))
  ks, omegas = methods.get(c).lsb_amounts(qp, ctx)
  mean = np.mean(list(omegas.values()))
  assert ks == {k: (2 if o < mean else 1) for k, o in omegas.items()}
  assert set(ks.values()) == {1, 2}


def test_carry_opt_state_keeps_unchanged_leaves():
  p = _two_layers("bsq")
  tx = optax.sgd(0.1, momentum=0.9)
  opt = tx.init(p)
  grads = jax.tree_util.tree_map(jnp.ones_like, p)
  _, opt = tx.update(grads, opt, p)
  p2 = dict(p)
  p2["b"] = {"kernel": bsq.requantize(transform.quantized_leaves(p)["b/kernel"].replace(
      pos_planes=p["b"]["kernel"].pos_planes.at[-1].set(0.0), neg_planes=p["b"]["kernel"].neg_planes.at[-1].set(0.0)))}
  carried = train.carry_opt_state(tx, opt, p2)
  old_a = opt[0].trace["a"]["kernel"]
  new_a = carried[0].trace["a"]["kernel"]
  np.testing.assert_array_equal(new_a.pos_planes, old_a.pos_planes)
  assert float(jnp.abs(old_a.pos_planes).sum()) > 0
  assert carried[0].trace["b"]["kernel"].pos_planes.shape[0] < 8
  assert float(jnp.abs(carried[0].trace["b"]["kernel"].pos_planes).sum()) == 0.0


def test_trainable_params_count_shows_msq_trains_one_latent_per_weight():
  counts = {}
  for name in ("fp", "ste", "msq", "bsq", "csq"):
    c = _config(method=name)
    model = models.create_model("small_cnn", 10)
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    qp, _ = transform.quantize_params(v["params"], transform.rules_from_config(c.rules),
                                      methods.get(c).quantize_spec(), jax.random.key(1))
    counts[name] = methods.trainable_params(qp)
  n = sum(budget.layer_sizes(qp).values())
  assert counts["msq"] == counts["fp"] == counts["ste"]
  assert counts["bsq"] - counts["fp"] == pytest.approx(15 * n, abs=16)  # 16 planes + scale per layer
  assert counts["csq"] - counts["fp"] == pytest.approx(15 * n, abs=100)  # 16 logits per weight, mask and scale per layer
  assert counts["msq"] * 8 <= counts["csq"]


# ----------------------------------------------------------------------------
# Inside the training loop


def _train(config, workdir):
  return train.train_and_evaluate(config, str(workdir))


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_msq_training_prunes_and_resumes_across_a_precision_change(tmp_path, monkeypatch):
  c = _config(method="msq", num_epochs=3, finetune_epochs=1, target_bits=6.0, msq_prune_every=1,
              msq_threshold=0.0, msq_hessian_probes=2, msq_hessian_sketch=2)  # the mechanism, on a small Hessian
  full = _train(c, tmp_path / "full")
  recs = _records(tmp_path / "full")
  assert recs[0]["avg_bits"] < 8.0  # pruned after the first epoch
  assert abs(full["avg_bits"] - 6.0) <= 0.25 and full["exactly_quantized"]

  real_save = kill_after_epoch(monkeypatch, 2)
  with pytest.raises(KeyboardInterrupt):
    _train(c, tmp_path / "resumed")
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed = _train(c, tmp_path / "resumed")
  assert resumed["avg_bits"] == full["avg_bits"]
  assert resumed["test_accuracy"] == full["test_accuracy"]
  assert [l["bits"] for l in resumed["layers"]] == [l["bits"] for l in full["layers"]]


def test_bsq_training_requantizes_clamps_and_ends_exact(tmp_path, monkeypatch):
  """Search: re-quantized every epoch. Finetune (cifar_finetune.py): float
  latents in [-1, 1] at the searched precision, which never changes (not in
  the finetune, not in finalize); a run killed in the finetune resumes from
  its checkpoint (the finetune structure) to the same result."""
  c = _config(method="bsq", num_epochs=3, finetune_epochs=2, bsq_requant_every=1, bsq_alpha=0.1,
              target_bits=5.0)
  s = _train(c, tmp_path / "full")
  recs = _records(tmp_path / "full")
  assert [r.get("adjust_requantized") for r in recs[:2]] == [1.0, 1.0]
  assert s["exactly_quantized"]
  searched = recs[3]["avg_bits"]  # after start_finetune's last adjustment
  assert recs[3]["phase"] == "finetune" and recs[4]["avg_bits"] == searched == s["avg_bits"]
  state = restore_final_state(c, tmp_path / "full")
  for w in transform.quantized_leaves(state.params).values():
    assert isinstance(w, bsq.BSQFinetuneWeight)
    assert float(jnp.max(jnp.abs(w.latent))) <= 1.0
  assert [w.bits for w in transform.quantized_leaves(state.params).values()] == [l["bits"] for l in s["layers"]]
  assert s["trainable_params"] > 2 * sum(l["params"] for l in s["layers"])

  real_save = kill_after_epoch(monkeypatch, 4)
  with pytest.raises(KeyboardInterrupt):
    _train(c, tmp_path / "resumed")
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed = _train(c, tmp_path / "resumed")
  assert resumed["avg_bits"] == s["avg_bits"] and resumed["test_accuracy"] == s["test_accuracy"]
  assert [l["bits"] for l in resumed["layers"]] == [l["bits"] for l in s["layers"]]


def test_lr_step_schedule():
  fn = train.lr_schedule(0.1, 10, 5, decay="step", step_epochs=(4, 8), step_factor=0.1)
  assert [float(fn(s)) for s in (0, 19, 20, 39, 40)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("field,value,message", [
    ("lr_decay", "linear", "Unknown lr_decay"),
    ("msq.threshold", 1.5, "msq.threshold"),
])
def test_method_config_errors(field, value, message):
  c = _config(method="msq")
  *section, name = field.split(".")
  (c[section[0]] if section else c)[name] = value
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(c)


def test_init_from_a_float_run_starts_bsq_at_its_8bit_quantization(tmp_path):
  fp = _config(method="fp", num_epochs=1)
  train.train_and_evaluate(fp, str(tmp_path / "fp"))
  float_state = restore_final_state(fp, tmp_path / "fp")
  c = _config(method="bsq", init_from=str(tmp_path / "fp"))
  ds = data.load_dataset(c)
  phases = train.make_phases(c, data.steps_per_epoch(ds, c.batch_size))
  model = train.create_model(c, ds.num_classes)
  state, _ = train.init_state(c, model, ds.image_shape, phases[0], jax.random.key(0))
  for path, w in transform.quantized_leaves(state.params).items():
    layer, name = path.rsplit("/", 1)
    ref = float_state.params[layer][name]
    np.testing.assert_allclose(bsq.materialize(w), bsq.materialize(bsq.init_from_float(ref, 8)), atol=1e-7)
    assert float(jnp.max(jnp.abs(bsq.materialize(w) - ref))) <= float(jnp.max(jnp.abs(ref))) / 255 / 2 + 1e-6
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), state.batch_stats,
                                float_state.batch_stats)
  assert all(jax.tree_util.tree_leaves(same))

  c.init_from = str(tmp_path / "missing")
  with pytest.raises(checkpoint.CheckpointError, match="neither the workdir of a float run"):
    train.init_state(c, model, ds.image_shape, phases[0], jax.random.key(0))
  msq_run = _config(method="msq", num_epochs=1)
  train.train_and_evaluate(msq_run, str(tmp_path / "msq"))
  c.init_from = str(tmp_path / "msq")
  with pytest.raises(checkpoint.CheckpointError, match="not a float run"):
    train.init_state(c, model, ds.image_shape, phases[0], jax.random.key(0))


@pytest.mark.parametrize("arg,method", [("", "csq"), ("bsq", "bsq"), ("msq,runlocal", "msq"), ("ste", "ste")])
def test_cifar_config_recipes_validate(arg, method):
  c = load_config("cifar10_resnet20", arg) if arg else load_config("cifar10_resnet20")
  assert c.method == method
  train.validate_config(c)
  if method == "bsq":  # BSQ's reference ResNet-20 schedule
    assert (c.num_epochs, c.lr_decay, tuple(c.lr_step_epochs), c.weight_decay) == (350, "step", (250,), 1e-4)
    assert (c.bsq.alpha, c.bsq.requant_every, c.bsq.threshold) == (0.01, 50, 0.0)
    assert (c.finetune_epochs, c.finetune_learning_rate, tuple(c.finetune_lr_step_epochs)) == (250, 1e-4, (250,))


def test_cifar_config_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="expected at most one"):
    load_config("cifar10_resnet20", "bsq,msq")


def test_bsq_gate_regularizes_the_leading_layers_that_fit_the_budget():
  """Both layers at 8 effective bits: target 7.9 leaves room for one bit of
  the larger layer only (0.75 of the weights; tolerance 0.25), target 5 for
  both, target 8 for none."""
  p = _two_layers("bsq", bits=(8, 8))
  leaves = transform.quantized_leaves(p)
  gl = {k: float(bsq.group_lasso(w)) for k, w in leaves.items()}
  for target, on in [(7.9, {"a/kernel"}), (5.0, {"a/kernel", "b/kernel"}), (8.0, set())]:
    m = methods.get(_config(method="bsq", target_bits=target, bsq_alpha=1.0, budget_tolerance=0.25))
    pen, delta = jax.jit(m.regularizer)(p, None)
    weights = {"a/kernel": 6.0, "b/kernel": 2.0}  # N_l n_l / sum_k N_k
    assert float(pen) == pytest.approx(sum(weights[k] * gl[k] for k in on), rel=1e-5)
    assert float(delta) == pytest.approx(8.0 - target, abs=1e-6)


def test_bsq_effective_precision_is_the_bit_length_of_the_rounded_sum():
  w = bsq.init_from_float(jnp.asarray([[0.1, -1.0], [0.5, 0.25]]), 8)  # max |q| = 255
  assert int(bsq.effective_precision(w)) == 8
  half = w.replace(pos_planes=w.pos_planes.at[-1].set(0.0), neg_planes=w.neg_planes.at[-1].set(0.0))
  assert int(bsq.effective_precision(half)) == 7
  assert int(bsq.effective_precision(bsq.requantize(half))) == 7 == bsq.requantize(half).n_bits
  zero = w.replace(pos_planes=w.pos_planes * 0, neg_planes=w.neg_planes * 0)
  assert int(bsq.effective_precision(zero)) == 1


@pytest.mark.parametrize("kind", ["bsq", "msq"])
def test_penalty_gate_follows_the_budget_weighting(kind):
  """Layers of 300 weights at 8 bits and 100 at 4: over a target of 5 by
  weights (7 bits), under it by MACs when the small layer does nearly all the
  multiply-accumulates (budget_weighting="macs": ~4.004 bits)."""
  p = _two_layers(kind, bits=(8, 4))
  by_params = methods.get(_config(method=kind, target_bits=5.0))
  by_macs = methods.get(_config(method=kind, target_bits=5.0, budget_weighting="macs"))
  by_macs.macs = {"a/kernel": 1, "b/kernel": 1000}
  pen, delta = by_params.regularizer(p, 1.0)
  assert float(pen) > 0 and float(delta) == pytest.approx(2.0)
  pen, delta = by_macs.regularizer(p, 1.0)
  assert float(pen) == 0.0 and float(delta) == pytest.approx((8 + 4000) / 1001 - 5.0, rel=1e-5)
