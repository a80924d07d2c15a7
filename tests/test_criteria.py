"""Gradient criteria (jaxprune.criteria) against direct numpy computations, through every method that takes
importance scores. Values are small integers held in float32, so every score is exact and ties are frequent:
the tie rule (lowest position pruned first) is checked, not avoided."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from jaxprune import criteria

SHAPE = (6, 8)


def _ints(rng, shape, low=-3, high=4):
  return rng.integers(low, high, shape).astype(np.float32)


def lowest_first(scores: np.ndarray, k: int) -> np.ndarray:
  """The reference selection: the k lowest scores pruned, ties by lowest flat position (a stable sort)."""
  pruned = np.zeros(scores.size, bool)
  pruned[np.argsort(scores.ravel(), kind="stable")[:k]] = True
  return pruned.reshape(scores.shape)


@pytest.fixture(scope="module")
def tree():
  rng = np.random.default_rng(0)
  params = {"a": _ints(rng, SHAPE), "b": _ints(rng, (4, 8))}
  grads = {name: _ints(rng, (5,) + w.shape) for name, w in params.items()}  # a batch of 5 gradients
  return params, grads


l1 = jax.jit(lambda w, k, s: jaxprune.l1_unstructured(w, k, importance_scores=s))


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, SHAPE[0] * SHAPE[1]))
def test_snip_is_abs_w_times_g_and_l1_prunes_its_lowest_first(seed, k):
  rng = np.random.default_rng(seed)
  w, g = _ints(rng, SHAPE), _ints(rng, SHAPE)
  scores = criteria.snip({"w": w}, {"w": g})["w"]
  np.testing.assert_array_equal(scores, np.abs(w * g))
  np.testing.assert_array_equal(~l1(w, jnp.int32(k), scores), lowest_first(np.abs(w * g), k))


def test_snip_of_a_batch_uses_the_mean_gradient(tree):
  params, grads = tree
  scores = criteria.snip(params, grads, batched=True)
  for name, w in params.items():
    np.testing.assert_allclose(scores[name], np.abs(w * grads[name].mean(0)), rtol=1e-6)


def test_snip_scores_drive_global_local_and_nm_pruning(tree):
  params, grads = tree
  g = {name: v[0] for name, v in grads.items()}
  ref = {name: np.abs(w * g[name]) for name, w in params.items()}
  scores = criteria.snip(params, g)
  # global: one ranking in leaf order ("a" then "b"), then row-major.
  k = 30
  flat = np.concatenate([ref["a"].ravel(), ref["b"].ravel()])
  pruned = lowest_first(flat, k)
  masks = jaxprune.global_unstructured(params, k, importance_scores=scores)
  np.testing.assert_array_equal(~masks["a"], pruned[:ref["a"].size].reshape(SHAPE))
  np.testing.assert_array_equal(~masks["b"], pruned[ref["a"].size:].reshape(4, 8))
  # local, through jaxprune.prune
  masks = jaxprune.prune(params, "l1_unstructured", amount=0.5, importance_scores=scores)
  for name, w in params.items():
    np.testing.assert_array_equal(~masks[name], lowest_first(ref[name], round(0.5 * w.size)))
  # 2:4 along the last axis: in each group of 4, the two lowest pruned, the lower index first among ties
  mask = jaxprune.nm_structured(params["a"], 2, 4, importance_scores=scores["a"])
  groups = ref["a"].reshape(-1, 4)
  expected = np.stack([~lowest_first(row, 2) for row in groups]).reshape(SHAPE)
  np.testing.assert_array_equal(mask, expected)


def test_taylor_scores_channels_by_the_squared_sum_of_w_times_g(tree):
  params, grads = tree
  w, gb = params["a"], grads["a"]
  single = criteria.taylor(params, {n: v[0] for n, v in grads.items()}, axis=-1)["a"]
  batched = criteria.taylor(params, grads, axis=0, batched=True)["a"]
  per_out = (w * gb[0]).sum(axis=0) ** 2  # one score per column (axis -1)
  per_row = ((w * gb).sum(axis=2) ** 2).mean(axis=0)  # axis 0, averaged over the batch of gradients
  np.testing.assert_array_equal(single, np.broadcast_to(per_out, SHAPE))
  np.testing.assert_allclose(batched, np.broadcast_to(per_row[:, None], SHAPE), rtol=1e-6)
  # ln_structured with n=inf ranks the channels exactly by their Taylor score
  mask = jaxprune.ln_structured(w, 3, np.inf, axis=-1, importance_scores=single)
  np.testing.assert_array_equal(~mask[0], lowest_first(per_out, 3))
  assert criteria.taylor({"s": jnp.float32(1)}, {"s": jnp.float32(2)}) == {"s": None}


def test_movement_scores_accumulate_minus_w_g_and_prune_lowest_first():
  rng = np.random.default_rng(1)
  ws = [_ints(rng, SHAPE) for _ in range(3)]
  gs = [_ints(rng, SHAPE) for _ in range(3)]
  opt = optax.chain(criteria.track_movement(), optax.sgd(0.1))
  state = opt.init({"w": ws[0]})
  for w, g in zip(ws, gs):
    _, state = opt.update({"w": g}, state, {"w": w})
  expected = -sum(w * g for w, g in zip(ws, gs))
  np.testing.assert_array_equal(state[0].scores["w"], expected)
  keys = criteria.movement_scores(state)
  np.testing.assert_array_equal(~l1(ws[-1], jnp.int32(20), keys["w"]), lowest_first(expected, 20))
  # signed scores through a global ranking, too
  masks = jaxprune.global_unstructured({"w": ws[-1]}, 20, importance_scores=keys)
  np.testing.assert_array_equal(~masks["w"], lowest_first(expected, 20))


def test_movement_inside_the_masked_optimizer_and_its_errors():
  w = jnp.arange(1.0, 9.0).reshape(2, 4)
  masks = {"w": jnp.array([[True, False, True, True], [True, True, True, False]])}
  opt = jaxprune.masked_optimizer(optax.chain(criteria.track_movement(), optax.sgd(0.1)), masks)
  state = opt.init({"w": w})
  _, state = opt.update({"w": jnp.ones_like(w)}, state, {"w": w})
  scores = state.inner_state[0].scores["w"]
  np.testing.assert_array_equal(scores, np.where(masks["w"], -np.asarray(w), 0))  # pruned: no gradient, no move
  with pytest.raises(ValueError, match="exactly one"):
    criteria.movement_scores(optax.sgd(0.1).init({"w": w}))
  with pytest.raises(ValueError, match="params"):
    criteria.track_movement().update({"w": w}, criteria.track_movement().init({"w": w}))
