"""Sparsity schedules: plain functions of the step, like optax schedules.

A sparsity schedule maps the optimizer step ``t`` (a Python int or a traced integer scalar) to the target
*sparsity*: the fraction of the selected weights (entries, or channels for structured methods) that should be
pruned in total by then. It is cumulative, so :func:`jaxprune.scheduled_pruning` prunes exactly
``round(schedule(t) * n)`` units at step ``t`` (torch's rounding), and it only ever adds to what is already
pruned. Pruning happens at the steps where the value rises, so piecewise-constant schedules (all of the ones
below) prune only at their boundaries.

Any callable ``step -> sparsity`` is a schedule, so user schedules need no wrapping; :func:`as_schedule` also
accepts a plain number (constant sparsity).
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

Schedule = Callable[[Union[int, jax.Array]], jax.Array]
ScheduleLike = Union[Schedule, float]


def _check_sparsity(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _check_step(name: str, value, minimum: int = 0) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def one_shot(sparsity: float, step: int = 0) -> Schedule:
  """Prunes to ``sparsity`` once, at ``step``.

  Examples:
    >>> s = jaxprune.schedules.one_shot(0.8, step=100)
    >>> float(s(99)), float(s(100))
    (0.0, 0.8)

  Args:
    sparsity: the target fraction of pruned weights, in [0, 1].
    step: the step at which the pruning happens.

  Returns:
    A function mapping the step to the target sparsity.
  """
  _check_sparsity("sparsity", sparsity)
  _check_step("step", step)
  return lambda t: jnp.where(jnp.asarray(t) >= step, jnp.float32(sparsity), jnp.float32(0.0))


def constant(sparsity: float) -> Schedule:
  """Holds ``sparsity`` from the first step on: a one-shot pruning at step 0.

  Args:
    sparsity: the target fraction of pruned weights, in [0, 1].

  Returns:
    A function mapping the step to the target sparsity.
  """
  return one_shot(sparsity, step=0)


def iterative(amount: float, every: int, *, begin: int = 0, rounds: Optional[int] = None) -> Schedule:
  r"""Iterative pruning (Han et al. 2015): prune ``amount`` of the *remaining* weights every ``every`` steps.

  Round ``r = 1, 2, ...`` happens at step ``begin + (r - 1) * every`` and the amounts compound on what is
  left, as repeated ``torch.nn.utils.prune`` calls do (spec §5.2), so after ``r`` rounds the sparsity is

  .. math::
    s_r = 1 - (1 - a)^r.

  torch rounds the count of every round separately (``round(a * remaining)``); here the cumulative target
  ``s_r`` is rounded once, so after several rounds the count can differ from torch's by an entry or two
  (never more than one entry per round).

  Args:
    amount: the fraction of the remaining weights pruned in each round, in [0, 1].
    every: steps between rounds (the fine-tuning phase), >= 1.
    begin: the step of the first round.
    rounds: how many rounds in total; ``None`` keeps pruning forever.

  Returns:
    A function mapping the step to the target sparsity.
  """
  _check_sparsity("amount", amount)
  _check_step("every", every, 1)
  _check_step("begin", begin)
  if rounds is not None:
    _check_step("rounds", rounds)

  def schedule(t):
    t = jnp.asarray(t, jnp.int32)
    done = jnp.where(t >= begin, (t - begin) // every + 1, 0)
    if rounds is not None:
      done = jnp.minimum(done, rounds)
    return 1.0 - jnp.float32(1.0 - amount) ** done.astype(jnp.float32)

  return schedule


def polynomial(final_sparsity: float, begin: int, end: int, frequency: int = 1, *,
               initial_sparsity: float = 0.0, power: float = 3.0) -> Schedule:
  r"""Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

  Pruning happens every ``frequency`` steps from ``begin`` (where the sparsity jumps to ``initial_sparsity``)
  to ``end`` (where it reaches ``final_sparsity`` and stays):

  .. math::
    s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{n \Delta t}\right)^3,
    \quad t \in \{t_0, t_0 + \Delta t, \dots, t_0 + n \Delta t\},

  with :math:`t_0` = ``begin``, :math:`\Delta t` = ``frequency`` and :math:`t_0 + n \Delta t` = ``end``.
  Between pruning steps the value holds, and before ``begin`` it is 0. If ``end - begin`` is not a multiple
  of ``frequency``, ``end`` is one more pruning step, so the final sparsity is always reached at ``end``.

  Args:
    final_sparsity: :math:`s_f`, in [0, 1].
    begin: the first pruning step.
    end: the last pruning step, >= ``begin``.
    frequency: steps between pruning steps, >= 1.
    initial_sparsity: :math:`s_i`, in [0, 1].
    power: the exponent (3 in the paper).

  Returns:
    A function mapping the step to the target sparsity.
  """
  _check_sparsity("final_sparsity", final_sparsity)
  _check_sparsity("initial_sparsity", initial_sparsity)
  _check_step("begin", begin)
  _check_step("end", end, begin)
  _check_step("frequency", frequency, 1)
  span = max(end - begin, 1)  # end == begin: a one-shot at begin (progress is 1 there)

  def schedule(t):
    t = jnp.asarray(t, jnp.int32)
    # The value only changes at pruning steps: quantise t down to the last one.
    last = jnp.where(t >= end, end, begin + (t - begin) // frequency * frequency)
    progress = jnp.where(last >= end, 1.0, (last - begin).astype(jnp.float32) / span)
    value = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
    return jnp.where(t >= begin, value, 0.0).astype(jnp.float32)

  return schedule


def as_schedule(schedule: ScheduleLike) -> Schedule:
  """A schedule from a callable (returned as is) or a number (a :func:`constant` sparsity)."""
  if callable(schedule):
    return schedule
  if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
    return constant(float(schedule))
  raise TypeError(f"schedule must be a callable step -> sparsity or a float in [0, 1], got {schedule!r}")
