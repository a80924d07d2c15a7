"""Reading and writing state_dict files safely.

* The format is recognised from the file's first bytes, not its name: a safetensors file starts with its header's
  length (8 bytes, little-endian) and then ``{``, which is checked first; a zip or pickle is a torch checkpoint
  (``.pt``/``.pth``/``.bin``).
* safetensors are read here, with numpy, from a header that is checked in full first (no duplicate keys, known
  dtypes, shapes that fit their byte ranges, ranges inside the file): no torch needed, and a hostile header gives
  a :class:`CheckpointError`, never a panic or an allocation the size of a lie. Keys come in file order: the
  order of the header, or, in a file written here, the order kept in its metadata (which also places tied keys).
* safetensors are written here too, header and data in the state_dict's order (``safetensors.numpy.save_file``
  would sort them), so the file itself keeps the order for any reader. A safetensors file cannot hold one tensor
  under two names: as ``safetensors.torch.save_model`` does, tied keys (:mod:`interop.ties`) are stored once, under
  the first key, and the metadata records the ties, which reading restores (the keys then share one array).
* torch checkpoints are read only with ``torch.load(weights_only=True)``: a pickle that needs anything beyond
  tensors and plain containers (``os.system``, a model class, ...) is refused and nothing in it runs.
* With ``mmap=True`` a file is mapped, not read: a safetensors file's tensors are numpy views of a private
  (copy-on-write) mapping, a torch zip's come from ``torch.load(mmap=True)``, so reading costs no memory and a tensor
  is paged in when first touched (the ``jaxprune`` commands read this way; :mod:`interop.pages` gives touched pages
  back). Writing to such an array never reaches the file; the file must not be changed in place while mapped.
* A sharded checkpoint (an index ``*.index.json`` and its shards, or the folder holding them, as Hugging Face
  ships large models) reads and writes through the same functions (:mod:`interop.shards`).
* Every write goes to a private temporary folder beside the target, is flushed to disk, then renamed over the
  target (a folder is swapped in with one atomic exchange where Linux offers it): a failure or a signal at any
  point leaves the old file or folder (or none), never a half-written one. Temporary folders are locked while in
  use, so the next write to the same target removes any that a killed process left behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import mmap as mmap_lib
import os
import pickle
import re
import shutil
import stat
import uuid
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from interop import devices, ties as ties_lib
from interop.errors import CheckpointError, DTypeError, UnsafeCheckpointError

KEYS_METADATA = "interop.keys"
"""safetensors metadata entry holding the state_dict's key order (a JSON list), tied keys included."""
TIES_METADATA = "interop.ties"
"""safetensors metadata entry holding the tie groups (a JSON list of key lists; the first key of each is stored)."""

SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
                      "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
                      "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                      "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64"}
"""safetensors dtype codes -> numpy (ml_dtypes) names; what safetensors knows beyond these (F4, F6_*), numpy and
JAX cannot hold."""
_HEADER_MAX = 100 * 2**20  # safetensors' own limit on the header's size


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_pattern(name: str) -> re.Pattern:
  return re.compile(re.escape(f".{name}.") + r"[0-9a-f]{32}\.tmp")


def _locked(folder: str) -> int:
  """An open descriptor of ``folder`` holding its exclusive lock (raises BlockingIOError if someone holds it)."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BaseException:
    os.close(fd)
    raise
  return fd


def remove_stale(path: str) -> list[str]:
  """Removes the temporary folders of earlier writes to ``path`` whose process died (SIGKILL, power loss).

  A live writer holds the lock on its folder, so only abandoned ones are removed. Returns their paths.
  """
  folder, name = os.path.split(os.path.abspath(path))
  pattern, removed = _tmp_pattern(name), []
  for entry in os.listdir(folder):
    if not pattern.fullmatch(entry):
      continue
    stale = os.path.join(folder, entry)
    try:
      fd = _locked(stale)
    except OSError:  # held by a live writer, or gone already
      continue
    try:
      shutil.rmtree(stale, ignore_errors=True)
      removed.append(stale)
    finally:
      os.close(fd)
  return removed


def _default_mode(tmp_dir: str) -> int:
  """The mode a new file gets here (0o666 less the umask), read from a probe file rather than os.umask, which
  would change the process-wide umask for a moment."""
  probe = os.path.join(tmp_dir, ".mode")
  os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
  mode = os.stat(probe).st_mode & 0o7777
  os.unlink(probe)
  return mode


def _exchange(a: str, b: str) -> bool:
  """Swaps two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  if renameat2 is None:
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a file system without it
    return False
  raise OSError(err, os.strerror(err), b)


def _swap_in_folder(new: str, path: str, tmp_dir: str) -> None:
  """Puts the folder ``new`` at ``path``; an old folder there moves into ``tmp_dir`` (removed with it)."""
  if not os.path.lexists(path):
    os.rename(new, path)
  elif not _exchange(new, path):  # two renames: for a moment there is no folder at path, but never a broken one
    old = os.path.join(tmp_dir, ".old")
    os.rename(path, old)
    try:
      os.rename(new, path)
    except BaseException:
      os.rename(old, path)
      raise


def _fsync(path: str) -> None:
  with contextlib.suppress(OSError):  # make a rename durable where the platform allows it
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_write(path: "os.PathLike[str] | str") -> Iterator[str]:
  """Yields a temporary path for ``path``; on a clean exit what was written there replaces ``path`` atomically,
  on any exception (KeyboardInterrupt included) it is removed and ``path`` is left as it was.

  The temporary path lies in a locked folder ``.<name>.<hex>.tmp`` beside ``path``, so the writer's own temporary
  files land there too. Write a file, or a folder (an Orbax checkpoint, say), which is then swapped in whole. A
  file keeps the mode of the file it replaces, or gets the default mode (umask applied) when it is new.
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  remove_stale(path)
  tmp_dir = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
  os.mkdir(tmp_dir, 0o700)
  try:
    lock = _locked(tmp_dir)
  except BaseException:
    os.rmdir(tmp_dir)
    raise
  try:
    mode = os.stat(path).st_mode & 0o7777 if os.path.isfile(path) else _default_mode(tmp_dir)
    tmp = os.path.join(tmp_dir, name)
    yield tmp
    if os.path.isdir(tmp):
      _swap_in_folder(tmp, path, tmp_dir)
    else:
      os.chmod(tmp, mode)
      _fsync(tmp)
      os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.close(lock)
  _fsync(folder)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _regular_file(path: str) -> int:
  """The file's size; refuses what is not a regular file (a FIFO or a device would block or never end)."""
  try:
    info = os.stat(path)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  if not stat.S_ISREG(info.st_mode):
    kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe or a device?)"
    raise CheckpointError(f"{path} is {kind}; a checkpoint is a regular file")
  return info.st_size


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  """An 8-byte header length that fits the file, then ``{``: checked before the torch signatures, because a
  length of 128 mod 256 makes the first byte 0x80, a pickle's first byte."""
  return len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _sniff(path: str) -> str:
  size = _regular_file(path)
  with open(path, "rb") as f:
    head = f.read(9)
  if not head:
    raise CheckpointError(f"{path}: the file is empty")
  if _looks_like_safetensors(head, size):
    return "safetensors"
  if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
    return "torch"
  raise CheckpointError(f"{path}: neither a torch checkpoint (zip or pickle) nor safetensors (first bytes {head!r})")


def _object(value: Any, what: str, name: Any = None) -> dict:
  """A JSON object parsed with ``object_pairs_hook=list`` (a list of ``(key, value)`` tuples; a JSON array is a
  list of other things) as a dict, refusing a key given twice (safetensors itself lets the last one win).

  ``what`` (``% name`` when given) names it in errors; it is formatted only then, as this runs once per tensor.
  """
  if type(value) is not list or not all(type(pair) is tuple for pair in value):  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f"{what if name is None else what % (name,)} is not a JSON object")
  out = dict(value)
  if len(out) != len(value):
    seen: set = set()
    twice = next(k for k, _ in value if k in seen or seen.add(k))
    raise ValueError(f"{what if name is None else what % (name,)}: key {twice!r} appears twice")
  return out


class Header(NamedTuple):
  """A checked safetensors header: ``tensors`` name -> (numpy dtype, shape, begin, end) in file order, the string
  ``metadata``, and where the data starts."""
  tensors: dict
  metadata: dict
  data_start: int


def _naturals(xs: Any) -> bool:
  return type(xs) is list and all(type(x) is int for x in xs) and min(xs, default=0) >= 0  # pylint: disable=unidiomatic-typecheck


def _tensor_entry(name: str, value: Any, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
  info = _object(value, "entry %r", name)
  if info.keys() != {"dtype", "shape", "data_offsets"}:
    raise ValueError(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
  code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
    raise DTypeError(f"tensor {name!r} has dtype {code!r}, which numpy and JAX cannot hold (known: "
                     f"{', '.join(SAFETENSORS_DTYPES)})")
  if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
    raise ValueError(f"tensor {name!r} has shape {shape!r} and data_offsets {offsets!r}: expected lists of "
                     "non-negative integers")
  dtype = devices.numpy_dtype(SAFETENSORS_DTYPES[code])  # cached: one lookup per dtype, not per tensor
  begin, end = offsets
  if not begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
    raise ValueError(f"tensor {name!r} of dtype {code} and shape {tuple(shape)} has data_offsets {offsets}, which "
                     f"do not fit it or lie outside the {data_size} bytes of data")
  return dtype, tuple(shape), begin, end


def read_header(path: "os.PathLike[str] | str") -> Header:
  """The checked header of a safetensors file.

  Raises:
    CheckpointError: not a safetensors file, or a header that is truncated, not JSON, lists a key twice, or
      describes tensors that do not fit the file; DTypeError: a dtype numpy and JAX cannot hold.
  """
  path = os.fspath(path)
  size = _regular_file(path)
  with open(path, "rb") as f:
    head = f.read(8)
    length = int.from_bytes(head, "little")
    if len(head) < 8 or length > min(_HEADER_MAX, size - 8):
      raise CheckpointError(f"{path}: not a safetensors file, or truncated (header length {length}, file size "
                            f"{size})")
    raw = f.read(length)
  try:
    # list, a C builtin, as the hook: a Python hook per object would cost more than the parse itself
    header = _object(json.loads(raw.decode("utf-8"), object_pairs_hook=list), "the header")
    metadata = _object(header.pop("__metadata__", []) or [], "__metadata__")
    if not all(isinstance(v, str) for v in metadata.values()):
      raise ValueError("__metadata__ is not a map of strings")
    tensors = {name: _tensor_entry(name, info, size - 8 - length) for name, info in header.items()}
  except DTypeError as err:
    raise DTypeError(f"{path}: {err}") from None
  except ValueError as err:  # json's errors and UnicodeDecodeError are ValueErrors too
    raise CheckpointError(f"{path}: corrupt safetensors header: {err}") from None
  return Header(tensors, metadata, 8 + length)


def _physical_memory() -> Optional[int]:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):  # not on every platform
    return None


def _read_exactly(f, out: np.ndarray, path: str, name: str) -> None:
  view = memoryview(out.reshape(-1).view(np.uint8))
  while view.nbytes:
    n = f.readinto(view)
    if not n:
      raise CheckpointError(f"{path}: truncated inside tensor {name!r}")
    view = view[n:]


def _json_list(text: Optional[str]) -> Any:
  try:
    return json.loads(text) if text is not None else None
  except ValueError:
    return None


def _stored_ties(metadata: Mapping[str, str], tensors: Mapping[str, Any]) -> dict[str, str]:
  """alias -> stored key for the keys a writer dropped as duplicates: ``interop.ties`` (written here), or else
  ``safetensors.torch.save_model``'s entries ``{dropped key: kept key}`` (a metadata key that names no tensor
  and whose value names one)."""
  groups = _json_list(metadata.get(TIES_METADATA))
  if groups is not None:
    return {alias: group[0] for group in groups if isinstance(group, list) and group and group[0] in tensors
            for alias in group[1:] if isinstance(alias, str) and alias not in tensors}
  return {k: v for k, v in metadata.items() if k not in tensors and v in tensors and not k.startswith(
      ("interop.", "jaxprune.")) and k != "format"}


def _mapped_arrays(path: str, header: Header) -> dict[str, np.ndarray]:
  """The tensors as views of one private mapping of the file (writable: a write copies the page, the file stays)."""
  with open(path, "rb") as f:
    region = mmap_lib.mmap(f.fileno(), 0, access=mmap_lib.ACCESS_COPY)
  data = np.frombuffer(region, np.uint8)  # the views keep the mapping alive; it closes with the last of them
  start = header.data_start
  return {name: data[start + begin:start + end].view(dtype).reshape(shape)
          for name, (dtype, shape, begin, end) in header.tensors.items()}


def _read_safetensors(path: str, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  header = read_header(path)
  aliases = _stored_ties(header.metadata, header.tensors)
  order = _json_list(header.metadata.get(KEYS_METADATA))
  if not (isinstance(order, list) and all(isinstance(k, str) for k in order)
          and sorted(order) == sorted([*header.tensors, *aliases])):
    order = [*header.tensors, *aliases]  # file order; a dropped duplicate has no place there but after the rest
  arrays = _mapped_arrays(path, header) if mmap and header.tensors else _read_arrays(path, header)
  arrays.update((alias, arrays[stored]) for alias, stored in aliases.items())  # one array: the tie is back
  return {name: arrays[name] for name in order}, header.metadata


def _read_arrays(path: str, header: Header) -> dict[str, np.ndarray]:
  """The tensors read into memory of their own, in the order of their bytes in the file."""
  arrays, memory = {}, _physical_memory()
  with open(path, "rb") as f:
    for name, (dtype, shape, begin, end) in sorted(header.tensors.items(), key=lambda kv: kv[1][2]):
      # A (sparse) file may hold a tensor larger than memory: refuse it rather than let the kernel's overcommit
      # hand out memory that the read then cannot have.
      try:
        if memory is not None and end - begin > memory:
          raise MemoryError
        arrays[name] = devices.host_empty(shape, dtype)
      except (MemoryError, OSError):  # mmap says ENOMEM with an OSError
        raise CheckpointError(f"{path}: tensor {name!r} ({end - begin:,} bytes) does not fit in memory") from None
      f.seek(header.data_start + begin)
      _read_exactly(f, arrays[name], path, name)
  return arrays


def _torch_reason(err: Exception) -> Optional[str]:
  """The line of a weights_only failure that says what was refused (``Unsupported global: ...``), if any."""
  return next((line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()), None)


def _read_torch(path: str, mmap: bool = False) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise CheckpointError(f"{path} is a torch checkpoint; reading it needs torch (pip install 'jaxprune[torch]'), "
                          "or save it as safetensors") from err
  try:
    if mmap and not path.endswith(".safetensors") and _is_zip(path):  # torch maps zip files only
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # A file object, not the path: torch.load hands any path ending in .safetensors to safetensors, unchecked.
    with open(path, "rb") as f:
      return torch.load(f, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    reason = _torch_reason(err)
    if reason is None:
      raise CheckpointError(f"{path}: cannot unpickle it, it is truncated or corrupt ({err})") from err
    if reason.lower().startswith("unsupported operand"):  # an opcode, not an object: harmless but unreadable
      raise CheckpointError(
          f"{path}: written with a pickle protocol (e.g. torch.save(..., pickle_protocol=4)) whose opcodes torch's "
          f"safe loader cannot read ({reason}); nothing in it was run. Save it again with torch.save's default "
          "protocol, or as safetensors") from None
    raise UnsafeCheckpointError(
        f"{path}: refused: the pickle needs more than tensors to load ({reason}), and nothing in it was run. Only "
        "if you trust where it came from, load it yourself with torch.load(weights_only=False) and pass the "
        "state_dict") from None
  except Exception as err:  # zip, storage and EOF errors of a broken file
    raise CheckpointError(f"{path}: cannot read it as a torch checkpoint, it is truncated or corrupt "
                          f"({type(err).__name__}: {err})") from err


def _is_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def _state_dict_of(obj: Any, path: str, key: Optional[str]) -> dict[str, Any]:
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      found = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
      raise CheckpointError(f"{path}: no entry {key!r} (found {found})")
    obj = obj[key]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  for name, value in obj.items():
    if not (isinstance(name, str) and hasattr(value, "shape") and hasattr(value, "dtype")):
      nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
      hint = f"; pass key={nested[0]!r} if the state_dict is in there" if nested else ""
      raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor{hint}")
    try:
      if devices.is_torch_tensor(value):  # a safetensors header's dtypes were checked already
        devices.check_convertible(value, name)
    except DTypeError as err:
      raise DTypeError(f"{path}: {err}") from None
  return dict(obj)


def load_state_dict(path: "os.PathLike[str] | str", *, key: Optional[str] = None,
                    mmap: bool = False) -> dict[str, Any]:
  """Reads a state_dict from a torch checkpoint (torch tensors) or a safetensors file (numpy arrays, no torch).

  Args:
    path: the file; its format is recognised from its content. Or a sharded checkpoint: its index
      (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) or the folder holding it; or a folder
      holding one ``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face model saved unsharded).
    key: the entry holding the state_dict when the file wraps it (``{"state_dict": ..., "epoch": 3}``).
    mmap: map the file instead of reading it (see the module docstring): no memory is spent until a tensor is
      touched, and a checkpoint larger than memory can be read tensor by tensor.

  Raises:
    UnsafeCheckpointError: a pickle that references anything beyond tensors; it is not executed.
    CheckpointError: an empty, truncated, corrupt or unknown file, or one that holds no state_dict.
    DTypeError: a tensor numpy and JAX cannot hold (sparse, quantized, meta, complex32, float4, ...).
  """
  return load_with_metadata(path, key=key, mmap=mmap)[0]


def load_with_metadata(path: "os.PathLike[str] | str", *, key: Optional[str] = None, mmap: bool = False
                       ) -> tuple[dict[str, Any], dict[str, str]]:
  """:func:`load_state_dict` and, from the same read of the header, the safetensors metadata (``{}`` for torch;
  a sharded checkpoint's index metadata, for one)."""
  from interop import shards  # pylint: disable=import-outside-toplevel  # shards reads each shard through here
  path = os.fspath(path)
  index = shards.find_index(path)
  if index is not None:
    return shards.load(index, key=key, mmap=mmap)
  path = shards.find_single(path) or path  # a Hugging Face folder of an unsharded model: its weights file
  if _sniff(path) == "safetensors":
    obj, metadata = _read_safetensors(path, mmap)
  else:
    obj, metadata = _read_torch(path, mmap), {}
  return _state_dict_of(obj, path, key), metadata


def read_metadata(path: "os.PathLike[str] | str") -> dict[str, str]:
  """The string metadata of a safetensors file (``{}`` when it has none)."""
  path = os.fspath(path)
  if _sniff(path) != "safetensors":
    raise CheckpointError(f"{path} is not a safetensors file")
  return dict(read_header(path).metadata)


_SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
_ALIGNMENT = 64
"""The data starts at a multiple of 64 bytes (safetensors' own writer pads its header to 8): the tensors of a
mapped file are then 64-byte aligned (all but those after a tensor of an odd size), which JAX's CPU client needs
to use their memory as it is rather than copy it."""


class Deferred(NamedTuple):
  """A tensor to write, known by its dtype and shape until the writer asks for it: ``make()`` returns the array
  (dtype and shape as said), made then and dropped once written, so a writer of deferred tensors holds one at a
  time (``jaxprune convert --layout flax`` converts a checkpoint larger than memory this way)."""
  dtype: np.dtype
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _check_storable(name: str, dtype: np.dtype, path: str) -> None:
  if dtype.name not in _SAFETENSORS_CODES:
    raise DTypeError(f"{path}: tensor {name!r} is {dtype.name}, which safetensors cannot store; write a torch "
                     "checkpoint (.pt) instead")


def _storable(name: str, array: np.ndarray, path: str) -> np.ndarray:
  """``array`` as safetensors stores it (C-contiguous, little-endian), or a DTypeError naming ``name``."""
  _check_storable(name, array.dtype, path)
  if array.dtype.byteorder == ">":  # safetensors is little-endian
    array = array.astype(array.dtype.newbyteorder("<"))
  return np.require(array, requirements="C")


def _safetensors_arrays(state_dict: Mapping[str, Any], path: str) -> dict[str, Any]:
  """Arrays (and :class:`Deferred` tensors, their dtype checked now) ready to write, every dtype checked."""
  arrays = {}
  for name, value in state_dict.items():
    if isinstance(value, Deferred):
      _check_storable(name, value.dtype, path)
      arrays[name] = value
    else:
      arrays[name] = _storable(name, devices.host_view(value), path)
  return arrays


def _made(name: str, value: Any, path: str) -> np.ndarray:
  """The array to write for ``value``: itself, or what a :class:`Deferred` makes (which must match its header)."""
  if not isinstance(value, Deferred):
    return value
  array = _storable(name, value.make(), path)
  if array.shape != tuple(value.shape) or array.dtype.name != value.dtype.name:
    raise ValueError(f"{path}: tensor {name!r} was announced as {value.dtype.name} {tuple(value.shape)} but made "
                     f"as {array.dtype.name} {array.shape}")
  return array


def write_safetensors(arrays: Mapping[str, Any], path: str, metadata: Mapping[str, str],
                      done: Optional[Callable[[np.ndarray], None]] = None) -> None:
  """A safetensors file with header and data in ``arrays``' order (C-contiguous little-endian arrays, or
  :class:`Deferred` tensors, each made when its turn comes and let go once written).

  ``done(array)`` is called once each array is written (:class:`interop.pages.PageDropper` then gives back the
  pages of a mapped input: converting a file larger than memory holds one tensor at a time).
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, array in arrays.items():
    header[name] = {"dtype": _SAFETENSORS_CODES[array.dtype.name], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-(8 + len(raw)) % _ALIGNMENT)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, value in arrays.items():
      array = _made(name, value, path)
      f.write(array.reshape(-1).view(np.uint8).data)
      if done is not None:
        done(array)
      del array  # before the next one is made: one made tensor at a time


Writer = Callable[[str], None]
"""Writes a checked state_dict to the path it is given (not atomically: the caller gives it a temporary path)."""


def file_writer(state_dict: Mapping[str, Any], path: str, metadata: Optional[Mapping[str, str]] = None,
                done: Optional[Callable[[Any], None]] = None) -> Writer:
  """Checks ``state_dict`` for the kind of file ``path`` names (``.safetensors``, else ``torch.save``) and returns
  the writer of that file: every check runs now, before anything is written. See :func:`save_state_dict`;
  ``done`` is :func:`write_safetensors`'."""
  if path.endswith(".safetensors"):
    tied = ties_lib.find_ties(state_dict)
    aliases = {key for group in tied for key in group[1:]}
    arrays = _safetensors_arrays({k: v for k, v in state_dict.items() if k not in aliases}, path)
    # "format": "pt" as Hugging Face's writers put it (transformers refuses a safetensors file without it)
    meta = {"format": "pt", KEYS_METADATA: json.dumps(list(state_dict)), **(metadata or {})}
    if tied:
      meta[TIES_METADATA] = json.dumps([list(group) for group in tied])
    return lambda target: write_safetensors(arrays, target, meta, done)
  if metadata:
    raise ValueError(f"metadata is stored in safetensors files only, not in {path!r}")
  import torch  # pylint: disable=import-outside-toplevel
  tensors = {}
  canonical = ties_lib.canonical_of(ties_lib.find_ties(state_dict))
  for name, value in state_dict.items():  # numpy arrays tied in memory become one torch tensor, tied in the file
    if name in canonical and canonical[name] != name:
      tensors[name] = tensors[canonical[name]]
    else:
      tensors[name] = value if devices.is_torch_tensor(value) else devices.torch_from_host(np.asarray(value))
  return lambda target: torch.save(tensors, target)


def save_state_dict(state_dict: Mapping[str, Any], path: "os.PathLike[str] | str", *,
                    metadata: Optional[Mapping[str, str]] = None, max_shard_size: "int | str | None" = None,
                    done: Optional[Callable[[Any], None]] = None) -> None:
  """Writes a state_dict atomically: ``.safetensors`` through numpy (no torch needed), anything else with
  ``torch.save``; or, sharded, an index and its shards (:func:`interop.shards.save`).

  Args:
    state_dict: key -> torch tensor or numpy array, in the order to keep. Tied keys (one tensor under several
      names, :func:`interop.ties.find_ties`) stay tied: ``torch.save`` keeps shared storage as it is; a safetensors
      file stores the tensor once, under its first key, and records the ties, which :func:`load_state_dict`
      restores.
    path: the target; an existing file is replaced only once the new one is complete. A path ending in
      ``.index.json`` (``out/model.safetensors.index.json``, ``out/pytorch_model.bin.index.json``) writes a sharded
      checkpoint into its folder.
    metadata: extra string metadata (safetensors only), e.g. ``{"interop.spec": spec.to_json()}``; a sharded
      checkpoint keeps it in its index.
    max_shard_size: the largest shard, in bytes or as ``"5GB"``, ``"500MB"``, ``"2GiB"``: writes a sharded
      checkpoint (into ``path`` as a folder, unless ``path`` names the index). Default for an index path: 5GB.
    done: called with each tensor once it is written (safetensors only; see :func:`write_safetensors`).

  Raises:
    DTypeError: a dtype safetensors cannot store (complex128), checked before anything is written.
  """
  from interop import shards  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if max_shard_size is not None or path.endswith(shards.INDEX_SUFFIX):
    shards.save(state_dict, path, max_shard_size=max_shard_size, metadata=metadata, done=done)
    return
  write = file_writer(state_dict, path, metadata, done)
  with atomic_write(path) as tmp:
    write(tmp)
