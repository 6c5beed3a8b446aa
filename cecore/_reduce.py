"""Deterministic float64 sums of per-position losses.

A sum is the exactly rounded total (``math.fsum``) of numpy sums over fixed blocks of
``REDUCE_BLOCK`` consecutive positions. The result depends only on the values, never on
thread counts; and a stream cut into chunks whose lengths are multiples of the block
reproduces the in-memory sum bit for bit by collecting :func:`block_sums` chunk by chunk.
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
