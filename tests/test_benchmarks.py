"""The benchmark suite's entry point runs end to end on tiny sizes and writes consistent results.

Speed is never asserted here: this checks that `python -m benchmarks` still works and that what it compares is
the same work (same pruned counts, lossless conversions), so a README figure can always be regenerated.
"""
import json
import os
import subprocess
import sys


def test_benchmark_suite_runs_and_compares_like_for_like(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the suite sets up its own simulated devices in a subprocess
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks", "--quick", "--sizes", "100K", "--repeats", "1", "--local-size", "100K",
       "--sharded-size", "100K", "--optim-params", "100K", "--interop-size", "5M", "--structures", "sweep:3:30K",
       "--step-leaves", "3", "--inspect-tensors", "200", "--sparse-params", "100K", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "scaling.png"}
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["machine"]["cores"] and results["machine"]["versions"]["jax"]
  suites = results["suites"]
  for run in suites["prune"]["global"]:
    for amount, figures in run["amounts"].items():
      check = figures["check"]
      assert check["jaxprune_pruned"] == check["torch_pruned"] == round(float(amount) * run["n_params"])
      assert check["full_sort_equals_jaxprune"]
  assert all(r["exact"] for name, r in suites["interop"]["results"].items() if name.startswith("interop"))
  ratios = [v["median_ratio"] for setting in suites["optim"]["results"].values() for v in setting.values()]
  assert ratios and all(r > 0 for r in ratios)
  for name, contenders in suites["structure"]["global"].items():
    leaves = int(name.split(":")[1])
    assert {c["n_leaves"] for c in contenders.values()} == {leaves}, name
    assert all(c["first_s"] > 0 and c["steady_s"] > 0 for c in contenders.values())
  assert all("error" not in suites[name] for name in suites), [n for n in suites if "error" in suites[n]]
