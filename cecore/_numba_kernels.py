"""Numba backend of the kernel contract (see :mod:`cecore._backends`).

Design
------
One source serves float32 and float64: Numba compiles each jitted function per dtype. The
only dtype-specific code is the exp polynomial, picked by an ``@overload`` at compile time.

* ``math.exp`` keeps Numba loops scalar (~0.1 G exp/s). ``_exp_nonpos`` is a range
  reduction + polynomial + exponent-bits exp that LLVM vectorises. Its argument is always
  ``x - max`` (so ``<= 0`` or NaN); NaN propagates and very negative values give 0.
* 2-D inputs with many classes go row by row (``_*_rows``): max, then exp + float64 sum
  (storing ``exp`` in the gradient row), then the gradient scales that row in place, so
  each row is read from memory once and stays in cache between the passes.
* K-dim inputs (``S > 1``) go tile by tile (``_*_tiles``): a tile is ``TILE`` positions
  of one sample; every inner loop runs along the contiguous position axis, so it
  vectorises although the class axis is strided (no transposed copy). 2-D inputs with
  at most ``SMALL_C`` classes (rows shorter than a vector) use the same tile code on
  blocks of TILE rows transposed into an O(C * TILE) scratch tile.
* Each kernel is compiled twice from one source: ``parallel=True`` for n_threads > 1 and
  serial for n_threads == 1 (and in forked children, where OpenMP pools are unsafe).
* Every loop that reduces (sums over classes) lives in a ``@_helper`` function, which
  Numba compiles and LLVM vectorises once, before both drivers inline it: the serial and
  the parallel kernel then sum in the same order and agree bit for bit. (A reduction
  written in a driver's own body is vectorised separately in each, possibly differently.)
"""

import os
import tempfile
import threading
import types as types_module

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import caching, cgutils
from numba.extending import intrinsic, overload

from . import _config


class _CacheLocator(caching.UserWideCacheLocator):
    """Numba's on-disk cache for cecore's own functions, outside the installed package.

    Numba would write it into ``cecore/__pycache__`` when that is writable; a later
    ``pip uninstall`` leaves those files behind, and an empty ``cecore`` folder then
    shadows the package as a namespace package. So cecore's kernels are cached in
    ``NUMBA_CACHE_DIR`` when it is set, else in the user's cache directory
    (``~/.cache/cecore/numba`` on Linux), else in a temporary directory. Functions of
    other modules keep Numba's own rules.
    """

    _package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def __init__(self, py_func, py_file, cache_dir):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_dir, self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.abspath(py_file).startswith(cls._package_dir):
            return None
        user = caching.AppDirs(appname="cecore", appauthor=False).user_cache_dir
        for cache_dir in (numba.config.CACHE_DIR, os.path.join(user, "numba"),
                          os.path.join(tempfile.gettempdir(), f"cecore-numba-{os.getuid()}")):
            if not cache_dir:
                continue
            self = cls(py_func, py_file, cache_dir)
            try:
                self.ensure_cache_path()
            except OSError:
                continue
            return self
        return None


# Consulted before Numba's own locators (the first that accepts a function wins).
caching.CacheImpl._locator_classes.insert(0, _CacheLocator)

# Reassociation lets LLVM vectorise the sums; no "nnan"/"ninf": NaN and inf logits must
# follow IEEE rules to give torch's answers.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
TILE = 256
# Terms summed in the input's precision before a float64 add (see _row_sumexp).
SUM_BLOCK = 256
# Rows per parallel task in the row kernels (amortises the loss-only scratch row).
ROWS_PER_TASK = 16


def _bitcast_codegen(llty):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llty)
    return codegen


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret int32 bits as float32 / int64 bits as float64 (an LLVM bitcast)."""
    if bits == types.int32:
        return types.float32(types.int32), _bitcast_codegen(ir.FloatType())
    if bits == types.int64:
        return types.float64(types.int64), _bitcast_codegen(ir.DoubleType())
    return None


@intrinsic
def _float_to_bits(typingctx, value):
    """Reinterpret float32 as int32 / float64 as int64 (an LLVM bitcast)."""
    if value == types.float32:
        return types.int32(types.float32), _bitcast_codegen(ir.IntType(32))
    if value == types.float64:
        return types.int64(types.float64), _bitcast_codegen(ir.IntType(64))
    return None


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask the CPU to fetch the cache line of ``arr``'s element ``index`` (an address
    computation only: an index past the end is harmless)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # read, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p),
                          i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


# exp(x) = 2**k * P(r), k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split of ln 2).
# Inputs are x - max, so <= 0: x is clamped from below so that r stays finite, and a k
# below the smallest normal exponent gives 2**k = 0 (a flush to zero). NaN propagates
# through r and P; no "nnan" fast-math flag may touch these functions.
#
# float32: degree-6 polynomial (max rel. error ~1.2e-7); exp(x < -87.3) flushes to 0.
_F32_MIN_X = np.float32(-88.0)
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_P = tuple(
    np.float32(v)
    for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
              4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)
_F32_BIAS = np.float32(127.0)
_F32_MANTISSA_SCALE = np.float32(2.0**23)


def _exp_nonpos_f32(x):
    p0, p1, p2, p3, p4, p5 = _F32_P
    x = _F32_MIN_X if x < _F32_MIN_X else x
    k = np.floor(x * _F32_LOG2E + _F32_HALF)
    r = x - k * _F32_LN2_HI - k * _F32_LN2_LO
    p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
    p = p * r * r + r + _F32_ONE
    biased = k + _F32_BIAS
    biased = biased if biased > _F32_ZERO else _F32_ZERO
    # 2**k from its exponent bits, biased << 23, formed by an exact float product because
    # Numba widens int32 arithmetic to int64, which would halve the vector width.
    return p * _bits_to_float(np.int32(biased * _F32_MANTISSA_SCALE))


# float64: degree-13 Taylor polynomial (truncation < 1e-17); exp(x < -708.4) flushes to 0.
_F64_MIN_X = -709.0
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93145751953125e-1
_F64_LN2_LO = 1.42860682030941723212e-6
_F64_INV_FACT = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(13, 1, -1))
_F64_MAGIC = 2.0**52


def _exp_nonpos_f64(x):
    c13, c12, c11, c10, c9, c8, c7, c6, c5, c4, c3, c2 = _F64_INV_FACT
    x = _F64_MIN_X if x < _F64_MIN_X else x
    k = np.floor(x * _F64_LOG2E + 0.5)
    r = x - k * _F64_LN2_HI - k * _F64_LN2_LO
    p = c13 * r + c12
    p = ((((((((((p * r + c11) * r + c10) * r + c9) * r + c8) * r + c7) * r + c6) * r
              + c5) * r + c4) * r + c3) * r + c2) * r
    p = p * r + r + 1.0
    biased = k + 1023.0
    biased = biased if biased > 0.0 else 0.0
    # Adding 2**52 puts the integer `biased` in the low mantissa bits; shifting left by 52
    # moves it to the exponent field. Vectorises without a float->int64 conversion,
    # which AVX2 lacks.
    return p * _bits_to_float(_float_to_bits(biased + _F64_MAGIC) << 52)


def _exp_nonpos(x):
    """exp(x) for x <= 0 (or NaN), vectorisable."""
    raise NotImplementedError  # only callable from jitted code


# The exp functions are compiled on their own, without "reassoc": inlined into a caller
# they would take its flags, and reassociation lets LLVM fold x - k*LN2_HI - k*LN2_LO into
# x - k*LN2, undoing the exact range reduction (seen: 100 ulp errors in float64). LLVM
# still inlines them, keeping each instruction's own flags, and vectorises the caller.
_exp_nonpos_jit = {
    types.float32: njit(fastmath={"contract", "nsz", "arcp"}, cache=True)(_exp_nonpos_f32),
    types.float64: njit(fastmath={"contract", "nsz", "arcp"}, cache=True)(_exp_nonpos_f64),
}


@overload(_exp_nonpos)
def _ol_exp_nonpos(x):
    if x in _exp_nonpos_jit:
        exp = _exp_nonpos_jit[x]
        return lambda x: exp(x)
    return None


_LOG_SERIES = tuple(1.0 / k for k in range(19, 2, -2))  # 1/19, 1/17, ..., 1/3
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def _log_sum_py(s):
    """log(s) for the float64 sums of exps (s >= 1), vectorisable; NaN and +inf pass.

    s = 2**e * a with a in [sqrt(1/2), sqrt(2)); log(a) = 2 atanh(z), z = (a-1)/(a+1),
    |z| < 0.172, whose odd series to z**19 is exact to < 1e-17 (measured 0.73 ulp).
    The tile kernels take one log per position: a libm call each cost more than the
    rest of the work for 10 classes.
    """
    c19, c17, c15, c13, c11, c9, c7, c5, c3 = _LOG_SERIES
    bits = _float_to_bits(s)
    # exponent as a double without an int64 -> double conversion (none on AVX2)
    e = _bits_to_float((bits >> 52) | 0x4330000000000000) - (4503599627370496.0 + 1023.0)
    a = _bits_to_float((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = a > 1.4142135623730951
    a = 0.5 * a if big else a
    e = e + 1.0 if big else e
    f = a - 1.0
    z = f / (2.0 + f)
    z2 = z * z
    p = ((((((((c19 * z2 + c17) * z2 + c15) * z2 + c13) * z2 + c11) * z2 + c9) * z2 + c7)
          * z2 + c5) * z2 + c3)
    r = e * _LN2_HI + ((2.0 * z + 2.0 * z * (z2 * p)) + e * _LN2_LO)
    return r if s < np.inf else s


# Compiled on its own, without "reassoc", like the exp (see _exp_nonpos_jit).
_log_sum = njit(fastmath={"contract", "nsz", "arcp"}, cache=True)(_log_sum_py)


def _row_max(x):
    """Largest element of the 1-D array ``x`` (a positive NaN wins; see below)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_row_max)
def _ol_row_max(x):
    # Numba's LLVM does not vectorise float max reductions, but integer ones it does.
    # Flipping the magnitude bits of negative floats makes signed-integer order equal
    # float order (an involution), so the max is taken on those integer keys. NaNs need
    # no care here: any NaN, +inf, or an all -inf row makes the exp pass produce NaN.
    # int32 arithmetic is re-narrowed at each step: Numba widens it to int64.
    if x.dtype == types.float32:
        def impl(x):
            b = _float_to_bits(x[0])
            m = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(0x7FFFFFFF)))
            for c in range(1, x.shape[0]):
                b = _float_to_bits(x[c])
                key = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(0x7FFFFFFF)))
                m = key if key > m else m
            return _bits_to_float(np.int32(m ^ np.int32(np.int32(m >> 31) & np.int32(0x7FFFFFFF))))
        return impl
    if x.dtype == types.float64:
        def impl(x):
            b = _float_to_bits(x[0])
            m = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
            for c in range(1, x.shape[0]):
                b = _float_to_bits(x[c])
                key = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
                m = key if key > m else m
            return _bits_to_float(m ^ ((m >> 63) & 0x7FFFFFFFFFFFFFFF))
        return impl
    return None


def _cast_like(value, like):
    """``value`` converted to the type of ``like`` (float32 stays float32)."""
    raise NotImplementedError


@overload(_cast_like)
def _ol_cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def jit(fn):
    """Compile ``fn`` twice: parallel (prange runs on threads) and serial (prange = range).

    The serial copy gets its own name: Numba's on-disk cache keys functions by name and
    line, not by ``parallel``, so with one name both would load whichever compiled first
    (and a forked child would run OpenMP code after all).
    """
    serial_fn = types_module.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                          fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    parallel = njit(parallel=True, fastmath=_FASTMATH, cache=True)(fn)
    serial = njit(parallel=False, fastmath=_FASTMATH, cache=True)(serial_fn)
    return parallel, serial


_helper = njit(fastmath=_FASTMATH, cache=True)


# --------------------------------------------------------------------------- row passes
@_helper
def _row_sumexp(x, m, e_out):
    """sum_c exp(x[c] - m) in float64, writing exp(x[c] - m) to ``e_out``; ``x`` is a
    row of a C-contiguous 2-D array.

    Per block of SUM_BLOCK classes one loop writes the exps and another sums them in
    float64: fused, the float64 adds would set the vector width and halve the float32
    exp's. The exps are always stored (to the gradient row, or to scratch for loss
    only), so loss-only and loss+gradient calls sum in the same order. Blocks are
    slices indexed from 0: an index such as ``start + c`` makes Numba check for
    negative indices on every access, which stopped LLVM vectorising (3x slower).
    """
    n = x.shape[0]
    line = 64 // x.itemsize
    s = 0.0
    for b in range((n + SUM_BLOCK - 1) // SUM_BLOCK):
        xb = x[b * SUM_BLOCK:(b + 1) * SUM_BLOCK]
        eb = e_out[b * SUM_BLOCK:(b + 1) * SUM_BLOCK]
        # Rows are contiguous: fetch the next row's matching lines while this block
        # computes, so memory traffic overlaps with the exps (as the Cython kernels).
        for i in range(0, xb.shape[0], line):
            _prefetch(x, n + b * SUM_BLOCK + i)
        for c in range(xb.shape[0]):
            eb[c] = _exp_nonpos(xb[c] - m)
        for c in range(xb.shape[0]):
            s += eb[c]
    return s


@_helper
def _row_wdev(x, weight, lse):
    """sum_c weight[c] * (lse - x[c]) in float64, class by class: as sum(w) * lse -
    sum(w * x) an infinite weight would give inf - inf = NaN where torch gives inf."""
    s = 0.0
    for c in range(x.shape[0]):
        s += weight[c] * (lse - np.float64(x[c]))
    return s


# ---------------------------------------------------------------- class-index targets
@_helper
def _index_row(row, t, weight, w_total, eps, gs, g, ignored, want_grad):
    """Loss of one row with class-index target ``t``; with ``want_grad``, the gradient
    (times gs) goes into ``g``, which otherwise is scratch for the exps."""
    n_classes = row.shape[0]
    smooth = eps / n_classes
    m = _row_max(row)
    s = _row_sumexp(row, m, g)
    if ignored:
        # As torch: gradient 0, or NaN where the row's softmax is NaN (NaN or +inf
        # logits, or all -inf): s * 0 is exactly that; with label smoothing, which
        # multiplies every class weight by the row's zero upstream gradient, also NaN
        # where a weight is NaN or infinite.
        zero = _cast_like(s * 0.0 + (w_total * 0.0 if eps > 0.0 else 0.0), m)
        for c in range(n_classes):
            g[c] = g[c] * zero
        return 0.0
    lse = np.float64(m) + np.log(s)
    w_t = weight[t]
    loss = (1.0 - eps) * w_t * (lse - row[t])
    if eps > 0.0:
        loss += smooth * _row_wdev(row, weight, lse)
    if not want_grad:
        return loss
    # The smoothing terms only when eps > 0: 0 * w_total would turn a NaN weight of a
    # class that is not the target into a NaN gradient for every row (torch: none).
    w_sum = (1.0 - eps) * w_t + smooth * w_total if eps > 0.0 else w_t
    coef = _cast_like(gs * w_sum / s, m)
    if eps > 0.0:
        shift = gs * smooth
        for c in range(n_classes):
            g[c] = g[c] * coef - _cast_like(shift * weight[c], m)
    else:
        for c in range(n_classes):
            g[c] = g[c] * coef
    g[t] -= _cast_like(gs * (1.0 - eps) * w_t, m)
    return loss


def _index_rows(x, target, weight, w_total, ignore_index, eps, grad_scale, loss_out,
                grad_out):
    n_rows, n_classes = x.shape
    want_grad = grad_out.shape[0] != 0
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
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
                                     want_grad)


@_helper
def _tile_max_sumexp(x, base, stride, n_classes, width, m, s, e_out, store, e_buf, lse):
    """Per position j < width of a tile: m[j] = max_c x[base + c*stride + j] and
    s[j] = sum_c exp(x[...] - m[j]) (float64), storing the exps in ``e_out`` (same
    indexing as ``x``) when ``store``, else in the scratch row ``e_buf``, and
    lse[j] = m[j] + log(s[j]). Inner loops run along j over 0-based slices: contiguous,
    vectorised (see _row_sumexp)."""
    x0 = x[base:base + width]
    for j in range(width):
        m[j] = x0[j]
        s[j] = 0.0
    for c in range(1, n_classes):
        xc = x[base + c * stride:base + c * stride + width]
        for j in range(width):
            m[j] = xc[j] if xc[j] > m[j] else m[j]
    # exp and the float64 accumulation are separate loops: fused, the float64 adds would
    # set the vector width and halve the float32 exp's throughput.
    for c in range(n_classes):
        xc = x[base + c * stride:base + c * stride + width]
        ec = e_out[base + c * stride:base + c * stride + width] if store else e_buf[:width]
        for j in range(width):
            ec[j] = _exp_nonpos(xc[j] - m[j])
        for j in range(width):
            s[j] += ec[j]
    for j in range(width):
        lse[j] = np.float64(m[j]) + _log_sum(s[j])


@_helper
def _index_tile(x, base, stride, n_classes, width, target, pos0, weight, w_total,
                ignore_index, eps, grad_scale, loss_out, g, want_grad, m, s, lse, coef,
                shift):
    """Loss (and gradient into ``g``, indexed like ``x``) of one tile of positions."""
    _tile_max_sumexp(x, base, stride, n_classes, width, m, s, g, want_grad, coef, lse)
    smooth = eps / n_classes
    tgt = target[pos0:pos0 + width]
    gsc = grad_scale[pos0:pos0 + width]
    for j in range(width):
        t = tgt[j]
        if t == ignore_index:
            # Gradient e * (s * 0): 0, or NaN where the softmax is NaN, as torch gives.
            loss_out[pos0 + j] = 0.0
            coef[j] = _cast_like(s[j] * 0.0 + (w_total * 0.0 if eps > 0.0 else 0.0), m[0])
            shift[j] = 0
            continue
        w_t = weight[t]
        loss = (1.0 - eps) * w_t * (lse[j] - x[base + t * stride + j])
        if eps > 0.0:  # class by class, see _row_wdev
            wdev = 0.0
            for c in range(n_classes):
                wdev += weight[c] * (lse[j] - x[base + c * stride + j])
            loss += smooth * wdev
        loss_out[pos0 + j] = loss
        w_sum = (1.0 - eps) * w_t + smooth * w_total if eps > 0.0 else w_t
        coef[j] = _cast_like(gsc[j] * w_sum / s[j], m[0])
        shift[j] = _cast_like(gsc[j] * smooth, m[0])
    if not want_grad:
        return
    for c in range(n_classes):
        gc = g[base + c * stride:base + c * stride + width]
        if eps > 0.0:
            w_c = _cast_like(weight[c], m[0])
            for j in range(width):
                gc[j] = gc[j] * coef[j] - shift[j] * w_c
        else:
            for j in range(width):
                gc[j] = gc[j] * coef[j]
    for j in range(width):
        t = tgt[j]
        if t != ignore_index:
            g[base + t * stride + j] -= _cast_like(gsc[j] * (1.0 - eps) * weight[t], m[0])


def _index_tiles(x, target, weight, w_total, ignore_index, eps, grad_scale, loss_out,
                 grad_out, n_samples, n_classes, n_pos):
    """Tiled kernel on flat arrays.

    ``n_pos > 1``: x is the flat (N, C, S) array and tiles run along S in place.
    ``n_pos == 1``: x is a flat (N, C) array with few classes; each block of TILE rows
    is transposed into a (C, TILE) scratch tile (and its gradient back), so that the
    loops still run along positions instead of along rows shorter than a vector.
    """
    want_grad = grad_out.shape[0] != 0
    transpose = n_pos == 1
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    n_tiles = (n_samples + TILE - 1) // TILE if transpose else n_samples * tiles_per_sample
    for tile in prange(n_tiles):
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        lse = np.empty(TILE, dtype=np.float64)
        coef = np.empty(TILE, dtype=x.dtype)
        shift = np.empty(TILE, dtype=x.dtype)
        if transpose:
            r0 = tile * TILE
            width = min(TILE, n_samples - r0)
            xt = np.empty(n_classes * TILE, dtype=x.dtype)
            gt = np.empty(n_classes * TILE if want_grad else 0, dtype=x.dtype)
            block = x[r0 * n_classes:(r0 + width) * n_classes]
            for c in range(n_classes):
                xtc = xt[c * TILE:c * TILE + width]
                for j in range(width):
                    xtc[j] = block[j * n_classes + c]
            _index_tile(xt, 0, TILE, n_classes, width, target, r0, weight, w_total,
                        ignore_index, eps, grad_scale, loss_out, gt, want_grad,
                        m, s, lse, coef, shift)
            if want_grad:
                gblock = grad_out[r0 * n_classes:(r0 + width) * n_classes]
                for c in range(n_classes):
                    gtc = gt[c * TILE:c * TILE + width]
                    for j in range(width):
                        gblock[j * n_classes + c] = gtc[j]
        else:
            n = tile // tiles_per_sample
            s0 = (tile % tiles_per_sample) * TILE
            width = min(TILE, n_pos - s0)
            _index_tile(x, n * n_classes * n_pos + s0, n_pos, n_classes, width, target,
                        n * n_pos + s0, weight, w_total, ignore_index, eps, grad_scale,
                        loss_out, grad_out, want_grad, m, s, lse, coef, shift)


# --------------------------------------------------------- class-probability targets
@_helper
def _proba_row(row, q, weight, eps, gs, g, want_grad):
    """Loss of one row with probability targets ``q``; with ``want_grad``, the gradient
    (times gs) goes into ``g``, which otherwise is scratch for the exps."""
    n_classes = row.shape[0]
    smooth = eps / n_classes
    m = _row_max(row)
    s = _row_sumexp(row, m, g)
    lse = np.float64(m) + np.log(s)
    # Summed class by class (see _row_wdev): an infinite weight gives torch's inf.
    wq = 0.0
    loss = 0.0
    for c in range(n_classes):
        qc = weight[c] * ((1.0 - eps) * q[c] + smooth)
        wq += qc
        loss += qc * (lse - row[c])
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
        scratch = np.empty(0 if want_grad else n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            g = grad_out[i] if want_grad else scratch
            loss_out[i] = _proba_row(x[i], target[i], weight, eps, grad_scale[i], g, want_grad)


def _proba_tiles(x, target, weight, eps, grad_scale, loss_out, grad_out,
                 n_samples, n_classes, n_pos):
    want_grad = grad_out.shape[0] != 0
    smooth = eps / n_classes
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    for tile in prange(n_samples * tiles_per_sample):
        n = tile // tiles_per_sample
        s0 = (tile % tiles_per_sample) * TILE
        width = min(TILE, n_pos - s0)
        base, pos0 = n * n_classes * n_pos + s0, n * n_pos + s0
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        lse = np.empty(TILE, dtype=np.float64)
        _tile_max_sumexp(x, base, n_pos, n_classes, width, m, s, grad_out, want_grad,
                         np.empty(TILE, dtype=x.dtype), lse)
        wq = np.zeros(TILE, dtype=np.float64)
        loss = np.zeros(TILE, dtype=np.float64)
        for c in range(n_classes):  # class by class, see _proba_row
            off = base + c * n_pos
            for j in range(width):
                qc = weight[c] * ((1.0 - eps) * target[off + j] + smooth)
                wq[j] += qc
                loss[j] += qc * (lse[j] - x[off + j])
        coef = np.empty(TILE, dtype=np.float64)
        for j in range(width):
            loss_out[pos0 + j] = loss[j]
            coef[j] = grad_scale[pos0 + j] * wq[j] / s[j]
        if want_grad:
            for c in range(n_classes):
                off = base + c * n_pos
                for j in range(width):
                    qc = weight[c] * ((1.0 - eps) * target[off + j] + smooth)
                    grad_out[off + j] = _cast_like(
                        grad_out[off + j] * coef[j] - grad_scale[pos0 + j] * qc, m[0])


# --------------------------------------------------------------- softmax, logsumexp
def _softmax_rows(x, log, out):
    n_rows = x.shape[0]
    for i in prange(n_rows):
        row = x[i]
        o = out[i]
        m = _row_max(row)
        s = _row_sumexp(row, m, o)  # for log, o is overwritten below
        if log:
            shift = _cast_like(np.float64(m) + np.log(s), m)
            for c in range(row.shape[0]):
                o[c] = row[c] - shift
        else:
            inv = _cast_like(1.0 / s, m)
            for c in range(row.shape[0]):
                o[c] = o[c] * inv


def _softmax_tiles(x, log, out, n_samples, n_classes, n_pos):
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    for tile in prange(n_samples * tiles_per_sample):
        n = tile // tiles_per_sample
        s0 = (tile % tiles_per_sample) * TILE
        width = min(TILE, n_pos - s0)
        base = n * n_classes * n_pos + s0
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        lse = np.empty(TILE, dtype=np.float64)
        shift = np.empty(TILE, dtype=x.dtype)
        _tile_max_sumexp(x, base, n_pos, n_classes, width, m, s, out, not log, shift, lse)
        for j in range(width):
            shift[j] = lse[j] if log else 1.0 / s[j]
        for c in range(n_classes):
            off = base + c * n_pos
            if log:
                for j in range(width):
                    out[off + j] = x[off + j] - shift[j]
            else:
                for j in range(width):
                    out[off + j] = out[off + j] * shift[j]


@_helper
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
        scratch = np.empty(n_classes, dtype=x.dtype)
        for i in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            m = _row_max(x[i])
            if np.isinf(m):
                out[i] = _infinite_lse(x[i], 0, 1, n_classes, m)
            else:
                out[i] = np.float64(m) + np.log(_row_sumexp(x[i], m, scratch))


def _logsumexp_tiles(x, out, n_samples, n_classes, n_pos):
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    for tile in prange(n_samples * tiles_per_sample):
        n = tile // tiles_per_sample
        s0 = (tile % tiles_per_sample) * TILE
        width = min(TILE, n_pos - s0)
        m = np.empty(TILE, dtype=x.dtype)
        s = np.empty(TILE, dtype=np.float64)
        lse = np.empty(TILE, dtype=np.float64)
        _tile_max_sumexp(x, n * n_classes * n_pos + s0, n_pos, n_classes, width, m, s,
                         np.empty(0, dtype=x.dtype), False, np.empty(TILE, dtype=x.dtype), lse)
        base = n * n_classes * n_pos + s0
        for j in range(width):
            if np.isinf(m[j]):
                out[n * n_pos + s0 + j] = _infinite_lse(x, base + j, n_pos, n_classes, m[j])
            else:
                out[n * n_pos + s0 + j] = lse[j]


# ------------------------------------------------------------------ binary (sigmoid)
def _bce_rows(x, y, weight, pos_weight, grad_scale, loss_out, grad_out):
    n_rows, n_cols = x.shape
    want_grad = grad_out.shape[0] != 0
    for i in prange(n_rows):
        for j in range(n_cols):
            xv = np.float64(x[i, j])
            yv = np.float64(y[i, j])
            w = weight[i, j]
            lw = 1.0 + (pos_weight[i, j] - 1.0) * yv
            # softplus(-x) = log1p(exp(-|x|)) + max(-x, 0): never overflows.
            sp = np.log1p(np.exp(-abs(xv))) + max(-xv, 0.0)
            loss_out[i, j] = w * ((1.0 - yv) * xv + lw * sp)
            if want_grad:
                # sigmoid(-x), written so that exp never overflows.
                if xv >= 0:
                    z = np.exp(-xv)
                    sig_neg = z / (1.0 + z)
                else:
                    sig_neg = 1.0 / (1.0 + np.exp(xv))
                grad_out[i, j] = grad_scale[i, j] * w * ((1.0 - yv) - lw * sig_neg)


_KERNELS = {
    name: jit(fn)
    for name, fn in {
        "index_rows": _index_rows, "index_tiles": _index_tiles,
        "proba_rows": _proba_rows, "proba_tiles": _proba_tiles,
        "softmax_rows": _softmax_rows, "softmax_tiles": _softmax_tiles,
        "logsumexp_rows": _logsumexp_rows, "logsumexp_tiles": _logsumexp_tiles,
        "bce_rows": _bce_rows,
    }.items()
}

# Numba's "workqueue" layer aborts the process when two Python threads launch parallel
# kernels at once. Until a parallel kernel has run we do not know which layer Numba chose,
# so launches are serialised until then, and for good if it is "workqueue".
_launch_lock = threading.Lock()
_layer = None


def launch(kernel, n_threads, *args):
    """Run a ``(parallel, serial)`` pair made by :func:`jit` on ``n_threads`` threads.

    The one place that applies the thread policy for Numba code: serial for one thread
    and in forked children, Numba's thread count set per call (it is thread-local), and
    launches serialised while the threading layer may be "workqueue".
    """
    global _layer
    parallel, serial = kernel
    if n_threads <= 1 or _config._forked_child:
        return serial(*args)
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    if _layer is None or _layer == "workqueue":
        with _launch_lock:
            result = parallel(*args)
            _layer = numba.threading_layer()
            return result
    return parallel(*args)


def _run(name, n_threads, *args):
    launch(_KERNELS[name], n_threads, *args)


def _flat(a):
    """1-D view of an (N, S) float64 array; a broadcast scalar stays a stride-0 view."""
    if a.size and not any(a.strides):
        return np.broadcast_to(a.reshape(-1)[:1], (a.size,))
    return np.ravel(a)


def _no_grad(grad_out):
    return grad_out.shape[0] == 0


def _empty(logits, ndim):
    # An "empty" gradient may come in any dtype; the kernels want the logits' dtype.
    return np.empty((0,) * ndim, dtype=logits.dtype)


# ------------------------------------------------------------------ contract functions
def softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                     loss_out, grad_out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # an empty sum (validation left only ignored targets); no gradient
        loss_out[...] = 0.0
        return
    empty = _no_grad(grad_out)
    # Summed here: inside a parallel kernel, weight.sum() would become a parallel
    # reduction whose order depends on the thread count.
    w_total = float(np.sum(weight))
    if s == 1 and c > _config.SMALL_C:
        _run("index_rows", n_threads, logits.reshape(n, c), target.reshape(n), weight,
             w_total, int(ignore_index), float(label_smoothing), _flat(grad_scale),
             loss_out.reshape(n), _empty(logits, 2) if empty else grad_out.reshape(n, c))
    else:
        _run("index_tiles", n_threads, logits.reshape(-1), target.reshape(-1), weight,
             w_total, int(ignore_index), float(label_smoothing), _flat(grad_scale),
             loss_out.reshape(-1), _empty(logits, 1) if empty else grad_out.reshape(-1),
             n, c, s)


def softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out,
                     grad_out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # an empty sum; no gradient
        loss_out[...] = 0.0
        return
    empty = _no_grad(grad_out)
    if s == 1:
        _run("proba_rows", n_threads, logits.reshape(n, c), target.reshape(n, c), weight,
             float(label_smoothing), _flat(grad_scale), loss_out.reshape(n),
             _empty(logits, 2) if empty else grad_out.reshape(n, c))
    else:
        _run("proba_tiles", n_threads, logits.reshape(-1), target.reshape(-1), weight,
             float(label_smoothing), _flat(grad_scale), loss_out.reshape(-1),
             _empty(logits, 1) if empty else grad_out.reshape(-1), n, c, s)


def bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out, n_threads):
    _run("bce_rows", n_threads, input, target, weight, pos_weight, grad_scale, loss_out,
         _empty(input, 2) if _no_grad(grad_out) else grad_out)


def softmax(logits, log, out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # nothing to write
        return
    if s == 1:
        _run("softmax_rows", n_threads, logits.reshape(n, c), bool(log), out.reshape(n, c))
    else:
        _run("softmax_tiles", n_threads, logits.reshape(-1), bool(log), out.reshape(-1),
             n, c, s)


def logsumexp(logits, out, n_threads):
    n, c, s = logits.shape
    if c == 0:  # log of an empty sum
        out[...] = -np.inf
        return
    if s == 1:
        _run("logsumexp_rows", n_threads, logits.reshape(n, c), out.reshape(n))
    else:
        _run("logsumexp_tiles", n_threads, logits.reshape(-1), out.reshape(-1), n, c, s)


def build_info():
    return {
        "numba": numba.__version__,
        "threading_layer": _layer or f"not chosen yet ({numba.config.THREADING_LAYER})",
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "exp": "range reduction + polynomial, vectorised by LLVM",
    }
