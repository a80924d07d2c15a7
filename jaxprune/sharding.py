"""Masks and optimizer state that shard like their params, for models spread over a device mesh.

jaxprune's methods are elementwise maps and reductions in each leaf's own shape, so under ``jax.jit`` XLA's SPMD
partitioner runs them on each shard and only counts cross devices: a global ranking sums 16-bit histograms across
shards and leaves, never gathering the params, and its masks come out sharded like the params. What jit cannot
infer is where a mask lives that is not elementwise in its param (all-True, random, or broadcast from per-channel
norms), nor where optimizer state built from scratch should go. These helpers pin them to the params' shardings.

Examples:
  >>> mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  >>> params = jax.device_put(params, shardings)              # a NamedSharding per leaf
  >>> masks = jaxprune.init_masks(params)                     # born sharded, leaf by leaf
  >>> abstract = jaxprune.sharding.abstract(params)           # shapes and shardings, to close over in jit
  >>> prune = jax.jit(lambda p: jaxprune.sharding.shard_like(jaxprune.global_unstructured(p, 0.9), abstract))
  >>> masks = prune(params)                                   # identical to the one-device masks
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


PyTree = Any


def abstract(params: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves carrying each param's shape, dtype and sharding.

  Inside ``jax.jit`` an auto-sharded param is a tracer that does not know its sharding; close over this instead
  and pass it to :func:`shard_like` as ``like``.
  """
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), jnp.result_type(p), sharding=_sharding(p)),
                      params)


def _sharding(ref: Any) -> jax.sharding.Sharding:
  if isinstance(ref, jax.core.Tracer):
    sharding = jax.typeof(ref).sharding
    if not sharding.mesh.explicit_axes:
      raise TypeError("under jit an auto-sharded param does not carry its sharding: pass "
                      "`jaxprune.sharding.abstract(params)`, computed outside jit, as `like`")
    return sharding
  sharding = getattr(ref, "sharding", None)
  if sharding is None:
    raise TypeError(f"expected a jax.Array or jax.ShapeDtypeStruct with a sharding, got {type(ref).__name__}")
  return sharding


def _place(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  # Explicit mesh axes are part of the array's type and change only through `reshard`; auto axes take a
  # constraint, which XLA also honours eagerly.
  named = isinstance(sharding, jax.sharding.NamedSharding)
  if named and set(sharding.mesh.explicit_axes) & set(jax.tree.leaves(tuple(sharding.spec))):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def shard_like(tree: PyTree, like: PyTree) -> PyTree:
  """``tree`` with every array that stands for a param given that param's sharding.

  A leaf stands for a param when it sits in a subtree that mirrors ``like`` (the masks themselves, Adam's
  ``mu``/``nu``, a masked optimizer's masks, rewind weights) and has the param's shape. Scalars (``UNMASKED``,
  step counts) and other state are left as they are. Works eagerly (a transfer) and under ``jax.jit`` (a sharding
  constraint, or ``reshard`` on explicit mesh axes).

  Args:
    tree: masks, an optimizer state, or any pytree containing subtrees that mirror the params.
    like: the params, or :func:`abstract` of them (under jit, for params sharded on auto mesh axes).

  Returns:
    ``tree`` with the same structure and values.
  """
  treedef = jax.tree.structure(like)
  refs = treedef.flatten_up_to(like)

  def mirrors(node) -> bool:
    return jax.tree.structure(node) == treedef

  def place(node):
    if not mirrors(node):
      return node
    leaves = [_place(leaf, _sharding(ref)) if isinstance(leaf, (jax.Array, np.ndarray)) and np.ndim(leaf) > 0
              and np.shape(leaf) == np.shape(ref) else leaf
              for leaf, ref in zip(treedef.flatten_up_to(node), refs)]
    return jax.tree.unflatten(treedef, leaves)

  return jax.tree.map(place, tree, is_leaf=mirrors)


class Collective(NamedTuple):
  """One operand of a cross-device collective in a compiled program."""
  op: str  # "all-reduce", "all-gather", "all-to-all", "collective-permute" or "reduce-scatter"
  dtype: str  # the HLO element type: "f32", "s32", "pred", ...
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    bits = 8 if self.dtype == "pred" else int(re.sub(r"\D", "", self.dtype) or 8)
    return int(np.prod(self.shape, dtype=np.int64)) * bits // 8


_COLLECTIVE = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>all-reduce|all-gather|all-to-all|collective-permute|"
                         r"reduce-scatter)(?:-start)?\(")


def collectives(jitted, *args, **kwargs) -> list[Collective]:
  """What devices exchange when running ``jitted(*args, **kwargs)``: every collective XLA's SPMD partitioner put
  in the compiled program, operand by operand.

  Use it to check that pruning a sharded model moves only counts (integer histograms, per-channel partial norms)
  and never gathers the params. The program is compiled once and cached, so calling ``jitted`` afterwards costs
  nothing more.
  """
  found = []
  for line in jitted.lower(*args, **kwargs).compile().as_text().splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match["type"]):
        found.append(Collective(match["op"], dtype, tuple(int(d) for d in dims.split(",") if d)))
  return found


__all__ = ["Collective", "abstract", "collectives", "shard_like"]
