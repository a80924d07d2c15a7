"""Benchmark: the ``jaxprune`` command line's start-up, its compilation cache, and its peak memory on large files.

Every command runs as its own process (``python -m jaxprune ...``), timed and measured by ``/usr/bin/time -v``
(wall time and peak resident size, which counts the pages of memory-mapped files the process touched), or, where
that tool is missing, by a wrapper reading the process's own high-water mark. The files are made in a temporary
folder at run time and removed afterwards:

* ``small.safetensors`` / ``small.pt``: a LeNet-sized checkpoint (61,706 parameters), for start-up;
* ``big.safetensors`` / ``big.pt``: ``size`` bytes of float32 weights of 64 MiB each (1 GiB by default), and
  ``big/``, the same as safetensors shards of a quarter of that.

``prune`` runs twice with one fresh compilation cache, so the second run shows what the cache saves.

    python -m benchmarks.bench_cli                 # 1 GiB
    python -m benchmarks.bench_cli --size 256M     # smaller

``run(size_bytes)`` returns the figures as a dict for a suite runner.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

from benchmarks.common import cpu_summary

_TIME = "/usr/bin/time"
_HWM = """
import runpy, sys
sys.argv = ["jaxprune", *sys.argv[1:]]
try:
  runpy.run_module("jaxprune", run_name="__main__")
finally:
  print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")), file=sys.stderr)
"""
LENET = {"conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
         "fc1.weight": (120, 400), "fc1.bias": (120,), "fc2.weight": (84, 120), "fc2.bias": (84,),
         "fc3.weight": (10, 84), "fc3.bias": (10,)}
TENSOR_ROWS = 4096  # 4096 x 4096 float32: 64 MiB a tensor


def make_files(folder: str, size_bytes: int) -> dict[str, str]:
  """The benchmark's checkpoints in ``folder`` (see the module docstring); name -> path."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  import interop  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  small = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in LENET.items()}
  n = max(1, size_bytes // (TENSOR_ROWS * TENSOR_ROWS * 4))
  big = {f"layers.{i}.weight": rng.standard_normal((TENSOR_ROWS, TENSOR_ROWS), dtype=np.float32) for i in range(n)}
  paths = {name: os.path.join(folder, name) for name in ("small.safetensors", "small.pt", "big.safetensors",
                                                          "big.pt", "big")}
  interop.save_state_dict(small, paths["small.safetensors"])
  torch.save({k: torch.from_numpy(v) for k, v in small.items()}, paths["small.pt"])
  interop.save_state_dict(big, paths["big.safetensors"])
  torch.save({k: torch.from_numpy(v) for k, v in big.items()}, paths["big.pt"])
  interop.save_state_dict(big, paths["big"], max_shard_size=max(1, n // 4) * TENSOR_ROWS * TENSOR_ROWS * 4)
  return paths


def _measure(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
  """Wall seconds and peak resident bytes of ``python -m jaxprune *argv`` in a process of its own."""
  if os.path.exists(_TIME):
    cmd = [_TIME, "-v", sys.executable, "-m", "jaxprune", *argv]
  else:
    cmd = [sys.executable, "-c", _HWM, *argv]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"jaxprune {' '.join(argv)} failed:\n{proc.stderr}")
  if cmd[0] == _TIME:
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": hours * 3600 + minutes * 60 + seconds, "peak_bytes": peak_kb * 1024}
  return {"seconds": None, "peak_bytes": int(proc.stderr.split()[-1]) * 1024}


def _size(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  return os.path.getsize(path)


def _runs(paths: dict[str, str], out: str) -> list[tuple[str, str, list[str], Optional[str]]]:
  """(label, input, argv, baseline) of every measured command, in order (the second prune reuses the first's
  cache). The baseline is the run whose peak is subtracted: the same imports (numpy; torch for a .pt; JAX to
  prune or write the Flax layout) on a tiny file, so that what remains is what the checkpoint costs."""
  big, pt, shards = paths["big.safetensors"], paths["big.pt"], paths["big"]
  small, small_pt, prune = paths["small.safetensors"], paths["small.pt"], ["--method", "l1", "--amount", "0.5"]
  flax = os.path.join(out, "flax.safetensors")
  o = lambda name: os.path.join(out, name)  # noqa: E731
  jax_base = "prune small --no-cache"
  return [
      ("inspect small .safetensors", small, ["inspect", small], None),
      ("inspect small .pt", small_pt, ["inspect", small_pt], None),
      ("prune small, first run", small, ["prune", small, "-o", o("s1.safetensors"), *prune], None),
      ("prune small, second run (cached)", small, ["prune", small, "-o", o("s2.safetensors"), *prune], None),
      (jax_base, small, ["prune", small, "-o", o("s3.safetensors"), *prune, "--no-cache"], None),
      ("prune small .pt --no-cache", small_pt, ["prune", small_pt, "-o", o("s4.pt"), *prune, "--no-cache"], None),
      ("inspect .safetensors", big, ["inspect", big, "--json"], "inspect small .safetensors"),
      ("inspect .pt", pt, ["inspect", pt, "--json"], "inspect small .pt"),
      ("inspect sharded", shards, ["inspect", shards, "--json"], "inspect small .safetensors"),
      ("prune, first run", big, ["prune", big, "-o", o("p1.safetensors"), *prune, "--json"], jax_base),
      ("prune, second run (cached)", big, ["prune", big, "-o", o("p2.safetensors"), *prune, "--json"], jax_base),
      ("prune .pt --permanent", pt, ["prune", pt, "-o", o("p3.pt"), *prune, "--permanent", "--json"],
       "prune small .pt --no-cache"),
      ("prune sharded -> sharded", shards,
       ["prune", shards, "-o", o("p4"), *prune, "--max-shard-size", "300MB", "--json"], jax_base),
      ("convert small -> flax", small, ["convert", small, o("sf.safetensors"), "--layout", "flax"], None),
      ("convert -> flax", big, ["convert", big, flax, "--layout", "flax", "--json"], "convert small -> flax"),
      ("convert -> flax shards", big, ["convert", big, o("fs"), "--layout", "flax", "--max-shard-size", "300MB",
                                       "--json"], "convert small -> flax"),
      ("convert sharded -> flax sharded", shards,
       ["convert", shards, o("ff"), "--layout", "flax", "--max-shard-size", "5GB", "--json"], "convert small -> flax"),
      ("convert flax -> torch", flax, ["convert", flax, o("t.safetensors"), "--layout", "torch", "--json"], jax_base),
      ("convert sharded -> sharded", shards,
       ["convert", shards, o("s"), "--layout", "torch", "--max-shard-size", "100MB", "--json"],
       "inspect small .safetensors"),
  ]


def run(size_bytes: int = 2**30, folder: Optional[str] = None) -> dict[str, Any]:
  """Makes the files, runs every command once; returns the machine and one row per command."""
  tmp = tempfile.mkdtemp(prefix="jaxprune-bench-cli-", dir=folder)
  try:
    paths = make_files(tmp, size_bytes)
    out = os.path.join(tmp, "out")
    os.mkdir(out)
    env = {**os.environ, "JAXPRUNE_CACHE_DIR": os.path.join(tmp, "xla")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a fresh cache: the first prune compiles, the second must not
    rows, peaks = [], {}
    for label, source, argv, baseline in _runs(paths, out):
      figures = _measure(argv, env)
      size = _size(source)
      peaks[label] = figures["peak_bytes"]
      excess = None if baseline is None else (figures["peak_bytes"] - peaks[baseline]) / size
      rows.append({"command": label, "input_bytes": size, **figures, "peak_over_input": figures["peak_bytes"] / size,
                   "excess_over_input": excess})
      print(f"{label}: {figures}", flush=True)
    return {"machine": cpu_summary(), "load_average": os.getloadavg(), "size_bytes": size_bytes, "rows": rows}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _ratio(x: Optional[float]) -> str:
  return "-" if x is None else f"{max(x, 0.0):.2f}x"


def format_table(report: dict[str, Any]) -> str:
  lines = [f"`python -m jaxprune ...`, one process each, on {report['machine']} (load average "
           f"{report['load_average'][0]:.1f} when done); peak RSS from `/usr/bin/time -v`.", "",
           "| command | input | wall | peak RSS | peak / input | (peak - imports) / input |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in report["rows"]:
    wall = "-" if r["seconds"] is None else f"{r['seconds']:.2f} s"
    lines.append(f"| {r['command']} | {r['input_bytes'] / 2**20:,.1f} MiB | {wall} | "
                 f"{r['peak_bytes'] / 2**20:,.0f} MiB | {r['peak_over_input']:.2f}x | "
                 f"{_ratio(r['excess_over_input'])} |")
  return "\n".join(lines)


def main() -> None:
  from benchmarks.bench_prune import parse_size  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size", default="1G", help="bytes of the large checkpoint (default 1G)")
  parser.add_argument("--dir", help="where the temporary files go (default: the system's temporary folder)")
  args = parser.parse_args()
  print(format_table(run(parse_size(args.size), args.dir)))


if __name__ == "__main__":
  main()
