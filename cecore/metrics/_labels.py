"""Label encoding for the metrics: class indices when the labels allow it, else
scikit-learn's ``LabelBinarizer`` (same errors and warnings as scikit-learn's metrics)."""

import warnings

import numpy as np
from sklearn.preprocessing import LabelBinarizer

from .._validation import _to_numpy


def _as_labels(y_true):
    """``y_true`` as an ndarray, or None when only scikit-learn's slow path handles it.

    The fast path takes 1-D labels of a bool, integer, string or integral float dtype, or
    an object array of strings:
    for those scikit-learn's ``type_of_target`` is always 'binary' or 'multiclass'.
    (Bytes, and floats that do not survive a cast to int64, such as 1e20, go to the slow
    path, which raises scikit-learn's errors for them.)
    """
    if hasattr(y_true, "to_numpy") and getattr(y_true, "ndim", 1) == 1:  # pandas
        y_true = y_true.to_numpy()
    if isinstance(y_true, np.ma.MaskedArray):
        return None  # its data would be scored through the mask: scikit-learn's path
    if isinstance(y_true, np.ndarray):
        y = y_true
    elif hasattr(y_true, "__array__"):  # a torch tensor, say (it went to the slow path,
        y = _to_numpy(y_true)            # which took 1-D labels for an indicator matrix)
    elif isinstance(y_true, (list, tuple)):
        y = np.asarray(y_true) if len(y_true) else None
        # numpy turns [1, "a"] into strings; scikit-learn refuses such mixed labels
        if y is not None and y.dtype.kind == "U" and not all(isinstance(v, str) for v in y_true):
            return None
    else:
        return None
    if y is None or y.ndim != 1 or y.size == 0:
        return None
    if (y.dtype.kind == "U" and y is not y_true) or y.dtype.kind == "O":  # from Python str
        _refuse_trailing_nul(y_true)
    if y.dtype.kind == "O" and all(isinstance(v, str) for v in y):
        # Strings in an object array: what a pandas string column gives (pandas >= 3's
        # str dtype, categoricals, object columns). They sort as NumPy's str dtype does.
        y = y.astype(str)
    if y.dtype.kind in "biuU":
        return y
    if y.dtype.kind == "f" and np.all(np.isfinite(y)):
        with np.errstate(invalid="ignore"):  # as type_of_target tests it
            if np.all(y == y.astype(np.int64)):
                return y
    return None


def _refuse_trailing_nul(values):
    """A ValueError for a string label ending in NUL: NumPy's str dtype drops trailing
    NULs, so "a" and "a\\0" would silently become one class (scikit-learn's
    ``LabelBinarizer`` encodes the second as a row of zeros, which ``log_loss`` scores as
    a loss of 0). Labels without any NUL, the usual case, are cleared by one search of
    their concatenation (a Python loop over a million labels took 80 ms, a quarter of
    ``log_loss``'s time)."""
    try:
        if "\0" not in "".join(values):
            return
    except TypeError:  # not all of them strings
        pass
    for v in values:
        if isinstance(v, str) and v.endswith("\0"):
            raise ValueError(f"label {v!r} ends in a NUL character; NumPy's str dtype "
                             "drops those, so it cannot be told from "
                             f"{v.rstrip(chr(0))!r}. Strip or replace the NULs.")


def _encode(y_true, labels, pending=None):
    """``(target, indicator, classes)``: class indices (n,), or a label indicator (n, C).

    Exactly one of ``target``/``indicator`` is not None. Errors and warnings are
    scikit-learn's (``LabelBinarizer`` as ``sklearn.metrics.log_loss`` uses it); a
    warning is appended to the list ``pending`` when one is given, else issued.
    """
    y = _as_labels(y_true)
    if hasattr(labels, "__array__") and not isinstance(labels, np.ndarray):
        labels = _to_numpy(labels)  # a tensor's == would not give NumPy's booleans
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
