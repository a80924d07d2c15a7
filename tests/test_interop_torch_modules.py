"""torchvision's architectures and torch's own attention and recurrent modules through interop and the CLI.

torchvision cannot be installed beside torch 2.13.0 here, so the models below are replicas, small widths, of
torchvision's MobileNetV3 and EfficientNet (``features.N[.M].block.K`` ``Conv2dNormActivation`` blocks with
depthwise convs, ``SqueezeExcitation`` ``fc1``/``fc2`` 1x1 convs) and VisionTransformer (``conv_proj``,
``class_token``, ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_i`` with torch's own
``nn.MultiheadAttention`` as ``self_attention``, ``mlp.0``/``mlp.3``, ``heads.head``), built from torch.nn with the
module structure, init-independent shapes and state_dict names of torchvision's source
(torchvision/models/mobilenetv3.py, efficientnet.py, vision_transformer.py, torchvision/ops/misc.py), and a tagger
with ``nn.Embedding``, a 2-layer bidirectional ``nn.LSTM`` and a Linear head.

Each is pruned by torch (global L1 over every weight, ``in_proj_weight`` and the LSTM's ``weight_ih_l*`` /
``weight_hh_l*`` included; ``ln_structured`` on convs; an iterative sequence on one tensor; a 1-d tensor) and
checked against torch itself: every key accounted for, the Flax layout of every module kind, bit-identical round
trips in both layouts (file order included), ``load_pruned`` and ``permanent=True`` outputs equal to the pruned
model's, jaxprune's global L1 masks equal to torch's, and the CLI on the same files.
"""
import json
from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util
from torch import nn
from torch.nn.utils import prune

import interop
import jaxprune
from jaxprune import cli


def _divisible(v: float, d: int = 8) -> int:
  """torchvision's ``_make_divisible``: the squeeze width of a SqueezeExcitation."""
  new = max(d, int(v + d / 2) // d * d)
  return new + d if new < 0.9 * v else new


class Conv2dNormActivation(nn.Sequential):
  """torchvision.ops.Conv2dNormActivation: ``0`` a bias-free conv, ``1`` a BatchNorm, ``2`` the activation."""

  def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, eps=1e-3):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps, momentum=0.01)]
    super().__init__(*layers, *([act(inplace=True)] if act is not None else []))


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation: ``fc1``/``fc2`` are 1x1 convs with biases."""

  def __init__(self, cin, squeeze, act=nn.ReLU, scale_act=nn.Hardsigmoid):
    super().__init__()
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc1 = nn.Conv2d(cin, squeeze, 1)
    self.fc2 = nn.Conv2d(squeeze, cin, 1)
    self.activation = act()
    self.scale_activation = scale_act()

  def forward(self, x):
    return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class InvertedResidual(nn.Module):
  """MobileNetV3's (and, with SiLU and SE in every block, EfficientNet's MBConv) ``block``: expand (when wider),
  depthwise (groups = channels), SqueezeExcitation, project (no activation)."""

  def __init__(self, cin, k, exp, cout, se, act, stride, se_act=nn.ReLU, scale_act=nn.Hardsigmoid, squeeze=None):
    super().__init__()
    self.use_res_connect = stride == 1 and cin == cout
    layers = [Conv2dNormActivation(cin, exp, 1, act=act)] if exp != cin else []
    layers.append(Conv2dNormActivation(exp, exp, k, stride, groups=exp, act=act))
    if se:
      layers.append(SqueezeExcitation(exp, squeeze or _divisible(exp // 4), se_act, scale_act))
    layers.append(Conv2dNormActivation(exp, cout, 1, act=None))
    self.block = nn.Sequential(*layers)

  def forward(self, x):
    y = self.block(x)
    return y + x if self.use_res_connect else y


class MobileNetV3(nn.Module):
  """mobilenet_v3_small's stem, its three kinds of bottleneck, narrower (SE without expansion, expansion without
  SE, both with hardswish), the last 1x1 conv (6x) and classifier.0/.3."""

  def __init__(self, classes=10):
    super().__init__()
    setting = [(16, 3, 16, 16, True, nn.ReLU, 2), (16, 3, 24, 16, False, nn.ReLU, 1),
               (16, 5, 40, 24, True, nn.Hardswish, 2)]
    self.features = nn.Sequential(Conv2dNormActivation(3, 16, 3, 2, act=nn.Hardswish),
                                  *(InvertedResidual(*c) for c in setting),
                                  Conv2dNormActivation(24, 144, 1, act=nn.Hardswish))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Sequential(nn.Linear(144, 32), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                    nn.Linear(32, classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNet(nn.Module):
  """efficientnet_b0's layout: stages are Sequentials of MBConvs (``features.1.0.block.1.fc1``), SiLU, SE squeeze
  = input channels / 4, ``classifier.1`` after a Dropout."""

  def __init__(self, classes=10):
    super().__init__()
    mb = partial(InvertedResidual, act=nn.SiLU, se=True, se_act=nn.SiLU, scale_act=nn.Sigmoid)
    self.features = nn.Sequential(
        Conv2dNormActivation(3, 16, 3, 2, act=nn.SiLU, eps=1e-5),
        nn.Sequential(mb(16, 3, 16, 8, stride=1, squeeze=4)),
        nn.Sequential(mb(8, 3, 48, 16, stride=2, squeeze=2), mb(16, 3, 96, 16, stride=1, squeeze=4)),
        Conv2dNormActivation(16, 64, 1, act=nn.SiLU, eps=1e-5))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EncoderBlock(nn.Module):
  def __init__(self, heads, dim, mlp):
    super().__init__()
    self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
    self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
    self.dropout = nn.Dropout(0.0)
    self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
    # torchvision's MLPBlock (an ops.MLP): Linear, GELU, Dropout, Linear, Dropout
    self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0))

  def forward(self, inp):
    x = self.ln_1(inp)
    x, _ = self.self_attention(x, x, x, need_weights=False)
    x = self.dropout(x) + inp
    return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
  def __init__(self, seq, layers, heads, dim, mlp):
    super().__init__()
    self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
    self.dropout = nn.Dropout(0.0)
    self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp))
                                            for i in range(layers)))
    self.ln = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):
    return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
  """vit_b_16's layout at 16x16 pixels, patch 4, width 16, 2 layers."""

  def __init__(self, image=16, patch=4, layers=2, heads=2, dim=16, mlp=24, classes=10):
    super().__init__()
    self.dim = dim
    self.conv_proj = nn.Conv2d(3, dim, patch, patch)
    self.class_token = nn.Parameter(torch.randn(1, 1, dim))  # torchvision: zeros; random so pruning has a say
    self.encoder = Encoder((image // patch) ** 2 + 1, layers, heads, dim, mlp)
    self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

  def forward(self, x):
    n = x.shape[0]
    x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
    x = torch.cat([self.class_token.expand(n, -1, -1), x], 1)
    return self.heads(self.encoder(x)[:, 0])


class LSTMTagger(nn.Module):
  def __init__(self, vocab=30, dim=8, hidden=12, classes=5):
    super().__init__()
    self.embedding = nn.Embedding(vocab, dim)
    self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
    self.head = nn.Linear(2 * hidden, classes)

  def forward(self, ids):
    return self.head(self.lstm(self.embedding(ids))[0])


def _fresh(cls, seed=0) -> nn.Module:
  torch.manual_seed(seed)
  model = cls()
  if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
    with torch.no_grad():  # running statistics that are not the init's, and num_batches_tracked > 0
      model.train()(torch.randn(4, 3, 32, 32) * 2 + 0.5)
  return model.eval()


def mobilenet_v3() -> nn.Module:
  return _fresh(MobileNetV3)


def efficientnet() -> nn.Module:
  return _fresh(EfficientNet)


def vit() -> nn.Module:
  return _fresh(VisionTransformer)


def lstm_tagger() -> nn.Module:
  return _fresh(LSTMTagger)


MODELS = {"mobilenet_v3": mobilenet_v3, "efficientnet": efficientnet, "vit": vit, "lstm": lstm_tagger}
torch.manual_seed(123)
INPUTS = {"mobilenet_v3": torch.randn(2, 3, 32, 32), "efficientnet": torch.randn(2, 3, 32, 32),
          "vit": torch.randn(2, 3, 16, 16), "lstm": torch.randint(0, 30, (2, 7))}


def _out(name, model) -> torch.Tensor:
  with torch.no_grad():
    return model(INPUTS[name])


def _weights(model) -> list:
  """(module, name) of every floating parameter with 2 or more dims: what "all weights" means to torch users and
  to the CLI's default selection (conv, linear, embedding, in_proj_weight, the LSTM's weights, class/pos tokens)."""
  return [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False) if p.dim() >= 2]


def torch_pruned(name) -> nn.Module:
  """The model pruned by torch: global L1, then ln_structured on the convs (or a weight), an iterative sequence on
  one tensor, and a 1-d tensor, so plain, re-pruned (PruningContainer) and 1-d masks all occur."""
  model = MODELS[name]()
  prune.global_unstructured(_weights(model), pruning_method=prune.L1Unstructured, amount=0.3)
  convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
  for conv in convs[::2]:
    prune.ln_structured(conv, "weight", 0.25, n=2, dim=0)
  if name == "vit":
    again, one_d = (model.encoder.layers.encoder_layer_1.self_attention, "in_proj_weight"), (
        model.encoder.layers.encoder_layer_0.self_attention, "in_proj_bias")
  elif name == "lstm":
    again, one_d = (model.lstm, "weight_hh_l1_reverse"), (model.lstm, "bias_ih_l0")
    prune.ln_structured(model.lstm, "weight_ih_l1", 0.25, n=1, dim=1)
  else:
    again, one_d = (model.classifier[-1], "weight"), (model.features[0][1], "weight")
  prune.l1_unstructured(*again, amount=0.2)
  prune.ln_structured(*again, amount=0.25, n=1, dim=0)
  prune.random_unstructured(*again, amount=0.1)
  prune.l1_unstructured(*one_d, amount=0.5)
  return model


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


def _torch_tensors(sub) -> dict:
  """local name -> (value X_orig or X, mask or None) of a module's own parameters, as torch holds them."""
  out = {}
  for local, p in sub.named_parameters(recurse=False):
    base = local.removesuffix("_orig")
    mask = getattr(sub, base + "_mask", None) if local.endswith("_orig") else None
    out[base] = (_np(p), None if mask is None else _np(mask) != 0)
  return out


def _expected_flax(model) -> dict:
  """Flax leaf path (collection first for buffers) -> (array, mask or None) for every tensor, from torch's modules
  and Flax's conventions alone (not from interop's spec): Dense/Conv kernels transposed, depthwise convs (k, k, 1, C),
  norms' scale, BatchNorm statistics in batch_stats, and MultiheadAttention's packed projection and the LSTM's
  gates kept as torch names and shapes."""
  out = {}
  for prefix, sub in model.named_modules():
    path = prefix.replace(".", "/")
    join = lambda name: f"{path}/{name}" if path else name  # noqa: E731
    own = _torch_tensors(sub)
    if isinstance(sub, nn.Conv2d):
      w, m = own.pop("weight")
      perm = (2, 3, 1, 0)
      assert w.transpose(perm).shape == (*sub.kernel_size, sub.in_channels // sub.groups, sub.out_channels)
      out[join("kernel")] = (w.transpose(perm), None if m is None else m.transpose(perm))
    elif isinstance(sub, nn.Linear):  # out_proj (NonDynamicallyQuantizableLinear) too
      w, m = own.pop("weight")
      out[join("kernel")] = (w.T, None if m is None else m.T)
    elif isinstance(sub, nn.Embedding):
      out[join("embedding")] = own.pop("weight")
    elif isinstance(sub, (nn.LayerNorm, nn.BatchNorm2d)):
      out[join("scale")] = own.pop("weight")
    if isinstance(sub, nn.BatchNorm2d):
      out["batch_stats/" + join("mean")] = (_np(sub.running_mean), None)
      out["batch_stats/" + join("var")] = (_np(sub.running_var), None)
      out["buffers/" + join("num_batches_tracked")] = (_np(sub.num_batches_tracked), None)
    if isinstance(sub, nn.MultiheadAttention):
      assert set(own) == {"in_proj_weight", "in_proj_bias"} and own["in_proj_weight"][0].shape == (
          3 * sub.embed_dim, sub.embed_dim)
    if isinstance(sub, nn.LSTM):
      assert set(own) == set(sub._flat_weights_names)  # weight_ih_l0, ..., bias_hh_l1_reverse
    for local, value in own.items():  # biases, MultiheadAttention, LSTM, class_token, pos_embedding: as torch
      out[join(local)] = value
  return out


@pytest.mark.parametrize("name", MODELS)
def test_every_key_and_module_kind_lands_where_flax_expects_it(name):
  model = torch_pruned(name)
  sd = model.state_dict()
  bare = interop.from_torch(sd, layout="flax")
  by_module = interop.from_torch(sd, layout="flax", module=model)
  for conv in (bare, by_module):
    assert [e.key for e in conv.spec.entries] == list(sd)  # every key, in order
    assert conv.spec.uncertain == () and conv.spec.ties == ()
  assert bare.spec.entries == by_module.spec.entries  # inference from names and shapes agrees with the classes
  params, masks = _flat(bare.params), _flat(bare.masks)
  leaves = {**params, **{f"{c}/{k}": v for c, tree in bare.buffers.items() for k, v in _flat(tree).items()}}
  expected = _expected_flax(model)
  assert sorted(leaves) == sorted(expected)  # nothing lost, nothing extra
  for path, (value, mask) in expected.items():
    assert leaves[path].shape == value.shape, path
    np.testing.assert_array_equal(np.asarray(leaves[path]), value, err_msg=path)
    if mask is None:
      assert path not in masks or masks[path] is jaxprune.UNMASKED, path
    else:
      np.testing.assert_array_equal(np.asarray(masks[path]), mask, err_msg=path)
  kinds = {type(m).__name__ for m in model.modules()}
  assert kinds >= {"vit": {"MultiheadAttention", "LayerNorm", "Conv2d", "Linear"},
                   "lstm": {"LSTM", "Embedding", "Linear"}}.get(name, {"Conv2d", "BatchNorm2d", "Linear"})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_round_trips_are_bit_identical_file_order_included(name, layout, tmp_path):
  model = torch_pruned(name)
  sd = model.state_dict()
  conv = interop.from_torch(sd, layout=layout)
  assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []
  by_module = interop.to_torch(conv.params, conv.masks, conv.buffers, layout=layout, module=torch_pruned(name))
  assert interop.diff_state_dicts(by_module, sd) == []
  # A never-pruned module gives keys, dtypes and bits; the order of the X_orig keys is the order in which torch
  # pruned them, which only the spec knows (the LSTM's bias_ih_l0 was pruned after its weights)
  unpruned = interop.to_torch(conv.params, conv.masks, conv.buffers, layout=layout, module=MODELS[name]())
  assert interop.diff_state_dicts(unpruned, sd, order=False) == []
  # No spec, no module: keys from the pytree's paths, Flax names mapped back by the rules, JAX's dtypes
  bare = interop.to_torch(conv.params, conv.masks, conv.buffers, layout=layout)
  assert interop.diff_state_dicts(bare, sd, order=False) == [
      f"{k}: dtype int32 vs int64" for k in sd if k.endswith("num_batches_tracked")]
  # A file from safetensors' own save_file (keys sorted) comes back in its own order, bit for bit
  foreign = tmp_path / "foreign.safetensors"
  safetensors.torch.save_file(sd, str(foreign))
  loaded = interop.load_state_dict(foreign)
  assert list(loaded) == list(interop.io.read_header(foreign).tensors) != list(sd)
  back = tmp_path / "back.safetensors"
  interop.save_state_dict(interop.to_torch(*interop.from_torch(loaded, layout=layout)), back)
  assert list(interop.io.read_header(back).tensors) == list(loaded)
  assert interop.diff_state_dicts(interop.load_state_dict(back), loaded) == []


def _removed(name) -> nn.Module:
  """torch's prune.remove on every pruned tensor: the permanent model (a pruned model cannot be deep-copied)."""
  model = torch_pruned(name)
  for m in model.modules():
    for n in [n.removesuffix("_orig") for n, _ in m.named_parameters(recurse=False) if n.endswith("_orig")]:
      prune.remove(m, n)
  return model


@pytest.mark.parametrize("name", MODELS)
def test_load_pruned_and_permanent_give_the_pruned_models_outputs(name):
  model = torch_pruned(name)
  expected = _out(name, model)
  sd = interop.to_torch(*interop.from_torch(model.state_dict(), layout="flax"))
  fresh = interop.load_pruned(MODELS[name](), sd)
  assert torch.equal(_out(name, fresh), expected)
  conv = interop.from_torch(model.state_dict(), layout="flax")
  plain = interop.to_torch(*conv, permanent=True)
  removed = _removed(name)
  assert interop.diff_state_dicts(plain, removed.state_dict(), order=False) == []  # what prune.remove leaves
  loaded = MODELS[name]()
  loaded.load_state_dict(plain)
  assert torch.equal(_out(name, loaded), expected) and torch.equal(_out(name, removed), expected)


@pytest.mark.parametrize("name", ["vit", "lstm"])
def test_global_l1_in_jax_equals_torchs(name):
  """in_proj_weight and the LSTM's gate weights ranked with every other weight, in Flax layout, give torch's
  masks (torch's layout, transposes undone)."""
  model = MODELS[name]()
  conv = interop.from_torch(model.state_dict(), layout="flax")
  masks = jaxprune.global_unstructured(conv.params, 0.3, masks=conv.masks)
  ours = interop.to_torch(conv.params, masks, conv.buffers, conv.spec)
  reference = MODELS[name]()
  prune.global_unstructured(_weights(reference), pruning_method=prune.L1Unstructured, amount=0.3)
  theirs = reference.state_dict()
  assert interop.diff_state_dicts(ours, theirs, order=False) == []
  assert any(k.endswith("in_proj_weight_mask") or k.endswith("weight_hh_l0_mask") for k in ours)


def _cli_json(capsys, *argv) -> dict:
  capsys.readouterr()
  assert cli.main([*map(str, argv), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def _effective_zeros(model) -> dict:
  """torch name -> zeros of each parameter as torch computes it (X_mask * X_orig); buffers are not counted."""
  sd = model.state_dict()
  out = {}
  for key, value in sd.items():
    if key.endswith("_mask") or key.removesuffix("_orig") in dict(model.named_buffers()):
      continue
    base = key.removesuffix("_orig")
    effective = value * sd[base + "_mask"] if key.endswith("_orig") else value
    out[base] = int((effective == 0).sum())
  return out


@pytest.mark.parametrize("name", ["vit", "lstm", "mobilenet_v3"])
def test_cli_inspects_prunes_and_converts_the_same_files(name, tmp_path, capsys):
  model = torch_pruned(name)
  sd = model.state_dict()
  torch.save(sd, tmp_path / "pruned.pt")
  report = _cli_json(capsys, "inspect", tmp_path / "pruned.pt")
  assert {r["name"].removesuffix("_orig"): r["zeros"] for r in report["tensors"]} == _effective_zeros(model)

  # --global l1 on the unpruned file: the CLI's default selection, ranked as torch ranks it
  torch.save(MODELS[name]().state_dict(), tmp_path / "plain.pt")
  pruned = _cli_json(capsys, "prune", tmp_path / "plain.pt", "-o", tmp_path / "g.pt", "--method", "l1", "--global",
                     "--amount", "0.3")
  reference = MODELS[name]()
  assert sorted(pruned["selected"]) == sorted(f"{p}.{n}" if p else n for p, m in reference.named_modules()
                                for n, t in m.named_parameters(recurse=False) if t.dim() >= 2)
  prune.global_unstructured(_weights(reference), pruning_method=prune.L1Unstructured, amount=0.3)
  assert interop.diff_state_dicts(torch.load(tmp_path / "g.pt", weights_only=True), reference.state_dict(),
                                  order=False) == []

  # ln on the torch-pruned file continues torch's pruning (its PruningContainer: amounts of what is left)
  target = {"vit": ("encoder.layers.encoder_layer_0.self_attention", "in_proj_weight"),
            "lstm": ("lstm", "weight_ih_l0"), "mobilenet_v3": ("features.3.block.1.0", "weight")}[name]
  _cli_json(capsys, "prune", tmp_path / "pruned.pt", "-o", tmp_path / "ln.pt", "--method", "ln", "--axis", "0",
            "--amount", "0.25", "--include", rf"^{target[0]}\.{target[1]}$")
  prune.ln_structured(model.get_submodule(target[0]), target[1], 0.25, n=2, dim=0)
  assert interop.diff_state_dicts(torch.load(tmp_path / "ln.pt", weights_only=True), model.state_dict()) == []

  # convert to the Flax layout, sharded, and back: torch's file again, bit for bit; MultiheadAttention and LSTM
  # as torch
  flax_dir = tmp_path / "flax"
  report = _cli_json(capsys, "convert", tmp_path / "pruned.pt", flax_dir, "--layout", "flax", "--max-shard-size",
                     "8KB")
  assert report["uncertain"] == []
  assert len(set(interop.shards.read_index(str(flax_dir / "model.safetensors.index.json")).weight_map.values())) > 1
  assert _cli_json(capsys, "inspect", flax_dir)["tensors"] == report["tensors"]
  shapes = {r["name"]: tuple(r["shape"]) for r in report["tensors"]}
  assert shapes == {k: v.shape for k, (v, _) in _expected_flax(torch_pruned(name)).items()
                    if not k.startswith(("batch_stats/", "buffers/"))}
  by_module = _cli_json(capsys, "convert", tmp_path / "pruned.pt", tmp_path / "m.safetensors", "--layout", "flax",
                        "--module", f"tests.test_interop_torch_modules:{MODELS[name].__name__}")
  assert by_module["tensors"] == report["tensors"]
  _cli_json(capsys, "convert", flax_dir, tmp_path / "back.pt", "--layout", "torch")
  assert interop.diff_state_dicts(torch.load(tmp_path / "back.pt", weights_only=True), sd) == []


class RNNModel(nn.Module):
  """pytorch/examples' word_language_model (``encoder`` Embedding, ``rnn`` LSTM, ``decoder`` Linear, weights tied
  with ``--tied``): no module name says which 2-d weight is the embedding."""

  def __init__(self, ntoken=33, ninp=12, nhid=12, nlayers=2, tie_weights=False):
    super().__init__()
    self.drop = nn.Dropout(0.0)
    self.encoder = nn.Embedding(ntoken, ninp)
    self.rnn = nn.LSTM(ninp, nhid, nlayers)
    self.decoder = nn.Linear(nhid, ntoken)
    if tie_weights:
      self.decoder.weight = self.encoder.weight

  def forward(self, x):
    return self.decoder(self.drop(self.rnn(self.drop(self.encoder(x)))[0]))


@pytest.mark.parametrize("tied", [False, True])
def test_an_embedding_beside_linears_is_reported_not_taken_for_a_linear(tied, tmp_path, capsys):
  """A bias-free 2-d weight could be a Linear or an Embedding: a Linear sibling does not settle it. Before, the
  word_language_model's ``encoder.weight`` took its sibling ``decoder``'s kind and became a transposed Dense
  kernel with nothing in ``spec.uncertain``."""
  torch.manual_seed(0)
  model = RNNModel(tie_weights=tied).eval()
  sd = model.state_dict()
  bare = interop.from_torch(sd, layout="flax")
  assert [key for key, _ in bare.spec.uncertain] == ["encoder.weight"]
  assert "could be" in dict(bare.spec.uncertain)["encoder.weight"] and "embedding" in dict(
      bare.spec.uncertain)["encoder.weight"]
  by_module = interop.from_torch(sd, layout="flax", module=model)
  by_rule = interop.from_torch(sd, layout="flax", rules=[interop.rule_for("embedding", r"^encoder$")])
  assert by_module.spec.uncertain == by_rule.spec.uncertain == () and by_module.spec.entries == by_rule.spec.entries
  np.testing.assert_array_equal(np.asarray(by_module.params["encoder"]["embedding"]), _np(model.encoder.weight))
  assert by_module.spec.ties == ((("encoder.weight", "decoder.weight"),) if tied else ())
  for conv in (bare, by_module):
    assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []
  interop.save_state_dict(sd, tmp_path / "lm.safetensors")
  assert cli.main(["convert", str(tmp_path / "lm.safetensors"), str(tmp_path / "f.safetensors"), "--layout",
                   "flax"]) == 0
  out = capsys.readouterr().out
  assert "uncertain layout (1 keys" in out and "encoder.weight: taken for linear" in out


def _modules_without_rules() -> nn.ModuleDict:
  torch.manual_seed(0)
  return nn.ModuleDict({
      "encoder": nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True), 2,
                                       enable_nested_tensor=False),
      "cross": nn.MultiheadAttention(8, 2, kdim=6, vdim=5, add_bias_kv=True),  # q/k/v_proj_weight, bias_k/v
      "gru": nn.GRU(4, 6), "rnn": nn.RNN(4, 6, 2, bias=False), "lstmp": nn.LSTM(4, 6, proj_size=3),
      "up": nn.ConvTranspose2d(4, 6, 3, stride=2),  # weight (in, out, k, k), bias (out,)
  })


def test_modules_without_a_rule_keep_torchs_layout_with_or_without_the_module():
  """MultiheadAttention (packed or separate projections), RNNs, ConvTranspose: torch's names and shapes in Flax
  layout whether the classes are known (module=) or only the state_dict is. Before, a ConvTranspose2d's weight
  read as a Conv's without module= and was silently transposed to (k, k, out, in)."""
  model = _modules_without_rules()
  prune.l1_unstructured(model["up"], "weight", 0.3)
  prune.l1_unstructured(model["cross"], "k_proj_weight", 0.3)
  sd = model.state_dict()
  by_module = interop.from_torch(sd, layout="flax", module=model)
  bare = interop.from_torch(sd, layout="flax")
  assert [(e.key, e.path, e.perm) for e in bare.spec.entries] == [(e.key, e.path, e.perm)
                                                                  for e in by_module.spec.entries]
  kept = {e.key for e in by_module.spec.entries
          if e.path[-1] == e.key.rpartition(".")[2].removesuffix("_orig") and not e.perm}
  assert {"cross.k_proj_weight_orig", "cross.bias_k", "up.weight_orig", "gru.weight_hh_l0", "lstmp.weight_hr_l0",
          "encoder.layers.1.self_attn.in_proj_weight"} <= kept
  assert by_module.spec.uncertain == ()
  assert sorted(key for key, _ in bare.spec.uncertain) == ["up.bias", "up.weight_orig"]
  assert "kept in torch's layout" in bare.spec.uncertain[0][1]
  for conv in (bare, by_module):
    assert interop.diff_state_dicts(interop.to_torch(*conv), sd) == []
  back = interop.to_torch(bare.params, bare.masks, bare.buffers, layout="flax")  # no spec: names say torch's
  assert interop.diff_state_dicts(back, sd, order=False) == []


def test_a_pruned_mobilenet_bottleneck_runs_in_flax_like_in_torch():
  """features.3 (expand, depthwise 5x5 stride 2, SqueezeExcitation, project), converted with no module: the Flax
  layout's kernels run in flax.linen's Conv (feature_group_count=C for the depthwise one) and BatchNorm."""
  import flax.linen as fnn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  class CNA(fnn.Module):
    features: int
    k: int
    stride: int = 1
    groups: int = 1
    act: object = None

    @fnn.compact
    def __call__(self, x):
      pad = (self.k - 1) // 2
      x = fnn.Conv(self.features, (self.k, self.k), self.stride, padding=[(pad, pad)] * 2,
                   feature_group_count=self.groups, use_bias=False, name="0")(x)
      x = fnn.BatchNorm(use_running_average=True, epsilon=1e-3, name="1")(x)
      return x if self.act is None else self.act(x)

  class SE(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      s = x.mean(axis=(1, 2), keepdims=True)
      s = fnn.Conv(16, (1, 1), name="fc1")(s)
      s = fnn.Conv(x.shape[-1], (1, 1), name="fc2")(jax.nn.relu(s))
      return jax.nn.hard_sigmoid(s) * x

  class Block(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      x = CNA(40, 1, act=jax.nn.hard_swish, name="0")(x)
      x = CNA(40, 5, 2, 40, act=jax.nn.hard_swish, name="1")(x)
      return CNA(24, 1, name="3")(SE(name="2")(x))

  class Bottleneck(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      return Block(name="block")(x)

  model = torch_pruned("mobilenet_v3")
  bottleneck = model.features[3]
  x = torch.randn(2, 16, 8, 8)
  with torch.no_grad():
    expected = bottleneck(x).permute(0, 2, 3, 1).numpy()
  conv = interop.from_torch(bottleneck.state_dict(), layout="flax")
  assert conv.params["block"]["1"]["0"]["kernel"].shape == (5, 5, 1, 40)  # depthwise: I/groups = 1
  variables = conv.variables()
  del variables["buffers"]  # num_batches_tracked: torch's counter, no Flax variable
  out = jax.jit(Bottleneck().apply)(variables, x.permute(0, 2, 3, 1).numpy())  # one compile, not one per op
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
