"""Pruning sharded models (issue 6): masks shard like their params, results equal the one-device ones bit for bit,
and only counts cross devices.

conftest gives 8 simulated CPU devices. The meshes are a 1-D ``model`` mesh of 8 and a 2-D ``data x model`` mesh
of 2 x 4, with auto axes (the ``jax.sharding.Mesh`` / pjit style); two tests use explicit axes, the default of
``jax.make_mesh`` in this JAX. Leaves are sharded along their leading, trailing and middle axes, and along both
mesh axes at once. Weights are rounded to one decimal so that many tie at every threshold: the lowest-position-first
tie rule (spec §4) must hold across shards and leaves, not just within one array.

The one-device reference is the same jaxprune call, jitted, on params on the default device. Compiled programs
are cached per (computation, mesh): the collective checks inspect the very program whose masks were compared.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxprune
from jaxprune import schedules
from jaxprune.sharding import Collective, abstract, collectives, shard_like

MESHES = {"1d": ((8,), ("model",)), "2d": ((2, 4), ("data", "model"))}

# Specs written for the 2-D mesh; on the 1-D mesh the `data` axis does not exist and is dropped.
SPECS = {"conv": {"kernel": P(None, None, "data", "model"), "bias": P("model")},
         "dense1": {"kernel": P("data", "model"), "bias": P("model")},
         "dense2": {"kernel": P("model", "data"), "bias": P()}}

KEY = jax.random.PRNGKey(0)
PRUNERS = {  # name: params -> masks. Every kernel's trailing axis is sharded on `model`.
    "global": lambda p: jaxprune.global_unstructured(p, 0.7),
    "global_rounds": lambda p: jaxprune.global_unstructured(  # spec §6: pruned entries neither count nor compete
        p, 0.5, masks=jaxprune.global_unstructured(p, 1000),
        importance_scores=jax.tree.map(lambda x: jnp.round(jnp.cos(7 * x), 1), p)),
    "l1_unstructured": lambda p: jaxprune.prune(p, "l1_unstructured", amount=0.3),
    "random_unstructured": lambda p: jaxprune.prune(p, "random_unstructured", amount=0.4, key=KEY),
    "ln_structured_sharded_axis": lambda p: jaxprune.prune(p, "ln_structured", amount=0.5, n=2, axis=-1),
    "ln_structured_leading_axis": lambda p: jaxprune.prune(p, "ln_structured", amount=3, n=1, axis=0),
    "random_structured": lambda p: jaxprune.prune(p, "random_structured", amount=0.5, axis=-1, key=KEY),
    "nm_structured_2_4": lambda p: jaxprune.prune(p, "nm_structured", n=2, m=4, axis=-1),
}


@functools.cache
def params():
  """Params on the default device."""
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(np.round(rng.standard_normal(shape), 1).astype(np.float32))
  return {"conv": {"kernel": w(3, 3, 8, 32), "bias": w(32)},
          "dense1": {"kernel": w(64, 32), "bias": w(32)},
          "dense2": {"kernel": w(32, 16), "bias": w(16)}}


def make_mesh(name, axis_type=AxisType.Auto):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes))


def shardings(mesh):
  keep = lambda axis: axis if axis in mesh.axis_names else None
  return jax.tree.map(lambda spec: NamedSharding(mesh, P(*map(keep, spec))), SPECS,
                      is_leaf=lambda x: isinstance(x, P))


@functools.cache
def placed(mesh_name):
  """The params sharded over the mesh."""
  return jax.device_put(params(), shardings(make_mesh(mesh_name)))


@pytest.fixture(scope="module", params=sorted(MESHES))
def mesh_name(request):
  return request.param


@functools.cache
def reference(name):
  return jax.jit(PRUNERS[name])(params())


@functools.cache
def sharded_pruner(name, mesh_name):
  """``PRUNERS[name]`` jitted with its masks pinned to the params' shardings (the documented pattern)."""
  like = abstract(placed(mesh_name))
  return jax.jit(lambda p: shard_like(PRUNERS[name](p), like))


def assert_sharded_like(tree, like):
  """Every per-entry leaf of ``tree`` (a mask, a moment) has its param's sharding; unmasked scalars are free."""
  def check(x, p):
    if jaxprune.is_masked(x, p):
      assert x.shape == p.shape
      assert x.sharding.is_equivalent_to(p.sharding, x.ndim), f"{x.sharding} != {p.sharding}"
  jax.tree.map(check, tree, like)


def assert_only_counts_cross_devices(jitted, *args):
  """Only all-reduces of integer counts (histograms, tie counts) or of float vectors smaller than any pruned
  leaf (partial per-channel norms) cross devices: no all-gather, all-to-all or permute moves the params."""
  smallest = min(x.size for x in jax.tree.leaves(params()) if x.ndim >= 2)
  for c in collectives(jitted, *args):
    assert c.op == "all-reduce", f"{c} moves params across devices"
    assert c.dtype[0] in "su" or np.prod(c.shape) < smallest, f"{c} is as big as a param"


def test_collectives_sees_a_gather_and_a_reduction():
  """The HLO reader behind the 'only counts cross devices' checks finds what a known program exchanges."""
  mesh = make_mesh("2d")
  x = jax.device_put(jnp.ones((8, 12), jnp.float32), NamedSharding(mesh, P("data", "model")))
  gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
  assert {c.op for c in collectives(gather, x)} == {"all-gather"}
  reduce = jax.jit(lambda x: jnp.sum(x > 0, dtype=jnp.int32))
  assert collectives(reduce, x) and all(c == Collective("all-reduce", "s32", ()) for c in collectives(reduce, x))
  assert Collective("all-reduce", "s32", (65537,)).nbytes == 4 * 65537
  assert Collective("all-gather", "pred", (8, 12)).nbytes == 96


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_sharded_masks_equal_one_device_and_shard_like_params(mesh_name, name):
  """Global (spec §6) and local methods, structured ones along a sharded axis too: the sharded program gives the
  one-device masks exactly, ties across shards included, each mask sharded like its param."""
  masks = sharded_pruner(name, mesh_name)(placed(mesh_name))
  chex.assert_trees_all_equal(masks, reference(name))
  assert_sharded_like(masks, placed(mesh_name))


@functools.cache
def _global_with_amount(mesh_name):
  like = abstract(placed(mesh_name))
  return jax.jit(lambda p, amount: shard_like(jaxprune.global_unstructured(p, amount), like))


_global_reference = jax.jit(jaxprune.global_unstructured)


@pytest.mark.parametrize("amount", [0.5, 0.9, 1234])
def test_global_amount_is_traced_on_shards(mesh_name, amount):
  """A traced amount, as a sparsity schedule feeds it: one program for every fraction, exact for each."""
  masks = _global_with_amount(mesh_name)(placed(mesh_name), amount)
  chex.assert_trees_all_equal(masks, _global_reference(params(), amount))
  assert_sharded_like(masks, placed(mesh_name))


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruning_moves_only_counts_across_devices(mesh_name, name):
  """The compiled SPMD program exchanges histograms and partial per-channel norms, never the params."""
  assert_only_counts_cross_devices(sharded_pruner(name, mesh_name), placed(mesh_name))


def test_global_masks_come_out_sharded_like_params_without_a_constraint(mesh_name):
  """The ranking is elementwise in each leaf's own shape (nothing is flattened), so sharding propagation alone
  places every mask like its param."""
  sharded = placed(mesh_name)
  assert_sharded_like(jax.jit(PRUNERS["global"])(sharded), sharded)


def test_global_pruning_on_explicit_mesh_axes():
  """With explicit axes the masks' type carries the params' sharding, no constraint needed."""
  mesh = make_mesh("2d", AxisType.Explicit)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params(), shardings(mesh))
    masks = jax.jit(PRUNERS["global"])(sharded)
  chex.assert_trees_all_equal(masks, reference("global"))
  assert_sharded_like(masks, sharded)


def test_shard_like_reshards_explicit_mesh_axes():
  """Explicit axes change only through `reshard`; shard_like uses it, eagerly and under jit (where a traced param
  carries its sharding in its type)."""
  mesh = make_mesh("2d", AxisType.Explicit)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params(), shardings(mesh))
    eager = shard_like(jaxprune.init_masks(params()), sharded)
    traced = jax.jit(lambda p: shard_like(jaxprune.init_masks(p), p))(sharded)
  for masks in (eager, traced):
    chex.assert_trees_all_equal(masks, jaxprune.init_masks(params()))
    assert_sharded_like(masks, sharded)


def test_shard_like_asks_for_abstract_params_on_auto_axes_under_jit():
  """A traced auto-sharded param does not know its sharding: say what to pass instead of guessing."""
  with pytest.raises(TypeError, match="jaxprune.sharding.abstract"):
    jax.jit(lambda p: shard_like(jaxprune.init_masks(p), p))(placed("2d"))


def test_init_masks_are_born_sharded(mesh_name):
  """Each device allocates only its own block of each mask: no mask is ever whole on one device."""
  sharded = placed(mesh_name)
  masks = jaxprune.init_masks(sharded)
  chex.assert_trees_all_equal(masks, jaxprune.init_masks(params()))
  assert_sharded_like(masks, sharded)
  for mask, param in zip(jax.tree.leaves(masks), jax.tree.leaves(sharded)):
    if jaxprune.is_masked(mask, param):
      assert {s.data.shape for s in mask.addressable_shards} == {param.sharding.shard_shape(param.shape)}


def test_shard_like_reaches_param_state_inside_optimizer_state(mesh_name):
  """Masks, Adam's mu/nu and rewind weights mirror the params and get their shardings; the rest is left alone."""
  from jaxprune.optim_pruning import scheduled_pruning
  sharded = placed(mesh_name)
  opt = scheduled_pruning(optax.adam(1e-2), 0.5, "global_unstructured", rewind_step=0)
  state = opt.init(params())
  placed_state = shard_like(state, sharded)
  chex.assert_trees_all_equal(placed_state, state)
  adam = placed_state.inner_state.inner_state[0]
  for tree in (placed_state.inner_state.masks, adam.mu, adam.nu, placed_state.rewind_params):
    assert_sharded_like(tree, sharded)
  assert placed_state.count is state.count and adam.count is state.inner_state.inner_state[0].count


def loss(p):
  # Elementwise in each weight, so gradients are bit-identical however the weights are sharded.
  return sum(jnp.sum(jnp.sin(3 * x) * x) for x in jax.tree.leaves(p))


@functools.partial(jax.jit, static_argnums=0)
def train_step(opt, p, state):
  updates, state = opt.update(jax.grad(loss)(p), state, p)
  return optax.apply_updates(p, updates), state


def run(opt, p, steps):
  """``steps`` jitted updates from a state sharded like ``p``; returns the params and the state."""
  state = shard_like(opt.init(p), p)
  for _ in range(steps):
    p, state = train_step(opt, p, state)
  return p, state


def test_masked_optimizer_with_sharded_params_and_state(mesh_name):
  """spec §10: pruned weights stay exactly 0 on every shard; state stays sharded like the params across steps,
  and the step itself moves nothing across devices."""
  from jaxprune.optim import masked_optimizer
  sharded = placed(mesh_name)
  opt = masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), reference("global"))
  new, state = run(opt, sharded, 3)
  chex.assert_trees_all_equal((new, state), run(opt, params(), 3))
  assert_sharded_like(new, sharded)
  adam = state.inner_state[0]
  for tree in (state.masks, adam.mu, adam.nu):
    assert_sharded_like(tree, sharded)
  assert_only_counts_cross_devices(train_step, opt, new, state)


def test_scheduled_global_pruning_with_sharded_params_and_state(mesh_name):
  """Gradual global pruning under jit: the pruning steps reuse one program and give the one-device masks."""
  from jaxprune.optim_pruning import scheduled_pruning
  sharded = placed(mesh_name)
  opt = scheduled_pruning(optax.sgd(0.1, momentum=0.9), schedules.polynomial(0.8, begin=0, end=4),
                          "global_unstructured")
  # Two programs: the initial state holds NumPy UNMASKED scalars and one-device counters, jit's outputs hold
  # replicated arrays in their place.
  new, state = run(opt, sharded, 2)
  compiled = train_step._cache_size()
  for _ in range(3):  # three more pruning steps, at rising sparsities
    new, state = train_step(opt, new, state)
  assert train_step._cache_size() == compiled
  chex.assert_trees_all_equal((new, state), run(opt, params(), 5))
  assert_sharded_like(new, sharded)
  assert_sharded_like(state.inner_state.masks, sharded)
  assert_sharded_like(state.inner_state.inner_state[0].trace, sharded)


def test_what_crosses_devices_does_not_grow_with_the_leaf_count():
  """One histogram of all shards of all leaves per pass: 2 or 24 leaves exchange the very same collectives."""
  mesh = make_mesh("2d")
  rng = np.random.default_rng(3)

  def exchanged(n_leaves):
    params = {f"w{i:02d}": jax.device_put(jnp.asarray(np.round(rng.standard_normal((16, 8)), 1), jnp.float32),
                                          NamedSharding(mesh, P("data", "model") if i % 2 else P("model", None)))
              for i in range(n_leaves)}
    found = collectives(jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5)), params)
    assert all(c.op == "all-reduce" for c in found)
    return sorted(found)

  assert exchanged(2) == exchanged(24)
