"""``SoftmaxClassifier``: a thin scikit-learn layer over cecore's fused kernels.

The estimator validates, encodes labels, weights samples, builds a
:class:`~cecore.classifier._objective.LinearObjective`, hands it to a solver of
:mod:`cecore.classifier._solvers` (L-BFGS for :meth:`~SoftmaxClassifier.fit`, Adagrad
for :meth:`~SoftmaxClassifier.partial_fit`) and sets the ``*_`` attributes.
"""

import copy
import warnings
from functools import partial
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import (Interval, InvalidParameterError, Options,
                                            StrOptions)
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .. import _config
from .._backends import BACKENDS
from .._validation import _on_numpy
from ..functional import _softmax_over
from ._objective import LinearObjective, coef_intercept, pack
from ._solvers import AdagradState, adagrad_steps, lbfgs

__all__ = ["SoftmaxClassifier"]


def _balanced_class_weight(class_totals):
    """``'balanced'`` class weights ``sum(class_totals) / (k * class_totals)``.

    ``class_totals`` holds the sample-weight sums of the classes. A class of total weight
    zero gets weight 0 and does not count in ``k``: its samples all weigh zero, so the
    weights are those of the data without them. (``compute_class_weight`` gives such a
    class an infinite weight, and ``0 * inf`` made the objective NaN.)
    """
    present = class_totals != 0
    weights = np.zeros_like(class_totals)
    weights[present] = class_totals.sum() / (np.count_nonzero(present) * class_totals[present])
    return weights


def _check_weight_sum(total, where):
    """The objective is the weighted mean loss plus a penalty scaled by the total weight
    (``1 / (C * total)``): a negative total turns the penalty into a reward, a zero one
    divides by zero, an infinite one (weights near the largest float) makes the mean
    loss NaN, and the model would be meaningless (it was pinned at 0 with only NumPy's
    warnings)."""
    if not 0 < total < np.inf:
        raise ValueError(
            f"the sample weights (times the class weights) sum to {total:g}{' ' + where if where else ''}: "
            "SoftmaxClassifier minimises their weighted mean loss, which needs a "
            "positive, finite sum (scale the weights down)")


def _sample_weight(sample_weight, X):
    """scikit-learn's checked float64 copy of the sample weights, refusing all-zero ones as
    scikit-learn >= 1.8 does itself (with 1.7, a chunk of zero weights was a partial_fit
    step on nothing)."""
    sw = _check_sample_weight(sample_weight, X, dtype=np.float64, copy=True)
    if sw.size and not sw.any():
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return sw


class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """L2-penalised multinomial logistic regression trained with cecore's fused kernels.

    Minimises the objective of scikit-learn's ``LogisticRegression`` with the same ``C``::

        C * sum_i s_i * l_i(W, b) + ||W||^2 / 2

    where ``s_i`` is ``sample_weight * class_weight`` and the intercept ``b`` is not
    penalised. With three classes or more ``l_i`` is the softmax cross-entropy of
    ``X_i @ coef_.T + intercept_``; with two it is the binary logistic loss of one logit
    per sample (``coef_`` of shape (1, n_features), as ``LogisticRegression``), computed
    by :func:`cecore.binary_cross_entropy_with_logits`. Each evaluation computes the
    logits with one BLAS product, the loss and d loss / d logits in one fused pass of the
    kernel, and the gradient with a second BLAS product; scipy's L-BFGS-B minimises it.

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularisation strength, as in ``LogisticRegression``.
    fit_intercept : bool, default=True
        Whether to fit an (unpenalised) intercept per output.
    class_weight : dict, 'balanced' or None, default=None
        Weights of the classes, multiplied into the sample weights; 'balanced' uses
        ``n_samples / (n_classes * np.bincount(y))`` (computed with the sample weights).
        A class whose samples all weigh zero is left out of 'balanced' (it gets weight 0
        and does not count in ``n_classes``), as if its samples were not in the data.
    max_iter : int, default=100
        Maximum number of L-BFGS iterations of :meth:`fit`.
    tol : float, default=1e-4
        L-BFGS stops when every component of the gradient of the scaled objective
        (the objective divided by ``C * sum(s)``) is at most ``tol``, as in scikit-learn.
    warm_start : bool, default=False
        Start :meth:`fit` from the previous solution when the classes and features match.
    verbose : int, default=0
        Print the objective at each iteration when positive.
    n_threads : int, optional
        Threads of a fit, resolved once per call to :meth:`fit` or :meth:`partial_fit`
        (-1: all CPUs). With dense ``X`` they split the rows, each thread running the
        products (BLAS on one thread) and the kernel of its own row blocks; with sparse
        ``X`` they run the kernels. With None, a fit whose products are small runs on
        one thread (:func:`cecore._config.fit_threads`).
    backend : {'auto', 'cython', 'numba'}, default='auto'
        cecore kernel backend.
    learning_rate : float, default=0.1
        Adagrad step size of :meth:`partial_fit` (unused by :meth:`fit`).
    batch_size : int, default=256
        :meth:`partial_fit` takes one Adagrad step per ``batch_size`` rows of each chunk.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) for two classes, else (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when ``X`` has string feature names.
    n_iter_ : int
        L-BFGS iterations of the last :meth:`fit`, or Adagrad steps taken by
        :meth:`partial_fit` so far.
    loss_curve_ : list of float
        The scaled objective (weighted mean loss plus ``||W||^2 / (2 C sum(s))``) after
        each L-BFGS iteration of the last :meth:`fit` (empty if it took none, e.g. a warm
        start at the optimum), where ``C * sum(s) * loss_curve_[-1]`` is the objective
        above; for :meth:`partial_fit`, the batch objective before each step.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the same model, with scikit-learn's loss code.
    """

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="right")],
        "fit_intercept": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        # As LogisticRegression's (0 iterations, tol 0: a grid may hold them)
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "n_threads": [None, Interval(Integral, 1, None, closed="left"), Options(Integral, {-1})],
        "backend": [StrOptions({"auto", *BACKENDS})],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, C=1.0, *, fit_intercept=True, class_weight=None, max_iter=100,
                 tol=1e-4, warm_start=False, verbose=0, n_threads=None, backend="auto",
                 learning_rate=0.1, batch_size=256):
        self.C = C
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.verbose = verbose
        self.n_threads = n_threads
        self.backend = backend
        self.learning_rate = learning_rate
        self.batch_size = batch_size

    def _validate_params(self):
        # Interval(Integral) takes a bool (True is 1), which cecore's n_threads refuses:
        # rejected here, as any other bad parameter, not later by the kernels' TypeError
        if isinstance(self.n_threads, bool):
            raise InvalidParameterError(
                f"The 'n_threads' parameter of {type(self).__name__} must be None, an int "
                f"in the range [1, inf) or -1, not a bool. Got {self.n_threads!r} instead.")
        super()._validate_params()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _n_outputs(self):
        return 1 if len(self.classes_) == 2 else len(self.classes_)

    def _class_weight(self, y, class_totals):
        """Weight of each class of ``classes_``; ``class_totals`` are its sample-weight sums."""
        if self.class_weight == "balanced":
            return _balanced_class_weight(class_totals)
        return compute_class_weight(self.class_weight, classes=self.classes_, y=y)

    def _objective_factory(self, n_threads):
        """``LinearObjective`` of this model, to be called with the data."""
        return partial(LinearObjective, C=self.C, n_outputs=self._n_outputs(),
                       fit_intercept=self.fit_intercept, backend=self.backend,
                       n_threads=n_threads)

    # -- training ----------------------------------------------------------------------

    @_on_numpy
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Minimise the penalised objective on ``(X, y)`` with L-BFGS-B.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            float32 input stays float32 in the kernels; sparse input is used as CSR.
        y : array-like of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : SoftmaxClassifier
        """
        return self._as_it_was_on_error(self._fit, X, y, sample_weight)

    def _fit(self, X, y, sample_weight):
        previous = (self.classes_, self.coef_, self.intercept_) if (
            self.warm_start and hasattr(self, "coef_")) else None
        X, y = validate_data(self, X, y, accept_sparse="csr",
                             dtype=[np.float64, np.float32], order="C")
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                "SoftmaxClassifier needs samples of at least 2 classes in the data, but the "
                f"data contains only one class: {classes[0]!r}")
        self.classes_ = classes
        self.__dict__.pop("_adagrad", None)  # a later partial_fit starts afresh
        sw = _sample_weight(sample_weight, X)
        if self.class_weight is not None:
            class_totals = np.bincount(y_enc, weights=sw, minlength=len(classes))
            sw *= self._class_weight(y, class_totals)[y_enc]
            if not sw.any():
                raise ValueError(
                    f"every sample weighs zero after class_weight={self.class_weight!r}: at "
                    "least one sample of a class of nonzero weight is needed")
        _check_weight_sum(float(sw.sum()), "")

        n_samples, n_features = X.shape
        n_outputs = self._n_outputs()
        # Dense X: the objective's threads run whole row blocks (products and kernel), so
        # they are worth it by the products' work; sparse X: by the kernel's logits.
        work = n_samples * n_features * n_outputs
        n_threads = _config.fit_threads(
            self.n_threads, n_samples * n_outputs if sp.issparse(X) else work, work)
        objective = self._objective_factory(n_threads)(X, y_enc, sw)
        params = np.zeros(objective.n_params)
        if previous is not None and np.array_equal(previous[0], classes) \
                and previous[1].shape[1] == n_features:
            params = pack(previous[1], previous[2], self.fit_intercept).astype(np.float64)

        params, self.n_iter_, self.loss_curve_ = lbfgs(
            objective, params, max_iter=self.max_iter, tol=self.tol, verbose=self.verbose)
        # In the data's dtype, as LogisticRegression stores them: predictions then follow
        # NumPy's promotion as its do (float32 data and model: float32 probabilities).
        self.coef_, self.intercept_ = (
            a.astype(X.dtype) for a in coef_intercept(params, n_outputs, self.fit_intercept))
        return self

    @_on_numpy
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Adagrad steps on one chunk of a stream; multinomial for three classes or more.

        The stream is treated as one growing data set: after chunks ``1..t`` the target
        is :meth:`fit`'s solution on all of them. Each chunk is cut into batches of
        ``batch_size`` rows, and each batch takes one Adagrad step ``w -= learning_rate *
        g / sqrt(sum of past g**2)``, ``g`` the gradient of its batch objective
        ``sum_batch s_i l_i / (batch_size * s_mean) + (rows / batch_size) ||W||^2 /
        (2 C S)`` with ``S`` the total weight seen so far and ``s_mean`` the mean weight
        of a row so far. Over a pass these gradients add up to a multiple of the gradient
        of :meth:`fit`'s scaled objective on all the data, so every row counts by its
        weight wherever it falls: a short last batch or a batch of light rows moves the
        model less. Adagrad's decaying steps converge towards the minimiser. Passing
        the same data again counts it again, as :meth:`fit` on the repeated rows would
        (i.e. ``C`` times the number of passes). First-order steps converge slowly on
        ill-conditioned problems: use :meth:`fit` when the data fit in memory. After
        :meth:`fit`, a stream starts from its coefficients with a fresh Adagrad state, whose
        first step moves every coefficient by about ``learning_rate``. ``coef_`` and
        ``intercept_`` are in the chunk's dtype, as :meth:`fit` stores them; the stream
        itself goes on from float64 parameters. Sample weights that sum to zero or a
        negative number over the stream so far, or steps that overflow the coefficients, raise a
        ``ValueError`` and leave the estimator as it was.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), optional
            All the classes of the stream; required on the first call.
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : SoftmaxClassifier
        """
        return self._as_it_was_on_error(self._partial_fit, X, y, classes, sample_weight)

    _FITTED_STATE = ("_adagrad", "classes_", "coef_", "intercept_", "n_iter_",
                     "n_features_in_", "feature_names_in_")

    def _as_it_was_on_error(self, method, *args):
        """``method(*args)``; if it raises, the estimator is left as it was before.

        Otherwise a failed call left a mix: a failed first partial_fit (say all-zero
        sample weights) zero coefficients that predicted, and classes that a corrected
        retry could not change; a failed fit the new ``classes_`` with the old ``coef_``.
        The copy is of O(coefficients) values (about 1 % of a partial_fit call on 256 x
        10000 rows); loss_curve_, which grows with every partial_fit, is only cut back.
        """
        saved = copy.deepcopy({name: self.__dict__[name] for name in self._FITTED_STATE
                               if name in self.__dict__})
        curve = getattr(self, "loss_curve_", None)
        curve_length = None if curve is None else len(curve)
        try:
            return method(*args)
        except BaseException:
            for name in self._FITTED_STATE + ("loss_curve_",):
                self.__dict__.pop(name, None)
            self.__dict__.update(saved)
            if curve is not None:
                del curve[curve_length:]
                self.loss_curve_ = curve
            raise

    def _partial_fit(self, X, y, classes, sample_weight):
        state = getattr(self, "_adagrad", None)
        first_call = state is None
        if first_call:
            if classes is None and not hasattr(self, "classes_"):
                raise ValueError("classes must be passed on the first call to partial_fit.")
            if classes is not None:
                classes = np.unique(np.asarray(classes))
                if classes.dtype.kind in "fc" and not np.isfinite(classes).all():
                    # y can never hold a NaN (validate_data refuses it): a class no row
                    # could have, as SGDClassifier refuses it
                    raise ValueError(f"classes contains NaN or infinity: {classes!r}")
                if len(classes) < 2:
                    raise ValueError(
                        f"partial_fit needs at least 2 classes, got classes={classes!r}")
                if hasattr(self, "classes_") and not np.array_equal(classes, self.classes_):
                    # a different problem than the last fit: start afresh
                    for name in ("coef_", "intercept_"):
                        self.__dict__.pop(name, None)
                self.classes_ = classes
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(
                f"classes={classes!r} is not the same as on the first call to partial_fit, "
                f"was: {self.classes_!r}")
        reset = first_call and not hasattr(self, "coef_")
        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32],
                             order="C", reset=reset)
        # check_classification_targets without its "more than 50% unique classes" warning,
        # which a short chunk of a stream of many classes sets off on every call
        # (scikit-learn < 1.8 gives it from type_of_target itself).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The number of unique classes is greater than",
                                    UserWarning)
            y_type = type_of_target(y, input_name="y")
        if y_type not in ("binary", "multiclass"):
            raise ValueError(
                f"Unknown label type: {y_type}. partial_fit expects discrete class labels "
                "(binary or multiclass)")
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y contains labels {unknown!r} not in classes_={self.classes_!r}")
        y_enc = np.searchsorted(self.classes_, y)
        n_outputs = self._n_outputs()
        if first_call:
            state = self._adagrad = AdagradState(class_totals=np.zeros(len(self.classes_)))
            self.n_iter_ = 0
            self.loss_curve_ = []
        if not hasattr(self, "coef_"):
            self.coef_ = np.zeros((n_outputs, X.shape[1]))
            self.intercept_ = np.zeros(n_outputs)

        sw = _sample_weight(sample_weight, X)
        # A chunk's class frequencies are not the stream's: 'balanced' weights come from
        # the running (sample-weighted) class totals, which equal fit's after one pass.
        state.class_totals += np.bincount(y_enc, weights=sw, minlength=len(self.classes_))
        if self.class_weight is not None:
            sw *= self._class_weight(y, state.class_totals)[y_enc]
        _check_weight_sum(state.weight_seen + float(sw.sum()), "so far in the stream")

        n_params = (X.shape[1] + int(self.fit_intercept)) * n_outputs
        if state.grad_norm is not None and state.grad_norm.shape[0] != n_params:
            raise ValueError(
                f"fit_intercept changed to {self.fit_intercept} since the first call to "
                "partial_fit: a stream keeps its parameters. Restart it on a new "
                "estimator (sklearn.base.clone) or call fit.")
        n_threads = _config.resolve_n_threads(
            self.n_threads, min(self.batch_size, X.shape[0]) * n_outputs)
        params = state.params if state.params is not None else pack(
            self.coef_, self.intercept_, self.fit_intercept).astype(np.float64)
        params, losses = adagrad_steps(
            state, self._objective_factory(n_threads), X, y_enc, sw, params,
            batch_size=self.batch_size, learning_rate=self.learning_rate)
        # In the data's dtype, as fit stores them; the stream goes on from state.params.
        self.coef_, self.intercept_ = (
            a.astype(X.dtype) for a in coef_intercept(params, n_outputs, self.fit_intercept))
        self.loss_curve_ += losses
        self.n_iter_ += len(losses)
        return self

    # -- prediction --------------------------------------------------------------------

    @_on_numpy
    def decision_function(self, X):
        """Logits ``X @ coef_.T + intercept_``: shape (n_samples,) for two classes.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
            For two classes, the logit of ``classes_[1]``.
        """
        check_is_fitted(self)
        # X in its own numeric dtype, then NumPy's promotion, as LogisticRegression: float16
        # or int8 data on a float32 model give float32 scores (the coefficients are float32
        # or float64, so the scores are too)
        X = validate_data(self, X, accept_sparse="csr", dtype="numeric", reset=False)
        scores = np.asarray(X @ self.coef_.T)
        scores += self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def _class_logits(self, X):
        """One logit per class; for two classes ``[0, z]``, whose softmax is the sigmoid."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            # z = +inf (X @ coef_ overflowed): the softmax of [0, inf] is inf - inf = NaN,
            # where the sigmoid is 1. The largest float gives [0, 1]; NaN stays NaN.
            logits = np.zeros((scores.shape[0], 2), dtype=scores.dtype)
            np.minimum(scores, np.finfo(scores.dtype).max, out=logits[:, 1])
            return logits
        return scores

    @_on_numpy
    def predict(self, X):
        """Most probable class of each sample.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        scores = self.decision_function(X)
        indices = (scores > 0).astype(np.intp) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[indices]

    @_on_numpy
    def predict_proba(self, X):
        """Class probabilities: the softmax of the logits (the sigmoid for two classes).

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        # over the scores, which are this call's own: one (n_samples, n_classes) array
        return _softmax_over(self._class_logits(X), False, self.backend, self.n_threads)

    @_on_numpy
    def predict_log_proba(self, X):
        """Log-probabilities computed as ``logits - logsumexp(logits)``, never ``log(p)``.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return _softmax_over(self._class_logits(X), True, self.backend, self.n_threads)

    # (the mean accuracy of NumPy predictions, also under array API dispatch, where the
    # inherited method compared a tensor with them)
    score = _on_numpy(ClassifierMixin.score)
