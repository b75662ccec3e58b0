"""Sparse-delta training: K trainable entries per output neuron (GPS).

Sparse mode (default): ``apply_sparse`` turns the selected nn.Linear / nn.Conv2d into
SparseLinear / SparseConv2d (frozen base + trainable ``gps_values``), whose autograd
never forms a dense weight gradient. Masked mode: ``MaskedGradients`` keeps dense
weights and makes every non-selected entry bit-identical through optimizer steps.
"""

from .autograd import SparseConv2dFunction, SparseLinearFunction, sparse_conv2d, sparse_linear
from .convert import apply_sparse, merge_sparse, merged_weight, sparse_modules, sparse_values
from .indices import SelectionError, check_indices
from .masked import (
    MaskedGradients,
    add_coupled_decay_,
    apply_decoupled_decay_,
    is_decoupled,
    mask_grad_,
    selection_mask,
)
from .modules import SparseConv2d, SparseLinear
from .settings import SETTINGS, KernelSettings, kernel_settings

__all__ = [
    "apply_sparse",
    "merge_sparse",
    "merged_weight",
    "sparse_values",
    "sparse_modules",
    "SparseLinear",
    "SparseConv2d",
    "SparseLinearFunction",
    "SparseConv2dFunction",
    "sparse_linear",
    "sparse_conv2d",
    "SelectionError",
    "check_indices",
    "MaskedGradients",
    "mask_grad_",
    "add_coupled_decay_",
    "apply_decoupled_decay_",
    "is_decoupled",
    "selection_mask",
    "SETTINGS",
    "KernelSettings",
    "kernel_settings",
]
