"""state_dict <-> pytrees: pairing, buffers, exact round trips, dtypes, replayed pruning changes (spec §7, §8, §9).

torch is the oracle: the state_dicts come from modules pruned by torch.nn.utils.prune, and what we rebuild is
compared bit for bit with what torch itself holds or produces.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import interop
import jaxprune


def _net(dtype=torch.float32) -> nn.Module:
  torch.manual_seed(0)
  return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def _spec9_net() -> nn.Module:
  """Spec §9's example: Sequential(Linear, ReLU, Linear) with 0.weight and 2.bias pruned."""
  net = _net()
  prune.l1_unstructured(net[0], "weight", 0.4)
  prune.random_unstructured(net[3], "bias", 1)
  return net


def test_pairs_become_param_plus_bool_mask_and_buffers_stay_apart():
  """spec §9: X_orig/X_mask -> X + bool mask; unpruned -> UNMASKED; BatchNorm buffers reported separately."""
  net = _spec9_net()
  sd = net.state_dict()
  conv = interop.from_torch(sd)
  np.testing.assert_array_equal(conv.params["0"]["weight"], sd["0.weight_orig"].numpy())
  np.testing.assert_array_equal(conv.masks["0"]["weight"], sd["0.weight_mask"].numpy() != 0)
  assert conv.masks["0"]["weight"].dtype == jnp.bool_
  assert conv.masks["0"]["bias"] is jaxprune.UNMASKED and conv.masks["3"]["weight"] is jaxprune.UNMASKED
  assert set(conv.params["1"]) == {"weight", "bias"}
  assert set(conv.buffers["buffers"]["1"]) == {"running_mean", "running_var", "num_batches_tracked"}
  assert jax.tree.structure(conv.params) == jax.tree.structure(conv.masks)
  np.testing.assert_array_equal(jaxprune.apply_masks(conv.params, conv.masks)["0"]["weight"],
                                net[0].weight.detach().numpy())


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_identical_with_torch_key_order(layout, dtype):
  """spec §8.2/§9: keys, order (params then buffers per module), dtypes (mask in the param's dtype), bits."""
  net = _net(dtype)
  prune.l1_unstructured(net[0], "weight", 0.4)
  prune.l1_unstructured(net[1], "weight", 2)
  prune.l1_unstructured(net[0], "bias", 1)
  prune.ln_structured(net[0], "weight", 0.5, n=2, dim=0)
  sd = net.state_dict()
  assert interop.diff_state_dicts(interop.to_torch(*interop.from_torch(sd, layout=layout)), sd) == []


def test_special_values_and_int64_buffers_survive():
  """NaN payloads, ±inf, -0.0 in params; int64 num_batches_tracked narrowed for JAX and restored exactly."""
  net = _net()
  prune.identity(net[0], "weight")
  raw = np.array([0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001], np.uint32)
  with torch.no_grad():
    net[0].weight_orig.view(-1)[:6] = torch.from_numpy(raw.view(np.float32))
  net[1].num_batches_tracked.fill_(2 ** 31 - 1)
  sd = net.state_dict()
  conv = interop.from_torch(sd)
  assert conv.buffers["buffers"]["1"]["num_batches_tracked"].dtype == jnp.int32  # x64 is off in the tests
  back = interop.to_torch(*conv)
  assert back["1.num_batches_tracked"].dtype == torch.int64
  assert interop.diff_state_dicts(back, sd) == []


def test_mask_dtype_follows_torch_even_when_it_differs_from_the_param():
  """spec §8.2: Ln with float64 importance scores stores a float64 mask beside a float32 param; it comes back."""
  net = _net()
  prune.ln_structured(net[0], "weight", 0.4, n=1, dim=0, importance_scores=net[0].weight.detach().double())
  sd = net.state_dict()
  assert sd["0.weight_mask"].dtype == torch.float64
  assert interop.diff_state_dicts(interop.to_torch(*interop.from_torch(sd)), sd) == []


def test_pruning_done_in_jax_is_replayed_in_torch_order():
  """A new mask is torch's first prune (X_orig to the end, mask appended); UNMASKED is torch's remove (spec §7)."""
  net = _spec9_net()
  conv = interop.from_torch(net.state_dict(), layout="flax")
  new = jnp.asarray(np.random.default_rng(0).random((3, 5)) > 0.5)  # fc2's kernel is (in, out) in Flax layout
  masks = {**conv.masks, "3": {**conv.masks["3"], "kernel": new.T}}
  params, masks = jaxprune.make_permanent(conv.params, masks, where="^0/")
  ours = interop.to_torch(params, masks, conv.buffers, conv.spec)

  prune.custom_from_mask(net[3], "weight", torch.from_numpy(np.array(new)))
  prune.remove(net[0], "weight")
  assert interop.diff_state_dicts(ours, net.state_dict()) == []


def test_spec_from_a_torch_module_instead_of_the_conversion():
  """A model pruned the same way gives torch's keys, order and dtypes; mask dtype is the param's."""
  net = _spec9_net()
  conv = interop.from_torch(net.state_dict(), layout="flax")
  ours = interop.to_torch(conv.params, conv.masks, conv.buffers, module=_spec9_net(), layout="flax")
  assert interop.diff_state_dicts(ours, net.state_dict()) == []
  fresh = _net()  # unpruned template: the masks say which tensors become X_orig/X_mask, as torch would order them
  ours = interop.to_torch(conv.params, conv.masks, conv.buffers, module=fresh, layout="flax")
  prune.custom_from_mask(fresh[0], "weight", net[0].weight_mask)
  prune.custom_from_mask(fresh[3], "bias", net[3].bias_mask)
  assert list(ours) == list(fresh.state_dict())
  assert interop.diff_state_dicts(ours, net.state_dict(), order=False) == []


def test_without_spec_or_module_the_trees_alone_give_a_loadable_state_dict():
  """Keys from paths, Flax names mapped back by the rules; loads strictly into a model pruned the same way."""
  net = _spec9_net()
  conv = interop.from_torch(net.state_dict(), layout="flax")
  ours = interop.to_torch(conv.params, conv.masks, conv.buffers, layout="flax")
  target = _net()
  prune.identity(target[0], "weight")
  prune.identity(target[3], "bias")
  target.load_state_dict(ours)
  assert interop.diff_state_dicts(target.state_dict(), net.state_dict(), order=False) == []
  assert ours["1.num_batches_tracked"].dtype == torch.int32  # no spec: JAX's dtype; torch casts when loading


def test_permanent_state_dict_matches_torch_remove():
  """spec §7: X = X_mask * X_orig (a product: -0.0 stays, inf*0 is NaN) at X_orig's place."""
  net = _spec9_net()
  with torch.no_grad():
    net[0].weight_orig[net[0].weight_mask == 0] = torch.tensor([-1.0, float("inf")]).repeat(100)[
        :int((net[0].weight_mask == 0).sum())]
  sd = net.state_dict()
  with torch.no_grad():
    net(torch.zeros(2, 6))  # a no-grad forward keeps the modules deep-copyable (spec §9)
  prune.remove(net[0], "weight")
  prune.remove(net[3], "bias")
  assert interop.diff_state_dicts(interop.permanent_state_dict(sd), net.state_dict()) == []
  conv = interop.from_torch(sd, layout="flax")
  assert interop.diff_state_dicts(interop.to_torch(*conv, permanent=True), net.state_dict()) == []


def test_numpy_state_dicts_convert_without_torch_tensors():
  """safetensors-style input (numpy arrays, bfloat16 via ml_dtypes) and numpy output."""
  net = _spec9_net().to(torch.bfloat16)
  sd = net.state_dict()
  as_numpy = {k: interop.devices.host_view(v) for k, v in sd.items()}
  back = interop.to_torch(*interop.from_torch(as_numpy, layout="flax"), tensors="numpy")
  assert all(isinstance(v, np.ndarray) for v in back.values())
  assert interop.diff_state_dicts(back, sd) == []


def test_a_torch_module_as_source_is_its_state_dict_with_itself_as_module():
  net = _spec9_net()
  assert interop.from_torch(net, layout="flax").spec == interop.from_torch(net.state_dict(), layout="flax",
                                                                           module=net).spec


def test_spec_json_round_trip():
  conv = interop.from_torch(_spec9_net().state_dict(), layout="flax")
  assert interop.TorchSpec.from_json(conv.spec.to_json()) == conv.spec


def test_validate_state_dict_names_the_pruned_tensors():
  assert interop.validate_state_dict(_spec9_net().state_dict(), module=_net()) == ("0.weight", "3.bias")


_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_LAYERS = {
    "linear": lambda r: nn.Linear(r.integers(1, 5), r.integers(1, 5), bias=bool(r.integers(2))),
    "conv1d": lambda r: nn.Conv1d(r.integers(1, 4), r.integers(1, 4), int(r.integers(1, 3))),
    "conv2d": lambda r: nn.Conv2d(r.integers(1, 4), r.integers(1, 4), (int(r.integers(1, 3)), 2)),
    "conv3d": lambda r: nn.Conv3d(r.integers(1, 3), r.integers(1, 3), 1, bias=False),
    "bn": lambda r: nn.BatchNorm2d(r.integers(1, 5)),
    "layernorm": lambda r: nn.LayerNorm(int(r.integers(1, 5))),
    "embedding": lambda r: nn.Embedding(r.integers(1, 6), r.integers(1, 4)),
}


@given(kinds=st.lists(st.sampled_from(sorted(_LAYERS)), min_size=1, max_size=5), seed=st.integers(0, 2 ** 32 - 1),
       dtype=st.sampled_from(_DTYPES), layout=st.sampled_from(["torch", "flax"]))
def test_property_round_trip_of_random_pruned_models_is_exact(kinds, seed, dtype, layout):
  """Any mix of layers, dtypes, random bits (NaN, inf, -0.0 included) and random masks: torch -> JAX -> torch is
  the identity, with and without the module; Flax-layout kernels are the torch weights with axes moved."""
  rng = np.random.default_rng(seed)
  net = nn.ModuleDict({f"m{i}": _LAYERS[kind](rng) for i, kind in enumerate(kinds)}).to(dtype)
  with torch.no_grad():
    for p in net.parameters():
      raw = bytearray(rng.bytes(p.numel() * p.element_size()))
      p.copy_(torch.frombuffer(raw, dtype=dtype).reshape(p.shape))
  for name, p in list(net.named_parameters()):
    if rng.random() < 0.6:
      module_name, tensor_name = name.split(".")
      prune.custom_from_mask(net[module_name], tensor_name, torch.from_numpy(rng.random(p.shape) < 0.5))
  sd = net.state_dict()
  conv = interop.from_torch(sd, layout=layout, module=net)
  assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []
  assert interop.diff_state_dicts(interop.to_torch(conv.params, conv.masks, conv.buffers, module=net, layout=layout),
                                  sd) == []
  if "embedding" not in kinds:  # an embedding's 2-d weight is indistinguishable from a Linear's without the module
    assert interop.from_torch(sd, layout=layout).spec == conv.spec
  for e in conv.spec.entries:
    if e.perm and e.role == "orig":
      leaf = conv.params
      for part in e.path:
        leaf = leaf[part]
      np.testing.assert_array_equal(np.asarray(leaf).view(np.uint8),
                                    np.ascontiguousarray(interop.devices.host_view(sd[e.key]).transpose(e.perm))
                                    .view(np.uint8))

