"""Real architectures nobody here wrote: transformers' GPT-2 (tied lm_head, HF ``Conv1D``) and BERT, small configs
of the same classes, random init, no downloads.

Checked for each: every key accounted for, the Flax-layout shape of every module kind, bit-identical round trips in
both layouts (ties and file order included), ties kept through torch's and jaxprune's pruning, ``load_pruned`` and
``permanent=True`` against the pruned torch model, safetensors files, and the CLI on the same files.
"""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util
from torch.nn.utils import prune

transformers = pytest.importorskip("transformers")  # the test extra pins it

import interop  # noqa: E402
import jaxprune  # noqa: E402
from jaxprune import cli  # noqa: E402

transformers.logging.set_verbosity_error()  # GPT2Config's default token ids lie outside a 101-word vocabulary
IDS = torch.arange(12).reshape(2, 6) % 101


def tiny_gpt2() -> torch.nn.Module:
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=16)
  return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert() -> torch.nn.Module:
  torch.manual_seed(1)
  config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=16, type_vocab_size=2)
  return transformers.BertModel(config).eval()


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert}


def _out(model) -> torch.Tensor:
  with torch.no_grad():
    result = model(IDS)
  return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _flat(tree) -> dict:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _tied(sd) -> bool:
  return sd["lm_head.weight" if "lm_head.weight" in sd else "lm_head.weight_orig"] is sd[
      "transformer.wte.weight" if "transformer.wte.weight" in sd else "transformer.wte.weight_orig"]


@pytest.mark.parametrize("name", MODELS)
def test_every_key_lands_where_flax_expects_it(name):
  model = MODELS[name]()
  sd = model.state_dict()
  conv = interop.from_torch(sd, layout="flax")
  assert [e.key for e in conv.spec.entries] == list(sd)
  assert conv.spec.uncertain == ()  # names, shapes and neighbours settle every module of these two
  params = _flat(conv.params)
  kinds = {type(m).__name__ for m in model.modules()}
  for prefix, sub in model.named_modules():
    path = prefix.replace(".", "/")
    kind = type(sub).__name__
    if kind == "Embedding":
      assert params[f"{path}/embedding"].shape == (sub.num_embeddings, sub.embedding_dim)
    elif kind == "Conv1D" and prefix != "lm_head":  # HF stores (in, out): kept as is
      assert np.array_equal(params[f"{path}/kernel"], sub.weight.detach().numpy())
    elif kind == "Linear" and prefix != "lm_head":  # (out, in) -> (in, out)
      assert np.array_equal(params[f"{path}/kernel"], sub.weight.detach().numpy().T)
    elif kind == "LayerNorm":
      assert params[f"{path}/scale"].shape == tuple(sub.normalized_shape)
  if name == "gpt2":
    assert "Conv1D" in kinds
    assert conv.spec.ties == (("transformer.wte.weight", "lm_head.weight"),)
    assert "lm_head/kernel" not in params  # one tensor, one leaf: the embedding's (Flax's GPT-2 attends with it)
  else:
    assert {"Linear", "Embedding"} <= kinds and conv.spec.ties == ()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_round_trips_are_bit_identical_ties_included(name, layout):
  model = MODELS[name]()
  sd = model.state_dict()
  conv = interop.from_torch(sd, layout=layout)
  for back in (interop.to_torch(*conv), interop.to_torch(conv.params, conv.masks, conv.buffers, layout=layout,
                                                         module=MODELS[name]())):
    assert interop.diff_state_dicts(back, sd) == []
    assert name != "gpt2" or _tied(back)
  # No spec, no module: the names alone map the Flax layout back; only a tied key has no leaf to come from.
  bare = interop.to_torch(conv.params, conv.masks, conv.buffers, layout=layout)
  assert interop.diff_state_dicts(bare, {k: v for k, v in sd.items() if k != "lm_head.weight"}) == []


def tiny_llama() -> torch.nn.Module:
  torch.manual_seed(2)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
  return transformers.LlamaForCausalLM(config).eval()


def test_hugging_face_norm_classes_read_as_norms_with_the_module_too():
  """``LlamaRMSNorm`` derives from no torch norm: by its class name it is a norm with ``module=`` as it is by its
  shape without, so both give one Flax layout, and each comes back bit for bit."""
  model = tiny_llama()
  sd = model.state_dict()
  inferred, given = interop.from_torch(sd, layout="flax"), interop.from_torch(sd, layout="flax", module=model)
  flat = _flat(given.params)
  assert flat.keys() == _flat(inferred.params).keys()
  for prefix, sub in model.named_modules():
    if type(sub).__name__ == "LlamaRMSNorm":
      assert np.array_equal(flat[prefix.replace(".", "/") + "/scale"], sub.weight.detach().numpy())
  assert interop.diff_state_dicts(interop.to_torch(*given), sd) == []
  assert interop.diff_state_dicts(interop.to_torch(given.params, given.masks, given.buffers, layout="flax",
                                                   module=tiny_llama()), sd) == []


def _torch_pruned_gpt2():
  """Global L1 over every Conv1D weight and the (tied) lm_head, as torch does it: only lm_head's use is masked."""
  model = tiny_gpt2()
  targets = [(m, "weight") for m in model.modules() if type(m).__name__ == "Conv1D"] + [(model.lm_head, "weight")]
  prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.4)
  return model


def test_a_tied_weight_torch_pruned_round_trips_and_loads():
  model = _torch_pruned_gpt2()
  sd = model.state_dict()
  assert sd["lm_head.weight_orig"] is not None and "transformer.wte.weight" in sd  # wte itself is not pruned
  for layout in ("torch", "flax"):
    conv = interop.from_torch(sd, layout=layout)
    assert conv.spec.ties == (("transformer.wte.weight", "lm_head.weight_orig"),)
    back = interop.to_torch(*conv)
    assert interop.diff_state_dicts(back, sd) == [] and _tied(back)
    assert interop.TorchSpec.from_json(conv.spec.to_json()) == conv.spec
  older = json.loads(conv.spec.to_json())  # a spec written before ties were recorded still reads
  del older["ties"], older["uncertain"]
  assert interop.TorchSpec.from_json(json.dumps(older)) == conv.spec._replace(ties=())
  older["ties"] = [["transformer.wte.weight", "nowhere"]]
  with pytest.raises(interop.InteropError, match="unknown keys"):
    interop.TorchSpec.from_json(json.dumps(older))
  fresh = interop.load_pruned(tiny_gpt2(), back)
  assert fresh.lm_head.weight_orig is fresh.transformer.wte.weight
  assert torch.equal(_out(fresh), _out(model))
  # permanent: prune.remove writes the masked values into the one shared parameter, so the embedding is masked too
  plain = interop.to_torch(*conv, permanent=True)
  assert plain["lm_head.weight"] is plain["transformer.wte.weight"]
  loaded = tiny_gpt2()
  loaded.load_state_dict(plain)
  for module, name in [(m, "weight") for m in model.modules() if prune.is_pruned(m) and hasattr(m, "weight_orig")]:
    prune.remove(module, name)
  assert loaded.lm_head.weight is loaded.transformer.wte.weight
  assert torch.equal(_out(loaded), _out(model))


def test_pruning_a_tied_tensor_in_jax_prunes_both_keys():
  model = tiny_gpt2()
  conv = interop.from_torch(model, layout="flax")
  masks = jaxprune.prune(conv.params, "l1_unstructured", amount=0.3, masks=conv.masks,
                         where=lambda path, _: path.endswith("wte/embedding"))
  sd = interop.to_torch(conv.params, masks, conv.buffers, conv.spec)
  for key in ("transformer.wte.weight", "lm_head.weight"):
    assert key + "_orig" in sd and key not in sd
  assert sd["lm_head.weight_mask"] is sd["transformer.wte.weight_mask"] and _tied(sd)  # one mask for one tensor
  mask = sd["lm_head.weight_mask"]
  reference = tiny_gpt2()
  prune.custom_from_mask(reference.transformer.wte, "weight", mask)
  prune.custom_from_mask(reference.lm_head, "weight", mask)
  fresh = interop.load_pruned(tiny_gpt2(), sd)
  assert torch.equal(_out(fresh), _out(reference))
  loaded = tiny_gpt2()
  loaded.load_state_dict(interop.to_torch(conv.params, masks, conv.buffers, conv.spec, permanent=True))
  assert loaded.lm_head.weight is loaded.transformer.wte.weight
  assert torch.equal(_out(loaded), _out(reference))
  assert interop.diff_state_dicts(interop.to_torch(*interop.from_torch(sd, layout="flax")), sd) == []


def test_safetensors_files_keep_file_order_and_ties(tmp_path):
  bert = tiny_bert().state_dict()
  foreign = tmp_path / "bert.safetensors"
  safetensors.torch.save_file(bert, str(foreign))  # sorted keys: not the model's order
  loaded = interop.load_state_dict(foreign)
  assert list(loaded) == list(interop.io.read_header(foreign).tensors) != list(bert)
  back = tmp_path / "back.safetensors"
  interop.save_state_dict(interop.to_torch(*interop.from_torch(loaded, layout="flax")), back)
  assert list(interop.io.read_header(back).tensors) == list(loaded)
  gpt2 = _torch_pruned_gpt2().state_dict()
  with pytest.raises(RuntimeError, match="share memory"):  # what users meet with save_file
    safetensors.torch.save_file(gpt2, str(tmp_path / "refused.safetensors"))
  interop.save_state_dict(gpt2, tmp_path / "gpt2.safetensors")
  again = interop.load_state_dict(tmp_path / "gpt2.safetensors")
  assert interop.diff_state_dicts(again, gpt2) == [] and _tied(again)


def _cli_json(capsys, *argv) -> dict:
  capsys.readouterr()
  assert cli.main([*map(str, argv), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_cli_converts_both_ways_with_ties_and_rules(tmp_path, capsys):
  model = _torch_pruned_gpt2()
  torch.save(model.state_dict(), tmp_path / "gpt2.pt")
  report = _cli_json(capsys, "convert", tmp_path / "gpt2.pt", tmp_path / "gpt2_flax.safetensors", "--layout", "flax")
  assert report["ties"] == [["transformer.wte.weight", "lm_head.weight_orig"]] and report["uncertain"] == []
  names = {row["name"]: row["shape"] for row in report["tensors"]}
  assert names["transformer/wte/embedding"] == [101, 32] and names["transformer/h/0/attn/c_attn/kernel"] == [32, 96]
  _cli_json(capsys, "convert", tmp_path / "gpt2_flax.safetensors", tmp_path / "back.pt", "--layout", "torch")
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert interop.diff_state_dicts(back, model.state_dict()) == []
  assert back["lm_head.weight_orig"].data_ptr() == back["transformer.wte.weight"].data_ptr()

  bert = tiny_bert()
  interop.save_state_dict(bert.state_dict(), tmp_path / "bert.safetensors")
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps({r"position_embeddings\.weight$": "torch"}))
  by_module = _cli_json(capsys, "convert", tmp_path / "bert.safetensors", tmp_path / "m.safetensors", "--layout",
                        "flax", "--module", "tests.test_interop_real_models:tiny_bert")
  by_rules = _cli_json(capsys, "convert", tmp_path / "bert.safetensors", tmp_path / "r.safetensors", "--layout",
                       "flax", "--layout-rules", rules)
  shapes = lambda rep: {row["name"]: row["shape"] for row in rep["tensors"]}  # noqa: E731
  assert shapes(by_module)["embeddings/word_embeddings/embedding"] == [99, 32]
  assert shapes(by_rules)["embeddings/position_embeddings/weight"] == [16, 32]  # kept as torch
  for out in ("m", "r"):
    _cli_json(capsys, "convert", tmp_path / f"{out}.safetensors", tmp_path / f"{out}.pt", "--layout", "torch")
    assert interop.diff_state_dicts(torch.load(tmp_path / f"{out}.pt", weights_only=True), bert.state_dict()) == []


def test_cli_says_where_the_layout_is_a_guess(tmp_path, capsys):
  torch.manual_seed(0)
  bare = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))  # names tell nothing
  interop.save_state_dict(bare.state_dict(), tmp_path / "bare.safetensors")
  assert cli.main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "f.safetensors"), "--layout",
                   "flax"]) == 0
  out = capsys.readouterr().out
  assert "uncertain layout (2 keys" in out
  assert "0.weight: taken for linear; could be norm or embedding" in out
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps({r"^0\.": "embedding", r"^1\.": "linear"}))
  report = _cli_json(capsys, "convert", tmp_path / "bare.safetensors", tmp_path / "g.safetensors", "--layout",
                     "flax", "--layout-rules", rules)
  assert report["uncertain"] == [] and report["tensors"][0]["name"] == "0/embedding"
  rules.write_text(json.dumps({"nothing": "linear"}))
  assert cli.main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "h.safetensors"), "--layout",
                   "flax", "--layout-rules", str(rules)]) == 2
  assert "'nothing' matches no key" in capsys.readouterr().err


def test_cli_prunes_a_tied_tensor_once_for_both_keys(tmp_path, capsys):
  torch.save(tiny_gpt2().state_dict(), tmp_path / "gpt2.pt")
  report = _cli_json(capsys, "prune", tmp_path / "gpt2.pt", "-o", tmp_path / "p.pt", "--method", "l1", "--amount",
                     "0.3", "--include", "wte")
  assert report["selected"] == ["transformer.wte.weight"]
  sd = torch.load(tmp_path / "p.pt", weights_only=True)
  assert {"transformer.wte.weight_orig", "lm_head.weight_orig", "lm_head.weight_mask"} <= set(sd) and _tied(sd)
  assert torch.equal(sd["lm_head.weight_mask"], sd["transformer.wte.weight_mask"])
  fresh = interop.load_pruned(tiny_gpt2(), sd)
  assert fresh.lm_head.weight_orig is fresh.transformer.wte.weight_orig
  assert torch.equal(fresh.lm_head.weight, fresh.transformer.wte.weight)
