"""SPT: sparsity-aware prompt tuning (see docs/spt.md)."""
