"""Files: safetensors without torch, .pt through weights_only=True, key order kept, writes atomic."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune

import interop


def _sd() -> dict:
  torch.manual_seed(0)
  net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).to(torch.bfloat16)
  prune.l1_unstructured(net[0], "weight", 0.5)
  prune.l1_unstructured(net[2], "bias", 1)
  return {**net.state_dict(), "extra.half": torch.randn(3).half(), "extra.count": torch.tensor(7)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_save_load_round_trip_keeps_order_dtypes_bits(tmp_path, suffix):
  sd = _sd()
  path = tmp_path / f"model{suffix}"
  interop.save_state_dict(sd, path)
  loaded = interop.load_state_dict(path)
  assert interop.diff_state_dicts(loaded, sd) == []  # safetensors itself sorts keys; the metadata restores them
  assert interop.diff_state_dicts(interop.to_torch(*interop.from_torch(path, layout="flax")), sd) == []


def test_safetensors_written_by_others_load_in_file_order(tmp_path):
  sd = {k: v.contiguous() for k, v in _sd().items()}
  path = tmp_path / "foreign.safetensors"
  safetensors.torch.save_file(sd, str(path))
  assert interop.diff_state_dicts(interop.load_state_dict(path), sd, order=False) == []


def test_safetensors_file_order_is_kept_on_write(tmp_path):
  """A file from safetensors.torch.save_file (sorted by dtype, then name) reads in its header's order, and a file
  written back keeps that order in its own header (any reader sees it), not only in the metadata."""
  sd = {k: v.contiguous() for k, v in _sd().items()}
  path, back = tmp_path / "foreign.safetensors", tmp_path / "back.safetensors"
  safetensors.torch.save_file(sd, str(path))
  loaded = interop.load_state_dict(path)
  assert list(loaded) == list(interop.io.read_header(path).tensors) != list(sd)
  interop.save_state_dict(interop.to_torch(*interop.from_torch(loaded, layout="flax")), back)
  assert list(interop.io.read_header(back).tensors) == list(loaded)
  assert interop.diff_state_dicts(interop.load_state_dict(back), loaded) == []
  assert interop.diff_state_dicts(safetensors.torch.load_file(str(back)), loaded, order=False) == []


class _Tied(nn.Module):
  """An embedding whose weight the output head shares (GPT-2's lm_head/wte), beside an untied layer."""

  def __init__(self):
    super().__init__()
    self.emb, self.mid, self.head = nn.Embedding(7, 3), nn.Linear(3, 3), nn.Linear(3, 7, bias=False)
    self.head.weight = self.emb.weight


def test_tied_tensors_are_stored_once_and_come_back_tied(tmp_path):
  sd = _Tied().state_dict()
  assert interop.ties.find_ties(sd) == (("emb.weight", "head.weight"),)
  for suffix in (".safetensors", ".pt"):
    path = tmp_path / f"tied{suffix}"
    interop.save_state_dict(sd, path)
    loaded = interop.load_state_dict(path)
    assert interop.diff_state_dicts(loaded, sd) == []
    assert interop.ties.find_ties(loaded) == (("emb.weight", "head.weight"),)
  header = interop.io.read_header(tmp_path / "tied.safetensors")
  assert list(header.tensors) == ["emb.weight", "mid.weight", "mid.bias"]  # what save_file refuses, stored once
  assert json.loads(header.metadata["interop.ties"]) == [["emb.weight", "head.weight"]]


def test_files_of_safetensors_save_model_get_their_ties_back(tmp_path):
  model = _Tied()
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_model(model, str(path))  # drops one key of the pair, names it in the metadata
  loaded = interop.load_state_dict(path)
  assert interop.diff_state_dicts(loaded, model.state_dict(), order=False) == []
  assert interop.ties.find_ties(loaded) == ((next(iter(interop.io.read_header(path).tensors.keys() &
                                                       {"emb.weight", "head.weight"})),
                                             *({"emb.weight", "head.weight"} - interop.io.read_header(path)
                                               .tensors.keys())),)


def test_metadata_carries_the_spec(tmp_path):
  conv = interop.from_torch(_sd(), layout="flax")
  path = tmp_path / "jax.safetensors"
  interop.save_state_dict(interop.to_torch(*conv, tensors="numpy"), path,
                          metadata={"interop.spec": conv.spec.to_json()})
  assert interop.TorchSpec.from_json(interop.read_metadata(path)["interop.spec"]) == conv.spec
  with pytest.raises(ValueError, match="metadata is stored in safetensors files only"):
    interop.save_state_dict(_sd(), tmp_path / "x.pt", metadata={"a": "b"})


def test_safetensors_path_needs_no_torch(tmp_path):
  """With torch unimportable: read, convert both ways (numpy out), write, read back."""
  path = tmp_path / "model.safetensors"
  interop.save_state_dict(_sd(), path)
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # any `import torch` now fails
      import interop
      sd = interop.load_state_dict({str(path)!r})
      conv = interop.from_torch(sd, layout="flax")
      back = interop.to_torch(*conv, tensors="numpy")
      interop.save_state_dict(back, {str(tmp_path / 'again.safetensors')!r})
      assert interop.diff_state_dicts(interop.load_state_dict({str(tmp_path / 'again.safetensors')!r}), sd) == []
      print("ok", sorted(conv.masks["0"]), "torch" not in [m for m in sys.modules if sys.modules[m] is not None])
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["ok", "['bias',", "'kernel']", "True"]


def _leftovers(folder) -> list:
  return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"old checkpoint")
  with pytest.raises(RuntimeError, match="boom"):
    with interop.atomic_write(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half of a new check")
      raise RuntimeError("boom")
  assert path.read_bytes() == b"old checkpoint"
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix,writer", [(".safetensors", "interop.io.write_safetensors"), (".pt", "torch.save")])
def test_save_state_dict_failing_mid_write(tmp_path, monkeypatch, suffix, writer):
  """A disk that fills up half way: no partial checkpoint, no temp file, no missing old file."""
  path = tmp_path / f"model{suffix}"
  fresh = tmp_path / f"new{suffix}"
  interop.save_state_dict(_sd(), path)
  before = path.read_bytes()

  def full_disk(_, target, *__, **___):
    with open(target, "wb") as f:
      f.write(before[:len(before) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")

  module_name, attr = writer.rsplit(".", 1)
  monkeypatch.setattr(sys.modules[module_name], attr, full_disk)
  for target in (path, fresh):
    with pytest.raises(OSError, match="No space left"):
      interop.save_state_dict(_sd(), target)
  assert path.read_bytes() == before
  assert not fresh.exists()
  assert _leftovers(tmp_path) == []


def test_written_files_get_usual_permissions(tmp_path):
  umask = os.umask(0)
  os.umask(umask)
  path = tmp_path / "model.safetensors"
  interop.save_state_dict({"w": np.zeros(2, np.float32)}, path)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  path.chmod(0o640)
  interop.save_state_dict({"w": np.ones(2, np.float32)}, path)
  assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
