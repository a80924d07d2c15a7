"""An optax wrapper that keeps pruned weights pruned, whatever the optimizer underneath.

Zeroing the gradients of pruned weights is not enough: momentum or Adam state built up before pruning, weight
decay, lookahead and friends all produce non-zero updates where the gradient is zero, so pruned weights drift
back (spec §10 measures it for torch). :func:`masked_optimizer` closes every path:

* the gradients are masked before the inner optimizer, so its moments never accumulate for pruned entries;
* the inner optimizer's state is zeroed at pruned entries, so newly pruned entries lose their momentum at once
  and re-grown ones start from fresh zero state;
* the updates are masked after it, and drive pruned params to exactly zero (and keep them there).

That is **lock** semantics: pruned params are exactly 0.0 and never move. **torch** semantics instead reproduce a
``torch.nn.utils.prune`` fine-tuning loop: the params are torch's ``weight_orig``, the loss is computed on
``jaxprune.apply_masks(params, masks)`` (so the gradient is masked by the chain rule), and the optimizer is left
alone, so weight decay and stale momentum move pruned ``weight_orig`` entries while the effective weight stays 0.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.pytree import Where, init_masks, is_masked, path_str, unboxed

PyTree = Any
Semantics = Literal["lock", "torch"]
MasksLike = Union[None, PyTree, Callable[[PyTree], PyTree]]
SEMANTICS = ("lock", "torch")


class MaskedState(NamedTuple):
  """State of :func:`masked_optimizer`.

  Attributes:
    masks: the masks in force (a mask pytree: bool arrays, :data:`jaxprune.UNMASKED` elsewhere).
    inner_state: the wrapped optimizer's state.
  """
  masks: PyTree
  inner_state: optax.OptState


def check_semantics(semantics: str) -> None:
  if semantics not in SEMANTICS:
    raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


def check_masks(masks: PyTree, params: PyTree, layout: Optional[PyTree] = None) -> PyTree:
  """Validates a mask pytree against the params (and, if given, the mask layout already in the state).

  Raises:
    ValueError: the masks do not mirror the params, a mask leaf is not a bool array of its param's shape, or a
      leaf is masked in one of ``masks``/``layout`` and not in the other. The message names the leaf's path.
  """
  masks, params = unboxed(masks), unboxed(params)  # an NNX state as optax sees it in nnx.Optimizer.update
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    flat_masks = treedef.flatten_up_to(masks)
  except (ValueError, TypeError) as err:
    raise ValueError(f"masks must mirror the params pytree {treedef}: {err}") from err
  flat_layout = [None] * len(flat) if layout is None else treedef.flatten_up_to(layout)
  for (path, param), mask, old in zip(flat, flat_masks, flat_layout):
    name = path_str(path)
    if is_masked(mask, param):
      if jnp.result_type(mask) != jnp.bool_ or np.shape(mask) != np.shape(param):
        raise ValueError(f"mask for {name!r}: expected a bool array of the param's shape {np.shape(param)}, got "
                         f"{jnp.result_type(mask)}{list(np.shape(mask))} (use `mask.astype(bool)` for 0/1 masks)")
    elif np.shape(mask) != () or jnp.result_type(mask) != jnp.bool_:
      raise ValueError(f"mask for {name!r}: expected a bool array of shape {np.shape(param)} or jaxprune.UNMASKED, "
                       f"got {jnp.result_type(mask)}{list(np.shape(mask))}")
    # A 0-d param's UNMASKED and a 0-d mask look alike once traced, so only leaves with ndim > 0 are compared.
    if old is not None and np.ndim(param) > 0 and is_masked(mask, param) != is_masked(old, param):
      raise ValueError(
          f"mask for {name!r}: the optimizer state holds {'a per-entry mask' if is_masked(old, param) else 'UNMASKED'}"
          f" there but {'UNMASKED' if is_masked(old, param) else 'a per-entry mask'} was passed; which leaves are "
          "masked is fixed when the state is initialised (give masks= or where= to the transform)")
  return masks


def _is_hole(node) -> bool:
  # optax.masked / multi_transform leave MaskedNode (and some transforms None) where a param is not handled.
  return node is None or isinstance(node, optax.MaskedNode)


def map_param_state(fn: Callable[[jax.Array, jax.Array], jax.Array], state: PyTree, params: PyTree,
                    masks: PyTree) -> PyTree:
  """Applies ``fn(leaf, mask)`` to every state leaf that stands for a masked param entry by entry.

  Optimizers keep per-parameter state (Adam's ``mu``/``nu``, SGD's trace, MultiSteps' accumulated gradients...)
  as subtrees that mirror the params. Such subtrees are found anywhere in a nested state by structure (holes left
  by ``optax.masked`` allowed) and only their leaves with the param's exact shape are mapped, so factored state
  (Adafactor's row/column statistics) and scalars (counts, hyperparameters) are left alone.
  """
  treedef = jax.tree.structure(params)
  flat_params = treedef.flatten_up_to(params)
  flat_masks = treedef.flatten_up_to(masks)

  def mirrors_params(node) -> bool:
    return jax.tree.structure(node, is_leaf=_is_hole) == treedef

  def visit(node):
    if not mirrors_params(node):
      return node
    leaves = treedef.flatten_up_to(node)
    out = [fn(leaf, mask) if is_masked(mask, param) and isinstance(leaf, (jax.Array, np.ndarray))
           and leaf.shape == np.shape(param) else leaf
           for leaf, mask, param in zip(leaves, flat_masks, flat_params)]
    return jax.tree.unflatten(treedef, out)

  return jax.tree.map(visit, state, is_leaf=mirrors_params)


def _kept(mask: jax.Array) -> jax.Array:
  # The same bool, recomputed: XLA:CPU vectorizes a select on a compare inside a fused loop, but not one on a
  # bool array loaded from memory; this makes the masked Adam update ~1.5x faster on CPU, and is free elsewhere.
  return mask.astype(jnp.uint8) != 0


def _zero_where_not(masks: PyTree, state: PyTree, params: PyTree) -> PyTree:
  return map_param_state(lambda leaf, m: jnp.where(_kept(m), leaf, jnp.zeros_like(leaf)), state, params, masks)


def _zero_pruned(tree: PyTree, masks: PyTree) -> PyTree:
  return jax.tree.map(lambda x, m: jnp.where(_kept(m), x, jnp.zeros((), x.dtype)) if is_masked(m, x) else x,
                      tree, masks)


def masked_optimizer(inner: optax.GradientTransformation, masks: MasksLike = None, *, where: Where = None,
                     semantics: Semantics = "lock") -> optax.GradientTransformationExtraArgs:
  """Wraps any optax optimizer so that pruned weights stay pruned.

  The masks live in the state. Pass new ones at any step as an extra argument,
  ``opt.update(grads, state, params, masks=new_masks)`` (``optax.chain`` forwards it): they are used for this
  update and stored for the next ones. Newly pruned entries lose their optimizer state at once, and re-grown ones
  start from zero state.

  Examples:
    >>> masks = jaxprune.prune(params, "l1_unstructured", amount=0.8)
    >>> opt = jaxprune.masked_optimizer(optax.adamw(1e-3), masks)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)   # pruned entries are exactly 0.0

  Args:
    inner: the optimizer to wrap: any ``GradientTransformation`` (chains, ``inject_hyperparams``,
      ``optax.MultiSteps(...).gradient_transformation()``, ``optax.masked``, ...). Extra arguments other than
      ``masks`` are forwarded to it.
    masks: the initial masks: a mask pytree, or a function ``params -> masks``, or None for all-True masks on the
      leaves picked by ``where``. Which leaves carry a per-entry mask is fixed here.
    where: which leaves get all-True masks when ``masks`` is None (see :func:`jaxprune.selector`).
    semantics: ``"lock"`` (pruned params are exactly zero and never move) or ``"torch"`` (params are torch's
      ``weight_orig``; the loss must use ``jaxprune.apply_masks``; the optimizer is not touched, so weight decay
      and momentum may move pruned ``weight_orig`` entries, as they do in torch).

  Returns:
    A ``GradientTransformationExtraArgs``. In lock semantics ``update`` needs ``params``.

  Notes:
    Lock semantics on a factored optimizer (``optax.adafactor``): its row/column statistics mix pruned and live
    entries and cannot be zeroed entry by entry, so they are left as they are; the gradients and updates are still
    masked, so pruned params stay exactly zero.
  """
  check_semantics(semantics)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"masked_optimizer wraps an optax GradientTransformation (e.g. optax.adam(1e-3)), got {inner!r}")
  inner = optax.with_extra_args_support(inner)

  def init(params):
    # An equinox module is callable too: masks= is a function only if it is a pytree leaf.
    is_function = callable(masks) and jax.tree_util.treedef_is_leaf(jax.tree.structure(masks))
    initial = init_masks(params, where) if masks is None else masks(params) if is_function else masks
    check_masks(initial, params)
    return MaskedState(masks=initial, inner_state=inner.init(params))

  def update(updates, state, params=None, *, masks=None, **extra_args):
    new = state.masks if masks is None else check_masks(masks, updates, layout=state.masks)
    if semantics == "torch":
      updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
      return updates, MaskedState(masks=new, inner_state=inner_state)
    if params is None:
      raise ValueError("masked_optimizer (lock semantics) needs `params` in update() to hold pruned params at 0")
    # The inner optimizer sees the pruned model: zero gradients, params and state at pruned entries. The state it
    # returns there is then zero too (state built from zeros is zero), so an entry re-grown later starts from zero
    # state without comparing old and new masks, and each moment stays one fused loop per leaf (a second mask in
    # that loop costs ~25% on CPU).
    inner_state = _zero_where_not(new, state.inner_state, params)
    updates, inner_state = inner.update(_zero_pruned(updates, new), inner_state, _zero_pruned(params, new),
                                        **extra_args)
    # -p rather than 0: a pruned param that is not zero yet (just pruned, or given so) lands on exactly 0.0.
    updates = jax.tree.map(lambda u, m, p: jnp.where(_kept(m), u, -p.astype(u.dtype)) if is_masked(m, u) else u,
                           updates, new, params)
    return updates, MaskedState(masks=new, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def apply_updates(params: PyTree, updates: PyTree, masks: PyTree) -> PyTree:
  """``optax.apply_updates`` that selects exactly 0.0 at pruned entries instead of adding to them.

  The lock-semantics update of a pruned param is ``-p``, which lands finite params on exactly 0.0 through
  ``optax.apply_updates`` (``p + u``). No update brings an inf or NaN back to 0 by addition (``inf - inf`` is
  NaN), so a model that may hold non-finite pruned weights (e.g. loaded from a diverged checkpoint) should apply
  its updates with this select instead.
  """
  def leaf(p, u, m):
    new = jnp.asarray(p + u).astype(jnp.result_type(p))
    return jnp.where(m, new, jnp.zeros((), new.dtype)) if is_masked(m, p) else new
  return jax.tree.map(leaf, params, updates, masks)


def masks_from_state(opt_state: optax.OptState) -> PyTree:
  """The masks in force, found in an optimizer state that contains one :func:`masked_optimizer` (at any depth).

  Raises:
    ValueError: the state holds no masked optimizer state, or more than one.
  """
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState))
           if isinstance(node, MaskedState)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one jaxprune masked optimizer in the state, found {len(found)}")
  return found[0].masks


__all__ = ["MaskedState", "apply_updates", "masked_optimizer", "masks_from_state", "map_param_state"]
