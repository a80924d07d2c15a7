"""Flax layout: each torch layer's tensors land where the Flax module expects them, and compute the same thing.

The oracle is torch's own forward: the converted params run through the matching flax.linen module (with the
masks applied) and must give torch's output within 1e-5.
"""
import flax.linen as fnn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from interop import layouts


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.permute(0, *range(2, x.dim()), 1).numpy())


def _bn() -> nn.Module:
  bn = nn.BatchNorm2d(4)
  bn.train()
  with torch.no_grad():
    bn(torch.randn(8, 4, 3, 3) * 3 + 1)  # non-trivial running statistics
  prune.l1_unstructured(bn, "weight", 1)
  return bn.eval()


# torch layer, its input, the Flax module, and how torch's output compares to Flax's (channels last).
CASES = {
    "linear": (lambda: nn.Linear(5, 3), (2, 5), lambda: fnn.Dense(3), lambda x: jnp.asarray(x.numpy()), None),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 7), lambda: fnn.Conv(4, (3,), padding="VALID"), _nhwc, _nhwc),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), stride=2), (2, 3, 7, 6),
               lambda: fnn.Conv(4, (3, 2), strides=2, padding="VALID"), _nhwc, _nhwc),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 3), lambda: fnn.Conv(3, (2, 2, 2), padding="VALID"),
               _nhwc, _nhwc),
    "grouped_conv": (lambda: nn.Conv2d(4, 6, 3, groups=2), (1, 4, 5, 5),
                     lambda: fnn.Conv(6, (3, 3), feature_group_count=2, padding="VALID"), _nhwc, _nhwc),
    "batchnorm": (_bn, (2, 4, 3, 3), lambda: fnn.BatchNorm(use_running_average=True, epsilon=1e-5), _nhwc, _nhwc),
    "layernorm": (lambda: nn.LayerNorm(6), (2, 6), lambda: fnn.LayerNorm(epsilon=1e-5),
                  lambda x: jnp.asarray(x.numpy()), None),
    "embedding": (lambda: nn.Embedding(7, 3), None, lambda: fnn.Embed(7, 3), None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_runs_in_flax_like_in_torch(case):
  make, shape, flax_module, to_flax_input, to_flax_output = CASES[case]
  torch.manual_seed(0)
  layer = make()
  if case != "batchnorm":
    prune.l1_unstructured(layer, "weight", 0.3)
  x = torch.randint(0, 7, (2, 4)) if case == "embedding" else torch.randn(shape)
  with torch.no_grad():
    expected = layer(x)
  conv = interop.from_torch(layer.state_dict(), layout="flax", module=layer)
  flax_x = jnp.asarray(x.numpy()) if case == "embedding" else to_flax_input(x)
  out = flax_module().apply(conv.variables(), flax_x)
  expected = (to_flax_output or (lambda t: jnp.asarray(t.numpy())))(expected)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert interop.diff_state_dicts(interop.to_torch(*conv), layer.state_dict()) == []


def test_masks_move_with_their_params():
  conv2d = nn.Conv2d(3, 4, (3, 2))
  prune.ln_structured(conv2d, "weight", 0.5, n=2, dim=1)
  conv = interop.from_torch(conv2d.state_dict(), layout="flax")
  np.testing.assert_array_equal(conv.masks["kernel"], conv2d.weight_mask.permute(2, 3, 1, 0).numpy() != 0)
  assert conv.params["kernel"].shape == conv.masks["kernel"].shape == (3, 2, 3, 4)


def test_embedding_needs_the_module_or_a_rule():
  """A 2-d weight alone reads as a Linear; the module's type or a `where` rule makes it an Embed."""
  net = nn.ModuleDict({"tok": nn.Embedding(7, 3), "head": nn.Linear(3, 7)})
  sd = net.state_dict()
  assert set(interop.from_torch(sd, layout="flax").params["tok"]) == {"kernel"}
  by_module = interop.from_torch(sd, layout="flax", module=net)
  by_rule = interop.from_torch(sd, layout="flax", rules=[layouts.rule_for("embedding", r"^tok$")])
  assert by_rule.spec == by_module.spec
  np.testing.assert_array_equal(by_module.params["tok"]["embedding"], sd["tok.weight"].numpy())
  np.testing.assert_array_equal(by_module.params["head"]["kernel"], sd["head.weight"].numpy().T)
  # Back without spec or module: Flax's "embedding" name is unambiguous.
  back = interop.to_torch(by_module.params, by_module.masks, layout="flax")
  assert interop.diff_state_dicts(back, sd, order=False) == []


class Gate(nn.Module):
  """A user module torch and Flax know nothing about."""

  def __init__(self):
    super().__init__()
    self.w = nn.Parameter(torch.randn(4, 3))
    self.g = nn.Parameter(torch.randn(4))
    self.register_buffer("calls", torch.tensor(5))


GATE_RULE = interop.LayoutRule("gate", {
    "w": interop.TensorMap("params", "kernel", interop.LINEAR, ndims=(2,)),
    "g": interop.TensorMap("params", "gate"),
    "calls": interop.TensorMap("counters", "calls"),
}, torch_types=("Gate",))


def test_user_rule_for_a_custom_module():
  net = nn.Sequential(Gate(), nn.Linear(4, 2))
  prune.l1_unstructured(net[0], "w", 0.5)
  sd = net.state_dict()
  conv = interop.from_torch(sd, layout="flax", module=net, rules=[GATE_RULE])
  assert conv.params["0"]["kernel"].shape == (3, 4) and "gate" in conv.params["0"]
  assert int(conv.buffers["counters"]["0"]["calls"]) == 5
  np.testing.assert_array_equal(conv.masks["0"]["kernel"], net[0].w_mask.numpy().T != 0)
  assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []
  without = interop.from_torch(sd, layout="flax", module=net)  # no rule: torch's names and shapes are kept
  assert without.params["0"]["w"].shape == (4, 3) and "calls" in without.buffers["buffers"]["0"]



def _inferred(shapes: dict) -> tuple[dict, tuple]:
  """Module path -> kind inferred for a bare state_dict of zeros of these shapes, and the spec's doubts."""
  spec = interop.from_torch({k: np.zeros(s, np.float32) for k, s in shapes.items()}, layout="flax").spec
  kinds = {e.key.rpartition(".")[0]: "/".join(e.path[-1:]) + ("^T" if e.perm else "") for e in spec.entries
           if e.key.endswith("weight")}
  return kinds, spec.uncertain


def test_inference_without_a_module_reads_shapes_names_and_neighbours():
  kinds, doubts = _inferred({"blk.a.weight": (4, 12), "blk.a.bias": (12,),  # bias = axis 1: a Conv1D, by shape
                             "blk.b.weight": (4, 4), "blk.b.bias": (4,),  # square: like its sibling
                             "tok.weight": (9, 4),  # bare 2-d, no telling name: a Linear, in doubt
                             "other.weight": (4, 4), "other.bias": (4,)})  # square, no sibling: in doubt
  assert kinds == {"blk.a": "kernel", "blk.b": "kernel", "tok": "kernel^T", "other": "kernel^T"}
  assert [key for key, _ in doubts] == ["tok.weight", "other.weight", "other.bias"]
  assert "could be conv1d_hf" in dict(doubts)["other.weight"]
  kinds, doubts = _inferred({"word_embeddings.weight": (9, 4), "fc.weight": (3, 4), "fc.bias": (3,),
                             "square.weight": (4, 4), "square.bias": (4,), "out.weight": (9, 4)})
  assert kinds == {"word_embeddings": "embedding", "fc": "kernel^T", "square": "kernel^T", "out": "embedding"}
  assert [key for key, _ in doubts] == ["out.weight"]  # taken for an embedding by its vocabulary-sized axis
  with pytest.raises(ValueError, match="unknown layout kind 'dense'"):
    interop.rule_for("dense", "x")
