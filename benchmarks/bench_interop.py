"""Benchmark: a pruned torch state_dict (~1 GB by default) to JAX and back.

For each way of converting, a cold conversion (the output lands in memory the process has not used yet, as when a
checkpoint is converted once) in each of a few fresh processes: throughput in GB/s of state_dict bytes (best run),
and peak extra resident memory over the level before the call (the kernel's high-water mark, reset right before;
largest run), in GB and in copies of the data. Beside ``interop``, the naive
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
import resource
import threading
import time
import warnings
from typing import Any, Callable, Optional
from benchmarks.common import cpu_summary

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


def _measure(method: str, size_bytes: int) -> dict[str, Any]:
  """One cold conversion each way in this (fresh) process: time and peak extra memory, then a bit-for-bit check.

  Cold, as a checkpoint is converted in practice: the output lands in memory the process has not used before.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import interop  # pylint: disable=import-outside-toplevel
  warnings.simplefilter("ignore")  # the naive way warns about int64 -> int32
  to_jax, to_torch = _ways()[method]
  # A VM may back guest memory only when first touched, at a cost (~0.1 GB/s here) that would swamp what is
  # measured: touch more than the run needs once (this memory goes back to the OS, to be handed out again).
  np.empty(3 * size_bytes, np.uint8)[::4096] = 1
  sd = make_state_dict(size_bytes)
  jax.block_until_ready(to_torch(to_jax(make_state_dict(1, seed=1))))  # imports and jit caches, off the clock
  figures = {"bytes": sum(t.numel() * t.element_size() for t in sd.values())}
  converted = sd
  for direction, convert in (("to_jax", lambda x: jax.block_until_ready(to_jax(x))), ("to_torch", to_torch)):
    with PeakMemory() as memory:
      start, cpu = time.perf_counter(), _cpu_seconds()
      converted = convert(converted)
      figures[f"{direction}_s"] = time.perf_counter() - start
      figures[f"{direction}_cpu_s"] = _cpu_seconds() - cpu
    figures[f"{direction}_extra"] = memory.extra
  return {**figures, "exact": interop.diff_state_dicts(converted, sd) == []}


def _cpu_seconds() -> float:
  """CPU time of this process, all threads, user and system: what the work costs however loaded the machine is."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _in_fresh_process(method: str, size_bytes: int) -> dict[str, Any]:
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    return pool.submit(_measure, method, size_bytes).result()


def run(size_bytes: int = 10 ** 9, repeats: int = 3) -> dict[str, Any]:
  """Measures every way ``repeats`` times, each in a fresh process; keeps the best time and the largest peak.

  Returns:
    ``{"size_bytes", "machine", "versions", "load", "results": {method: {"to_jax_gbps", "to_torch_gbps",
    "to_jax_gb_per_cpu_s", "to_torch_gb_per_cpu_s", "to_jax_peak_extra_bytes", "to_torch_peak_extra_bytes",
    "to_jax_peak_extra_copies", "to_torch_peak_extra_copies", "exact"}}}``: wall-clock throughput (best run),
    throughput per CPU-second of the process (all threads; robust to other load on the machine), the largest
    peak (None where the platform cannot measure it), and whether the round trip was bit-exact.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  results, nbytes = {}, 0
  for method in METHODS:
    runs = [_in_fresh_process(method, size_bytes) for _ in range(repeats)]
    nbytes = runs[0]["bytes"]
    figures = {"exact": all(r["exact"] for r in runs)}
    for direction in ("to_jax", "to_torch"):
      peaks = [r[f"{direction}_extra"] for r in runs]
      extra = None if None in peaks else max(peaks)
      figures[f"{direction}_gbps"] = nbytes / GB / min(r[f"{direction}_s"] for r in runs)
      figures[f"{direction}_gb_per_cpu_s"] = nbytes / GB / min(r[f"{direction}_cpu_s"] for r in runs)
      figures[f"{direction}_peak_extra_bytes"] = extra
      figures[f"{direction}_peak_extra_copies"] = None if extra is None else extra / nbytes
    results[method] = figures
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  return {"size_bytes": nbytes, "machine": cpu_summary(), "load": load,
          "versions": {"jax": jax.__version__, "torch": torch.__version__}, "results": results}


def format_table(report: dict[str, Any]) -> str:
  """The report as a Markdown table."""
  def memory(extra, copies):
    return "n/a" if extra is None else f"{extra / GB:.2f} GB ({copies:.2f}x)"

  load = "" if report["load"] is None else f"; load average {report['load']:.1f} at the end"
  lines = [f"{report['size_bytes'] / GB:.2f} GB pruned state_dict; {report['machine']}{load}; "
           f"jax {report['versions']['jax']}, torch {report['versions']['torch']}", "",
           "| method | torch -> JAX: GB/s (GB per CPU-s) | peak extra | JAX -> torch: GB/s (GB per CPU-s) "
           "| peak extra | lossless |", "|---|---|---|---|---|---|"]
  for method, r in report["results"].items():
    cells = [method]
    for direction in ("to_jax", "to_torch"):
      cells += [f"{r[f'{direction}_gbps']:.2f} ({r[f'{direction}_gb_per_cpu_s']:.2f})",
                memory(r[f"{direction}_peak_extra_bytes"], r[f"{direction}_peak_extra_copies"])]
    lines.append("| " + " | ".join(cells + ["yes" if r["exact"] else "no"]) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size-mb", type=float, default=1000.0, help="state_dict size in MB (default 1000)")
  parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per method (default 3)")
  args = parser.parse_args()
  print(format_table(run(int(args.size_mb * 1e6), args.repeats)))


if __name__ == "__main__":
  main()
