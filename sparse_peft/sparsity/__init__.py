"""Masks, N:M patterns, sparsity reports, schedules and pruners."""

from .masks import (
    LinearView,
    check_nm_divides,
    is_linear,
    is_nm_sparse,
    linear_view,
    mask_fingerprint,
    named_linears,
    parse_pattern,
    parse_target,
    sparsity_of,
    weight_mask,
)
from .fit_4bit import Fit4bitReport, fit_to_4bit
from .induction import InductionReport, induce_sparsity
from .prune import prune
from .report import SparsityReport, sparsity_report
from .schedule import cubic_sparsity

__all__ = [
    "Fit4bitReport",
    "fit_to_4bit",
    "InductionReport",
    "induce_sparsity",
    "SparsityReport",
    "cubic_sparsity",
    "prune",
    "sparsity_report",
    "LinearView",
    "check_nm_divides",
    "is_linear",
    "is_nm_sparse",
    "linear_view",
    "mask_fingerprint",
    "named_linears",
    "parse_pattern",
    "parse_target",
    "sparsity_of",
    "weight_mask",
]
