# Cython backend of the kernel contract (see cecore/_backends.py).
#
# Included by _kernels_base.pyx, _kernels_avx2.pyx and _kernels_avx512.pyx: one source,
# compiled three times, without SIMD flags, with AVX2+FMA and with AVX-512 (setup.py);
# cecore_ext/__init__.py picks one at import.
#
# Design:
# - The contract's functions take fused memoryviews: Cython picks the float32 or float64
#   specialisation from the arguments. Each C routine of _rowkernels.h (where the
#   vectorised loops are) has one fused wrapper below, so every call site is written once.
# - A kernel splits its work into items (a row, a tile of positions, a block of rows),
#   puts its other arguments in a struct and hands an item function to _run, the one
#   place that spreads items over threads. Items do not overlap, each is computed by one
#   thread in a fixed order, and both paths of _run call the same item code (whose hot
#   loops are the noinline C kernels, see _rowkernels.h), so results are bitwise
#   identical for any n_threads.
# - n_threads == 1 runs a plain loop with no OpenMP parallel region at all, so a child
#   created by fork() (whose copy of the GNU OpenMP thread pool is unusable) is safe as
#   long as it asks for one thread.
# - Tunables are the CEC_* macros setup.py takes from cecore/_config.py.

from cython.parallel cimport parallel, prange
from cython cimport floating
from libc.float cimport DBL_MAX, DBL_MIN, FLT_MAX, FLT_MIN
from libc.math cimport INFINITY, NAN, fabs
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

cdef extern from "_rowkernels.h" nogil:
    enum: CEC_TILE
    enum: CEC_SMALL_C
    enum: CEC_SMALL_C_ROWS
    enum: CEC_SUM_BLOCK
    enum: CEC_LANES
    enum: CEC_REDUCE_BLOCK
    enum: CEC_KDIM_BLOCK_MAX_BYTES
    enum: CEC_KDIM_BLOCK_MAX_C
    enum: CEC_KDIM_ROWS_MAX_BYTES
    enum: CEC_KDIM_ROWS_GROUP_BYTES
    enum: CEC_PREFETCH_MIN_ROW_BYTES_AMD
    enum: CEC_STREAM_MIN_BYTES
    enum: CEC_BCE_AHEAD
    void cec_prefetch_range(const void *p, Py_ssize_t nbytes, int write)
    Py_ssize_t cec_prefetch_min_row_bytes()
    void cec_stream_copy(const void *src, void *dst, Py_ssize_t nbytes)
    void cec_stream_fence()
    unsigned int cec_ftz_begin()
    void cec_ftz_end(unsigned int old)
    ctypedef struct cec_report_run:
        pass
    void cec_report_run_from(const double *stats, const int64_t *rank, Py_ssize_t n,
                             cec_report_run *run)
    void cec_report_start(double *acc, double *sums, int64_t *counts, Py_ssize_t n_bins)
    void cec_report_rows(const cec_report_run *run, Py_ssize_t n, int64_t top_k,
                         Py_ssize_t n_bins, const double *edges, double *acc, double *sums,
                         int64_t *counts)
    void cec_report_finish(const double *acc, double *sums)
    int cec_openmp_version()
    int cec_omp_max_threads()
    const char *cec_variant()
    const char *cec_compile_args()
    const char *cec_compiler()

    double cec_weight_scale(const double *w, Py_ssize_t n, double lo, double hi)
    int cec_shift_outside(double r, double lo, double hi)
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
    double cec_scores_row_f32(const float *x, Py_ssize_t n, Py_ssize_t t, const double *w,
                              double eps, double *stats, int64_t *rank)
    double cec_scores_row_f64(const double *x, Py_ssize_t n, Py_ssize_t t, const double *w,
                              double eps, double *stats, int64_t *rank)
    void cec_log_loss_rows_f32(const float *p, Py_ssize_t rows, Py_ssize_t n, double tol,
                               const int64_t *target, float lo, float hi, float *picked,
                               double *stats)
    void cec_log_loss_rows_f64(const double *p, Py_ssize_t rows, Py_ssize_t n, double tol,
                               const int64_t *target, double lo, double hi, double *picked,
                               double *stats)

    void cec_index_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                            Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                            const double *w, double w_total, double w_scale, double eps,
                            const double *gs, double *loss, float *g, const float *next,
                            int check_shift)
    void cec_index_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                            Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                            const double *w, double w_total, double w_scale, double eps,
                            const double *gs, double *loss, double *g, const double *next,
                            int check_shift)
    void cec_scores_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                             Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                             const double *w, double eps, double *loss, double *stats,
                             int64_t *rank, cec_report_run *run, float *e, const float *next)
    void cec_scores_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                             Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                             const double *w, double eps, double *loss, double *stats,
                             int64_t *rank, cec_report_run *run, double *e, const double *next)
    void cec_proba_tile_f32(const float *x, const float *q, Py_ssize_t n,
                            Py_ssize_t stride, Py_ssize_t width, const double *w,
                            double eps, const double *gs, double *loss, float *g)
    void cec_proba_tile_f64(const double *x, const double *q, Py_ssize_t n,
                            Py_ssize_t stride, Py_ssize_t width, const double *w,
                            double eps, const double *gs, double *loss, double *g)
    void cec_softmax_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                              Py_ssize_t width, int log_, float *out,
                              const float *next)
    void cec_softmax_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                              Py_ssize_t width, int log_, double *out,
                              const double *next)
    void cec_logsumexp_tile_f32(const float *x, Py_ssize_t n, Py_ssize_t stride,
                                Py_ssize_t width, double *out, const float *next)
    void cec_logsumexp_tile_f64(const double *x, Py_ssize_t n, Py_ssize_t stride,
                                Py_ssize_t width, double *out, const double *next)
    void cec_transpose_f32(const float *src, Py_ssize_t sld, Py_ssize_t rows,
                           Py_ssize_t cols, float *dst, Py_ssize_t dld)
    void cec_transpose_f64(const double *src, Py_ssize_t sld, Py_ssize_t rows,
                           Py_ssize_t cols, double *dst, Py_ssize_t dld)
    void cec_transpose_granules_f32(const float *src, Py_ssize_t rows, Py_ssize_t cols,
                                    Py_ssize_t S, float *dst, Py_ssize_t dld)
    void cec_transpose_granules_f64(const double *src, Py_ssize_t rows, Py_ssize_t cols,
                                    Py_ssize_t S, double *dst, Py_ssize_t dld)
    void cec_untranspose_granules_f32(const float *src, Py_ssize_t sld, Py_ssize_t rows,
                                      Py_ssize_t cols, Py_ssize_t S, float *dst)
    void cec_untranspose_granules_f64(const double *src, Py_ssize_t sld, Py_ssize_t rows,
                                      Py_ssize_t cols, Py_ssize_t S, double *dst)
    void cec_bce_row_f32(const float *x, const float *y, Py_ssize_t n, const double *w,
                         const double *pw, const double *gs, double *loss, float *g)
    void cec_bce_row_f64(const double *x, const double *y, Py_ssize_t n, const double *w,
                         const double *pw, const double *gs, double *loss, double *g)
    void cec_bce_row_bcast_f32(const float *x, const float *y, Py_ssize_t n, double w,
                               double pw, double gs, double *loss, float *g)
    void cec_bce_row_bcast_f64(const double *x, const double *y, Py_ssize_t n, double w,
                               double pw, double gs, double *loss, double *g)
    void cec_bce_sums_bcast_f32(const float *x, const float *y, Py_ssize_t n, double w,
                                double pw, double gs, double *acc, float *g)
    void cec_bce_sums_bcast_f64(const double *x, const double *y, Py_ssize_t n, double w,
                                double pw, double gs, double *acc, double *g)
    void cec_add_lanes_f64(double *acc, const double *v, Py_ssize_t len)
    double cec_sum_lanes(const double *acc)


# ------------------------------------------------- one fused wrapper per C routine
cdef inline double _index_row(const floating *x, Py_ssize_t n, Py_ssize_t t,
                              const double *w, double w_total, double eps, double gs,
                              floating *g) noexcept nogil:
    if floating is float:
        return cec_index_row_f32(x, n, t, w, w_total, eps, gs, g)
    else:
        return cec_index_row_f64(x, n, t, w, w_total, eps, gs, g)

cdef inline double _proba_row(const floating *x, const floating *q, Py_ssize_t n,
                              const double *w, double eps, double gs,
                              floating *g) noexcept nogil:
    if floating is float:
        return cec_proba_row_f32(x, q, n, w, eps, gs, g)
    else:
        return cec_proba_row_f64(x, q, n, w, eps, gs, g)

cdef inline void _softmax_row(const floating *x, Py_ssize_t n, int log_,
                              floating *out) noexcept nogil:
    if floating is float:
        cec_softmax_row_f32(x, n, log_, out)
    else:
        cec_softmax_row_f64(x, n, log_, out)

cdef inline double _logsumexp_row(const floating *x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return cec_logsumexp_row_f32(x, n)
    else:
        return cec_logsumexp_row_f64(x, n)

cdef inline double _scores_row(const floating *x, Py_ssize_t n, Py_ssize_t t,
                               const double *w, double eps, double *stats,
                               int64_t *rank) noexcept nogil:
    if floating is float:
        return cec_scores_row_f32(x, n, t, w, eps, stats, rank)
    return cec_scores_row_f64(x, n, t, w, eps, stats, rank)

cdef inline void _bce_row(const floating *x, const floating *y, Py_ssize_t n,
                          const double *w, const double *pw, const double *gs,
                          double *loss, floating *g) noexcept nogil:
    if floating is float:
        cec_bce_row_f32(x, y, n, w, pw, gs, loss, g)
    else:
        cec_bce_row_f64(x, y, n, w, pw, gs, loss, g)

cdef inline void _bce_row_bcast(const floating *x, const floating *y, Py_ssize_t n,
                                double w, double pw, double gs, double *loss,
                                floating *g) noexcept nogil:
    if floating is float:
        cec_bce_row_bcast_f32(x, y, n, w, pw, gs, loss, g)
    else:
        cec_bce_row_bcast_f64(x, y, n, w, pw, gs, loss, g)

cdef inline void _bce_sums_bcast(const floating *x, const floating *y, Py_ssize_t n,
                                 double w, double pw, double gs, double *acc,
                                 floating *g) noexcept nogil:
    if floating is float:
        cec_bce_sums_bcast_f32(x, y, n, w, pw, gs, acc, g)
    else:
        cec_bce_sums_bcast_f64(x, y, n, w, pw, gs, acc, g)

cdef inline void _transpose(const floating *src, Py_ssize_t sld, Py_ssize_t rows,
                            Py_ssize_t cols, floating *dst,
                            Py_ssize_t dld) noexcept nogil:
    if floating is float:
        cec_transpose_f32(src, sld, rows, cols, dst, dld)
    else:
        cec_transpose_f64(src, sld, rows, cols, dst, dld)

cdef inline void _transpose_granules(const floating *src, Py_ssize_t rows, Py_ssize_t cols,
                                     Py_ssize_t S, floating *dst,
                                     Py_ssize_t dld) noexcept nogil:
    if floating is float:
        cec_transpose_granules_f32(src, rows, cols, S, dst, dld)
    else:
        cec_transpose_granules_f64(src, rows, cols, S, dst, dld)

cdef inline void _untranspose_granules(const floating *src, Py_ssize_t sld, Py_ssize_t rows,
                                       Py_ssize_t cols, Py_ssize_t S,
                                       floating *dst) noexcept nogil:
    if floating is float:
        cec_untranspose_granules_f32(src, sld, rows, cols, S, dst)
    else:
        cec_untranspose_granules_f64(src, sld, rows, cols, S, dst)

cdef inline void _log_loss_rows(const floating *p, Py_ssize_t rows, Py_ssize_t n,
                                double tol, const int64_t *target, double lo, double hi,
                                floating *picked, double *stats) noexcept nogil:
    if floating is float:
        cec_log_loss_rows_f32(p, rows, n, tol, target, <float>lo, <float>hi, picked, stats)
    else:
        cec_log_loss_rows_f64(p, rows, n, tol, target, lo, hi, picked, stats)

cdef inline void _index_tile(const floating *x, Py_ssize_t n, Py_ssize_t stride,
                             Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                             const double *w, double w_total, double w_scale, double eps,
                             const double *gs, double *loss, floating *g,
                             const floating *nxt, bint check_shift) noexcept nogil:
    if floating is float:
        cec_index_tile_f32(x, n, stride, width, target, ignore_index, w, w_total, w_scale,
                           eps, gs, loss, g, nxt, check_shift)
    else:
        cec_index_tile_f64(x, n, stride, width, target, ignore_index, w, w_total, w_scale,
                           eps, gs, loss, g, nxt, check_shift)

cdef inline void _scores_tile(const floating *x, Py_ssize_t n, Py_ssize_t stride,
                              Py_ssize_t width, const int64_t *target, int64_t ignore_index,
                              const double *w, double eps, double *loss, double *stats,
                              int64_t *rank, cec_report_run *run, floating *e,
                              const floating *nxt) noexcept nogil:
    if floating is float:
        cec_scores_tile_f32(x, n, stride, width, target, ignore_index, w, eps, loss, stats,
                            rank, run, e, nxt)
    else:
        cec_scores_tile_f64(x, n, stride, width, target, ignore_index, w, eps, loss, stats,
                            rank, run, e, nxt)

cdef inline void _proba_tile(const floating *x, const floating *q, Py_ssize_t n,
                             Py_ssize_t stride, Py_ssize_t width, const double *w,
                             double eps, const double *gs, double *loss,
                             floating *g) noexcept nogil:
    if floating is float:
        cec_proba_tile_f32(x, q, n, stride, width, w, eps, gs, loss, g)
    else:
        cec_proba_tile_f64(x, q, n, stride, width, w, eps, gs, loss, g)

cdef inline void _softmax_tile(const floating *x, Py_ssize_t n, Py_ssize_t stride,
                               Py_ssize_t width, int log_, floating *out,
                               const floating *nxt) noexcept nogil:
    if floating is float:
        cec_softmax_tile_f32(x, n, stride, width, log_, out, nxt)
    else:
        cec_softmax_tile_f64(x, n, stride, width, log_, out, nxt)

cdef inline void _logsumexp_tile(const floating *x, Py_ssize_t n, Py_ssize_t stride,
                                 Py_ssize_t width, double *out,
                                 const floating *nxt) noexcept nogil:
    if floating is float:
        cec_logsumexp_tile_f32(x, n, stride, width, out, nxt)
    else:
        cec_logsumexp_tile_f64(x, n, stride, width, out, nxt)


# -------------------------------------------------------------------------- driver
cdef void _run(void (*item)(Py_ssize_t, const floating *, const void *) noexcept nogil,
               Py_ssize_t n_items, const floating *x, const void *ctx,
               int n_threads) noexcept nogil:
    """``item(k, x, ctx)`` for k in range(n_items): x is the kernel's main input, ctx
    its other arguments (a struct of the kernel's own type)."""
    cdef Py_ssize_t k
    cdef unsigned int csr, csr_k  # (csr_k: private to each thread of the region)
    if n_threads == 1:  # no OpenMP region at all (see Design)
        csr = cec_ftz_begin()  # subnormal results are 0 (see cec_ftz_begin)
        for k in range(n_items):
            item(k, x, ctx)
        cec_stream_fence()
        cec_ftz_end(csr)
    else:
        csr_k = 0  # (Cython makes it firstprivate: initialised, gcc does not warn)
        with parallel(num_threads=n_threads):
            csr_k = cec_ftz_begin()
            for k in prange(n_items, schedule="static"):
                item(k, x, ctx)
            cec_stream_fence()  # each thread's non-temporal stores, before its results are read
            cec_ftz_end(csr_k)


# ------------------------------------------------------------------------- helpers
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

cdef inline void _gather(Strided a, Py_ssize_t i, Py_ssize_t j0, Py_ssize_t width,
                         double *out) noexcept nogil:
    """out[:width] = a[i, j0:j0 + width]"""
    cdef Py_ssize_t j
    for j in range(width):
        out[j] = _at(a, i, j0 + j)

cdef inline int _check_grad(const Py_ssize_t *grad_shape, const Py_ssize_t *shape,
                            int ndim) except -1:
    """A gradient buffer must have the input's shape (an empty array instead of None,
    say, would be written past its end)."""
    cdef int i
    for i in range(ndim):
        if grad_shape[i] != shape[i]:
            raise ValueError("grad_out must be None (loss only) or of the input's shape")
    return 0

cdef inline Py_ssize_t _n_tiles(Py_ssize_t n_pos) noexcept nogil:
    return (n_pos + CEC_TILE - 1) // CEC_TILE

# The tile of item k of an (N, C, S) input with S > 1: sample n, positions s0 + [0, width).
cdef struct Tile:
    Py_ssize_t n, s0, width

cdef inline Tile _tile(Py_ssize_t k, Py_ssize_t S) noexcept nogil:
    cdef Tile t
    t.n = k // _n_tiles(S)
    t.s0 = (k % _n_tiles(S)) * CEC_TILE
    t.width = min(<Py_ssize_t>CEC_TILE, S - t.s0)
    return t

cdef inline Py_ssize_t _n_items(Py_ssize_t N, Py_ssize_t S) noexcept nogil:
    """Items of the row / tile kernels: rows (S == 1) or tiles of positions (S > 1)."""
    return N if S == 1 else N * _n_tiles(S)



# ------------------------------------------- few classes or few positions: scratch tiles
# Rows of few classes (S == 1, C <= CEC_SMALL_C) and K-dim inputs whose S positions of a
# class take fewer bytes than a vector (cecore/_config.py, KDIM_*) would run the loops
# over part of a vector. Blocks of samples are transposed into one (C, B * S) scratch
# tile of positions for the tile kernels (whose arithmetic is per position, so the bits
# are those of the tiles of the input itself); with more classes, each sample's positions
# are transposed into rows for the row kernels.
cdef struct Block:
    Py_ssize_t n0, nb, width, ld  # samples [n0, n0 + nb): positions n0 * S + [0, width)

cdef inline bint _use_blocks(Py_ssize_t C, Py_ssize_t S, Py_ssize_t itemsize) noexcept nogil:
    if S == 1:
        return C <= CEC_SMALL_C
    return 1 < S and S * itemsize <= CEC_KDIM_BLOCK_MAX_BYTES and C <= CEC_KDIM_BLOCK_MAX_C

cdef inline Py_ssize_t _rows_group(Py_ssize_t C, Py_ssize_t S,
                                   Py_ssize_t itemsize) noexcept nogil:
    """Positions per group of a sample transposed into rows, or 0: not that path."""
    if S <= 1 or S * itemsize > CEC_KDIM_ROWS_MAX_BYTES or _use_blocks(C, S, itemsize):
        return 0
    return max(1, min(S, CEC_KDIM_ROWS_GROUP_BYTES // (C * itemsize)))

cdef inline Py_ssize_t _n_blocks(Py_ssize_t N, Py_ssize_t S) noexcept nogil:
    return (N + CEC_SMALL_C_ROWS // S - 1) // (CEC_SMALL_C_ROWS // S)

cdef inline Block _block(Py_ssize_t k, Py_ssize_t N, Py_ssize_t S) noexcept nogil:
    cdef Block b
    cdef Py_ssize_t per = CEC_SMALL_C_ROWS // S
    b.n0 = k * per
    b.nb = min(per, N - b.n0)
    b.width = b.nb * S
    b.ld = per * S
    return b

# _block_in prefetches for rows of at least this many bytes: 0 except on AMD CPUs
# (cec_prefetch_min_row_bytes; PREFETCH_MIN_ROW_BYTES_AMD in cecore/_config.py).
cdef Py_ssize_t _PREFETCH_MIN_ROW_BYTES = cec_prefetch_min_row_bytes()

cdef inline const floating *_block_in(const floating *x, Block b, Py_ssize_t N,
                                     Py_ssize_t C, Py_ssize_t S, floating *xt,
                                     floating *g) noexcept nogil:
    """Transpose block b of x into the tile xt. The next block (this thread's, under the
    static schedule) is asked for ahead, so that its transpose does not wait on memory:
    where it pays (_PREFETCH_MIN_ROW_BYTES), here, in one burst, with the gradient lines
    it will write (g; NULL when they are streamed); elsewhere by the tile kernel, a class
    at a time while it computes (cec_tile_max_sumexp), for which the next block is
    returned when it is as long as this one (the tile kernel asks for that many lines).
    NULL otherwise (kernel_findings.md, sixth, twelfth and twenty-fourth sessions)."""
    cdef Py_ssize_t size = C * S, n_next = min(N - b.n0 - b.nb, b.nb)
    cdef const floating *spread = NULL
    if n_next > 0 and C * <Py_ssize_t>sizeof(floating) >= _PREFETCH_MIN_ROW_BYTES:
        cec_prefetch_range(x + (b.n0 + b.nb) * size, n_next * size * sizeof(floating), 0)
        if g != NULL:
            cec_prefetch_range(g + (b.n0 + b.nb) * size, n_next * size * sizeof(floating),
                               1)
    elif n_next == b.nb:
        spread = x + (b.n0 + b.nb) * size
    _transpose_granules(x + b.n0 * size, b.nb, C, S, xt, b.ld)
    return spread

cdef inline bint _streams(const void *out, const void *x, Py_ssize_t nbytes) noexcept:
    """Whether the few-classes blocks write ``out`` (nbytes) with non-temporal stores: when
    it is another array than the input x and too large to stay in cache anyway
    (CEC_STREAM_MIN_BYTES), so that its lines are not read from memory before they are
    overwritten (write-allocate). Over x itself the lines are in cache already."""
    return out != NULL and out != x and nbytes >= CEC_STREAM_MIN_BYTES

cdef inline void _block_out(const floating *t, Block b, Py_ssize_t C, Py_ssize_t S,
                            floating *out, floating *staging) noexcept nogil:
    """The tile t back into block b of out; with ``staging`` (C * b.nb * S values, the
    block's input tile, no longer needed), through it and non-temporal stores (_streams)."""
    if staging == NULL:
        _untranspose_granules(t, b.ld, b.nb, C, S, out + b.n0 * C * S)
        return
    _untranspose_granules(t, b.ld, b.nb, C, S, staging)
    cec_stream_copy(staging, out + b.n0 * C * S, b.nb * C * S * sizeof(floating))

cdef inline void _block_gs(Strided gs, Block b, Py_ssize_t S, double *out) noexcept nogil:
    """grad_scale of block b's positions (two loops: a division per position, j // S,
    cost the 2-D few-classes path 10-50 %; with S == 1 one loop: an inner loop of one
    iteration cost 15 instructions per row, callgrind)."""
    cdef Py_ssize_t i, k
    if S == 1:
        for i in range(b.nb):
            out[i] = _at(gs, b.n0 + i, 0)
        return
    for i in range(b.nb):
        for k in range(S):
            out[i * S + k] = _at(gs, b.n0 + i, k)

# A block item's scratch tiles: on its stack when they fit in BLOCK_STACK values (the 2-D
# few-classes path, 32 KB in float64 at most; malloc and free per block of 64 rows cost
# 9 instructions per row), else from malloc (K-dim blocks of up to KDIM_BLOCK_MAX_C
# classes). NULL: out of memory.
cdef enum:
    BLOCK_STACK = 2 * CEC_SMALL_C * CEC_SMALL_C_ROWS

cdef inline floating *_scratch(Py_ssize_t n, floating *stack) noexcept nogil:
    if n <= BLOCK_STACK:
        return stack
    return <floating *>malloc(n * sizeof(floating))

cdef inline void _release(floating *p, floating *stack) noexcept nogil:
    if p != stack:
        free(p)

cdef inline void _rows_in(const floating *x, Py_ssize_t k, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t s0, Py_ssize_t gw, floating *xt) noexcept nogil:
    """Positions s0 + [0, gw) of sample k as gw rows of C classes in xt."""
    _transpose(x + k * C * S + s0, S, C, gw, xt, C)

cdef inline void _rows_out(const floating *rows, Py_ssize_t k, Py_ssize_t C, Py_ssize_t S,
                           Py_ssize_t s0, Py_ssize_t gw, floating *out) noexcept nogil:
    _transpose(rows, C, gw, C, out + k * C * S + s0, S)


# ---------------------------------------------------------------- class-index targets
cdef struct IndexArgs:
    const int64_t *target
    const double *w
    Strided gs
    double *loss
    void *g  # floating gradient, or NULL for loss only
    Py_ssize_t N, C, S
    int64_t ignore_index
    double w_total, w_scale, eps  # w_scale: see cec_weight_scale
    bint check_shift  # the tiles check their smoothing shifts (see cec_index_tile_at)
    Py_ssize_t group  # positions per group of _index_rows_item, 0: not that path
    bint stream  # the few-classes blocks write the gradient with non-temporal stores (_streams)

cdef void _index_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    """Row k (S == 1) or tile k (S > 1)."""
    cdef const IndexArgs *a = <const IndexArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, off
    cdef int64_t t
    cdef double gsb[CEC_TILE]
    cdef floating *g = <floating *>a.g
    cdef Tile tl
    if S == 1:
        t = a.target[k]
        if t == a.ignore_index:
            # Loss only: an ignored row is not read. With a gradient it must be: torch's
            # gradient there is NaN when the row's softmax is (see cec_index_row).
            a.loss[k] = 0.0
            if g == NULL:
                return
            t = -1
        a.loss[k] = _index_row(x + k * C, C, t, a.w, a.w_total, a.eps, _at(a.gs, k, 0),
                               g + k * C if g != NULL else NULL)
        return
    tl = _tile(k, S)
    off = tl.n * C * S + tl.s0
    if g != NULL:  # the loss does not read it
        _gather(a.gs, tl.n, tl.s0, tl.width, gsb)
    _index_tile(x + off, C, S, tl.width, a.target + tl.n * S + tl.s0, a.ignore_index, a.w,
                a.w_total, a.w_scale, a.eps, gsb, a.loss + tl.n * S + tl.s0,
                g + off if g != NULL else NULL, NULL, a.check_shift)

cdef void _index_block_item(Py_ssize_t k, const floating *x,
                            const void *ctx) noexcept nogil:
    """Block k of samples through a scratch tile (see Block)."""
    cdef const IndexArgs *a = <const IndexArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, j
    cdef Block b = _block(k, a.N, S)
    cdef double gsb[CEC_SMALL_C_ROWS]
    cdef floating *g = <floating *>a.g
    cdef const floating *nxt
    cdef floating stack[BLOCK_STACK]
    cdef floating *xt = _scratch(2 * C * b.ld, stack)
    cdef floating *gt = NULL
    if xt == NULL:  # out of memory: the row and tile kernels need no scratch
        for j in range(b.n0 * _n_tiles(S), (b.n0 + b.nb) * _n_tiles(S)):
            _index_item(j, x, ctx)
        return
    if g != NULL:
        gt = xt + C * b.ld
        _block_gs(a.gs, b, S, gsb)  # the loss does not read it
    nxt = _block_in(x, b, a.N, C, S, xt, NULL if a.stream else g)  # streamed: not cached
    _index_tile(<const floating *>xt, C, b.ld, b.width, a.target + b.n0 * S, a.ignore_index,
                a.w, a.w_total, a.w_scale, a.eps, gsb, a.loss + b.n0 * S, gt, nxt,
                a.check_shift)
    if gt != NULL:
        _block_out(gt, b, C, S, g, xt if a.stream else NULL)
    _release(xt, stack)

cdef void _index_rows_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    """Sample k, its positions transposed into rows, a.group at a time (see Block)."""
    cdef const IndexArgs *a = <const IndexArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, G = a.group, s0 = 0, gw, j, p
    cdef int64_t t
    cdef floating *g = <floating *>a.g
    cdef floating *xt = <floating *>malloc(2 * C * G * sizeof(floating))
    cdef floating *gt = NULL
    if xt == NULL:  # out of memory: the tile kernels need no scratch
        for j in range(k * _n_tiles(S), (k + 1) * _n_tiles(S)):
            _index_item(j, x, ctx)
        return
    if g != NULL:
        gt = xt + C * G
    while s0 < S:
        gw = min(G, S - s0)
        _rows_in(x, k, C, S, s0, gw, xt)
        for j in range(gw):
            p = k * S + s0 + j
            t = a.target[p]
            a.loss[p] = 0.0
            if t == a.ignore_index:
                if g == NULL:  # as _index_item: read only for torch's NaN gradient
                    continue
                t = -1
            a.loss[p] = _index_row(xt + j * C, C, t, a.w, a.w_total, a.eps,
                                   _at(a.gs, k, s0 + j), gt + j * C if g != NULL else NULL)
        if g != NULL:
            _rows_out(gt, k, C, S, s0, gw, g)
        s0 += gw
    free(xt)


def softmax_ce_index(const floating[:, :, ::1] logits, const int64_t[:, ::1] target,
                     const double[::1] weight, int64_t ignore_index, double label_smoothing,
                     const double[:, :] grad_scale, double[:, ::1] loss_out,
                     floating[:, :, ::1] grad_out, int n_threads):
    """Softmax cross-entropy with class-index targets, loss and gradient in one pass.

    See the kernel contract in :mod:`cecore._backends` for shapes and formulas.
    Results go into ``loss_out`` and ``grad_out`` (``grad_out=None``: loss only).
    """
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2], c
    cdef IndexArgs a
    if C == 0:
        loss_out[:, :] = 0.0  # an empty sum (validation left only ignored targets)
    if N == 0 or C == 0 or S == 0:
        return
    a.w_total = 0.0
    for c in range(C):
        a.w_total += weight[c]
    if floating is float:
        a.w_scale = cec_weight_scale(&weight[0], C, FLT_MIN, FLT_MAX)
    else:
        a.w_scale = cec_weight_scale(&weight[0], C, DBL_MIN, DBL_MAX)
    a.target, a.w, a.gs, a.loss = &target[0, 0], &weight[0], _strided(grad_scale), &loss_out[0, 0]
    # one broadcast grad_scale ('mean', 'sum'): whether its shift is outside the normal
    # range is known here, and the tiles skip the check
    a.check_shift = label_smoothing > 0 and (
        a.gs.s0 != 0 or a.gs.s1 != 0 or a.gs.data == NULL or cec_shift_outside(
            fabs(_at(a.gs, 0, 0) * (label_smoothing / C) * a.w_scale),
            FLT_MIN if floating is float else DBL_MIN, FLT_MAX if floating is float else DBL_MAX))
    a.g = NULL  # loss only
    if grad_out is not None:
        _check_grad(grad_out.shape, logits.shape, 3)
        a.g = &grad_out[0, 0, 0]
    a.N, a.C, a.S = N, C, S
    a.ignore_index, a.eps = ignore_index, label_smoothing
    a.group = _rows_group(C, S, sizeof(floating))
    a.stream = _streams(a.g, &logits[0, 0, 0], N * C * S * sizeof(floating))
    with nogil:
        if _use_blocks(C, S, sizeof(floating)):
            _run(_index_block_item[floating], _n_blocks(N, S), &logits[0, 0, 0], &a,
                 n_threads)
        elif a.group:
            _run(_index_rows_item[floating], N, &logits[0, 0, 0], &a, n_threads)
        else:
            _run(_index_item[floating], _n_items(N, S), &logits[0, 0, 0], &a, n_threads)


# ---------------------------------------------------------- class-probability targets
cdef struct ProbaArgs:
    const void *q  # floating targets
    const double *w
    Strided gs
    double *loss
    void *g  # floating gradient, or NULL for loss only
    Py_ssize_t N, C, S
    double eps
    Py_ssize_t group  # positions per group of _proba_rows_item, 0: not that path
    bint stream  # as IndexArgs.stream

cdef void _proba_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    cdef const ProbaArgs *a = <const ProbaArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, off
    cdef double gsb[CEC_TILE]
    cdef const floating *q = <const floating *>a.q
    cdef floating *g = <floating *>a.g
    cdef Tile tl
    if S == 1:
        a.loss[k] = _proba_row(x + k * C, q + k * C, C, a.w, a.eps, _at(a.gs, k, 0),
                               g + k * C if g != NULL else NULL)
        return
    tl = _tile(k, S)
    off = tl.n * C * S + tl.s0
    if g != NULL:  # the loss does not read it
        _gather(a.gs, tl.n, tl.s0, tl.width, gsb)
    _proba_tile(x + off, q + off, C, S, tl.width, a.w, a.eps, gsb,
                a.loss + tl.n * S + tl.s0, g + off if g != NULL else NULL)


cdef void _proba_block_item(Py_ssize_t k, const floating *x,
                            const void *ctx) noexcept nogil:
    """Block k of samples through scratch tiles (see Block)."""
    cdef const ProbaArgs *a = <const ProbaArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, j
    cdef Block b = _block(k, a.N, S)
    cdef double gsb[CEC_SMALL_C_ROWS]
    cdef floating *g = <floating *>a.g
    cdef floating stack[BLOCK_STACK]
    cdef floating *xt = _scratch(3 * C * b.ld, stack)
    if xt == NULL:  # out of memory: the row and tile kernels need no scratch
        for j in range(b.n0 * _n_tiles(S), (b.n0 + b.nb) * _n_tiles(S)):
            _proba_item(j, x, ctx)
        return
    # The next block is not asked for during the tile (q would need its lines too).
    _block_in(x, b, a.N, C, S, xt, NULL if a.stream else g)  # streamed: not into cache
    _block_in(<const floating *>a.q, b, a.N, C, S, xt + C * b.ld, NULL)
    if g != NULL:
        _block_gs(a.gs, b, S, gsb)  # the loss does not read it
    _proba_tile(<const floating *>xt, <const floating *>(xt + C * b.ld), C, b.ld, b.width,
                a.w, a.eps, gsb, a.loss + b.n0 * S, xt + 2 * C * b.ld if g != NULL else NULL)
    if g != NULL:
        _block_out(xt + 2 * C * b.ld, b, C, S, g, xt if a.stream else NULL)
    _release(xt, stack)

cdef void _proba_rows_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    """Sample k, its positions transposed into rows, a.group at a time (see Block)."""
    cdef const ProbaArgs *a = <const ProbaArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, G = a.group, s0 = 0, gw, j
    cdef floating *g = <floating *>a.g
    cdef floating *xt = <floating *>malloc(3 * C * G * sizeof(floating))
    cdef floating *qt
    cdef floating *gt
    if xt == NULL:  # out of memory: the tile kernels need no scratch
        for j in range(k * _n_tiles(S), (k + 1) * _n_tiles(S)):
            _proba_item(j, x, ctx)
        return
    qt, gt = xt + C * G, xt + 2 * C * G
    while s0 < S:
        gw = min(G, S - s0)
        _rows_in(x, k, C, S, s0, gw, xt)
        _rows_in(<const floating *>a.q, k, C, S, s0, gw, qt)
        for j in range(gw):
            a.loss[k * S + s0 + j] = _proba_row(xt + j * C, qt + j * C, C, a.w, a.eps,
                                                _at(a.gs, k, s0 + j),
                                                gt + j * C if g != NULL else NULL)
        if g != NULL:
            _rows_out(gt, k, C, S, s0, gw, g)
        s0 += gw
    free(xt)


def softmax_ce_proba(const floating[:, :, ::1] logits, const floating[:, :, ::1] target,
                     const double[::1] weight, double label_smoothing,
                     const double[:, :] grad_scale, double[:, ::1] loss_out,
                     floating[:, :, ::1] grad_out, int n_threads):
    """Softmax cross-entropy with class-probability targets (see :mod:`cecore._backends`).

    Results go into ``loss_out`` and ``grad_out`` (``grad_out=None``: loss only).
    """
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef ProbaArgs a
    if C == 0:
        loss_out[:, :] = 0.0  # an empty sum
    if N == 0 or C == 0 or S == 0:
        return
    a.q, a.w, a.gs, a.loss = &target[0, 0, 0], &weight[0], _strided(grad_scale), &loss_out[0, 0]
    a.g = NULL  # loss only
    if grad_out is not None:
        _check_grad(grad_out.shape, logits.shape, 3)
        a.g = &grad_out[0, 0, 0]
    a.N, a.C, a.S, a.eps = N, C, S, label_smoothing
    a.stream = _streams(a.g, &logits[0, 0, 0], N * C * S * sizeof(floating))
    a.group = _rows_group(C, S, sizeof(floating))
    with nogil:
        if _use_blocks(C, S, sizeof(floating)):
            _run(_proba_block_item[floating], _n_blocks(N, S), &logits[0, 0, 0], &a,
                 n_threads)
        elif a.group:
            _run(_proba_rows_item[floating], N, &logits[0, 0, 0], &a, n_threads)
        else:
            _run(_proba_item[floating], _n_items(N, S), &logits[0, 0, 0], &a, n_threads)


# ------------------------------------------------------------------ softmax, logsumexp
cdef struct SoftmaxArgs:
    void *out  # floating (N, C, S), or float64 (N, S) for logsumexp
    Py_ssize_t N, C, S
    int log_
    Py_ssize_t group  # positions per group of the *_rows_item, 0: not that path
    bint stream  # as IndexArgs.stream

cdef void _softmax_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, off
    cdef floating *out = <floating *>a.out
    cdef Tile tl
    if S == 1:
        _softmax_row(x + k * C, C, a.log_, out + k * C)
        return
    tl = _tile(k, S)
    off = tl.n * C * S + tl.s0
    _softmax_tile(x + off, C, S, tl.width, a.log_, out + off, NULL)


cdef void _softmax_block_item(Py_ssize_t k, const floating *x,
                              const void *ctx) noexcept nogil:
    """Block k of samples through scratch tiles (see Block)."""
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, j
    cdef Block b = _block(k, a.N, S)
    cdef floating *out = <floating *>a.out
    cdef const floating *nxt
    cdef floating stack[BLOCK_STACK]
    cdef floating *xt = _scratch(2 * C * b.ld, stack)
    if xt == NULL:  # out of memory: the row and tile kernels need no scratch
        for j in range(b.n0 * _n_tiles(S), (b.n0 + b.nb) * _n_tiles(S)):
            _softmax_item(j, x, ctx)
        return
    nxt = _block_in(x, b, a.N, C, S, xt, NULL if a.stream else out)
    _softmax_tile(<const floating *>xt, C, b.ld, b.width, a.log_, xt + C * b.ld, nxt)
    _block_out(xt + C * b.ld, b, C, S, out, xt if a.stream else NULL)
    _release(xt, stack)

cdef void _softmax_rows_item(Py_ssize_t k, const floating *x,
                             const void *ctx) noexcept nogil:
    """Sample k, its positions transposed into rows, a.group at a time (see Block)."""
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, G = a.group, s0 = 0, gw, j
    cdef floating *out = <floating *>a.out
    cdef floating *xt = <floating *>malloc(2 * C * G * sizeof(floating))
    if xt == NULL:  # out of memory: the tile kernels need no scratch
        for j in range(k * _n_tiles(S), (k + 1) * _n_tiles(S)):
            _softmax_item(j, x, ctx)
        return
    while s0 < S:
        gw = min(G, S - s0)
        _rows_in(x, k, C, S, s0, gw, xt)
        for j in range(gw):
            _softmax_row(xt + j * C, C, a.log_, xt + (G + j) * C)
        _rows_out(xt + G * C, k, C, S, s0, gw, out)
        s0 += gw
    free(xt)


def softmax(const floating[:, :, ::1] logits, bint log, floating[:, :, ::1] out,
            int n_threads):
    """``out[n, :, s]`` = softmax or (``log=True``) log-softmax of ``logits[n, :, s]``."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef SoftmaxArgs a
    if N == 0 or C == 0 or S == 0:
        return
    a.out, a.N, a.C, a.S, a.log_ = &out[0, 0, 0], N, C, S, log
    a.stream = _streams(a.out, &logits[0, 0, 0], N * C * S * sizeof(floating))
    a.group = _rows_group(C, S, sizeof(floating))
    with nogil:
        if _use_blocks(C, S, sizeof(floating)):
            _run(_softmax_block_item[floating], _n_blocks(N, S), &logits[0, 0, 0], &a,
                 n_threads)
        elif a.group:
            _run(_softmax_rows_item[floating], N, &logits[0, 0, 0], &a, n_threads)
        else:
            _run(_softmax_item[floating], _n_items(N, S), &logits[0, 0, 0], &a, n_threads)


cdef void _logsumexp_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S
    cdef double *out = <double *>a.out
    cdef Tile tl
    if S == 1:
        out[k] = _logsumexp_row(x + k * C, C)
        return
    tl = _tile(k, S)
    _logsumexp_tile(x + tl.n * C * S + tl.s0, C, S, tl.width, out + tl.n * S + tl.s0,
                    NULL)


cdef void _logsumexp_block_item(Py_ssize_t k, const floating *x,
                                const void *ctx) noexcept nogil:
    """Block k of samples through a scratch tile (see Block)."""
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, j
    cdef Block b = _block(k, a.N, S)
    cdef const floating *nxt
    cdef floating stack[BLOCK_STACK]
    cdef floating *xt = _scratch(C * b.ld, stack)
    if xt == NULL:  # out of memory: the row and tile kernels need no scratch
        for j in range(b.n0 * _n_tiles(S), (b.n0 + b.nb) * _n_tiles(S)):
            _logsumexp_item(j, x, ctx)
        return
    nxt = _block_in(x, b, a.N, C, S, xt, NULL)
    _logsumexp_tile(<const floating *>xt, C, b.ld, b.width, <double *>a.out + b.n0 * S, nxt)
    _release(xt, stack)

cdef void _logsumexp_rows_item(Py_ssize_t k, const floating *x,
                               const void *ctx) noexcept nogil:
    """Sample k, its positions transposed into rows, a.group at a time (see Block)."""
    cdef const SoftmaxArgs *a = <const SoftmaxArgs *>ctx
    cdef Py_ssize_t C = a.C, S = a.S, G = a.group, s0 = 0, gw, j
    cdef floating *xt = <floating *>malloc(C * G * sizeof(floating))
    if xt == NULL:  # out of memory: the tile kernels need no scratch
        for j in range(k * _n_tiles(S), (k + 1) * _n_tiles(S)):
            _logsumexp_item(j, x, ctx)
        return
    while s0 < S:
        gw = min(G, S - s0)
        _rows_in(x, k, C, S, s0, gw, xt)
        for j in range(gw):
            (<double *>a.out)[k * S + s0 + j] = _logsumexp_row(xt + j * C, C)
        s0 += gw
    free(xt)


def logsumexp(const floating[:, :, ::1] logits, double[:, ::1] out, int n_threads):
    """``out[n, s] = log(sum_c exp(logits[n, c, s]))`` (float64 ``out``)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1], S = logits.shape[2]
    cdef SoftmaxArgs a
    if C == 0:
        out[:, :] = -INFINITY  # log of an empty sum
    if N == 0 or C == 0 or S == 0:
        return
    a.out, a.N, a.C, a.S = &out[0, 0], N, C, S
    a.group = _rows_group(C, S, sizeof(floating))
    with nogil:
        if _use_blocks(C, S, sizeof(floating)):
            _run(_logsumexp_block_item[floating], _n_blocks(N, S), &logits[0, 0, 0], &a,
                 n_threads)
        elif a.group:
            _run(_logsumexp_rows_item[floating], N, &logits[0, 0, 0], &a, n_threads)
        else:
            _run(_logsumexp_item[floating], _n_items(N, S), &logits[0, 0, 0], &a, n_threads)


# ------------------------------------------------------------------- binary (sigmoid)
cdef struct BceArgs:
    const void *y  # floating targets
    Strided w, pw, gs
    double *loss  # (R * L) losses, or one sum per item (sums != 0)
    void *g  # floating gradient, or NULL for loss only
    Py_ssize_t R, L
    int sums

cdef inline const double *_run_of(Strided a, Py_ssize_t i, Py_ssize_t j0, Py_ssize_t width,
                                  double *buf) noexcept nogil:
    """a[i, j0:j0 + width] as a contiguous run: the array itself where it is contiguous
    along a row, else ``buf`` (already filled, once per item, for a broadcast scalar)."""
    if a.s1 == sizeof(double):
        return <const double *>(a.data + i * a.s0) + j0
    if a.s0 != 0 or a.s1 != 0:
        _gather(a, i, j0, width, buf)
    return buf

cdef void _bce_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    """Positions [k * B, (k + 1) * B) of the row-major (R, L) stream, B = CEC_REDUCE_BLOCK:
    items of positions, not of rows, so that one long row (a 1-D input) spreads over the
    threads too. They go to the vectorised C loop (cec_bce_row) in runs of at most
    CEC_TILE values within a row, with the float64 arguments as contiguous runs: read in
    place where a row is contiguous, filled once per item for a broadcast scalar,
    gathered otherwise. With ``sums``, the losses are added to CEC_LANES float64 partial
    sums (in the loop itself when all arguments are broadcast, cec_bce_sums_bcast; else
    from the run's losses, still in L1), combined in a fixed order into the item's sum:
    the order depends on the shape only, not on n_threads."""
    cdef const BceArgs *a = <const BceArgs *>ctx
    cdef Py_ssize_t p, end, i, j0, width, L = a.L
    cdef const floating *y = <const floating *>a.y
    cdef floating *g = <floating *>a.g
    cdef double wb[CEC_TILE]
    cdef double pwb[CEC_TILE]
    cdef double gsb[CEC_TILE]
    cdef double lb[CEC_TILE]
    cdef double acc[CEC_LANES]
    cdef const double *w
    cdef const double *pw
    cdef const double *gs = gsb
    cdef double *loss = lb
    cdef int j
    # A broadcast scalar (strides (0, 0)): one fill serves the whole item; when all of
    # them are, the runs go to the loop that takes them as scalars, which reads only the
    # first value (a full fill there took 2% of a call's time in a perf profile).
    cdef bint bw = a.w.s0 == 0 and a.w.s1 == 0, bpw = a.pw.s0 == 0 and a.pw.s1 == 0
    cdef bint bgs = g == NULL or (a.gs.s0 == 0 and a.gs.s1 == 0)
    cdef bint scalars = bw and bpw and bgs
    cdef Py_ssize_t fill = 1 if scalars else CEC_TILE
    if bw:
        _gather(a.w, 0, 0, fill, wb)
    if bpw:
        _gather(a.pw, 0, 0, fill, pwb)
    if g != NULL and bgs:
        _gather(a.gs, 0, 0, fill, gsb)
    for j in range(CEC_LANES):
        acc[j] = 0.0
    p = k * CEC_REDUCE_BLOCK
    end = min(a.R * L, p + CEC_REDUCE_BLOCK)
    while p < end:
        i = p // L
        j0 = p - i * L
        width = min(<Py_ssize_t>CEC_TILE, min(L - j0, end - p))
        if not a.sums:
            loss = a.loss + p
        if scalars and a.sums:  # the losses go straight to the lanes (same bits)
            _bce_sums_bcast(x + p, y + p, width, wb[0], pwb[0], gsb[0] if g != NULL else 0.0,
                            acc, g + p if g != NULL else NULL)
        elif scalars:
            _bce_row_bcast(x + p, y + p, width, wb[0], pwb[0], gsb[0] if g != NULL else 0.0,
                           loss, g + p if g != NULL else NULL)
        else:
            w = _run_of(a.w, i, j0, width, wb)
            pw = _run_of(a.pw, i, j0, width, pwb)
            if g != NULL:
                gs = _run_of(a.gs, i, j0, width, gsb)
            _bce_row(x + p, y + p, width, w, pw, gs, loss, g + p if g != NULL else NULL)
            if a.sums:
                cec_add_lanes_f64(acc, lb, width)
        p += width
    if a.sums:
        a.loss[k] = cec_sum_lanes(acc)


def bce_logits(const floating[:, ::1] input, const floating[:, ::1] target,
               const double[:, :] weight, const double[:, :] pos_weight,
               const double[:, :] grad_scale, loss_out, floating[:, ::1] grad_out,
               int n_threads):
    """Binary cross-entropy on logits, elementwise over ``(R, L)`` (see the contract)."""
    cdef Py_ssize_t R = input.shape[0], L = input.shape[1]
    cdef Py_ssize_t n_items = (R * L + CEC_REDUCE_BLOCK - 1) // CEC_REDUCE_BLOCK
    cdef double[::1] loss
    cdef BceArgs a
    a.sums = loss_out.ndim == 1
    if not loss_out.flags.c_contiguous:  # reshape would copy, and the losses go there
        raise ValueError("loss_out must be C-contiguous")
    loss = loss_out.reshape(-1)
    if loss.shape[0] != (n_items if a.sums else R * L):
        raise ValueError(f"loss_out must have shape {(n_items,)} or {(R, L)}, "
                         f"got {loss_out.shape}")
    if R == 0 or L == 0:
        return
    a.y, a.loss = &target[0, 0], &loss[0]
    a.w, a.pw, a.gs = _strided(weight), _strided(pos_weight), _strided(grad_scale)
    a.g = NULL  # loss only
    if grad_out is not None:
        _check_grad(grad_out.shape, input.shape, 2)
        a.g = &grad_out[0, 0]
    a.R, a.L = R, L
    with nogil:
        _run(_bce_item[floating], n_items, &input[0, 0], &a, n_threads)


# ------------------------------------------------------------ per-row scores
cdef struct ScoresArgs:
    const int64_t *target
    const double *w
    double *loss
    double *stats  # (N, 4)
    int64_t *rank  # (N, 2)
    Py_ssize_t N, C
    int64_t ignore_index
    double eps

cdef inline void _score_row_at(const ScoresArgs *a, const floating *x, Py_ssize_t i,
                               double *stats, int64_t *rank) noexcept nogil:
    """Row i: its loss to a.loss, its metrics to stats (4 values) and rank (2)."""
    cdef int64_t t = a.target[i]
    if t == a.ignore_index:  # not read, as in loss-only softmax_ce_index
        a.loss[i] = 0.0
        stats[0] = stats[1] = stats[2] = stats[3] = NAN
        rank[0] = -1
        rank[1] = 0
        return
    a.loss[i] = _scores_row(x + i * a.C, a.C, t, a.w, a.eps, stats, rank)

cdef inline void _score_block_at(const ScoresArgs *a, const floating *x, Py_ssize_t k,
                                 double *stats, int64_t *rank,
                                 cec_report_run *run) noexcept nogil:
    """Block k of rows of few classes through a scratch tile (as _index_block_item: the
    loss takes softmax_ce_index's steps); the tile kernel leaves the exps in the second
    half of the scratch for the metrics, which go to stats and rank (the block's rows),
    or with run to run."""
    cdef Py_ssize_t C = a.C
    cdef Block b = _block(k, a.N, 1)
    cdef floating stack[BLOCK_STACK]  # 2 * C * b.ld values: always enough here (S == 1)
    cdef const floating *nxt = _block_in(x, b, a.N, C, 1, stack, NULL)
    _scores_tile(<const floating *>stack, C, b.ld, b.width, a.target + b.n0, a.ignore_index,
                 a.w, a.eps, a.loss + b.n0, stats, rank, run, stack + C * b.ld, nxt)

cdef void _scores_item(Py_ssize_t k, const floating *x, const void *ctx) noexcept nogil:
    cdef const ScoresArgs *a = <const ScoresArgs *>ctx
    _score_row_at(a, x, k, a.stats + 4 * k, a.rank + 2 * k)

cdef void _scores_block_item(Py_ssize_t k, const floating *x,
                             const void *ctx) noexcept nogil:
    cdef const ScoresArgs *a = <const ScoresArgs *>ctx
    cdef Py_ssize_t n0 = k * CEC_SMALL_C_ROWS
    _score_block_at(a, x, k, a.stats + 4 * n0, a.rank + 2 * n0, NULL)


def softmax_ce_scores(const floating[:, ::1] logits, const int64_t[::1] target,
                      const double[::1] weight, int64_t ignore_index, double label_smoothing,
                      double[::1] loss_out, double[:, ::1] stats_out,
                      int64_t[:, ::1] rank_out, int n_threads):
    """Loss-only softmax cross-entropy of 2-D logits plus per-row metrics (see the contract)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    cdef ScoresArgs a
    # Not validation (the caller's job), only what keeps the writes inside the buffers.
    if target.shape[0] != N or loss_out.shape[0] != N or stats_out.shape[0] != N \
            or stats_out.shape[1] != 4 or rank_out.shape[0] != N or rank_out.shape[1] != 2:
        raise ValueError("softmax_ce_scores: outputs must have shapes (N,), (N, 4), (N, 2)")
    if N == 0:
        return
    if C == 0:  # no class to be: every row was ignored (as the contract's ignored rows)
        loss_out[:] = 0.0
        stats_out[:, :] = NAN
        rank_out[:, 0] = -1
        rank_out[:, 1] = 0
        return
    a.target, a.w, a.loss = &target[0], &weight[0], &loss_out[0]
    a.stats, a.rank = &stats_out[0, 0], &rank_out[0, 0]
    a.N, a.C, a.ignore_index, a.eps = N, C, ignore_index, label_smoothing
    with nogil:
        if _use_blocks(C, 1, sizeof(floating)):
            _run(_scores_block_item[floating], _n_blocks(N, 1), &logits[0, 0], &a, n_threads)
        else:
            _run(_scores_item[floating], N, &logits[0, 0], &a, n_threads)


# ------------------------------------------------------------------ report sums
cdef struct ReportArgs:
    const int64_t *rank
    const double *edges  # (n_bins + 1,)
    double *sums  # (n_blocks, 3 + n_bins)
    int64_t *counts  # (n_blocks, 4 + n_bins)
    Py_ssize_t N
    int64_t top_k, n_bins

cdef inline void _report_start(const ReportArgs *a, Py_ssize_t b, double *acc) noexcept nogil:
    cec_report_start(acc, a.sums + b * (3 + a.n_bins), a.counts + b * (4 + a.n_bins), a.n_bins)

cdef inline void _report_rows(const ReportArgs *a, Py_ssize_t b, const cec_report_run *run,
                              Py_ssize_t n, double *acc) noexcept nogil:
    """The run's n rows, the next of block b (the first at a multiple of CEC_LANES in it)."""
    cec_report_rows(run, n, a.top_k, a.n_bins, a.edges, acc, a.sums + b * (3 + a.n_bins),
                    a.counts + b * (4 + a.n_bins))

cdef inline void _report_finish(const ReportArgs *a, Py_ssize_t b,
                                const double *acc) noexcept nogil:
    cec_report_finish(acc, a.sums + b * (3 + a.n_bins))

cdef void _report_block(Py_ssize_t b, const floating *stats, const void *ctx) noexcept nogil:
    """Block b (REDUCE_BLOCK rows) of report_sums, a run of CEC_SMALL_C_ROWS rows at a
    time."""
    cdef const ReportArgs *a = <const ReportArgs *>ctx
    cdef Py_ssize_t n, i0 = b * CEC_REDUCE_BLOCK, end = min(a.N, i0 + CEC_REDUCE_BLOCK)
    cdef double acc[4 * CEC_LANES]
    cdef cec_report_run run
    _report_start(a, b, acc)
    while i0 < end:
        n = min(end - i0, <Py_ssize_t>CEC_SMALL_C_ROWS)
        cec_report_run_from(<const double *>stats + 4 * i0, a.rank + 2 * i0, n, &run)
        _report_rows(a, b, &run, n, acc)
        i0 += n
    _report_finish(a, b, acc)


def report_sums(const double[:, ::1] stats, const int64_t[:, ::1] rank, int64_t top_k,
                const double[::1] edges, double[:, ::1] sums_out, int64_t[:, ::1] counts_out,
                int n_threads):
    """The block sums behind the report's metrics (see the contract)."""
    cdef Py_ssize_t N = stats.shape[0], n_blocks = (N + CEC_REDUCE_BLOCK - 1) // CEC_REDUCE_BLOCK
    cdef Py_ssize_t n_bins = edges.shape[0] - 1
    cdef ReportArgs a
    # Not validation (the caller's job), only what keeps the reads and writes inside.
    if stats.shape[1] != 4 or rank.shape[0] != N or rank.shape[1] != 2 or n_bins < 1 \
            or sums_out.shape[0] != n_blocks or sums_out.shape[1] != 3 + n_bins \
            or counts_out.shape[0] != n_blocks or counts_out.shape[1] != 4 + n_bins:
        raise ValueError("report_sums: stats (N, 4), rank (N, 2), edges (n_bins + 1,), "
                         "sums_out (ceil(N / REDUCE_BLOCK), 3 + n_bins), counts_out "
                         "(ceil(N / REDUCE_BLOCK), 4 + n_bins), n_bins >= 1")
    if N == 0:
        return
    a.rank, a.edges, a.sums, a.counts = &rank[0, 0], &edges[0], &sums_out[0, 0], &counts_out[0, 0]
    a.N, a.top_k, a.n_bins = N, top_k, n_bins
    with nogil:
        _run(_report_block[double], n_blocks, &stats[0, 0], &a, n_threads)


# ------------------------------------------------------- scores and their report sums
cdef struct ScoresReportArgs:
    ScoresArgs scores
    ReportArgs report
    bint blocks  # rows of few classes: through scratch tiles (_score_block_at)

cdef void _scores_report_item(Py_ssize_t b, const floating *x,
                              const void *ctx) noexcept nogil:
    """Block b (REDUCE_BLOCK rows) of softmax_ce_report: CEC_SMALL_C_ROWS rows at a time,
    scored as softmax_ce_scores scores them into a run that stays in L1, then summed as
    report_sums sums them (the per-row outputs, 48 bytes a row, took memory bandwidth
    twice: written by one kernel, read back by the other)."""
    cdef const ScoresReportArgs *a = <const ScoresReportArgs *>ctx
    cdef double stats[4 * CEC_SMALL_C_ROWS]
    cdef int64_t rank[2 * CEC_SMALL_C_ROWS]
    cdef cec_report_run run
    cdef double acc[4 * CEC_LANES]
    cdef Py_ssize_t i, n, r0 = b * CEC_REDUCE_BLOCK
    cdef Py_ssize_t end = min(a.scores.N, r0 + CEC_REDUCE_BLOCK)
    _report_start(&a.report, b, acc)
    while r0 < end:
        n = min(end - r0, <Py_ssize_t>CEC_SMALL_C_ROWS)
        if a.blocks:  # (REDUCE_BLOCK is a multiple of the blocks' CEC_SMALL_C_ROWS rows)
            _score_block_at(&a.scores, x, r0 // CEC_SMALL_C_ROWS, NULL, NULL, &run)
        else:
            for i in range(n):
                _score_row_at(&a.scores, x, r0 + i, stats + 4 * i, rank + 2 * i)
            cec_report_run_from(stats, rank, n, &run)
        _report_rows(&a.report, b, &run, n, acc)
        r0 += n
    _report_finish(&a.report, b, acc)


def softmax_ce_report(const floating[:, ::1] logits, const int64_t[::1] target,
                      const double[::1] weight, int64_t ignore_index, double label_smoothing,
                      int64_t top_k, const double[::1] edges, double[::1] loss_out,
                      double[:, ::1] sums_out, int64_t[:, ::1] counts_out, int n_threads):
    """softmax_ce_scores and report_sums of its per-row outputs, without them (see the
    contract)."""
    cdef Py_ssize_t N = logits.shape[0], C = logits.shape[1]
    cdef Py_ssize_t n_blocks = (N + CEC_REDUCE_BLOCK - 1) // CEC_REDUCE_BLOCK
    cdef Py_ssize_t n_bins = edges.shape[0] - 1
    cdef ScoresReportArgs a
    # Not validation (the caller's job), only what keeps the reads and writes inside.
    if target.shape[0] != N or loss_out.shape[0] != N or C < 1 or n_bins < 1 \
            or sums_out.shape[0] != n_blocks or sums_out.shape[1] != 3 + n_bins \
            or counts_out.shape[0] != n_blocks or counts_out.shape[1] != 4 + n_bins:
        raise ValueError("softmax_ce_report: logits (N, C >= 1), target and loss_out (N,), "
                         "edges (n_bins + 1,), sums_out (ceil(N / REDUCE_BLOCK), 3 + "
                         "n_bins), counts_out (ceil(N / REDUCE_BLOCK), 4 + n_bins), n_bins >= 1")
    if N == 0:
        return
    a.scores.target, a.scores.w, a.scores.loss = &target[0], &weight[0], &loss_out[0]
    a.scores.stats, a.scores.rank = NULL, NULL  # per row: scratch of the items
    a.scores.N, a.scores.C = N, C
    a.scores.ignore_index, a.scores.eps = ignore_index, label_smoothing
    a.report.rank, a.report.edges = NULL, &edges[0]
    a.report.sums, a.report.counts = &sums_out[0, 0], &counts_out[0, 0]
    a.report.N, a.report.top_k, a.report.n_bins = N, top_k, n_bins
    a.blocks = _use_blocks(C, 1, sizeof(floating))
    with nogil:
        _run(_scores_report_item[floating], n_blocks, &logits[0, 0], &a, n_threads)


# ------------------------------------------------------------------ log_loss's pass
# Values per item of log_loss_pass (a block of whole rows): enough work per item to
# amortise a call, and enough items to spread over threads. The counts are exact sums, so
# they do not depend on this or on n_threads.
cdef enum: _LOG_LOSS_ITEM_VALUES = 1 << 16

cdef struct LogLossArgs:
    const int64_t *target  # NULL: no pick
    void *picked  # floating (N,), or NULL
    double *stats  # (n_items, 3): one line per item
    Py_ssize_t N, C, rows
    double tol, lo, hi

cdef void _log_loss_item(Py_ssize_t k, const floating *p, const void *ctx) noexcept nogil:
    cdef const LogLossArgs *a = <const LogLossArgs *>ctx
    cdef Py_ssize_t r0 = k * a.rows
    _log_loss_rows(p + r0 * a.C, min(a.rows, a.N - r0), a.C, a.tol,
                   a.target + r0 if a.target != NULL else NULL, a.lo, a.hi,
                   <floating *>a.picked + r0 if a.target != NULL else NULL,
                   a.stats + 3 * k)


def log_loss_pass(const floating[:, ::1] proba, const int64_t[::1] target, double lo,
                  double hi, double rtol, double[::1] stats_out,
                  floating[::1] picked_out, int n_threads):
    """The probability pass of :func:`cecore.metrics.log_loss` (see the contract)."""
    cdef Py_ssize_t N = proba.shape[0], C = proba.shape[1], n_items, k
    cdef LogLossArgs a
    # Not validation (the caller's job), only what keeps the writes inside the buffers.
    if stats_out.shape[0] != 3 or (target is None) != (picked_out is None) or (
            target is not None and (target.shape[0] != N or picked_out.shape[0] != N)):
        raise ValueError("log_loss_pass: stats_out must have 3 values; target and "
                         "picked_out must both be None or both have proba's row count")
    stats_out[0] = stats_out[1] = stats_out[2] = 0.0
    if N == 0:
        return
    a.N, a.C, a.tol, a.lo, a.hi = N, C, 1e-8 + rtol, lo, hi
    a.rows = max(1, _LOG_LOSS_ITEM_VALUES // max(C, 1))
    a.target, a.picked = NULL, NULL  # no pick
    if target is not None:
        a.target, a.picked = &target[0], &picked_out[0]
    n_items = (N + a.rows - 1) // a.rows
    a.stats = <double *>malloc(3 * n_items * sizeof(double))
    if a.stats == NULL:
        raise MemoryError()
    with nogil:
        _run(_log_loss_item[floating], n_items, &proba[0, 0], &a, n_threads)
    for k in range(n_items):  # exact: integer counts, far below 2**53
        stats_out[0] += a.stats[3 * k]
        stats_out[1] += a.stats[3 * k + 1]
        stats_out[2] += a.stats[3 * k + 2]
    free(a.stats)


def build_info():
    """Facts about this compiled variant: SIMD variant, OpenMP, compiler, flags, tunables."""
    version = cec_openmp_version()
    return {
        "variant": cec_variant().decode(),
        "openmp": bool(version),
        "openmp_version": version,
        "max_threads": cec_omp_max_threads(),
        "compiler": cec_compiler().decode(),
        "compile_args": cec_compile_args().decode(),
        "tile": CEC_TILE,
        "small_c": CEC_SMALL_C,
        "small_c_rows": CEC_SMALL_C_ROWS,
        "sum_block": CEC_SUM_BLOCK,
        "lanes": CEC_LANES,
        "reduce_block": CEC_REDUCE_BLOCK,
        "kdim_block_max_bytes": CEC_KDIM_BLOCK_MAX_BYTES,
        "kdim_block_max_c": CEC_KDIM_BLOCK_MAX_C,
        "kdim_rows_max_bytes": CEC_KDIM_ROWS_MAX_BYTES,
        "kdim_rows_group_bytes": CEC_KDIM_ROWS_GROUP_BYTES,
        "prefetch_min_row_bytes_amd": CEC_PREFETCH_MIN_ROW_BYTES_AMD,
        "stream_min_bytes": CEC_STREAM_MIN_BYTES,
        "bce_ahead": CEC_BCE_AHEAD,
        "exp": "range reduction + polynomial, vectorised with omp simd",
        "block_prefetch_min_row_bytes": _PREFETCH_MIN_ROW_BYTES,
    }
