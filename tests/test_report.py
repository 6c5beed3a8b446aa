"""Evaluation metrics from the loss pass: classification_report_from_logits and cecore score.

Oracles: a naive NumPy float64 reference written here (softmax, argmax, ranks, entropy,
Brier), an ECE binned as torchmetrics' ``CalibrationError(norm='l1')`` bins
(``torch.bucketize(conf, edges, right=True) - 1``, computed with torch, the edges
``k / n_bins`` in float64 as documented), and cecore.cross_entropy for the loss (bit for
bit).
"""

import json

import numpy as np
import pytest
import torch

import cecore
from cecore import batch
from cecore.cli import main
from cecore.metrics import classification_report_from_logits


def reference(x, t, top_k=5, n_bins=15, ignore_index=-100):
    """Naive float64 metrics of class-index targets."""
    x = np.asarray(x, np.float64)
    keep = t != ignore_index
    x, t = x[keep], t[keep]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        z = x - x.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        entropy = -np.where(p > 0, p * np.where(p > 0, np.log(p), 0), 0).sum(axis=1)
    onehot = np.eye(x.shape[1])[t]
    brier = ((p - onehot) ** 2).sum(axis=1)
    xt = x[np.arange(len(t)), t]
    undefined = np.isnan(p).any(axis=1)
    correct = (np.argmax(x, axis=1) == t) & ~undefined
    rank = np.where(undefined, x.shape[1], (x > xt[:, None]).sum(axis=1))
    conf = torch.tensor(p.max(axis=1))
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    bins = torch.bucketize(conf, edges, right=True) - 1
    ece = 0.0
    for b in range(n_bins + 1):
        sel = (bins == b).numpy()
        if sel.any():
            ece += abs(correct[sel].mean() - p.max(axis=1)[sel].mean()) * sel.mean()
    return {"accuracy": correct.mean(), "top_k_accuracy": (rank < top_k).mean(),
            "mean_entropy": entropy.mean(), "brier": brier.mean(), "ece": ece}


def _check(report, expected, rtol=1e-9,
           keys=("accuracy", "top_k_accuracy", "mean_entropy", "brier", "ece")):
    for key in keys:
        np.testing.assert_allclose(report[key], expected[key], rtol=rtol, atol=rtol * 1e-3,
                                   err_msg=key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [10, 1000])
def test_scores_kernel_contract(backend, rng, dtype, n_classes):
    """The contract's softmax_ce_scores itself: per row the loss (softmax_ce_index's, bit
    for bit, on one thread and on two), the log-sum-exp, entropy, max p, Brier score and
    rank against a float64 reference, and the same bits for any n_threads."""
    from scipy.special import logsumexp

    from cecore._backends import get_backend
    n = 400
    x = (3 * rng.standard_normal((n, n_classes))).astype(dtype)
    t = rng.integers(0, n_classes, n)
    x[1, 3] = np.inf
    x[2] = -np.inf
    x[3, 5] = np.nan
    t[4] = -100
    x[5, :4] = x[5].max() + 1  # ties at the max
    w = rng.random(n_classes) + 0.5
    kernels = get_backend(backend)
    runs = []
    for n_threads in (1, 2):
        index_loss = np.empty((n, 1))
        kernels.softmax_ce_index(x.reshape(n, n_classes, 1), t.reshape(n, 1), w, -100, 0.1,
                                 np.broadcast_to(0.0, (n, 1)), index_loss, None, n_threads)
        loss, stats, rank = np.empty(n), np.empty((n, 4)), np.empty((n, 2), np.int64)
        kernels.softmax_ce_scores(x, t, w, -100, 0.1, loss, stats, rank, n_threads)
        # (review) Numba's one-thread copy gave 1-ulp different losses with smoothing
        assert loss.tobytes() == index_loss.tobytes(), n_threads
        runs.append((loss.tobytes(), stats.tobytes(), rank.tobytes()))
    assert runs[0] == runs[1]

    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        lse = logsumexp(x64, axis=1)
    assert lse[1] == np.inf and lse[2] == -np.inf and np.isnan(lse[3])
    np.testing.assert_array_equal(stats[[1, 2, 3, 4], 3], [np.inf, -np.inf, np.nan, np.nan])
    ok = np.ones(n, bool)
    ok[1:5] = False
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(stats[ok, 3], lse[ok], rtol=tol)
    p = np.exp(x64[ok] - lse[ok, None])
    onehot = np.eye(n_classes)[t[ok]]
    np.testing.assert_allclose(stats[ok, 0], -(p * np.log(p)).sum(axis=1), rtol=100 * tol)
    np.testing.assert_allclose(stats[ok, 1], p.max(axis=1), rtol=tol)
    np.testing.assert_allclose(stats[ok, 2], ((p - onehot) ** 2).sum(axis=1), rtol=100 * tol)
    xt = x64[ok, t[ok]]
    np.testing.assert_array_equal(rank[ok, 0], (x64[ok] > xt[:, None]).sum(axis=1))
    np.testing.assert_array_equal(rank[ok, 1], np.argmax(x64[ok], axis=1) == t[ok])
    assert np.isnan(stats[[1, 3, 4], :3]).all()
    np.testing.assert_array_equal(rank[[1, 3, 4]], [[n_classes, 0], [n_classes, 0], [-1, 0]])


@pytest.mark.parametrize("n_classes", [2, 40])  # the few-classes tiles and the rows
def test_brier_of_squares_below_the_normal_range(backend, n_classes):
    # A confident float32 row's Brier score is made of squares below float32's normal
    # range (e**2 < 1.2e-38 from gaps of 43.7), which the kernels' flush-to-zero would make
    # 0: summed scaled (SQ), [0, -50] gives 2 e**2 = 3.7e-44, not half of it.
    from cecore._backends import get_backend
    x = np.full((3, n_classes), -200.0, np.float32)
    x[:, 0] = 0.0
    x[:, 1] = [-50.0, -60.0, -80.0]
    t = np.zeros(3, np.int64)
    loss, stats, rank = np.empty(3), np.empty((3, 4)), np.empty((3, 2), np.int64)
    get_backend(backend).softmax_ce_scores(x, t, np.ones(n_classes), -100, 0.0, loss, stats,
                                           rank, 1)
    xd = x.astype(np.float64)
    p = np.exp(xd - xd.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    brier = ((p - np.eye(n_classes)[t]) ** 2).sum(axis=1)
    np.testing.assert_allclose(stats[:, 2], brier, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [7, 300])
@pytest.mark.parametrize("scale", [3, 12])
def test_metrics_match_a_numpy_reference(backend, rng, dtype, n_classes, scale):
    # (scale 12: most exps' squares below float32's normal range, summed scaled by 2**120)
    x = (scale * rng.standard_normal((2000, n_classes))).astype(dtype)
    t = rng.integers(0, n_classes, 2000)
    t[rng.random(2000) < 0.1] = -100
    report = classification_report_from_logits(x, t, top_k=3, backend=backend)
    # float32 logits have their exps computed in float32 (the reference: in float64)
    _check(report, reference(x, t, top_k=3), rtol=1e-6 if dtype == np.float32 else 1e-9)
    assert report["loss"] == float(cecore.cross_entropy(x, t, backend=backend))
    assert report["rows"] == 2000 and report["rows_scored"] == int((t != -100).sum())


@pytest.mark.parametrize("n_classes, calls", [(4, "one"), (4, "several"), (40, "-")])
def test_rows_beyond_one_block_of_per_row_metrics(backend, rng, monkeypatch, n_classes,
                                                  calls):
    # Rows of more than SMALL_C classes go through per-row metrics REPORT_ROWS at a time,
    # in buffers reused from block to block; rows of fewer through softmax_ce_report, in
    # one call with 15 bins, or REPORT_ROWS rows per call with as many as MAX_BINS:
    # ignored rows, all-tied rows and classes of probability 0 on both sides of each
    # block edge, and a short last block.
    from cecore._config import REDUCE_BLOCK
    from cecore.metrics import _report
    rows = 2 * REDUCE_BLOCK
    monkeypatch.setattr(_report, "REPORT_ROWS", rows)
    if calls == "several":
        monkeypatch.setattr(_report, "MAX_BINS", 15)
    n = 2 * rows + 5
    x = rng.standard_normal((n, n_classes))
    t = rng.integers(0, n_classes, n)
    for edge in (rows, 2 * rows):
        t[edge - 2:edge + 1] = -100
        x[edge + 1, :2] = -np.inf
        x[edge - 3] = 0.5
    report = classification_report_from_logits(x, t, top_k=2, backend=backend)
    _check(report, reference(x, t, top_k=2))
    assert report["loss"] == float(cecore.cross_entropy(x, t, backend=backend))
    assert report["rows_scored"] == n - 6


def test_a_report_in_the_middle_of_a_stream_changes_nothing(backend, rng):
    # report() and partials() add the rows short of a whole block as a last block of
    # their own, in a copy: rows added after them still complete that block.
    from cecore._backends import get_backend
    from cecore.metrics._report import ReportSums, score_rows
    x = rng.standard_normal((30000, 5))
    t = rng.integers(0, 5, 30000)
    t[::7] = -100
    expected = classification_report_from_logits(x, t, backend=backend)
    sums, w = ReportSums(False, backend=backend), np.ones(5)
    for a, b in ((0, 5000), (5000, 5001), (5001, 20000), (20000, 30000)):
        score_rows(get_backend(backend), x[a:b], t[a:b], False, w, -100, 0.0, 2, sums)
        sums.report(x.dtype)
        sums.partials()
    report = sums.report(x.dtype)
    report["loss"] = report.pop("mean_loss")
    assert {k: report[k] for k in expected} == expected


@pytest.mark.parametrize("n_bins", [15, 10_000])
def test_per_row_metrics_memory_does_not_grow_with_the_rows(backend, rng, n_bins):
    # 2e6 rows of ten float32 classes took 228 MB beside 80 MB of logits when every
    # row's metrics were made at once; now the targets' int64 copy and the losses, 16
    # bytes a row, and one block's metrics. The block sums of 1e4 bins (160 KB per
    # REDUCE_BLOCK rows) are made REPORT_ROWS rows at a time too: for all the rows at
    # once they took 20 bytes a row.
    import tracemalloc

    from cecore._config import REPORT_ROWS
    x = rng.standard_normal((8 * REPORT_ROWS, 10))
    t = rng.integers(0, 10, len(x))
    classification_report_from_logits(x[:10], t[:10], backend=backend)  # compiled, loaded
    tracemalloc.start()
    try:
        classification_report_from_logits(x, t, n_bins=n_bins, backend=backend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 16 bytes a row (int64 targets, float64 losses) and 40 MB for a block's arrays and
    # the binned sums (52 MB in all at 1e4 bins; 80 MB with the block sums of all rows)
    assert peak < 16 * len(x) + 40e6, (peak, x.nbytes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_counts_every_larger_logit_across_blocks(backend, rng, dtype):
    # 1000 classes span several of the kernels' summation blocks, whose rank counts are
    # added up; logits on a coarse grid tie often, and ties do not count as larger.
    x = (np.round(4 * rng.standard_normal((400, 1000))) / 4).astype(dtype)
    t = rng.integers(0, 1000, 400)
    x[:5, :] = 0.25  # all tied: rank 0, top-1 only where the target is class 0
    t[0] = 0
    rows = np.arange(400)
    rank = (x > x[rows, t][:, None]).sum(axis=1)
    for k in (1, 2, 50, 400, 999):
        report = classification_report_from_logits(x, t, top_k=k, backend=backend)
        assert report["top_k_accuracy"] == np.mean(rank < k)
    report = classification_report_from_logits(x, t, backend=backend)
    assert report["accuracy"] == np.mean(np.argmax(x, axis=1) == t)


def test_adversarial_rows(backend):
    c = 6
    x = np.array([
        [1.0, 3.0, 3.0, 0.0, 0.0, 0.0],            # tie at the max: argmax is class 1
        [1.0, 3.0, 3.0, 0.0, 0.0, 0.0],            # ... so class 2 is not top-1, rank 0
        [2.0] * c,                                 # all equal
        [-np.inf, 0.0, -np.inf, 1.0, -np.inf, 2.0],  # -inf logits
        [0.5, -np.inf, 1.0, 1.0, 0.0, 0.0],        # target at -inf
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],            # ignored
        [0.0, 1.0, 2.0, 3.0, 4.0, 50.0],           # confident
    ])
    t = np.array([1, 2, 4, 5, 1, -100, 5])
    report = classification_report_from_logits(x, t, top_k=2, backend=backend)
    _check(report, reference(x, t, top_k=2))
    # a NaN row counts as wrong and makes the means it enters NaN, as it does the loss
    x_nan = np.vstack([x, [np.nan, 0, 0, 0, 0, 0]])
    t_nan = np.append(t, 0)
    r = classification_report_from_logits(x_nan, t_nan, top_k=2, backend=backend)
    assert np.isnan(r["loss"]) and np.isnan(r["mean_entropy"]) and np.isnan(r["brier"])
    assert r["accuracy"] == reference(x, t)["accuracy"] * 6 / 7  # the NaN row is wrong


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_and_huge_logits_in_whole_vectors(backend, rng, dtype):
    # The entropy term e (x - m) of a -inf logit is 0, not 0 * -inf = NaN, also where the
    # kernels take the logits a vector at a time (1000 classes, not only a short row's
    # tail); near the dtype's largest values m - 1e30 rounds to m, which the kernels
    # clamp the logits at.
    x = (3 * rng.standard_normal((300, 1000))).astype(dtype)
    x[rng.random(x.shape) < 0.3] = -np.inf
    t = rng.integers(0, 1000, 300)
    x[np.arange(300), t] = rng.standard_normal(300)
    big = np.finfo(dtype).max / 4
    x[:40] += dtype(big)
    x[40:80] -= dtype(big)
    report = classification_report_from_logits(x, t, top_k=3, backend=backend)
    _check(report, reference(x, t, top_k=3), rtol=1e-6 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confidences_exactly_on_bin_edges(backend, dtype):
    # k tied classes and the rest -inf: a confidence of exactly 1/k. 1/5 = 3/15 is an edge
    # that torch's float32 linspace rounds up (0.2000000179): with float64 edges it opens
    # bin 3, as k / n_bins <= conf says, and does not join the 1/7 rows of bin 2.
    rows, t = [], []
    for k, targets in ((7, [6, 6, 6, 6]), (5, [0, 6, 0, 6]), (3, [0, 6, 0, 6]), (2, [0, 6, 0, 6])):
        row = np.full(7, -np.inf)
        row[:k] = 1.5
        rows += [row] * 4
        t += targets  # the first of the tied classes is right, the others wrong
    x, t = np.array(rows, dtype), np.array(t)
    report = classification_report_from_logits(x, t, backend=backend)
    _check(report, reference(x, t), rtol=1e-12)
    assert report["ece"] == pytest.approx(
        np.mean([abs(0 - 1 / 7), abs(0.5 - 1 / 5), abs(0.5 - 1 / 3), abs(0.5 - 1 / 2)]),
        rel=1e-12)


def _bin_counts(backend, conf, n_bins):
    """How many of the confidences ``conf`` the kernels' report_sums puts in each bin (as
    rows of top-1 hits), and their sum per bin."""
    from cecore._backends import get_backend
    from cecore._config import REDUCE_BLOCK
    stats = np.zeros((len(conf), 4))
    stats[:, 1] = conf
    rank = np.tile(np.array([0, 1], np.int64), (len(conf), 1))
    n_blocks = -(-len(conf) // REDUCE_BLOCK)
    sums = np.empty((n_blocks, 3 + n_bins))
    counts = np.empty((n_blocks, 4 + n_bins), np.int64)
    get_backend(backend).report_sums(stats, rank, 1, np.arange(n_bins + 1) / n_bins, sums,
                                     counts, 1)
    return counts[:, 3:].sum(axis=0), sums[:, 2:].sum(axis=0)


def test_bin_edges_are_k_over_n_bins(backend):
    # k / n_bins <= conf < (k + 1) / n_bins, as documented: a confidence of exactly
    # k / n_bins opens bin k, for every bin count (np.linspace's edges were an ulp above
    # k / n_bins for some k, 3/10 for one, and put such a confidence in bin k - 1).
    for n_bins in range(1, 200):
        k = np.arange(n_bins + 1)
        one_each = np.ones(n_bins + 1, np.int64)
        np.testing.assert_array_equal(_bin_counts(backend, k / n_bins, n_bins)[0], one_each,
                                      str(n_bins))
        below = np.nextafter(k[1:] / n_bins, 0)
        np.testing.assert_array_equal(_bin_counts(backend, below, n_bins)[0][:-1],
                                      one_each[:-1], str(n_bins))
        above = np.nextafter(k[:-1] / n_bins, 1)
        np.testing.assert_array_equal(_bin_counts(backend, above, n_bins)[0][:-1],
                                      one_each[:-1], str(n_bins))
    # anywhere in [0, 1], for bin counts up to the cap: searchsorted over those edges
    rng = np.random.default_rng(0)
    for n_bins in (1, 3, 15, 333, 9999, 10000):
        conf = np.concatenate([rng.random(100000), rng.random(1000) ** 20, [0.0, 1.0]])
        edges = np.arange(n_bins + 1) / n_bins
        expected = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins)
        counts, sums = _bin_counts(backend, conf, n_bins)
        np.testing.assert_array_equal(counts, np.bincount(expected, minlength=n_bins + 1))
        np.testing.assert_allclose(sums, np.bincount(expected, conf, minlength=n_bins + 1),
                                   rtol=1e-12)


def test_report_sums_kernel_contract(backend, rng):
    # report_sums against a NumPy reference of its definition, block by block: ignored
    # rows only counted, undefined rows (NaN max p) adding their NaN entropy and Brier
    # and nothing else, a max p outside [0, 1] taken as undefined (a bin of 1e12 * n_bins
    # wrote far out of bounds), hits per bin, entropy and Brier within an ulp of the
    # exact sum (math.fsum) and an infinite Brier score giving an infinite sum, not NaN;
    # the same bits for 1 and 2 threads.
    import math

    from cecore._backends import get_backend
    from cecore._config import REDUCE_BLOCK
    n, n_bins, top_k = 3 * REDUCE_BLOCK + 100, 7, 3
    stats = rng.random((n, 4)) * 10.0 ** rng.integers(-8, 3, (n, 1))
    stats[:, 1] = rng.random(n)
    rank = np.stack([rng.integers(-1, 6, n), rng.integers(0, 2, n)], axis=1)
    undefined = rng.random(n) < 0.01
    undefined[REDUCE_BLOCK + 5:] = False  # the later blocks' sums stay finite
    stats[undefined, :3] = np.nan
    rank[undefined] = [6, 0]
    outside = np.zeros(n, bool)
    outside[REDUCE_BLOCK + 10:REDUCE_BLOCK + 14] = True
    stats[outside, 1] = [1.5, -0.5, 1e12, np.inf]
    rank[outside] = [0, 1]
    infinite = 2 * REDUCE_BLOCK + 7
    rank[infinite, 0] = 0
    stats[infinite, 2] = np.inf
    kernels = get_backend(backend)
    n_blocks, edges = 4, np.arange(n_bins + 1) / n_bins
    out = {}
    for threads in (1, 2):
        sums = np.full((n_blocks, 3 + n_bins), -1.0)
        counts = np.full((n_blocks, 4 + n_bins), -1, np.int64)
        kernels.report_sums(stats, rank, top_k, edges, sums, counts, threads)
        out[threads] = sums, counts
    np.testing.assert_array_equal(out[1][0], out[2][0])
    np.testing.assert_array_equal(out[1][1], out[2][1])
    sums, counts = out[2]
    for b in range(n_blocks):
        s = slice(b * REDUCE_BLOCK, min(n, (b + 1) * REDUCE_BLOCK))
        st, rk = stats[s], rank[s]
        kept = rk[:, 0] >= 0
        hit = kept & ~undefined[s] & ~outside[s]
        bins = np.clip(np.searchsorted(edges, st[:, 1], "right") - 1, 0, n_bins)
        top1 = hit & (rk[:, 1] == 1)
        if b in (1, 3):
            for k, col in ((0, 0), (1, 2)):
                exact = math.fsum(st[kept, col].tolist())
                assert abs(sums[b, k] - exact) <= np.spacing(exact), (b, k)
        np.testing.assert_allclose(sums[b, 2:], np.bincount(bins[hit], st[hit, 1],
                                                            minlength=n_bins + 1), rtol=1e-12)
        np.testing.assert_array_equal(counts[b], [
            np.sum(~kept), top1.sum(), (hit & (rk[:, 0] < top_k)).sum(),
            *np.bincount(bins[top1], minlength=n_bins + 1)])
    assert np.isnan(sums[0, :2]).all()
    assert np.isfinite(sums[2, 0]) and sums[2, 1] == np.inf
    bad = np.empty((n_blocks - 1, 3 + n_bins))
    with pytest.raises(ValueError, match="report_sums"):
        kernels.report_sums(stats, rank, top_k, edges, bad, counts, 1)


def test_report_sums_are_the_same_bits_in_both_backends(rng):
    # The contract fixes the order of every addition (entropy and Brier in LANES lanes,
    # then the lanes in order; the bins in row order), so both backends give the same
    # bits. Compensated sums of values of one sign come out the same in almost any
    # order, so each full block here holds +1e16 first and -1e16 last around small
    # values: the compensation's own roundings then show in the result (row-order sums
    # differ from the lanes' in most blocks). Also ignored rows, and a NaN row in the
    # last block, shorter than a lane cycle.
    from cecore._backends import get_backend
    from cecore._config import REDUCE_BLOCK
    n, n_bins = 6 * REDUCE_BLOCK + 5, 15
    stats = rng.random((n, 4)) * 3
    rank = np.stack([rng.integers(-1, 12, n), rng.integers(0, 2, n)], axis=1)
    for b in range(6):
        stats[b * REDUCE_BLOCK, [0, 2]] = 1e16
        stats[(b + 1) * REDUCE_BLOCK - 1, [0, 2]] = -1e16
        rank[[b * REDUCE_BLOCK, (b + 1) * REDUCE_BLOCK - 1], 0] = 0
    stats[-3, :3] = np.nan
    rank[-3] = [10, 0]
    out = []
    for name in ("numba", "cython"):
        sums, counts = np.empty((7, 3 + n_bins)), np.empty((7, 4 + n_bins), np.int64)
        get_backend(name).report_sums(stats, rank, 5, np.arange(n_bins + 1) / n_bins, sums,
                                      counts, 2)
        out.append((sums.tobytes(), counts.tobytes()))
    assert out[0] == out[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [1, 10, 33, 300])
def test_report_kernel_is_scores_then_report_sums(backend, rng, dtype, n_classes):
    # softmax_ce_report must give what softmax_ce_scores followed by report_sums of its
    # per-row outputs gives, bit for bit: the losses and every block's sums and counts,
    # for the few-classes tiles and the row path, a last block of one row, ignored rows,
    # NaN, +inf, all -inf and tied rows, label smoothing, 1 and 2 threads.
    from cecore._backends import get_backend
    from cecore._config import REDUCE_BLOCK
    kernels = get_backend(backend)
    n, n_bins, top_k = 2 * REDUCE_BLOCK + 1, 9, 2
    x = (rng.standard_normal((n, n_classes)) * 4).astype(dtype)
    x[5] = np.nan
    x[6, 0] = np.inf
    x[7] = -np.inf
    x[8] = 1.5
    t = rng.integers(0, n_classes, n)
    t[::5] = -100
    t[-1] = 0
    w, edges = rng.uniform(0.5, 2.0, n_classes), np.arange(n_bins + 1) / n_bins
    for eps in (0.0, 0.2):
        loss = np.empty(n)
        stats, rank = np.empty((n, 4)), np.empty((n, 2), np.int64)
        kernels.softmax_ce_scores(x, t, w, -100, eps, loss, stats, rank, 2)
        sums, counts = np.empty((3, 3 + n_bins)), np.empty((3, 4 + n_bins), np.int64)
        kernels.report_sums(stats, rank, top_k, edges, sums, counts, 2)
        for threads in (1, 2):
            loss2 = np.full(n, -1.0)
            sums2 = np.full((3, 3 + n_bins), -1.0)
            counts2 = np.full((3, 4 + n_bins), -1, np.int64)
            kernels.softmax_ce_report(x, t, w, -100, eps, top_k, edges, loss2, sums2,
                                      counts2, threads)
            assert loss2.tobytes() == loss.tobytes()
            assert sums2.tobytes() == sums.tobytes()
            np.testing.assert_array_equal(counts2, counts)
    with pytest.raises(ValueError, match="softmax_ce_report"):
        kernels.softmax_ce_report(x, t, w, -100, 0.0, top_k, edges, loss, sums[:2], counts, 1)
    with pytest.raises(ValueError, match="softmax_ce_report"):
        kernels.softmax_ce_report(x[:, :0], t, w, -100, 0.0, top_k, edges, loss, sums,
                                  counts, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_confidence_on_an_edge_of_another_bin_count(backend, dtype):
    # Three tied classes give a confidence of 1/3, the edge 11/33 of 33 bins, which
    # np.linspace put an ulp higher; a right row at 1/3 and a wrong one at 0.35 share
    # bin 11, as the reference bins them by the documented edges.
    tied = np.array([0.5, 0.5, 0.5])
    other = np.log([0.35, 0.33, 0.32])
    x, t = np.array([tied, other], dtype), np.array([0, 1])
    report = classification_report_from_logits(x, t, n_bins=33, backend=backend)
    _check(report, reference(x, t, n_bins=33), rtol=1e-6)


def test_undefined_rows_miss_the_top_k_even_when_k_exceeds_the_classes(backend):
    # NaN, +inf and all -inf rows have no prediction: wrong for every k (the kernels give
    # them rank C, which a top_k above C counted as a hit).
    x = np.array([[np.nan, 0, 0], [1, 2, 3], [np.inf, 0, 0], [-np.inf] * 3])
    t = np.array([0, 2, 1, 0])
    for k in (1, 3, 4, 100):
        r = classification_report_from_logits(x, t, top_k=k, backend=backend)
        assert r["top_k_accuracy"] == 0.25, k
        assert batch.score(x, t, top_k=k, backend=backend).top_k_accuracy == 0.25


def test_zero_classes(backend):
    """No classes: every index target must be ignored; nothing is scored and the loss is
    cross_entropy's NaN (the kernels write nothing there: it was uninitialised memory)."""
    x = np.zeros((3, 0))
    for target in (np.full(3, -100), np.zeros((3, 0))):
        expected = cecore.cross_entropy(x, target, backend=backend)
        for _ in range(3):
            r = classification_report_from_logits(x, target, backend=backend)
            assert np.isnan(r["loss"]) and np.isnan(expected)
            assert r["rows"] == 3
        if target.ndim == 1:
            assert r["rows_scored"] == 0 and np.isnan(r["accuracy"])
            assert np.isnan(r["top_k_accuracy"])


def test_probability_targets_get_loss_entropy_and_brier_only(backend, rng):
    x = rng.standard_normal((500, 8))
    q = rng.dirichlet(np.ones(8), 500)
    r = classification_report_from_logits(x, q, backend=backend)
    assert r["accuracy"] is None and r["top_k_accuracy"] is None and r["ece"] is None
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(r["mean_entropy"], (-(p * np.log(p)).sum(1)).mean(), rtol=1e-9)
    np.testing.assert_allclose(r["brier"], ((p - q) ** 2).sum(1).mean(), rtol=1e-9)
    assert r["loss"] == float(cecore.cross_entropy(x, q, backend=backend))


@pytest.mark.parametrize("bad", [[np.nan, 0.0], [-np.inf, -np.inf], [np.inf, 0.0]])
def test_probability_targets_undefined_rows_make_entropy_nan(backend, tmp_path, bad):
    # Entropy took 0 log 0 = 0 by testing p > 0, which a NaN probability fails too: the
    # row counted as entropy 0 and the mean came out finite, while loss and Brier were NaN.
    x = np.array([bad, [1.0, 0.0]])
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    r = classification_report_from_logits(x, q, backend=backend)
    assert np.isnan(r["mean_entropy"]) and np.isnan(r["brier"]) and np.isnan(r["loss"])
    assert np.isnan(batch.score(x, q, backend=backend).mean_entropy)


@pytest.mark.parametrize("dtype, gap", [(np.float32, 12.0), (np.float32, 16.0), (np.float64, 30.0)])
def test_brier_of_confident_rows_keeps_its_relative_accuracy(backend, dtype, gap):
    # The kernels formed sum p**2 - 2 p_t + 1, with the sum of squares in the logits' type
    # within blocks: next to p_t**2 ~ 1 the other squares rounded away, and the Brier
    # score of confident rows came out 1e-3 (Cython) to 1e-2 (Numba) off, where it is 1e-6
    # (hostile review). Reference: sum_{c != t} p_c**2 + (sum_{c != t} p_c)**2 in float64.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1000)).astype(dtype)
    t = rng.integers(0, 1000, 64)
    x[np.arange(64), t] = gap + 3
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    others = p.copy()
    others[np.arange(64), t] = 0
    expected = ((others ** 2).sum(axis=1) + others.sum(axis=1) ** 2).mean()
    r = classification_report_from_logits(x, t, backend=backend)
    # (float64, gap 33: 1 - p_t = 5e-12 is s - e_t in float64, good to about 1e-5; it was 0)
    np.testing.assert_allclose(r["brier"], expected, rtol=1e-5 if dtype == np.float32 else 1e-4)


def test_float16_perplexity_is_not_the_exp_of_a_float16_rounded_loss(backend):
    # losses of 8 to 16 are rounded to float16 steps of 0.0078: their exp was 0.4 % off
    rng = np.random.default_rng(0)
    x = (4 * rng.standard_normal((300, 8000))).astype(np.float16)
    t = rng.integers(0, 8000, 300)
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    expected = np.exp((lse - x64[np.arange(300), t]).mean())
    r = classification_report_from_logits(x, t, backend=backend)
    assert r["loss"] == float(cecore.cross_entropy(x, t, backend=backend))  # float16, as before
    np.testing.assert_allclose(r["perplexity"], expected, rtol=2e-6)
    np.testing.assert_allclose(cecore.perplexity(x, t, backend=backend), expected, rtol=2e-6)
    assert batch.score(x, t, backend=backend).perplexity == r["perplexity"]


@pytest.mark.parametrize("kwargs, error", [
    ({"top_k": 0}, ValueError), ({"top_k": "5"}, TypeError), ({"top_k": 2.0}, TypeError),
    ({"top_k": True}, TypeError), ({"n_bins": 0}, ValueError), ({"n_bins": 10001}, ValueError),
    ({"n_bins": 15.0}, TypeError)])
def test_bad_top_k_and_bins_say_what_was_expected(kwargs, error):
    # (review) a top_k or n_bins of the wrong type raised ValueError, where every other
    # argument of the wrong type raises TypeError
    name = next(iter(kwargs))
    for score in (classification_report_from_logits, batch.score):
        with pytest.raises(error, match=f"{name} must be an int"):
            score(np.zeros((2, 3)), np.zeros(2, np.int64), **kwargs)


@pytest.mark.parametrize("ignore_index", [None, "a", 1.5])
def test_bad_ignore_index_is_a_type_error_with_probability_targets(ignore_index):
    # (review) batch.score compared ignore_index >= 0 before checking it: None and "a"
    # raised Python's own TypeError, 1.5 "not supported with class-probability targets"
    x, p = np.zeros((2, 3)), np.full((2, 3), 1 / 3)
    for score in (classification_report_from_logits, batch.score, cecore.cross_entropy):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            score(x, p, ignore_index=ignore_index)


def test_streamed_in_memory_and_one_row_chunks_agree_bitwise(tmp_path, rng, backend):
    x = rng.standard_normal((20000, 12)).astype(np.float32)
    t = rng.integers(0, 12, 20000)
    t[::9] = -100
    w = rng.random(12) + 0.5
    memory = classification_report_from_logits(x, t, weight=w, backend=backend)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    keys = ("accuracy", "top_k_accuracy", "mean_entropy", "ece", "brier")
    for budget in ("64KB", "1B"):  # 1B: one row per chunk
        if budget == "1B":
            xs, ts = x[:300], t[:300]
            np.save(tmp_path / "xs.npy", xs)
            np.save(tmp_path / "ts.npy", ts)
            streamed = batch.score(str(tmp_path / "xs.npy"), str(tmp_path / "ts.npy"), weight=w,
                                   memory_budget=budget, backend=backend)
            expected = classification_report_from_logits(xs, ts, weight=w, backend=backend)
        else:
            streamed = batch.score(str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), weight=w,
                                   memory_budget=budget, backend=backend)
            expected = memory
        assert streamed.mean_loss == expected["loss"]
        for key in keys:
            assert getattr(streamed, key) == expected[key], (budget, key)


def test_cli_reports_every_metric_and_no_accuracy_is_a_no_op(tmp_path, rng, capsys):
    x = rng.standard_normal((3000, 20)).astype(np.float32)
    t = rng.integers(0, 20, 3000)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    outs = []
    for extra in ([], ["--no-accuracy"]):
        assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json",
                     "--top-k", "3", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    expected = classification_report_from_logits(x, t, top_k=3)
    for key in ("accuracy", "top_k_accuracy", "mean_entropy", "ece", "brier"):
        assert outs[0][key] == outs[1][key] == expected[key]
    # the errors named the Python parameters (top_k, n_bins), not the options typed
    for bad in (["--top-k", "0"], ["--ece-bins", "0"], ["--label-smoothing", "2"]):
        assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), *bad]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"cecore score: error: {bad[0]} must")


def test_cli_top_k_defaults_to_5(tmp_path, rng, capsys):
    x = rng.standard_normal((500, 12)).astype(np.float32)
    t = rng.integers(0, 12, 500)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top_k"] == 5
    np.testing.assert_allclose(out["top_k_accuracy"], reference(x, t, top_k=5)["top_k_accuracy"],
                               rtol=1e-12)
    assert out["top_k_accuracy"] != reference(x, t, top_k=4)["top_k_accuracy"]


def test_ece_counts_undefined_rows_at_confidence_zero(backend):
    # As documented: a row whose softmax is undefined is wrong, at confidence 0, and stays
    # in the denominator (torchmetrics would give NaN); the other means become NaN.
    x = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [np.nan, 0.0, 0.0]])
    t = np.array([0, 0, 1])
    r = classification_report_from_logits(x, t, backend=backend)
    p = np.exp(x[:2] - x[:2].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    gaps = np.abs(np.array([1.0, 0.0]) - p.max(axis=1))  # the two rows fall in other bins
    np.testing.assert_allclose(r["ece"], gaps.sum() / 3, rtol=1e-12)
    assert np.isnan(r["mean_entropy"]) and np.isnan(r["brier"])
    assert r["accuracy"] == 1 / 3


def test_one_row_chunks_of_probability_targets_agree_bitwise(tmp_path, rng, backend):
    x = rng.standard_normal((200, 9)).astype(np.float32)
    q = rng.dirichlet(np.ones(9), 200).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    memory = classification_report_from_logits(x, q, backend=backend)
    streamed = batch.score(str(tmp_path / "x.npy"), str(tmp_path / "q.npy"),
                           memory_budget="1B", backend=backend)
    assert streamed.chunk_rows == 1
    assert streamed.mean_loss == memory["loss"] == cecore.cross_entropy(x, q, backend=backend)
    for key in ("mean_entropy", "brier"):
        assert getattr(streamed, key) == memory[key], key
    for key in ("accuracy", "top_k_accuracy", "ece"):
        assert getattr(streamed, key) is None and memory[key] is None


def test_scores_kernel_refuses_outputs_of_the_wrong_shape(backend):
    # (review) Numba's adapter checked nothing: an (N, 3) stats_out of the old contract
    # was written past its end
    from cecore._backends import get_backend
    x, t = np.zeros((5, 3)), np.zeros(5, np.int64)
    for stats, rank in ((np.empty((5, 3)), np.empty((5, 2), np.int64)),
                        (np.empty((5, 4)), np.empty((4, 2), np.int64))):
        with pytest.raises(ValueError, match=r"\(N, 4\)"):
            get_backend(backend).softmax_ce_scores(x, t, np.ones(3), -100, 0.0, np.empty(5),
                                                   stats, rank, 1)


def test_probability_targets_stream_close_to_the_budget(tmp_path, rng):
    # (review) each block's entropy and Brier sums made about 35 MB of float64
    # temporaries that no budget counted: 28 MB at the peak of an 8 MB stream
    import tracemalloc
    x = rng.standard_normal((20000, 500)).astype(np.float32)
    q = rng.dirichlet(np.ones(500), 20000).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    expected = classification_report_from_logits(x, q)
    score = lambda: batch.score(str(tmp_path / "x.npy"), str(tmp_path / "q.npy"),  # noqa: E731
                                memory_budget="8MB")
    score()
    tracemalloc.start()
    try:
        result = score()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16e6, peak
    assert result.mean_entropy == expected["mean_entropy"] and result.brier == expected["brier"]
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.brier, ((p - q) ** 2).sum(axis=1).mean(), rtol=1e-5)
