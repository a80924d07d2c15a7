"""Tied tensors: state_dict keys that are one tensor (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``).

torch ties a parameter by registering the same ``Parameter`` under two names, so ``state_dict()`` holds two keys
over one storage. A tie is read from memory, never guessed from values: two torch tensors are tied when they start at
the same place in the same storage with the same shape, strides and dtype; two numpy arrays when they are the same
array object (as :func:`interop.io.load_state_dict` returns a tie it read). Tensors that merely overlap (two views into different parts of
one storage) are not tied; they convert as separate tensors.

A tie group is written as a tuple of keys in state_dict order; its first key is the canonical one: the one JAX
holds, and the one a safetensors file stores.
"""
from __future__ import annotations

import sys
from typing import Any, Hashable, Mapping, Optional

import numpy as np

Ties = tuple[tuple[str, ...], ...]


def _address(value: Any) -> Optional[Hashable]:
  """Where a tensor's elements live and how they are laid out; None for an empty tensor (nothing to share)."""
  if isinstance(value, np.ndarray):
    # The array object itself, which is how interop.io hands out a tie it read: reading each array's address
    # would cost more than the rest of counting a checkpoint of many small tensors.
    return id(value) if value.size else None
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(value, torch.Tensor) and value.numel() and value.layout == torch.strided:
    return (str(value.device), value.untyped_storage().data_ptr(), value.storage_offset(),
            tuple(value.shape), value.stride(), str(value.dtype))
  return None  # JAX arrays and the like: immutable values, ties are not theirs to express


def find_ties(state_dict: Mapping[str, Any]) -> Ties:
  """The groups of two or more keys whose tensors are one tensor, each in state_dict order, ordered by first key."""
  first: dict[Hashable, str] = {}
  groups: dict[Hashable, list[str]] = {}  # only for addresses seen twice: most checkpoints have no tie at all
  for key, value in state_dict.items():
    address = _address(value)
    if address is not None and first.setdefault(address, key) != key:
      groups.setdefault(address, [first[address]]).append(key)
  return tuple(tuple(groups[address]) for address in first if address in groups) if groups else ()


def canonical_of(ties: Ties) -> dict[str, str]:
  """key -> the first key of its group, for every key of every group (the canonical key maps to itself)."""
  return {key: group[0] for group in ties for key in group}


def check_ties(ties: Any, keys: Mapping[str, Any]) -> Ties:
  """``ties`` as read from a file or a spec, checked: groups of 2+ distinct known keys, no key in two groups.

  Raises:
    ValueError: naming the group that is not right.
  """
  if not isinstance(ties, (list, tuple)):
    raise ValueError(f"ties must be a list of key groups, got {ties!r}")
  seen: set[str] = set()
  out = []
  for group in ties:
    if not (isinstance(group, (list, tuple)) and len(group) > 1 and all(isinstance(k, str) for k in group)):
      raise ValueError(f"tie group {group!r} is not a list of two or more keys")
    unknown = [k for k in group if k not in keys]
    if unknown or seen & set(group) or len(set(group)) != len(group):
      problem = f"unknown keys {unknown!r}" if unknown else "a key twice"
      raise ValueError(f"tie group {list(group)!r} names {problem}")
    seen.update(group)
    out.append(tuple(group))
  return tuple(out)
