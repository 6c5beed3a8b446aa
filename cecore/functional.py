"""Functional API with PyTorch's semantics (``torch.nn.functional``), on numpy arrays.

Every function validates its input once (:mod:`cecore._validation`), hands canonical
arrays to one kernel of the chosen backend (:mod:`cecore._backends`), and reduces the
per-position losses in a fixed order (:mod:`cecore._reduce`). With ``return_grad=True``
the loss and its gradient come from the same fused pass over the logits.
"""

import functools
import math

import numpy as np

from . import _reduce
from . import _validation as V
from ._backends import get_backend
from ._config import BCE_CHUNK, NLL_CHUNK, REDUCE_BLOCK, block_rows

__all__ = [
    "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
    "log_softmax", "softmax", "logsumexp", "perplexity",
]


def _ieee(function):
    """``function`` run with NumPy's floating-point errors ignored.

    Non-finite and overflowing values are results, as in torch (inf - inf is NaN, a
    float64 total past float32's range is inf), and torch never warns about them. NumPy's
    RuntimeWarnings from the casts, products and sums around the kernels (errors under
    ``np.errstate(all="raise")`` or ``-W error``) leaked out of several of them.
    """
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return function(*args, **kwargs)
    return wrapper


def _grad_scale(g, reduction, denominator, positions_shape):
    """Per-position gradient multiplier of shape ``positions_shape`` (broadcast when scalar)."""
    if reduction == "none" and np.ndim(g):
        return np.ascontiguousarray(g, dtype=np.float64).reshape(positions_shape)
    if reduction == "mean":
        g = g / denominator
    return np.broadcast_to(np.float64(g), positions_shape)


def _gradient_out(grad_out, x, x3, fortran, operands=(), in_place=()):
    """Where the kernel writes the gradient, and a function that returns the user's gradient.

    Without ``grad_out``: a new array in the layout of ``x``, or ``x3`` itself where ``x3``
    is a copy of ``x`` that may be overwritten (one of ``in_place``). With it: its canonical view,
    so the kernel writes straight into the caller's memory, if that is safe: the view
    shares no memory with the arrays the kernel reads (``operands``), except that it may
    be exactly one of ``in_place`` (the same elements in the same places: those kernels
    read each element before they write its gradient). A view that overlaps an operand
    in any other way (shifted by an element, a weight row inside the buffer, the target's
    bytes) would be read after it was written. Otherwise, and for a float16 buffer
    (computed in float32) or a layout with no canonical view, the kernel writes a
    temporary that is then copied in.
    """
    if grad_out is None:
        if x3.size and any(x3 is a for a in in_place) and not np.may_share_memory(x3, x):
            # x3 is this call's own copy (float16 logits in float32, a strided view made
            # contiguous): the gradient overwrites it, no second array of its size.
            # (may_share_memory is False for any empty array: those get a new one.)
            grad = x3.reshape(x.shape[::-1]).T if fortran else x3.reshape(x.shape)
            return x3, lambda: grad.astype(x.dtype, copy=False)
        grad, grad3 = V.empty_canonical(x.shape, x3.shape, x3.dtype, fortran)
        return grad3, lambda: grad.astype(x.dtype, copy=False)
    g = V.grad_out_array(grad_out, x, fortran)
    # the caller's own array is returned (a np.memmap stays one), a tensor's as the
    # ndarray written through
    result = grad_out if isinstance(grad_out, np.ndarray) else g
    if g.dtype == x3.dtype:
        view = (g.T if fortran else g).reshape(x3.shape)
        if view.flags.c_contiguous and (g.size == 0 or np.shares_memory(view, g)) and \
                not any(np.may_share_memory(view, r) and not _same_elements(view, r, in_place)
                        for r in operands):
            return view, lambda: result
    tmp, tmp3 = V.empty_canonical(x.shape, x3.shape, x3.dtype, fortran)

    def finish():
        np.copyto(g, tmp, casting="same_kind")
        return result

    return tmp3, finish


def _same_elements(view, operand, in_place):
    """Whether ``view`` is exactly ``operand`` and that operand may be overwritten in
    place."""
    return any(operand is a for a in in_place) and V.same_elements(view, operand)


def _index_denominator(target, weight, uniform, ignore_index, reduction):
    """What 'mean' divides by with class-index targets: the summed class weight of the
    non-ignored targets (a fixed-block sum, see cecore._reduce); 1 for the others."""
    if reduction != "mean":
        return np.float64(1.0)
    if uniform:
        # The same value as the weighted sum (integers are exact), with O(N) bytes
        # instead of O(N) float64s.
        return np.float64(np.count_nonzero(target != ignore_index))
    valid = target[target != ignore_index]
    return np.float64(_reduce.fixed_sum(weight[valid]) if valid.size else 0.0)


def _reduce_loss(loss_out, reduction, denominator, out_shape, dtype):
    if reduction == "none":
        return loss_out.reshape(out_shape).astype(dtype)
    return _reduced(_reduce.fixed_sum(loss_out), reduction, denominator, dtype)


def _index_loss(loss_out, reduction, denominator, out_shape, dtype, n_classes, eps):
    """:func:`_reduce_loss` of class-index losses, with torch's answer for no classes."""
    if not n_classes and eps > 0:
        # torch scales the (empty) smoothing sum by eps / C = inf: NaN, whatever N is.
        return np.full(out_shape if reduction == "none" else (), np.nan, dtype)[()]
    return _reduce_loss(loss_out, reduction, denominator, out_shape, dtype)


def _reduced(total, reduction, denominator, dtype):
    """'sum' or 'mean' of a loss whose fixed-block sum is ``total``."""
    if reduction == "mean":
        total = _reduce.mean(total, denominator)
    return dtype.type(total)  # past float32's range: inf, as in torch



@_ieee
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, return_grad=False, grad_output=None,
                  grad_out=None, backend="auto", n_threads=None):
    """Softmax cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    input : array-like of shape (C,), (N, C) or (N, C, d1, ..., dK)
        Unnormalised logits, float16/float32/float64 (float16 is computed in float32).
    target : array-like
        Class indices of shape (), (N,) or (N, d1, ..., dK), any integer dtype, each in
        ``[0, C)`` or equal to ``ignore_index``; or class probabilities of the same shape
        as ``input`` (floating point).
    weight : array-like of shape (C,), optional
        Per-class weights.
    ignore_index : int, default=-100
        Target value that contributes neither loss nor gradient (class-index targets only).
    reduction : {'mean', 'sum', 'none'}, default='mean'
        'mean' divides by the summed weight of the non-ignored targets (class indices) or
        by the number of positions N * d1 * ... * dK (probabilities).
    label_smoothing : float in [0, 1], default=0.0
        Mixes the target with the uniform distribution: ``(1 - eps) * target + eps / C``.
    return_grad : bool, default=False
        Also return the gradient of ``sum(grad_output * loss)`` with respect to ``input``.
    grad_output : array-like, optional
        Upstream gradient: a scalar for 'mean'/'sum', the loss's shape for 'none'
        (exactly, as torch's ``backward``). Defaults to ones. Only with a gradient
        (``return_grad=True`` or ``grad_out``); alone it raises ValueError.
    grad_out : ndarray, optional
        Array of the input's shape and dtype in native byte order, writeable and
        C-contiguous (or Fortran-contiguous for a Fortran-ordered 2-D input), that
        receives the gradient and is returned as it: no new N x C allocation (but for
        float16 input, computed in float32, and ``grad_out=input`` with label smoothing or
        probability targets, whose kernels read the logits after writing the gradient:
        those write a temporary first). ``grad_out=input`` overwrites the logits with their
        gradient (same bits as out of place). Implies ``return_grad=True``.
    backend : {'auto', 'cython', 'numba'}, default='auto'
    n_threads : int, optional
        Threads for the kernel; defaults to :func:`cecore._config.default_n_threads`,
        with one thread per 65536 elements for smaller calls; -1 means all CPUs. More
        than the CPUs available are capped at that number, with a warning.

    Returns
    -------
    loss : scalar or ndarray of the input's dtype
        Shape () for 'mean'/'sum', the target's (class-index) shape for 'none'. As in
        torch, probabilities of a wider dtype than the input's promote the computation
        and the loss (float32 logits, float64 probabilities: a float64 loss, a float32
        gradient).
    grad : ndarray of the input's shape and dtype
        Only when ``return_grad=True`` or ``grad_out`` is given (then it is ``grad_out``;
        for a CPU tensor, a NumPy view of it: see Notes).

    Notes
    -----
    With class indices ``t`` and ``lse = log(sum_c exp(x_c))`` the loss at a position is
    ``(1 - eps) w[t] (lse - x[t]) + eps / C * sum_c w[c] (lse - x[c])``; with
    probabilities ``q = (1 - eps) p + eps / C`` it is ``sum_c w[c] q[c] (lse - x[c])``.

    ``grad_out`` may be a CPU torch tensor that does not require grad: the gradient is
    written into its memory and returned as a NumPy view of it, and its version counter is
    bumped, so that autograd refuses a backward that saved it before it was overwritten.
    """
    V.check_grad_output_use(grad_output, return_grad or grad_out is not None)
    t_raw = V._to_numpy(target)
    x, class_axis, w = V.class_input(input, weight, t_raw)
    reduction = V.check_reduction(reduction)
    eps = V.check_label_smoothing(label_smoothing)
    ignore_index = V.check_ignore_index(ignore_index)
    threads = V.n_threads(n_threads, x.size)
    kernels = get_backend(backend)
    out_dtype, dtype = x.dtype, V.compute_dtype(x.dtype)
    n_classes = x.shape[class_axis]
    proba = t_raw.shape == x.shape

    if proba:
        V.check_proba_target(t_raw.dtype, x.shape, ignore_index)
        t_raw = V.float_input(t_raw, "target")
        out_dtype, dtype = V.promoted_dtypes(out_dtype, t_raw.dtype)
        x3, fortran = V.canonical(x, class_axis, dtype)
        t3 = V.canonical_like(t_raw, x3, fortran)
        # torch divides by numel / C: the number of positions, or 0 / 0 without classes.
        denominator = np.float64(x3.shape[0] * x3.shape[2]) if n_classes else np.float64("nan")
    else:
        t2 = V.index_target(t_raw, x.shape, n_classes, ignore_index)
        x3, fortran = V.canonical(x, class_axis, dtype)
        denominator = _index_denominator(t2, w, weight is None, ignore_index, reduction)

    positions = (x3.shape[0], x3.shape[2])
    loss_shape = V.loss_shape(x.shape)
    loss_out = np.empty(positions, dtype=np.float64)
    return_grad = return_grad or grad_out is not None
    if return_grad:
        g = V.grad_output_array(grad_output, reduction, loss_shape)
        scale = _grad_scale(g, reduction, denominator, positions)
        # The index kernels read every logit they need before writing the gradient over
        # it, except the label-smoothing sums, which read the logits after the exp pass.
        in_place = (x3,) if not proba and eps == 0 else ()
        operands = (x3, t3, w, scale) if proba else (x3, t2, w, scale)
        grad3, gradient = _gradient_out(grad_out, x, x3, fortran, operands, in_place)
    else:
        scale = np.broadcast_to(np.float64(0.0), positions)
        grad3 = None  # loss only

    if proba:
        kernels.softmax_ce_proba(x3, t3, w, eps, scale, loss_out, grad3, threads)
    else:
        kernels.softmax_ce_index(x3, t2.reshape(positions), w, int(ignore_index), eps,
                                 scale, loss_out, grad3, threads)

    if proba:
        loss = _reduce_loss(loss_out, reduction, denominator, loss_shape, out_dtype)
    else:
        loss = _index_loss(loss_out, reduction, denominator, loss_shape, out_dtype,
                           n_classes, eps)
    if not return_grad:
        return loss
    return loss, gradient()


@_ieee
def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean", *,
             return_grad=False, grad_output=None, grad_out=None, backend="auto",
             n_threads=None):
    """Negative log-likelihood of log-probabilities, as ``torch.nn.functional.nll_loss``.

    ``loss = -weight[t] * input[n, t, ...]``; 'mean' divides by the summed weight of the
    non-ignored targets. The loss is a gather, so no kernel is needed.

    Parameters
    ----------
    input : array-like of shape (C,), (N, C) or (N, C, d1, ..., dK)
        Log-probabilities (any values are taken as they are), float16/32/64.
    target : array-like of shape (), (N,) or (N, d1, ..., dK)
        Class indices, any integer dtype, each in ``[0, C)`` or equal to
        ``ignore_index`` (no probability targets, as in torch).
    weight, ignore_index, reduction, return_grad, grad_output, grad_out
        As :func:`cross_entropy` (``grad_out=input`` works in place).
    backend, n_threads
        Validated and accepted for a uniform signature; unused.

    Returns
    -------
    loss, grad
        As :func:`cross_entropy`'s.
    """
    V.check_grad_output_use(grad_output, return_grad or grad_out is not None)
    t_raw = V._to_numpy(target)
    x, class_axis, w = V.class_input(input, weight, t_raw)
    reduction = V.check_reduction(reduction)
    V.n_threads(n_threads)
    get_backend(backend)
    out_dtype, dtype = x.dtype, V.compute_dtype(x.dtype)
    n_classes = x.shape[class_axis]
    # (checks ignore_index too; nll_loss takes no probability targets)
    t2 = V.index_target(t_raw, x.shape, n_classes, ignore_index, probabilities=False)
    # In the input's own type: the gather and the gradient's scatter need no float32
    # copy of a float16 input (the picked values are exact in float64 either way).
    x3, fortran = V.canonical(x, class_axis, x.dtype)
    positions = (x3.shape[0], x3.shape[2])
    t2 = t2.reshape(positions)
    loss_shape = V.loss_shape(x.shape)
    # Chunk by chunk of positions: whole-array gathers made five temporaries of 8 bytes
    # per position (a (1, 3, 715M) float32 input ran out of 24 GB, and (2M, 3) took 4.6x
    # torch's time). The sums go through BlockSum, so they equal fixed_sum's bit for bit.
    loss = np.empty(positions, out_dtype) if reduction == "none" else None
    loss_sum, weight_sum = _reduce.BlockSum(), _reduce.BlockSum()
    flat = x3.reshape(-1)  # canonical arrays are C-contiguous: a view
    for rows, cols in _chunks(*positions, NLL_CHUNK):
        keep, safe_t, w_t = _nll_targets(t2[rows, cols], w, ignore_index, n_classes)
        picked = flat.take(_flat_index(safe_t, rows, cols, x3.shape)) \
            if n_classes else np.zeros(safe_t.shape, dtype)
        chunk = picked.astype(np.float64)
        chunk *= -w_t  # -inf * a zero weight: NaN, as in torch
        if keep is not None:
            chunk[~keep] = 0.0
        if loss is not None:
            loss[rows, cols] = chunk
        else:
            loss_sum.add(chunk)
            weight_sum.add(w_t)
    denominator = np.float64(_reduce.combine(weight_sum.partials())) \
        if reduction == "mean" else np.float64(1.0)
    if loss is not None:
        loss = loss.reshape(loss_shape)
    else:
        loss = _reduced(_reduce.combine(loss_sum.partials()), reduction, denominator, out_dtype)
    if not (return_grad or grad_out is not None):
        return loss
    g = V.grad_output_array(grad_output, reduction, loss_shape, convert=False)
    g = g.reshape(positions) if np.ndim(g) else g
    # A second pass over the chunks ('mean' needed the total weight first; the chunk's
    # targets are gathered again rather than kept, which would be O(positions) memory).
    # The gradient reads the targets, the weights and grad_output, not the input: a buffer
    # over the input is safe, one over the others gets a temporary (see _gradient_out).
    grad3, gradient = _gradient_out(grad_out, x, x3, fortran,
                                    operands=(t2, w) + ((g,) if np.ndim(g) else ()),
                                    in_place=(x3,))
    for rows, cols in _chunks(*positions, NLL_CHUNK):
        keep, safe_t, w_t = _nll_targets(t2[rows, cols], w, ignore_index, n_classes)
        scale = _grad_scale(g[rows, cols] if np.ndim(g) else g, reduction, denominator,
                            safe_t.shape)
        picked_grad = -w_t * scale
        if keep is not None:
            # Ignored targets get exactly 0, even when 'mean' divided by a zero total
            # weight (as torch: its backward skips them, not multiplying by a zero weight).
            picked_grad[~keep] = 0.0
        grad3[rows, :, cols] = 0
        if n_classes:
            grad3.reshape(-1)[_flat_index(safe_t, rows, cols, x3.shape)] = picked_grad
    return loss, gradient()


def _flat_index(t, rows, cols, shape):
    """Flat indices into a C-contiguous (N, C, S) array of the elements ``[n, t, s]`` for
    the positions ``(rows, cols)`` of a chunk (``t`` of the chunk's shape): plain
    ``take`` and assignment, several times faster than ``take_along_axis``."""
    n, c, s = shape
    first = np.arange(*rows.indices(n)) * (c * s)
    if s == 1:
        return first[:, None] + t
    return (first[:, None] + np.arange(*cols.indices(s))[None, :]) + t * s


def _nll_targets(t, w, ignore_index, n_classes):
    """For a chunk of class-index targets: which count (None: all of them), the targets
    with ignored ones replaced by class 0 (safe to gather), and their weights (0 where
    ignored)."""
    keep = t != ignore_index
    if keep.all():
        keep, safe_t = None, t
    else:
        safe_t = np.where(keep, t, 0)
    if not n_classes:
        return keep, safe_t, np.zeros(t.shape)
    w_t = w.take(safe_t)
    if keep is not None:
        w_t[~keep] = 0.0
    return keep, safe_t, w_t


def _broadcast_2d(a, shape, name):
    """``a`` broadcast to ``shape`` and viewed as (R, L) float64 (stride 0 where broadcast)."""
    arr = V._to_numpy(a)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    try:
        b = np.broadcast_to(np.asarray(arr, dtype=np.float64), shape)
    except ValueError:
        raise ValueError(f"{name} of shape {arr.shape} cannot be broadcast to the input's shape {shape}") from None
    last = shape[-1] if shape else 1
    return b.reshape(math.prod(shape[:-1]), last)


@_ieee
def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean",
                                     pos_weight=None, *, return_grad=False, grad_output=None,
                                     grad_out=None, backend="auto", n_threads=None):
    """Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    ``loss = w * ((1 - y) x + (1 + (pw - 1) y) softplus(-x))`` elementwise, computed
    stably for any ``x``. ``weight`` and ``pos_weight`` broadcast against the input
    (``pos_weight`` usually of shape (C,) for the last dimension). 'mean' divides by the
    number of elements. Returns the loss, and the gradient with ``return_grad=True`` or
    into ``grad_out`` (the input's shape and dtype in native byte order, C-contiguous, or
    Fortran-contiguous when the input and the target are Fortran-ordered 2-D arrays; may be
    the input). As in torch, a target of a wider dtype than the input's promotes the
    computation and the loss; the gradient keeps the input's dtype. (torch's loss takes
    the target's dtype even when it is the narrower one; cecore's the wider one.)

    Parameters
    ----------
    input : array-like
        Logits of any shape, float16/32/64 (float16 computed in float32).
    target : array-like of the input's shape
        Floating point, usually probabilities in [0, 1] (other values are taken as they
        are, as torch does).
    weight : array-like, optional
        Element weights, broadcast against the input.
    reduction : {'mean', 'sum', 'none'}, default='mean'
    pos_weight : array-like, optional
        Weight of the positive term, broadcast against the input.
    return_grad, grad_output, grad_out, backend, n_threads
        As :func:`cross_entropy` (``grad_output``: a scalar for 'mean'/'sum', the
        input's shape for 'none').

    Returns
    -------
    loss : scalar or ndarray
        Shape () for 'mean'/'sum', the input's for 'none'.
    grad : ndarray of the input's shape and dtype
        Only when ``return_grad=True`` or ``grad_out`` is given (then it is ``grad_out``).
    """
    V.check_grad_output_use(grad_output, return_grad or grad_out is not None)
    x = V.float_input(input)
    reduction = V.check_reduction(reduction)
    threads = V.n_threads(n_threads, x.size)
    kernels = get_backend(backend)
    t = V._to_numpy(target)
    if t.shape != x.shape:
        raise ValueError(f"Target size ({t.shape}) must be the same as input size ({x.shape})")
    if t.dtype.kind != "f":
        raise TypeError(
            f"target must be floating point (probabilities in [0, 1]), got dtype {t.dtype}; "
            "cast it, e.g. target.astype(input.dtype)"
        )
    t = V.float_input(t, "target")  # native byte order: converted once, here
    out_dtype, dtype = V.promoted_dtypes(x.dtype, t.dtype)
    shape = x.shape
    # Elementwise, so a Fortran-ordered 2-D input and target are computed as their
    # C-ordered transposes (no copies), with everything else transposed alike; the loss
    # and the gradient come back in Fortran order, as torch's keep the input's layout.
    fortran = x.ndim == 2 and x.flags.f_contiguous and not x.flags.c_contiguous and \
        t.flags.f_contiguous and (grad_out is None or V._to_numpy(grad_out).flags.f_contiguous)
    flip = (lambda a: a.T) if fortran else (lambda a: a)
    work = shape[::-1] if fortran else shape
    last = work[-1] if work else 1
    n_rows = math.prod(work[:-1])  # (not reshape(-1, last): ambiguous when last is 0)
    x2 = np.ascontiguousarray(flip(x), dtype=dtype).reshape(n_rows, last)
    t2 = np.ascontiguousarray(flip(t), dtype=dtype).reshape(n_rows, last)
    w2 = flip(_broadcast_2d(1.0 if weight is None else weight, shape, "weight"))
    pw2 = flip(_broadcast_2d(1.0 if pos_weight is None else pos_weight, shape, "pos_weight"))
    denominator = np.float64(x.size)
    return_grad = return_grad or grad_out is not None
    g_none = None  # reduction='none' with an array grad_output: (R, L), converted by chunks
    if return_grad:
        g = V.grad_output_array(grad_output, reduction, shape, convert=False)
        if reduction == "none" and np.ndim(g):
            g_none = flip(g).reshape(x2.shape)
            scale = g_none
        else:
            scale = _grad_scale(np.float64(g), reduction, denominator, x2.shape)
        # Elementwise: each gradient element is written after its inputs are read, so
        # the buffer may be the input or the target.
        x3, t3 = x2.reshape(x2.shape + (1,)), t2.reshape(t2.shape + (1,))
        grad2, gradient = _gradient_out(grad_out, x, x3, fortran, (x3, t3, w2, pw2, scale),
                                        (x3, t3))
        grad2 = grad2.reshape(x2.shape)
    else:
        scale = np.broadcast_to(np.float64(0.0), x2.shape)
        grad2 = None  # loss only
    # The kernel's runs stop at the end of a row: with every operand viewable as one row,
    # (N, 1) logits (a binary classifier's) are not one call per element.
    rows = [_one_row(a) for a in (x2, t2, w2, pw2, scale)]
    if all(r is not None for r in rows):
        x2, t2, w2, pw2, scale = rows
        grad2 = None if grad2 is None else grad2.reshape(rows[0].shape)
        g_none = None if g_none is None else scale
    if reduction == "none":
        # The losses in the loss's dtype; float64 from the kernel through a reused buffer of
        # about BCE_CHUNK positions (a grad_output array converted the same way), so
        # nothing of the input's size is made besides the result and the gradient.
        loss = np.empty(x2.shape, dtype=out_dtype)
        size = min(BCE_CHUNK, x2.size)
        buf = None if out_dtype == np.float64 else np.empty(size)
        g_buf = None if g_none is None else np.empty(size)
        for r, c in _chunks(*x2.shape, BCE_CHUNK):
            part = loss[r, c]
            out = part if buf is None else buf[:part.size].reshape(part.shape)
            gs = scale[r, c]
            if g_none is not None:
                gs = g_buf[:part.size].reshape(part.shape)
                gs[...] = g_none[r, c]
            kernels.bce_logits(x2[r, c], t2[r, c], w2[r, c], pw2[r, c], gs, out,
                               None if grad2 is None else grad2[r, c], threads)
            if buf is not None:
                part[...] = out
        loss = flip(loss.reshape(work))
    else:
        # Only the total is needed: the kernel sums each block of REDUCE_BLOCK positions
        # itself (in a fixed order), so no elementwise loss array is written or read back.
        partials = np.empty(-(-x2.size // REDUCE_BLOCK), dtype=np.float64)
        kernels.bce_logits(x2, t2, w2, pw2, scale, partials, grad2, threads)
        loss = _reduced(_reduce.combine(partials), reduction, denominator, out_dtype)
    if not return_grad:
        return loss
    return loss, gradient()


def _one_row(a):
    """The (R, L) array ``a`` viewed as one row (1, R * L) without a copy, or None when its
    elements are not equally spaced in row-major order (a broadcast row, say)."""
    r, n = a.shape
    if r == 1 or a.flags.c_contiguous:
        return a.reshape(1, r * n)
    if n == 1 or a.strides[0] == a.strides[1] * n:  # equally spaced (stride 0: a scalar)
        step = a.strides[0] if n == 1 else a.strides[1]
        return np.lib.stride_tricks.as_strided(a, (1, r * n), (0, step),
                                               writeable=a.flags.writeable)
    return None


def _chunks(n_rows, n_cols, size):
    """(rows, columns) slices that cover an (n_rows, n_cols) array in pieces of at most
    ``size`` elements (whole rows when a row fits, else pieces of one row)."""
    if n_cols <= size:
        step = max(1, size // max(n_cols, 1))
        for r0 in range(0, n_rows, step):
            yield slice(r0, r0 + step), slice(None)
    else:
        for i in range(n_rows):
            for c0 in range(0, n_cols, size):
                yield slice(i, i + 1), slice(c0, c0 + size)


def _softmax_input(x, axis):
    x = V._to_numpy(x)
    if x.dtype.kind in "biu":
        x = x.astype(np.float64)
    x = V.float_input(x, "x")
    if x.ndim == 0:  # as torch: a scalar is one class along axis 0 (or -1)
        V.normalize_axis(axis, 1)
        return x.reshape(1), 0
    return x, V.normalize_axis(axis, x.ndim)


def _softmax(x, axis, log, backend, n_threads, overwrite=False):
    """softmax / log_softmax; ``overwrite=True`` (for an array of the caller's own, such
    as the estimator's scores) writes over ``x`` where it is writeable and its canonical
    view is ``x`` itself, halving the peak memory (scikit-learn's ``softmax(copy=False)``);
    otherwise into a new array."""
    shape = np.shape(x)
    x, axis = _softmax_input(x, axis)
    dtype = V.compute_dtype(x.dtype)
    kernels = get_backend(backend)
    threads = V.n_threads(n_threads, x.size)
    if x.dtype != dtype and axis > 0 and x.flags.c_contiguous:
        # float16 input: converted and computed a block of samples at a time, so that
        # the float32 arrays are a block's, not two of the input's size (each sample's
        # softmax is its own: the blocks change no bit)
        out = np.empty(x.shape, x.dtype)
        sample = math.prod(x.shape[1:])
        step = block_rows(dtype.itemsize * sample)
        for a in range(0, x.shape[0], step):
            block = x[a:a + step]
            x3, fortran = V.canonical(block, axis, dtype)
            o, o3 = V.empty_canonical(block.shape, x3.shape, dtype, fortran)
            kernels.softmax(x3, log, o3, threads)
            out[a:a + step] = o  # float16 below -65504: -inf
        return out.reshape(shape)
    x3, fortran = V.canonical(x, axis, dtype)
    if overwrite and x.flags.writeable and x3.ctypes.data == x.ctypes.data and \
            x3.nbytes == x.nbytes:
        # x3 is x itself, viewed (canonical copies everything else): each softmax line
        # of x3 is one of x, and the contract lets the kernel write over its logits
        kernels.softmax(x3, log, x3, threads)
        return x.reshape(shape)
    out, out3 = V.empty_canonical(x.shape, x3.shape, dtype, fortran)
    kernels.softmax(x3, log, out3, threads)
    return out.astype(x.dtype, copy=False).reshape(shape)


@_ieee
def log_softmax(x, axis=-1, *, backend="auto", n_threads=None):
    """Log of the softmax along ``axis``, computed as ``x - logsumexp(x)`` (never ``log(softmax)``).

    Parameters
    ----------
    x : array-like
        Any shape with at least one dimension. Integer input is computed in float64;
        float16 in float32 and returned as float16.
    axis : int, default=-1
        One axis (not None or a tuple).
    backend, n_threads
        As :func:`cross_entropy`.

    Returns
    -------
    ndarray of ``x``'s shape (and float dtype)
    """
    return _softmax(x, axis, True, backend, n_threads)


@_ieee
def _softmax_over(scores, log, backend, n_threads):
    """Softmax (or log-softmax) over axis 1 of an array the caller owns and gives up,
    written over it where it can be (the estimator's probabilities, over its scores)."""
    return _softmax(scores, 1, log, backend, n_threads, overwrite=True)


@_ieee
def softmax(x, axis=-1, *, backend="auto", n_threads=None):
    """Softmax along ``axis``: ``exp(x - max) / sum(exp(x - max))``.

    Parameters and dtypes as :func:`log_softmax`'s.
    """
    return _softmax(x, axis, False, backend, n_threads)


@_ieee
def logsumexp(x, axis=-1, *, backend="auto", n_threads=None):
    """``log(sum(exp(x), axis))`` without overflow; the result drops ``axis``.

    Parameters and dtypes as :func:`log_softmax`'s (``axis`` is one int: not None, unlike
    ``scipy.special.logsumexp``).
    """
    x, axis = _softmax_input(x, axis)
    dtype = V.compute_dtype(x.dtype)
    x3, _ = V.canonical(x, axis, dtype)
    out = np.empty((x3.shape[0], x3.shape[2]), dtype=np.float64)
    get_backend(backend).logsumexp(x3, out, V.n_threads(n_threads, x.size))
    return out.reshape(x.shape[:axis] + x.shape[axis + 1:]).astype(x.dtype, copy=False)


@_ieee
def perplexity(input, target, ignore_index=-100, *, weight=None, backend="auto", n_threads=None):
    """Perplexity ``exp(mean cross-entropy)``, as a Python float.

    Targets as :func:`cross_entropy`'s: class indices, or class probabilities of the
    input's shape (the exponential of the mean soft cross-entropy). Ignored targets are
    excluded from the mean (as language-model padding is). float16
    logits give the exponential of the float32 mean (of a float16-rounded mean, it was up
    to 0.4 % off for losses of 8 to 16).

    Parameters
    ----------
    input, target, ignore_index, weight, backend, n_threads
        As :func:`cross_entropy`'s ('mean' reduction: with ``weight``, the weighted mean).

    Returns
    -------
    float
    """
    x = V._to_numpy(input)
    if x.dtype == np.float16:  # computed in float32 anyway (no extra copy)
        input = x.astype(np.float32)
    loss = cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                         reduction="mean", backend=backend, n_threads=n_threads)
    return float(np.exp(np.float64(loss)))
