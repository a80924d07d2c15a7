"""Mask pytrees beside params: selection, local pruning, apply/make_permanent (torch's remove), custom methods."""
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune

import jaxprune
from torch_oracle import holder

PARAMS = {
    "conv1": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 6)), "bias": jnp.ones(6)},
    "norm": {"scale": jnp.ones(6)},
    "head": {"kernel": jax.random.normal(jax.random.key(1), (24, 10)), "bias": jnp.zeros(10)},
}


def test_default_where_selects_kernels_and_unmasked_leaves_cost_nothing():
  masks = jaxprune.init_masks(PARAMS)
  assert masks["conv1"]["bias"] is jaxprune.UNMASKED and masks["norm"]["scale"] is jaxprune.UNMASKED
  chex.assert_shape(masks["head"]["kernel"], (24, 10))
  assert masks["head"]["kernel"].dtype == jnp.bool_
  # The structure mirrors params, so a plain tree_map over both works.
  jax.tree.map(lambda p, m: p * m, PARAMS, masks)
  assert not jaxprune.is_masked(masks["conv1"]["bias"]) and jaxprune.is_masked(masks["head"]["kernel"])


@pytest.mark.parametrize("where,expected", [
    ("head", {"head/kernel", "head/bias"}), (["^conv1/kernel$", "scale"], {"conv1/kernel", "norm/scale"}),
    (lambda path, leaf: leaf.ndim == 1 and "bias" in path, {"conv1/bias", "head/bias"})])
def test_where_by_regex_list_or_predicate(where, expected):
  masks = jaxprune.init_masks(PARAMS, where)
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  assert {jaxprune.path_str(p) for p, m in flat if m is not jaxprune.UNMASKED} == expected


def test_local_prune_matches_the_per_leaf_method_and_keeps_old_masks():
  masks = jaxprune.prune(PARAMS, "l1_unstructured", amount=0.5)
  np.testing.assert_array_equal(masks["head"]["kernel"], jaxprune.l1_unstructured(PARAMS["head"]["kernel"], 0.5))
  again = jaxprune.prune(PARAMS, jaxprune.ln_structured, masks=masks, amount=1, n=2, axis=-1, where="head/kernel")
  np.testing.assert_array_equal(again["conv1"]["kernel"], masks["conv1"]["kernel"])
  np.testing.assert_array_equal(again["head"]["kernel"], jaxprune.ln_structured(
      PARAMS["head"]["kernel"], 1, 2, -1, mask=masks["head"]["kernel"]))


def test_random_methods_get_independent_keys_per_leaf():
  params = {"a": jnp.ones((8, 8)), "b": jnp.ones((8, 8))}
  masks = jaxprune.prune(params, "random_unstructured", key=jax.random.key(0), amount=0.5)
  assert int(masks["a"].sum()) == int(masks["b"].sum()) == 32
  assert not np.array_equal(masks["a"], masks["b"])
  with pytest.raises(TypeError, match="needs a PRNG `key`"):
    jaxprune.prune(params, "random_unstructured", amount=0.5)


def test_apply_masks_and_make_permanent_match_torch_remove():
  """spec §1.3/§7: mask * orig, so pruned negatives become -0.0 and pruned inf/NaN become NaN."""
  w = np.array([[-1.0, 2.0, np.inf], [np.nan, -3.0, 0.5]], np.float32)
  keep = np.array([[0, 1, 0], [0, 1, 1]], bool)
  module = holder(w)
  tprune.custom_from_mask(module, "weight", torch.tensor(keep))
  tprune.remove(module, "weight")
  theirs = module.weight.detach().numpy()
  params, masks = jaxprune.make_permanent({"w": jnp.asarray(w)}, {"w": jnp.asarray(keep)})
  ours = np.asarray(params["w"])
  np.testing.assert_array_equal(np.signbit(ours), np.signbit(theirs))
  np.testing.assert_array_equal(ours, theirs)  # NaN == NaN position-wise in assert_array_equal
  assert masks["w"] is jaxprune.UNMASKED
  np.testing.assert_array_equal(jaxprune.apply_masks({"w": w}, {"w": keep})["w"], theirs)


def test_make_permanent_only_where_asked():
  masks = jaxprune.prune(PARAMS, "l1_unstructured", amount=0.5)
  params, new_masks = jaxprune.make_permanent(PARAMS, masks, where="head")
  assert new_masks["head"]["kernel"] is jaxprune.UNMASKED
  np.testing.assert_array_equal(new_masks["conv1"]["kernel"], masks["conv1"]["kernel"])
  np.testing.assert_array_equal(params["conv1"]["kernel"], PARAMS["conv1"]["kernel"])
  assert int((params["head"]["kernel"] == 0).sum()) == 120


def test_sparsity_report_counts():
  masks = jaxprune.global_unstructured(PARAMS, 0.9)
  report = jaxprune.sparsity_report(PARAMS, masks)
  rows = {r.path: r for r in report.leaves}
  masked = PARAMS["conv1"]["kernel"].size + PARAMS["head"]["kernel"].size
  assert report.pruned == round(0.9 * masked)
  assert rows["conv1/kernel"].pruned + rows["head/kernel"].pruned == report.pruned
  assert report.masked_sparsity == pytest.approx(round(0.9 * masked) / masked)
  assert rows["head/bias"].zeros == 10 and not rows["head/bias"].masked
  assert "head/kernel" in str(report) and "total" in str(report)
  assert report.to_dict()["pruned"] == report.pruned


class FooBarPruningMethod(tprune.BasePruningMethod):
  """The PyTorch tutorial's custom method: prune every other entry."""
  PRUNING_TYPE = "unstructured"

  def compute_mask(self, t, default_mask):
    mask = default_mask.clone()
    mask.view(-1)[::2] = 0
    return mask


@jaxprune.pruning_method("unstructured")
def every_other(t, default_mask):
  return default_mask.ravel().at[::2].set(False).reshape(default_mask.shape)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_custom_unstructured_method_matches_torch_iteratively(shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  module = holder(x)
  mask = None
  for _ in range(3):
    FooBarPruningMethod.apply(module, "weight")
    mask = every_other(x, mask=mask)
    np.testing.assert_array_equal(mask, module.weight_mask.numpy() != 0)


class DropFirstLiveChannel(tprune.BasePruningMethod):
  PRUNING_TYPE = "structured"

  def __init__(self, dim):
    self.dim = dim

  def compute_mask(self, t, default_mask):
    mask = default_mask.clone()
    mask.select(self.dim, 0).zero_()
    return mask


@jaxprune.pruning_method("structured")
def drop_first_live_channel(t, default_mask, axis):
  return default_mask.at[(slice(None),) * axis + (0,)].set(False)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_custom_structured_method_sees_live_channels_like_torch(axis):
  x = np.random.default_rng(1).normal(size=(4, 5, 3)).astype(np.float32)
  module = holder(x)
  mask = None
  for _ in range(3):
    DropFirstLiveChannel.apply(module, "weight", dim=axis)
    mask = drop_first_live_channel(x, mask=mask, axis=axis)
    np.testing.assert_array_equal(mask, module.weight_mask.numpy() != 0)


def test_custom_method_in_the_pytree_api_and_bad_types():
  masks = jaxprune.prune(PARAMS, every_other)
  assert int(masks["head"]["kernel"].sum()) == 120
  with pytest.raises(ValueError, match="Unrecognized PRUNING_TYPE"):
    jaxprune.pruning_method("semi")
  with pytest.raises(TypeError, match="need an `axis`"):
    drop_first_live_channel(np.ones((2, 2)))


def test_import_without_torch():
  """jaxprune's core must work with torch absent: block the import and prune."""
  code = ("import sys\n"
          "class Block:\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name == 'torch' or name.startswith('torch.'): raise ImportError('torch blocked')\n"
          "sys.meta_path.insert(0, Block())\n"
          "import jax.numpy as jnp, jaxprune\n"
          "m = jaxprune.global_unstructured({'w': jnp.arange(12.).reshape(3, 4)}, 0.5)\n"
          "assert int(m['w'].sum()) == 6 and 'torch' not in sys.modules\n"
          "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_masks_checkpoint_like_params():
  """A mask pytree, UNMASKED leaves included, round-trips through flax's msgpack checkpoint format."""
  from flax import serialization
  masks = jaxprune.global_unstructured(PARAMS, 0.5)
  restored = serialization.from_bytes(masks, serialization.to_bytes(masks))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(masks)[0], jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b, err_msg=jaxprune.path_str(path))
    assert np.ndim(a) == np.ndim(b) and np.asarray(b).dtype == np.bool_


@pytest.mark.parametrize("seed", range(6))
def test_block_structured_against_brute_force(seed):
  """Blocks ranked by their L1 norm; exactly round(amount * live blocks) whole blocks pruned, lowest first."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(8, 12)).astype(np.float32)
  old = np.asarray(jaxprune.block_structured(x, 0.25, (2, 3)))
  mask = np.asarray(jaxprune.block_structured(x, 0.5, (2, 3), mask=old))
  blocks = lambda a: a.reshape(4, 2, 4, 3).transpose(0, 2, 1, 3).reshape(16, 6)
  norms = np.abs(blocks(x * old)).sum(1)
  live = blocks(old).any(1)
  order = sorted(np.flatnonzero(live), key=lambda i: (norms[i], i))
  expected_pruned = set(order[:round(0.5 * live.sum())])
  kept = blocks(mask).any(1)
  assert {i for i in np.flatnonzero(live) if not kept[i]} == expected_pruned
  np.testing.assert_array_equal(blocks(mask), blocks(old) & kept[:, None])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nm_structured_against_brute_force(axis):
  """2:4 keeps the two largest |x| of each group of 4 along the axis."""
  x = np.random.default_rng(axis + 5).normal(size=(8, 12)).astype(np.float32)
  mask = np.asarray(jaxprune.nm_structured(x, 2, 4, axis=axis))
  moved = np.moveaxis(np.abs(x), axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, 4)
  expected = np.zeros(groups.shape, bool)
  np.put_along_axis(expected, np.argsort(-groups, axis=-1)[..., :2], True, axis=-1)
  np.testing.assert_array_equal(mask, np.moveaxis(expected.reshape(moved.shape), -1, axis))
