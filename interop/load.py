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


def load_pruned(module, source: Any, *, strict: bool = True, key: Optional[str] = None):
  """Loads a pruned state_dict (or checkpoint path) into a torch model, pruning it where the state_dict is pruned.

  For every ``X_orig``/``X_mask`` pair the submodule's ``X`` is pruned with ``prune.custom_from_mask`` (unless it is
  already pruned: then the saved mask simply replaces its own, as torch does), then ``load_state_dict`` runs and
  each masked ``X`` is recomputed, so ``module.X`` is not stale (spec §8.3) and the model can be deep-copied.

  Args:
    module: a torch ``nn.Module``, fresh or already pruned.
    source: a state_dict (torch tensors or numpy arrays, e.g. from :func:`interop.to_torch`) or a checkpoint path.
    strict: passed to ``load_state_dict``.
    key: for a checkpoint path whose file holds the state_dict under a key.

  Returns:
    ``module``, loaded.

  Raises:
    PairingError, MaskError, DuplicateKeyError: a broken pruned state_dict (nothing is changed then).
    LayoutError: a pruned tensor the module does not have as a parameter, or of another shape.
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
    mask = state_dict[name + statedict.MASK]
    if tuple(mask.shape) != tuple(param.shape):
      raise LayoutError(f"{name + statedict.MASK!r} has shape {tuple(mask.shape)}, but the module's {name!r} has "
                        f"shape {tuple(param.shape)}")
    targets.append((sub, local, already, mask.to(param.device)))
  for sub, local, already, mask in targets:
    if not already:
      prune.custom_from_mask(sub, local, mask=mask)
  module.load_state_dict(state_dict, strict=strict)
  with torch.no_grad():  # a leaf tensor, so the module stays deep-copyable (spec §9)
    for sub, local, _, _ in targets:
      hook = next((h for h in sub._forward_pre_hooks.values()  # pylint: disable=protected-access
                   if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == local), None)
      if hook is not None:  # None only for a module whose hook torch lost in a failed re-prune (spec §1.2)
        setattr(sub, local, hook.apply_mask(sub))
  return module
