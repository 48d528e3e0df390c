"""Turning importance scores into masks with an exact count of zeros, and writing masks into weights.

Every ``*_keep_mask`` returns a bool ``keep`` mask (``True`` = kept). Lower score = pruned first; ties
go to the lower input index (as in a stable sort), so results are deterministic. NaN scores are
pruned after every finite one.

No rule here sorts the weights. Unstructured masks select (``lowest_per_row``): a row's ``k``-th
smallest score is its threshold, found in linear time per row. N:M masks rank each group of ``M``
by comparing its entries pairwise (``rank_in_groups``): a byte of rank per weight. Both give the
first ``k`` of a stable sort. ``kthvalue``, which finds the threshold, holds a copy of its input and
an int64 index per entry while it runs (torch's CPU selection), so the per-row and N:M rules work
a block of whole rows at a time (``rank_blocks``). A threshold over the whole layer
(``layerwise_keep_mask``, ``lowest_in_order``) is found without ``kthvalue``: ``kth_lowest`` counts
16-bit digits of the scores' bits, a block at a time, in two passes for fp32.

Exactness (the promise every pruner keeps; see docs/pruning.md):
- a layer's unstructured target is an integer count of zeros ``Z`` (``round(s * numel)`` for a
  uniform sparsity ``s``); the chosen mask has exactly ``Z`` pruned positions;
- "per row" comparison spreads ``Z`` as evenly as possible over the output rows: every row gets
  ``Z // rows`` zeros, and the ``Z % rows`` rows whose next-smallest score is lowest get one more
  (so for ``s * in_features`` integral every row has exactly ``s * in_features`` zeros);
- N:M: exactly ``M - N`` zeros in every group of ``M`` consecutive inputs of every row.
"""

from __future__ import annotations

import torch

from .._blocks import row_blocks
from .._distributed import full_tensor, write_full_
from .masks import linear_view, restore_mask

#: Weights ranked at a time (a block of whole rows) by the per-row and N:M rules and SPT's growth, and
#: scores counted at a time by the layer-wide selection (``kth_lowest``): 4 Mi, about 75 MB of
#: transients (an fp32 copy of the scores, ``kthvalue``'s copy and int64 indices, a few bool masks),
#: where a 70B model's 8192 x 28672 projection at once would hold about 4 GB.
RANK_BLOCK_ELEMENTS = 1 << 22


def rank_blocks(rows: int, cols: int):
    """``(start, stop)`` of consecutive blocks of whole rows of at most ``RANK_BLOCK_ELEMENTS`` weights
    (at least one row; the constant is read at call time)."""
    return row_blocks(rows, cols, RANK_BLOCK_ELEMENTS)


def unstructured_zero_count(sparsity: float, numel: int) -> int:
    """The exact number of zeros a layer of ``numel`` weights gets at ``sparsity``."""
    return int(round(sparsity * numel))


def lowest_per_row(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest entries of every row, ties to the lower index: the first ``k`` of a
    stable sort of each row, found without sorting. ``ranked`` is 2-D float without NaN.

    A row's ``k``-th smallest value (a selection, linear in the row, where a sort takes ``n log n``)
    is its threshold: every entry below it is taken, and of the entries equal to it those of lowest
    index, as many as the row is still short of ``k``. ``kthvalue`` holds a copy of ``ranked`` and an
    int64 index per entry while it runs: pass a block of rows where the whole would be large.
    """
    if k == 0:
        return torch.zeros_like(ranked, dtype=torch.bool)
    threshold = ranked.kthvalue(k, dim=1, keepdim=True).values
    lowest = ranked < threshold
    ties = ranked == threshold
    # Row counts in int32 (a row has < 2**31 entries): twice as fast as int64 sums of bools.
    short = k - lowest.sum(dim=1, dtype=torch.int32)  # >= 1: the threshold itself is among the k lowest
    crowded = (ties.sum(dim=1, dtype=torch.int32) > short).nonzero().squeeze(1)
    if crowded.numel():  # more ties than room (equal scores): keep the first ones
        crowded_ties = ties[crowded]
        ties[crowded] = crowded_ties & (crowded_ties.cumsum(dim=1) <= short[crowded].unsqueeze(1))
    return lowest | ties


def next_lowest_per_row(ranked: torch.Tensor, taken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's lowest entry outside ``taken`` (value and index), ties to the lower index: the entry
    a stable sort of the row puts right after the taken ones. Every row has an entry outside ``taken``."""
    remaining = ranked.masked_fill(taken, float("inf"))
    value, index = remaining.min(dim=1)  # the first of equal minima
    # A row whose remaining entries are all +inf finds a taken one first; take its first free one.
    landed_on_taken = taken.gather(1, index.unsqueeze(1)).squeeze(1)
    if landed_on_taken.any():
        index[landed_on_taken] = (~taken[landed_on_taken]).to(torch.uint8).argmax(dim=1)
    return value, index


def nan_ranks_last(scores: torch.Tensor) -> torch.Tensor:
    """A copy of ``scores`` (at least float32) with NaN as ``+inf``: pruned after every finite score, as
    a sort puts NaN last (a sort puts it after ``+inf`` too; here the two tie, lower index first)."""
    inf = float("inf")
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).nan_to_num(nan=inf, posinf=inf, neginf=-inf)


def rowwise_keep_mask(scores: torch.Tensor, n_zeros: int) -> torch.Tensor:
    """Prune ``n_zeros`` positions in total, as evenly as possible across rows (see module doc)."""
    rows, cols = scores.shape
    if not 0 <= n_zeros <= rows * cols:
        raise ValueError(f"cannot prune {n_zeros} of {rows * cols} weights")
    per_row, extra = divmod(n_zeros, rows)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    if extra:
        next_score = torch.empty(rows, dtype=torch.float32, device=scores.device)
        next_idx = torch.empty(rows, dtype=torch.long, device=scores.device)
    for start, stop in rank_blocks(rows, cols):
        ranked = nan_ranks_last(scores[start:stop])
        pruned = lowest_per_row(ranked, per_row)
        if extra:
            next_score[start:stop], next_idx[start:stop] = next_lowest_per_row(ranked, pruned)
        keep[start:stop] = ~pruned
    if extra:
        # The extra zeros go where they cost least: the rows whose next candidate scores lowest.
        rows_with_extra = torch.argsort(next_score, stable=True)[:extra]
        keep[rows_with_extra, next_idx[rows_with_extra]] = False
    return keep


def layerwise_keep_mask(scores: torch.Tensor, n_zeros: int) -> torch.Tensor:
    """Prune the ``n_zeros`` lowest scores of the whole layer."""
    if not 0 <= n_zeros <= scores.numel():
        raise ValueError(f"cannot prune {n_zeros} of {scores.numel()} weights")
    return ~lowest_in_order(scores, n_zeros)


#: The integer dtype whose order the bits of a ranked float take (``_order_keys``).
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}
#: Bits of the key counted per pass of the selection: a histogram of 65536 counts.
_DIGIT_BITS = 16


def _order_keys(ranked: torch.Tensor) -> torch.Tensor:
    """Integers in the order of ``ranked``'s values (float32 or float64, no NaN; overwritten): the
    float's bits, with the magnitude bits of negative numbers flipped so that a larger magnitude
    comes first. ``-0.0`` becomes ``+0.0`` first: the two are equal scores."""
    bits = ranked.add_(0.0).view(_KEY_DTYPES[ranked.dtype])
    negative_flip = (bits >> (bits.element_size() * 8 - 1)).bitwise_and_(torch.iinfo(bits.dtype).max)
    return bits.bitwise_xor_(negative_flip)


def _ranked(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """``nan_ranks_last(scores)``, negated for ``descending`` (NaN then ranks first, as in a descending
    sort, tying with ``+inf``)."""
    ranked = nan_ranks_last(scores)
    return ranked.neg_() if descending else ranked


def kth_lowest(flat: torch.Tensor, k: int, descending: bool = False) -> tuple[torch.Tensor, int]:
    """The ``k``-th lowest score of the 1-D ``flat`` (``1 <= k <= numel``; NaN ranking last, as
    ``nan_ranks_last``), as a 0-d tensor in the ranked dtype, and how many scores are below it
    (``descending``: of the negated scores, ``_ranked``).

    A radix selection on ``_order_keys``: each pass counts one 16-bit digit of the keys that share
    the digits found so far, a block of ``RANK_BLOCK_ELEMENTS`` at a time, and keeps the digit at
    which the running count reaches ``k`` (two passes for fp32 scores, four for fp64). Nothing the
    size of ``flat`` is made, where ``kthvalue`` holds a copy and an int64 index per entry.
    """
    if not 1 <= k <= flat.numel():
        raise ValueError(f"cannot select the {k}-th of {flat.numel()} scores")
    ranked_dtype = torch.promote_types(flat.dtype, torch.float32)  # nan_ranks_last's
    key_dtype = _KEY_DTYPES[ranked_dtype]
    key_bits, half = torch.iinfo(key_dtype).bits, 1 << (_DIGIT_BITS - 1)
    prefix, below = None, 0
    for shift in range(key_bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        counts = torch.zeros(1 << _DIGIT_BITS, dtype=torch.int64, device=flat.device)
        for start, stop in rank_blocks(flat.numel(), 1):
            keys = _order_keys(_ranked(flat[start:stop], descending))
            if prefix is not None:  # only keys whose higher digits are the threshold's
                keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefix]
            digits = keys >> shift
            # The top digit is signed (the keys are): shifted to 0..65535. Lower digits are their bits.
            digits = digits.add_(half) if prefix is None else digits.bitwise_and_((1 << _DIGIT_BITS) - 1)
            counts += torch.bincount(digits, minlength=1 << _DIGIT_BITS)
        running = counts.cumsum(0)
        digit = int(torch.searchsorted(running, k - below))  # the first digit whose count reaches k
        below += int(running[digit - 1]) if digit else 0
        prefix = digit - half if prefix is None else (prefix << _DIGIT_BITS) | digit
    bits = prefix ^ torch.iinfo(key_dtype).max if prefix < 0 else prefix  # _order_keys undone
    return torch.tensor(bits, dtype=key_dtype, device=flat.device).view(ranked_dtype), below


def lowest_in_order(scores: torch.Tensor, k: int, descending: bool = False) -> torch.Tensor:
    """True at the ``k`` lowest of all of ``scores`` (any shape, taken row-major), ties to the lower
    index and NaN last: the first ``k`` of a stable sort of the flattened scores (``descending``: the
    ``k`` highest, NaN first, as a stable descending sort). The threshold is ``kth_lowest``'s, and the
    mask is written a block at a time: the transients are a block's."""
    flat = scores.reshape(-1)
    lowest = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return lowest.view(scores.shape)
    threshold, below = kth_lowest(flat, k, descending)
    ties_left = k - below  # the ties taken, in order, until k
    for start, stop in rank_blocks(flat.numel(), 1):
        ranked = _ranked(flat[start:stop], descending)
        ties = ranked == threshold
        n_ties = int(ties.sum())
        if n_ties > ties_left:
            ties &= ties.cumsum(0, dtype=torch.int32) <= ties_left
        ties_left -= min(n_ties, ties_left)
        torch.logical_or(ranked < threshold, ties, out=lowest[start:stop])
    return lowest.view(scores.shape)


def rank_in_groups(ranked: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Each entry's place (0-based) in a stable sort of the eligible entries of its group, for
    ``ranked`` of shape (groups, m) without NaN: how many eligible entries of the group are lower, or
    equal at a lower index. Meant for small ``m`` (the ``M`` of N:M): the ``m (m - 1) / 2`` pairs of
    columns are compared once each, ``O(m)`` work per entry, with the ranks in a byte (int32 past
    ``m = 255``) where a sort would hold an int64 order. An ineligible entry gets a number too (the
    eligible entries before it); callers ignore it."""
    groups, m = ranked.shape
    columns = ranked.t().contiguous()  # column i is each group's i-th entry, contiguous
    eligible_columns = eligible.t().contiguous() if eligible is not None else None
    rank = torch.zeros(m, groups, dtype=torch.uint8 if m <= 255 else torch.int32, device=ranked.device)
    for i in range(m):
        for j in range(i + 1, m):
            j_first = columns[j] < columns[i]  # else i comes first: lower, or equal at the lower index
            i_first = ~j_first
            if eligible_columns is not None:
                j_first &= eligible_columns[j]
                i_first &= eligible_columns[i]
            rank[i] += j_first
            rank[j] += i_first
    return rank.t()


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of every row: the
    ``m - n`` lowest of each group are pruned (ties to the lower index, NaN ranking last)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} does not divide {cols} inputs")
    keep = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    for start, stop in rank_blocks(rows, cols):
        groups = nan_ranks_last(scores[start:stop]).reshape(-1, m)
        keep[start:stop] = (rank_in_groups(groups) >= m - n).reshape(stop - start, cols)
    return keep


@torch.no_grad()
def write_masked_weight_(linear: torch.nn.Module, keep: torch.Tensor, new_weight: torch.Tensor | None = None) -> int:
    """Store ``new_weight`` (default: the current weight) with the pruned positions set to ``+0.0``.

    ``keep`` and ``new_weight`` are out x in, as the pruners score (``linear_view``); they are
    written through the out x in view, so a ``Conv1D`` keeps its in x out storage.

    A *kept* weight that is exactly zero in the model's dtype (already zero before pruning, a
    SparseGPT update that lands on 0, or underflow when casting down) would add an unpromised zero.
    It is replaced by the smallest normal number of the dtype, with its sign (``finfo.tiny``: about
    1e-38 in fp32/bf16, 6e-5 in fp16), far below anything that changes an output, so the layer's
    zero count, and ``weight != 0``, are exactly the chosen mask. Returns how many were replaced.
    Under FSDP (a sharded ``DTensor`` weight) ``keep`` and ``new_weight`` are whole on every rank
    and each rank writes the rows it holds.
    """
    weight = linear_view(linear).weight
    source = (full_tensor(weight) if new_weight is None else new_weight).detach()
    value = source.to(weight.dtype)
    n_kept_zero = int(torch.count_nonzero(keep & (value == 0)))
    write_full_(weight.data, restore_mask(value, keep, sign_source=source))
    return n_kept_zero
