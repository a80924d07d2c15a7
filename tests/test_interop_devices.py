"""Placement and memory: zero-copy CPU views, one copy by default, devices and shardings, sharded arrays back.

Runs with the 8 simulated CPU devices of tests/conftest.py. The CUDA DLPack path needs a GPU and is not exercised
here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from torch import nn
from torch.nn.utils import prune

import interop
import jaxprune
from interop import devices


def _pointer(arr: jax.Array) -> int:
  return arr.addressable_shards[0].data.unsafe_buffer_pointer()


def test_copy_false_shares_cpu_memory_and_copy_true_does_not():
  t = torch.randn(256, 64)
  alias = devices.to_jax(t, copy=False)
  owned = devices.to_jax(t)
  assert _pointer(alias) == t.data_ptr()
  assert _pointer(owned) != t.data_ptr()
  with torch.no_grad():
    t.mul_(2)  # what an optimizer step does to a live state_dict's tensors
  np.testing.assert_array_equal(alias, t.numpy())
  np.testing.assert_array_equal(np.asarray(owned) * 2, t.numpy())


def test_from_torch_copy_false_aliases_params_but_masks_are_new_bool_arrays():
  net = nn.Linear(64, 32)
  prune.l1_unstructured(net, "weight", 0.5)
  sd = net.state_dict()
  conv = interop.from_torch(sd, copy=False)
  assert _pointer(conv.params["weight"]) == sd["weight_orig"].data_ptr()
  assert _pointer(conv.params["bias"]) == sd["bias"].data_ptr()
  assert conv.masks["weight"].dtype == jnp.bool_


def test_to_torch_copy_false_aliases_jax_memory():
  conv = interop.from_torch(nn.Linear(64, 32).state_dict())
  shared = interop.to_torch(*conv, copy=False)
  copied = interop.to_torch(*conv)
  assert shared["bias"].data_ptr() == _pointer(conv.params["bias"])
  assert copied["bias"].data_ptr() != _pointer(conv.params["bias"])
  copied["bias"].add_(1)  # a copy is a normal, writable tensor
  np.testing.assert_array_equal(np.asarray(conv.params["bias"]) + 1, copied["bias"].numpy())


def test_placement_on_a_device_a_sharding_and_per_leaf():
  assert len(jax.devices()) == 8, "tests/conftest.py should simulate 8 CPU devices"
  net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
  prune.l1_unstructured(net[0], "weight", 0.5)
  sd = net.state_dict()
  second = jax.devices()[1]
  conv = interop.from_torch(sd, device=second)
  placed = [leaf for leaf in jax.tree.leaves(conv[:3]) if leaf is not jaxprune.UNMASKED]
  assert len(placed) == 8 and all(leaf.devices() == {second} for leaf in placed)

  mesh = Mesh(np.array(jax.devices()), ("x",))
  rows = NamedSharding(mesh, PartitionSpec("x"))
  replicated = NamedSharding(mesh, PartitionSpec())
  conv = interop.from_torch(sd, layout="flax",
                            device=lambda path, shape: rows if shape and shape[0] % 8 == 0 else replicated)
  kernel, mask = conv.params["0"]["kernel"], conv.masks["0"]["kernel"]  # (16, 8): rows split over 8 devices
  assert kernel.sharding == rows and mask.sharding == rows
  assert kernel.addressable_shards[0].data.shape == (2, 8)
  assert conv.buffers["buffers"]["1"]["num_batches_tracked"].sharding == replicated
  assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []  # sharded arrays gather back exactly


def test_x64_enabled_keeps_64_bit_dtypes():
  sd = {"w": torch.randn(3, dtype=torch.float64), "n": torch.tensor([2 ** 40])}
  with jax.enable_x64(True):
    conv = interop.from_torch(sd)
    assert conv.params["w"].dtype == jnp.float64 and conv.params["n"].dtype == jnp.int64
    assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,perm", [((37, 53), (1, 0)), ((19, 7, 3, 3), (2, 3, 1, 0)),
                                        ((3, 3, 7, 19), (3, 2, 0, 1)), ((5, 7, 2, 2, 3), (2, 3, 4, 1, 0)),
                                        ((4, 5, 6), (2, 0, 1))])
def test_threaded_copies_equal_numpy(monkeypatch, shape, perm, dtype):
  """Layout permutations through the threaded tiled transpose, with tiny tiles so every edge case is hit; other
  permutations, plain copies and casts through the row-parallel copy."""
  monkeypatch.setattr(devices, "_PARALLEL_MIN_BYTES", 0)
  monkeypatch.setattr(devices, "_TILED_MIN_BYTES", 0)
  monkeypatch.setattr(devices, "_TILE_BYTES", 64)
  monkeypatch.setattr(devices, "_FRESH_PAGES_MIN_BYTES", 1)  # huge-page buffers too
  a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
  out = devices.copy_host(a, perm)
  assert out.flags.c_contiguous and out.ctypes.data % 64 == 0
  np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(a.transpose(perm)).view(np.uint8))
  np.testing.assert_array_equal(devices.copy_host(a), a)
  np.testing.assert_array_equal(devices.copy_host(a > 0, perm, dtype=dtype), (a > 0).transpose(perm).astype(dtype))
  adopted = jax.device_put(out)  # XLA takes the aligned buffer as it is
  assert adopted.unsafe_buffer_pointer() == out.ctypes.data


def test_mask_of_any_dtype_becomes_bool_exactly(monkeypatch):
  monkeypatch.setattr(devices, "_PARALLEL_MIN_BYTES", 0)  # checked block by block, on both cores
  for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool,
                torch.complex64, torch.complex128):
    mask = (torch.arange(12).reshape(3, 4) % 3 != 0).to(dtype)
    np.testing.assert_array_equal(devices.mask_to_jax(mask), (np.arange(12).reshape(3, 4) % 3 != 0))
  with pytest.raises(interop.MaskError, match=r"'m' holds .* at index \(2,\)"):
    devices.mask_to_jax(torch.tensor([1, 0, 1j], dtype=torch.complex128), key="m")


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_default_copies_never_alias(layout):
  """Writing into the results of either direction leaves the other side alone (size-1 axes make a transposed view
  contiguous, the case a lazy copy would miss)."""
  net = nn.Linear(1, 4)
  prune.l1_unstructured(net, "weight", 2)
  sd = {k: v.clone() for k, v in net.state_dict().items()}
  conv = interop.from_torch(sd, layout=layout)
  before = jax.tree.map(np.array, conv[:3])
  back = interop.to_torch(*conv)
  for tensor in back.values():
    tensor.add_(1)
  for tensor in sd.values():
    tensor.add_(1)
  jax.tree.map(np.testing.assert_array_equal, conv[:3], before)


def test_dlpack_path_run_on_cpu_tensors(monkeypatch):
  """The accelerator code path (DLPack both ways, on-device transposes, mask checks and int64 narrowing in torch)
  is the one a CUDA tensor takes; DLPack works on CPU too, so it is exercised here by routing CPU tensors to it."""
  monkeypatch.setattr(devices, "_on_accelerator", devices.is_torch_tensor)
  monkeypatch.setattr(devices, "_on_one_accelerator",
                      lambda arr: isinstance(arr, jax.Array) and len(arr.devices()) == 1)
  calls = []
  for name in ("_accelerator_to_jax", "_accelerator_mask_to_jax"):
    original = getattr(devices, name)
    monkeypatch.setattr(devices, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
  net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 1)).to(torch.bfloat16)
  prune.l1_unstructured(net[0], "weight", 0.5)
  prune.l1_unstructured(net[3], "weight", 1)  # (1, 3): its transposed view is contiguous
  sd = {k: v.clone() for k, v in net.state_dict().items()}
  for layout in ("torch", "flax"):
    conv = interop.from_torch(sd, layout=layout)
    before = jax.tree.map(np.array, conv[:3])
    back = interop.to_torch(*conv)
    assert interop.diff_state_dicts(back, net.state_dict()) == []
    for tensor in [*back.values(), *sd.values()]:
      tensor.add_(1)
    jax.tree.map(np.testing.assert_array_equal, conv[:3], before)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
  assert calls.count("_accelerator_mask_to_jax") == 4 and calls.count("_accelerator_to_jax") == 18
  bad = torch.ones(2, 3)
  bad[1, 1] = 0.5
  with pytest.raises(interop.MaskError, match=r"'m' holds .* at index \(1, 1\)"):
    devices.mask_to_jax(bad, key="m")
  with pytest.raises(interop.DTypeError, match="'n' is int64 with values outside int32"):
    devices.to_jax(torch.tensor([2 ** 40]), key="n")
