"""Log loss and cross-entropy scorers for scikit-learn, in O(n_samples) extra memory.

Design: :func:`log_loss` reproduces scikit-learn's ``log_loss`` (same checks in the same
order, same messages, warnings and values) but never builds the one-hot label matrix nor
a clipped copy of the probabilities. One fused pass over ``y_proba`` (a Numba kernel)
finds its minimum, maximum, non-finite values and rows that do not sum to one; a second,
O(n_samples) pass picks and clips each row's true-class probability. Only unusual label
input (a label indicator matrix or object labels) goes through scikit-learn's own
``LabelBinarizer``, where the one-hot matrix is scikit-learn's format anyway.
"""

import math
import numbers
import warnings

import numpy as np
from numba import prange
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_array, check_consistent_length
from sklearn.utils._param_validation import Hidden, validate_params
from sklearn.utils.validation import _assert_all_finite, _check_sample_weight

from . import _config, _numba_kernels
from .functional import binary_cross_entropy_with_logits, cross_entropy

__all__ = ["log_loss", "log_loss_from_logits", "make_cross_entropy_scorer",
           "neg_log_loss_scorer"]

# Rows per block of the slow (indicator-matrix) path: bounds its temporaries.
_ROW_BLOCK = 8192


# -- kernels -------------------------------------------------------------------------------

def _row_pass(proba, target, lo, hi, n_blocks, rtol, stats, loss_out):
    """One pass over ``proba``: scikit-learn's checks, and each row's clipped log loss.

    ``stats[b] = (values outside [0, 1], rows whose sum is not close to 1, non-finite
    rows)`` for each of ``n_blocks`` blocks of rows; a row sum is close to one when
    ``|sum - 1| <= 1e-8 + rtol`` (numpy's ``isclose`` against 1). When ``target`` is not
    empty, ``loss_out[i] = clip(proba[i, target[i]], lo, hi)`` as well (the caller takes
    ``-log`` with NumPy's vectorised log): picking the value while its row is in cache is
    free, picking it in a second pass costs a cache miss per row. Counting out-of-range values (in a float, like the sum) instead of
    tracking a NaN-aware max and min lets LLVM vectorise the loop, so the pass runs at
    memory speed; the rare caller that gets a count recomputes the extremes.
    """
    n, n_classes = proba.shape
    pick = target.shape[0] > 0
    block = (n + n_blocks - 1) // n_blocks
    for b in prange(n_blocks):
        outside = 0.0
        bad = 0
        non_finite = 0
        for i in range(b * block, min(n, (b + 1) * block)):
            s = 0.0
            row_outside = 0.0
            for c in range(n_classes):
                v = proba[i, c]
                s += v
                row_outside += (v > 1.0) + (v < 0.0)
            outside += row_outside
            if not abs(s) < np.inf:  # NaN or inf somewhere in the row
                non_finite += 1
            elif abs(s - 1.0) > 1e-8 + rtol:
                bad += 1
            if pick:
                loss_out[i] = min(max(proba[i, target[i]], lo), hi)
        stats[b, 0] = outside
        stats[b, 1] = bad
        stats[b, 2] = non_finite


# Compiled parallel and serial, and launched, by the Numba backend's helpers: they know
# the thread policy (forked children, thread-local counts) and Numba's cache quirks.
_ROW_PASS = _numba_kernels.jit(_row_pass)


# -- labels --------------------------------------------------------------------------------

def _as_labels(y_true):
    """``y_true`` as an ndarray, or None when only scikit-learn's slow path handles it.

    The fast path takes 1-D labels of a bool, integer, string or integral float dtype:
    for those scikit-learn's ``type_of_target`` is always 'binary' or 'multiclass'.
    """
    if hasattr(y_true, "to_numpy") and getattr(y_true, "ndim", 1) == 1:  # pandas
        y_true = y_true.to_numpy()
    if isinstance(y_true, np.ndarray):
        y = y_true
    elif isinstance(y_true, (list, tuple)):
        y = np.asarray(y_true) if len(y_true) else None
        # numpy turns [1, "a"] into strings; scikit-learn refuses such mixed labels
        if y is not None and y.dtype.kind == "U" and not all(isinstance(v, str) for v in y_true):
            return None
    else:
        return None
    if y is None or y.ndim != 1 or y.size == 0:
        return None
    if y.dtype.kind in "biuUS":
        return y
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y
    return None


def _encode(y_true, labels, pending=None):
    """``(target, indicator, classes)``: class indices (n,), or a label indicator (n, C).

    Exactly one of ``target``/``indicator`` is not None. Errors and warnings are
    scikit-learn's (``LabelBinarizer`` as ``sklearn.metrics.log_loss`` uses it); a
    warning is appended to the list ``pending`` when one is given, else issued.
    """
    y = _as_labels(y_true)
    lb = LabelBinarizer()
    if labels is not None:
        lb = lb.fit(labels)
        if not np.all(lb.classes_ == labels):
            message = (
                f"Labels passed were {labels}. But this function "
                "assumes labels are ordered lexicographically. "
                f"Pass the ordered labels={lb.classes_.tolist()} and ensure that "
                "the columns of y_prob correspond to this ordering."
            )
            if pending is None:
                warnings.warn(message, UserWarning, stacklevel=3)
            else:
                pending.append(message)
        if not np.all(np.isin(y_true if y is None else y, labels)):
            undeclared_labels = set(y_true) - set(labels)
            raise ValueError(
                f"y_true contains values {undeclared_labels} not belonging "
                f"to the passed labels {labels}."
            )
        classes = lb.classes_
    elif y is not None:
        classes = _unique(y)
    else:
        classes = lb.fit(y_true).classes_

    if classes.shape[0] == 1:
        if labels is None:
            raise ValueError(
                "y_true contains only one label ({0}). Please "
                "provide the list of all expected class labels explicitly through the "
                "labels argument.".format(classes[0])
            )
        raise ValueError(
            "The labels array needs to contain at least two "
            "labels, got {0}.".format(classes)
        )
    if y is not None:
        return _index(y, classes), None, classes
    indicator = lb.transform(y_true)
    if indicator.shape[1] == 1:
        indicator = np.concatenate([1 - indicator, indicator], axis=1)
    return None, indicator, classes


def _unique(y):
    """Sorted unique labels; O(n) through ``bincount`` for small non-negative integers."""
    if y.dtype.kind in "iu" and y.min() >= 0 and y.max() < 4 * y.size + 1024:
        return np.flatnonzero(np.bincount(y)).astype(y.dtype)
    return np.unique(y)


def _index(y, classes):
    """Position of each label of ``y`` in the sorted ``classes`` (all of them are there)."""
    if y.dtype.kind in "iu" and classes.dtype.kind in "iu" and classes[0] >= 0 \
            and classes[-1] < 4 * y.size + 1024:
        lookup = np.zeros(int(classes[-1]) + 1, dtype=np.intp)
        lookup[classes] = np.arange(classes.size)
        return lookup[y]
    return np.searchsorted(classes, y).astype(np.intp)


def _weighted_mean(loss, sample_weight, normalize):
    """scikit-learn's ``_average`` for numpy: ``np.average`` or a (weighted) sum."""
    if normalize:
        return float(np.average(loss, weights=sample_weight))
    if sample_weight is not None:
        return float(np.dot(loss, sample_weight))
    return float(np.sum(loss))


# -- log_loss ------------------------------------------------------------------------------

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
def log_loss(y_true, y_proba=None, *, normalize=True, sample_weight=None, labels=None,
             y_pred="deprecated"):
    """Log loss of predicted probabilities; a drop-in for ``sklearn.metrics.log_loss``.

    Same signature, values, clipping, warnings and errors as scikit-learn 1.9's
    ``log_loss``, in O(n_samples) extra memory: scikit-learn builds an n_samples x
    n_classes one-hot matrix and clipped copies of ``y_proba``; this reads ``y_proba``
    once to check it and then only each row's true-class probability.

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
    if dtype == np.float16:  # Numba has no float16: check and pick in float32
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
        n_threads = _config.default_n_threads()
        n_blocks = max(1, min(4 * n_threads, proba.shape[0]))
        blocks = np.empty((n_blocks, 3))
        # The pass picks proba[i, target[i]] only when every index is a column: targets
        # index `classes`, so their count must be the column count (else the error
        # below is raised, after scikit-learn's earlier checks).
        pick = (target is not None and target.shape[0] == proba.shape[0]
                and classes.shape[0] == proba.shape[1])
        loss = np.empty(proba.shape[0] if pick else 0, dtype=proba.dtype)
        _numba_kernels.launch(_ROW_PASS, n_threads, proba,
                              target if pick else np.empty(0, np.intp),
                              proba.dtype.type(lo), proba.dtype.type(hi), n_blocks,
                              float(math.sqrt(eps)), blocks, loss)
        stats = blocks.sum(axis=0)
        # In the input's precision, as scikit-learn computes, so the values are the same
        # to the last bit (float16 was picked in float32: exact, then rounded back).
        loss = -np.log(loss.astype(dtype))
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


def _stats_1d(p):
    """``_row_stats`` of a positive-class vector, whose rows ``(1 - p, p)`` sum to one."""
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
    for start in range(0, proba.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
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
    logits : array-like of shape (n_samples, n_classes) or (n_samples,)
        Unnormalised log-probabilities, columns in the sorted order of the labels; a 1-D
        array is the logit of the positive class (binary ``decision_function``).
    normalize, sample_weight, labels
        As :func:`log_loss`.

    Returns
    -------
    loss : float
    """
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    logits = check_array(logits, ensure_2d=False, dtype=[np.float64, np.float32])
    check_consistent_length(logits, y_true, sample_weight)
    if sample_weight is not None:
        _check_sample_weight(sample_weight, logits, force_float_dtype=False)
    target, indicator, classes = _encode(y_true, labels)
    if indicator is not None:
        raise ValueError("log_loss_from_logits needs 1-D class labels, not a label indicator matrix")
    n_columns = 2 if logits.ndim == 1 else logits.shape[1]
    if classes.shape[0] != n_columns:
        raise ValueError(
            f"y_true has {classes.shape[0]} classes ({classes}) but the logits have "
            f"{n_columns} columns; pass all the classes through labels=")
    if logits.ndim == 1:
        loss = binary_cross_entropy_with_logits(logits, (target == 1).astype(logits.dtype),
                                                reduction="none")
    else:
        loss = cross_entropy(logits, target, reduction="none")
    return _weighted_mean(loss.astype(np.float64), sample_weight, normalize)


# -- scorers -------------------------------------------------------------------------------

class _CrossEntropyScorer:
    """Callable ``scorer(estimator, X, y, sample_weight=None)`` giving minus the mean loss.

    The estimator's ``classes_`` are the labels, so a test fold that misses a class
    scores normally (``sklearn.metrics.get_scorer('neg_log_loss')`` raises there).
    """

    def __init__(self, label_smoothing=0.0, from_logits=False):
        if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing <= 1.0):
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.from_logits = bool(from_logits)

    def __repr__(self):
        if not self.label_smoothing and not self.from_logits:
            return "neg_log_loss_scorer"
        return (f"make_cross_entropy_scorer(label_smoothing={self.label_smoothing}, "
                f"from_logits={self.from_logits})")

    def __call__(self, estimator, X, y_true, sample_weight=None):
        classes = estimator.classes_
        if self.from_logits:
            logits = np.asarray(estimator.decision_function(X))
            if logits.ndim == 1:  # binary: the logits of (classes_[0], classes_[1])
                logits = np.column_stack([np.zeros_like(logits), logits])
            return -self._loss(y_true, logits, classes, sample_weight)
        proba = np.asarray(estimator.predict_proba(X))
        if not self.label_smoothing:
            return -log_loss(y_true, proba, sample_weight=sample_weight, labels=classes)
        # Smoothed cross-entropy needs every log-probability: take them in place in
        # predict_proba's fresh output (clipped as log_loss clips), then the kernel's
        # log-softmax of log-probabilities that sum to one changes nothing.
        proba = np.array(proba, dtype=np.float64 if proba.dtype != np.float32 else np.float32)
        eps = np.finfo(proba.dtype).eps
        np.clip(proba, eps, 1 - eps, out=proba)
        np.log(proba, out=proba)
        return -self._loss(y_true, proba, classes, sample_weight)

    def _loss(self, y_true, logits, classes, sample_weight):
        target, indicator, _ = _encode(y_true, classes)
        if indicator is not None:
            raise ValueError("cross-entropy scorers need 1-D class labels")
        loss = cross_entropy(logits, target, reduction="none",
                             label_smoothing=self.label_smoothing)
        return _weighted_mean(loss.astype(np.float64), sample_weight, True)


def make_cross_entropy_scorer(*, label_smoothing=0.0, from_logits=False):
    """A scorer (``scoring=``) giving minus the mean cross-entropy of a classifier.

    Parameters
    ----------
    label_smoothing : float in [0, 1], default=0.0
        The target is ``(1 - eps) * one_hot + eps / n_classes`` (PyTorch's definition).
    from_logits : bool, default=False
        Score ``decision_function`` through the exact log-softmax instead of clipped
        ``predict_proba`` (a binary decision function ``z`` counts as logits ``(0, z)``).

    Returns
    -------
    scorer : callable ``scorer(estimator, X, y, sample_weight=None) -> float``
        Greater is better. The estimator's ``classes_`` are the labels, so folds that
        miss a class work. Without options it equals :data:`neg_log_loss_scorer`.
    """
    return _CrossEntropyScorer(label_smoothing, from_logits)


#: ``scoring=`` for minus :func:`log_loss` of ``predict_proba``, with ``labels=classes_``.
neg_log_loss_scorer = _CrossEntropyScorer()
