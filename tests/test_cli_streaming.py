"""``convert --layout flax`` into safetensors streams tensor by tensor with numpy (interop.streaming); its files
must be byte for byte what the JAX path (``from_torch`` on the whole checkpoint, still used for Orbax) writes: the
same keys, order, metadata, dtypes and bits. Checked on real architectures (transformers' GPT-2 with its tie and
HF ``Conv1D``, torch-pruned; BERT; a pruned ResNet-18 with BatchNorm) and on the corner cases of a state_dict."""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch.nn.utils import prune

import interop
from interop import shards, streaming
from jaxprune import cli
from tests.test_interop_real_models import _torch_pruned_gpt2, tiny_bert


def _resnet() -> dict:
  from interop.models import ResNet18  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = ResNet18()
  prune.l1_unstructured(model.conv1, "weight", 0.5)
  prune.ln_structured(model.layer1[0].conv1, "weight", 0.25, n=2, dim=0)
  prune.random_unstructured(model.fc, "weight", 0.3)
  return model.state_dict()


def _corners() -> dict:
  """Narrowed int64, bfloat16 and float16, a non-contiguous tensor, a key part with '/', a pruned 0-d param
  (whose mask the Flax form has always left out) and a Conv1d kernel."""
  w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return {"a/b.weight": torch.randn(3, 5), "a/b.bias": torch.randn(3),
          "bn.weight": torch.ones(6), "bn.bias": torch.zeros(6), "bn.running_mean": torch.randn(6),
          "bn.running_var": torch.rand(6), "bn.num_batches_tracked": torch.tensor(7),
          "t.weight": w.t(), "h.weight": torch.randn(4, 8).to(torch.bfloat16), "h.bias": torch.randn(4).half(),
          "s.scale_orig": torch.tensor(2.0), "s.scale_mask": torch.tensor(1.0),
          "c.weight": torch.randn(8, 3, 5), "c.bias": torch.randn(8)}


SOURCES = {"gpt2": lambda: _torch_pruned_gpt2().state_dict(), "bert": lambda: tiny_bert().state_dict(),
           "resnet": _resnet, "corners": _corners}


def _jax_path(state_dict: dict) -> tuple[dict, dict]:
  """What ``write_flax`` wrote before it streamed: from_torch's trees, made JAX arrays and back, flattened."""
  trees, spec = cli._jax_trees(state_dict, cli.FlaxLayout())  # pylint: disable=protected-access
  flat = {"/".join(map(cli._escape, p)): v for p, v in traverse_util.flatten_dict(trees).items()}  # pylint: disable=protected-access
  return flat, {"format": "flax", cli.FORMAT_KEY: "flax", cli.SPEC_KEY: spec}


def _files(folder) -> dict:
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory):
  """A checkpoint as ``.pt`` (torch tensors, ties as shared storage) and ``.safetensors``, and the JAX path's
  output for it as one file and as shards of 20 kB."""
  d = tmp_path_factory.mktemp(request.param)
  sd = SOURCES[request.param]()
  torch.save(sd, d / "in.pt")
  interop.save_state_dict(sd, d / "in.safetensors")
  flat, metadata = _jax_path(interop.load_state_dict(d / "in.pt"))
  interop.save_state_dict(flat, d / "want.safetensors", metadata=metadata)
  shards.save(flat, str(d / "want"), max_shard_size=20_000, metadata=metadata)
  return d


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_streamed_flax_files_are_the_jax_paths_byte_for_byte(source, form, tmp_path):
  assert cli.main(["convert", str(source / f"in.{form}"), str(tmp_path / "got.safetensors"), "--layout", "flax",
                   "--json"]) == 0
  assert (tmp_path / "got.safetensors").read_bytes() == (source / "want.safetensors").read_bytes()
  assert cli.main(["convert", str(source / f"in.{form}"), str(tmp_path / "got"), "--layout", "flax",
                   "--max-shard-size", "20000", "--json"]) == 0
  assert _files(tmp_path / "got") == _files(source / "want")


def test_the_streamed_form_reads_back_to_the_checkpoint(source, tmp_path):
  if source.name.startswith("corners"):
    pytest.skip("a pruned 0-d param comes back unpruned: the Flax form has never kept its mask (as before)")
  assert cli.main(["convert", str(source / "in.pt"), str(tmp_path / "f"), "--layout", "flax", "--max-shard-size",
                   "20000"]) == 0
  assert cli.main(["convert", str(tmp_path / "f"), str(tmp_path / "back.pt"), "--layout", "torch"]) == 0
  back, sd = torch.load(tmp_path / "back.pt", weights_only=True), torch.load(source / "in.pt", weights_only=True)
  assert interop.diff_state_dicts(back, sd) == []


def test_nothing_is_converted_before_the_writer_asks():
  """Each tensor is converted when the writer reaches it: a checkpoint larger than memory is converted as it is
  written, one tensor at a time."""
  sd = {"fc.weight": np.ones((4, 3), np.float32), "fc.bias": np.zeros(4, ml_dtypes.bfloat16)}
  spec, _ = interop.tensor_stats(sd, "flax")
  made = []
  tensors = streaming.flax_tensors(sd, spec, made.append)
  assert [(k, v.dtype.name, v.shape) for k, v in tensors.items()] == [
      (("params", "fc", "bias"), "bfloat16", (4,)), (("params", "fc", "kernel"), "float32", (3, 4))]
  assert made == []
  kernel = tensors["params", "fc", "kernel"].make()
  assert np.array_equal(kernel, sd["fc.weight"].T) and len(made) == 1  # the source, once transposed


def test_tied_masks_that_differ_are_refused_before_writing(capsys, tmp_path):
  shared = torch.randn(4, 4)
  sd = {"a.weight_orig": shared, "a.weight_mask": torch.ones(4, 4), "b.weight_orig": shared,
        "b.weight_mask": torch.zeros(4, 4)}
  torch.save(sd, tmp_path / "tied.pt")
  assert cli.main(["convert", str(tmp_path / "tied.pt"), str(tmp_path / "o.safetensors"), "--layout", "flax"]) == 2
  err = capsys.readouterr().err
  assert "'b.weight_mask' and 'a.weight_mask' are masks of one tied tensor, and they differ" in err
  assert str(tmp_path / "tied.pt") in err and sorted(os.listdir(tmp_path)) == ["tied.pt"]


def test_a_tied_mask_that_is_not_binary_is_refused_before_writing(capsys, tmp_path):
  """GPT-2 pruned by torch: lm_head.weight_orig (with the mask) is tied to the plain transformer.wte.weight."""
  shared = torch.randn(4, 4)
  sd = {"wte.weight": shared, "head.weight_orig": shared, "head.weight_mask": torch.full((4, 4), 0.5)}
  torch.save(sd, tmp_path / "tied.pt")
  assert cli.main(["convert", str(tmp_path / "tied.pt"), str(tmp_path / "o"), "--layout", "flax",
                   "--max-shard-size", "1MB"]) == 2
  assert "mask 'head.weight_mask' holds" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["tied.pt"]


_NO_JAX = """
import contextlib, io, sys
from jaxprune import cli
with contextlib.redirect_stdout(io.StringIO()):
  assert cli.main(["convert", sys.argv[1], sys.argv[2], "--layout", "flax"]) == 0
  assert cli.main(["convert", sys.argv[1], sys.argv[3], "--layout", "flax", "--max-shard-size", "1MB"]) == 0
print(sorted(m for m in ("jax", "flax", "optax") if m in sys.modules))
"""


def test_writing_the_flax_layout_to_safetensors_imports_no_jax(tmp_path):
  interop.save_state_dict(_corners(), tmp_path / "in.safetensors")
  proc = subprocess.run([sys.executable, "-c", _NO_JAX, *(str(tmp_path / n) for n in ("in.safetensors",
                                                                                      "f.safetensors", "f"))],
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split("\n")[-2] == "[]"


PRUNES = {"l1": ["--method", "l1", "--amount", "0.5"], "random": ["--method", "random", "--amount", "0.3"],
          "ln": ["--method", "ln", "--amount", "0.25", "--axis", "0"], "nm": ["--method", "nm"],
          "global": ["--method", "l1", "--amount", "0.6", "--global"],
          "permanent": ["--method", "l1", "--amount", "0.5", "--permanent"],
          "tied": ["--method", "l1", "--amount", "0.3", "--include", "wte", "--permanent"]}


def _pruned(capsys, source, out, argv) -> tuple[dict, dict]:
  capsys.readouterr()
  assert cli.main(["prune", str(source), "-o", str(out), *argv, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  report.pop("output")
  return report, interop.load_state_dict(out)


@pytest.mark.parametrize("name", sorted(PRUNES))
def test_prune_streamed_to_safetensors_writes_what_the_whole_path_writes(capsys, tmp_path, name):
  """Into safetensors (one file or shards) each module is converted as it is written, and the report counted
  from the file; into torch.save, the state_dict is made whole as before: the same tensors, order, ties, report."""
  source = tmp_path / "gpt2.pt"
  torch.save(_torch_pruned_gpt2().state_dict(), source)
  whole, want = _pruned(capsys, source, tmp_path / "whole.pt", PRUNES[name])
  for out in ("streamed.safetensors", "shards/model.safetensors.index.json"):
    report, got = _pruned(capsys, source, tmp_path / out, [*PRUNES[name], "--max-shard-size", "30000"]
                          if out.startswith("shards") else PRUNES[name])
    assert report == whole and interop.diff_state_dicts(got, want) == []
    assert interop.ties.find_ties(got) == interop.ties.find_ties(want) != ()


def _sorted_resnet(path) -> None:
  """As ``safetensors.torch.save_file`` writes it: keys by dtype, then name, so each BatchNorm's int64
  ``num_batches_tracked`` comes after every float tensor, away from its module's other keys."""
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  safetensors.torch.save_file({k: v.contiguous() for k, v in _resnet().items()}, path)


def _split_pair(path) -> None:
  """A mask away from its X_orig: no part of the file converts alone, so the state_dict is made whole."""
  torch.manual_seed(0)
  interop.save_state_dict({"fc.weight_orig": torch.randn(4, 3), "x.weight": torch.randn(5, 2),
                           "fc.weight_mask": (torch.rand(4, 3) > 0.5).float(), "fc.bias": torch.randn(4)}, path)


@pytest.mark.parametrize("make", [_sorted_resnet, _split_pair])
@pytest.mark.parametrize("permanent", [[], ["--permanent"]])
def test_prune_streams_modules_in_pieces_or_makes_the_whole(capsys, tmp_path, make, permanent):
  make(tmp_path / "in.safetensors")
  argv = ["--method", "l1", "--amount", "0.5", *permanent]
  whole, want = _pruned(capsys, tmp_path / "in.safetensors", tmp_path / "whole.pt", argv)
  report, got = _pruned(capsys, tmp_path / "in.safetensors", tmp_path / "o.safetensors", argv)
  assert report == whole and interop.diff_state_dicts(got, want) == []
