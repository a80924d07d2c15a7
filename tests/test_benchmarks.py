"""The benchmark suite's entry point runs end to end on tiny sizes and writes consistent results.

Speed is never asserted here: this checks that `python -m benchmarks` still works and that what it compares is
the same work (same pruned counts, lossless conversions), so a README figure can always be regenerated. The
structure, inspect and sparse suites are smoke-tested in test_benchmark_suites.py, so that the two run on
different test workers.
"""
import json
import os
import subprocess
import sys

import pytest


def run_benchmarks(tmp_path, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the suite sets up its own simulated devices in a subprocess
  out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--repeats", "1", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["machine"]["cores"] and results["machine"]["versions"]["jax"]
  assert all("error" not in r for r in results["suites"].values()), results["suites"]
  return results["suites"]


@pytest.mark.slow
def test_benchmark_suite_runs_and_compares_like_for_like(tmp_path):
  suites = run_benchmarks(tmp_path, "--only", "prune,optim,interop", "--sizes", "100K", "--local-size", "100K",
                          "--sharded-size", "100K", "--optim-params", "100K", "--interop-size", "5M")
  assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "scaling.png"}
  for run in suites["prune"]["global"]:
    for amount, figures in run["amounts"].items():
      check = figures["check"]
      assert check["jaxprune_pruned"] == check["torch_pruned"] == round(float(amount) * run["n_params"])
      assert check["full_sort_equals_jaxprune"]
  assert all(r["exact"] for name, r in suites["interop"]["results"].items() if name.startswith("interop"))
  ratios = [v["median_ratio"] for setting in suites["optim"]["results"].values() for v in setting.values()]
  assert ratios and all(r > 0 for r in ratios)
