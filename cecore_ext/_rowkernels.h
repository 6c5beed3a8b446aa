/* Hot loops of the Cython backend (see cecore/_backends.py for the kernel contract).
 *
 * Everything here is plain C on raw pointers; the Cython layer (_kernels.pxi) only
 * unpacks arrays, handles ignored targets and strided broadcast arguments, and runs
 * rows / tiles on OpenMP threads. The algorithms are those of cecore/_numba/_kernels.py:
 *
 *   row path  (S == 1): max pass; exp + float64 sum pass that stores exp into the
 *                       gradient row; scale pass in place. The row stays in L1/L2
 *                       between the passes, so logits are read from memory once.
 *   tile path (S > 1) : CEC_TILE positions of one sample at a time; every inner loop
 *                       runs along the contiguous position axis, so it vectorises
 *                       although the class axis is strided (no transposed copy).
 *   few classes (S == 1, C <= CEC_SMALL_C) or few positions (K-dim, see CEC_KDIM_*):
 *                       blocks of samples are transposed (cec_transpose_granules) into
 *                       one tile of positions and run through the tile path; with many
 *                       classes, a sample's positions are transposed into rows.
 *
 * Type-generic code: this header includes itself twice (the "X-macro" template idiom),
 * once with CEC_T = float and once with CEC_T = double, so each routine exists as
 * name_f32 and name_f64 without a hand-written copy. What differs per type is written
 * once per type and reached through CEC_FN: the exp, the BCE element and the register
 * transposes.
 *
 * Build notes:
 *  - No -ffast-math / -ffinite-math-only: NaN and inf logits must follow IEEE rules
 *    (a NaN logit makes its row NaN, as in torch). Where reassociation is wanted (the
 *    sums and the max), "#pragma omp simd reduction(...)" grants it for that loop only.
 *    The pragmas need -fopenmp or -fopenmp-simd; without either they are ignored and
 *    the code is still correct, only slower.
 *  - No "restrict": out == logits (in-place softmax) stays valid, every loop writes only
 *    the element it reads. The omp simd pragmas tell the compiler there are no
 *    loop-carried dependences, which is all vectorisation needs.
 */
#ifndef CEC_TEMPLATE_PASS

#ifndef CEC_ROWKERNELS_H
#define CEC_ROWKERNELS_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Tunables: cecore/_config.py defines them once and setup.py passes them as -DCEC_<NAME>.
 * CEC_TILE: positions per tile (S > 1 path, and rows of the few-classes path);
 * CEC_SMALL_C: the most classes that take the few-classes path (the .pxi reads it);
 * CEC_SMALL_C_ROWS: rows per transposed block of that path (a tile of the tile kernels);
 * CEC_SUM_BLOCK: classes per block of a row's exp + sum pass (cec_row_sumexp);
 * CEC_REDUCE_BLOCK: positions per work item of bce_logits (the .pxi reads it);
 * CEC_KDIM_*: which K-dim inputs with few positions take the transposing paths (the .pxi
 * reads them);
 * CEC_PREFETCH_MIN_ROW_BYTES_AMD: see cec_prefetch_min_row_bytes;
 * CEC_BCE_AHEAD: how far ahead the BCE loop asks for its inputs' lines (cecore/_config.py);
 * CEC_STREAM_MIN_BYTES: which outputs the few-classes blocks write with non-temporal
 * stores (the .pxi reads it; see cec_stream_copy). */
#if !defined(CEC_TILE) || !defined(CEC_SMALL_C) || !defined(CEC_SMALL_C_ROWS) || \
    !defined(CEC_SUM_BLOCK) || !defined(CEC_LANES) || !defined(CEC_REDUCE_BLOCK) || \
    !defined(CEC_KDIM_BLOCK_MAX_BYTES) || !defined(CEC_KDIM_BLOCK_MAX_C) || \
    !defined(CEC_KDIM_ROWS_MAX_BYTES) || !defined(CEC_KDIM_ROWS_GROUP_BYTES) || \
    !defined(CEC_PREFETCH_MIN_ROW_BYTES_AMD) || !defined(CEC_STREAM_MIN_BYTES) || \
    !defined(CEC_BCE_AHEAD)
#error "the CEC_* tunables come from cecore/_config.py (C_MACROS): build with setup.py"
#endif
#if CEC_KDIM_BLOCK_MAX_BYTES / 4 > CEC_SMALL_C_ROWS / 2
#error "CEC_KDIM_BLOCK_MAX_BYTES must leave room for two float32 samples in a block of CEC_SMALL_C_ROWS positions"
#endif

#if CEC_SMALL_C_ROWS > CEC_TILE
#error "CEC_SMALL_C_ROWS must not exceed CEC_TILE (its blocks are tiles of the tile kernels)"
#endif
#if CEC_REDUCE_BLOCK % CEC_SMALL_C_ROWS
#error "CEC_REDUCE_BLOCK must be a multiple of CEC_SMALL_C_ROWS (softmax_ce_report's blocks of rows are whole tiles)"
#endif
#if CEC_TILE % CEC_LANES
#error "CEC_TILE must be a multiple of CEC_LANES (cec_bce_sums_values_bcast's chunks keep the lanes)"
#endif

/* CEC_FORCE_INLINE: for a loop whose constant flags must reach every caller (gcc left a
 * four-caller CEC_INLINE function out of line, cloned for one flag, and the other stayed
 * a test per element: 'none' BCE 1.8x slower). */
#if defined(_MSC_VER)
#define CEC_INLINE static __inline
#define CEC_FORCE_INLINE static __forceinline
#define CEC_PRAGMA(x) __pragma(x)
#else
#define CEC_INLINE static inline
#define CEC_FORCE_INLINE static inline __attribute__((always_inline))
#define CEC_PRAGMA(x) _Pragma(#x)
#endif

/* The kernels Cython calls are never inlined: the serial loop and the OpenMP region
 * then run the very same machine code. Inlined into both, each copy could be
 * vectorised differently (another summation order), and results would depend on
 * n_threads. A call per row or tile costs nothing measurable. */
#if defined(_MSC_VER)
#define CEC_KERNEL static __declspec(noinline)
#else
#define CEC_KERNEL static __attribute__((noinline))
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CEC_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define CEC_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#else
#define CEC_PREFETCH(p) ((void)0)
#define CEC_PREFETCH_W(p) ((void)0)
#endif

/* The least bytes per row of a few-classes block for which that block prefetches the
 * next one: 0 (always) except on AMD CPUs, CEC_PREFETCH_MIN_ROW_BYTES_AMD there (measured
 * in cecore/_config.py: on a Zen 4 small blocks ran faster without it; in a cpu-clock
 * profile 88% of the block driver's samples sat on its prefetch loops). From the CPU's
 * vendor, once, at import (the .pxi calls it from its top level). */
CEC_INLINE ptrdiff_t cec_prefetch_min_row_bytes(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") ? CEC_PREFETCH_MIN_ROW_BYTES_AMD : 0;
#else
    return 0;
#endif
}

/* Ask for the cache lines of [p, p + bytes), to be read (write = 0) or written. The
 * few-classes path asks for its next block of rows and of the gradient while it computes
 * the current block: its transposes otherwise wait on memory, as the block's arithmetic
 * (in L1) and its memory traffic do not overlap. */
CEC_INLINE void cec_prefetch_range(const void *p, ptrdiff_t bytes, int write) {
    const char *b = (const char *)p;
    for (ptrdiff_t i = 0; i < bytes; i += 64) {
        if (write)
            CEC_PREFETCH_W(b + i);
        else
            CEC_PREFETCH(b + i);
    }
}

/* CEC_LANES (cecore._config.LANES): independent accumulators of the row max and the row
 * sums. One accumulator per vector lane would make each pass wait on the latency of one
 * add (3-4 cycles on Zen 3 and Sapphire Rapids) per vector; CEC_LANES of them, kept in a
 * small array and combined in a fixed order, keep the adders busy. The order is explicit
 * in the C code, so it does not depend on how the compiler vectorises. */

/* "#pragma omp simd" carrying an optional reduction clause, usable inside macros. */
#define CEC_SIMD CEC_PRAGMA(omp simd)
#define CEC_SIMD_SUM(v) CEC_PRAGMA(omp simd reduction(+:v))
#define CEC_SIMD_MAX(v) CEC_PRAGMA(omp simd reduction(max:v))

/* ------------------------------------------------------------------ build facts */
CEC_INLINE int cec_openmp_version(void) {
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

CEC_INLINE int cec_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#ifndef CEC_VARIANT
#define CEC_VARIANT "unknown"
#endif
#ifndef CEC_COMPILE_ARGS
#define CEC_COMPILE_ARGS "unknown"
#endif
#if defined(__clang__)
#define CEC_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define CEC_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define CEC_COMPILER "msvc"
#else
#define CEC_COMPILER "unknown"
#endif

CEC_INLINE const char *cec_variant(void) { return CEC_VARIANT; }
CEC_INLINE const char *cec_compile_args(void) { return CEC_COMPILE_ARGS; }
CEC_INLINE const char *cec_compiler(void) { return CEC_COMPILER; }

/* a * b + c, as one FMA where the build has them. gcc fuses a multiply and an add on its
 * own (-ffp-contract=fast), but where two products are summed it picks one of them to fuse,
 * and may pick differently in two loops that inline the same code: the loss of a call with
 * a gradient and of a loss-only call would differ in the last bit. Without FMA
 * instructions nothing is fused, so the plain expression is as deterministic. */
#ifdef __FMA__
#define CEC_FMAF(a, b, c) fmaf((a), (b), (c))
#define CEC_FMA(a, b, c) fma((a), (b), (c))
#else
#define CEC_FMAF(a, b, c) ((a) * (b) + (c))
#define CEC_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* ------------------------------------------------------------------------- exp
 * exp(x) for x <= 0 or NaN (the argument is always x - rowmax), as
 * exp(x) = 2**k * P(r), r = x - k ln2, with the constants of cecore/_numba/_math.py:
 *  - x is first clamped from below (NaN passes: the comparison is false) so that r stays
 *    finite for -inf;
 *  - k = round(x / ln2) comes from the "magic number" trick: adding 1.5 * 2**23 (2**52
 *    for double) rounds to an integer and leaves k in the low mantissa bits, so there is
 *    no float -> int conversion (packed double -> int64 needs AVX-512);
 *  - 2**k is built from exponent bits k + bias; for the smallest k this is 0, so
 *    exp(x < -87.68) (double: < -708.7) is flushed to exactly 0 without a select;
 *  - for NaN x the exponent bits are garbage (unsigned arithmetic: no undefined
 *    behaviour) but P(r) is NaN, and so is the product.
 * One straight line of arithmetic: gcc vectorises it in full (an earlier version with
 * three selects made gcc evaluate the polynomial twice). */
/* P(r) 2**k from the reduced argument r and t = x / ln2 + magic (k in its low bits). */
CEC_INLINE float cec_exp_tail_f32(float r, float t) {
    /* P(r) = 1 + r + r**2 Q(r) with Q of degree 4, a minimax fit of the relative error
     * on |r| <= ln2/2 (3.6e-9 with these float32 coefficients, far below float32
     * rounding; one FMA less than a degree-5 Q). */
    float p = 1.3814540580e-3f;
    p = p * r + 8.3687454462e-3f;
    p = p * r + 4.1668388993e-2f;
    p = p * r + 1.6666521132e-1f;
    p = p * r + 4.9999994040e-1f;
    p = p * r * r + r;                          /* P(r) - 1 */
    uint32_t tbits;
    memcpy(&tbits, &t, sizeof tbits);
    /* tbits - bits(magic) == k in [-127, 0]; biased exponent k + 127 in [0, 127]. */
    const uint32_t bits = (tbits - UINT32_C(0x4B400000) + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    /* (P(r) - 1) * 2**k + 2**k: the "+ 1" inside the last FMA, an operation fewer than
     * (P(r)) * 2**k and the same bits (scaling by 2**k is exact) except where the result
     * is subnormal (exp(x) < 2**-126, x below -87.3): rounded once there, not twice.
     * 0.95-1.01x the time on AVX2 code (results/ab_exp_fma_scale_avx2code_zen4.json).
     * Without FMA the product alone is subnormal below x = -81 and the kernels'
     * flush-to-zero (cec_ftz_begin) made it 0, the exp 2**k, 40 % off: there,
     * (P(r)) * 2**k, the same bits wherever the result is normal. */
#ifdef __FMA__
    return fmaf(p, scale, scale);
#else
    return (p + 1.0f) * scale;
#endif
}

CEC_INLINE float cec_exp_f32(float x) {
    const float magic = 12582912.0f;            /* 1.5 * 2**23 */
    x = x < -88.0f ? -88.0f : x;
    const float t = x * 1.44269504088896341f + magic;
    const float k = t - magic;                  /* round(x / ln2), exactly */
    /* Cody-Waite split of ln 2: k * LN2_HI is exact, and so is x minus it */
    return cec_exp_tail_f32(x - k * 0.693359375f - k * -2.12194440e-4f, t);
}

/* exp(x - m) for x <= m, with x - m's float32 rounding error e put back into the reduced
 * argument (TwoSum: d + e == x - m exactly), so that the exp is as accurate as for an
 * exact argument: rounded, d cost the exp a relative |x - m| 2**-24, which a confident
 * row's loss (the other classes' exps) kept. -e joins the low part of k ln2 in one FMA,
 * whose rounding is far below r's own. Seven vector operations more than cec_exp_f32 of
 * x - m (the TwoSum's five, a select, a subtraction): 1.03-1.10x the time of the float32
 * kernels on this Xeon (results/ab_exp_twosum_xeon.json). cec_exp_f32 keeps its own
 * reduction: through this one with e = -0, gcc did not fold fma(k, LN2_LO, -0) into the
 * old fused step, and BCE's bits changed (kernel_findings.md, forty-sixth session). */
CEC_INLINE float cec_exp_diff_f32(float x, float m) {
    const float magic = 12582912.0f;
    float d = x - m;
    const float bv = d - x, av = d - bv;
    float lo = (av - x) + (bv + m);             /* -e */
    const int low = d < -88.0f;                 /* (lo is NaN for d = -inf) */
    d = low ? -88.0f : d;
    lo = low ? 0.0f : lo;
    const float t = d * 1.44269504088896341f + magic;
    const float k = t - magic;
    return cec_exp_tail_f32((d - k * 0.693359375f) - CEC_FMAF(k, -2.12194440e-4f, lo), t);
}

CEC_INLINE double cec_exp_f64(double x) {
    const double magic = 6755399441055744.0;    /* 1.5 * 2**52 */
    x = x < -709.0 ? -709.0 : x;
    const double t = x * 1.4426950408889634 + magic;
    const double k = t - magic;
    const double r = x - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6;
    /* P(r) = 1 + r + r**2 Q(r), Q of degree 9: a Chebyshev fit of (exp(r) - 1 - r) / r**2
     * on |r| <= ln2/2 (mpmath, 50 digits), relative error 1.7e-17 (0.15 ulp) with these
     * double coefficients; two FMAs fewer than the degree-13 Taylor polynomial before. */
    double p = 2.510038549551032e-08;
    p = p * r + 2.7620088445409746e-07;
    p = p * r + 2.7557268459997064e-06;
    p = p * r + 2.4801521295954376e-05;
    p = p * r + 0.00019841269863053618;
    p = p * r + 0.0013888888917213717;
    p = p * r + 0.008333333333330062;
    p = p * r + 0.04166666666662413;
    p = p * r + 0.16666666666666669;
    p = p * r + 0.5000000000000001;
    p = p * r * r + r;
    uint64_t tbits;
    memcpy(&tbits, &t, sizeof tbits);
    /* k in [-1023, 0]; biased exponent k + 1023 in [0, 1023]. */
    const uint64_t bits = (tbits - UINT64_C(0x4338000000000000) + 1023u) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
#ifdef __FMA__
    return fma(p, scale, scale);                /* as cec_exp_tail_f32 */
#else
    return (p + 1.0) * scale;
#endif
}

/* float64's rounding of x - m costs its exp 2**-53 |x - m|: nothing to put back. */
CEC_INLINE double cec_exp_diff_f64(double x, double m) { return cec_exp_f64(x - m); }

/* e ln2 + log(1 + f) for |f| small enough that |s| <= 0.2, s = f / (2 + f) (f in
 * [-0.29, 0.5]): log(1 + f) = 2 atanh(s), whose odd series to s**21 is exact to < 2e-17
 * relative; ln2 in two parts, so that e ln2 is exact. The tail of both logs below. */
CEC_INLINE double cec_log_reduced(double e, double f) {
    const double s = f / (2.0 + f);
    const double s2 = s * s;
    double p = 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    return e * 6.93147180369123816490e-01
           + ((2.0 * s + 2.0 * s * (s2 * p)) + e * 1.90821492927058770002e-10);
}

/* log(s) for the float64 sums of exps (s >= 1: the largest term is exp(0)), in one
 * straight line of arithmetic so that the tile kernels' per-position logs vectorise (a
 * libm call per position cost more than the rest for 10 classes). s = 2**e * a with
 * a in [sqrt(1/2), sqrt(2)), f = a - 1 exact. NaN and +inf pass through. */
CEC_INLINE double cec_log_sum(double s) {
    uint64_t bits;
    memcpy(&bits, &s, sizeof bits);
    /* The biased exponent as a double without an int64 -> double conversion (none on
     * AVX2): 2**52 + E has E in its low mantissa bits. */
    const uint64_t ebits = UINT64_C(0x4330000000000000) | (bits >> 52);
    double e;
    memcpy(&e, &ebits, sizeof e);
    e -= 4503599627370496.0 + 1023.0;
    const uint64_t abits = (bits & UINT64_C(0x000FFFFFFFFFFFFF)) | UINT64_C(0x3FF0000000000000);
    double a;
    memcpy(&a, &abits, sizeof a);
    const int big = a > 1.4142135623730951;
    a = big ? 0.5 * a : a;
    e = big ? e + 1.0 : e;
    const double r = cec_log_reduced(e, a - 1.0);
    return s < INFINITY ? r : s;
}

/* log1p(z) for z = exp(-|x|) in [0, 1] (NaN passes), for the float64 binary
 * cross-entropy: 1 + z = 2**e (1 + f) with f exact and no exponent bits to take apart,
 * f = z (e = 0) below 1/2 and f = (z - 1) / 2 (e = 1; z - 1 is exact for z >= 1/2) above.
 * Through cec_log_sum(1 + z) the rounding of 1 + z had to be put back, with a second
 * division, and the exponent taken from the bits. */
CEC_INLINE double cec_log1p_unit(double z) {
    const int big = z >= 0.5;
    return cec_log_reduced(big ? 1.0 : 0.0, big ? 0.5 * (z - 1.0) : z);
}

/* lse - x, as every kernel forms it: (m - x) + log(s), torch's order (Numba: _dev). With
 * m + log(s) first, log(s) was rounded to m's ulp for logits of large magnitude (at 1e15
 * an ulp is 0.125; at 1e30 the loss became 0). */
CEC_INLINE double cec_dev(double m, double x, double log_s) {
    return (m - x) + log_s;
}

/* Whether a label-smoothing shift of magnitude r (|grad_scale * eps / C * w_scale|) needs
 * cec_index_tile's float64 products: finite, non-zero, and outside [lo, hi], the normal
 * range of the logits' type. The calls decide it once for a broadcast grad_scale. */
CEC_INLINE int cec_shift_outside(double r, double lo, double hi) {
    return r > 0.0 && r <= DBL_MAX && (r < lo || r > hi);
}

/* The tiles multiply the label-smoothing term's class weight and scale in T, one vector
 * product per element, each rounded to T first: where a weight is not a normal number of
 * T (lo = T's smallest normal, hi = its largest), both are scaled by a power of two,
 * exactly, so that neither rounds to 0 or inf where their product does not (float64
 * weights of 1e-300 under 'mean', whose scale is then 1e299, gave 0 * inf = NaN
 * gradients). Returns 1 when every finite non-zero weight is normal in T (the products
 * are then the ones from before: scaling by the largest weight would flush a weight
 * 2**126 times smaller to 0 in float32), else 2**k with the largest finite |w[c]| in
 * [2**k, 2**(k+1)), k clamped so that 2**k and 2**-k are normal doubles. Computed once
 * per call (Numba: _weight_scale). */
CEC_INLINE double cec_weight_scale(const double *w, ptrdiff_t n, double lo, double hi) {
    double top = 0.0;
    int outside = 0;
    for (ptrdiff_t c = 0; c < n; c++) {
        const double a = fabs(w[c]);
        if (a > 0.0 && a <= DBL_MAX) {
            outside |= a < lo || a > hi;
            top = a > top ? a : top;
        }
    }
    if (!outside)
        return 1.0;
    int k;
    frexp(top, &k);
    k -= 1;  /* frexp's fraction is in [0.5, 1) */
    return ldexp(1.0, k < -1000 ? -1000 : k > 1000 ? 1000 : k);
}

/* Binary cross-entropy of one element (see cec_bce_values), per type. With
 * z = exp(-|x|) in [0, 1] and lw = 1 + (pw - 1) y, computed as (1 - y) + pw y (as
 * 1 + (pw - 1) y it cancels for y near 1 and pw << 1: 1.3e-5 relative error in float32
 * at pw = 1e-3; torch's has it; for pw = 1 and y in [0, 1] both are exactly 1):
 *   loss = w ((1 - y) x + lw max(-x, 0) + lw log1p(z))
 *   grad = gs w ((1 - y) - lw sigmoid(-x))
 * float64 (cec_bce_elem_f64): log1p(z) by cec_log1p_unit; the loss's first two terms and
 * the gradient regrouped as in float32.
 * float32 (cec_bce_elem_f32): everything in float32, 8 or 16 lanes per vector (the float64
 * assembly of the loss took half the instructions of the loop). So that float32 does not
 * cancel where float64 did, the terms are regrouped per sign of x:
 *   (1 - y) x + lw max(-x, 0) = x >= 0 ? (1 - y) x : -pw y x
 *   (1 - y) - lw sigmoid(-x)  = (x >= 0 ? (1 - y) - pw y z : (1 - y) z - pw y) / (1 + z)
 * which for y in [0, 1] and pw >= 0 are sums of terms of one sign, and for y = 0 or 1
 * keep a tiny gradient's relative accuracy (1 - sigmoid(-x) rounded it to 0 before).
 * log1p(z) = z + z**2 Q(z), Q a degree-8 Chebyshev interpolant of (log1p(z) - z) / z**2
 * on [0, 1] (mpmath; 2.3e-8 relative, 1.1e-7 with float32 coefficients and FMAs, against
 * 2.1e-7 for the 2 atanh(z / (2 + z)) series before), without its division: 0.87-1.00
 * of the time with the arrays in cache (bench_ab.py, Zen 4; kernel_findings.md).
 * (x - x), 0 or NaN, keeps torch's NaN for x = -inf, where (1 - y) x + lw (-x) is
 * -inf + inf. NaN propagates.
 * Both take z = exp(-|x|) from a loop of its own (cec_bce_exps): see cec_bce_values. */
CEC_INLINE void cec_bce_elem_f32(float x, float y, float z, double w, double pw,
                                 double gs, double *loss, float *g, const int want_grad) {
    const float wf = (float)w, pwf = (float)pw, ny = 1.0f - y, pwy = pwf * y;
    const float lw = CEC_FMAF(pwf, y, ny);
    /* Every select on the sign of x first, side by side: with the gradient's select
     * after the loss, gcc threaded the two and duplicated the loss's FMA and float64
     * conversion into both branches. bench_ab.py, Zen 4, float32 loss + gradient, new /
     * old: one thread in cache avx2 0.76-0.77, avx512 0.89-0.91; two threads from memory
     * avx2 0.82-0.94, avx512 0.95-0.96 (results/ab_bce_select_zen4{,_1thread}.json). */
    const int pos = x >= 0;
    const float a = pos ? ny * x : CEC_FMAF(-pwy, x, x - x);
    const float c = pos ? ny : -pwy, d = pos ? -pwy : ny;  /* numerator c + d z */
    float p = -4.466211423e-03f;
    p = CEC_FMAF(p, z, 2.522405423e-02f);
    p = CEC_FMAF(p, z, -6.675772369e-02f);
    p = CEC_FMAF(p, z, 1.156184524e-01f);
    p = CEC_FMAF(p, z, -1.584756523e-01f);
    p = CEC_FMAF(p, z, 1.985410601e-01f);
    p = CEC_FMAF(p, z, -2.498652637e-01f);
    p = CEC_FMAF(p, z, 3.333284259e-01f);
    p = CEC_FMAF(p, z, -4.999999702e-01f);
    const float l1p = CEC_FMAF(z * z, p, z);
    *loss = (double)(wf * CEC_FMAF(lw, l1p, a));
    if (want_grad)
        *g = (float)(gs * w) * (CEC_FMAF(d, z, c) / (1.0f + z));
}

CEC_INLINE void cec_bce_elem_f64(double x, double y, double z, double w, double pw,
                                 double gs, double *loss, double *g, const int want_grad) {
    const double l1p = cec_log1p_unit(z);
    const double ny = 1.0 - y, pwy = pw * y, lw = CEC_FMA(pw, y, ny);
    /* regrouped as in float32: (1 - y) x + lw max(-x, 0), one rounding each, left the
     * rounding error of lw (-x) where the two cancel (pos_weight 0 and x = -1e20: a loss
     * of -5329) */
    const double a = x >= 0 ? ny * x : CEC_FMA(-pwy, x, x - x);
    *loss = w * CEC_FMA(lw, l1p, a);
    if (want_grad)  /* regrouped as in float32 (see above) */
        *g = gs * w * ((x >= 0 ? (1.0 - y) - pw * y * z : (1.0 - y) * z - pw * y) / (1.0 + z));
}

/* The CEC_LANES partial sums of cec_add_lanes, combined pairwise in a fixed order. */
CEC_INLINE double cec_sum_lanes(const double *acc) {
    double h[CEC_LANES / 2];
    for (int j = 0; j < CEC_LANES / 2; j++)
        h[j] = acc[j] + acc[j + CEC_LANES / 2];
    double s = 0.0;
    for (int j = 0; j < CEC_LANES / 2; j++)
        s += h[j];
    return s;
}

/* --------------------------------------------- register transposes (AVX2 builds)
 * The few-classes path runs the tile kernels on blocks of rows transposed to (classes,
 * rows) scratch. Element by element, the two transposes cost about as much as the
 * kernel; with AVX2 they go by 8 x 8 floats (4 x 4 doubles) in registers:
 * dst[i * dld + k] = src[k * sld + i] for i, k < 8 (4). */
#if defined(__AVX2__)
#include <immintrin.h>
#define CEC_HAVE_TR_BLOCK 1

CEC_INLINE void cec_tr_block_f32(const float *src, ptrdiff_t sld, float *dst,
                                 ptrdiff_t dld) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; k++)
        r[k] = _mm256_loadu_ps(src + k * sld);
    for (int k = 0; k < 8; k += 2) {  /* interleave pairs of rows */
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {  /* then pairs of pairs: 4 x 4 within each lane */
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {     /* then the two 128-bit halves */
        _mm256_storeu_ps(dst + i * dld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * dld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/* The last two of ten classes (C % 8 == 2): 8 rows x 2 columns of src to 2 rows x 8 of
 * dst (cec_tr_8x2), and back (cec_tr_2x8), in 14 instructions per 8 rows where a
 * second 8 x 8 block, overlapping the first by six classes, took 40. With the gradient's
 * compare in cec_index_tile_at: bench_ab.py --paired against the commit before, Zen 4,
 * float32 loss + gradient 0.92-0.94x the time at 65536 x 10 (in cache), 0.95-0.99x at
 * 1e6 x 10, AVX2 build; 0.88-0.91x AVX-512 build; same bits
 * (results/ab_cython_scatter_tr8x2_zen4_paired*.json). */
CEC_INLINE void cec_tr_8x2_f32(const float *src, ptrdiff_t sld, float *dst, ptrdiff_t dld) {
    __m128 a[4];  /* rows 2k and 2k + 1 */
    for (int k = 0; k < 4; k++) {
        a[k] = _mm_castpd_ps(_mm_load_sd((const double *)(src + 2 * k * sld)));
        a[k] = _mm_loadh_pi(a[k], (const __m64 *)(src + (2 * k + 1) * sld));
    }
    const __m256 r0145 = _mm256_insertf128_ps(_mm256_castps128_ps256(a[0]), a[2], 1);
    const __m256 r2367 = _mm256_insertf128_ps(_mm256_castps128_ps256(a[1]), a[3], 1);
    _mm256_storeu_ps(dst, _mm256_shuffle_ps(r0145, r2367, 0x88));
    _mm256_storeu_ps(dst + dld, _mm256_shuffle_ps(r0145, r2367, 0xDD));
}

CEC_INLINE void cec_tr_2x8_f32(const float *src, ptrdiff_t sld, float *dst, ptrdiff_t dld) {
    const __m256 c0 = _mm256_loadu_ps(src), c1 = _mm256_loadu_ps(src + sld);
    const __m256 lo = _mm256_unpacklo_ps(c0, c1), hi = _mm256_unpackhi_ps(c0, c1);
    const __m128 r01 = _mm256_castps256_ps128(lo), r45 = _mm256_extractf128_ps(lo, 1);
    const __m128 r23 = _mm256_castps256_ps128(hi), r67 = _mm256_extractf128_ps(hi, 1);
    _mm_storel_pi((__m64 *)dst, r01);
    _mm_storeh_pi((__m64 *)(dst + dld), r01);
    _mm_storel_pi((__m64 *)(dst + 2 * dld), r23);
    _mm_storeh_pi((__m64 *)(dst + 3 * dld), r23);
    _mm_storel_pi((__m64 *)(dst + 4 * dld), r45);
    _mm_storeh_pi((__m64 *)(dst + 5 * dld), r45);
    _mm_storel_pi((__m64 *)(dst + 6 * dld), r67);
    _mm_storeh_pi((__m64 *)(dst + 7 * dld), r67);
}

/* The same for doubles, whose register block is 4 x 4: the last two of C % 4 == 2
 * classes (six, ten) of 4 rows (cec_tr_4x2_f64) and back (cec_tr_2x4_f64), where a
 * third 4 x 4 block overlapping the second by two classes moved 16 values for 8.
 * bench_ab.py --paired, Zen 4, float64 1e6 x 10 and 65536 x 10 loss + gradient: AVX2
 * build 0.97-0.99x the time, AVX-512 build 0.95-1.01x, same bits
 * (results/ab_tr4x2_f64_avx2code_zen4*.json). */
CEC_INLINE void cec_tr_4x2_f64(const double *src, ptrdiff_t sld, double *dst, ptrdiff_t dld) {
    const __m256d r02 = _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(src)),
                                             _mm_loadu_pd(src + 2 * sld), 1);
    const __m256d r13 = _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(src + sld)),
                                             _mm_loadu_pd(src + 3 * sld), 1);
    _mm256_storeu_pd(dst, _mm256_unpacklo_pd(r02, r13));
    _mm256_storeu_pd(dst + dld, _mm256_unpackhi_pd(r02, r13));
}

CEC_INLINE void cec_tr_2x4_f64(const double *src, ptrdiff_t sld, double *dst, ptrdiff_t dld) {
    const __m256d c0 = _mm256_loadu_pd(src), c1 = _mm256_loadu_pd(src + sld);
    const __m256d lo = _mm256_unpacklo_pd(c0, c1), hi = _mm256_unpackhi_pd(c0, c1);
    _mm_storeu_pd(dst, _mm256_castpd256_pd128(lo));
    _mm_storeu_pd(dst + dld, _mm256_castpd256_pd128(hi));
    _mm_storeu_pd(dst + 2 * dld, _mm256_extractf128_pd(lo, 1));
    _mm_storeu_pd(dst + 3 * dld, _mm256_extractf128_pd(hi, 1));
}

CEC_INLINE void cec_tr_block_f64(const double *src, ptrdiff_t sld, double *dst,
                                 ptrdiff_t dld) {
    const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + sld);
    const __m256d r2 = _mm256_loadu_pd(src + 2 * sld), r3 = _mm256_loadu_pd(src + 3 * sld);
    const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + dld, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * dld, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * dld, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif

/* ------------------------------------------ non-temporal stores of a gradient block
 * dst[0:nbytes] = src[0:nbytes], dst's whole 64-byte lines with non-temporal stores (the
 * line goes to memory without being read first; a normal store reads it: write-allocate),
 * the partial lines at its ends with memcpy. For the few-classes blocks' outputs larger
 * than the cache (CEC_STREAM_MIN_BYTES; the .pxi's _streams says which). Integer stores
 * of 16 bytes (32 in the AVX2 builds): they move bytes, so one function serves both
 * types and any alignment of the elements. cec_stream_fence (each thread, at the end of
 * a kernel) orders them before the results are read. */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
CEC_INLINE void cec_stream_copy(const void *src, void *dst, ptrdiff_t nbytes) {
    const char *s = (const char *)src;
    char *d = (char *)dst;
#if defined(__SSE2__)
    ptrdiff_t head = (ptrdiff_t)((64 - (uintptr_t)d % 64) % 64);
    head = head < nbytes ? head : nbytes;
    memcpy(d, s, (size_t)head);
    d += head, s += head, nbytes -= head;
#if defined(__AVX2__)  /* half the instructions */
    for (; nbytes >= 64; nbytes -= 64, d += 64, s += 64)
        for (int i = 0; i < 64; i += 32)
            _mm256_stream_si256((__m256i *)(d + i),
                                _mm256_loadu_si256((const __m256i *)(s + i)));
#else
    for (; nbytes >= 64; nbytes -= 64, d += 64, s += 64)
        for (int i = 0; i < 64; i += 16)
            _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
#endif
#endif
    memcpy(d, s, (size_t)nbytes);
}

CEC_INLINE void cec_stream_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* Flush to zero (MXCSR's FTZ bit) while a kernel runs on a thread, restored after it: a
 * result below T's normal range is then 0 instead of a subnormal number, whose every
 * computation costs a microcode assist (a kernel up to 4.7x slower on the CPUs measured).
 * Under 'mean' a gradient entry e_c gs w / s (gs about 1/N) went subnormal from logit gaps
 * of 87 - ln N (75 at N = 262144): loss + gradient of 262144 x 10 float32 logits of
 * 30 N(0, 1), 7.5 % of entries subnormal, took 3.4x the time of logits of 3 N(0, 1)
 * (AVX-512 build; torch 1.2x, at its own speed). No cost where nothing is subnormal (the
 * bit is set once per call and thread); inputs are not touched (no DAZ): a subnormal
 * logit is read as itself. Other architectures: results as IEEE gives them. */
#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
CEC_INLINE unsigned int cec_ftz_begin(void) {
    const unsigned int old = _mm_getcsr();
    _mm_setcsr(old | 0x8000u);
    return old;
}
CEC_INLINE void cec_ftz_end(unsigned int old) { _mm_setcsr(old); }
#else
CEC_INLINE unsigned int cec_ftz_begin(void) { return 0; }
CEC_INLINE void cec_ftz_end(unsigned int old) { (void)old; }
#endif

/* ------------------------------------------------------------------ report sums
 * report_sums (see cecore/_backends.py) over one block of rows, a run of at most
 * CEC_SMALL_C_ROWS rows at a time. The block's entropy and Brier sums run in CEC_LANES
 * lanes (row i of the block in lane i % CEC_LANES), each a Neumaier sum in row order, so
 * that a vector of rows is one step of every lane: in row order, one sum, each row waited
 * on the last (about 50 instructions a row, a quarter of softmax_ce_report's time at ten
 * classes). The bins' confidences and hits stay in row order, in a scalar loop: a
 * scatter, and the edges' loads would be gathers. */
#if CEC_SMALL_C_ROWS % CEC_LANES
#error "CEC_SMALL_C_ROWS must be a multiple of CEC_LANES (a report run starts a lane cycle)"
#endif

/* A run's metrics, an array each (softmax_ce_scores' stats and rank columns, no lse) */
typedef struct {
    double entropy[CEC_SMALL_C_ROWS], max_p[CEC_SMALL_C_ROWS], brier[CEC_SMALL_C_ROWS];
    int64_t rank[CEC_SMALL_C_ROWS], top1[CEC_SMALL_C_ROWS];
} cec_report_run;

/* n rows of softmax_ce_scores' stats (n, 4) and rank (n, 2) into run */
CEC_INLINE void cec_report_run_from(const double *stats, const int64_t *rank, ptrdiff_t n,
                                    cec_report_run *run) {
    for (ptrdiff_t i = 0; i < n; i++) {
        run->entropy[i] = stats[4 * i];
        run->max_p[i] = stats[4 * i + 1];
        run->brier[i] = stats[4 * i + 2];
        run->rank[i] = rank[2 * i];
        run->top1[i] = rank[2 * i + 1];
    }
}

/* acc: the lanes' sums and errors, 4 * CEC_LANES values (entropy, its error, Brier, its
 * error); sums and counts: the block's rows of sums_out and counts_out. */
CEC_INLINE void cec_report_start(double *acc, double *sums, int64_t *counts,
                                 ptrdiff_t n_bins) {
    for (ptrdiff_t k = 0; k < 4 * CEC_LANES; k++)
        acc[k] = 0.0;
    for (ptrdiff_t k = 0; k < 3 + n_bins; k++)
        sums[k] = 0.0;
    for (ptrdiff_t k = 0; k < 4 + n_bins; k++)
        counts[k] = 0;
}

/* Neumaier's step: *sum + *err is the sum of the values added, to about one rounding.
 * A select, not a branch, so that a loop of them over lanes vectorises. */
CEC_INLINE void cec_add_compensated(double *sum, double *err, double v) {
    const double s = *sum, t = s + v;
    *err += fabs(s) >= fabs(v) ? (s - t) + v : (v - t) + s;
    *sum = t;
}

/* The run's n rows, the next of their block (the first at a multiple of CEC_LANES in it).
 * An ignored row adds 0 (t = s exactly, and an error of 0; the sums never hold -0), an
 * undefined one its NaNs; neither has a bin or a hit (a max p not in [0, 1] is
 * undefined: never a bin out of range). */
CEC_KERNEL void cec_report_rows(const cec_report_run *run, ptrdiff_t n, int64_t top_k,
                                ptrdiff_t n_bins, const double *edges, double *acc,
                                double *sums, int64_t *counts) {
    double *h = acc, *h_err = acc + CEC_LANES, *b = acc + 2 * CEC_LANES,
           *b_err = acc + 3 * CEC_LANES;
    const double bins = (double)n_bins;
    int64_t ignored = 0, top1 = 0, topk = 0, bin[CEC_SMALL_C_ROWS];
    for (ptrdiff_t i0 = 0; i0 < n; i0 += CEC_LANES) {
        const ptrdiff_t m = n - i0 < CEC_LANES ? n - i0 : CEC_LANES;
        CEC_SIMD
        for (ptrdiff_t l = 0; l < m; l++) {
            const int ok = run->rank[i0 + l] >= 0;
            cec_add_compensated(&h[l], &h_err[l], ok ? run->entropy[i0 + l] : 0.0);
            cec_add_compensated(&b[l], &b_err[l], ok ? run->brier[i0 + l] : 0.0);
        }
    }
    /* floor(p n_bins) here, moved by one below where rounding crossed an edge; -1: none */
    CEC_PRAGMA(omp simd reduction(+:ignored, top1, topk))
    for (ptrdiff_t i = 0; i < n; i++) {
        const int64_t r = run->rank[i], ok = r >= 0;
        const double p = run->max_p[i];
        const int64_t in = ok & (p >= 0.0) & (p <= 1.0);
        const int64_t hit = in & (run->top1[i] == 1);
        bin[i] = in ? (int64_t)(p * bins) : -1;
        ignored += 1 - ok;
        top1 += hit;
        topk += in & (r < top_k);
    }
    for (ptrdiff_t i = 0; i < n; i++) {
        int64_t k = bin[i];
        if (k < 0)
            continue;
        const double p = run->max_p[i];
        if (k > 0 && p < edges[k])
            k -= 1;
        else if (k < n_bins && p >= edges[k + 1])
            k += 1;
        sums[2 + k] += p;
        counts[3 + k] += run->top1[i] == 1;
    }
    counts[0] += ignored;
    counts[1] += top1;
    counts[2] += topk;
}

/* The block's entropy and Brier sums from the lanes: their sums added in lane order with
 * Neumaier's compensation, then their errors; an infinite or NaN sum as it is (its error
 * is then NaN or infinite), as a plain sum gives it. */
CEC_INLINE void cec_report_finish(const double *acc, double *sums) {
    for (int j = 0; j < 2; j++) {
        const double *sum = acc + 2 * j * CEC_LANES, *err = sum + CEC_LANES;
        double s = 0.0, e = 0.0;
        for (int l = 0; l < CEC_LANES; l++)
            cec_add_compensated(&s, &e, sum[l]);
        for (int l = 0; l < CEC_LANES; l++)
            e += err[l];
        sums[j] = isfinite(s) ? s + e : s;
    }
}

/* ------------------------------------------------- instantiate the type template */
#define CEC_TEMPLATE_PASS
#define CEC_T float
#define CEC_FN(name) name##_f32
#include "_rowkernels.h"
#undef CEC_T
#undef CEC_FN
#define CEC_T double
#define CEC_FN(name) name##_f64
#include "_rowkernels.h"
#undef CEC_T
#undef CEC_FN
#undef CEC_TEMPLATE_PASS

#endif /* CEC_ROWKERNELS_H */

#else  /* CEC_TEMPLATE_PASS: the body below is compiled once per CEC_T */

#define T CEC_T
#define EXP CEC_FN(cec_exp)
#define EXP_DIFF CEC_FN(cec_exp_diff)
/* The squares of exps e_c in (0, 1] are summed as (e_c SQ)**2, SQ = 2**60 for float32 and
 * 2**480 for float64, and the sum multiplied by SQ**-2 in float64 (exact: powers of two).
 * A plain e_c**2 is below the normal range for e_c < 1.1e-19 (float32: x_c - m < -43.7):
 * first a subnormal number, whose every computation cost a microcode assist (scoring
 * 32 x 50257 float32 logits of 12 N(0, 1) took 3.6x the time of 3 N(0, 1), AVX-512
 * build), and since the kernels flush to zero, 0. The scaled squares keep such a row's
 * Brier score: for float32 logits [0, -50] it is 2 e**2 = 3.72e-44 (a float64 reference's
 * value to 2e-8); with e2 flushed it would be half that. Scaled, a square is subnormal
 * only where e_c itself is at most 2**-123 (x_c - m < -85.3) and, being at most 2**120
 * (float32) or 2**960, a sum of CEC_SMALL_C or 2**63 of them does not overflow; bits
 * unchanged elsewhere. */
#define SQ60 ((T)(1ULL << 60))
#define SQ (sizeof(T) == 4 ? SQ60 : SQ60 * SQ60 * SQ60 * SQ60 * SQ60 * SQ60 * SQ60 * SQ60)
#define SQ_UNDO (1.0 / ((double)SQ * (double)SQ))

/* =========================================================== row primitives */

/* max_c x[c] in CEC_LANES independent running maxima. "a > m ? a : m" is one vector max
 * instruction that keeps m when a is NaN, so a NaN may or may not end up in the max; it
 * does not matter, as a NaN anywhere in the row makes every exp(x[c] - max) sum NaN.
 * With above != NULL it also counts, in *above, the classes whose logit is larger than
 * xt (softmax_ce_scores's rank, out of the pass that reads the row from memory anyway).
 * Inlined with a constant above, the count disappears where it is not asked for, as
 * want_grad does in cec_bce_values. int32 counts (C < 2**31): with int64 ones, AVX2
 * widens every compare mask. */
CEC_INLINE T CEC_FN(cec_row_max_count)(const T *x, ptrdiff_t n, T xt, int32_t *above) {
    T acc[CEC_LANES];
    int32_t cnt[CEC_LANES];
    for (int j = 0; j < CEC_LANES; j++) {
        acc[j] = x[0];
        cnt[j] = 0;
    }
    ptrdiff_t c = 0;
    for (; c + CEC_LANES <= n; c += CEC_LANES) {
        CEC_SIMD
        for (int j = 0; j < CEC_LANES; j++) {
            acc[j] = x[c + j] > acc[j] ? x[c + j] : acc[j];
            if (above)
                cnt[j] += x[c + j] > xt;
        }
    }
    for (int j = 0; c + j < n; j++) {
        acc[j] = x[c + j] > acc[j] ? x[c + j] : acc[j];
        if (above)
            cnt[j] += x[c + j] > xt;
    }
    T m = acc[0];
    int32_t total = cnt[0];
    for (int j = 1; j < CEC_LANES; j++) {
        m = acc[j] > m ? acc[j] : m;
        total += cnt[j];
    }
    if (above)
        *above = total;
    return m;
}

CEC_INLINE T CEC_FN(cec_row_max)(const T *x, ptrdiff_t n) {
    return CEC_FN(cec_row_max_count)(x, n, 0, NULL);
}

/* dst[c * dld + j] = src[j * sld + c] for j < rows, c < cols: blocks of rows of few
 * classes to (classes, rows) scratch tiles and back. Full register blocks where the
 * build has them (cec_tr_block); where rows or cols is not a multiple of the block, the
 * last block overlaps the one before it and writes some values twice, the same values
 * (callgrind, AVX2, 10 float32 classes: 26 instructions per row with classes 8 and 9
 * copied element by element, 11 with the overlapping block); rows of C % 8 == 2 float32
 * or C % 4 == 2 float64 classes (ten) take their last two with cec_tr_8x2 / cec_tr_2x8
 * (cec_tr_4x2 / cec_tr_2x4) instead.
 * Element by element only when a side is shorter than a block, the inner loop along the
 * longer side. Pure copies, so the results do not depend on the build. */
CEC_INLINE void CEC_FN(cec_transpose)(const T *src, ptrdiff_t sld, ptrdiff_t rows,
                                      ptrdiff_t cols, T *dst, ptrdiff_t dld) {
#ifdef CEC_HAVE_TR_BLOCK
    const ptrdiff_t v = 32 / (ptrdiff_t)sizeof(T);
    if (rows >= v && cols > v && cols % v == 2) {  /* into a tile */
        for (ptrdiff_t j0 = 0; j0 < rows; j0 += v) {
            const ptrdiff_t j = j0 + v <= rows ? j0 : rows - v;
            for (ptrdiff_t c = 0; c + v <= cols; c += v)
                CEC_FN(cec_tr_block)(src + j * sld + c, sld, dst + c * dld + j, dld);
            if (sizeof(T) == 4)
                cec_tr_8x2_f32((const float *)(src + j * sld + cols - 2), sld,
                               (float *)(dst + (cols - 2) * dld + j), dld);
            else
                cec_tr_4x2_f64((const double *)(src + j * sld + cols - 2), sld,
                               (double *)(dst + (cols - 2) * dld + j), dld);
        }
        return;
    }
    if (cols >= v && rows > v && rows % v == 2) {  /* out of a tile */
        for (ptrdiff_t c0 = 0; c0 < cols; c0 += v) {
            const ptrdiff_t c = c0 + v <= cols ? c0 : cols - v;
            for (ptrdiff_t j = 0; j + v <= rows; j += v)
                CEC_FN(cec_tr_block)(src + j * sld + c, sld, dst + c * dld + j, dld);
            if (sizeof(T) == 4)
                cec_tr_2x8_f32((const float *)(src + (rows - 2) * sld + c), sld,
                               (float *)(dst + c * dld + rows - 2), dld);
            else
                cec_tr_2x4_f64((const double *)(src + (rows - 2) * sld + c), sld,
                               (double *)(dst + c * dld + rows - 2), dld);
        }
        return;
    }
    if (rows >= v && cols >= v) {
        for (ptrdiff_t j0 = 0; j0 < rows; j0 += v) {
            const ptrdiff_t j = j0 + v <= rows ? j0 : rows - v;
            for (ptrdiff_t c0 = 0; c0 < cols; c0 += v) {
                const ptrdiff_t c = c0 + v <= cols ? c0 : cols - v;
                CEC_FN(cec_tr_block)(src + j * sld + c, sld, dst + c * dld + j, dld);
            }
        }
        return;
    }
#endif
    if (cols < rows) {
        for (ptrdiff_t c = 0; c < cols; c++)
            for (ptrdiff_t j = 0; j < rows; j++)
                dst[c * dld + j] = src[j * sld + c];
    } else {
        for (ptrdiff_t j = 0; j < rows; j++)
            for (ptrdiff_t c = 0; c < cols; c++)
                dst[c * dld + j] = src[j * sld + c];
    }
}

/* dst[c * dld + j * S + k] = src[(j * cols + c) * S + k] for j < rows, c < cols, k < S:
 * a block of `rows` samples of a K-dim input, each a (cols, S) array (classes, positions),
 * to (classes, rows * S positions) scratch, or back with cec_untranspose_granules. The
 * common S get a constant inner loop, which gcc turns into whole-granule moves. */
#define CEC_GRANULES(SRC_AT, DST_AT)                                                    \
    switch (S) {                                                                        \
    case 2: CEC_GRANULE_LOOP(2, SRC_AT, DST_AT); break;                                 \
    case 4: CEC_GRANULE_LOOP(4, SRC_AT, DST_AT); break;                                 \
    case 8: CEC_GRANULE_LOOP(8, SRC_AT, DST_AT); break;                                 \
    default: CEC_GRANULE_LOOP(S, SRC_AT, DST_AT); break;                                \
    }
#define CEC_GRANULE_LOOP(W, SRC_AT, DST_AT)                                             \
    for (ptrdiff_t j = 0; j < rows; j++)                                                \
        for (ptrdiff_t c = 0; c < cols; c++)                                            \
            for (ptrdiff_t k = 0; k < (W); k++)                                         \
                DST_AT = SRC_AT

CEC_INLINE void CEC_FN(cec_transpose_granules)(const T *src, ptrdiff_t rows, ptrdiff_t cols,
                                               ptrdiff_t S, T *dst, ptrdiff_t dld) {
    if (S == 1) {  /* rows of few classes: the register transposes */
        CEC_FN(cec_transpose)(src, cols, rows, cols, dst, dld);
        return;
    }
    CEC_GRANULES(src[(j * cols + c) * S + k], dst[c * dld + j * S + k])
}

CEC_INLINE void CEC_FN(cec_untranspose_granules)(const T *src, ptrdiff_t sld, ptrdiff_t rows,
                                                 ptrdiff_t cols, ptrdiff_t S, T *dst) {
    if (S == 1) {
        CEC_FN(cec_transpose)(src, sld, cols, rows, dst, cols);
        return;
    }
    CEC_GRANULES(src[c * sld + j * S + k], dst[(j * cols + c) * S + k])
}
#undef CEC_GRANULE_LOOP
#undef CEC_GRANULES

/* acc[c % CEC_LANES] += v[c] in float64 (v is a block of CEC_TILE values at most, so
 * lane j always receives the block's elements j, j + CEC_LANES, ...). */
CEC_INLINE void CEC_FN(cec_add_lanes)(double *acc, const T *v, ptrdiff_t len) {
    ptrdiff_t c = 0;
    for (; c + CEC_LANES <= len; c += CEC_LANES) {
        CEC_SIMD
        for (int j = 0; j < CEC_LANES; j++)
            acc[j] += (double)v[c + j];
    }
    for (int j = 0; c + j < len; j++)
        acc[j] += (double)v[c + j];
}

/* For softmax_ce_scores, over one block of exps e still in L1: *ex += sum_c e_c (x_c - m)
 * over the classes with e_c > 0 (p log p -> 0 for the others) and *e2 += sum_c e_c**2,
 * and with acc != NULL also cec_add_lanes(acc, e, len) (inlined with a constant acc, the
 * sum disappears where it is not asked for): in the same loop, each exp is loaded once
 * (bench_ab, Zen 4, scoring kernel, one loop / two, four runs: 0.86-1.04 at 65536 x 1000
 * and 4096 x 50257, both builds, same bits: a few percent at most, within the noise).
 * x is clamped to lo = m - 1e30 first: where e_c > 0, x_c > m - 746 >= lo is left as it
 * is (where m - 1e30 rounds to m, every x_c < m has e_c = 0); where e_c = 0 the term is
 * 0 * (finite), also for x_c = -inf (0 * -inf would be NaN). So a vmaxps and an FMA,
 * where "e_c > 0 ? e_c (x_c - m) : 0" took a compare, a multiply, a mask and an add
 * (written as a clamp of x - m at a constant, gcc emitted a compare and a blend).
 * AVX2 build: 0.93-0.96x the scoring kernel's time at 2 threads, loss-only controls
 * 0.94-1.21x, so not told apart from the noise (ab_scores_moments_clamp_zen4*.json).
 * CEC_LANES sums in the logits' type (for float32, CEC_SUM_BLOCK / CEC_LANES terms each,
 * about 1e-7 relative; float64 per element doubled the kernel's time), added in float64 in
 * a fixed order. x is read whether or not e_c > 0: read only under the condition, gcc
 * made it a masked load (vmaskmovps), and its "omp simd reduction" of two sums kept them
 * on the stack, a store-to-load chain per vector. Harness, AVX2 build, 4096 x 50257
 * float32 on 2 threads: the scoring kernel went from 1.6x to 1.28x the loss-only time. */
CEC_INLINE void CEC_FN(cec_moments)(double *acc, const T *e, const T *x, T m, ptrdiff_t len,
                                    double *ex, double *e2) {
    const T lo = m + (T)-1e30;
    T a[CEC_LANES], q[CEC_LANES];
    for (int j = 0; j < CEC_LANES; j++)
        a[j] = q[j] = 0;
    ptrdiff_t c = 0;
    for (; c + CEC_LANES <= len; c += CEC_LANES) {
        CEC_SIMD
        for (int j = 0; j < CEC_LANES; j++) {
            const T v = e[c + j], xc = x[c + j] > lo ? x[c + j] : lo, vs = v * SQ;
            if (acc)
                acc[j] += (double)v;
            a[j] += v * (xc - m);
            q[j] += vs * vs;
        }
    }
    for (int j = 0; c + j < len; j++) {
        const T v = e[c + j], xc = x[c + j] > lo ? x[c + j] : lo, vs = v * SQ;
        if (acc)
            acc[j] += (double)v;
        a[j] += v * (xc - m);
        q[j] += vs * vs;
    }
    double sa = 0.0, sq = 0.0;
    for (int j = 0; j < CEC_LANES; j++) {
        sa += (double)a[j];
        sq += (double)q[j];
    }
    *ex += sa;
    *e2 += sq;  /* scaled by SQ**2 (see SQ) */
}

/* sum_c exp(x[c] - m) in float64; also stores exp(x[c] - m) in e[c] when e != NULL,
 * and with ex != NULL accumulates *ex = sum_c e_c (x_c - m) (classes with e_c = 0 add
 * nothing, as p log p -> 0) and *e2 = sum_{c != t} e_c**2 for softmax_ce_scores. The
 * target's exp is left out of the block's moments (its entropy term is added in float64):
 * in a confident row e_t ~ 1, and next to it the other squares rounded away in the
 * block's float32 sums (Brier scores 1e-3 off where they were 1e-5).
 * Per block of CEC_SUM_BLOCK classes the exps are written (to e, or to scratch) by one loop
 * and summed in float64 by another: fused, the float64 adds would set the vector width
 * and halve the float32 exp's. The same two loops run with or without e (and ex), so
 * loss-only, loss+gradient and scoring calls sum in the same order. */
CEC_INLINE double CEC_FN(cec_row_sumexp_impl)(const T *x, T m, T *e, ptrdiff_t n,
                                              ptrdiff_t t, double *ex, double *e2) {
    T scratch[CEC_SUM_BLOCK];
    double acc[CEC_LANES] = {0.0}, a = 0.0, q = 0.0;
    for (ptrdiff_t b = 0; b < n; b += CEC_SUM_BLOCK) {
        const ptrdiff_t len = n - b < CEC_SUM_BLOCK ? n - b : CEC_SUM_BLOCK;
        T *dst = e ? e + b : scratch;
        const T *xb = x + b;
        /* Ask for the next row's matching cache lines while this block computes: the
         * next row's max pass then reads from cache, and memory traffic overlaps with
         * the exps instead of alternating with them (measured: 65536 x 1000 float32
         * loss+grad 47 -> 40 ms on 2 threads). Past the last row a prefetch is harmless. */
        for (ptrdiff_t i = 0; i < len; i += 64 / (ptrdiff_t)sizeof(T))
            CEC_PREFETCH(xb + n + i);
        CEC_SIMD
        for (ptrdiff_t c = 0; c < len; c++)
            dst[c] = EXP_DIFF(xb[c], m);
        if (!ex) {
            CEC_FN(cec_add_lanes)(acc, dst, len);
        } else if (!(t >= b && t < b + len)) {  /* the block's exps are still in L1 */
            CEC_FN(cec_moments)(acc, dst, xb, m, len, &a, &q);
        } else {
            CEC_FN(cec_add_lanes)(acc, dst, len);
            const T et = dst[t - b];
            dst[t - b] = 0;
            CEC_FN(cec_moments)(NULL, dst, xb, m, len, &a, &q);
            dst[t - b] = et;
            if (et > 0)
                a += (double)et * (double)(xb[t - b] - m);
        }
    }
    if (ex) {
        *ex = a;
        *e2 = q * SQ_UNDO;
    }
    return cec_sum_lanes(acc);
}

CEC_INLINE double CEC_FN(cec_row_sumexp)(const T *x, T m, T *e, ptrdiff_t n) {
    return CEC_FN(cec_row_sumexp_impl)(x, m, e, n, -1, NULL, NULL);
}

/* sum_c w[c] * (lse - x[c]) in float64: the label-smoothing part of the loss. Summed
 * class by class, not as sum(w) * lse - sum(w * x): with an infinite weight that would
 * be inf - inf = NaN where torch's answer is inf. */
CEC_INLINE double CEC_FN(cec_row_wdev)(const T *x, const double *w, T m, double log_s,
                                       ptrdiff_t n) {
    double s = 0.0;
    CEC_SIMD_SUM(s)
    for (ptrdiff_t c = 0; c < n; c++)
        s += w[c] * cec_dev(m, x[c], log_s);
    return s;
}

/* ======================================================== row kernels (S == 1) */

/* Class-index target t. Returns the loss; if g != NULL writes the gradient row, times
 * gs, into g. t < 0 marks an ignored row: loss 0 and, as torch gives, gradient 0, or
 * NaN where the row's softmax is NaN (NaN or +inf logits, or all -inf).
 * Without label smoothing g may be x itself (a gradient written over the logits): the
 * target's logit is read before the exp pass overwrites the row, and nothing else of x
 * is read after it. */
CEC_KERNEL double CEC_FN(cec_index_row)(const T *x, ptrdiff_t n, ptrdiff_t t,
                                        const double *w, double w_total, double eps,
                                        double gs, T *g) {
    const double smooth = eps / (double)n;
    const double x_t = t >= 0 ? (double)x[t] : 0.0;
    const T m = CEC_FN(cec_row_max)(x, n);
    const double s = CEC_FN(cec_row_sumexp)(x, m, g, n);
    if (t < 0) {
        if (g) {
            /* torch's gradient of an ignored row: 0, or NaN where the softmax is NaN, or
             * (with label smoothing, which multiplies every class weight by the row's
             * zero upstream gradient) where a weight is NaN or infinite. */
            const T zero = (T)(s * 0.0 + (eps > 0.0 ? w_total * 0.0 : 0.0));
            CEC_SIMD
            for (ptrdiff_t c = 0; c < n; c++)
                g[c] = g[c] * zero;
        }
        return 0.0;
    }
    const double log_s = log(s);
    const double w_t = w[t];
    double loss = (1.0 - eps) * w_t * cec_dev(m, x_t, log_s);
    /* The smoothing terms only when eps > 0: 0 * w_total would turn a NaN weight of
     * a class that is not the target into a NaN gradient for every row (torch: none). */
    if (eps > 0.0)
        loss += smooth * CEC_FN(cec_row_wdev)(x, w, m, log_s, n);
    if (g) {
        const double w_sum = eps > 0.0 ? (1.0 - eps) * w_t + smooth * w_total : w_t;
        const double q = gs * w_sum / s;
        const T coef = (T)q;
        if (eps > 0.0) {
            const double shift = gs * smooth;
            CEC_SIMD
            for (ptrdiff_t c = 0; c < n; c++)
                g[c] = g[c] * coef - (T)(shift * w[c]);
        } else {
            CEC_SIMD
            for (ptrdiff_t c = 0; c < n; c++)
                g[c] = g[c] * coef;
        }
        /* Without smoothing, when the target holds the max (e_t = exp(0) = 1 exactly), its
         * entry is q (1 - s) = gs w_t (p_t - 1), formed in double: as e_t * coef - gs w_t
         * in T it cancelled to T's rounding of p_t (float32: 6 % of the row's largest
         * entry at a logit gap of 16, 0 from 17.3). Otherwise p_t <= 1/2: nothing cancels. */
        if (eps == 0.0 && x_t == (double)m)
            g[t] = (T)((1.0 - s) * q);
        else
            g[t] -= (T)(gs * (1.0 - eps) * w_t);
    }
    return loss;
}

/* (entropy, max p, Brier score) of a row from its sum of exps s (> 0, finite),
 * log_s = log(s), ex = sum_c e_c (x_c - m), e2 = sum_{c != t} e_c**2 and the target's exp
 * e_t: the Brier score as sum_{c != t} p_c**2 + (1 - p_t)**2 with 1 - p_t = (s - e_t) / s
 * (exact enough in float64); e2 / s**2 - 2 p_t + 1 cancelled for confident rows. One
 * division, by s, and products by its reciprocal: four divisions, vectorised, took a
 * tenth of softmax_ce_report's time at ten classes. One function for the row and the
 * tile kernels (three outputs, not an array: the tile's loop of them vectorises only
 * so). */
CEC_FORCE_INLINE void CEC_FN(cec_scores_stats)(double s, double log_s, double ex,
                                               double e2, double e_t, double *entropy,
                                               double *max_p, double *brier) {
    const double r = 1.0 / s;
    const double rest = (s - e_t) * r;
    *entropy = log_s - ex * r;
    *max_p = r;
    *brier = e2 * r * r + rest * rest;
}

/* An infinite max is the answer itself (as torch and scipy give), not inf - inf,
 * unless a NaN is there too. Returns m, or NaN. Only runs for an infinite max. */
CEC_INLINE double CEC_FN(cec_infinite_lse)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                           T m) {
    for (ptrdiff_t c = 0; c < n; c++)
        if (isnan(x[c * stride]))
            return (double)x[c * stride];
    return (double)m;
}

/* Loss-only cec_index_row (the same steps, so the same loss bit for bit) plus the row's
 * metrics (see softmax_ce_scores in cecore/_backends.py): stats = (entropy, max p,
 * Brier score, log-sum-exp), rank = (classes with a larger logit than the target's, 1 if
 * the first largest logit is the target's). Undefined softmax (NaN or +inf logits): NaN
 * entropy, max p and Brier score, and rank (n, 0); the log-sum-exp is cec_logsumexp_row's
 * (+inf for a +inf logit, NaN for a NaN). */
CEC_KERNEL double CEC_FN(cec_scores_row)(const T *x, ptrdiff_t n, ptrdiff_t t,
                                         const double *w, double eps, double *stats,
                                         int64_t *rank) {
    const double smooth = eps / (double)n;
    const T xt = x[t];
    int32_t above, tied_before = 0;
    const T m = CEC_FN(cec_row_max_count)(x, n, xt, &above);
    double ex, e2;
    const double s = CEC_FN(cec_row_sumexp_impl)(x, m, NULL, n, t, &ex, &e2);
    const double log_s = log(s);
    double loss = (1.0 - eps) * w[t] * cec_dev(m, x[t], log_s);
    if (eps > 0.0)
        loss += smooth * CEC_FN(cec_row_wdev)(x, w, m, log_s, n);
    stats[3] = isinf(m) ? CEC_FN(cec_infinite_lse)(x, n, 1, m) : (double)m + log_s;
    if (!(s < INFINITY)) {
        stats[0] = stats[1] = stats[2] = NAN;
        rank[0] = n;
        rank[1] = 0;
        return loss;
    }
    CEC_FN(cec_scores_stats)(s, log_s, ex, e2, (double)EXP_DIFF(x[t], m), &stats[0], &stats[1],
                             &stats[2]);
    if (above == 0) {  /* only then can an earlier tie take the top spot */
        CEC_SIMD_SUM(tied_before)
        for (ptrdiff_t c = 0; c < t; c++)
            tied_before += x[c] == xt;
    }
    rank[0] = above;
    rank[1] = above == 0 && tied_before == 0;
    return loss;
}

/* Probability targets q (before smoothing). Returns the loss; gradient as above. */
CEC_KERNEL double CEC_FN(cec_proba_row)(const T *x, const T *q, ptrdiff_t n,
                                        const double *w, double eps, double gs, T *g) {
    const double smooth = eps / (double)n;
    const T m = CEC_FN(cec_row_max)(x, n);
    const double s = CEC_FN(cec_row_sumexp)(x, m, g, n);
    const double log_s = log(s);
    /* Summed class by class (see cec_row_wdev), so that an infinite weight gives torch's
     * inf rather than inf - inf. */
    double wq = 0.0, loss = 0.0;
    CEC_PRAGMA(omp simd reduction(+:wq, loss))
    for (ptrdiff_t c = 0; c < n; c++) {
        const double v = w[c] * ((1.0 - eps) * (double)q[c] + smooth);
        wq += v;
        loss += v * cec_dev(m, x[c], log_s);
    }
    if (g) {
        const T coef = (T)(gs * wq / s);
        CEC_SIMD
        for (ptrdiff_t c = 0; c < n; c++) {
            const double qc = (1.0 - eps) * (double)q[c] + smooth;
            g[c] = g[c] * coef - (T)(gs * w[c] * qc);
        }
    }
    return loss;
}

/* out = softmax(x) or log_softmax(x) of one row; log_softmax as (x - m) - log(s), like
 * the losses (see cec_row_wdev). */
CEC_KERNEL void CEC_FN(cec_softmax_row)(const T *x, ptrdiff_t n, int log_, T *out) {
    const T m = CEC_FN(cec_row_max)(x, n);
    if (log_) {
        /* The exps go to out (overwritten below) unless out is x, which the last loop
         * reads: written while the exps are computed, out's lines are fetched in the
         * shadow of that loop rather than by the last one's stores (which took 1.2-1.4x
         * the time on the row path: bench_ab). */
        const double s = CEC_FN(cec_row_sumexp)(x, m, out != x ? out : NULL, n);
        const T log_s = (T)log(s);
        CEC_SIMD
        for (ptrdiff_t c = 0; c < n; c++)
            out[c] = (x[c] - m) - log_s;
    } else {
        const double s = CEC_FN(cec_row_sumexp)(x, m, out, n);
        const T inv = (T)(1.0 / s);
        CEC_SIMD
        for (ptrdiff_t c = 0; c < n; c++)
            out[c] = out[c] * inv;
    }
}

CEC_KERNEL double CEC_FN(cec_logsumexp_row)(const T *x, ptrdiff_t n) {
    const T m = CEC_FN(cec_row_max)(x, n);
    if (isinf(m))
        return CEC_FN(cec_infinite_lse)(x, n, 1, m);
    return (double)m + log(CEC_FN(cec_row_sumexp)(x, m, NULL, n));
}

/* log_loss's checks over `rows` rows of n probabilities (cecore.metrics.log_loss):
 * stats[0] = values outside [0, 1]; stats[1] = rows whose float64 sum s is finite with
 * |s - 1| > tol; stats[2] = rows whose sum is not finite (a NaN or inf, or overflow). If
 * target != NULL, also picked[i] = clip(p[i, target[i]], lo, hi) while the row is in
 * cache (a NaN stays NaN). The count of outside values is a double, like the sum, so
 * that the loop vectorises and runs at memory speed. */
CEC_KERNEL void CEC_FN(cec_log_loss_rows)(const T *p, ptrdiff_t rows, ptrdiff_t n,
                                          double tol, const int64_t *target, T lo, T hi,
                                          T *picked, double *stats) {
    double outside = 0.0, bad = 0.0, non_finite = 0.0;
    for (ptrdiff_t i = 0; i < rows; i++) {
        const T *row = p + i * n;
        double s = 0.0, row_outside = 0.0;
        CEC_PRAGMA(omp simd reduction(+:s, row_outside))
        for (ptrdiff_t c = 0; c < n; c++) {
            s += (double)row[c];
            row_outside += (row[c] > (T)1 ? 1.0 : 0.0) + (row[c] < (T)0 ? 1.0 : 0.0);
        }
        outside += row_outside;
        if (!(fabs(s) < INFINITY))
            non_finite += 1.0;
        else if (fabs(s - 1.0) > tol)
            bad += 1.0;
        if (target) {
            T v = row[target[i]];
            v = lo > v ? lo : v;
            picked[i] = hi < v ? hi : v;
        }
    }
    stats[0] = outside;
    stats[1] = bad;
    stats[2] = non_finite;
}

/* ======================================================== tile kernels (S > 1)
 * x points at logits[n, 0, s0]; class c of position j is x[c * stride + j], with
 * stride = S and j < width <= CEC_TILE. Per-position outputs (loss, target, grad_scale)
 * are contiguous runs of `width` values. Scratch lives on the stack (a few KB). */

/* m[j] = max_c x[c, j], s[j] = sum_c exp(x[c, j] - m[j]) and log_s[j] = log(s[j]); exp
 * stored in e if given. With `next` (a transposed block's successor, n * width values
 * from there), each class's exp loop first asks for that class's share of its lines:
 * spread over the tile's arithmetic, which runs from L1, the requests overlap it, where
 * on AMD one burst of them before the block's transpose cost more than it saved
 * (kernel_findings.md, twelfth and twenty-fourth sessions). Always inlined, so that
 * cec_index_tile's copy for full blocks gets its loops with constant lengths too. */
CEC_FORCE_INLINE void CEC_FN(cec_tile_max_sumexp)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                                  ptrdiff_t width, T *m, double *s, T *e,
                                                  double *log_s, const T *next) {
    for (ptrdiff_t j = 0; j < width; j++) {
        m[j] = x[j];
        s[j] = 0.0;
    }
    for (ptrdiff_t c = 1; c < n; c++) {
        const T *xc = x + c * stride;
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++)
            m[j] = xc[j] > m[j] ? xc[j] : m[j];   /* as the Numba tiles */
    }
    /* exp and the float64 accumulation are separate loops (see cec_row_sumexp). */
    T scratch[CEC_TILE];
    for (ptrdiff_t c = 0; c < n; c++) {
        const T *xc = x + c * stride;
        T *ec = e ? e + c * stride : scratch;
        if (next)
            cec_prefetch_range(next + c * width, width * (ptrdiff_t)sizeof(T), 0);
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++)
            ec[j] = EXP_DIFF(xc[j], m[j]);
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++)
            s[j] += (double)ec[j];
    }
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++)
        log_s[j] = cec_log_sum(s[j]);
}

/* The loss of cec_index_tile_at and what its gradient (or cec_scores_tile) needs: per
 * position the target's class tt (-1: ignored) and weight w_t, the max m, the sum of exps
 * s and log_s = log(s); the exps go to e when given. */
CEC_FORCE_INLINE void CEC_FN(cec_index_tile_loss)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                                  ptrdiff_t width, const int64_t *target,
                                                  int64_t ignore_index, const double *w,
                                                  double eps, double *loss, T *e,
                                                  const T *next, T *m, double *s,
                                                  double *log_s, double *w_t, int32_t *tt,
                                                  double *x_t) {
    double wdev[CEC_TILE];
    const double smooth = eps / (double)n;
    /* The targets' logits and weights first (without label smoothing e may be x, see
     * cec_index_row). Per-position steps are branch-free selects (an ignored position
     * reads class 0) so that they vectorise: a scalar loop with a division per
     * position cost as much as the exps at 10 classes. */
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {
        const int ok = target[j] != ignore_index;
        const int64_t t = ok ? target[j] : 0;
        x_t[j] = ok ? (double)x[t * stride + j] : 0.0;
        w_t[j] = ok ? w[t] : 0.0;
        tt[j] = ok ? (int32_t)t : -1;  /* the class whose gradient gets -sub (n < 2**31) */
    }
    CEC_FN(cec_tile_max_sumexp)(x, n, stride, width, m, s, e, log_s, next);
    if (eps > 0.0) {  /* sum_c w[c] * (lse - x[c]) per position, see cec_row_wdev */
        for (ptrdiff_t j = 0; j < width; j++)
            wdev[j] = 0.0;
        for (ptrdiff_t c = 0; c < n; c++) {
            const T *xc = x + c * stride;
            const double wc = w[c];
            CEC_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                wdev[j] += wc * cec_dev(m[j], xc[j], log_s[j]);
        }
    }
    /* An ignored position: loss 0, gradient 0 or NaN as in cec_index_row. */
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {
        const int ok = target[j] != ignore_index;
        const double l = (1.0 - eps) * w_t[j] * cec_dev(m[j], x_t[j], log_s[j]);
        loss[j] = ok ? (eps > 0.0 ? l + smooth * wdev[j] : l) : 0.0;
    }
}

/* The gradient loop of cec_index_tile_at where a label-smoothing shift is outside T's
 * normal range: the term gs * eps / C * w_c was two factors rounded to T, and with
 * float32 class weights of about 1e30 and up under 'mean' gs * eps / C underflowed and
 * the term was lost (numerical review, forty-fourth session); here each product is
 * formed in double and rounded once. A function of its own (not inlined), so that the
 * tile's common loop is compiled as before (inlined, it cost 4-8 % even without
 * smoothing). scale = eps / C * w_scale. */
CEC_KERNEL void CEC_FN(cec_smooth_wide)(T *g, ptrdiff_t n, ptrdiff_t stride, ptrdiff_t width,
                                        const int32_t *tt, const T *coef, const T *sub,
                                        const double *gs, double scale, double down,
                                        const double *w) {
    for (ptrdiff_t c = 0; c < n; c++) {
        T *gc = g + c * stride;
        const double wc64 = w[c] * down;
        for (ptrdiff_t j = 0; j < width; j++) {
            const T term = tt[j] >= 0 ? (T)(gs[j] * scale * wc64) : (T)0;
            gc[j] = gc[j] * coef[j] - term - (tt[j] == (int32_t)c ? sub[j] : (T)0);
        }
    }
}

CEC_FORCE_INLINE void CEC_FN(cec_index_tile_at)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                                ptrdiff_t width, const int64_t *target,
                                                int64_t ignore_index, const double *w,
                                                double w_total, double w_scale, double eps,
                                                const double *gs, double *loss, T *g,
                                                const T *next, int check_shift) {
    T m[CEC_TILE], coef[CEC_TILE], shift[CEC_TILE], sub[CEC_TILE], keep[CEC_TILE], add[CEC_TILE];
    int32_t tt[CEC_TILE];
    double s[CEC_TILE], log_s[CEC_TILE], w_t[CEC_TILE], x_t[CEC_TILE];
    const double smooth = eps / (double)n;
    CEC_FN(cec_index_tile_loss)(x, n, stride, width, target, ignore_index, w, eps, loss, g,
                                next, m, s, log_s, w_t, tt, x_t);
    if (!g)  /* gs is not set for loss only */
        return;
    const double zero_w = eps > 0.0 ? w_total * 0.0 : 0.0;
    /* exact, a power of two (cec_weight_scale); no division in the common case */
    const double down = w_scale == 1.0 ? 1.0 : 1.0 / w_scale;
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {
        const int ok = target[j] != ignore_index;
        const double w_sum = eps > 0.0 ? (1.0 - eps) * w_t[j] + smooth * w_total : w_t[j];
        const double q = gs[j] * w_sum / s[j];
        coef[j] = ok ? (T)q : (T)(s[j] * 0.0 + zero_w);
        shift[j] = ok ? (T)(gs[j] * smooth * w_scale) : (T)0;
        sub[j] = (T)(gs[j] * (1.0 - eps) * w_t[j]);
        /* The target's entry (without smoothing) is p * keep + add, p = e_t * coef: where
         * the target holds the max, 0 * p + q (1 - s), formed in double (see
         * cec_index_row); elsewhere p - sub, as with smoothing. */
        const int top = x_t[j] == (double)m[j];
        keep[j] = top ? (T)0 : (T)1;
        add[j] = top ? (T)((1.0 - s[j]) * q) : -sub[j];
    }
    /* whether a shift is outside T's normal range (see the smoothing loop below), where
     * the call could not tell (check_shift: grad_scale not one broadcast value, or that
     * value's shift outside): the smallest and largest finite non-zero |shift| */
    const double lo = sizeof(T) == 4 ? FLT_MIN : DBL_MIN, hi = sizeof(T) == 4 ? FLT_MAX : DBL_MAX;
    double a_min = 1.0, a_max = 1.0;
    if (eps > 0.0 && check_shift) {
        CEC_PRAGMA(omp simd reduction(min:a_min) reduction(max:a_max))
        for (ptrdiff_t j = 0; j < width; j++) {
            const double r = fabs(gs[j] * smooth * w_scale);
            const double a = tt[j] >= 0 && r > 0.0 && r <= DBL_MAX ? r : 1.0;
            a_min = a < a_min ? a : a_min;
            a_max = a > a_max ? a : a_max;
        }
    }
    const int wide = a_min < lo || a_max > hi;
    /* The target's -sub in the same loop, by a compare per vector: a scalar pass after
     * it (g[t * stride + j] -= sub[j]) stored single values into vectors the transpose
     * out then loaded (a failed store-to-load forwarding each); same bits. Measured
     * with the 8 x 2 transposes (see cec_tr_8x2_f32). */
    if (eps > 0.0 && wide) {
        CEC_FN(cec_smooth_wide)(g, n, stride, width, tt, coef, sub, gs, smooth * w_scale,
                                down, w);
        return;
    }
    for (ptrdiff_t c = 0; c < n; c++) {
        T *gc = g + c * stride;
        const T wc = (T)(w[c] * down);
        if (eps > 0.0) {
            CEC_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                gc[j] = gc[j] * coef[j] - shift[j] * wc
                        - (tt[j] == (int32_t)c ? sub[j] : (T)0);
        } else {
            CEC_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                const T p = gc[j] * coef[j];
                gc[j] = tt[j] == (int32_t)c ? p * keep[j] + add[j] : p;
            }
        }
    }
}

/* The few-classes path's full blocks (stride == width == CEC_SMALL_C_ROWS) get their
 * own copy with those constants: every per-class loop then has a known trip count and
 * gcc drops the remainder and peeling code it emits around each of them: bench_ab.py,
 * Zen 4, 1e6 x 10 float32 loss + gradient 0.79x the time (AVX-512 build), 0.88x (AVX2
 * build), same bits (results/ab_cython_const_tile_zen4.json). */
CEC_KERNEL void CEC_FN(cec_index_tile)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                       ptrdiff_t width, const int64_t *target,
                                       int64_t ignore_index, const double *w,
                                       double w_total, double w_scale, double eps,
                                       const double *gs, double *loss, T *g, const T *next,
                                       int check_shift) {
    if (stride == CEC_SMALL_C_ROWS && width == CEC_SMALL_C_ROWS)
        CEC_FN(cec_index_tile_at)(x, n, CEC_SMALL_C_ROWS, CEC_SMALL_C_ROWS, target,
                                  ignore_index, w, w_total, w_scale, eps, gs, loss, g, next,
                                  check_shift);
    else
        CEC_FN(cec_index_tile_at)(x, n, stride, width, target, ignore_index, w, w_total,
                                  w_scale, eps, gs, loss, g, next, check_shift);
}

/* softmax_ce_scores for a transposed block of rows of few classes: the loss of
 * cec_index_tile (the same steps, so softmax_ce_index's bits), then the metrics of
 * cec_scores_row (stats 4 and rank 2 values per position, or with run the columns
 * softmax_ce_report sums) from the block's exps, left in e (n * stride values of scratch)
 * and still in L1. As there, the moments are summed in
 * the logits' type (at most CEC_SMALL_C terms per position, all of one sign), x clamped at
 * m - 1e30 so that e_c = 0 adds 0 (see cec_moments), and the target's square left out. */
CEC_FORCE_INLINE void CEC_FN(cec_scores_tile_at)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                                 ptrdiff_t width, const int64_t *target,
                                                 int64_t ignore_index, const double *w,
                                                 double eps, double *loss, double *stats,
                                                 int64_t *rank, cec_report_run *run, T *e,
                                                 const T *next) {
    T m[CEC_TILE], xt[CEC_TILE], et[CEC_TILE], lo[CEC_TILE], a[CEC_TILE], q[CEC_TILE];
    int32_t tt[CEC_TILE], above[CEC_TILE], before[CEC_TILE];
    double s[CEC_TILE], log_s[CEC_TILE], w_t[CEC_TILE], lse[CEC_TILE], x_t[CEC_TILE];
    cec_report_run own;
    cec_report_run *out = run ? run : &own;  /* (width <= CEC_SMALL_C_ROWS: blocks of rows) */
    CEC_FN(cec_index_tile_loss)(x, n, stride, width, target, ignore_index, w, eps, loss, e,
                                next, m, s, log_s, w_t, tt, x_t);
    /* the target's logit (class 0's for an ignored row, whose rank is not counted); its
     * exp is picked in the loop over classes (a gather here was a scalar loop) */
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {
        xt[j] = tt[j] < 0 ? x[j] : (T)x_t[j];
        lo[j] = m[j] + (T)-1e30;
        a[j] = q[j] = et[j] = 0;
        above[j] = before[j] = 0;
    }
    for (ptrdiff_t c = 0; c < n; c++) {
        const T *xc = x + c * stride, *ec = e + c * stride;
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            const T v = ec[j], xv = xc[j], vs = v * SQ;
            const int is_t = tt[j] == (int32_t)c;
            a[j] += v * ((xv > lo[j] ? xv : lo[j]) - m[j]);
            q[j] += is_t ? (T)0 : vs * vs;
            et[j] += is_t ? v : (T)0;
            above[j] += xv > xt[j];
            before[j] += (int32_t)c < tt[j] && xv == xt[j];
        }
    }
    /* Branch-free selects, so that the float64 divisions vectorise (a scalar loop of
     * four divisions and two branches per row took a quarter of this function's perf
     * samples in softmax_ce_report at 10 classes; kernel_findings.md, forty-second
     * session): an ignored position NaN stats and rank (-1, 0); an undefined softmax (s
     * NaN or +inf) NaN entropy, max p and Brier, and rank (n, 0). */
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {
        const int ok = tt[j] >= 0, fine = ok & (s[j] < INFINITY);
        double h, p, b;
        CEC_FN(cec_scores_stats)(s[j], log_s[j], (double)a[j], (double)q[j] * SQ_UNDO,
                                 (double)et[j], &h, &p, &b);
        out->entropy[j] = fine ? h : NAN;
        out->max_p[j] = fine ? p : NAN;
        out->brier[j] = fine ? b : NAN;
        out->rank[j] = fine ? above[j] : ok ? (int32_t)n : -1;
        out->top1[j] = fine & (above[j] == 0) & (before[j] == 0);
    }
    if (run)  /* softmax_ce_report: no lse, no interleaving */
        return;
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++)
        lse[j] = tt[j] >= 0 ? (double)m[j] + log_s[j] : NAN;
    for (ptrdiff_t j = 0; j < width; j++)
        if (tt[j] >= 0 && isinf(m[j]))  /* rare: not inf - inf (see cec_infinite_lse) */
            lse[j] = CEC_FN(cec_infinite_lse)(x + j, n, stride, m[j]);
    CEC_SIMD
    for (ptrdiff_t j = 0; j < width; j++) {  /* as _scores_item gives them */
        stats[4 * j] = own.entropy[j];
        stats[4 * j + 1] = own.max_p[j];
        stats[4 * j + 2] = own.brier[j];
        stats[4 * j + 3] = lse[j];
        rank[2 * j] = own.rank[j];
        rank[2 * j + 1] = own.top1[j];
    }
}

/* As cec_index_tile: full blocks get a copy with their constant stride and width. */
CEC_KERNEL void CEC_FN(cec_scores_tile)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                        ptrdiff_t width, const int64_t *target,
                                        int64_t ignore_index, const double *w, double eps,
                                        double *loss, double *stats, int64_t *rank,
                                        cec_report_run *run, T *e, const T *next) {
    if (stride == CEC_SMALL_C_ROWS && width == CEC_SMALL_C_ROWS)
        CEC_FN(cec_scores_tile_at)(x, n, CEC_SMALL_C_ROWS, CEC_SMALL_C_ROWS, target,
                                   ignore_index, w, eps, loss, stats, rank, run, e, next);
    else
        CEC_FN(cec_scores_tile_at)(x, n, stride, width, target, ignore_index, w, eps, loss,
                                   stats, rank, run, e, next);
}

CEC_KERNEL void CEC_FN(cec_proba_tile)(const T *x, const T *q, ptrdiff_t n,
                                       ptrdiff_t stride, ptrdiff_t width, const double *w,
                                       double eps, const double *gs, double *loss, T *g) {
    T m[CEC_TILE];
    double s[CEC_TILE], log_s[CEC_TILE], wq[CEC_TILE], coef[CEC_TILE];
    const double smooth = eps / (double)n;
    CEC_FN(cec_tile_max_sumexp)(x, n, stride, width, m, s, g, log_s, NULL);
    for (ptrdiff_t j = 0; j < width; j++) {
        wq[j] = 0.0;
        loss[j] = 0.0;
    }
    for (ptrdiff_t c = 0; c < n; c++) {  /* class by class: see cec_proba_row */
        const T *xc = x + c * stride, *qc = q + c * stride;
        const double wc = w[c];
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            const double v = wc * ((1.0 - eps) * (double)qc[j] + smooth);
            wq[j] += v;
            loss[j] += v * cec_dev(m[j], xc[j], log_s[j]);
        }
    }
    if (!g)  /* gs is not set for loss only */
        return;
    for (ptrdiff_t j = 0; j < width; j++)
        coef[j] = gs[j] * wq[j] / s[j];
    for (ptrdiff_t c = 0; c < n; c++) {
        T *gc = g + c * stride;
        const T *qc = q + c * stride;
        const double wc = w[c];
        CEC_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            const double v = wc * ((1.0 - eps) * (double)qc[j] + smooth);
            gc[j] = (T)((double)gc[j] * coef[j] - gs[j] * v);
        }
    }
}

CEC_KERNEL void CEC_FN(cec_softmax_tile)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                         ptrdiff_t width, int log_, T *out,
                                         const T *next) {
    T m[CEC_TILE], shift[CEC_TILE];
    double s[CEC_TILE], log_s[CEC_TILE];
    CEC_FN(cec_tile_max_sumexp)(x, n, stride, width, m, s, log_ ? NULL : out, log_s,
                                next);
    for (ptrdiff_t j = 0; j < width; j++)
        shift[j] = (T)(log_ ? log_s[j] : 1.0 / s[j]);
    for (ptrdiff_t c = 0; c < n; c++) {
        const T *xc = x + c * stride;
        T *oc = out + c * stride;
        if (log_) {
            CEC_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                oc[j] = (xc[j] - m[j]) - shift[j];
        } else {
            CEC_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                oc[j] = oc[j] * shift[j];
        }
    }
}

CEC_KERNEL void CEC_FN(cec_logsumexp_tile)(const T *x, ptrdiff_t n, ptrdiff_t stride,
                                           ptrdiff_t width, double *out, const T *next) {
    T m[CEC_TILE];
    double s[CEC_TILE], log_s[CEC_TILE];
    CEC_FN(cec_tile_max_sumexp)(x, n, stride, width, m, s, NULL, log_s, next);
    for (ptrdiff_t j = 0; j < width; j++)
        out[j] = isinf(m[j]) ? CEC_FN(cec_infinite_lse)(x + j, n, stride, m[j])
                             : (double)m[j] + log_s[j];
}

/* ====================================================== binary cross-entropy */

/* z = exp(-|x|) for n <= CEC_TILE values, in a loop of its own before the loop that
 * uses it. With the exp inlined into that loop (log1p, selects, the gradient's division),
 * gcc's vectorised loop ran far slower: a C harness of cec_bce_sums_bcast (one thread,
 * 65536 values in L2, Zen 4, ns per value, one loop / two) float32 with the gradient
 * 0.83 / 0.72 (AVX-512 build), 1.31 / 0.90 (AVX2), loss only 0.72 / 0.57 and 1.17 / 0.79;
 * float64 2.94 / 2.05 and 5.04 / 3.08, loss only 2.51 / 1.84 and 4.23 / 2.74; same bits
 * (kernel_findings.md, nineteenth session). */
CEC_INLINE void CEC_FN(cec_bce_exps)(const T *x, ptrdiff_t n, T *z) {
    CEC_SIMD
    for (ptrdiff_t j = 0; j < n; j++)
        z[j] = EXP(x[j] >= 0 ? -x[j] : x[j]);
}

/* Elementwise binary cross-entropy on logits over n values (see bce_logits in
 * cecore/_backends.py and cec_bce_elem_f32 / _f64), in chunks of CEC_TILE (the runs
 * _bce_item passes are one chunk). w, pw and gs are contiguous float64 runs of n values,
 * or with bcast one value each for all n (the usual case: no weights, 'mean' or 'sum'):
 * inlined with a constant bcast, that loop loads and converts no float64 argument per
 * element, and computes the same bits. */
CEC_FORCE_INLINE void CEC_FN(cec_bce_values)(const T *x, const T *y, ptrdiff_t n,
                                              const double *w, const double *pw,
                                              const double *gs, double *loss, T *g,
                                              const int want_grad, const int bcast) {
    const double w0 = bcast ? w[0] : 0.0, pw0 = bcast ? pw[0] : 0.0;
    const double gs0 = bcast && want_grad ? gs[0] : 0.0;
    T z[CEC_TILE];
    for (ptrdiff_t c = 0; c < n; c += CEC_TILE) {
        const ptrdiff_t m = n - c < CEC_TILE ? n - c : CEC_TILE;
        CEC_FN(cec_bce_exps)(x + c, m, z);
        CEC_SIMD
        for (ptrdiff_t j = 0; j < m; j++) {
            T gj;
            CEC_FN(cec_bce_elem)(x[c + j], y[c + j], z[j], bcast ? w0 : w[c + j],
                                 bcast ? pw0 : pw[c + j],
                                 bcast ? gs0 : want_grad ? gs[c + j] : 0.0, loss + c + j,
                                 &gj, want_grad);
            if (want_grad)
                g[c + j] = gj;
        }
    }
}

/* The body inlined twice, so that neither loop tests for a gradient. */
CEC_KERNEL void CEC_FN(cec_bce_row)(const T *x, const T *y, ptrdiff_t n, const double *w,
                                    const double *pw, const double *gs, double *loss,
                                    T *g) {
    if (g)
        CEC_FN(cec_bce_values)(x, y, n, w, pw, gs, loss, g, 1, 0);
    else
        CEC_FN(cec_bce_values)(x, y, n, w, pw, gs, loss, g, 0, 0);
}

CEC_KERNEL void CEC_FN(cec_bce_row_bcast)(const T *x, const T *y, ptrdiff_t n, double w,
                                          double pw, double gs, double *loss, T *g) {
    if (g)
        CEC_FN(cec_bce_values)(x, y, n, &w, &pw, &gs, loss, g, 1, 1);
    else
        CEC_FN(cec_bce_values)(x, y, n, &w, &pw, &gs, loss, g, 0, 1);
}

/* For a reduced loss ('mean', 'sum'; the .pxi's sums) with broadcast arguments:
 * cec_bce_values (bcast) with each loss added to acc[j % CEC_LANES] as it is made, instead
 * of stored to a run of losses and read back by cec_add_lanes (the same lanes in the same
 * order, so the same bits: a chunk starts at a multiple of CEC_LANES). bench_ab.py, Zen 4,
 * float32, new / old: avx512 0.87-0.92 (two threads, from memory) and 0.81-0.97 (one
 * thread); avx2 0.80-1.20, noise (results/ab_bce_fused_sums_zen4{,_1thread}.json). The
 * blocks of CEC_LANES are a loop of their own, and a run's last values (fewer) go through
 * cec_bce_values: as one loop over blocks whose last is shorter it ran 1.36x slower, and
 * a helper for up to CEC_LANES values called per block stayed out of line
 * (kernel_findings.md, sixteenth session). */
CEC_FORCE_INLINE void CEC_FN(cec_bce_sums_values_bcast)(const T *x, const T *y, ptrdiff_t n,
                                                   double w, double pw, double gs,
                                                   double *acc, T *g, const int want_grad) {
    T z[CEC_TILE];
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CEC_TILE) {
        const ptrdiff_t end = n - c0 < CEC_TILE ? n : c0 + CEC_TILE;
        ptrdiff_t c = c0;
        /* the blocks' exps; the last values' are cec_bce_values's own */
        CEC_FN(cec_bce_exps)(x + c0, (end - c0) / CEC_LANES * CEC_LANES, z);
        for (; c + CEC_LANES <= end; c += CEC_LANES) {
            /* The lines of x and y CEC_BCE_AHEAD bytes on (past the end: harmless). */
            for (ptrdiff_t i = 0; i < CEC_LANES * (ptrdiff_t)sizeof(T); i += 64) {
                CEC_PREFETCH((const char *)(x + c) + CEC_BCE_AHEAD + i);
                CEC_PREFETCH((const char *)(y + c) + CEC_BCE_AHEAD + i);
            }
            CEC_SIMD
            for (int j = 0; j < CEC_LANES; j++) {
                double lj;
                T gj;
                CEC_FN(cec_bce_elem)(x[c + j], y[c + j], z[c - c0 + j], w, pw, gs, &lj, &gj,
                                     want_grad);
                if (want_grad)
                    g[c + j] = gj;
                acc[j] += lj;
            }
        }
        if (c < end) {  /* the last chunk's last values, fewer than CEC_LANES */
            double lt[CEC_LANES];
            CEC_FN(cec_bce_values)(x + c, y + c, end - c, &w, &pw, &gs, lt,
                                   want_grad ? g + c : g, want_grad, 1);
            for (int j = 0; j < end - c; j++)
                acc[j] += lt[j];
        }
    }
}

CEC_KERNEL void CEC_FN(cec_bce_sums_bcast)(const T *x, const T *y, ptrdiff_t n, double w,
                                           double pw, double gs, double *acc, T *g) {
    /* No weights (the default): the body again with w = pw = 1 as constants, which gcc
     * folds out of the products (x * 1.0 is x exactly, so the same bits; 1 + (pw - 1) y
     * stays, as 0 * y is not 0 for an infinite or NaN y). bench_ab.py --paired, AVX2
     * code, Zen 4, sums with and without the gradient: float32 0.91-0.94 of the time,
     * float64 0.97-1.00; AVX-512 build 0.94-0.97 and 0.96-0.99
     * (results/ab_bce_sums_unweighted{_avx2code,}_zen4.json). */
    if (w == 1.0 && pw == 1.0) {
        if (g)
            CEC_FN(cec_bce_sums_values_bcast)(x, y, n, 1.0, 1.0, gs, acc, g, 1);
        else
            CEC_FN(cec_bce_sums_values_bcast)(x, y, n, 1.0, 1.0, gs, acc, g, 0);
    } else if (g)
        CEC_FN(cec_bce_sums_values_bcast)(x, y, n, w, pw, gs, acc, g, 1);
    else
        CEC_FN(cec_bce_sums_values_bcast)(x, y, n, w, pw, gs, acc, g, 0);
}

#undef T
#undef EXP
#undef EXP_DIFF
#undef SQ60
#undef SQ
#undef SQ_UNDO

#endif /* CEC_TEMPLATE_PASS */
