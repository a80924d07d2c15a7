"""Exact k-smallest selection in O(n), jittable with a traced k, over one array or many (spec §4, §6).

``torch.topk`` sorts; jaxprune does not. Every score is mapped to an unsigned integer key whose order is the
order torch's comparator uses (NaN above +inf, -0.0 equal to +0.0). The k-th smallest key is then found digit by
digit from 16-bit histograms: two passes for 32-bit keys, four for 64-bit ones. Histograms are summed across
arrays, so a global ranking over a pytree, or over shards of a sharded array, exchanges only counts, never the
scores themselves.

Ties at the k-th key are broken by position: among equal keys, the lowest position is pruned first, positions
running through the arrays in the order given and row-major inside each. torch leaves this case to libstdc++'s
introselect internals (spec §4); we pick one documented, deterministic rule instead. Choosing the lowest tied
positions is itself a k-smallest selection, over positions: two more histogram passes, run (under ``lax.cond``)
only when the tied entries straddle k.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.amounts import Count

_DIGIT_BITS = 16
_BUCKETS = 1 << _DIGIT_BITS


def _key_dtype(dtype) -> np.dtype:
  return np.dtype(np.uint64) if np.dtype(dtype).itemsize == 8 else np.dtype(np.uint32)


def key_dtype(dtypes: Sequence) -> np.dtype:
  """The unsigned key dtype that orders scores of all ``dtypes`` together (torch promotes when it concatenates)."""
  return _key_dtype(score_dtype(dtypes))


def score_dtype(dtypes: Sequence) -> np.dtype:
  """The dtype scores are compared in: the promotion of ``dtypes``, at least 32 bits wide (exact for f16/bf16)."""
  dtype = jnp.result_type(*dtypes) if dtypes else jnp.float32
  if jnp.issubdtype(dtype, jnp.floating):
    return np.dtype(np.float64) if np.dtype(dtype).itemsize == 8 else np.dtype(np.float32)
  if jnp.issubdtype(dtype, jnp.integer):
    wide = np.dtype(dtype).itemsize == 8
    if jnp.issubdtype(dtype, jnp.signedinteger):
      return np.dtype(np.int64 if wide else np.int32)
    return np.dtype(np.uint64 if wide else np.uint32)
  raise TypeError(f"cannot rank scores of dtype {dtype}: expected a real floating or integer dtype")


@functools.partial(jax.jit, static_argnames="dtype")
def sortable_keys(scores: jax.Array, dtype=None) -> jax.Array:
  """Maps ``scores`` to unsigned keys that sort like torch's topk comparator (NaN largest, -0.0 == +0.0).

  Args:
    scores: real floating or integer scores.
    dtype: the common score dtype (see :func:`score_dtype`); defaults to the one of ``scores``.
  """
  dtype = score_dtype([scores.dtype]) if dtype is None else np.dtype(dtype)
  udtype = _key_dtype(dtype)
  top = np.array(1, udtype) << np.array(8 * udtype.itemsize - 1, udtype)
  x = scores.astype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    x = jnp.where(x == 0, jnp.zeros((), dtype), x)
    bits = lax.bitcast_convert_type(x, udtype)
    keys = jnp.where((bits & top) != 0, ~bits, bits | top)
    nan_key = np.array(np.iinfo(udtype).max, udtype) >> np.array(1, udtype) | top  # above +inf's key
    return jnp.where(jnp.isnan(x), nan_key - np.array(1, udtype), keys)
  bits = lax.bitcast_convert_type(x, udtype)
  return bits ^ top if jnp.issubdtype(dtype, jnp.signedinteger) else bits


def smallest(keys: Sequence[jax.Array], k: Count,
             candidates: Optional[Sequence[Optional[jax.Array]]] = None) -> list[jax.Array]:
  """Boolean arrays marking exactly the ``k`` smallest keys among the candidates.

  Args:
    keys: unsigned key arrays from :func:`sortable_keys`, all of one dtype, any shapes.
    k: how many to mark; a Python int or a traced integer scalar, ``0 <= k <= number of candidates``.
    candidates: per array, a bool array of its shape (True = may be selected) or None (all may).

  Returns:
    For each array, a bool array of its shape, True at the selected entries.
  """
  candidates = [None] * len(keys) if candidates is None else list(candidates)
  if not keys or sum(key.size for key in keys) == 0 or (isinstance(k, int) and k == 0):
    return [jnp.zeros(key.shape, bool) for key in keys]
  return _smallest(tuple(keys), jnp.asarray(k, jnp.int32), tuple(candidates))


@jax.jit
def _smallest(keys: tuple[jax.Array, ...], k: jax.Array, candidates: tuple[Optional[jax.Array], ...]):
  # Jitted so that an eager call compiles once per shape, and a new amount (a traced k) never recompiles.
  # Every step is elementwise in each key array's own shape, or a reduction of it: nothing is raveled, so a
  # sharded array keeps its sharding and only histograms and counts cross devices.
  sentinel = _sentinel(keys[0].dtype)  # never selected: above every real key
  live = [key if c is None else jnp.where(c, key, sentinel) for key, c in zip(keys, candidates)]
  threshold, below, ties = _kth_smallest(live, k)
  take = k - below  # how many entries equal to the threshold are selected

  offsets = np.cumsum([0] + [key.size for key in live])
  total = np.uint32(offsets[-1])
  # Recomputed at each use: a shared list would be materialised (4 bytes per entry) instead of fused.
  positions = lambda: [(_row_major_index(key.shape) + int(off)).astype(jnp.uint32) for key, off in zip(live, offsets)]

  def past_lowest_tied_positions(_):
    # The `take` lowest positions among the tied entries are themselves a k-smallest selection.
    tied = [jnp.where(key == threshold, pos, _sentinel(np.uint32)) for key, pos in zip(live, positions())]
    return _kth_smallest(tied, take)[0] + np.uint32(1)

  cutoff = lax.cond((take != ties) & (take > 0), past_lowest_tied_positions,
                    lambda _: jnp.where(take > 0, total, np.uint32(0)), None)
  return [(key < threshold) | ((key == threshold) & (pos < cutoff)) for key, pos in zip(live, positions())]


def _sentinel(udtype) -> np.ndarray:
  return np.array(np.iinfo(udtype).max, udtype)


def _kth_smallest(keys: Sequence[jax.Array], k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k-th smallest key (1-based), how many keys lie below it and how many equal it, digit by digit."""
  udtype = keys[0].dtype
  below = jnp.int32(0)  # how many keys lie below the prefix found so far
  prefix = jnp.zeros((), udtype)
  nbits = 8 * np.dtype(udtype).itemsize
  digit_mask = np.array(_BUCKETS - 1, udtype)
  for shift in range(nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
    shift_u = np.array(shift, udtype)
    if shift == nbits - _DIGIT_BITS:
      digits = [(key >> shift_u).astype(jnp.int32) for key in keys]
    else:
      high = np.array(shift + _DIGIT_BITS, udtype)
      digits = [jnp.where((key >> high) == (prefix >> high), ((key >> shift_u) & digit_mask).astype(jnp.int32),
                          _BUCKETS) for key in keys]
    hist = sum(jnp.zeros(_BUCKETS + 1, jnp.int32).at[d].add(1, out_sharding=_histogram_sharding())[:_BUCKETS]
               for d in digits)
    cum = jnp.cumsum(hist)
    bucket = jnp.sum(below + cum < k).astype(jnp.int32)  # the bucket holding the k-th smallest
    below = below + jnp.where(bucket > 0, cum[jnp.maximum(bucket - 1, 0)], 0)
    prefix = prefix | (bucket.astype(udtype) << shift_u)
    ties = hist[bucket]
  return prefix, below, ties


def _histogram_sharding() -> Optional[jax.sharding.PartitionSpec]:
  """Replicated under a mesh context: with explicit mesh axes a scatter from sharded digits must say so."""
  return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.PartitionSpec()


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
  """Each entry's flat row-major index, built from iotas so that it shards like an array of ``shape``."""
  return sum((lax.broadcasted_iota(jnp.int32, shape, d) * int(np.prod(shape[d + 1:])) for d in range(len(shape))),
             jnp.zeros(shape, jnp.int32))
