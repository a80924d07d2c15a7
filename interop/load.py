"""Loading a pruned state_dict into a fresh, unpruned torch model: one call, no "Missing key(s): weight" wall.

A pruned state_dict holds ``X_orig``/``X_mask`` where a fresh model expects ``X`` (spec §9). The cure torch
documents is to re-create the pruning re-parametrisation before loading; :func:`load_pruned` does that with
``prune.custom_from_mask`` for exactly the tensors the state_dict has masks for, loads, and refreshes the masked
weights so the model is ready before its first forward.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from interop import devices, io, statedict
from interop.errors import LayoutError


def _as_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v if devices.is_torch_tensor(v) else devices.torch_from_host(np.asarray(v)) for k, v in state_dict.items()}


def _check_loadable(module, state_dict: Mapping[str, Any], targets: list, strict: bool) -> None:
  """Raises what ``load_state_dict`` would, before anything changes: torch's loader copies every tensor that fits
  before it reports the ones that do not, so a failing load would leave the model half loaded (and pruned)."""
  expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
  for _, prefix, local, already, _ in targets:
    if not already:  # after custom_from_mask: X becomes X_orig (same shape) plus the buffer X_mask
      shape = expected.pop(statedict._join(prefix, local))  # pylint: disable=protected-access
      expected[statedict._join(prefix, local + statedict.ORIG)] = shape  # pylint: disable=protected-access
      expected[statedict._join(prefix, local + statedict.MASK)] = shape  # pylint: disable=protected-access
  if strict:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
      raise LayoutError(f"the state_dict does not fit the module: missing keys {missing}, unexpected keys "
                        f"{unexpected} (pass strict=False to load what fits)")
  for key, value in state_dict.items():
    if key in expected and tuple(value.shape) != expected[key]:
      raise LayoutError(f"{key!r} has shape {tuple(value.shape)}, but the module's has shape {expected[key]}")


def _unprune(sub, local: str, order: list[str]) -> None:
  """Undoes ``custom_from_mask`` without touching the weight: ``X_orig`` (the very Parameter that was ``X``) goes
  back under its name, at its place in ``order`` (torch's ``prune.remove`` would store ``X_orig * X_mask`` last)."""
  from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel
  hooks = sub._forward_pre_hooks  # pylint: disable=protected-access
  for handle, hook in list(hooks.items()):
    if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == local:
      del hooks[handle]
  orig = sub._parameters.pop(local + statedict.ORIG)  # pylint: disable=protected-access
  del sub._buffers[local + statedict.MASK]  # pylint: disable=protected-access
  if hasattr(sub, local):
    delattr(sub, local)
  sub.register_parameter(local, orig)
  params = sub._parameters  # pylint: disable=protected-access
  by_name = {name: params.pop(name) for name in list(params)}
  params.update((name, by_name[name]) for name in order)


def load_pruned(module, source: Any, *, strict: bool = True, key: Optional[str] = None):
  """Loads a pruned state_dict (or checkpoint path) into a torch model, pruning it where the state_dict is pruned.

  For every ``X_orig``/``X_mask`` pair the submodule's ``X`` is pruned with ``prune.custom_from_mask`` (unless it is
  already pruned: then the saved mask simply replaces its own, as torch does), then ``load_state_dict`` runs and
  each masked ``X`` is recomputed, so ``module.X`` is not stale (spec §8.3) and the model can be deep-copied.

  Args:
    module: a torch ``nn.Module``, fresh or already pruned.
    source: a state_dict (torch tensors or numpy arrays, e.g. from :func:`interop.to_torch`) or a checkpoint path.
    strict: as for ``load_state_dict``: every key of the (pruned) module must be in the state_dict and vice versa.
    key: for a checkpoint path whose file holds the state_dict under a key.

  Returns:
    ``module``, loaded.

  Raises:
    PairingError, MaskError, DuplicateKeyError: a broken pruned state_dict.
    LayoutError: a pruned tensor the module does not have as a parameter; a key the module lacks or misses (with
      ``strict``), or a shape that differs. In every case the module is left exactly as it was.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.nn.utils import prune  # pylint: disable=import-outside-toplevel
  state_dict = _as_torch(io.load_state_dict(source, key=key) if isinstance(source, (str, os.PathLike)) else source)
  pruned = statedict.validate_state_dict(state_dict)
  targets = []
  for name in pruned:
    prefix, local = statedict.split_key(name)
    try:
      sub = module.get_submodule(prefix)
    except AttributeError as err:
      raise LayoutError(f"{name + statedict.ORIG!r}: the torch module has no submodule {prefix!r}") from err
    params = dict(sub.named_parameters(recurse=False))
    already = local + statedict.ORIG in params
    param = params.get(local + statedict.ORIG if already else local)
    if param is None:
      raise LayoutError(f"{name + statedict.ORIG!r}: module {prefix!r} ({type(sub).__name__}) has no parameter "
                        f"{local!r} to prune")
    targets.append((sub, prefix, local, already, state_dict[name + statedict.MASK].to(param.device)))
  _check_loadable(module, state_dict, targets, strict)
  done = []
  try:
    for sub, _, local, already, mask in targets:
      if not already:
        order = list(sub._parameters)  # pylint: disable=protected-access
        prune.custom_from_mask(sub, local, mask=mask)
        done.append((sub, local, order))
    module.load_state_dict(state_dict, strict=strict)
  except Exception as err:  # anything torch refuses that the checks above did not foresee: undo the pruning
    for sub, local, order in reversed(done):
      _unprune(sub, local, order)
    raise LayoutError(f"load_state_dict refused the state_dict: {' '.join(str(err).split())}") from err
  with torch.no_grad():  # a leaf tensor, so the module stays deep-copyable (spec §9)
    for sub, _, local, _, _ in targets:
      hook = next((h for h in sub._forward_pre_hooks.values()  # pylint: disable=protected-access
                   if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == local), None)
      if hook is not None:  # None only for a module whose hook torch lost in a failed re-prune (spec §1.2)
        setattr(sub, local, hook.apply_mask(sub))
  return module
