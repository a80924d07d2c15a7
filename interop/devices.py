"""Moving single tensors between torch and JAX: placement, zero-copy views, DLPack, exact masks.

Host (CPU) tensors travel as numpy views of torch's memory: ``jax.device_put`` of an aligned numpy array on a CPU
device aliases that memory instead of copying it, so ``copy=False`` converts without touching the data. Because a
JAX array is immutable and a torch tensor is not, the default ``copy=True`` makes exactly one copy (a torch
``state_dict()`` shares storage with the live parameters, which an optimizer mutates in place).

Accelerator (e.g. CUDA) tensors cross through DLPack on their own device, with no host round trip; a layout
permutation then runs as a jitted transpose on that device.

Masks are validated and turned into ``bool`` together: torch stores a mask in its parameter's dtype (spec §8.2),
and the only values that can cross losslessly are the bit patterns of exactly 0 and 1.

JAX is imported by the functions that make or read JAX arrays, not with this module: the host-only helpers (dtype
names and checks, numpy views of torch tensors, mask checks) serve ``jaxprune inspect``, which must not import it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from interop.errors import DTypeError, MaskError

Placement = Any
"""Where arrays land: None (JAX's default device), a ``jax.Device``, or a ``jax.sharding.Sharding``."""

_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PARALLEL_MIN_BYTES = 1 << 22  # below this one thread is as fast as several
_TILED_MIN_BYTES = 1 << 20  # below this (cache-sized) numpy's strided transpose is as fast as tiles
_TILE_BYTES = 1 << 17  # one tile of a blocked transpose stays in L2
_ALIGN = 64  # what XLA's CPU client needs to adopt host memory without copying
_ALIGNED_MIN_BYTES = 1 << 16  # below this, copying costs less than aligning
_FRESH_PAGES_MIN_BYTES = 1 << 21  # one transparent huge page; below it malloc and its recycled memory win


def _torch():
  import torch  # pylint: disable=import-outside-toplevel  # torch is an optional extra
  return torch


def _jax():
  import jax  # pylint: disable=import-outside-toplevel  # only where JAX arrays are made or read
  return jax


def _is_jax_array(x: Any) -> bool:
  """Whether ``x`` is a ``jax.Array`` (without importing JAX when nobody else has: then it cannot be one)."""
  jax = sys.modules.get("jax")
  return jax is not None and isinstance(x, jax.Array)


def _torch_int(size: int):
  """The torch integer dtype of ``size`` bytes, to reinterpret bits."""
  torch = _torch()
  return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def is_torch_tensor(x: Any) -> bool:
  """Whether ``x`` is a ``torch.Tensor`` (without importing torch when nobody else has)."""
  torch = sys.modules.get("torch")
  return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x: Any) -> str:
  """The dtype of a torch tensor, numpy array or JAX array as torch and numpy both spell it (``"bfloat16"``)."""
  if is_torch_tensor(x):
    return str(x.dtype).removeprefix("torch.")
  return _name_of(np.dtype(x.dtype))


@functools.lru_cache(maxsize=None)
def _name_of(dtype: np.dtype) -> str:
  return dtype.name  # computed in Python by numpy 2, at a cost that shows on checkpoints of many small tensors


@functools.lru_cache(maxsize=None)
def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype called ``name``, including the ml_dtypes ones JAX uses (bfloat16, float8_*)."""
  try:
    return np.dtype(name)
  except TypeError:  # not one of numpy's own; ml_dtypes is imported only then (it takes a good part of a second)
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return np.dtype(getattr(ml_dtypes, name, name))


_NO_NUMPY_COUNTERPART = frozenset({"complex32", "float4_e2m1fn_x2"})
"""torch dtypes that a same-named numpy (ml_dtypes) type does not hold bit for bit: ml_dtypes' complex32 is
another type, and torch packs two float4 values per byte."""


def check_convertible(x: Any, key: str = "tensor") -> str:
  """Refuses, naming ``key``, a tensor that cannot cross as a dense array of the same dtype and bits: sparse,
  quantized or meta torch tensors, and dtypes numpy and JAX cannot hold; returns its :func:`dtype_name`.

  Raises:
    DTypeError: saying what the tensor is and what to do about it.
  """
  if is_torch_tensor(x):
    torch = _torch()
    if x.layout != torch.strided:
      raise DTypeError(f"{key!r} is a {str(x.layout).removeprefix('torch.')} tensor; only dense tensors convert "
                       "(call .to_dense() on it first)")
    if x.is_quantized:
      raise DTypeError(f"{key!r} is a quantized tensor ({dtype_name(x)}); dequantize it first (.dequantize())")
    if x.device.type == "meta":
      raise DTypeError(f"{key!r} is a meta tensor: it has a shape but no data")
  name = dtype_name(x)
  if not _has_numpy_counterpart(name):
    raise DTypeError(f"{key!r} has dtype {name}, which numpy and JAX cannot hold; cast it first")
  return name


@functools.lru_cache(maxsize=None)
def _has_numpy_counterpart(name: str) -> bool:
  try:
    return name not in _NO_NUMPY_COUNTERPART and numpy_dtype(name) is not None
  except TypeError:
    return False


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
    return x.view(_torch_int(x.element_size())).numpy().view(numpy_dtype(dtype_name(x)))


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
  return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="interop-copy")


def _reverse3(src: np.ndarray, dst: np.ndarray) -> None:
  """``dst[c, b, a] = src[a, b, c]`` in L2-sized tiles; large arrays on all cores (numpy releases the GIL)."""
  a, b, c = src.shape
  budget = max(1, _TILE_BYTES // src.itemsize)
  tc = c if c * 64 <= budget else max(1, int(budget ** 0.5))  # a conv's few taps stay whole
  tb = min(b, max(1, int((budget // tc) ** 0.5)))
  ta = min(a, max(1, budget // tc // tb))  # runs of ta contiguous elements on the write side

  def rows(a0: int) -> None:
    for b0 in range(0, b, tb):
      for c0 in range(0, c, tc):
        dst[c0:c0 + tc, b0:b0 + tb, a0:a0 + ta] = src[a0:a0 + ta, b0:b0 + tb, c0:c0 + tc].transpose(2, 1, 0)

  starts = range(0, a, ta)
  if src.nbytes < _PARALLEL_MIN_BYTES:
    for a0 in starts:
      rows(a0)
  else:
    list(_pool().map(rows, starts))


def _fresh_pages(nbytes: int) -> np.ndarray:
  """``nbytes`` of anonymous memory in transparent huge pages, faulted in by the kernel in one call.

  A fresh multi-megabyte buffer otherwise takes one page fault per 4 KiB on first write, which costs more than
  the copy into it (0.3-1 GB/s on a VM, against 5-7 GB/s this way).
  """
  region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  for advice in (mmap.MADV_HUGEPAGE, getattr(mmap, "MADV_POPULATE_WRITE", 23)):  # 23: Linux >= 5.14
    with contextlib.suppress(OSError):  # advice only: a kernel without it still gives working memory
      region.madvise(advice)
  return np.frombuffer(region, np.uint8)


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """An uninitialised C-contiguous array whose data is 64-byte aligned (page-aligned huge pages when large).

  ``jax.device_put`` on a CPU device adopts a numpy array's memory only when it is 64-byte aligned and copies it
  otherwise; numpy itself only guarantees 16 bytes, which would cost a second copy of every tensor.
  """
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  if nbytes >= _FRESH_PAGES_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
    return _fresh_pages(nbytes).view(dtype).reshape(tuple(shape))
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


def host_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """:func:`aligned_empty` where alignment pays (JAX adopts aligned memory without a copy), a plain ``np.empty``
  below 64 KiB, where a copy costs less than aligning (a checkpoint of many small tensors shows the difference)."""
  dtype = np.dtype(dtype)
  if math.prod(shape) * dtype.itemsize < _ALIGNED_MIN_BYTES:
    return np.empty(shape, dtype)
  return aligned_empty(shape, dtype)


def _by_rows(n: int, nbytes: int, fn: Callable[[slice], Any]) -> list:
  """``fn`` over row slices of ``range(n)``, one per core when ``nbytes`` is worth it (numpy releases the GIL).

  Copying into fresh memory is bound by page faults as much as by bandwidth; cores fault in parallel.
  """
  workers = 1 if nbytes < _PARALLEL_MIN_BYTES or n < 2 else os.cpu_count() or 1  # cpu_count is a syscall
  if workers == 1:
    return [fn(slice(0, n))]
  bounds = np.linspace(0, n, min(n, workers) + 1).astype(int)
  return list(_pool().map(fn, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))


def copy_host(a: np.ndarray, perm: Sequence[int] = (), dtype: Any = None) -> np.ndarray:
  """A new, aligned, C-contiguous copy of ``a.transpose(perm)`` (of ``a`` for ``perm=()``), cast to ``dtype``.

  Layout transposes of large arrays run tiled (a naive strided transpose of a big kernel reaches about 0.5 GB/s,
  L2-sized tiles several GB/s); everything else is copied row block by row block on all cores.
  """
  perm = tuple(perm) or tuple(range(a.ndim))
  out = aligned_empty([a.shape[p] for p in perm], a.dtype if dtype is None else dtype)
  groups = _group_reversal(perm)
  if groups is not None and out.dtype == a.dtype and a.nbytes >= _TILED_MIN_BYTES:
    i, j = groups
    shape = a.shape
    src = a.reshape(int(np.prod(shape[:i])), int(np.prod(shape[i:j])), int(np.prod(shape[j:])))
    _reverse3(src, out.reshape(src.shape[::-1]))
  elif a.ndim == 0:
    np.copyto(out, a, casting="unsafe")
  else:
    view = a.transpose(perm)
    _by_rows(out.shape[0], out.nbytes, lambda rows: np.copyto(out[rows], view[rows], casting="unsafe"))
  return out


def inverse_perm(perm: Sequence[int]) -> tuple[int, ...]:
  """The permutation that undoes ``perm`` (``()`` stays ``()``: no permutation)."""
  return tuple(int(i) for i in np.argsort(perm)) if perm else ()


def _devices_of(placement: Placement) -> tuple:
  jax = _jax()
  if placement is None:
    return (jax.devices()[0],)
  if isinstance(placement, jax.sharding.Sharding):
    return tuple(placement.device_set)
  return (placement,)


def _lands_on_host(placement: Placement) -> bool:
  """Whether ``device_put`` would keep host memory (CPU devices may alias numpy arrays instead of copying)."""
  return all(d.platform == "cpu" for d in _devices_of(placement))


def _x64_target(dtype: np.dtype, key: str) -> Optional[np.dtype]:
  """The dtype JAX holds instead of ``dtype`` when ``jax_enable_x64`` is off (None: ``dtype`` itself).

  64-bit integers are narrowed (exactly, checked by :func:`_check_range`); the torch dtype stays in the spec, so
  the way back restores it. 64-bit floats are refused: JAX would round them.
  """
  target = _canonical(dtype, _x64_enabled())
  if target == dtype:
    return None
  if dtype.kind in "iu":
    return target
  raise DTypeError(f"{key!r} is {dtype}, but jax_enable_x64 is off, so JAX would round it to {target}; "
                   "enable it with jax.config.update('jax_enable_x64', True) or cast the tensor first")


_NARROWED = {np.dtype(np.float64): np.dtype(np.float32), np.dtype(np.int64): np.dtype(np.int32),
             np.dtype(np.uint64): np.dtype(np.uint32), np.dtype(np.complex128): np.dtype(np.complex64)}
"""What JAX holds the 64-bit dtypes in with ``jax_enable_x64`` off (``jax.dtypes.canonicalize_dtype``)."""


def _x64_enabled() -> bool:
  """``jax_enable_x64``: JAX's flag once JAX is imported; before, the ``JAX_ENABLE_X64`` variable it starts from
  (so a command that never imports JAX checks dtypes as one that does)."""
  jax = sys.modules.get("jax")
  if jax is not None:
    return bool(jax.config.jax_enable_x64)
  return os.environ.get("JAX_ENABLE_X64", "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def _canonical(dtype: np.dtype, x64: bool) -> np.dtype:
  return dtype if x64 else _NARROWED.get(dtype, dtype)


def _check_range(low: int, high: int, dtype: np.dtype, target: np.dtype, key: str) -> None:
  info = np.iinfo(target)
  if low < info.min or high > info.max:
    raise DTypeError(f"{key!r} is {dtype} with values outside {target}'s range and jax_enable_x64 is off; "
                     "enable it with jax.config.update('jax_enable_x64', True)")


def narrowed_dtype(view: np.ndarray, key: str) -> Optional[np.dtype]:
  """The dtype JAX will hold ``view`` in when ``jax_enable_x64`` is off (None: its own), after checking the
  values fit it.

  Raises:
    DTypeError: float64/complex128 with x64 off, or 64-bit integers outside the 32-bit range.
  """
  target = _x64_target(view.dtype, key)
  if target is not None and view.size:
    _check_range(view.min(), view.max(), view.dtype, target, key)
  return target


def _on_accelerator(x: Any) -> bool:
  """Whether ``x`` is a torch tensor off the CPU (it then crosses through DLPack on its own device)."""
  return is_torch_tensor(x) and x.device.type != "cpu"


@functools.lru_cache(maxsize=1)
def _jitted_transpose() -> Callable:
  jax = _jax()
  return jax.jit(jax.numpy.transpose, static_argnums=1)


def _transpose(x, perm: tuple[int, ...]):
  return _jitted_transpose()(x, perm)


def _accelerator_to_jax(x, perm: Sequence[int], copy: bool, key: str):
  """A torch accelerator tensor as a JAX array on the same device, through DLPack (no host round trip)."""
  x = x.detach()
  dtype = numpy_dtype(dtype_name(x))
  target = _x64_target(dtype, key)
  if target is not None:  # narrowed on the device
    if x.numel():
      _check_range(int(x.min()), int(x.max()), dtype, target, key)
    x = x.to(getattr(_torch(), target.name))
  jax = _jax()
  arr = jax.dlpack.from_dlpack(x.contiguous())
  if perm:
    return _transpose(arr, tuple(perm))
  return jax.numpy.copy(arr) if copy else arr


def to_jax(x: Any, placement: Placement = None, *, perm: Sequence[int] = (), copy: bool = True,
           key: str = "tensor"):
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
  jax = _jax()
  perm = tuple(perm)
  if _on_accelerator(x):
    arr = _accelerator_to_jax(x, perm, copy, key)
    return arr if placement is None else jax.device_put(arr, placement)
  view = host_view(x)
  target = narrowed_dtype(view, key)
  if target is not None:
    view = copy_host(view, perm, dtype=target)
  elif perm or (copy and _lands_on_host(placement)):  # else device_put would adopt x's memory
    view = copy_host(view, perm)
  return jax.device_put(view, placement)


def _same_bits(view: np.ndarray, value: int, out: Optional[np.ndarray] = None) -> np.ndarray:
  """Elementwise: is the element bit for bit ``value`` in ``view``'s dtype (so -0.0 is not 0)."""
  ref = np.full((), value, view.dtype)
  size = view.dtype.itemsize
  if size in _UINT_OF_SIZE:
    return np.equal(view.view(_UINT_OF_SIZE[size]), ref.view(_UINT_OF_SIZE[size]), out=out)
  raw = np.ascontiguousarray(view).view(np.uint8).reshape(*view.shape, size)
  return np.all(raw == ref.reshape(1).view(np.uint8), axis=-1, out=out)


def _count_binary(view: np.ndarray, is_one: np.ndarray) -> int:
  """Writes ``view == 1`` (bit for bit) into ``is_one``; returns how many entries are exactly 0 or 1.

  Zeros are counted straight from the bits, with no temporary array.
  """
  _same_bits(view, 1, out=is_one)
  size = view.dtype.itemsize
  if size in _UINT_OF_SIZE:
    zeros = view.size - np.count_nonzero(view.view(_UINT_OF_SIZE[size]))
  else:
    zeros = np.count_nonzero(_same_bits(view, 0))
  return int(np.count_nonzero(is_one)) + int(zeros)


def binary_mask_host(view: np.ndarray, key: str = "mask") -> np.ndarray:
  """A torch mask (any dtype) as a new aligned bool array, after checking each value is exactly 0 or 1 bit for bit.

  -0.0 and NaN are refused along with 0.5: a bool mask cannot give back their bits.

  Raises:
    MaskError: naming ``key``, the first offending index and value, and how many values are offending.
  """
  is_one = host_empty(view.shape, bool)
  if view.ndim == 0:
    binary = _count_binary(view, is_one)
  else:
    binary = sum(_by_rows(view.shape[0], view.nbytes, lambda rows: _count_binary(view[rows], is_one[rows])))
  if binary != view.size:
    flat = int(np.flatnonzero(~(_same_bits(view, 1) | _same_bits(view, 0)))[0])
    index = tuple(int(i) for i in np.unravel_index(flat, view.shape))
    raise MaskError(
        f"mask {key!r} holds {view[index]!r} at index {index} ({view.size - binary} values in all are neither 0 "
        "nor 1); a lossless mask is exactly 0 or 1 bit for bit (torch's custom_from_mask also accepts scaling "
        "masks such as 0.5, which a boolean mask cannot represent)")
  return is_one


def _accelerator_mask_to_jax(x, key: str):
  """Checked and turned into bool on the tensor's own device; only a bad mask's message needs the host."""
  torch = _torch()
  x = x.detach()
  if x.element_size() not in _INT_OF_SIZE:  # 16-byte complex: no integer view in torch
    return _jax().numpy.asarray(binary_mask_host(host_view(x), key))
  as_int = _torch_int(x.element_size())
  bits = x.view(as_int)
  is_one = bits == torch.ones((), dtype=x.dtype, device=x.device).view(as_int)
  if not bool((is_one | (bits == 0)).all()):
    binary_mask_host(host_view(x), key)  # raises with the offending index and value
  return _jax().dlpack.from_dlpack(is_one.contiguous())


def mask_to_jax(x: Any, placement: Placement = None, *, perm: Sequence[int] = (), key: str = "mask"):
  """A torch mask (in its parameter's dtype, spec §8.2) as a validated bool JAX array, permuted like its param.

  Raises:
    MaskError: a value other than exactly 0 or 1.
  """
  jax = _jax()
  perm = tuple(perm)
  if _on_accelerator(x):
    mask = _accelerator_mask_to_jax(x, key)
    mask = _transpose(mask, perm) if perm else mask
    return mask if placement is None else jax.device_put(mask, placement)
  mask = binary_mask_host(host_view(x), key)
  return jax.device_put(copy_host(mask, perm) if perm else mask, placement)


def _on_one_accelerator(arr: Any) -> bool:
  """Whether ``arr`` is a JAX array on a single non-CPU device (it then crosses through DLPack)."""
  return _is_jax_array(arr) and len(arr.devices()) == 1 and next(iter(arr.devices())).platform != "cpu"


def _host_of(arr: Any) -> tuple[np.ndarray, bool]:
  """A host numpy array of ``arr`` and whether it is a private copy.

  ``np.asarray`` of a JAX array is a read-only view of its buffer (or of a cached gathered copy), never private,
  so a sharded array is gathered here instead, shard by shard, into memory the caller owns.
  """
  if _is_jax_array(arr) and len(arr.devices()) > 1:
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
    if perm:
      t = t.permute(perm)
    if perm or copy:  # clone, not contiguous(): a permuted view can already be contiguous (size-1 axes)
      t = t.clone(memory_format=torch.contiguous_format)
    return t.to(getattr(torch, dtype))
  host, private = _host_of(arr)
  target = numpy_dtype(dtype)
  if perm or host.dtype != target:
    host, private = copy_host(host, perm, dtype=target), True
  if not private:
    if not copy and tensors == "torch" and _is_jax_array(arr):
      return _torch().from_dlpack(arr)
    if copy:
      host = copy_host(host)
  return torch_from_host(host) if tensors == "torch" else host


def mask_to_torch(mask: Any, dtype: str, *, perm: Sequence[int] = (), tensors: str = "torch"):
  """A bool mask as torch stores it: 0/1 in ``dtype`` (the parameter's dtype, spec §8.2), permuted by ``perm``."""
  perm = tuple(perm)
  if tensors == "torch" and _on_one_accelerator(mask):
    torch = _torch()
    t = torch.from_dlpack(mask)
    return (t.permute(perm) if perm else t).to(getattr(torch, dtype), memory_format=torch.contiguous_format,
                                                copy=True)
  host, _ = _host_of(mask)
  host = copy_host(copy_host(host, perm) if perm else host, dtype=numpy_dtype(dtype))
  return torch_from_host(host) if tensors == "torch" else host


PlacementFn = Callable[[str, tuple[int, ...]], Placement]
"""A per-leaf placement: ``(path, shape) -> Device | Sharding | None``; path as ``"params/conv1/kernel"``."""


def resolve_placement(device: Union[Placement, PlacementFn], path: str, shape: tuple[int, ...]) -> Placement:
  """The placement of one leaf: ``device`` itself, or what the per-leaf function returns for it."""
  jax = sys.modules.get("jax")  # a Device or Sharding exists only once JAX is imported
  if callable(device) and not (jax is not None and isinstance(device, (jax.Device, jax.sharding.Sharding))):
    return device(path, shape)
  return device
