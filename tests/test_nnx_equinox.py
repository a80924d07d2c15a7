"""Flax NNX states and equinox modules as params: paths as users write them, plain bool masks, training that keeps
pruned weights exactly 0.0 (nnx.Optimizer; eqx.filter_value_and_grad with masked_optimizer)."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune

NNX_KERNELS = {"l1/kernel": (4, 8), "blocks/0/kernel": (8, 8), "l2/kernel": (8, 3)}
X = jax.random.normal(jax.random.key(1), (16, 4))
Y = jax.random.normal(jax.random.key(2), (16, 3))


class Net(nnx.Module):
  """Two Linear layers around a list of one: attribute names and a list index in the paths."""

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.l1(x))
    x = jax.nn.relu(self.blocks[0](x))
    return self.l2(x)


def _params() -> nnx.State:
  return nnx.state(Net(nnx.Rngs(0)), nnx.Param)


def _names(tree) -> list[str]:
  return [jaxprune.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _masked_names(params, masks) -> set[str]:
  report = jaxprune.sparsity_report(params, masks)
  return {leaf.path for leaf in report.leaves if leaf.masked}


def _at(tree, name: str):
  for key in name.split("/"):
    tree = tree[int(key) if key.isdigit() else key]
  return tree


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _mask_leaves(masks) -> list:
  # Stop at Variables: a mask wrapped in nnx.Param must show up as the Param, not as the array inside it.
  return jax.tree.leaves(masks, is_leaf=_is_variable)


def _pruned(masks) -> int:
  return sum(int(np.size(m) - np.sum(m)) for m in _mask_leaves(masks) if jaxprune.is_masked(m))


def test_nnx_state_paths_read_as_users_write_them():
  params = _params()
  names = set(_names(params))  # from the raw flatten, whose last key is the Variable's .value
  assert names == {"l1/kernel", "l1/bias", "blocks/0/kernel", "blocks/0/bias", "l2/kernel", "l2/bias"}
  masks = jaxprune.init_masks(params, where="kernel$")
  assert _masked_names(params, masks) == set(NNX_KERNELS)
  assert set(_names(masks)) == names
  report = jaxprune.sparsity_report(params, masks)
  assert {leaf.path for leaf in report.leaves} == names
  assert "value" not in str(report)


def test_plain_dict_paths_keep_a_value_key():
  params = {"value": jnp.ones((2, 2)), "layer": {"value": jnp.ones((2, 2))}}
  assert _names(params) == ["layer/value", "value"]
  assert _masked_names(params, jaxprune.init_masks(params, where="value$")) == {"layer/value", "value"}


def test_nnx_masks_are_a_state_of_plain_bool_arrays():
  params = _params()
  masks = jaxprune.global_unstructured(params, 40, where="kernel$")
  assert isinstance(masks, nnx.State)
  leaves = _mask_leaves(masks)
  assert len(leaves) == 6 and not any(_is_variable(m) for m in leaves)
  for name, shape in NNX_KERNELS.items():
    mask = _at(masks, name)
    assert mask.dtype == jnp.bool_ and mask.shape == shape
  assert _at(masks, "l1/bias") is jaxprune.UNMASKED
  assert _pruned(masks) == 40
  # The same ranking as on the plain dict of the same arrays: the NNX state changes names, not the selection.
  reference = jaxprune.global_unstructured(nnx.to_pure_dict(params), 40, where="kernel$")
  for name in NNX_KERNELS:
    np.testing.assert_array_equal(_at(masks, name), _at(reference, name))
  # Local pruning, and masks= given back as they came out.
  local = jaxprune.prune(params, "l1_unstructured", amount=0.5, where="kernel$")
  again = jaxprune.prune(params, "l1_unstructured", amount=0.5, masks=local, where="kernel$")
  for name, shape in NNX_KERNELS.items():
    n = int(np.prod(shape))
    assert int(np.sum(~_at(local, name))) == round(0.5 * n)
    assert int(np.sum(~_at(again, name))) == round(0.5 * n) + round(0.5 * (n - round(0.5 * n)))


def test_apply_masks_and_make_permanent_keep_the_params_in_their_variables():
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.global_unstructured(params, 40, where="kernel$")
  applied = jaxprune.apply_masks(params, masks)
  assert isinstance(_at(applied, "l1/kernel"), nnx.Param)
  nnx.update(model, applied)
  for name in NNX_KERNELS:
    kernel, mask = np.asarray(_at(nnx.state(model, nnx.Param), name)[...]), np.asarray(_at(masks, name))
    np.testing.assert_array_equal(kernel[~mask], 0.0)
    np.testing.assert_array_equal(kernel[mask], np.asarray(_at(params, name)[...])[mask])
  permanent, left = jaxprune.make_permanent(params, masks)
  assert isinstance(_at(permanent, "l2/kernel"), nnx.Param)
  np.testing.assert_array_equal(_at(permanent, "l2/kernel")[...], _at(applied, "l2/kernel")[...])
  assert all(m is jaxprune.UNMASKED for m in _mask_leaves(left))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _eqx_loss(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)  # an equinox module maps one example


def test_nnx_optimizer_trains_and_pruned_kernels_stay_exactly_zero():
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  total = sum(int(np.prod(s)) for s in NNX_KERNELS.values())
  masks = jaxprune.global_unstructured(params, 0.6, where="kernel$")
  assert _pruned(masks) == round(0.6 * total)
  nnx.update(model, jaxprune.apply_masks(params, masks))
  optimizer = nnx.Optimizer(model, jaxprune.masked_optimizer(optax.adam(1e-2), masks), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  before = {name: np.asarray(_at(nnx.state(model, nnx.Param), name)[...]) for name in NNX_KERNELS}
  losses = [float(step(model, optimizer, X, Y)) for _ in range(5)]
  assert losses[-1] < losses[0]
  zeros = 0
  for name in NNX_KERNELS:
    kernel, mask = np.asarray(_at(nnx.state(model, nnx.Param), name)[...]), np.asarray(_at(masks, name))
    np.testing.assert_array_equal(kernel[~mask], 0.0)
    assert np.any(kernel[mask] != before[name][mask])  # the live weights train (a dead ReLU's do not)
    zeros += int(np.sum(kernel == 0.0))
  assert zeros == round(0.6 * total)


def test_nnx_optimizer_with_scheduled_pruning_prunes_each_kernel_to_the_target():
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, jaxprune.scheduled_pruning(optax.adam(1e-2), lambda step: 0.5, where="kernel$"),
                            wrt=nnx.Param)
  for _ in range(2):
    optimizer.update(model, nnx.grad(_loss)(model, X, Y))
  for name, shape in NNX_KERNELS.items():
    kernel = np.asarray(_at(nnx.state(model, nnx.Param), name)[...])
    assert int(np.sum(kernel == 0.0)) == round(0.5 * np.prod(shape)), name


def test_equinox_mlp_is_pruned_by_readable_paths_and_trains_with_pruned_weights_at_zero():
  model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  assert _names(params) == ["layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias",
                            "layers/2/weight", "layers/2/bias"]
  weights = 8 * 4 + 8 * 8 + 3 * 8
  masks = jaxprune.global_unstructured(params, 0.75)  # the default where: the 2-d weights, not the biases
  assert _masked_names(params, masks) == {"layers/0/weight", "layers/1/weight", "layers/2/weight"}
  assert _pruned(masks) == round(0.75 * weights)
  assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks) if jaxprune.is_masked(m))
  by_name = jaxprune.global_unstructured(params, 0.75, where="weight$")
  # The whole module, activation functions included: the functions are leaves no `where` picks.
  whole = jaxprune.global_unstructured(model, 0.75)
  for layer in range(3):
    np.testing.assert_array_equal(by_name.layers[layer].weight, masks.layers[layer].weight)
    np.testing.assert_array_equal(whole.layers[layer].weight, masks.layers[layer].weight)

  # A pytree of amounts shaped like the params is an equinox module too, not a function (path, leaf) -> amount.
  amounts = jax.tree.map(lambda x: 0.5 if x.ndim == 2 else None, params)
  local = jaxprune.prune(params, "l1_unstructured", amount=amounts)
  assert [int(np.sum(~layer.weight)) for layer in local.layers] == [16, 32, 12]
  assert all(layer.bias is jaxprune.UNMASKED for layer in local.layers)

  params = jaxprune.apply_masks(params, masks)
  opt = jaxprune.masked_optimizer(optax.adam(1e-2), masks)  # an equinox module, callable yet not a function
  state = opt.init(params)

  @eqx.filter_jit
  def step(params, state):
    loss, grads = eqx.filter_value_and_grad(_eqx_loss)(eqx.combine(params, static), X, Y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  zeros = 0
  for layer in range(3):
    weight, mask = np.asarray(params.layers[layer].weight), np.asarray(masks.layers[layer].weight)
    np.testing.assert_array_equal(weight[~mask], 0.0)
    zeros += int(np.sum(weight == 0.0))
  assert zeros == round(0.75 * weights)


def test_masked_optimizer_takes_the_mask_module_of_equinox_params():
  params = eqx.filter(eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0)), eqx.is_array)
  masks = jaxprune.global_unstructured(params, 0.75)
  state = jaxprune.masked_optimizer(optax.adam(1e-2), masks).init(params)
  assert jaxprune.masks_from_state(state) is masks
