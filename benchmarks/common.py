"""Shared benchmark helpers: interleaved timing with medians, jit compile time kept apart, machine info, output.

Every comparison runs its contenders round-robin in one process (round 1: A, B, C; round 2: A, B, C; ...), so
load from other processes hits them alike, and reports the median over rounds (and the minimum, which resists
such load best). JAX work is dispatched asynchronously: a timed call only ends at ``jax.block_until_ready``.
Compilation is excluded from the timed calls (each jitted function is compiled first, through
:func:`compile_seconds`, whose figure is reported on its own).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from typing import Any, Callable, Sequence

import jax


def timed(fn: Callable[..., Any], *args) -> float:
  """Seconds for ``fn(*args)`` until its result is ready (the arguments are built before the clock starts)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
  """Runs every case once per round, ``repeats`` rounds; each case returns its own elapsed seconds (so that a
  case can prepare fresh inputs outside its timed part)."""
  runs = {name: [] for name in cases}
  for _ in range(repeats):
    for name, case in cases.items():
      runs[name].append(case())
  return runs


def summary(runs: Sequence[float]) -> dict[str, Any]:
  return {"median_s": statistics.median(runs), "min_s": min(runs), "runs_s": list(runs)}


def compile_seconds(jitted, *args) -> float:
  """Traces and compiles ``jitted`` for ``args``; later calls with like arguments reuse the executable."""
  start = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - start


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_summary() -> str:
  """The CPU model and core count, e.g. ``AMD EPYC 7B13, 2 cores``."""
  return f"{_cpu_model()}, {os.cpu_count()} cores{allocator_note()}"


def allocator_note() -> str:
  """``", LD_PRELOAD=libtcmalloc..."`` when another allocator replaces glibc's malloc, else nothing.

  XLA:CPU allocates each call's scratch with ``malloc``; glibc maps blocks over 32 MiB afresh on every call and
  the kernel zeroes their pages, which tcmalloc does not, so the allocator changes the figures of large steps.
  """
  preload = os.environ.get("LD_PRELOAD", "")
  return f", LD_PRELOAD={os.path.basename(preload)}" if preload else ""


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def machine_info() -> dict[str, Any]:
  """CPU model and cores, memory, accelerators JAX sees, and the versions that the figures depend on."""
  try:
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    memory_gb = None
  accelerators = sorted({d.device_kind for d in jax.devices() if d.platform != "cpu"})
  info = {"cpu": _cpu_model(), "cores": os.cpu_count(),
          "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "memory_gb": None if memory_gb is None else round(memory_gb, 1),
          "gpu": ", ".join(accelerators) or None, "jax_backend": jax.default_backend(),
          "python": platform.python_version(),
          "versions": {p: _version(p) for p in ("jax", "jaxlib", "torch", "optax", "flax", "numpy")}}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch_threads"] = None
  return info


def machine_line(info: dict[str, Any]) -> str:
  """The machine in one line, for table captions."""
  versions = ", ".join(f"{p} {v}" for p, v in info["versions"].items() if v and p != "numpy")
  gpu = f", GPU: {info['gpu']}" if info["gpu"] else ", no GPU"
  return (f"{info['cpu']}, {info['cores_usable']} cores, {info['memory_gb']} GiB{gpu}{allocator_note()}; JAX backend "
          f"{info['jax_backend']}; {versions}; torch threads {info['torch_threads']}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
  """A Markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
  align = ["---:" if i in right else "---" for i in range(len(headers))]
  lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def seconds(value: float) -> str:
  """A duration with units a reader takes in at a glance (ms below one second)."""
  return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def write_atomically(path: str, data: bytes | str) -> None:
  """Writes ``path`` through a temporary file in the same folder and a rename: readers never see half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  with tempfile.NamedTemporaryFile(mode, dir=folder, delete=False, suffix=".tmp") as f:
    f.write(data)
    tmp = f.name
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  write_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")
