"""Hostile input to the command line (issue 12): one line on stderr naming the file or key, exit status 2, and no
file or folder created, changed or removed; signals during a write leave the old output and no temporary files.

Inputs are tiny safetensors files written with numpy (no torch, no JAX compile), and commands run in-process
through ``cli.main``; a single subprocess takes the signals.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import interop
from jaxprune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = np.arange(1, 13, dtype=np.float32).reshape(3, 4)


def snapshot(folder) -> dict:
  """Every path under ``folder`` with its kind, bytes and mode: what a failing command must leave alone."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      data = open(path, "rb").read() if os.path.isfile(path) else b""  # not a folder, nor a FIFO
      out[os.path.relpath(path, folder)] = (os.path.isdir(path), hashlib.sha256(data).hexdigest(),
                                            os.stat(path).st_mode)
  return out


def fails(capsys, folder, argv, *needles) -> str:
  """Runs ``jaxprune argv``; asserts exit 2, one stderr line holding every needle, and ``folder`` untouched."""
  before = snapshot(folder)
  try:
    status = cli.main([str(a) for a in argv])
  except SystemExit as exit_:  # argparse's own errors
    status = exit_.code
  err = capsys.readouterr().err
  assert status == 2, err
  assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
  assert snapshot(folder) == before
  return err


def pruned_sd(**changes) -> dict:
  """A pruned Linear pair as numpy (``0.weight_orig``/``0.weight_mask``, ``0.bias``) with ``changes`` applied
  (a None value deletes the key)."""
  mask = np.ones((3, 4), np.float32)
  mask[0, :2] = 0
  sd = {"0.weight_orig": W, "0.bias": np.zeros(3, np.float32), "0.weight_mask": mask}
  sd.update(changes)
  return {k: v for k, v in sd.items() if v is not None}


def with_mask_value(value) -> np.ndarray:
  mask = pruned_sd()["0.weight_mask"].copy()
  mask[1, 2] = value
  return mask


BAD_STATE_DICTS = {
    "orphan orig": (dict(**{"0.weight_mask": None}), "'0.weight_orig'"),
    "orphan mask": (dict(**{"0.weight_orig": None}), "'0.weight_mask'"),
    "mask shape": (dict(**{"0.weight_mask": np.ones((4, 3), np.float32)}), "'0.weight_mask'"),
    "mask 0.5": (dict(**{"0.weight_mask": with_mask_value(0.5)}), "'0.weight_mask'"),
    "mask nan": (dict(**{"0.weight_mask": with_mask_value(np.nan)}), "'0.weight_mask'"),
    "mask -0.0": (dict(**{"0.weight_mask": with_mask_value(-0.0)}), "'0.weight_mask'"),
    "mask 2": (dict(**{"0.weight_mask": with_mask_value(2)}), "'0.weight_mask'"),
    "float64": (dict(**{"0.bias": np.zeros(3)}), "'0.bias'"),
    "int64 out of range": (dict(n=np.array([2 ** 40])), "'n'"),
}


@pytest.mark.parametrize("target", ["out.pt", "out.safetensors"])
@pytest.mark.parametrize("case", sorted(BAD_STATE_DICTS))
def test_convert_to_torch_validates_before_writing(capsys, tmp_path, case, target):
  """Issue 12.4: the state_dict used to be written first and checked after, leaving an output behind."""
  changes, key = BAD_STATE_DICTS[case]
  interop.save_state_dict(pruned_sd(**changes), tmp_path / "in.safetensors")
  fails(capsys, tmp_path, ["convert", tmp_path / "in.safetensors", tmp_path / target, "--layout", "torch"],
        "in.safetensors: ", key)


@pytest.fixture(name="model")
def _model(tmp_path):
  path = tmp_path / "model.safetensors"
  interop.save_state_dict(pruned_sd(), path)
  return path


def test_force_never_empties_a_foreign_folder(capsys, tmp_path, model):
  """Issue 12.1: Orbax's force deleted any folder given as the target."""
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "thesis.txt").write_text("x")
  fails(capsys, tmp_path, ["convert", model, notes, "--layout", "flax", "--force"], str(notes),
        "never another folder")
  (tmp_path / "dir.pt").mkdir()
  fails(capsys, tmp_path, ["prune", model, "-o", tmp_path / "dir.pt", "--method", "l1", "--amount", "0.5",
                           "--force"], "dir.pt")


def test_force_replaces_a_jaxprune_checkpoint_but_not_one_with_foreign_files(capsys, tmp_path, model):
  ckpt = tmp_path / "ckpt"
  assert cli.main(["convert", str(model), str(ckpt), "--layout", "flax"]) == 0
  assert cli.main(["convert", str(model), str(ckpt), "--layout", "flax", "--force"]) == 0
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.safetensors"]  # swapped in, nothing left beside it
  (ckpt / "notes.txt").write_text("mine")
  fails(capsys, tmp_path, ["convert", model, ckpt, "--layout", "flax", "--force"], str(ckpt))


def _retitled(path, spec=None, extra=None):
  """``path`` (a JAX-form safetensors file) rewritten with its spec replaced and ``extra`` tensors added."""
  meta = interop.read_metadata(path)
  arrays = {**interop.load_state_dict(path), **(extra or {})}
  if spec is not None:
    meta[cli.SPEC_KEY] = spec
  del meta[interop.io.KEYS_METADATA]
  interop.save_state_dict(arrays, path, metadata=meta)


TAMPERED = {
    "spec without entries": ({"spec": json.dumps({"layout": "flax"})}, "interop.spec"),
    "spec null": ({"spec": "null"}, "interop.spec"),
    "spec not json": ({"spec": "{"}, "interop.spec"),
    "dtype float99": ({"spec": "float99"}, "float99"),
    "params beside its subtree": ({"extra": {"params": np.zeros(2, np.float32)}}, "'params'"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_jax_form_metadata(capsys, tmp_path, model, case):
  """Issue 12.7: a JAX-form file's metadata is input too; tampering gives one line naming the file."""
  jax_form = tmp_path / "jax.safetensors"
  assert cli.main(["convert", str(model), str(jax_form), "--layout", "flax"]) == 0
  change, needle = TAMPERED[case]
  spec = change.get("spec")
  if spec == "float99":
    spec = interop.read_metadata(jax_form)[cli.SPEC_KEY].replace('"float32"', '"float99"')
  _retitled(jax_form, spec, change.get("extra"))
  capsys.readouterr()
  for argv in (["inspect", jax_form], ["convert", jax_form, tmp_path / "back.pt", "--layout", "torch"]):
    fails(capsys, tmp_path, argv, "jax.safetensors", needle)


def _torch_file(tmp_path, tensor) -> str:
  path = tmp_path / "odd.pt"
  torch.save({"fc.weight": torch.zeros(2, 2), "odd": tensor}, path)
  return path


ODD_TENSORS = {
    "float4": lambda: torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    "qint8": lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),
    "complex32": lambda: torch.zeros(2, dtype=torch.complex32),
    "sparse coo": lambda: torch.eye(2).to_sparse(),
    "sparse csr": lambda: torch.eye(2).to_sparse_csr(),
    "meta": lambda: torch.empty(2, device="meta"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's, on building such tensors
@pytest.mark.parametrize("case", sorted(ODD_TENSORS))
def test_tensors_jax_cannot_hold(capsys, tmp_path, case):
  """Issue 12.7: dtypes and layouts without a JAX counterpart are named, not a traceback."""
  path = _torch_file(tmp_path, ODD_TENSORS[case]())
  fails(capsys, tmp_path, ["inspect", path], "odd.pt", "'odd'")


def test_bad_seed_negative_infinity_and_strict_json(capsys, tmp_path, model):
  fails(capsys, tmp_path, ["prune", model, "-o", tmp_path / "o.pt", "--method", "random", "--amount", "0.5",
                           "--seed", str(2 ** 64)], "64-bit seed")
  # `--n -inf` (as documented) reaches the command's own checks instead of argparse's "expected one argument"
  fails(capsys, tmp_path, ["prune", model, "-o", tmp_path / "o.pt", "--method", "ln", "--amount", "0.5", "--n",
                           "-inf"], "--axis 0")
  cli.Output(as_json=True).emit({"arguments": {"n": float("-inf"), "amount": 0.5}}, lambda: [])
  report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert report["arguments"] == {"n": "-inf", "amount": 0.5}


def test_a_fifo_is_refused_without_blocking(capsys, tmp_path):
  fifo = tmp_path / "pipe.safetensors"
  os.mkfifo(fifo)
  fails(capsys, tmp_path, ["inspect", fifo], "pipe.safetensors", "not a regular file")


def test_errors_name_tensors_as_torch_does(capsys, tmp_path, model):
  err = fails(capsys, tmp_path, ["prune", model, "-o", tmp_path / "o.pt", "--method", "l1", "--amount", "1000"],
              "0.weight:")
  assert "0/weight" not in err


def test_protocol_4_pickle_reads_as_such_and_warnings_stay_off_stderr(capsys, tmp_path):
  """torch's safe loader cannot read protocol 4; its multi-line UserWarning must not precede the error."""
  path = tmp_path / "p4.pt"
  torch.save({"w": torch.zeros(2)}, path, pickle_protocol=4)
  err = fails(capsys, tmp_path, ["inspect", path], "p4.pt", "pickle protocol")
  assert "corrupt" not in err


def test_inspect_keeps_torch_dtypes_and_slashes_round_trip(capsys, tmp_path):
  """int64 shows as int64 (JAX holds it as int32); a key holding '/' survives a Flax-layout .safetensors."""
  sd = {"a/b.weight": W, "a/b.bias": np.zeros(3, np.float32), "steps": np.array(7)}
  interop.save_state_dict(sd, tmp_path / "in.safetensors")
  assert cli.main(["inspect", str(tmp_path / "in.safetensors"), "--json"]) == 0
  rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
  assert rows["steps"]["dtype"] == "int64"
  flax, back = tmp_path / "flax.safetensors", tmp_path / "back.safetensors"
  assert cli.main(["convert", str(tmp_path / "in.safetensors"), str(flax), "--layout", "flax"]) == 0
  assert cli.main(["convert", str(flax), str(back), "--layout", "torch"]) == 0
  assert interop.diff_state_dicts(interop.load_state_dict(back), sd) == []


# ------------------------------------------------------------------------------------------------------------------
# signals during a write (issue 12.2, 12.8)

_SIGNAL_SCRIPT = textwrap.dedent("""
    import sys, time
    import interop, orbax.checkpoint as ocp
    from jaxprune import cli

    def paused(write):
      # The output is complete in its temporary folder, not yet committed: say so, then wait for the signal.
      def wrapper(*args, **kwargs):
        result = write(*args, **kwargs)
        print("paused", flush=True)
        while cli._held["signum"] is None:
          time.sleep(0.005)
        return result
      return wrapper

    file_writer = interop.io.file_writer  # what every file the CLI writes goes through: it returns the writer
    interop.io.file_writer = lambda *args, **kwargs: paused(file_writer(*args, **kwargs))
    ocp.Checkpointer.save = paused(ocp.Checkpointer.save)
    for line in sys.stdin:
      print("status", cli.main(line.split()), flush=True)
""")


def test_signals_mid_write_leave_the_old_output_and_no_temporary_files(tmp_path, model):
  """SIGINT, SIGTERM and SIGHUP: the old output intact, one line on stderr, no temporary file; SIGKILL: the old
  output intact, and what it left is removed by the next write to the same target."""
  ckpt, pt, st = tmp_path / "ckpt", tmp_path / "out.pt", tmp_path / "out.safetensors"
  for argv in (["convert", model, ckpt, "--layout", "flax"],
               ["prune", model, "-o", pt, "--method", "l1", "--amount", "0.5"],
               ["prune", model, "-o", st, "--method", "l1", "--amount", "0.5"]):
    assert cli.main([str(a) for a in argv]) == 0
  before = snapshot(tmp_path)
  prune = f"--method l1 --amount 0.9 --force {model}"
  runs = [(f"convert {model} {ckpt} --layout flax --force", signal.SIGINT),
          (f"prune -o {pt} {prune}", signal.SIGTERM), (f"prune -o {st} {prune}", signal.SIGHUP),
          (f"convert {model} {ckpt} --layout flax --force", signal.SIGKILL)]
  proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for command, signum in runs:
      proc.stdin.write(command + "\n")
      proc.stdin.flush()
      assert proc.stdout.readline() == "paused\n"
      proc.send_signal(signum)
      if signum != signal.SIGKILL:
        assert proc.stdout.readline() == f"status {128 + signum}\n"
    proc.stdin.close()
    err = proc.stderr.read()
  finally:
    proc.kill()
    proc.wait()
  lines = err.splitlines()
  assert [line.split(": ", 1)[1] for line in lines] == [
      f"interrupted ({name}); nothing was written" for name in ("SIGINT", "SIGTERM", "SIGHUP")], err
  left = sorted(set(os.listdir(tmp_path)) - {"ckpt", "out.pt", "out.safetensors", "model.safetensors"})
  assert len(left) == 1 and left[0].startswith(".ckpt.") and left[0].endswith(".tmp")  # SIGKILL's, locked no more
  assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(".ckpt.")} == before
  assert cli.main(["convert", str(model), str(ckpt), "--layout", "flax", "--force"]) == 0
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.safetensors", "out.pt", "out.safetensors"]
