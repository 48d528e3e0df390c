"""Blocks of whole rows under an element budget: how the ops (``delta_linear``) and the mask rules
(``sparsity/selection.py``) bound the transients they make for a large weight.

This module is the foundation layer: it imports nothing from the package.
"""

from __future__ import annotations


def row_blocks(rows: int, cols: int, block_elements: int):
    """``(start, stop)`` of consecutive blocks of whole rows of at most ``block_elements`` elements (at
    least one row a block, however long a row is)."""
    block_rows = max(1, block_elements // max(1, cols))
    for start in range(0, rows, block_rows):
        yield start, min(rows, start + block_rows)
