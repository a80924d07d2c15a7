"""Everything jits: same masks jitted and eager, traced amounts, and no recompilation when the amount changes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune

X = jax.random.normal(jax.random.key(0), (16, 12))
PARAMS = {"a": {"kernel": X}, "b": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 4, 8)), "bias": jnp.ones(8)}}


@pytest.mark.parametrize("method,kwargs", [
    ("l1_unstructured", {}), ("ln_structured", {"n": 2, "axis": 0}), ("ln_structured", {"n": 1, "axis": -1}),
    ("block_structured", {"block_shape": (4, 4)})])
def test_traced_amount_same_as_eager_without_recompiling(method, kwargs):
  fn = getattr(jaxprune, method)
  jitted = jax.jit(lambda x, amount, mask: fn(x, amount, mask=mask, **kwargs))
  mask = jaxprune.l1_unstructured(X, 0.25)
  for amount in [0.0, 0.1, 0.3, 0.5, 0.75, 1.0]:
    np.testing.assert_array_equal(jitted(X, amount, mask), fn(X, amount, mask=mask, **kwargs))
  for count in [0, 1, 3]:  # an int amount traces as an int32 count: one more compilation, then none
    np.testing.assert_array_equal(jitted(X, count, mask), fn(X, count, mask=mask, **kwargs))
  assert jitted._cache_size() == 2


AMOUNTS = [0.3, 0.1, 0.5, 0.7, 0.35, 0.45, 0.05, 0.15]


@pytest.mark.parametrize("size", [5, 15])
def test_constant_amount_under_jit_rounds_like_torch(size):
  """Python floats stay doubles: round(0.3 * 5) with 0.3 * 5 = 1.5 after double rounding gives 2 (spec §2.2)."""
  for amount in AMOUNTS:
    jitted = jax.jit(lambda x, m: jnp.sum(~jaxprune.l1_unstructured(x, amount, mask=m)))
    assert int(jitted(jnp.arange(1.0, size + 1), jnp.ones(size, bool))) == round(amount * size)


@pytest.mark.parametrize("size", [5, 10, 15, 25])
def test_traced_float32_amount_rounds_its_exact_value(size):
  """A traced amount is float32 when x64 is off: k = round(double(float32(amount)) * size), half to even."""
  jitted = jax.jit(lambda x, a, m: jnp.sum(~jaxprune.l1_unstructured(x, a, mask=m)))
  for amount in AMOUNTS:
    expected = round(float(np.float32(amount)) * size)
    assert int(jitted(jnp.arange(1.0, size + 1), np.float32(amount), jnp.ones(size, bool))) == expected


def test_global_unstructured_jits_with_traced_amount_and_masks():
  jitted = jax.jit(lambda p, a, m: jaxprune.global_unstructured(p, a, masks=m))
  masks = jaxprune.init_masks(PARAMS)
  for amount in [0.2, 0.5, 0.9]:
    chex_eq = jax.tree.map(np.array_equal, jitted(PARAMS, amount, masks),
                           jaxprune.global_unstructured(PARAMS, amount, masks=masks))
    assert all(jax.tree.leaves(chex_eq))
  assert jitted._cache_size() == 1


def test_traced_amount_out_of_range_is_clipped():
  """A traced value cannot raise; it is clipped to [0, live] (eager calls raise instead)."""
  jitted = jax.jit(lambda a: jaxprune.l1_unstructured(X, a, mask=jnp.ones(X.shape, bool)))
  assert not jitted(jnp.int32(10_000)).any()
  assert jitted(jnp.int32(-5)).all()


def test_nm_and_custom_methods_jit():
  nm = jax.jit(lambda x: jaxprune.nm_structured(x, 2, 4))
  np.testing.assert_array_equal(nm(X), jaxprune.nm_structured(X, 2, 4))

  @jaxprune.pruning_method("unstructured")
  def every_other(t, default_mask):
    return default_mask.ravel().at[::2].set(False).reshape(default_mask.shape)

  mask = jaxprune.l1_unstructured(X, 0.5)
  np.testing.assert_array_equal(jax.jit(lambda x, m: every_other(x, mask=m))(X, mask), every_other(X, mask=mask))
