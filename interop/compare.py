"""Bit-for-bit comparison of state_dicts: what "lossless" means, as a check anyone can run on a round trip."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from interop import devices


def diff_state_dicts(a: Mapping[str, Any], b: Mapping[str, Any], *, order: bool = True) -> list[str]:
  """How two state_dicts differ: keys (and, with ``order``, their order), dtypes, shapes and bits.

  Values may be torch tensors, numpy or JAX arrays. Bits are compared, so -0.0 differs from 0.0 and NaN payloads
  count. An empty list means identical.
  """
  problems = []
  missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
  if missing or extra:
    problems.append(f"keys only in the first: {missing}; only in the second: {extra}")
  elif order and list(a) != list(b):
    problems.append(f"key order differs: {list(a)} vs {list(b)}")
  for key in (k for k in a if k in b):
    x, y = a[key], b[key]
    if devices.dtype_name(x) != devices.dtype_name(y):
      problems.append(f"{key}: dtype {devices.dtype_name(x)} vs {devices.dtype_name(y)}")
    elif tuple(x.shape) != tuple(y.shape):
      problems.append(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
    else:
      bx = np.ascontiguousarray(devices.host_view(x)).view(np.uint8)
      by = np.ascontiguousarray(devices.host_view(y)).view(np.uint8)
      if not np.array_equal(bx, by):
        problems.append(f"{key}: values differ bit for bit")
  return problems
