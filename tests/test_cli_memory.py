"""Peak memory of the CLI (issue 10, item 6): inputs are memory-mapped and given back tensor by tensor, so
``inspect`` and ``convert`` (``--layout torch``, and ``--layout flax`` into safetensors: transposed, converted and
written one tensor at a time) of a 200 MB checkpoint hold a small part of it at a time.

Each command runs in a fresh interpreter that reports its own peak resident size (``VmHWM``); the figure
compared is its excess over the same command on a tiny file, so imports and interpreter do not count. Resident
size is not disturbed by a busy machine (only time is). benchmarks/bench_cli.py measures 1 GiB files.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import interop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the process before exec, which here is a fork of
# pytest (hundreds of MB with torch loaded); VmHWM belongs to the new program alone.
_PEAK = """
import contextlib, io, sys
from jaxprune import cli
with contextlib.redirect_stdout(io.StringIO()):
  assert cli.main(sys.argv[1:]) == 0
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory read from /proc")


def _peak(*argv) -> int:
  proc = subprocess.run([sys.executable, "-c", _PEAK, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  return int(proc.stdout.split()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """``big.safetensors``: 25 pruned weights of 4 MiB with 4 MiB float masks (200 MiB); ``tiny.safetensors``."""
  d = tmp_path_factory.mktemp("memory")
  weight = np.linspace(-1, 1, 1 << 20, dtype=np.float32).reshape(1024, 1024)
  mask = (np.arange(1 << 20) % 2).astype(np.float32).reshape(1024, 1024)
  sd = {}
  for i in range(25):
    sd[f"l{i}.weight_orig"], sd[f"l{i}.weight_mask"] = weight.copy(), mask.copy()  # copies: no ties
  interop.save_state_dict(sd, d / "big.safetensors")
  interop.save_state_dict({"l.weight": np.ones((2, 2), np.float32)}, d / "tiny.safetensors")
  return d


def test_inspect_holds_a_small_part_of_the_checkpoint(files):
  size = os.path.getsize(files / "big.safetensors")
  excess = _peak("inspect", files / "big.safetensors", "--json") - _peak("inspect", files / "tiny.safetensors")
  assert excess < size / 4, f"inspect of {size:,} bytes peaked {excess:,} bytes above inspect of a tiny file"


def test_convert_to_shards_holds_a_small_part_of_the_checkpoint(files, tmp_path):
  size = os.path.getsize(files / "big.safetensors")
  excess = (_peak("convert", files / "big.safetensors", tmp_path / "shards", "--layout", "torch",
                  "--max-shard-size", "50MB")
            - _peak("convert", files / "tiny.safetensors", tmp_path / "t.safetensors", "--layout", "torch"))
  assert excess < size / 4, f"convert of {size:,} bytes peaked {excess:,} bytes above convert of a tiny file"
  assert len(os.listdir(tmp_path / "shards")) == 1 + 5  # 200 MiB in shards of at most 50 MB (48 MiB: 6 tensors)


@pytest.mark.parametrize("output", ["flax", "flax.safetensors"])
def test_convert_to_the_flax_layout_holds_a_small_part_of_the_checkpoint(files, tmp_path, output):
  """Every weight is transposed (a Dense kernel) and every mask made bool: before this streamed, the command held
  all of them (0.9x the checkpoint above the imports)."""
  size = os.path.getsize(files / "big.safetensors")
  shard = ["--max-shard-size", "50MB"] if output == "flax" else []
  excess = (_peak("convert", files / "big.safetensors", tmp_path / output, "--layout", "flax", *shard)
            - _peak("convert", files / "tiny.safetensors", tmp_path / "t.safetensors", "--layout", "flax"))
  assert excess < size / 4, f"convert of {size:,} bytes peaked {excess:,} bytes above convert of a tiny file"
  header = interop.io.read_header(tmp_path / output / "model-00001-of-00003.safetensors" if shard else
                                  tmp_path / output)
  assert list(header.tensors)[:2] == ["params/l0/kernel", "params/l1/kernel"]


def test_prune_to_safetensors_holds_a_part_of_the_checkpoint(files, tmp_path):
  """Continuing the pruning of every weight: masks wait packed 8 entries a byte, each module's tensors are made as
  they are written, and JAX's program for each leaf is let go. What stays is JAX's scratch for pruning one leaf
  (about 50 MiB here) and the input's masks as bool (25 MiB): 75-105 MiB in all. Before, the command held every
  new mask twice (bool and in the weights' dtype) and each leaf's program: 1.4x the checkpoint above the imports."""
  size = os.path.getsize(files / "big.safetensors")
  argv = ["--method", "l1", "--amount", "0.5"]
  excess = (_peak("prune", files / "big.safetensors", "-o", tmp_path / "p", "--max-shard-size", "50MB", *argv)
            - _peak("prune", files / "tiny.safetensors", "-o", tmp_path / "t.safetensors", *argv))
  assert excess < size * 3 / 4, f"prune of {size:,} bytes peaked {excess:,} bytes above prune of a tiny file"
