"""The structure, inspect and sparse benchmark suites run end to end on tiny sizes (see test_benchmarks.py)."""
import pytest
from test_benchmarks import run_benchmarks


@pytest.mark.slow
def test_structure_inspect_and_sparse_suites_run(tmp_path):
  suites = run_benchmarks(tmp_path, "--only", "structure,inspect,sparse", "--structures", "sweep:3:30K",
                          "--step-leaves", "3", "--inspect-tensors", "200", "--sparse-params", "100K")
  for name, contenders in suites["structure"]["global"].items():
    leaves = int(name.split(":")[1])
    assert {c["n_leaves"] for c in contenders.values()} == {leaves}, name
    assert all(c["first_s"] > 0 and c["steady_s"] > 0 for c in contenders.values())
  assert set(suites["structure"]["step_compile"]["3"]) == {"optax.adam", "masked_optimizer", "scheduled local",
                                                          "scheduled global"}
