"""Numba backend, math: LLVM intrinsics (bit casts, prefetch) and the vectorisable exp,
log and row max that the kernels are built from.

``math.exp`` keeps Numba loops scalar (~0.1 G exp/s). ``_exp_nonpos`` is a range
reduction + polynomial + exponent-bits exp that LLVM vectorises. Its argument is always
``x - max`` (so ``<= 0`` or NaN); NaN propagates and very negative values give 0.
``_exp_diff(x, max)`` is the softmax's: in float32 it puts the rounding error of
``x - max`` back into the reduced argument.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from .._config import LANES, TILE

# Importing it registers cecore's cache locator, which a dispatcher consults when it is
# made (else the cached functions below would be cached inside the installed package).
from ._runtime import cached_njit


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


def _pow2_codegen(builder, t, width, add, shift, fty):
    """2**k from ``t = x / ln2 + magic`` (magic = 1.5 * 2**23, or 2**52 for float64),
    whose low mantissa bits hold k = round(x / ln2): the float with exponent bits
    ``bits(t) - bits(magic) + bias``, computed in the float's own integer width (Numba's
    own int32 arithmetic would widen to int64 and halve the vector width)."""
    ity = ir.IntType(width)
    bits = builder.add(builder.bitcast(t, ity), ir.Constant(ity, add))
    return builder.bitcast(builder.shl(bits, ir.Constant(ity, shift)), fty)


@intrinsic
def _dev(typingctx, m, x, log_s):
    """lse - x as (m - x) + log_s (see _row_wdev in _kernels.py), without "reassoc": with
    it LLVM forms m + log_s, the loop invariant, and the rounding this order avoids comes
    back. An intrinsic, not a function compiled without "reassoc": a call in a loop that
    sums is only inlined when the kernel's module is linked, and LLVM then vectorises
    that sum separately, perhaps differently, in the serial and the parallel kernel. The
    instructions carry flags ("nsz"), so Numba's fastmath pass, which flags only
    instructions without any, leaves them as they are."""
    if not (m == x == log_s and m in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        a, b, c = args
        return builder.fadd(builder.fsub(a, b, flags=("nsz",)), c, flags=("nsz",))

    return m(m, x, log_s), codegen


@intrinsic
def _rounded_product(typingctx, a, b):
    """a * b rounded, never fused into a following add: "contract" turned the target's
    gradient term p_t * coef - gs * w_t into an FMA that keeps the product exact, so a
    saturated row's gradient came out as the product's rounding error (1e-17, not 0 as
    coef, the same product rounded, gives in Cython and torch). Flagged "nsz" only, so
    Numba's fastmath pass leaves it alone (see _dev)."""
    if not (a == b and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1], flags=("nsz",))

    return a(a, b), codegen


@intrinsic
def _divided(typingctx, a, b):
    """a / b, IEEE division, whatever the copy of the caller: "arcp" let LLVM turn the
    divisions of a vectorised loop by the same s into products by 1 / s (1 ulp off),
    and whether it does depends on where the helper is inlined, so two kernels that
    must agree bit for bit (softmax_ce_report and softmax_ce_scores) could differ.
    Flagged "nsz" only, as :func:`_rounded_product`."""
    if not (a == b and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(args[0], args[1], flags=("nsz",))

    return a(a, b), codegen


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


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(mask)),
                                                    list(mask)))


@intrinsic
def _add_blocks(typingctx, acc, v, n_blocks):
    """acc[:LANES] += v[b * LANES:(b + 1) * LANES] for b < n_blocks, in that order, as
    LLVM vector adds. Each lane adds the same values in the same order as acc[j] +=
    v[b * LANES + j], so the sums are the same bits; written as that loop, LLVM kept it
    scalar (acc and v might overlap: a store and a reload per element), and as one
    vector add per block it still stored acc and loaded it back for the next. v is
    float64 or float32 (each value widened, exactly). No bounds checks: acc must hold
    LANES float64 values, v n_blocks * LANES."""
    if not (isinstance(acc, types.Array) and isinstance(v, types.Array)
            and acc.dtype == types.float64 and v.dtype in (types.float32, types.float64)
            and isinstance(n_blocks, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.DoubleType(), LANES)
        ity = ir.VectorType(context.get_value_type(signature.args[1].dtype), LANES)
        acc_p, v_p = (context.make_array(signature.args[k])(context, builder, args[k]).data
                      for k in (0, 1))
        count = context.cast(builder, args[2], signature.args[2], types.int64)
        acc_v = builder.bitcast(acc_p, vty.as_pointer())
        # the running sum in a local (a register after LLVM's mem2reg); its adds are
        # flagged "nsz" only, so that Numba's fastmath pass cannot add "reassoc" (see
        # _dev) and the blocks stay added in order
        total = cgutils.alloca_once_value(builder, builder.load(acc_v, align=8))
        with cgutils.for_range(builder, count) as loop:
            first = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
            block = builder.load(builder.bitcast(builder.gep(v_p, [first]), ity.as_pointer()),
                                 align=4)
            if ity != vty:
                block = builder.fpext(block, vty)
            builder.store(builder.fadd(builder.load(total), block, flags=("nsz",)), total)
        builder.store(builder.load(total), acc_v, align=8)
        return context.get_dummy_value()

    return types.void(acc, v, n_blocks), codegen


def _block_copy(emit):
    """An intrinsic ``f(src, s0, sld, dst, d0, dld)`` on 1-D float32 or float64 arrays that
    moves a block of values in registers: ``emit(builder, ety, load, store)`` writes its
    LLVM instructions, where ``load(j, vty)`` reads a vector of type ``vty`` at
    ``src[s0 + j * sld]`` and ``store(c, v)`` writes ``v`` at ``dst[d0 + c * dld]`` (both
    unaligned). Generic LLVM vectors: without AVX the backend splits them, and the copy is
    the same everywhere. No bounds checks: the caller's loops keep the block inside both
    arrays."""

    def typer(typingctx, src, s0, sld, dst, d0, dld):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
                and src.dtype == dst.dtype and src.dtype in (types.float32, types.float64)):
            return None

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            src_p, dst_p = (context.make_array(signature.args[k])(context, builder, args[k])
                            .data for k in (0, 3))
            s0_, sld_, d0_, dld_ = (context.cast(builder, args[k], signature.args[k],
                                                 types.int64) for k in (1, 2, 4, 5))

            def at(base, start, step, k, ty):
                p = builder.gep(base, [builder.add(start, builder.mul(step, i64(k)))])
                return builder.bitcast(p, ty.as_pointer())

            def load(j, vty):
                return builder.load(at(src_p, s0_, sld_, j, vty), align=1)

            def store(c, v):
                builder.store(v, at(dst_p, d0_, dld_, c, v.type), align=1)

            emit(builder, context.get_value_type(signature.args[0].dtype), load, store)
            return context.get_dummy_value()

        return types.void(src, s0, sld, dst, d0, dld), codegen

    typer.__name__, typer.__doc__ = emit.__name__, emit.__doc__
    return intrinsic(typer)


def _block_width(ety):
    """Values of type ``ety`` in a 32-byte register block: 8 float32, 4 float64."""
    return 8 if isinstance(ety, ir.FloatType) else 4


@_block_copy
def _tr_block(builder, ety, load, store):
    """dst[d0 + c * dld + j] = src[s0 + j * sld + c] for j, c < v, v = 32 // itemsize:
    an 8 x 8 float32 (4 x 4 float64) block transposed in registers, as cec_tr_block in
    cecore_ext/_rowkernels.h (unpack pairs, then pairs of pairs, then 128-bit halves).
    Written as the strided copy it is, LLVM keeps the few-classes transposes scalar (one
    element per load and store)."""
    vty = ir.VectorType(ety, _block_width(ety))
    f32 = vty.count == 8
    r = [load(j, vty) for j in range(vty.count)]
    if f32:
        lo, hi = (0, 8, 1, 9, 4, 12, 5, 13), (2, 10, 3, 11, 6, 14, 7, 15)
        t = [_shuffle(builder, r[k - k % 2], r[k - k % 2 + 1], hi if k % 2 else lo)
             for k in range(8)]
        lo, hi = (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15)
        u = []
        for k in (0, 4):
            u += [_shuffle(builder, t[k], t[k + 2], lo), _shuffle(builder, t[k], t[k + 2], hi),
                  _shuffle(builder, t[k + 1], t[k + 3], lo),
                  _shuffle(builder, t[k + 1], t[k + 3], hi)]
        out = [_shuffle(builder, u[i % 4], u[i % 4 + 4],
                        (0, 1, 2, 3, 8, 9, 10, 11) if i < 4 else (4, 5, 6, 7, 12, 13, 14, 15))
               for i in range(8)]
    else:
        t = [_shuffle(builder, r[k - k % 2], r[k - k % 2 + 1], (1, 5, 3, 7) if k % 2 else
                      (0, 4, 2, 6)) for k in range(4)]
        out = [_shuffle(builder, t[i % 2], t[i % 2 + 2], (2, 3, 6, 7) if i >= 2 else
                        (0, 1, 4, 5)) for i in range(4)]
    for c in range(vty.count):
        store(c, out[c])


@_block_copy
def _tr_n2(builder, ety, load, store):
    """dst[d0 + c * dld + j] = src[s0 + j * sld + c] for j < v, c < 2 (v as
    :func:`_tr_block`): the last two of C % v == 2 classes (ten) of v rows into a tile, as
    cec_tr_8x2_f32 / cec_tr_4x2_f64 in cecore_ext/_rowkernels.h, where a further block
    overlapping the one before it by v - 2 classes moved v * v values for 2 v. The
    kernels call it for float32 only (see _transpose)."""
    v = _block_width(ety)
    parts = [load(j, ir.VectorType(ety, 2)) for j in range(v)]
    while len(parts) > 2:  # concatenated pairwise, down to two halves of v values
        parts = [_shuffle(builder, parts[k], parts[k + 1], tuple(range(2 * parts[k].type.count)))
                 for k in range(0, len(parts), 2)]
    for c in range(2):
        store(c, _shuffle(builder, parts[0], parts[1], tuple(range(c, 2 * v, 2))))


@_block_copy
def _tr_2n(builder, ety, load, store):
    """dst[d0 + c * dld + j] = src[s0 + j * sld + c] for j < 2, c < v: the inverse of
    :func:`_tr_n2` (the last two classes of a tile back into v rows), as cec_tr_2x8_f32 /
    cec_tr_2x4_f64."""
    v = _block_width(ety)
    a, b = (load(j, ir.VectorType(ety, v)) for j in range(2))
    for c in range(v):
        store(c, _shuffle(builder, a, b, (c, c + v)))


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _view(typingctx, arr, start, stop):
    """``arr[start:stop]`` of a 1-D contiguous array, as a view that holds no reference.

    In a kernel's own body Numba counts a slice's references: making one and dropping it
    are two calls that atomically update the counter of ``arr``'s memory (shared by every
    thread that reads ``arr``). This view has no memory owner (a null meminfo), so there
    is nothing to count. (The helpers, compiled without reference counting, see
    ``_runtime.helper``, use it for its lack of clipping and index checks.) It must not
    outlive ``arr``, and ``0 <= start <= stop <= len(arr)`` is the caller's to keep (no
    clipping, no bounds checks)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and isinstance(start, types.Integer) and isinstance(stop, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(arr)(context, builder, args[0])
        lo, hi = (context.cast(builder, args[k], signature.args[k], types.intp)
                  for k in (1, 2))
        out = context.make_array(arr)(context, builder)
        populate_array(out, data=builder.gep(src.data, [lo]), shape=[builder.sub(hi, lo)],
                       strides=[src.itemsize], itemsize=src.itemsize, meminfo=None)
        return out._getvalue()

    return arr(arr, start, stop), codegen


@intrinsic
def _tile_scratch(typingctx, like):
    """A 1-D array of TILE values of ``like``'s type on the calling function's stack (an
    ``alloca`` in its entry block), valid until that function returns. LLVM knows a
    stack slot aliases none of the caller's arrays, so loops that read them and write it
    need no runtime overlap checks, which a heap scratch passed in as an argument gets.
    Those checks, run per block of LANES values, were removed only when a kernel's
    module optimised its linked copy of the helper a second time: the helper's own copy,
    which a process runs when it compiled the kernel itself, kept them (kernel_findings.md,
    thirty-sixth session)."""
    if not (isinstance(like, types.Array) and like.dtype in (types.float32, types.float64)):
        return None
    arr = types.Array(like.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        ety = context.get_data_type(like.dtype)
        slot = cgutils.alloca_once(builder, ir.ArrayType(ety, TILE))
        slot.align = 64  # whole cache lines (4 or 8 bytes made float32 up to 1.1x slower)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(ety))
        out = context.make_array(arr)(context, builder)
        populate_array(out, data=builder.bitcast(slot, ety.as_pointer()),
                       shape=[context.get_constant(types.intp, TILE)], strides=[itemsize],
                       itemsize=itemsize, meminfo=None)
        return out._getvalue()

    return arr(like), codegen


def _splat(builder, vty, value):
    """A vector of type ``vty`` with ``value`` in every lane."""
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return _shuffle(builder, vec, vec, [0] * vty.count)


@intrinsic
def _add_moments(typingctx, e, x, start, n_blocks, m, xt, a, q, k):
    """For b < n_blocks, the LANES values at i = start + b * LANES + j (lane j) of the
    exps ``e`` and logits ``x`` add ``e_i (x_i - m)`` (0 where ``e_i = 0``) to ``a[j]``,
    ``(e_i SQ)**2`` to ``q[j]`` (see ``_SQUARE_SCALE``) and 1 where ``x_i > xt`` to
    ``k[j]``, in the arrays' float type, block after block: the order is fixed here, so
    every compiled copy gives the same bits. As LLVM vector operations: written as loops
    without "reassoc" LLVM kept the sums scalar (the scoring kernel 2.9x its former time),
    and through scratch and :func:`_add_blocks` 1.6-1.9x (bench_ab.py, Zen 4;
    kernel_findings.md, twenty-eighth session). No bounds checks."""
    arrays = (e, x, a, q, k)
    if not (all(isinstance(v, types.Array) and v.dtype == m for v in arrays)
            and isinstance(m, types.Float) and xt == m
            and isinstance(start, types.Integer) and isinstance(n_blocks, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(m)
        vty = ir.VectorType(fty, LANES)
        i64 = ir.IntType(64)
        e_p, x_p, a_p, q_p, k_p = (
            context.make_array(signature.args[i])(context, builder, args[i]).data
            for i in (0, 1, 6, 7, 8))
        first = context.cast(builder, args[2], signature.args[2], types.int64)
        count = context.cast(builder, args[3], signature.args[3], types.int64)

        m_v, xt_v = (_splat(builder, vty, args[k]) for k in (4, 5))
        lo_v = _splat(builder, vty, builder.fadd(args[4], ir.Constant(fty, -1e30)))
        sq_v = ir.Constant(vty, [_SQUARE_SCALE[m]] * LANES)
        zero = ir.Constant(vty, [0.0] * LANES)
        one = ir.Constant(vty, [1.0] * LANES)
        accs = [builder.bitcast(p, vty.as_pointer()) for p in (a_p, q_p, k_p)]
        # the sums in locals (registers after mem2reg); every instruction flagged "nsz"
        # only, so that Numba's fastmath pass adds no "reassoc" or "contract" (see _dev)
        totals = [cgutils.alloca_once_value(builder, builder.load(p, align=4)) for p in accs]
        flags = ("nsz",)
        with cgutils.for_range(builder, count) as loop:
            i = builder.add(first, builder.mul(loop.index, ir.Constant(i64, LANES)))
            ev, xv = (builder.load(builder.bitcast(builder.gep(p, [i]), vty.as_pointer()),
                                   align=4) for p in (e_p, x_p))
            # x clamped to m - 1e30 (one max): where e_i = 0 the term is then 0 * finite,
            # where x_i = -inf it would be 0 * -inf = NaN. As Cython's cec_moments, same
            # bits as a select on e_i > 0 (no speed difference measured here)
            xc = builder.select(builder.fcmp_ordered(">", xv, lo_v), xv, lo_v)
            terms = (builder.fmul(ev, builder.fsub(xc, m_v, flags=flags), flags=flags),
                     builder.fmul(*[builder.fmul(ev, sq_v, flags=flags)] * 2, flags=flags),
                     builder.select(builder.fcmp_ordered(">", xv, xt_v), one, zero))
            for total, term in zip(totals, terms):
                builder.store(builder.fadd(builder.load(total), term, flags=flags), total)
        for p, total in zip(accs, totals):
            builder.store(builder.load(total), p, align=4)
        return context.get_dummy_value()

    return types.void(e, x, start, n_blocks, m, xt, a, q, k), codegen


@intrinsic
def _add_wdev(typingctx, acc, weight, x, n_blocks, m, log_s):
    """For b < n_blocks, adds ``weight[i] * ((m - x[i]) + log_s)`` (as :func:`_dev`, in
    float64) at i = b * LANES + j to ``acc[j]``, block after block, as LLVM vector
    operations (see :func:`_add_moments`: as a loop over a stack array the sum took label
    smoothing from 10 to 14.6 ms at 16384 x 1000 float32). No bounds checks."""
    if not (isinstance(acc, types.Array) and acc.dtype == types.float64
            and isinstance(weight, types.Array) and weight.dtype == types.float64
            and isinstance(x, types.Array) and x.dtype in (types.float32, types.float64)
            and weight.layout == x.layout == "C"
            and isinstance(n_blocks, types.Integer) and m == log_s == types.float64):
        return None

    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.DoubleType(), LANES)
        xty = ir.VectorType(context.get_value_type(x.dtype), LANES)
        i64 = ir.IntType(64)
        acc_p, w_p, x_p = (context.make_array(signature.args[i])(context, builder, args[i]).data
                           for i in (0, 1, 2))
        count = context.cast(builder, args[3], signature.args[3], types.int64)

        m_v, log_v = (_splat(builder, vty, args[k]) for k in (4, 5))
        acc_v = builder.bitcast(acc_p, vty.as_pointer())
        total = cgutils.alloca_once_value(builder, builder.load(acc_v, align=8))
        flags = ("nsz",)  # as _add_moments: no "reassoc" or "contract" added by Numba
        with cgutils.for_range(builder, count) as loop:
            i = builder.mul(loop.index, ir.Constant(i64, LANES))
            w = builder.load(builder.bitcast(builder.gep(w_p, [i]), vty.as_pointer()), align=8)
            xv = builder.load(builder.bitcast(builder.gep(x_p, [i]), xty.as_pointer()), align=4)
            if xty != vty:
                xv = builder.fpext(xv, vty)
            dev = builder.fadd(builder.fsub(m_v, xv, flags=flags), log_v, flags=flags)
            builder.store(builder.fadd(builder.load(total), builder.fmul(w, dev, flags=flags),
                                       flags=flags), total)
        builder.store(builder.load(total), acc_v, align=8)
        return context.get_dummy_value()

    return types.void(acc, weight, x, n_blocks, m, log_s), codegen


@intrinsic
def _lanes(typingctx, like):
    """LANES zeros of ``like``'s float type in an array on the stack of the function that
    calls it: partial sums for a helper, which cannot allocate (see ``_runtime.helper``).
    Lane j adds elements j, j + LANES, ... in order, so a sum needs no "reassoc" to
    vectorise and every compiled copy of it gives the same bits. The array holds no
    reference and must not leave that function."""
    if not isinstance(like, types.Float):
        return None
    arrty = types.Array(like, 1, "C")

    def codegen(context, builder, signature, args):
        lty = context.get_value_type(like)
        itemsize = context.get_abi_sizeof(lty)
        # alloca_once: in the entry block, so a call inside a loop reuses one buffer
        data = cgutils.alloca_once(builder, lty, size=LANES)
        for j in range(LANES):
            builder.store(ir.Constant(lty, 0.0),
                          builder.gep(data, [ir.Constant(ir.IntType(32), j)]))
        out = context.make_array(arrty)(context, builder)
        populate_array(out, data=data, shape=[context.get_constant(types.intp, LANES)],
                       strides=[context.get_constant(types.intp, itemsize)],
                       itemsize=context.get_constant(types.intp, itemsize), meminfo=None)
        return out._getvalue()

    return arrty(like), codegen


@intrinsic
def _address(typingctx, arr, index):
    """The address of ``arr[index]``, as an int64 (a uint64 would turn arithmetic with
    Numba's int64 into float64)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(builder.gep(data, [args[1]]), ir.IntType(64))

    return types.int64(arr, index), codegen


@intrinsic
def _stream_line(typingctx, src, s0, dst, d0):
    """dst[d0:d0 + 64 // itemsize] = src[s0:...]: one whole 64-byte line of dst (the caller
    makes sure one starts at dst[d0]) with a non-temporal store, which sends the line to
    memory without first reading it (write-allocate) as a normal store does. One LLVM
    vector store flagged !nontemporal (one vmovntdq zmm on this Zen 4, two ymm stores
    without AVX-512);
    _store_fence orders these stores before the results are read."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and src.dtype == dst.dtype and src.dtype in (types.float32, types.float64)):
        return None
    f32 = src.dtype == types.float32

    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.FloatType() if f32 else ir.DoubleType(), 16 if f32 else 8)
        src_p, dst_p = (context.make_array(signature.args[k])(context, builder, args[k]).data
                        for k in (0, 2))
        value = builder.load(builder.bitcast(builder.gep(src_p, [args[1]]), vty.as_pointer()),
                             align=1)
        store = builder.store(value, builder.bitcast(builder.gep(dst_p, [args[3]]),
                                                     vty.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.void(src, s0, dst, d0), codegen


@intrinsic
def _store_fence(typingctx):
    """Orders this thread's non-temporal stores before anything after it (the end of the
    parallel loop): sfence on x86, as the Cython backend's cec_stream_fence (the x86
    instruction that orders non-temporal stores); elsewhere LLVM's seq_cst fence."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def _mxcsr(builder, name, slot):
    """Calls LLVM's llvm.x86.sse.<name> (stmxcsr or ldmxcsr) on the i32 at ``slot``."""
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p]), "llvm.x86.sse." + name)
    builder.call(fn, [builder.bitcast(slot, i8p)])


@intrinsic
def _ftz_begin(typingctx):
    """Sets the flush-to-zero bit of this thread's MXCSR and returns the register's former
    value, for :func:`_ftz_end` (as the Cython backend's cec_ftz_begin: a result below the
    normal range is 0, not a subnormal number, whose every computation costs a microcode
    assist). Each prange body of a kernel calls both, so that Numba's worker threads, which
    run other code too, get their register back; the intrinsic reads and writes memory as
    far as LLVM knows, so no load or store of the body moves across it. Not x86: 0, and
    nothing set."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr(builder, "stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, 0x8000)), slot)
        _mxcsr(builder, "ldmxcsr", slot)
        return old

    return types.uint32(), codegen


@intrinsic
def _ftz_end(typingctx, old):
    """Puts back the MXCSR value :func:`_ftz_begin` returned."""
    if old != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        if _X86:
            _mxcsr(builder, "ldmxcsr", cgutils.alloca_once_value(builder, args[0]))
        return context.get_dummy_value()

    return types.void(old), codegen


# exp(x) = 2**k * P(r), k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split of ln 2),
# as cec_exp_f32/f64 in cecore_ext/_rowkernels.h. Inputs are x - max, so <= 0: x is
# clamped from below so that r stays finite and 2**k normal or 0, and k comes from the
# "magic number" trick (x / ln2 + 1.5 * 2**23 rounds to an integer and leaves k in the
# low mantissa bits), which costs one subtraction where floor() and a float -> int
# conversion cost four instructions (float32 exp loop 0.75 -> 0.63 ns per element).
# NaN propagates through r and P; no "nnan" or "reassoc" may touch these instructions
# (reassociated, t - magic would fold back to x / ln2).
#
# float32: P(r) = 1 + r + r**2 Q(r), Q of degree 4 fitted minimax to the relative error on
# |r| <= ln2/2 (3.6e-9, far below float32 rounding; max error 1.007 ulp); exp(x < -87.3)
# flushes to 0.
_F32_MIN_X = np.float32(-88.0)
_F32_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_P = tuple(
    np.float32(v)
    for v in (1.3814540580e-3, 8.3687454462e-3, 4.1668388993e-2, 1.6666521132e-1,
              4.9999994040e-1)
)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)


# float64: P(r) = 1 + r + r**2 Q(r), Q of degree 9, a Chebyshev fit of (exp(r) - 1 - r) / r**2
# on |r| <= ln2/2 (mpmath, 50 digits): relative error 1.7e-17 (0.15 ulp) with these double
# coefficients, two FMAs fewer than a degree-13 Taylor polynomial; exp(x < -708.4)
# flushes to 0.
_F64_MIN_X = -709.0
_F64_MAGIC = 6755399441055744.0  # 1.5 * 2**52
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93145751953125e-1
_F64_LN2_LO = 1.42860682030941723212e-6
_F64_Q = (2.510038549551032e-08, 2.7620088445409746e-07, 2.7557268459997064e-06,
          2.4801521295954376e-05, 0.00019841269863053618, 0.0013888888917213717,
          0.008333333333330062, 0.04166666666662413, 0.16666666666666669,
          0.5000000000000001)


# By type: what the exp emits as immediates (bits of 2**k, clamp, magic) ...
_EXP_IMMEDIATES = {
    types.float32: ((32, 127 - 0x4B400000, 23), _F32_MIN_X, _F32_MAGIC),
    types.float64: ((64, 1023 - 0x4338000000000000, 52), _F64_MIN_X, _F64_MAGIC),
}
# ... and the multiplicative constants it takes from _exp_consts: log2(e), ln2 hi and lo,
# then Q highest degree first.
_EXP_OPERANDS = {
    types.float32: (_F32_LOG2E, _F32_LN2_HI, _F32_LN2_LO) + _F32_P,
    types.float64: (_F64_LOG2E, _F64_LN2_HI, _F64_LN2_LO) + _F64_Q,
}


@intrinsic
def _exp_consts(typingctx, arr):
    """The exp's multiplicative constants for the dtype of the array ``arr``, as a tuple
    of values loaded from a writable global: call it once per function, before its
    loops, and pass the tuple to every :func:`_exp_nonpos`.

    Why not plain constants: Numba compiles with LLVM's large code model, where a
    constant-pool operand needs its address in a register and cannot be folded into an
    FMA, and with AVX2's 16 vector registers too few for the exp's constants, LLVM
    reloaded every one of them in the loop (an address, a broadcast and the FMA: 50
    instructions per 4 doubles). Loaded values are not constants to LLVM: it keeps them
    in registers or spills them once, and folds the reloads (32 instructions; the same
    bits; benchmarks/results/ab_numba_exp_consts_zen5*.json). The global is
    "linkonce_odr", not internal: LLVM would turn an internal global that is never
    written into a constant and fold the loads back (kernel_findings.md, twenty-fifth
    session)."""
    if not isinstance(arr, types.Array) or arr.dtype not in _EXP_OPERANDS:
        return None
    ty = arr.dtype
    vals = _EXP_OPERANDS[ty]
    fty = ir.FloatType() if ty == types.float32 else ir.DoubleType()

    def codegen(context, builder, signature, args):
        aty = ir.ArrayType(fty, len(vals))
        name = f"cecore_exp_operands_{ty}"
        gv = builder.module.globals.get(name)
        if gv is None:
            gv = ir.GlobalVariable(builder.module, aty, name)
            gv.linkage = "linkonce_odr"
            gv.initializer = ir.Constant(aty, [float(v) for v in vals])
        i32 = ir.IntType(32)
        loaded = [builder.load(builder.gep(gv, [ir.Constant(i32, 0), ir.Constant(i32, i)]))
                  for i in range(len(vals))]
        return context.make_tuple(builder, signature.return_type, loaded)

    return types.UniTuple(ty, len(vals))(arr), codegen


def _fused(context):
    """Whether the code Numba emits has FMA instructions (its target machine's features:
    the host's, or NUMBA_CPU_FEATURES); when it cannot tell, no."""
    return "+fma" in getattr(context.codegen(), "_tm_features", "").split(",")


def _exp_codegen(builder, fty, v, lo, ops, fused):
    """The instructions of :func:`_exp_nonpos`, of ``exp(v - lo)`` for ``lo`` a correction
    of v's rounding (or None), from the tuple ``ops`` of :func:`_exp_consts`; ``fused``
    from :func:`_fused`."""
    pow2, min_x, magic = _EXP_IMMEDIATES[types.float32 if fty == ir.FloatType()
                                         else types.float64]
    flags = ("contract", "nsz", "arcp")

    def const(val):
        return ir.Constant(fty, float(val))

    def mul(a, b):
        return builder.fmul(a, b, flags=flags)

    def add(a, b):
        return builder.fadd(a, b, flags=flags)

    def sub(a, b):
        return builder.fsub(a, b, flags=flags)

    log2e, ln2_hi, ln2_lo, *q = [builder.extract_value(ops, i)
                                 for i in range(len(ops.type.elements))]
    low = builder.fcmp_ordered("<", v, const(min_x), flags=flags)
    v = builder.select(low, const(min_x), v)
    t = add(mul(v, log2e), const(magic))
    n = sub(t, const(magic))
    low_part = mul(n, ln2_lo)
    if lo is not None:  # one FMA with the low part; none where v was clamped (lo NaN at -inf)
        low_part = add(low_part, builder.select(low, const(0.0), lo))
    r = sub(sub(v, mul(n, ln2_hi)), low_part)
    p = q[0]
    for c in q[1:]:
        p = add(mul(p, r), c)
    p = add(mul(mul(p, r), r), r)
    scale = _pow2_codegen(builder, t, *pow2, fty)
    if fused:
        return add(mul(p, scale), scale)  # the "+ 1" in an FMA, as cec_exp_tail_f32
    # Without FMA the product alone would be subnormal below v = -81 (float32), flushed
    # to 0 by the kernels' flush-to-zero: (p + 1) 2**k instead, the same bits elsewhere
    return mul(add(p, const(1.0)), scale)


def _float_type(ty):
    return ir.FloatType() if ty == types.float32 else ir.DoubleType()


@intrinsic
def _exp_nonpos(typingctx, x, k):
    """exp(x) for x <= 0 (or NaN), vectorisable, given ``k = _exp_consts(array of x's
    type)``: with ``x = max(x, MIN_X)``, ``t = x * LOG2E + MAGIC``, ``n = t - MAGIC``,
    ``r = (x - n * LN2_HI) - n * LN2_LO``, ``exp(x) = ((Q(r) * r) * r + r) * 2**n + 2**n``
    (Q by Horner's rule; LOG2E, LN2_HI, LN2_LO and Q's coefficients from ``k``; the last
    step one FMA, the same bits as (P(r)) * 2**n except for subnormal results, see
    cec_exp_f32).

    Emitted as LLVM instructions in the caller, each flagged "contract", "nsz" and "arcp"
    (not "reassoc", which lets LLVM fold the two-part ln2 back into one and undo the exact
    range reduction: seen, 100 ulp errors in float64); Numba's fastmath pass flags only
    instructions without flags, so the caller's "reassoc" does not reach them. Not a
    function compiled on its own: LLVM inlined such a call or not depending on the size of
    the function around it, and a loop whose exp stayed a call stayed scalar (9x slower,
    kernel_findings.md)."""
    if x not in _EXP_IMMEDIATES or k != types.UniTuple(x, len(_EXP_OPERANDS[x])):
        return None

    def codegen(context, builder, signature, args):
        return _exp_codegen(builder, _float_type(x), args[0], None, args[1],
                            _fused(context))

    return x(x, k), codegen


@intrinsic
def _exp_diff(typingctx, x, m, k):
    """exp(x - m) for x <= m, as :func:`_exp_nonpos` of x - m; in float32 with the
    subtraction's rounding error e put back into the reduced argument (TwoSum: d + e
    equals x - m exactly; -e joins the low part of k ln2 in one FMA), as
    cec_exp_diff_f32: rounded, d cost the exp a relative |x - m| 2**-24, which a confident
    row's loss (the other classes' exps) kept. float64's rounding costs 2**-53 |x - m|:
    nothing to put back. The TwoSum's instructions carry flags ("arcp"), so that no
    fastmath pass can flag them "reassoc" and fold e to 0."""
    if (x not in _EXP_IMMEDIATES or m != x
            or k != types.UniTuple(x, len(_EXP_OPERANDS[x]))):
        return None

    def codegen(context, builder, signature, args):
        v, top, ops = args
        flags = ("arcp",)
        d = builder.fsub(v, top, flags=flags)
        lo = None
        if x == types.float32:
            bv = builder.fsub(d, v, flags=flags)
            av = builder.fsub(d, bv, flags=flags)
            lo = builder.fadd(builder.fsub(av, v, flags=flags),
                              builder.fadd(bv, top, flags=flags), flags=flags)  # -e
        return _exp_codegen(builder, _float_type(x), d, lo, ops, _fused(context))

    return x(x, m, k), codegen


_LOG_SERIES = tuple(1.0 / k for k in range(21, 2, -2))  # 1/21, 1/19, ..., 1/3
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# Compiled without "reassoc" (which would undo their exact steps, as it would the exp's
# range reduction), and with error_model="numpy": Python's model checks the division for
# zero (2 + f >= 1.7 here) and raises, and that branch kept every loop calling it scalar.
_LOG_FLAGS = dict(fastmath={"contract", "nsz", "arcp"}, error_model="numpy")


@cached_njit(inline="always", **_LOG_FLAGS)
def _log_reduced(e, f):
    """e ln2 + log(1 + f) for f in [-0.29, 0.5], as cec_log_reduced: log(1 + f) = 2 atanh(s),
    s = f / (2 + f), |s| <= 0.2, by its odd series to s**21 (exact to < 2e-17); ln2 in two
    parts. Inlined by Numba into both logs below, whatever LLVM would decide."""
    c21, c19, c17, c15, c13, c11, c9, c7, c5, c3 = _LOG_SERIES
    s = f / (2.0 + f)
    s2 = s * s
    p = (((((((((c21 * s2 + c19) * s2 + c17) * s2 + c15) * s2 + c13) * s2 + c11) * s2 + c9)
           * s2 + c7) * s2 + c5) * s2 + c3)
    return e * _LN2_HI + ((2.0 * s + 2.0 * s * (s2 * p)) + e * _LN2_LO)


@cached_njit(**_LOG_FLAGS)
def _log_sum(s):
    """log(s) for the float64 sums of exps (s >= 1), vectorisable; NaN and +inf pass.

    s = 2**e * a with a in [sqrt(1/2), sqrt(2)), f = a - 1 exact. The tile kernels take
    one log per position: a libm call each cost more than the rest of the work for 10
    classes.
    """
    bits = _float_to_bits(s)
    # exponent as a double without an int64 -> double conversion (none on AVX2)
    e = _bits_to_float((bits >> 52) | 0x4330000000000000) - (4503599627370496.0 + 1023.0)
    a = _bits_to_float((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = a > 1.4142135623730951
    a = 0.5 * a if big else a
    e = e + 1.0 if big else e
    r = _log_reduced(e, a - 1.0)
    return r if s < np.inf else s


@cached_njit(**_LOG_FLAGS)
def _log1p_unit(z):
    """log1p(z) for z = exp(-|x|) in [0, 1] (NaN passes), vectorisable, as
    cec_log1p_unit in cecore_ext/_rowkernels.h: 1 + z = 2**e (1 + f) with f exact,
    f = z below 1/2 and (z - 1) / 2 above."""
    big = z >= 0.5
    return _log_reduced(1.0 if big else 0.0, 0.5 * (z - 1.0) if big else z)


# log1p(z) = z + z**2 Q(z) on [0, 1]: Q's coefficients, highest degree first (see
# cec_bce_elem_f32 in cecore_ext/_rowkernels.h)
_F32_LOG1P_Q = tuple(np.float32(c) for c in (
    -4.466211423e-03, 2.522405423e-02, -6.675772369e-02, 1.156184524e-01, -1.584756523e-01,
    1.985410601e-01, -2.498652637e-01, 3.333284259e-01, -4.999999702e-01))


def _bce_f32(x, y, w, pw, gs, z):
    """Binary cross-entropy on one float32 logit ``x`` given ``z = exp(-|x|)``, all in
    float32, as cec_bce_elem_f32 in cecore_ext/_rowkernels.h (which explains the
    regrouping): log1p(z) = z + z**2 Q(z), Q a polynomial of degree 8 (no division);
    loss = w (a + lw log1p(z)) with a = x >= 0 ? (1 - y) x : -pw y x (+ (x - x), torch's
    NaN at -inf), grad = gs w (x >= 0 ? (1 - y) - pw y z : (1 - y) z - pw y) / (1 + z).
    Returns both as float64."""
    q8, q7, q6, q5, q4, q3, q2, q1, q0 = _F32_LOG1P_Q
    p = (((((((q8 * z + q7) * z + q6) * z + q5) * z + q4) * z + q3) * z + q2) * z + q1) * z + q0
    l1p = (z * z) * p + z
    wf, pwf = np.float32(w), np.float32(pw)
    ny, pwy = _F32_ONE - y, pwf * y
    lw = pwf * y + ny  # not 1 + (pw - 1) y, which cancels (cec_bce_elem_f32)
    a = ny * x if x >= _F32_ZERO else (x - x) - pwy * x
    num = ny * (_F32_ONE if x >= _F32_ZERO else z) - pwy * (z if x >= _F32_ZERO else _F32_ONE)
    grad = np.float32(gs * w) * (num / (_F32_ONE + z))
    return np.float64(wf * (lw * l1p + a)), np.float64(grad)


def _bce_f64(x, y, w, pw, gs, z):
    """:func:`_bce_f32` for a float64 logit, in float64 (cec_bce_elem_f64), log1p(z) by
    :func:`_log1p_unit`; the loss's first two terms regrouped as in float32, as the
    product of a selected factor and x (see num below)."""
    pwy = pw * y
    lw = pwy + (1.0 - y)
    a = ((1.0 - y) if x >= 0.0 else -pwy) * x + (0.0 if x >= 0.0 else x - x)
    loss = w * (lw * _log1p_unit(z) + a)
    # (1 - y) - pw y z for x >= 0, (1 - y) z - pw y below, as products of selected
    # factors: a select between the two expressions kept the loop scalar (bench_ab.py,
    # float64 65536 x 1000 loss: 4.7x the time of this form).
    num = (1.0 - y) * (1.0 if x >= 0.0 else z) - pw * y * (z if x >= 0.0 else 1.0)
    return loss, gs * w * (num / (1.0 + z))


# Compiled without "reassoc", like the exp: reassociated, the loss's sum could lose the
# exact cancellation of its first two terms. Without "nsz" too: allowed to ignore the
# sign of zero, the code LLVM made gave some of a gradient's exact zeros the sign -0.0 in
# place (grad_out=input) and +0.0 out of place, or the other way round, so the two
# differed in those bits (in-place loops are the versions for overlapping arrays).
# Without it, paired A/B of every BCE case, Zen 4: 0.98-1.02x the time on AVX-512 and
# on AVX2 code (results/ab_numba_bce_no_nsz_*zen4.json). error_model="numpy": a
# float division by zero gives inf or NaN (it cannot happen here: 1 + z >= 1) instead of
# a check that raises ZeroDivisionError, which kept LLVM from vectorising the row loop.
_NO_REASSOC = {"contract", "arcp"}
_bce_jit = {
    types.float32: cached_njit(fastmath=_NO_REASSOC, error_model="numpy")(_bce_f32),
    types.float64: cached_njit(fastmath=_NO_REASSOC, error_model="numpy")(_bce_f64),
}


def _bce(x, y, w, pw, gs, z):
    """(loss, gradient) of binary cross-entropy on logit ``x``, in float64, given
    ``z = exp(-|x|)`` in ``x``'s type."""
    raise NotImplementedError  # only callable from jitted code


@overload(_bce)
def _ol_bce(x, y, w, pw, gs, z):
    if x in _bce_jit:
        fn = _bce_jit[x]
        return lambda x, y, w, pw, gs, z: fn(x, y, w, pw, gs, z)
    return None


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


def _at(a, j):
    """``a[j]`` for an array, ``a`` itself for a scalar, 1.0 for None: one loop serves
    arguments given per element, broadcast ones and absent weights (a constant 1 that
    LLVM folds out of the products)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_at)
def _ol_at(a, j):
    if isinstance(a, types.Array):
        return lambda a, j: a[j]
    if isinstance(a, types.Number):
        return lambda a, j: a
    if isinstance(a, types.NoneType):
        return lambda a, j: 1.0
    return None


# The squares of exps e in (0, 1] are summed as (e SQ)**2 and the sum multiplied by
# SQ**-2 in float64 (exact: powers of two): a plain e**2 is below the normal range from
# e < 1.1e-19 (float32: x - m < -43.7), which cost a microcode assist per subnormal
# result and, since the kernels flush to zero, would make it 0 (a row's Brier score half
# its value; see SQ in cecore_ext/_rowkernels.h, which uses the same constants).
_SQUARE_SCALE = {types.float32: 2.0 ** 60, types.float64: 2.0 ** 480}


def _square_scale(like):
    """SQ above for the float type of ``like``."""
    raise NotImplementedError  # only callable from jitted code


@overload(_square_scale)
def _ol_square_scale(like):
    if like in _SQUARE_SCALE:
        sq = _SQUARE_SCALE[like]
        if like == types.float32:
            return lambda like: np.float32(sq)
        return lambda like: np.float64(sq)
    return None


def _cast_like(value, like):
    """``value`` converted to the type of ``like`` (float32 stays float32)."""
    raise NotImplementedError


@overload(_cast_like)
def _ol_cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def _per_line(a):
    """How many of ``a``'s elements a 64-byte cache line holds, as a compile-time
    constant (``a.itemsize`` is read from the array at run time)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_per_line)
def _ol_per_line(a):
    if isinstance(a, types.Array):
        n = 64 * 8 // a.dtype.bitwidth
        return lambda a: n
    return None
