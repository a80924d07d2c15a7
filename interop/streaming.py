"""The Flax-layout JAX form of a torch state_dict, tensor by tensor, with numpy: what ``jaxprune convert --layout
flax`` writes to a ``.safetensors`` file or to shards, without holding the checkpoint.

:func:`interop.from_torch` makes every JAX array at once, and a Flax-layout checkpoint is mostly transposed kernels,
so writing its result held a copy of the whole checkpoint. Here each tensor is a :class:`interop.io.Deferred`:
its dtype and shape are known from the :class:`interop.TorchSpec`, and it is converted when the writer reaches it
(a transpose or a narrowing into a new array, a 0/1 mask checked and turned into bool) and let go once written.
A tensor that needs no change is written from the input's own memory (a mapped file's pages, given back through
``done``). The result is bit for bit what ``from_torch(..., layout="flax")`` gives on the host: the same
conversions (:mod:`interop.devices`), and the key order of its trees after ``jax.tree.map`` (which sorts dict keys).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np

from interop import devices
from interop.errors import MaskError
from interop.io import Deferred
from interop.statedict import Entry, TorchSpec

Done = Callable[[Any], None]


def _param(value: Any, e: Entry, done: Done) -> Deferred:
  """``to_jax``'s host result for one tensor: 64-bit integers narrowed as JAX holds them, axes permuted."""
  view = devices.host_view(value)
  target = devices.narrowed_dtype(view, e.key)  # reads only a 64-bit integer tensor (checked already, and small)

  def make() -> np.ndarray:
    source = devices.host_view(value)
    if target is None and not e.perm and source.flags.c_contiguous:
      return source  # written from the input's memory; the writer hands it to done
    out = devices.copy_host(source, e.perm, dtype=target)
    done(source)
    return out

  return Deferred(view.dtype if target is None else target, e.jax_shape(), make)


def _mask(value: Any, e: Entry, done: Done) -> Deferred:
  """``mask_to_jax``'s host result: the 0/1 mask checked and turned into bool, permuted like its param."""

  def make() -> np.ndarray:
    source = devices.host_view(value)
    mask = devices.binary_mask_host(source, e.key)
    done(source)
    return devices.copy_host(mask, e.perm) if e.perm else mask

  return Deferred(np.dtype(bool), e.jax_shape(), make)


def _leaves(spec: TorchSpec) -> tuple[dict[str, dict[tuple, Entry]], dict[tuple, Entry]]:
  """The spec's JAX leaves, collection -> path -> entry, and path -> mask entry (a tied tensor's keys are one
  leaf, its first key's; of its masks the last, as ``from_torch`` keeps, all equal by :func:`check_tied_masks`)."""
  aliases = {key for group in spec.ties for key in group[1:]}
  leaves: dict[str, dict[tuple, Entry]] = {}
  masks: dict[tuple, Entry] = {}
  for e in spec.entries:
    if e.key in aliases:
      continue
    if e.role == "mask":
      masks[e.path] = e
    else:
      leaves.setdefault(e.collection, {})[e.path] = e
  return leaves, masks


def flax_tensors(state_dict: Mapping[str, Any], spec: TorchSpec,
                 done: Optional[Done] = None) -> dict[tuple[str, ...], Deferred]:
  """``(tree, *path) -> Deferred`` for the trees ``{"params", collections..., "masks"}`` of the Flax layout, in
  the order the CLI has always written them: ``params``, then the other collections by name, then ``masks``
  (the pruned params' only; a 0-d param's mask is left out, as ``jaxprune.is_masked`` without its param says),
  each tree's paths sorted (JAX sorts a dict's keys, at every level, which orders the paths so).

  ``spec`` is the checked state_dict's (``tensor_stats(state_dict, "flax", ...)``); run :func:`check_tied_masks`
  before writing. ``done`` follows each input tensor once converted.
  """
  done = done or (lambda _: None)
  leaves, masks = _leaves(spec)
  trees: dict[str, dict[tuple, Deferred]] = {
      "params": {path: _param(state_dict[e.key], e, done) for path, e in leaves.pop("params", {}).items()}}
  for collection, flat in sorted(leaves.items()):
    trees[collection] = {path: _param(state_dict[e.key], e, done) for path, e in flat.items()}
  pruned = {path: _mask(state_dict[e.key], e, done) for path, e in masks.items() if e.shape}
  if pruned:
    trees["masks"] = pruned
  return {(tree, *path): flat[path] for tree, flat in trees.items() for path in sorted(flat)}


def check_tied_masks(state_dict: Mapping[str, Any], spec: TorchSpec, done: Optional[Done] = None) -> None:
  """What ``from_torch`` checks and ``tensor_stats`` does not: the masks on a tied tensor's one leaf are each 0/1
  and all equal (JAX holds one mask per leaf).

  Raises:
    MaskError: naming the mask that is not 0/1, or two that differ.
  """
  done = done or (lambda _: None)
  keys = {key for group in spec.ties for key in group}
  tied = {e.path for e in spec.entries if e.key in keys and e.collection == "params"}
  previous: dict[tuple, tuple[str, np.ndarray]] = {}
  for e in spec.entries:
    if e.role != "mask" or e.path not in tied:
      continue
    view = devices.host_view(state_dict[e.key])
    mask = devices.binary_mask_host(view, e.key)
    done(view)
    if e.path in previous and not np.array_equal(previous[e.path][1], mask):
      raise MaskError(f"{e.key!r} and {previous[e.path][0]!r} are masks of one tied tensor, and they differ; JAX "
                      "holds one mask per tensor (prune tied parameters with one mask, or untie them first)")
    previous[e.path] = (e.key, mask)
