"""Benchmark: a pruned torch state_dict (~1 GB by default) to JAX and back.

For each way of converting, in fresh processes: throughput in GB/s of state_dict bytes (best of a few runs after
a warm-up), and peak extra resident memory over the level before the call (the kernel's high-water mark, reset
right before; measured in a separate cold process whose allocator cannot hide freed memory), in GB and in copies of
the data. Beside ``interop``, the naive
``jnp.asarray(t.numpy())`` per tensor (and ``torch.from_numpy(np.array(a))`` back), in the same run; the naive way
does not pair ``_orig``/``_mask``, keeps float masks, and turns int64 buffers into int32, so it is not lossless
(the ``exact`` column).

    python -m benchmarks.bench_interop                 # ~1 GB
    python -m benchmarks.bench_interop --size-mb 200   # smaller

``run(size_bytes)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import multiprocessing
import os
import platform
import threading
import time
import warnings
from typing import Any, Callable, Optional

GB = 1e9
METHODS = ("naive jnp.asarray(t.numpy())", "interop, torch layout", "interop, torch layout, copy=False",
           "interop, flax layout")

# One block: a pruned 3x3 conv, its BatchNorm, a pruned Linear and an unpruned one (float32), ~16.7 MB.
_BLOCK = (("conv", (256, 256, 3, 3), True), ("fc", (1024, 1024), True), ("proj", (1024, 1024), False))


def make_state_dict(size_bytes: int, seed: int = 0) -> dict:
  """A torch-ordered pruned state_dict of about ``size_bytes``: conv/BN/linear blocks, half the weights pruned."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  per_block = sum(4 * (2 if pruned else 1) * int(torch.Size(shape).numel()) for _, shape, pruned in _BLOCK)
  sd = {}
  for i in range(max(1, round(size_bytes / per_block))):
    for name, shape, pruned in _BLOCK:
      prefix = f"blocks.{i}.{name}"
      sd[f"{prefix}.bias"] = torch.randn(shape[0], generator=gen)
      if pruned:
        sd[f"{prefix}.weight_orig"] = torch.randn(shape, generator=gen)
        sd[f"{prefix}.weight_mask"] = torch.empty(shape).bernoulli_(0.5, generator=gen)
      else:
        sd[f"{prefix}.weight"] = torch.randn(shape, generator=gen)
      if name == "conv":
        width = shape[0]
        sd.update({f"blocks.{i}.bn.weight": torch.rand(width, generator=gen),
                   f"blocks.{i}.bn.bias": torch.randn(width, generator=gen),
                   f"blocks.{i}.bn.running_mean": torch.randn(width, generator=gen),
                   f"blocks.{i}.bn.running_var": torch.rand(width, generator=gen) + 0.5,
                   f"blocks.{i}.bn.num_batches_tracked": torch.tensor(100)})
  return sd


def _status_kb(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


class PeakMemory:
  """Peak resident memory above the level at entry: the kernel's high-water mark (reset on entry through
  /proc/self/clear_refs), or a 1 ms sampler where that cannot be reset."""

  def __enter__(self) -> "PeakMemory":
    gc.collect()
    self.base = _status_kb("VmRSS")
    self.extra = None
    try:
      with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
      self._sampler = None
    except OSError:
      self._stop = threading.Event()
      self._max = self.base or 0
      self._sampler = threading.Thread(target=self._sample, daemon=True)
      self._sampler.start()
    return self

  def _sample(self) -> None:
    while not self._stop.wait(0.001):
      self._max = max(self._max, _status_kb("VmRSS") or 0)

  def __exit__(self, *exc) -> None:
    if self._sampler is None:
      peak = _status_kb("VmHWM")
    else:
      self._stop.set()
      self._sampler.join()
      peak = self._max
    if peak is not None and self.base is not None:
      self.extra = max(0, peak - self.base)


def _ways() -> dict[str, tuple[Callable, Callable]]:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  import interop  # pylint: disable=import-outside-toplevel
  return {
      METHODS[0]: (lambda sd: {k: jnp.asarray(t.numpy()) for k, t in sd.items()},
                   lambda out: {k: torch.from_numpy(np.array(a)) for k, a in out.items()}),
      METHODS[1]: (interop.from_torch, lambda conv: interop.to_torch(*conv)),
      METHODS[2]: (lambda sd: interop.from_torch(sd, copy=False), lambda conv: interop.to_torch(*conv, copy=False)),
      METHODS[3]: (lambda sd: interop.from_torch(sd, layout="flax"), lambda conv: interop.to_torch(*conv)),
  }


def _measure(method: str, size_bytes: int, repeats: int) -> dict[str, Any]:
  """Times ``method`` both ways (best of ``repeats`` after one warm-up) and checks the round trip bit for bit."""
  import jax  # pylint: disable=import-outside-toplevel

  import interop  # pylint: disable=import-outside-toplevel
  warnings.simplefilter("ignore")  # the naive way warns about int64 -> int32
  to_jax, to_torch = _ways()[method]
  sd = make_state_dict(size_bytes)
  times = {"to_jax_s": [], "to_torch_s": []}
  for _ in range(repeats + 1):  # the first pass warms up imports, jit caches and the allocator
    start = time.perf_counter()
    converted = jax.block_until_ready(to_jax(sd))
    times["to_jax_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    back = to_torch(converted)
    times["to_torch_s"].append(time.perf_counter() - start)
    exact = interop.diff_state_dicts(back, sd) == []
    del converted, back
  return {"bytes": sum(t.numel() * t.element_size() for t in sd.values()), "exact": exact,
          **{name: min(values[1:]) for name, values in times.items()}}


def _peak_memory(method: str, size_bytes: int) -> dict[str, Any]:
  """Peak extra memory of one cold conversion each way."""
  import jax  # pylint: disable=import-outside-toplevel
  warnings.simplefilter("ignore")
  to_jax, to_torch = _ways()[method]
  sd = make_state_dict(size_bytes)
  jax.block_until_ready(to_jax(make_state_dict(1, seed=1)))  # imports and jit caches, outside the window
  with PeakMemory() as forward:
    converted = jax.block_until_ready(to_jax(sd))
  with PeakMemory() as back:
    to_torch(converted)
  return {"to_jax_extra": forward.extra, "to_torch_extra": back.extra}


def _in_fresh_process(fn: Callable, *args, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """Runs ``fn(*args)`` in a new process, with ``env`` added to its environment."""
  context = multiprocessing.get_context("spawn")
  saved = {name: os.environ.get(name) for name in env or {}}
  os.environ.update(env or {})  # read by the child (and glibc) when it starts
  try:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
      return pool.submit(fn, *args).result()
  finally:
    for name, value in saved.items():
      if value is None:
        del os.environ[name]
      else:
        os.environ[name] = value


# With a fixed mmap threshold glibc hands every large block back to the OS when it is freed, so memory freed
# before a measurement cannot be reused unseen and hide part of a peak.
_COLD_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores"


def run(size_bytes: int = 10 ** 9, repeats: int = 3) -> dict[str, Any]:
  """Measures every way in fresh processes: throughput (best of ``repeats`` warm runs) and peak extra memory (a
  cold run with an allocator that cannot hide freed memory).

  Returns:
    ``{"size_bytes", "machine", "versions", "results": {method: {"to_jax_gbps", "to_torch_gbps",
    "to_jax_peak_extra_bytes", "to_torch_peak_extra_bytes", "to_jax_peak_extra_copies",
    "to_torch_peak_extra_copies", "exact"}}}``; a peak is None where the platform cannot measure it.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  results, nbytes = {}, 0
  for method in METHODS:
    speed = _in_fresh_process(_measure, method, size_bytes, repeats)
    memory = _in_fresh_process(_peak_memory, method, size_bytes, env=_COLD_ALLOCATOR)
    nbytes = speed["bytes"]
    figures = {"exact": speed["exact"]}
    for direction in ("to_jax", "to_torch"):
      extra = memory[f"{direction}_extra"]
      figures[f"{direction}_gbps"] = nbytes / GB / speed[f"{direction}_s"]
      figures[f"{direction}_peak_extra_bytes"] = extra
      figures[f"{direction}_peak_extra_copies"] = None if extra is None else extra / nbytes
    results[method] = figures
  return {"size_bytes": nbytes, "machine": _machine(),
          "versions": {"jax": jax.__version__, "torch": torch.__version__}, "results": results}


def format_table(report: dict[str, Any]) -> str:
  """The report as a Markdown table."""
  def memory(extra, copies):
    return "n/a" if extra is None else f"{extra / GB:.2f} GB ({copies:.2f}x)"

  lines = [f"{report['size_bytes'] / GB:.2f} GB pruned state_dict; {report['machine']}; "
           f"jax {report['versions']['jax']}, torch {report['versions']['torch']}", "",
           "| method | torch -> JAX | peak extra | JAX -> torch | peak extra | lossless |",
           "|---|---|---|---|---|---|"]
  for method, r in report["results"].items():
    lines.append(f"| {method} | {r['to_jax_gbps']:.2f} GB/s | "
                 f"{memory(r['to_jax_peak_extra_bytes'], r['to_jax_peak_extra_copies'])} | "
                 f"{r['to_torch_gbps']:.2f} GB/s | "
                 f"{memory(r['to_torch_peak_extra_bytes'], r['to_torch_peak_extra_copies'])} | "
                 f"{'yes' if r['exact'] else 'no'} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size-mb", type=float, default=1000.0, help="state_dict size in MB (default 1000)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, best kept (default 3)")
  args = parser.parse_args()
  print(format_table(run(int(args.size_mb * 1e6), args.repeats)))


if __name__ == "__main__":
  main()
