"""The issue's proof: the tutorial's LeNet and a ResNet-18, pruned by torch.nn.utils.prune (local, global,
structured, iterative), converted to Flax layout and run through the Flax twins: torch's outputs within 1e-5;
converted back: torch's state_dict key for key, bit for bit; loaded into a fresh torch model: torch's outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from interop import flax_models, models

NUM_CLASSES = 10
INPUT = {"lenet": (2, 1, 32, 32), "resnet18": (2, 3, 32, 32)}
TORCH_MODELS = {"lenet": models.LeNet, "resnet18": functools.partial(models.ResNet18, num_classes=NUM_CLASSES)}
FLAX_MODELS = {"lenet": flax_models.LeNet(), "resnet18": flax_models.ResNet18(num_classes=NUM_CLASSES)}


@functools.lru_cache(maxsize=None)
def flax_apply(name: str):
  """One jitted apply per model, shared by every case (compiling ResNet-18 takes seconds)."""
  return jax.jit(FLAX_MODELS[name].apply)


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _weights(model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> list:
  return [(m, "weight") for m in model.modules() if isinstance(m, kinds)]


def _local(model):
  for module, name in _weights(model):
    prune.l1_unstructured(module, name, 0.3)
  prune.random_unstructured(model.fc3 if hasattr(model, "fc3") else model.fc, "bias", 0.5)


def _global(model):
  prune.global_unstructured(_weights(model), pruning_method=prune.L1Unstructured, amount=0.2)


def _structured(model):
  for module, name in _weights(model, nn.Conv2d):
    prune.ln_structured(module, name, 0.25, n=2, dim=0)
  prune.random_structured(model.fc1 if hasattr(model, "fc1") else model.fc, "weight", 0.3, dim=1)


def _iterative(model):
  """The tutorial's sequence on the first conv, then a global pass over it and the last layer (container steps)."""
  prune.random_unstructured(model.conv1, "weight", 0.3)
  if model.conv1.bias is not None:
    prune.l1_unstructured(model.conv1, "bias", 3)
  else:
    prune.l1_unstructured(model.bn1, "weight", 3)  # ResNet's conv1 has no bias: prune a BatchNorm scale
  prune.ln_structured(model.conv1, "weight", 0.5, n=2, dim=0)
  last = model.fc3 if hasattr(model, "fc3") else model.fc
  prune.global_unstructured([(model.conv1, "weight"), (last, "weight")], pruning_method=prune.L1Unstructured,
                            amount=0.2)


PRUNINGS = {"local": _local, "global": _global, "structured": _structured, "iterative": _iterative}


def _pruned(name: str, how: str) -> nn.Module:
  torch.manual_seed(0)
  model = TORCH_MODELS[name]()
  if name == "resnet18":  # real BatchNorm statistics, so eval-mode BN is not the identity
    model.train()
    with torch.no_grad():
      for _ in range(2):
        model(torch.randn(8, 3, 32, 32))
  PRUNINGS[how](model)
  return model.eval()


@pytest.mark.parametrize("how", sorted(PRUNINGS))
@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_pruned_model_converts_runs_and_comes_back(name, how):
  model = _pruned(name, how)
  x = torch.randn(INPUT[name], generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = model(x)
  sd = model.state_dict()

  conv = interop.from_torch(sd, layout="flax", module=model)
  assert interop.from_torch(sd, layout="flax").spec == conv.spec  # the kinds inferred without the module agree
  out = flax_apply(name)(conv.variables(), _nhwc(x))
  np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)

  back = interop.to_torch(*conv)
  assert interop.diff_state_dicts(back, sd) == []

  fresh = interop.load_pruned(TORCH_MODELS[name]().eval(), back)
  with torch.no_grad():
    assert torch.equal(fresh(x), expected)
  assert interop.diff_state_dicts(fresh.state_dict(), sd, order=False) == []

  plain = TORCH_MODELS[name]().eval()
  plain.load_state_dict(interop.to_torch(*conv, permanent=True))
  with torch.no_grad():
    assert torch.equal(plain(x), expected)


@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_flax_shaped_variables_load_into_the_torch_model(name):
  """Flax -> torch with neither spec nor module: keys, shapes and axes come from the Flax names alone."""
  x = torch.randn(INPUT[name], generator=torch.Generator().manual_seed(2))
  shapes = jax.eval_shape(FLAX_MODELS[name].init, jax.random.key(0), _nhwc(x))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if "var" in str(path[-1])
                                  else rng.normal(0, 0.1, s.shape), jnp.float32), shapes)
  sd = interop.to_torch(variables["params"], None, {k: v for k, v in variables.items() if k != "params"},
                        layout="flax")
  model = TORCH_MODELS[name]().eval()
  result = model.load_state_dict(sd, strict=False)
  assert result.unexpected_keys == []
  assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)  # Flax does not count batches
  with torch.no_grad():
    expected = model(x)
  np.testing.assert_allclose(flax_apply(name)(variables, _nhwc(x)), expected.numpy(), rtol=1e-5, atol=1e-5)
