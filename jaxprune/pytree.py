"""Masks as pytrees beside the params: selecting leaves, local and global pruning, applying and removing masks.

A mask pytree mirrors the params pytree. A pruned leaf holds a bool array of the param's shape; a leaf that is not
pruned holds :data:`UNMASKED`, a scalar ``True`` that broadcasts against the param and costs no memory. So
``jax.tree.map(f, params, masks)`` always works, and masks jit, shard and checkpoint like params do.

Leaves are named by their path, flax ``traverse_util`` style: dict keys, attribute names and sequence indices
joined with ``/`` (``"conv1/kernel"``, ``"layers/0/w"``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import methods as _methods
from jaxprune import selection
from jaxprune.amounts import Amount, num_to_prune, validate_amount

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
  """A key path as a ``/``-joined string (``"params/conv1/kernel"``)."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


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
  compiled = [re.compile(p) for p in patterns]
  return lambda path, leaf: any(p.search(path) for p in compiled)


def _leaves(params: PyTree, *trees: Optional[PyTree]):
  """Flattened params with paths, and each of ``trees`` flattened to the same structure (None -> all None)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  others = []
  for tree in trees:
    if tree is None:
      others.append([None] * len(flat))
    else:
      others.append(treedef.flatten_up_to(tree))
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
      lambda p, x: jnp.ones_like(x, dtype=bool) if pick(path_str(p), x) else UNMASKED, params)


def _resolve(method: Union[str, Callable]) -> Callable:
  if callable(method):
    return method
  if method not in METHODS:
    raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS} or a callable")
  return getattr(_methods, method)


def _with_path(path: str, err: Exception) -> Exception:
  return type(err)(f"{path}: {err}")


def prune(params: PyTree, method: Union[str, Callable], *, masks: Optional[PyTree] = None, where: Where = None,
          key: Optional[jax.Array] = None, importance_scores: Optional[PyTree] = None, **method_kwargs) -> PyTree:
  """Prunes every selected leaf on its own with ``method`` (local pruning).

  Args:
    params: the params pytree.
    method: a jaxprune method or its name (``"l1_unstructured"``, ``"ln_structured"``, ...), or a method made
      with :func:`jaxprune.pruning_method`.
    masks: the current masks; pruned entries stay pruned and amounts are relative to what is left.
    where: which leaves to prune (see :func:`selector`).
    key: a PRNG key for random methods; leaf ``i`` uses ``fold_in(key, i)``.
    importance_scores: a pytree like ``params`` (None leaves allowed) ranked instead of the params.
    **method_kwargs: the method's arguments (``amount``, ``n``, ``axis``, ...).

  Returns:
    The new masks. Leaves not selected keep their old mask (or :data:`UNMASKED`).

  Raises:
    The method's errors, with the leaf's path prefixed to the message.
  """
  fn = _resolve(method)
  needs_key = getattr(fn, "__name__", "") in _RANDOM_METHODS
  if needs_key and key is None:
    raise TypeError(f"{fn.__name__} needs a PRNG `key`")
  pick = selector(where)
  leaves, treedef, (old_masks, scores) = _leaves(params, masks, importance_scores)
  out = []
  for i, ((path, x), old, score) in enumerate(zip(leaves, old_masks, scores)):
    if not pick(path, x):
      out.append(UNMASKED if old is None else old)
      continue
    kwargs = dict(method_kwargs, mask=_old_mask(old, x))
    if score is not None:
      kwargs["importance_scores"] = score
    args = (jax.random.fold_in(key, i), x) if needs_key else (x,)
    try:
      out.append(fn(*args, **kwargs))
    except (ValueError, TypeError, IndexError) as err:
      raise _with_path(path, err) from err
  return jax.tree_util.tree_unflatten(treedef, out)


def global_unstructured(params: PyTree, amount: Amount, *, masks: Optional[PyTree] = None, where: Where = None,
                        importance_scores: Optional[PyTree] = None) -> PyTree:
  """Prunes the ``amount`` smallest-magnitude entries across all selected leaves (torch's global_unstructured).

  One ranking over the whole model, as torch's ``global_unstructured(..., prune.L1Unstructured, amount=...)``
  (spec §6): entries already pruned neither count toward ``amount`` nor compete, scores of different dtypes are
  compared exactly (f16/bf16 widen to f32), exactly ``k`` entries are pruned, and ties are pruned in leaf order
  (the pytree's flatten order) then row-major, lowest first.

  Args:
    params: the params pytree.
    amount: a fraction of the live entries in the selected leaves, or a count; may be traced under jit.
    masks: the current masks (pruned entries stay pruned).
    where: which leaves take part (see :func:`selector`).
    importance_scores: a pytree like ``params`` (None leaves allowed) ranked, by absolute value, instead.

  Returns:
    The new masks, with a per-entry mask on every selected leaf.
  """
  validate_amount(amount)
  pick = selector(where)
  leaves, treedef, (old_masks, scores) = _leaves(params, masks, importance_scores)
  chosen = [i for i, (path, x) in enumerate(leaves) if pick(path, x)]
  if not chosen:
    raise ValueError("global_unstructured: `where` selected no leaves to prune")
  ranked, live = [], []
  for i in chosen:
    path, x = leaves[i][0], jnp.asarray(leaves[i][1])
    try:
      ranked.append(jnp.abs(_methods.check_scores(scores[i], x)))
      live.append(_methods.check_mask(_old_mask(old_masks[i], x), x))
    except (ValueError, TypeError) as err:
      raise _with_path(path, err) from err
  dtype = selection.score_dtype([r.dtype for r in ranked])
  keys = [selection.sortable_keys(r, dtype) for r in ranked]
  counts = [_methods.live_count(m, key.size) for m, key in zip(live, keys)]
  total = sum(counts[1:], counts[0])
  pruned = selection.smallest(keys, num_to_prune(amount, total), live)
  out = [UNMASKED if old is None else old for old in old_masks]
  for i, m, p in zip(chosen, live, pruned):
    out[i] = ~p if m is None else m & ~p
  return jax.tree_util.tree_unflatten(treedef, out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """The effective params ``params * masks`` (torch's ``weight = weight_orig * weight_mask``).

  A multiplication, as torch does, not a select: a pruned negative weight becomes -0.0, and a pruned inf or NaN
  becomes NaN (spec §1.3).
  """
  # After a jit boundary UNMASKED is a 0-d array, so test the shape rather than identity.
  return jax.tree.map(lambda p, m: jnp.asarray(m).astype(jnp.result_type(p)) * p if is_masked(m, p) else p,
                      params, masks)


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
  return jax.tree_util.tree_unflatten(treedef, new_params), jax.tree_util.tree_unflatten(treedef, new_masks)
