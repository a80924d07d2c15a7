"""User-defined pruning methods with the built-ins' iterative behaviour (torch's ``BasePruningMethod`` subclass).

A method is one pure function ``compute_mask(t, default_mask, **kwargs) -> mask`` and a pruning type. Decorating it
with :func:`pruning_method` gives a function with the built-ins' calling convention (``mask=``,
``importance_scores=``, and ``axis=`` for structured methods) and torch's ``PruningContainer`` combination
(spec §5.2):

* ``"unstructured"``: ``t`` is the 1-d vector of live entries in row-major order, ``default_mask`` marks them;
* ``"structured"``: ``t`` keeps every channel along ``axis``, live channels first in their order;
* ``"global"``: ``t`` and ``default_mask`` are the whole tensor and mask.

Shapes must be static under ``jit``, so the live part is not cut out as torch does: it comes first, followed by
the pruned entries (or fully pruned channels), which ``default_mask`` marks False. A method that respects
``default_mask`` (as torch's own methods do, since they clone it) sees exactly what torch would show it. The result
is ANDed with the old mask: pruned entries never come back.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jaxprune.methods import check_mask, check_scores, effective, normalize_axis, other_axes

PruningType = Literal["unstructured", "structured", "global"]
ComputeMask = Callable[..., jax.Array]


def _live_first(live: jax.Array) -> jax.Array:
  """A permutation that puts live positions first, each group in its original order."""
  return jnp.argsort(~live, stable=True)


def pruning_method(pruning_type: PruningType) -> Callable[[ComputeMask], Callable[..., jax.Array]]:
  """Turns ``compute_mask(t, default_mask, **kwargs)`` into a jaxprune pruning method.

  Example (the PyTorch tutorial's method that prunes every other entry)::

    @jaxprune.pruning_method("unstructured")
    def every_other(t, default_mask):
      return default_mask.ravel().at[::2].set(False).reshape(default_mask.shape)

    mask = every_other(w)                 # first prune
    mask = every_other(w, mask=mask)      # every other *remaining* entry

  Args:
    pruning_type: ``"unstructured"``, ``"structured"`` or ``"global"`` (see the module docstring).

  Returns:
    A decorator. The decorated method is called as ``method(x, *, mask=None, importance_scores=None, **kwargs)``,
    with a required ``axis=`` for structured methods, which is also passed on to ``compute_mask``.
  """
  if pruning_type not in ("unstructured", "structured", "global"):
    raise ValueError(f"Unrecognized PRUNING_TYPE {pruning_type!r}: expected 'unstructured', 'structured' or 'global'")

  def decorate(compute_mask: ComputeMask) -> Callable[..., jax.Array]:
    @functools.wraps(compute_mask)
    def method(x, *, mask=None, importance_scores=None, **kwargs):
      x = jnp.asarray(x)
      mask = check_mask(mask, x)
      t = effective(x, mask) if importance_scores is None else check_scores(importance_scores, x)
      if pruning_type == "structured":
        if "axis" not in kwargs:
          raise TypeError(f"{compute_mask.__name__}: structured pruning methods need an `axis` argument")
        kwargs["axis"] = normalize_axis(x, kwargs["axis"])
      if mask is None:
        return check_mask(compute_mask(t, jnp.ones(x.shape, bool), **kwargs), x, what="computed mask")
      if pruning_type == "global":
        new = check_mask(compute_mask(t, mask, **kwargs), x, what="computed mask")
      elif pruning_type == "unstructured":
        order = _live_first(mask.ravel())
        partial = compute_mask(t.ravel()[order], mask.ravel()[order], **kwargs)
        partial = check_mask(partial, order, what="computed mask")
        new = jnp.zeros(x.size, bool).at[order].set(partial).reshape(x.shape)
      else:
        axis = kwargs["axis"]
        order = _live_first(jnp.any(mask, axis=other_axes(x, axis)))
        partial = compute_mask(jnp.take(t, order, axis=axis), jnp.take(mask, order, axis=axis), **kwargs)
        partial = check_mask(partial, x, what="computed mask")
        new = jnp.take(partial, jnp.argsort(order), axis=axis)
      return new & mask

    method.pruning_type = pruning_type
    return method

  return decorate
