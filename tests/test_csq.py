"""CSQ bit-level parameterization, Eqs. (3)-(6), against plain numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csq_jax import quantizers
from csq_jax.quantizers import csq
from csq_jax.quantizers.csq import CSQWeight


# ---------------------------------------------------------------- references


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_materialize(pos, neg, mask, scale, beta, mode, hard=False):
  """Eqs. (3)-(5) written as an explicit loop over bit planes, in float64."""
  pos, neg, mask = (np.asarray(a, np.float64) for a in (pos, neg, mask))
  n = pos.shape[0]
  f = (lambda m: (m >= 0).astype(np.float64)) if hard else (lambda m: np_sigmoid(beta * m))
  out = np.zeros(pos.shape[1:], np.float64)
  for b in range(n):
    if mode == "none":
      sel = 1.0  # Eq. (3)
    elif mode == "frozen":
      sel = float(mask[b] >= 0)  # Eq. (4)
    else:
      sel = f(mask[b])  # Eq. (5)
    out = out + (f(pos[b]) - f(neg[b])) * (2.0**b) * sel
  return float(scale) / (2.0**n - 1.0) * out


def ref_integers(pos, neg, mask, mode):
  pos, neg, mask = (np.asarray(a) for a in (pos, neg, mask))
  q = np.zeros(pos.shape[1:], np.int64)
  for b in range(pos.shape[0]):
    sel = 1 if mode == "none" else int(mask[b] >= 0)
    q += ((pos[b] >= 0).astype(np.int64) - (neg[b] >= 0).astype(np.int64)) * (2**b) * sel
  return q


def make_weight(seed, n_bits=4, shape=(3, 5), mask=None, mode="learned", scale=0.7):
  rng = np.random.default_rng(seed)
  pos = rng.normal(0, 2, (n_bits,) + shape).astype(np.float32)
  neg = rng.normal(0, 2, (n_bits,) + shape).astype(np.float32)
  if mask is None:
    mask = rng.normal(0, 1, (n_bits,)).astype(np.float32)
  return CSQWeight(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(mask, jnp.float32),
                   jnp.asarray(scale, jnp.float32), mode)


MASK5 = np.array([-1.0, 1.5, 0.0, 2.0, -3.0], np.float32)  # bits 1, 2, 3 selected


# ---------------------------------------------------------------- Eqs. 3-5


class MaterializeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_learned_mask_eq5(self):
    for beta in (0.5, 1.0, 4.0):
      w = make_weight(0, n_bits=5, mask=MASK5)
      got = self.variant(lambda w, b: csq.materialize(w, b))(w, beta)
      ref = ref_materialize(w.pos_logits, w.neg_logits, w.mask_logits, w.scale, beta, "learned")
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_frozen_mask_eq4(self):
    beta = 2.0
    w = make_weight(1, n_bits=5, mask=MASK5, mode="frozen")
    got = self.variant(lambda w: csq.materialize(w, beta))(w)
    ref = ref_materialize(w.pos_logits, w.neg_logits, w.mask_logits, w.scale, beta, "frozen")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    # It differs from the soft (Eq. 5) weight: the hard mask is really applied.
    soft = ref_materialize(w.pos_logits, w.neg_logits, w.mask_logits, w.scale, beta, "learned")
    assert np.max(np.abs(ref - soft)) > 1e-2

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_mask_eq3(self):
    beta = 1.5
    # All mask logits negative: with mode "none" every bit is still used.
    w = make_weight(2, n_bits=4, mask=-np.ones(4, np.float32), mode="none")
    got = self.variant(lambda w: csq.materialize(w, beta))(w)
    ref = ref_materialize(w.pos_logits, w.neg_logits, w.mask_logits, w.scale, beta, "none")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(ref)) > 1e-2

  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_materialize_all_modes(self):
    for mode in ("learned", "frozen", "none"):
      w = make_weight(3, n_bits=5, mask=MASK5, mode=mode)
      got = self.variant(lambda w: csq.materialize(w, 1.0, hard=True))(w)
      ref = ref_materialize(w.pos_logits, w.neg_logits, w.mask_logits, w.scale, None, mode,
                            hard=True)
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)



def _mask_grad(w, beta=2.0):
  g = jnp.asarray(np.random.default_rng(9).normal(size=w.shape), jnp.float32)
  return jax.grad(lambda m: jnp.sum(csq.materialize(w.replace(mask_logits=m), beta) * g))(
      w.mask_logits)


def test_frozen_mask_gets_no_gradient():
  w = make_weight(5, n_bits=5, mask=MASK5, mode="frozen")
  np.testing.assert_array_equal(np.asarray(_mask_grad(w)), np.zeros(5))
  # Sanity: the same parameters with a learned mask do get a gradient.
  assert np.all(np.abs(np.asarray(_mask_grad(w.replace(mask_mode="learned")))) > 0)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["learned", "frozen", "none"])
def test_hard_weight_is_exact_integer_grid(mode):
  n = 5
  w = make_weight(6, n_bits=n, shape=(8, 5), mask=MASK5, mode=mode)
  wq = np.asarray(csq.materialize(w, 1.0, hard=True), np.float64)
  q = wq * (2.0**n - 1.0) / float(w.scale)
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  ints = np.asarray(csq.integer_weights(w))
  assert ints.dtype == np.int32
  np.testing.assert_array_equal(np.round(q).astype(np.int64), ints)
  np.testing.assert_array_equal(ints, ref_integers(w.pos_logits, w.neg_logits, w.mask_logits,
                                                   mode))
  np.testing.assert_array_equal(np.asarray(quantizers.integer_weights(w)), ints)
  selected = list(range(n)) if mode == "none" else [1, 2, 3]
  assert np.all(np.abs(ints) <= sum(2**b for b in selected))
  assert np.all(ints % (2 ** min(selected)) == 0)
  if mode != "none":
    assert np.any(ints != 0)
    assert np.all(ints % 2 == 0)  # bit 0 is masked off


def test_precision_counts_selected_bits():
  rng = np.random.default_rng(7)
  for _ in range(10):
    n = int(rng.integers(1, 9))
    k = int(rng.integers(0, n + 1))
    mask = np.concatenate([rng.uniform(0.0, 3.0, k), rng.uniform(-3.0, -0.01, n - k)])
    mask = rng.permutation(mask).astype(np.float32)
    for mode in ("learned", "frozen"):
      w = make_weight(0, n_bits=n, shape=(2,), mask=mask, mode=mode)
      p = csq.precision(w)
      assert p.dtype == jnp.int32
      assert int(p) == k
      assert int(quantizers.precision(w)) == k
    assert int(csq.precision(make_weight(0, n_bits=n, shape=(2,), mask=mask, mode="none"))) == n


def test_precision_counts_zero_logit_as_selected():
  w = make_weight(0, n_bits=3, shape=(2,), mask=np.array([0.0, -1e-6, 0.0], np.float32))
  assert int(csq.precision(w)) == 2


# ---------------------------------------------------------------- initialization


def _kernel(seed=0, shape=(3, 3, 2, 4)):
  k = np.random.default_rng(seed).normal(0, 0.3, shape).astype(np.float32)
  k.flat[0] = 0.0
  k.flat[1] = -np.max(np.abs(k)) * 1.5  # the max-abs entry is negative
  return k


# Jitted once per (shape, n_bits): much cheaper than compiling every op eagerly.
init_from_float = jax.jit(csq.init_from_float, static_argnames=("n_bits", "mask_mode"))
init_random = jax.jit(csq.init_random,
                      static_argnames=("shape", "fan_in", "n_bits", "logit_init", "mask_mode"))


@pytest.mark.parametrize("n_bits", [3, 8])
def test_init_from_float_hard_is_rounded_kernel(n_bits):
  k = _kernel(n_bits)
  w = init_from_float(k, n_bits=n_bits)
  csq.check_shapes(w)
  assert w.n_bits == n_bits and w.shape == k.shape and w.mask_mode == "learned"
  levels = np.float32(2.0**n_bits - 1.0)
  s = np.max(np.abs(k))
  q = np.round(np.abs(k) / s * levels)
  ref = q * np.sign(k) * (s / levels)
  got = np.asarray(csq.materialize(w, 1.0, hard=True))
  np.testing.assert_array_equal(got, ref.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(csq.integer_weights(w)), (q * np.sign(k)).astype(int))
  assert float(w.scale) == s
  np.testing.assert_array_equal(np.asarray(w.mask_logits), np.zeros(n_bits))
  assert int(csq.precision(w)) == n_bits


@pytest.mark.parametrize("beta,logit_init,off_logit", [(1.0, 2.0, -2.0), (0.3, 2.0, -2.0), (5.0, 0.5, -0.5),
                                                      (1.0, 1.0, 0.0), (3.0, 1.0, 0.0)])
def test_init_from_float_soft_value(beta, logit_init, off_logit):
  k = _kernel(1)
  w = init_from_float(k, n_bits=8, logit_init=logit_init, off_logit=off_logit)
  hard = np.asarray(csq.materialize(w, beta, hard=True), np.float64)
  soft = np.asarray(csq.materialize(w, beta), np.float64)
  # Mask logits are 0 => mask gate sigmoid(0) = 0.5; each set bit contributes
  # sigmoid(b L) - sigmoid(b off), every other bit sigmoid(b off) - sigmoid(b off) = 0.
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  expected = (sig(beta * logit_init) - sig(beta * off_logit)) * 0.5 * hard
  np.testing.assert_allclose(soft, expected, rtol=1e-5, atol=1e-7)
  assert np.max(np.abs(hard)) > 0


def test_init_from_float_logits_and_zero_kernel():
  # Eager (not jitted) on purpose: the public call as the transform makes it.
  k = np.zeros((3, 3, 2, 4), np.float32)
  k[0, 0, 0, :4] = [0.5, -0.25, 0.0, 1.0]
  w = csq.init_from_float(k, 3, logit_init=3.0)  # every other logit at 0, as the authors' ini2bit
  pos, neg = np.asarray(w.pos_logits), np.asarray(w.neg_logits)
  assert set(np.unique(np.concatenate([pos.ravel(), neg.ravel()]))) == {0.0, 3.0}
  # q = round(|k| * 7): 0.5 -> 4 (3.5, half to even), 0.25 -> 2 (1.75), 0 -> 0, 1 -> 7.
  ints = np.asarray(csq.integer_weights(w))
  np.testing.assert_array_equal(ints[0, 0, 0], [4, -2, 0, 7])
  assert np.count_nonzero(ints) == 3
  # The sign plane holds the bits of q; the other plane is all off.
  np.testing.assert_array_equal(pos[:, 0, 0, 0, 0] > 0, [False, False, True])  # 4 = 0b100
  np.testing.assert_array_equal(neg[:, 0, 0, 0, 1] > 0, [False, True, False])  # -2
  np.testing.assert_array_equal(neg[:, 0, 0, 0, 0], [0.0] * 3)
  assert not np.any((pos > 0) & (neg > 0))

  z = csq.init_from_float(np.zeros((3, 3, 2, 4), np.float32), 3)
  assert float(z.scale) == 1.0
  np.testing.assert_array_equal(np.asarray(csq.materialize(z, 1.0, hard=True)), 0.0)
  assert np.all(np.isfinite(np.asarray(csq.materialize(z, 1.0))))


@pytest.mark.parametrize("shape,fan_in,impl", [((6, 4), 6, "threefry2x32"),
                                               ((3, 3, 2, 4), 18, "rbg")])
def test_init_random_he_std(shape, fan_in, impl):
  w = init_random(jax.random.key(0, impl=impl), shape, fan_in, n_bits=6, logit_init=2.0)
  csq.check_shapes(w)
  assert w.shape == shape and w.n_bits == 6 and w.mask_mode == "learned"
  pos = np.asarray(w.pos_logits)
  assert np.all(np.abs(pos) <= 2.0) and np.std(pos) > 0.5
  wt = np.asarray(csq.materialize(w, 1.0), np.float64)
  np.testing.assert_allclose(np.std(wt), np.sqrt(2.0 / fan_in), rtol=1e-3)
  other = init_random(jax.random.key(1, impl=impl), shape, fan_in, n_bits=6, logit_init=2.0)
  assert not np.allclose(np.asarray(other.pos_logits), pos)


def test_invalid_mask_mode_raises():
  with pytest.raises(ValueError):
    csq.init_from_float(np.ones((2, 2), np.float32), 4, mask_mode="bogus")
  with pytest.raises(ValueError):
    csq.init_random(jax.random.key(0), (2, 2), 2, mask_mode="bogus")
  with pytest.raises(ValueError):
    csq.with_mask_mode(make_weight(0), "bogus")
  assert csq.with_mask_mode(make_weight(0), "frozen").mask_mode == "frozen"


def test_check_shapes_catches_bad_mask():
  w = make_weight(0, n_bits=4)
  csq.check_shapes(w)
  with pytest.raises(AssertionError):
    csq.check_shapes(w.replace(mask_logits=jnp.zeros((3,))))
  with pytest.raises(AssertionError):
    csq.check_shapes(w.replace(neg_logits=jnp.zeros((4, 3, 4))))


# ---------------------------------------------------------------- regularizer


def test_mask_regularizer_eq6():
  w = make_weight(0, n_bits=5, mask=MASK5)
  for beta in (0.5, 3.0):
    expected = np.sum(np_sigmoid(beta * MASK5.astype(np.float64)))
    np.testing.assert_allclose(float(csq.mask_regularizer(w, beta)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(quantizers.mask_regularizer(w, beta)), expected, rtol=1e-6)
    for mode in ("frozen", "none"):
      assert float(csq.mask_regularizer(w.replace(mask_mode=mode), beta)) == 0.0
      assert float(quantizers.mask_regularizer(w.replace(mask_mode=mode), beta)) == 0.0


# ---------------------------------------------------------------- pytree


def test_pytree_has_four_array_leaves_and_static_mode():
  w = make_weight(0, n_bits=4, shape=(3, 5), mode="frozen")
  leaves = jax.tree.leaves(w)
  assert len(leaves) == 4
  assert sorted(l.shape for l in leaves) == sorted([(4, 3, 5), (4, 3, 5), (4,), ()])
  # Place values are constants: nothing of shape [n_bits] but the mask.
  assert sum(1 for l in leaves if l.shape == (4,)) == 1
  doubled = jax.tree.map(lambda x: x * 2, w)
  assert isinstance(doubled, CSQWeight) and doubled.mask_mode == "frozen"
  assert jax.tree.structure(w) != jax.tree.structure(w.replace(mask_mode="learned"))
  np.testing.assert_array_equal(np.asarray(csq.place_values(4)), [1.0, 2.0, 4.0, 8.0])


# ---------------------------------------------------------------- gradients


def test_gradients_match_analytic_formula_and_finite_differences():
  n, beta, s = 3, 1.7, 0.9
  w = make_weight(11, n_bits=n, shape=(2, 3), mask=np.array([0.4, -0.8, 1.2], np.float32),
                  scale=s)
  g = np.random.default_rng(12).normal(size=(2, 3))
  loss = lambda w: jnp.sum(csq.materialize(w, beta) * jnp.asarray(g, jnp.float32))
  grads = jax.grad(loss)(w)

  p, m_n, m = (np.asarray(a, np.float64) for a in (w.pos_logits, w.neg_logits, w.mask_logits))
  sp, sn, sm = np_sigmoid(beta * p), np_sigmoid(beta * m_n), np_sigmoid(beta * m)
  c = s / (2.0**n - 1.0)
  places = 2.0 ** np.arange(n)
  exp_pos = c * g[None] * (places * sm)[:, None, None] * beta * sp * (1 - sp)
  exp_neg = -c * g[None] * (places * sm)[:, None, None] * beta * sn * (1 - sn)
  exp_mask = c * places * beta * sm * (1 - sm) * np.sum(g[None] * (sp - sn), axis=(1, 2))
  exp_scale = np.sum(g * ref_materialize(p, m_n, m, 1.0, beta, "learned"))
  np.testing.assert_allclose(np.asarray(grads.pos_logits), exp_pos, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads.neg_logits), exp_neg, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads.mask_logits), exp_mask, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(grads.scale), exp_scale, rtol=1e-4)

  # Central finite differences of the float64 numpy reference w.r.t. pos_logits.
  eps = 1e-5
  fd = np.zeros_like(p)
  for idx in np.ndindex(p.shape):
    hi, lo = p.copy(), p.copy()
    hi[idx] += eps
    lo[idx] -= eps
    fd[idx] = (np.sum(g * ref_materialize(hi, m_n, m, s, beta, "learned"))
               - np.sum(g * ref_materialize(lo, m_n, m, s, beta, "learned"))) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grads.pos_logits), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mask_mode", ["learned", "frozen", "none"])
@pytest.mark.parametrize("n_bits", [1, 4, 8])
def test_custom_gradient_equals_autodiff_of_plain_eq5(mask_mode, n_bits):
  """The memory-saving custom VJP of ``materialize`` against JAX autodiff of a
  direct transcription of Eq. (5), for every parameter and for beta."""
  rng = np.random.default_rng(n_bits)
  shape = (3, 3, 2, 4)
  w = csq.CSQWeight(
      jnp.asarray(rng.normal(size=(n_bits,) + shape), jnp.float32),
      jnp.asarray(rng.normal(size=(n_bits,) + shape), jnp.float32),
      jnp.asarray(rng.normal(size=(n_bits,)), jnp.float32),
      jnp.asarray(0.7, jnp.float32),
      mask_mode,
  )
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def plain(w, beta):
    sig = lambda x: 1.0 / (1.0 + jnp.exp(-beta * x))
    if mask_mode == "learned":
      mask = sig(w.mask_logits)
    elif mask_mode == "frozen":
      mask = (jax.lax.stop_gradient(w.mask_logits) >= 0).astype(jnp.float32)
    else:
      mask = jnp.ones(n_bits)
    planes = (sig(w.pos_logits) - sig(w.neg_logits)) * (2.0 ** jnp.arange(n_bits) * mask).reshape(-1, 1, 1, 1, 1)
    return w.scale / (2.0**n_bits - 1) * planes.sum(0)

  loss = lambda f: (lambda w, beta: jnp.sum(f(w, beta) * g))
  got = jax.grad(loss(csq.materialize), argnums=(0, 1))(w, jnp.float32(3.0))
  want = jax.grad(loss(plain), argnums=(0, 1))(w, jnp.float32(3.0))
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(csq.materialize(w, 3.0), plain(w, 3.0), rtol=1e-5, atol=1e-6)


def test_with_min_bits_switches_on_the_largest_mask_logits_of_a_pruned_layer():
  w = csq.init_from_float(jnp.ones((3, 4)), 8, 1.0, "learned")
  pruned = w.replace(mask_logits=jnp.array([-3.0, -0.5, -2.0, -0.1, -4.0, -1.0, -5.0, -0.2]))
  assert int(csq.precision(pruned)) == 0
  one = csq.with_min_bits(pruned, 1)
  np.testing.assert_array_equal(np.asarray(one.mask_logits >= 0), np.arange(8) == 3)
  two = csq.with_min_bits(pruned, 2)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(two.mask_logits >= 0)), [3, 7])
  kept = w.replace(mask_logits=jnp.array([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]))
  np.testing.assert_array_equal(csq.with_min_bits(kept, 1).mask_logits, kept.mask_logits)
  np.testing.assert_array_equal(csq.with_min_bits(pruned, 0).mask_logits, pruned.mask_logits)
