"""LSQ (Esser et al., ICLR 2020) against float64 numpy versions of its equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax.quantizers import lsq


def _reference(v, s, qn, qp):
  """Eqs. (1)-(3) of the LSQ paper in float64: the quantized weight, its
  gradient w.r.t. ``v`` (straight through inside the range, 0 outside) and
  w.r.t. ``s`` (``-v/s + round(v/s)`` inside, ``-Q_N``/``Q_P`` outside),
  the latter times ``g = 1/sqrt(N Q_P)``, for the loss ``sum(v_hat * c)``."""
  x = v / s
  v_hat = np.round(np.clip(x, -qn, qp)) * s
  inside = (x > -qn) & (x < qp)
  dv = np.where(inside, 1.0, 0.0)
  ds = np.where(inside, -x + np.round(x), np.where(x <= -qn, -qn, qp))
  return v_hat, dv, ds / np.sqrt(v.size * qp)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_forward_and_gradients_equal_the_paper(bits):
  rng = np.random.default_rng(bits)
  v = rng.normal(size=(3, 3, 4, 6)) * 0.1
  c = rng.normal(size=v.shape)
  w = lsq.init_from_float(jnp.asarray(v, jnp.float32), bits)
  s = float(w.step)
  q = 2.0**bits - 1
  v_hat, dv, ds = _reference(v, s, q, q)
  np.testing.assert_allclose(np.asarray(lsq.materialize(w)), v_hat, rtol=1e-5, atol=1e-7)
  grads = jax.grad(lambda w: jnp.sum(lsq.materialize(w) * jnp.asarray(c, jnp.float32)))(w)
  np.testing.assert_allclose(np.asarray(grads.latent), dv * c, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(grads.step), np.sum(ds * c), rtol=1e-4, atol=1e-6)


def test_init_step_and_integer_grid():
  """Sec. 2.1: ``s = 2 <|v|> / sqrt(Q_P)``; the weight is ``s`` times integers in ``[-Q, Q]``."""
  v = np.random.default_rng(0).normal(size=(64, 10))
  w = lsq.init_from_float(jnp.asarray(v, jnp.float32), 3)
  np.testing.assert_allclose(float(w.step), 2 * np.abs(v).mean() / np.sqrt(7.0), rtol=1e-6)
  q = np.asarray(lsq.integer_weights(w))
  assert q.min() >= -7 and q.max() <= 7 and len(np.unique(q)) > 8
  np.testing.assert_allclose(np.asarray(lsq.materialize(w)), q * float(w.step), rtol=1e-6, atol=1e-7)
  assert int(lsq.precision(w)) == 3
  with pytest.raises(ValueError, match="LSQ bits"):
    lsq.init_from_float(jnp.ones((2, 2)), 0)
