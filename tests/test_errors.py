"""Every invalid input torch.nn.utils.prune rejects, jaxprune rejects with the same exception type (spec §2, §12)."""
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune

import jaxprune
from torch_oracle import holder

X = np.arange(1.0, 13.0, dtype=np.float32).reshape(3, 4)


def _both_raise(torch_call, ours_call):
  with pytest.raises(Exception) as theirs:
    torch_call()
  with pytest.raises(type(theirs.value)):
    ours_call()


@pytest.mark.parametrize("amount", [1.1, 20.0, -10, -1e-9, float("inf"), -float("inf"), np.float64(1.5),
                                    np.int64(-1), "s", None, 1 + 0j, [0.5], 13, float("nan")])
@pytest.mark.parametrize("method", ["l1_unstructured", "ln_structured", "random_unstructured"])
def test_invalid_amounts(method, amount):
  """spec §2.1/§2.3: TypeError for non-numbers, ValueError for out-of-range or too large; nan fails in round()."""
  extra = {"n": 2, "dim": 0} if method == "ln_structured" else {}
  ours_extra = {"n": 2, "axis": 0} if method == "ln_structured" else {}
  args = (jax.random.key(0), X) if method.startswith("random") else (X,)
  _both_raise(lambda: getattr(tprune, method)(holder(X), "weight", amount=amount, **extra),
              lambda: getattr(jaxprune, method)(*args, amount, **ours_extra))


@pytest.mark.parametrize("amount", [0, 1, 12, 0.0, -0.0, 0.34, 1.0, np.int64(3), np.float32(0.5), Fraction(1, 3)])
def test_valid_amounts_are_accepted_and_counted_like_torch(amount):
  """spec §2.1: these pass torch's validation; the count follows §2.2 (np.float32 multiplies in float32)."""
  theirs = tprune.l1_unstructured(holder(X), "weight", amount=amount).weight_mask.numpy()
  ours = jaxprune.l1_unstructured(X, amount)
  np.testing.assert_array_equal(ours, theirs != 0)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_structured_on_1d_or_0d(shape):
  x = np.ones(shape, np.float32)
  _both_raise(lambda: tprune.ln_structured(holder(x), "weight", 0.5, n=2, dim=0),
              lambda: jaxprune.ln_structured(x, 0.5, 2, 0))
  _both_raise(lambda: tprune.random_structured(holder(x), "weight", 0.5, dim=0),
              lambda: jaxprune.random_structured(jax.random.key(0), x, 0.5, 0))


@pytest.mark.parametrize("axis", [2, 5, -3])
def test_axis_out_of_range(axis):
  """spec §12: IndexError for dim >= ndim and dim < -ndim."""
  _both_raise(lambda: tprune.ln_structured(holder(X), "weight", 0.5, n=2, dim=axis),
              lambda: jaxprune.ln_structured(X, 0.5, 2, axis))


def test_importance_scores_shape_mismatch():
  """spec §1.2 step 5: AssertionError; jaxprune's error is also a ValueError."""
  scores = np.ones((4, 3), np.float32)
  _both_raise(lambda: tprune.l1_unstructured(holder(X), "weight", 0.5, importance_scores=torch.tensor(scores)),
              lambda: jaxprune.l1_unstructured(X, 0.5, importance_scores=scores))
  with pytest.raises(ValueError, match=r"\(4, 3\) vs \(3, 4\)"):
    jaxprune.l1_unstructured(X, 0.5, importance_scores=scores)


def test_custom_mask_shape_mismatch():
  """spec §3.6: AssertionError in torch."""
  _both_raise(lambda: tprune.custom_from_mask(holder(X), "weight", torch.ones(4, 3)),
              lambda: jaxprune.custom_from_mask(X, np.ones((4, 3))))


@pytest.mark.parametrize("n,shape", [("fro", (2, 2, 2, 2)), ("nuc", (3, 4)), ("abc", (3, 4)), ("inf", (3, 4))])
def test_unsupported_norms(n, shape):
  """spec §3.5: 'fro' needs 2-3 dims, 'nuc' 3; other strings fail (RuntimeError)."""
  x = np.ones(shape, np.float32)
  _both_raise(lambda: tprune.ln_structured(holder(x), "weight", 0.5, n=n, dim=0),
              lambda: jaxprune.ln_structured(x, 0.5, n, 0))


def test_integer_tensor_with_ln():
  """spec §11: vector_norm needs floats (RuntimeError)."""
  module = torch.nn.Module()
  module.weight = torch.nn.Parameter(torch.arange(12).reshape(3, 4), requires_grad=False)
  _both_raise(lambda: tprune.ln_structured(module, "weight", 0.5, n=2, dim=0),
              lambda: jaxprune.ln_structured(jnp.arange(12).reshape(3, 4), 0.5, 2, 0))


def test_int_amount_above_remaining_in_a_container():
  """spec §2.3 inside a container: the count is of what is left."""
  module = holder(X)
  tprune.l1_unstructured(module, "weight", 10)
  mask = jaxprune.l1_unstructured(X, 10)
  _both_raise(lambda: tprune.l1_unstructured(module, "weight", 3), lambda: jaxprune.l1_unstructured(X, 3, mask=mask))


def test_bool_amounts_are_rejected():
  """torch accepts False and (for ln only) True by accident of bool being int; jaxprune refuses both."""
  with pytest.raises(TypeError, match="Invalid type for amount"):
    jaxprune.l1_unstructured(X, True)
  with pytest.raises(TypeError):
    jaxprune.ln_structured(X, False, 2, 0)


@pytest.mark.parametrize("bad", [np.full((3, 4), 0.5), np.full((3, 4), 2.0)])
def test_non_binary_masks_are_refused(bad):
  """torch would scale the weight by 0.5 (spec §3.6); a jaxprune mask is binary."""
  with pytest.raises(ValueError, match="binary"):
    jaxprune.custom_from_mask(X, bad)
  with pytest.raises(ValueError, match="binary"):
    jaxprune.l1_unstructured(X, 0.5, mask=bad)


def test_pytree_errors_name_the_leaf():
  params = {"encoder": {"kernel": jnp.ones((3, 4))}, "head": {"kernel": jnp.ones((5,))}}
  with pytest.raises(ValueError, match="^head/kernel: Structured pruning"):
    jaxprune.prune(params, "ln_structured", amount=0.5, n=2, axis=0, where="kernel")
  with pytest.raises(ValueError, match="^encoder/kernel: amount=13"):
    jaxprune.prune(params, "l1_unstructured", amount=13, where="encoder")
  with pytest.raises(ValueError, match="unknown pruning method 'l2'"):
    jaxprune.prune(params, "l2", amount=0.5)
