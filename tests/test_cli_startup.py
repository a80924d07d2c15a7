"""``jaxprune`` start-up (issue 10, item 5): ``inspect`` imports no JAX, and ``prune`` keeps its compiled programs
in JAX's persistent compilation cache, so the same command run again compiles nothing.

Each check runs in a fresh interpreter (``import jax`` cannot be undone in this one).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from jaxprune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A torch-pruned MLP as ``net.pt``, ``net.safetensors`` and safetensors shards in ``shards/``."""
  d = tmp_path_factory.mktemp("startup")
  torch.manual_seed(0)
  net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
  prune.l1_unstructured(net[0], "weight", 0.5)
  torch.save(net.state_dict(), d / "net.pt")
  interop.save_state_dict(net.state_dict(), d / "net.safetensors")
  interop.save_state_dict(net.state_dict(), d / "shards", max_shard_size="1KB")
  return d


def _python(script: str, **env) -> str:
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **env})
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


@pytest.mark.parametrize("name", ["net.safetensors", "net.pt", "shards"])
def test_inspect_imports_no_jax(files, name):
  out = _python(f"""
import contextlib, io, json, sys
from jaxprune import cli
with contextlib.redirect_stdout(io.StringIO()) as report:
  assert cli.main(["inspect", {str(files / name)!r}, "--json"]) == 0
print(json.dumps({{"heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}),
                  "report": json.loads(report.getvalue())}}))
""")
  result = json.loads(out)
  assert result["heavy"] == []
  assert result["report"]["pruned_tensors"] == 1 and result["report"]["zeros"] == 256  # what inspect is for


_COUNTING = """
import collections, sys, jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name.rsplit("/", 1)[-1]]))
from jaxprune import cli
assert cli.main(sys.argv[1:]) == 0
print(events["cache_misses"], events["cache_hits"])
"""


def _prune_twice(files, tmp_path, *flags) -> list[tuple[int, int]]:
  """(cache misses, cache hits) of two identical ``prune`` runs, each in a fresh interpreter."""
  counts = []
  for run in range(2):
    argv = ["prune", str(files / "net.safetensors"), "-o", str(tmp_path / f"out{run}.safetensors"), "--method",
            "l1", "--amount", "0.3", "--json", *flags]
    proc = subprocess.run([sys.executable, "-c", _COUNTING, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    counts.append(tuple(map(int, proc.stdout.splitlines()[-1].split())))
  return counts


def test_a_second_prune_compiles_nothing(files, tmp_path):
  cache = tmp_path / "xla"
  (miss1, hit1), (miss2, hit2) = _prune_twice(files, tmp_path, "--cache-dir", str(cache))
  assert miss1 > 0 and hit1 == 0  # a fresh cache: everything compiled, and stored
  assert miss2 == 0 and hit2 == miss1  # the same programs, all from the cache
  assert len(os.listdir(cache)) >= miss1


def test_no_cache_writes_no_cache(files, tmp_path, monkeypatch):
  monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "xla"))
  (miss1, hit1), (miss2, hit2) = _prune_twice(files, tmp_path, "--no-cache")
  assert (miss1, hit1, miss2, hit2) == (0, 0, 0, 0)  # the cache is not consulted at all
  assert not os.path.exists(tmp_path / "xla")


def test_where_the_cache_lives(monkeypatch, tmp_path):
  for var in (cli.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
    monkeypatch.delenv(var, raising=False)
  assert cli.cache_dir_for(None, False) == os.path.expanduser("~/.cache/jaxprune/xla")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.cache_dir_for(None, False) == str(tmp_path / "jaxprune" / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
  assert cli.cache_dir_for(None, False) == "/jax/own"
  monkeypatch.setenv(cli.CACHE_ENV, "/ours")
  assert cli.cache_dir_for(None, False) == "/ours"
  assert cli.cache_dir_for("/flag", False) == "/flag"
  assert cli.cache_dir_for("/flag", True) is None
