"""Hutchinson per-layer Hessian traces (csq_jax/hessian.py).

Compilations are shared between tests on purpose (one loss function object
per problem, data passed as ``loss_args``, repeated probe counts) to keep
the file fast on a small CPU.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from csq_jax import hessian
from csq_jax.models import create_model
from csq_jax.transform import path_str

MLP_PROBES = 2000


# ---------------------------------------------------------------- problems


class _MLP(nn.Module):
  """6 -> 6 -> 10 softplus MLP: kernels of 36 and 60 weights, plus biases."""

  @nn.compact
  def __call__(self, x):
    x = jax.nn.softplus(nn.Dense(6, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


def _mlp_loss(params, x, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_MLP().apply({"params": params}, x), y))


def _random_params(shapes, seed):
  """Random weights for a ``{path: ShapeDtypeStruct}`` tree without ``model.init``
  (whose eager, op-by-op run costs seconds): He-normal kernels, unit BN
  scales and variances, zero biases and means."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path_str(path).rsplit("/", 1)[-1]
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])), s.dtype)
    return jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def mlp():
  """``(params, (x, y), 2000-probe estimate of the kernels' traces)``."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(2.0 * rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)
  params = _random_params(jax.eval_shape(_MLP().init, jax.random.key(0), x)["params"], 1)
  est = hessian.hutchinson_trace(_mlp_loss, params, jax.random.key(1), MLP_PROBES,
                                 select=hessian.kernel_paths, probe_batch=500, loss_args=(x, y))
  return params, (x, y), est


def _exact_hessian(loss, params):
  """``(H [n, n] float64, {path: slice})`` by ``jax.hessian`` of the raveled parameters."""
  flat, unravel = ravel_pytree(params)
  H = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
  blocks, off = {}, 0
  for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:  # ravel_pytree's order
    blocks[path_str(p)] = slice(off, off + leaf.size)
    off += leaf.size
  return H, blocks


def _exact_blocks(H, blocks, paths):
  """Exact ``Tr(H_ll)`` and the single-probe variances: simultaneous,
  ``2 sum_{i!=j} (H_ll)_ij^2 + sum_{m!=l} ||H_lm||_F^2``, and layerwise
  (the first sum only)."""
  trace, var, var_layerwise = {}, {}, {}
  for p in paths:
    b = blocks[p]
    h = H[b, b]
    trace[p] = float(np.trace(h))
    var_layerwise[p] = float(2 * np.sum((h - np.diag(np.diag(h))) ** 2))
    var[p] = var_layerwise[p] + float(sum(np.sum(H[b, blocks[q]] ** 2) for q in paths if q != p))
  return trace, var, var_layerwise


# 0.5 x^T A x over x = concat(a [3], b [2, 1]); A is an argument (one compilation for every A).
QUAD_PARAMS = {"a": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array([[0.1], [0.7]])}


def _quad_loss(params, A):
  x = jnp.concatenate([params["a"].reshape(-1), params["b"].reshape(-1)])
  return 0.5 * x @ A @ x


def _quad_traces(A):
  return {"a": float(np.trace(A[:3, :3])), "b": float(np.trace(A[3:, 3:]))}


def _dense_spd(seed):
  M = np.random.default_rng(seed).normal(size=(5, 5))
  return (M @ M.T).astype(np.float32)


# ---------------------------------------------------------------- accuracy


def test_matches_exact_block_traces_of_mlp(mlp):
  """2000 Rademacher probes, all layers at once, vs exact ``jax.hessian`` block traces.

  Tolerance: 5% relative error per kernel. The exact single-probe variance
  (cross-block terms included) puts the standard error at 2000 probes near
  1% of each trace here, so 5% is about 5 standard errors. The reported
  stderr must match the exact one within 25%. Biases are not selected.
  """
  params, (x, y), est = mlp
  assert list(est.mean) == ["fc1/kernel", "fc2/kernel"]
  assert est.num_probes == MLP_PROBES and all(s.shape == (MLP_PROBES,) for s in est.samples.values())
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  exact, var, _ = _exact_blocks(H, blocks, list(est.mean))
  for p in est.mean:
    assert exact[p] > 0
    assert abs(est.mean[p] - exact[p]) <= 0.05 * exact[p], (p, est.mean[p], exact[p])
    true_se = np.sqrt(var[p] / MLP_PROBES)
    assert true_se < 0.015 * exact[p]  # the premise of the tolerance above
    assert est.stderr[p] == pytest.approx(true_se, rel=0.25)
    assert est.mean[p] == pytest.approx(float(np.mean(est.samples[p])))


def test_layerwise_samples_and_accuracy(mlp):
  """Each sample is exactly v_l . (H v)_l (simultaneous) or v_l^T H_ll v_l
  (``layerwise``) for the probes ``rademacher_probes`` returns, checked against
  the exact Hessian for the first 5 probes; and 1000 layerwise probes (2 HVPs
  each) are within 5% of the exact traces, with the stderr the
  layerwise variance predicts (within 25%)."""
  params, (x, y), est = mlp
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  exact, _, var_layerwise = _exact_blocks(H, blocks, list(est.mean))
  lw = hessian.hutchinson_trace(_mlp_loss, params, jax.random.key(1), 1000, select=hessian.kernel_paths,
                                probe_batch=250, loss_args=(x, y), layerwise=True)
  probes = hessian.rademacher_probes(params, jax.random.key(1), range(5), select=hessian.kernel_paths)
  for i in range(5):
    v = np.zeros(H.shape[0])
    for p in est.mean:
      v[blocks[p]] = np.asarray(probes[p][i]).reshape(-1)
    Hv = H @ v
    for p in est.mean:
      b = blocks[p]
      assert est.samples[p][i] == pytest.approx(v[b] @ Hv[b], rel=1e-4, abs=1e-6)
      assert lw.samples[p][i] == pytest.approx(v[b] @ H[b, b] @ v[b], rel=1e-4, abs=1e-6)
  for p in est.mean:
    assert abs(lw.mean[p] - exact[p]) <= 0.05 * exact[p], (p, lw.mean[p], exact[p])
    true_se = np.sqrt(var_layerwise[p] / 1000)
    assert true_se < 0.015 * exact[p]
    assert lw.stderr[p] == pytest.approx(true_se, rel=0.25)


def test_quadratic_expectation_is_exact_over_all_sign_vectors():
  """Averaged over all 2^5 Rademacher vectors, v_l . (A v)_l is exactly Tr(A_ll),
  even with a dense A whose cross blocks make single probes wrong."""
  M = np.random.default_rng(0).normal(size=(5, 5))
  A = (M + M.T).astype(np.float32)
  signs = np.array(list(itertools.product([-1.0, 1.0], repeat=5)), np.float32)  # [32, 5]
  probes = {"a": signs[:, :3], "b": signs[:, 3:].reshape(32, 2, 1)}
  forms = hessian.hvp_block_forms(_quad_loss, QUAD_PARAMS, probes, loss_args=(A,))
  traces = _quad_traces(A)
  for n in ("a", "b"):
    assert forms[n].shape == (32,)
    assert float(jnp.mean(forms[n])) == pytest.approx(traces[n], abs=1e-5)
    assert float(jnp.std(forms[n])) > 0.1  # single probes do vary


def test_diagonal_quadratic_every_probe_is_exact():
  """Diagonal A: every probe gives exactly Tr(A_ll) (zero variance, zero stderr)."""
  A = np.diag(np.arange(1.0, 6.0)).astype(np.float32)
  est = hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, jax.random.key(3), 8, probe_batch=4, loss_args=(A,))
  assert est.num_probes == 8
  assert _quad_traces(A) == {"a": 6.0, "b": 9.0}
  for n in ("a", "b"):
    np.testing.assert_allclose(est.samples[n], _quad_traces(A)[n], rtol=1e-6)
    assert est.stderr[n] == pytest.approx(0.0, abs=1e-6)
    assert est.relative_stderr()[n] < 1e-6


# ---------------------------------------------------------------- batching


def test_vmap_batched_equals_sequential(mlp):
  """The same probes (same key) give the same samples in vmapped chunks of 500
  (the fixture), of 4 with a remainder of 2, and one HVP at a time in a loop."""
  params, data, est = mlp
  key, n = jax.random.key(1), 10
  chunked = hessian.hutchinson_trace(_mlp_loss, params, key, n, select=hessian.kernel_paths, probe_batch=4,
                                     loss_args=data)
  probes = hessian.rademacher_probes(params, key, range(n), select=hessian.kernel_paths)
  assert set(probes) == {"fc1/kernel", "fc2/kernel"}
  assert probes["fc1/kernel"].shape == (n, 6, 6) and probes["fc2/kernel"].shape == (n, 6, 10)
  assert all(set(np.unique(np.asarray(v)).tolist()) == {-1.0, 1.0} for v in probes.values())
  for p in est.mean:
    np.testing.assert_allclose(chunked.samples[p], est.samples[p][:n], rtol=1e-4, atol=1e-6)
  for i in range(n):
    one = hessian.hvp_block_forms(_mlp_loss, params, {p: v[i:i + 1] for p, v in probes.items()}, loss_args=data)
    for p in est.mean:
      assert float(one[p][0]) == pytest.approx(float(est.samples[p][i]), rel=1e-4, abs=1e-6)


def _exact_samples(H, blocks, probes, paths, n, layerwise=False):
  """``{path: [n]}``: exact ``v_l . (H v)_l`` (or ``v_l^T H_ll v_l``) for the first ``n`` of ``probes``."""
  out = {p: np.zeros(n) for p in paths}
  for i in range(n):
    v = np.zeros(H.shape[0])
    for p in paths:
      v[blocks[p]] = np.asarray(probes[p][i], np.float64).reshape(-1)
    Hv = H @ v
    for p in paths:
      b = blocks[p]
      out[p][i] = v[b] @ (H[b, b] @ v[b] if layerwise else Hv[b])
  return out


@pytest.mark.parametrize("probe_batch,hvps_per_program,num_probes,layerwise", [
    (1, 8, 11, False),  # programs of 8 and 3 single (unvmapped) HVPs behind one linearization each
    (3, 7, 11, False),  # programs of chunks 3+3 and 3+2: vmapped chunks and a shorter last one
    (2, 4, 5, True),    # layerwise: 10 HVPs in programs of 2+2, 2+2 and 2
    (4, 2, 6, False),   # one chunk per program: 4 and 2
])
def test_programs_match_exact_hessian(mlp, monkeypatch, probe_batch, hvps_per_program, num_probes, layerwise):
  """Every sample, however the HVPs are split into programs (one linearization
  each) and chunks, is the exact ``v_l . (H v)_l`` (``v_l^T H_ll v_l``
  layerwise) of ``jax.hessian`` for the probes ``rademacher_probes`` returns."""
  monkeypatch.setattr(hessian, "HVPS_PER_PROGRAM", hvps_per_program)
  params, (x, y), _ = mlp
  key = jax.random.key(5)
  est = hessian.hutchinson_trace(_mlp_loss, params, key, num_probes, select=hessian.kernel_paths,
                                 probe_batch=probe_batch, loss_args=(x, y), layerwise=layerwise)
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  probes = hessian.rademacher_probes(params, key, range(num_probes), select=hessian.kernel_paths)
  exact = _exact_samples(H, blocks, probes, list(est.mean), num_probes, layerwise)
  for p in est.mean:
    np.testing.assert_allclose(est.samples[p], exact[p], rtol=1e-4, atol=1e-5)


def test_convergence_helper_stops_early_or_at_max_probes():
  key = jax.random.key(3)
  A = np.diag(np.arange(1.0, 6.0)).astype(np.float32)
  est = hessian.hutchinson_trace_until_converged(_quad_loss, QUAD_PARAMS, key, max_probes=100, tol=1e-3,
                                                 probe_batch=4, loss_args=(A,))
  assert est.num_probes == 4  # stderr is 0 after the first batch
  assert est.mean == pytest.approx(_quad_traces(A))

  A = _dense_spd(1)
  est = hessian.hutchinson_trace_until_converged(_quad_loss, QUAD_PARAMS, key, max_probes=10, tol=1e-6,
                                                 probe_batch=4, loss_args=(A,))
  assert est.num_probes == 10  # 4 + 4 + 2, never above max_probes
  assert all(r > 1e-6 for r in est.relative_stderr().values())
  ref = hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, key, 8, probe_batch=4, loss_args=(A,))
  for n in ("a", "b"):  # batches continue the probe sequence of one call with the same key
    np.testing.assert_allclose(est.samples[n][:8], ref.samples[n], rtol=1e-6)


# ---------------------------------------------------------------- models


def test_layer_traces_for_small_cnn():
  """One finite, positive trace per kernel of the small CNN (at init, random 8x8x1 data).

  ``layerwise``: in a ReLU network with eval-mode BN the logits are piecewise
  linear in any one kernel, so each diagonal block is the PSD Gauss-Newton
  block and every layerwise sample v_l^T H_ll v_l is >= 0. (The simultaneous
  estimate of this model at init is far noisier: its cross blocks are large.)
  """
  model = create_model("small_cnn", 10)
  variables = _random_params(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))), 0)
  rng = np.random.default_rng(1)
  batches = [{"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32), "label": rng.integers(0, 10, size=4)}
             for _ in range(3)]
  est = hessian.layer_traces_for_model(model, variables, batches, jax.random.key(1), num_probes=2,
                                       num_batches=2, probe_batch=1, layerwise=True)
  kernels = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  kernels = [p for p in kernels if p.endswith("kernel")]
  assert "head/kernel" in kernels and "conv0/kernel" in kernels
  assert list(est.mean) == kernels and est.num_probes == 2
  for p, m in est.mean.items():
    assert np.isfinite(m) and np.isfinite(est.stderr[p]) and m > 0, (p, m)
    assert np.all(est.samples[p] >= -1e-6 * m), (p, est.samples[p])
  # Two batches through the model at once (the default) or scanned: one loss.
  images = jnp.stack([b["image"] for b in batches[:2]])
  labels = jnp.stack([b["label"] for b in batches[:2]])
  flat, scanned = (jax.jit(hessian.ClassifierLoss(model, scan))(variables["params"], variables["batch_stats"],
                                                                 images, labels) for scan in (False, True))
  assert float(flat) == pytest.approx(float(scanned), rel=1e-5)


def test_resnet_samples_match_exact_hessian(monkeypatch):
  """A tiny CIFAR ResNet (conv, eval-mode BN, ReLU, strided and 1x1 shortcut
  convolutions, dense head) through ``layer_traces_for_model`` on two stacked
  batches, the shortcut kernels unselected as in the quantization configs:
  every sample (programs of 2 single HVPs, a shorter last one; and layerwise)
  is the exact one of the ``jax.hessian`` of the same loss."""
  monkeypatch.setattr(hessian, "HVPS_PER_PROGRAM", 2)
  model = create_model("resnet20", 3).clone(blocks_per_stage=1, widths=(2, 3, 4))
  variables = _random_params(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))), 2)
  rng = np.random.default_rng(3)
  batches = [(rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, size=4)) for _ in range(2)]
  select = lambda p: p.endswith("kernel") and not p.endswith("shortcut_conv/kernel")
  key, n = jax.random.key(2), 3

  images = jnp.stack([b[0] for b in batches])
  labels = jnp.stack([b[1] for b in batches])
  loss = hessian.ClassifierLoss(model)
  H, blocks = _exact_hessian(lambda p: loss(p, variables["batch_stats"], images, labels), variables["params"])
  probes = hessian.rademacher_probes(variables["params"], key, range(n), select=select)
  for layerwise in (False, True):
    est = hessian.layer_traces_for_model(model, variables, batches, key, n, select_fn=select, probe_batch=1,
                                         layerwise=layerwise)
    assert len(est.mean) == 8 and "head/kernel" in est.mean  # 7 convs and the head
    assert not any("shortcut" in p for p in est.mean)
    exact = _exact_samples(H, blocks, probes, list(est.mean), n, layerwise)
    for p in est.mean:
      scale = max(np.max(np.abs(exact[p])), 1e-3)
      np.testing.assert_allclose(est.samples[p], exact[p], rtol=1e-4, atol=1e-5 * scale, err_msg=p)
