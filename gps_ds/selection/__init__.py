"""Parameter selection: scoring, per-row top-K (dense and per ZeRO shard), schemes, mask files."""

from .maskfile import (
    MASK_FORMAT,
    SCORES_FORMAT,
    MaskFileError,
    MaskMismatchError,
    check_fits,
    load_mask,
    load_scores,
    named_shapes_of,
    param_fingerprint,
    save_mask,
    save_scores,
    selection_stats,
)
from .schemes import SCHEMES, flat_to_padded, gps_budget, rows_and_fan_in, select
from .topk import (
    PartialCandidates,
    ShardTopK,
    assemble_sharded_topk,
    merge_partial_candidates,
    pack_partials,
    rowwise_topk,
    shard_rows_topk,
    simulate_sharded_topk,
    unpack_partials,
    zero_shard_size,
)

__all__ = [
    # topk
    "rowwise_topk",
    "PartialCandidates",
    "ShardTopK",
    "shard_rows_topk",
    "merge_partial_candidates",
    "assemble_sharded_topk",
    "pack_partials",
    "unpack_partials",
    "zero_shard_size",
    "simulate_sharded_topk",
    # schemes
    "SCHEMES",
    "select",
    "gps_budget",
    "rows_and_fan_in",
    "flat_to_padded",
    # mask files
    "MASK_FORMAT",
    "SCORES_FORMAT",
    "MaskFileError",
    "MaskMismatchError",
    "save_mask",
    "load_mask",
    "save_scores",
    "load_scores",
    "check_fits",
    "param_fingerprint",
    "named_shapes_of",
    "selection_stats",
]
