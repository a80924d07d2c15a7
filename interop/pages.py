"""Giving back the memory of a memory-mapped checkpoint once its tensors have been read.

Readers map checkpoint files (``interop.io.load_state_dict(..., mmap=True)``) rather than copy them, so only the
pages touched are read. But a touched page of a mapping stays in the process (and in its peak resident size) until
the mapping is closed, so counting every tensor of a 4 GiB file once would end with 4 GiB resident. A
:class:`PageDropper` is told about each tensor (or piece of one) when it is done with it, and hands those pages back
(``madvise(MADV_DONTNEED)``): the process then holds about one tensor at a time. The data stays in the kernel's page
cache and in the file: touching the tensor again reads it back, unchanged.

Only pages that the kernel lists (``/proc/self/maps``) as a mapping of one of the dropper's own files are ever given
back; anything else it is told about (a copy, a torch tensor in plain memory) is left alone. Dropping a private
mapping's page that was written to would lose the write: the checkpoint readers' arrays are never written in place
by the commands that use a dropper. Where there is no ``/proc`` or ``madvise`` (not Linux), it does nothing.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Any, Iterable, Optional

BATCH_BYTES = 8 << 20
"""Small tensors are given back together once this many bytes of them are done: one system call per batch."""
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _address_range(value: Any) -> Optional[tuple[int, int]]:
  """``(start, end)`` of a numpy array's or torch tensor's bytes; None for anything else or an empty one."""
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(value, torch.Tensor):
    if value.device.type != "cpu" or not value.numel():
      return None
    start = value.data_ptr()
    return start, start + value.numel() * value.element_size()
  interface = getattr(value, "__array_interface__", None)
  if interface is None or not getattr(value, "nbytes", 0):
    return None
  start = interface["data"][0]
  return start, start + value.nbytes


def _file_mappings(files: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
  """The address ranges that ``/proc/self/maps`` lists as mappings of the files ``(device, inode)``."""
  wanted = set(files)
  ranges = []
  try:
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
      for line in f:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
          continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if (os.makedev(major, minor), int(fields[4])) in wanted:
          low, high = (int(x, 16) for x in fields[0].split("-"))
          ranges.append((low, high))
  except (OSError, ValueError):
    return []
  return ranges


def _madvise():
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
  except (OSError, AttributeError):
    return None
  fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
  return fn


class PageDropper:
  """Call it with each tensor (or slice) that is done with; call :meth:`flush` at the end.

  Args:
    paths: the checkpoint files whose mappings may be given back.
    batch_bytes: pending bytes that trigger a :meth:`flush`.
  """

  def __init__(self, paths: Iterable[str], batch_bytes: int = BATCH_BYTES):
    self._files = set()
    for path in paths:
      info = os.stat(path)
      self._files.add((info.st_dev, info.st_ino))
    self._pending: list[tuple[int, int]] = []
    self._pending_bytes = 0
    self._batch = batch_bytes
    self._madvise = _madvise() if sys.platform.startswith("linux") else None
    self.dropped = 0
    """Bytes given back so far (whole pages)."""

  def __call__(self, value: Any) -> None:
    span = _address_range(value) if self._madvise is not None else None
    if span is None:
      return
    self._pending.append(span)
    self._pending_bytes += span[1] - span[0]
    if self._pending_bytes >= self._batch:
      self.flush()

  def flush(self) -> None:
    """Gives back the whole pages of everything pending that lies in a mapping of the dropper's files."""
    if not self._pending:
      return
    pending, self._pending, self._pending_bytes = sorted(self._pending), [], 0
    mappings = _file_mappings(self._files)
    for start, end in _merged(pending):
      for low, high in mappings:  # clipped to the mapping: never a page of anything else
        first, last = max(start - start % _PAGE, low), min(end + -end % _PAGE, high)
        if first < last and self._madvise(first, last - first, _MADV_DONTNEED) == 0:
          self.dropped += last - first


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
  """Sorted spans with the overlapping and touching ones joined (neighbouring tensors: one call for all)."""
  out: list[list[int]] = []
  for start, end in spans:
    if out and start <= out[-1][1] + _PAGE:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(a, b) for a, b in out]
