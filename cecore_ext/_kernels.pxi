# Cython backend of the kernel contract (see cecore/_backends.py).
#
# Included by _kernels_base.pyx and _kernels_avx2.pyx: one source, compiled once without
# and once with AVX2+FMA flags (setup.py); cecore_ext/__init__.py picks one at import.
#
# This layer unpacks arrays into raw pointers, handles what is not a hot loop (ignored
# targets, strided broadcast arguments, binary cross-entropy) and spreads rows / tiles
# over OpenMP threads. The vectorised loops are C functions in _rowkernels.h.
#
# Threads: n_threads == 1 runs a plain loop with no OpenMP parallel region at all, so a
# child created by fork() (whose copy of the GNU OpenMP thread pool is unusable) is safe
# as long as it asks for one thread. Each row / tile is computed by one thread in a fixed
# order, so results are bitwise identical for any n_threads.

import numpy as np

from cython.parallel cimport prange
from cython cimport floating
from libc.math cimport exp, log1p, fabs, INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

# 2-D inputs with at most this many classes (rows shorter than a vector or two) go
# through the tile kernels on blocks of CEC_TILE rows transposed into a (C, CEC_TILE)
# scratch tile, as in the Numba backend (cecore._config.SMALL_C).
cdef enum: SMALL_C = 32

cdef extern from "_rowkernels.h" nogil:
    enum: CEC_TILE
    int cec_openmp_version()
    int cec_omp_max_threads()
    const char *cec_variant()
    const char *cec_compile_args()
    const char *cec_compiler()

    double cec_index_row_f32(const float *x, Py_ssize_t n, Py_ssize_t t, const double *w,
                             double w_total, double eps, double gs, float *g)
    double cec_index_row_f64(const double *x, Py_ssize_t n, Py_ssize_t t, const double *w,
                             double w_total, double eps, double gs, double *g)
    double cec_proba_row_f32(const float *x, const float *q, Py_ssize_t n, const double *w,
                             double eps, double gs, float *g)
    double cec_proba_row_f64(const double *x, const double *q, Py_ssize_t n,
                             const double *w, double eps, double gs, double *g)
    void cec_softmax_row_f32(const float *x, Py_ssize_t n, int log_, float *out)
    void cec_softmax_row_f64(const double *x, Py_ssize_t n, int log_, double *out)
    double cec_logsumexp_row_f32(const float *x, Py_ssize_t n)
    double cec_logsumexp_row_f64(const double *x, Py_ssize_t n)

    void cec_index_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                            Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                            const double *w, double w_total, double eps, const double *gs,
                            double *loss, float *g)
    void cec_index_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                            Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                            const double *w, double w_total, double eps, const double *gs,
                            double *loss, double *g)
    void cec_proba_tile_f32(const float *x, const float *q, Py_ssize_t n,
                            Py_ssize_t stride, Py_ssize_t width, const double *w,
                            double eps, const double *gs, double *loss, float *g)
    void cec_proba_tile_f64(const double *x, const double *q, Py_ssize_t n,
                            Py_ssize_t stride, Py_ssize_t width, const double *w,
                            double eps, const double *gs, double *loss, double *g)
    void cec_softmax_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                              Py_ssize_t width, int log_, float *out)
    void cec_softmax_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                              Py_ssize_t width, int log_, double *out)
    void cec_logsumexp_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                                Py_ssize_t width, double *out)
    void cec_logsumexp_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                                Py_ssize_t width, double *out)


# A 2-D float64 argument with arbitrary strides (broadcast views have stride 0).
cdef struct Strided:
    const char *data
    Py_ssize_t s0, s1

cdef inline Strided _strided(const double[:, :] a) noexcept:
    cdef Strided r
    r.data = <const char *>&a[0, 0] if a.shape[0] and a.shape[1] else NULL
    r.s0 = a.strides[0]
    r.s1 = a.strides[1]
    return r

cdef inline double _at(Strided a, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return (<const double *>(a.data + i * a.s0 + j * a.s1))[0]

cdef inline Py_ssize_t _n_tiles(Py_ssize_t n_pos) noexcept nogil:
    return (n_pos + CEC_TILE - 1) // CEC_TILE

cdef inline void _gather(Strided a, Py_ssize_t i, Py_ssize_t j0, Py_ssize_t width,
                         double *out) noexcept nogil:
    """out[:width] = a[i, j0:j0 + width]"""
    cdef Py_ssize_t j
    for j in range(width):
        out[j] = _at(a, i, j0 + j)


def _empty_like_grad(logits, ndim):
    """The contract's "empty" gradient may have any shape (0, ...) and dtype; give the
    typed function an empty array of the right rank and dtype."""
    return np.empty((0,) * ndim, dtype=logits.dtype)


# ---------------------------------------------------------------- class-index targets
cdef inline void _index_one(Py_ssize_t k, const floating *x, const int64_t *target,
                            const double *w, Strided gs, double *loss, floating *g,
                            Py_ssize_t C, Py_ssize_t S, int64_t ignore_index,
                            double w_total, double eps) noexcept nogil:
    """Row k (S == 1) or tile k (S > 1)."""
    cdef Py_ssize_t n, s0, width
    cdef int64_t t
    cdef double gsb[CEC_TILE]
    cdef floating *gk = NULL
    if S == 1:
        t = target[k]
        if g != NULL:
            gk = g + k * C
        if t == ignore_index:
            # Loss only: an ignored row is not read. With a gradient it must be: torch's
            # gradient there is NaN when the row's softmax is (see cec_index_row).
            loss[k] = 0.0
            if gk == NULL:
                return
            t = -1
        if floating is float:
            loss[k] = cec_index_row_f32(x + k * C, C, t, w, w_total, eps, _at(gs, k, 0), gk)
        else:
            loss[k] = cec_index_row_f64(x + k * C, C, t, w, w_total, eps, _at(gs, k, 0), gk)
        return
    n = k // _n_tiles(S)
    s0 = (k % _n_tiles(S)) * CEC_TILE
    width = min(<Py_ssize_t>CEC_TILE, S - s0)
    _gather(gs, n, s0, width, gsb)
    if g != NULL:
        gk = g + n * C * S + s0
    if floating is float:
        cec_index_tile_f32(x + n * C * S + s0, C, S, width, target + n * S + s0,
                           ignore_index, w, w_total, eps, gsb, loss + n * S + s0, gk)
    else:
        cec_index_tile_f64(x + n * C * S + s0, C, S, width, target + n * S + s0,
                           ignore_index, w, w_total, eps, gsb, loss + n * S + s0, gk)


cdef inline void _index_small_c(Py_ssize_t k, const floating *x, const int64_t *target,
                                 const double *w, Strided gs, double *loss, floating *g,
                                 Py_ssize_t N, Py_ssize_t C, int64_t ignore_index,
                                 double w_total, double eps) noexcept nogil:
    """Rows [k * CEC_TILE, ...) of a 2-D input with few classes, through a transposed
    (C, CEC_TILE) scratch tile so that the vector loops run across rows."""
    cdef Py_ssize_t r0 = k * CEC_TILE, width = min(<Py_ssize_t>CEC_TILE, N - r0), c, j
    cdef double gsb[CEC_TILE]
    cdef floating *xt = <floating *>malloc(2 * C * CEC_TILE * sizeof(floating))
    cdef floating *gt = NULL
    if xt == NULL:  # out of memory: the row kernels need no scratch
        for j in range(r0, r0 + width):
            _index_one(j, x, target, w, gs, loss, g, C, 1, ignore_index, w_total, eps)
        return
    if g != NULL:
        gt = xt + C * CEC_TILE
    for j in range(width):
        for c in range(C):
            xt[c * CEC_TILE + j] = x[(r0 + j) * C + c]
    for j in range(width):
        gsb[j] = _at(gs, r0 + j, 0)
    if floating is float:
        cec_index_tile_f32(xt, C, CEC_TILE, width, target + r0, ignore_index, w, w_total,
                           eps, gsb, loss + r0, gt)
    else:
        cec_index_tile_f64(xt, C, CEC_TILE, width, target + r0, ignore_index, w, w_total,
                           eps, gsb, loss + r0, gt)
    if gt != NULL:
        for j in range(width):
            for c in range(C):
                g[(r0 + j) * C + c] = gt[c * CEC_TILE + j]
    free(xt)


cdef void _index(const floating[:, :, ::1] logits, const int64_t[:, ::1] target,
                 const double[::1] weight, int64_t ignore_index, double eps,
                 const double[:, :] grad_scale, double[:, ::1] loss_out,
                 floating[:, :, ::1] grad_out, int n_threads):
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef bint small_c = S == 1 and C <= SMALL_C
    cdef Py_ssize_t k, n_items = N if S == 1 else N * _n_tiles(S)
    cdef double w_total = 0.0
    if C == 0:
        loss_out[:, :] = 0.0  # an empty sum (validation left only ignored targets)
    if N == 0 or C == 0 or S == 0:
        return
    if small_c:
        n_items = _n_tiles(N)
    for k in range(C):
        w_total += weight[k]
    cdef const floating *x = &logits[0, 0, 0]
    cdef const int64_t *t = &target[0, 0]
    cdef const double *w = &weight[0]
    cdef double *loss = &loss_out[0, 0]
    cdef floating *g = &grad_out[0, 0, 0] if grad_out.shape[0] else NULL
    cdef Strided gs = _strided(grad_scale)
    with nogil:
        if n_threads == 1:
            for k in range(n_items):
                if small_c:
                    _index_small_c(k, x, t, w, gs, loss, g, N, C, ignore_index, w_total, eps)
                else:
                    _index_one(k, x, t, w, gs, loss, g, C, S, ignore_index, w_total, eps)
        else:
            for k in prange(n_items, num_threads=n_threads, schedule="static"):
                if small_c:
                    _index_small_c(k, x, t, w, gs, loss, g, N, C, ignore_index, w_total, eps)
                else:
                    _index_one(k, x, t, w, gs, loss, g, C, S, ignore_index, w_total, eps)


def softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                     loss_out, grad_out, n_threads):
    """Softmax cross-entropy with class-index targets, loss and gradient in one pass.

    See the kernel contract in :mod:`cecore._backends` for shapes and formulas.
    Results go into ``loss_out`` and ``grad_out`` (empty ``grad_out``: loss only).
    """
    if grad_out.shape[0] == 0:
        grad_out = _empty_like_grad(logits, 3)
    if logits.dtype == np.float32:
        _index[float](logits, target, weight, ignore_index, label_smoothing, grad_scale,
                      loss_out, grad_out, n_threads)
    else:
        _index[double](logits, target, weight, ignore_index, label_smoothing, grad_scale,
                       loss_out, grad_out, n_threads)


# ---------------------------------------------------------- class-probability targets
cdef inline void _proba_one(Py_ssize_t k, const floating *x, const floating *q,
                            const double *w, Strided gs, double *loss, floating *g,
                            Py_ssize_t C, Py_ssize_t S, double eps) noexcept nogil:
    cdef Py_ssize_t n, s0, width, off
    cdef double gsb[CEC_TILE]
    cdef floating *gk = NULL
    if S == 1:
        if g != NULL:
            gk = g + k * C
        if floating is float:
            loss[k] = cec_proba_row_f32(x + k * C, q + k * C, C, w, eps, _at(gs, k, 0), gk)
        else:
            loss[k] = cec_proba_row_f64(x + k * C, q + k * C, C, w, eps, _at(gs, k, 0), gk)
        return
    n = k // _n_tiles(S)
    s0 = (k % _n_tiles(S)) * CEC_TILE
    width = min(<Py_ssize_t>CEC_TILE, S - s0)
    off = n * C * S + s0
    _gather(gs, n, s0, width, gsb)
    if g != NULL:
        gk = g + off
    if floating is float:
        cec_proba_tile_f32(x + off, q + off, C, S, width, w, eps, gsb, loss + n * S + s0, gk)
    else:
        cec_proba_tile_f64(x + off, q + off, C, S, width, w, eps, gsb, loss + n * S + s0, gk)


cdef void _proba(const floating[:, :, ::1] logits, const floating[:, :, ::1] target,
                 const double[::1] weight, double eps, const double[:, :] grad_scale,
                 double[:, ::1] loss_out, floating[:, :, ::1] grad_out, int n_threads):
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef Py_ssize_t k, n_items = N if S == 1 else N * _n_tiles(S)
    if C == 0:
        loss_out[:, :] = 0.0  # an empty sum
    if N == 0 or C == 0 or S == 0:
        return
    cdef const floating *x = &logits[0, 0, 0]
    cdef const floating *q = &target[0, 0, 0]
    cdef floating *g = &grad_out[0, 0, 0] if grad_out.shape[0] else NULL
    cdef Strided gs = _strided(grad_scale)
    with nogil:
        if n_threads == 1:
            for k in range(n_items):
                _proba_one(k, x, q, &weight[0], gs, &loss_out[0, 0], g, C, S, eps)
        else:
            for k in prange(n_items, num_threads=n_threads, schedule="static"):
                _proba_one(k, x, q, &weight[0], gs, &loss_out[0, 0], g, C, S, eps)


def softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out,
                     grad_out, n_threads):
    """Softmax cross-entropy with class-probability targets (see :mod:`cecore._backends`).

    Results go into ``loss_out`` and ``grad_out`` (empty ``grad_out``: loss only).
    """
    if grad_out.shape[0] == 0:
        grad_out = _empty_like_grad(logits, 3)
    if logits.dtype == np.float32:
        _proba[float](logits, target, weight, label_smoothing, grad_scale, loss_out,
                      grad_out, n_threads)
    else:
        _proba[double](logits, target, weight, label_smoothing, grad_scale, loss_out,
                       grad_out, n_threads)


# ------------------------------------------------------------------ softmax, logsumexp
cdef inline void _softmax_one(Py_ssize_t k, const floating *x, floating *out,
                              Py_ssize_t C, Py_ssize_t S, int log_) noexcept nogil:
    cdef Py_ssize_t n, s0, off
    if S == 1:
        if floating is float:
            cec_softmax_row_f32(x + k * C, C, log_, out + k * C)
        else:
            cec_softmax_row_f64(x + k * C, C, log_, out + k * C)
        return
    n = k // _n_tiles(S)
    s0 = (k % _n_tiles(S)) * CEC_TILE
    off = n * C * S + s0
    if floating is float:
        cec_softmax_tile_f32(x + off, C, S, min(<Py_ssize_t>CEC_TILE, S - s0), log_, out + off)
    else:
        cec_softmax_tile_f64(x + off, C, S, min(<Py_ssize_t>CEC_TILE, S - s0), log_, out + off)


cdef void _softmax(const floating[:, :, ::1] logits, int log_, floating[:, :, ::1] out,
                   int n_threads):
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef Py_ssize_t k, n_items = N if S == 1 else N * _n_tiles(S)
    if N == 0 or C == 0 or S == 0:
        return
    cdef const floating *x = &logits[0, 0, 0]
    cdef floating *o = &out[0, 0, 0]
    with nogil:
        if n_threads == 1:
            for k in range(n_items):
                _softmax_one(k, x, o, C, S, log_)
        else:
            for k in prange(n_items, num_threads=n_threads, schedule="static"):
                _softmax_one(k, x, o, C, S, log_)


def softmax(logits, log, out, n_threads):
    """``out[n, :, s]`` = softmax or (``log=True``) log-softmax of ``logits[n, :, s]``."""
    if logits.dtype == np.float32:
        _softmax[float](logits, bool(log), out, n_threads)
    else:
        _softmax[double](logits, bool(log), out, n_threads)


cdef inline void _logsumexp_one(Py_ssize_t k, const floating *x, double *out,
                                Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef Py_ssize_t n, s0
    if S == 1:
        if floating is float:
            out[k] = cec_logsumexp_row_f32(x + k * C, C)
        else:
            out[k] = cec_logsumexp_row_f64(x + k * C, C)
        return
    n = k // _n_tiles(S)
    s0 = (k % _n_tiles(S)) * CEC_TILE
    if floating is float:
        cec_logsumexp_tile_f32(x + n * C * S + s0, C, S, min(<Py_ssize_t>CEC_TILE, S - s0),
                               out + n * S + s0)
    else:
        cec_logsumexp_tile_f64(x + n * C * S + s0, C, S, min(<Py_ssize_t>CEC_TILE, S - s0),
                               out + n * S + s0)


cdef void _logsumexp(const floating[:, :, ::1] logits, double[:, ::1] out, int n_threads):
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef Py_ssize_t k, n_items = N if S == 1 else N * _n_tiles(S)
    if C == 0:
        out[:, :] = -INFINITY  # log of an empty sum
    if N == 0 or C == 0 or S == 0:
        return
    cdef const floating *x = &logits[0, 0, 0]
    with nogil:
        if n_threads == 1:
            for k in range(n_items):
                _logsumexp_one(k, x, &out[0, 0], C, S)
        else:
            for k in prange(n_items, num_threads=n_threads, schedule="static"):
                _logsumexp_one(k, x, &out[0, 0], C, S)


def logsumexp(logits, out, n_threads):
    """``out[n, s] = log(sum_c exp(logits[n, c, s]))`` (float64 ``out``)."""
    if logits.dtype == np.float32:
        _logsumexp[float](logits, out, n_threads)
    else:
        _logsumexp[double](logits, out, n_threads)


# ------------------------------------------------------------------- binary (sigmoid)
cdef inline void _bce_row(Py_ssize_t i, const floating *x, const floating *y, Strided w,
                          Strided pw, Strided gs, double *loss, floating *g,
                          Py_ssize_t L) noexcept nogil:
    # Elementwise and dominated by libm exp / log1p in float64, as in the Numba kernel.
    cdef Py_ssize_t j
    cdef double xv, yv, wv, lw, sp, z, sig_neg
    for j in range(L):
        xv = x[i * L + j]
        yv = y[i * L + j]
        wv = _at(w, i, j)
        lw = 1.0 + (_at(pw, i, j) - 1.0) * yv
        # softplus(-x) = log1p(exp(-|x|)) + max(-x, 0): never overflows.
        sp = log1p(exp(-fabs(xv))) + (-xv if -xv > 0.0 else 0.0)
        loss[i * L + j] = wv * ((1.0 - yv) * xv + lw * sp)
        if g != NULL:
            # sigmoid(-x), written so that exp never overflows.
            if xv >= 0:
                z = exp(-xv)
                sig_neg = z / (1.0 + z)
            else:
                sig_neg = 1.0 / (1.0 + exp(xv))
            g[i * L + j] = <floating>(_at(gs, i, j) * wv * ((1.0 - yv) - lw * sig_neg))


cdef void _bce(const floating[:, ::1] input, const floating[:, ::1] target,
               const double[:, :] weight, const double[:, :] pos_weight,
               const double[:, :] grad_scale, double[:, ::1] loss_out,
               floating[:, ::1] grad_out, int n_threads):
    cdef Py_ssize_t R = input.shape[0], L = input.shape[1], i
    if R == 0 or L == 0:
        return
    cdef const floating *x = &input[0, 0]
    cdef const floating *y = &target[0, 0]
    cdef floating *g = &grad_out[0, 0] if grad_out.shape[0] else NULL
    cdef Strided w = _strided(weight), pw = _strided(pos_weight), gs = _strided(grad_scale)
    with nogil:
        if n_threads == 1:
            for i in range(R):
                _bce_row(i, x, y, w, pw, gs, &loss_out[0, 0], g, L)
        else:
            for i in prange(R, num_threads=n_threads, schedule="static"):
                _bce_row(i, x, y, w, pw, gs, &loss_out[0, 0], g, L)


def bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out,
               n_threads):
    """Binary cross-entropy on logits, elementwise over ``(R, L)`` (see the contract)."""
    if grad_out.shape[0] == 0:
        grad_out = _empty_like_grad(input, 2)
    if input.dtype == np.float32:
        _bce[float](input, target, weight, pos_weight, grad_scale, loss_out, grad_out,
                    n_threads)
    else:
        _bce[double](input, target, weight, pos_weight, grad_scale, loss_out, grad_out,
                     n_threads)


def build_info():
    """Facts about this compiled variant: SIMD variant, OpenMP, compiler and flags."""
    version = cec_openmp_version()
    return {
        "variant": cec_variant().decode(),
        "openmp": bool(version),
        "openmp_version": version,
        "max_threads": cec_omp_max_threads(),
        "compiler": cec_compiler().decode(),
        "compile_args": cec_compile_args().decode(),
        "tile": CEC_TILE,
        "exp": "range reduction + polynomial, vectorised with omp simd",
    }
