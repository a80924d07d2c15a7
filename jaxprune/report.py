"""Sparsity reports: per leaf and global counts of pruned entries and zeros, as data and as a table."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from jaxprune.pytree import UNMASKED, PyTree, _leaves, is_masked


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  """One leaf: ``pruned`` counts mask zeros, ``zeros`` counts zeros of the effective weight (pruned or not)."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  size: int
  masked: bool
  pruned: int
  zeros: int

  @property
  def sparsity(self) -> float:
    """The fraction of entries pruned by the mask."""
    return self.pruned / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Per-leaf rows and global totals. ``str(report)`` is a readable table; :meth:`to_dict` is JSON-ready."""
  leaves: tuple[LeafSparsity, ...]

  @property
  def size(self) -> int:
    return sum(leaf.size for leaf in self.leaves)

  @property
  def pruned(self) -> int:
    return sum(leaf.pruned for leaf in self.leaves)

  @property
  def zeros(self) -> int:
    return sum(leaf.zeros for leaf in self.leaves)

  @property
  def sparsity(self) -> float:
    """Pruned entries over all entries of every leaf."""
    return self.pruned / self.size if self.size else 0.0

  @property
  def masked_sparsity(self) -> float:
    """Pruned entries over the entries of masked leaves only (torch's usual "global sparsity")."""
    size = sum(leaf.size for leaf in self.leaves if leaf.masked)
    return self.pruned / size if size else 0.0

  def to_dict(self) -> dict[str, Any]:
    return {"leaves": [dict(dataclasses.asdict(leaf), sparsity=leaf.sparsity) for leaf in self.leaves],
            "size": self.size, "pruned": self.pruned, "zeros": self.zeros, "sparsity": self.sparsity,
            "masked_sparsity": self.masked_sparsity}

  def __str__(self) -> str:
    header = ("leaf", "shape", "dtype", "masked", "pruned", "zeros", "sparsity")
    rows = [(leaf.path, "x".join(map(str, leaf.shape)) or "()", leaf.dtype, "yes" if leaf.masked else "no",
             f"{leaf.pruned:,}", f"{leaf.zeros:,}", f"{leaf.sparsity:.2%}") for leaf in self.leaves]
    rows.append(("total", f"{self.size:,}", "", "", f"{self.pruned:,}", f"{self.zeros:,}", f"{self.sparsity:.2%}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def sparsity_report(params: PyTree, masks: Optional[PyTree] = None) -> SparsityReport:
  """Counts pruned entries and zeros of every leaf (reads values back to the host; not for use inside jit)."""
  leaves, _, (flat_masks,) = _leaves(params, masks)
  rows = []
  for (path, x), m in zip(leaves, flat_masks):
    x = np.asarray(jax.device_get(x))
    masked = m is not None and is_masked(m, x)
    keep = np.broadcast_to(np.asarray(jax.device_get(UNMASKED if m is None else m)), x.shape)
    rows.append(LeafSparsity(path, tuple(x.shape), str(x.dtype), x.size, masked, int(x.size - np.count_nonzero(keep)),
                             int(x.size - np.count_nonzero(np.where(keep, x, 0)))))
  return SparsityReport(tuple(rows))
