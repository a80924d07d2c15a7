"""Sparsity schedules (jaxprune.schedules): the published formulas, jittability, and torch's compounding (spec §5.2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from hypothesis import given
from hypothesis import strategies as st

from jaxprune import schedules

STEPS = np.arange(0, 130)


def _values(schedule, steps=STEPS):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)), np.float64)


def _zhu_gupta(t, s_i, s_f, begin, end, freq):
  """Zhu & Gupta (2017) eq. 1 in float64, held between pruning steps t0 + k*dt and reaching s_f at t0 + n*dt."""
  if t < begin:
    return 0.0
  last = end if t >= end else begin + (t - begin) // freq * freq
  progress = 1.0 if last >= end else (last - begin) / (end - begin)
  return s_f + (s_i - s_f) * (1.0 - progress) ** 3


@given(s_i=st.floats(0, 1), s_f=st.floats(0, 1), begin=st.integers(0, 40), span=st.integers(0, 70),
       freq=st.integers(1, 25))
def test_polynomial_is_zhu_gupta(s_i, s_f, begin, span, freq):
  """The polynomial schedule equals the paper's formula at every step, jitted and vmapped over the step."""
  end = begin + span
  got = _values(schedules.polynomial(s_f, begin, end, freq, initial_sparsity=s_i))
  want = np.array([_zhu_gupta(t, s_i, s_f, begin, end, freq) for t in STEPS])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@given(s_f=st.floats(0.05, 1), begin=st.integers(0, 40), span=st.integers(1, 70), freq=st.integers(1, 25))
def test_polynomial_changes_only_at_pruning_steps_and_never_decreases(s_f, begin, span, freq):
  end = begin + span
  values = _values(schedules.polynomial(s_f, begin, end, freq))
  changes = set(np.flatnonzero(np.diff(values) != 0) + 1)
  pruning_steps = set(range(begin, end, freq)) | {end}
  assert changes <= pruning_steps
  assert np.all(np.diff(values) >= 0)
  assert values[end] == np.float32(s_f) and values[:begin].sum() == 0


def test_one_shot_and_constant():
  values = _values(schedules.one_shot(0.75, step=10))
  assert (values[:10] == 0).all() and (values[10:] == 0.75).all()
  assert (_values(schedules.constant(0.3)) == np.float32(0.3)).all()
  assert schedules.as_schedule(0.3)(7) == schedules.constant(0.3)(7)


def test_user_callables_pass_through_unchanged():
  fn = lambda step: jnp.minimum(step / 100.0, 0.5)  # noqa: E731
  assert schedules.as_schedule(fn) is fn


@pytest.mark.parametrize("amount,every,begin,rounds", [(0.2, 10, 5, None), (0.5, 7, 0, 3), (0.35, 1, 2, 6)])
def test_iterative_compounds_on_the_remaining_weights(amount, every, begin, rounds):
  """After r rounds the sparsity is 1 - (1 - a)^r, rounds at begin, begin + every, ... (capped at `rounds`)."""
  values = _values(schedules.iterative(amount, every, begin=begin, rounds=rounds))
  for t, v in zip(STEPS, values):
    done = 0 if t < begin else (t - begin) // every + 1
    done = done if rounds is None else min(done, rounds)
    np.testing.assert_allclose(v, 1 - (1 - amount) ** done, atol=2e-6)


@pytest.mark.parametrize("n,amount", [(100, 0.2), (257, 0.3), (1000, 0.15), (64, 0.5)])
def test_iterative_matches_torch_repeated_pruning(n, amount):
  """torch prunes round(a * remaining) each round (spec §2.2, §5.2); the cumulative target rounds once, so the
  pruned count after r rounds is within one entry per round of torch's, and equal after the first round."""
  schedule = schedules.iterative(amount, every=1)
  module = torch.nn.Module()
  module.weight = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)))
  for r in range(1, 8):
    tprune.l1_unstructured(module, "weight", amount=amount)
    torch_pruned = int((module.weight_mask == 0).sum())
    ours = round(float(schedule(r - 1)) * n)
    assert abs(ours - torch_pruned) <= r - 1, (r, ours, torch_pruned)


@pytest.mark.parametrize("make,message", [
    (lambda: schedules.one_shot(1.5), "sparsity"),
    (lambda: schedules.one_shot(0.5, step=-1), "step"),
    (lambda: schedules.polynomial(0.9, begin=10, end=5), "end"),
    (lambda: schedules.polynomial(0.9, 0, 10, frequency=0), "frequency"),
    (lambda: schedules.polynomial(0.9, 0, 10, initial_sparsity=-0.1), "initial_sparsity"),
    (lambda: schedules.iterative(0.2, every=0), "every"),
    (lambda: schedules.iterative(True, every=3), "amount"),
])
def test_bad_arguments_name_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_as_schedule_rejects_non_numbers():
  with pytest.raises(TypeError, match="schedule must be"):
    schedules.as_schedule("0.5")
