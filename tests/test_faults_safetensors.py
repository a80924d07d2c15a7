"""The safetensors reader against hostile headers (issue 12.3, 12.7, 12.9): the format is recognised from the
header before any torch signature, and every header either reads exactly what it says or raises a
CheckpointError (or a DTypeError) naming the file: never a panic, a hang or an allocation the header made up."""
import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

import interop
from interop import devices, io


def _file(path, header: bytes, data: bytes = b"") -> str:
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)
  return str(path)


def _header(tensors: dict, metadata=None) -> bytes:
  body = dict(tensors, **({"__metadata__": metadata} if metadata is not None else {}))
  return json.dumps(body).encode()


def test_a_header_length_of_128_mod_256_is_not_a_pickle(tmp_path):
  """The first byte is then 0x80, a pickle's opcode: it used to be read as a torch file (about 1 in 32 files).

  safetensors' own writer pads the header to 8 bytes, so one of 8 paddings makes such a file (interop's writer pads
  to 64, whose lengths never end in 0x80)."""
  from safetensors.numpy import save_file
  sd = {"a": np.ones((2, 2), np.int64), "b": np.arange(3, dtype=np.float32)}
  path = tmp_path / "x.safetensors"
  for pad in range(256):
    save_file(sd, str(path), metadata={"pad": "p" * pad})
    if path.read_bytes()[0] == 0x80:
      break
  assert path.read_bytes()[0] == 0x80
  assert interop.diff_state_dicts(interop.load_state_dict(path), sd) == []
  assert interop.read_metadata(path)["pad"] == "p" * pad


def test_interop_writes_64_byte_aligned_tensors(tmp_path):
  """The data starts at a multiple of 64 bytes, so mapped tensors are aligned as JAX needs to use them in place."""
  sd = {"a": np.ones((16, 16), np.float32), "b": np.arange(3, dtype=np.float32)}
  for pad in range(64):
    interop.save_state_dict(sd, tmp_path / "x.safetensors", metadata={"pad": "p" * pad})
    assert io.read_header(tmp_path / "x.safetensors").data_start % 64 == 0
    assert interop.load_state_dict(tmp_path / "x.safetensors", mmap=True)["a"].ctypes.data % 64 == 0


def test_a_torch_checkpoint_named_safetensors_loads(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "really_torch.safetensors"
  torch.save({"w": torch.arange(3.0)}, path)
  assert interop.load_state_dict(path)["w"].tolist() == [0.0, 1.0, 2.0]


def test_duplicate_keys_are_refused(tmp_path):
  body = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
         b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
  with pytest.raises(interop.CheckpointError, match="dup.safetensors.*'w' appears twice"):
    interop.load_state_dict(_file(tmp_path / "dup.safetensors", body, bytes(8)))


def test_unknown_dtypes_and_complex128_name_the_tensor(tmp_path):
  for code in ("C128", "F4", "float99"):
    path = _file(tmp_path / "odd.safetensors", _header({"z": {"dtype": code, "shape": [1],
                                                               "data_offsets": [0, 16]}}), bytes(16))
    with pytest.raises(interop.DTypeError, match=f"odd.safetensors.*'z'.*{code}"):
      interop.load_state_dict(path)
  with pytest.raises(interop.DTypeError, match="'z' is complex128, which safetensors cannot store"):
    interop.save_state_dict({"z": np.zeros(1, np.complex128)}, tmp_path / "c.safetensors")
  assert sorted(os.listdir(tmp_path)) == ["odd.safetensors"]


def test_a_tensor_larger_than_memory_is_refused_before_allocating(tmp_path):
  """A sparse file can hold a tensor larger than memory; safetensors panicked (a BaseException) on it."""
  n = 2 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  path = _file(tmp_path / "huge.safetensors", _header({"big": {"dtype": "U8", "shape": [n],
                                                                "data_offsets": [0, n]}}))
  try:
    os.truncate(path, os.path.getsize(path) + n)
  except OSError:
    pytest.skip("this file system has no sparse files that large")
  with pytest.raises(interop.CheckpointError, match="huge.safetensors: tensor 'big'.*does not fit in memory"):
    interop.load_state_dict(path)


_LIES = st.one_of(st.none(), st.integers(-2, 2 ** 64), st.floats(allow_nan=False), st.text(max_size=3),
                  st.sampled_from(["C128", "F4", "X9"]), st.lists(st.integers(-2, 40) | st.text(max_size=1),
                                                                  max_size=3))


@st.composite
def _headers(draw):
  """Raw bytes of a safetensors file: a valid one, then maybe one field made a lie, a key given twice, the header
  length changed, the first byte flipped, the header cut short or the data too short or too long."""
  names = draw(st.lists(st.text(min_size=1, max_size=3), max_size=3, unique=True))
  tensors, end = {}, 0
  for name in names:
    code = draw(st.sampled_from(sorted(io.SAFETENSORS_DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    size = math.prod(shape) * devices.numpy_dtype(io.SAFETENSORS_DTYPES[code]).itemsize
    tensors[name] = {"dtype": code, "shape": shape, "data_offsets": [end, end + size]}
    end += size
  if names and draw(st.booleans()):
    entry = tensors[draw(st.sampled_from(names))]
    entry[draw(st.sampled_from(sorted(entry)))] = draw(_LIES)
  body = _header(tensors, draw(st.none() | st.dictionaries(st.text(max_size=2), st.text(max_size=2) | st.none())))
  if names and draw(st.booleans()):  # the first entry once more, as raw JSON
    body = body[:-1] + b", " + json.dumps({names[0]: tensors[names[0]]})[1:-1].encode() + b"}"
  mutation = draw(st.sampled_from(["none", "length", "first byte", "truncate"]))
  length = len(body)
  if mutation == "length":
    length = draw(st.integers(0, 2 ** 64 - 1))
  elif mutation == "first byte":
    body = bytes([draw(st.integers(0, 255))]) + body[1:]
  elif mutation == "truncate":
    body = body[:draw(st.integers(0, len(body)))]
  return struct.pack("<Q", length) + body, draw(st.binary(min_size=max(0, end - 4), max_size=end + 4))


@given(_headers())
def test_fuzzed_headers_read_exactly_or_raise_one_error(tmp_path_factory, case):
  head, data = case
  path = tmp_path_factory.getbasetemp() / "f.safetensors"  # one file, rewritten: a folder per example is slow
  path.write_bytes(head + data)
  try:
    sd = interop.load_state_dict(path)
  except (interop.CheckpointError, interop.DTypeError) as err:
    assert "f.safetensors" in str(err) and "\n" not in str(err)
    return
  # Whatever loaded is exactly what the header says: each tensor's bytes from its range of the data.
  header = io.read_header(path)
  for name, (dtype, shape, begin, end) in header.tensors.items():
    raw = (head + data)[header.data_start + begin:header.data_start + end]
    assert sd[name].shape == shape and sd[name].dtype == dtype and sd[name].tobytes() == raw
