"""Checkpoints converted as they are written, tensor by tensor, so that a command holds about one tensor.

* :func:`flax_tensors`: the Flax-layout JAX form of a torch state_dict, with numpy: what ``jaxprune convert
  --layout flax`` writes to a ``.safetensors`` file or to shards.
* :func:`torch_tensors`: ``to_torch``'s state_dict module by module (what ``jaxprune prune`` writes), the pruned
  masks kept packed 8 entries a byte (:class:`Bits`) until their module is written.

:func:`interop.from_torch` makes every JAX array at once, and a Flax-layout checkpoint is mostly transposed kernels,
so writing its result held a copy of the whole checkpoint. Here each tensor is a :class:`interop.io.Deferred`:
its dtype and shape are known from the :class:`interop.TorchSpec`, and it is converted when the writer reaches it
(a transpose or a narrowing into a new array, a 0/1 mask checked and turned into bool) and let go once written.
A tensor that needs no change is written from the input's own memory (a mapped file's pages, given back through
``done``). The result is bit for bit what ``from_torch(..., layout="flax")`` gives on the host: the same
conversions (:mod:`interop.devices`), and the key order of its trees after ``jax.tree.map`` (which sorts dict keys).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from interop import devices
from interop.errors import MaskError
from interop.io import Deferred
from interop.statedict import MASK, ORIG, Entry, TorchSpec, split_key

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


# ----------------------------------------------------------------------------------------------------------------
# JAX -> torch, module by module


class Bits(NamedTuple):
  """A bool mask packed 8 entries a byte while it waits to be written (1/32 of a float32 tensor)."""
  packed: np.ndarray
  shape: tuple[int, ...]

  @classmethod
  def of(cls, mask: Any) -> "Bits":
    mask = np.asarray(mask)
    return cls(np.packbits(mask, axis=None), mask.shape)

  def unpack(self) -> np.ndarray:
    return np.unpackbits(self.packed, count=math.prod(self.shape)).view(bool).reshape(self.shape)


def _runs(spec: TorchSpec) -> list[tuple[str, list[Entry]]]:
  """The spec's entries in runs of one module, as ``to_torch`` groups them to order a module's keys."""
  return [(prefix, list(run)) for prefix, run in itertools.groupby(spec.entries, key=lambda e: split_key(e.key)[0])]


def _to_torch(leaves: Mapping[tuple, Any], masks: Mapping[tuple, Any], spec: TorchSpec, entries: Sequence[Entry],
              ties: tuple, permanent: bool, done: Done) -> dict[str, Any]:
  """``to_torch`` (numpy arrays, no copies) of the leaves, masks and spec entries of some modules only."""
  import interop  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  slots = {(e.collection, *e.path) for e in entries if e.role != "mask"}
  trees: dict[str, dict] = {}
  for slot in (s for s in leaves if s in slots):
    trees.setdefault(slot[0], {})[slot[1:]] = leaves[slot]
  params = trees.pop("params", {})
  sub_masks = {path: m.unpack() if isinstance(m, Bits) else m for path, m in masks.items() if path in params}
  unflat = lambda flat: traverse_util.unflatten_dict(flat) if flat else {}  # noqa: E731
  return interop.to_torch(unflat(params), unflat(sub_masks), {c: unflat(t) for c, t in trees.items()},
                          spec._replace(entries=tuple(entries), ties=ties), permanent=permanent, copy=False,
                          tensors="numpy", done=done)


def torch_tensors(leaves: Mapping[tuple, Any], masks: Mapping[tuple, Any], spec: TorchSpec, *,
                  permanent: bool = False, done: Optional[Done] = None) -> dict[str, Any]:
  """``interop.to_torch(params, masks, buffers, spec, permanent=permanent, copy=False, tensors="numpy")``, keys
  in its order, each value a :class:`interop.io.Deferred` that converts its module when the writer reaches it
  (all the keys of one run of a module's keys, which come together, from one conversion), so a writer holds one
  module at a time. Each run is converted twice: first to learn its keys, dtypes and shapes.

  ``leaves``: ``(collection, *path) -> leaf`` of params and buffers; ``masks``: params path -> mask, bool or
  :class:`Bits`. The modules of tied keys are converted at once and given as arrays, so that the writer sees
  the tie. Where runs cannot be converted apart (a mask in another run than its ``X_orig``), the whole
  state_dict is made at once.
  """
  done = done or (lambda _: None)
  runs = _runs(spec)
  tied = {key for group in spec.ties for key in group}
  at_once = {i for i, (_, run) in enumerate(runs) if any(e.key in tied for e in run)}
  if not _separable(runs, at_once):
    return _to_torch(leaves, masks, spec, spec.entries, spec.ties, permanent, done)
  made = _to_torch(leaves, masks, spec, [e for i in sorted(at_once) for e in runs[i][1]], spec.ties, permanent,
                   done) if at_once else {}
  current: dict[str, Any] = {}
  out: dict[str, Any] = {}
  for i, (prefix, run) in enumerate(runs):
    if i in at_once:
      out.update((k, v) for k, v in made.items() if split_key(k)[0] == prefix)
      continue
    convert = lambda run=run: _to_torch(leaves, masks, spec, run, (), permanent, done)  # noqa: E731
    for key, value in convert().items():
      out[key] = Deferred(value.dtype, value.shape, _one_of(key, convert, current))
  return out


def _separable(runs: Sequence[tuple[str, list[Entry]]], at_once: set[int]) -> bool:
  """Whether ``to_torch`` of each run alone (and of the tied ones together) gives its part of the whole: every mask
  beside its ``X_orig`` in one run, and no module with two runs among the tied ones (together, they would become
  one run, which ``to_torch`` orders otherwise)."""
  if len({runs[i][0] for i in at_once}) != len(at_once):
    return False
  for _, run in runs:
    keys = {e.key for e in run}
    if any(e.role == "mask" and e.key[:-len(MASK)] + ORIG not in keys for e in run):
      return False
  return True


def _one_of(key: str, convert: Callable[[], dict], current: dict) -> Callable[[], np.ndarray]:
  """``make()`` of one key of a module: the module is converted for its first key written, and each key's array
  is let go once handed out (``current`` holds the rest of the module until then)."""

  def make() -> np.ndarray:
    if key not in current:
      current.clear()
      current.update(convert())
    return current.pop(key)

  return make
