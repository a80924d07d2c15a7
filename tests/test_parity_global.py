"""Global pruning parity with torch.nn.utils.prune.global_unstructured (spec §6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

import jaxprune
from interop.models import LeNet


def _torch_params(model):
  """Params as a nested dict in the model's own order (dicts keep insertion order in the flatten)."""
  return {name: {"weight": jnp.asarray(module.weight.detach().numpy())}
          for name, module in model.named_children()}


@pytest.mark.parametrize("seed", range(3))
def test_lenet_global_20_percent_is_identical_to_torch(seed):
  """The tutorial's global pruning of conv1, conv2, fc1, fc2, fc3 weights at 20% (its LeNet, with 5x5 convs)."""
  torch.manual_seed(seed)
  model = LeNet()
  params = _torch_params(model)
  tprune.global_unstructured([(m, "weight") for m in model.children()], tprune.L1Unstructured, amount=0.2)
  masks = jaxprune.global_unstructured(params, 0.2)
  for name, module in model.named_children():
    np.testing.assert_array_equal(masks[name]["weight"], module.weight_mask.numpy() != 0, err_msg=name)
  total = sum(p["weight"].size for p in params.values())
  assert sum(int((~m["weight"]).sum()) for m in masks.values()) == round(0.2 * total)


def _random_model(rng):
  shapes = [tuple(rng.integers(1, 6, size=rng.integers(1, 4))) for _ in range(rng.integers(2, 6))]
  return [rng.normal(size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("seed", range(16))
def test_global_sequences_match_torch(seed):
  """Global after global, and global after local (spec §6: pruned entries neither count nor compete)."""
  rng = np.random.default_rng(seed)
  arrays = _random_model(rng)
  modules = []
  for a in arrays:
    module = nn.Module()
    module.weight = nn.Parameter(torch.tensor(a))
    modules.append(module)
  params = {f"m{i:02d}": {"w": jnp.asarray(a)} for i, a in enumerate(arrays)}
  everything = lambda path, leaf: True
  masks = None
  if seed % 2:  # a local prune first
    tprune.l1_unstructured(modules[0], "weight", amount=0.5)
    masks = {k: {"w": jaxprune.UNMASKED} for k in params}
    masks["m00"]["w"] = jaxprune.l1_unstructured(params["m00"]["w"], 0.5)
  for amount in [float(rng.choice([0.2, 0.5, 0.35, 0.15])), int(rng.integers(0, 3))]:
    tprune.global_unstructured([(m, "weight") for m in modules], tprune.L1Unstructured, amount=amount)
    masks = jaxprune.global_unstructured(params, amount, masks=masks, where=everything)
    for i, module in enumerate(modules):
      np.testing.assert_array_equal(masks[f"m{i:02d}"]["w"], module.weight_mask.numpy() != 0)


def test_global_with_importance_scores_and_mixed_dtypes_matches_torch():
  """Scores replace the weights; f16 and f32 leaves are ranked together in f32, as torch.cat promotes."""
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float16)
  sa, sb = rng.normal(size=a.shape).astype(np.float32), rng.normal(size=b.shape).astype(np.float32)
  ma, mb = nn.Module(), nn.Module()
  ma.weight, mb.weight = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
  tprune.global_unstructured([(ma, "weight"), (mb, "weight")], tprune.L1Unstructured, amount=0.4,
                             importance_scores={(ma, "weight"): torch.tensor(sa), (mb, "weight"): torch.tensor(sb)})
  masks = jaxprune.global_unstructured({"a": jnp.asarray(a), "b": jnp.asarray(b)}, 0.4,
                                       importance_scores={"a": sa, "b": sb}, where=lambda p, x: True)
  np.testing.assert_array_equal(masks["a"], ma.weight_mask.numpy() != 0)
  np.testing.assert_array_equal(masks["b"], mb.weight_mask.numpy() != 0)
  assert mb.weight_mask.dtype == torch.float16 and masks["b"].dtype == jnp.bool_


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("seed", range(3))
def test_global_over_16_bit_leaves_matches_torch(dtype, seed):
  """A bf16 or f16 model is laid end to end in its own dtype (as bits: XLA:CPU has no 16-bit float concatenate)
  and ranked exactly, subnormals included, eagerly and under jit. Distinct magnitudes: torch's tie order is its
  sort's (spec §4)."""
  rng = np.random.default_rng(seed)
  finfo = jnp.finfo(dtype)
  bits = np.arange(1, int(np.array(finfo.max, dtype).view(np.uint16)), dtype=np.uint16)  # every finite |x| > 0
  subnormal = int(np.array(finfo.smallest_normal, dtype).view(np.uint16))
  picked = np.concatenate([rng.choice(bits[:subnormal - 1], 12, replace=False),
                           rng.choice(bits[subnormal:], 148, replace=False)])
  pool = rng.permutation(picked).view(jnp.dtype(dtype)) * rng.choice(np.array([-1, 1], dtype), 160)
  shapes = [(4, 6), (17,), (3, 2, 5), (2, 4), (3, 3)]
  sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
  arrays = [pool[lo:hi].reshape(s) for lo, hi, s in zip(sizes[:-1], sizes[1:], shapes)]
  assert np.any(np.abs(pool.astype(np.float32)) < finfo.smallest_normal)  # subnormals take part
  modules = []
  for a in arrays:
    module = nn.Module()
    module.weight = nn.Parameter(torch.tensor(a.astype(np.float32)).to(getattr(torch, dtype)))
    modules.append(module)
  params = {f"m{i}": jnp.asarray(a) for i, a in enumerate(arrays)}
  amount = float(rng.choice([0.1, 0.37, 0.5, 0.9]))
  tprune.global_unstructured([(m, "weight") for m in modules], tprune.L1Unstructured, amount=amount)
  eager = jaxprune.global_unstructured(params, amount, where=lambda p, x: True)
  jitted = jax.jit(lambda p: jaxprune.global_unstructured(p, amount, where=lambda p, x: True))(params)
  for i, module in enumerate(modules):
    np.testing.assert_array_equal(eager[f"m{i}"], module.weight_mask.float().numpy() != 0)
    np.testing.assert_array_equal(jitted[f"m{i}"], module.weight_mask.float().numpy() != 0)


def test_global_int_amount_above_remaining_is_refused_like_torch():
  """spec §6: `amount=12 should be smaller than the number of parameters to prune=11`."""
  module = nn.Module()
  module.weight = nn.Parameter(torch.ones(11))
  with pytest.raises(ValueError, match="prune=11") as theirs:
    tprune.global_unstructured([(module, "weight")], tprune.L1Unstructured, amount=12)
  with pytest.raises(ValueError) as ours:
    jaxprune.global_unstructured({"w": jnp.ones(11)}, 12, where="w")
  assert str(ours.value) == str(theirs.value)
