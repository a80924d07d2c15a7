"""torch state_dicts <-> ``(params, masks, buffers)`` pytrees, losslessly, in torch or Flax layout.

A pruned torch module keeps each pruned tensor as ``X_orig`` (the parameter) and ``X_mask`` (a buffer of 0/1 in the
parameter's dtype, spec §8.2) in place of ``X`` (spec §9). Here every such pair becomes the param ``X`` plus a bool
mask; a tensor that is not pruned gets :data:`jaxprune.UNMASKED`. Buffers (BatchNorm statistics,
``num_batches_tracked``, custom buffers) are returned apart from the params, never merged into them or dropped.

A :class:`TorchSpec` records what the torch side looked like: every key in order, its role, dtype, shape and where
it went. :func:`to_torch` replays it, so a round trip gives back torch's keys, order, dtypes and bits. Pruning
changes made in JAX since are replayed the way torch would have made them: a newly masked param becomes
``X_orig`` (moved to the end of its module's params) plus ``X_mask`` (appended to its buffers), like a first
``prune``; a param whose mask became :data:`jaxprune.UNMASKED` becomes plain ``X`` at the end of its module's params,
like ``prune.remove`` (spec §7).

Tied keys (one tensor under several names, :mod:`interop.ties`) are one leaf and one mask in JAX, the first key's;
the spec records the ties and :func:`to_torch` gives the keys one tensor again.

Building specs and counting (:func:`build_spec`, :func:`tensor_stats`, :func:`permanent_state_dict`) needs numpy
only; flax and jaxprune (and so JAX) are imported by the functions that make or take pytrees of JAX arrays.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from interop import devices, inference, io, layouts, ties as ties_lib
from interop.errors import DuplicateKeyError, InteropError, LayoutError, MaskError, PairingError

ORIG, MASK = "_orig", "_mask"
LAYOUTS = ("torch", "flax")
BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
"""Names taken for buffers when neither a torch module nor a layout rule says otherwise."""

PyTree = Any


class Entry(NamedTuple):
  """One torch state_dict key and where it lives in JAX.

  Attributes:
    key: the torch key (``"conv1.weight_orig"``).
    role: ``"param"``, ``"orig"`` (a pruned param), ``"mask"`` (its mask) or ``"buffer"``.
    collection: the JAX collection: ``"params"`` (masks too: the mask tree mirrors it), ``"batch_stats"`` or
      ``"buffers"``.
    path: the path inside the collection (``("conv1", "kernel")``).
    perm: the axis permutation from torch to JAX layout (``()``: none).
    dtype: the torch dtype (``"bfloat16"``); for a mask, the mask's own dtype.
    shape: the torch shape.
  """
  key: str
  role: str
  collection: str
  path: tuple[str, ...]
  perm: tuple[int, ...]
  dtype: str
  shape: tuple[int, ...]

  def jax_name(self) -> str:
    return "/".join((self.collection, *self.path))

  def jax_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[p] for p in self.perm) if self.perm else self.shape


class TorchSpec(NamedTuple):
  """Everything :func:`to_torch` needs to rebuild the torch state_dict bit for bit (JSON-serialisable).

  Attributes:
    layout: ``"torch"`` or ``"flax"``.
    entries: one :class:`Entry` per torch key, in order.
    ties: groups of keys that are one tensor in torch (:mod:`interop.ties`), first key first. Every key of a group
      has the first key's place in JAX (one leaf, one mask: pruning one prunes all) and :func:`to_torch` gives
      them one tensor again.
    uncertain: ``(key, note)`` for each key whose Flax layout was inferred with doubt (:mod:`interop.inference`).
  """
  layout: str
  entries: tuple[Entry, ...]
  ties: ties_lib.Ties = ()
  uncertain: tuple[tuple[str, str], ...] = ()

  def to_json(self) -> str:
    return json.dumps({"layout": self.layout, "entries": [list(e) for e in self.entries],
                       "ties": [list(g) for g in self.ties], "uncertain": [list(u) for u in self.uncertain]})

  @classmethod
  def from_json(cls, text: str) -> "TorchSpec":
    """The spec :meth:`to_json` wrote; anything else (a file's tampered metadata) raises :class:`InteropError`."""
    try:
      data = json.loads(text)
      if not (isinstance(data, dict) and data.get("layout") in LAYOUTS and isinstance(data.get("entries"), list)):
        raise ValueError('expected {"layout": "torch" | "flax", "entries": [...]}')
      entries = tuple(_entry(row) for row in data["entries"])
      uncertain = data.get("uncertain", [])
      if not (isinstance(uncertain, list) and all(isinstance(u, list) and len(u) == 2 and all(
          isinstance(x, str) for x in u) for u in uncertain)):
        raise ValueError(f"uncertain must be a list of [key, note] pairs, got {uncertain!r}")
      ties = ties_lib.check_ties(data.get("ties", []), {e.key: e for e in entries})
      return cls(data["layout"], entries, ties, tuple(tuple(u) for u in uncertain))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
      raise InteropError(f"malformed TorchSpec: {err}") from None


ROLES = ("param", "orig", "mask", "buffer")


def _entry(row: Any) -> Entry:
  """One spec entry from its JSON list, every field checked (a dtype name numpy knows, a real permutation)."""
  strings = lambda xs: isinstance(xs, list) and all(isinstance(x, str) for x in xs)  # noqa: E731
  ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
  if not (isinstance(row, list) and len(row) == len(Entry._fields)):
    raise ValueError(f"entry {row!r} is not a list of {len(Entry._fields)} fields {Entry._fields}")
  key, role, collection, path, perm, dtype, shape = row
  if not (isinstance(key, str) and role in ROLES and isinstance(collection, str) and strings(path) and path
          and ints(perm) and isinstance(dtype, str) and ints(shape)
          and (not perm or sorted(perm) == list(range(len(shape))))):
    raise ValueError(f"entry {row!r} does not describe a tensor (key, role, collection, path, perm, dtype, shape)")
  try:
    devices.numpy_dtype(dtype)
  except TypeError:
    raise ValueError(f"entry {key!r} has the unknown dtype {dtype!r}") from None
  return Entry(key, role, collection, tuple(path), tuple(perm), dtype, tuple(shape))


class Converted(NamedTuple):
  """What :func:`from_torch` returns; ``to_torch(*converted)`` gives the state_dict back.

  Attributes:
    params: nested dict of parameters (pruned ones hold ``X_orig``'s values).
    masks: the same structure: a bool mask per pruned param, :data:`jaxprune.UNMASKED` elsewhere.
    buffers: collection name -> nested dict: ``{"buffers": ...}`` in torch layout; ``{"batch_stats": ...,
      "buffers": ...}`` in Flax layout (``buffers`` holds what Flax has no place for, e.g. ``num_batches_tracked``).
    spec: the torch side's record (:class:`TorchSpec`).
  """
  params: PyTree
  masks: PyTree
  buffers: dict[str, PyTree]
  spec: TorchSpec

  def variables(self) -> dict[str, PyTree]:
    """Flax variables with the masks applied: ``{"params": params * masks, **buffers}`` (for ``model.apply``)."""
    from jaxprune import apply_masks  # pylint: disable=import-outside-toplevel
    return {"params": apply_masks(self.params, self.masks), **self.buffers}


class ModuleInfo(NamedTuple):
  """What a torch submodule says about its tensors: class names (MRO), parameter and buffer names (a pruned
  param under its plain name), and their shapes."""
  types: tuple[str, ...]
  params: frozenset[str]
  buffers: frozenset[str]
  shapes: Mapping[str, tuple[int, ...]]


def split_key(key: str) -> tuple[str, str]:
  prefix, _, local = key.rpartition(".")
  return prefix, local


def _join(prefix: str, local: str) -> str:
  return f"{prefix}.{local}" if prefix else local


def _parts(prefix: str) -> tuple[str, ...]:
  return tuple(prefix.split(".")) if prefix else ()


def _is_torch_module(x: Any) -> bool:
  torch = sys.modules.get("torch")
  return torch is not None and isinstance(x, torch.nn.Module)


def module_infos(module) -> dict[str, ModuleInfo]:
  """Module path -> :class:`ModuleInfo` for every submodule of a torch module, pruned or not."""
  state = module.state_dict(keep_vars=True)  # persistent tensors only, no copies
  by_module: dict[str, dict[str, tuple[int, ...]]] = {}
  for key, tensor in state.items():
    prefix, local = split_key(key)
    by_module.setdefault(prefix, {})[local] = tuple(tensor.shape)
  infos = {}
  for prefix, sub in module.named_modules(remove_duplicate=False):
    param_names = {name for name, _ in sub.named_parameters(recurse=False)}
    shapes = dict(by_module.get(prefix, {}))
    for local in [n for n in shapes if n.endswith(ORIG) and n[:-len(ORIG)] + MASK in shapes]:
      base = local[:-len(ORIG)]
      shapes[base] = shapes.pop(local)
      del shapes[base + MASK]
      param_names.add(base)
    params = frozenset(n for n in shapes if n in param_names)
    infos[prefix] = ModuleInfo(tuple(c.__name__ for c in type(sub).__mro__), params,
                               frozenset(shapes) - params, shapes)
  return infos


Meta = Mapping[str, tuple[tuple[int, ...], str]]


def _meta(state_dict: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
  meta = {}
  for key, value in state_dict.items():
    if not isinstance(key, str) or not hasattr(value, "shape") or not hasattr(value, "dtype"):
      raise InteropError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    meta[key] = (tuple(value.shape), devices.check_convertible(value, key))
  return meta


def _classify(meta: Meta, infos: Optional[Mapping[str, ModuleInfo]]) -> list[tuple[str, Optional[str], str, str]]:
  """``(key, role, module path, local name)`` for every key; role None means "param or buffer, by name".

  Pairs every ``X_orig`` with its ``X_mask``. With ``infos`` (a torch module), every key must belong to it.
  """
  rows = []
  for key, (shape, _) in meta.items():
    prefix, local = split_key(key)
    info = None if infos is None else infos.get(prefix)
    if infos is not None and info is None:
      raise LayoutError(f"{key!r}: the torch module has no submodule {prefix!r}")
    if info is not None and local in info.shapes:  # the module's own name, even if it ends in _orig or _mask
      role, base = ("buffer" if local in info.buffers else "param"), local
    elif local.endswith(ORIG) and local != ORIG:
      role, base = "orig", local[:-len(ORIG)]
      mask_key = key[:-len(ORIG)] + MASK
      if mask_key not in meta:
        raise PairingError(f"{key!r} has no mask {mask_key!r}: torch stores a pruned tensor as '<name>_orig' plus "
                           "'<name>_mask', and both are needed")
      if meta[mask_key][0] != shape:
        raise MaskError(f"mask {mask_key!r} has shape {meta[mask_key][0]}, but its parameter {key!r} has shape "
                        f"{shape}")
    elif local.endswith(MASK) and local != MASK:
      role, base = "mask", local[:-len(MASK)]
      if key[:-len(MASK)] + ORIG not in meta:
        raise PairingError(f"{key!r} has no parameter {key[:-len(MASK)] + ORIG!r}: torch stores a pruned tensor as "
                           "'<name>_orig' plus '<name>_mask', and both are needed")
    elif info is not None:
      raise LayoutError(f"{key!r}: module {prefix!r} ({info.types[0]}) has no parameter or buffer {local!r}")
    else:
      role, base = None, local
    if role in ("orig", "mask"):
      if _join(prefix, base) in meta:
        raise DuplicateKeyError(f"{key!r} and {_join(prefix, base)!r} would both become {_join(prefix, base)!r}: "
                                "a tensor cannot be pruned and unpruned at once")
      if info is not None and base not in info.params:
        raise LayoutError(f"{key!r}: module {prefix!r} ({info.types[0]}) has no parameter {base!r} to prune")
    if info is not None and tuple(shape) != info.shapes[base]:
      raise LayoutError(f"{key!r} has shape {tuple(shape)}, but the torch module's {_join(prefix, base)!r} has "
                        f"shape {info.shapes[base]}")
    rows.append((key, role, prefix, base))
  return rows


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_unique(entries: Sequence[Entry], aliases: frozenset = frozenset()) -> None:
  """No two tensors on one JAX leaf (but tied keys, ``aliases``, on their first key's), and no leaf where another
  tensor needs a subtree."""
  seen: dict[tuple, str] = {}
  for e in entries:
    if e.role == "mask" or e.key in aliases:
      continue
    slot = (e.collection, *e.path)
    if slot in seen:
      raise DuplicateKeyError(f"{seen[slot]!r} and {e.key!r} would both become {'/'.join(slot)!r}")
    seen[slot] = e.key
  for slot, key in seen.items():
    for end in range(2, len(slot)):
      if slot[:end] in seen:
        raise DuplicateKeyError(f"{seen[slot[:end]]!r} would become the leaf {'/'.join(slot[:end])!r}, but {key!r} "
                                f"needs {'/'.join(slot[:end])!r} to be a subtree (for {'/'.join(slot)!r})")


def _param_key(key: str, role: Optional[str]) -> str:
  """The key of the tensor a mask belongs to (``X_orig`` for ``X_mask``); the key itself otherwise."""
  return key[:-len(MASK)] + ORIG if role == "mask" else key


def _tie(placed: dict[str, tuple], ties: ties_lib.Ties, roles: Mapping[str, str]) -> ties_lib.Ties:
  """Moves every tied key (and its mask) onto its group's first key's place; returns the groups that hold 2+
  tensors (masks are not tied themselves: they follow their params)."""
  groups = tuple(g for g in (tuple(k for k in group if roles[k] != "mask") for group in ties) if len(g) > 1)
  if not groups:
    return ()
  home = ties_lib.canonical_of(groups)
  for key, (role, collection, path, perm) in placed.items():
    first = home.get(_param_key(key, role))
    if first is not None and first != _param_key(key, role):
      first_role, first_collection, first_path, first_perm = placed[first]
      if (first_collection == "params") != (collection == "params"):
        raise LayoutError(f"{key!r} ({role}) and {first!r} ({first_role}) are one tensor, but one is a parameter "
                          "and the other a buffer")
      placed[key] = (role, first_collection, first_path, first_perm)
  return groups


def build_spec(meta: Meta, layout: str = "torch", rules: Sequence[layouts.LayoutRule] = (),
               infos: Optional[Mapping[str, ModuleInfo]] = None, ties: ties_lib.Ties = ()) -> TorchSpec:
  """The :class:`TorchSpec` of a state_dict given as ``key -> (shape, dtype)``, in its key order.

  ``ties`` are groups of keys that share one tensor (:func:`interop.ties.find_ties`).

  Raises:
    PairingError, MaskError (shapes), LayoutError, DuplicateKeyError: see :func:`from_torch`.
  """
  _check_layout(layout)
  rows = _classify(meta, infos)
  modules: dict[str, list] = {}
  for row in rows:
    modules.setdefault(row[2], []).append(row)
  inferred = {}
  if layout == "flax" and infos is None:  # only the Flax layout depends on which rule fits best
    inferred = inference.infer(rules, {prefix: {base: meta[key][0] for key, role, _, base in group if role != "mask"}
                                       for prefix, group in modules.items()
                                       if layouts.rule_by_path(rules, prefix) is None})
  placed, by_kind, uncertain = {}, {}, []
  for prefix, group in modules.items():
    names = {base: len(meta[key][0]) for key, role, _, base in group if role != "mask"}
    types = infos[prefix].types if infos is not None else None
    if prefix in inferred:
      (rule, doubt), forced = inferred[prefix], False
      uncertain += [(key, doubt) for key, role, _, _ in group if doubt is not None and role != "mask"]
    elif layouts.rule_by_path(rules, prefix) is None:  # else the rule depends on the path, not only the kind
      kind = (frozenset(names.items()), types)  # modules of one kind get one rule: looked up once per kind
      if kind not in by_kind:
        by_kind[kind] = layouts.select_rule(rules, prefix, names, types=types)
      rule, forced = by_kind[kind]
    else:
      rule, forced = layouts.select_rule(rules, prefix, names, types=types)
    for key, role, _, base in group:
      shape = meta[key][0]
      tm = None if rule is None else rule.tensors.get(base)
      if tm is not None and forced:
        layouts.check_fit(rule, prefix, key, tm, shape)
      if role is None:
        is_buffer = tm.collection != "params" if tm is not None else base in BUFFER_NAMES
        role = "buffer" if is_buffer else "param"
      if layout == "flax" and tm is not None:
        collection, name, perm = tm.collection, tm.name, tm.transform.to_flax(len(shape))
      else:
        collection, name, perm = ("buffers" if role == "buffer" else "params"), base, ()
      if role in ("orig", "mask") and collection != "params":
        raise LayoutError(f"{key!r} is pruned, but layout rule {rule.kind!r} puts it in collection {collection!r}; "
                          "masks exist for 'params' only")
      placed[key] = (role, collection, (*_parts(prefix), name), perm)
  ties = _tie(placed, ties, {key: placed[key][0] for key in placed})
  entries = tuple(Entry(key, *placed[key], dtype, tuple(shape)) for key, (shape, dtype) in meta.items())
  _check_unique(entries, frozenset(k for group in ties for k in group[1:]))
  return TorchSpec(layout, entries, ties, tuple(uncertain))


def _torch_shape(shape: Sequence[int], perm: Sequence[int]) -> tuple[int, ...]:
  out = list(shape)
  for axis, p in enumerate(perm):
    out[p] = shape[axis]
  return tuple(out)


def spec_from_trees(leaves: Mapping[tuple[str, ...], Any], layout: str = "torch",
                    rules: Sequence[layouts.LayoutRule] = ()) -> TorchSpec:
  """The spec of an unpruned torch state_dict for JAX leaves ``(collection, *path) -> array`` (no torch needed).

  Module by module, in the leaves' order: params in the rule's (torch's) order, then buffers. Keys are the path
  joined by dots; in Flax layout the rules map names and axes back. Masks are added by :func:`to_torch`.
  """
  _check_layout(layout)
  groups: dict[tuple[str, ...], list] = {}
  for (collection, *path), leaf in leaves.items():
    groups.setdefault(tuple(path[:-1]), []).append((collection, path[-1], leaf))
  entries = []
  for modpath, items in groups.items():
    if any("." in part for part in modpath):
      raise LayoutError(f"pytree path {'/'.join(modpath)!r} has a '.', which a torch module name cannot hold")
    prefix = ".".join(modpath)
    rule, forced = None, False
    if layout == "flax":
      rule, forced = layouts.select_rule(rules, prefix, {(c, n): np.ndim(leaf) for c, n, leaf in items}, side="flax")
    backwards = rule.flax_names() if rule is not None else {}
    order = list(rule.tensors) if rule is not None else []
    rows = []
    for collection, name, leaf in items:
      shape = tuple(np.shape(leaf))
      torch_name, tm = backwards.get((collection, name), (name, None))
      if tm is not None and forced:
        layouts.check_fit(rule, prefix, "/".join((collection, *modpath, name)), tm, shape)
      perm = tm.transform.to_flax(len(shape)) if tm is not None else ()
      role = "param" if collection == "params" else "buffer"
      rank = order.index(torch_name) if tm is not None else len(order)
      entry = Entry(_join(prefix, torch_name), role, collection, (*modpath, name), perm,
                    devices.dtype_name(np.asarray(leaf) if not hasattr(leaf, "dtype") else leaf),
                    _torch_shape(shape, perm))
      rows.append(((role == "buffer", rank), entry))
    entries += [entry for _, entry in sorted(rows, key=lambda row: row[0])]
  keys: dict[str, Entry] = {}
  for e in entries:
    if e.key in keys:
      raise DuplicateKeyError(f"pytree leaves {keys[e.key].jax_name()!r} and {e.jax_name()!r} would both become "
                              f"torch key {e.key!r}")
    keys[e.key] = e
  return TorchSpec(layout, tuple(entries))


def _source(source: Any, module: Any, key: Optional[str]) -> tuple[Mapping[str, Any], Any, bool]:
  """``(state_dict, module, owned)``: ``owned`` when the tensors are ours (read from a file) and need no copy."""
  if isinstance(source, (str, os.PathLike)):
    return io.load_state_dict(source, key=key), module, True
  if _is_torch_module(source):
    return source.state_dict(), (source if module is None else module), False
  if isinstance(source, Mapping):
    return source, module, False
  raise TypeError(f"expected a state_dict, a torch module or a checkpoint path, got {type(source).__name__}")


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def from_torch(source: Any, *, layout: str = "torch", module: Any = None,
               rules: Sequence[layouts.LayoutRule] = (),
               device: Union[devices.Placement, devices.PlacementFn] = None, copy: bool = True,
               key: Optional[str] = None, done: Optional[Callable[[Any], None]] = None) -> Converted:
  """A torch state_dict as ``(params, masks, buffers, spec)`` pytrees.

  Args:
    source: a state_dict (tensors or numpy arrays), a torch module (its ``state_dict()``), or a checkpoint path
      (``.pt``/``.pth``/``.bin``/``.safetensors``, read safely by :func:`interop.io.load_state_dict`).
    layout: ``"torch"`` (names and shapes as they are) or ``"flax"`` (Dense/Conv kernels, BatchNorm
      scale/bias + batch_stats mean/var, LayerNorm scale, Embed embedding; see :mod:`interop.layouts`).
    module: the torch model the state_dict belongs to (fresh or pruned). It tells parameters from buffers and each
      module's kind for the layout, and every key is checked against it. Without it both are inferred from names,
      shapes and neighbours (:mod:`interop.inference`), and keys inferred with doubt are listed in
      ``spec.uncertain``.
    rules: extra :class:`interop.layouts.LayoutRule` s, tried before the built-in ones.
    device: a ``jax.Device``, a ``jax.sharding.Sharding``, or ``(path, shape) -> Device | Sharding`` per leaf
      (path like ``"params/conv1/kernel"``; a mask goes where its param goes). None: JAX's default device, or an
      accelerator tensor's own device.
    copy: when False, CPU arrays may share memory with the torch tensors (zero-copy); do not then modify those
      tensors in place (a live model's ``state_dict()`` shares its parameters' storage). Tensors read from a file
      are never copied.
    key: for a checkpoint path whose file holds the state_dict under a key (``"state_dict"``).
    done: called with each tensor of the state_dict once converted (:func:`tensor_stats` has the same hook).

  Returns:
    :class:`Converted`: ``params``, ``masks`` (bool per pruned param, :data:`jaxprune.UNMASKED` elsewhere),
    ``buffers`` (by collection) and ``spec``. Keys follow the module paths: ``"layer1.0.conv1.weight"`` ->
    ``params["layer1"]["0"]["conv1"]["weight"]`` (``["kernel"]`` in Flax layout). Tied keys (``spec.ties``) share
    their first key's leaf and mask.

  Raises:
    PairingError: an ``X_orig`` without ``X_mask`` or the reverse.
    MaskError: a mask of another shape than its param, or a value other than exactly 0 or 1; tied keys pruned with
      masks that differ.
    LayoutError: a forced layout rule that does not fit a tensor; a key or shape the given module lacks.
    DuplicateKeyError: two tensors that would land on one leaf (e.g. ``fc.weight`` beside ``fc.weight_orig``).
    DTypeError: float64 while ``jax_enable_x64`` is off.
    CheckpointError: an unreadable, truncated or unsafe checkpoint file.
  """
  state_dict, module, owned = _source(source, module, key)
  spec = build_spec(_meta(state_dict), layout, rules, None if module is None else module_infos(module),
                    ties_lib.find_ties(state_dict))
  aliases = {k: group[0] for group in spec.ties for k in group[1:]}
  trees: dict[str, dict] = {}
  masks, mask_keys = {}, {}
  for e in spec.entries:
    if e.key in aliases:  # one tensor: its first key's leaf holds it
      continue
    placement = devices.resolve_placement(device, "/".join(("params", *e.path)) if e.role == "mask"
                                          else e.jax_name(), e.jax_shape())
    value = state_dict[e.key]
    if e.role == "mask":
      mask = devices.mask_to_jax(value, placement, perm=e.perm, key=e.key)
      if e.path in masks and not np.array_equal(np.asarray(masks[e.path]), np.asarray(mask)):
        raise MaskError(f"{e.key!r} and {mask_keys[e.path]!r} are masks of one tied tensor, and they differ; JAX "
                        "holds one mask per tensor (prune tied parameters with one mask, or untie them first)")
      masks[e.path], mask_keys[e.path] = mask, e.key
    else:
      trees.setdefault(e.collection, {})[e.path] = devices.to_jax(value, placement, perm=e.perm,
                                                                   copy=copy and not owned, key=e.key)
    if done is not None:
      done(value)
  params = trees.pop("params", {})
  from jaxprune import UNMASKED  # pylint: disable=import-outside-toplevel
  mask_tree = {path: masks.get(path, UNMASKED) for path in params}
  return Converted(_unflatten(params), _unflatten(mask_tree),
                   {collection: _unflatten(flat) for collection, flat in trees.items()}, spec)


def _reconcile(entries: Sequence[Entry], masked: Callable[[Entry], bool]) -> list[Entry]:
  """The spec's entries after the pruning changes made in JAX, ordered as torch's prune/remove would; a module
  without changes keeps its keys in the spec's order (a file's order, which need not be torch's)."""
  out = []
  for _, group in itertools.groupby(entries, key=lambda e: split_key(e.key)[0]):
    group = list(group)
    kept, appended, removed, new_masks = [], [], set(), []
    for e in (e for e in group if e.role in ("param", "orig")):
      now = masked(e)
      if e.role == "param" and now:  # pruned since: torch re-registers X as X_orig at the end, adds X_mask
        appended.append(e._replace(role="orig", key=e.key + ORIG))
        new_masks.append(e._replace(role="mask", key=e.key + MASK))
      elif e.role == "orig" and not now:  # made permanent since: torch's remove puts X back at the end
        appended.append(e._replace(role="param", key=e.key[:-len(ORIG)]))
        removed.add(e.path)
      else:
        kept.append(e)
    if not appended:
      out += group
      continue
    buffers = [e for e in group if e.role == "buffer" or (e.role == "mask" and e.path not in removed)]
    out += kept + appended + buffers + new_masks
  return out


def _flat_leaves(params: PyTree, buffers: Optional[Mapping[str, PyTree]]) -> dict[tuple[str, ...], Any]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  leaves = {("params", *path): leaf for path, leaf in traverse_util.flatten_dict(params or {}).items()}
  for collection, tree in (buffers or {}).items():
    leaves.update({(collection, *path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()})
  return leaves


def _check_leaves(entries: Sequence[Entry], leaves: Mapping[tuple, Any], masks: Mapping[tuple, Any]) -> None:
  from jaxprune import is_masked  # pylint: disable=import-outside-toplevel
  needed = set()
  for e in entries:
    if e.role == "mask":
      if np.shape(masks[e.path]) != e.jax_shape():
        raise MaskError(f"mask {'/'.join(e.path)!r} (for {e.key!r}) has shape {np.shape(masks[e.path])}, expected "
                        f"{e.jax_shape()}")
      continue
    slot = (e.collection, *e.path)
    needed.add(slot)
    if slot not in leaves:
      raise InteropError(f"{e.key!r} needs the pytree leaf {e.jax_name()!r}, which is missing")
    if tuple(np.shape(leaves[slot])) != e.jax_shape():
      raise LayoutError(f"{e.key!r} needs {e.jax_name()!r} of shape {e.jax_shape()}, got {np.shape(leaves[slot])}")
  for slot in leaves:
    if slot not in needed:
      raise InteropError(f"pytree leaf {'/'.join(slot)!r} has no torch key in the spec; pass spec=None (with "
                         "layout= and module= as needed) to derive one that includes it")
  for path, mask in masks.items():
    if ("params", *path) not in leaves and is_masked(mask):
      raise MaskError(f"mask {'/'.join(path)!r} has no param beside it")


def to_torch(params: PyTree, masks: Optional[PyTree] = None, buffers: Optional[Mapping[str, PyTree]] = None,
             spec: Optional[TorchSpec] = None, *, layout: str = "torch", module: Any = None,
             rules: Sequence[layouts.LayoutRule] = (), permanent: bool = False, copy: bool = True,
             tensors: str = "torch", done: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
  """``(params, masks, buffers)`` back to a torch state_dict; ``to_torch(*from_torch(sd))`` equals ``sd`` bit for bit.

  Args:
    params, masks, buffers: as :func:`from_torch` returns them (``masks`` None: nothing pruned).
    spec: the :class:`TorchSpec` from :func:`from_torch`: torch's exact keys, order and dtypes. Without it the spec
      comes from ``module`` (a torch model, pruned or not: its keys, order, dtypes, module kinds and ties), or else
      from the pytrees themselves in ``layout`` (keys from paths, dtypes as in JAX; no ties).
    layout: the pytrees' layout, when there is no spec.
    module: see ``spec``.
    rules: extra layout rules (as in :func:`from_torch`), when there is no spec.
    permanent: bake the masks in (torch's ``prune.remove``): plain keys that load into an unpruned model.
    copy: when False, results may share memory with the JAX arrays (DLPack); do not modify them in place.
    tensors: ``"torch"``, or ``"numpy"`` for numpy arrays (to write safetensors without torch).
    done: called with each leaf once converted (a memory-mapped leaf's pages can then go back,
      :mod:`interop.pages`) and, with ``permanent``, as :func:`permanent_state_dict` calls it.

  Returns:
    An ordered ``dict`` key -> tensor: params then buffers per module (spec §9), a pruned ``X`` as ``X_orig`` plus
    ``X_mask`` in ``X``'s dtype (spec §8.2), pruning changes since the spec replayed as torch orders them. Tied
    keys get one tensor (and one mask tensor); pruning a tied leaf since the spec prunes every key of the tie.

  Raises:
    InteropError: a leaf the spec needs is missing, or a leaf has no place in the spec.
    LayoutError: a leaf's shape differs from the spec's, or a forced rule does not fit.
    DuplicateKeyError: two leaves that would become one torch key.
  """
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from jaxprune import UNMASKED, is_masked  # pylint: disable=import-outside-toplevel
  leaves = _flat_leaves(params, buffers)
  flat_masks = traverse_util.flatten_dict(masks) if masks is not None else {}
  if spec is None:
    if module is not None:
      state = module.state_dict(keep_vars=True)
      spec = build_spec(_meta(state), layout, rules, module_infos(module), ties_lib.find_ties(state))
    else:
      spec = spec_from_trees(leaves, layout, rules)

  group_of = {key: group for group in spec.ties for key in group}
  roles = {e.key: e.role for e in spec.entries}

  def masked(e: Entry) -> bool:
    now = e.collection == "params" and is_masked(flat_masks.get(e.path, UNMASKED), leaves.get(("params", *e.path)))
    group = group_of.get(e.key)
    if group is None:
      return now
    # A tied tensor has one leaf and one mask: its keys keep their roles (torch may have pruned one of them only)
    # until the leaf's pruning changes, which then changes them all.
    return e.role == "orig" if now == any(roles[k] == "orig" for k in group) else now

  entries = _reconcile(spec.entries, masked)
  _check_leaves(entries, leaves, flat_masks)
  out, made = {}, {}
  for e in entries:  # one tensor per leaf and one per mask: tied keys get one tensor again
    slot = (e.role == "mask", e.collection, *e.path)
    if slot not in made:
      back = devices.inverse_perm(e.perm)
      if e.role == "mask" and permanent:
        # Folded in right away: the bool mask as it is (shared, no copy), not a copy in the param's dtype. The
        # product is the same.
        made[slot] = devices.to_torch_tensor(flat_masks[e.path], "bool", perm=back, copy=False, tensors=tensors)
      else:
        made[slot] = (devices.mask_to_torch(flat_masks[e.path], e.dtype, perm=back, tensors=tensors)
                      if e.role == "mask" else
                      devices.to_torch_tensor(leaves[(e.collection, *e.path)], e.dtype, perm=back, copy=copy,
                                              tensors=tensors))
      if done is not None and e.role != "mask":
        done(leaves[(e.collection, *e.path)])
    out[e.key] = made[slot]
  return permanent_state_dict(out, done) if permanent else out


def _fold(orig: Any, mask: Any) -> Any:
  """torch's ``apply_mask``: ``mask.to(orig.dtype) * orig``, a product (keeps -0.0, inf*0 is NaN; spec §1.3)."""
  if devices.is_torch_tensor(orig):
    torch = sys.modules["torch"]
    with torch.no_grad():
      return mask.to(dtype=orig.dtype, copy=True).mul_(orig.detach())  # mask * orig, into the cast mask
  out = np.asarray(mask).astype(orig.dtype)
  return np.multiply(out, orig, out=out)  # into the cast mask: one new array per tensor, not two


def permanent_state_dict(state_dict: Mapping[str, Any],
                         done: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
  """A pruned state_dict with the pruning baked in, as torch's ``prune.remove`` leaves it (spec §7).

  Every ``X_orig``/``X_mask`` pair becomes ``X = X_mask * X_orig`` at ``X_orig``'s place (torch's order when
  tensors are removed in the order they were pruned); the rest is passed through. The result loads into an
  unpruned model. Works on torch tensors and numpy arrays.

  Tied keys (:mod:`interop.ties`) stay one tensor: as ``prune.remove`` writes the masked values into the shared
  parameter (``orig.data = ...``), every key of the group gets the product of the group's masks, also a key torch
  never pruned (GPT-2's ``transformer.wte.weight`` after ``lm_head.weight`` was pruned and removed).

  ``done(tensor)`` follows each ``X_orig`` once folded (:func:`tensor_stats` has the same hook).
  """
  rows = _classify(_meta(state_dict), None)
  folded: dict[str, Any] = {}
  for group in ties_lib.find_ties({key: state_dict[key] for key, role, _, _ in rows if role != "mask"}):
    value = state_dict[group[0]]
    for key in group:
      if key.endswith(ORIG) and key[:-len(ORIG)] + MASK in state_dict:
        value = _fold(value, state_dict[key[:-len(ORIG)] + MASK])
    folded.update((key, value) for key in group)
  out = {}
  for key, role, prefix, base in rows:
    if role == "orig":
      out[_join(prefix, base)] = folded[key] if key in folded else _fold(state_dict[key],
                                                                         state_dict[_join(prefix, base) + MASK])
      if done is not None:
        done(state_dict[key])
    elif role != "mask":
      out[key] = folded.get(key, state_dict[key])
  return out


def validate_state_dict(state_dict: Mapping[str, Any], module: Any = None) -> tuple[str, ...]:
  """Checks a pruned state_dict and returns the keys of its pruned tensors (``"conv1.weight"``).

  Checks every ``X_orig`` has its ``X_mask`` of the same shape, that each mask is exactly 0/1, that no ``X`` sits
  beside its pair and, with ``module``, that every key and shape belongs to the module.

  Raises:
    PairingError, MaskError, DuplicateKeyError, LayoutError: naming the key.
  """
  pruned = []
  for key, role, prefix, base in _classify(_meta(state_dict), None if module is None else module_infos(module)):
    if role == "mask":
      devices.binary_mask_host(devices.host_view(state_dict[key]), key)
      pruned.append(_join(prefix, base))
  return tuple(pruned)


class TensorStats(NamedTuple):
  """One parameter of a state_dict, as :func:`tensor_stats` counts it.

  Attributes:
    entry: the param's :class:`Entry` (an ``"orig"`` one for a pruned param: its mask sits beside it), in the
      layout asked for; ``entry.dtype`` is torch's dtype (int64 stays int64).
    pruned: whether it has a mask (an ``X_orig``/``X_mask`` pair).
    size: its number of entries.
    zeros: zeros of the effective weight (``X_orig * X_mask``), a pruned entry counting as zero.
  """
  entry: Entry
  pruned: bool
  size: int
  zeros: int


_CHUNK = 1 << 22
"""Entries counted at a time: the temporaries of counting stay a few MiB, whatever the tensor's size."""


def _chunks(view: np.ndarray) -> list[slice]:
  return [slice(i, min(i + _CHUNK, view.size)) for i in range(0, view.size, _CHUNK)]


def _nonzeros(view: np.ndarray, done: Callable[[Any], None]) -> int:
  """Nonzero entries of ``view``, piece by piece, each piece handed to ``done`` once counted."""
  if view.size <= _CHUNK:  # most tensors: one piece, nothing sliced (a checkpoint of many small ones shows it)
    count = int(np.count_nonzero(view))
    done(view)
    return count
  flat, count = view.reshape(-1), 0
  for piece in _chunks(flat):
    count += int(np.count_nonzero(flat[piece]))
    done(flat[piece])
  return count


def _kept_nonzeros(view: np.ndarray, mask_view: np.ndarray, mask_key: str, done: Callable[[Any], None]) -> int:
  """Nonzero entries of the effective weight ``view * mask`` (torch layout), after checking the mask is exactly 0/1,
  piece by piece: no full-size bool mask or product is made."""
  if view.size <= _CHUNK:
    count = int(np.count_nonzero(devices.binary_mask_host(mask_view, mask_key) & (view != 0)))
    done(view)
    done(mask_view)
    return count
  flat, mask_flat, count = view.reshape(-1), mask_view.reshape(-1), 0
  for piece in _chunks(flat):
    try:
      keep = devices.binary_mask_host(mask_flat[piece], mask_key)
    except MaskError:
      devices.binary_mask_host(mask_view, mask_key)  # the whole mask again, so the error gives the index in it
      raise
    count += int(np.count_nonzero(keep & (flat[piece] != 0)))  # nonzero as count_nonzero means it: NaN counts
    done(flat[piece])
    done(mask_flat[piece])
  return count


def tensor_stats(state_dict: Mapping[str, Any], layout: str = "torch", *, module: Any = None,
                 rules: Sequence[layouts.LayoutRule] = (),
                 done: Optional[Callable[[Any], None]] = None) -> tuple[TorchSpec, list[TensorStats]]:
  """Checks a state_dict as :func:`from_torch` would and counts the zeros of every param, on the host only.

  ``module`` and ``rules`` are :func:`from_torch`'s. Every check of :func:`from_torch` runs (pairs, 0/1 masks,
  layout rules, dtypes JAX can hold with ``jax_enable_x64`` as it is), but no JAX array is made: a state_dict of
  many small tensors is counted at numpy's speed, with no device transfer per tensor.

  Tensors are read one at a time (a param with its mask), in pieces of a few MiB, each piece handed to ``done``
  once counted: with a memory-mapped state_dict and an :class:`interop.pages.PageDropper` as ``done``, counting a
  checkpoint of any size holds a few MiB of it at a time.

  Returns:
    The spec and one :class:`TensorStats` per param (buffers are in the spec only; tied keys, ``spec.ties``, once),
    in the state_dict's order.

  Raises:
    As :func:`from_torch`.
  """
  done = done or (lambda _: None)
  spec = build_spec(_meta(state_dict), layout, rules, None if module is None else module_infos(module),
                    ties_lib.find_ties(state_dict))
  aliases = {key for group in spec.ties for key in group[1:]}
  mask_of = {e.path: e.key for e in spec.entries if e.role == "mask"}  # as from_torch: the last mask of a path
  stats = []
  for e in spec.entries:
    if e.role == "mask":
      if mask_of[e.path] != e.key:  # a tied key's other mask: checked, though the leaf's mask is another
        view = devices.host_view(state_dict[e.key])
        devices.binary_mask_host(view, e.key)
        done(view)
      continue
    if e.key in aliases:  # a tied tensor is counted once, under its first key
      continue
    view = devices.host_view(state_dict[e.key])
    devices.narrowed_dtype(view, e.key)
    if e.role == "buffer":
      done(view)
      continue
    if e.role == "param":
      nonzero = _nonzeros(view, done)
    else:
      mask_key = mask_of[e.path]
      nonzero = _kept_nonzeros(view, devices.host_view(state_dict[mask_key]), mask_key, done)
    stats.append(TensorStats(e, e.role == "orig", view.size, view.size - nonzero))
  return spec, stats
