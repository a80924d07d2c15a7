"""Sparse training: dynamic sparse training (SET, RigL) as optax transforms, and the straight-through estimator.

**Dynamic sparse training** keeps every layer at a fixed sparsity from the first step and moves the live weights
around: every ``update_period`` steps it drops a fraction of each layer's live weights, those of smallest
magnitude, and grows as many among the inactive ones, at random (SET, Mocanu et al. 2018) or where the dense
gradient is largest (RigL, Evci et al. 2020). :func:`dynamic_sparse` (and its two names :func:`set_training`,
:func:`rigl`) wraps :func:`jaxprune.masked_optimizer` in lock semantics, so

* each layer keeps exactly its number of live weights at every step (ties: lowest position first);
* dropped weights land on exactly 0.0 and lose their optimizer state at once;
* grown weights start at exactly 0.0 with zero optimizer state (masked_optimizer keeps both zero while pruned);
* the drop fraction is a schedule (RigL's cosine decay is ``optax.cosine_decay_schedule(0.3, end)``) evaluated
  on the traced step, and the mask update runs under ``lax.cond``: a whole run compiles once.

**Where RigL's dense gradient comes from.** In lock semantics the loss is computed on the params themselves
(pruned entries hold 0.0), so ``jax.grad`` already gives the gradient at every entry, pruned ones included:
the gradient passed to ``update`` *is* the dense gradient and RigL needs nothing more (on dense hardware the
weight gradient is a dense matmul either way). Only when the forward hides pruned entries from autodiff (a
forward through :func:`jaxprune.apply_masks` or :func:`straight_through`, or a sparse kernel) is the gradient
masked; then pass ``dense_grads=lambda: jax.grad(dense_loss)(params, batch)``: the callable is evaluated inside
the ``lax.cond`` branch of mask-update steps only, so other steps never pay for it.

**Straight-through estimator** (:func:`straight_through`): the forward uses ``params * masks``, the gradient reaches
the dense params unchanged (Bengio et al. 2013; jaxpruner's ``SteMagnitudePruning``), and the masks are recomputed
from the dense params whenever you like, with any method (``global_unstructured``, ``nm_structured`` for N:M,
...) at a traced amount. ``decay=`` adds SR-STE's term (Zhou et al. 2021): the gradient of pruned weights gains
``decay * w``, which pulls them toward zero so the masks settle.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import selection
from jaxprune.amounts import num_to_prune
from jaxprune.optim import MaskedState, MasksLike, map_param_state, masked_optimizer
from jaxprune.pytree import is_masked

PyTree = Any
Grow = Literal["random", "gradient"]
GROW = ("random", "gradient")
DenseGrads = Union[None, PyTree, Callable[[], PyTree]]


class DynamicSparseState(NamedTuple):
  """State of :func:`dynamic_sparse`.

  Attributes:
    count: updates seen so far (the step the drop fraction and the update period are evaluated at).
    key: the PRNG key of random growth (None for gradient growth), split at every mask update.
    inner_state: the :class:`jaxprune.optim.MaskedState` of the wrapped optimizer, which holds the masks.
  """
  count: jax.Array
  key: Optional[jax.Array]
  inner_state: MaskedState


def drop_and_grow(weights: jax.Array, mask: jax.Array, grow_keys: jax.Array, fraction: jax.Array) -> jax.Array:
  """One layer's new mask: drop ``round(fraction * live)`` live entries of smallest ``|w|``, grow as many.

  Args:
    weights: the layer's params.
    mask: its current mask.
    grow_keys: unsigned keys (:func:`jaxprune.selection.sortable_keys`); the smallest inactive ones are grown.
    fraction: the drop fraction, a traced or concrete float in [0, 1].

  Returns:
    The new mask, with exactly as many True entries as ``mask``. Growth picks among all entries inactive after
    the drop, those just dropped included (RigL's rule): one dropped and grown again stays live with its weight.
  """
  live = selection.count_true(mask, jnp.int32)
  k = num_to_prune(jnp.asarray(fraction, jnp.float32), live)
  dropped = selection.smallest([selection.sortable_keys(jnp.abs(weights))], k, [mask])[0]
  kept = mask & ~dropped
  return kept | selection.smallest([grow_keys], k, [~kept])[0]


def _is_update_step(count: jax.Array, period: int, start: int, end: Optional[int]) -> jax.Array:
  now = (count >= start) & ((count - start) % period == 0)
  return now if end is None else now & (count < end)


def _mask_change_only(updates: PyTree, state: MaskedState, params: PyTree, masks: PyTree):
  """A step that only applies new masks (``skip_gradients``): dropped params go to 0.0 and lose their state."""
  zeroed = map_param_state(lambda leaf, m: jnp.where(m, leaf, jnp.zeros_like(leaf)), state.inner_state, params,
                           masks)
  moves = jax.tree.map(lambda u, m, p: jnp.where(m, jnp.zeros_like(u), -p.astype(u.dtype)) if is_masked(m, u)
                       else jnp.zeros_like(u), updates, masks, params)
  return moves, MaskedState(masks=masks, inner_state=zeroed)


def dynamic_sparse(inner: optax.GradientTransformation, masks: MasksLike, *, grow: Grow,
                   drop_fraction: Union[float, Callable[[jax.Array], jax.Array]] = 0.3, update_period: int = 100,
                   start: int = 0, end: Optional[int] = None, key: Optional[jax.Array] = None,
                   skip_gradients: bool = True) -> optax.GradientTransformationExtraArgs:
  """Dynamic sparse training: every ``update_period`` steps, drop and regrow each masked layer's weights.

  At update ``t`` with ``start <= t < end`` and ``(t - start) % update_period == 0``, each masked leaf drops
  ``round(drop_fraction(t) * live)`` of its live weights (smallest magnitude first) and grows as many among the
  inactive ones (``grow="random"``: SET; ``grow="gradient"``: RigL, largest ``|dense gradient|`` first), so its
  number of live weights never changes. The masks live in the wrapped :func:`jaxprune.masked_optimizer`'s state
  (:func:`jaxprune.masks_from_state`), lock semantics: params hold exactly 0.0 where pruned.

  Examples:
    >>> budget = jaxprune.budgets.erk(params, 0.9)
    >>> masks = jaxprune.budgets.prune_to(params, budget, "random_unstructured", key=k1)
    >>> params = jaxprune.apply_masks(params, masks)          # start from the sparse params
    >>> opt = jaxprune.rigl(optax.adam(1e-3), masks, update_period=100, end=int(0.75 * steps),
    ...                     drop_fraction=optax.cosine_decay_schedule(0.3, int(0.75 * steps)))
    >>> updates, state = opt.update(grads, state, params)    # jit this; it compiles once

  Args:
    inner: the optimizer, wrapped in ``masked_optimizer(inner, masks)``.
    masks: the initial masks (a mask pytree or ``params -> masks``), e.g. random ones at an ERK budget. Which
      leaves are masked is fixed here; those leaves keep their live count for the whole run.
    grow: ``"random"`` (SET) or ``"gradient"`` (RigL).
    drop_fraction: a fraction in [0, 1] or a schedule ``step -> fraction``.
    update_period: steps between mask updates (jaxpruner's ``update_freq``, RigL's ``delta_t``).
    start: the first update step (jaxpruner's ``update_start_step``).
    end: no mask update at or after this step (``update_end_step``; RigL stops at 75% of training); None: never
      stop.
    key: the PRNG key of random growth (required for SET).
    skip_gradients: on mask-update steps, apply only the mask change and no optimizer step, as RigL's reference
      code and jaxpruner's SET/RigL do: grown weights then stay exactly 0.0 with zero optimizer state until the
      next step. False: the step is applied as usual with the new masks (grown weights get their first update
      at once, from zero state).

  Returns:
    A ``GradientTransformationExtraArgs``: ``update(grads, state, params, *, dense_grads=None, **extra)``.
    ``params`` is required. ``dense_grads`` (RigL only): the dense gradient, a pytree or a zero-argument callable
    evaluated only on mask-update steps, for a forward that masks the gradient (see the module docstring);
    by default the growth ranks ``grads`` themselves, which are dense in lock semantics. Other extra arguments
    go to ``inner``.
  """
  if grow not in GROW:
    raise ValueError(f"grow must be one of {GROW}, got {grow!r}")
  if grow == "random" and key is None:
    raise TypeError("random growth (SET) needs a PRNG `key`")
  if isinstance(update_period, bool) or not isinstance(update_period, (int, np.integer)) or update_period < 1:
    raise ValueError(f"update_period must be an int >= 1, got {update_period!r}")
  fraction_at = drop_fraction if callable(drop_fraction) else lambda _: jnp.float32(drop_fraction)
  masked = masked_optimizer(inner, masks, semantics="lock")
  random_key = key if grow == "random" else None

  def init(params):
    # UNMASKED leaves are NumPy scalars; a jitted step returns them as jax arrays, and a step fed NumPy scalars
    # first compiles a second executable. As arrays from the start, a Python loop over a jitted step compiles once.
    inner_state = jax.tree.map(jnp.asarray, masked.init(params))
    return DynamicSparseState(count=jnp.zeros([], jnp.int32), key=random_key, inner_state=inner_state)

  def update(updates, state, params=None, *, dense_grads: DenseGrads = None, **extra_args):
    if params is None:
      raise ValueError("dynamic sparse training needs `params` in update() to rank them")
    if "masks" in extra_args:
      raise TypeError("dynamic sparse training updates the masks itself and takes none in update()")
    now = _is_update_step(state.count, update_period, start, end)
    current = state.inner_state.masks
    flat_masks, treedef = jax.tree.flatten(current)
    flat_params = treedef.flatten_up_to(params)
    masked_at = [i for i, (m, p) in enumerate(zip(flat_masks, flat_params)) if is_masked(m, p)]

    def change(key):
      fraction = fraction_at(state.count)
      if grow == "random":
        key, sub = jax.random.split(key)
        grow_keys = [selection.sortable_keys(jax.random.uniform(jax.random.fold_in(sub, i), np.shape(flat_params[i])))
                     for i in masked_at]
      else:
        grads = treedef.flatten_up_to(dense_grads() if callable(dense_grads) else
                                      updates if dense_grads is None else dense_grads)
        # Largest |g| first: ~ reverses the order of unsigned keys.
        grow_keys = [~selection.sortable_keys(jnp.abs(grads[i])) for i in masked_at]
      return [drop_and_grow(flat_params[i], flat_masks[i], g, fraction) for i, g in zip(masked_at, grow_keys)], key

    # Only the real masks go through the cond: UNMASKED leaves stay NumPy scalars outside it.
    changed, new_key = lax.cond(now, change, lambda key: ([flat_masks[i] for i in masked_at], key), state.key)
    for i, m in zip(masked_at, changed):
      flat_masks[i] = m
    new_masks = jax.tree.unflatten(treedef, flat_masks)

    stepped = masked.update(updates, state.inner_state, params, masks=new_masks, **extra_args)
    if skip_gradients:
      # Selects rather than a lax.cond around the step: they fuse into the optimizer's loops, where a cond
      # would materialise the updates between the step and apply_updates (~20% of a step on CPU).
      only = _mask_change_only(updates, state.inner_state, params, new_masks)
      stepped = jax.tree.map(lambda a, b: jnp.where(now, a, b), only, stepped)
    updates, inner_state = stepped
    return updates, DynamicSparseState(count=optax.safe_increment(state.count), key=new_key,
                                       inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def set_training(inner: optax.GradientTransformation, masks: MasksLike, *, key: jax.Array,
                 **kwargs) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): :func:`dynamic_sparse` with random growth. ``kwargs`` as there."""
  return dynamic_sparse(inner, masks, grow="random", key=key, **kwargs)


def rigl(inner: optax.GradientTransformation, masks: MasksLike, **kwargs) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): :func:`dynamic_sparse` with growth by the dense gradient. ``kwargs`` as there."""
  return dynamic_sparse(inner, masks, grow="gradient", **kwargs)


@jax.custom_vjp
def _ste(w: jax.Array, mask: jax.Array, decay: jax.Array) -> jax.Array:
  return jnp.where(mask, w, jnp.zeros_like(w))


def _ste_fwd(w, mask, decay):
  return _ste(w, mask, decay), (w, mask, decay)


def _ste_bwd(residuals, g):
  w, mask, decay = residuals
  # SR-STE: pruned weights get decay * w on top of the straight-through gradient.
  return g + jnp.where(mask, jnp.zeros_like(w), (decay * w).astype(g.dtype)), None, None


_ste.defvjp(_ste_fwd, _ste_bwd)


def straight_through(params: PyTree, masks: PyTree, *, decay: Union[float, jax.Array] = 0.0) -> PyTree:
  """The masked params for the forward, with straight-through gradients to the dense params.

  The value is ``params`` with pruned entries 0.0; the gradient with respect to ``params`` is the gradient with
  respect to the masked params, at every entry, pruned ones included (the STE), plus ``decay * w`` at pruned
  entries (SR-STE's regularisation, Zhou et al. 2021, which proposes ``decay = 2e-4`` for 2:4 with SGD).
  Keep the optimizer dense (no :func:`jaxprune.masked_optimizer`): the dense params go on learning, and new
  masks are computed from them as often as you like, inside the jitted step.

  Examples:
    >>> def loss_fn(params, batch, step):
    ...   masks = jax.tree.map(lambda w: jaxprune.nm_structured(w, 2, 4, axis=-2) if w.ndim >= 2
    ...                        else jaxprune.UNMASKED, params)           # 2:4 along the input axis, every step
    ...   return loss(jaxprune.sparse_training.straight_through(params, masks, decay=2e-4), batch)
    >>> # or magnitude STE on a schedule: masks = jaxprune.global_unstructured(params, schedule(step))

  Args:
    params: the dense params.
    masks: a mask pytree (bool arrays, :data:`jaxprune.UNMASKED` elsewhere).
    decay: SR-STE's ``lambda_W``; 0 gives the plain STE. May be traced (e.g. a schedule).

  Returns:
    A pytree like ``params``.
  """
  return jax.tree.map(lambda w, m: _ste(w, m, jnp.asarray(decay, jnp.result_type(w))) if is_masked(m, w) else w,
                      params, masks)


__all__ = ["DynamicSparseState", "dynamic_sparse", "set_training", "rigl", "drop_and_grow", "straight_through"]
