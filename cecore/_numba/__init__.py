"""Numba backend of the kernel contract (see :mod:`cecore._backends`).

This module holds only the contract's functions: they map the canonical arrays onto the
kernels of :mod:`._kernels` (row or tile variant, flat views) and launch them with
:func:`._runtime.launch`. :mod:`._math` has the vectorisable exp/log and bit tricks,
:mod:`._runtime` the cache location, compilation and thread policy.
"""

import numba
import numpy as np

if numba.config.DISABLE_JIT:  # the kernels are built from intrinsics, which need the JIT
    raise ImportError("NUMBA_DISABLE_JIT is set: the Numba backend needs compiled kernels")
if numba.config.NUMBA_NUM_THREADS >= 2**31:  # Numba takes it, then fails at the first
    # parallel launch: "Invalid number of threads. This likely indicates a bug in Numba."
    raise ValueError(f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} does not fit in a "
                     "C int: unset it, or set it to the number of CPUs")

from .. import _config
from ._kernels import KERNELS
from ._runtime import launch, threading_layer, threads_used


def _run(name, n_threads, *args):
    launch(KERNELS[name], n_threads, *args)


def _ro(a):
    """A read-only view of an input array.

    Numba compiles one specialisation per argument type, and a read-only array (a
    memory map opened for reading, a broadcast view) is another type than a writeable
    one. Inputs the kernels only read are all passed read-only, so whether the caller's
    arrays were writeable does not multiply the compilations (the test suite compiled
    262 specialisations before, most of them differing only in that)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _flat(a):
    """Read-only 1-D view of an (N, S) float64 array; a broadcast scalar stays a
    stride-0 view."""
    if a.size and not any(a.strides):
        return np.broadcast_to(a.reshape(-1)[:1], (a.size,))
    return _ro(np.ravel(a))


def _grad(grad_out, logits, shape):
    """The kernels' gradient argument: ``grad_out`` reshaped, or for loss only
    (``grad_out=None``) an empty array of the logits' dtype, which the kernels test for
    (Numba compiles one specialisation per argument type, so it must be an array)."""
    if grad_out is None:
        return np.empty((0,) * len(shape), dtype=logits.dtype)
    return grad_out.reshape(shape)


def _streams(out, logits):
    """Whether the few-classes blocks write ``out`` with non-temporal stores (as the Cython
    backend decides): it is another array than the logits, too large to stay in cache
    anyway (_config.STREAM_MIN_BYTES), so that its lines are not read from memory before
    they are overwritten, and aligned to its itemsize (whole cache lines then start at an
    element). Over the logits themselves the lines are in cache already."""
    return (out is not None and out.nbytes >= _config.STREAM_MIN_BYTES
            and out.ctypes.data != logits.ctypes.data and out.flags.aligned)


# ------------------------------------------------------------------ contract functions
def _block(c, s, itemsize, two_inputs=False):
    """Samples per transposed tile of the *_tiles kernels, or 0: tiles of the input itself.

    Rows of few classes (s == 1, c <= SMALL_C), and K-dim inputs whose s positions of a
    class take fewer bytes than a vector (see _config.KDIM_*), would run the tile loops
    over part of a vector: blocks of samples are transposed into one tile of positions.
    Float64 rows go by blocks of TILE / 2 rows, the bytes of a float32 block, so that the
    block's input and gradient tiles (2 x 20 KB at TILE rows of ten classes) stay in L1:
    bench_ab.py, AVX2 code, 1e6 x 10 loss + gradient 0.84-0.94x the time, log_softmax
    and logsumexp of 1e6 x 8 0.90-0.93x, same bits. Not for probability targets
    (``two_inputs``), which read a second tile and ask for no lines ahead: 1.08-1.09x
    (results/ab_numba_f64_block_avx2code_zen4*.json).
    """
    if s == 1:
        if c > _config.SMALL_C:
            return 0
        return _config.TILE if two_inputs else _config.TILE * 4 // itemsize
    if 1 < s and s * itemsize <= _config.KDIM_BLOCK_MAX_BYTES and c <= _config.KDIM_BLOCK_MAX_C:
        return _config.TILE // s
    return 0


def _weight_total(weight):
    """The class weights' sum, taken here: inside a parallel kernel, weight.sum() would
    become a parallel reduction whose order depends on the thread count. inf - inf is
    NaN, as in the C sum, without NumPy's warning (the kernels are called from the batch
    scorer too, outside the functional API's error state)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.sum(weight))


def softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                     loss_out, grad_out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # an empty sum (validation left only ignored targets); no gradient
        loss_out[...] = 0.0
        return
    w_total = _weight_total(weight)
    # A gradient over the logits (the contract's in-place case) runs one-array loops
    # (see _row_sumexp_in_place); the few-classes path copies through scratch tiles.
    in_place = grad_out is not None and grad_out.size > 0 and \
        grad_out.ctypes.data == logits.ctypes.data
    flat = (_ro(target.reshape(-1)), _ro(weight), w_total, int(ignore_index),
            float(label_smoothing), _flat(grad_scale), loss_out.reshape(-1))
    block = _block(c, s, logits.itemsize)
    if s == 1 and not block:
        _run("index_rows", n_threads, _ro(logits.reshape(n, c)), _ro(target.reshape(n)),
             _ro(weight), w_total, int(ignore_index), float(label_smoothing),
             _flat(grad_scale), loss_out.reshape(n), _grad(grad_out, logits, (n, c)), in_place)
    elif block:  # transposed blocks: they read into scratch first, so in place is safe too
        _run("index_tiles", n_threads, _ro(logits.reshape(-1)), *flat,
             _grad(grad_out, logits, (-1,)), n, c, s, block, _streams(grad_out, logits),
             threads_used(n_threads))
    elif 1 < s and s * logits.itemsize <= _config.KDIM_ROWS_MAX_BYTES:
        # few positions of many classes: each sample's positions as rows for the row
        # kernel (the Cython backend does this for every kernel, Numba for this one)
        group = max(1, min(s, _config.KDIM_ROWS_GROUP_BYTES // (c * logits.itemsize)))
        _run("index_sample_rows", n_threads, _ro(logits.reshape(-1)), *flat,
             _grad(grad_out, logits, (-1,)), n, c, s, group)
    elif in_place:
        _run("index_tiles_in_place", n_threads, grad_out.reshape(-1), *flat, n, c, s,
             threads_used(n_threads))
    else:
        _run("index_tiles", n_threads, _ro(logits.reshape(-1)), *flat,
             _grad(grad_out, logits, (-1,)), n, c, s, 0, False, threads_used(n_threads))


def softmax_ce_scores(logits, target, weight, ignore_index, label_smoothing, loss_out,
                      stats_out, rank_out, n_threads):
    n, c = logits.shape
    # Not validation (the caller's job), only what keeps the writes inside the buffers.
    if target.shape != (n,) or loss_out.shape != (n,) or stats_out.shape != (n, 4) \
            or rank_out.shape != (n, 2):
        raise ValueError("softmax_ce_scores: outputs must have shapes (N,), (N, 4), (N, 2)")
    block = _block(c, 1, logits.itemsize)
    if block:  # few classes: softmax_ce_index's tiles, which give its loss bit for bit
        _run("scores_tiles", n_threads, _ro(logits.reshape(-1)), _ro(target), _ro(weight),
             int(ignore_index), float(label_smoothing), loss_out, stats_out, rank_out, n, c,
             block, threads_used(n_threads))
    else:
        _run("scores_rows", n_threads, _ro(logits), _ro(target), _ro(weight),
             int(ignore_index), float(label_smoothing), loss_out, stats_out, rank_out)


def _block_sums_fit(n_rows, edges, sums_out, counts_out):
    """Whether the report's block-sum outputs have the contract's shapes for ``n_rows``
    rows (not validation, only what keeps the writes inside): their block count."""
    n_blocks, n_bins = -(-n_rows // _config.REDUCE_BLOCK), edges.shape[0] - 1
    fits = n_bins >= 1 and sums_out.shape == (n_blocks, 3 + n_bins) \
        and counts_out.shape == (n_blocks, 4 + n_bins)
    return fits, n_blocks


def report_sums(stats, rank, top_k, edges, sums_out, counts_out, n_threads):
    fits, n_blocks = _block_sums_fit(stats.shape[0], edges, sums_out, counts_out)
    if not fits or stats.shape[1:] != (4,) or rank.shape != (stats.shape[0], 2):
        raise ValueError("report_sums: stats (N, 4), rank (N, 2), edges (n_bins + 1,), "
                         "sums_out (ceil(N / REDUCE_BLOCK), 3 + n_bins), counts_out "
                         "(ceil(N / REDUCE_BLOCK), 4 + n_bins), n_bins >= 1")
    if n_blocks:
        _run("report_sums", n_threads, _ro(stats), _ro(rank), int(top_k), _ro(edges),
             sums_out, counts_out)


def softmax_ce_report(logits, target, weight, ignore_index, label_smoothing, top_k, edges,
                      loss_out, sums_out, counts_out, n_threads):
    n, c = logits.shape
    fits, n_blocks = _block_sums_fit(n, edges, sums_out, counts_out)
    if not fits or target.shape != (n,) or loss_out.shape != (n,) or c < 1:
        raise ValueError("softmax_ce_report: logits (N, C >= 1), target and loss_out (N,), "
                         "edges (n_bins + 1,), sums_out (ceil(N / REDUCE_BLOCK), 3 + "
                         "n_bins), counts_out (ceil(N / REDUCE_BLOCK), 4 + n_bins), n_bins >= 1")
    if n_blocks:
        _run("scores_report", n_threads, _ro(logits), _ro(target), _ro(weight),
             int(ignore_index), float(label_smoothing), int(top_k), _ro(edges), loss_out,
             sums_out, counts_out, _block(c, 1, logits.itemsize))


def softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out,
                     grad_out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # an empty sum; no gradient
        loss_out[...] = 0.0
        return
    block = _block(c, s, logits.itemsize, two_inputs=True)
    if s == 1 and not block:
        _run("proba_rows", n_threads, _ro(logits.reshape(n, c)), _ro(target.reshape(n, c)),
             _ro(weight), float(label_smoothing), _flat(grad_scale), loss_out.reshape(n),
             _grad(grad_out, logits, (n, c)))
    else:
        _run("proba_tiles", n_threads, _ro(logits.reshape(-1)), _ro(target.reshape(-1)),
             _ro(weight), float(label_smoothing), _flat(grad_scale), loss_out.reshape(-1),
             _grad(grad_out, logits, (-1,)), n, c, s, block,
             bool(block) and _streams(grad_out, logits), threads_used(n_threads))


def bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out, n_threads):
    r, l = input.shape
    sums = loss_out.ndim == 1
    n_items = -(-input.size // _config.REDUCE_BLOCK)
    if loss_out.size != (n_items if sums else input.size):
        raise ValueError(f"loss_out must have shape {(n_items,)} or {(r, l)}, "
                         f"got {loss_out.shape}")
    if input.size == 0:
        return
    _run("bce_blocks", n_threads, _ro(input.reshape(-1)), _ro(target.reshape(-1)),
         _ro(weight), _ro(pos_weight), _ro(grad_scale), l, loss_out.reshape(-1),
         _grad(grad_out, input, (-1,)), sums)


def softmax(logits, log, out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # nothing to write
        return
    block = _block(c, s, logits.itemsize)
    if s == 1 and not block:
        _run("softmax_rows", n_threads, _ro(logits.reshape(n, c)), bool(log),
             out.reshape(n, c), out.ctypes.data == logits.ctypes.data)
    else:
        _run("softmax_tiles", n_threads, _ro(logits.reshape(-1)), bool(log), out.reshape(-1),
             n, c, s, block, bool(block) and _streams(out, logits), threads_used(n_threads))


def logsumexp(logits, out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # log of an empty sum
        out[...] = -np.inf
        return
    block = _block(c, s, logits.itemsize)
    if s == 1 and not block:
        _run("logsumexp_rows", n_threads, _ro(logits.reshape(n, c)), out.reshape(n))
    else:
        _run("logsumexp_tiles", n_threads, _ro(logits.reshape(-1)), out.reshape(-1), n, c, s,
             block, threads_used(n_threads))


def log_loss_pass(proba, target, lo, hi, rtol, stats_out, picked_out, n_threads):
    n = proba.shape[0]
    # Blocks of rows, a few per thread; counts are exact, so any blocking gives the same.
    n_blocks = max(1, min(4 * n_threads, n))
    blocks = np.zeros((n_blocks, 3))
    pick = target is not None and picked_out is not None
    _run("log_loss_pass", n_threads, _ro(proba),
         _ro(target if pick else np.empty(0, np.int64)),
         proba.dtype.type(lo), proba.dtype.type(hi), float(rtol), n_blocks, blocks,
         picked_out if pick else np.empty(0, proba.dtype))
    stats_out[:] = blocks.sum(axis=0)


def build_info():
    return {
        "numba": numba.__version__,
        "threading_layer": threading_layer(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "exp": "range reduction + polynomial, vectorised by LLVM",
        "tile": _config.TILE,
        "small_c": _config.SMALL_C,
        "sum_block": _config.SUM_BLOCK,
        "reduce_block": _config.REDUCE_BLOCK,
        "stream_min_bytes": _config.STREAM_MIN_BYTES,
        "bce_ahead": _config.BCE_AHEAD,
        **{name.lower(): getattr(_config, name) for name in _config.C_MACROS
           if name.startswith("KDIM_")},
    }
