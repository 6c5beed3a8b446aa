"""Both kernel backends (Numba and Cython) against each other and a naive reference.

The kernel functions are called directly, through the contract of cecore._backends:
float32/float64, plain (S == 1) and spatial (S > 1) inputs, several class counts, loss
only or loss + gradient, label smoothing, ignored targets, class weights, broadcast and
per-position grad_scale, read-only inputs, 1 and 2 threads, and non-finite logits; and
log_loss's probability pass (counts and picks) against a naive reference.
"""

import math
import zlib

import numpy as np
import pytest

from cecore import _numba as numba_kernels  # noqa: E402
# what cecore calls (cecore_ext's own names check first); a backend that does not load fails
from cecore_ext import unchecked as cython_kernels  # noqa: E402
from cecore._config import REDUCE_BLOCK  # noqa: E402

BACKENDS = {"numba": numba_kernels, "cython": cython_kernels}


def _seed(key):
    """A seed from the test's parameters, the same in every run (hash() of a str is not)."""
    return zlib.crc32(repr(key).encode())
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


# ------------------------------------------------------------- naive float64 reference
def _log_softmax_ref(x):
    """log_softmax over axis 1 of a float64 (N, C, S) array."""
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def ref_index(x, t, w, ignore_index, eps, gs):
    x = x.astype(np.float64)
    n, c, s = x.shape
    logp = _log_softmax_ref(x)
    p = np.exp(logp)
    loss = np.zeros((n, s))
    grad = np.zeros_like(x)
    for i in range(n):
        for j in range(s):
            k = t[i, j]
            if k == ignore_index:
                continue
            nll = -logp[i, :, j]
            loss[i, j] = (1 - eps) * w[k] * nll[k] + eps / c * np.sum(w * nll)
            g = p[i, :, j] * ((1 - eps) * w[k] + eps / c * w.sum()) - eps / c * w
            g[k] -= (1 - eps) * w[k]
            grad[i, :, j] = gs[i, j] * g
    return loss, grad


def ref_proba(x, q, w, eps, gs):
    x = x.astype(np.float64)
    c = x.shape[1]
    q = (1 - eps) * q.astype(np.float64) + eps / c
    logp = _log_softmax_ref(x)
    wq = w[None, :, None] * q
    loss = -(wq * logp).sum(axis=1)
    grad = np.exp(logp) * wq.sum(axis=1, keepdims=True) - wq
    return loss, gs[:, None, :] * grad


def ref_bce(x, y, w, pw, gs):
    x, y = x.astype(np.float64), y.astype(np.float64)
    lw = 1 + (pw - 1) * y
    loss = w * ((1 - y) * x + lw * np.logaddexp(0, -x))
    grad = gs * w * ((1 - y) - lw / (1 + np.exp(x)))
    return loss, grad


# ------------------------------------------------------------------------- helpers
def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _logits(rng, n, c, s, dtype):
    return (rng.standard_normal((n, c, s)) * 3).astype(dtype)


def _grad_scale(rng, kind, n, s):
    if kind == "scalar":  # a broadcast scalar: strides (0, 0)
        return np.broadcast_to(np.float64(0.37), (n, s))
    if kind == "rows":  # one value per sample, broadcast along S: strides (8, 0)
        return np.broadcast_to(rng.uniform(0.5, 2, (n, 1)), (n, s))
    return rng.uniform(0.5, 2, (n, s))  # a real (N, S) array


def _assert_close(actual, expected, dtype, what):
    rtol = RTOL[dtype]
    scale = np.max(np.abs(expected)) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0),
                               err_msg=what)


def _run_index(kernels, x, t, w, ignore_index, eps, gs, want_grad, n_threads):
    n, c, s = x.shape
    loss = np.full((n, s), np.nan)
    grad = np.full(x.shape, np.nan, dtype=x.dtype) if want_grad else None
    kernels.softmax_ce_index(x, t, w, ignore_index, eps, gs, loss, grad, n_threads)
    return loss, grad


def _run_proba(kernels, x, q, w, eps, gs, want_grad, n_threads):
    n, c, s = x.shape
    loss = np.full((n, s), np.nan)
    grad = np.full(x.shape, np.nan, dtype=x.dtype) if want_grad else None
    kernels.softmax_ce_proba(x, q, w, eps, gs, loss, grad, n_threads)
    return loss, grad


# (150, 17, 1): few classes in several blocks of SMALL_C_ROWS rows, the last one partial,
# and class counts that are not a multiple of the register transposes' 8 (or 4); (70, 26,
# 1): C % 8 == 2 past one 8 x 8 block (float32 rows take their last two classes with the
# 8 x 2 transposes).
SHAPES = [(7, 1, 1), (13, 3, 1), (33, 10, 1), (150, 17, 1), (70, 26, 1), (9, 1000, 1),
          (3, 3, 300), (2, 10, 517), (2, 1, 40), (1, 1000, 260)]
# K-dim inputs with few positions (_config.KDIM_*, which depend on S * itemsize): blocks
# of samples transposed into one tile (several blocks, the last partial, S that divides
# no block size), and positions transposed into rows of many classes ((2, 100000, 4)
# float32 and (1, 140000, 2) run each sample in two groups of positions); the float64
# cases of the larger S take the tile path.
KDIM_SHAPES = [(70, 5, 3), (300, 7, 2), (45, 128, 8), (9, 1, 5), (5, 200, 3), (4, 129, 2),
               (2, 100000, 4), (1, 140000, 2)]
DTYPES = [np.float32, np.float64]


# ----------------------------------------------------------------- class-index targets
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + KDIM_SHAPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("gs_kind", ["scalar", "rows", "full"])
def test_index_matches_reference(backend, dtype, shape, eps, gs_kind):
    kernels = BACKENDS[backend]
    rng = np.random.default_rng(_seed((shape, eps, gs_kind)))
    n, c, s = shape
    x = _logits(rng, n, c, s, dtype)
    t = rng.integers(0, c, (n, s))
    t[rng.random((n, s)) < 0.2] = -100
    w = rng.uniform(0.2, 3, c)
    gs = _grad_scale(rng, gs_kind, n, s)
    _readonly(x, t, w)
    ref_loss, ref_grad = ref_index(x, t, w, -100, eps, gs)
    results = {}
    for n_threads in (1, 2):
        for want_grad in (True, False):
            loss, grad = _run_index(kernels, x, t, w, -100, eps, gs, want_grad, n_threads)
            _assert_close(loss, ref_loss, dtype, f"loss, threads={n_threads}")
            if want_grad:
                _assert_close(grad, ref_grad, dtype, f"grad, threads={n_threads}")
            results[n_threads, want_grad] = loss, grad
    for want_grad in (True, False):  # bitwise identical for any thread count
        np.testing.assert_array_equal(results[1, want_grad][0], results[2, want_grad][0])
        np.testing.assert_array_equal(results[1, want_grad][1], results[2, want_grad][1])
    # Loss only reads the same values as loss + gradient.
    np.testing.assert_array_equal(results[1, True][0], results[1, False][0])


# ---------------------------------------------------------- class-probability targets
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + KDIM_SHAPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("gs_kind", ["scalar", "full"])
def test_proba_matches_reference(backend, dtype, shape, eps, gs_kind):
    kernels = BACKENDS[backend]
    rng = np.random.default_rng(_seed((shape, eps, gs_kind, "p")))
    n, c, s = shape
    x = _logits(rng, n, c, s, dtype)
    q = rng.random((n, c, s))
    q = (q / q.sum(axis=1, keepdims=True)).astype(dtype)
    w = rng.uniform(0.2, 3, c)
    gs = _grad_scale(rng, gs_kind, n, s)
    _readonly(x, q, w)
    ref_loss, ref_grad = ref_proba(x, q, w, eps, gs)
    results = {}
    for n_threads in (1, 2):
        for want_grad in (True, False):
            loss, grad = _run_proba(kernels, x, q, w, eps, gs, want_grad, n_threads)
            _assert_close(loss, ref_loss, dtype, f"loss, threads={n_threads}")
            if want_grad:
                _assert_close(grad, ref_grad, dtype, f"grad, threads={n_threads}")
            results[n_threads, want_grad] = loss, grad
    for want_grad in (True, False):
        np.testing.assert_array_equal(results[1, want_grad][0], results[2, want_grad][0])
        np.testing.assert_array_equal(results[1, want_grad][1], results[2, want_grad][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_of_no_classes_are_ignored_rows(backend):
    # C == 0 leaves only ignored targets: the contract's ignored rows (the Cython kernel
    # returned without writing; found by a hostile review)
    loss, stats, rank = np.full(3, -1.0), np.full((3, 4), -1.0), np.full((3, 2), -7)
    BACKENDS[backend].softmax_ce_scores(np.zeros((3, 0), np.float32), np.full(3, -100),
                                        np.ones(0), -100, 0.0, loss, stats, rank, 1)
    np.testing.assert_array_equal(loss, 0.0)
    assert np.isnan(stats).all()
    np.testing.assert_array_equal(rank, [[-1, 0]] * 3)


# ---------------------------------------------------------------- softmax, logsumexp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + KDIM_SHAPES)
def test_softmax_logsumexp_match_reference(backend, dtype, shape):
    kernels = BACKENDS[backend]
    rng = np.random.default_rng(_seed((shape, "s")))
    n, c, s = shape
    x = _logits(rng, n, c, s, dtype)
    _readonly(x)
    ref_logp = _log_softmax_ref(x.astype(np.float64))
    ref_lse = (x.astype(np.float64) - ref_logp)[:, 0, :]
    outs = {}
    for n_threads in (1, 2):
        for log in (False, True):
            out = np.full(x.shape, np.nan, dtype=dtype)
            kernels.softmax(x, log, out, n_threads)
            _assert_close(out, ref_logp if log else np.exp(ref_logp), dtype, f"log={log}")
            outs[n_threads, log] = out
            # the contract's in-place case (the estimator's predict_proba): the same bits
            # (Numba's log-softmax rows had written their exps over the logits it then read)
            over = x.copy()
            kernels.softmax(over, log, over, n_threads)
            np.testing.assert_array_equal(over, out, err_msg=f"in place, log={log}")
        lse = np.full((n, s), np.nan)
        kernels.logsumexp(x, lse, n_threads)
        _assert_close(lse, ref_lse, dtype, "logsumexp")
        outs[n_threads, "lse"] = lse
    for key in (False, True, "lse"):
        np.testing.assert_array_equal(outs[1, key], outs[2, key])


# ------------------------------------------------------------------ binary (sigmoid)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 3), (64, 129), (5, 700), (1001, 13),
                                   (2, 9000)])
@pytest.mark.parametrize("broadcast", ["views", "full", "strided"])
def test_bce_matches_reference(backend, dtype, shape, broadcast):
    # The kernels work in items of REDUCE_BLOCK positions; the last two shapes have items
    # that start inside a row, and rows longer than an item.
    kernels = BACKENDS[backend]
    rng = np.random.default_rng(_seed((shape, broadcast, "b")))
    r, l = shape
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    y = rng.random(shape).astype(dtype)
    if broadcast == "views":  # per column, per row, scalar: stride-0 views
        w = np.broadcast_to(rng.uniform(0.5, 2, l), shape)
        pw = np.broadcast_to(rng.uniform(0.5, 3, (r, 1)), shape)
        gs = np.broadcast_to(np.float64(0.5), shape)
    elif broadcast == "full":
        w, pw, gs = (rng.uniform(0.5, 2, shape) for _ in range(3))
    else:  # not contiguous along a row
        w, pw, gs = (rng.uniform(0.5, 2, (r, 2 * l))[:, ::2] for _ in range(3))
    _readonly(x, y)
    ref_loss, ref_grad = ref_bce(x, y, w, pw, gs)
    outs = {}
    for n_threads in (1, 2):
        loss = np.full(shape, np.nan)
        grad = np.full(shape, np.nan, dtype=dtype)
        kernels.bce_logits(x, y, w, pw, gs, loss, grad, n_threads)
        _assert_close(loss, ref_loss, dtype, "bce loss")
        _assert_close(grad, ref_grad, dtype, "bce grad")
        loss_only = np.full(shape, np.nan)
        kernels.bce_logits(x, y, w, pw, gs, loss_only, None, n_threads)
        np.testing.assert_array_equal(loss_only, loss)
        # The block sums of 'mean' / 'sum', against exact sums of the reference's blocks.
        flat = ref_loss.reshape(-1)
        blocks = range(0, flat.size, REDUCE_BLOCK)
        sums = np.full(len(blocks), np.nan)
        kernels.bce_logits(x, y, w, pw, gs, sums, None, n_threads)
        _assert_close(sums, np.array([math.fsum(flat[b:b + REDUCE_BLOCK]) for b in blocks]),
                      dtype, "bce block sums")
        outs[n_threads] = loss, grad, sums
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_pw", [(1.5, 2.5), (1.0, 1.0), (1.0, 2.5), (2.5, 1.0)])
def test_bce_broadcast_scalars_give_the_bits_of_full_arrays(backend, dtype, w_pw):
    # Scalar weights take their own loop (no float64 arrays read per element), and the
    # sums one more for w = pw = 1 (no weights, the default); each must give
    # the bits that the same values as full arrays give: loss, gradient and sums, with
    # and without the gradient, NaN and infinite logits and targets included.
    kernels = BACKENDS[backend]
    rng = np.random.default_rng(_seed((dtype, "bce scalars")))
    shape = (700, 13)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    y = rng.random(shape).astype(dtype)
    x.flat[:4] = np.inf, -np.inf, np.nan, 0.0
    y.flat[4:8] = np.inf, -np.inf, np.nan, 1.0
    values = (*w_pw, 1 / x.size)
    results = []
    for make in (lambda v: np.broadcast_to(np.float64(v), shape), lambda v: np.full(shape, v)):
        w, pw, gs = (make(v) for v in values)
        loss, grad = np.empty(shape), np.empty(shape, dtype)
        kernels.bce_logits(x, y, w, pw, gs, loss, grad, 2)
        sums = np.empty(-(-x.size // REDUCE_BLOCK))
        kernels.bce_logits(x, y, w, pw, gs, sums, None, 2)
        sums_g, grad_s = np.empty_like(sums), np.empty(shape, dtype)
        kernels.bce_logits(x, y, w, pw, gs, sums_g, grad_s, 2)
        np.testing.assert_array_equal(sums_g, sums)
        np.testing.assert_array_equal(grad_s, grad)
        results.append((loss, grad, sums))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    finite = slice(8, None)  # the reference past the special values
    ref = ref_bce(*(a.ravel()[finite] for a in (x, y, *(np.full(shape, v) for v in values))))
    _assert_close(results[0][0].ravel()[finite], ref[0], dtype, "bce loss")


# ------------------------------------------------------------------------ memmaps
def test_readonly_memmap_inputs(tmp_path):
    rng = np.random.default_rng(5)
    x = _logits(rng, 40, 10, 1, np.float32)
    path = tmp_path / "logits.npy"
    np.save(path, x)
    xm = np.load(path, mmap_mode="r")
    t = rng.integers(0, 10, (40, 1))
    w = np.ones(10)
    gs = np.broadcast_to(np.float64(1.0), (40, 1))
    out = {}
    for name, kernels in BACKENDS.items():
        out[name] = _run_index(kernels, xm, t, w, -100, 0.0, gs, True, 2)
    ref_loss, ref_grad = ref_index(x, t, w, -100, 0.0, gs)
    for loss, grad in out.values():
        _assert_close(loss, ref_loss, np.float32, "memmap loss")
        _assert_close(grad, ref_grad, np.float32, "memmap grad")


# --------------------------------------------------------------- non-finite logits
def _with_nonfinite(rng, shape, dtype):
    x = _logits(rng, *shape, dtype)
    flat = x.reshape(-1)
    for value in (np.nan, np.inf, -np.inf):
        flat[rng.choice(flat.size, max(1, flat.size // 20), replace=False)] = value
    x[0] = -np.inf  # a whole sample of -inf logits
    return x


def _same_nan_and_close(a, b, dtype, what):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what + ": NaN positions")
    inf = np.isinf(a)
    np.testing.assert_array_equal(a[inf], b[inf], err_msg=what + ": infinities")
    finite = np.isfinite(a)
    _assert_close(a[finite], b[finite], dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(30, 1, 1), (30, 4, 1), (40, 100, 1), (3, 5, 300)])
def test_nonfinite_logits_agree(dtype, shape):
    rng = np.random.default_rng(_seed((shape, "nan")))
    n, c, s = shape
    x = _with_nonfinite(rng, shape, dtype)
    t = rng.integers(0, c, (n, s))
    t[rng.random((n, s)) < 0.2] = -100
    q = rng.random((n, c, s)).astype(dtype)
    w = rng.uniform(0.5, 2, c)
    gs = np.broadcast_to(np.float64(1.0), (n, s))
    res = {}
    for name, k in BACKENDS.items():
        for eps in (0.0, 0.1):
            res[name, "index", eps] = _run_index(k, x, t, w, -100, eps, gs, True, 2)
            res[name, "proba", eps] = _run_proba(k, x, q, w, eps, gs, True, 2)
        for log in (False, True):
            out = np.empty_like(x)
            k.softmax(x, log, out, 2)
            res[name, "softmax", log] = (out,)
        lse = np.empty((n, s))
        k.logsumexp(x, lse, 2)
        res[name, "lse", None] = (lse,)
    for key in {key[1:] for key in res}:
        for a, b in zip(res[("numba",) + key], res[("cython",) + key]):
            _same_nan_and_close(a, b, dtype, str(key))


# --------------------------------------------------------- log_loss's probability pass
def ref_log_loss_pass(p, t, lo, hi, rtol):
    """Counts and clipped picks of the contract's log_loss_pass, naively in float64."""
    with np.errstate(invalid="ignore"):  # inf + -inf
        s = p.astype(np.float64).sum(axis=1)
    finite = np.isfinite(s)
    stats = [np.count_nonzero((p > 1) | (p < 0)),
             np.count_nonzero(finite & (np.abs(s - 1) > 1e-8 + rtol)),
             np.count_nonzero(~finite)]
    return np.array(stats, dtype=np.float64), np.clip(p[np.arange(len(t)), t], lo, hi)


@pytest.mark.parametrize("backend", [name for name, k in BACKENDS.items()
                                     if hasattr(k, "log_loss_pass")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 3), (3000, 40), (40, 3000), (5, 70000)])
def test_log_loss_pass_matches_reference(backend, dtype, shape):
    kernels = BACKENDS[backend]
    n, c = shape
    rng = np.random.default_rng([n, c])
    p = rng.random(shape)
    p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)  # rows sum to 1 (to rounding)
    half = (n + 1) // 2
    head = p[:half].reshape(-1)  # values outside [0, 1], NaN and inf in the first rows
    for value in (-0.25, 1.5, np.nan, np.inf, -np.inf):
        head[rng.choice(head.size, max(1, head.size // 400), replace=False)] = value
    for i, scale in zip(range(half, n), (1.01, 0.5, 3.0, 0.99)):
        p[i] *= dtype(scale)  # rows that do not sum to one
    t = rng.integers(0, c, n)
    special = np.argwhere(~np.isfinite(p) | (p < 0) | (p > 1))[:5]
    t[special[:, 0]] = special[:, 1]  # picks that are NaN, inf or outside [0, 1]
    eps = np.finfo(dtype).eps
    lo, hi, rtol = dtype(eps), dtype(1 - eps), float(np.sqrt(eps))
    _readonly(p, t)
    ref_stats, ref_picked = ref_log_loss_pass(p, t, lo, hi, rtol)
    assert ref_stats.min() > 0 or n == 1  # every count is exercised
    for n_threads in (1, 2):
        stats, picked = np.full(3, np.nan), np.full(n, np.nan, dtype)
        kernels.log_loss_pass(p, t, lo, hi, rtol, stats, picked, n_threads)
        np.testing.assert_array_equal(stats, ref_stats)
        np.testing.assert_array_equal(picked, ref_picked)  # NaN where the pick is NaN
        no_pick = np.full(3, np.nan)
        kernels.log_loss_pass(p, None, lo, hi, rtol, no_pick, None, n_threads)
        np.testing.assert_array_equal(no_pick, ref_stats)
