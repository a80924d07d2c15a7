"""Benchmark: ``jaxprune inspect`` of a safetensors file holding many tiny tensors (200,000 by default).

Per-tensor costs dominate such a file: the header (one JSON object per tensor), one read per tensor, the checks of
pairs and masks, and the counting. The file (``blocks.{i}.weight`` 4x4, half of them pruned with float masks, and
``blocks.{i}.bias``) is written once, then ``inspect --json`` runs in a fresh process per repeat, timed from the
command's start to its end (imports excluded: they are the same for any file), with the process's peak resident
memory above its level before the command.

    python -m benchmarks.bench_inspect                    # 200,000 tensors
    python -m benchmarks.bench_inspect --tensors 20000    # smaller

``run(n_tensors)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import multiprocessing
import os
import tempfile
import time
from typing import Any

from benchmarks.bench_interop import PeakMemory
from benchmarks.common import cpu_summary


def make_file(path: str, n_tensors: int) -> int:
  """Writes ``n_tensors`` tiny tensors (4x4 weights, half pruned, and biases) to ``path``; returns its size."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  import interop  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  sd = {}
  for i in itertools.count():  # a pruned block has three tensors (orig, mask, bias), an unpruned one two
    if len(sd) >= n_tensors - 1:
      break
    weight = rng.standard_normal((4, 4)).astype(np.float32)
    if i % 2:
      sd[f"blocks.{i}.weight_orig"] = weight
      sd[f"blocks.{i}.weight_mask"] = (rng.random((4, 4)) < 0.5).astype(np.float32)
    else:
      sd[f"blocks.{i}.weight"] = weight
    sd[f"blocks.{i}.bias"] = np.zeros(4, np.float32)
  interop.save_state_dict(sd, path)
  return len(sd)


def _measure(path: str) -> dict[str, Any]:
  """One ``inspect --json`` in this (fresh) process: seconds and peak extra resident bytes."""
  from jaxprune import cli  # pylint: disable=import-outside-toplevel
  import interop  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import  # imports off the clock
  with PeakMemory() as memory, contextlib.redirect_stdout(io.StringIO()) as out:
    start, cpu = time.perf_counter(), time.process_time()
    status = cli.main(["inspect", path, "--json"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
  assert status == 0
  return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_bytes": memory.extra,
          "json_bytes": len(out.getvalue())}


def _in_fresh_process(path: str) -> dict[str, Any]:
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    return pool.submit(_measure, path).result()


def run(n_tensors: int = 200_000, repeats: int = 3) -> dict[str, Any]:
  """Times ``inspect`` on a file of ``n_tensors`` tiny tensors, ``repeats`` fresh processes; best time, largest peak.

  Returns:
    ``{"tensors", "file_bytes", "machine", "load", "seconds", "cpu_seconds", "us_per_tensor", "peak_extra_bytes",
    "peak_bytes_per_tensor", "runs"}``: wall time and the process's CPU time (all threads; less sensitive to other
    load on the machine), both the best run.
  """
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "many.safetensors")
    n = make_file(path, n_tensors)
    size = os.path.getsize(path)
    runs = [_in_fresh_process(path) for _ in range(repeats)]
  best = min(r["seconds"] for r in runs)
  peaks = [r["peak_extra_bytes"] for r in runs]
  peak = None if None in peaks else max(peaks)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  return {"tensors": n, "file_bytes": size, "machine": cpu_summary(), "load": load, "seconds": best,
          "cpu_seconds": min(r["cpu_seconds"] for r in runs),
          "us_per_tensor": best / n * 1e6, "peak_extra_bytes": peak,
          "peak_bytes_per_tensor": None if peak is None else peak / n, "runs": runs}


def format_table(report: dict[str, Any]) -> str:
  """The report as a Markdown table."""
  load = "" if report["load"] is None else f"; load average {report['load']:.1f} at the end"
  peak = report["peak_extra_bytes"]
  memory = "n/a" if peak is None else f"{peak / 1e6:.0f} MB ({report['peak_bytes_per_tensor']:.0f} B per tensor)"
  return "\n".join([
      f"{report['tensors']:,} tensors, {report['file_bytes'] / 1e6:.1f} MB safetensors file; {report['machine']}"
      f"{load}", "", "| command | time (best) | CPU time | per tensor | peak extra memory |",
      "|---|---:|---:|---:|---:|",
      f"| jaxprune inspect --json | {report['seconds']:.2f} s | {report['cpu_seconds']:.2f} s | "
      f"{report['us_per_tensor']:.1f} µs | {memory} |"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--tensors", type=int, default=200_000, help="tensors in the file (default 200,000)")
  parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs (default 3)")
  args = parser.parse_args()
  print(format_table(run(args.tensors, args.repeats)))


if __name__ == "__main__":
  main()
