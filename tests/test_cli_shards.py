"""The CLI on sharded checkpoints (issue 10 item 4): inspect, prune and convert read an index or its folder as they
read one file, and write sharded outputs (--max-shard-size) whole, with the same tensors bit for bit."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from interop import shards
from jaxprune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """One torch-pruned MLP as ``one.safetensors``, as safetensors shards in ``st/`` and as torch shards in ``pt/``."""
  d = tmp_path_factory.mktemp("sharded")
  torch.manual_seed(0)
  net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
  prune.l1_unstructured(net[0], "weight", 0.5)
  prune.random_unstructured(net[2], "weight", 0.25)
  sd = net.state_dict()
  interop.save_state_dict(sd, d / "one.safetensors")
  interop.save_state_dict(sd, d / "st", max_shard_size="3KB")
  interop.save_state_dict(sd, d / "pt" / "pytorch_model.bin.index.json", max_shard_size="3KB")
  assert len(os.listdir(d / "st")) > 3 and len(os.listdir(d / "pt")) > 3
  return d


def _json(capsys, *argv) -> dict:
  status = cli.main([str(a) for a in argv] + ["--json"])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  return json.loads(captured.out)


def _fails(capsys, *argv) -> str:
  status = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert status == 2 and len(err.splitlines()) == 1, err
  return err


def _same(a: dict, b: dict) -> None:
  assert interop.diff_state_dicts(a, b) == []  # keys, order, dtypes, shapes and bits


@pytest.mark.parametrize("path", ["st", "st/model.safetensors.index.json", "pt", "pt/pytorch_model.bin.index.json"])
def test_inspect_reads_shards_as_the_one_file(capsys, ckpts, path):
  whole = _json(capsys, "inspect", ckpts / "one.safetensors")
  sharded = _json(capsys, "inspect", ckpts / path)
  assert whole.pop("path") != sharded.pop("path")
  assert sharded == whole and whole["pruned_tensors"] == 2


def test_prune_writes_shards_holding_what_one_file_holds(capsys, ckpts, tmp_path):
  argv = ["--method", "l1", "--amount", "0.3", "--include", "weight"]
  _json(capsys, "prune", ckpts / "one.safetensors", "-o", tmp_path / "one.safetensors", *argv)
  report = _json(capsys, "prune", ckpts / "st", "-o", tmp_path / "out", "--max-shard-size", "2KB", *argv)
  index = shards.read_index(str(tmp_path / "out" / "model.safetensors.index.json"))
  names = sorted(set(index.weight_map.values()))
  assert sorted(os.listdir(tmp_path / "out")) == [*names, "model.safetensors.index.json"]
  for name in names:  # at most 2KB of tensors, or one tensor larger than that
    tensors = interop.io.read_header(tmp_path / "out" / name).tensors.values()
    assert len(tensors) == 1 or sum(end - begin for *_, begin, end in tensors) <= 2000, name
  assert len(names) > 3
  _same(interop.load_state_dict(tmp_path / "out"), interop.load_state_dict(tmp_path / "one.safetensors"))
  assert report["pruned_tensors"] == 3


def test_torch_shards_in_torch_shards_out(capsys, ckpts, tmp_path):
  out = tmp_path / "o" / "pytorch_model.bin.index.json"
  _json(capsys, "convert", ckpts / "pt", out, "--layout", "torch", "--max-shard-size", "1KB")
  assert all(name.endswith(".bin") for name in shards.read_index(str(out)).weight_map.values())
  _same(interop.load_state_dict(out), interop.load_state_dict(ckpts / "one.safetensors"))


def test_flax_layout_shards_round_trip_bit_for_bit(capsys, ckpts, tmp_path):
  report = _json(capsys, "convert", ckpts / "pt", tmp_path / "flax", "--layout", "flax", "--max-shard-size", "2KB")
  assert report["to"] == "flax" and report["pruned_tensors"] == 2
  index = shards.read_index(str(tmp_path / "flax" / "model.safetensors.index.json"))
  assert "params/0/kernel" in index.weight_map and index.metadata[cli.FORMAT_KEY] == "flax"
  assert _json(capsys, "inspect", tmp_path / "flax")["layout"] == "flax"
  _json(capsys, "convert", tmp_path / "flax", tmp_path / "back.safetensors", "--layout", "torch")
  _same(interop.load_state_dict(tmp_path / "back.safetensors"), interop.load_state_dict(ckpts / "one.safetensors"))


def test_a_sharded_output_replaces_only_a_sharded_checkpoint(capsys, ckpts, tmp_path):
  out = tmp_path / "out"
  argv = ["--method", "l1", "--amount", "0.5"]
  _json(capsys, "prune", ckpts / "st", "-o", out, *argv)
  assert "holds a sharded checkpoint; pass --force" in _fails(capsys, "prune", ckpts / "st", "-o", out, *argv)
  _json(capsys, "prune", ckpts / "st", "-o", out, "--force", "--max-shard-size", "2KB", *argv)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # swapped in whole, nothing left beside it
  (out / "config.json").write_text("{}")
  before = sorted(os.listdir(out))
  for force in ([], ["--force"]):
    assert "holds files that are not part of a sharded checkpoint (config.json)" in _fails(
        capsys, "prune", ckpts / "st", "-o", out, *force, *argv)
  assert sorted(os.listdir(out)) == before


def test_shard_flags_that_cannot_apply_are_refused(capsys, ckpts, tmp_path):
  assert "--max-shard-size writes a sharded checkpoint" in _fails(
      capsys, "convert", ckpts / "st", tmp_path / "x.safetensors", "--layout", "torch", "--max-shard-size", "1MB")
  assert "sharded as safetensors" in _fails(
      capsys, "convert", ckpts / "st", tmp_path / "f" / "pytorch_model.bin.index.json", "--layout", "flax")
  assert "is the input itself" in _fails(capsys, "convert", ckpts / "st", ckpts / "st", "--layout", "torch")
  with pytest.raises(SystemExit):  # argparse's usage error
    cli.main(["convert", str(ckpts / "st"), str(tmp_path / "o"), "--layout", "torch", "--max-shard-size", "lots"])
  assert "--max-shard-size: shard size 'lots'" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_a_missing_shard_is_one_line_naming_it(capsys, ckpts, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in os.listdir(ckpts / "st"):
    if not name.startswith("model-00002"):
      (broken / name).write_bytes((ckpts / "st" / name).read_bytes())
  assert "shard model-00002-of-" in _fails(capsys, "inspect", broken)


_SIGNAL_AFTER_FIRST_SHARD = """
import os, signal, sys
import interop
from jaxprune import cli
file_writer = interop.io.file_writer

def signalled(*args, **kwargs):  # SIGTERM arrives once the first shard is on disk, the rest not yet
  write = file_writer(*args, **kwargs)
  def then_signal(target):
    write(target)
    os.kill(os.getpid(), signal.SIGTERM)
  return then_signal

interop.io.file_writer = signalled
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_signal_mid_write_leaves_the_old_shards_and_no_temporary_files(capsys, ckpts, tmp_path):
  out = tmp_path / "out"
  _json(capsys, "prune", ckpts / "st", "-o", out, "--method", "l1", "--amount", "0.5", "--max-shard-size", "2KB")
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  argv = ["prune", str(ckpts / "st"), "-o", str(out), "--method", "l1", "--amount", "0.9", "--force"]
  proc = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_FIRST_SHARD, *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
  assert proc.stderr.strip() == "jaxprune prune: interrupted (SIGTERM); nothing was written"
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
  assert os.listdir(tmp_path) == ["out"]


def test_a_folder_of_an_unsharded_hugging_face_model_reads_as_its_weights_file(capsys, ckpts, tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "model.safetensors").write_bytes((ckpts / "one.safetensors").read_bytes())
  (tmp_path / "hf" / "config.json").write_text("{}")
  whole, folder = _json(capsys, "inspect", ckpts / "one.safetensors"), _json(capsys, "inspect", tmp_path / "hf")
  assert whole.pop("path") != folder.pop("path") and folder == whole
  _same(interop.load_state_dict(tmp_path / "hf"), interop.load_state_dict(ckpts / "one.safetensors"))
