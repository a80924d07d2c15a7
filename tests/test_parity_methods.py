"""Parity of every per-tensor method with torch.nn.utils.prune 2.13 (spec §2, §3, §5, §12).

Deterministic methods: masks identical, except among entries torch itself scores as tied (spec §4 leaves tie order
to libstdc++; jaxprune prunes the lowest index first, tested in test_selection.py). Random methods: exact counts and
structure, since torch's RNG stream cannot be reproduced.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprune
from torch_oracle import apply, assert_same_up_to_ties, channel_norms, holder

DTYPES = ["float32", "float16", "bfloat16"]
JAX_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
SHAPES = [(), (1,), (7,), (0, 3), (1, 1), (5, 4), (3, 4, 5), (2, 3, 4, 5), (6, 1, 3, 3)]


def _data(rng, shape, kind):
  if kind == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "ties":
    return rng.integers(-3, 4, size=shape).astype(np.float32)
  x = rng.normal(size=shape).astype(np.float32)
  flat = x.reshape(-1)
  if flat.size:
    flat[rng.integers(0, flat.size, size=max(1, flat.size // 5))] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
  return x


def _amounts(rng, size):
  floats = [0.0, 1.0, 0.3, 0.5, 0.7, 0.45, 0.05, float(rng.random())]
  ints = [0, size, int(rng.integers(0, size + 1))]
  return floats + ints


def _jnp(module_weight, dtype):
  return jnp.asarray(module_weight.detach().float().numpy()).astype(JAX_DTYPES[dtype])


def _unstructured_cases():
  rng = np.random.default_rng(0)
  for shape, dtype, kind in itertools.product(SHAPES, DTYPES, ["normal", "ties", "special"]):
    x = _data(rng, shape, kind)
    for amount in rng.choice(np.array(_amounts(rng, x.size), object), 4, replace=False):
      yield pytest.param(x, dtype, amount, id=f"{shape}-{dtype}-{kind}-{amount!r}")


@pytest.mark.parametrize("x,dtype,amount", list(_unstructured_cases()))
def test_l1_unstructured_matches_torch(x, dtype, amount):
  """spec §3.3: exactly k pruned by |x|, NaN ranked largest; amounts per §2.2 (round half to even)."""
  module = holder(x, dtype)
  scores = module.weight.detach().abs().float().numpy()
  w = _jnp(module.weight, dtype)
  theirs = apply(module, "l1_unstructured", amount=amount)
  ours = jaxprune.l1_unstructured(w, amount)
  assert ours.dtype == jnp.bool_ and ours.shape == w.shape
  assert_same_up_to_ties(ours, theirs, scores)


@pytest.mark.parametrize("x,dtype,amount", list(_unstructured_cases())[::7])
def test_random_unstructured_counts_match_torch(x, dtype, amount):
  """spec §3.2: a uniform random k-subset; only the count can match torch."""
  theirs = apply(holder(x, dtype), "random_unstructured", amount=amount)
  ours = jaxprune.random_unstructured(jax.random.key(1), jnp.asarray(x, JAX_DTYPES[dtype]), amount)
  assert int(ours.sum()) == int(theirs.sum())


def _structured_cases():
  rng = np.random.default_rng(1)
  norms = [1, 2, -1, 0, 0.5, 3, np.inf, -np.inf, None, "fro", "nuc"]
  for shape in [s for s in SHAPES if len(s) >= 2] + [(4, 6), (8, 3, 2)]:
    for dtype, kind in itertools.product(DTYPES, ["normal", "ties"]):
      x = _data(rng, shape, kind)
      for axis in rng.choice(np.arange(-len(shape), len(shape)), size=2, replace=False):
        axis = int(axis)
        n = norms[rng.integers(len(norms))]
        if n == "fro" and len(shape) > 3 or n == "nuc" and len(shape) != 3:
          n = 2
        for amount in rng.choice(np.array([0.0, 1.0, 0.5, 0.3, 0.7, 1, shape[axis]], object), 3, replace=False):
          yield pytest.param(x, dtype, amount, n, axis, id=f"{shape}-{dtype}-{kind}-ax{axis}-n{n}-{amount!r}")


def _kept_channels(mask, axis):
  """Per channel along ``axis``, whether it is kept; asserts that channels are kept or pruned whole."""
  mask = np.moveaxis(np.asarray(mask), axis, 0)
  per_channel = mask.reshape(mask.shape[0], int(np.prod(mask.shape[1:])))
  if per_channel.shape[1]:
    assert (per_channel.all(axis=1) | ~per_channel.any(axis=1)).all(), "structured masks prune whole channels"
  return per_channel.any(axis=1) if per_channel.shape[1] else np.ones(mask.shape[0], bool)


@pytest.mark.parametrize("x,dtype,amount,n,axis", list(_structured_cases()))
def test_ln_structured_matches_torch(x, dtype, amount, n, axis):
  """spec §3.5: keep the size-k channels of largest L-n norm; NaN norms kept."""
  module = holder(x, dtype)
  w = _jnp(module.weight, dtype)
  if n == "nuc" and dtype != "float32":  # torch has no half-precision SVD: rank its float32 copy instead
    module = holder(np.asarray(w.astype(jnp.float32)))
  try:
    norms = channel_norms(module.weight.detach(), n, axis)
    theirs = apply(module, "ln_structured", amount=amount, n=n, axis=axis)
  except (RuntimeError, ValueError) as err:  # e.g. the inf norm of an empty channel: torch refuses, so must we
    with pytest.raises(type(err)):
      jaxprune.ln_structured(w, amount, n, axis)
    return
  ours = jaxprune.ln_structured(w, amount, n, axis)
  rtol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[dtype]
  assert_same_up_to_ties(_kept_channels(ours, axis), _kept_channels(theirs, axis), norms, rtol=rtol)


@pytest.mark.parametrize("x,dtype,amount,n,axis", list(_structured_cases())[::9])
def test_random_structured_counts_match_torch(x, dtype, amount, n, axis):
  """spec §3.4: k random whole channels."""
  del n
  theirs = apply(holder(x, dtype), "random_structured", amount=amount, axis=axis)
  ours = jaxprune.random_structured(jax.random.key(2), jnp.asarray(x, JAX_DTYPES[dtype]), amount, axis)
  assert _kept_channels(ours, axis).sum() == _kept_channels(theirs, axis).sum()


@pytest.mark.parametrize("seed", range(12))
def test_custom_from_mask_matches_torch(seed):
  """spec §3.6: the mask is multiplied in; an earlier mask is kept."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  first, second = rng.random((4, 5)) < 0.6, rng.random((4, 5)) < 0.6
  module = holder(x)
  apply(module, "custom_from_mask", mask=torch.tensor(first))
  theirs = apply(module, "custom_from_mask", mask=torch.tensor(second.astype(np.float32)))
  ours = jaxprune.custom_from_mask(x, second.astype(np.float32), mask=jaxprune.custom_from_mask(x, first))
  np.testing.assert_array_equal(ours, theirs)


def test_identity_matches_torch():
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_array_equal(jaxprune.identity(x), apply(holder(x), "identity"))


STEPS = [("l1_unstructured", {"amount": 0.3}), ("l1_unstructured", {"amount": 2}),
         ("l1_unstructured", {"amount": 0.5}), ("ln_structured", {"amount": 0.5, "n": 2, "axis": 0}),
         ("ln_structured", {"amount": 1, "n": 1, "axis": -1}), ("ln_structured", {"amount": 0.34, "n": np.inf,
                                                                                  "axis": 1}),
         ("identity", {})]


def _sequences():
  rng = np.random.default_rng(3)
  for i in range(60):
    shape = [(4, 6), (5, 3, 2), (3, 4, 2, 2), (8, 8)][i % 4]
    steps = [STEPS[j] for j in rng.integers(0, len(STEPS), size=rng.integers(2, 5))]
    yield pytest.param(rng.normal(size=shape).astype(np.float32), steps, id=f"seq{i}")


@pytest.mark.parametrize("x,steps", list(_sequences()))
def test_iterative_pruning_matches_torch_container(x, steps):
  """spec §5.2: each new method sees only what is left; amounts are relative to it; masks only shrink."""
  module = holder(x)
  mask = None
  for name, kwargs in steps:
    try:
      theirs = apply(module, name, **kwargs)
    except ValueError as err:  # e.g. an int amount above the channels left: we must refuse it too
      with pytest.raises(ValueError):
        getattr(jaxprune, name)(x, mask=mask, **kwargs)
      assert "should be smaller" in str(err)
      return
    new = getattr(jaxprune, name)(x, mask=mask, **kwargs) if name != "identity" else mask
    new = jaxprune.identity(x) if new is None else new
    np.testing.assert_array_equal(new, theirs, err_msg=f"after {name}{kwargs}")
    if mask is not None:
      assert not (np.asarray(new) & ~np.asarray(mask)).any(), "a pruned entry came back"
    mask = new


def test_tutorial_sequence_on_lenet_conv1():
  """The PyTorch tutorial: random_unstructured 0.3 on weight, l1 3 on bias, then ln 0.5 n=2 dim=0 on weight.

  The random step can only match in count; feeding torch's random mask to jaxprune makes the deterministic
  step comparable bit for bit.
  """
  torch.manual_seed(0)
  conv = torch.nn.Conv2d(1, 6, 3)
  w, b = conv.weight.detach().numpy().copy(), conv.bias.detach().numpy().copy()
  torch.nn.utils.prune.random_unstructured(conv, "weight", amount=0.3)
  random_mask = conv.weight_mask.numpy() != 0
  ours_random = jaxprune.random_unstructured(jax.random.key(0), w, 0.3)
  assert ours_random.sum() == random_mask.sum() == w.size - round(0.3 * w.size)
  torch.nn.utils.prune.l1_unstructured(conv, "bias", amount=3)
  np.testing.assert_array_equal(jaxprune.l1_unstructured(b, 3), conv.bias_mask.numpy() != 0)
  torch.nn.utils.prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
  np.testing.assert_array_equal(jaxprune.ln_structured(w, 0.5, 2, 0, mask=random_mask), conv.weight_mask.numpy() != 0)


@pytest.mark.parametrize("seed", range(8))
def test_importance_scores_match_torch(seed):
  """spec §3.3/§3.5: importance scores replace the weight in the ranking, also inside a container."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  s1, s2 = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=x.shape).astype(np.float32)
  module = holder(x)
  torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.4, importance_scores=torch.tensor(s1))
  m1 = jaxprune.l1_unstructured(x, 0.4, importance_scores=s1)
  np.testing.assert_array_equal(m1, module.weight_mask.numpy() != 0)
  torch.nn.utils.prune.ln_structured(module, "weight", amount=2, n=1, dim=1, importance_scores=torch.tensor(s2))
  np.testing.assert_array_equal(jaxprune.ln_structured(x, 2, 1, 1, mask=m1, importance_scores=s2),
                                module.weight_mask.numpy() != 0)
