"""SET and RigL (jaxprune.sparse_training): live count per layer constant across updates, dropped and regrown
entries exactly 0 with zero Adam state at the step they return, one compilation for a whole run; the drop and
grow step against numpy; the dense gradient evaluated on update steps only; the straight-through estimators."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from jaxprune import budgets, sparse_training

PERIOD, END, STEPS = 3, 21, 24


@pytest.fixture(scope="module")
def problem():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"l1": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.zeros(16)},
            "l2": {"kernel": jax.random.normal(k[1], (16, 4)), "bias": jnp.zeros(4)}}
  x = jax.random.normal(k[2], (32, 8))
  y = jax.random.normal(k[3], (32, 4))

  def loss(p, xb=x):
    h = jnp.tanh(xb @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

  # random masks at an ERK budget, drawn in numpy (budgets.prune_to is tested in test_budgets)
  rng = np.random.default_rng(1)
  counts = budgets.counts(params, budgets.erk(params, 0.8))
  masks = jax.tree.map(lambda x, n: jaxprune.UNMASKED if n is None else
                       jnp.asarray(rng.permutation(x.size) >= n).reshape(x.shape), params, counts)
  return jaxprune.apply_masks(params, masks), masks, loss


def _run(opt, params, loss, **update_args):
  """Runs STEPS jitted steps; returns per step (masks before, masks after, params after, state after) and the
  number of traces and compiled executables of the step."""
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    updates, s = opt.update(jax.grad(loss)(p), s, p, **update_args)
    return optax.apply_updates(p, updates), s

  state, p, history = opt.init(params), params, []
  for _ in range(STEPS):
    before = jaxprune.masks_from_state(state)
    p, state = step(p, state)
    history.append((before, jaxprune.masks_from_state(state), p, state))
  return history, len(traces), step._cache_size()


def _kernels(tree):
  return [np.asarray(tree[name]["kernel"]) for name in ("l1", "l2")]


@pytest.mark.parametrize("make", [
    lambda m: jaxprune.set_training(optax.adam(1e-2), m, key=jax.random.key(2), update_period=PERIOD, end=END),
    lambda m: jaxprune.rigl(optax.adam(1e-2), m, update_period=PERIOD, end=END,
                            drop_fraction=optax.cosine_decay_schedule(0.5, END)),
], ids=["set", "rigl"])
def test_live_counts_hold_and_regrown_weights_start_at_zero_with_zero_adam_state(problem, make):
  params, masks, loss = problem
  history, traces, compiled = _run(make(masks), params, loss)
  assert traces == 1 and compiled == 1  # a schedule-driven run: one trace, one executable
  live = [m.sum() for m in _kernels(masks)]
  changed_steps = 0
  for t, (before, after, p, state) in enumerate(history):
    mu, nu = (_kernels(optax.tree_utils.tree_get(state, name)) for name in ("mu", "nu"))
    for old, new, w, m, v, n in zip(_kernels(before), _kernels(after), _kernels(p), mu, nu, live):
      assert new.sum() == n  # exact sparsity per layer at every step
      assert np.all(w[~new] == 0) and np.all(m[~new] == 0) and np.all(v[~new] == 0)  # dropped: 0, no state
      grown = new & ~old
      assert np.all(w[grown] == 0) and np.all(m[grown] == 0) and np.all(v[grown] == 0)  # grown: 0, fresh state
      if grown.any():
        assert t < END and t % PERIOD == 0
        changed_steps += 1
    if t % PERIOD and t > 0:  # between updates the masks do not move
      assert all(np.array_equal(a, b) for a, b in zip(_kernels(before), _kernels(after)))
  assert changed_steps >= END // PERIOD  # both layers change at most update steps
  assert np.any(np.asarray(history[-1][2]["l2"]["bias"]) != 0)  # unmasked leaves train too


def reference_drop_and_grow(w, mask, g, fraction):
  """Numpy: drop the k = round(f * live) live entries of smallest |w|, then grow the k entries of largest |g|
  among the inactive ones; ties by lowest flat position in both selections."""
  live = int(mask.sum())
  k = int(np.round(np.float64(np.float32(fraction)) * live))
  order = np.argsort(np.where(mask, np.abs(w), np.inf).ravel(), kind="stable")
  kept = mask.ravel().copy()
  kept[order[:k]] = False
  grow = np.argsort(np.where(kept, -np.inf, -np.abs(g).ravel()), kind="stable")  # largest first, stable
  grow = [i for i in grow if not kept[i]][:k]
  kept[grow] = True
  return kept.reshape(mask.shape)


_rigl_step = jax.jit(lambda w, m, g, f: sparse_training.drop_and_grow(
    w, m, ~jaxprune.selection.sortable_keys(jnp.abs(g)), f))  # RigL's growth keys: largest |g| first


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0.0, 1.0))
def test_drop_and_grow_matches_numpy(seed, fraction):
  rng = np.random.default_rng(seed)
  w, g = (rng.integers(-3, 4, (6, 8)).astype(np.float32) for _ in range(2))  # many ties, on purpose
  mask = rng.random((6, 8)) < 0.4
  got = np.asarray(_rigl_step(w, mask, g, jnp.float32(fraction)))
  np.testing.assert_array_equal(got, reference_drop_and_grow(w, mask, g, fraction))
  assert got.sum() == mask.sum()


def test_rigl_without_skip_and_with_a_dense_gradient_callback(problem):
  params, masks, loss = problem
  calls = []

  def dense_grads():  # a host callback counts the evaluations: only on update steps
    grads = jax.grad(loss)(jaxprune.apply_masks(params, masks))
    jax.debug.callback(lambda: calls.append(1))
    return grads

  opt = jaxprune.rigl(optax.adam(1e-2, b1=0.9, b2=0.999), masks, update_period=PERIOD, end=END,
                      skip_gradients=False)
  history, traces, _ = _run(opt, params, loss, dense_grads=dense_grads)
  jax.effects_barrier()
  assert traces == 1 and len(calls) == len(range(0, END, PERIOD))
  _, first_mask, _, state = history[0]
  grown = [new & ~old for old, new in zip(_kernels(masks), _kernels(first_mask))]
  assert any(g.any() for g in grown)
  # the step was applied with the new masks: grown entries got Adam's first moments from zero state (g0 comes from
  # another compiled program than the step's gradient, so both moments are compared at a few float32 ulps)
  g0 = _kernels(jax.grad(loss)(params))
  mu, nu = (_kernels(optax.tree_utils.tree_get(state, name)) for name in ("mu", "nu"))
  for grown_l, g_l, mu_l, nu_l in zip(grown, g0, mu, nu):
    np.testing.assert_allclose(mu_l[grown_l], 0.1 * g_l[grown_l], rtol=1e-5)
    np.testing.assert_allclose(nu_l[grown_l], 0.001 * g_l[grown_l] ** 2, rtol=1e-5)


def test_straight_through_and_sr_ste():
  w = jnp.arange(-8.0, 8.0).reshape(4, 4)
  masks = {"w": jaxprune.nm_structured(w, 2, 4), "b": jaxprune.UNMASKED}
  params = {"w": w, "b": jnp.ones(4)}
  c = jnp.linspace(1.0, 2.0, 16).reshape(4, 4)
  for decay in (0.0, 0.5):
    f = lambda p: jnp.sum(c * jaxprune.straight_through(p, masks, decay=decay)["w"]) + jnp.sum(p["b"])  # noqa
    value, grads = jax.value_and_grad(f)(params)
    assert value == pytest.approx(float(jnp.sum(c * jnp.where(masks["w"], w, 0))) + 4)
    np.testing.assert_allclose(grads["w"], c + decay * np.where(masks["w"], 0, w), rtol=1e-6)
    np.testing.assert_array_equal(grads["b"], np.ones(4))


def test_arguments_are_checked(problem):
  params, masks, _ = problem
  with pytest.raises(ValueError, match="grow"):
    sparse_training.dynamic_sparse(optax.sgd(0.1), masks, grow="magnitude")
  with pytest.raises(TypeError, match="key"):
    sparse_training.dynamic_sparse(optax.sgd(0.1), masks, grow="random")
  with pytest.raises(ValueError, match="update_period"):
    jaxprune.rigl(optax.sgd(0.1), masks, update_period=0)
  opt = jaxprune.rigl(optax.sgd(0.1), masks)
  state = opt.init(params)
  with pytest.raises(TypeError, match="masks"):
    opt.update(params, state, params, masks=masks)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state)
