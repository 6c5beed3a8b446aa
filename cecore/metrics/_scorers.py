"""Cross-entropy scorers for scikit-learn's ``scoring=``."""

import numbers

import numpy as np

from ..functional import cross_entropy
from ._labels import _encode
from ._log_loss import _weighted_mean, log_loss

__all__ = ["make_cross_entropy_scorer", "neg_log_loss_scorer"]


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
        if sample_weight is not None:  # np.average's own error names no length
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != loss.shape:
                raise ValueError(f"sample_weight has shape {sample_weight.shape}, expected "
                                 f"{loss.shape} (one weight per sample)")
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
    if not isinstance(from_logits, (bool, np.bool_)):
        raise TypeError(f"from_logits must be a bool, got {type(from_logits).__name__}")
    return _CrossEntropyScorer(label_smoothing, bool(from_logits))


#: ``scoring=`` for minus :func:`log_loss` of ``predict_proba``, with ``labels=classes_``.
neg_log_loss_scorer = _CrossEntropyScorer()
