"""Sharded checkpoints, as Hugging Face ships every large model: an index and the shard files it names.

The index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) is JSON:
``{"metadata": {"total_size": bytes}, "weight_map": {key: shard file name}}``; the shards sit beside it, each an
ordinary safetensors file or ``torch.save`` pickle. Reading takes the index or the folder holding it, reads each
shard as :mod:`interop.io` reads any file (checked headers, ``weights_only`` pickles, memory maps on request) and
checks that the index and the shards agree, naming the file where they do not.

Writing splits the state_dict in its own order into shards of at most ``max_shard_size`` bytes (a larger tensor gets
a shard of its own), named as Hugging Face names them (``model-00001-of-00003.safetensors``), and writes the whole
folder at once: shards and index go into a temporary folder beside the target, which is then swapped in whole
(:func:`interop.io.atomic_write`), so a failure or a signal leaves the old set (or none), never some new shards
beside an old index. The folder is the checkpoint's own: one that holds anything but a sharded checkpoint is never
replaced.

Tied keys (:mod:`interop.ties`) go into their first key's shard: a safetensors shard stores the tensor once and
records the tie, as :func:`interop.io.save_state_dict` does for one file, and the index lists only the stored key
(so Hugging Face's loaders find every key it lists); a torch shard keeps the shared storage. The index's metadata
also keeps the state_dict's key order (``interop.keys``; Hugging Face sorts ``weight_map``), and any string
metadata given to the writer (a JAX-form checkpoint's spec).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

from interop import io, ties as ties_lib
from interop.errors import CheckpointError

INDEX_SUFFIX = ".index.json"
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
"""The index names Hugging Face writes, in the order a folder holding both is read (safetensors first, as HF does)."""
DEFAULT_INDEX = INDEX_NAMES[0]
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
"""The one weights file of a model Hugging Face saved unsharded, in the order a folder holding both is read."""
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
"""5GB, Hugging Face's ``save_pretrained`` default."""
SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
KEYS_METADATA = "interop.keys"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
  """A shard size in bytes from an int or a string as Hugging Face writes them: ``"5GB"`` (10**9),
  ``"500MB"``, ``"2GiB"`` (2**30), ``"1.5GB"``, ``"1000"``; units in any case.

  Raises:
    ValueError: not a positive size.
  """
  if isinstance(size, bool) or not isinstance(size, (int, str)):
    raise ValueError(f"a shard size is an int or a string such as '5GB', got {size!r}")
  if isinstance(size, int):
    value = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", size)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
      raise ValueError(f"shard size {size!r}: expected a number of bytes or one with a unit such as '5GB', '500MB' "
                       "or '2GiB'")
    value = int(float(match.group(1)) * _UNITS[unit])
  if value < 1:
    raise ValueError(f"shard size {size!r}: must be at least one byte")
  return value


# ----------------------------------------------------------------------------------------------------------------
# Reading


def find_index(path: str) -> Optional[str]:
  """The index of the sharded checkpoint at ``path`` (the index itself, or a folder holding one); None when
  ``path`` is neither.

  Raises:
    CheckpointError: a folder with several indexes, none of them one of :data:`INDEX_NAMES`.
  """
  if path.endswith(INDEX_SUFFIX) and not os.path.isdir(path):
    return path
  if not os.path.isdir(path):
    return None
  names = sorted(n for n in os.listdir(path) if n.endswith(INDEX_SUFFIX))
  preferred = [n for n in INDEX_NAMES if n in names]
  if preferred or len(names) == 1:
    return os.path.join(path, (preferred or names)[0])
  if names:
    raise CheckpointError(f"{path} holds several indexes ({', '.join(names)}); give the one to read")
  return None


def find_single(path: str) -> Optional[str]:
  """The one weights file (:data:`SINGLE_NAMES`) of a folder holding a model saved unsharded; None otherwise."""
  if not os.path.isdir(path):
    return None
  return next((os.path.join(path, n) for n in SINGLE_NAMES if os.path.isfile(os.path.join(path, n))), None)


class Index(NamedTuple):
  """A checked index: ``weight_map`` key -> shard file name (in the index's order) and its ``metadata``."""
  weight_map: dict[str, str]
  metadata: dict[str, Any]


def read_index(path: str) -> Index:
  """The checked index at ``path``.

  Raises:
    CheckpointError: no such file, not JSON, no ``weight_map`` of key -> file name, or a shard name that is not a
      plain file name beside the index (``../x``, ``/etc/x``).
  """
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  except (OSError, ValueError) as err:
    raise CheckpointError(f"{path}: cannot read it as a JSON index of shards ({err})") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not (isinstance(weight_map, dict) and weight_map
          and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
    raise CheckpointError(f"{path}: not an index of shards: expected {{\"weight_map\": {{key: shard file}}}}")
  for shard in set(weight_map.values()):
    if os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise CheckpointError(f"{path}: shard {shard!r} is not a file name beside the index")
  metadata = data.get("metadata") or {}
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{path}: 'metadata' is not a JSON object")
  return Index(weight_map, metadata)


def shard_files(index_path: str) -> tuple[str, ...]:
  """The paths of the shards an index names, in the order it first names them."""
  folder = os.path.dirname(index_path)
  return tuple(os.path.join(folder, shard) for shard in _shard_keys(read_index(index_path).weight_map))


def _shard_keys(weight_map: Mapping[str, str]) -> dict[str, list[str]]:
  """Shard file name -> its keys, shards in the order the index first names them."""
  by_shard: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_shard.setdefault(shard, []).append(key)
  return by_shard


def _check_shard(state_dict: Mapping[str, Any], listed: list[str], weight_map: Mapping[str, str], shard: str,
                 file: str, index_path: str) -> None:
  """The shard holds every key the index places in it, and nothing else but keys tied to those."""
  missing = [k for k in listed if k not in state_dict]
  if missing:
    raise CheckpointError(f"{file}: the index {index_path} places tensor {missing[0]!r} in this shard, but it is not "
                          f"there ({len(missing)} of its {len(listed)} tensors missing)")
  tied = {k for group in ties_lib.find_ties(state_dict) for k in group}
  for key in state_dict:
    elsewhere = weight_map.get(key, shard)
    if elsewhere != shard:
      raise CheckpointError(f"{file}: tensor {key!r} is in this shard, but the index {index_path} places it in "
                            f"{elsewhere}")
    if key not in weight_map and key not in tied:
      raise CheckpointError(f"{file}: tensor {key!r} is not in the index {index_path}")


def _key_order(metadata: Mapping[str, Any], weight_map: Mapping[str, str], keys: list[str]) -> list[str]:
  """The order the writer kept (``interop.keys``), if it names exactly these keys; else the index's order, with
  keys it does not list (tied keys) after the shard keys they came with."""
  order = metadata.get(KEYS_METADATA)
  if isinstance(order, list) and all(isinstance(k, str) for k in order) and sorted(order) == sorted(keys):
    return order
  return [*(k for k in weight_map), *(k for k in keys if k not in weight_map)]


def load(index_path: str, *, key: Optional[str] = None, mmap: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
  """Reads a sharded checkpoint: ``(state_dict, string metadata of the index)``.

  Args:
    index_path: the index (see :func:`find_index` for a folder).
    key: as :func:`interop.io.load_state_dict`'s, for shards that wrap their state_dict.
    mmap: map the shards instead of reading them (:func:`interop.io.load_state_dict`).

  Raises:
    CheckpointError: a bad index (:func:`read_index`), a missing shard, a key the index places in a shard that
      lacks it, a tensor the index does not list, or a truncated or corrupt shard: each naming the file.
    UnsafeCheckpointError, DTypeError: as :func:`interop.io.load_state_dict` raises them for a shard.
  """
  index = read_index(index_path)
  folder = os.path.dirname(index_path)
  state_dict: dict[str, Any] = {}
  for shard, listed in _shard_keys(index.weight_map).items():
    file = os.path.join(folder, shard)
    if not os.path.exists(file):
      raise CheckpointError(f"{index_path}: shard {shard} is missing (no file {file}; the index places "
                            f"{len(listed)} tensors in it, such as {listed[0]!r})")
    part, _ = io.load_with_metadata(file, key=key, mmap=mmap)
    _check_shard(part, listed, index.weight_map, shard, file, index_path)
    state_dict.update(part)
  order = _key_order(index.metadata, index.weight_map, list(state_dict))
  return {k: state_dict[k] for k in order}, {k: v for k, v in index.metadata.items() if isinstance(v, str)}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def index_path_for(path: str) -> str:
  """``path`` if it names an index, else the default index in the folder ``path``."""
  return path if path.endswith(INDEX_SUFFIX) else os.path.join(path, DEFAULT_INDEX)


def shard_suffix(index_path: str) -> str:
  """The shards' suffix an index name asks for (``model.safetensors.index.json``: ``.safetensors``).

  Raises:
    ValueError: an index name without one of :data:`SHARD_SUFFIXES` before ``.index.json``.
  """
  base = os.path.basename(index_path)[:-len(INDEX_SUFFIX)]
  suffix = next((s for s in SHARD_SUFFIXES if base.endswith(s) and len(base) > len(s)), None)
  if suffix is None:
    raise ValueError(f"{index_path}: an index is named NAME.safetensors{INDEX_SUFFIX} or NAME.bin{INDEX_SUFFIX} "
                     f"(NAME.pt, NAME.pth), after its shards' format")
  return suffix


def _nbytes(value: Any) -> int:
  return int(value.nbytes)  # numpy arrays, torch tensors and JAX arrays all have it


def plan(state_dict: Mapping[str, Any], max_bytes: int) -> list[list[str]]:
  """The keys of each shard: the state_dict's order cut into runs of at most ``max_bytes`` (a larger tensor alone),
  a tied key in the shard of its group's first key, costing nothing."""
  home = ties_lib.canonical_of(ties_lib.find_ties(state_dict))
  shards: list[list[str]] = []
  shard_of: dict[str, int] = {}
  size = 0
  for key, value in state_dict.items():
    first = home.get(key, key)
    if first != key:
      shards[shard_of[first]].append(key)
      continue
    nbytes = _nbytes(value)
    if not shards or size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
    shard_of[key] = len(shards) - 1
  return shards


def shard_names(index_path: str, count: int) -> list[str]:
  """Hugging Face's names: ``model-00001-of-00003.safetensors`` for ``model.safetensors.index.json``."""
  suffix = shard_suffix(index_path)
  stem = os.path.basename(index_path)[:-len(INDEX_SUFFIX) - len(suffix)]
  return [f"{stem}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


def replaceable(folder: str) -> Optional[str]:
  """None when a sharded checkpoint may take ``folder``'s place whole: it does not exist, is empty, or holds only a
  sharded checkpoint (indexes and the shards they name); else why not."""
  if not os.path.lexists(folder):
    return None
  if os.path.islink(folder) or not os.path.isdir(folder):
    return f"{folder} is not a folder"
  entries = set(os.listdir(folder))
  ours = {e for e in entries if e.endswith(INDEX_SUFFIX)}
  for name in sorted(ours):
    try:
      ours |= set(read_index(os.path.join(folder, name)).weight_map.values())
    except CheckpointError as err:
      return str(err)
  others = sorted(entries - ours)
  if others:
    return (f"{folder} holds files that are not part of a sharded checkpoint ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); a sharded checkpoint is written into a folder of its own")
  return None


def writer(state_dict: Mapping[str, Any], index_path: str, *, max_shard_size: Union[int, str, None] = None,
           metadata: Optional[Mapping[str, str]] = None,
           done: Optional[Callable[[Any], None]] = None) -> Callable[[str], None]:
  """Checks everything and returns ``write(folder)``, which creates ``folder`` and writes the index (named as
  ``index_path``'s) and its shards into it; :func:`save` puts that folder in place atomically.

  Raises:
    ValueError: a bad index name or shard size; DTypeError: a dtype the shard format cannot store.
  """
  max_bytes = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
  suffix = shard_suffix(index_path)
  groups = plan(state_dict, max_bytes)
  names = shard_names(index_path, len(groups))
  home = ties_lib.canonical_of(ties_lib.find_ties(state_dict))
  stored = lambda key: home.get(key, key) == key  # noqa: E731  # a tied key past its group's first is not stored
  writers, weight_map = [], {}
  for name, keys in zip(names, groups):
    writers.append((name, io.file_writer({k: state_dict[k] for k in keys}, name, None, done)))
    # a safetensors shard holds a tied tensor under its first key only; a pickle holds every key
    weight_map.update((k, name) for k in keys if suffix != ".safetensors" or stored(k))
  index = {"metadata": {"total_size": sum(_nbytes(v) for k, v in state_dict.items() if stored(k)),
                        KEYS_METADATA: list(state_dict), **(metadata or {})},
           "weight_map": {k: weight_map[k] for k in state_dict if k in weight_map}}

  def write(folder: str) -> None:
    os.mkdir(folder)
    for name, write_shard in writers:
      write_shard(os.path.join(folder, name))
    with open(os.path.join(folder, os.path.basename(index_path)), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2)

  return write


def check_folder(index_path: str) -> str:
  """The folder a sharded checkpoint at ``index_path`` takes whole, after checking that it may.

  Raises:
    ValueError: the current folder, or a folder holding other files (:func:`replaceable`).
  """
  folder = os.path.dirname(os.path.abspath(index_path))
  if folder == os.getcwd():
    raise ValueError(f"{index_path}: a sharded checkpoint takes a folder of its own, and this is the current "
                     f"folder; write it as FOLDER/{os.path.basename(index_path)}")
  reason = replaceable(folder)
  if reason is not None:
    raise ValueError(reason)
  return folder


def save(state_dict: Mapping[str, Any], path: str, *, max_shard_size: Union[int, str, None] = None,
         metadata: Optional[Mapping[str, str]] = None, done: Optional[Callable[[Any], None]] = None) -> str:
  """Writes ``state_dict`` sharded: ``path`` is the index (``out/model.safetensors.index.json``,
  ``out/pytorch_model.bin.index.json``) or the folder (then ``model.safetensors.index.json``). The folder is
  replaced whole, atomically; it must be new, empty, or a sharded checkpoint. Returns the index's path.

  Args:
    max_shard_size: bytes, or ``"5GB"``, ``"500MB"``, ``"2GiB"`` (:func:`parse_size`); default 5GB.
    metadata: string metadata kept in the index (read back by :func:`load`).
    done: called with each tensor once written (safetensors shards; :func:`interop.io.write_safetensors`).
  """
  index_path = index_path_for(os.fspath(path))
  write = writer(state_dict, index_path, max_shard_size=max_shard_size, metadata=metadata, done=done)
  with io.atomic_write(check_folder(index_path)) as tmp:
    write(tmp)
  return index_path
