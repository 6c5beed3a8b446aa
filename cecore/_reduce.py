"""Deterministic float64 sums of per-position losses.

A sum is the exactly rounded total (``math.fsum``) of numpy sums over fixed blocks of
``REDUCE_BLOCK`` consecutive positions. The result depends only on the values, never on
thread counts; and a stream cut into chunks whose lengths are multiples of the block
reproduces the in-memory sum bit for bit by collecting :func:`block_sums` chunk by chunk;
:class:`BlockSum` does that for chunks of any length.
"""

import math

import numpy as np

from ._config import REDUCE_BLOCK


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
    head = values[: n_full * REDUCE_BLOCK].reshape(n_full, REDUCE_BLOCK).sum(axis=1)
    if values.size > n_full * REDUCE_BLOCK:
        head = np.append(head, values[n_full * REDUCE_BLOCK:].sum())
    return head


def combine(partials):
    """Exactly rounded sum of block partials (order does not matter)."""
    return math.fsum(np.asarray(partials, dtype=np.float64).reshape(-1).tolist())


def fixed_sum(values):
    """Deterministic float64 sum of ``values``: ``combine(block_sums(values))``."""
    return combine(block_sums(values))


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
        values = np.concatenate([self._tail, np.asarray(values, np.float64).reshape(-1)])
        n_full = values.size // REDUCE_BLOCK * REDUCE_BLOCK
        if n_full:
            self._partials.append(block_sums(values[:n_full]))
        self._tail = values[n_full:].copy()

    def add_partials(self, partials):
        """Add block sums computed elsewhere (e.g. on a Dask worker) for whole blocks."""
        self._partials.append(np.asarray(partials, np.float64).reshape(-1))

    def total(self):
        parts = self._partials + [block_sums(self._tail)] if self._tail.size else self._partials
        return combine(np.concatenate(parts)) if parts else 0.0
