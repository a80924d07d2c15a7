"""jaxprune: neural-network pruning for JAX, the functional way.

Pure pruning methods that return boolean masks (the methods of ``torch.nn.utils.prune``, bit for bit where torch
is deterministic, plus N:M and block sparsity), masks as pytrees beside the params, and optax transforms that keep
pruned weights pruned.

The public names are imported on first use (PEP 562), not by ``import jaxprune``: importing JAX takes a second or
more, and ``jaxprune inspect`` (``jaxprune.cli``), which reads checkpoints with numpy only, must not pay for it.
``from jaxprune import prune`` and ``jaxprune.prune`` work as with eager imports.
"""
from jaxprune._lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "amounts": ("num_to_prune", "validate_amount"),
    "custom": ("pruning_method",),
    "errors": ("ShapeMismatchError", "UnsupportedDtypeError", "UnsupportedNormError"),
    "methods": ("block_structured", "custom_from_mask", "identity", "l1_unstructured", "ln_structured",
                "nm_structured", "random_structured", "random_unstructured"),
    "optim": ("MaskedState", "apply_updates", "masked_optimizer", "masks_from_state"),
    "optim_pruning": ("ScheduledPruningState", "scheduled_pruning"),
    "pytree": ("UNMASKED", "apply_masks", "default_where", "global_unstructured", "init_masks", "is_masked",
               "make_permanent", "path_str", "prune", "selector"),
    "report": ("LeafSparsity", "SparsityReport", "sparsity_report"),
    # Sparse training (issue 11): gradient criteria, layer-wise budgets, SET / RigL and the straight-through estimator.
    "sparse_training": ("DynamicSparseState", "dynamic_sparse", "rigl", "set_training", "straight_through"),
}
__all__ = sorted([*(name for names in _EXPORTS.values() for name in names), "schedules", "budgets", "criteria",
                  "sparse_training", "__version__"])
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
