"""Reading and writing state_dict files safely.

* The format is recognised from the file's first bytes, not its name: a zip or pickle is a torch checkpoint
  (``.pt``/``.pth``/``.bin``), a JSON header behind its length is safetensors.
* torch checkpoints are read only with ``torch.load(weights_only=True)``: a pickle that needs anything beyond
  tensors and plain containers (``os.system``, a model class, ...) is refused and nothing in it runs.
* safetensors are read and written with the ``safetensors`` package's numpy API: no torch needed. Key order, which
  safetensors does not keep, is stored in the file's metadata and restored.
* Every write goes to a temporary file in the target's folder, is flushed to disk, then renamed over the target: a
  failure at any point leaves the old file (or no file), never a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import uuid
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from interop import devices
from interop.errors import CheckpointError, UnsafeCheckpointError

KEYS_METADATA = "interop.keys"
"""safetensors metadata entry holding the state_dict's key order (a JSON list)."""


@contextlib.contextmanager
def atomic_write(path: "os.PathLike[str] | str") -> Iterator[str]:
  """Yields a temporary path beside ``path``; on a clean exit it replaces ``path`` atomically, else it is removed.

  The result keeps the mode of the file it replaces, or gets the default mode (umask applied) when it is new.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
  # Writers may recreate the file with their own mode: keep the target's mode, or the umask default for a new one.
  mode = os.stat(path if os.path.exists(path) else tmp).st_mode & 0o7777
  try:
    yield tmp
    os.chmod(tmp, mode)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _sniff(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(9)
  if not head:
    raise CheckpointError(f"{path}: the file is empty")
  if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
    return "torch"
  if len(head) == 9 and head[8:9] == b"{":
    return "safetensors"
  raise CheckpointError(f"{path}: neither a torch checkpoint (zip or pickle) nor safetensors (first bytes {head!r})")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(path, framework="numpy") as f:
      names = list(f.keys())
      order = json.loads((f.metadata() or {}).get(KEYS_METADATA, "null"))
      if not isinstance(order, list) or sorted(order) != sorted(names):
        order = names
      return {name: f.get_tensor(name) for name in order}
  except Exception as err:  # safetensors raises its own error type, or OSError/ValueError, for broken files
    raise CheckpointError(f"{path}: cannot read it as safetensors, it is truncated or corrupt "
                          f"({type(err).__name__}: {err})") from err


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise CheckpointError(f"{path} is a torch checkpoint; reading it needs torch (pip install 'jaxprune[torch]'), "
                          "or save it as safetensors") from err
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    reason = next((line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()), None)
    if reason is None:
      raise CheckpointError(f"{path}: cannot unpickle it, it is truncated or corrupt ({err})") from err
    raise UnsafeCheckpointError(
        f"{path}: refused: the pickle needs more than tensors to load ({reason}), and nothing in it was run. Only "
        "if you trust where it came from, load it yourself with torch.load(weights_only=False) and pass the "
        "state_dict") from None
  except Exception as err:  # zip, storage and EOF errors of a broken file
    raise CheckpointError(f"{path}: cannot read it as a torch checkpoint, it is truncated or corrupt "
                          f"({type(err).__name__}: {err})") from err


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
  return dict(obj)


def load_state_dict(path: "os.PathLike[str] | str", *, key: Optional[str] = None) -> dict[str, Any]:
  """Reads a state_dict from a torch checkpoint (torch tensors) or a safetensors file (numpy arrays, no torch).

  Args:
    path: the file; its format is recognised from its content.
    key: the entry holding the state_dict when the file wraps it (``{"state_dict": ..., "epoch": 3}``).

  Raises:
    UnsafeCheckpointError: a pickle that references anything beyond tensors; it is not executed.
    CheckpointError: an empty, truncated, corrupt or unknown file, or one that holds no state_dict.
  """
  path = os.fspath(path)
  kind = _sniff(path)
  obj = _read_safetensors(path) if kind == "safetensors" else _read_torch(path)
  return _state_dict_of(obj, path, key)


def read_metadata(path: "os.PathLike[str] | str") -> dict[str, str]:
  """The string metadata of a safetensors file (``{}`` when it has none)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if _sniff(path) != "safetensors":
    raise CheckpointError(f"{path} is not a safetensors file")
  try:
    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except Exception as err:
    raise CheckpointError(f"{path}: cannot read its safetensors header ({type(err).__name__}: {err})") from err


def save_state_dict(state_dict: Mapping[str, Any], path: "os.PathLike[str] | str", *,
                    metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a state_dict atomically: ``.safetensors`` through numpy (no torch needed), anything else with
  ``torch.save``.

  Args:
    state_dict: key -> torch tensor or numpy array, in the order to keep.
    path: the target; an existing file is replaced only once the new one is complete.
    metadata: extra string metadata (safetensors only), e.g. ``{"interop.spec": spec.to_json()}``.
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    arrays = {name: np.require(devices.host_view(value), requirements="C") for name, value in state_dict.items()}
    meta = {KEYS_METADATA: json.dumps(list(arrays)), **(metadata or {})}
    with atomic_write(path) as tmp:
      save_file(arrays, tmp, metadata=meta)
    return
  if metadata:
    raise ValueError(f"metadata is stored in safetensors files only, not in {path!r}")
  import torch  # pylint: disable=import-outside-toplevel
  tensors = {name: value if devices.is_torch_tensor(value) else devices.torch_from_host(np.asarray(value))
             for name, value in state_dict.items()}
  with atomic_write(path) as tmp:
    torch.save(tensors, tmp)
