"""Exact k-smallest selection in O(n), jittable with traced counts, over any number of arrays at once (spec §4, §6).

``torch.topk`` sorts; jaxprune does not. Every score is mapped to an unsigned integer key whose order is the
order torch's comparator uses (NaN above +inf, -0.0 equal to +0.0), by integer operations on its bits only, so
subnormal scores rank exactly even where the hardware flushes them to zero. The k-th smallest key is then found
digit by digit from histograms: two passes of 16-bit digits for 32-bit keys, four for 64-bit ones.

One ranking, many arrays. The arrays of a call are laid end to end in one buffer and every pass builds one
histogram of that buffer, so the program's size does not grow with the number of arrays beyond one copy in and
one compare out per array. Arrays may belong to different *segments*, each with its own ``k``: a global prune is
one segment, a local prune of a whole model one segment per leaf, still one buffer and one histogram per pass
(with 8-bit digits when there are many segments, so the histogram stays small). The histogram is a
custom-partitioned op: on sharded arrays each device bins its own shards and the devices sum one histogram per
pass, so neither the collectives nor the bytes exchanged grow with the number of arrays, and no score crosses
devices.

Ties at the k-th key are broken by position: among equal keys, the lowest position is pruned first, positions
running through the arrays in the order given and row-major inside each. torch leaves this case to libstdc++'s
introselect internals (spec §4); we pick one documented, deterministic rule instead. Choosing the lowest tied
positions is itself a k-smallest selection, over positions, run (under ``lax.cond``) only when tied entries
straddle k.

Counts, ``k`` and positions are 64-bit inside the selection (it traces under a local ``jax.enable_x64``), so
models beyond 2^31 entries count exactly without the caller enabling x64.
"""
from __future__ import annotations

import functools
import itertools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_HISTOGRAM_LIMIT = 1 << 20  # buckets of one pass, all segments together: 4 MiB of int32
_SCATTER_CHUNKS = 8
_SCATTER_CHUNK_MIN = 1 << 19
_SCATTER_GROUP = 2
_TIE_BLOCK = 4096
_COUNT_GROUP = 32
# Eager calls on at most this many CPU entries are laid out on the host in padded sizes (see _select_on_host).
HOST_LAYOUT_LIMIT = 1 << 20
_HOST_LAYOUT_MIN = 1 << 10
_ALIGNMENT = 64  # what XLA:CPU needs to take a host buffer without copying it


def _inf_bits(dtype: np.dtype) -> np.ndarray:
  """The bits of +inf in the float ``dtype``: every key above them is a NaN."""
  return np.frombuffer(np.array(np.inf, dtype).tobytes(), _key_dtype(dtype))[0]


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


def _float_bits(x: jax.Array, dtype: np.dtype) -> jax.Array:
  """The bits of ``x`` as a ``dtype`` float, widened without a float operation where the bits allow it."""
  udtype = _key_dtype(dtype)
  if x.dtype == jnp.bfloat16 and dtype == np.float32:  # bf16 is the top half of an f32: exact, subnormals too
    return lax.bitcast_convert_type(x, jnp.uint16).astype(udtype) << np.array(16, udtype)
  return lax.bitcast_convert_type(x.astype(dtype), udtype)


@functools.partial(jax.jit, static_argnames=("dtype", "magnitude"))
def sortable_keys(scores: jax.Array, dtype=None, magnitude: bool = False) -> jax.Array:
  """Maps ``scores`` (or ``|scores|``) to unsigned keys that sort like torch's topk comparator.

  NaN ranks above +inf (every NaN alike), -0.0 equals +0.0, and subnormals keep their order: floats are mapped
  through their bits, never through a float comparison that the CPU may flush to zero.

  Args:
    scores: real floating or integer scores.
    dtype: the common score dtype (see :func:`score_dtype`); defaults to the one of ``scores``.
    magnitude: rank ``|scores|`` instead (the sign bit is cleared, so ``|x|`` is exact for subnormals too).
  """
  dtype = score_dtype([scores.dtype]) if dtype is None else np.dtype(dtype)
  udtype = _key_dtype(dtype)
  nbits = 8 * udtype.itemsize
  top = np.array(1, udtype) << np.array(nbits - 1, udtype)
  if jnp.issubdtype(dtype, jnp.floating):
    bits = _float_bits(scores, dtype)
    unsigned = bits & ~top
    if magnitude:
      bits = unsigned
    inf_bits = _inf_bits(dtype)
    keys = jnp.where((bits & top) != 0, ~bits, bits | top)
    keys = jnp.where(unsigned == 0, top, keys)  # -0.0 == +0.0
    return jnp.where(unsigned > inf_bits, _sentinel(udtype) - np.array(1, udtype), keys)  # NaN: above +inf's key
  x = jnp.abs(scores.astype(dtype)) if magnitude else scores.astype(dtype)
  bits = lax.bitcast_convert_type(x, udtype)
  return bits ^ top if jnp.issubdtype(dtype, jnp.signedinteger) else bits


def count_true(flags: jax.Array, dtype=jnp.int64) -> jax.Array:
  """How many entries of the bool array ``flags`` are True, as ``dtype`` (int64 is traced under a local x64).

  XLA:CPU splits a sum over many entries into windows and converts every flag to the sum's dtype first, a copy it
  holds whole: ``jnp.sum(flags, dtype=jnp.int64)`` of 10M flags holds 76 MiB of scratch and takes 26 ms on a
  2-core CPU. Here the flags are first summed in uint8 over groups of at most 32 along the last axis (a divisor
  of it, so that no axis is merged and a sharded one stays as it is; XLA fuses a sum that short with the
  conversion): the same count holds 3 MiB. Below 2^16 flags (a copy of at most 512 KiB), or along a last axis
  with no divisor from 8 to 32, the flags are summed plainly, which compiles to fewer kernels.
  """
  flags = jnp.asarray(flags)
  last = flags.shape[-1] if flags.ndim else 1
  group = max(d for d in range(1, min(last, _COUNT_GROUP) + 1) if last % d == 0) if last else 1
  with jax.enable_x64(True):
    if group < 8 or flags.size < 1 << 16:
      return jnp.sum(flags, dtype=dtype)
    grouped = flags.reshape(flags.shape[:-1] + (last // group, group))
    return jnp.sum(jnp.sum(grouped, axis=-1, dtype=jnp.uint8), dtype=dtype)


def smallest(keys: Sequence[jax.Array], k, candidates: Optional[Sequence[Optional[jax.Array]]] = None,
             segments: Optional[Sequence[int]] = None, complement: bool = False) -> list[jax.Array]:
  """Boolean arrays marking exactly the ``k`` smallest keys among the candidates (of each segment).

  Args:
    keys: unsigned key arrays from :func:`sortable_keys`, all of one dtype, any shapes.
    k: how many to mark: a Python int or an integer scalar (traced or not) with one segment; with several, a
      sequence or vector of one count per segment. ``0 <= k <= number of candidates`` (of the segment).
    candidates: per array, a bool array of its shape (True = may be selected) or None (all may).
    segments: per array, the index of the segment it is ranked in (default: all in segment 0). Positions, and
      so ties, run through the arrays in the order given, whatever their segments.
    complement: mark the candidates that are *not* selected instead (what a mask keeps), at no extra cost.

  Returns:
    For each array, a bool array of its shape, True at the selected entries (or at the candidates left).
  """
  return _select(keys, k, candidates, segments, None, complement)


def smallest_magnitudes(scores: Sequence[jax.Array], k, candidates: Optional[Sequence[Optional[jax.Array]]] = None,
                        segments: Optional[Sequence[int]] = None, complement: bool = False) -> list[jax.Array]:
  """:func:`smallest` of the keys of ``|scores|``, ranked together in their common :func:`score_dtype`.

  The keys are formed once the scores are laid end to end (in :func:`layout_dtype`), so the program holds one key
  computation, not one per array.
  """
  dtype = layout_dtype([jnp.result_type(s) for s in scores])
  scores = [s if jnp.result_type(s) == dtype else jnp.asarray(s).astype(dtype) for s in scores]
  return _select(scores, k, candidates, segments, str(score_dtype([dtype])), complement)


def layout_dtype(dtypes: Sequence) -> np.dtype:
  """The dtype scores of ``dtypes`` are laid end to end in: their own when they share one (a bf16 model takes 2
  bytes an entry, not 4; keys are formed after, exactly), else their :func:`score_dtype` (floats widen exactly)."""
  return np.dtype(dtypes[0]) if len(set(np.dtype(d) for d in dtypes)) == 1 else score_dtype(dtypes)


def _opaque(constants: Sequence[int], like: jax.Array) -> list[jax.Array]:
  """int64 scalars equal to ``constants`` that XLA cannot fold: one sort keyed on the traced ``like`` returns them.

  The masks are formed on the buffer of all arrays end to end and cut back into arrays by dynamic slices. XLA:CPU
  compiles one kernel per distinct fused computation, about 20 ms each, and a slice at a constant offset is
  distinct for every array; at a traced offset the arrays of one shape share one kernel, so a model with
  hundreds of leaves but a handful of shapes compiles about as fast as a small one. A sort is not fused into its
  consumers and cannot be folded with a traced key; both rows of every operand are equal, so whatever order it
  picks, row 0 is the constant.
  """
  rows = [jnp.full((2,), c, jnp.int64) for c in constants]  # broadcasts of literals: custom_partitioning takes no consts
  keys = jnp.broadcast_to(like, (2,))
  return [r[0] for r in lax.sort((keys, *rows), num_keys=1, is_stable=False)[1:]]


def _select(values, k, candidates, segments, magnitudes_of: Optional[str], complement: bool) -> list[jax.Array]:
  values = tuple(jnp.asarray(v) for v in values)
  candidates = (None,) * len(values) if candidates is None else tuple(candidates)
  segments = (0,) * len(values) if segments is None else tuple(int(s) for s in segments)
  if not values or sum(v.size for v in values) == 0:
    return [jnp.full(v.shape, complement) if c is None else c & complement for v, c in zip(values, candidates)]
  num_segments = max(segments) + 1
  with jax.enable_x64(True):
    k = jnp.reshape(jnp.asarray(k, jnp.int64), (-1,))
  if k.shape[0] != num_segments:
    raise ValueError(f"expected one count per segment ({num_segments}), got {k.shape[0]}")
  device = host_device(values + tuple(c for c in candidates if c is not None))
  if device is not None and sum(v.size for v in values) <= HOST_LAYOUT_LIMIT:
    return _select_on_host(values, k, candidates, segments, magnitudes_of, complement, device)
  return _smallest(values, k, candidates, segments, magnitudes_of, complement)


def host_device(arrays: Sequence) -> Optional[jax.Device]:
  """The one CPU device that holds every array, when all are concrete (their bytes can be read without a copy).

  None for a tracer, or for arrays on an accelerator or over several devices.
  """
  devices = set()
  for a in arrays:
    if isinstance(a, jax.core.Tracer):
      return None
    if isinstance(a, jax.Array):
      devices |= a.devices()
  if len(devices) > 1 or any(d.platform != "cpu" for d in devices):
    return None
  return next(iter(devices)) if devices else jax.devices("cpu")[0]


def padded_size(n: int) -> int:
  """``n`` rounded up to one of 8 sizes per power of two (at least 1,024), so that sizes close together share a
  compiled program."""
  n = max(int(n), _HOST_LAYOUT_MIN)
  step = 1 << max(n.bit_length() - 4, 0)
  return -(-n // step) * step


def lay_out_on_host(values: Sequence, candidates: Sequence, dtype, device: jax.Device
                    ) -> tuple[jax.Array, jax.Array]:
  """``values`` raveled end to end in a buffer of ``dtype`` padded to :func:`padded_size`, and which of its
  entries are candidates (``candidates``: per array a bool array or None for all; the padding is none).

  Both are laid out with NumPy and handed to the CPU ``device`` as they are: 64-byte aligned, XLA:CPU takes them
  without a copy (a copy of 50 MB, 10M float32 entries and their flags, took 15-20 ms on a 2-core CPU).
  """
  sizes = [int(np.size(v)) for v in values]
  flat, live = _aligned_zeros(padded_size(sum(sizes)), dtype), _aligned_zeros(padded_size(sum(sizes)), bool)
  start = 0
  for v, c, n in zip(values, candidates, sizes):
    flat[start:start + n] = np.asarray(v).astype(dtype, copy=False).ravel()
    live[start:start + n] = True if c is None else np.asarray(c).ravel()
    start += n
  return jax.device_put(flat, device, may_alias=True), jax.device_put(live, device, may_alias=True)


def _aligned_zeros(n: int, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  raw = np.zeros(n * dtype.itemsize + _ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + n * dtype.itemsize].view(dtype)


def split_on_host(flat: np.ndarray, shapes: Sequence[tuple[int, ...]], device: jax.Device) -> list[jax.Array]:
  """The head of ``flat`` cut into arrays of ``shapes`` on ``device`` (the inverse of :func:`lay_out_on_host`)."""
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  starts = np.cumsum([0] + sizes)
  # One call for all: a put per array costs ~70 us more each.
  return jax.device_put([flat[lo:lo + n].reshape(shape) for lo, n, shape in zip(starts, sizes, shapes)], device)


def _select_on_host(values, k, candidates, segments, magnitudes_of, complement, device) -> list[jax.Array]:
  """:func:`_smallest` on each segment's arrays laid end to end on the host, padded to :func:`padded_size`.

  Eager calls on small CPU arrays: the program then depends on the padded sizes only, not on the shapes, so a new
  shape costs a NumPy copy instead of a compile (about 0.45 s on a 2-core CPU). Arrays keep their order inside
  their segment, and ties are cut within a segment, so the masks are those of the program over the arrays
  themselves. The padding is no candidate: it is never selected and does not count.
  """
  dtype = np.dtype(magnitudes_of) if magnitudes_of is not None else values[0].dtype
  members = [[i for i, s in enumerate(segments) if s == segment] for segment in range(k.shape[0])]
  laid = [lay_out_on_host([values[i] for i in arrays], [candidates[i] for i in arrays], dtype, device)
          for arrays in members]
  marked = _smallest(tuple(f for f, _ in laid), k, tuple(live for _, live in laid), tuple(range(len(members))),
                     magnitudes_of, complement)
  out = [None] * len(values)
  for arrays, flat in zip(members, marked):
    for i, mask in zip(arrays, split_on_host(np.asarray(flat), [values[i].shape for i in arrays], device)):
      out[i] = mask
  return out


def _keys_of(values: jax.Array, magnitudes_of: Optional[str]) -> jax.Array:
  return values if magnitudes_of is None else sortable_keys(values, np.dtype(magnitudes_of), magnitude=True)


def _ordered_like_keys(values: jax.Array, threshold: jax.Array, magnitudes_of: Optional[str]):
  """The keys of ``values`` and ``threshold``, or two cheaper arrays that compare alike: run on every entry.

  For float magnitudes the bits without the sign already order |x| (every NaN is mapped to just above +inf),
  which takes 3 operations per entry where the full key takes 10.
  """
  if magnitudes_of is None or not jnp.issubdtype(np.dtype(magnitudes_of), jnp.floating):
    return _keys_of(values, magnitudes_of), threshold
  dtype = np.dtype(magnitudes_of)
  udtype = _key_dtype(dtype)
  unsigned = ~(np.array(1, udtype) << np.array(8 * udtype.itemsize - 1, udtype))
  nan = _inf_bits(dtype) + np.array(1, udtype)
  return jnp.minimum(_float_bits(values, dtype) & unsigned, nan), jnp.minimum(threshold & unsigned, nan)


@functools.partial(jax.jit, static_argnames=("segments", "magnitudes_of", "complement"))
def _smallest(values: tuple[jax.Array, ...], k: jax.Array, candidates: tuple[Optional[jax.Array], ...],
              segments: tuple[int, ...], magnitudes_of: Optional[str], complement: bool) -> list[jax.Array]:
  # Jitted so that an eager call compiles once per structure, and a new amount (a traced k) never recompiles.
  with jax.enable_x64(True):
    k = k.astype(jnp.int64)
    cands = tuple(c for c in candidates if c is not None)
    has_cands = tuple(c is not None for c in candidates)
    threshold, below, ties = _run_op("keys", segments, magnitudes_of, has_cands, k, *values, *cands)
    take = k - below  # per segment, how many entries equal to the threshold are selected
    pos_dtype = _position_dtype(sum(v.size for v in values))
    # Where the tied entries straddle k, the `take` lowest positions among them are themselves a k-smallest
    # selection; elsewhere every tied entry is selected, or none.
    straddles = (take != ties) & (take > 0)
    lowest = _run_op("positions", segments, magnitudes_of, has_cands, jnp.where(straddles, take, 0), threshold,
                     *values, *cands)
    cutoff = jnp.where(straddles, lowest + np.array(1, pos_dtype),
                       jnp.where(take > 0, _sentinel(pos_dtype), np.array(0, pos_dtype)))
    mode = "kept" if complement else "selected"
    return list(_run_op(mode, segments, magnitudes_of, has_cands, threshold, cutoff, *values, *cands))


def _of_segment(per_segment: jax.Array, segment_of: Optional[jax.Array]) -> jax.Array:
  """Each key's entry of a per-segment vector (``segment_of``: each key's segment, None for one segment)."""
  return per_segment[0] if segment_of is None else per_segment[segment_of]


def _sentinel(udtype) -> np.ndarray:
  return np.array(np.iinfo(udtype).max, udtype)


def _position_dtype(total: int) -> np.dtype:
  return np.dtype(np.uint32) if total < np.iinfo(np.uint32).max else np.dtype(np.uint64)


def _positions(shape: tuple[int, ...], offset, dtype, starts: Sequence = (), full: Sequence[int] = ()) -> jax.Array:
  """Each entry's row-major position plus ``offset``, from iotas (so it shards like an array of ``shape``).

  ``starts`` and ``full`` place a shard: its first index along each axis and the whole array's shape.
  """
  full = tuple(full) or shape
  strides = [int(np.prod(full[d + 1:], dtype=np.int64)) for d in range(len(shape))]
  pos = jnp.full(shape, offset, dtype)
  for d, stride in enumerate(strides):
    index = lax.broadcasted_iota(dtype, shape, d)
    if starts:
      index = index + starts[d].astype(dtype)
    pos = pos + index * np.array(stride, dtype)
  return pos


def _digit_bits(num_segments: int) -> int:
  return 16 if num_segments << 16 <= _HISTOGRAM_LIMIT else 8


@functools.cache
def _select_op(mode: str, segments: tuple[int, ...], magnitudes_of: Optional[str], has_cands: tuple[bool, ...]):
  """The radix selection, and the masks it gives, as custom-partitioned ops.

  ``op(k, *values, *candidates)`` gives, per segment, the k-th smallest key, how many keys lie below it and how
  many equal it (``mode="keys"``); ``op(k, tied_at, *values, *candidates)`` gives the k-th smallest position among
  the keys equal to ``tied_at`` (``mode="positions"``); ``op(threshold, cutoff, *values, *candidates)`` gives, per
  array, the candidates below the threshold or tied at it before the position cutoff (``mode="selected"``), or
  the other candidates (``mode="kept"``). Values are keys, or scores whose magnitude keys are formed after the
  values are laid end to end (``magnitudes_of``, their common dtype).
  """
  scalars = 1 if mode == "keys" else 2
  masks = mode in ("selected", "kept")
  count = len(segments)
  num_segments = max(segments) + 1

  def run(first, operands, starts=None, full_shapes=None, owned=None, reduce=lambda h: h):
    with jax.enable_x64(True):
      second = operands[0] if scalars == 2 else None
      arrays = operands[scalars - 1:][:count]
      values = [v.reshape(1) if v.ndim == 0 else v for v in arrays]
      cands = iter(operands[scalars - 1 + count:])
      concat = lambda parts: jnp.concatenate(parts) if len(parts) > 1 else parts[0]
      flat = _end_to_end(values)
      live = None
      if any(has_cands):
        live = concat([next(cands).ravel() if has else jnp.ones(v.size, bool) for v, has in zip(values, has_cands)])
      shapes = full_shapes or [v.shape for v in values]
      offsets = np.cumsum([0] + [int(np.prod(s, dtype=np.int64)) for s in shapes])
      pos_dtype = _position_dtype(int(offsets[-1]))
      segment_of = None
      if num_segments > 1:
        small = np.uint8 if num_segments <= 256 else np.uint16 if num_segments <= 1 << 16 else np.int32
        segment_of = concat([jnp.full(v.size, s, small) for v, s in zip(values, segments)])
      own = lambda per_segment: _of_segment(per_segment, segment_of)  # noqa: E731

      def positions():
        if starts is None:  # laid end to end, an entry's position is its index in the buffer
          return lax.iota(pos_dtype, flat.size)
        return concat([_positions(v.shape, off, pos_dtype, st, full).ravel()
                       for v, off, st, full in zip(values, offsets, starts, shapes)])

      if masks:
        def compare(cut_ties: bool, flat, live, threshold, cutoff):
          keys, threshold = _ordered_like_keys(flat, threshold, magnitudes_of)
          tied = (keys == own(threshold)) & (positions() < own(cutoff) if cut_ties else own(cutoff > 0))
          chosen = (keys < own(threshold)) | tied
          chosen = ~chosen if mode == "kept" else chosen
          return chosen if live is None else chosen & live

        # Under a cond the buffer is formed once and the dynamic slices are plain copies; fused into each of them,
        # the compare would be compiled once per array. Positions are formed only when a tie is cut.
        cut = jnp.any((second > 0) & (second < _sentinel(second.dtype)))
        chosen = lax.cond(cut, functools.partial(compare, True), functools.partial(compare, False),
                          flat, live, first, second)
        return _split(chosen, [a.shape for a in arrays], like=first[0])

      def rank(flat, live):
        owned_flags = None
        if owned is not None:  # a replica that another device already counts
          owned_flags = concat([jnp.full(v.size, o) for v, o in zip(values, owned)])
        cut_by_count = mode == "positions" and starts is None and num_segments == 1
        tied_positions = positions() if mode == "positions" and not cut_by_count else None
        sources = (flat, live, segment_of, owned_flags, tied_positions)

        def keys_of(flat, live, segment_of, owned_flags, tied_positions):
          keys = _keys_of(flat, magnitudes_of)
          sentinel = _sentinel(keys.dtype)
          if live is not None:
            keys = jnp.where(live, keys, sentinel)
          if owned_flags is not None:
            keys = jnp.where(owned_flags, keys, sentinel)
          if tied_positions is not None:
            keys = jnp.where(keys == _of_segment(second, segment_of), tied_positions, _sentinel(pos_dtype))
          return keys, segment_of

        if cut_by_count:
          # Laid end to end on one device, an entry's position is its index: find the take-th tied one by counts.
          tied = lambda *chunk: keys_of(*chunk)[0] == second[0]  # noqa: E731
          return _nth_true(tied, sources, int(offsets[-1]), first[0], pos_dtype).reshape(1)
        udtype = flat.dtype if magnitudes_of is None else _key_dtype(magnitudes_of)
        udtype = pos_dtype if mode == "positions" else udtype
        return _radix_select(keys_of, sources, udtype, num_segments, first, reduce, int(offsets[-1]),
                             positions=mode == "positions")

      if mode == "positions":  # `first` is 0 in every segment whose ties need no cut: then skip the passes
        # The buffer is formed outside the cond, where XLA shares it with the one the other passes read.
        return lax.cond(jnp.any(first > 0), rank, lambda *_: jnp.zeros(num_segments, pos_dtype), flat, live)
      return rank(flat, live)

  op = custom_partitioning(lambda first, *operands: run(first, operands))

  def value_shardings(mesh, arg_shapes):
    return [NamedSharding(mesh, arg.sharding.spec) for arg in arg_shapes[scalars:scalars + count]]

  def infer(mesh, arg_shapes, result_shape):
    if masks:  # each mask shards like its array
      return value_shardings(mesh, arg_shapes)
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), result_shape)

  def partition(mesh, arg_shapes, result_shape):
    of_values = value_shardings(mesh, arg_shapes)
    of_cands = [NamedSharding(mesh, arg.sharding.spec) for arg in arg_shapes[scalars + count:]]
    if masks:  # a candidate mask is cut like its array, so that both shards cover the same entries
      of_cands = [v for v, has in zip(of_values, has_cands) if has]
    arg_shardings = (NamedSharding(mesh, PartitionSpec()),) * scalars + tuple(of_values) + tuple(of_cands)
    specs = [s.spec for s in of_values]
    full_shapes = [arg.shape for arg in arg_shapes[scalars:scalars + count]]
    axes = tuple(mesh.axis_names)

    def lower(first, *operands):
      starts, owned = [], []
      with jax.enable_x64(True):
        for spec, local in zip(specs, operands[scalars - 1:][:count]):
          used = [_spec_axes(entry) for entry in tuple(spec) + (None,) * (local.ndim - len(spec))]
          starts.append([_shard_index(mesh, names) * np.int64(n) for names, n in zip(used, local.shape)])
          # A shard replicated over a mesh axis is counted by the devices at index 0 of that axis only.
          owned.append(functools.reduce(jnp.logical_and, [lax.axis_index(name) == 0 for name in axes
                                                          if not any(name in names for names in used)],
                                        jnp.ones((), bool)))
      return run(first, operands, starts=starts, full_shapes=full_shapes, owned=None if masks else owned,
                 reduce=lambda h: lax.psum(h, axes))

    return mesh, lower, infer(mesh, arg_shapes, result_shape), arg_shardings

  def rule(mesh, arg_shapes, result_shape):
    # The radix passes: every dimension its own factor, nothing relates the operands' shardings to each other or
    # to the results. The masks: each shares its array's factors, and so does its candidate mask.
    factors = (f"f{i}" for i in itertools.count())
    dims = [" ".join(next(factors) for _ in arg.shape) for arg in arg_shapes]
    if not masks:
      return ", ".join(dims) + " -> " + ", ".join(next(factors) for _ in jax.tree.leaves(result_shape))
    of_values = dims[scalars:scalars + count]
    of_cands = [d for d, has in zip(of_values, has_cands) if has]
    return ", ".join(dims[:scalars + count] + of_cands) + " -> " + ", ".join(of_values)

  op.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)

  # custom_partitioning has no batching rule: under vmap (per-layer pruning of stacked layers, say) each batch
  # element runs the same selection unpartitioned, which jnp batches.
  plain = lambda first, *operands: run(first, operands)  # noqa: E731
  batchable = jax.custom_batching.custom_vmap(lambda first, *operands: op(first, *operands))

  @batchable.def_vmap
  def _(axis_size, in_batched, first, *operands):
    del axis_size
    out = jax.vmap(plain, in_axes=tuple(0 if b else None for b in in_batched))(first, *operands)
    return out, jax.tree.map(lambda _: True, out)

  return batchable


def _end_to_end(values: Sequence[jax.Array]) -> jax.Array:
  """The arrays raveled and laid end to end, in one buffer of their dtype.

  16-bit floats travel as their bits: XLA:CPU has no bf16/f16 concatenate and would widen every array to f32,
  concatenate and narrow back, holding 10 bytes an entry where 2 do.
  """
  if len(values) == 1:
    return values[0].ravel()
  dtype = values[0].dtype
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
    bits = jnp.concatenate([lax.bitcast_convert_type(v.ravel(), jnp.uint16) for v in values])
    return lax.bitcast_convert_type(bits, dtype)
  return jnp.concatenate([v.ravel() for v in values])


def _split(flat: jax.Array, shapes: Sequence[tuple[int, ...]], like: jax.Array) -> list[jax.Array]:
  """``flat`` cut back into arrays of ``shapes``, laid end to end, at offsets XLA cannot fold (see _opaque)."""
  if len(shapes) == 1:
    return [flat.reshape(shapes[0])]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  starts = _opaque(np.cumsum([0] + sizes[:-1]).tolist(), like)
  return [lax.dynamic_slice(flat, (start,), (n,), allow_negative_indices=False).reshape(shape)
          for start, n, shape in zip(starts, sizes, shapes)]


def _run_op(mode: str, segments, magnitudes_of, has_cands, *args):
  op = _select_op(mode, segments, magnitudes_of, has_cands)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.explicit_axes:
    # The op is partitioned from its operands' shardings, which explicit axes would pin in its traced body.
    if mode in ("selected", "kept"):
      outputs = [jax.typeof(v).sharding.spec for v in args[2:2 + len(segments)]]
    else:
      outputs = PartitionSpec() if mode == "positions" else (PartitionSpec(),) * 3
    op = jax.sharding.auto_axes(op, axes=mesh.explicit_axes, out_sharding=outputs)
  return op(*args)


def _spec_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _shard_index(mesh, names: tuple[str, ...]) -> jax.Array:
  """This device's shard index along an array axis split over the mesh axes ``names`` (major first)."""
  index = jnp.zeros((), jnp.int64)
  for name in names:
    index = index * mesh.shape[name] + lax.axis_index(name).astype(jnp.int64)
  return index


def _radix_select(keys_of, sources, udtype, num_segments: int, k: jax.Array, reduce, total: int,
                  positions: bool):
  """Digit-by-digit k-th smallest of unsigned ``udtype`` keys, per segment.

  ``keys_of(*sources)`` gives the keys of 1-d ``sources`` (a tuple of equal-length arrays, or None) and each key's
  segment (None for one segment); it is applied to slices of them, never to the whole buffer at once. ``total``
  is the number of keys on all devices: histograms are binned and summed in int32 below 2^31 keys (half the bytes
  across devices), in int64 above.
  """
  size = next(s for s in sources if s is not None).shape[0]
  bits = _digit_bits(num_segments)
  buckets = 1 << bits
  count_dtype = jnp.int32 if total < np.iinfo(np.int32).max else jnp.int64
  below = jnp.zeros(num_segments, jnp.int64)
  prefix = jnp.zeros(num_segments, udtype)
  nbits = 8 * np.dtype(udtype).itemsize
  digit_mask = np.array(buckets - 1, udtype)
  ties = jnp.zeros(num_segments, jnp.int64)
  # Keys off the prefix found so far are binned at digit 0 of their segment, then taken back out of that bucket
  # by count (all keys less those on the prefix, the last pass's ties): every index is a real bucket, so one
  # segment's indices fit 16 bits (half the bytes of int32, with nothing out of range to drop).
  index_dtype = jnp.uint16 if num_segments * buckets <= 1 << 16 else jnp.int32
  entries = None
  for shift in range(nbits - bits, -1, -bits):
    high = np.array(shift + bits, udtype)

    def index_of(*chunk):
      keys, segment_of = keys_of(*chunk)
      digit = ((keys >> np.array(shift, udtype)) & digit_mask).astype(index_dtype)
      if entries is not None:
        digit = jnp.where((keys >> high) == (_of_segment(prefix, segment_of) >> high), digit, np.array(0, index_dtype))
      if segment_of is None:
        return digit
      return segment_of.astype(index_dtype) * np.array(buckets, index_dtype) + digit

    hist = _histogram(index_of, sources, size, num_segments * buckets, count_dtype, like=k[0])
    hist = reduce(hist).astype(jnp.int64).reshape(num_segments, buckets)
    if entries is None:
      entries = jnp.sum(hist, axis=1)
    else:
      hist = hist - jnp.where(jnp.arange(buckets) == 0, (entries - ties)[:, None], 0)
    below, bucket, ties = descend(hist, below, k)
    prefix = prefix | (bucket.astype(udtype) << np.array(shift, udtype))
  return prefix if positions else (prefix, below, ties)


def _nth_true(flags_of, sources, size: int, n: jax.Array, pos_dtype) -> jax.Array:
  """The index of the ``n``-th (1-based) True of ``flags_of(*sources)`` (1-d), given that there are at least ``n``.

  One pass counts the Trues of each block of _TIE_BLOCK entries; the running count over blocks names the block
  that holds the n-th, and a running count within that one block its place. Where a tie straddles the threshold
  (likely past ~10M float32 weights) this replaces a radix selection over every entry's position: one counting
  pass instead of two scatter passes, and no buffer of positions. The flags are never held whole: the counts are
  taken as they are formed, and the one block is formed again from its slice of the sources.
  """
  if size < _TIE_BLOCK:  # one block
    row = jnp.pad(flags_of(*sources), (0, _TIE_BLOCK - size))
    return jnp.sum(jnp.cumsum(row, dtype=jnp.int32) < n).astype(pos_dtype)
  blocks, whole = divmod(size, _TIE_BLOCK)
  cut = lambda lo, hi: (None if s is None else s[lo:hi] for s in sources)  # noqa: E731
  # Counted in uint8 over rows of 128 first: summed straight to int32, XLA:CPU splits the reduction into a
  # reduce-window it cannot fuse with the conversion, and holds an int32 copy of every flag (4 bytes an entry).
  flags = flags_of(*cut(0, blocks * _TIE_BLOCK)).reshape(blocks, _TIE_BLOCK // 128, 128)
  counts = jnp.sum(jnp.sum(flags, axis=2, dtype=jnp.uint8), axis=1, dtype=jnp.int32)
  if whole:
    counts = jnp.append(counts, jnp.sum(flags_of(*cut(blocks * _TIE_BLOCK, size)), dtype=jnp.int32))
  before = jnp.cumsum(counts, dtype=jnp.int64)
  block = jnp.sum(before < n)
  n_in_block = n - jnp.where(block > 0, before[jnp.maximum(block - 1, 0)], 0)
  # The last block may be short: its row is the last _TIE_BLOCK entries, with those before the block masked out.
  first = block * _TIE_BLOCK
  start = jnp.minimum(first, size - _TIE_BLOCK)
  row = flags_of(*(None if s is None else lax.dynamic_slice_in_dim(s, start, _TIE_BLOCK) for s in sources))
  row = row & (jnp.arange(_TIE_BLOCK) >= first - start)
  offset = jnp.sum(jnp.cumsum(row, dtype=jnp.int32) < n_in_block)
  return start.astype(pos_dtype) + offset.astype(pos_dtype)


def _bin(index: jax.Array, size: int, count_dtype) -> jax.Array:
  """How many of the 1-d ``index`` fall in each of ``size`` buckets (every index in range).

  A scatter of its own: ``.at[].add`` would widen 16-bit indices to int32 first, a copy of 4 bytes an entry.
  """
  dims = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                     scatter_dims_to_operand_dims=(0,))
  ones = jnp.ones(index.shape, count_dtype)
  return lax.scatter_add(jnp.zeros(size, count_dtype), index[:, None], ones, dims, indices_are_sorted=False,
                         unique_indices=False, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _histogram(index_of, sources, size: int, buckets: int, count_dtype, like: jax.Array) -> jax.Array:
  """Counts per bucket of ``index_of(*sources)``, formed chunk by chunk of the sources.

  XLA:CPU runs independent scatters on separate cores, so the chunks go in groups of _SCATTER_GROUP. Each group
  reads its chunks at offsets that depend on the counts so far (plus a zero XLA cannot fold), so that XLA does not
  form every chunk's indices (2 bytes an entry) before the first is binned: one group's indices are held at a time.
  The offsets are not constants either (see _opaque): XLA would turn a constant slice of the buffer of all arrays
  into a copy of the arrays' own slices, one held per chunk.
  """
  parts = min(_SCATTER_CHUNKS, max(1, size // _SCATTER_CHUNK_MIN))
  bounds = np.linspace(0, size, parts + 1).astype(np.int64)
  starts = _opaque(bounds[:-1].tolist(), like) if parts > 1 else [0]
  hist = jnp.zeros(buckets, count_dtype)
  for g in range(0, parts, _SCATTER_GROUP):
    after = (hist[0] < 0).astype(jnp.int64)  # 0, known only once the last group is binned
    group = []
    for start, n in zip(starts[g:g + _SCATTER_GROUP], np.diff(bounds)[g:g + _SCATTER_GROUP]):
      chunk = (None if s is None else lax.dynamic_slice_in_dim(s, start + after, int(n)) for s in sources)
      group.append(_bin(index_of(*chunk), buckets, count_dtype))
    hist = hist + sum(group)
  return hist


def descend(hist: jax.Array, below: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One digit of the radix selection, per segment (rows of ``hist``).

  Args:
    hist: ``(segments, buckets)`` counts of this digit among the keys that share the prefix found so far.
    below: how many keys of each segment lie below that prefix.
    k: the 1-based rank sought in each segment.

  Returns:
    ``(below, bucket, ties)``: the count below the extended prefix, the digit holding the k-th key, and how many
    keys share that digit.
  """
  cum = jnp.cumsum(hist, axis=1)
  bucket = jnp.sum(below[:, None] + cum < k[:, None], axis=1)
  before = jnp.take_along_axis(cum, jnp.maximum(bucket - 1, 0)[:, None], axis=1)[:, 0]
  ties = jnp.take_along_axis(hist, jnp.minimum(bucket, hist.shape[1] - 1)[:, None], axis=1)[:, 0]
  return below + jnp.where(bucket > 0, before, 0), bucket, ties
