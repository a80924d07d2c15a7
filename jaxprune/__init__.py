"""jaxprune: neural-network pruning for JAX, the functional way.

Pure pruning methods that return boolean masks (the methods of ``torch.nn.utils.prune``, bit for bit where torch
is deterministic, plus N:M and block sparsity), masks as pytrees beside the params, and optax transforms that keep
pruned weights pruned.
"""
from jaxprune.amounts import num_to_prune, validate_amount
from jaxprune.custom import pruning_method
from jaxprune.errors import ShapeMismatchError, UnsupportedDtypeError, UnsupportedNormError
from jaxprune import schedules
from jaxprune.methods import (block_structured, custom_from_mask, identity, l1_unstructured, ln_structured,
                              nm_structured, random_structured, random_unstructured)
from jaxprune.optim import MaskedState, apply_updates, masked_optimizer, masks_from_state
from jaxprune.optim_pruning import ScheduledPruningState, scheduled_pruning
from jaxprune.pytree import (UNMASKED, apply_masks, default_where, global_unstructured, init_masks, is_masked,
                             make_permanent, path_str, prune, selector)
from jaxprune.report import LeafSparsity, SparsityReport, sparsity_report

__version__ = "0.1.0"

# Sparse training (issue 11): gradient criteria, layer-wise budgets, SET / RigL and the straight-through estimator.
from jaxprune import budgets, criteria, sparse_training
from jaxprune.sparse_training import DynamicSparseState, dynamic_sparse, rigl, set_training, straight_through
