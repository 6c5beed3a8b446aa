"""Cross-entropy scorers for scikit-learn's ``scoring=``."""

import numpy as np

from .. import _validation as V
from .._config import block_rows
from ._log_loss import _logits_loss, _on_numpy, _weighted_mean, log_loss

__all__ = ["make_cross_entropy_scorer", "neg_log_loss_scorer"]


class _CrossEntropyScorer:
    """Callable ``scorer(estimator, X, y, sample_weight=None)`` giving minus the mean loss.

    The estimator's ``classes_`` are the labels, so a test fold that misses a class
    scores normally (``sklearn.metrics.get_scorer('neg_log_loss')`` raises there).
    """

    def __init__(self, label_smoothing=0.0, from_logits=False, shared=False):
        self.label_smoothing = V.check_label_smoothing(label_smoothing)
        self.from_logits = bool(from_logits)
        self._sample_weight_request = None  # metadata routing: see set_score_request
        self._shared = shared  # the module's neg_log_loss_scorer: never changed

    def __repr__(self):
        if not self.label_smoothing and not self.from_logits:
            return "neg_log_loss_scorer"
        return (f"make_cross_entropy_scorer(label_smoothing={self.label_smoothing}, "
                f"from_logits={self.from_logits})")

    def __call__(self, estimator, X, y_true, sample_weight=None):
        classes = V._to_numpy(estimator.classes_)  # a tensor under array API dispatch
        if self.from_logits:
            logits = estimator.decision_function(X)
            if (len(classes) > 2 and _one_vs_one(estimator)) or (
                    np.ndim(logits) == 2 and np.shape(logits)[1] != len(classes)):
                # SVC(decision_function_shape='ovo'): one column per pair of classes, as
                # many as the classes when there are three (two classes: one margin, a logit)
                raise ValueError(
                    f"decision_function gives {np.shape(logits)[-1]} columns for "
                    f"{len(classes)} classes_ that are not logits of the classes (a "
                    "one-vs-one decision_function_shape?)")
            return -_logits_loss(y_true, logits, sample_weight, classes, True,
                                 self.label_smoothing)
        return self._score_proba(estimator.predict_proba(X), y_true, sample_weight, classes)

    @_on_numpy
    def _score_proba(self, proba, y_true, sample_weight, classes):
        proba = np.asarray(proba)
        # log_loss checks the probabilities (values, sums, shape) and the weights with
        # scikit-learn's errors and warnings; without smoothing it is the score.
        loss = log_loss(y_true, proba, sample_weight=sample_weight, labels=classes)
        if not self.label_smoothing:
            return -loss
        # Smoothed: (1 - eps) log_loss + eps * the mean over classes of -log p, both on the
        # probabilities as given (clipped as log_loss clips). Rows that do not sum to one
        # (log_loss warned) are not renormalised, so the score tends to -log_loss as eps
        # goes to 0; for rows that sum to one this is torch's smoothed cross-entropy.
        dtype = np.float64 if proba.dtype != np.float32 else np.float32
        if proba.ndim == 1 or proba.shape[1] == 1:  # P(classes_[1]), as log_loss reads it
            p1 = proba.reshape(-1).astype(dtype)  # 1 - p in the computation's type
            proba = np.column_stack([1 - p1, p1])
        eps = np.finfo(dtype).eps
        # a block of rows at a time: no copy of the N x C probabilities (each row's mean
        # is its own reduction, so the blocks change no bit)
        step = block_rows(8 * proba.shape[1])
        uniform = np.empty(proba.shape[0])
        for a in range(0, proba.shape[0], step):
            block = np.array(proba[a:a + step], dtype=dtype)
            np.clip(block, eps, 1 - eps, out=block)
            np.log(block, out=block)
            uniform[a:a + step] = -block.mean(axis=1, dtype=np.float64)
        return -((1 - self.label_smoothing) * loss +
                 self.label_smoothing * _weighted_mean(uniform, sample_weight, True))

    def set_score_request(self, *, sample_weight=None):
        """Request ``sample_weight`` under scikit-learn's metadata routing, as its own
        scorers' ``set_score_request`` does (``True``, ``False``, ``None`` or an alias; as
        theirs, a call without it resets the request). An invalid alias raises
        scikit-learn's ValueError here, not later inside a search.

        Without it, weights routed to a scorer raise scikit-learn's error that asks for
        this call, instead of being silently left out of the score.

        Returns the scorer itself, except on the shared :data:`neg_log_loss_scorer`,
        which returns a new scorer with the request and stays as it is (as
        ``sklearn.metrics.get_scorer`` hands out copies): a request made in one place
        would otherwise weight every later use of it in the process.
        """
        import sklearn
        from sklearn.utils.metadata_routing import MetadataRequest

        if not sklearn.get_config()["enable_metadata_routing"]:
            raise RuntimeError("This method is only available when metadata routing is "
                               "enabled: sklearn.set_config(enable_metadata_routing=True)")
        # scikit-learn's own check of the alias (a ValueError for 3, [1], "a b"...)
        MetadataRequest(owner=self).score.add_request(param="sample_weight", alias=sample_weight)
        scorer = _CrossEntropyScorer(self.label_smoothing, self.from_logits) if self._shared \
            else self
        scorer._sample_weight_request = sample_weight
        return scorer

    def get_metadata_routing(self):
        """The scorer's metadata request (see :meth:`set_score_request`)."""
        from sklearn.utils.metadata_routing import MetadataRequest

        request = MetadataRequest(owner=self)
        request.score.add_request(param="sample_weight", alias=self._sample_weight_request)
        return request


def _one_vs_one(estimator):
    """Whether ``decision_function`` gives one-vs-one margins: ``decision_function_shape``
    'ovo' on the estimator, or on what a fitted wrapper forwards ``decision_function``
    to: a pipeline's last step, a search's ``best_estimator_``, an ``estimator_``
    (nested ones too)."""
    while True:
        if hasattr(estimator, "steps"):
            estimator = estimator.steps[-1][1]
        elif hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        elif hasattr(estimator, "estimator_") and estimator.estimator_ is not estimator:
            estimator = estimator.estimator_
        else:
            return getattr(estimator, "decision_function_shape", None) == "ovo"


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
neg_log_loss_scorer = _CrossEntropyScorer(shared=True)
