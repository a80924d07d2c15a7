"""Sharded checkpoints (interop.shards, issue 10 item 4): an index and its shards, read and written as Hugging Face
does, bit for bit, ties stored once, written whole or not at all, and errors that name the file."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import interop
from interop import io, shards


def _sd(n: int = 6) -> dict:
  """``n`` 1000-byte float32 weights, a bf16-free mix of dtypes, and ``head.weight`` tied to ``l0.weight``."""
  rng = np.random.default_rng(0)
  sd = {f"l{i}.weight": rng.standard_normal((10, 25)).astype(np.float32) for i in range(n)}
  sd["l0.steps"] = np.arange(5, dtype=np.int64)
  sd["head.weight"] = sd["l0.weight"]
  return sd


def _same(a: dict, b: dict) -> None:
  assert interop.diff_state_dicts(a, b) == []  # keys, order, dtypes, shapes and bits


def test_safetensors_shards_round_trip_with_the_index_hugging_face_writes(tmp_path):
  sd = _sd()
  index = shards.save(sd, tmp_path / "out", max_shard_size="2.1KB")
  assert index == str(tmp_path / "out" / "model.safetensors.index.json")
  names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  assert sorted(os.listdir(tmp_path / "out")) == sorted([*names, "model.safetensors.index.json"])
  data = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  # two 1000-byte weights a shard; the tied key is stored once, with l0.weight, and the index does not list it
  assert data["weight_map"] == {"l0.weight": names[0], "l1.weight": names[0], "l2.weight": names[1],
                                "l3.weight": names[1], "l4.weight": names[2], "l5.weight": names[2],
                                "l0.steps": names[2]}
  assert data["metadata"]["total_size"] == 6 * 1000 + 40
  assert list(io.read_header(tmp_path / "out" / names[0]).tensors) == ["l0.weight", "l1.weight"]
  for path in (index, tmp_path / "out"):  # the index or its folder
    back = interop.load_state_dict(path)
    _same(back, sd)
    assert back["head.weight"] is back["l0.weight"]  # the tie is back
  _same(interop.load_state_dict(tmp_path / "out", mmap=True), sd)


def test_torch_shards_keep_ties_and_are_read_safely(tmp_path):
  sd = {k: torch.from_numpy(v) for k, v in _sd().items()}
  sd["head.weight"] = sd["l0.weight"]
  index = tmp_path / "pt" / "pytorch_model.bin.index.json"
  interop.save_state_dict(sd, index, max_shard_size=2100)
  data = json.loads(index.read_text())
  assert data["weight_map"]["head.weight"] == data["weight_map"]["l0.weight"] == "pytorch_model-00001-of-00003.bin"
  back = interop.load_state_dict(index, mmap=True)
  _same(back, sd)
  assert interop.ties.find_ties(back) == (("l0.weight", "head.weight"),)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with open(tmp_path / "pt" / "pytorch_model-00002-of-00003.bin", "wb") as f:
    pickle.dump({"l2.weight": Evil()}, f, protocol=2)
  with pytest.raises(interop.UnsafeCheckpointError, match="pytorch_model-00002-of-00003.bin: refused"):
    interop.load_state_dict(index)


def test_a_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
  sd = {"small": np.zeros(10, np.float32), "big": np.zeros(1000, np.float32), "tail": np.zeros(10, np.float32)}
  assert shards.plan(sd, 100) == [["small"], ["big"], ["tail"]]
  assert shards.plan(sd, 10**6) == [["small", "big", "tail"]]


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                       ("10kib", 10240), ("1.5GB", 1_500_000_000), ("1000", 1000), (7, 7)])
def test_shard_sizes_read_as_hugging_face_writes_them(text, size):
  assert shards.parse_size(text) == size


@pytest.mark.parametrize("text", ["5 parsecs", "", "-1MB", "0", True, 1.5])
def test_bad_shard_sizes_are_refused(text):
  with pytest.raises(ValueError, match="shard size|size is"):
    shards.parse_size(text)


@pytest.fixture()
def sharded(tmp_path):
  shards.save(_sd(), tmp_path / "ck", max_shard_size="2.1KB")
  return tmp_path / "ck"


def _index(folder) -> dict:
  return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder, data) -> None:
  (folder / "model.safetensors.index.json").write_text(json.dumps(data))


def test_a_missing_shard_is_named(sharded):
  os.remove(sharded / "model-00002-of-00003.safetensors")
  with pytest.raises(interop.CheckpointError, match=r"shard model-00002-of-00003.safetensors is missing.*'l2.weight'"):
    interop.load_state_dict(sharded)


def test_a_key_missing_from_its_shard_names_the_shard_and_the_key(sharded):
  data = _index(sharded)
  data["weight_map"]["l9.weight"] = "model-00003-of-00003.safetensors"
  _write_index(sharded, data)
  with pytest.raises(interop.CheckpointError,
                     match=r"model-00003-of-00003.safetensors: the index .* places tensor 'l9.weight' in this shard"):
    interop.load_state_dict(sharded)


def test_a_tensor_the_index_does_not_list_or_places_elsewhere_is_refused(sharded):
  data = _index(sharded)
  del data["weight_map"]["l3.weight"]
  _write_index(sharded, data)
  with pytest.raises(interop.CheckpointError, match="00002-of-00003.safetensors: tensor 'l3.weight' is not in the"):
    interop.load_state_dict(sharded)
  first = sharded / "model-00001-of-00003.safetensors"  # l3.weight in two shards, the index naming the first
  interop.save_state_dict({**interop.load_state_dict(first), "l3.weight": np.ones((10, 25), np.float32)}, first)
  data["weight_map"]["l3.weight"] = "model-00001-of-00003.safetensors"
  _write_index(sharded, data)
  with pytest.raises(interop.CheckpointError, match="00002-of-00003.safetensors: tensor 'l3.weight' is in this shard"
                     ", but the index .* places it in model-00001-of-00003.safetensors"):
    interop.load_state_dict(sharded)


def test_a_truncated_shard_is_named(sharded):
  shard = sharded / "model-00003-of-00003.safetensors"
  os.truncate(shard, os.path.getsize(shard) - 100)
  with pytest.raises(interop.CheckpointError, match="model-00003-of-00003.safetensors: corrupt safetensors header"):
    interop.load_state_dict(sharded, mmap=True)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "cannot read it as a JSON index"), ('{"metadata": {}}', "not an index of shards"),
    ('{"weight_map": {"a": "../x.safetensors"}}', "'../x.safetensors' is not a file name beside the index")])
def test_bad_indexes_are_refused_naming_the_index(tmp_path, content, needle):
  (tmp_path / "model.safetensors.index.json").write_text(content)
  with pytest.raises(interop.CheckpointError, match=f"model.safetensors.index.json: .*{needle}"):
    interop.load_state_dict(tmp_path)


def test_a_failed_write_leaves_the_old_set_and_no_temporary_files(sharded, monkeypatch):
  before = {name: (sharded / name).read_bytes() for name in os.listdir(sharded)}
  calls = []

  def fail_on_second(arrays, path, metadata, done=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    real(arrays, path, metadata, done)

  real = io.write_safetensors
  monkeypatch.setattr(io, "write_safetensors", fail_on_second)
  with pytest.raises(OSError, match="No space left"):
    shards.save({k: v * 2 for k, v in _sd().items()}, sharded, max_shard_size="2.1KB")
  assert {name: (sharded / name).read_bytes() for name in os.listdir(sharded)} == before
  assert sorted(os.listdir(sharded.parent)) == ["ck"]


def test_a_write_replaces_a_sharded_checkpoint_whole_but_never_a_folder_with_other_files(sharded):
  shards.save(_sd(2), sharded, max_shard_size="1MB")  # three shards become one: no stale shard is left behind
  assert sorted(os.listdir(sharded)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
  (sharded / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="holds files that are not part of a sharded checkpoint \\(config.json\\)"):
    shards.save(_sd(), sharded)
  assert (sharded / "config.json").exists()


def test_hugging_face_reads_what_interop_writes_and_the_reverse(tmp_path):
  """GPT-2 (its lm_head tied to the token embedding) through save_pretrained's shards and ours."""
  transformers = pytest.importorskip("transformers")
  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=16)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  assert len(set(shards.read_index(shards.find_index(str(tmp_path / "hf"))).weight_map.values())) > 1
  theirs = interop.load_state_dict(tmp_path / "hf", mmap=True)
  expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # HF stores a tie once
  assert sorted(theirs) == sorted(expected)
  assert all(torch.equal(torch.as_tensor(np.asarray(theirs[k])), v) for k, v in expected.items())

  shards.save(model.state_dict(), tmp_path / "ours", max_shard_size="20KB")
  assert len(os.listdir(tmp_path / "ours")) > 3
  (tmp_path / "ours" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
  loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
  tokens = torch.arange(12).reshape(2, 6)
  with torch.no_grad():
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_from_torch_and_load_pruned_take_a_sharded_checkpoint(tmp_path):
  net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
  prune.l1_unstructured(net[0], "weight", 0.5)
  interop.save_state_dict(net.state_dict(), tmp_path / "one.safetensors")
  interop.save_state_dict(net.state_dict(), tmp_path / "sharded", max_shard_size=200)
  assert len(os.listdir(tmp_path / "sharded")) > 2
  whole, sharded = (interop.from_torch(str(tmp_path / p), layout="flax") for p in ("one.safetensors", "sharded"))
  assert sharded.spec == whole.spec
  _same(interop.to_torch(*sharded, tensors="numpy"), interop.to_torch(*whole, tensors="numpy"))
  fresh = interop.load_pruned(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
                              str(tmp_path / "sharded"))
  assert torch.equal(fresh[0].weight, net[0].weight)
