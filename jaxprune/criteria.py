"""Gradient-based importance criteria: pure functions that return importance scores for the existing methods.

Every jaxprune method ranks ``importance_scores=`` by absolute value when they are given (``l1_unstructured``,
``nm_structured``, ``ln_structured``, ``block_structured`` one tensor at a time; :func:`jaxprune.prune` and
:func:`jaxprune.global_unstructured` over a pytree). The criteria below compute such scores from gradients, so any
method and any sparsity pattern can use them:

* :func:`snip`: Lee et al. 2019, connection sensitivity ``|w * g|``;
* :func:`taylor`: Molchanov et al. 2019, the first-order Taylor importance of a channel ``(sum_s w_s g_s)^2``;
* :func:`track_movement` and :func:`movement_scores`: Sanh et al. 2020, movement pruning, the score
  ``S = -sum_t w_t * g_t`` accumulated in the optimizer state; lowest ``S`` is pruned first.

Ties follow the methods' rule: among equal scores the lowest position is pruned first (leaf order, then row-major,
in a global ranking).

Examples:
  >>> grads = jax.grad(loss_fn)(params, batch)
  >>> masks = jaxprune.prune(params, "l1_unstructured", amount=0.9,
  ...                        importance_scores=jaxprune.criteria.snip(params, grads))      # SNIP at init
  >>> masks = jaxprune.prune(params, "ln_structured", amount=0.25, n=jnp.inf, axis=-1,
  ...                        importance_scores=jaxprune.criteria.taylor(params, grads, axis=-1))
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import selection

PyTree = Any


def _batch_mean(g: jax.Array, batched: bool) -> jax.Array:
  return jnp.mean(g, axis=0) if batched else g


def snip(params: PyTree, grads: PyTree, *, batched: bool = False) -> PyTree:
  """SNIP's connection sensitivity ``|w * g|`` (Lee et al. 2019), entry by entry.

  Args:
    params: the params pytree.
    grads: the gradient of the loss at ``params``, a pytree like ``params``. With ``batched``, each leaf has one
      more leading axis holding ``B`` gradients (per example or per mini-batch, e.g. from ``jax.vmap(jax.grad(...))``).
    batched: whether ``grads`` holds a batch of gradients. Their mean is used, so the score is SNIP's on the union
      of the batches: ``|w * mean_b g_b|`` (the gradient of the mean loss is the mean of the gradients).

  Returns:
    A pytree like ``params`` of non-negative scores (prune the smallest first), for ``importance_scores=``.
  """
  return jax.tree.map(lambda w, g: jnp.abs(w * _batch_mean(g, batched)), params, grads)


def taylor(params: PyTree, grads: PyTree, axis: int = -1, *, batched: bool = False) -> PyTree:
  """First-order Taylor importance of each channel along ``axis`` (Molchanov et al. 2019), broadcast to entries.

  The importance of channel ``c`` is ``(sum over its entries of w * g)^2``: the squared first-order change of the
  loss when the channel is removed. Every entry of a channel holds the channel's score, so
  ``ln_structured(..., n=jnp.inf, axis=axis, importance_scores=...)`` ranks channels by it exactly (the max of
  equal entries is the entry itself; other norms give the same order up to float rounding).

  Args:
    params: the params pytree; 0-d leaves get None (no channels).
    grads: the gradients, like ``params``; with ``batched``, one more leading axis of ``B`` gradients.
    axis: the channel axis of every leaf (``-1``: output channels of Flax ``Dense``/``Conv`` kernels).
    batched: average the importance over the batch of gradients, ``mean_b (sum w * g_b)^2``, as the paper
      accumulates it over mini-batches (not the square of the mean).

  Returns:
    A pytree like ``params`` of non-negative scores, constant along each channel.
  """
  def leaf(w, g):
    if np.ndim(w) == 0:
      return None
    channel_axis = int(axis) % np.ndim(w)
    lead = 1 if batched else 0
    reduce = tuple(d + lead for d in range(np.ndim(w)) if d != channel_axis)
    score = jnp.sum(w * g, axis=reduce, keepdims=True) ** 2
    return jnp.broadcast_to(_batch_mean(score, batched), np.shape(w))
  return jax.tree.map(leaf, params, grads)


def as_ranking(scores: PyTree) -> PyTree:
  """Signed scores (lowest pruned first) as importance scores for methods that rank by absolute value.

  Each score becomes its order-preserving unsigned key (:func:`jaxprune.selection.sortable_keys`); the absolute
  value of an unsigned key is the key itself, so ``l1_unstructured``, ``nm_structured``, :func:`jaxprune.prune`
  and :func:`jaxprune.global_unstructured` prune the lowest scores first, exactly, NaN last. Norm-based methods
  (``ln_structured``, ``block_structured``) need floating scores and do not take these.
  """
  return jax.tree.map(lambda s: selection.sortable_keys(jnp.asarray(s)), scores)


class MovementState(NamedTuple):
  """State of :func:`track_movement`: ``scores`` holds ``S = -sum_t w_t * g_t`` per param entry."""
  scores: PyTree


def track_movement() -> optax.GradientTransformation:
  """Accumulates movement-pruning scores (Sanh et al. 2020) in the optimizer state; updates pass through.

  At every update, ``S <- S - w * g`` for the params ``w`` and gradients ``g`` it receives: weights moving away
  from zero gain score, weights shrinking toward zero lose it. Place it first in a chain, where it sees the
  gradients; inside :func:`jaxprune.masked_optimizer` pruned entries see zero gradients and stop moving.

  Examples:
    >>> opt = jaxprune.masked_optimizer(optax.chain(jaxprune.criteria.track_movement(), optax.adam(1e-3)), masks)
    >>> ...
    >>> masks = jaxprune.prune(params, "l1_unstructured", amount=0.5, masks=masks,
    ...                        importance_scores=jaxprune.criteria.movement_scores(state))
    >>> updates, state = opt.update(grads, state, params, masks=masks)

  Returns:
    A ``GradientTransformation`` whose ``update`` needs ``params``.
  """
  def init(params):
    return MovementState(scores=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("track_movement needs `params` in update() to accumulate -w * g")
    scores = jax.tree.map(lambda s, w, g: s - (w * g).astype(s.dtype), state.scores, params, updates)
    return updates, MovementState(scores=scores)

  return optax.GradientTransformation(init, update)


def movement_scores(opt_state: optax.OptState) -> PyTree:
  """The movement scores held by the (single) :func:`track_movement` in ``opt_state``, as importance scores.

  Lowest ``S`` is pruned first (:func:`as_ranking`); pass the result as ``importance_scores=`` to
  ``l1_unstructured``-based pruning, :func:`jaxprune.global_unstructured` or ``nm_structured``.

  Raises:
    ValueError: the state holds no :class:`MovementState`, or more than one.
  """
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MovementState))
           if isinstance(node, MovementState)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one track_movement() state in the optimizer state, found {len(found)}")
  return as_ranking(found[0].scores)


__all__ = ["snip", "taylor", "as_ranking", "MovementState", "track_movement", "movement_scores"]
