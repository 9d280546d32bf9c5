"""Per-layer Hessian traces (csq_jax/hessian.py) against exact ``jax.hessian`` traces.

Compilations are shared between tests on purpose (one loss function object
per problem, data passed as ``loss_args``, repeated probe counts) to keep
the file fast on a small CPU. The float64 tests run under
``jax.enable_x64(True)`` so that the estimator and the exact Hessian
agree to rounding.
"""

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


def _random_params(shapes, seed, dtype=None):
  """Random weights for a ``{path: ShapeDtypeStruct}`` tree without ``model.init``
  (whose eager, op-by-op run costs seconds): He-normal kernels, unit BN
  scales and variances, zero biases and means."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path_str(path).rsplit("/", 1)[-1]
    d = dtype or s.dtype
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])), d)
    return jnp.ones(s.shape, d) if name in ("scale", "var") else jnp.zeros(s.shape, d)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _mlp_problem(dtype=np.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(2.0 * rng.normal(size=(32, 6)), dtype)
  y = jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)
  params = _random_params(jax.eval_shape(_MLP().init, jax.random.key(0), x)["params"], 1, dtype)
  return params, (x, y)


@pytest.fixture(scope="module")
def mlp():
  """``(params, (x, y), 2000-probe simultaneous estimate of the kernels' traces)``."""
  params, data = _mlp_problem()
  est = hessian.hutchinson_trace(_mlp_loss, params, jax.random.key(1), MLP_PROBES,
                                 select=hessian.kernel_paths, probe_batch=500, loss_args=data)
  return params, data, est


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
  """Exact ``Tr(H_ll)`` and the simultaneous single-probe variance
  ``2 sum_{i!=j} (H_ll)_ij^2 + sum_{m!=l} ||H_lm||_F^2``."""
  trace, var = {}, {}
  for p in paths:
    b = blocks[p]
    h = H[b, b]
    trace[p] = float(np.trace(h))
    var[p] = float(2 * np.sum((h - np.diag(np.diag(h))) ** 2)
                   + sum(np.sum(H[b, blocks[q]] ** 2) for q in paths if q != p))
  return trace, var


def _signs(key, shape):
  return 2.0 * (np.asarray(jax.random.bits(key, shape, jnp.uint32)) & 1) - 1.0


def _hutchpp_reference(H, blocks, paths, key, sketch, num_probes, extra=None):
  """An independent float64 numpy Hutch++ on the exact blocks, with the same
  random signs as ``hutchpp_trace`` (layer ``l`` from ``fold_in(key, l)``,
  refinement round ``r`` from ``fold_in(fold_in(key, l), r)``, ``extra =
  {path: [probes of round 1, 2, ...]}``): ``{path: samples}`` ``Tr(Q^T A Q)
  + g'_j^T A g'_j``."""
  out = {}
  for l, p in enumerate(paths):
    A = H[blocks[p], blocks[p]]
    n = A.shape[0]
    k = min(sketch, n)
    R = _signs(jax.random.fold_in(key, l), (n, k + num_probes))
    Q, _ = np.linalg.qr(A @ R[:, :k])
    top = np.trace(Q.T @ A @ Q)
    if k == n:
      out[p] = np.array([top])
      continue
    G = [R[:, k:]] + [_signs(jax.random.fold_in(jax.random.fold_in(key, l), r), (n, c))
                      for r, c in enumerate((extra or {}).get(p, []), start=1)]
    G = np.concatenate(G, axis=1)
    G = G - Q @ (Q.T @ G)
    out[p] = top + np.einsum("ij,ij->j", G, A @ G)
  return out


# 0.5 x^T A x over x = concat(a [3], b [2, 1]); A is an argument (one compilation for every A).
QUAD_PARAMS = {"a": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array([[0.1], [0.7]])}


def _quad_loss(params, A):
  x = jnp.concatenate([params["a"].reshape(-1), params["b"].reshape(-1)])
  return 0.5 * x @ A @ x


def _quad_traces(A):
  return {"a": float(np.trace(A[:3, :3])), "b": float(np.trace(A[3:, 3:]))}


# ---------------------------------------------------------------- Hutchinson (simultaneous)


def test_hutchinson_matches_exact_block_traces_of_mlp(mlp):
  """2000 simultaneous Rademacher probes vs exact ``jax.hessian`` block traces.

  Tolerance: 5% relative error per kernel. The exact single-probe variance
  (cross-block terms included) puts the standard error at 2000 probes near
  1% of each trace here, so 5% is about 5 standard errors. The reported
  stderr must match the exact one within 25%. Biases are not selected.
  """
  params, (x, y), est = mlp
  assert list(est.mean) == ["fc1/kernel", "fc2/kernel"]
  assert est.num_probes == MLP_PROBES and est.sketch == 0
  assert all(s.shape == (MLP_PROBES,) for s in est.samples.values())
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  exact, var = _exact_blocks(H, blocks, list(est.mean))
  for p in est.mean:
    assert exact[p] > 0
    assert abs(est.mean[p] - exact[p]) <= 0.05 * exact[p], (p, est.mean[p], exact[p])
    true_se = np.sqrt(var[p] / MLP_PROBES)
    assert true_se < 0.015 * exact[p]  # the premise of the tolerance above
    assert est.stderr[p] == pytest.approx(true_se, rel=0.25)
    assert est.mean[p] == pytest.approx(float(np.mean(est.samples[p])))


def _exact_simultaneous_samples(H, blocks, params, key, paths, n):
  """``{path: [n]}``: exact ``v_l . (H v)_l`` for probes ``0..n-1`` as
  ``hessian._probe`` draws them."""
  leaves = [x for q, x in jax.tree_util.tree_flatten_with_path(params)[0] if path_str(q) in paths]
  out = {p: np.zeros(n) for p in paths}
  for i in range(n):
    v = np.zeros(H.shape[0])
    for p, pr in zip(paths, hessian._probe(key, i, leaves)):
      v[blocks[p]] = np.asarray(pr, np.float64).reshape(-1)
    Hv = H @ v
    for p in paths:
      out[p][i] = v[blocks[p]] @ Hv[blocks[p]]
  return out


@pytest.mark.parametrize("probe_batch,hvps_per_program,num_probes", [
    (1, 8, 11),  # programs of 8 and 3 single (unvmapped) HVPs behind one linearization each
    (3, 7, 11),  # programs of chunks 3+3 and 3+2: vmapped chunks and a shorter last one
    (4, 2, 6),   # one chunk per program: 4 and 2
])
def test_hutchinson_samples_are_exact_forms(mlp, monkeypatch, probe_batch, hvps_per_program, num_probes):
  """Every simultaneous sample, however the HVPs are split into programs (one
  linearization each) and chunks, is the exact ``v_l . (H v)_l`` of
  ``jax.hessian`` for the probe ``fold_in(key, i)`` draws; the fixture's first
  samples (chunks of 500) are the same probes."""
  monkeypatch.setattr(hessian, "HVPS_PER_PROGRAM", hvps_per_program)
  params, (x, y), big = mlp
  key = jax.random.key(1)
  est = hessian.hutchinson_trace(_mlp_loss, params, key, num_probes, select=hessian.kernel_paths,
                                 probe_batch=probe_batch, loss_args=(x, y))
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  exact = _exact_simultaneous_samples(H, blocks, params, key, list(est.mean), num_probes)
  for p in est.mean:
    np.testing.assert_allclose(est.samples[p], exact[p], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(est.samples[p], big.samples[p][:num_probes], rtol=1e-4, atol=1e-6)


def test_hutchinson_diagonal_quadratic_every_probe_is_exact():
  """Diagonal A: every probe gives exactly Tr(A_ll) (zero variance, zero stderr);
  a dense A does not."""
  A = np.diag(np.arange(1.0, 6.0)).astype(np.float32)
  est = hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, jax.random.key(3), 8, probe_batch=4, loss_args=(A,))
  assert est.num_probes == 8 and _quad_traces(A) == {"a": 6.0, "b": 9.0}
  for n in ("a", "b"):
    np.testing.assert_allclose(est.samples[n], _quad_traces(A)[n], rtol=1e-6)
    assert est.stderr[n] == pytest.approx(0.0, abs=1e-6)
  M = np.random.default_rng(0).normal(size=(5, 5))
  dense = hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, jax.random.key(3), 8, probe_batch=4,
                                   loss_args=((M + M.T).astype(np.float32),))
  assert all(dense.stderr[n] > 0.1 for n in ("a", "b"))


# ---------------------------------------------------------------- Hutch++ (layerwise)


def test_hutchpp_is_exact_when_the_sketch_spans_each_layer():
  """float64, sketch >= every layer's size: ``Q`` spans each block, so
  ``Tr(Q^T H_ll Q)`` is the exact block trace of ``jax.hessian`` (to
  rounding), with stderr 0 and no random probes; every leaf (biases too)."""
  with jax.enable_x64(True):
    params, (x, y) = _mlp_problem(np.float64)
    est = hessian.hutchpp_trace(_mlp_loss, params, jax.random.key(0), sketch=60, num_probes=2,
                                probe_batch=1, loss_args=(x, y))
    H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  assert set(est.mean) == {"fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"} and est.sketch == 60
  for p, m in est.mean.items():
    exact = np.trace(H[blocks[p], blocks[p]])
    assert m == pytest.approx(exact, rel=1e-9, abs=1e-12), p
    assert est.stderr[p] == 0.0 and est.samples[p].shape == (1,)


@pytest.mark.parametrize("hvps_per_program", [8, 3])
def test_hutchpp_samples_match_numpy_reference_on_exact_hessian(monkeypatch, hvps_per_program):
  """float64, sketch 4 < 36 and 60 weights: every sample of ``hutchpp_trace``
  equals an independent numpy Hutch++ on the exact ``jax.hessian`` blocks with
  the same random signs (programs of 8, or of 3 with a padded last one)."""
  monkeypatch.setattr(hessian, "HVPS_PER_PROGRAM", hvps_per_program)
  key = jax.random.key(4)
  with jax.enable_x64(True):
    params, (x, y) = _mlp_problem(np.float64)
    est = hessian.hutchpp_trace(_mlp_loss, params, key, sketch=4, num_probes=5, select=hessian.kernel_paths,
                                probe_batch=1, loss_args=(x, y))
    H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  ref = _hutchpp_reference(H, blocks, list(est.mean), key, 4, 5)
  assert list(est.mean) == ["fc1/kernel", "fc2/kernel"] and est.num_probes == 5
  for p in est.mean:
    np.testing.assert_allclose(est.samples[p], ref[p], rtol=1e-9, atol=1e-12)
    assert est.mean[p] == pytest.approx(float(np.mean(ref[p])), rel=1e-9)
    assert est.stderr[p] == pytest.approx(float(np.std(ref[p], ddof=1) / np.sqrt(5)), rel=1e-6)


def test_hutchpp_refine_adds_probes_to_the_layers_it_names():
  """``refine`` naming fc2 every time: fc2 gets 5 + 5 + 2 probes (``max_probes``
  12, the same ``Q``), fc1 keeps its 5; every sample is the numpy Hutch++ of
  the exact float64 blocks with the refinement rounds' signs."""
  key = jax.random.key(6)
  asked = []
  with jax.enable_x64(True):
    params, (x, y) = _mlp_problem(np.float64)
    est = hessian.hutchpp_trace(_mlp_loss, params, key, sketch=4, num_probes=5, select=hessian.kernel_paths,
                                probe_batch=1, loss_args=(x, y), max_probes=12,
                                refine=lambda e: asked.append(dict(e.mean)) or ["fc2/kernel"])
    H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  assert len(asked) == 2  # after the first estimate and after round 1; round 2 reaches max_probes
  assert {p: len(s) for p, s in est.samples.items()} == {"fc1/kernel": 5, "fc2/kernel": 12}
  ref = _hutchpp_reference(H, blocks, list(est.mean), key, 4, 5, extra={"fc2/kernel": [5, 2]})
  for p in est.mean:
    np.testing.assert_allclose(est.samples[p], ref[p], rtol=1e-9, atol=1e-12)


def test_hutchpp_is_unbiased(mlp):
  """Over 40 keys (sketch 4, 4 probes: 12 HVPs per layer), the mean Hutch++
  estimate is within 4 standard errors of the exact trace, and the mean
  reported stderr is within a factor 2 of the observed spread (this random
  MLP's blocks are not low-rank: Hutch++ only wins on decaying spectra, see
  the next test)."""
  params, (x, y), _ = mlp
  H, blocks = _exact_hessian(lambda p: _mlp_loss(p, x, y), params)
  paths = ["fc1/kernel", "fc2/kernel"]
  exact, _ = _exact_blocks(H, blocks, paths)
  runs = [hessian.hutchpp_trace(_mlp_loss, params, jax.random.key(100 + s), 4, 4, select=hessian.kernel_paths,
                                loss_args=(x, y)) for s in range(40)]
  for p in paths:
    vals = np.array([r.mean[p] for r in runs])
    spread = vals.std(ddof=1)
    assert abs(vals.mean() - exact[p]) <= 4 * spread / np.sqrt(len(vals)), (p, vals.mean(), exact[p])
    assert 0.5 * spread < np.mean([r.stderr[p] for r in runs]) < 2 * spread


def test_hutchpp_low_rank_block_is_exact_where_hutchinson_is_not():
  """A quadratic whose diagonal blocks have rank 1: a sketch of 1 captures
  each block, so every Hutch++ sample is the exact trace (zero stderr), while
  Hutchinson's samples vary (dense blocks, cross terms)."""
  u = np.array([1.0, -2.0, 0.5, 1.5, -1.0], np.float32)
  A = np.outer(u, u)
  A[:3, 3:] = A[3:, :3] = 0.7  # cross blocks
  est = hessian.hutchpp_trace(_quad_loss, QUAD_PARAMS, jax.random.key(5), sketch=1, num_probes=6, loss_args=(A,))
  sim = hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, jax.random.key(5), 6, loss_args=(A,))
  for n, tr in _quad_traces(A).items():
    np.testing.assert_allclose(est.samples[n], tr, rtol=1e-5)
    assert est.stderr[n] < 1e-5 * tr
    assert sim.stderr[n] > 0.1


def test_hutchpp_validation():
  for sketch, probes in ((0, 4), (4, 1)):
    with pytest.raises(ValueError):
      hessian.hutchpp_trace(_quad_loss, QUAD_PARAMS, jax.random.key(0), sketch, probes, loss_args=(np.eye(5),))
  with pytest.raises(ValueError):
    hessian.hutchinson_trace(_quad_loss, QUAD_PARAMS, jax.random.key(0), 4, select=lambda p: False,
                             loss_args=(np.eye(5),))


# ---------------------------------------------------------------- models


def test_resnet_traces_match_exact_hessian(monkeypatch):
  """A tiny CIFAR ResNet (conv, eval-mode BN, ReLU, strided and 1x1 shortcut
  convolutions, dense head) through ``layer_traces_for_model`` on two stacked
  batches, the shortcut kernels unselected as in the quantization configs:
  every Hutch++ sample (programs of 2 HVPs) equals the numpy Hutch++ of the
  exact ``jax.hessian`` of the same loss, every simultaneous sample the exact
  ``v_l . (H v)_l``; in eval mode each block is the PSD Gauss-Newton block
  (piecewise-linear logits in one kernel), so every Hutch++ trace is > 0."""
  monkeypatch.setattr(hessian, "HVPS_PER_PROGRAM", 2)
  model = create_model("resnet20", 3).clone(blocks_per_stage=1, widths=(2, 3, 4))
  variables = _random_params(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))), 2)
  rng = np.random.default_rng(3)
  batches = [(rng.normal(size=(4, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, size=4)) for _ in range(2)]
  select = lambda p: p.endswith("kernel") and not p.endswith("shortcut_conv/kernel")
  key = jax.random.key(2)

  images = jnp.stack([b[0] for b in batches])
  labels = jnp.stack([b[1] for b in batches])
  loss = hessian.ClassifierLoss(model)
  H, blocks = _exact_hessian(lambda p: loss(p, variables["batch_stats"], images, labels), variables["params"])
  est = hessian.layer_traces_for_model(model, variables, batches, key, 3, select_fn=select, probe_batch=1, sketch=3)
  assert len(est.mean) == 8 and "head/kernel" in est.mean  # 7 convs and the head
  assert not any("shortcut" in p for p in est.mean)
  ref = _hutchpp_reference(H, blocks, list(est.mean), key, 3, 3)
  for p in est.mean:
    scale = max(np.max(np.abs(ref[p])), 1e-3)
    np.testing.assert_allclose(est.samples[p], ref[p], rtol=1e-3, atol=1e-4 * scale, err_msg=p)
    assert est.mean[p] > 0
  sim = hessian.layer_traces_for_model(model, variables, batches, key, 3, select_fn=select, probe_batch=1)
  exact = _exact_simultaneous_samples(H, blocks, variables["params"], key, list(sim.mean), 3)
  for p in sim.mean:
    scale = max(np.max(np.abs(exact[p])), 1e-3)
    np.testing.assert_allclose(sim.samples[p], exact[p], rtol=1e-4, atol=1e-5 * scale, err_msg=p)
