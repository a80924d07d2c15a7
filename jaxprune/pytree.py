"""Masks as pytrees beside the params: selecting leaves, local and global pruning, applying and removing masks.

A mask pytree mirrors the params pytree. A pruned leaf holds a bool array of the param's shape; a leaf that is not
pruned holds :data:`UNMASKED`, a scalar ``True`` that broadcasts against the param and costs no memory. So
``jax.tree.map(f, params, masks)`` always works, and masks jit, shard and checkpoint like params do.

Leaves are named by their path, flax ``traverse_util`` style: dict keys, attribute names and sequence indices
joined with ``/`` (``"conv1/kernel"``, ``"layers/0/w"``).

Flax NNX states (``nnx.state(model, nnx.Param)``) hold each array in an ``nnx.Variable``. Every function here
reads such a state as ``nnx.as_pure`` would (each Variable replaced by the array it holds): leaves are named
``"l1/kernel"``, not ``"l1/kernel/value"``, and the masks returned are an ``nnx.State`` of plain bool arrays,
the structure ``nnx.Optimizer`` hands to optax. Params given with Variables come back with Variables.
"""
from __future__ import annotations

import functools
import numbers
import re
import sys
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import methods as _methods
from jaxprune import selection
from jaxprune.amounts import Amount, as_argument, check_count, from_argument, num_to_prune, validate_amount

PyTree = Any
Predicate = Callable[[str, Any], bool]
Where = Union[None, str, Sequence[str], Predicate]

UNMASKED = np.bool_(True)
"""The mask of a leaf that is not pruned: a scalar True (broadcasts, costs no memory)."""

_RANDOM_METHODS = ("random_unstructured", "random_structured")
METHODS = ("identity", "random_unstructured", "l1_unstructured", "random_structured", "ln_structured",
           "custom_from_mask", "nm_structured", "block_structured")


def is_masked(mask: Any, param: Any = None) -> bool:
  """Whether a mask leaf is a per-entry mask rather than :data:`UNMASKED`.

  Without ``param`` this is ``ndim(mask) > 0``. A 0-d param's mask is 0-d either way; pass ``param`` and a 0-d
  array mask counts as a real mask (the :data:`UNMASKED` scalar itself does not).
  """
  if np.ndim(mask) > 0:
    return True
  return param is not None and np.ndim(param) == 0 and not isinstance(mask, (bool, np.bool_))


def path_str(path: Sequence[Any]) -> str:
  """A key path as a ``/``-joined string (``"params/conv1/kernel"``).

  A last ``.value`` attribute key is left out: it is the array inside a box (an NNX Variable, flax's
  ``nn.Partitioned``), and the path names the param as users write it (``"l1/kernel"``). Dict keys named
  ``"value"`` are kept; so an attribute that is itself called ``value`` reads as its parent's path.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _variable_type() -> Optional[type]:
  """``nnx.Variable``, or None while flax.nnx is not imported (then no tree can hold one, and none is imported)."""
  variablelib = sys.modules.get("flax.nnx.variablelib")
  return None if variablelib is None else variablelib.Variable


def unboxed(tree: PyTree) -> PyTree:
  """``tree`` with every NNX Variable replaced by what it holds (``nnx.as_pure``); other trees as they are."""
  variable = _variable_type()
  if variable is None:
    return tree
  is_variable = lambda x: isinstance(x, variable)
  if not any(map(is_variable, jax.tree.leaves(tree, is_leaf=is_variable))):
    return tree  # a plain pytree is not rebuilt: its leaves stay the very objects given
  unbox = lambda x: unboxed(x.get_value() if hasattr(x, "get_value") else x.value) if is_variable(x) else x
  return jax.tree.map(unbox, tree, is_leaf=is_variable)


def _boxed_like(params: PyTree, plain: PyTree) -> PyTree:
  """``plain`` (a tree like ``unboxed(params)``) with each of ``params``' NNX Variables put back around its part."""
  variable = _variable_type()
  is_variable = lambda x: isinstance(x, variable)
  return jax.tree.map(lambda p, new: p.replace(value=new) if is_variable(p) else new, params, plain,
                      is_leaf=is_variable)


def default_where(path: str, leaf: Any) -> bool:
  """Weights and kernels: floating leaves with ``ndim >= 2``. Biases, norm scales and scalars are left alone."""
  del path
  return np.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def selector(where: Where) -> Predicate:
  """A ``(path, leaf) -> bool`` predicate from ``where``.

  Args:
    where: None (:func:`default_where`), a regex or list of regexes searched in the path (``re.search``; anchor
      with ``^``/``$`` for exact matches), or a predicate ``(path, leaf) -> bool``.
  """
  if where is None:
    return default_where
  if callable(where):
    return where
  patterns = [where] if isinstance(where, str) else list(where)
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as err:
      raise ValueError(f"invalid `where` pattern {pattern!r}: {err}") from err
  return lambda path, leaf: any(p.search(path) for p in compiled)


def _leaves(params: PyTree, *trees: Optional[PyTree]):
  """Flattened params with paths, and each of ``trees`` flattened to the same structure (None -> all None).

  NNX Variables are read through (:func:`unboxed`), in ``params`` and in ``trees`` alike, so the treedef has none:
  trees rebuilt from it (the masks) hold plain arrays.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(unboxed(params))
  others = []
  for tree in trees:
    if tree is None:
      others.append([None] * len(flat))
    else:
      others.append(treedef.flatten_up_to(unboxed(tree)))
  return [(path_str(p), leaf) for p, leaf in flat], treedef, others


def _old_mask(mask, param):
  return mask if mask is not None and is_masked(mask, param) else None


def init_masks(params: PyTree, where: Where = None) -> PyTree:
  """All-True bool masks on the selected leaves, :data:`UNMASKED` elsewhere.

  Each mask is created like its param (``ones_like``): a sharded param's mask is born with the same sharding,
  shard by shard, never whole on one device.
  """
  pick = selector(where)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones_like(x, dtype=bool) if pick(path_str(p), x) else UNMASKED, unboxed(params))


def _resolve(method: Union[str, Callable]) -> Callable:
  if callable(method):
    return method
  if method not in METHODS:
    raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS} or a callable")
  return getattr(_methods, method)


def _with_path(path: str, err: Exception) -> Exception:
  return type(err)(f"{path}: {err}")


def _per_leaf_amounts(amount, leaves, treedef) -> list:
  """One amount per leaf from a scalar, a pytree of amounts (None: leave the leaf alone) or ``fn(path, leaf)``."""
  # An equinox module is callable too; a pytree of amounts shaped like equinox params is a node, a function a leaf.
  if callable(amount) and jax.tree_util.treedef_is_leaf(jax.tree.structure(amount)):
    return [amount(path, x) for path, x in leaves]
  if isinstance(amount, (numbers.Number, np.generic)) or (
      isinstance(amount, (jax.Array, np.ndarray)) and np.ndim(amount) == 0):
    return [amount] * len(leaves)
  try:
    return treedef.flatten_up_to(amount)
  except (ValueError, TypeError) as err:
    raise ValueError(f"amount must be a number, a pytree of amounts like the params, or a function "
                     f"(path, leaf) -> amount: {err}") from err


def _static(kwargs: dict) -> tuple:
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def prune(params: PyTree, method: Union[str, Callable], *, masks: Optional[PyTree] = None, where: Where = None,
          key: Optional[jax.Array] = None, importance_scores: Optional[PyTree] = None, **method_kwargs) -> PyTree:
  """Prunes every selected leaf on its own with ``method`` (local pruning).

  The built-in methods that rank units (``l1_unstructured``, ``random_unstructured``, ``ln_structured``,
  ``random_structured``, ``block_structured``) rank every leaf in one selection and ``nm_structured`` runs in the
  same program: one compiled program for the whole model, whose size grows only by the per-leaf elementwise work.

  Args:
    params: the params pytree.
    method: a jaxprune method or its name (``"l1_unstructured"``, ``"ln_structured"``, ...), or a method made
      with :func:`jaxprune.pruning_method`.
    masks: the current masks; pruned entries stay pruned and amounts are relative to what is left.
    where: which leaves to prune (see :func:`selector`).
    key: a PRNG key for random methods; leaf ``i`` uses ``fold_in(key, i)``.
    importance_scores: a pytree like ``params`` (None leaves allowed) ranked instead of the params.
    **method_kwargs: the method's arguments (``n``, ``axis``, ...). ``amount`` may be one amount for every leaf,
      a pytree of amounts like ``params`` (None leaves are not pruned), or a function ``(path, leaf) -> amount``
      (None: not pruned), so a model gets per-layer amounts in one call.

  Returns:
    The new masks. Leaves not selected keep their old mask (or :data:`UNMASKED`).

  Raises:
    The method's errors, with the leaf's path prefixed to the message.
  """
  fn = _resolve(method)
  name = getattr(fn, "__name__", "")
  needs_key = name in _RANDOM_METHODS
  if needs_key and key is None:
    raise TypeError(f"{fn.__name__} needs a PRNG `key`")
  pick = selector(where)
  leaves, treedef, (old_masks, scores) = _leaves(params, masks, importance_scores)
  has_amount = "amount" in method_kwargs
  amounts = _per_leaf_amounts(method_kwargs.pop("amount"), leaves, treedef) if has_amount else [None] * len(leaves)
  chosen = [i for i, (path, x) in enumerate(leaves) if pick(path, x) and (amounts[i] is not None or not has_amount)]
  out = [UNMASKED if old is None else old for old in old_masks]
  builtin = fn is getattr(_methods, name, None)
  if builtin and (name in _methods.RANKINGS or name == "nm_structured"):
    args = []
    for i in chosen:
      path, x = leaves[i][0], jnp.asarray(leaves[i][1])
      try:
        if has_amount:
          validate_amount(amounts[i])
        args.append((x, _methods.check_mask(_old_mask(old_masks[i], x), x),
                     None if scores[i] is None else _methods.check_scores(scores[i], x),
                     as_argument(amounts[i]) if has_amount else None))
      except (ValueError, TypeError, IndexError) as err:
        raise _with_path(path, err) from err
    paths = tuple(leaves[i][0] for i in chosen)
    try:
      new, live = _prune_leaves(name, _static(method_kwargs), tuple(args), key, np.array(chosen, np.uint32))
    except _LeafError as failure:
      raise _with_path(paths[failure.position], failure.error) from failure.error
    for i, path, (*_, amount), count in zip(chosen, paths, args, live):
      _check_count(path, amounts[i], count)
    for i, m in zip(chosen, new):
      out[i] = m
    return jax.tree_util.tree_unflatten(treedef, out)
  for i in chosen:
    path, x = leaves[i]
    kwargs = dict(method_kwargs, mask=_old_mask(old_masks[i], x))
    if has_amount:
      kwargs["amount"] = amounts[i]
    if scores[i] is not None:
      kwargs["importance_scores"] = scores[i]
    args = (jax.random.fold_in(key, i), x) if needs_key else (x,)
    try:
      out[i] = fn(*args, **kwargs)
    except (ValueError, TypeError, IndexError) as err:
      raise _with_path(path, err) from err
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_count(path: Optional[str], amount, live) -> None:
  """torch's error for a count larger than what is left, once the live count is known (eager calls only)."""
  if live is None or isinstance(live, jax.core.Tracer) or isinstance(amount, jax.core.Tracer):
    return
  if isinstance(amount, (numbers.Integral, np.integer)) or (
      isinstance(amount, (jax.Array, np.ndarray)) and jnp.issubdtype(amount.dtype, jnp.integer)):
    try:
      check_count(amount, live)
    except ValueError as err:
      raise err if path is None else _with_path(path, err) from None


class _LeafError(Exception):
  """A method's error on the ``position``-th leaf of a :func:`_prune_leaves` call, named by its path outside."""

  def __init__(self, position: int, error: Exception):
    super().__init__(position, error)
    self.position, self.error = position, error


@functools.partial(jax.jit, static_argnames=("name", "kwargs"))
def _prune_leaves(name: str, kwargs: tuple, args: tuple, key, indices: jax.Array):
  """Every chosen leaf pruned by a built-in method in one program: one selection ranks them all, a segment each.

  The leaves' paths and indices (``indices``, which seed random methods) are not part of the program, so leaves of
  one shape share it: pruning a model leaf by leaf compiles once per shape, not once per leaf.

  Returns the new masks and, per leaf, how many units were live (None for N:M), to check counts eagerly.
  """
  kwargs = dict(kwargs)
  if name == "nm_structured":
    masks = []
    for position, (x, mask, score, _) in enumerate(args):
      try:
        masks.append(_methods.nm_structured(x, mask=mask, importance_scores=score, **kwargs))
      except (ValueError, TypeError, IndexError) as err:
        raise _LeafError(position, err) from err
    return masks, [None] * len(masks)
  build = _methods.RANKINGS[name]
  if name in _RANDOM_METHODS:  # every leaf's draw at once, one program per distinct shape
    build = _methods.RANDOM_RANKINGS_OF_KEYS[name]
    shapes = []
    for position, (x, *_) in enumerate(args):
      try:
        shapes.append(_methods.random_draw_shape(name, x, **kwargs))
      except (ValueError, TypeError, IndexError) as err:
        raise _LeafError(position, err) from err
    draws = _methods.uniform_keys_by_shape(key, indices, shapes)
  rankings = []
  with jax.enable_x64(True):
    decoded = [from_argument(amount) for (*_, amount) in args]
  for position, ((x, mask, score, _), amount) in enumerate(zip(args, decoded)):
    extra = {} if score is None else {"importance_scores": score}
    lead = (draws[position], x) if name in _RANDOM_METHODS else (x,)
    try:
      rankings.append(build(*lead, amount, mask=mask, **extra, **kwargs))
    except (ValueError, TypeError, IndexError) as err:
      raise _LeafError(position, err) from err
  if not rankings:
    return [], []
  with jax.enable_x64(True):
    live = [_methods.live_count(r.live, r.keys.size) for r in rankings]
    live = [jnp.asarray(n, jnp.int64) for n in live]
    ks = jnp.stack([num_to_prune(r.amount, n) for r, n in zip(rankings, live)])
  segments = range(len(rankings))
  magnitudes = [x if score is None else score for x, _, score, _ in args]
  if name == "l1_unstructured" and all(jnp.issubdtype(m.dtype, jnp.floating) for m in magnitudes):
    # The keys of |x| formed on the buffer of all leaves (exact: floats widen exactly), and the kept entries
    # (the live ones not selected, which is what the mask becomes) read off it: no key computation and no mask
    # update per leaf in the program (the per-leaf keys go unused and XLA drops them).
    return selection.smallest_magnitudes(magnitudes, ks, [r.live for r in rankings], segments, complement=True), live
  pruned = selection.smallest([r.keys for r in rankings], ks, [r.live for r in rankings], segments=segments)
  return [r.expand(p) for r, p in zip(rankings, pruned)], live


def global_unstructured(params: PyTree, amount: Amount, *, masks: Optional[PyTree] = None, where: Where = None,
                        importance_scores: Optional[PyTree] = None) -> PyTree:
  """Prunes the ``amount`` smallest-magnitude entries across all selected leaves (torch's global_unstructured).

  One ranking over the whole model, as torch's ``global_unstructured(..., prune.L1Unstructured, amount=...)``
  (spec §6): entries already pruned neither count toward ``amount`` nor compete, scores of different dtypes are
  compared exactly (f16/bf16 widen to f32), exactly ``k`` entries are pruned, and ties are pruned in leaf order
  (the pytree's flatten order) then row-major, lowest first. It is one compiled program whatever the number of
  leaves; on concrete CPU arrays the leaves are laid end to end on the host first, so the program depends only on
  the total size and is compiled once for every model of about that size.

  Args:
    params: the params pytree.
    amount: a fraction of the live entries in the selected leaves, or a count; may be traced under jit.
    masks: the current masks (pruned entries stay pruned). A leaf that carries a per-entry mask takes part
      unless ``where`` excludes it, even where the default ``where`` would not pick it (a pruned 1-d weight).
    where: which leaves take part (see :func:`selector`).
    importance_scores: a pytree like ``params`` (None leaves allowed) ranked, by absolute value, instead.

  Returns:
    The new masks, with a per-entry mask on every selected leaf.
  """
  validate_amount(amount)
  pick = selector(where)
  leaves, treedef, (old_masks, scores) = _leaves(params, masks, importance_scores)
  chosen = [i for i, (path, x) in enumerate(leaves)
            if pick(path, x) or (where is None and _old_mask(old_masks[i], x) is not None)]
  if not chosen:
    raise ValueError("global_unstructured: `where` selected no leaves to prune")
  ranked, live = [], []
  for i in chosen:
    path, x = leaves[i][0], jnp.asarray(leaves[i][1])
    try:
      ranked.append(_methods.check_rankable(_methods.check_scores(scores[i], x)))
      live.append(_methods.check_mask(_old_mask(old_masks[i], x), x))
    except (ValueError, TypeError) as err:
      raise _with_path(path, err) from err
  device = selection.host_device(ranked + [m for m in live if m is not None])
  if device is not None and len(ranked) > 1:
    pruned, total = _global_on_host(ranked, live, amount, device)
  else:
    pruned, total = _global(tuple(ranked), tuple(live), as_argument(amount))
  _check_count(None, amount, total)
  out = [UNMASKED if old is None else old for old in old_masks]
  for i, p in zip(chosen, pruned):
    out[i] = p
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _global(scores: tuple, live: tuple, amount) -> tuple[list, jax.Array]:
  """The kept entries of every leaf after one global ranking, and how many entries were live."""
  with jax.enable_x64(True):
    total = sum((jnp.asarray(_methods.live_count(m, s.size), jnp.int64) for m, s in zip(live, scores)),
                jnp.zeros((), jnp.int64))
    k = num_to_prune(from_argument(amount), total)
  kept = selection.smallest_magnitudes(scores, k, live, complement=True)
  return kept, total


def _global_on_host(scores: list, live: list, amount, device) -> tuple[list, jax.Array]:
  """:func:`_global` on the leaves laid end to end: one program for any number of leaves of about this size.

  The padding is not a candidate, so it is never pruned and does not count.
  """
  flat, mask = selection.lay_out_on_host(scores, live, selection.layout_dtype([s.dtype for s in scores]), device)
  (kept,), total = _global((flat,), (mask,), as_argument(amount))
  return selection.split_on_host(np.asarray(kept), [np.shape(s) for s in scores], device), total


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """The effective params ``params * masks`` (torch's ``weight = weight_orig * weight_mask``).

  A multiplication, as torch does, not a select: a pruned negative weight becomes -0.0, and a pruned inf or NaN
  becomes NaN (spec §1.3).
  """
  # After a jit boundary UNMASKED is a 0-d array, so test the shape rather than identity.
  plain = unboxed(params)
  masked = jax.tree.map(lambda p, m: jnp.asarray(m).astype(jnp.result_type(p)) * p if is_masked(m, p) else p,
                        plain, unboxed(masks))
  return masked if plain is params else _boxed_like(params, masked)


def make_permanent(params: PyTree, masks: PyTree, where: Where = None) -> tuple[PyTree, PyTree]:
  """Bakes masks into the params and drops them (torch's ``prune.remove``).

  Args:
    params: the params (torch's ``weight_orig``).
    masks: their masks.
    where: which leaves to make permanent; None means every masked leaf.

  Returns:
    ``(params, masks)``: the chosen leaves hold ``param * mask`` and :data:`UNMASKED`; the rest are unchanged.
  """
  pick = (lambda path, leaf: True) if where is None else selector(where)
  leaves, treedef, (flat_masks,) = _leaves(params, masks)
  new_params, new_masks = [], []
  for (path, x), m in zip(leaves, flat_masks):
    if pick(path, x) and is_masked(m, x):
      new_params.append(jnp.asarray(m).astype(jnp.result_type(x)) * x)
      new_masks.append(UNMASKED)
    else:
      new_params.append(x)
      new_masks.append(m)
  new_params = jax.tree_util.tree_unflatten(treedef, new_params)
  if unboxed(params) is not params:  # an NNX state comes back with its Variables
    new_params = _boxed_like(params, new_params)
  return new_params, jax.tree_util.tree_unflatten(treedef, new_masks)
