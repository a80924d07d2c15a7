"""Pruning on a schedule inside the optimizer update, with optional lottery-ticket rewinding.

:func:`scheduled_pruning` wraps an optimizer in :func:`jaxprune.masked_optimizer` and, at every update, asks a
sparsity schedule (:mod:`jaxprune.schedules`) for the target sparsity. When the target rises, it prunes the new
entries under ``lax.cond`` with the traced target, so a whole gradual-pruning run compiles once. The masks live in
the optimizer state (:func:`jaxprune.masks_from_state`).

Each update first prunes, ranking the ``params`` passed to it (the weights this step's gradients were computed
at), then lets the masked optimizer apply the step with the new masks. In lock semantics the newly pruned weights
land on exactly 0.0 in that same update and their optimizer state is zeroed. In torch semantics nothing but the
masks changes: exactly what torch does when ``prune.*`` runs between ``loss.backward()`` and
``optimizer.step()`` (it ranks the weights of that forward, and the gradient, computed before pruning, reaches the
newly pruned ``weight_orig`` entries). Pruning after ``optimizer.step()`` in torch ranks the post-step weights on a
first prune but the stale pre-step effective weight on later ones (spec §5.5); here it is always the weights the
update's gradient was computed at.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import methods as _methods
from jaxprune.amounts import num_to_prune
from jaxprune.optim import MaskedState, MasksLike, Semantics, check_semantics, masked_optimizer
from jaxprune.pytree import Where, global_unstructured, is_masked, path_str, prune, unboxed
from jaxprune.schedules import ScheduleLike, as_schedule
from jaxprune.selection import count_true

PyTree = Any
Budget = Callable[[PyTree, jax.Array], PyTree]  # (params, overall sparsity) -> a sparsity per leaf (jaxprune.budgets)

_UNSTRUCTURED = ("l1_unstructured", "random_unstructured")
_STRUCTURED = ("ln_structured", "random_structured")
_BLOCKS = ("block_structured",)
_GLOBAL = "global_unstructured"
SCHEDULABLE = _UNSTRUCTURED + _STRUCTURED + _BLOCKS + (_GLOBAL,)


class ScheduledPruningState(NamedTuple):
  """State of :func:`scheduled_pruning`.

  Attributes:
    count: updates seen so far (the step the schedule is evaluated at).
    sparsity: the highest target sparsity pruned to so far; pruning happens when the schedule exceeds it.
    key: the PRNG key of a random method (None otherwise), split at every pruning step.
    rewind_params: the weights unpruned entries are rewound to (None without rewinding).
    inner_state: the :class:`jaxprune.optim.MaskedState` of the wrapped optimizer, which holds the masks.
  """
  count: jax.Array
  sparsity: jax.Array
  key: Optional[jax.Array]
  rewind_params: Optional[PyTree]
  inner_state: MaskedState


def _method_name(method: Union[str, Callable]) -> str:
  name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
  known = name in SCHEDULABLE and (isinstance(method, str) or method is global_unstructured
                                   or method is getattr(_methods, name, None))
  if not known:
    raise ValueError(f"scheduled_pruning cannot schedule {method!r}: the amount comes from the schedule, so the "
                     f"method must be one that takes an amount: {SCHEDULABLE}")
  return name


def _live_units(name: str, x: jax.Array, mask: jax.Array, kwargs: dict) -> tuple[int, jax.Array]:
  """How many units (entries, channels or blocks) the method counts in ``x``, and how many are still live."""
  if name in _UNSTRUCTURED:
    return x.size, count_true(mask, jnp.int32)
  if name in _STRUCTURED:
    axis = _methods.normalize_axis(x, kwargs["axis"])
    return x.shape[axis], count_true(jnp.any(mask, axis=_methods.other_axes(x, axis)), jnp.int32)
  blocks = tuple(int(b) for b in kwargs["block_shape"])
  tiled = tuple(d for s, b in zip(x.shape, blocks) for d in (s // b, b))
  live = jnp.any(mask.reshape(tiled), axis=tuple(range(1, 2 * x.ndim, 2)))
  return live.size, count_true(live, jnp.int32)


def _new_count(sparsity: jax.Array, total: int, live: jax.Array) -> jax.Array:
  """How many more units to prune so that exactly ``round(sparsity * total)`` are pruned (never fewer than 0)."""
  return jnp.maximum(num_to_prune(sparsity, total) - (total - live), 0)


def _prune(name: str, params: PyTree, masks: PyTree, sparsity: jax.Array, key: Optional[jax.Array],
           kwargs: dict, budget: Optional[Budget] = None) -> PyTree:
  """The masks after pruning every masked leaf to ``sparsity`` (local; to its share under ``budget``), or all of
  them together (global)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_masks = treedef.flatten_up_to(masks)
  chosen = [i for i, ((_, x), m) in enumerate(zip(flat, flat_masks)) if is_masked(m, x)]
  if name == _GLOBAL:
    total = sum(flat[i][1].size for i in chosen)
    with jax.enable_x64(True):  # a model past 2^31 entries counts exactly; the count stays 64-bit into the selection
      live = sum((count_true(flat_masks[i]) for i in chosen), jnp.zeros((), jnp.int64))
      count = _new_count(sparsity, jnp.int64(total), live)
    paths = {path_str(flat[i][0]) for i in chosen}
    return global_unstructured(params, count, masks=masks, where=lambda path, _: path in paths)
  targets = [sparsity] * len(flat) if budget is None else treedef.flatten_up_to(budget(params, sparsity))
  amounts = {}
  for i in chosen:
    path, x = path_str(flat[i][0]), flat[i][1]
    if targets[i] is None:  # the budget leaves this leaf alone
      continue
    try:
      total, live = _live_units(name, x, flat_masks[i], kwargs)
    except (KeyError, ValueError, TypeError, IndexError) as err:
      raise type(err)(f"{path}: scheduled {name} failed: {err}") from err
    amounts[path] = _new_count(jnp.asarray(targets[i], jnp.float32), total, live)
  try:  # every leaf in one selection, each with its own count
    return prune(params, name, masks=masks, key=key, where=lambda path, _: path in amounts,
                 amount=lambda path, _: amounts.get(path), **kwargs)
  except (KeyError, ValueError, TypeError, IndexError) as err:
    raise type(err)(f"scheduled {name} failed: {err}") from err


def _rewound(updates: PyTree, params: PyTree, rewind: PyTree, masks: PyTree, now: jax.Array,
             semantics: Semantics) -> PyTree:
  """Updates that move the params to ``rewind`` when ``now`` (pruned entries stay 0 in lock semantics)."""
  def leaf(u, p, r, m):
    move = now & m if semantics == "lock" and is_masked(m, p) else now
    return jnp.where(move, (r - p).astype(u.dtype), u)
  return jax.tree.map(leaf, updates, params, rewind, masks)


def scheduled_pruning(inner: optax.GradientTransformation, schedule: ScheduleLike,
                      method: Union[str, Callable] = "l1_unstructured", *, where: Where = None,
                      masks: MasksLike = None, key: Optional[jax.Array] = None, semantics: Semantics = "lock",
                      rewind_step: Optional[int] = None, budget: Optional[Budget] = None,
                      **method_kwargs) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that it prunes the params on a sparsity schedule, inside ``update``.

  At update ``t`` the target is ``schedule(t)``, a fraction of the units of the selected leaves (entries;
  channels for structured methods; blocks for ``block_structured``). When it exceeds what was reached so far,
  exactly ``round(schedule(t) * n)`` units end up pruned, ``n`` counted per leaf for local methods and over all
  selected leaves for ``"global_unstructured"``. Pruned units never come back (torch's container semantics).

  Examples:
    >>> opt = jaxprune.scheduled_pruning(
    ...     optax.adamw(1e-3),
    ...     jaxprune.schedules.polynomial(0.9, begin=1_000, end=10_000, frequency=500),
    ...     "global_unstructured")
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params)   # jit this; it compiles once
    >>> masks = jaxprune.masks_from_state(state)

  Args:
    inner: the optimizer; it is wrapped in :func:`jaxprune.masked_optimizer` with the same ``semantics``.
    schedule: a sparsity schedule (a function of the step) or a constant sparsity.
    method: ``"l1_unstructured"``, ``"random_unstructured"``, ``"ln_structured"``, ``"random_structured"``,
      ``"block_structured"``, ``"global_unstructured"`` or one of those functions.
    where: which leaves are pruned (see :func:`jaxprune.selector`) when ``masks`` is None; fixed at init.
    masks: masks to start from (a mask pytree or a function ``params -> masks``), e.g. those of a model pruned
      before; their pruned units count toward the target. None: all-True masks on the leaves ``where`` picks.
    key: a PRNG key, required by the random methods.
    semantics: ``"lock"`` (newly pruned params are set to 0.0 and frozen) or ``"torch"`` (params are
      ``weight_orig``; only the masks change; the loss must use ``jaxprune.apply_masks``).
    budget: layer-wise sparsities for local methods: ``budget(params, target)`` gives each leaf's sparsity for
      the schedule's overall target, e.g. ``jaxprune.budgets.erk`` (traced target, so the budget follows the
      schedule inside jit); its None leaves are not pruned. None: every leaf at the target.
    rewind_step: lottery-ticket rewinding (Frankle & Carbin 2019): the params seen at update ``rewind_step`` (0:
      the initial ones) are kept, and after every later pruning step all params are rewound to them, pruned
      entries staying 0 in lock semantics. The optimizer state carries on, as with PyTorch Lightning's
      ``ModelPruning(use_lottery_ticket_hypothesis=True)``. Costs one extra copy of the params.
    **method_kwargs: the method's other arguments (``n`` and ``axis`` for ``ln_structured``, ...).

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` needs ``params``. Extra arguments are forwarded to ``inner``.
  """
  check_semantics(semantics)
  name = _method_name(method)
  if budget is not None and name == _GLOBAL:
    raise ValueError("a budget sets per-leaf sparsities, which a global ranking does not have: use a local method")
  if "amount" in method_kwargs:
    raise TypeError("scheduled_pruning takes the amount from the schedule; do not pass `amount`")
  if name.startswith("random_") and key is None:
    raise TypeError(f"{name} needs a PRNG `key`")
  if rewind_step is not None and (isinstance(rewind_step, bool) or not isinstance(rewind_step, (int, np.integer))
                                  or rewind_step < 0):
    raise ValueError(f"rewind_step must be an int >= 0 or None, got {rewind_step!r}")
  schedule = as_schedule(schedule)
  masked = masked_optimizer(inner, masks, where=where, semantics=semantics)
  random_key = key if name.startswith("random_") else None

  def init(params):
    inner_state = masked.init(params)
    # Surface a bad method argument (missing axis, 1-d leaf...) now, with the leaf's path, not at the first prune.
    jax.eval_shape(lambda p, m: _prune(name, p, m, jnp.float32(0), random_key, method_kwargs, budget),
                   unboxed(params), inner_state.masks)  # nnx.Optimizer inits on Variables, updates on arrays
    return ScheduledPruningState(
        count=jnp.zeros([], jnp.int32), sparsity=jnp.zeros([], jnp.float32), key=random_key,
        rewind_params=None if rewind_step is None else params, inner_state=inner_state)

  def update(updates, state, params=None, *, masks=None, **extra_args):
    if params is None:
      raise ValueError("scheduled_pruning needs `params` in update() to rank and prune them")
    if masks is not None:
      raise TypeError("scheduled_pruning computes the masks itself and takes none in update(); start it from "
                      "given masks with scheduled_pruning(..., masks=...), or use masked_optimizer to set them")
    target = jnp.asarray(schedule(state.count), jnp.float32)
    prune_now = target > state.sparsity
    current = state.inner_state.masks
    flat_masks, treedef = jax.tree.flatten(current)
    masked_at = [i for i, (m, p) in enumerate(zip(flat_masks, treedef.flatten_up_to(params))) if is_masked(m, p)]

    def prune_branch(key):
      key, sub = jax.random.split(key) if key is not None else (None, None)
      new = treedef.flatten_up_to(_prune(name, params, current, target, sub, method_kwargs, budget))
      return [new[i] for i in masked_at], key

    def keep_branch(key):
      return [flat_masks[i] for i in masked_at], key

    # Only the real masks go through the cond: UNMASKED leaves stay NumPy scalars outside it.
    changed, new_key = lax.cond(prune_now, prune_branch, keep_branch, state.key)
    for i, m in zip(masked_at, changed):
      flat_masks[i] = m
    new_masks = jax.tree.unflatten(treedef, flat_masks)

    updates, inner_state = masked.update(updates, state.inner_state, params, masks=new_masks, **extra_args)
    rewind = state.rewind_params
    if rewind_step is not None:
      if rewind_step > 0:
        rewind = lax.cond(state.count == rewind_step, lambda: params, lambda: rewind)
      updates = _rewound(updates, params, rewind, new_masks, prune_now & (state.count > rewind_step), semantics)
    return updates, ScheduledPruningState(
        count=optax.safe_increment(state.count), sparsity=jnp.maximum(target, state.sparsity), key=new_key,
        rewind_params=rewind, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


__all__ = ["ScheduledPruningState", "scheduled_pruning", "SCHEDULABLE"]
