"""The contract every method meets (optax-style): one list of methods, the
same behavioural checks for each.

The list is the registry's names plus a method defined outside the package
(``examples/dorefa_method.py``, the example of ``docs/adding_a_method.md``),
run by its ``"module:Class"`` name. For each: init from a float kernel ->
materialize -> hard weights on the method's integer grid -> checkpoint
structure round trip -> optimizer labels cover every leaf -> precision and
export agree -> the hooks keep the tree's structure under ``jax.jit``.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from csq_jax import budget, export, methods, models, quantizers, train, transform
from csq_jax.methods import base, registry

sys.path.insert(0, os.path.join(ROOT, "examples"))
USER_METHOD = "dorefa_method:DoReFa"
METHODS = (*registry.names(), USER_METHOD)


def _config(name: str, target: float = 3.0):
  c = load_config("default")
  c.method = name
  c.target_bits = target
  c.progress = False
  c.tensorboard = False
  methods.resolve(name).add_section(c)
  return c


@pytest.fixture(scope="module")
def float_params():
  model = models.create_model("small_cnn", 10)
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]


def _quantized(name, float_params, target=3.0):
  c = _config(name, target)
  method = methods.get(c)
  q, report = transform.quantize_params(float_params, transform.rules_from_config(c.rules), method.quantize_spec(),
                                        jax.random.key(1))
  return c, method, q, report


def test_the_registry_is_importable_without_jax_and_names_every_class():
  code = ("import sys; from csq_jax.methods import registry; import csq_jax.report;"
          " assert 'jax' not in sys.modules, 'jax imported'; print(','.join(registry.names()))")
  import subprocess

  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().split(",") == list(registry.names())
  for name in registry.names():
    cls = registry.resolve(name)
    assert issubclass(cls, base.Method)
  assert not quantizers.is_quantized(jnp.ones((2, 2)))
  with pytest.raises(TypeError, match="Not a quantized weight"):
    quantizers.materialize(jnp.ones((2, 2)), 1.0)
  with pytest.raises(registry.UnknownMethodError, match="Unknown method 'hawq'"):
    registry.resolve("hawq")
  with pytest.raises(registry.UnknownMethodError, match="cannot import module 'no_such_module'"):
    registry.resolve("no_such_module:Method")
  with pytest.raises(registry.UnknownMethodError, match="has no class 'Nope'"):
    registry.resolve("dorefa_method:Nope")


@pytest.mark.parametrize("name", METHODS)
def test_init_materialize_and_hard_weights_on_the_integer_grid(name, float_params):
  c, method, q, report = _quantized(name, float_params)
  leaves = transform.quantized_leaves(q)
  assert method.name == name
  if not method.quantizes:
    assert not leaves and set(a for a, _ in report.actions.values()) == {"float"}
    return
  assert set(leaves) == {p for p, (a, _) in report.actions.items() if a == "quantize"} and len(leaves) == 8
  for path, leaf in leaves.items():
    kernel = np.asarray(float_params[path.split("/")[0]]["kernel"])
    hard = np.asarray(quantizers.materialize(leaf, 1.0, hard=True))
    ints = np.asarray(quantizers.integer_weights(leaf))
    step = float(quantizers.step_size(leaf))
    bits = int(quantizers.precision(leaf))
    assert hard.shape == kernel.shape and ints.dtype == np.int32
    np.testing.assert_allclose(hard, ints * step, rtol=1e-6, atol=1e-7)
    assert np.abs(ints).max() <= 2**bits - 1
    assert bits == (c.n_bits if method.searches else int(c.target_bits))
    static = quantizers.static_precision(leaf)
    assert static is None or static == bits
    # The hard model starts near the float kernel it came from.
    assert np.corrcoef(hard.ravel(), kernel.ravel())[0, 1] > 0.9, path


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_structure_round_trip(name, float_params):
  _, method, q, _ = _quantized(name, float_params)
  structure = method.structure(q)
  assert json.loads(json.dumps(structure)) == structure
  template = method.restructure(jax.tree_util.tree_map(jnp.zeros_like, q), structure)
  assert jax.tree_util.tree_structure(template) == jax.tree_util.tree_structure(q)
  assert [np.shape(x) for x in jax.tree_util.tree_leaves(template)] == [np.shape(x) for x in jax.tree_util.tree_leaves(q)]


@pytest.mark.parametrize("name", METHODS)
def test_optimizer_labels_cover_every_leaf_and_one_step_updates_them(name, float_params):
  c, method, q, _ = _quantized(name, float_params)
  labels = method.param_labels(q)
  assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(q)
  used = set(jax.tree_util.tree_leaves(labels))
  assert used <= {"weights"} | set(method.optimizer_groups(lambda m, d: None))
  tx = train.make_optimizer(c, lambda step: 0.1, method)
  state = tx.init(q)
  grads = jax.tree_util.tree_map(jnp.ones_like, q)
  updates, _ = jax.jit(tx.update)(grads, state, q)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(q)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize("name", METHODS)
def test_precision_and_export_agree(name, float_params, tmp_path):
  """The budget's precision of each layer is the number of place values the
  export stores it with, and the exported integers are the method's."""
  _, method, q, _ = _quantized(name, float_params)
  q = method.finalize(method.start_finetune(q))
  path = str(tmp_path / "model.csqx")
  out = export.export_model(path, q, {}, {"method": name})
  ints = export.load_integers(path)
  precisions = budget.layer_precisions(q)
  assert set(ints) == {f"params/{p}" for p in precisions}
  for p, leaf in transform.quantized_leaves(q).items():
    assert len(export.grid_places(leaf)) == int(precisions[p])
    np.testing.assert_array_equal(ints[f"params/{p}"], np.asarray(quantizers.integer_weights(leaf)))
  if precisions:
    assert out["export_bits_per_weight"] >= float(budget.average_bits(q))


@pytest.mark.parametrize("name", METHODS)
def test_hooks_keep_the_tree_and_run_under_jit(name, float_params):
  _, method, q, _ = _quantized(name, float_params)
  penalty, delta = jax.jit(method.regularizer)(q, 2.0)
  assert np.isfinite(float(penalty)) and np.isfinite(float(delta))
  after = jax.jit(method.after_update)(q)
  assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(q)
  for hook in (method.start_finetune, method.finalize):
    out = hook(q)
    assert set(transform.quantized_leaves(out)) == set(transform.quantized_leaves(q))


@pytest.mark.parametrize("name", METHODS)
def test_a_searching_method_moves_its_layers_to_any_width(name, float_params):
  """``allowed_bits`` needs ``quantizers.with_precision`` of every searched
  leaf: the moved layer has that precision, its hard weights stay on its
  integer grid and near the layer they came from."""
  _, method, q, _ = _quantized(name, float_params)
  if not method.searches:
    return
  for leaf in transform.quantized_leaves(q).values():
    assert quantizers.can_set_precision(leaf)
    for bits in (1, 3, 7):
      moved = quantizers.with_precision(leaf, bits)
      assert int(quantizers.precision(moved)) == bits
      hard = np.asarray(quantizers.materialize(moved, 1.0, hard=True))
      ints = np.asarray(quantizers.integer_weights(moved))
      np.testing.assert_allclose(hard, ints * float(quantizers.step_size(moved)), rtol=1e-6, atol=1e-7)
      places = quantizers.grid_places(moved)  # CSQ: the selected planes, not always 0..bits-1
      assert len(places) == bits and np.all(np.abs(ints) <= sum(2**p for p in places))
      if bits >= 3:
        original = np.asarray(quantizers.materialize(leaf, 1.0, hard=True))
        assert np.corrcoef(hard.ravel(), original.ravel())[0, 1] > 0.8


@pytest.mark.parametrize("name", METHODS)
def test_a_layer_that_a_rule_fixes_at_8_bits_goes_through_every_hook(name, float_params):
  """ImageNet configs fix the first and last layers at 8 bits: those leaves
  are STE weights inside any method's tree (``transform``'s ``"fixed"``
  rule). Optimizer labels, the regularizer and every hook must accept them
  and leave them at 8 bits (a CSQ run on ``configs/imagenet_r50.py`` once
  failed in ``leaf_labels`` on exactly this)."""
  c = _config(name)
  c.rules = (("conv0/kernel", "fixed", 8), ("head/kernel", "fixed", 8), (".*kernel", "quantize"))
  method = methods.get(c)
  q, report = transform.quantize_params(float_params, transform.rules_from_config(c.rules), method.quantize_spec(),
                                        jax.random.key(1))
  fixed = ("fixed", 8) if method.quantizes else ("float", None)
  assert report.actions["conv0/kernel"] == fixed and report.actions["head/kernel"] == fixed
  tx = train.make_optimizer(c, lambda step: 0.1, method)
  updates, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.ones_like, q), tx.init(q), q)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(q)
  penalty, _ = jax.jit(method.regularizer)(q, 2.0)
  assert np.isfinite(float(penalty))
  q = method.finalize(method.start_finetune(jax.jit(method.after_update)(q)))
  precisions = budget.layer_precisions(q)
  if method.quantizes:
    assert int(precisions["conv0/kernel"]) == 8 and int(precisions["head/kernel"]) == 8
  else:
    assert not precisions


@pytest.mark.parametrize("name", METHODS)
def test_config_section_and_validation(name):
  cls = methods.resolve(name)
  c = _config(name)
  train.validate_config(c)
  for section in cls.sections():
    assert section in c
  if cls.section:
    assert set(c[cls.section]) == set(cls.defaults())
  checked = 0
  for field, ok, _ in cls.fields:  # a value of the field's type that its check refuses
    c = _config(name)
    default = c[cls.section][field]
    bad = {str: "bogus", int: -1, float: -1.0}.get(type(default))
    if bad is None or ok(bad, c):
      continue
    c[cls.section][field] = bad
    with pytest.raises(train.ConfigError, match=f"{cls.section}.{field}={bad!r} is out of range"):
      train.validate_config(c)
    checked += 1
  assert checked or not [f for f, _, _ in cls.fields if not isinstance(cls.defaults()[f], bool)]
