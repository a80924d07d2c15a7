"""interop: lossless PyTorch <-> JAX conversion of pruned checkpoints.

torch is an optional dependency: converting, reading and writing safetensors work without it; torch tensors,
``.pt`` files and :func:`load_pruned` import it when used. The torch and Flax reference models live in
:mod:`interop.models` (needs torch) and :mod:`interop.flax_models`.

The public names are imported on first use (PEP 562): reading a checkpoint (:mod:`interop.io`,
:mod:`interop.shards`) and counting its zeros (:func:`tensor_stats`) need numpy only, and import neither JAX nor
torch (``jaxprune inspect`` starts in a fraction of a second); converting to JAX arrays imports JAX then.
"""
from jaxprune._lazy import lazy_attributes

_EXPORTS = {
    "compare": ("diff_state_dicts",),
    "devices": ("mask_to_jax", "mask_to_torch", "to_jax", "to_torch_tensor"),
    "errors": ("CheckpointError", "DTypeError", "DuplicateKeyError", "InteropError", "LayoutError", "MaskError",
               "PairingError", "UnsafeCheckpointError"),
    "io": ("atomic_write", "load_state_dict", "read_metadata", "save_state_dict"),
    "layouts": ("BUILTIN_RULES", "CONV", "IDENTITY", "KINDS", "LINEAR", "LayoutRule", "TensorMap", "Transform",
                "rule_for"),
    "load": ("load_pruned",),
    "statedict": ("Converted", "Entry", "TensorStats", "TorchSpec", "from_torch", "permanent_state_dict",
                  "tensor_stats", "to_torch", "validate_state_dict"),
}
__all__ = sorted([*(name for names in _EXPORTS.values() for name in names), "inference", "ties"])
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
