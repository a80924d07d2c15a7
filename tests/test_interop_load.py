"""load_pruned: a pruned state_dict into a fresh torch model in one call (spec §9's wall and its workaround 1)."""
import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import interop
from interop import models


def _pruned_lenet() -> torch.nn.Module:
  torch.manual_seed(0)
  model = models.LeNet()
  prune.l1_unstructured(model.conv1, "weight", 0.4)
  prune.l1_unstructured(model.conv1, "bias", 2)
  prune.ln_structured(model.fc1, "weight", 0.3, n=1, dim=0)
  return model.eval()


def test_plain_load_state_dict_hits_the_wall_and_load_pruned_does_not():
  sd = _pruned_lenet().state_dict()
  with pytest.raises(RuntimeError, match="Missing key"):
    models.LeNet().load_state_dict(sd)
  interop.load_pruned(models.LeNet(), sd)


@pytest.mark.parametrize("source", ["state_dict", ".pt", ".safetensors"])
def test_fresh_model_matches_torch_workaround(tmp_path, source):
  """Same state as spec §9 workaround 1 (identity-prune, then load); same outputs as the pruned model."""
  pruned = _pruned_lenet()
  sd = pruned.state_dict()
  if source != "state_dict":
    path = tmp_path / f"lenet{source}"
    interop.save_state_dict(sd, path)
    sd_or_path = path
  else:
    sd_or_path = sd
  ours = interop.load_pruned(models.LeNet().eval(), sd_or_path)

  reference = models.LeNet().eval()
  for module, name in ((reference.conv1, "weight"), (reference.conv1, "bias"), (reference.fc1, "weight")):
    prune.identity(module, name)
  reference.load_state_dict(sd)
  assert interop.diff_state_dicts(ours.state_dict(), reference.state_dict()) == []

  x = torch.randn(3, 1, 32, 32)
  with torch.no_grad():
    assert torch.equal(ours(x), pruned(x))
  assert torch.equal(ours.conv1.weight, pruned.conv1.weight_orig * pruned.conv1.weight_mask)  # not stale
  copy.deepcopy(ours)  # torch cannot deep-copy a pruned module whose weight is a non-leaf (spec §9)


def test_model_pruned_differently_gets_the_saved_masks():
  """Loading into an already-pruned model overwrites its masks and keeps its hooks (spec §9)."""
  sd = _pruned_lenet().state_dict()
  target = models.LeNet().eval()
  prune.random_unstructured(target.conv1, "weight", 0.9)
  hook = next(iter(target.conv1._forward_pre_hooks.values()))  # pylint: disable=protected-access
  interop.load_pruned(target, sd)
  np.testing.assert_array_equal(target.conv1.weight_mask.numpy(), sd["conv1.weight_mask"].numpy())
  assert hook in target.conv1._forward_pre_hooks.values()  # pylint: disable=protected-access
  assert interop.diff_state_dicts(target.state_dict(), sd, order=False) == []


def test_jax_side_result_loads():
  """A state_dict rebuilt from Flax-layout pytrees (after pruning more in JAX) loads as torch would have it."""
  pruned = _pruned_lenet()
  conv = interop.from_torch(pruned.state_dict(), layout="flax")
  masks = {**conv.masks, "fc3": {**conv.masks["fc3"], "kernel": np.asarray(conv.params["fc3"]["kernel"]) > 0}}
  fresh = interop.load_pruned(models.LeNet().eval(), interop.to_torch(conv.params, masks, conv.buffers, conv.spec))
  prune.custom_from_mask(pruned.fc3, "weight", torch.from_numpy(masks["fc3"]["kernel"].T.copy()))
  x = torch.randn(2, 1, 32, 32)
  with torch.no_grad():
    assert torch.equal(fresh(x), pruned(x))
