"""The kernels of :mod:`cecore_ext` with their arguments checked (stumpy's pattern: a
public function that checks, beside the compiled one that does not).

The compiled kernels (:mod:`cecore_ext.unchecked`) trust their caller, as the kernel
contract in :mod:`cecore._backends` says: cecore validates every input once, above the
registry, and calls them. A kernel handed a target outside ``[0, C)``, a loss buffer too
short or a negative thread count by anyone else would read or write outside its arrays
(a segfault, or libgomp aborting the process for 100000 threads).

The functions here take the same arguments and check, before the kernel runs, what
could do that or give a silently wrong answer: each array's type, dtype, shape (against
the logits'), C-contiguity and, for outputs, writeability; the class indices and their
count; the integer arguments (``ignore_index``, ``top_k``, ``n_threads``: more than the
CPUs available are capped with a warning, as cecore caps them), ``label_smoothing`` and
the calibration ``edges``; and outputs that share memory with an input or with each
other (only the contract's in-place cases may). They raise ``TypeError`` (a wrong type
or dtype), ``ValueError`` or (a class index) ``IndexError``, naming the argument and
what was expected; the scalar checks are cecore's own (:mod:`cecore._validation`).
``lo``, ``hi`` and ``rtol`` of ``log_loss_pass`` are any real numbers. The compiled
function is handed the arrays and values checked (plain ndarray views of subclasses;
masked arrays are refused, their masked values would be read). What NumPy cannot see
is the caller's to avoid: two memory maps of one file, or another thread changing an
input while the kernel runs.

The checks cost a few passes over the targets; cecore itself calls the unchecked
kernels.
"""

import numbers

import numpy as np

from cecore import _config
from cecore import _validation as V

from . import unchecked as _raw

_REDUCE_BLOCK = _raw.build_info()["reduce_block"]  # as compiled
_FLOATS = (np.float32, np.float64)


def _prefixed(kernel, check, *args):
    """``check(*args)`` of cecore's validation, its error prefixed with the kernel."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{kernel}: {exc}") from None


def _array(kernel, name, a, shape, dtype, optional=False, contiguous=True, output=False):
    """``a`` as an array of ``shape`` (None entries: any size) and ``dtype`` (a dtype or
    a tuple of allowed ones), C-contiguous unless ``contiguous=False``, writeable if an
    ``output``; None if ``optional``; a subclass as a plain ndarray view, which the
    caller hands to the compiled function. The compiled functions check dtypes and
    layouts too, but their messages do not name the argument."""
    if a is None and optional:
        return None
    dims = "(" + ", ".join("any" if d is None else str(d) for d in shape) + \
        ("," if len(shape) == 1 else "") + ")"
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    kind = " or ".join(np.dtype(d).name for d in dtypes)
    expected = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} array of shape {dims}" + \
        (" or None" if optional else "")
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        # (masked: the kernel would read the values under the mask)
        raise TypeError(f"{kernel}: {name} must be {expected} (numpy), "
                        f"got {type(a).__name__}")
    # A subclass as a plain ndarray: its own methods (a max() that skips entries) must
    # not decide the checks, and the kernel gets the array that was checked.
    a = a.view(np.ndarray)
    if a.ndim != len(shape) or any(want is not None and got != want
                                   for got, want in zip(a.shape, shape)):
        raise ValueError(f"{kernel}: {name} must be {expected}, got shape {a.shape}")
    if a.dtype not in [np.dtype(d) for d in dtypes] or not a.dtype.isnative:
        raise TypeError(f"{kernel}: {name} must be {expected} (native byte order), "
                        f"got dtype {a.dtype.str}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{kernel}: {name} must be C-contiguous")
    if output and not a.flags.writeable:
        raise ValueError(f"{kernel}: {name} is an output and must be writeable")
    return a


def _threads(kernel, n_threads):
    """``n_threads`` as cecore resolves an explicit one: an int >= 1, more than the CPUs
    available capped with a warning (libgomp aborted the process for 100000), 1 in a
    forked child."""
    n_threads = _prefixed(kernel, V.check_int, n_threads, "n_threads", 1)
    return _config.resolve_n_threads(n_threads)


def _classes(kernel, target, n_classes, ignore_index=None):
    """Every target in ``[0, n_classes)`` (or equal to ``ignore_index``); more than
    2**31 - 1 classes are refused, as cecore refuses them (the kernels count in int32)."""
    _prefixed(kernel, V.check_index_classes, n_classes)
    kept = target if ignore_index is None else target[target != ignore_index]
    if kept.size == 0 or V.all_class_indices(kept, n_classes):
        return
    bad = (target < 0) | (target >= n_classes)  # only now: where, for the message
    if ignore_index is not None:
        bad &= target != ignore_index
    where = np.unravel_index(np.argmax(bad), bad.shape)
    also = "" if ignore_index is None else f" or equal to ignore_index ({ignore_index})"
    raise IndexError(f"{kernel}: target[{', '.join(map(str, where))}] = "
                     f"{target[where]} is not a class index in [0, {n_classes}){also}")


def _disjoint(kernel, outputs, inputs, in_place=(), rule=""):
    """No output shares memory with an input or another output, except the pairs
    ``(output, input)`` of ``in_place`` when they are the same elements. (Only what
    NumPy can see: two memory maps of one file, or another thread changing an input
    while the kernel runs, are the caller's to avoid.)"""
    named = [(n, a) for n, a in outputs.items() if a is not None]
    others = named + [(n, a) for n, a in inputs.items() if a is not None]
    for i, (name, out) in enumerate(named):
        for other, a in others[i + 1:]:
            if np.may_share_memory(out, a) and not (
                    (name, other) in in_place and V.same_elements(out, a)):
                raise ValueError(f"{kernel}: {name} shares memory with {other}; an output "
                                 "must not overlap an input or another output" + rule)


def _float(kernel, name, value):
    """``value`` as a Python float: a real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{kernel}: {name} must be a float, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{kernel}: {name} is too large for a float: {value!r}") from None


def _block_rows(n):
    return -(-n // _REDUCE_BLOCK)


def _index_targets(k, target, weight, ignore_index, label_smoothing, n_classes, shape):
    """The class-index kernels' common arguments: target, weight, ignore_index (an int:
    a float 2.0**53 equals 2**53 + 1 in NumPy's comparison, and the compiled function
    would truncate 2.5 to class 2) and label_smoothing."""
    t = _array(k, "target", target, shape, np.int64)
    w = _array(k, "weight", weight, (n_classes,), np.float64)
    ignore_index = _prefixed(k, V.check_ignore_index, ignore_index)
    eps = _prefixed(k, V.check_label_smoothing, label_smoothing)
    _classes(k, t, n_classes, ignore_index)
    return t, w, ignore_index, eps


def softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale,
                     loss_out, grad_out, n_threads):
    """Softmax cross-entropy with class-index targets, checked (see the contract in
    :mod:`cecore._backends`). ``grad_out`` may be ``logits`` itself when
    ``label_smoothing == 0``."""
    k = "softmax_ce_index"
    x = _array(k, "logits", logits, (None, None, None), _FLOATS)
    N, C, S = x.shape
    t, w, ignore_index, eps = _index_targets(k, target, weight, ignore_index,
                                             label_smoothing, C, (N, S))
    gs = _array(k, "grad_scale", grad_scale, (N, S), np.float64, contiguous=False)
    outputs = dict(loss_out=_array(k, "loss_out", loss_out, (N, S), np.float64, output=True),
                   grad_out=_array(k, "grad_out", grad_out, (N, C, S), x.dtype, optional=True,
                                   output=True))
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, dict(logits=x, target=t, weight=w, grad_scale=gs),
              in_place=[("grad_out", "logits")] if eps == 0 else [],
              rule=" (grad_out may be logits itself when label_smoothing == 0)")
    _raw.softmax_ce_index(x, t, w, ignore_index, eps, gs, outputs["loss_out"],
                          outputs["grad_out"], n_threads)


def softmax_ce_scores(logits, target, weight, ignore_index, label_smoothing, loss_out,
                      stats_out, rank_out, n_threads):
    """Loss and per-row metrics of 2-D logits, checked (see the contract)."""
    k = "softmax_ce_scores"
    x = _array(k, "logits", logits, (None, None), _FLOATS)
    N, C = x.shape
    t, w, ignore_index, eps = _index_targets(k, target, weight, ignore_index,
                                             label_smoothing, C, (N,))
    outputs = dict(loss_out=_array(k, "loss_out", loss_out, (N,), np.float64, output=True),
                   stats_out=_array(k, "stats_out", stats_out, (N, 4), np.float64,
                                    output=True),
                   rank_out=_array(k, "rank_out", rank_out, (N, 2), np.int64, output=True))
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, dict(logits=x, target=t, weight=w))
    _raw.softmax_ce_scores(x, t, w, ignore_index, eps, outputs["loss_out"],
                           outputs["stats_out"], outputs["rank_out"], n_threads)


def _report_args(k, n_rows, top_k, edges, sums_out, counts_out):
    """The report's arguments: top_k, edges and the block-sum outputs, checked."""
    top_k = _prefixed(k, V.check_int, top_k, "top_k", 1, 2**63 - 1)
    e = _array(k, "edges", edges, (None,), np.float64)
    n_bins = e.shape[0] - 1
    # the contract's edges, k / n_bins rounded once: any others would bin silently wrong
    if n_bins < 1 or not np.array_equal(e, np.arange(n_bins + 1) / n_bins):
        raise ValueError(f"{k}: edges must be np.arange(n_bins + 1) / n_bins with "
                         f"n_bins >= 1, got {e!r}")
    rows = _block_rows(n_rows)  # one row of sums per REDUCE_BLOCK rows
    return top_k, e, dict(sums_out=_array(k, "sums_out", sums_out, (rows, 3 + n_bins), np.float64,
                                   output=True),
                   counts_out=_array(k, "counts_out", counts_out, (rows, 4 + n_bins),
                                     np.int64, output=True))


def report_sums(stats, rank, top_k, edges, sums_out, counts_out, n_threads):
    """Block sums of the report's metrics from per-row scores, checked (see the contract)."""
    k = "report_sums"
    s = _array(k, "stats", stats, (None, 4), np.float64)
    r = _array(k, "rank", rank, (s.shape[0], 2), np.int64)
    top_k, e, outputs = _report_args(k, s.shape[0], top_k, edges, sums_out, counts_out)
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, dict(stats=s, rank=r, edges=e))
    _raw.report_sums(s, r, top_k, e, outputs["sums_out"], outputs["counts_out"], n_threads)


def softmax_ce_report(logits, target, weight, ignore_index, label_smoothing, top_k, edges,
                      loss_out, sums_out, counts_out, n_threads):
    """``softmax_ce_scores`` then ``report_sums`` in one pass, checked (see the contract)."""
    k = "softmax_ce_report"
    x = _array(k, "logits", logits, (None, None), _FLOATS)
    N, C = x.shape
    if C < 1:
        raise ValueError(f"{k}: logits must have at least one class (column), got {x.shape}")
    t, w, ignore_index, eps = _index_targets(k, target, weight, ignore_index,
                                             label_smoothing, C, (N,))
    top_k, e, outputs = _report_args(k, N, top_k, edges, sums_out, counts_out)
    loss = outputs["loss_out"] = _array(k, "loss_out", loss_out, (N,), np.float64,
                                        output=True)
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, dict(logits=x, target=t, weight=w, edges=e))
    _raw.softmax_ce_report(x, t, w, ignore_index, eps, top_k, e, loss, outputs["sums_out"],
                           outputs["counts_out"], n_threads)


def softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out,
                     grad_out, n_threads):
    """Softmax cross-entropy with probability targets, checked (see the contract)."""
    k = "softmax_ce_proba"
    x = _array(k, "logits", logits, (None, None, None), _FLOATS)
    N, C, S = x.shape
    inputs = dict(logits=x, target=_array(k, "target", target, (N, C, S), x.dtype),
                  weight=_array(k, "weight", weight, (C,), np.float64),
                  grad_scale=_array(k, "grad_scale", grad_scale, (N, S), np.float64,
                                    contiguous=False))
    outputs = dict(loss_out=_array(k, "loss_out", loss_out, (N, S), np.float64, output=True),
                   grad_out=_array(k, "grad_out", grad_out, (N, C, S), x.dtype, optional=True,
                                   output=True))
    eps = _prefixed(k, V.check_label_smoothing, label_smoothing)
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, inputs)
    _raw.softmax_ce_proba(x, inputs["target"], inputs["weight"], eps, inputs["grad_scale"],
                          outputs["loss_out"], outputs["grad_out"], n_threads)


def bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out,
               n_threads):
    """Binary cross-entropy on logits, checked (see the contract). ``grad_out`` may be
    ``input`` or ``target`` itself."""
    k = "bce_logits"
    x = _array(k, "input", input, (None, None), _FLOATS)
    inputs = dict(input=x, target=_array(k, "target", target, x.shape, x.dtype))
    for name, a in (("weight", weight), ("pos_weight", pos_weight),
                    ("grad_scale", grad_scale)):
        inputs[name] = _array(k, name, a, x.shape, np.float64, contiguous=False)
    # the elementwise losses (R, L), or the sums of each REDUCE_BLOCK of them
    sums = isinstance(loss_out, np.ndarray) and loss_out.ndim == 1
    loss = _array(k, "loss_out" + ("" if sums else " (or 1-D, the block sums)"), loss_out,
                  (_block_rows(x.size),) if sums else x.shape, np.float64, output=True)
    outputs = dict(loss_out=loss, grad_out=_array(k, "grad_out", grad_out, x.shape, x.dtype,
                                                  optional=True, output=True))
    n_threads = _threads(k, n_threads)
    _disjoint(k, outputs, inputs, in_place=[("grad_out", "input"), ("grad_out", "target")],
              rule=" (grad_out may be input or target itself)")
    _raw.bce_logits(x, inputs["target"], inputs["weight"], inputs["pos_weight"],
                    inputs["grad_scale"], loss, outputs["grad_out"], n_threads)


def softmax(logits, log, out, n_threads):
    """Softmax or log-softmax over axis 1 of (N, C, S) logits, checked (see the contract).
    ``out`` may be ``logits`` itself."""
    k = "softmax"
    x = _array(k, "logits", logits, (None, None, None), _FLOATS)
    if not isinstance(log, (bool, np.bool_, int, np.integer)) or log not in (0, 1):
        raise TypeError(f"{k}: log must be a bool, got {log!r}")
    o = _array(k, "out", out, x.shape, x.dtype, output=True)
    n_threads = _threads(k, n_threads)
    _disjoint(k, dict(out=o), dict(logits=x), in_place=[("out", "logits")],
              rule=" (out may be logits itself)")
    _raw.softmax(x, bool(log), o, n_threads)


def logsumexp(logits, out, n_threads):
    """Log-sum-exp over axis 1 of (N, C, S) logits, checked (see the contract)."""
    k = "logsumexp"
    x = _array(k, "logits", logits, (None, None, None), _FLOATS)
    o = _array(k, "out", out, (x.shape[0], x.shape[2]), np.float64, output=True)
    n_threads = _threads(k, n_threads)
    _disjoint(k, dict(out=o), dict(logits=x))
    _raw.logsumexp(x, o, n_threads)


def log_loss_pass(proba, target, lo, hi, rtol, stats_out, picked_out, n_threads):
    """The probability pass of :func:`cecore.metrics.log_loss`, checked (see the
    contract)."""
    k = "log_loss_pass"
    p = _array(k, "proba", proba, (None, None), _FLOATS)
    N, C = p.shape
    t = _array(k, "target", target, (N,), np.int64, optional=True)
    outputs = dict(stats_out=_array(k, "stats_out", stats_out, (3,), np.float64, output=True),
                   picked_out=_array(k, "picked_out", picked_out, (N,), p.dtype,
                                     optional=True, output=True))
    if (t is None) != (outputs["picked_out"] is None):
        raise ValueError(f"{k}: target and picked_out must both be None or both arrays")
    lo, hi, rtol = (_float(k, name, v) for name, v in (("lo", lo), ("hi", hi), ("rtol", rtol)))
    n_threads = _threads(k, n_threads)
    if t is not None:
        _classes(k, t, C)
    _disjoint(k, outputs, dict(proba=p, target=t))
    _raw.log_loss_pass(p, t, lo, hi, rtol, outputs["stats_out"], outputs["picked_out"],
                       n_threads)
