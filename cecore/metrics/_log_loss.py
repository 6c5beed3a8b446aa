"""``log_loss``, a drop-in for scikit-learn's, and ``log_loss_from_logits``.

Design: :func:`log_loss` reproduces scikit-learn's ``log_loss`` (same checks in the same
order, same messages, warnings and values, computed in the input's precision) but never
builds the one-hot label matrix nor a clipped copy of the probabilities. One pass over
``y_proba`` (the kernel contract's ``log_loss_pass``, through the registry) finds values
outside [0, 1], non-finite rows and rows that do not sum to one, and picks each row's
clipped true-class probability while the row is in cache. Only unusual label input (a
label indicator matrix or object labels) goes through scikit-learn's ``LabelBinarizer``,
where the one-hot matrix is scikit-learn's format anyway.
"""

import math
import warnings

import numpy as np
from sklearn.externals import array_api_extra as xpx
from sklearn.utils import check_array, check_consistent_length
from sklearn.utils._param_validation import Hidden, validate_params
from sklearn.utils.validation import _assert_all_finite, _check_sample_weight

from .._backends import get_backend
from .._config import LOG_LOSS_ROW_BLOCK, block_rows, resolve_n_threads
from .._validation import _on_numpy
from ..functional import binary_cross_entropy_with_logits, cross_entropy
from ._labels import _encode

__all__ = ["log_loss", "log_loss_from_logits"]


def _weighted_mean(loss, sample_weight, normalize):
    """scikit-learn's ``_average`` for numpy: ``np.average`` or a (weighted) sum."""
    if normalize:
        return float(np.average(loss, weights=sample_weight))
    if sample_weight is not None:
        return float(np.dot(loss, sample_weight))
    return float(np.sum(loss))


@validate_params(
    {
        "y_true": ["array-like"],
        "y_proba": ["array-like", Hidden(None)],
        "normalize": ["boolean"],
        "sample_weight": ["array-like", None],
        "labels": ["array-like", None],
        "y_pred": ["array-like", str],
    },
    prefer_skip_nested_validation=True,
)
@_on_numpy
def log_loss(y_true, y_proba=None, *, normalize=True, sample_weight=None, labels=None,
             y_pred="deprecated"):
    """Log loss of predicted probabilities; a drop-in for ``sklearn.metrics.log_loss``.

    Same signature, values, clipping, warnings and errors as scikit-learn 1.9's
    ``log_loss``, in O(n_samples) extra memory: scikit-learn builds an n_samples x
    n_classes one-hot matrix and clipped copies of ``y_proba``; this reads ``y_proba``
    once to check it and then only each row's true-class probability. One difference:
    a string label ending in a NUL character raises a ``ValueError`` (NumPy's str dtype
    drops trailing NULs; scikit-learn scores such rows as a loss of 0).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,), or label indicator matrix
        True labels.
    y_proba : array-like of shape (n_samples, n_classes) or (n_samples,)
        Predicted probabilities, columns in the sorted order of the labels (as
        ``predict_proba``); a 1-D array is the probability of the positive class.
        Values are clipped to ``[eps, 1 - eps]``, ``eps`` the machine epsilon of its
        dtype. Rows that do not sum to one raise a ``UserWarning`` and are not
        renormalised (as in scikit-learn 1.9).
    normalize : bool, default=True
        Return the (weighted) mean loss per sample, else the sum.
    sample_weight : array-like of shape (n_samples,), optional
    labels : array-like, optional
        All the labels, when ``y_true`` may miss some; inferred from ``y_true`` otherwise.
    y_pred : array-like, deprecated
        Old name of ``y_proba`` (deprecated in scikit-learn 1.9).

    Returns
    -------
    loss : float
        ``-sum_i w_i log(clip(y_proba[i, y_true[i]])) / sum_i w_i`` (or the sum).
    """
    if not (isinstance(y_pred, str) and y_pred == "deprecated"):
        if y_proba is not None:
            raise ValueError(
                "Cannot use both `y_pred` and `y_proba`. `y_pred` is deprecated, "
                "use `y_proba` instead."
            )
        warnings.warn(
            "`y_pred` was renamed to `y_proba` in version 1.9 and will be removed "
            "in 1.11. Use `y_proba` instead.",
            FutureWarning,
        )
        y_proba = y_pred

    # Finiteness is checked in the fused pass below rather than by check_array.
    float_dtypes = [np.float64, np.float32, np.float16]
    try:
        proba = check_array(y_proba, ensure_2d=False, ensure_all_finite=False,
                            dtype=float_dtypes)
    except (TypeError, ValueError):
        # scikit-learn checks finiteness first: give its error when that is the one
        check_array(y_proba, ensure_2d=False, dtype=float_dtypes)
        raise
    dtype = proba.dtype
    eps = np.finfo(dtype).eps
    lo, hi = dtype.type(eps), dtype.type(1) - dtype.type(eps)
    if proba.ndim == 2 and proba.shape[1] == 1:
        # One column holds the positive class's probability, as a 1-D y_proba does
        # (scikit-learn appends 1 - p before anything else looks at the columns).
        proba = proba[:, 0]
    if dtype == np.float16 and proba.ndim == 1:  # Numba has no float16: in float32
        proba = proba.astype(np.float32)

    # Labels are encoded before the pass over y_proba so that the pass also picks each
    # row's probability; their errors and warnings wait for scikit-learn's order.
    label_warnings = []
    try:
        target, indicator, classes = _encode(y_true, labels, label_warnings)
        label_error = None
    except Exception as exc:
        target = indicator = classes = None
        label_error = exc

    loss = None
    if proba.ndim == 1:
        stats = _stats_1d(proba)
    else:
        # The pass picks proba[i, target[i]] only when every index is a column: targets
        # index `classes`, so their count must be the column count (else the error
        # below is raised, after scikit-learn's earlier checks).
        pick = (target is not None and target.shape[0] == proba.shape[0]
                and classes.shape[0] == proba.shape[1])
        stats, picked = _checked_pass(proba, target if pick else None, lo, hi, eps)
        if stats[1]:  # some row is near or past the tolerance: decide as scikit-learn
            stats[1] = _not_normalised(proba, eps)
        if pick:
            # In the input's precision, as scikit-learn computes, so the values are the
            # same to the last bit (float16 was picked in float32: exact, then rounded).
            loss = -np.log(picked.astype(dtype))
    if stats[2]:
        _assert_all_finite(proba, input_name="")  # raises scikit-learn's message
    if stats[0]:
        if proba.max() > 1:
            raise ValueError(f"y_prob contains values greater than 1: {dtype.type(proba.max())}")
        raise ValueError(f"y_prob contains values lower than 0: {dtype.type(proba.min())}")
    check_consistent_length(proba, y_true, sample_weight)
    if sample_weight is not None:
        _check_sample_weight(sample_weight, proba, force_float_dtype=False)

    for message in label_warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    if label_error is not None:
        raise label_error
    n_columns = 2 if proba.ndim == 1 else proba.shape[1]
    if stats[1]:
        warnings.warn(
            "The y_prob values do not sum to one. Make sure to pass probabilities.",
            UserWarning,
        )
    if classes.shape[0] != n_columns:
        if labels is None:
            raise ValueError(
                "y_true and y_prob contain different number of "
                "classes: {0} vs {1}. Please provide the true "
                "labels explicitly through the labels argument. "
                "Classes found in "
                "y_true: {2}".format(classes.shape[0], n_columns, classes)
            )
        raise ValueError(
            "The number of classes in labels is different "
            "from that in y_prob. Classes found in "
            "labels: {0}".format(classes)
        )

    if proba.ndim == 1:
        loss = _loss_1d(proba, target, indicator, lo, hi, dtype)
    elif indicator is not None:
        loss = _loss_indicator(proba, indicator, lo, hi)
    return _weighted_mean(loss, sample_weight, normalize)


def _checked_pass(proba, target, lo, hi, eps):
    """``stats`` and the picked probabilities of the backends' ``log_loss_pass`` over
    ``proba`` (2-D). A C-contiguous float32/float64 array is read in place, in one call;
    any other (Fortran-ordered, as ``DataFrame.to_numpy()`` gives, strided, float16, which
    Numba does not have) through a reused C-contiguous buffer of about
    ``PROBA_BLOCK_BYTES``: no copy of the whole array. The counts are exact integers, so
    blocks add up to the one-call result."""
    n, c = proba.shape
    work = np.float32 if proba.dtype == np.float16 else proba.dtype
    in_place = proba.flags.c_contiguous and proba.dtype == work
    step = n if in_place else block_rows(c * np.dtype(work).itemsize)
    stats = np.zeros(3)
    picked = None if target is None else np.empty(n, dtype=work)
    t = None if target is None else target.astype(np.int64, copy=False)
    buf = None if in_place else np.empty((min(step, n), c), dtype=work)
    part = np.empty(3)
    kernels, rtol = get_backend("auto"), _fused_rtol(eps, proba)
    for start in range(0, n, step) if n else [0]:
        rows = slice(start, start + step)
        block = proba[rows]
        if not in_place:
            block = buf[:block.shape[0]]
            np.copyto(block, proba[rows], casting="unsafe")
        kernels.log_loss_pass(block, None if t is None else t[rows], lo, hi, rtol, part,
                              None if picked is None else picked[rows],
                              resolve_n_threads(None, block.size))
        stats += part
    return stats, picked


def _fused_rtol(eps, proba):
    """The fused pass's tolerance for a row sum: scikit-learn's ``sqrt(eps)`` less a bound
    on how far its sum in the input's precision can be from the pass's float64 sum. A row
    the pass finds within it is within scikit-learn's; a row outside it is checked again
    by :func:`_not_normalised`, which decides as scikit-learn does. (The float64 sums
    alone decided, and float16 and float32 rows within an ulp or so of the tolerance
    warned where scikit-learn did not, or the reverse.) NumPy sums a row pairwise when
    the row is its inner loop (float16 in float32, then rounded): a bound with a factor
    of 4 to spare. When the rows are its outer loop (Fortran order, as
    ``DataFrame.to_numpy()`` gives), it adds the columns one by one, rounding each
    partial sum to the input's dtype: the bound of that order, ``(C - 1) eps / 2``, with
    a factor of 2 (the tolerance may then be negative: every row is checked again)."""
    n, c = proba.shape
    if n > 1 and abs(proba.strides[1]) > abs(proba.strides[0]):
        return math.sqrt(eps) - eps - c * np.finfo(proba.dtype).eps
    accumulate = np.finfo(np.float32 if proba.dtype == np.float16 else proba.dtype).eps
    depth = 24 + math.log2(max(c, 2))  # 16 per 8-lane block of 128, 3 + log2 merges
    return math.sqrt(eps) - eps - 4 * depth * accumulate


def _not_normalised(proba, eps):
    """scikit-learn's test of its warning: row sums in ``proba``'s precision, compared
    with 1 by ``array_api_extra.isclose`` at ``rtol=sqrt(eps)``. It reads ``proba`` once
    more, only after the fused pass found rows near or past the tolerance (data that are
    no probabilities, as a rule: softmax outputs are within a few ulps of 1)."""
    sums = np.sum(proba, axis=1)
    return int(not np.all(xpx.isclose(sums, sums.dtype.type(1), rtol=math.sqrt(eps))))


def _stats_1d(p):
    """``log_loss_pass``'s ``stats_out`` for a positive-class vector (as 0/1 flags): its
    rows ``(1 - p, p)`` sum to one, so none is unnormalised."""
    return int(p.max() > 1 or p.min() < 0), 0, int(not np.isfinite(p.sum()))


def _loss_1d(p, target, indicator, lo, hi, dtype):
    """Loss of the rows ``(1 - p, p)`` (O(n)), in the input's dtype."""
    p = p.astype(dtype)
    rows = np.stack([dtype.type(1) - p, p], axis=1)
    if indicator is not None:
        return _loss_indicator(rows, indicator, lo, hi)
    return -np.log(np.clip(rows[np.arange(rows.shape[0]), target], lo, hi))


def _loss_indicator(proba, indicator, lo, hi):
    """``-sum_c Y[i, c] log(clip(P[i, c]))`` block by block (bounded temporaries), in the
    input's dtype as scikit-learn computes it."""
    dtype = lo.dtype
    loss = np.empty(proba.shape[0], dtype=dtype)
    for start in range(0, proba.shape[0], LOG_LOSS_ROW_BLOCK):
        rows = slice(start, start + LOG_LOSS_ROW_BLOCK)
        logp = np.log(np.clip(proba[rows].astype(dtype), lo, hi))
        y = indicator[rows].astype(dtype)
        loss[rows] = -np.where(y == 0, dtype.type(0), y * logp).sum(axis=1)
    return loss


def log_loss_from_logits(y_true, logits, *, normalize=True, sample_weight=None, labels=None):
    """Log loss of a classifier's logits (``decision_function``), exact without clipping.

    ``-log softmax(logits)[y]`` per sample through :func:`cecore.cross_entropy`
    (``reduction='none'``), then the weighted mean, so that confident predictions keep
    their exact loss where probabilities would have been rounded to 0 or 1 and clipped.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    logits : array-like of shape (n_samples, n_classes), (n_samples,) or (n_samples, 1)
        Unnormalised log-probabilities, columns in the sorted order of the labels; a 1-D
        array or a single column is the logit of the positive class (binary
        ``decision_function``).
    normalize, sample_weight, labels
        As :func:`log_loss`.

    Returns
    -------
    loss : float
    """
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    return _logits_loss(y_true, logits, sample_weight, labels, normalize)


@_on_numpy
def _logits_loss(y_true, logits, sample_weight, labels, normalize, label_smoothing=0.0):
    """:func:`log_loss_from_logits`, with ``label_smoothing`` (the scorers' too): the
    checks of logits, labels and weights in one place."""
    # float16 logits go to float32 (exact; the functional API computes them so too), not
    # to float64, four times their memory; other dtypes (integers) to float64
    half = str(getattr(logits, "dtype", "")) in ("float16", "torch.float16")
    logits = check_array(logits, ensure_2d=False,
                         dtype=[np.float32, np.float64] if half else [np.float64, np.float32])
    if logits.ndim == 2 and logits.shape[1] == 1:  # one column: the positive class's
        logits = logits.reshape(-1)                 # logit, as log_loss reads a column
    check_consistent_length(logits, y_true, sample_weight)
    if sample_weight is not None:
        _check_sample_weight(sample_weight, logits, force_float_dtype=False)
    if np.ndim(y_true) == 2 and np.shape(y_true)[1] == 1:  # a column of labels, which
        y_true = np.asarray(y_true).reshape(-1)           # log_loss takes as labels too
    target, indicator, classes = _encode(y_true, labels)
    if indicator is not None:
        raise ValueError("log_loss_from_logits needs 1-D class labels, not a label indicator matrix")
    n_columns = 2 if logits.ndim == 1 else logits.shape[1]
    if classes.shape[0] != n_columns:
        hint = ("pass all the classes through labels=" if classes.shape[0] < n_columns
                else "the logits need one column per class")
        raise ValueError(f"y_true has {classes.shape[0]} classes ({classes}) but the logits "
                         f"have {n_columns} columns; {hint}")
    if logits.ndim == 1 and not label_smoothing:
        loss = binary_cross_entropy_with_logits(logits, (target == 1).astype(logits.dtype),
                                                reduction="none")
    else:
        if logits.ndim == 1:  # the logits of (classes[0], classes[1])
            logits = np.column_stack([np.zeros_like(logits), logits])
        loss = cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    return _weighted_mean(loss.astype(np.float64), sample_weight, normalize)
