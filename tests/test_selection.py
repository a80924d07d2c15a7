"""The selection engine (issue 9): one ranking over many arrays whose program does not grow with their number,
segments with their own counts, exact 64-bit counting beyond 2^31 entries, and keys built from bits (spec §4).

Ties are broken lowest position first, positions running through the arrays in order (spec §4 leaves torch's order
to its sort): every check here compares against a stable argsort, which is that rule.
"""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import selection
from torch_oracle import assert_same_up_to_ties, holder


def stable_smallest(keys: np.ndarray, k: int) -> np.ndarray:
  picked = np.zeros(keys.size, bool)
  picked[np.argsort(keys, kind="stable")[:k]] = True
  return picked


# Each structure compiles its own program under jit: sizes come from a few values so examples share programs, and
# the keys (the cheap part to vary) carry the randomness.
SIZES = st.sampled_from([0, 1, 6, 33])
# Eager calls on small CPU arrays rank them laid end to end on the host, per segment, padded (one program per
# padded size); under jit the program ranks the arrays as they are. The engine tests run both ways.
HOST_AND_JIT = pytest.mark.parametrize("jitted", [False, True], ids=["host", "jit"])


def smallest(jitted: bool, keys, k, candidates=None, segments=None, complement=False):
  if not jitted:
    return selection.smallest(keys, k, candidates, segments, complement)
  run = jax.jit(lambda keys, k, candidates: selection.smallest(keys, k, candidates, segments, complement))
  return run(keys, jnp.asarray(k), candidates)


@HOST_AND_JIT
@settings(max_examples=20)
@given(sizes=st.lists(SIZES, min_size=1, max_size=4), data=st.data())
def test_many_arrays_rank_like_their_concatenation(jitted, sizes, data):
  keys = [np.asarray(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), np.uint32) for n in sizes]
  flat = np.concatenate(keys)
  k = data.draw(st.integers(0, flat.size))
  picked = smallest(jitted, [jnp.asarray(x) for x in keys], k)
  np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in picked]), stable_smallest(flat, k))


@HOST_AND_JIT
@pytest.mark.parametrize("seed", range(3))
def test_a_tie_straddling_blocks_is_cut_at_the_lowest_positions(seed, jitted):
  """Tied keys spread over many of the tie pass's blocks of 4096 entries, candidates and all: the k-th position is
  found by counts per block, then within one block, and equals a stable sort's."""
  rng = np.random.default_rng(seed)
  keys = [rng.integers(0, 3, n).astype(np.uint32) for n in (5000, 13, 9000)]
  live = [rng.random(x.size) < 0.8 for x in keys]
  flat, alive = np.concatenate(keys), np.concatenate(live)
  k = int(rng.integers(1, alive.sum()))
  picked = smallest(jitted, [jnp.asarray(x) for x in keys], k, [jnp.asarray(m) for m in live])
  expected = np.zeros(flat.size, bool)
  expected[np.flatnonzero(alive)[stable_smallest(flat[alive], k)]] = True
  np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in picked]), expected)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("segments", [(0, 0), (0, 1)])
def test_histograms_formed_chunk_by_chunk_count_every_key_once(dtype, segments):
  """Past a million keys the histograms are binned chunk by chunk (keys off the prefix at digit 0, counted back
  out): with heavy ties, candidates, a short last block and one or two segments, the picks equal a stable sort's."""
  rng = np.random.default_rng(len(segments) + np.dtype(dtype).itemsize)
  keys = [(rng.integers(0, 50, n) << rng.integers(0, 2, n) * 20).astype(dtype) for n in (800_001, 900_007)]
  live = [rng.random(x.size) < 0.9 for x in keys]
  ks = [int(rng.integers(1, m.sum())) for m in live]
  ks = ks if segments[1] else [int(rng.integers(1, sum(m.sum() for m in live)))]
  picked = selection.smallest([jnp.asarray(x) for x in keys], ks, [jnp.asarray(m) for m in live], segments)
  picked = np.concatenate([np.asarray(p) for p in picked])
  groups = [(np.concatenate(keys), np.concatenate(live), ks[0], slice(None))] if not segments[1] else [
      (x, m, k, slice(off, off + x.size)) for x, m, k, off in zip(keys, live, ks, (0, keys[0].size))]
  for x, m, k, where in groups:
    expected = np.zeros(x.size, bool)
    expected[np.flatnonzero(m)[stable_smallest(x[m], k)]] = True
    np.testing.assert_array_equal(picked[where], expected)


@HOST_AND_JIT
@settings(max_examples=20)
@given(sizes=st.lists(SIZES, min_size=1, max_size=20), data=st.data())
def test_segments_rank_on_their_own(jitted, sizes, data):
  """One selection, one count per segment; 20 segments also exercise the narrow 8-bit digits."""
  keys = [np.asarray(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)), np.uint32) for n in sizes]
  ks = [data.draw(st.integers(0, x.size)) for x in keys]
  picked = smallest(jitted, [jnp.asarray(x) for x in keys], ks, segments=tuple(range(len(keys))))
  for p, x, k in zip(picked, keys, ks):
    np.testing.assert_array_equal(np.asarray(p), stable_smallest(x, k))


def test_past_256_segments_each_ranks_on_its_own():
  """Past 256 segments the segment ids are 16-bit (they were int32, 4 bytes an entry): a jitted local prune of 260
  leaves equals each leaf pruned on its own."""
  rng = np.random.default_rng(0)
  params = {f"w{i:03d}": jnp.asarray(rng.integers(-3, 4, (2, 3)), jnp.float32) for i in range(260)}
  masks = jax.jit(lambda p: jaxprune.prune(p, "l1_unstructured", amount=0.5))(params)
  for name, x in params.items():
    pruned = stable_smallest(np.abs(np.asarray(x)).ravel(), 3).reshape(2, 3)
    np.testing.assert_array_equal(np.asarray(masks[name]), ~pruned)


@HOST_AND_JIT
def test_segments_shared_by_several_arrays_and_candidates(jitted):
  rng = np.random.default_rng(0)
  keys = [rng.integers(0, 4, n).astype(np.uint32) for n in (7, 9, 5, 11)]
  live = [rng.random(x.size) < 0.7 for x in keys]
  segments, ks = [1, 0, 1, 0], [6, 4]
  picked = smallest(jitted, [jnp.asarray(x) for x in keys], ks, [jnp.asarray(m) for m in live], tuple(segments))
  for segment, k in enumerate(ks):
    members = [i for i, s in enumerate(segments) if s == segment]
    flat = np.concatenate([np.where(live[i], keys[i], np.iinfo(np.uint32).max) for i in members])
    expected = stable_smallest(flat, k)
    np.testing.assert_array_equal(np.concatenate([np.asarray(picked[i]) for i in members]), expected)


def test_one_count_per_segment_is_required():
  with pytest.raises(ValueError, match="one count per segment"):
    selection.smallest([jnp.zeros(3, jnp.uint32)] * 2, [1], segments=[0, 1])


def _histogram_passes(n_leaves: int) -> int:
  params = {f"w{i}": jax.ShapeDtypeStruct((8, 4), jnp.float32) for i in range(n_leaves)}
  text = jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5)).lower(params).as_text()
  return len(re.findall(r"\bscatter\b", text))


def test_the_program_holds_the_same_histograms_for_3_or_60_leaves():
  """Leaves are laid end to end: the histogram passes do not repeat per leaf, so the program's size grows only
  by the copy in and the copy out of each leaf."""
  assert _histogram_passes(3) == _histogram_passes(60) > 0


@pytest.mark.parametrize("method, kwargs", [("random_unstructured", {}), ("random_structured", {"axis": 1})])
def test_a_random_prune_draws_once_per_shape_not_once_per_leaf(method, kwargs):
  """A draw per leaf put a threefry per leaf in the program: a local random prune of 500 leaves compiled in 59 s.
  The leaves of one shape are drawn by one vmapped draw, and each still gets uniform(fold_in(key, i), shape)."""
  key = jax.random.key(0)

  def draws(n_leaves, shapes=((8, 4),)):
    params = {f"w{i:02d}": jax.ShapeDtypeStruct(shapes[i % len(shapes)], jnp.float32) for i in range(n_leaves)}
    text = jax.jit(lambda p: jaxprune.prune(p, method, amount=0.5, key=key, **kwargs)).lower(params).as_text()
    return len(re.findall(r"call @_uniform(_\d+)?\(", text))  # each call site of the draw is a threefry in the program

  assert draws(3) == draws(40) == 1
  assert draws(40, ((8, 4), (6, 5))) == 2
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.standard_normal((4, 6) if i % 2 else (3, 5)), jnp.float32) for i in range(5)}
  masks = jax.jit(lambda p: jaxprune.prune(p, method, amount=0.5, key=key, **kwargs))(params)
  for i, (name, x) in enumerate(params.items()):
    own = getattr(jaxprune, method)(jax.random.fold_in(key, i), x, 0.5, **kwargs)
    np.testing.assert_array_equal(np.asarray(masks[name]), np.asarray(own))


def _computations(text: str) -> list[str]:
  """The bodies of an HLO module's computations, with names and metadata cut, so that equal programs compare equal."""
  bodies = re.findall(r"\n%\S+ \([^\n]*\{\n(.*?)\n\}", text, flags=re.S)
  return [re.sub(r"%[\w.-]+|, metadata=\{[^}]*\}", "", body) for body in bodies]


@pytest.mark.parametrize("method", ["global", "local"])
def test_leaves_of_one_shape_share_one_compiled_kernel(method):
  """XLA:CPU compiles a kernel per distinct fused computation: a per-leaf constant (an offset, a segment) in the
  copy out would make one per leaf, and compile time grow with the leaf count."""
  params = {f"w{i:02d}": jnp.ones((8, 4), jnp.float32) for i in range(40)}
  prune = (lambda p: jaxprune.global_unstructured(p, 0.5)) if method == "global" else (
      lambda p: jaxprune.prune(p, "l1_unstructured", amount=0.5))
  copies_out = [b for b in _computations(jax.jit(prune).lower(params).compile().as_text())
                if re.search(r"ROOT\s*= pred\[8,4\]", b)]
  assert len(copies_out) >= 40 and len(set(copies_out)) == 1


@HOST_AND_JIT
@settings(max_examples=15)
@given(sizes=st.lists(SIZES, min_size=1, max_size=20), data=st.data())
def test_complement_marks_the_candidates_left(jitted, sizes, data):
  keys = [np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.uint32) for n in sizes]
  live = [np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool) for n in sizes]
  segments = [data.draw(st.integers(0, 2)) for _ in sizes]
  used = sorted(set(segments))
  segments = [used.index(s) for s in segments]
  ks = [data.draw(st.integers(0, sum(int(m.sum()) for m, s in zip(live, segments) if s == seg)))
        for seg in range(len(used))]
  args = ([jnp.asarray(x) for x in keys], ks, [jnp.asarray(m) for m in live], tuple(segments))
  picked, kept = smallest(jitted, *args), smallest(jitted, *args, complement=True)
  for p, c, m in zip(picked, kept, live):
    np.testing.assert_array_equal(np.asarray(c), m & ~np.asarray(p))


def test_a_local_l1_prune_forms_keys_on_the_buffer_and_equals_each_leaf_on_its_own():
  """l1 keys are formed on the buffer of all leaves, as in a global prune: the program holds no key per leaf (it
  held 520 u32 instructions for 40 leaves of 8x4), and the masks are each leaf's own, mixed float dtypes, masks,
  scores, subnormals, NaN and signed zeros included."""
  abstract = {f"w{i:02d}": jax.ShapeDtypeStruct((8, 4), jnp.float32) for i in range(40)}
  text = jax.jit(lambda p: jaxprune.prune(p, "l1_unstructured", amount=0.5)).lower(abstract).compile().as_text()
  assert not re.findall(r"= u32\[8,4\]", text)
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(np.round(rng.standard_normal((4, 6)), 1), jnp.bfloat16),
            "b": jnp.asarray(np.round(rng.standard_normal((5, 3)), 1), jnp.float32),
            "c": jnp.asarray(rng.standard_normal((7,)), jnp.float16),
            "d": jnp.asarray([[1e-40, -1e-41], [0.0, -0.0], [np.nan, np.inf]], jnp.float32)}
  old = {k: jnp.asarray(rng.random(v.shape) < 0.8) for k, v in params.items()}
  every = lambda *_: True  # noqa: E731
  for masks in (None, old):
    for scores in (None, {k: v * 2 for k, v in params.items()}):
      pruned = jax.jit(lambda p, m, s: jaxprune.prune(p, "l1_unstructured", amount=0.4, masks=m, where=every,
                                                       importance_scores=s))(params, masks, scores)
      for k, x in params.items():
        own = jaxprune.l1_unstructured(x, 0.4, mask=None if masks is None else masks[k],
                                       importance_scores=None if scores is None else scores[k])
        np.testing.assert_array_equal(np.asarray(pruned[k]), np.asarray(own), err_msg=k)


def test_local_prune_of_a_model_is_one_selection():
  """A segment per leaf, one histogram per pass for all of them (8-bit digits past 16 segments)."""
  def passes(n_leaves):
    params = {f"w{i}": jax.ShapeDtypeStruct((8, 4), jnp.float32) for i in range(n_leaves)}
    text = jax.jit(lambda p: jaxprune.prune(p, "l1_unstructured", amount=0.5)).lower(params).as_text()
    return len(re.findall(r"\bscatter\b", text))
  assert passes(2) == passes(16) > 0
  assert passes(20) == passes(80) == 2 * passes(2)


def test_descend_counts_past_int32():
  """The merge of histogram counts is 64-bit: a bucket holding 3e9 keys (a LLaMA-7B of zeros) counts exactly."""
  with jax.enable_x64(True):
    hist = jnp.zeros((1, 8), jnp.int64).at[0, 2].set(3_000_000_000).at[0, 5].set(4_000_000_000)
    below, bucket, ties = selection.descend(hist, jnp.array([10], jnp.int64), jnp.array([3_500_000_000], jnp.int64))
    chex.assert_trees_all_equal((below, bucket, ties), (jnp.array([3_000_000_010]), jnp.array([5]),
                                                        jnp.array([4_000_000_000])))


def test_a_model_past_2_pow_32_entries_compiles_with_64_bit_counts_and_positions():
  """Abstract shapes only: 4.3e9 bf16 entries are lowered, never allocated."""
  params = {"a": jax.ShapeDtypeStruct((65536, 65536), jnp.bfloat16), "b": jax.ShapeDtypeStruct((16,), jnp.bfloat16)}
  text = jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5, where=lambda *_: True)).lower(params).as_text()
  assert "ui64" in text and "i64" in text  # positions and counts


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_16_bit_model_is_laid_out_in_16_bits(dtype):
  """The buffer of all leaves end to end holds 2 bytes an entry, never a widened f32 copy: XLA:CPU widens a 16-bit
  float concatenate to f32 (10 bytes an entry in all), so the leaves travel as their bits."""
  params = {f"l{i}": jax.ShapeDtypeStruct((1000, 1000 + i), dtype) for i in range(3)}
  total = sum(1000 * (1000 + i) for i in range(3))
  text = jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5)).lower(params).compile().as_text()
  laid_out = re.findall(rf"= (\w+)\[{total}\]\S* concatenate\(", text)
  assert laid_out and set(laid_out) <= {"u16", "bf16", "f16"}, laid_out


def test_subnormal_magnitudes_rank_exactly_like_torch():
  """XLA:CPU flushes subnormals in float arithmetic; keys come from the bits, so 4.67e-40 is the smallest."""
  w = np.array([-7.24e-40, 6.97e-40, -4.67e-40, -7.64e-40, 6.00e-40], np.float32)
  module = holder(w)
  tprune.l1_unstructured(module, "weight", amount=0.24)
  expected = module.weight_mask.numpy() != 0
  np.testing.assert_array_equal(jaxprune.l1_unstructured(jnp.asarray(w), 0.24), expected)
  np.testing.assert_array_equal(jaxprune.global_unstructured({"w": jnp.asarray(w)}, 0.24, where="w")["w"], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16", np.float16])
def test_keys_order_subnormals_zeros_infinities_and_nan(dtype):
  values = np.array([np.nan, np.inf, 1.0, 1e-40, 0.0, -0.0, -1e-40, -1.0, -np.inf]).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    keys = np.asarray(selection.sortable_keys(jnp.asarray(values)))
  finite = values[~np.isnan(values.astype(np.float64))].astype(np.float64)
  # Strictly decreasing except where the dtype rounds the values together (+-0.0 always, +-1e-40 in float16).
  assert keys[0] > keys[1]  # NaN above +inf
  for a, b, (x, y) in zip(keys[1:-1], keys[2:], zip(finite[:-1], finite[1:])):
    assert (a > b) if x > y else (a == b)


def test_per_leaf_amounts_as_a_pytree_or_a_function():
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
            "c": jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)}
  amounts = {"a": 0.5, "b": 3, "c": None}
  by_tree = jaxprune.prune(params, "l1_unstructured", amount=amounts)
  by_fn = jaxprune.prune(params, "l1_unstructured", amount=lambda path, leaf: amounts[path])
  for masks in (by_tree, by_fn):
    np.testing.assert_array_equal(masks["a"], jaxprune.l1_unstructured(params["a"], 0.5))
    np.testing.assert_array_equal(masks["b"], jaxprune.l1_unstructured(params["b"], 3))
    assert masks["c"] is jaxprune.UNMASKED
  structured = jaxprune.prune(params, "ln_structured", amount={"a": 2, "b": 0.25, "c": 1}, n=1, axis=-1)
  for name, amount in (("a", 2), ("b", 0.25), ("c", 1)):
    np.testing.assert_array_equal(structured[name], jaxprune.ln_structured(params[name], amount, 1, -1))


def test_per_leaf_amounts_trace_without_recompiling():
  params = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.arange(8.0).reshape(2, 4)}
  step = jax.jit(lambda p, a, b: jaxprune.prune(p, "l1_unstructured", amount={"a": a, "b": b}))
  for a, b in ((1, 2), (5, 7), (0, 8)):
    masks = step(params, a, b)
    assert int((~masks["a"]).sum()) == a and int((~masks["b"]).sum()) == b
  assert step._cache_size() == 1


def test_a_count_above_what_is_left_names_the_leaf():
  with pytest.raises(ValueError, match=r"^b: amount=9 should be smaller than the number of parameters to prune=8$"):
    jaxprune.prune({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 4))}, "l1_unstructured", amount={"a": 1, "b": 9})


@pytest.mark.parametrize("n_leaves", [1, 3, 40])
def test_eager_host_layout_equals_the_jitted_program(n_leaves):
  """On CPU arrays the eager call lays leaves end to end on the host (padded to a shared size): same masks."""
  rng = np.random.default_rng(n_leaves)
  params = {f"w{i:02d}": jnp.asarray(np.round(rng.standard_normal((3 + i % 4, 5)), 1), jnp.float32)
            for i in range(n_leaves)}
  masks = jaxprune.global_unstructured(params, 0.3)
  masks = jaxprune.global_unstructured(params, 0.5, masks=masks)  # ties at every threshold, old masks
  jitted = jax.jit(lambda p: jaxprune.global_unstructured(
      p, 0.5, masks=jaxprune.global_unstructured(p, 0.3)))(params)
  chex.assert_trees_all_equal(masks, jitted)
  n = sum(x.size for x in jax.tree.leaves(params))
  first = round(0.3 * n)
  assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == first + round(0.5 * (n - first))


@pytest.mark.parametrize("shape", [(1000, 640), (10_007,), (96, 7, 24), (3, 0), ()])
def test_counts_of_flags_are_exact_and_hold_no_wide_copy(shape):
  """XLA:CPU converts every flag of a long sum to the sum's dtype first and holds the copy: an int64 count of 640k
  flags held 5 MiB. Counted in uint8 over short groups first, at most a byte a flag is held (prime-length axes,
  which have no such group, are counted plainly)."""
  flags = np.random.default_rng(len(shape)).random(shape) < 0.3
  count = jax.jit(selection.count_true)
  assert int(count(flags)) == int(flags.sum())
  assert int(jax.jit(lambda f: selection.count_true(f, jnp.int32))(flags)) == int(flags.sum())
  if flags.size > 100_000 and shape[-1] % 8 == 0:
    with jax.enable_x64(True):
      temp = count.lower(jax.ShapeDtypeStruct(shape, jnp.bool_)).compile().memory_analysis().temp_size_in_bytes
    assert temp <= flags.size


def test_a_global_prune_with_masks_holds_about_what_one_without_holds():
  """Counting the live entries (to turn the amount into a count) held an int64 copy of every mask: 15.7 bytes of
  scratch an entry with masks against 8.1 without. The masks laid end to end add one byte an entry."""
  params = {f"w{i}": jax.ShapeDtypeStruct((500, 1000), jnp.float32) for i in range(4)}
  masks = {k: jax.ShapeDtypeStruct(v.shape, jnp.bool_) for k, v in params.items()}
  n = 4 * 500 * 1000
  with_masks = jax.jit(lambda p, m: jaxprune.global_unstructured(p, 0.5, masks=m)).lower(params, masks).compile()
  without = jax.jit(lambda p: jaxprune.global_unstructured(p, 0.5)).lower(params).compile()
  extra = with_masks.memory_analysis().temp_size_in_bytes - without.memory_analysis().temp_size_in_bytes
  assert extra <= 1.5 * n


def test_eager_calls_on_new_small_shapes_compile_no_new_selection():
  """Small CPU arrays are ranked in a padded buffer: a method called eagerly on shape after shape compiles the
  selection once, where each shape used to cost a compile (about 0.45 s), and gives the jitted program's masks."""
  rng = np.random.default_rng(0)
  shapes = [(3,), (4, 5), (2, 3, 4), (7, 7), (1, 9, 2), (30, 30)]
  x = [jnp.asarray(np.round(rng.standard_normal(s), 1), jnp.float32) for s in shapes]
  jaxprune.l1_unstructured(x[0], 0.5)
  before = selection._smallest._cache_size()
  for a in x[1:]:
    mask = jaxprune.l1_unstructured(a, 0.4, mask=a > -1)
    chex.assert_trees_all_equal(mask, jax.jit(lambda a: jaxprune.l1_unstructured(a, 0.4, mask=a > -1))(a))
  assert selection._smallest._cache_size() == before


def test_eager_random_draws_on_new_shapes_compile_nothing_new_and_equal_the_jitted_ones():
  """Draws of a padded 1-d size cut to the shape are the shape's own draws (partitionable threefry), so an eager
  random_unstructured on a new shape reuses the draw program, and its mask is the jitted call's."""
  shapes = [(3,), (2, 3, 4), (30, 30)]
  keys = [jax.random.key(1), jax.random.PRNGKey(2), jax.random.fold_in(jax.random.key(3), 4)]
  jaxprune.random_unstructured(keys[0], jnp.ones((2, 2)), 0.5)
  before = jaxprune.methods._padded_uniform_keys._cache_size()
  for shape in shapes:
    for key in keys:
      x = jnp.ones(shape)
      mask = jaxprune.random_unstructured(key, x, 0.4, mask=x > 0)
      chex.assert_trees_all_equal(mask, jax.jit(lambda k, x: jaxprune.random_unstructured(k, x, 0.4, mask=x > 0))(
          key, x))
  assert jaxprune.methods._padded_uniform_keys._cache_size() <= before + 1  # uint32 keys: a second key type


def test_eager_masks_land_on_the_device_of_their_array():
  x = jax.device_put(jnp.arange(12.0).reshape(3, 4), jax.devices()[3])
  for mask in (jaxprune.l1_unstructured(x, 0.5), jaxprune.ln_structured(x, 1, 2, 0)):
    assert mask.devices() == {jax.devices()[3]}
    assert int((~mask).sum()) in (6, 4)


def test_global_includes_a_masked_leaf_that_default_where_skips():
  """A 1-d weight pruned earlier takes part in a later global prune, as in torch's global prune over it."""
  w = {"kernel": jnp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), jnp.float32),
       "bias": jnp.asarray([0.05, -0.9, 0.3, 0.01], jnp.float32)}
  masks = {"kernel": jaxprune.UNMASKED, "bias": jaxprune.l1_unstructured(w["bias"], 1)}
  out = jaxprune.global_unstructured(w, 0.5, masks=masks)
  assert jaxprune.is_masked(out["bias"]) and not bool(out["bias"][3])
  torch_params = [holder(np.asarray(w["kernel"])), holder(np.asarray(w["bias"]))]
  tprune.l1_unstructured(torch_params[1], "weight", amount=1)
  tprune.global_unstructured([(m, "weight") for m in torch_params], tprune.L1Unstructured, amount=0.5)
  np.testing.assert_array_equal(out["kernel"], torch_params[0].weight_mask.numpy() != 0)
  np.testing.assert_array_equal(out["bias"], torch_params[1].weight_mask.numpy() != 0)


def test_small_bad_inputs_get_clear_errors():
  with pytest.raises(TypeError, match="mask_to_apply"):
    jaxprune.custom_from_mask(jnp.ones(3), None)
  for shape in ((2.5, 2), (True, 2)):
    with pytest.raises(ValueError, match="block_shape must hold integers"):
      jaxprune.block_structured(jnp.ones((4, 4)), 0.5, shape)
  with pytest.raises(ValueError, match=r"invalid `where` pattern '\(kernel'"):
    jaxprune.init_masks({"w": jnp.ones((2, 2))}, "(kernel")
  with pytest.raises(TypeError, match="optax GradientTransformation"):
    jaxprune.masked_optimizer("adam")


@pytest.mark.parametrize("seed", range(8))
def test_torch_and_jaxprune_agree_with_bits_and_counts_on_a_float16_model(seed):
  """float16 holds ~1,000 values per binade, so 2,112 weights tie often: where a tie straddles the threshold torch's
  pick is libstdc++'s (spec §4, about one draw in eight here), every other entry and the count must agree."""
  x = torch.randn(64, 33, generator=torch.Generator().manual_seed(seed)).half()
  module = holder(x.numpy(), "float16")
  tprune.l1_unstructured(module, "weight", amount=0.37)
  assert_same_up_to_ties(jaxprune.l1_unstructured(jnp.asarray(x.numpy()), 0.37), module.weight_mask.numpy() != 0,
                         np.abs(x.float().numpy()))


def test_vmap_over_stacked_layers_equals_each_layer_on_its_own():
  """Scan-over-layers models hold one stacked array: vmapping a method over it, with a count per layer and ties at
  every threshold, gives each layer's own mask."""
  stacked = jnp.round(jax.random.normal(jax.random.key(0), (3, 6, 5)), 0)
  counts = jnp.array([3, 10, 17])
  masks = jax.vmap(jaxprune.l1_unstructured)(stacked, counts)
  for layer, count, mask in zip(stacked, counts, masks):
    np.testing.assert_array_equal(mask, jaxprune.l1_unstructured(layer, int(count)))
