"""Pruning amounts, validated and rounded exactly as ``torch.nn.utils.prune`` does (spec §2).

An amount is a fraction (a float in [0, 1]) or a count (an int >= 0). Concrete Python/NumPy numbers are
validated eagerly with torch's messages and exception types. A ``jax.Array`` amount may be traced: its dtype says
whether it is a fraction (floating) or a count (integer), and it is clipped into range since a traced value cannot
raise. Either way the number of units to prune is ``round(amount * size)`` with Python's round-half-to-even on the
*double* product, the way torch computes it; inside ``jit`` that product is formed in float64 (see
:func:`num_to_prune`), so a schedule can change the amount without recompiling and still round like torch.

One caveat under ``jit`` with x64 off: a float amount passed *as an argument* arrives as float32, so ``0.1`` is
``0.10000000149`` and ``round(0.1 * 5)`` becomes 1 where torch's double gives 0 (half to even). Amounts exactly
representable in float32 (0.5, 0.25, 0.75, ...) are unaffected, and Python floats closed over by the jitted
function keep their double value.
"""
from __future__ import annotations

import numbers
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Amount = Union[int, float, np.number, jax.Array]
Count = Union[int, jax.Array]


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def validate_amount(amount: Amount) -> None:
  """Raises like torch's ``_validate_pruning_amount_init`` for an invalid amount.

  Booleans are rejected (torch accepts ``False`` and, for ``ln_structured`` only, ``True``, by accident of
  ``bool`` being an ``int``). ``nan`` is rejected here rather than later in ``round`` (torch: ``ValueError``).
  """
  if isinstance(amount, (jax.Array, np.ndarray)):
    if amount.ndim != 0 or not (jnp.issubdtype(amount.dtype, jnp.integer)
                                or jnp.issubdtype(amount.dtype, jnp.floating)):
      raise TypeError(f"Invalid type for amount: {amount!r}. Must be a scalar int or float array, "
                      f"got shape {amount.shape} dtype {amount.dtype}.")
    if _is_traced(amount):
      return
    amount = amount.item()
  if isinstance(amount, (bool, np.bool_)) or not isinstance(amount, numbers.Real):
    raise TypeError(f"Invalid type for amount: {amount!r}. Must be int or float.")
  if isinstance(amount, numbers.Integral):
    if amount < 0:
      raise ValueError(f"amount={amount} should either be a float in the range [0, 1] or a non-negative integer")
  elif not 0.0 <= float(amount) <= 1.0:  # also rejects nan
    raise ValueError(f"amount={amount} should either be a float in the range [0, 1] or a non-negative integer")


def _product_dtype(amount) -> np.dtype:
  # torch multiplies a Python float (a double) by the int size, but a NumPy float scalar in its own precision.
  return amount.dtype if isinstance(amount, np.floating) else np.dtype(np.float64)


def num_to_prune(amount: Amount, size: Count) -> Count:
  """The number of units to prune out of ``size`` (torch's ``_compute_nparams_toprune`` + validation).

  Args:
    amount: a validated amount (see :func:`validate_amount`).
    size: how many units the method sees: entries, channels or blocks still unpruned. A Python int, or an
      integer array when it depends on a (possibly traced) mask.

  Returns:
    A Python int when both inputs are concrete Python numbers, otherwise an int32 scalar array.

  Raises:
    ValueError: an integer amount larger than a concrete ``size`` (torch's message).
  """
  if isinstance(amount, (jax.Array, np.ndarray)) and not _is_traced(amount):
    amount = amount.item()
  if not isinstance(amount, (jax.Array, np.ndarray)) and isinstance(size, (int, np.integer)):
    if isinstance(amount, numbers.Integral):
      check_count(amount, size)
      return int(amount)
    return int(round(amount * size))
  size_concrete = not _is_traced(size)
  # int32 unless the caller counts in 64 bits (the selection does, under a local x64, for models past 2^31).
  count = jax.dtypes.canonicalize_dtype(np.int64)
  if isinstance(amount, numbers.Integral) or (
      isinstance(amount, (jax.Array, np.ndarray)) and jnp.issubdtype(amount.dtype, jnp.integer)):
    if size_concrete and not _is_traced(amount):
      check_count(amount, size)
    return jnp.clip(jnp.asarray(amount).astype(count), 0, jnp.asarray(size).astype(count))
  dtype = _product_dtype(amount)
  # Rounding half-to-even of the double product decides ties such as 0.3 * 5 = 1.4999999999999998 -> 1.5 -> 2;
  # float32 would not reproduce it, so the product is formed in float64 even when x64 is off.
  with jax.enable_x64(True):
    product = jnp.asarray(amount, dtype) * jnp.asarray(size).astype(dtype)
    k = jnp.round(jnp.clip(product, 0, None)).astype(jnp.int64)
    k = jnp.minimum(k, jnp.asarray(size).astype(jnp.int64))
  return k if count == np.int64 else k.astype(count)


def check_count(amount, size) -> None:
  """torch's error for an integer ``amount`` larger than the concrete number of units ``size`` left to prune."""
  if int(amount) > int(size):
    raise ValueError(f"amount={amount} should be smaller than the number of parameters to prune={int(size)}")


def as_argument(amount: Amount):
  """``amount`` as a jit argument that keeps its exact value: a Python float stays a double, an int stays 64-bit.

  jit turns a Python float argument into float32 when x64 is off, which would change torch's rounding; the bits
  are passed instead and :func:`from_argument` rebuilds the number inside the program.
  """
  if isinstance(amount, (jax.Array, np.ndarray)) and not isinstance(amount, np.generic) and _is_traced(amount):
    return amount
  value = amount.item() if isinstance(amount, (jax.Array, np.ndarray)) and amount.ndim == 0 \
      and not isinstance(amount, np.generic) else amount
  if isinstance(amount, np.floating) and amount.dtype.itemsize < 8:
    return {"float": np.asarray(amount)}  # torch multiplies a NumPy float in its own precision
  if isinstance(value, numbers.Integral):
    return {"int64": np.frombuffer(np.int64(value).tobytes(), np.uint32).copy()}
  return {"float64": np.frombuffer(np.float64(value).tobytes(), np.uint32).copy()}


def from_argument(arg) -> Amount:
  """The amount that :func:`as_argument` encoded; call it under ``jax.enable_x64(True)``."""
  if not isinstance(arg, dict):
    return arg
  (kind, value), = arg.items()
  if kind == "float":
    return value
  return jax.lax.bitcast_convert_type(value, jnp.int64 if kind == "int64" else jnp.float64)
