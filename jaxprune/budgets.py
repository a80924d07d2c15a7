"""Layer-wise sparsity budgets: how sparse each leaf should be, for a target sparsity over the whole model.

A budget is a pytree like the params holding, for every selected leaf, its target sparsity (a float32 scalar,
the fraction of the leaf's entries to prune), and None for the leaves left alone. It is computed from the leaves'
shapes (static) and the target sparsity, which may be traced: a budget inside ``jit`` follows a schedule without
recompiling. A leaf with sparsity ``s`` and ``n`` entries gets exactly ``round(s * n)`` pruned entries
(:func:`counts`, torch's rounding), with :func:`prune_to` or the sparse-training transforms.

* :func:`uniform`: every layer at the same sparsity (Zhu & Gupta; jaxpruner's ``uniform``);
* :func:`erk`: Erdos-Renyi(-Kernel) (Mocanu et al. 2018; Evci et al. 2020): the density of a layer is
  proportional to ``sum(shape) / prod(shape)`` (ER: ``(n_in + n_out) / (n_in * n_out)``), scaled so that the
  selected leaves together keep ``1 - sparsity`` of their entries; a layer whose density would exceed 1 is made
  dense and the rest is redistributed over the others, as in RigL's reference code.

Both take ``overrides``: ``{path regex: sparsity}`` for selected leaves with a fixed sparsity of their own (the
first pattern that matches a path wins). As in RigL's ``custom_sparsity_map``, such leaves are left out of the
distribution: the others share the target among themselves.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import methods as _methods
from jaxprune import selection
from jaxprune.amounts import Amount, num_to_prune, validate_amount
from jaxprune.pytree import Where, is_masked, path_str, selector
from jaxprune.pytree import prune as _prune

PyTree = Any
Overrides = Optional[Mapping[str, float]]
UNSTRUCTURED = ("l1_unstructured", "random_unstructured")
_SHARED = object()  # a selected leaf without an override: it gets its share of the target


def _selected(params: PyTree, where: Where, overrides: Overrides):
  """The leaves, the treedef, and per leaf: None (not selected), its override sparsity, or ``_SHARED``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  pick = selector(where)
  patterns = [(re.compile(p), s) for p, s in (overrides or {}).items()]
  for _, s in patterns:
    validate_amount(s)
  plan = []
  for path, x in flat:
    name = path_str(path)
    fixed = next((s for p, s in patterns if p.search(name)), _SHARED)
    plan.append(fixed if pick(name, x) else None)
  return [x for _, x in flat], treedef, plan


def _budget(params: PyTree, sparsity: Amount, where: Where, overrides: Overrides,
            distribute: Callable[[list, jax.Array], list]) -> PyTree:
  validate_amount(sparsity)
  leaves, treedef, plan = _selected(params, where, overrides)
  free = [i for i, p in enumerate(plan) if p is _SHARED]
  shares = distribute([np.shape(leaves[i]) for i in free], jnp.asarray(sparsity, jnp.float32)) if free else []
  out = [None if p is None or p is _SHARED else jnp.float32(p) for p in plan]
  for i, s in zip(free, shares):
    out[i] = s
  return jax.tree.unflatten(treedef, out)


def uniform(params: PyTree, sparsity: Amount, *, where: Where = None, overrides: Overrides = None) -> PyTree:
  """Every selected leaf at ``sparsity`` (overridden leaves at their own).

  Args:
    params: the params pytree (only shapes are read).
    sparsity: a fraction in [0, 1]; may be traced.
    where: which leaves get a budget (see :func:`jaxprune.selector`; default: kernels, ``ndim >= 2``).
    overrides: ``{path regex: sparsity}`` for some of the selected leaves, first match wins.

  Returns:
    A budget: a float32 scalar per selected leaf, None elsewhere.
  """
  return _budget(params, sparsity, where, overrides, lambda shapes, s: [s] * len(shapes))


def _erk_scores(shapes: list, kernel: bool, power_scale: float) -> np.ndarray:
  dims = [np.asarray(s if kernel else s[-2:], np.float64) for s in shapes]
  return np.array([(d.sum() / d.prod()) ** power_scale for d in dims])


def erk(params: PyTree, sparsity: Amount, *, where: Where = None, overrides: Overrides = None, kernel: bool = True,
        power_scale: float = 1.0) -> PyTree:
  """Erdos-Renyi-Kernel budget: denser small layers, sparser large ones, ``1 - sparsity`` of the entries kept.

  The density of layer ``l`` is ``eps * r_l`` with ``r_l = (sum(shape_l) / prod(shape_l)) ** power_scale`` and
  ``eps`` chosen so that ``sum_l n_l * density_l = (1 - sparsity) * sum_l n_l`` over the leaves not overridden.
  When the largest ``eps * r_l`` would exceed 1, the layers with the largest ``r_l`` are made dense (sparsity 0)
  and ``eps`` is solved again over the rest, until every density fits (RigL's ``get_sparsities_erdos_renyi``).
  At high sparsities with many dense layers the remaining budget may be negative; it is clipped to sparsity 1.

  Args:
    params: the params pytree (only shapes are read).
    sparsity: the target sparsity of the selected, non-overridden leaves together; may be traced.
    where: which leaves get a budget (see :func:`jaxprune.selector`).
    overrides: ``{path regex: sparsity}`` for selected leaves kept out of the distribution (first match wins).
    kernel: True for ERK (all dimensions, so a conv's kernel size counts); False for Erdos-Renyi on the last two
      dimensions (``n_in``, ``n_out`` of a Flax kernel).
    power_scale: RigL's ``erk_power_scale``; 0 gives the uniform budget, 1 the paper's ERK.

  Returns:
    A budget: a float32 scalar per selected leaf, None elsewhere.
  """
  def distribute(shapes, s):
    sizes = np.array([np.prod(shape, dtype=np.float64) for shape in shapes])
    raw = _erk_scores(shapes, kernel, power_scale)
    order = np.argsort(-raw, kind="stable")  # densest first; shapes are static, so is this order
    n, r = sizes[order], raw[order]
    dense = np.concatenate([[0.0], np.cumsum(n)[:-1]])  # entries of the d densest layers, for d = 0..L-1
    rest = np.cumsum((r * n)[::-1])[::-1]  # sum of r_l * n_l over the other layers
    # eps_d with the d densest layers dense: they keep all their entries and the others share what is left.
    eps = ((1 - s) * n.sum() - dense) / rest
    # RigL makes the densest layers dense until eps * r fits everywhere: the first fitting d. With d = L - 1 it
    # always fits (1 - s * total / n_last <= 1), up to float rounding.
    fits = (eps * r <= 1) | (np.arange(len(n)) == len(n) - 1)
    d = jnp.argmax(fits)
    density = jnp.where(np.arange(len(n)) < d, 1.0, jnp.clip(eps[d] * r, 0.0, 1.0))
    sparsities = (1 - density).astype(jnp.float32)
    inverse = np.argsort(order)
    return [sparsities[inverse[i]] for i in range(len(shapes))]

  return _budget(params, sparsity, where, overrides, distribute)


def counts(params: PyTree, budget: PyTree) -> PyTree:
  """How many entries each budgeted leaf must have pruned: ``round(s * n)`` (int32), None elsewhere."""
  return jax.tree.map(lambda x, s: None if s is None else num_to_prune(s, int(np.size(x))), params, budget)


def prune_to(params: PyTree, budget: PyTree, method: Union[str, Callable] = "l1_unstructured", *,
             masks: Optional[PyTree] = None, key: Optional[jax.Array] = None,
             importance_scores: Optional[PyTree] = None) -> PyTree:
  """Prunes every budgeted leaf until exactly ``round(s * n)`` of its ``n`` entries are pruned.

  Entries already pruned in ``masks`` count toward the target and stay pruned; a leaf already past its target
  is left as it is. Jittable: the budget may be traced.

  Examples:
    >>> budget = jaxprune.budgets.erk(params, 0.9)
    >>> masks = jaxprune.budgets.prune_to(params, budget, "random_unstructured", key=key)   # static sparse init
    >>> masks = jaxprune.budgets.prune_to(params, budget, importance_scores=jaxprune.criteria.snip(params, g))

  Args:
    params: the params pytree.
    budget: from :func:`uniform`, :func:`erk` or by hand (a float per leaf to prune, None elsewhere).
    method: ``"l1_unstructured"`` (smallest ``|score|`` first) or ``"random_unstructured"`` (needs ``key``;
      leaf ``i`` uses ``fold_in(key, i)``), or those functions.
    masks: the current masks.
    key: the PRNG key of ``random_unstructured``.
    importance_scores: ranked instead of the params by ``l1_unstructured`` (see :mod:`jaxprune.criteria`).

  Returns:
    The new masks: a bool mask on every budgeted leaf, the old mask (or UNMASKED) elsewhere.
  """
  name = method if isinstance(method, str) else getattr(method, "__name__", "")
  if name not in UNSTRUCTURED or (callable(method) and method is not getattr(_methods, name)):
    raise ValueError(f"prune_to prunes entries: method must be one of {UNSTRUCTURED}, got {method!r}")
  if name == "random_unstructured" and key is None:
    raise TypeError("random_unstructured needs a PRNG `key`")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_budget = treedef.flatten_up_to(budget)
  flat_masks = [None] * len(flat) if masks is None else treedef.flatten_up_to(masks)
  amounts = []
  for (path, x), s, old in zip(flat, flat_budget, flat_masks):
    if s is None:
      amounts.append(None)
      continue
    old = old if old is not None and is_masked(old, x) else None
    already = 0 if old is None else int(np.size(x)) - selection.count_true(old, jnp.int32)
    try:
      amounts.append(jnp.maximum(num_to_prune(s, int(np.size(x))) - already, 0))
    except (ValueError, TypeError) as err:
      raise type(err)(f"{path_str(path)}: {err}") from err
  # Every budgeted leaf in one selection (a segment each), as jaxprune.prune ranks a model.
  return _prune(params, name, masks=masks, key=key, importance_scores=importance_scores,
                where=lambda path, leaf: True, amount=jax.tree.unflatten(treedef, amounts))


__all__ = ["uniform", "erk", "counts", "prune_to"]
