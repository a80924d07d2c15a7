"""Pure pruning methods: each returns a boolean mask of ``x.shape`` (True = kept). Spec §3 and §5.

Every method takes ``mask=``, the mask an earlier pruning left, and then behaves like a step of torch's
``PruningContainer`` (spec §5.2): unstructured methods rank only the entries still kept and ``amount`` is relative
to them; structured methods rank the channels not yet fully pruned; the result is combined with the old mask, so a
pruned entry never comes back. Without ``mask=`` a method is torch's first prune of a fresh parameter.

Scores are the importance scores when given, else the effective weight ``x * mask`` as torch ranks
``module.weight`` (spec §1.3): zeros left by an earlier unstructured prune lower a channel's norm.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import selection
from jaxprune.amounts import Amount, num_to_prune, validate_amount
from jaxprune.errors import ShapeMismatchError, UnsupportedDtypeError, UnsupportedNormError

Norm = Union[int, float, str, None]


def check_mask(mask: Optional[jax.Array], x: jax.Array, what: str = "mask") -> Optional[jax.Array]:
  """Validates a mask against ``x`` and returns it as bool (numeric 0/1 masks are accepted when concrete)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != x.shape:
    raise ShapeMismatchError(f"{what} should have the same shape as the tensor, got {mask.shape} vs {x.shape}")
  if mask.dtype == jnp.bool_:
    return mask
  if isinstance(mask, jax.core.Tracer):
    raise TypeError(f"{what} must be a bool array under jit, got dtype {mask.dtype}")
  values = np.unique(np.asarray(mask))
  if not np.isin(values, [0, 1]).all():
    raise ValueError(f"{what} must be binary (0/1 or bool), found values {values[~np.isin(values, [0, 1])][:5]}")
  return mask != 0


def check_scores(importance_scores, x) -> jax.Array:
  if importance_scores is None:
    return x
  scores = jnp.asarray(importance_scores)
  if scores.shape != x.shape:
    raise ShapeMismatchError(
        f"importance_scores should have the same shape as the tensor, got {scores.shape} vs {x.shape}")
  return scores


def effective(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  return x if mask is None else mask.astype(x.dtype) * x


def check_rankable(scores: jax.Array) -> jax.Array:
  """``scores`` if they can be ranked by magnitude (bool cannot)."""
  if scores.dtype == jnp.bool_:
    raise UnsupportedDtypeError("cannot rank bool scores: L1 needs a numeric tensor")
  return scores


def _abs_keys(scores: jax.Array) -> jax.Array:
  return selection.sortable_keys(check_rankable(scores), magnitude=True)


def live_count(live: Optional[jax.Array], size: int):
  """How many units are still live: a Python int unless the mask is traced (so eager errors match torch's)."""
  if live is None:
    return size
  if isinstance(live, jax.core.Tracer):
    return selection.count_true(live, jax.dtypes.canonicalize_dtype(np.int64))
  return int(np.sum(np.asarray(live)))


class Ranking(NamedTuple):
  """What a selection-based method ranks: its units (entries, channels or blocks) and what pruning them means.

  Attributes:
    keys: one unsigned key per unit (:func:`jaxprune.selection.sortable_keys`); the smallest are pruned.
    live: the units that may still be pruned (None: all of them).
    amount: the validated amount, relative to the live units.
    expand: maps the bool array of pruned units to the method's new mask of the parameter.
  """
  keys: jax.Array
  live: Optional[jax.Array]
  amount: Amount
  expand: Callable[[jax.Array], jax.Array]


def run_ranking(ranking: Ranking) -> jax.Array:
  """The mask a :class:`Ranking` gives on its own (``jaxprune.prune`` ranks many leaves in one selection)."""
  k = num_to_prune(ranking.amount, live_count(ranking.live, ranking.keys.size))
  return ranking.expand(selection.smallest([ranking.keys], k, [ranking.live])[0])


def _unstructured(keys: jax.Array, amount: Amount, mask: Optional[jax.Array]) -> Ranking:
  validate_amount(amount)
  return Ranking(keys, mask, amount, lambda pruned: ~pruned if mask is None else mask & ~pruned)


def identity(x: jax.Array) -> jax.Array:
  """A mask that keeps everything (torch's ``prune.identity``)."""
  return jnp.ones(jnp.shape(x), bool)


def l1_unstructured(x: jax.Array, amount: Amount, *, mask: Optional[jax.Array] = None,
                    importance_scores: Optional[jax.Array] = None) -> jax.Array:
  """Prunes the ``amount`` entries of smallest absolute value (torch's ``prune.l1_unstructured``).

  Args:
    x: the parameter.
    amount: a fraction in [0, 1] or a count of entries to prune (of those still kept when ``mask`` is given).
    mask: the existing mask; only its True entries are ranked.
    importance_scores: ranked instead of ``x``, by absolute value.

  Returns:
    A bool mask of ``x.shape``. Exactly ``k`` more entries are False; NaN ranks above +inf; tied entries at the
    threshold are pruned lowest flat index first.
  """
  return run_ranking(l1_unstructured_ranking(x, amount, mask=mask, importance_scores=importance_scores))


def l1_unstructured_ranking(x, amount, *, mask=None, importance_scores=None) -> Ranking:
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  return _unstructured(_abs_keys(check_scores(importance_scores, x)), amount, mask)


def random_unstructured(key: jax.Array, x: jax.Array, amount: Amount, *,
                        mask: Optional[jax.Array] = None) -> jax.Array:
  """Prunes a uniformly random subset of ``amount`` entries (torch's ``prune.random_unstructured``)."""
  return run_ranking(random_unstructured_ranking(key, x, amount, mask=mask))


def random_unstructured_ranking(key, x, amount, *, mask=None) -> Ranking:
  x = jnp.asarray(x)
  return _random_unstructured_of_keys(_uniform_keys(key, x), x, amount, mask=mask)


def _random_unstructured_of_keys(keys, x, amount, *, mask=None) -> Ranking:
  return _unstructured(keys, amount, check_mask(mask, x))


def _uniform_keys(key: jax.Array, x: jax.Array) -> jax.Array:
  """Keys of one uniform draw per entry of ``x``.

  Called eagerly on a small CPU array, the draws come from a program of a padded 1-d size, cut to ``x``'s shape on
  the host, so a new shape does not compile threefry again (0.2-0.3 s on a 2-core CPU). With a partitionable
  threefry (JAX's default) entry ``i``'s draw depends on ``i`` alone, not on the shape, so the keys are the same.
  """
  device = selection.host_device([key, x])
  if (device is None or x.size > selection.HOST_LAYOUT_LIMIT or not jax.config.jax_threefry_partitionable
      or _prng_impl(key) != "threefry2x32"):
    return _draw_keys(key, x.shape)
  keys = np.asarray(_padded_uniform_keys(key, selection.padded_size(x.size)))
  return jax.device_put(keys[:x.size].reshape(x.shape), device)


def _draw_keys(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The keys of a float32 uniform draw of ``shape``: what the random methods rank units by."""
  return selection.sortable_keys(jax.random.uniform(key, shape, jnp.float32))


@functools.partial(jax.jit, static_argnames="size")
def _padded_uniform_keys(key: jax.Array, size: int) -> jax.Array:
  return _draw_keys(key, (size,))


def _prng_impl(key: jax.Array) -> str:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(key))
  return str(jax.config.jax_default_prng_impl)  # a raw uint32 key: the default implementation


def normalize_axis(x: jax.Array, axis: int) -> int:
  if x.ndim <= 1:
    raise ValueError("Structured pruning can only be applied to multidimensional tensors. "
                     f"Found tensor of shape {x.shape} with {x.ndim} dims")
  return _axis_index(x, axis)


def _axis_index(x: jax.Array, axis: int) -> int:
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"axis must be an int, got {axis!r}")
  if axis >= x.ndim:
    raise IndexError(f"Invalid index {axis} for tensor of size {x.shape}")
  if axis < -x.ndim:
    raise IndexError(f"axis {axis} is out of range for a tensor with {x.ndim} dims (shape {x.shape})")
  return int(axis) % x.ndim


def other_axes(x: jax.Array, axis: int) -> tuple[int, ...]:
  return tuple(d for d in range(x.ndim) if d != axis)


@functools.partial(jax.jit, static_argnames=("axis", "shape"))
def _channels_kept(pruned: jax.Array, mask: Optional[jax.Array], axis: int, shape: tuple[int, ...]) -> jax.Array:
  """The mask of ``shape`` that keeps the channels along ``axis`` not ``pruned`` (and what ``mask`` kept)."""
  along = [1] * len(shape)
  along[axis] = shape[axis]
  kept = jnp.broadcast_to((~pruned).reshape(along), shape)
  return kept if mask is None else kept & mask


def _structured(channel_keys: jax.Array, x: jax.Array, amount: Amount, axis: int,
                mask: Optional[jax.Array]) -> Ranking:
  """Ranks whole channels along ``axis`` by ``channel_keys``; ``amount`` is already validated."""
  live = None if mask is None else jnp.any(mask, axis=other_axes(x, axis))
  return Ranking(channel_keys, live, amount, lambda pruned: _channels_kept(pruned, mask, axis, x.shape))


def random_structured(key: jax.Array, x: jax.Array, amount: Amount, axis: int, *,
                      mask: Optional[jax.Array] = None) -> jax.Array:
  """Prunes ``amount`` random channels along ``axis`` (torch's ``prune.random_structured``, ``dim`` -> ``axis``)."""
  return run_ranking(random_structured_ranking(key, x, amount, axis, mask=mask))


def random_structured_ranking(key, x, amount, axis, *, mask=None) -> Ranking:
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  keys = _draw_keys(key, random_draw_shape("random_structured", x, axis))
  return _random_structured_of_keys(keys, x, amount, axis, mask=mask)


def _random_structured_of_keys(keys, x, amount, axis, *, mask=None) -> Ranking:
  mask = check_mask(mask, x)
  axis = normalize_axis(x, axis)
  validate_amount(amount)
  return _structured(keys, x, amount, axis, mask)


def random_draw_shape(name: str, x: jax.Array, axis: Optional[int] = None, **_) -> tuple[int, ...]:
  """The shape of the uniform draw that the random method ``name`` ranks ``x`` by (an entry's or a channel's)."""
  return tuple(x.shape) if name == "random_unstructured" else (x.shape[normalize_axis(x, axis)],)


def uniform_keys_by_shape(key: jax.Array, indices: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """For each ``i``, the keys of ``uniform(fold_in(key, indices[i]), shapes[i])``: the draws a random method ranks
  leaf ``i`` by, drawn in one vmapped program per distinct shape (a draw per leaf put a threefry per leaf in the
  program: a local random prune of 500 leaves compiled in 59 s)."""
  groups: dict = {}
  for i, shape in enumerate(shapes):
    groups.setdefault(tuple(shape), []).append(i)
  out = [None] * len(shapes)
  for shape, members in groups.items():
    keys = jax.vmap(lambda i, shape=shape: _draw_keys(jax.random.fold_in(key, i), shape))(indices[np.array(members)])
    for j, keys_of_leaf in zip(members, keys):
      out[j] = keys_of_leaf
  return out


def _norm_order(t: jax.Array, n: Norm, axes: tuple[int, ...]) -> Union[float, str]:
  """``n`` checked against ``t`` and ``axes``: a float order, or ``"nuc"``."""
  if not jnp.issubdtype(t.dtype, jnp.floating) and not jnp.issubdtype(t.dtype, jnp.complexfloating):
    raise UnsupportedDtypeError(f"ln_structured needs a floating point tensor, got dtype {t.dtype}")
  if isinstance(n, str):
    if n == "fro" and len(axes) in (1, 2):
      return 2.0
    if n == "nuc" and len(axes) == 2:
      return n
    raise UnsupportedNormError(
        f"n={n!r} is not supported for a {t.ndim}-d tensor: 'fro' needs 2 or 3 dims, 'nuc' exactly 3; "
        "use a number, inf or -inf")
  if n is None:
    return 2.0
  if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)):
    raise TypeError(f"n must be a number, inf, -inf, 'fro' or 'nuc', got {n!r}")
  n = float(n)
  if (n < 0 or n == np.inf) and any(t.shape[d] == 0 for d in axes):  # no identity element (torch refuses too)
    raise UnsupportedNormError(f"the {n} norm of an empty channel is undefined (shape {t.shape}, axes {axes})")
  return n


def _norm(t: jax.Array, n: Union[float, str], axes: tuple[int, ...]) -> jax.Array:
  """``torch.norm(t, p=n, dim=axes)`` as ``ln_structured`` uses it (spec §3.5), computed in >= float32."""
  a = jnp.abs(t).astype(jnp.promote_types(jnp.abs(t).dtype, jnp.float32))
  if n == "nuc":
    rest = [d for d in range(t.ndim) if d not in axes]
    mats = jnp.moveaxis(t.astype(a.dtype), rest + list(axes), range(t.ndim))
    return jnp.sum(jnp.linalg.svd(mats, compute_uv=False), axis=-1)
  if n == np.inf:
    return jnp.max(a, axis=axes, initial=0)
  if n == -np.inf:
    return jnp.min(a, axis=axes, initial=np.inf)
  if n == 0:
    return jnp.sum(a != 0, axis=axes).astype(a.dtype)
  if n == 1:
    return jnp.sum(a, axis=axes)
  if n == 2:
    return jnp.sqrt(jnp.sum(a * a, axis=axes))
  return jnp.sum(a ** n, axis=axes) ** (1.0 / n)


def _norm_keys(scores: jax.Array, weight_mask: Optional[jax.Array], n: Norm, axes: Sequence[int],
               rounded: bool = True) -> jax.Array:
  """Keys of the L``n`` norms over ``axes`` of ``scores`` (masked by ``weight_mask`` when given); ``rounded``: the
  norms rounded to a floating ``scores``'s dtype, so that channels torch sees as tied are tied here too."""
  return _norm_keys_of(scores, weight_mask, _norm_order(scores, n, tuple(axes)), tuple(axes), rounded)


@functools.partial(jax.jit, static_argnames=("n", "axes", "rounded"))
def _norm_keys_of(scores, weight_mask, n, axes, rounded):
  # One program per shape (see _nm_kept).
  scores = effective(scores, weight_mask)
  norms = _norm(scores, n, axes)
  if rounded and jnp.issubdtype(scores.dtype, jnp.floating):
    norms = norms.astype(scores.dtype)
  return selection.sortable_keys(norms)


def ln_structured(x: jax.Array, amount: Amount, n: Norm, axis: int, *, mask: Optional[jax.Array] = None,
                  importance_scores: Optional[jax.Array] = None) -> jax.Array:
  """Prunes the ``amount`` channels along ``axis`` of smallest L``n`` norm (torch's ``prune.ln_structured``).

  Args:
    x: the parameter, at least 2-d.
    amount: a fraction in [0, 1] or a count of channels (of those not yet fully pruned when ``mask`` is given).
    n: the norm's order: any int or float (0 counts non-zeros, negative orders give 0 to channels holding a 0),
      ``inf``, ``-inf``, ``None`` (2), ``'fro'`` (2-d/3-d tensors) or ``'nuc'`` (3-d tensors).
    axis: the channel axis (torch's ``dim``); negative values count from the end.
    mask: the existing mask; channels still partly kept compete, partial channels stay partial.
    importance_scores: ranked instead of the effective weight ``x * mask``.

  Returns:
    A bool mask of ``x.shape``. NaN norms rank above +inf (such channels are kept); tied channels are pruned
    lowest index first. Norms are computed in float32 for 16-bit inputs and rounded back to the input dtype, so
    channels that torch sees as tied are tied here too.
  """
  return run_ranking(ln_structured_ranking(x, amount, n, axis, mask=mask, importance_scores=importance_scores))


def ln_structured_ranking(x, amount, n, axis, *, mask=None, importance_scores=None) -> Ranking:
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  axis = normalize_axis(x, axis)
  validate_amount(amount)
  keys = _norm_keys(x, mask, n, other_axes(x, axis)) if importance_scores is None else _norm_keys(
      check_scores(importance_scores, x), None, n, other_axes(x, axis))
  return _structured(keys, x, amount, axis, mask)


def custom_from_mask(x: jax.Array, mask_to_apply: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
  """Prunes where ``mask_to_apply`` is False/0 (torch's ``prune.custom_from_mask``).

  torch multiplies by any mask, so 0.5 would scale the weight; a jaxprune mask is binary and a numeric mask with
  values other than 0 and 1 raises ``ValueError``.
  """
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  if mask_to_apply is None:
    raise TypeError("custom_from_mask needs `mask_to_apply`: a bool or 0/1 array of the tensor's shape, got None")
  new = check_mask(mask_to_apply, x, what="mask_to_apply")
  return new if mask is None else mask & new


def nm_structured(x: jax.Array, n: int, m: int, axis: int = -1, *, mask: Optional[jax.Array] = None,
                  importance_scores: Optional[jax.Array] = None) -> jax.Array:
  """Keeps the ``n`` largest-magnitude entries of every ``m`` consecutive ones along ``axis`` (N:M sparsity).

  2:4 along the input axis is the pattern NVIDIA's sparse tensor cores accelerate. With ``mask=``, entries already
  pruned stay pruned and count against the group's ``m - n`` pruned slots; groups with fewer than ``n`` live
  entries keep them all. Ties: the lower index is pruned first; NaN ranks largest.

  Raises:
    ValueError: ``n`` outside [0, m], or ``x.shape[axis]`` not a multiple of ``m``.
  """
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, (int, np.integer)) \
      or not isinstance(m, (int, np.integer)) or m < 1 or not 0 <= n <= m:
    raise ValueError(f"N:M sparsity needs integers 0 <= n <= m and m >= 1, got n={n!r}, m={m!r}")
  if x.ndim == 0:
    raise ValueError("N:M pruning needs at least a 1-d tensor, got a 0-d one")
  axis = _axis_index(x, axis)
  if x.shape[axis] % m:
    raise ValueError(f"N:M pruning with m={m} needs the size of axis {axis} to be a multiple of {m}, "
                     f"got shape {x.shape}")
  return _nm_kept(check_rankable(check_scores(importance_scores, x)), mask, int(n), int(m), axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _nm_kept(scores: jax.Array, mask: Optional[jax.Array], n: int, m: int, axis: int) -> jax.Array:
  # One program per shape: called eagerly, its dozen operations would each compile on their own.
  shape, ndim = scores.shape, scores.ndim
  keys = selection.sortable_keys(scores, magnitude=True)
  if mask is not None:
    keys = jnp.where(mask, keys, jnp.zeros((), keys.dtype))  # pruned entries rank below every live one
  # Split only `axis` into (groups, m): the other axes, and their sharding, are untouched.
  groups = keys.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])
  this, other = jnp.expand_dims(groups, axis + 2), jnp.expand_dims(groups, axis + 1)
  pair = (1,) * (axis + 1) + (m, m) + (1,) * (ndim - axis - 1)
  later = (lax.broadcasted_iota(jnp.int32, (m, m), 1) > lax.broadcasted_iota(jnp.int32, (m, m), 0)).reshape(pair)
  # Rank of each entry inside its group, largest first; on equal keys the higher index ranks first.
  rank = jnp.sum((other > this) | ((other == this) & later), axis=axis + 2)
  keep = (rank < n).reshape(shape)
  return keep if mask is None else keep & mask


def block_structured(x: jax.Array, amount: Amount, block_shape: Sequence[int], *, n: Norm = 1,
                     mask: Optional[jax.Array] = None, importance_scores: Optional[jax.Array] = None) -> jax.Array:
  """Prunes the ``amount`` blocks of smallest L``n`` norm, tiling ``x`` with blocks of ``block_shape``.

  Block sparsity (e.g. 1x4 or 16x16 tiles) is what block-sparse kernels exploit. With ``mask=``, blocks not yet
  fully pruned compete and ``amount`` is relative to them.

  Raises:
    ValueError: ``block_shape`` does not have one positive size per axis, each dividing the axis.
  """
  return run_ranking(block_structured_ranking(x, amount, block_shape, n=n, mask=mask,
                                              importance_scores=importance_scores))


def block_structured_ranking(x, amount, block_shape, *, n=1, mask=None, importance_scores=None) -> Ranking:
  x = jnp.asarray(x)
  mask = check_mask(mask, x)
  if not all(isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) for b in block_shape):
    raise ValueError(f"block_shape must hold integers, got {tuple(block_shape)!r}")
  block_shape = tuple(int(b) for b in block_shape)
  if len(block_shape) != x.ndim or any(b < 1 or s % b for s, b in zip(x.shape, block_shape)):
    raise ValueError(f"block_shape {block_shape} must give one positive size per axis, each dividing the "
                     f"tensor's shape {x.shape}")
  validate_amount(amount)
  tiled = tuple(d for s, b in zip(x.shape, block_shape) for d in (s // b, b))
  inner = tuple(range(1, 2 * x.ndim, 2))
  if importance_scores is None:
    keys = _norm_keys(x.reshape(tiled), None if mask is None else mask.reshape(tiled), n, inner, rounded=False)
  else:
    keys = _norm_keys(check_scores(importance_scores, x).reshape(tiled), None, n, inner, rounded=False)
  live = None if mask is None else jnp.any(mask.reshape(tiled), axis=inner)

  def expand(pruned):
    kept = jnp.broadcast_to(jnp.expand_dims(~pruned, inner), tiled).reshape(x.shape)
    return kept if mask is None else kept & mask

  return Ranking(keys, live, amount, expand)


RANKINGS = {"l1_unstructured": l1_unstructured_ranking, "random_unstructured": random_unstructured_ranking,
            "random_structured": random_structured_ranking, "ln_structured": ln_structured_ranking,
            "block_structured": block_structured_ranking}
"""The methods that prune the ``amount`` smallest units of a ranking, by name: :func:`jaxprune.prune` ranks all
leaves of a model in one selection with them."""

RANDOM_RANKINGS_OF_KEYS = {"random_unstructured": _random_unstructured_of_keys,
                           "random_structured": _random_structured_of_keys}
"""The random methods' rankings given the keys of their draws (see :func:`uniform_keys_by_shape`)."""
