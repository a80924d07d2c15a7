"""The ``jaxprune`` command line on small checkpoints built here, with torch as the oracle.

Commands run in-process through ``jaxprune.cli.main`` (a subprocess per command would re-import jax and torch);
subprocesses are used only where they are the point: the exit status and stderr of ``python -m jaxprune``, and
the commands in an interpreter where torch cannot be imported.
"""
import json
import os
import pickle
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import interop
from jaxprune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUFFERS = ("1.running_mean", "1.running_var", "1.num_batches_tracked")


def _net() -> nn.Sequential:
  """A small CNN with every kind of tensor the CLI meets: conv and linear weights, biases, BatchNorm buffers."""
  torch.manual_seed(0)
  return nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8),
                       nn.ReLU(), nn.Linear(8, 4))


def _pruned_net() -> nn.Sequential:
  net = _net()
  prune.l1_unstructured(net[0], "weight", 0.5)
  prune.ln_structured(net[4], "weight", 0.25, n=2, dim=0)
  return net


def _reload(path) -> nn.Sequential:
  """A fresh net with the checkpoint loaded (pruned ones through torch's re-parametrisation)."""
  return interop.load_pruned(_net(), str(path))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """``plain.pt``, ``pruned.pt`` (torch-pruned), ``pruned.safetensors`` (the same) and ``permanent.pt``."""
  d = tmp_path_factory.mktemp("ckpts")
  torch.save(_net().state_dict(), d / "plain.pt")
  pruned = _pruned_net()
  torch.save(pruned.state_dict(), d / "pruned.pt")
  interop.save_state_dict(pruned.state_dict(), d / "pruned.safetensors")
  prune.remove(pruned[0], "weight")
  prune.remove(pruned[4], "weight")
  torch.save(pruned.state_dict(), d / "permanent.pt")
  return d


def run(capsys, *argv):
  """``jaxprune *argv`` in-process: (exit status, stdout, stderr)."""
  status = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def run_json(capsys, *argv) -> dict:
  status, out, err = run(capsys, *argv, "--json")
  assert status == 0, err
  return json.loads(out)


def _effective(state_dict) -> dict:
  """name -> effective tensor as torch computes it (``X_mask * X_orig`` for pruned ones), as numpy."""
  host = {k: np.asarray(v) for k, v in state_dict.items()}
  return {key.removesuffix("_orig"): value * host[key.removesuffix("_orig") + "_mask"] if key.endswith("_orig")
          else value for key, value in host.items() if not key.endswith("_mask")}


# ------------------------------------------------------------------------------------------------------------------
# inspect


@pytest.mark.parametrize("name", ["pruned.pt", "pruned.safetensors", "permanent.pt", "plain.pt"])
def test_inspect_counts_what_torch_holds(capsys, ckpts, name):
  """Per tensor: pruned iff torch saved an _orig/_mask pair (spec §9), zeros of the effective weight; global
  sparsity over all parameters, BatchNorm buffers apart."""
  report = run_json(capsys, "inspect", ckpts / name)
  sd = interop.load_state_dict(ckpts / name)
  params = {k: v for k, v in _effective(sd).items() if k not in BUFFERS}
  rows = {r["name"]: r for r in report["tensors"]}
  assert set(rows) == set(params)
  for key, tensor in params.items():
    assert rows[key]["zeros"] == np.count_nonzero(tensor == 0), key
    assert rows[key]["shape"] == list(tensor.shape)
    assert rows[key]["pruned"] == (key + "_mask" in sd)
  size = sum(t.size for t in params.values())
  assert report["size"] == size and report["buffers"] == len(BUFFERS)
  assert report["sparsity"] == sum(np.count_nonzero(t == 0) for t in params.values()) / size


def test_inspect_pruned_and_permanent_forms_agree(capsys, ckpts):
  """One model saved pruned (_orig/_mask) and made permanent (prune.remove) has the same zeros per tensor."""
  pruned, permanent = (run_json(capsys, "inspect", ckpts / n) for n in ("pruned.pt", "permanent.pt"))
  zeros = lambda report: {r["name"]: r["zeros"] for r in report["tensors"]}  # noqa: E731
  assert zeros(pruned) == zeros(permanent) and pruned["sparsity"] == permanent["sparsity"] > 0
  assert pruned["pruned_tensors"] == 2 and permanent["pruned_tensors"] == 0


def test_inspect_human_output_is_a_table_and_a_summary(capsys, ckpts):
  status, out, _ = run(capsys, "inspect", ckpts / "pruned.pt")
  assert status == 0
  lines = out.splitlines()
  row = next(line for line in lines if "0.weight" in line)
  assert "8x2x3x3" in row and "yes" in row and "50.00%" in row  # l1 at 0.5 of 144 entries: 72 zeros
  assert any("global sparsity" in line for line in lines)


def test_inspect_a_wrapped_checkpoint_with_key(capsys, ckpts, tmp_path):
  """Training checkpoints often wrap the state_dict ({"state_dict": ..., "epoch": 3}): --key picks it."""
  path = tmp_path / "wrapped.pt"
  torch.save({"state_dict": torch.load(ckpts / "pruned.pt", weights_only=True), "epoch": 3}, path)
  status, _, err = run(capsys, "inspect", path)
  assert status == 2 and "key='state_dict'" in err
  assert run_json(capsys, "inspect", path, "--key", "state_dict") == {
      **run_json(capsys, "inspect", ckpts / "pruned.pt"), "path": str(path)}


# ------------------------------------------------------------------------------------------------------------------
# prune: jaxprune's engine must give what torch.nn.utils.prune gives


def _torch_pruned(fn) -> dict:
  """The torch-pruned net, pruned further by ``fn(net)``, as a state_dict."""
  net = _pruned_net()
  fn(net)
  return net.state_dict()


LOCAL_CASES = {
    "l1": (["--method", "l1", "--amount", "0.3"],
           lambda net: [prune.l1_unstructured(net[i], "weight", 0.3) for i in (0, 4, 6)]),
    "l1-count": (["--method", "l1", "--amount", "5"],
                 lambda net: [prune.l1_unstructured(net[i], "weight", 5) for i in (0, 4, 6)]),
    "ln": (["--method", "ln", "--amount", "0.5", "--axis", "0", "--n", "1"],
           lambda net: [prune.ln_structured(net[i], "weight", 0.5, n=1, dim=0) for i in (0, 4, 6)]),
    "global": (["--method", "l1", "--amount", "0.6", "--global"],
               lambda net: prune.global_unstructured([(net[i], "weight") for i in (0, 4, 6)],
                                                     prune.L1Unstructured, amount=0.6)),
    "include": (["--method", "l1", "--amount", "0.3", "--include", r"^4\.", "--include", r"^0\.bias"],
                lambda net: [prune.l1_unstructured(net[i], name, 0.3)
                             for i, name in ((0, "bias"), (4, "weight"), (4, "bias"))]),
    "exclude": (["--method", "l1", "--amount", "0.3", "--exclude", r"^6\."],
                lambda net: [prune.l1_unstructured(net[i], "weight", 0.3) for i in (0, 4)]),
}


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_prune_matches_torch_bit_for_bit(capsys, ckpts, tmp_path, case):
  """The pruned checkpoint equals torch's own state_dict after the same prune calls on the same (already pruned)
  model: keys, key order, dtypes and bits (spec §5.2 container semantics, §6 global, §9 layout)."""
  argv, torch_fn = LOCAL_CASES[case]
  out = tmp_path / "out.pt"
  status, _, err = run(capsys, "prune", ckpts / "pruned.pt", "-o", out, *argv)
  assert status == 0, err
  assert interop.diff_state_dicts(torch.load(out, weights_only=True), _torch_pruned(torch_fn)) == []


def test_prune_permanent_equals_torch_remove_and_loads_strictly(capsys, ckpts, tmp_path):
  """spec §7: --permanent is prune.remove: plain keys that load into an unpruned model with strict=True."""
  out = tmp_path / "permanent.pt"
  status, _, err = run(capsys, "prune", ckpts / "plain.pt", "-o", out, "--method", "l1", "--amount", "0.4",
                       "--permanent")
  assert status == 0, err
  net = _net()
  for i in (0, 4, 6):
    prune.l1_unstructured(net[i], "weight", 0.4)
    prune.remove(net[i], "weight")
  got = torch.load(out, weights_only=True)
  assert interop.diff_state_dicts(got, net.state_dict()) == []
  _net().load_state_dict(got, strict=True)


def test_prune_random_prunes_exact_counts_and_torch_loads_it(capsys, ckpts, tmp_path):
  """torch's RNG differs from JAX's, so random masks cannot match torch's; their counts must (round(a * n))."""
  out = tmp_path / "random.safetensors"
  report = run_json(capsys, "prune", ckpts / "plain.pt", "-o", out, "--method", "random", "--amount", "0.3",
                    "--seed", "3")
  rows = {r["name"]: r for r in report["tensors"]}
  for name in ("0.weight", "4.weight", "6.weight"):
    assert rows[name]["pruned"] and rows[name]["zeros"] == round(0.3 * rows[name]["size"])
  net = _reload(out)
  assert int((net[4].weight == 0).sum()) == rows["4.weight"]["zeros"]


def test_prune_nm_keeps_n_of_every_m_and_torch_runs_it(capsys, ckpts, tmp_path):
  out = tmp_path / "nm.pt"
  status, _, err = run(capsys, "prune", ckpts / "plain.pt", "-o", out, "--method", "nm", "--n", "2", "--m", "4",
                       "--include", r"^[46]\.weight")
  assert status == 0, err
  net = _reload(out)
  for i in (4, 6):
    groups = (net[i].weight.detach() != 0).reshape(net[i].weight.shape[0], -1, 4).sum(-1)
    assert bool((groups == 2).all())
  x = torch.randn(3, 2, 6, 6)
  net.eval()
  with torch.no_grad():
    assert torch.isfinite(net(x)).all()


# ------------------------------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("target", ["flax.safetensors", "orbax_dir"])
def test_convert_round_trip_is_bit_exact(capsys, ckpts, tmp_path, target):
  """torch -> JAX form (safetensors or Orbax) -> torch gives torch's state_dict back: keys, order, dtypes, bits."""
  jax_form, back = tmp_path / target, tmp_path / "back.pt"
  assert run(capsys, "convert", ckpts / "pruned.pt", jax_form, "--layout", "flax")[0] == 0
  assert run(capsys, "convert", jax_form, back, "--layout", "torch")[0] == 0
  assert interop.diff_state_dicts(torch.load(back, weights_only=True),
                                  torch.load(ckpts / "pruned.pt", weights_only=True)) == []


def test_convert_writes_flax_layout_with_masks_and_batch_stats(capsys, ckpts, tmp_path):
  """The JAX form holds Flax kernels (HWIO / in x out), bool masks of the pruned ones, BatchNorm statistics."""
  out = tmp_path / "flax.safetensors"
  report = run_json(capsys, "convert", ckpts / "pruned.pt", out, "--layout", "flax")
  assert report["from"] == "torch" and report["to"] == "flax"
  flat = interop.load_state_dict(out)
  sd = torch.load(ckpts / "pruned.pt", weights_only=True)
  np.testing.assert_array_equal(flat["params/0/kernel"], sd["0.weight_orig"].permute(2, 3, 1, 0).numpy())
  np.testing.assert_array_equal(flat["masks/0/kernel"], sd["0.weight_mask"].permute(2, 3, 1, 0).numpy() != 0)
  assert flat["masks/0/kernel"].dtype == np.bool_
  np.testing.assert_array_equal(flat["params/4/kernel"], sd["4.weight_orig"].T.numpy())
  np.testing.assert_array_equal(flat["batch_stats/1/mean"], sd["1.running_mean"].numpy())
  assert "masks/6/kernel" not in flat  # unpruned: no mask stored
  rows = {r["name"]: r for r in run_json(capsys, "inspect", out)["tensors"]}
  assert rows["0/kernel"]["pruned"] and rows["0/kernel"]["shape"] == [3, 3, 2, 8]


def test_convert_between_torch_files(capsys, ckpts, tmp_path):
  """--layout torch from a .pt writes safetensors with the same tensors (a format change only)."""
  out = tmp_path / "same.safetensors"
  assert run(capsys, "convert", ckpts / "pruned.pt", out, "--layout", "torch")[0] == 0
  assert interop.diff_state_dicts(interop.load_state_dict(out),
                                  torch.load(ckpts / "pruned.pt", weights_only=True)) == []


# ------------------------------------------------------------------------------------------------------------------
# user errors: one line, exit status 2, nothing written


def _unsafe_pickle(path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  with open(path, "wb") as f:
    pickle.dump({"w": Evil()}, f, protocol=2)


@pytest.fixture(scope="module")
def bad_files(ckpts):
  with open(ckpts / "plain.pt", "rb") as f:
    data = f.read()
  (ckpts / "truncated.pt").write_bytes(data[:len(data) // 2])
  (ckpts / "junk.safetensors").write_bytes(b"not a checkpoint at all")
  (ckpts / "empty.pt").write_bytes(b"")
  _unsafe_pickle(ckpts / "unsafe.pt")
  (ckpts / "folder").mkdir()
  torch.save(_net().double().state_dict(), ckpts / "float64.pt")
  return ckpts


BAD = {
    "missing file": (["inspect", "{d}/nope.pt"], "no such file"),
    "truncated": (["inspect", "{d}/truncated.pt"], "truncated or corrupt"),
    "junk": (["inspect", "{d}/junk.safetensors"], "neither a torch checkpoint"),
    "empty": (["inspect", "{d}/empty.pt"], "empty"),
    "unsafe pickle": (["inspect", "{d}/unsafe.pt"], "refused"),
    "not an orbax dir": (["inspect", "{d}/folder"], "not an Orbax checkpoint"),
    "amount > 1": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1", "--amount", "1.5"], "amount=1.5"),
    "amount not a number": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1", "--amount", "half"],
                            "not a number"),
    "count too large": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1", "--amount", "1000"],
                        "should be smaller than the number of parameters"),
    "no amount": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1"], "needs --amount"),
    "ln without axis": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "ln", "--amount", "0.5"], "--axis"),
    "axis out of range": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "ln", "--amount", "0.5",
                           "--axis", "7"], "Invalid index 7"),
    "global random": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "random", "--amount", "0.5",
                       "--global"], "--method l1 only"),
    "nm with amount": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "nm", "--amount", "0.5"],
                       "no --amount"),
    "nm shape": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "nm"], "multiple of 4"),
    "bad regex": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1", "--amount", "0.5", "--include",
                   "(["], "not a valid regular expression"),
    "selects nothing": (["prune", "{d}/plain.pt", "-o", "{o}/x.pt", "--method", "l1", "--amount", "0.5",
                         "--include", "nothing"], "no tensor"),
    "bad output suffix": (["prune", "{d}/plain.pt", "-o", "{o}/x.txt", "--method", "l1", "--amount", "0.5"],
                          "torch layout is written as"),
    "missing output folder": (["prune", "{d}/plain.pt", "-o", "{o}/no/x.pt", "--method", "l1", "--amount", "0.5"],
                              "does not exist"),
    "flax as pickle": (["convert", "{d}/plain.pt", "{o}/x.pt", "--layout", "flax"], "not as a torch pickle"),
    "no layout": (["convert", "{d}/plain.pt", "{o}/x.pt"], "--layout"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "float64 without x64": (["inspect", "{d}/float64.pt"], "JAX_ENABLE_X64=1"),
}


def _status(argv) -> int:
  """main's exit status, whether it returns it or argparse exits with it (bad arguments)."""
  try:
    return cli.main(argv)
  except SystemExit as exit_:
    return exit_.code


@pytest.mark.parametrize("case", sorted(BAD))
def test_user_errors_print_one_line_and_exit_2(capsys, bad_files, tmp_path, case):
  argv, needle = BAD[case]
  status = _status([a.format(d=bad_files, o=tmp_path) for a in argv])
  err = capsys.readouterr().err
  assert status == 2
  assert len(err.strip().splitlines()) == 1 and needle in err, err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "x.txt")


def test_nothing_is_overwritten_without_force(capsys, ckpts, tmp_path):
  out = tmp_path / "out.pt"
  out.write_bytes(b"precious")
  argv = ["prune", ckpts / "plain.pt", "-o", out, "--method", "l1", "--amount", "0.5"]
  status, _, err = run(capsys, *argv)
  assert status == 2 and "--force" in err and out.read_bytes() == b"precious"
  orbax_out = tmp_path / "orbax"
  assert run(capsys, "convert", ckpts / "plain.pt", orbax_out, "--layout", "flax")[0] == 0
  status, _, err = run(capsys, "convert", ckpts / "pruned.pt", orbax_out, "--layout", "flax")
  assert status == 2 and "--force" in err
  assert run_json(capsys, "inspect", orbax_out)["pruned_tensors"] == 0  # still the first checkpoint
  assert run(capsys, *argv, "--force")[0] == 0
  assert torch.load(out, weights_only=True)["0.weight_mask"].sum() == 72
  assert run(capsys, "convert", ckpts / "pruned.pt", orbax_out, "--layout", "flax", "--force")[0] == 0
  assert run_json(capsys, "inspect", orbax_out)["pruned_tensors"] == 2


# ------------------------------------------------------------------------------------------------------------------
# the installed command


def test_console_script_is_declared_and_exits_2_on_a_missing_file(tmp_path):
  """pyproject's console script points at cli.main; ``python -m jaxprune`` (the same main) exits 2 with one line."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["scripts"]["jaxprune"] == "jaxprune.cli:main"
  proc = subprocess.run([sys.executable, "-m", "jaxprune", "inspect", str(tmp_path / "missing.pt")], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"jaxprune inspect: error: {tmp_path / 'missing.pt'}: no such file or directory"
  assert proc.stdout == ""


def test_safetensors_work_without_torch(ckpts, tmp_path):
  """With torch unimportable, every command works on safetensors, and a .pt gets a one-line 'needs torch'."""
  script = f"""
import sys
sys.modules["torch"] = None  # import torch now raises ImportError
from jaxprune import cli
d, o = {str(ckpts)!r}, {str(tmp_path)!r}
assert cli.main(["inspect", d + "/pruned.safetensors"]) == 0
assert cli.main(["prune", d + "/pruned.safetensors", "-o", o + "/p.safetensors", "--method", "l1",
                 "--amount", "0.5"]) == 0
assert cli.main(["convert", o + "/p.safetensors", o + "/f.safetensors", "--layout", "flax"]) == 0
assert cli.main(["convert", o + "/f.safetensors", o + "/t.safetensors", "--layout", "torch"]) == 0
assert cli.main(["inspect", d + "/plain.pt"]) == 2
assert cli.main(["convert", o + "/f.safetensors", o + "/t.pt", "--layout", "torch"]) == 2
assert "torch" not in {{k for k, v in sys.modules.items() if v is not None}}
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 2 and all("needs torch" in line for line in errors), proc.stderr
  assert interop.diff_state_dicts(interop.load_state_dict(tmp_path / "t.safetensors"),
                                  interop.load_state_dict(tmp_path / "p.safetensors")) == []


class _TiedLM(nn.Module):
  """GPT-2's tie in small: the output head is the token embedding (one Parameter, two state_dict keys)."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.wte = nn.Embedding(16, 8)
    self.lm_head = nn.Linear(8, 16, bias=False)
    self.lm_head.weight = self.wte.weight


def test_prune_selects_a_tied_tensor_by_any_of_its_names(capsys, tmp_path):
  """--include lm_head prunes GPT-2's head although JAX holds it under its first name (transformer.wte.weight):
  the one tensor is pruned as torch's l1_unstructured on lm_head prunes it, and --exclude on either name keeps it."""
  model = _TiedLM()
  torch.save(model.state_dict(), tmp_path / "tied.pt")
  out = tmp_path / "out.pt"
  report = run_json(capsys, "prune", tmp_path / "tied.pt", "-o", out, "--method", "l1", "--amount", "0.5",
                    "--include", "^lm_head")
  assert report["selected"] == ["wte.weight"]
  prune.l1_unstructured(model.lm_head, "weight", 0.5)
  expected = model.lm_head.weight.detach().numpy()
  effective = _effective(torch.load(out, weights_only=True))
  for name in ("wte.weight", "lm_head.weight"):
    np.testing.assert_array_equal(effective[name], expected)
  status, _, err = run(capsys, "prune", tmp_path / "tied.pt", "-o", tmp_path / "none.pt", "--method", "l1",
                       "--amount", "0.5", "--include", "^wte", "--exclude", "^lm_head")
  assert status == 2 and "no tensor" in err
