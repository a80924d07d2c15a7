"""Errors of the PyTorch bridge. Each message names the key (or file) and what was expected.

All are ``ValueError`` subclasses, so ``except ValueError`` catches bad input of any kind; the finer types let a
caller tell a broken checkpoint from a model that does not fit it.
"""


class InteropError(ValueError):
  """Base class: a state_dict, a checkpoint file or a pytree that cannot be converted losslessly."""


class PairingError(InteropError):
  """An ``X_orig`` without its ``X_mask`` or the reverse (torch's pruning re-parametrisation is broken)."""


class MaskError(InteropError):
  """A mask whose shape differs from its parameter, or whose values are not exactly 0 and 1."""


class LayoutError(InteropError):
  """A layout rule (or a torch module) that does not fit the tensor it is applied to."""


class DuplicateKeyError(InteropError):
  """Two tensors that would land on the same key (or one on a key another one needs as a subtree)."""


class DTypeError(InteropError):
  """A dtype that cannot cross without a precision change (e.g. float64 while ``jax_enable_x64`` is off)."""


class CheckpointError(InteropError):
  """A checkpoint file that is truncated, corrupt, of an unknown format, or holds no state_dict."""


class UnsafeCheckpointError(CheckpointError):
  """A pickle that needs more than tensors to load; refused, never executed (``torch.load(weights_only=True)``)."""
