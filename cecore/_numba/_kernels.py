"""Numba backend, kernels: the parallel loops of the contract, one source for float32 and
float64 (Numba compiles each per dtype).

* 2-D inputs with many classes go row by row (``*_rows``): max, then exp + float64 sum
  (storing ``exp`` in the gradient row), then the gradient scales that row in place, so
  each row is read from memory once and stays in cache between the passes.
* K-dim inputs (``S > 1``) go tile by tile (``*_tiles``): a tile is ``TILE`` positions
  of one sample; every inner loop runs along the contiguous position axis, so it
  vectorises although the class axis is strided (no transposed copy). 2-D inputs with
  at most ``SMALL_C`` classes (rows shorter than a vector), and K-dim inputs with few
  positions (``_config.KDIM_*``), use the same tile code on blocks of samples transposed
  into an O(C * TILE) scratch tile (``_to_tile``/``_from_tile``); softmax_ce_index with
  few positions of many classes transposes each sample's positions into rows.
* Every loop that reduces (sums over classes) lives in a ``@helper`` function, compiled
  without "reassoc" and summing in LANES explicit lanes (``_lanes``, ``_add_lanes``,
  ``_sum_lanes``), so its order is fixed by the source: every compiled copy of it gives
  the same bits, and the serial and parallel kernels agree bit for bit. Copies differ:
  each kernel carries its own copy of the helpers it calls, optimised once more with
  the kernel, and a kernel compiled in the process calls the helper's first copy
  (loaded with the helper) while one loaded from Numba's cache calls its own. With
  "reassoc" LLVM vectorised the copies' sums differently, and a process with one
  kernel of a pair compiled and the other loaded from the cache gave float64 gradients
  1 ulp apart for n_threads 1 and 2 (``benchmarks/numba_cache_bits.py``).
"""

import math

import numpy as np
from numba import prange

from .._config import (
    BCE_AHEAD, KDIM_BLOCK_MAX_C, LANES, REDUCE_BLOCK, ROWS_PER_TASK, SMALL_C_ROWS, SUM_BLOCK,
    TILE,
)
from ._math import (
    _add_blocks, _add_moments, _add_wdev, _address, _at, _bce, _cast_like, _dev, _divided,
    _exp_consts, _exp_diff, _exp_nonpos, _ftz_begin, _ftz_end, _lanes, _log_sum, _per_line,
    _prefetch, _rounded_product, _row_max, _square_scale, _store_fence, _stream_line,
    _tile_scratch, _tr_2n, _tr_block, _tr_n2, _view,
)
from ._runtime import helper, jit


# --------------------------------------------------------------------------- row passes
@helper
def _block_bounds(b, n):
    """Classes ``[lo, hi)`` of block ``b`` of a row of ``n``, as unsigned integers.

    An index from a signed start (``start + c``) makes Numba wrap negative indices on
    every access, which stopped LLVM vectorising (3x slower); slices per block avoided
    that, but each cost an array structure with reference counting. Unsigned indices need
    neither (same sums; ``bench_ab.py`` against slices, float32: 0.83-0.93 of the time,
    ``benchmarks/results/ab_numba_rows.json``).
    """
    return np.uint64(b * SUM_BLOCK), np.uint64(min(n, (b + 1) * SUM_BLOCK))


@helper
def _add_lanes(acc, v, width):
    """Adds v[:width] to the LANES float64 partial sums ``acc``: lane j receives the run's
    elements j, j + LANES, ... in order (whole blocks of LANES by :func:`_add_blocks`,
    then the rest one by one), as cec_add_lanes."""
    n_blocks = width // LANES
    _add_blocks(acc, v, n_blocks)
    c = n_blocks * LANES
    for j in range(width - c):
        acc[j] += v[c + j]


@helper
def _sum_lanes(acc):
    """The LANES partial sums (float64, or the logits' type) combined pairwise in float64
    in a fixed order, as cec_sum_lanes."""
    s = 0.0
    for j in range(LANES // 2):
        s += np.float64(acc[j]) + np.float64(acc[j + LANES // 2])
    return s


@helper
def _row_sumexp(x, m, e_out):
    """sum_c exp(x[c] - m) in float64, writing exp(x[c] - m) to ``e_out``; ``x`` is a
    row of a C-contiguous 2-D array.

    Per block of SUM_BLOCK classes one loop writes the exps and another adds them to
    float64 lanes: fused, the float64 adds would set the vector width and halve the
    float32 exp's. The exps are always stored (to the gradient row, or to scratch for
    loss only), so loss-only and loss+gradient calls sum in the same order.
    """
    n = x.shape[0]
    line = 64 // x.itemsize
    k = _exp_consts(x)
    acc = _lanes(0.0)
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block_bounds(b, n)
        # Rows are contiguous: fetch the next row's matching lines while this block
        # computes, so memory traffic overlaps with the exps (as the Cython kernels).
        for i in range(lo, hi, line):
            _prefetch(x, n + i)
        for c in range(lo, hi):
            e_out[c] = _exp_diff(x[c], m, k)
        _add_lanes(acc, _view(e_out, lo, hi), np.int64(hi - lo))
    return _sum_lanes(acc)


@helper
def _row_sumexp_in_place(x, m):
    """:func:`_row_sumexp` ``(x, m, x)`` with one array argument, for a gradient written
    over the logits: given two arguments that overlap, LLVM's runtime alias check sends
    the exp loop to its scalar version (measured 4x slower). The loops are the same, so
    the sum is the same bit for bit."""
    n = x.shape[0]
    line = 64 // x.itemsize
    k = _exp_consts(x)
    acc = _lanes(0.0)
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block_bounds(b, n)
        for i in range(lo, hi, line):
            _prefetch(x, n + i)
        for c in range(lo, hi):
            x[c] = _exp_diff(x[c], m, k)
        _add_lanes(acc, _view(x, lo, hi), np.int64(hi - lo))
    return _sum_lanes(acc)


@helper
def _row_wdev(x, weight, m, log_s):
    """sum_c weight[c] * (lse - x[c]) in float64, class by class: as sum(w) * lse -
    sum(w * x) an infinite weight would give inf - inf = NaN where torch gives inf.
    Every lse - x[c] of the kernels is formed as (m - x[c]) + log(s): m + log(s) first
    would round log(s) away for logits of large magnitude (an ulp of 1e15 is 0.125)."""
    n = x.shape[0]
    acc = _lanes(0.0)
    n_blocks = n // LANES
    _add_wdev(acc, weight, x, n_blocks, np.float64(m), log_s)
    for j in range(n - n_blocks * LANES):
        c = n_blocks * LANES + j
        acc[j] += weight[c] * _dev(np.float64(m), np.float64(x[c]), log_s)
    return _sum_lanes(acc)


# ---------------------------------------------------------------- class-index targets
@helper
def _row_loss(row, x_t, w_t, weight, eps, m, s):
    """The loss of a row whose target has logit ``x_t`` and weight ``w_t``, from its max
    ``m`` and sum of exps ``s``. One helper for every row kernel: written out in the body
    of the scoring kernel, whose own flags allow "reassoc", the label-smoothing sum was
    compiled differently in its serial copy (1-ulp losses apart from softmax_ce_index's
    at n_threads=1). Its products are rounded, never fused into the sum (see
    :func:`_index_tile`)."""
    log_s = np.log(s)
    loss = _rounded_product((1.0 - eps) * w_t, _dev(np.float64(m), x_t, log_s))
    if eps > 0.0:
        loss += _rounded_product(eps / row.shape[0], _row_wdev(row, weight, m, log_s))
    return loss


@helper
def _index_row(row, t, weight, w_total, eps, gs, g, ignored, want_grad, in_place):
    """Loss of one row with class-index target ``t``; with ``want_grad``, the gradient
    (times gs) goes into ``g``, which otherwise is scratch for the exps. ``in_place``:
    ``g`` is ``row`` itself."""
    n_classes = row.shape[0]
    smooth = eps / n_classes
    # Read before the exp pass writes the row: without label smoothing g may be the row
    # itself (a gradient over the logits), and nothing else of it is read afterwards.
    x_t = np.float64(row[t]) if not ignored else 0.0
    m = _row_max(row)
    s = _row_sumexp_in_place(g, m) if in_place else _row_sumexp(row, m, g)
    if ignored:
        # As torch: gradient 0, or NaN where the row's softmax is NaN (NaN or +inf
        # logits, or all -inf): s * 0 is exactly that; with label smoothing, which
        # multiplies every class weight by the row's zero upstream gradient, also NaN
        # where a weight is NaN or infinite.
        zero = _cast_like(s * 0.0 + (w_total * 0.0 if eps > 0.0 else 0.0), m)
        for c in range(n_classes):
            g[c] = g[c] * zero
        return 0.0
    w_t = weight[t]
    loss = _row_loss(row, x_t, w_t, weight, eps, m, s)
    if not want_grad:
        return loss
    # The smoothing terms only when eps > 0: 0 * w_total would turn a NaN weight of a
    # class that is not the target into a NaN gradient for every row (torch: none).
    w_sum = (1.0 - eps) * w_t + smooth * w_total if eps > 0.0 else w_t
    q = gs * w_sum / s
    coef = _cast_like(q, m)
    sub = _cast_like(_rounded_product(gs * (1.0 - eps), w_t), m)
    if eps > 0.0:
        shift = gs * smooth
        for c in range(n_classes):
            g[c] = g[c] * coef - _cast_like(shift * weight[c], m)
    else:
        for c in range(n_classes):
            g[c] = g[c] * coef
    # Without smoothing, when the target holds the max (e_t = exp(0) = 1 exactly), its
    # entry is q (1 - s) = gs w_t (p_t - 1), formed in float64: as e_t * coef - gs w_t in
    # x's type it cancelled to the rounding of p_t (float32: 6 % of the row's largest
    # entry at a logit gap of 16, 0 from 17.3; as cec_index_row). Otherwise p_t <= 1/2.
    if eps == 0.0 and x_t == np.float64(m):
        g[t] = _cast_like((1.0 - s) * q, m)
    else:
        g[t] -= sub
    return loss


def _index_rows(x, target, weight, w_total, ignore_index, eps, grad_scale, loss_out,
                grad_out, in_place):
    n_rows, n_classes = x.shape
    want_grad = grad_out.shape[0] != 0
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        # Loss only: the exps go to a scratch row.
        scratch = np.empty(0 if want_grad else n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            t = target[i]
            ignored = t == ignore_index
            if ignored and not want_grad:
                loss_out[i] = 0.0  # loss only: an ignored row is not even read
                continue
            g = grad_out[i] if want_grad else scratch
            loss_out[i] = _index_row(x[i], t, weight, w_total, eps, grad_scale[i], g, ignored,
                                     want_grad, in_place)
        _ftz_end(csr)


@helper
def _scores_stats(s, log_s, ex, e2, et):
    """(entropy, max p, Brier score) of a row from its sum of exps ``s`` (> 0, finite),
    ``log_s = log(s)``, ``ex = sum_c e_c (x_c - m)``, ``e2 = sum_{c != t} e_c**2`` and the
    target's exp ``et`` (cec_scores_stats): the Brier score as
    ``sum_{c != t} p_c**2 + (1 - p_t)**2`` with ``1 - p_t = (s - e_t) / s``;
    ``e2 / s**2 - 2 p_t + 1`` cancelled for confident rows. For the row and tile kernels."""
    # One division and products by its reciprocal (as cec_scores_stats), and no "arcp"
    # reciprocal nor "contract" FMA: the same bits in every kernel's copy
    r = _divided(1.0, s)
    rest = _rounded_product(s - et, r)
    return (log_s - _rounded_product(ex, r), r,
            _rounded_product(_rounded_product(e2, r), r) + _rounded_product(rest, rest))


@helper
def _row_scores(row, t, m, s, e, stats, rank):
    """Evaluation metrics of one row whose exps ``e = exp(row - m)`` sum to ``s``.

    ``stats[:3] = (entropy of the softmax, max_c p_c, Brier score sum_c (p_c - [c == t])**2)``
    (entropy as
    ``log s - sum_c e_c (x_c - m) / s``, where classes with ``e_c = 0`` add nothing, as
    ``p log p -> 0``); ``rank = (classes with a larger logit than the target's, 1 if the
    first largest logit is the target's)``. A row whose softmax is undefined (NaN or +inf
    logits) gets NaN statistics and rank ``(C, 0)``.
    """
    n_classes = row.shape[0]
    if not s < np.inf:
        stats[0] = stats[1] = stats[2] = np.nan
        rank[0] = n_classes
        rank[1] = 0
        return
    # Per block of SUM_BLOCK classes (in cache), the moments and the count in lanes of
    # the logits' type (_add_moments), in float64 across blocks: float64 per element
    # doubled the scoring kernel's time, and an integer count made LLVM widen every
    # compare to int64 lanes (1.40x its loss-only time instead of 1.11x without the
    # count, 2048 x 50257 float32). A block's count is exact (at most SUM_BLOCK).
    xt = row[t]
    zero = _cast_like(0.0, m)
    one = _cast_like(1.0, m)
    ex = 0.0
    e2 = 0.0  # scaled by sq**2 (see _SQUARE_SCALE)
    sq = _square_scale(m)
    above = 0
    # The target's exp is left out of the moments (its entropy term is added in float64):
    # in a confident row e_t ~ 1, and next to it the other squares rounded away in the
    # block's float32 sums (Brier scores 1e-2 off where they were 1e-5).
    et = e[t]
    e[t] = zero
    for b in range((n_classes + SUM_BLOCK - 1) // SUM_BLOCK):
        lo, hi = _block_bounds(b, n_classes)
        ab = _lanes(m)
        qb = _lanes(m)
        nb = _lanes(m)
        n_blocks = (hi - lo) // np.uint64(LANES)
        _add_moments(e, row, lo, n_blocks, m, xt, ab, qb, nb)
        tail = lo + n_blocks * np.uint64(LANES)
        for j in range(hi - tail):
            v = e[tail + j]
            ab[j] += v * (row[tail + j] - m) if v > zero else zero
            qb[j] += _rounded_product(v * sq, v * sq)
            nb[j] += one if row[tail + j] > xt else zero
        ex += _sum_lanes(ab)
        e2 += _sum_lanes(qb)
        above += np.int64(_sum_lanes(nb))
    e[t] = et
    if et > zero:
        ex += np.float64(et) * np.float64(xt - m)
    e2 *= 1.0 / (np.float64(sq) * np.float64(sq))
    stats[0], stats[1], stats[2] = _scores_stats(s, np.log(s), ex, e2, np.float64(et))
    tied_before = 0
    if above == 0:  # only then can an earlier tie take the top spot
        for c in range(t):
            tied_before += row[c] == xt
    rank[0] = above
    rank[1] = 1 if above == 0 and tied_before == 0 else 0


@helper
def _score_row(x, i, target, weight, ignore_index, eps, e, loss_out, stats, rank):
    """Row ``i`` of :func:`_scores_rows`: its loss to ``loss_out[i]``, its metrics to
    ``stats`` (4 values) and ``rank`` (2); ``e`` scratch of C values."""
    t = target[i]
    if t == ignore_index:  # not read, as in loss-only softmax_ce_index
        loss_out[i] = 0.0
        stats[0] = stats[1] = stats[2] = stats[3] = np.nan
        rank[0] = -1
        rank[1] = 0
        return
    row = x[i]
    m = _row_max(row)
    s = _row_sumexp(row, m, e)
    loss_out[i] = _row_loss(row, np.float64(row[t]), weight[t], weight, eps, m, s)
    # the log-sum-exp as _logsumexp_rows gives it
    stats[3] = (_infinite_lse(row, 0, 1, row.shape[0], m) if np.isinf(m)
                else np.float64(m) + np.log(s))
    _row_scores(row, t, m, s, e, stats, rank)


def _scores_rows(x, target, weight, ignore_index, eps, loss_out, stats_out, rank_out):
    """Loss-only :func:`_index_rows` plus the per-row metrics of :func:`_row_scores`; the
    loss takes the very same steps, so it equals softmax_ce_index's bit for bit."""
    n_rows, n_classes = x.shape
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        e = np.empty(n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            _score_row(x, i, target, weight, ignore_index, eps, e, loss_out, stats_out[i],
                       rank_out[i])
        _ftz_end(csr)


@helper
def _add_compensated(total, err, v):
    """Neumaier's sum: returns (total, err) with v added; total + err is the sum of the
    values added, to about one rounding."""
    t = total + v
    if abs(total) >= abs(v):
        err += (total - t) + v
    else:
        err += (v - t) + total
    return t, err


@helper
def _report_start(sums, counts, acc):
    """Zero one block's rows of report_sums' outputs and its compensated sums ``acc``
    (4 * LANES values: the lanes' entropy sums, their errors, the Brier sums, their
    errors; see the contract)."""
    sums[:] = 0.0
    counts[:] = 0
    acc[:] = 0.0


@helper
def _report_rows(stats, rank, top_k, edges, start, stop, sums, counts, acc):
    """Rows start:stop of report_sums (start at a multiple of LANES in its block) into one
    block's sums and counts (rows of the contract's sums_out and counts_out) and ``acc``
    (:func:`_report_start`), in row order, with Cython's cec_report_rows' bits: row i's
    entropy and Brier score in lane (i - start) % LANES (which lets Cython's loop add a
    vector of rows at once; here, one pass over the rows as before was 1.01-1.03x the
    time of row-order sums, lane by lane 1.04-1.06x, results/ab_report_lanes_xeon.txt)."""
    n_bins = edges.shape[0] - 1
    for i in range(start, stop):
        r = rank[i, 0]
        if r < 0:  # ignored
            counts[0] += 1
            continue
        h, b = (i - start) % LANES, 2 * LANES + (i - start) % LANES
        acc[h], acc[LANES + h] = _add_compensated(acc[h], acc[LANES + h], stats[i, 0])
        acc[b], acc[LANES + b] = _add_compensated(acc[b], acc[LANES + b], stats[i, 2])
        p = stats[i, 1]
        if not (p >= 0.0 and p <= 1.0):  # NaN: undefined softmax (NaN entropy and Brier),
            continue                     # no hit, confidence 0; never a bin out of range
        # bin floor(p * n_bins) (0 <= p <= 1), moved by one where rounding crossed an edge
        k = np.int64(p * n_bins)
        if k > 0 and p < edges[k]:
            k -= 1
        elif k < n_bins and p >= edges[k + 1]:
            k += 1
        sums[2 + k] += p
        # (no branch on the hit: a model right half the time would mispredict it half
        # the time)
        hit = np.int64(rank[i, 1] == 1)
        counts[1] += hit
        counts[3 + k] += hit
        counts[2] += np.int64(r < top_k)


@helper
def _report_finish(sums, acc):
    """The block's entropy and Brier sums from the lanes: their sums added in lane order
    with Neumaier's compensation, then their errors; an infinite or NaN sum as it is (its
    error is then NaN or infinite), as a plain sum gives it."""
    for j in range(2):
        total, err = 0.0, 0.0
        for lane in range(LANES):
            total, err = _add_compensated(total, err, acc[2 * j * LANES + lane])
        for lane in range(LANES):
            err += acc[(2 * j + 1) * LANES + lane]
        sums[j] = total + err if np.isfinite(total) else total


def _report_sums(stats, rank, top_k, edges, sums_out, counts_out):
    """report_sums: one block of REDUCE_BLOCK rows per task (see the contract)."""
    n = stats.shape[0]
    for b in prange(sums_out.shape[0]):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        acc = np.empty(4 * LANES)
        _report_start(sums_out[b], counts_out[b], acc)
        _report_rows(stats, rank, top_k, edges, b * REDUCE_BLOCK,
                     min(n, (b + 1) * REDUCE_BLOCK), sums_out[b], counts_out[b], acc)
        _report_finish(sums_out[b], acc)
        _ftz_end(csr)


@helper
def _tile_max(x, base, stride, n_classes, width, m, s):
    """m[j] = max_c x[base + c*stride + j] for j < width, and s[j] = 0.

    Each step is Python's max(m, x), x if x > m else m, as Cython's tiles. The classes go
    two at a time: with one per loop, m[j] = max(m[j], x[j]) stores either x[j] or the
    value just loaded from m[j], and LLVM turns that into a masked store of x[j], which AMD
    CPUs run in microcode (vmaskmovps on AVX2 code; in pairs, bench_ab.py on AVX2 code,
    1e6 x 10 float32 loss + gradient 0.76x the time, same bits:
    results/ab_numba_tile_max_pairs_avx2code_zen4.json)."""
    x0 = _view(x, base, base + width)
    if n_classes % 2 == 0:  # class 1 with class 0, so that an even number is left
        x1 = _view(x, base + stride, base + stride + width)
        for j in range(width):
            m[j] = max(x0[j], x1[j])
            s[j] = 0.0
        c0 = 2
    else:
        for j in range(width):
            m[j] = x0[j]
            s[j] = 0.0
        c0 = 1
    for c in range(c0, n_classes, 2):
        xa = _view(x, base + c * stride, base + c * stride + width)
        xb = _view(x, base + (c + 1) * stride, base + (c + 1) * stride + width)
        for j in range(width):
            m[j] = max(max(m[j], xa[j]), xb[j])


@helper
def _tile_log_sum(s, log_s, width):
    for j in range(width):
        log_s[j] = _log_sum(s[j])


@helper
def _tile_max_sumexp(x, base, stride, n_classes, width, m, s, e_out, store, e_buf, log_s,
                     src, nxt):
    """Per position j < width of a tile: m[j] = max_c x[base + c*stride + j] and
    s[j] = sum_c exp(x[...] - m[j]) (float64), storing the exps in ``e_out`` (same
    indexing as ``x``) when ``store``, else in the scratch row ``e_buf``, and
    log_s[j] = log(s[j]). Inner loops run along j over 0-based views: contiguous,
    vectorised (see _row_sumexp).

    ``nxt >= 0`` (a transposed block): ``src[nxt:nxt + n_classes * width]`` holds the
    next block, whose lines each class's exp loop asks for, a class's share at a time
    (past the end of ``src``, harmless). The block's transpose otherwise waits on memory,
    as the arithmetic in between runs from L1; asked for in one burst, the lines cost as
    much (kernel_findings.md, fifteenth and twenty-fourth sessions)."""
    _tile_max(x, base, stride, n_classes, width, m, s)
    # exp and the float64 accumulation are separate loops: fused, the float64 adds would
    # set the vector width and halve the float32 exp's throughput.
    k = _exp_consts(x)
    for c in range(n_classes):
        xc = _view(x, base + c * stride, base + c * stride + width)
        ec = (_view(e_out, base + c * stride, base + c * stride + width) if store
              else _view(e_buf, 0, width))
        if nxt >= 0:
            for i in range(nxt + c * width, nxt + (c + 1) * width, _per_line(src)):
                _prefetch(src, i)
        for j in range(width):
            ec[j] = _exp_diff(xc[j], m[j], k)
        for j in range(width):
            s[j] += ec[j]
    _tile_log_sum(s, log_s, width)


@helper
def _tile_max_sumexp_in_place(g, base, stride, n_classes, width, m, s, log_s):
    """:func:`_tile_max_sumexp` ``(g, ..., e_out=g, store=True)`` with one array: the exps
    go over the logits they come from. The same loops, so the same sums bit for bit; as
    one array, LLVM sees each exp written where it was read, instead of two arguments
    that overlap, on which its runtime alias checks choose the scalar loops."""
    _tile_max(g, base, stride, n_classes, width, m, s)
    k = _exp_consts(g)
    for c in range(n_classes):
        gc = _view(g, base + c * stride, base + c * stride + width)
        for j in range(width):
            gc[j] = _exp_diff(gc[j], m[j], k)
        for j in range(width):
            s[j] += gc[j]
    _tile_log_sum(s, log_s, width)


@helper
def _n_tiles(n_samples, n_pos, block):
    """Tiles of a ``*_tiles`` kernel: blocks of ``block`` samples (transposed into scratch),
    or, with ``block == 0``, runs of at most TILE positions of one sample."""
    if block:
        return (n_samples + block - 1) // block
    return n_samples * ((n_pos + TILE - 1) // TILE)


@helper
def _tiles_per_task(n_classes, n_tiles, threads):
    """Tiles per parallel task of a ``*_tiles`` kernel run on ``threads`` threads; a task's
    tiles share its scratch arrays. For few classes, whose allocations cost as much as a
    fifth of their arithmetic, one task per thread: Numba splits a prange into equal parts
    per thread, so more tasks balance nothing and each allocates again. Else one tile per
    task (with more classes the allocations cost little)."""
    if n_classes <= KDIM_BLOCK_MAX_C:
        return max(1, (n_tiles + threads - 1) // threads)
    return 1


@helper
def _task_tiles(task, per_task, n_tiles):
    """The tiles of ``task``: a range."""
    return range(task * per_task, min(n_tiles, (task + 1) * per_task))


@helper
def _block_span(tile, block, n_samples):
    """First sample and number of samples of block ``tile``."""
    r0 = tile * block
    return r0, min(block, n_samples - r0)


@helper
def _run_span(tile, n_classes, n_pos):
    """Run ``tile`` of positions: the flat offset of its first logit, its first position
    and its width."""
    per_sample = (n_pos + TILE - 1) // TILE
    n, s0 = tile // per_sample, (tile % per_sample) * TILE
    return n * n_classes * n_pos + s0, n * n_pos + s0, min(TILE, n_pos - s0)


@helper
def _transpose(src, s0, sld, rows, cols, dst, d0, dld):
    """dst[d0 + c * dld + j] = src[s0 + j * sld + c] for j < rows, c < cols: rows of few
    classes to a (classes, rows) tile and back. By register blocks (_tr_block) where
    both sides are at least a block; where rows or cols is not a multiple of it, the last
    block overlaps the one before and writes some values twice, the same values, except
    for the last two of C % 8 == 2 float32 classes (_tr_n2, _tr_2n)."""
    v = 32 // src.itemsize
    # float32 only: for float64 (4 x 2 blocks) LLVM's code took 1.00-1.07x the time of the
    # overlapping 4 x 4 block (results/ab_tr4x2_f64_avx2code_zen4*.json)
    if v == 8 and rows >= v and cols > v and cols % v == 2:  # ten classes into a tile
        for j0 in range(0, rows, v):
            j = j0 if j0 + v <= rows else rows - v
            for c in range(0, cols - v + 1, v):
                _tr_block(src, s0 + j * sld + c, sld, dst, d0 + c * dld + j, dld)
            _tr_n2(src, s0 + j * sld + cols - 2, sld, dst, d0 + (cols - 2) * dld + j, dld)
        return
    if v == 8 and cols >= v and rows > v and rows % v == 2:  # and out
        for c0 in range(0, cols, v):
            c = c0 if c0 + v <= cols else cols - v
            for j in range(0, rows - v + 1, v):
                _tr_block(src, s0 + j * sld + c, sld, dst, d0 + c * dld + j, dld)
            _tr_2n(src, s0 + (rows - 2) * sld + c, sld, dst, d0 + c * dld + rows - 2, dld)
        return
    if rows >= v and cols >= v:
        for j0 in range(0, rows, v):
            j = j0 if j0 + v <= rows else rows - v
            for c0 in range(0, cols, v):
                c = c0 if c0 + v <= cols else cols - v
                _tr_block(src, s0 + j * sld + c, sld, dst, d0 + c * dld + j, dld)
        return
    for c in range(cols):
        for j in range(rows):
            dst[d0 + c * dld + j] = src[s0 + j * sld + c]


@helper
def _to_tile(src, r0, n_rows, n_classes, n_pos, dst):
    """Samples r0 + [0, n_rows) of the flat (N, C, S) ``src`` into the (C, TILE) scratch
    tile ``dst``, positions along its rows: dst[c * TILE + j * S + k] = src[r0 + j, c, k]."""
    size = n_classes * n_pos
    if n_pos == 1:  # 2-D rows of few classes
        _transpose(src, r0 * size, n_classes, n_rows, n_classes, dst, 0, TILE)
        return
    block = _view(src, r0 * size, (r0 + n_rows) * size)
    for c in range(n_classes):
        row = _view(dst, c * TILE, c * TILE + n_rows * n_pos)
        for j in range(n_rows):
            for k in range(n_pos):
                row[j * n_pos + k] = block[j * size + c * n_pos + k]


@helper
def _from_tile(src, r0, n_rows, n_classes, n_pos, dst, staging):
    """The inverse of :func:`_to_tile`: the tile ``src`` into samples r0 + [0, n_rows).
    With a ``staging`` array (not empty: the block's input tile, no longer needed), through
    it and non-temporal stores (:func:`_stream_copy`)."""
    size = n_classes * n_pos
    stream = staging.shape[0] != 0
    # One call for both ways: each call site is another inlined copy of the transposes,
    # which the kernels' compile time pays for (results/startup_zen4_*.json).
    _untile(src, n_rows, n_classes, n_pos, staging if stream else dst,
            0 if stream else r0 * size)
    if stream:
        _stream_copy(staging, n_rows * size, dst, r0 * size)


@helper
def _untile(src, n_rows, n_classes, n_pos, dst, d0):
    """dst[d0 + (j * C + c) * S + k] = src[c * TILE + j * S + k] (see :func:`_from_tile`)."""
    size = n_classes * n_pos
    if n_pos == 1:
        _transpose(src, 0, TILE, n_classes, n_rows, dst, d0, n_classes)
        return
    block = _view(dst, d0, d0 + n_rows * size)
    for c in range(n_classes):
        row = _view(src, c * TILE, c * TILE + n_rows * n_pos)
        for j in range(n_rows):
            for k in range(n_pos):
                block[j * size + c * n_pos + k] = row[j * n_pos + k]


@helper
def _stream_copy(src, n, dst, d0):
    """dst[d0:d0 + n] = src[:n], dst's whole 64-byte lines with non-temporal stores, the
    partial lines at the ends with normal ones. For the few-classes blocks' outputs that
    are larger than the cache (_config.STREAM_MIN_BYTES; the contract functions in
    ``__init__`` say which): a normal store first reads the line it overwrites. The
    kernel's task then ends with _store_fence. dst must be aligned to its itemsize."""
    per_line = 64 // dst.itemsize
    head = min(n, (64 - _address(dst, d0) % 64) % 64 // dst.itemsize)
    for i in range(head):
        dst[d0 + i] = src[i]
    i = head
    while i + per_line <= n:
        _stream_line(src, i, dst, d0 + i)
        i += per_line
    for k in range(i, n):
        dst[d0 + k] = src[k]


@helper
def _fill_run(dst, a, start, width):
    """dst[:width] = a[start:start + width], ``a`` a 1-D view of any stride: a contiguous
    run. LLVM vectorises loops only over contiguous arrays, and the tiles' gradient
    scales are often broadcast (a stride-0 view for 'mean' and 'sum', see _flat) or
    strided views, on which the per-position coefficients and the probability targets'
    gradient loop over every class stayed scalar. A stride-0 ``a`` is one value stored
    ``width`` times: its copy loop stays scalar too (an index computation per value), 7 %
    of the time of a tile of 10 classes (kernel_findings.md, twenty-fourth session)."""
    if a.strides[0] == 0 and width > 0:  # (a stride-0 view may hold no element)
        v = a[start]
        for j in range(width):
            dst[j] = v
    else:
        for j in range(width):
            dst[j] = a[start + j]


@helper
def _fill_row_run(dst, a, i, start, width):
    """dst[:width] = a[i, start:start + width], ``a`` a 2-D array of any strides (as
    _fill_run, by 2-D index rather than through a row slice)."""
    for j in range(width):
        dst[j] = a[i, start + j]


@helper
def _gather_targets(x, base, stride, tgt, ignore_index, weight, shift, w_t, width):
    """shift[j] = x[base + t * stride + j] and w_t[j] = weight[t], t = tgt[j] (class 0
    and weight 0 at an ignored position): _index_tile's gather, scalar. On its own, with
    unsigned indices: inside _index_tile each access wrapped its signed index and
    reloaded its array's pointer from the stack."""
    ub, us = np.uint64(base), np.uint64(stride)
    for j in range(width):
        t = tgt[j]
        ok = t != ignore_index
        u = np.uint64(t) if ok else np.uint64(0)
        shift[j] = x[ub + u * us + np.uint64(j)]
        w_t[j] = weight[u] if ok else 0.0


# The normal numbers' range of each type, (smallest, largest): what _weight_scale reads.
_NORMAL_F32 = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))
_NORMAL_F64 = (float(np.finfo(np.float64).tiny), float(np.finfo(np.float64).max))


@helper
def _shift_check(grad_scale, smooth, w_scale, x):
    """Whether _index_tile must check its label-smoothing shifts: with smoothing, unless
    ``grad_scale`` is one broadcast value ('mean', 'sum') whose shift is a normal number
    of x's type. As the Cython calls decide it (cec_shift_outside)."""
    if smooth == 0.0 or grad_scale.shape[0] == 0:
        return False
    if grad_scale.strides[0] != 0:
        return True
    lo, hi = _NORMAL_F32 if x.itemsize == 4 else _NORMAL_F64
    r = abs(grad_scale[0] * smooth * w_scale)
    return r > 0.0 and r <= _NORMAL_F64[1] and (r < lo or r > hi)


@helper
def _weight_scale(weight, x):
    """The tiles multiply the label-smoothing term's class weight and scale in x's type,
    one vector product per element, each rounded to it first: where a weight is not a
    normal number of x's type, both are scaled by a power of two, exactly, so that
    neither rounds to 0 or inf where their product does not (float64 weights of 1e-300
    under 'mean', whose scale is then 1e299, gave 0 * inf = NaN). Returns 1 when every
    finite non-zero weight is normal in x's type (the products are then the ones from
    before: scaling by the largest weight would flush a weight 2**126 times smaller to 0
    in float32), else 2**k with the largest finite |weight[c]| in [2**k, 2**(k+1)), k
    clamped so that 2**k and 2**-k are normal doubles. Computed once per call. As
    cec_weight_scale."""
    lo, hi = _NORMAL_F32 if x.itemsize == 4 else _NORMAL_F64
    top = 0.0
    outside = False
    for c in range(weight.shape[0]):
        a = abs(weight[c])
        if a > 0.0 and a <= _NORMAL_F64[1]:
            outside |= a < lo or a > hi
            top = max(a, top)
    if not outside:
        return 1.0
    k = math.frexp(top)[1] - 1  # (frexp's fraction is in [0.5, 1))
    return math.ldexp(1.0, min(max(k, -1000), 1000))


@helper
def _smooth_wide(g, base, stride, n_classes, width, tgt, ignore_index, coef, gs_run, scale,
                 down, weight):
    """The gradient loop of _index_tile where a label-smoothing shift is outside x's
    type's normal range: each term gs * eps / C * w_c formed in float64 and rounded once
    (as cec_smooth_wide; ``scale`` = eps / C * w_scale). The target's -sub follows in
    _index_tile."""
    for c in range(n_classes):
        gc = _view(g, base + c * stride, base + c * stride + width)
        w_c64 = weight[c] * down
        for j in range(width):
            term = gs_run[j] * scale * w_c64 if tgt[j] != ignore_index else 0.0
            gc[j] = gc[j] * coef[j] - _cast_like(term, coef[0])


@helper
def _index_tile(x, base, stride, n_classes, width, target, pos0, weight, w_total,
                w_scale, check_shift, ignore_index, eps, grad_scale, loss_out, g, want_grad,
                in_place, m, s, log_s, coef, shift, sub, w_t, gs_run, src, nxt):
    """Loss (and gradient into ``g``, indexed like ``x``) of one tile of positions; a
    ``g`` given without ``want_grad`` receives the exps (:func:`_scores_tiles`).
    ``in_place``: ``g`` is ``x`` itself (no label smoothing). ``m`` to ``gs_run``: scratch
    of TILE values (``s``, ``log_s``, ``w_t`` and ``gs_run`` float64, the others of x's
    type); ``src`` and ``nxt`` as for _tile_max_sumexp (the in-place path asks for none);
    ``w_scale`` from :func:`_weight_scale`, ``check_shift`` from :func:`_shift_check`."""
    smooth = eps / n_classes
    tgt = _view(target, pos0, pos0 + width)
    loss = _view(loss_out, pos0, pos0 + width)
    # Per position, the steps are branch-free selects (an ignored position reads class 0)
    # so that they vectorise, as in Cython's cec_index_tile (with the register transposes,
    # bench_ab 1e6 x 10 float32 loss only 0.79-0.85 of the time before:
    # results/ab_numba_transpose_zen4.json). The targets' logits first, held in `shift`
    # until the loss is formed: without label smoothing g may be x itself.
    _gather_targets(x, base, stride, tgt, ignore_index, weight, shift, w_t, width)
    if in_place:
        _tile_max_sumexp_in_place(g, base, stride, n_classes, width, m, s, log_s)
    else:
        _tile_max_sumexp(x, base, stride, n_classes, width, m, s, g, g.shape[0] != 0, coef,
                         log_s, src, nxt)
    if eps > 0.0:  # sum_c weight[c] * (lse - x[c]) per position (see _row_wdev), in `loss`
        loss[:] = 0.0
        for c in range(n_classes):
            w_c = weight[c]
            xc = _view(x, base + c * stride, base + c * stride + width)
            for j in range(width):
                loss[j] += w_c * _dev(np.float64(m[j]), np.float64(xc[j]), log_s[j])
    # Both products rounded, never fused into the sum: with "contract" LLVM fused one of
    # them in one kernel's copy of this helper and not in another's (the scoring tiles'
    # label-smoothing losses were 1 ulp off softmax_ce_index's in a fifth of the rows).
    for j in range(width):
        l = _rounded_product((1.0 - eps) * w_t[j],
                             _dev(np.float64(m[j]), np.float64(shift[j]), log_s[j]))
        if eps > 0.0:
            l += _rounded_product(smooth, loss[j])
        loss[j] = l if tgt[j] != ignore_index else 0.0
    if not want_grad:
        return
    # An ignored position: gradient e * (s * 0), 0 or NaN where the softmax is NaN, as
    # torch gives (see _index_row).
    zero_w = w_total * 0.0 if eps > 0.0 else 0.0
    _fill_run(gs_run, grad_scale, pos0, width)
    # exact, a power of two (see _weight_scale); no division in the common case
    down = 1.0 if w_scale == 1.0 else 1.0 / w_scale
    for j in range(width):
        ok = tgt[j] != ignore_index
        w_sum = (1.0 - eps) * w_t[j] + smooth * w_total if eps > 0.0 else w_t[j]
        # Both sides computed, then selected: a division under a condition stays scalar.
        q, sh = gs_run[j] * w_sum / s[j], gs_run[j] * smooth * w_scale
        sb = _rounded_product(gs_run[j] * (1.0 - eps), w_t[j])
        coef[j] = _cast_like(q if ok else s[j] * 0.0 + zero_w, m[0])
        if eps > 0.0:
            shift[j] = _cast_like(sh if ok else 0.0, m[0])
            sub[j] = _cast_like(sb, m[0])
        else:
            # The target's entry is p * shift + sub, p = e_t * coef (as cec_index_tile_at's
            # keep and add): where the target holds the max (its logit still in `shift`),
            # 0 * p + q (1 - s), formed in float64 (see _index_row); elsewhere p - sub;
            # 1 * p + 0 at an ignored position (whose target may name a class).
            top = ok & (shift[j] == m[j])  # (no `and`: a branch stays scalar)
            exact = (1.0 - s[j]) * q
            shift[j] = _cast_like(0.0 if top else 1.0, m[0])
            sub[j] = _cast_like(exact if top else (-sb if ok else 0.0), m[0])
    # Whether a shift is outside x's type's normal range: then the smoothing term, two
    # factors rounded to x's type, is formed in float64 instead (float32 class weights of
    # about 1e30 and up under 'mean': gs * eps / C underflowed and the term was lost;
    # as cec_index_tile_at).
    wide = False
    if eps > 0.0 and check_shift:  # by the smallest and largest finite non-zero |shift|
        lo, hi = _NORMAL_F32 if m.itemsize == 4 else _NORMAL_F64
        a_min = a_max = 1.0
        for j in range(width):
            r = abs(gs_run[j] * smooth * w_scale)
            a = r if tgt[j] != ignore_index and r > 0.0 and r <= _NORMAL_F64[1] else 1.0
            a_min, a_max = min(a_min, a), max(a_max, a)
        wide = a_min < lo or a_max > hi
    if wide:
        _smooth_wide(g, base, stride, n_classes, width, tgt, ignore_index, coef, gs_run,
                     smooth * w_scale, down, weight)
    else:
        for c in range(n_classes):
            gc = _view(g, base + c * stride, base + c * stride + width)
            if eps > 0.0:
                w_c = _cast_like(weight[c] * down, m[0])
                for j in range(width):
                    gc[j] = gc[j] * coef[j] - shift[j] * w_c
            else:
                for j in range(width):
                    p = gc[j] * coef[j]
                    gc[j] = p * shift[j] + sub[j] if tgt[j] == c else p
    if eps > 0.0:
        for j in range(width):
            t = tgt[j]
            if t != ignore_index:
                g[base + t * stride + j] -= sub[j]


def _index_tiles(x, target, weight, w_total, ignore_index, eps, grad_scale, loss_out,
                 grad_out, n_samples, n_classes, n_pos, block, stream, threads):
    """Tiled kernel on the flat (N, C, S) array.

    ``block == 0``: tiles run along S in place (TILE positions of one sample at a time).
    ``block > 0``: each tile is ``block`` consecutive samples, ``block * S <= TILE``
    positions, transposed into a (C, TILE) scratch tile (and its gradient back), so that
    the loops run across ``block * S`` positions instead of ``S``: rows of few classes
    (``S == 1``) would be shorter than a vector, and so are the tiles of few positions.
    The tile's arithmetic is per position, so both give the same bits. ``stream``: the
    blocks write ``grad_out`` with non-temporal stores (see :func:`_stream_copy`).
    ``threads``: the threads the kernel runs on (see :func:`_tiles_per_task`).
    """
    want_grad = grad_out.shape[0] != 0
    n_tiles = _n_tiles(n_samples, n_pos, block)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    w_scale = _weight_scale(weight, x)
    check_shift = _shift_check(grad_scale, eps / n_classes, w_scale, x)
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        coef = np.empty(TILE, dtype=x.dtype)
        shift = np.empty(TILE, dtype=x.dtype)
        sub = np.empty(TILE, dtype=x.dtype)
        w_t = np.empty(TILE, dtype=np.float64)
        gs_run = np.empty(TILE, dtype=np.float64)
        xt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        gt = np.empty(n_classes * TILE if block and want_grad else 0, dtype=x.dtype)
        staging = xt if stream else xt[:0]  # the input tile, once a block is done
        for tile in _task_tiles(task, per_task, n_tiles):
            if block:
                r0, n_rows = _block_span(tile, block, n_samples)
                _to_tile(x, r0, n_rows, n_classes, n_pos, xt)
                _index_tile(xt, 0, TILE, n_classes, n_rows * n_pos, target, r0 * n_pos,
                            weight, w_total, w_scale, check_shift, ignore_index, eps,
                            grad_scale, loss_out, gt, want_grad, False, m, s, log_s, coef,
                            shift, sub, w_t, gs_run, x, (r0 + n_rows) * n_classes * n_pos)
                if want_grad:
                    _from_tile(gt, r0, n_rows, n_classes, n_pos, grad_out, staging)
            else:
                base, pos0, width = _run_span(tile, n_classes, n_pos)
                _index_tile(x, base, n_pos, n_classes, width, target, pos0, weight, w_total,
                            w_scale, check_shift, ignore_index, eps, grad_scale, loss_out,
                            grad_out, want_grad, False, m, s, log_s, coef, shift, sub, w_t,
                            gs_run, x, -1)
        if stream:
            _store_fence()
        _ftz_end(csr)


@helper
def _tile_scores(xt, et, n_classes, width, tgt, ignore_index, m, s, log_s, stats, rank,
                 xtt, ett, lo, a, q, above, before):
    """The metrics of :func:`_row_scores` for a transposed tile of rows (positions j <
    width along rows of TILE), from its exps ``et`` and its ``m``, ``s`` and ``log_s``,
    into ``stats`` and ``rank`` (the tile's rows of the outputs). As there, the moments
    and counts are summed in the logits' type (here at most SMALL_C terms per row, all
    of one sign), x clamped at m - 1e30 so that e = 0 adds 0, the target's square left
    out. ``xtt`` to ``before``: scratch of TILE values of the logits' type."""
    zero = _cast_like(0.0, m[0])
    one = _cast_like(1.0, m[0])
    sq = _square_scale(m[0])  # q: squares scaled by sq**2 (see _SQUARE_SCALE)
    unscale = 1.0 / (np.float64(sq) * np.float64(sq))
    for j in range(width):
        tc = tgt[j] if tgt[j] != ignore_index else 0
        xtt[j] = xt[tc * TILE + j]
        ett[j] = et[tc * TILE + j]
        lo[j] = m[j] + _cast_like(-1e30, m[0])
        a[j] = zero
        q[j] = zero
        above[j] = zero
        before[j] = zero
    for c in range(n_classes):
        xc = _view(xt, c * TILE, c * TILE + width)
        ec = _view(et, c * TILE, c * TILE + width)
        for j in range(width):
            v = ec[j]
            xv = xc[j]
            # products rounded, never fused into the sums: LLVM fused them in the vector
            # loop and not in the scalar one (one-row chunks gave other Brier scores)
            a[j] += _rounded_product(v, (xv if xv > lo[j] else lo[j]) - m[j])
            q[j] += zero if tgt[j] == c else _rounded_product(v * sq, v * sq)
            above[j] += one if xv > xtt[j] else zero
            before[j] += one if c < tgt[j] and xv == xtt[j] else zero
    # Branch-free selects, so that the float64 divisions vectorise (as cec_scores_tile);
    # the rare infinite max after them (not inf - inf, see _infinite_lse). An ignored row
    # gets NaN stats and rank (-1, 0) as _scores_rows gives it; an undefined softmax (s
    # NaN or +inf) NaN entropy, max p and Brier, and rank (C, 0).
    for j in range(width):
        ok = tgt[j] != ignore_index
        fine = ok & (s[j] < np.inf)
        h, mp, br = _scores_stats(s[j], log_s[j], np.float64(a[j]),
                                  np.float64(q[j]) * unscale, np.float64(ett[j]))
        stats[j, 0] = h if fine else np.nan
        stats[j, 1] = mp if fine else np.nan
        stats[j, 2] = br if fine else np.nan
        stats[j, 3] = np.float64(m[j]) + log_s[j] if ok else np.nan
        rank[j, 0] = np.int64(above[j]) if fine else (np.int64(n_classes) if ok else -1)
        rank[j, 1] = np.int64(fine & (above[j] == zero) & (before[j] == zero))
    for j in range(width):
        if tgt[j] != ignore_index and np.isinf(m[j]):
            stats[j, 3] = _infinite_lse(xt, j, TILE, n_classes, m[j])


@helper
def _score_tile(x, r0, n_rows, n_classes, target, weight, ignore_index, eps, loss_out, stats,
                rank, m, s, log_s, w_t, gs_run, scratch, xt, et, no_scale):
    """Rows r0 + [0, n_rows) of :func:`_scores_tiles` (a block): their losses to
    ``loss_out``, their metrics to ``stats`` and ``rank`` (the block's rows); the other
    arguments are the task's scratch."""
    _to_tile(x, r0, n_rows, n_classes, 1, xt)
    _index_tile(xt, 0, TILE, n_classes, n_rows, target, r0, weight, 0.0, 1.0, False,
                ignore_index, eps, no_scale, loss_out, et, False, False, m, s, log_s,
                scratch[0], scratch[1], scratch[2], w_t, gs_run, x,
                (r0 + n_rows) * n_classes)
    _tile_scores(xt, et, n_classes, n_rows, _view(target, r0, r0 + n_rows), ignore_index, m,
                 s, log_s, stats, rank, scratch[3], scratch[4], scratch[5], scratch[6],
                 scratch[7], scratch[8], scratch[9])


def _scores_tiles(x, target, weight, ignore_index, eps, loss_out, stats_out, rank_out,
                  n_samples, n_classes, block, threads):
    """softmax_ce_scores for rows of few classes (the flat (N, C) logits): blocks of
    ``block`` rows transposed into a scratch tile, as :func:`_index_tiles` runs them, the
    loss by :func:`_index_tile` (its steps, so softmax_ce_index's bits) with the exps kept
    in a second tile, then the metrics by :func:`_tile_scores` while both are in cache."""
    n_tiles = _n_tiles(n_samples, 1, block)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    no_scale = np.empty(0, dtype=np.float64)  # read only for a gradient
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        w_t = np.empty(TILE, dtype=np.float64)
        gs_run = np.empty(TILE, dtype=np.float64)
        scratch = np.empty((10, TILE), dtype=x.dtype)  # of _index_tile, then _tile_scores
        xt = np.empty(n_classes * TILE, dtype=x.dtype)
        et = np.empty(n_classes * TILE, dtype=x.dtype)
        for tile in _task_tiles(task, per_task, n_tiles):
            r0, n_rows = _block_span(tile, block, n_samples)
            _score_tile(x, r0, n_rows, n_classes, target, weight, ignore_index, eps, loss_out,
                        stats_out[r0:r0 + n_rows], rank_out[r0:r0 + n_rows], m, s, log_s, w_t,
                        gs_run, scratch, xt, et, no_scale)
        _ftz_end(csr)


def _scores_report(x, target, weight, ignore_index, eps, top_k, edges, loss_out, sums_out,
                   counts_out, block):
    """softmax_ce_report: one block of REDUCE_BLOCK rows per task, scored ``block`` rows
    at a time (by :func:`_score_tile`, or row by row by :func:`_score_row` when ``block``
    is 0: then SMALL_C_ROWS rows, as Cython's) into scratch that stays in cache, and
    summed as :func:`_report_sums` sums (the per-row outputs are never written)."""
    n_rows, n_classes = x.shape
    flat = x.reshape(-1)
    rows = block if block else SMALL_C_ROWS
    no_scale = np.empty(0, dtype=np.float64)
    for b in prange(sums_out.shape[0]):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        stats = np.empty((rows, 4))
        rank = np.empty((rows, 2), dtype=np.int64)
        acc = np.empty(4 * LANES)
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        w_t = np.empty(TILE, dtype=np.float64)
        gs_run = np.empty(TILE, dtype=np.float64)
        scratch = np.empty((10, TILE) if block else (0, 0), dtype=x.dtype)
        xt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        et = np.empty(n_classes * TILE if block else n_classes, dtype=x.dtype)
        _report_start(sums_out[b], counts_out[b], acc)
        stop = min(n_rows, (b + 1) * REDUCE_BLOCK)
        for r0 in range(b * REDUCE_BLOCK, stop, rows):  # (REDUCE_BLOCK is a multiple)
            n = min(rows, stop - r0)
            if block:
                _score_tile(flat, r0, n, n_classes, target, weight, ignore_index, eps,
                            loss_out, stats, rank, m, s, log_s, w_t, gs_run, scratch, xt, et,
                            no_scale)
            else:
                for j in range(n):
                    _score_row(x, r0 + j, target, weight, ignore_index, eps, et, loss_out,
                               stats[j], rank[j])
            _report_rows(stats, rank, top_k, edges, 0, n, sums_out[b], counts_out[b], acc)
        _report_finish(sums_out[b], acc)
        _ftz_end(csr)


def _index_sample_rows(x, target, weight, w_total, ignore_index, eps, grad_scale, loss_out,
                       grad_out, n_samples, n_classes, n_pos, group):
    """K-dim input with few positions and many classes, on the flat (N, C, S) array: each
    sample's positions, ``group`` at a time, are transposed into rows of C classes and run
    through the row kernel, and their gradient rows transposed back (tiles of S positions
    would run the loops across S values only)."""
    want_grad = grad_out.shape[0] != 0
    sample_size = n_classes * n_pos
    for n in prange(n_samples):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        xt = np.empty((group, n_classes), dtype=x.dtype)
        gt = np.empty((group, n_classes), dtype=x.dtype)  # the gradient, or the exps
        src = _view(x, n * sample_size, (n + 1) * sample_size)
        for s0 in range(0, n_pos, group):
            gw = min(group, n_pos - s0)
            for c in range(n_classes):
                for j in range(gw):
                    xt[j, c] = src[c * n_pos + s0 + j]
            for j in range(gw):
                p = n * n_pos + s0 + j
                t = target[p]
                ignored = t == ignore_index
                loss_out[p] = 0.0
                if ignored and not want_grad:
                    continue  # as _index_rows: an ignored row is read only for the gradient
                loss_out[p] = _index_row(xt[j], t, weight, w_total, eps, grad_scale[p],
                                         gt[j], ignored, want_grad, False)
            if want_grad:
                dst = _view(grad_out, n * sample_size, (n + 1) * sample_size)
                for c in range(n_classes):
                    for j in range(gw):
                        dst[c * n_pos + s0 + j] = gt[j, c]
        _ftz_end(csr)


def _index_tiles_in_place(grad, target, weight, w_total, ignore_index, eps, grad_scale,
                          loss_out, n_samples, n_classes, n_pos, threads):
    """:func:`_index_tiles` for K-dim logits (``n_pos > 1``) whose gradient is written over
    them (no label smoothing): ``grad`` holds the logits and receives the gradient, and
    the exps go through :func:`_tile_max_sumexp_in_place`. Given two arguments that
    overlap, LLVM's runtime alias checks sent the tile loops to their scalar versions
    (4 x 21 x 256 x 256 float32: 22.9 ms in place against 8.8 ms into another buffer)."""
    n_tiles = _n_tiles(n_samples, n_pos, 0)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=grad.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        coef = np.empty(TILE, dtype=grad.dtype)
        shift = np.empty(TILE, dtype=grad.dtype)
        sub = np.empty(TILE, dtype=grad.dtype)
        w_t = np.empty(TILE, dtype=np.float64)
        gs_run = np.empty(TILE, dtype=np.float64)
        for tile in _task_tiles(task, per_task, n_tiles):
            base, pos0, width = _run_span(tile, n_classes, n_pos)
            _index_tile(grad, base, n_pos, n_classes, width, target, pos0, weight, w_total,
                        1.0, False, ignore_index, eps, grad_scale, loss_out, grad, True, True,
                        m, s, log_s, coef, shift, sub, w_t, gs_run, grad, -1)
        _ftz_end(csr)


# --------------------------------------------------------- class-probability targets
@helper
def _proba_row(row, q, weight, eps, gs, g, want_grad):
    """Loss of one row with probability targets ``q``; with ``want_grad``, the gradient
    (times gs) goes into ``g``, which otherwise is scratch for the exps."""
    n_classes = row.shape[0]
    smooth = eps / n_classes
    m = _row_max(row)
    s = _row_sumexp(row, m, g)
    log_s = np.log(s)
    # Summed term by term (see _row_wdev): an infinite weight gives torch's inf.
    wq_lanes = _lanes(0.0)
    loss_lanes = _lanes(0.0)
    full = n_classes - n_classes % LANES
    for c0 in range(0, full, LANES):  # as in _row_scores
        for j in range(LANES):
            qc = weight[c0 + j] * ((1.0 - eps) * q[c0 + j] + smooth)
            wq_lanes[j] += qc
            loss_lanes[j] += qc * _dev(np.float64(m), np.float64(row[c0 + j]), log_s)
    for j in range(n_classes - full):
        qc = weight[full + j] * ((1.0 - eps) * q[full + j] + smooth)
        wq_lanes[j] += qc
        loss_lanes[j] += qc * _dev(np.float64(m), np.float64(row[full + j]), log_s)
    wq = _sum_lanes(wq_lanes)
    loss = _sum_lanes(loss_lanes)
    if not want_grad:
        return loss
    coef = _cast_like(gs * wq / s, m)
    for c in range(n_classes):
        qc = weight[c] * ((1.0 - eps) * q[c] + smooth)
        g[c] = g[c] * coef - _cast_like(gs * qc, m)
    return loss


def _proba_rows(x, target, weight, eps, grad_scale, loss_out, grad_out):
    n_rows, n_classes = x.shape
    want_grad = grad_out.shape[0] != 0
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        scratch = np.empty(0 if want_grad else n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            g = grad_out[i] if want_grad else scratch
            loss_out[i] = _proba_row(x[i], target[i], weight, eps, grad_scale[i], g, want_grad)
        _ftz_end(csr)


@helper
def _proba_tile(x, q, base, stride, n_classes, width, weight, eps, grad_scale, pos0, loss_out,
                g, want_grad, m, s, log_s, e_buf, wq, loss, coef, gs_run):
    """Loss (and gradient into ``g``, indexed like ``x`` and ``q``) of one tile of
    positions with probability targets; ``m`` to ``gs_run``: the task's scratch."""
    smooth = eps / n_classes
    _tile_max_sumexp(x, base, stride, n_classes, width, m, s, g, want_grad, e_buf, log_s, x,
                     -1)
    for j in range(width):
        wq[j] = 0.0
        loss[j] = 0.0
    for c in range(n_classes):  # class by class, see _proba_row
        off = base + c * stride
        for j in range(width):
            qc = weight[c] * ((1.0 - eps) * q[off + j] + smooth)
            wq[j] += qc
            loss[j] += qc * _dev(np.float64(m[j]), np.float64(x[off + j]), log_s[j])
    for j in range(width):
        loss_out[pos0 + j] = loss[j]
    if want_grad:
        _fill_run(gs_run, grad_scale, pos0, width)
        for j in range(width):
            coef[j] = gs_run[j] * wq[j] / s[j]
        for c in range(n_classes):
            off = base + c * stride
            for j in range(width):
                qc = weight[c] * ((1.0 - eps) * q[off + j] + smooth)
                g[off + j] = _cast_like(g[off + j] * coef[j] - gs_run[j] * qc, m[0])


def _proba_tiles(x, target, weight, eps, grad_scale, loss_out, grad_out, n_samples,
                 n_classes, n_pos, block, stream, threads):
    """Tiled kernel on flat (N, C, S) arrays; ``block``, ``stream`` and ``threads`` as for
    :func:`_index_tiles`."""
    want_grad = grad_out.shape[0] != 0
    n_tiles = _n_tiles(n_samples, n_pos, block)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=x.dtype)
        e_buf = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        wq = np.empty(TILE, dtype=np.float64)
        loss = np.empty(TILE, dtype=np.float64)
        coef = np.empty(TILE, dtype=np.float64)
        gs_run = np.empty(TILE, dtype=np.float64)
        xt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        qt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        gt = np.empty(n_classes * TILE if block and want_grad else 0, dtype=x.dtype)
        staging = xt if stream else xt[:0]
        for tile in _task_tiles(task, per_task, n_tiles):
            if block:
                r0, n_rows = _block_span(tile, block, n_samples)
                _to_tile(x, r0, n_rows, n_classes, n_pos, xt)
                _to_tile(target, r0, n_rows, n_classes, n_pos, qt)
                _proba_tile(xt, qt, 0, TILE, n_classes, n_rows * n_pos, weight, eps,
                            grad_scale, r0 * n_pos, loss_out, gt, want_grad, m, s, log_s,
                            e_buf, wq, loss, coef, gs_run)
                if want_grad:
                    _from_tile(gt, r0, n_rows, n_classes, n_pos, grad_out, staging)
            else:
                base, pos0, width = _run_span(tile, n_classes, n_pos)
                _proba_tile(x, target, base, n_pos, n_classes, width, weight, eps, grad_scale,
                            pos0, loss_out, grad_out, want_grad, m, s, log_s, e_buf, wq, loss,
                            coef, gs_run)
        if stream:
            _store_fence()
        _ftz_end(csr)


# --------------------------------------------------------------- softmax, logsumexp
def _softmax_rows(x, log, out, in_place):
    """Softmax or log-softmax of each row; ``in_place``: ``out`` is ``x`` itself (the
    softmax's exps then go to a one-array loop, see _row_sumexp_in_place, and the
    log-softmax's to a scratch row)."""
    n_rows, n_classes = x.shape
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        # log-softmax reads each logit again after the sum: over the logits themselves
        # its exps go to a scratch row (else to ``out``: a scratch row was 1.3-1.5x slower)
        scratch = np.empty(n_classes if log and in_place else 0, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = x[i]
            o = out[i]
            m = _row_max(row)
            if log:  # (x - m) - log(s), see _row_wdev
                e = scratch if in_place else o
                log_s = _cast_like(np.log(_row_sumexp(row, m, e)), m)
                for c in range(n_classes):
                    o[c] = -_dev(m, row[c], log_s)
            else:
                s = _row_sumexp_in_place(o, m) if in_place else _row_sumexp(row, m, o)
                inv = _cast_like(1.0 / s, m)
                for c in range(n_classes):
                    o[c] = o[c] * inv
        _ftz_end(csr)


@helper
def _softmax_tile(x, base, stride, n_classes, width, log, out, m, s, log_s, shift, src,
                  nxt):
    """Softmax or log-softmax of one tile of positions into ``out`` (indexed like ``x``);
    ``m`` to ``shift``: the task's scratch; ``src`` and ``nxt`` as for _tile_max_sumexp."""
    _tile_max_sumexp(x, base, stride, n_classes, width, m, s, out, not log, shift, log_s,
                     src, nxt)
    for j in range(width):
        shift[j] = log_s[j] if log else 1.0 / s[j]
    for c in range(n_classes):
        off = base + c * stride
        if log:
            for j in range(width):
                out[off + j] = -_dev(m[j], x[off + j], shift[j])
        else:
            for j in range(width):
                out[off + j] = out[off + j] * shift[j]


def _softmax_tiles(x, log, out, n_samples, n_classes, n_pos, block, stream, threads):
    """Tiled kernel on flat (N, C, S) arrays; ``block``, ``stream`` (into ``out``) and
    ``threads`` as for :func:`_index_tiles`."""
    n_tiles = _n_tiles(n_samples, n_pos, block)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=x.dtype)
        shift = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        xt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        ot = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        staging = xt if stream else xt[:0]
        for tile in _task_tiles(task, per_task, n_tiles):
            if block:
                r0, n_rows = _block_span(tile, block, n_samples)
                _to_tile(x, r0, n_rows, n_classes, n_pos, xt)
                _softmax_tile(xt, 0, TILE, n_classes, n_rows * n_pos, log, ot, m, s, log_s,
                              shift, x, (r0 + n_rows) * n_classes * n_pos)
                _from_tile(ot, r0, n_rows, n_classes, n_pos, out, staging)
            else:
                base, _, width = _run_span(tile, n_classes, n_pos)
                _softmax_tile(x, base, n_pos, n_classes, width, log, out, m, s, log_s, shift,
                              x, -1)
        if stream:
            _store_fence()
        _ftz_end(csr)


@helper
def _infinite_lse(x, base, stride, n_classes, m):
    """log-sum-exp when the max ``m`` is infinite: ``m`` itself (as torch and scipy give,
    not inf - inf), unless a NaN is among the values."""
    for c in range(n_classes):
        v = x[base + c * stride]
        if v != v:
            return np.float64(v)
    return np.float64(m)


def _logsumexp_rows(x, out):
    n_rows, n_classes = x.shape
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        scratch = np.empty(n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            m = _row_max(x[i])
            if np.isinf(m):
                out[i] = _infinite_lse(x[i], 0, 1, n_classes, m)
            else:
                out[i] = np.float64(m) + np.log(_row_sumexp(x[i], m, scratch))
        _ftz_end(csr)


@helper
def _logsumexp_tile(x, base, stride, n_classes, width, out, pos0, m, s, log_s, e_buf, src,
                    nxt):
    """out[pos0 + j] = log-sum-exp of position j of one tile; ``m`` to ``e_buf``: the
    task's scratch; ``src`` and ``nxt`` as for _tile_max_sumexp."""
    _tile_max_sumexp(x, base, stride, n_classes, width, m, s, e_buf, False, e_buf, log_s,
                     src, nxt)
    for j in range(width):
        if np.isinf(m[j]):
            out[pos0 + j] = _infinite_lse(x, base + j, stride, n_classes, m[j])
        else:
            out[pos0 + j] = np.float64(m[j]) + log_s[j]


def _logsumexp_tiles(x, out, n_samples, n_classes, n_pos, block, threads):
    """Tiled kernel on flat (N, C, S) arrays; ``block`` and ``threads`` as for
    :func:`_index_tiles`."""
    n_tiles = _n_tiles(n_samples, n_pos, block)
    per_task = _tiles_per_task(n_classes, n_tiles, threads)
    for task in prange((n_tiles + per_task - 1) // per_task):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        m = np.empty(TILE, dtype=x.dtype)
        e_buf = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        log_s = np.empty(TILE, dtype=np.float64)
        xt = np.empty(n_classes * TILE if block else 0, dtype=x.dtype)
        for tile in _task_tiles(task, per_task, n_tiles):
            if block:
                r0, n_rows = _block_span(tile, block, n_samples)
                _to_tile(x, r0, n_rows, n_classes, n_pos, xt)
                _logsumexp_tile(xt, 0, TILE, n_classes, n_rows * n_pos, out, r0 * n_pos, m, s,
                                log_s, e_buf, x, (r0 + n_rows) * n_classes * n_pos)
            else:
                base, pos0, width = _run_span(tile, n_classes, n_pos)
                _logsumexp_tile(x, base, n_pos, n_classes, width, out, pos0, m, s, log_s,
                                e_buf, x, -1)
        _ftz_end(csr)


# ------------------------------------------------------------------ binary (sigmoid)
@helper
def _bce_row(x, y, p, n, weight, pos_weight, grad_scale, loss_out, lo, g, want_grad):
    """Binary cross-entropy on logits of ``x[p:p + n]`` and ``y[p:p + n]``, the losses to
    ``loss_out[lo:lo + n]`` and the gradient to ``g[p:p + n]``; ``weight``, ``pos_weight``
    and ``grad_scale`` are scalars or runs indexed from 0. Vectorisable (as cec_bce_row in
    cecore_ext/_rowkernels.h; the formulas are in :func:`._math._bce_f32`). ``p``, ``n``
    and ``lo`` are unsigned (see _block_bounds), offsets rather than slices (each slice
    updated the caller's array's reference count atomically, several per run of 256
    values, until the helpers were compiled without reference counting).

    Two loops: exp(-|x|) first, parked in ``z`` (a stack scratch, _tile_scratch: a heap
    scratch passed in made both loops check for overlap, and in the process that compiled
    the kernel the float64 exps ran 1.5x slower on AVX-512 code), then the rest. As
    one loop calling exp and log per element, the float64 case was too large for LLVM to
    inline and stayed scalar (measured, one row of 1000 in L1: 46 -> 8 ns per element;
    float32, one loop: 1.16-1.29x slower, kernel_findings.md). The exps go in blocks of
    LANES values, each block first asking for the lines of x and y BCE_AHEAD bytes on (see
    _config.BCE_AHEAD; past the end, harmless): spread out this way, not as one burst per
    run, the requests let the loop's arithmetic overlap the memory it waits for."""
    z = _tile_scratch(x)
    per_line = _per_line(x)
    ahead = np.uint64(BCE_AHEAD // 64 * per_line)
    k = _exp_consts(x)
    n_blocks = n // np.uint64(LANES)
    for b in range(n_blocks):
        q = b * np.uint64(LANES)
        for i in range(LANES // per_line):
            at = p + q + ahead + np.uint64(i * per_line)
            _prefetch(x, at)
            _prefetch(y, at)
        for j in range(q, q + np.uint64(LANES)):
            v = x[p + j]
            z[j] = _exp_nonpos(-v if v > 0 else v, k)
    for j in range(n_blocks * np.uint64(LANES), n):
        v = x[p + j]
        z[j] = _exp_nonpos(-v if v > 0 else v, k)
    # One loop per case: with `if want_grad` inside, LLVM vectorised the gradient's store
    # as a masked store, which AMD CPUs run in microcode on AVX2 code (see _tile_max;
    # pos_weight cases 0.79-0.95x the time, same bits:
    # results/ab_numba_bce_split_grad_avx2code_zen4.json).
    if want_grad:
        for j in range(n):
            loss, grad = _bce(x[p + j], y[p + j], _at(weight, j), _at(pos_weight, j),
                              _at(grad_scale, j), z[j])
            loss_out[lo + j] = loss
            g[p + j] = grad
    else:
        for j in range(n):
            loss_out[lo + j] = _bce(x[p + j], y[p + j], _at(weight, j), _at(pos_weight, j),
                                    _at(grad_scale, j), z[j])[0]


@helper
def _bce_item(x, y, weight, pos_weight, grad_scale, n_cols, k, loss_out, grad_out, sums,
              w, pw, gs, buf, acc):
    """Positions [k * B, (k + 1) * B) of the flat row-major stream, B = REDUCE_BLOCK, in
    runs of at most TILE values within a row (see _bce_blocks)."""
    want_grad = grad_out.shape[0] != 0
    # A broadcast scalar (strides (0, 0)) fills the whole scratch once per item; the
    # other arguments are copied run by run. When all of them are broadcast (the
    # defaults), the runs take them as scalars, as the Cython backend's cec_bce_row_bcast:
    # no float64 arguments loaded and converted per element (same values, same bits).
    scalar_w = weight.strides[0] == 0 and weight.strides[1] == 0
    scalar_pw = pos_weight.strides[0] == 0 and pos_weight.strides[1] == 0
    scalar_gs = grad_scale.strides[0] == 0 and grad_scale.strides[1] == 0
    scalars = scalar_w and scalar_pw and (scalar_gs or not want_grad)
    w0, pw0 = weight[0, 0], pos_weight[0, 0]
    # No weights at all (the default 'mean' or 'sum'): the weights go as None, constants
    # 1 that LLVM folds out of the products, as cec_bce_sums_bcast does (same bits; Zen 4,
    # AVX-512 and AVX2 code: float32 0.91-0.93x the time, float64 0.95-0.99x;
    # results/ab_numba_bce_unweighted_*zen4.json, ab_numba_bce_f64_unweighted_*zen4.json).
    unweighted = scalars and w0 == 1.0 and pw0 == 1.0
    gs0 = grad_scale[0, 0] if want_grad else 0.0
    if scalar_w:
        w[:] = w0
    if scalar_pw:
        pw[:] = pw0
    if want_grad and scalar_gs:
        gs[:] = gs0
    zero = np.uint64(0)
    p = np.uint64(k * REDUCE_BLOCK)
    end = np.uint64(min(x.shape[0], k * REDUCE_BLOCK + REDUCE_BLOCK))
    cols = np.uint64(n_cols)
    while p < end:
        i = p // cols
        j0 = p - i * cols
        width = min(np.uint64(TILE), cols - j0, end - p)
        if not scalar_w:
            _fill_row_run(w, weight, i, j0, width)
        if not scalar_pw:
            _fill_row_run(pw, pos_weight, i, j0, width)
        if want_grad and not scalar_gs:
            _fill_row_run(gs, grad_scale, i, j0, width)
        # The summed losses stay in x's type until _add_lanes widens them (the same
        # values: a float32 loss is a float32 product), so that LLVM vectorises the
        # float32 loop at 16 lanes, not at the 8 of a float64 store.
        if sums and unweighted:
            _bce_row(x, y, p, width, None, None, gs0, buf, zero, grad_out, want_grad)
        elif sums and scalars:
            _bce_row(x, y, p, width, w0, pw0, gs0, buf, zero, grad_out, want_grad)
        elif sums:
            _bce_row(x, y, p, width, w, pw, gs, buf, zero, grad_out, want_grad)
        elif scalars:
            _bce_row(x, y, p, width, w0, pw0, gs0, loss_out, p, grad_out, want_grad)
        else:
            _bce_row(x, y, p, width, w, pw, gs, loss_out, p, grad_out, want_grad)
        if sums:
            _add_lanes(acc, buf, width)
        p += width
    if sums:
        loss_out[k] = _sum_lanes(acc)


def _bce_blocks(x, y, weight, pos_weight, grad_scale, n_cols, loss_out, grad_out, sums):
    """binary cross-entropy over the flat (R * n_cols) stream ``x``, ``y`` (weights
    (R, n_cols), any strides), in items of REDUCE_BLOCK positions, as the Cython
    backend: items of positions rather than rows, so that a 1-D input spreads over the
    threads too. ``loss_out`` takes the per-position losses, or with ``sums`` one sum per
    item (the run's losses stay in a TILE scratch, summed in LANES partial sums in a
    fixed order). A broadcast scalar is the same for every run: filled once per item
    (float32 4096 x 1000, earlier row-by-row kernel: 64-71 ms reading the views, 26-35
    ms copying them)."""
    n_items = (x.shape[0] + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    for k in prange(n_items):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        w = np.empty(TILE)
        pw = np.empty(TILE)
        gs = np.empty(TILE)
        buf = np.empty(TILE, x.dtype)
        acc = np.zeros(LANES)
        _bce_item(x, y, weight, pos_weight, grad_scale, n_cols, k, loss_out, grad_out, sums,
                  w, pw, gs, buf, acc)
        _ftz_end(csr)


def _log_loss_pass(proba, target, lo, hi, rtol, n_blocks, stats, picked):
    """scikit-learn's checks of ``proba`` and each row's clipped true-class probability.

    ``stats[b] = (values outside [0, 1], rows whose float64 sum is finite and not within
    1e-8 + rtol of 1, rows whose sum is not finite)`` for each of ``n_blocks`` blocks of
    rows; ``picked[i] = clip(proba[i, target[i]], lo, hi)`` when ``target`` is not empty.
    Counting out-of-range values (in a float, like the sum) instead of tracking a
    NaN-aware max and min lets LLVM vectorise the loop; counts are exact, so the result
    does not depend on the blocks or threads.
    """
    n, n_classes = proba.shape
    pick = target.shape[0] > 0
    block = (n + n_blocks - 1) // n_blocks
    for b in prange(n_blocks):
        csr = _ftz_begin()  # subnormal results are 0 (see _ftz_begin)
        outside = 0.0
        bad = 0
        non_finite = 0
        for i in range(b * block, min(n, (b + 1) * block)):
            s = 0.0
            row_outside = 0.0
            for c in range(n_classes):
                v = proba[i, c]
                s += v
                row_outside += (v > 1.0) + (v < 0.0)
            outside += row_outside
            if not abs(s) < np.inf:  # NaN or inf somewhere in the row
                non_finite += 1
            elif abs(s - 1.0) > 1e-8 + rtol:
                bad += 1
            if pick:
                picked[i] = min(max(proba[i, target[i]], lo), hi)
        stats[b, 0] = outside
        stats[b, 1] = bad
        stats[b, 2] = non_finite
        _ftz_end(csr)


KERNELS = {
    name: jit(fn)
    for name, fn in {
        "index_rows": _index_rows, "index_tiles": _index_tiles, "scores_tiles": _scores_tiles,
        "index_tiles_in_place": _index_tiles_in_place, "index_sample_rows": _index_sample_rows,
        "proba_rows": _proba_rows, "proba_tiles": _proba_tiles,
        "softmax_rows": _softmax_rows, "softmax_tiles": _softmax_tiles,
        "logsumexp_rows": _logsumexp_rows, "logsumexp_tiles": _logsumexp_tiles,
        "bce_blocks": _bce_blocks, "log_loss_pass": _log_loss_pass, "scores_rows": _scores_rows,
        "report_sums": _report_sums, "scores_report": _scores_report,
    }.items()
}
