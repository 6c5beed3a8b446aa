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
  vectorises although the class axis is strided (no transposed copy).
* Each kernel is compiled twice from one source: ``parallel=True`` for n_threads > 1 and
  serial for n_threads == 1 (and in forked children, where OpenMP pools are unsafe).
"""

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import _config

# Reassociation lets LLVM vectorise the sums; no "nnan"/"ninf": NaN and inf logits must
# follow IEEE rules to give torch's answers.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
TILE = 256


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret int32 bits as float32 / int64 bits as float64 (an LLVM bitcast)."""
    if bits == types.int32:
        sig, llty = types.float32(types.int32), ir.FloatType()
    elif bits == types.int64:
        sig, llty = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llty)

    return sig, codegen


# float32: Cody-Waite split of ln 2 and a degree-6 minimax polynomial (max rel. error
# ~1.2e-7 on [-ln2/2, ln2/2]); results below exp(-87) are flushed to 0.
_F32_MIN_X = np.float32(-87.0)
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


def _exp_nonpos_f32(x):
    p0, p1, p2, p3, p4, p5 = _F32_P
    clamped = _F32_MIN_X if x < _F32_MIN_X else x
    # The exponent is computed from a NaN-free copy: converting NaN to int is undefined.
    finite = clamped if clamped == clamped else _F32_ZERO
    k = np.floor(finite * _F32_LOG2E + _F32_HALF)
    r = clamped - k * _F32_LN2_HI - k * _F32_LN2_LO
    p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
    p = p * r * r + r + _F32_ONE
    scale = _bits_to_float(np.int32((np.int32(k) + 127) << 23))
    return _F32_ZERO if x < _F32_MIN_X else p * scale


# float64: the same scheme with a degree-13 Taylor polynomial (truncation < 1e-17 on
# [-ln2/2, ln2/2]); results below exp(-708) are flushed to 0.
_F64_MIN_X = -708.0
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93145751953125e-1
_F64_LN2_LO = 1.42860682030941723212e-6
_F64_INV_FACT = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(13, 1, -1))


def _exp_nonpos_f64(x):
    clamped = _F64_MIN_X if x < _F64_MIN_X else x
    finite = clamped if clamped == clamped else 0.0
    k = np.floor(finite * _F64_LOG2E + 0.5)
    r = clamped - k * _F64_LN2_HI - k * _F64_LN2_LO
    c13, c12, c11, c10, c9, c8, c7, c6, c5, c4, c3, c2 = _F64_INV_FACT
    p = c13 * r + c12
    p = ((((((((((p * r + c11) * r + c10) * r + c9) * r + c8) * r + c7) * r + c6) * r
              + c5) * r + c4) * r + c3) * r + c2) * r
    p = p * r + r + 1.0
    scale = _bits_to_float((np.int64(k) + np.int64(1023)) << np.int64(52))
    return 0.0 if x < _F64_MIN_X else p * scale


def _exp_nonpos(x):
    """exp(x) for x <= 0 (or NaN), vectorisable."""
    raise NotImplementedError  # only callable from jitted code


@overload(_exp_nonpos, fastmath=_FASTMATH)
def _ol_exp_nonpos(x):
    if x == types.float32:
        return _exp_nonpos_f32
    if x == types.float64:
        return _exp_nonpos_f64
    return None


def _cast_like(value, like):
    """``value`` converted to the type of ``like`` (float32 stays float32)."""
    raise NotImplementedError


@overload(_cast_like)
def _ol_cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def _jit(fn):
    """Compile ``fn`` twice: parallel (prange runs on threads) and serial (prange = range)."""
    parallel = njit(parallel=True, fastmath=_FASTMATH, cache=True)(fn)
    serial = njit(parallel=False, fastmath=_FASTMATH, cache=True)(fn)
    return parallel, serial


_helper = njit(fastmath=_FASTMATH, cache=True)


# --------------------------------------------------------------------------- row passes
@_helper
def _row_max(x):
    m = x[0]
    for c in range(1, x.shape[0]):
        v = x[c]
        m = v if v > m else m
    return m


@_helper
def _row_sumexp(x, m, e_out, store):
    """sum_c exp(x[c] - m) in float64; also writes exp(x[c] - m) to e_out when store."""
    s = 0.0
    if store:
        for c in range(x.shape[0]):
            e = _exp_nonpos(x[c] - m)
            e_out[c] = e
            s += e
    else:
        for c in range(x.shape[0]):
            s += _exp_nonpos(x[c] - m)
    return s


@_helper
def _row_dot(a, b):
    s = 0.0
    for c in range(a.shape[0]):
        s += np.float64(a[c]) * b[c]
    return s


# ---------------------------------------------------------------- class-index targets
def _index_rows(x, target, weight, ignore_index, eps, grad_scale, loss_out, grad_out):
    n_rows, n_classes = x.shape
    want_grad = grad_out.shape[0] != 0
    w_total = weight.sum()
    smooth = eps / n_classes
    for i in prange(n_rows):
        t = target[i]
        if t == ignore_index:
            loss_out[i] = 0.0
            if want_grad:
                grad_out[i, :] = 0
            continue
        row = x[i]
        g = grad_out[i] if want_grad else grad_out[0:0].reshape(-1)
        m = _row_max(row)
        s = _row_sumexp(row, m, g, want_grad)
        lse = np.float64(m) + np.log(s)
        w_t = weight[t]
        loss = (1.0 - eps) * w_t * (lse - row[t])
        if eps > 0.0:
            loss += smooth * (w_total * lse - _row_dot(row, weight))
        loss_out[i] = loss
        if want_grad:
            gs = grad_scale[i]
            coef = _cast_like(gs * ((1.0 - eps) * w_t + smooth * w_total) / s, m)
            if eps > 0.0:
                shift = gs * smooth
                for c in range(n_classes):
                    g[c] = g[c] * coef - _cast_like(shift * weight[c], m)
            else:
                for c in range(n_classes):
                    g[c] = g[c] * coef
            g[t] -= _cast_like(gs * (1.0 - eps) * w_t, m)


def _index_tiles(x, target, weight, ignore_index, eps, grad_scale, loss_out, grad_out,
                 n_samples, n_classes, n_pos):
    """Tiled kernel on the flat (N, C, S) arrays; tiles run along S."""
    want_grad = grad_out.shape[0] != 0
    w_total = weight.sum()
    smooth = eps / n_classes
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    for tile in prange(n_samples * tiles_per_sample):
        n = tile // tiles_per_sample
        s0 = (tile % tiles_per_sample) * TILE
        width = min(TILE, n_pos - s0)
        base, pos0 = n * n_classes * n_pos + s0, n * n_pos + s0
        m = np.empty(TILE, dtype=x.dtype)
        s = np.zeros(TILE, dtype=np.float64)
        for j in range(width):
            m[j] = x[base + j]
        for c in range(1, n_classes):
            off = base + c * n_pos
            for j in range(width):
                v = x[off + j]
                m[j] = v if v > m[j] else m[j]
        # The gradient is built in place of the exp values.
        for c in range(n_classes):
            off = base + c * n_pos
            if want_grad:
                for j in range(width):
                    e = _exp_nonpos(x[off + j] - m[j])
                    grad_out[off + j] = e
                    s[j] += e
            else:
                for j in range(width):
                    s[j] += _exp_nonpos(x[off + j] - m[j])
        swx = np.zeros(TILE, dtype=np.float64)
        if eps > 0.0:
            for c in range(n_classes):
                off = base + c * n_pos
                for j in range(width):
                    swx[j] += weight[c] * x[off + j]
        coef = np.empty(TILE, dtype=x.dtype)
        shift = np.empty(TILE, dtype=x.dtype)
        for j in range(width):
            t = target[pos0 + j]
            if t == ignore_index:
                loss_out[pos0 + j] = 0.0
                coef[j] = 0
                shift[j] = 0
                continue
            lse = np.float64(m[j]) + np.log(s[j])
            w_t = weight[t]
            loss = (1.0 - eps) * w_t * (lse - x[base + t * n_pos + j])
            if eps > 0.0:
                loss += smooth * (w_total * lse - swx[j])
            loss_out[pos0 + j] = loss
            gs = grad_scale[pos0 + j]
            coef[j] = _cast_like(gs * ((1.0 - eps) * w_t + smooth * w_total) / s[j], m[0])
            shift[j] = _cast_like(gs * smooth, m[0])
        if not want_grad:
            continue
        for c in range(n_classes):
            off = base + c * n_pos
            w_c = _cast_like(weight[c], m[0])
            if eps > 0.0:
                for j in range(width):
                    grad_out[off + j] = grad_out[off + j] * coef[j] - shift[j] * w_c
            else:
                for j in range(width):
                    grad_out[off + j] = grad_out[off + j] * coef[j]
        for j in range(width):
            t = target[pos0 + j]
            if t != ignore_index:
                grad_out[base + t * n_pos + j] -= _cast_like(
                    grad_scale[pos0 + j] * (1.0 - eps) * weight[t], m[0])


# --------------------------------------------------------- class-probability targets
def _proba_rows(x, target, weight, eps, grad_scale, loss_out, grad_out):
    n_rows, n_classes = x.shape
    want_grad = grad_out.shape[0] != 0
    smooth = eps / n_classes
    for i in prange(n_rows):
        row = x[i]
        q = target[i]
        g = grad_out[i] if want_grad else grad_out[0:0].reshape(-1)
        m = _row_max(row)
        s = _row_sumexp(row, m, g, want_grad)
        lse = np.float64(m) + np.log(s)
        wq = 0.0
        wqx = 0.0
        for c in range(n_classes):
            qc = (1.0 - eps) * q[c] + smooth
            wq += weight[c] * qc
            wqx += weight[c] * qc * row[c]
        loss_out[i] = wq * lse - wqx
        if want_grad:
            gs = grad_scale[i]
            coef = _cast_like(gs * wq / s, m)
            for c in range(n_classes):
                qc = (1.0 - eps) * q[c] + smooth
                g[c] = g[c] * coef - _cast_like(gs * weight[c] * qc, m)


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
        s = np.zeros(TILE, dtype=np.float64)
        wq = np.zeros(TILE, dtype=np.float64)
        wqx = np.zeros(TILE, dtype=np.float64)
        for j in range(width):
            m[j] = x[base + j]
        for c in range(1, n_classes):
            off = base + c * n_pos
            for j in range(width):
                v = x[off + j]
                m[j] = v if v > m[j] else m[j]
        for c in range(n_classes):
            off = base + c * n_pos
            for j in range(width):
                e = _exp_nonpos(x[off + j] - m[j])
                if want_grad:
                    grad_out[off + j] = e
                s[j] += e
                qc = weight[c] * ((1.0 - eps) * target[off + j] + smooth)
                wq[j] += qc
                wqx[j] += qc * x[off + j]
        coef = np.empty(TILE, dtype=np.float64)
        for j in range(width):
            lse = np.float64(m[j]) + np.log(s[j])
            loss_out[pos0 + j] = wq[j] * lse - wqx[j]
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
        s = _row_sumexp(row, m, o, not log)
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
        s = np.zeros(TILE, dtype=np.float64)
        for j in range(width):
            m[j] = x[base + j]
        for c in range(1, n_classes):
            off = base + c * n_pos
            for j in range(width):
                v = x[off + j]
                m[j] = v if v > m[j] else m[j]
        for c in range(n_classes):
            off = base + c * n_pos
            for j in range(width):
                e = _exp_nonpos(x[off + j] - m[j])
                if not log:
                    out[off + j] = e
                s[j] += e
        shift = np.empty(TILE, dtype=x.dtype)
        for j in range(width):
            shift[j] = np.float64(m[j]) + np.log(s[j]) if log else 1.0 / s[j]
        for c in range(n_classes):
            off = base + c * n_pos
            if log:
                for j in range(width):
                    out[off + j] = x[off + j] - shift[j]
            else:
                for j in range(width):
                    out[off + j] = out[off + j] * shift[j]


def _logsumexp_rows(x, out):
    dummy = x[0, 0:0]
    for i in prange(x.shape[0]):
        m = _row_max(x[i])
        out[i] = np.float64(m) + np.log(_row_sumexp(x[i], m, dummy, False))


def _logsumexp_tiles(x, out, n_samples, n_classes, n_pos):
    tiles_per_sample = (n_pos + TILE - 1) // TILE
    for tile in prange(n_samples * tiles_per_sample):
        n = tile // tiles_per_sample
        s0 = (tile % tiles_per_sample) * TILE
        width = min(TILE, n_pos - s0)
        base = n * n_classes * n_pos + s0
        m = np.empty(TILE, dtype=x.dtype)
        s = np.zeros(TILE, dtype=np.float64)
        for j in range(width):
            m[j] = x[base + j]
        for c in range(1, n_classes):
            off = base + c * n_pos
            for j in range(width):
                v = x[off + j]
                m[j] = v if v > m[j] else m[j]
        for c in range(n_classes):
            off = base + c * n_pos
            for j in range(width):
                s[j] += _exp_nonpos(x[off + j] - m[j])
        for j in range(width):
            out[n * n_pos + s0 + j] = np.float64(m[j]) + np.log(s[j])


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
    name: _jit(fn)
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


def _run(name, n_threads, *args):
    global _layer
    parallel, serial = _KERNELS[name]
    if n_threads <= 1 or _config._forked_child:
        return serial(*args)
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))  # thread-local
    if _layer is None or _layer == "workqueue":
        with _launch_lock:
            parallel(*args)
            _layer = numba.threading_layer()
            return
    parallel(*args)


def _flat(a):
    """1-D view of an (N, S) float64 array; a broadcast scalar stays a stride-0 view."""
    if a.size and not any(a.strides):
        return np.broadcast_to(a.reshape(-1)[:1], (a.size,))
    return np.ravel(a)


def _no_grad(grad_out):
    return grad_out.shape[0] == 0


# ------------------------------------------------------------------ contract functions
def softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                     loss_out, grad_out, n_threads):
    n, c, s = logits.shape
    empty = _no_grad(grad_out)
    if s == 1:
        _run("index_rows", n_threads, logits.reshape(n, c), target.reshape(n), weight,
             int(ignore_index), float(label_smoothing), _flat(grad_scale),
             loss_out.reshape(n), grad_out.reshape(0, 0) if empty else grad_out.reshape(n, c))
    else:
        _run("index_tiles", n_threads, logits.reshape(-1), target.reshape(-1), weight,
             int(ignore_index), float(label_smoothing), _flat(grad_scale),
             loss_out.reshape(-1), grad_out.reshape(0) if empty else grad_out.reshape(-1),
             n, c, s)


def softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out,
                     grad_out, n_threads):
    n, c, s = logits.shape
    empty = _no_grad(grad_out)
    if s == 1:
        _run("proba_rows", n_threads, logits.reshape(n, c), target.reshape(n, c), weight,
             float(label_smoothing), _flat(grad_scale), loss_out.reshape(n),
             grad_out.reshape(0, 0) if empty else grad_out.reshape(n, c))
    else:
        _run("proba_tiles", n_threads, logits.reshape(-1), target.reshape(-1), weight,
             float(label_smoothing), _flat(grad_scale), loss_out.reshape(-1),
             grad_out.reshape(0) if empty else grad_out.reshape(-1), n, c, s)


def bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out, n_threads):
    _run("bce_rows", n_threads, input, target, weight, pos_weight, grad_scale, loss_out,
         grad_out.reshape(0, 0) if _no_grad(grad_out) else grad_out)


def softmax(logits, log, out, n_threads):
    n, c, s = logits.shape
    if s == 1:
        _run("softmax_rows", n_threads, logits.reshape(n, c), bool(log), out.reshape(n, c))
    else:
        _run("softmax_tiles", n_threads, logits.reshape(-1), bool(log), out.reshape(-1),
             n, c, s)


def logsumexp(logits, out, n_threads):
    n, c, s = logits.shape
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
