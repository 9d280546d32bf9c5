"""Gates of continuous sparsification (Eq. 2) and the temperature schedule (Alg. 1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from csq_jax import gates


def np_sigmoid(z):
  z = np.asarray(z, np.float64)
  return 1.0 / (1.0 + np.exp(-z))


X = np.array([-3.0, -1.0, -0.25, -1e-3, 0.0, 1e-3, 0.25, 1.0, 3.0], np.float32)


class GateFunctionsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.5, 1.0, 7.0, 50.0)
  def test_soft_gate_is_temperature_sigmoid(self, beta):
    got = self.variant(gates.soft_gate)(jnp.asarray(X), beta)
    np.testing.assert_allclose(np.asarray(got), np_sigmoid(beta * X.astype(np.float64)),
                               rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_gate_traced_beta(self):
    beta = jnp.asarray(3.0)
    got = self.variant(gates.soft_gate)(jnp.asarray(X), beta)
    np.testing.assert_allclose(np.asarray(got), np_sigmoid(3.0 * X), rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_gate_is_unit_step_including_zero(self):
    got = np.asarray(self.variant(gates.hard_gate)(jnp.asarray(X)))
    expected = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1], np.float32)
    np.testing.assert_array_equal(got, expected)
    # Exactly zero (and negative zero) counts as "on": I(x >= 0).
    np.testing.assert_array_equal(
        np.asarray(self.variant(gates.hard_gate)(jnp.array([0.0, -0.0]))), [1.0, 1.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_gate_keeps_dtype(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      out = self.variant(gates.hard_gate)(jnp.asarray(X, dtype))
      self.assertEqual(out.dtype, dtype)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gate_dispatch(self):
    x = jnp.asarray(X)
    hard = self.variant(lambda v: gates.gate(v, 2.0, hard=True))(x)
    soft = self.variant(lambda v: gates.gate(v, 2.0, hard=False))(x)
    np.testing.assert_array_equal(np.asarray(hard), (X >= 0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(soft), np_sigmoid(2.0 * X), rtol=1e-6)


def test_soft_gate_tends_to_hard_gate_away_from_zero():
  x = np.concatenate([np.linspace(-2, -0.01, 20), np.linspace(0.01, 2, 20)]).astype(np.float32)
  hard = (x >= 0).astype(np.float64)
  errs = []
  for beta in (1.0, 10.0, 100.0, 1e4):
    soft = np.asarray(gates.soft_gate(jnp.asarray(x), beta), np.float64)
    errs.append(np.max(np.abs(soft - hard)))
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 1e-6
  # The bound is the gate at the point nearest to zero, 1 - sigmoid(beta * 0.01).
  np.testing.assert_allclose(errs[1], 1.0 - np_sigmoid(10.0 * 0.01), rtol=1e-5)


class TestBetaSchedule:

  @pytest.mark.parametrize("total,beta0,beta_max", [(100, 1.0, 200.0), (37, 2.5, 50.0)])
  def test_endpoints_and_beyond(self, total, beta0, beta_max):
    sched = gates.beta_schedule(total, beta0, beta_max)
    np.testing.assert_allclose(float(sched(0)), beta0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(total)), beta0 * beta_max, rtol=1e-5)
    for t in (total + 1, 2 * total, 10 * total):
      np.testing.assert_allclose(float(sched(t)), beta0 * beta_max, rtol=1e-5)

  def test_geometric_midpoint_and_monotone(self):
    total, beta0, beta_max = 100, 1.5, 200.0
    sched = gates.beta_schedule(total, beta0, beta_max)
    np.testing.assert_allclose(float(sched(total // 2)), beta0 * np.sqrt(beta_max), rtol=1e-5)
    steps = np.arange(0, total + 1)
    vals = np.array([float(sched(int(t))) for t in steps])
    np.testing.assert_allclose(vals, beta0 * beta_max ** (steps / total), rtol=1e-5)
    assert np.all(np.diff(vals) > 0)

  def test_jittable_with_traced_step(self):
    sched = gates.beta_schedule(10, 1.0, 100.0)
    out = jax.jit(sched)(jnp.asarray(5))
    np.testing.assert_allclose(float(out), 10.0, rtol=1e-5)

  def test_beta_max_one_is_constant(self):
    sched = gates.beta_schedule(10, 3.0, 1.0)
    assert [float(sched(t)) for t in (0, 5, 10, 20)] == pytest.approx([3.0] * 4)

  @pytest.mark.parametrize(
      "total,beta0,beta_max",
      [(0, 1.0, 200.0), (-5, 1.0, 200.0), (10, 0.0, 200.0), (10, -1.0, 200.0), (10, 1.0, 0.5)],
  )
  def test_invalid_arguments_raise(self, total, beta0, beta_max):
    with pytest.raises(ValueError):
      gates.beta_schedule(total, beta0, beta_max)
