"""scheduled_pruning (lock semantics): exact sparsity at every step, one compilation per run, lottery-ticket rewinding.

Counts follow torch's rounding of a fraction (spec §2.2: round half to even of the double product) applied to the
cumulative target; pruned units never come back (spec §5.2, container semantics).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import schedules
from jaxprune.optim import masks_from_state
from jaxprune.optim_pruning import ScheduledPruningState, scheduled_pruning

X = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
Y = jnp.sin(X @ jax.random.normal(jax.random.PRNGKey(2), (8, 4)))
SCHEDULE = schedules.polynomial(0.85, begin=2, end=30, frequency=4, initial_sparsity=0.1)
STEPS = 36


def init_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"dense1": {"kernel": jax.random.normal(k1, (8, 24)) * 0.5, "bias": jnp.full((24,), 0.1, jnp.float32)},
          "dense2": {"kernel": jax.random.normal(k2, (24, 4)) * 0.5, "bias": jnp.zeros((4,))}}


def loss_fn(params):
  h = jnp.tanh(X @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - Y) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 3))
def run(opt, params, state, steps):
  """`steps` updates; returns params, state, and per step the masks and the largest |param| at pruned entries."""
  def body(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    params = optax.apply_updates(params, updates)
    masks = masks_from_state(state)
    drift = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.where(m, 0.0, p)))
                               for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)) if m.ndim]))
    kernels = {name: masks[name]["kernel"] for name in masks}
    return (params, state), (kernels, drift)
  (params, state), (history, drift) = jax.lax.scan(body, (params, state), None, length=steps)
  return params, state, history, drift


@functools.partial(jax.jit, static_argnums=0)
def train(opt, params, state, steps):
  """`steps` updates, with `steps` traced so that every length shares one compilation."""
  def body(_, carry):
    params, state = carry
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state
  return jax.lax.fori_loop(0, steps, body, (params, state))


def pruned_units(mask, unit):
  """Pruned entries, channels along `unit[1]`, or blocks of shape `unit[1]`, counted in NumPy."""
  mask = np.asarray(mask)
  kind, arg = unit
  if kind == "entries":
    return int((~mask).sum())
  if kind == "channels":
    other = tuple(d for d in range(mask.ndim) if d != arg % mask.ndim)
    return int((~mask.any(axis=other)).sum())
  tiled = mask.reshape(mask.shape[0] // arg[0], arg[0], mask.shape[1] // arg[1], arg[1])
  return int((~tiled.any(axis=(1, 3))).sum())


def total_units(shape, unit):
  kind, arg = unit
  if kind == "entries":
    return int(np.prod(shape))
  if kind == "channels":
    return shape[arg]
  return (shape[0] // arg[0]) * (shape[1] // arg[1])


def expected(t, n):
  """torch's count for a fraction: Python's round() of the double product (spec §2.2)."""
  return round(float(SCHEDULE(t)) * n)


CASES = {
    "l1_unstructured": ({}, ("entries", None)),
    "random_unstructured": ({"key": jax.random.PRNGKey(7)}, ("entries", None)),
    "ln_structured": ({"n": 2, "axis": -1}, ("channels", -1)),
    "random_structured": ({"axis": 0, "key": jax.random.PRNGKey(7)}, ("channels", 0)),
    "block_structured": ({"block_shape": (2, 2)}, ("blocks", (2, 2))),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_local_schedule_hits_exact_sparsity_at_every_step(method):
  kwargs, unit = CASES[method]
  opt = scheduled_pruning(optax.adam(1e-2), SCHEDULE, method, **kwargs)
  params = init_params()
  _, _, history, drift = run(opt, params, opt.init(params), STEPS)
  assert float(drift.max()) == 0.0
  for name in history:
    shape = params[name]["kernel"].shape
    n = total_units(shape, unit)
    got = [pruned_units(history[name][t], unit) for t in range(STEPS)]
    assert got == [expected(t, n) for t in range(STEPS)], name
    # Pruned units never come back.
    assert np.all(np.asarray(history[name][1:]) <= np.asarray(history[name][:-1]))


def test_global_schedule_hits_exact_sparsity_across_leaves():
  opt = scheduled_pruning(optax.sgd(0.05, momentum=0.9), SCHEDULE, jaxprune.global_unstructured)
  params = init_params()
  _, _, history, drift = run(opt, params, opt.init(params), STEPS)
  assert float(drift.max()) == 0.0
  n = sum(params[name]["kernel"].size for name in history)
  for t in range(STEPS):
    assert sum(int((~np.asarray(history[name][t])).sum()) for name in history) == expected(t, n)
  # Global: the layers end up with different sparsities (one ranking), unlike local pruning.
  final = [float((~np.asarray(history[name][-1])).mean()) for name in sorted(history)]
  assert final[0] != final[1]


def test_a_budget_gives_each_layer_its_own_exact_share_of_the_schedule():
  """budget=budgets.erk: at every step each kernel holds exactly its ERK count for the schedule's target."""
  opt = scheduled_pruning(optax.adam(1e-2), SCHEDULE, "l1_unstructured", budget=jaxprune.budgets.erk)
  params = init_params()
  _, _, history, drift = run(opt, params, opt.init(params), STEPS)
  assert float(drift.max()) == 0.0
  for t in range(STEPS):
    want = jaxprune.budgets.counts(params, jaxprune.budgets.erk(params, SCHEDULE(t)))
    assert {name: int((~np.asarray(history[name][t])).sum()) for name in history} == \
        {name: int(want[name]["kernel"]) for name in history}, t
  final = [float((~np.asarray(history[name][-1])).mean()) for name in sorted(history)]
  assert final[0] != final[1]  # ERK: the wider layer ends sparser
  with pytest.raises(ValueError, match="budget"):
    scheduled_pruning(optax.sgd(0.1), SCHEDULE, "global_unstructured", budget=jaxprune.budgets.erk)


def test_where_selects_the_pruned_leaves():
  opt = scheduled_pruning(optax.adam(1e-2), 0.5, where="dense1/kernel")
  params = init_params()
  masks = masks_from_state(opt.init(params))
  assert jaxprune.is_masked(masks["dense1"]["kernel"]) and not jaxprune.is_masked(masks["dense2"]["kernel"])
  _, state = train(opt, params, opt.init(params), 1)
  assert int((~masks_from_state(state)["dense1"]["kernel"]).sum()) == params["dense1"]["kernel"].size // 2


def test_starting_masks_count_toward_the_target_and_stay_pruned():
  """A model pruned before (30%) and scheduled to 50%: 20% more, the old pruned entries among the pruned."""
  params = init_params()
  start = jaxprune.prune(params, "random_unstructured", key=jax.random.PRNGKey(5), amount=0.3)
  opt = scheduled_pruning(optax.adam(1e-2), 0.5, masks=start)
  _, state = train(opt, jaxprune.apply_masks(params, start), opt.init(params), 1)
  masks = masks_from_state(state)
  for name in params:
    assert int((~masks[name]["kernel"]).sum()) == round(0.5 * params[name]["kernel"].size)
    assert not bool(jnp.any(masks[name]["kernel"] & ~start[name]["kernel"]))


def test_the_jitted_training_loop_compiles_once_for_the_whole_schedule():
  """A Python loop over a jitted step through every sparsity level: one trace, one XLA compilation."""
  opt = scheduled_pruning(optax.adamw(1e-2), SCHEDULE, "global_unstructured")
  traces = []

  def train_step(params, state):
    traces.append(1)
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(train_step)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(kw.get("fun_name"))
      if event == "/jax/core/compile/backend_compile_duration" else None)
  params = init_params()
  state = opt.init(params)
  sparsities = set()
  for _ in range(STEPS):
    params, state = step(params, state)
    sparsities.add(round(float(jnp.mean(~masks_from_state(state)["dense1"]["kernel"])), 4))
  assert len(sparsities) >= 8  # the run went through many sparsity levels...
  assert len(traces) == 1 and compiles.count("jit(train_step)") == 1  # ...with one compilation


def test_pruning_step_zeroes_new_weights_and_their_optimizer_state():
  opt = scheduled_pruning(optax.adam(1e-2), schedules.one_shot(0.6, step=5))
  params = init_params()
  params, state = train(opt, params, opt.init(params), 5)
  assert float(jnp.abs(params["dense1"]["kernel"]).min()) > 0
  params, state = train(opt, params, state, 1)
  masks = masks_from_state(state)
  adam = state.inner_state.inner_state[0]
  for name in ("dense1", "dense2"):
    pruned = ~masks[name]["kernel"]
    assert int(pruned.sum()) == round(0.6 * params[name]["kernel"].size)
    for leaf in (params[name]["kernel"], adam.mu[name]["kernel"], adam.nu[name]["kernel"]):
      assert float(jnp.abs(jnp.where(pruned, leaf, 0.0)).max()) == 0.0


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_lottery_ticket_rewinding(rewind_step):
  """After every pruning round the params are the rewind point's, masked (Frankle & Carbin); they train between."""
  schedule = schedules.iterative(0.4, every=6, begin=5, rounds=2)
  opt = scheduled_pruning(optax.adam(1e-2), schedule, rewind_step=rewind_step)
  params = init_params()
  state = opt.init(params)
  if rewind_step:
    params, state = train(opt, params, state, rewind_step)
  ticket = params
  params, state = train(opt, params, state, 5 - rewind_step)
  assert not np.allclose(params["dense1"]["kernel"], ticket["dense1"]["kernel"])  # it trained
  for _ in range(2):  # the two rounds, at steps 5 and 11
    params, state = train(opt, params, state, 1)
    masks = masks_from_state(state)
    for name in params:
      for leaf in ("kernel", "bias"):
        kept = np.asarray(masks[name][leaf]) | np.zeros(params[name][leaf].shape, bool)
        # Rewound through an update, p + (ticket - p): equal up to one rounding; pruned entries exactly 0.
        np.testing.assert_allclose(np.asarray(params[name][leaf])[kept], np.asarray(ticket[name][leaf])[kept],
                                   rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(params[name][leaf])[~kept] == 0.0)
    params, state = train(opt, params, state, 5)
  assert isinstance(state, ScheduledPruningState)


def test_torch_semantics_rewinds_weight_orig_entirely_and_keeps_pruned_values():
  opt = scheduled_pruning(optax.sgd(0.05, momentum=0.9), schedules.one_shot(0.5, step=4), rewind_step=0,
                          semantics="torch")
  params = ticket = init_params()
  params, state = train(opt, params, opt.init(params), 5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), params, ticket)
  assert int((~masks_from_state(state)["dense1"]["kernel"]).sum()) == params["dense1"]["kernel"].size // 2


@pytest.mark.parametrize("make,error,message", [
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, "nm_structured"), ValueError, "takes an amount"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, jaxprune.identity), ValueError, "takes an amount"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, amount=0.3), TypeError, "from the schedule"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, "random_unstructured"), TypeError, "PRNG `key`"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, rewind_step=-1), ValueError, "rewind_step"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, semantics="strict"), ValueError, "semantics"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, "ln_structured", n=2).init(init_params()), KeyError,
     "dense1/kernel"),
    (lambda: scheduled_pruning(optax.sgd(0.1), 0.5, "ln_structured", n=2, axis=5).init(init_params()), IndexError,
     "dense1/kernel"),
])
def test_bad_configuration_is_reported_early(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_update_without_params_or_with_masks_is_an_error():
  opt = scheduled_pruning(optax.sgd(0.1), 0.5)
  params = init_params()
  with pytest.raises(ValueError, match="needs `params`"):
    opt.update(params, opt.init(params))
  with pytest.raises(TypeError, match="computes the masks itself"):
    opt.update(params, opt.init(params), params, masks=jaxprune.init_masks(params))
