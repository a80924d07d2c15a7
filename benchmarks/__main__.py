"""Runs every benchmark: ``python -m benchmarks`` (``--quick`` for a small smoke run, ``--help`` for sizes).

Writes into the output folder (default ``benchmarks/results/``, git-ignored):

* ``results.json``: every figure, the machine (CPU model, cores, GPU if any) and the package versions;
* ``results.md``: the Markdown tables that the README's performance section is pasted from;
* ``scaling.png``: global pruning time against size, jaxprune, torch and a full sort.

Suites: ``prune`` (benchmarks/bench_prune.py: global scaling, local, mask memory, sharded), ``optim``
(bench_optim.py: masked optimizer step overhead against plain optax), ``interop`` (bench_interop.py: torch <->
JAX state_dict throughput), ``structure`` (bench_structure.py: cost against the leaf count and real model shapes,
first call in a fresh process, training-step compile, a LLaMA-7B-shaped program compiled ahead of time),
``inspect`` (bench_inspect.py: ``jaxprune inspect`` of 200,000 tensors) and ``sparse`` (bench_sparse.py: a RigL
or SET update step against a plain masked step). A suite that cannot run is reported as such in both outputs, never dropped.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback
from typing import Any, Callable

from benchmarks import bench_structure, common
from benchmarks.bench_prune import parse_size

FULL = {"sizes": "1M,10M,50M", "repeats": 3, "local_size": "10M", "sharded_size": "10M", "optim_params": "10M",
        "interop_size": "1G", "structures": ",".join(bench_structure.FULL), "step_leaves": "10,100,500",
        "inspect_tensors": 200_000, "sparse_params": "10M"}
QUICK = {"sizes": "1M,4M", "repeats": 2, "local_size": "1M", "sharded_size": "1M", "optim_params": "1M",
         "interop_size": "50M", "structures": ",".join(bench_structure.QUICK), "step_leaves": "10",
         "inspect_tensors": 5_000, "sparse_params": "1M"}


def _suites(args) -> dict[str, tuple[str, Callable[[Any], dict], str]]:
  """name: (module, how to run it, the name of its Markdown formatter)."""
  amounts = [float(a) for a in args.amounts.split(",")]
  return {
      "prune": ("benchmarks.bench_prune", lambda m: m.run(
          [parse_size(n) for n in args.sizes.split(",")], amounts, args.repeats, parse_size(args.local_size),
          parse_size(args.sharded_size)), "format_tables"),
      "optim": ("benchmarks.bench_optim", lambda m: m.run(n_params=parse_size(args.optim_params)), "format_table"),
      "interop": ("benchmarks.bench_interop", lambda m: m.run(size_bytes=parse_size(args.interop_size),
                                                                 repeats=args.repeats),
                  "format_table"),
      "structure": ("benchmarks.bench_structure", lambda m: m.run(
          args.structures.split(","), [int(n) for n in args.step_leaves.split(",")],
          10**5 if args.quick else 10**6, args.repeats, llama7b=not args.quick), "format_table"),
      "inspect": ("benchmarks.bench_inspect", lambda m: m.run(n_tensors=args.inspect_tensors, repeats=args.repeats),
                  "format_table"),
      "sparse": ("benchmarks.bench_sparse", lambda m: m.run(n_params=parse_size(args.sparse_params)), "format_table"),
      "cli": ("benchmarks.bench_cli", lambda m: m.run(2**26 if args.quick else 2**30), "format_table"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--quick", action="store_true", help=f"small sizes for a smoke run: {QUICK}")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument("--only", default="prune,optim,interop,structure,inspect,sparse",
                      help="comma-separated suites to run")
  parser.add_argument("--sizes", help=f"global pruning sizes (default {FULL['sizes']})")
  parser.add_argument("--amounts", default="0.5,0.9")
  parser.add_argument("--repeats", type=int, help=f"timed rounds per comparison (default {FULL['repeats']})")
  parser.add_argument("--local-size", help="one tensor for local l1/ln pruning")
  parser.add_argument("--sharded-size", help="params for the 8-simulated-device run")
  parser.add_argument("--optim-params", help="model size for the optimizer benchmark")
  parser.add_argument("--interop-size", help="state_dict bytes for the interop benchmark")
  parser.add_argument("--structures", help="model structures for the structure suite (see bench_structure)")
  parser.add_argument("--step-leaves", help="leaf counts of the training-step compile sweep")
  parser.add_argument("--inspect-tensors", type=int, help="tensors in the file `jaxprune inspect` reads")
  parser.add_argument("--sparse-params", help="model size for the dynamic sparse training step")
  args = parser.parse_args()
  for name, value in (QUICK if args.quick else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)

  info = common.machine_info()
  results: dict[str, Any] = {"machine": info, "settings": vars(args), "suites": {}}
  markdown = ["## Benchmarks", "", f"Machine: {common.machine_line(info)}.", "",
              "Reproduce with `python -m benchmarks` (tables in `benchmarks/results/results.md`)."]
  suites = _suites(args)
  for name in args.only.split(","):
    module_name, run, formatter = suites[name]
    start = time.perf_counter()
    try:
      module = importlib.import_module(module_name)
      report = run(module)
    except Exception:  # pylint: disable=broad-except  (one failing suite must not lose the others' figures)
      error = traceback.format_exc()
      results["suites"][name] = {"error": error}
      markdown += ["", f"### {name}", "", f"Not run: `{error.strip().splitlines()[-1]}`"]
      print(error, flush=True)
      continue
    report["wall_s"] = time.perf_counter() - start
    results["suites"][name] = report
    markdown += ["", f"### {name}", "", getattr(module, formatter)(report)]
    if name == "prune":
      module.plot(report, os.path.join(args.out, "scaling.png"))
      markdown += ["", "![global pruning time against size](scaling.png)"]
    print("\n".join(markdown[-3:]), flush=True)
  common.write_json(os.path.join(args.out, "results.json"), results)
  common.write_atomically(os.path.join(args.out, "results.md"), "\n".join(markdown) + "\n")
  plotted = "error" not in results["suites"].get("prune", {"error": None})
  print(f"\nwrote {args.out}: results.json, results.md" + (", scaling.png" if plotted else ""))


if __name__ == "__main__":
  main()
