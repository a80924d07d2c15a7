"""Moving single tensors between torch and JAX: placement, zero-copy views, DLPack, exact masks.

Host (CPU) tensors travel as numpy views of torch's memory: ``jax.device_put`` of an aligned numpy array on a CPU
device aliases that memory instead of copying it, so ``copy=False`` converts without touching the data. Because a
JAX array is immutable and a torch tensor is not, the default ``copy=True`` makes exactly one copy (a torch
``state_dict()`` shares storage with the live parameters, which an optimizer mutates in place).

Accelerator (e.g. CUDA) tensors cross through DLPack on their own device, with no host round trip; a layout
permutation then runs as a jitted transpose on that device.

Masks are validated and turned into ``bool`` in one pass: torch stores a mask in its parameter's dtype (spec §8.2),
and the only values that can cross losslessly are the bit patterns of exactly 0 and 1.
"""
from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from interop.errors import DTypeError, MaskError

Placement = Union[None, jax.Device, jax.sharding.Sharding]
"""Where arrays land: None (JAX's default device), a ``jax.Device``, or a ``jax.sharding.Sharding``."""

_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TILED_MIN_BYTES = 1 << 22  # below this a plain numpy transpose is as fast and needs no threads
_TILE_BYTES = 1 << 17  # one tile of a blocked transpose stays in L2


def _torch():
  import torch  # pylint: disable=import-outside-toplevel  # torch is an optional extra
  return torch


def is_torch_tensor(x: Any) -> bool:
  """Whether ``x`` is a ``torch.Tensor`` (without importing torch when nobody else has)."""
  torch = sys.modules.get("torch")
  return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x: Any) -> str:
  """The dtype of a torch tensor, numpy array or JAX array as torch and numpy both spell it (``"bfloat16"``)."""
  if is_torch_tensor(x):
    return str(x.dtype).removeprefix("torch.")
  return np.dtype(x.dtype).name


def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype called ``name``, including the ml_dtypes ones JAX uses (bfloat16, float8_*)."""
  return jnp.dtype(name)


def host_view(x: Any) -> np.ndarray:
  """A numpy view of a CPU tensor's memory (no copy); accelerator tensors are copied to the host first.

  torch dtypes numpy lacks (bfloat16, float8) are viewed as integers of the same width and then as the ml_dtypes
  type of the same name, so the bits are untouched.
  """
  if not is_torch_tensor(x):
    return np.asarray(x)
  x = x.detach()
  if x.device.type != "cpu":
    x = x.cpu()
  x = x.resolve_conj().resolve_neg()
  try:
    return x.numpy()
  except TypeError:  # no numpy dtype of that name in torch's table
    torch = _torch()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(as_int).numpy().view(numpy_dtype(dtype_name(x)))


def torch_from_host(a: np.ndarray):
  """A torch tensor over ``a``'s memory (no copy), for every dtype ``host_view`` produces."""
  torch = _torch()
  try:
    return torch.from_numpy(a)
  except TypeError:  # an ml_dtypes dtype: hand torch the bits, then reinterpret them
    return torch.from_numpy(a.view(_INT_OF_SIZE[a.dtype.itemsize])).view(getattr(torch, a.dtype.name))


def _group_reversal(perm: Sequence[int]) -> Optional[tuple[int, int]]:
  """``(i, j)`` when ``perm`` lists the axis groups ``[j:] + [i:j] + [:i]``, i.e. reverses a 3-d view.

  Every built-in layout transform is of that form in both directions: Linear ``(1, 0)``, Conv
  ``(O, I, *k) -> (*k, I, O)`` and its inverse ``(*k, I, O) -> (O, I, *k)``.
  """
  n = len(perm)
  for i in range(1, n):
    for j in range(i, n):
      if list(perm) == [*range(j, n), *range(i, j), *range(i)]:
        return i, j
  return None


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
  return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="interop-transpose")


def _reverse3(src: np.ndarray, dst: np.ndarray) -> None:
  """``dst[c, b, a] = src[a, b, c]`` in L2-sized tiles, on all cores (numpy releases the GIL while copying)."""
  a, b, c = src.shape
  per_tile = max(1, _TILE_BYTES // (src.itemsize * c))
  ta = min(a, max(1, int(per_tile ** 0.5)))
  tb = min(b, max(1, per_tile // ta))

  def rows(a0: int) -> None:
    for b0 in range(0, b, tb):
      dst[:, b0:b0 + tb, a0:a0 + ta] = src[a0:a0 + ta, b0:b0 + tb, :].transpose(2, 1, 0)

  list(_pool().map(rows, range(0, a, ta)))


def permute_host(a: np.ndarray, perm: Sequence[int]) -> np.ndarray:
  """A new C-contiguous array ``a.transpose(perm)``; large layout transposes run tiled and threaded.

  A naive strided transpose of a big kernel reaches about 0.5 GB/s; tiles that fit in L2 reach several GB/s.
  """
  groups = _group_reversal(perm)
  if groups is None or a.nbytes < _TILED_MIN_BYTES:
    return np.array(a.transpose(perm), order="C")  # always a new array, even when the view is contiguous
  i, j = groups
  shape = a.shape
  src = a.reshape(int(np.prod(shape[:i])), int(np.prod(shape[i:j])), int(np.prod(shape[j:])))
  out = np.empty([shape[p] for p in perm], a.dtype)
  _reverse3(src, out.reshape(src.shape[::-1]))
  return out


def inverse_perm(perm: Sequence[int]) -> tuple[int, ...]:
  """The permutation that undoes ``perm`` (``()`` stays ``()``: no permutation)."""
  return tuple(int(i) for i in np.argsort(perm)) if perm else ()


def _devices_of(placement: Placement) -> tuple[jax.Device, ...]:
  if placement is None:
    return (jax.devices()[0],)
  if isinstance(placement, jax.sharding.Sharding):
    return tuple(placement.device_set)
  return (placement,)


def _lands_on_host(placement: Placement) -> bool:
  """Whether ``device_put`` would keep host memory (CPU devices may alias numpy arrays instead of copying)."""
  return all(d.platform == "cpu" for d in _devices_of(placement))


def _fit_x64(view: np.ndarray, key: str) -> tuple[np.ndarray, bool]:
  """Narrows 64-bit integers to 32 bits (exactly, or fails) when ``jax_enable_x64`` is off; refuses 64-bit floats.

  Returns the array and whether it is a new copy. The torch dtype is kept in the spec, so the way back restores it.
  """
  target = jax.dtypes.canonicalize_dtype(view.dtype)
  if target == view.dtype:
    return view, False
  if view.dtype.kind in "iu":
    info = np.iinfo(target)
    if view.size and (view.min() < info.min or view.max() > info.max):
      raise DTypeError(f"{key!r} is {view.dtype} with values outside {target}'s range and jax_enable_x64 is off; "
                       "enable it with jax.config.update('jax_enable_x64', True)")
    return view.astype(target), True
  raise DTypeError(f"{key!r} is {view.dtype}, but jax_enable_x64 is off, so JAX would round it to {target}; "
                   "enable it with jax.config.update('jax_enable_x64', True) or cast the tensor first")


@functools.partial(jax.jit, static_argnums=1)
def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
  return jnp.transpose(x, perm)


def _accelerator_to_jax(x, perm: Sequence[int], copy: bool, key: str) -> jax.Array:
  """A torch accelerator tensor as a JAX array on the same device, through DLPack (no host round trip)."""
  torch = _torch()
  x = x.detach()
  target = jax.dtypes.canonicalize_dtype(numpy_dtype(dtype_name(x)))
  if target.name != dtype_name(x):
    # Range check and narrowing on the device; floats are refused with the host path's message.
    _fit_x64(np.zeros(0, numpy_dtype(dtype_name(x))), key)
    info = np.iinfo(target)
    if x.numel() and (int(x.min()) < info.min or int(x.max()) > info.max):
      _fit_x64(x.cpu().numpy(), key)
    x = x.to(getattr(torch, target.name))
  arr = jax.dlpack.from_dlpack(x.contiguous())
  if perm:
    return _transpose(arr, tuple(perm))
  return jnp.copy(arr) if copy else arr


def to_jax(x: Any, placement: Placement = None, *, perm: Sequence[int] = (), copy: bool = True,
           key: str = "tensor") -> jax.Array:
  """One torch tensor (or numpy array) as a JAX array, bits unchanged.

  Args:
    x: a torch tensor on any device, or a numpy array.
    placement: a ``jax.Device`` or ``jax.sharding.Sharding``; None keeps JAX's default device (or, for an
      accelerator tensor, the tensor's own device).
    perm: an axis permutation to apply on the way (a layout transform); ``()`` for none.
    copy: when False, a CPU result may share memory with ``x`` (zero-copy); the caller must then not modify ``x``
      in place while the JAX array lives. A permutation always makes a new array.
    key: the tensor's name, for error messages.

  Returns:
    A ``jax.Array`` with ``x``'s values (64-bit integers narrowed exactly when ``jax_enable_x64`` is off).

  Raises:
    DTypeError: a float64/complex128 tensor while ``jax_enable_x64`` is off, or 64-bit integers that do not fit.
  """
  perm = tuple(perm)
  if is_torch_tensor(x) and x.device.type != "cpu":
    arr = _accelerator_to_jax(x, perm, copy, key)
    return arr if placement is None else jax.device_put(arr, placement)
  view, copied = _fit_x64(host_view(x), key)
  if perm:
    view, copied = permute_host(view, perm), True
  if copy and not copied and _lands_on_host(placement):
    view = np.array(view)  # device_put would alias the caller's memory
  return jax.device_put(view, placement)


def _same_bits(view: np.ndarray, value: int) -> np.ndarray:
  """Elementwise: is the element bit for bit ``value`` in ``view``'s dtype (so -0.0 is not 0)."""
  ref = np.full((), value, view.dtype)
  size = view.dtype.itemsize
  if size in _UINT_OF_SIZE:
    return view.view(_UINT_OF_SIZE[size]) == ref.view(_UINT_OF_SIZE[size])
  raw = np.ascontiguousarray(view).view(np.uint8).reshape(*view.shape, size)
  return (raw == ref.reshape(1).view(np.uint8)).all(-1)


def binary_mask_host(view: np.ndarray, key: str = "mask") -> np.ndarray:
  """A torch mask (any dtype) as a new bool array, after checking each value is exactly 0 or 1 bit for bit.

  -0.0 and NaN are refused along with 0.5: a bool mask cannot give back their bits.

  Raises:
    MaskError: naming ``key``, the first offending index and value, and how many values are offending.
  """
  is_one = _same_bits(view, 1)
  is_zero = _same_bits(view, 0)
  binary = np.count_nonzero(is_one) + np.count_nonzero(is_zero)
  if binary != view.size:
    flat = int(np.flatnonzero(~(is_one | is_zero))[0])
    index = tuple(int(i) for i in np.unravel_index(flat, view.shape))
    raise MaskError(
        f"mask {key!r} holds {view[index]!r} at index {index} ({view.size - binary} values in all are neither 0 "
        "nor 1); a lossless mask is exactly 0 or 1 bit for bit (torch's custom_from_mask also accepts scaling "
        "masks such as 0.5, which a boolean mask cannot represent)")
  return is_one


def _accelerator_mask_to_jax(x, key: str) -> jax.Array:
  torch = _torch()
  x = x.detach()
  size = x.element_size()
  if size not in _INT_OF_SIZE:
    return jnp.asarray(binary_mask_host(host_view(x), key))
  as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
  bits = x.view(as_int)
  is_one = bits == torch.ones((), dtype=x.dtype, device=x.device).view(as_int)
  if not bool((is_one | (bits == 0)).all()):
    binary_mask_host(host_view(x), key)  # raises with the offending index and value
  return jax.dlpack.from_dlpack(is_one.contiguous())


def mask_to_jax(x: Any, placement: Placement = None, *, perm: Sequence[int] = (), key: str = "mask") -> jax.Array:
  """A torch mask (in its parameter's dtype, spec §8.2) as a validated bool JAX array, permuted like its param.

  Raises:
    MaskError: a value other than exactly 0 or 1.
  """
  perm = tuple(perm)
  if is_torch_tensor(x) and x.device.type != "cpu":
    mask = _accelerator_mask_to_jax(x, key)
    mask = _transpose(mask, perm) if perm else mask
    return mask if placement is None else jax.device_put(mask, placement)
  mask = binary_mask_host(host_view(x), key)
  return jax.device_put(permute_host(mask, perm) if perm else mask, placement)


def _on_one_accelerator(arr: Any) -> bool:
  return isinstance(arr, jax.Array) and len(arr.devices()) == 1 and next(iter(arr.devices())).platform != "cpu"


def _host_of(arr: Any) -> tuple[np.ndarray, bool]:
  """A host numpy array of ``arr`` and whether it is a private copy.

  ``np.asarray`` of a JAX array is a read-only view of its buffer (or of a cached gathered copy), never private,
  so a sharded array is gathered here instead, shard by shard, into memory the caller owns.
  """
  if isinstance(arr, jax.Array) and len(arr.devices()) > 1:
    if not arr.is_fully_addressable:
      raise ValueError("an array sharded across processes cannot be gathered here; gather it first "
                       "(jax.experimental.multihost_utils.process_allgather)")
    out = np.empty(arr.shape, arr.dtype)
    for shard in arr.addressable_shards:
      if shard.replica_id == 0:
        out[shard.index] = np.asarray(shard.data)
    return out, True
  return np.asarray(arr), False


def to_torch_tensor(arr: Any, dtype: str, *, perm: Sequence[int] = (), copy: bool = True,
                    tensors: str = "torch"):
  """One JAX array as a torch tensor (or numpy array) of torch dtype ``dtype``, bits unchanged.

  Args:
    arr: a JAX array (single-device or sharded) or a numpy array.
    dtype: the torch dtype name to restore (e.g. ``"int64"`` for a buffer narrowed on the way in).
    perm: an axis permutation to apply (the inverse layout transform); ``()`` for none.
    copy: when False, a CPU or single-accelerator result may share memory with ``arr`` (DLPack, zero-copy).
    tensors: ``"torch"`` for torch tensors, ``"numpy"`` for numpy arrays (no torch needed).

  Returns:
    A new (or, with ``copy=False``, aliasing) C-contiguous tensor.
  """
  perm = tuple(perm)
  if tensors == "torch" and _on_one_accelerator(arr):
    torch = _torch()
    t = torch.from_dlpack(arr)
    t = t.permute(perm).contiguous() if perm else (t.clone() if copy else t)
    return t.to(getattr(torch, dtype))
  host, private = _host_of(arr)
  if perm:
    host, private = permute_host(host, perm), True
  target = numpy_dtype(dtype)
  if host.dtype != target:
    host, private = host.astype(target), True
  if not private:
    if not copy and tensors == "torch" and isinstance(arr, jax.Array):
      return _torch().from_dlpack(arr)
    if copy:
      host = np.array(host)
  return torch_from_host(host) if tensors == "torch" else host


def mask_to_torch(mask: Any, dtype: str, *, perm: Sequence[int] = (), tensors: str = "torch"):
  """A bool mask as torch stores it: 0/1 in ``dtype`` (the parameter's dtype, spec §8.2), permuted by ``perm``."""
  perm = tuple(perm)
  if tensors == "torch" and _on_one_accelerator(mask):
    torch = _torch()
    t = torch.from_dlpack(mask)
    return (t.permute(perm) if perm else t).to(getattr(torch, dtype), memory_format=torch.contiguous_format)
  host, _ = _host_of(mask)
  host = (permute_host(host, perm) if perm else host).astype(numpy_dtype(dtype))
  return torch_from_host(host) if tensors == "torch" else host


PlacementFn = Callable[[str, tuple[int, ...]], Placement]
"""A per-leaf placement: ``(path, shape) -> Device | Sharding | None``; path as ``"params/conv1/kernel"``."""


def resolve_placement(device: Union[Placement, PlacementFn], path: str, shape: tuple[int, ...]) -> Placement:
  """The placement of one leaf: ``device`` itself, or what the per-leaf function returns for it."""
  if callable(device) and not isinstance(device, (jax.Device, jax.sharding.Sharding)):
    return device(path, shape)
  return device
