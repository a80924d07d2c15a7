"""masked_optimizer: pruned weights stay exactly zero under every optimizer (the seed scenario, spec §10).

spec §10: with stale momentum/Adam state or weight decay, a zero gradient does not mean a zero update, so pruned
weights drift. The wrapper masks gradients, resets state where masks change and masks updates.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxprune
from jaxprune.optim import MaskedState, masked_optimizer, masks_from_state

KERNELS = ("dense1", "dense2")
X = jax.random.normal(jax.random.PRNGKey(1), (64, 6))
Y = jnp.sin(X @ jax.random.normal(jax.random.PRNGKey(2), (6, 3)))


def init_params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"dense1": {"kernel": jax.random.normal(k1, (6, 16)) * 0.5, "bias": jnp.full((16,), 0.1, jnp.float32)},
          "dense2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.5, "bias": jnp.zeros((3,))}}


def loss_fn(params):
  h = jnp.tanh(X @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - Y) ** 2)


def kernels_only(params):
  return {name: {"kernel": True, "bias": False} for name in params}


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "rmsprop_momentum": lambda: optax.rmsprop(1e-3, momentum=0.9),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
    "chain_clip_decay_sgd": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2),
                                                optax.sgd(0.05, momentum=0.9)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, 300), weight_decay=0.05),
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3).gradient_transformation(),
    "optax_masked_decay": lambda: optax.chain(optax.masked(optax.add_decayed_weights(0.1), kernels_only),
                                              optax.adam(1e-2)),
    "multi_transform": lambda: optax.multi_transform(
        {"adam": optax.adam(1e-2), "sgd": optax.sgd(0.05, momentum=0.9)},
        {"dense1": {"kernel": "adam", "bias": "sgd"}, "dense2": {"kernel": "sgd", "bias": "adam"}}),
}


@functools.cache
def wrapped(name):
  """One wrapped instance per optimizer, so tests share its compiled training loop."""
  return masked_optimizer(OPTIMIZERS[name]())


def pruned_drift(params, masks):
  """max |param| over pruned entries."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.where(masks[n]["kernel"], 0.0, params[n]["kernel"])))
                            for n in KERNELS]))


def _loop(step, params, state, masks, steps):
  """`steps` (traced: no recompilation per length) updates; returns params, state and the largest pruned drift
  seen after any of them."""
  def body(_, carry):
    params, state, worst = carry
    params, state = step(params, state, masks)
    return params, state, jnp.maximum(worst, pruned_drift(params, masks))
  return jax.lax.fori_loop(0, steps, body, (params, state, jnp.float32(0)))


@functools.partial(jax.jit, static_argnums=0)
def train(opt, params, state, masks, steps):
  """Updates with the wrapper, passing `masks` every time."""
  def step(params, state, masks):
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params, masks=masks)
    return optax.apply_updates(params, updates), state
  return _loop(step, params, state, masks, steps)


@functools.partial(jax.jit, static_argnums=0)
def train_naive(opt, params, state, masks, steps):
  """The classic recipe: zero the pruned gradients, call the plain optimizer."""
  def step(params, state, masks):
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), jax.grad(loss_fn)(params), masks)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return _loop(step, params, state, masks, steps)


@jax.jit
def l1_prune(params, amount):
  return jaxprune.prune(params, "l1_unstructured", amount=amount)


def warm_then_prune(opt, amount=0.6, warm=30):
  """Dense training for `warm` steps (state builds up), then an L1 prune that zeroes the pruned weights."""
  params = init_params()
  state = opt.init(params)
  all_true = jaxprune.init_masks(params)
  params, state, _ = train(opt, params, state, all_true, warm)
  masks = l1_prune(params, jnp.float32(amount))
  return jaxprune.apply_masks(params, masks), state, masks


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adamw"])
def test_naive_gradient_zeroing_lets_pruned_weights_drift(name):
  """The seed scenario's failure: with warm state or weight decay, zeroed gradients still move pruned weights."""
  opt = OPTIMIZERS[name]()
  params = init_params()
  state = opt.init(params)
  params, state, _ = train_naive(opt, params, state, jaxprune.init_masks(params), 30)
  masks = l1_prune(params, jnp.float32(0.6))
  _, _, drift = train_naive(opt, jaxprune.apply_masks(params, masks), state, masks, 50)
  assert float(drift) > 1e-3


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_for_hundreds_of_steps(name):
  opt = wrapped(name)
  params, state, masks = warm_then_prune(opt)
  before = loss_fn(params)
  trained, _, drift = train(opt, params, state, masks, 300)
  assert float(drift) == 0.0, f"pruned weights moved, by up to {float(drift)}"
  # Not vacuous: the live weights trained.
  assert float(loss_fn(trained)) < float(before)
  live_moved = jnp.abs(jnp.where(masks["dense1"]["kernel"], trained["dense1"]["kernel"] - params["dense1"]["kernel"],
                                 0.0))
  assert float(live_moved.max()) > 1e-3


def test_wrapper_inside_multisteps_and_masks_held_in_state():
  """MultiSteps(masked_optimizer(adam)): masks given once at construction, held in the state, never passed."""
  params = init_params()
  masks = l1_prune(params, jnp.float32(0.5))
  opt = optax.MultiSteps(masked_optimizer(optax.adam(1e-2), masks), every_k_schedule=2).gradient_transformation()
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(40):
    params, state = step(params, state)
  assert float(pruned_drift(params, masks)) == 0.0
  chex.assert_trees_all_equal(masks_from_state(state), masks)


def param_shaped_state_leaves(state, params):
  """(path, leaf, kernel name) for every state leaf shaped like a kernel: an independent walk over the state."""
  shapes = {params[n]["kernel"].shape: n for n in KERNELS}
  return [(jax.tree_util.keystr(path), leaf, shapes[leaf.shape])
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)
          if hasattr(leaf, "shape") and leaf.shape in shapes and leaf.dtype != jnp.bool_]


@pytest.mark.parametrize("name", ["adam", "sgd_nesterov", "inject_hyperparams", "multi_steps",
                                  "optax_masked_decay", "rmsprop_momentum", "multi_transform"])
def test_state_of_newly_pruned_entries_is_zero_after_the_mask_change(name):
  opt = wrapped(name)
  params = init_params()
  state = opt.init(params)
  params, state, _ = train(opt, params, state, jaxprune.init_masks(params), 31)
  leaves = param_shaped_state_leaves(state.inner_state, params)
  assert leaves and all(float(jnp.abs(leaf).min()) > 0 for _, leaf, _ in leaves), "no warm state to reset"
  masks = l1_prune(params, jnp.float32(0.5))
  _, state, _ = train(opt, params, state, masks, 1)
  for path, leaf, kernel in param_shaped_state_leaves(state.inner_state, params):
    pruned = ~masks[kernel]["kernel"]
    assert float(jnp.abs(jnp.where(pruned, leaf, 0.0)).max()) == 0.0, path
    assert float(jnp.abs(jnp.where(pruned, 0.0, leaf)).max()) > 0.0, path


def test_adafactor_factored_state_is_left_alone_but_updates_are_masked():
  """Factored second moments (row/column statistics) cannot be reset per entry; updates still are masked."""
  opt = wrapped("adafactor")
  params, state, masks = warm_then_prune(opt)
  factored = [leaf for leaf in jax.tree.leaves(state.inner_state) if leaf.shape in ((6,), (16,))]
  assert factored
  _, state, drift = train(opt, params, state, masks, 5)
  assert float(drift) == 0.0


def test_regrown_entries_start_from_fresh_zero_state():
  """Entries that come back (mask 0 -> 1) get the state a fresh optimizer would give them after one step."""
  opt = wrapped("adam")
  params, state, masks = warm_then_prune(opt, amount=0.5)
  params, state, _ = train(opt, params, state, masks, 10)
  regrow = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, params["dense1"]["kernel"].shape)
  regrown = regrow & ~masks["dense1"]["kernel"]
  assert int(regrown.sum()) > 0
  new_masks = {**masks, "dense1": {**masks["dense1"], "kernel": masks["dense1"]["kernel"] | regrow}}
  grads = jax.grad(loss_fn)(params)
  _, state, _ = train(opt, params, state, new_masks, 1)
  fresh_adam = optax.adam(1e-2)
  _, fresh = fresh_adam.update(grads, fresh_adam.init(params), params)
  for ours, theirs in ((state.inner_state[0].mu, fresh[0].mu), (state.inner_state[0].nu, fresh[0].nu)):
    # Equal up to float rounding (the wrapper's gradient is computed inside its compiled loop).
    np.testing.assert_allclose(np.asarray(ours["dense1"]["kernel"])[regrown],
                               np.asarray(theirs["dense1"]["kernel"])[regrown], rtol=1e-5, atol=1e-9)


_STEP_OPT = masked_optimizer(optax.adamw(1e-2, weight_decay=0.1))


@jax.jit
def _one_step(params, state, masks):
  updates, state = _STEP_OPT.update(jax.grad(loss_fn)(params), state, params, masks=masks)
  return optax.apply_updates(params, updates), state


@given(seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=6), density=st.floats(0.05, 0.95),
       steps_between=st.integers(1, 4))
def test_invariants_hold_under_any_sequence_of_mask_changes(seeds, density, steps_between):
  """Property: whatever masks arrive (pruning and regrowth mixed), after every update pruned params are exactly 0
  and every param-shaped state leaf is exactly 0 at pruned entries."""
  params = init_params()
  state = _STEP_OPT.init(params)
  for seed in seeds:
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    masks = {n: {"kernel": jax.random.bernoulli(k, density, params[n]["kernel"].shape), "bias": jaxprune.UNMASKED}
             for n, k in zip(KERNELS, keys)}
    for _ in range(steps_between):
      params, state = _one_step(params, state, masks)
      assert float(pruned_drift(params, masks)) == 0.0
      for path, leaf, kernel in param_shaped_state_leaves(state.inner_state, params):
        assert float(jnp.abs(jnp.where(masks[kernel]["kernel"], 0.0, leaf)).max()) == 0.0, path


def test_torch_semantics_leaves_the_optimizer_alone():
  """torch semantics: the wrapper is transparent (spec §10: torch's optimizer sees weight_orig and its gradient)."""
  inner = optax.sgd(0.05, momentum=0.9)
  params = init_params()
  masks = l1_prune(params, jnp.float32(0.5))
  opt = masked_optimizer(inner, masks, semantics="torch")
  state, ref_state = opt.init(params), inner.init(params)
  for _ in range(3):
    grads = jax.grad(lambda p: loss_fn(jaxprune.apply_masks(p, masks)))(params)
    updates, state = opt.update(grads, state, params)
    ref_updates, ref_state = inner.update(grads, ref_state, params)
    chex.assert_trees_all_equal(updates, ref_updates)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(state.inner_state, ref_state)


def test_masks_from_state_finds_the_masks_at_any_depth():
  params = init_params()
  masks = l1_prune(params, jnp.float32(0.3))
  opt = optax.chain(optax.clip(1.0), optax.MultiSteps(masked_optimizer(optax.adam(1e-3), masks), 2)
                    .gradient_transformation())
  chex.assert_trees_all_equal(masks_from_state(opt.init(params)), masks)
  with pytest.raises(ValueError, match="found 0"):
    masks_from_state(optax.adam(1e-3).init(params))


def test_bad_masks_name_the_leaf():
  params = init_params()
  opt = masked_optimizer(optax.adam(1e-3))
  state = opt.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  good = jaxprune.init_masks(params)
  wrong_shape = {**good, "dense2": {**good["dense2"], "kernel": jnp.ones((3, 16), bool)}}
  with pytest.raises(ValueError, match=r"dense2/kernel.*bool array of the param's shape \(16, 3\)"):
    opt.update(grads, state, params, masks=wrong_shape)
  as_float = {**good, "dense1": {**good["dense1"], "kernel": jnp.ones((6, 16))}}
  with pytest.raises(ValueError, match=r"dense1/kernel.*astype\(bool\)"):
    opt.update(grads, state, params, masks=as_float)
  new_layout = {**good, "dense1": {**good["dense1"], "bias": jnp.ones((16,), bool)}}
  with pytest.raises(ValueError, match=r"dense1/bias.*fixed when the state is initialised"):
    opt.update(grads, state, params, masks=new_layout)
  with pytest.raises(ValueError, match="mirror the params"):
    opt.update(grads, state, params, masks={"dense1": good["dense1"]})
  with pytest.raises(ValueError, match="needs `params`"):
    opt.update(grads, state)
  with pytest.raises(ValueError, match="semantics"):
    masked_optimizer(optax.adam(1e-3), semantics="pytorch")
  with pytest.raises(ValueError, match="dense1/kernel"):
    masked_optimizer(optax.adam(1e-3), {**good, "dense1": {**good["dense1"], "kernel": jnp.ones(3, bool)}}).init(params)


def test_state_is_a_namedtuple_with_the_masks():
  params = init_params()
  state = masked_optimizer(optax.sgd(0.1)).init(params)
  assert isinstance(state, MaskedState)
  chex.assert_trees_all_equal(state.masks, jaxprune.init_masks(params))


def test_non_finite_pruned_params_land_on_zero_with_the_select():
  """inf or NaN in a pruned entry: `p + (-p)` is NaN, so jaxprune.apply_updates selects exactly 0.0 there,
  and leaves live entries as optax.apply_updates would."""
  params = {"w": jnp.array([[jnp.inf, -jnp.inf], [jnp.nan, 2.0]], jnp.float32)}
  masks = {"w": jnp.array([[False, False], [False, True]])}
  opt = jaxprune.masked_optimizer(optax.adam(0.1), masks)
  state = opt.init(params)
  grads = {"w": jnp.ones((2, 2), jnp.float32)}
  updates, state = opt.update(grads, state, params)
  new = jaxprune.apply_updates(params, updates, masks)
  np.testing.assert_array_equal(new["w"], [[0.0, 0.0], [0.0, optax.apply_updates(params, updates)["w"][1, 1]]])
  assert not np.signbit(np.asarray(new["w"])[~np.asarray(masks["w"])]).any()
  added = optax.apply_updates(params, updates)["w"]
  assert np.isnan(np.asarray(added)[0, 0])  # why the select is needed: inf + (-inf)
