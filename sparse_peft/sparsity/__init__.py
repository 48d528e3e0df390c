"""Masks, N:M patterns, sparsity reports, schedules and pruners."""

from .masks import (
    check_nm_divides,
    is_nm_sparse,
    mask_fingerprint,
    named_linears,
    parse_pattern,
    sparsity_of,
    weight_mask,
)

__all__ = [
    "check_nm_divides",
    "is_nm_sparse",
    "mask_fingerprint",
    "named_linears",
    "parse_pattern",
    "sparsity_of",
    "weight_mask",
]
