"""Hypothesis property tests: exact counts, masks only shrink, ties and NaN by the documented rule."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune import selection

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6), elements=floats)
# Few distinct values: ties at the threshold are the rule, not the exception.
tied = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=9),
                  elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, np.nan]))


def _reference_pruned(scores, live, k):
  """Brute force: live entries ordered by (is NaN, |value|, flat index); the first k are pruned."""
  flat, live = np.abs(scores.ravel().astype(np.float64)), live.ravel()
  order = sorted(np.flatnonzero(live), key=lambda i: (np.isnan(flat[i]), np.nan_to_num(flat[i], nan=0.0), i))
  pruned = np.zeros(flat.size, bool)
  pruned[order[:k]] = True
  return pruned.reshape(scores.shape)


@given(x=st.one_of(arrays, tied), data=st.data())
def test_l1_prunes_exactly_k_by_magnitude_nan_last_ties_lowest_index_first(x, data):
  live = data.draw(hnp.arrays(bool, x.shape))
  amount = data.draw(st.one_of(st.floats(0, 1), st.integers(0, int(live.sum()))))
  mask = jaxprune.l1_unstructured(x, amount, mask=live)
  k = amount if isinstance(amount, int) else round(amount * int(live.sum()))
  assert int((live & ~np.asarray(mask)).sum()) == k
  np.testing.assert_array_equal(~np.asarray(mask) & live, _reference_pruned(x, live, k))


@given(x=arrays, amounts=st.lists(st.floats(0, 1), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_iterative_masks_only_shrink_and_count_compounds(x, amounts, seed):
  """Each step prunes round(a * live) of the live entries (torch §5.2); nothing comes back."""
  mask = None
  for i, amount in enumerate(amounts):
    live = x.size if mask is None else int(np.asarray(mask).sum())
    if i % 2:
      new = jaxprune.random_unstructured(jax.random.key(seed + i), x, amount, mask=mask)
    else:
      new = jaxprune.l1_unstructured(x, amount, mask=mask)
    assert int(np.asarray(new).sum()) == live - round(amount * live)
    if mask is not None:
      assert not (np.asarray(new) & ~np.asarray(mask)).any()
    mask = new


@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5),
                    elements=st.floats(-10, 10, width=32)), data=st.data())
def test_structured_methods_prune_whole_live_channels(x, data):
  axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
  amount = data.draw(st.floats(0, 1))
  first = jaxprune.ln_structured(x, data.draw(st.floats(0, 1)), 1, (axis + 1) % x.ndim)
  mask = np.asarray(jaxprune.ln_structured(x, amount, 2, axis, mask=first))
  assert not (mask & ~np.asarray(first)).any()
  others = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
  live_before = np.asarray(first).any(axis=others)
  live_after = mask.any(axis=others)
  assert live_after.sum() == live_before.sum() - round(amount * live_before.sum())
  # A surviving channel keeps exactly what the old mask kept in it.
  keep = np.expand_dims(live_after, others)
  np.testing.assert_array_equal(mask, np.asarray(first) & keep)


@given(x=arrays, n=st.integers(0, 4), data=st.data())
def test_nm_keeps_at_most_n_of_every_m(x, n, data):
  m = data.draw(st.sampled_from([d for d in (1, 2, 3, 4, 6) if x.shape[-1] % d == 0]))
  n = min(n, m)
  live = data.draw(hnp.arrays(bool, x.shape))
  mask = np.asarray(jaxprune.nm_structured(x, n, m, mask=live))
  groups, live_groups = mask.reshape(-1, m), live.reshape(-1, m)
  np.testing.assert_array_equal(groups.sum(1), np.minimum(n, live_groups.sum(1)))
  assert not (mask & ~live).any()


@given(x=st.one_of(arrays, tied), data=st.data())
def test_global_equals_one_ranking_over_the_concatenation(x, data):
  """Splitting a tensor into leaves does not change which entries a global prune picks (flatten order = ties)."""
  flat = x.ravel()
  cut = data.draw(st.integers(0, flat.size))
  amount = data.draw(st.floats(0, 1))
  params = {"a": flat[:cut], "b": flat[cut:]}
  masks = jaxprune.global_unstructured(params, amount, where=lambda p, leaf: True)
  whole = np.asarray(jaxprune.l1_unstructured(flat, amount))
  np.testing.assert_array_equal(np.concatenate([masks["a"], masks["b"]]), whole)


@given(keys=hnp.arrays(np.uint32, st.integers(1, 300), elements=st.integers(0, 7)), data=st.data())
def test_selection_kernel_against_a_stable_sort(keys, data):
  k = data.draw(st.integers(0, keys.size))
  picked = np.asarray(selection.smallest([jnp.asarray(keys)], k)[0])
  expected = np.zeros(keys.size, bool)
  expected[np.argsort(keys, kind="stable")[:k]] = True
  np.testing.assert_array_equal(picked, expected)
