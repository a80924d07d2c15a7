"""interop: lossless PyTorch <-> JAX conversion of pruned checkpoints.

torch is an optional dependency: converting, reading and writing safetensors work without it; torch tensors,
``.pt`` files and :func:`load_pruned` import it when used. The torch and Flax reference models live in
:mod:`interop.models` (needs torch) and :mod:`interop.flax_models`.
"""
from interop.compare import diff_state_dicts
from interop.devices import mask_to_jax, mask_to_torch, to_jax, to_torch_tensor
from interop.errors import (CheckpointError, DTypeError, DuplicateKeyError, InteropError, LayoutError, MaskError,
                            PairingError, UnsafeCheckpointError)
from interop import inference, ties
from interop.io import atomic_write, load_state_dict, read_metadata, save_state_dict
from interop.layouts import (BUILTIN_RULES, CONV, IDENTITY, KINDS, LINEAR, LayoutRule, TensorMap, Transform,
                             rule_for)
from interop.load import load_pruned
from interop.statedict import (Converted, Entry, TensorStats, TorchSpec, from_torch, permanent_state_dict,
                               tensor_stats, to_torch, validate_state_dict)
