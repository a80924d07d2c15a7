"""Layer-wise budgets: ERK against RigL's formula (a plain float64 loop, as the paper's code computes it) on
ResNet-shaped layers, exact counts per layer for every budget, overrides, and traced sparsities under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune
from jaxprune import budgets

# ResNet-18's conv and fc kernels in Flax layout (kh, kw, in, out): one of each distinct shape, with the stem.
RESNET = {"conv1": (7, 7, 3, 64), "layer1": (3, 3, 64, 64), "layer2_down": (1, 1, 64, 128),
          "layer2": (3, 3, 128, 128), "layer2_in": (3, 3, 64, 128), "layer3": (3, 3, 256, 256),
          "layer4": (3, 3, 512, 512), "layer4_down": (1, 1, 256, 512), "fc": (512, 10)}
prune_to = jax.jit(budgets.prune_to, static_argnames="method")  # one compile per budget kind, not one per op
TINY = {"conv": (3, 3, 2, 4), "fc1": (32, 16), "fc2": (16, 4)}  # few leaves: each compiles its own selection
LENET = {"conv1": (5, 5, 1, 6), "conv2": (5, 5, 6, 16), "fc1": (400, 120), "fc2": (120, 84), "fc3": (84, 10)}


def _params(shapes):
  # NumPy zeros: budgets read only shapes, and eager jnp.zeros would compile once per shape
  return {name: {"kernel": np.zeros(shape, np.float32), "bias": np.zeros(shape[-1], np.float32)}
          for name, shape in shapes.items()}


def rigl_erk(shapes, sparsity, kernel=True, power=1.0):
  """RigL's get_sparsities_erdos_renyi: make the layer of largest raw density dense until eps fits."""
  dense = set()
  while True:
    divisor = rhs = 0.0
    raw = {}
    for name, shape in shapes.items():
      n = np.prod(shape, dtype=np.float64)
      if name in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1 - sparsity)
        dims = np.asarray(shape if kernel else shape[-2:], np.float64)
        raw[name] = (dims.sum() / dims.prod()) ** power
        divisor += raw[name] * n
    eps = rhs / divisor
    top = max(raw.values())
    if top * eps <= 1:
      return {name: 0.0 if name in dense else 1 - eps * raw[name] for name in shapes}
    dense |= {name for name, r in raw.items() if r == top}


def _kernels(budget):
  return {name: float(leaf["kernel"]) for name, leaf in budget.items()}


@pytest.mark.parametrize("shapes", [RESNET, LENET], ids=["resnet18", "lenet"])
@pytest.mark.parametrize("kernel", [True, False], ids=["erk", "er"])
def test_erk_matches_rigl_formula(shapes, kernel):
  params = _params(shapes)
  erk = jax.jit(lambda s: budgets.erk(params, s, kernel=kernel))  # traced sparsity: one compile for all
  for sparsity in (0.5, 0.8, 0.9, 0.95, 0.99):
    got = _kernels(erk(sparsity))
    want = rigl_erk(shapes, sparsity, kernel)
    assert got == pytest.approx(want, abs=2e-6), sparsity
    assert all(leaf["bias"] is None for leaf in erk(sparsity).values())
  assert erk._cache_size() == 1
  # The redistribution is exercised: at 90% ERK makes ResNet's fc and 1x1 downsample dense, ER its stem and fc.
  if shapes is RESNET:
    dense = {n for n, s in _kernels(erk(0.9)).items() if s == 0.0}
    assert dense == ({"layer2_down", "fc"} if kernel else {"conv1", "fc"})


def test_erk_keeps_the_target_fraction_and_power_scale_zero_is_uniform():
  params = _params(RESNET)
  sizes = {name: np.prod(shape) for name, shape in RESNET.items()}
  sparsities = _kernels(budgets.erk(params, 0.9))
  kept = sum((1 - sparsities[n]) * sizes[n] for n in sizes)
  assert kept == pytest.approx(0.1 * sum(sizes.values()), rel=1e-5)
  assert _kernels(budgets.erk(params, 0.7, power_scale=0.0)) == pytest.approx({n: 0.7 for n in RESNET})


def test_every_budget_prunes_exact_counts_per_layer():
  params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape), _params(TINY))
  everything = jax.tree.map(jnp.asarray, jaxprune.init_masks(params))  # UNMASKED as a jax array, as jit returns it
  for make in (budgets.uniform, budgets.erk):  # the budgets are traced arguments: one compile serves both
    budget = make(params, 0.9, overrides={"fc2": 0.5})
    counts = budgets.counts(params, budget)
    assert float(budget["fc2"]["kernel"]) == 0.5 and counts["fc2"]["bias"] is None
    masks = prune_to(params, budget, masks=everything)
    for name, shape in TINY.items():
      expected = round(float(np.float32(budget[name]["kernel"])) * int(np.prod(shape)))
      assert counts[name]["kernel"] == expected
      assert int(np.sum(~np.asarray(masks[name]["kernel"]))) == expected, name
      assert not jaxprune.is_masked(masks[name]["bias"])
    # from those masks: pruned entries count toward the target and stay pruned
    denser = make(params, 0.95)
    again = prune_to(params, denser, masks=masks)
    for name in TINY:
      before, after = np.asarray(masks[name]["kernel"]), np.asarray(again[name]["kernel"])
      assert not np.any(after & ~before)
      assert int(np.sum(~after)) == max(budgets.counts(params, denser)[name]["kernel"], int(np.sum(~before)))
  assert prune_to._cache_size() == 1


def test_random_masks_at_a_budget_and_the_errors():
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
  budget = budgets.uniform(params, 0.75)
  masks = prune_to(params, budget, "random_unstructured", key=jax.random.key(1))
  assert int(np.sum(~np.asarray(masks["w"]))) == 96 and not jaxprune.is_masked(masks["b"])
  with pytest.raises(ValueError, match="prune_to prunes entries"):
    budgets.prune_to(params, budget, "ln_structured")
  with pytest.raises(TypeError, match="key"):
    budgets.prune_to(params, budget, "random_unstructured")
  with pytest.raises(ValueError, match="amount"):
    budgets.erk(params, 1.5)


def test_overrides_are_left_out_of_the_distribution():
  params = _params(RESNET)
  budget = _kernels(budgets.erk(params, 0.9, overrides={"^fc": 0.0, "layer4": 0.99}))
  assert budget["fc"] == 0.0
  assert budget["layer4"] == pytest.approx(0.99, abs=1e-6) and budget["layer4_down"] == pytest.approx(0.99, abs=1e-6)
  rest = {n: s for n, s in RESNET.items() if n != "fc" and not n.startswith("layer4")}
  assert {n: budget[n] for n in rest} == pytest.approx(rigl_erk(rest, 0.9), abs=2e-6)
  uniform = budgets.uniform(params, 0.3, where="layer", overrides={"down": 0.6})
  assert uniform["conv1"]["kernel"] is None and float(uniform["layer1"]["kernel"]) == pytest.approx(0.3)
  assert float(uniform["layer2_down"]["kernel"]) == pytest.approx(0.6)


@settings(max_examples=20)
@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 64), st.integers(1, 64)),
                       min_size=4, max_size=4),  # four layers: the eager ops keep their shapes, compile once
       sparsity=st.floats(0.0, 1.0))
def test_erk_densities_are_fractions_and_match_the_loop(shapes, sparsity):
  named = {f"l{i}": s for i, s in enumerate(shapes)}
  got = _kernels(budgets.erk(_params(named), sparsity))
  assert all(0.0 <= s <= 1.0 for s in got.values())
  want = {n: min(max(s, 0.0), 1.0) for n, s in rigl_erk(named, sparsity).items()}
  assert got == pytest.approx(want, abs=1e-5)
