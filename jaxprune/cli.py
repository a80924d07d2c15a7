"""The ``jaxprune`` command line: inspect, prune and convert checkpoints without writing Python.

* ``jaxprune inspect PATH``: per-tensor sparsity of a torch (``.pt``/``.pth``/``.bin``), safetensors or
  jaxprune-written JAX checkpoint (a Flax-layout ``.safetensors`` or an Orbax directory), pruned or permanent.

Any input may also be a sharded checkpoint as Hugging Face ships them (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json`` and its shards; the index or its folder), and any output too: OUT named as an
index, or a folder (``--max-shard-size`` sets the shards' size, 5GB by default), written whole and atomically
(:mod:`interop.shards`). Inputs are memory-mapped and given back tensor by tensor (:mod:`interop.pages`), so
``inspect`` holds a few MiB of a checkpoint at a time, and ``convert`` (``--layout torch``, and ``--layout flax``
into safetensors, converted tensor by tensor with numpy: :mod:`interop.streaming`) about one tensor: a checkpoint
larger than memory converts shard by shard. ``prune`` into safetensors, locally, holds about one tensor too (its
new masks wait packed 8 entries a byte, and each module is made as it is written).
* ``jaxprune prune IN -o OUT --method l1|random|ln|nm ...``: prunes with jaxprune's engine (torch's exact
  semantics) and writes a checkpoint that torch loads: ``X_orig`` + ``X_mask`` pairs, or plain tensors with
  ``--permanent``.
* ``jaxprune convert IN OUT --layout torch|flax``: torch form <-> JAX form, losslessly (round trips are bit exact).

Every checkpoint is read into one pivot, a torch-form state_dict (the form ``interop`` converts to and from), so
each command handles every input form the same way. The JAX form, as written here, is Flax-layout pytrees
``{"params", "masks", "batch_stats", ...}`` (``masks`` holds only the pruned leaves, as bool) plus the
:class:`interop.TorchSpec` that restores torch's exact keys, order and dtypes on the way back.

User mistakes (bad arguments, missing or corrupt files, amounts out of range, a target that exists) print one line
on stderr and exit with status 2. Everything is checked before anything is written, so a failing command creates,
changes and removes nothing. Outputs are written beside the target and swapped in whole (an Orbax folder too), so
SIGINT, SIGTERM and SIGHUP leave the old output (or none) and no temporary files; what a SIGKILL leaves is removed
by the next write to the same target. ``--force`` replaces a file or an Orbax checkpoint jaxprune wrote, never
another folder.
``interop`` (and, through it, torch for ``.pt`` files) and Orbax are imported only by the commands that need them,
so ``import jaxprune`` never pulls in torch and a safetensors-only install runs every command but ``.pt`` I/O.

Start-up: JAX (and flax) are imported only by what makes JAX arrays: ``prune``, ``convert --layout flax`` to an
Orbax directory, and the reading of a JAX-form checkpoint. ``inspect`` of a torch-form file reads and counts with numpy (and torch for a
``.pt``), so it starts in well under a second. ``prune`` and ``convert`` keep what XLA compiles in JAX's
persistent compilation cache (:func:`use_compilation_cache`), so running the same command again compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import jaxprune
from jaxprune.errors import UnsupportedDtypeError

EXIT_USER_ERROR = 2
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS = ".safetensors"
FORMAT_KEY = "jaxprune.format"
"""safetensors metadata (and Orbax ``meta`` entry) marking the JAX form; its value is the layout, ``"flax"``."""
SPEC_KEY = "interop.spec"
METHODS = {"l1": "l1_unstructured", "random": "random_unstructured", "ln": "ln_structured", "nm": "nm_structured"}
ORBAX_ENTRIES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", "meta", "state"})
"""What an Orbax checkpoint written by ``convert --layout flax`` holds at its top level (orbax-checkpoint 0.12)."""


class UserError(Exception):
  """A mistake in the command line or its input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage mistake is one line (``jaxprune prune: error: ...``), not usage text plus the error."""

  def error(self, message: str):
    self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing checkpoints (every form goes through a torch-form state_dict)


class Loaded(NamedTuple):
  """A checkpoint read from disk: its torch-form state_dict (numpy arrays or torch tensors), the layout of the
  file (``"torch"``, or ``"flax"`` for the JAX form), and the files it was mapped from (its shards, for a sharded
  one), whose pages a :class:`interop.pages.PageDropper` may give back."""
  state_dict: dict
  layout: str
  files: tuple[str, ...] = ()


@contextlib.contextmanager
def _dropping(source: Union[Loaded, Sequence[str]]) -> Iterator[Callable[[Any], None]]:
  """A :class:`interop.pages.PageDropper` over the files a checkpoint was mapped from: each tensor's pages go back
  once it has been counted or written, so a command holds about one tensor of the checkpoint at a time."""
  from interop.pages import PageDropper  # pylint: disable=import-outside-toplevel
  dropper = PageDropper(source.files if isinstance(source, Loaded) else source)
  try:
    yield dropper
  finally:
    dropper.flush()


def _escape(part: str) -> str:
  """A pytree key as one ``/``-separated part of a safetensors key (torch keys may hold ``/``)."""
  return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
  return re.sub("%(25|2F)", lambda m: "%" if m.group(1) == "25" else "/", part)


def _unflatten(flat: dict, path: str) -> dict:
  """Nested trees of a JAX-form safetensors file's ``/``-joined keys; a tensor where a subtree must go (``params``
  beside ``params/fc/kernel``) is an error, not a silent overwrite."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  paths = {tuple(_unescape(p) for p in key.split("/")): value for key, value in flat.items()}
  for p in paths:
    clash = next((p[:i] for i in range(1, len(p)) if p[:i] in paths), None)
    if clash is not None:
      raise UserError(f"{path}: tensor {'/'.join(clash)!r} sits where {'/'.join(p)!r} needs a subtree; not a "
                      "JAX-form checkpoint jaxprune wrote")
  return traverse_util.unflatten_dict(paths)


def _jax_to_state_dict(trees: dict, spec_json: Optional[str], path: str,
                       done: Optional[Callable[[Any], None]] = None) -> dict:
  """The torch-form state_dict of JAX-form trees ``{"params", "masks", collections...}`` read from ``path``.

  copy=False: a tensor that needs no transpose stays the mapped file's array; ``done`` follows each one converted.
  """
  import interop  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  trees = dict(trees)
  if not isinstance(trees.get("params"), dict):
    raise UserError(f"{path}: the JAX checkpoint has no 'params' tree (found {sorted(trees)})")
  params, masked = trees.pop("params"), traverse_util.flatten_dict(trees.pop("masks", {}))
  flat = traverse_util.flatten_dict(params)
  for leaf in masked:
    if leaf not in flat:
      raise UserError(f"{path}: mask {'/'.join(leaf)!r} has no param beside it")
  masks = traverse_util.unflatten_dict({leaf: masked.get(leaf, jaxprune.UNMASKED) for leaf in flat})
  try:
    spec = interop.TorchSpec.from_json(spec_json) if spec_json is not None else None
  except interop.InteropError as err:
    raise UserError(f"{path}: metadata {SPEC_KEY!r}: {err}") from None
  return interop.to_torch(params, masks, trees, spec, layout="flax", tensors="numpy", copy=False, done=done)


def _read_orbax(path: str) -> Loaded:
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise UserError(f"{path} is a directory; reading Orbax checkpoints needs orbax-checkpoint "
                    "(pip install 'jaxprune[orbax]')") from err
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(os.path.abspath(path), args=args)
  except Exception as err:  # orbax raises assorted types (FileNotFoundError, ValueError, KeyError) for foreign dirs
    raise UserError(f"{path}: not an Orbax checkpoint written by `jaxprune convert ... --layout flax` "
                    f"({type(err).__name__}: {err})") from err
  meta = restored["meta"] or {}
  if not isinstance(meta, dict) or meta.get(FORMAT_KEY) != "flax":
    raise UserError(f"{path}: an Orbax checkpoint without jaxprune's {FORMAT_KEY!r} entry")
  return Loaded(_jax_to_state_dict(restored["state"], meta.get(SPEC_KEY), path), "flax")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
  """No cyclic garbage collection while a checkpoint is read or counted. A checkpoint of many tensors makes a few
  objects per tensor, all alive until the command ends; the collector would walk them all again and again (on
  200,000 tensors it doubled the run time). Reference counting still frees everything else at once; pruning,
  whose JAX tracing makes cyclic garbage, runs with the collector on."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


@_gc_paused()
def read_checkpoint(path: str, key: Optional[str] = None) -> Loaded:
  """Reads any checkpoint form the CLI knows (see the module docstring); ``key`` picks the state_dict out of a
  torch file that wraps it (``{"state_dict": ..., "epoch": 3}``, as Lightning saves)."""
  import interop  # pylint: disable=import-outside-toplevel
  from interop import shards  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file or directory")
  index = shards.find_index(path)  # an index, or a folder holding one: a sharded checkpoint
  single = shards.find_single(path)  # or a Hugging Face folder of an unsharded model
  if os.path.isdir(path) and index is None and single is None:
    return _read_orbax(path)
  # Mapped, not read: a tensor costs memory once touched, and commands give the pages back when done with them.
  state_dict, meta = interop.io.load_with_metadata(path, key=key, mmap=True)  # the format is read from the content
  files = (single or path,) if index is None else shards.shard_files(index)
  if meta.get(FORMAT_KEY) == "flax":
    with _dropping(files) as done:
      return Loaded(_jax_to_state_dict(_unflatten(state_dict, path), meta.get(SPEC_KEY), path, done), "flax", files)
  return Loaded(state_dict, "torch", files)


def _written_by_jaxprune(path: str) -> bool:
  """Whether the folder ``path`` is an Orbax checkpoint written by ``convert --layout flax`` and nothing more."""
  try:
    with open(os.path.join(path, "meta", "metadata"), encoding="utf-8") as f:
      meta = json.load(f)
    entries = set(os.listdir(path))
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get(FORMAT_KEY) == "flax" and entries <= ORBAX_ENTRIES


def check_target(path: str, force: bool) -> None:
  """Refuses to overwrite without ``--force``; with it, refuses any folder but a jaxprune Orbax checkpoint (which
  only an Orbax checkpoint may replace), and a target whose folder does not exist."""
  if os.path.lexists(path) and not force:
    raise UserError(f"{path} exists; pass --force to overwrite it")
  if os.path.isdir(path) and not os.path.islink(path):
    if not _written_by_jaxprune(path):
      raise UserError(f"{path} is a folder that is not an Orbax checkpoint written by jaxprune; --force replaces "
                      "only files and jaxprune's checkpoints, never another folder")
    if path.endswith((*TORCH_SUFFIXES, SAFETENSORS)):
      raise UserError(f"{path} is an Orbax checkpoint (a folder); a file cannot replace it")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"{path}: the folder {folder} does not exist")


class Target(NamedTuple):
  """Where a command writes: OUT as given and, when it is a sharded checkpoint, the path of its index (the folder
  of the index is the checkpoint, written whole) and the largest shard in bytes."""
  path: str
  index: Optional[str] = None
  max_shard_size: Optional[int] = None


def output_target(path: str, layout: str, max_shard_size: Optional[int]) -> Target:
  """What OUT names: an index (``NAME.safetensors.index.json``, ``NAME.bin.index.json``), or a folder (a path
  without a file suffix) in the torch layout or with ``--max-shard-size``: a sharded checkpoint there (with
  ``model.safetensors.index.json``); else one file, or (flax layout, no suffix) an Orbax directory. Refuses, before
  any work, a name that does not fit the layout."""
  from interop import shards  # pylint: disable=import-outside-toplevel
  folder = not os.path.splitext(os.path.basename(path.rstrip("/")))[1]  # a path without a file suffix
  if path.endswith(shards.INDEX_SUFFIX) or (folder and (layout == "torch" or max_shard_size is not None)):
    index = shards.index_path_for(path)
    try:
      suffix = shards.shard_suffix(index)
    except ValueError as err:
      raise UserError(str(err)) from None
    if layout == "flax" and suffix != SAFETENSORS:
      raise UserError(f"{path}: the flax layout is sharded as safetensors (NAME.safetensors{shards.INDEX_SUFFIX}), "
                      "not as torch pickles")
    return Target(path, index, shards.DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
  if max_shard_size is not None:
    raise UserError(f"{path}: --max-shard-size writes a sharded checkpoint: give a folder or an index "
                    f"(FOLDER/model.safetensors{shards.INDEX_SUFFIX}) as OUT")
  check_output_form(path, layout)
  return Target(path)


def check_sharded_target(target: Target, force: bool) -> None:
  """The folder of a sharded target is replaced whole: refuses it unless it is new, empty, or (with ``--force``) a
  sharded checkpoint and nothing more."""
  from interop import shards  # pylint: disable=import-outside-toplevel
  folder = os.path.dirname(os.path.abspath(target.index))
  try:
    shards.check_folder(target.index)  # a folder with other files in it is refused, --force or not
  except ValueError as err:
    raise UserError(str(err)) from None
  if os.path.lexists(folder) and os.listdir(folder) and not force:
    raise UserError(f"{folder} holds a sharded checkpoint; pass --force to replace it")
  if not os.path.isdir(os.path.dirname(folder)):
    raise UserError(f"{target.path}: the folder {os.path.dirname(folder)} does not exist")


def check_output(target: Target, force: bool) -> None:
  if target.index is not None:
    check_sharded_target(target, force)
  else:
    check_target(target.path, force)


def check_output_form(path: str, layout: str) -> None:
  """Refuses, before any work, a target whose name does not fit the layout to write."""
  if layout == "torch" and not path.endswith((*TORCH_SUFFIXES, SAFETENSORS)):
    raise UserError(f"{path}: the torch layout is written as {', '.join(TORCH_SUFFIXES)} (torch.save) or "
                    f"{SAFETENSORS}")
  if layout == "flax" and path.endswith(TORCH_SUFFIXES):
    raise UserError(f"{path}: the flax layout is written as {SAFETENSORS} or an Orbax directory (a path without "
                    "a suffix), not as a torch pickle")
  if layout == "flax" and not path.endswith(SAFETENSORS) and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{path} is a file; an Orbax checkpoint is a directory")


class Signalled(BaseException):
  """SIGINT, SIGTERM or SIGHUP, raised in the main thread, so that a write in progress is cleaned up (the default
  action of SIGTERM and SIGHUP ends the process on the spot, leaving temporary files behind)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: dict[str, Any] = {"on": False, "signum": None}
"""While a writer runs, signals are held (recorded) instead of raised: raised inside Orbax's threads, its event
loop or a garbage-collector callback they print tracebacks, or are swallowed and the write goes on."""


def _on_signal(signum: int, _frame) -> None:
  if _held["on"]:
    _held["signum"] = _held["signum"] or signum
  else:
    raise Signalled(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
  if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
    yield
    return
  previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
  """Holds signals while the block runs, then raises the first one that came (the output is not committed yet)."""
  _held.update(on=True, signum=None)
  try:
    yield
  finally:
    signum = _held["signum"]
    _held.update(on=False, signum=None)
  if signum is not None:
    raise Signalled(signum)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
  """``write(tmp)``, then ``tmp`` replaces ``path``: unless it fails or a signal comes meanwhile, which leave
  ``path`` as it was and no temporary file."""
  import interop  # pylint: disable=import-outside-toplevel
  with interop.atomic_write(path) as tmp, _signals_held():
    write(tmp)


def write_sharded(flat: dict, target: Target, metadata: Optional[dict] = None,
                  done: Optional[Callable[[Any], None]] = None) -> None:
  """A sharded checkpoint: index and shards written into a temporary folder, swapped in whole."""
  from interop import shards  # pylint: disable=import-outside-toplevel
  write = shards.writer(flat, target.index, max_shard_size=target.max_shard_size, metadata=metadata, done=done)
  write_atomically(os.path.dirname(os.path.abspath(target.index)), write)


def write_torch(state_dict: dict, target: Target, done: Optional[Callable[[Any], None]] = None) -> None:
  """A torch-form state_dict as ``.pt``/``.pth``/``.bin`` (needs torch) or ``.safetensors`` (does not), or
  sharded in either. ``done(tensor)`` follows each tensor written to safetensors (to give its pages back)."""
  import interop  # pylint: disable=import-outside-toplevel
  path = target.index or target.path
  if not path.removesuffix(".index.json").endswith(SAFETENSORS):
    try:
      import torch  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as err:
      raise UserError(f"{path}: writing a torch checkpoint needs torch (pip install 'jaxprune[torch]'); "
                      f"write {SAFETENSORS} instead") from err
  if target.index is not None:
    write_sharded(state_dict, target, done=done)
    return
  write = interop.io.file_writer(state_dict, path, done=done)  # checked before anything is written
  write_atomically(path, write)


class FlaxLayout(NamedTuple):
  """How ``convert --layout flax`` maps modules: ``--module``'s torch model and ``--layout-rules``' rules."""
  module: Any = None
  rules: tuple = ()


def _jax_trees(state_dict: dict, how: FlaxLayout, done: Optional[Callable[[Any], None]] = None) -> tuple[dict, str]:
  """The JAX form of a state_dict: ``{"params", "masks" (pruned leaves only), collections...}`` and its spec.

  copy=False: a tensor that needs no transpose stays in the mapped file's memory (nobody writes to it), and each
  tensor goes to ``done`` once converted; the numpy views of the results are those arrays' own memory."""
  import interop  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  converted = interop.from_torch(state_dict, layout="flax", module=how.module, rules=how.rules, copy=False,
                                 done=done)
  host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731  # numpy keeps the dtypes orbax writes
  masks = {path: m for path, m in traverse_util.flatten_dict(converted.masks).items() if jaxprune.is_masked(m)}
  trees = {"params": host(converted.params), **host(converted.buffers)}
  if masks:
    trees["masks"] = host(traverse_util.unflatten_dict(masks))
  return trees, converted.spec.to_json()


def write_flax(state_dict: dict, target: Target, how: FlaxLayout = FlaxLayout(),
               done: Optional[Callable[[Any], None]] = None, spec: Any = None) -> None:
  """The JAX form: a ``.safetensors`` file with ``/``-joined keys (``/`` and ``%`` inside a key part escaped as
  ``%2F``, ``%25``), sharded safetensors (the metadata in the index), or else an Orbax checkpoint directory.

  The safetensors forms are converted and written tensor by tensor, with numpy (:mod:`interop.streaming`), so they
  hold about one tensor of the checkpoint. They need ``spec``, the state_dict's, checked (:func:`_checked`, then
  :func:`interop.streaming.check_tied_masks`). Orbax takes the whole trees at once, as JAX arrays."""
  path = target.path
  if target.index is None and not path.endswith(SAFETENSORS):
    _write_orbax(state_dict, path, how, done)
    return
  import interop  # pylint: disable=import-outside-toplevel
  from interop import streaming  # pylint: disable=import-outside-toplevel
  metadata = {"format": "flax", FORMAT_KEY: "flax", SPEC_KEY: spec.to_json()}
  flat = {"/".join(map(_escape, p)): v for p, v in streaming.flax_tensors(state_dict, spec, done).items()}
  if target.index is not None:
    write_sharded(flat, target, metadata, done)
  else:
    write_atomically(path, interop.io.file_writer(flat, path, metadata, done))


def _write_orbax(state_dict: dict, path: str, how: FlaxLayout, done: Optional[Callable[[Any], None]]) -> None:
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise UserError(f"{path}: writing an Orbax checkpoint needs orbax-checkpoint (pip install 'jaxprune[orbax]'); "
                    f"or write {SAFETENSORS}") from err
  trees, spec = _jax_trees(state_dict, how, done)
  args = ocp.args.Composite(state=ocp.args.StandardSave(trees), meta=ocp.args.JsonSave({FORMAT_KEY: "flax",
                                                                                         SPEC_KEY: spec}))

  def save(tmp: str) -> None:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(tmp, args=args)

  write_atomically(path, save)  # Orbax's own force deletes the old folder first: write beside it, swap it in whole


# ----------------------------------------------------------------------------------------------------------------
# JAX's persistent compilation cache

CACHE_ENV = "JAXPRUNE_CACHE_DIR"
"""The environment variable naming the compilation cache folder (``--cache-dir`` wins over it)."""


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/jaxprune/xla``, or ``~/.cache/jaxprune/xla`` (the XDG default) without the variable."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxprune", "xla")


def cache_dir_for(flag: Optional[str], off: bool) -> Optional[str]:
  """The cache folder a command uses (None: no persistent cache): ``--no-cache``, else ``--cache-dir``, else
  ``$JAXPRUNE_CACHE_DIR``, else JAX's own ``$JAX_COMPILATION_CACHE_DIR``, else :func:`default_cache_dir`."""
  if off:
    return None
  return flag or os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()


def use_compilation_cache(flag: Optional[str] = None, off: bool = False) -> Optional[str]:
  """Points JAX's persistent compilation cache at :func:`cache_dir_for`'s folder; returns it.

  Every program is cached, however fast it compiled (JAX's default keeps only those over a second, and each of
  ours compiles faster than that, yet they add up to most of a command's time on a small checkpoint). A folder
  that cannot be created costs the cache, with a warning, not the command.
  """
  import jax  # pylint: disable=import-outside-toplevel
  folder = cache_dir_for(flag, off)
  if folder is not None:
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as err:
      warnings.warn(f"compilation cache {folder} cannot be created ({err}); compiling without it")
      folder = None
  jax.config.update("jax_enable_compilation_cache", folder is not None)
  if folder is not None:
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


# ----------------------------------------------------------------------------------------------------------------
# Output: rich for people, JSON for machines


class Output:
  """Where results go: rich tables on stdout and progress on stderr, or one JSON document on stdout."""

  def __init__(self, as_json: bool):
    self.json = as_json
    self.console = Console()
    self.status_console = Console(stderr=True)
    # Live displays only make sense on a terminal; piped, rich would leave blank lines in the log.
    self.live = not as_json and self.status_console.is_terminal

  @contextlib.contextmanager
  def progress(self, description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over ``total`` steps (on a terminal, without ``--json``); yields ``advance(label)``."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[item]}"), console=self.status_console, transient=True,
                   disable=not self.live)
    with bar:
      task = bar.add_task(description, total=total, item="")
      yield lambda item: bar.update(task, advance=1, item=item)

  @contextlib.contextmanager
  def status(self, message: str) -> Iterator[None]:
    if not self.live:
      yield
    else:
      with self.status_console.status(message):
        yield

  def emit(self, data: dict, renderables: Callable[[], Sequence[Any]]) -> None:
    """``data`` as JSON, or else what ``renderables()`` makes (only then: a table of many rows takes a while)."""
    if self.json:
      try:
        text = json.dumps(data, allow_nan=False)
      except ValueError:  # an inf or NaN argument (--n inf): rare, so only then is the document walked
        text = json.dumps(_finite(data), allow_nan=False)
      print(text)
    else:
      for r in renderables():
        self.console.print(r)


def _finite(data: Any) -> Any:
  """``data`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``: JSON has no such numbers
  (``json.dumps`` would write ``Infinity``, which strict parsers refuse)."""
  if isinstance(data, float) and not math.isfinite(data):
    return str(data)
  if isinstance(data, dict):
    return {k: _finite(v) for k, v in data.items()}
  if isinstance(data, (list, tuple)):
    return [_finite(v) for v in data]
  return data


def _report(state_dict: dict, layout: str, how: FlaxLayout = FlaxLayout(),
            done: Optional[Callable[[Any], None]] = None) -> dict:
  """Per-tensor rows and totals of a torch-form state_dict, named as in ``layout``, in the checkpoint's order
  (see :func:`_checked`)."""
  return _checked(state_dict, layout, how, done)[1]


@_gc_paused()
def _checked(state_dict: dict, layout: str, how: FlaxLayout = FlaxLayout(),
             done: Optional[Callable[[Any], None]] = None) -> tuple[Any, dict]:
  """The spec of a torch-form state_dict in ``layout`` and its report (:func:`_report`).

  Everything ``from_torch`` checks is checked (so a command that writes validates its whole output first), but
  the counting runs in numpy on the host: a checkpoint of many small tensors needs no device transfer per tensor.
  Dtypes are torch's (int64 stays int64, though JAX holds it as int32 with x64 off).
  """
  import interop  # pylint: disable=import-outside-toplevel
  spec, stats = interop.tensor_stats(state_dict, layout, module=how.module, rules=how.rules, done=done)
  sep = "." if layout == "torch" else "/"
  rows = [{"name": sep.join(t.entry.path), "shape": list(t.entry.jax_shape()), "dtype": t.entry.dtype,
           "pruned": t.pruned, "size": t.size, "zeros": t.zeros, "sparsity": t.zeros / t.size if t.size else 0.0}
          for t in stats]
  size, zeros = sum(r["size"] for r in rows), sum(r["zeros"] for r in rows)
  pruned = [r for r in rows if r["pruned"]]
  pruned_size = sum(r["size"] for r in pruned)
  buffers = sum(e.role == "buffer" for e in spec.entries)
  return spec, {"layout": layout, "tensors": rows, "buffers": buffers, "size": size,
                "ties": [list(g) for g in spec.ties],
                "uncertain": [{"key": key, "note": note} for key, note in spec.uncertain],
                "zeros": zeros, "sparsity": zeros / size if size else 0.0, "pruned_tensors": len(pruned),
                "pruned_sparsity": sum(r["zeros"] for r in pruned) / pruned_size if pruned_size else None}


def _table(report: dict, title: str) -> Table:
  table = Table(title=title, title_justify="left")
  for name, justify in (("tensor", "left"), ("shape", "right"), ("dtype", "left"), ("pruned", "center"),
                        ("zeros", "right"), ("sparsity", "right")):
    table.add_column(name, justify=justify)
  for r in report["tensors"]:
    table.add_row(r["name"], "x".join(map(str, r["shape"])) or "()", r["dtype"], "yes" if r["pruned"] else "-",
                  f"{r['zeros']:,}", f"{r['sparsity']:.2%}")
  return table


def _summary(report: dict) -> str:
  line = (f"global sparsity {report['sparsity']:.2%}: {report['zeros']:,} zeros in {report['size']:,} parameters "
          f"({len(report['tensors'])} tensors")
  line += f", {report['buffers']} buffers not counted)" if report["buffers"] else ")"
  if report["pruned_tensors"]:
    line += (f"; {report['pruned_tensors']} pruned tensors (with a mask), their sparsity "
             f"{report['pruned_sparsity']:.2%}")
  return line + "".join(f"\ntied (one tensor, counted once): {' = '.join(group)}" for group in report["ties"])


def _doubts(report: dict) -> list[str]:
  """One line per key whose Flax layout was inferred with doubt, and how to settle it."""
  if not report["uncertain"]:
    return []
  return [f"uncertain layout ({len(report['uncertain'])} keys; settle with --module or --layout-rules):",
          *(f"  {u['key']}: {u['note']}" for u in report["uncertain"])]


# ----------------------------------------------------------------------------------------------------------------
# Commands


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
  """interop's errors about a checkpoint's content name the key; these also name the file it is in."""
  import interop  # pylint: disable=import-outside-toplevel
  try:
    yield
  except interop.InteropError as err:
    text = " ".join(str(err).split())
    raise type(err)(text if text.startswith(path) else f"{path}: {text}") from err


def cmd_inspect(args, out: Output) -> None:
  with out.status(f"reading {args.path}"):
    loaded = read_checkpoint(args.path, args.key)
    with _naming(args.path), _dropping(loaded) as done:
      report = _report(loaded.state_dict, loaded.layout, done=done)
  out.emit({"path": args.path, **report},
           lambda: (_table(report, f"{args.path} ({loaded.layout} layout)"), _summary(report)))


def _amount(text: str) -> Union[int, float]:
  """``--amount``: a fraction (``0.5``) or, as in torch, a count of entries or channels (``100``)."""
  try:
    value: Union[int, float] = int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number: expected a fraction in [0, 1] or a count") from None
  try:
    jaxprune.validate_amount(value)
  except ValueError as err:  # torch's message, e.g. "amount=1.5 should either be a float in the range [0, 1] ..."
    raise argparse.ArgumentTypeError(str(err)) from None
  return value


def _shard_size(text: str) -> int:
  from interop import shards  # pylint: disable=import-outside-toplevel
  try:
    return shards.parse_size(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def _regex(text: str) -> re.Pattern:
  try:
    return re.compile(text)
  except re.error as err:
    raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({err})")


def _norm(text: str) -> Union[int, float, str]:
  """``--n`` for ln: an order such as 1, 2, inf, -inf, or 'fro'/'nuc' (torch's ``n``)."""
  if text in ("fro", "nuc"):
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a number, inf, -inf, 'fro' or 'nuc'") from None
  return int(value) if value.is_integer() else value


def _check_prune_args(args) -> dict:
  """The method's keyword arguments, after the checks argparse cannot express (one method, one set of options)."""
  method = args.method
  if args.use_global and method != "l1":
    raise UserError("--global ranks all tensors together by magnitude: it works with --method l1 only")
  if method == "nm":
    if args.amount is not None:
      raise UserError("--method nm keeps N of every M entries (--n, --m); it takes no --amount")
    n, m = 2 if args.n is None else args.n, 4 if args.m is None else args.m
    if not (isinstance(n, int) and m >= 1 and 0 <= n <= m):
      raise UserError(f"--method nm needs whole numbers 0 <= --n <= --m, got --n {n} --m {m}")
    return {"n": n, "m": m, "axis": -1 if args.axis is None else args.axis}
  if args.amount is None:
    raise UserError(f"--method {method} needs --amount (a fraction such as 0.5, or a count)")
  if args.m is not None or method != "ln" and args.n is not None:
    raise UserError(f"--{'m' if args.m is not None else 'n'} does not apply to --method {method}")
  kwargs = {"amount": args.amount}
  if method == "ln":
    if args.axis is None:
      raise UserError("--method ln prunes whole slices along --axis: pass --axis 0 (output channels / filters) or "
                      "--axis 1 (input channels), in torch's layout")
    kwargs.update(n=2 if args.n is None else args.n, axis=args.axis)
  elif args.axis is not None:
    raise UserError(f"--axis applies to --method ln and nm, not {method}")
  return kwargs


def _seed(text: str) -> int:
  """``--seed``: an integer that fits JAX's 64-bit seed."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if not -2**63 <= value < 2**63:
    raise argparse.ArgumentTypeError(f"{text} does not fit a 64-bit seed (-2**63 to 2**63 - 1)")
  return value


def _torch_named(err: Exception, chosen: Sequence[str], current: Optional[str] = None) -> UserError:
  """An error of the pruning engine, naming the tensor as torch does (``0.weight``, not the pytree's ``0/weight``).

  jaxprune's pytree-level errors start with the leaf's path; one without it is about ``current``.
  """
  text = " ".join(str(err).split())
  leaf = next((p for p in chosen if text.startswith(p + ": ")), None)
  if leaf is not None:
    text = text[len(leaf) + 2:]
  leaf = leaf or current
  return UserError(f"{leaf.replace('/', '.')}: {text}" if leaf else text)


def _selector(include: Sequence[re.Pattern], exclude: Sequence[re.Pattern], spec: Any = None):
  """``(path, leaf) -> bool`` on torch names (``conv1.weight``): the default weights, or what ``--include``
  matches, minus what ``--exclude`` matches. A tied tensor answers to each of its names (GPT-2's one leaf
  ``transformer.wte.weight`` to ``lm_head`` as well), and is left alone if ``--exclude`` matches any of them: pruning
  it prunes every name."""
  names = {}
  if spec is not None:
    entries = {e.key: e for e in spec.entries}
    for group in spec.ties:
      names["/".join(entries[group[0]].path)] = [k.removesuffix("_orig") if entries[k].role == "orig" else k
                                                 for k in group]

  def pick(path: str, leaf) -> bool:
    aliases = names.get(path, [path.replace("/", ".")])
    hit = lambda patterns: any(r.search(name) for r in patterns for name in aliases)
    chosen = hit(include) if include else jaxprune.default_where(path, leaf)
    return chosen and not hit(exclude)

  return pick


def _prune_chosen(params: Any, masks: Any, chosen: list[str], args, kwargs: dict, out: Output,
                  done: Callable[[Any], None]) -> dict:
  """The new masks of the ``chosen`` leaves, path -> :class:`interop.streaming.Bits`, after pruning them as the
  command line asks (``masks``: an earlier pruning, continued as torch's PruningContainer does: amounts are
  relative); each leaf goes to ``done`` once pruned. Packed, the masks of a whole model take 1/32 of its float32
  weights until they are written."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from interop.streaming import Bits  # pylint: disable=import-outside-toplevel
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = {jaxprune.path_str(p): x for p, x in flat}
  index = {jaxprune.path_str(p): i for i, (p, _) in enumerate(flat)}  # a leaf's place in the masks tree too
  with out.progress("pruning", 1 if args.use_global else len(chosen)) as advance:
    if args.use_global:
      try:
        masks = jaxprune.global_unstructured(params, kwargs["amount"], masks=masks,
                                             where=lambda path, _: path in chosen)
      except (ValueError, IndexError) as err:
        raise _torch_named(err, chosen) from err
      advance("global L1")
      jax.block_until_ready(masks)  # every leaf is read by then (JAX runs asynchronously): its pages can go back
      new = jax.tree.leaves(masks)
      for path in chosen:
        done(np.asarray(leaves[path]))
      return {path: Bits.of(new[index[path]]) for path in chosen}
    key = jax.random.key(args.seed) if args.method == "random" else None
    pruned = {}
    for path in chosen:  # one leaf at a time for the progress bar; the key still folds in the leaf's index
      try:
        # The earlier masks as they came: a local method reads only the leaf's own, and the others' new masks
        # wait packed rather than as bool arrays in the tree.
        new = jaxprune.prune(params, METHODS[args.method], masks=masks, key=key,
                             where=lambda p, _, path=path: p == path, **kwargs)
      except (ValueError, IndexError) as err:
        raise _torch_named(err, chosen, path) from err
      pruned[path] = Bits.of(jax.tree.leaves(new)[index[path]])  # the leaf is read by then (JAX waits for it)
      done(np.asarray(leaves[path]))  # a CPU array's own memory (no copy): the mapped file's, if JAX kept it
      advance(path.replace("/", "."))
  return pruned


def _pruned_state_dict(converted: Any, pruned: dict, permanent: bool, as_numpy: bool, done: Callable[[Any], None]
                       ) -> dict:
  """The torch state_dict of the pruned checkpoint: for safetensors, each module converted as it is written
  (:func:`interop.streaming.torch_tensors`); for ``torch.save``, which takes every tensor at once, all of it."""
  import interop  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from interop import streaming  # pylint: disable=import-outside-toplevel
  names = {jaxprune.path_str(p): tuple(k.key for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(converted.params)[0]}
  masks = traverse_util.flatten_dict(converted.masks)
  masks.update((names[path], bits) for path, bits in pruned.items())
  if as_numpy:
    leaves = {("params", *p): x for p, x in traverse_util.flatten_dict(converted.params).items()}
    for collection, tree in converted.buffers.items():
      leaves.update(((collection, *p), x) for p, x in traverse_util.flatten_dict(tree).items())
    return streaming.torch_tensors(leaves, masks, converted.spec, permanent=permanent, done=done)
  tree = traverse_util.unflatten_dict({p: m.unpack() if isinstance(m, streaming.Bits) else m
                                       for p, m in masks.items()}) if masks else {}
  return interop.to_torch(converted.params, tree, converted.buffers, converted.spec, permanent=permanent,
                          copy=False, done=done)


def _written_report(target: Target) -> dict:
  """The report of a checkpoint just written, read back over a memory map as ``inspect`` reads it: the tensors
  were made as they were written, and are not held."""
  written = read_checkpoint(target.index or target.path)
  with _dropping(written) as done:
    return _report(written.state_dict, "torch", done=done)


def cmd_prune(args, out: Output) -> None:
  import interop  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  kwargs = _check_prune_args(args)
  use_compilation_cache(args.cache_dir, args.no_cache)
  target = output_target(args.output, "torch", args.max_shard_size)
  check_output(target, args.force)
  with out.status(f"reading {args.input}"):
    # Pruning happens in torch's layout, so --axis and --include mean what they mean to torch.
    loaded = read_checkpoint(args.input, args.key)
    with _naming(args.input), _dropping(loaded) as done:
      # copy=False: JAX may use the mapped file's memory as it is (no one writes to it), one copy fewer. Each
      # tensor's pages go back once converted (a mask, once made bool); JAX's reads of the rest come back from
      # the page cache, so about one tensor of the input is resident at a time.
      converted = interop.from_torch(loaded.state_dict, layout="torch", copy=False, done=done)
  pick = _selector(args.include, args.exclude, converted.spec)
  flat, _ = jax.tree_util.tree_flatten_with_path(converted.params)
  chosen = [path for path, leaf in ((jaxprune.path_str(p), x) for p, x in flat) if pick(path, leaf)]
  if not chosen:
    raise UserError(f"no tensor of {args.input} is selected for pruning (by default: floating tensors with 2 or more "
                    "dimensions; see --include/--exclude)")
  method = METHODS[args.method]
  with _dropping(loaded) as done:
    pruned = _prune_chosen(converted.params, converted.masks, chosen, args, kwargs, out, done)
    as_numpy = (target.index or target.path).removesuffix(".index.json").endswith(SAFETENSORS)
    state_dict = _pruned_state_dict(converted, pruned, args.permanent, as_numpy, done)
    report = None if as_numpy else _report(state_dict, "torch", done=done)
    with out.status(f"writing {args.output}"):
      write_torch(state_dict, target, done)
  if report is None:  # the streamed tensors are gone once written: counted from the file
    report = _written_report(target)
  described = ", ".join(f"{k}={v}" for k, v in kwargs.items())
  title = (f"{args.output}: {'global ' if args.use_global else ''}{method}({described}) on {len(chosen)} tensors"
           f"{', made permanent' if args.permanent else ''}")
  out.emit({"input": args.input, "output": args.output, "method": method, "global": args.use_global,
            "arguments": kwargs, "permanent": args.permanent, "selected": [c.replace("/", ".") for c in chosen],
            **report}, lambda: (_table(report, title), _summary(report)))


def _factory(spec: Optional[str]) -> Any:
  """``--module module.path:Factory``: the torch model the zero-argument factory returns (the current folder is
  on the import path, as for ``python -m``)."""
  if spec is None:
    return None
  name, _, attr = spec.partition(":")
  if not name or not attr:
    raise UserError(f"--module {spec}: expected module.path:Factory (a zero-argument callable returning a torch "
                    "nn.Module)")
  import importlib  # pylint: disable=import-outside-toplevel
  cwd = os.getcwd()
  sys.path.insert(0, cwd)
  try:
    factory = getattr(importlib.import_module(name), attr)
    module = factory()
  except Exception as err:  # the user's code: anything it raises is reported as one line
    raise UserError(f"--module {spec}: {type(err).__name__}: {err}") from err
  finally:
    sys.path.remove(cwd)
  torch = sys.modules.get("torch")
  if torch is None or not isinstance(module, torch.nn.Module):
    raise UserError(f"--module {spec} returned a {type(module).__name__}, not a torch nn.Module")
  return module


def _layout_rules(path: Optional[str], state_dict: dict) -> tuple:
  """``--layout-rules FILE``: a JSON object ``{regex on state_dict keys: layout kind}`` as layout rules, forced on
  the modules with a matching key (the first pattern that matches a module wins)."""
  if path is None:
    return ()
  import interop  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except (OSError, ValueError) as err:
    raise UserError(f"--layout-rules {path}: cannot read it as JSON ({err})") from None
  if not isinstance(table, dict):
    raise UserError(f"--layout-rules {path}: expected a JSON object {{regex on state_dict keys: layout kind}}")
  modules: dict[str, list[str]] = {}
  for key in state_dict:
    modules.setdefault(key.rpartition(".")[0], []).append(key)
  taken, rules = set(), []
  for pattern, kind in table.items():
    if kind not in interop.KINDS:
      raise UserError(f"--layout-rules {path}: {pattern!r} maps to {kind!r}; layout kinds: {list(interop.KINDS)}")
    try:
      regex = re.compile(pattern)
    except re.error as err:
      raise UserError(f"--layout-rules {path}: {pattern!r} is not a valid regular expression ({err})") from None
    chosen = [p for p, keys in modules.items() if p not in taken and any(regex.search(k) for k in keys)]
    if not chosen:
      raise UserError(f"--layout-rules {path}: {pattern!r} matches no key of the checkpoint")
    taken.update(chosen)
    rules.append(interop.rule_for(kind, "^(" + "|".join(map(re.escape, chosen)) + ")$"))
  return tuple(rules)


def _is_input(path: str, target: Target) -> bool:
  """Whether ``target`` is the checkpoint at ``path``: the same file, or the folder of a sharded one."""
  here = os.path.abspath(path)
  if target.index is None:
    return here == os.path.abspath(target.path)
  folder = os.path.dirname(os.path.abspath(target.index))
  return folder in (here, os.path.dirname(here))


def cmd_convert(args, out: Output) -> None:
  target = output_target(args.output, args.layout, args.max_shard_size)
  if _is_input(args.input, target):
    raise UserError(f"{args.output} is the input itself; write the converted checkpoint elsewhere")
  check_output(target, args.force)
  if args.layout == "torch" and (args.module or args.layout_rules):
    raise UserError("--module and --layout-rules say how to write the Flax layout; they need --layout flax")
  if args.layout == "flax" and target.index is None and not args.output.endswith(SAFETENSORS):
    use_compilation_cache(args.cache_dir, args.no_cache)  # only Orbax needs JAX arrays; safetensors are numpy's
  module = _factory(args.module)
  with out.status(f"reading {args.input}"):
    loaded = read_checkpoint(args.input, args.key)
  how = FlaxLayout(module, _layout_rules(args.layout_rules, loaded.state_dict))
  with _dropping(loaded) as done:  # a mapped input is given back tensor by tensor: counted, then written
    with _naming(args.input):  # validates the whole checkpoint before anything is written
      spec, report = _checked(loaded.state_dict, args.layout, how, done)
      if args.layout == "flax":
        from interop import streaming  # pylint: disable=import-outside-toplevel
        streaming.check_tied_masks(loaded.state_dict, spec, done)
    with out.status(f"writing {args.output}"):
      if args.layout == "torch":
        write_torch(loaded.state_dict, target, done)
      else:
        write_flax(loaded.state_dict, target, how, done, spec)
  kind = ("sharded checkpoint" if target.index is not None else
          "Orbax directory" if os.path.isdir(args.output) else "file")
  out.emit({"input": args.input, "output": args.output, "from": loaded.layout, "to": args.layout, **report},
           lambda: [f"{args.input} ({loaded.layout} layout) -> {args.output} ({args.layout} layout, {kind}): "
                    f"{len(report['tensors'])} tensors, {report['pruned_tensors']} pruned, {report['buffers']} "
                    "buffers" + "".join(f"; tied: {' = '.join(g)}" for g in report["ties"]), *_doubts(report)])


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
  common.add_argument("--key", help="the entry holding the state_dict in a torch file that wraps it "
                      "(e.g. state_dict)")
  cached = argparse.ArgumentParser(add_help=False)
  cached.add_argument("--cache-dir", metavar="DIR", help=f"JAX's persistent compilation cache (default: ${CACHE_ENV}, "
                      "else $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxprune/xla or ~/.cache/jaxprune/xla); "
                      "a second run of the same command compiles nothing")
  cached.add_argument("--no-cache", action="store_true", help="compile without the persistent cache")
  cached.add_argument("--max-shard-size", type=_shard_size, metavar="SIZE", help="write OUT sharded (a folder, "
                      "or FOLDER/NAME.safetensors.index.json or NAME.bin.index.json) in shards of at most SIZE: "
                      "bytes or 5GB, 500MB, 2GiB (default for a sharded OUT: 5GB, as Hugging Face)")
  parser = _Parser(prog="jaxprune", description="Prune, inspect and convert torch and JAX checkpoints with "
                   "jaxprune's engine (torch.nn.utils.prune semantics).")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("inspect", parents=[common], help="per-tensor sparsity of a checkpoint",
                     description="Per-tensor shape, dtype, pruning (_orig/_mask) and zeros of a torch .pt/.pth/.bin, "
                     "a .safetensors file, a sharded checkpoint (its *.index.json or the folder holding it) or a "
                     "jaxprune Orbax directory, and the global sparsity. Reads with numpy over a memory map, one "
                     "tensor at a time; imports no JAX.")
  p.add_argument("path")
  p.set_defaults(run=cmd_inspect)

  p = sub.add_parser("prune", parents=[common, cached], help="prune a checkpoint; torch loads the result",
                     description="Prune a torch or safetensors checkpoint with jaxprune (torch's semantics; pruning "
                     "in the input is continued: amounts count the entries still alive). By default every floating "
                     "tensor with 2+ dimensions (weights, not biases) is pruned, each on its own.")
  p.add_argument("input", metavar="IN")
  p.add_argument("-o", "--output", metavar="OUT", required=True, help=".pt/.pth/.bin (torch.save) or .safetensors; "
                 "a folder or NAME.safetensors.index.json / NAME.bin.index.json: sharded")
  p.add_argument("--method", choices=sorted(METHODS), required=True,
                 help="l1: smallest magnitudes; random; ln: whole channels by Ln norm; nm: N:M (e.g. 2:4)")
  p.add_argument("--amount", type=_amount, help="fraction (0.5) or count (100) to prune per tensor, or overall "
                 "with --global")
  p.add_argument("--global", dest="use_global", action="store_true",
                 help="one L1 ranking across all selected tensors (torch's global_unstructured)")
  p.add_argument("--include", type=_regex, action="append", default=[], metavar="REGEX",
                 help="prune the tensors whose torch name (conv1.weight) matches; repeatable")
  p.add_argument("--exclude", type=_regex, action="append", default=[], metavar="REGEX",
                 help="leave the matching tensors alone; repeatable")
  p.add_argument("--axis", type=int, metavar="D", help="ln: the axis of the pruned slices (0: output channels); "
                 "nm: the axis of the groups (default -1)")
  p.add_argument("--n", type=_norm, metavar="N", help="ln: the norm (default 2); nm: the N kept of every M "
                 "(default 2)")
  p.add_argument("--m", type=int, default=None, metavar="M", help="nm: the group size M (default 4)")
  p.add_argument("--seed", type=_seed, default=0, help="random: the PRNG seed (default 0)")
  p.add_argument("--permanent", action="store_true", help="bake the masks in (torch's prune.remove): plain tensors "
                 "that load into an unpruned model")
  p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  p.set_defaults(run=cmd_prune)

  p = sub.add_parser("convert", parents=[common, cached], help="torch <-> JAX (Flax layout) checkpoints",
                     description="Convert between the torch form (.pt/.pth/.bin/.safetensors with torch names) and "
                     "the JAX form (Flax layout: a .safetensors file, or an Orbax checkpoint directory for any OUT "
                     "without a suffix). Masks and BatchNorm statistics come along; round trips are bit exact.")
  p.add_argument("input", metavar="IN")
  p.add_argument("output", metavar="OUT")
  p.add_argument("--layout", choices=("torch", "flax"), required=True, help="the layout to write")
  p.add_argument("--module", metavar="MODULE:FACTORY", help="flax layout: an importable zero-argument factory "
                 "returning the torch nn.Module the checkpoint belongs to (its classes decide each module's layout)")
  p.add_argument("--layout-rules", metavar="FILE", help="flax layout: a JSON object {regex on state_dict keys: "
                 "kind}, kind one of linear, conv, batchnorm, norm, embedding, conv1d_hf, torch (keep as torch)")
  p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
  p.set_defaults(run=cmd_convert)
  return parser


def _one_line(err: BaseException) -> str:
  text = " ".join(str(err).split()) or type(err).__name__
  interop = sys.modules.get("interop")  # imported already if it raised
  if interop is not None and isinstance(err, interop.DTypeError):
    text += "; on the command line: set JAX_ENABLE_X64=1"
  return text


def _negative_values(argv: Sequence[str]) -> list[str]:
  """``--n -inf`` as ``--n=-inf``: argparse takes only numbers such as ``-1`` or ``-.5`` for values, and ``-inf``
  for an unknown option."""
  out: list[str] = []
  for arg in argv:
    if out and out[-1].startswith("--") and "=" not in out[-1] and arg.lower() in ("-inf", "-infinity"):
      out[-1] += "=" + arg
    else:
      out.append(arg)
  return out


def _run(args, out: Output) -> int:
  try:
    args.run(args, out)
  except (KeyboardInterrupt, Signalled) as err:  # KeyboardInterrupt: SIGINT before the handlers are in place
    signum = err.signum if isinstance(err, Signalled) else signal.SIGINT
    print(f"jaxprune {args.command}: interrupted ({signal.Signals(signum).name}); nothing was written",
          file=sys.stderr)
    return 128 + signum
  except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
    return 1
  except (UserError, OSError, ValueError, IndexError, UnsupportedDtypeError) as err:
    # ValueError covers interop's errors (corrupt, truncated or unsafe files, broken _orig/_mask pairs) and
    # jaxprune's (counts larger than a tensor, shapes N:M cannot group); IndexError an --axis the tensor lacks (as
    # torch raises it); OSError unreadable or unwritable paths.
    print(f"jaxprune {args.command}: error: {_one_line(err)}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0; 2 for a user error; 128 + the signal when interrupted).

  Warnings (torch's are several lines long) are shown as one line each, after a command that succeeds; after an
  error only the error is shown.
  """
  args = build_parser().parse_args(_negative_values(sys.argv[1:] if argv is None else argv))
  out = Output(args.json)
  with warnings.catch_warnings(record=True) as caught, _signals_raise():
    warnings.simplefilter("default")
    status = _run(args, out)
  if status == 0:
    for w in caught:
      print(f"jaxprune {args.command}: warning: {_one_line(w.message)}", file=sys.stderr)
  return status
