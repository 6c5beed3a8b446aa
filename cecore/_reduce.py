"""Deterministic float64 sums of per-position losses.

A sum is the exactly rounded total (``math.fsum``) of numpy sums over fixed blocks of
``REDUCE_BLOCK`` consecutive positions. The result depends only on the values, never on
thread counts; and a stream cut into chunks whose lengths are multiples of the block
reproduces the in-memory sum bit for bit by collecting :func:`block_sums` chunk by chunk;
:class:`BlockSum` does that for chunks of any length.
"""

import math

import numpy as np

from ._config import BINNED_PARTIALS_BYTES, REDUCE_BLOCK


def block_sums(values):
    """Sums of consecutive blocks of ``REDUCE_BLOCK`` values (the last may be shorter).

    Parameters
    ----------
    values : array of shape (n,), float64

    Returns
    -------
    partials : array of shape (ceil(n / REDUCE_BLOCK),), float64
    """
    values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    n_full = values.size // REDUCE_BLOCK
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, as in torch
        head = values[: n_full * REDUCE_BLOCK].reshape(n_full, REDUCE_BLOCK).sum(axis=1)
        if values.size > n_full * REDUCE_BLOCK:
            head = np.append(head, values[n_full * REDUCE_BLOCK:].sum())
    return head


def combine(partials):
    """Exactly rounded sum of block partials (order does not matter).

    Non-finite partials give IEEE arithmetic's answer (NaN for a NaN or for +inf with
    -inf, else the infinity), and an exact sum beyond float64's range is an infinity:
    ``math.fsum`` raises for both, and for partials that only pass the range on the way
    (which are summed scaled down by 2**-64 here, exactly but for terms below 2**-958
    next to a sum above 2**1024).
    """
    values = np.asarray(partials, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    if not finite.all():
        with np.errstate(invalid="ignore"):
            return float(values[~finite].sum())
    try:
        return math.fsum(values.tolist())
    except OverflowError:
        scaled = math.fsum((values * 2.0**-64).tolist())
        with np.errstate(over="ignore"):
            return float(np.float64(scaled) * 2.0**64)


def fixed_sum(values):
    """Deterministic float64 sum of ``values``: ``combine(block_sums(values))``."""
    return combine(block_sums(values))


def whole_blocks(tail, rows):
    """Rows that arrive in chunks of any length, as whole blocks of ``REDUCE_BLOCK``.

    Parameters
    ----------
    tail : tuple of arrays
        The rows left over from before (fewer than a block; each array the same length).
    rows : tuple of arrays
        The next rows, one array per ``tail`` array.

    Returns
    -------
    blocks : list of tuples of arrays
        Rows in runs of whole blocks, in order, the first starting with ``tail``'s rows.
    tail : tuple of arrays
        The rows left over now (copies: they must not hold the chunk).
    """
    blocks = []
    if len(tail[0]):  # complete the pending block first (no copy of the chunk)
        k = min(REDUCE_BLOCK - len(tail[0]), len(rows[0]))
        tail = tuple(np.concatenate([t, r[:k]]) for t, r in zip(tail, rows))
        rows = tuple(r[k:] for r in rows)
        if len(tail[0]) < REDUCE_BLOCK:
            return blocks, tail
        blocks.append(tail)
    whole = len(rows[0]) // REDUCE_BLOCK * REDUCE_BLOCK
    if whole:
        blocks.append(tuple(r[:whole] for r in rows))
    return blocks, tuple(r[whole:].copy() for r in rows)


class BlockSum:
    """Deterministic sum of a stream of float64 values, fed in chunks of any length.

    The total equals :func:`fixed_sum` of the whole stream bit for bit: complete
    blocks of ``REDUCE_BLOCK`` values are summed by :func:`block_sums` as
    soon as they are complete, and the leftover values wait for the next chunk.
    """

    def __init__(self):
        self._partials = []
        self._tail = np.empty(0, np.float64)

    def add(self, values):
        values = np.asarray(values, np.float64).reshape(-1)
        blocks, (self._tail,) = whole_blocks((self._tail,), (values,))
        self._partials += [block_sums(v) for (v,) in blocks]

    def add_partials(self, partials):
        """Add block sums computed elsewhere (e.g. on a Dask worker) for whole blocks."""
        self._partials.append(np.asarray(partials, np.float64).reshape(-1))

    def partials(self):
        """The block sums of the values added so far (the last block may be partial)."""
        parts = self._partials + ([block_sums(self._tail)] if self._tail.size else [])
        return np.concatenate(parts) if parts else np.empty(0)

    def total(self):
        return combine(self.partials())


class BinnedBlockSum:
    """Per-bin deterministic sums of per-block, per-bin partial sums, fed in row order.

    The partials (one row of ``n_bins`` sums per block of ``REDUCE_BLOCK`` rows, e.g. the
    kernels' ``report_sums``) depend only on the stream, so the totals, the exactly
    rounded sums of each bin's partials, do too. Once the partials kept take more than
    ``BINNED_PARTIALS_BYTES``, each bin's are replaced by a few floats whose sum is
    exactly theirs (:func:`_exact_terms`), which changes no total.
    """

    def __init__(self, n_bins):
        self.n_bins = n_bins
        self._partials = []
        # rows of self._partials, counted as they come (summing their lengths at every
        # add took time quadratic in the blocks of a long stream)
        self._rows = 0

    def add_partials(self, partials):
        """Add per-block partials, (blocks, n_bins), computed by a kernel or elsewhere
        (e.g. on a Dask worker); compact all rows kept once they pass the budget."""
        self._partials.append(np.asarray(partials, np.float64).reshape(-1, self.n_bins))
        self._rows += len(self._partials[-1])
        if self._rows > 1 and self._rows * self.n_bins * 8 > BINNED_PARTIALS_BYTES:
            kept = np.concatenate(self._partials).T  # a bin's partials contiguous
            # Bins with no partial but zeros add nothing, and finite ones skip the checks
            # for inf and NaN: bin by bin in Python, 10000 bins took 0.17 s a compaction.
            used = np.flatnonzero(kept.any(axis=1))
            finite = np.isfinite(kept[used]).all(axis=1)
            terms = [_finite_terms(kept[b].tolist()) if ok else _exact_terms(kept[b])
                     for b, ok in zip(used, finite)]
            compact = np.zeros((max(map(len, terms), default=0), self.n_bins))
            for b, t in zip(used, terms):
                compact[:len(t), b] = t
            self._partials, self._rows = [compact], len(compact)

    def partials(self):
        """Partials (rows, n_bins) added so far: each bin's column adds up exactly to the
        sum of its blocks' partials (rows are blocks until they are compacted)."""
        return np.concatenate(self._partials) if self._partials else np.empty((0, self.n_bins))

    def totals(self):
        parts = self.partials()
        return np.array([combine(parts[:, b]) for b in range(self.n_bins)])


def _exact_terms(values):
    """Floats whose exact sum is the exact sum of ``values`` (finite float64): each term is
    the correctly rounded remainder of the ones before (``math.fsum``), until nothing
    remains. A sum of doubles is a multiple of 2**-1074 below 2**1024, so a few terms
    suffice (at most about 40, usually 1 to 3); ``combine`` of them is ``combine(values)``.
    Non-finite values are kept once each (+inf, -inf, NaN), beside the finite ones' terms:
    ``combine`` gives what it gave for all of them (fsum raises for inf + -inf)."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    special = [v for v in (np.inf, -np.inf) if (values == v).any()]
    special += [np.nan] if np.isnan(values).any() else []
    return _finite_terms(values[finite].tolist(), special)


def _finite_terms(listed, special=()):
    """:func:`_exact_terms` of the finite floats ``listed``, after the ``special`` ones."""
    terms = list(special)
    while True:
        try:
            rest = math.fsum(listed + [-t for t in terms[len(special):]])
        except OverflowError:  # sums past float64's range on the way: kept as they are
            return list(special) + listed
        if rest == 0.0:
            return terms
        terms.append(rest)


def mean(total, denominator):
    """``total / denominator`` in float64, NaN when the denominator is 0 whatever the total:
    torch's weighted mean with label smoothing divides its NLL part (0 / 0) and its
    smoothing part (> 0 / 0) by the targets' summed weight, and NaN + inf is NaN."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.float64(total) / denominator if denominator != 0 else np.float64("nan")
