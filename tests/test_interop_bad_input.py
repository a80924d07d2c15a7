"""Every bad input of the issue: a clear error that names the key (or file), and nothing lost or half-done."""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from interop import layouts


def _pruned_sd() -> dict:
  torch.manual_seed(0)
  net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
  prune.l1_unstructured(net[0], "weight", 0.5)
  return net.state_dict()


CONVERTERS = {
    "from_torch": interop.from_torch,
    "validate_state_dict": interop.validate_state_dict,
    "permanent_state_dict": interop.permanent_state_dict,
    "load_pruned": lambda sd: interop.load_pruned(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), sd),
}


@pytest.mark.parametrize("convert", sorted(CONVERTERS))
@pytest.mark.parametrize("missing", ["0.weight_mask", "0.weight_orig"])
def test_orphan_orig_or_mask(convert, missing):
  sd = _pruned_sd()
  del sd[missing]
  other = "0.weight_orig" if missing == "0.weight_mask" else "0.weight_mask"
  with pytest.raises(interop.PairingError, match=f"'{other}'.*'{missing}'"):
    CONVERTERS[convert](sd)


@pytest.mark.parametrize("convert", sorted(CONVERTERS))
def test_mask_shape_mismatch(convert):
  sd = _pruned_sd()
  sd["0.weight_mask"] = torch.ones(3, 5)
  with pytest.raises(interop.MaskError, match=r"'0.weight_mask' has shape \(3, 5\).*'0.weight_orig'.*\(3, 4\)"):
    CONVERTERS[convert](sd)


@pytest.mark.parametrize("convert", ["from_torch", "validate_state_dict", "load_pruned"])
@pytest.mark.parametrize("bad", [0.5, -0.0, float("nan"), 2.0])
def test_non_binary_mask(convert, bad):
  """custom_from_mask accepts 0.5 (spec §3.6); a bool mask cannot hold it, nor -0.0's sign bit, nor NaN."""
  net = nn.Linear(4, 3)
  mask = torch.ones(3, 4)
  mask[1, 2] = bad
  prune.custom_from_mask(net, "weight", mask)
  sd = {f"0.{k}": v for k, v in net.state_dict().items()}
  with pytest.raises(interop.MaskError, match=r"'0.weight_mask' holds .* at index \(1, 2\)"):
    CONVERTERS[convert](sd)


def test_load_pruned_changes_nothing_when_the_input_is_bad():
  model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
  before = {k: v.clone() for k, v in model.state_dict().items()}
  sd = _pruned_sd()
  sd["0.weight_mask"][0, 0] = 0.5
  with pytest.raises(interop.MaskError):
    interop.load_pruned(model, sd)
  assert not prune.is_pruned(model)
  assert interop.diff_state_dicts(model.state_dict(), before) == []


def test_load_pruned_module_without_that_parameter():
  with pytest.raises(interop.LayoutError, match="'0.weight_orig'.*no submodule '0'"):
    interop.load_pruned(nn.Linear(4, 3), _pruned_sd())


def test_layout_rule_that_does_not_fit():
  """A rule forced by `where` onto a tensor of the wrong rank."""
  with pytest.raises(interop.LayoutError, match=r"rule 'conv' for module '0' expects '0.weight_orig' to be 3 or 4 "
                                                r"or 5-d.*\(3, 4\)"):
    interop.from_torch(_pruned_sd(), layout="flax", rules=[layouts.rule_for("conv", r"^0$")])


def test_module_that_does_not_fit_the_state_dict():
  sd = _pruned_sd()
  with pytest.raises(interop.LayoutError, match=r"'2.weight' has shape \(2, 3\).*'2.weight' has shape \(5, 3\)"):
    interop.from_torch(sd, module=nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5)))
  with pytest.raises(interop.LayoutError, match="'2.bias': module '2' \\(Linear\\) has no parameter or buffer"):
    interop.from_torch(sd, module=nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False)))


def test_duplicate_keys_after_conversion():
  sd = _pruned_sd()
  sd["0.weight"] = torch.zeros(3, 4)  # the pair and the plain tensor would both become 0.weight
  with pytest.raises(interop.DuplicateKeyError, match="'0.weight_orig' and '0.weight'"):
    interop.from_torch(sd)
  clash = {"fc.weight": torch.zeros(2, 3), "fc.kernel": torch.zeros(3, 2)}  # Flax's name for fc.weight is taken
  with pytest.raises(interop.DuplicateKeyError,
                     match="'fc.weight' and 'fc.kernel' would both become 'params/fc/kernel'"):
    interop.from_torch(clash, layout="flax", rules=[layouts.rule_for("linear", "^fc$")])
  nested = {"a": torch.zeros(2), "a.b": torch.zeros(2)}  # a leaf where a subtree must go
  with pytest.raises(interop.DuplicateKeyError, match="'a' would become the leaf 'params/a'"):
    interop.from_torch(nested)


def test_pytrees_that_do_not_match_the_spec():
  conv = interop.from_torch(_pruned_sd(), layout="flax")
  extra = {**conv.params, "new": {"kernel": np.zeros((2, 2), np.float32)}}
  with pytest.raises(interop.InteropError, match="'params/new/kernel' has no torch key"):
    interop.to_torch(extra, None, conv.buffers, conv.spec)
  missing = {"0": conv.params["0"]}
  with pytest.raises(interop.InteropError, match="'2.weight' needs the pytree leaf 'params/2/kernel'"):
    interop.to_torch(missing, None, conv.buffers, conv.spec)
  wrong = {**conv.params, "2": {**conv.params["2"], "kernel": np.zeros((2, 3), np.float32)}}
  with pytest.raises(interop.LayoutError, match=r"'2.weight' needs 'params/2/kernel' of shape \(3, 2\)"):
    interop.to_torch(wrong, conv.masks, conv.buffers, conv.spec)


def test_float64_needs_x64():
  with pytest.raises(interop.DTypeError, match="'w' is float64.*jax_enable_x64"):
    interop.from_torch({"w": torch.zeros(3, dtype=torch.float64)})
  with pytest.raises(interop.DTypeError, match="'n' is int64 with values outside int32"):
    interop.from_torch({"n": torch.tensor([2 ** 40])})


@pytest.fixture(name="pt_file")
def _pt_file(tmp_path):
  path = tmp_path / "model.pt"
  torch.save(_pruned_sd(), path)
  return path


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9])
def test_truncated_torch_checkpoint(pt_file, keep):
  data = pt_file.read_bytes()
  pt_file.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(interop.CheckpointError, match="model.pt"):
    interop.from_torch(pt_file)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_safetensors(tmp_path, keep):
  path = tmp_path / "model.safetensors"
  interop.save_state_dict(_pruned_sd(), path)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(interop.CheckpointError, match="model.safetensors"):
    interop.load_state_dict(path)


def test_corrupt_files(tmp_path, pt_file):
  # Seeded: an unseeded first byte of 0x80 (one run in 256) reads as a pickle's PROTO opcode, a different error.
  rng = np.random.default_rng(0)
  garbage = tmp_path / "garbage.bin"
  garbage.write_bytes(rng.bytes(64))
  assert garbage.read_bytes()[0] != 0x80
  with pytest.raises(interop.CheckpointError, match="garbage.bin: neither a torch checkpoint"):
    interop.load_state_dict(garbage)
  with zipfile.ZipFile(pt_file) as archive:
    names = archive.namelist()
  data = bytearray(pt_file.read_bytes())
  middle = data.find(b"data.pkl") + 40  # flip bytes inside the pickle record
  data[middle:middle + 16] = rng.bytes(16)
  broken = tmp_path / "broken.pt"
  broken.write_bytes(bytes(data))
  assert names
  with pytest.raises(interop.CheckpointError, match="broken.pt"):
    interop.load_state_dict(broken)
  bad_header = tmp_path / "bad.safetensors"
  bad_header.write_bytes((20).to_bytes(8, "little") + b'{"x": "not a tensor"')
  with pytest.raises(interop.CheckpointError, match="bad.safetensors"):
    interop.load_state_dict(bad_header)


class _Payload:
  """What a malicious checkpoint smuggles in: unpickling it would run os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  if container == "zip":
    torch.save({"fc.weight": torch.zeros(2), "x": _Payload(marker)}, path)
  else:
    path.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
  for load in (interop.load_state_dict, interop.from_torch,
               lambda p: interop.load_pruned(nn.Linear(2, 2), p)):
    with pytest.raises(interop.UnsafeCheckpointError, match="evil.pt: refused.*system"):
      load(path)
  assert not marker.exists()


def test_non_tensor_entries_name_the_wrapper_key(tmp_path):
  path = tmp_path / "ckpt.pt"
  torch.save({"epoch": 3, "state_dict": _pruned_sd()}, path)
  with pytest.raises(interop.CheckpointError, match="'epoch' is a int, not a tensor; pass key='state_dict'"):
    interop.load_state_dict(path)
  assert list(interop.load_state_dict(path, key="state_dict")) == list(_pruned_sd())


def _fresh() -> nn.Sequential:
  torch.manual_seed(1)
  return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _extra_key(sd):
  sd["2.scale"] = torch.ones(2)


def _missing_key(sd):
  del sd["2.bias"]


def _wrong_shape(sd):
  sd["2.weight"] = torch.zeros(2, 5)


@pytest.mark.parametrize("spoil", [_extra_key, _missing_key, _wrong_shape])
def test_load_pruned_leaves_the_model_as_it_was_when_loading_fails(spoil):
  """Issue 12.5: torch's loader copies what fits before it raises, and the pruning was already registered."""
  model = _fresh()
  before = {k: v.clone() for k, v in model.state_dict().items()}
  sd = _pruned_sd()
  spoil(sd)
  with pytest.raises(interop.LayoutError, match="'2.scale'|'2.bias'|'2.weight'"):
    interop.load_pruned(model, sd)
  assert not prune.is_pruned(model) and list(model.state_dict()) == list(before)
  assert interop.diff_state_dicts(model.state_dict(), before) == []
  if spoil is not _wrong_shape:  # what does fit still loads when asked to
    interop.load_pruned(model, sd, strict=False)
    assert prune.is_pruned(model)


def test_load_pruned_undoes_its_pruning_when_torch_refuses(monkeypatch):
  """Past the checks, a refusal from torch itself (a custom loading hook, say) still leaves the model unpruned."""
  model = _fresh()
  weight = model[0].weight

  def refuse(*_, **__):
    raise RuntimeError("a hook refused it")

  monkeypatch.setattr(model, "load_state_dict", refuse)
  with pytest.raises(interop.LayoutError, match="a hook refused it"):
    interop.load_pruned(model, _pruned_sd())
  assert not prune.is_pruned(model) and model[0].weight is weight
  assert [name for name, _ in model[0].named_parameters()] == ["weight", "bias"]
