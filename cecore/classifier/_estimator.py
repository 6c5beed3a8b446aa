"""A scikit-learn classifier trained through cecore's fused loss-and-gradient kernels.

Design: the estimator only validates, encodes labels and sets ``*_`` attributes. The
objective lives in :class:`_LinearObjective`, which asks the loss layer
(:func:`cecore.cross_entropy` or :func:`cecore.binary_cross_entropy_with_logits`) for
the per-sample losses and d loss / d logits in one pass, and turns them into a
gradient with two BLAS products. Fitting hands that objective to scipy's L-BFGS-B;
:meth:`SoftmaxClassifier.partial_fit` takes Adagrad steps on it instead.
"""

import numbers
import warnings

import numpy as np
import scipy.optimize
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_limits
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .. import _config
from ..functional import binary_cross_entropy_with_logits, cross_entropy, log_softmax, softmax

__all__ = ["SoftmaxClassifier"]

class _LinearObjective:
    """``f(w) = sum_i s_i l_i(w) / sum_i s_i + ||W||^2 / (2 C sum_i s_i)`` and its gradient.

    This is ``(C sum_i s_i l_i + ||W||^2 / 2) / (C sum_i s_i)``: the objective of
    scikit-learn's ``LogisticRegression`` scaled exactly as scikit-learn scales it for
    L-BFGS, so that ``tol`` means the same thing for both. ``l_i`` is the softmax
    cross-entropy (``n_outputs = n_classes >= 3``) or the binary logistic loss of the
    logit of ``classes_[1]`` (``n_outputs = 1``). The intercept is not penalised.

    The parameter vector is ``[W.ravel(), b]`` with ``W`` of shape
    (n_features, n_outputs), i.e. ``coef_.T``: then the gradient is ``X.T @ G``, with the
    long sample axis as BLAS wants it (``G.T @ X`` is several times slower for C-ordered
    arrays). Dense logits are computed as ``(W.T @ X.T).T``, which BLAS writes in Fortran
    order (measured 1.5x faster than ``X @ W``); the kernels read Fortran-ordered (n, C)
    logits without a copy. Both products go through NumPy's BLAS: alternating with
    SciPy's ``gemm`` (a second OpenBLAS with its own spinning thread pool) made each
    evaluation twice as slow.
    """

    def __init__(self, X, y_enc, sample_weight, C, n_outputs, fit_intercept,
                 backend, n_threads, penalty_weight=None):
        self.X = X
        self.n_features = X.shape[1]
        self.n_outputs = n_outputs
        self.fit_intercept = fit_intercept
        self.backend = backend
        self.n_threads = n_threads
        sw_sum = float(np.sum(sample_weight))
        # The chunk objectives of partial_fit weight the penalty by the running total
        # of sample weights instead of the chunk's own total.
        penalty_weight = sw_sum if penalty_weight is None else penalty_weight
        self.l2 = 1.0 / (C * penalty_weight)
        self.grad_scale = sample_weight / sw_sum
        if n_outputs == 1:
            self.target = y_enc.astype(X.dtype)
        else:
            self.target = y_enc

    @property
    def n_params(self):
        return (self.n_features + int(self.fit_intercept)) * self.n_outputs

    def unpack(self, params):
        """``(W, b)`` views of a parameter vector; ``b`` is None without intercept."""
        d, m = self.n_features, self.n_outputs
        W = params[: d * m].reshape(d, m)
        b = params[d * m:] if self.fit_intercept else None
        return W, b

    def loss_gradient(self, params):
        """Objective value and gradient at ``params`` (float64, shape (n_params,))."""
        W, b = self.unpack(params)
        W_x = W.astype(self.X.dtype, copy=False)
        if sp.issparse(self.X):
            logits = np.asarray(self.X @ W_x)
        else:
            logits = (W_x.T @ self.X.T).T
        if b is not None:
            logits += b.astype(self.X.dtype, copy=False)
        if self.n_outputs == 1:
            loss, g = binary_cross_entropy_with_logits(
                logits[:, 0], self.target, reduction="none", return_grad=True,
                grad_output=self.grad_scale, backend=self.backend, n_threads=self.n_threads)
            g = g[:, None]
        else:
            loss, g = cross_entropy(
                logits, self.target, reduction="none", return_grad=True,
                grad_output=self.grad_scale, backend=self.backend, n_threads=self.n_threads)
        value = float(np.dot(loss, self.grad_scale)) + 0.5 * self.l2 * float(np.vdot(W, W))
        grad = np.empty_like(params)
        grad_W, grad_b = self.unpack(grad)
        grad_W[...] = self.X.T @ g
        grad_W += self.l2 * W
        if grad_b is not None:
            grad_b[...] = g.sum(axis=0, dtype=np.float64)
        return value, grad


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
        Threads of the cecore kernels (BLAS uses its own setting).
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
        each L-BFGS iteration; for :meth:`partial_fit`, the chunk objective before each
        step. ``C * sum(s) * loss_curve_[-1]`` is the objective above.

    See Also
    --------
    sklearn.linear_model.LogisticRegression : the same model, with scikit-learn's loss code.
    """

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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # -- validation --------------------------------------------------------------------

    def _check_params(self):
        def positive(name, value, kind=numbers.Real):
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise ValueError(f"{name} must be a positive {kind.__name__.lower()}, got {value!r}")

        positive("C", self.C)
        positive("tol", self.tol)
        positive("max_iter", self.max_iter, numbers.Integral)
        positive("learning_rate", self.learning_rate)
        positive("batch_size", self.batch_size, numbers.Integral)
        if not (self.class_weight is None or self.class_weight == "balanced"
                or isinstance(self.class_weight, dict)):
            raise ValueError(
                f"class_weight must be None, 'balanced' or a dict, got {self.class_weight!r}")

    def _sample_weight(self, X, y, sample_weight):
        """``sample_weight * class_weight`` as float64 (a fresh array)."""
        sw = _check_sample_weight(sample_weight, X, dtype=np.float64, copy=True)
        if self.class_weight is not None:
            cw = compute_class_weight(self.class_weight, classes=self.classes_, y=y,
                                      sample_weight=sw)
            sw *= cw[np.searchsorted(self.classes_, y)]
        return sw

    def _objective(self, X, y_enc, sw, penalty_weight=None):
        n_outputs = 1 if len(self.classes_) == 2 else len(self.classes_)
        return _LinearObjective(X, y_enc, sw, self.C, n_outputs, self.fit_intercept,
                                self.backend, self.n_threads, penalty_weight)

    def _pack(self, objective):
        """The current ``coef_``/``intercept_`` as a parameter vector of ``objective``."""
        params = np.zeros(objective.n_params)
        W, b = objective.unpack(params)
        W[...] = self.coef_.T
        if b is not None:
            b[...] = self.intercept_
        return params

    def _unpack(self, objective, params):
        W, b = objective.unpack(params)
        self.coef_ = np.ascontiguousarray(W.T)
        self.intercept_ = b.copy() if b is not None else np.zeros(W.shape[1])

    # -- training ----------------------------------------------------------------------

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
        self._check_params()
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
        self.__dict__.pop("_adagrad_sum", None)  # a later partial_fit starts afresh
        sw = self._sample_weight(X, y, sample_weight)
        objective = self._objective(X, y_enc, sw)

        params = np.zeros(objective.n_params)
        if previous is not None and np.array_equal(previous[0], classes) \
                and previous[1].shape[1] == X.shape[1]:
            self.coef_, self.intercept_ = previous[1], previous[2]
            params = self._pack(objective)

        self.loss_curve_ = []
        serial = self.n_threads is None and \
            X.shape[0] * X.shape[1] * objective.n_outputs < _config.SERIAL_FIT_WORK
        if serial:
            objective.n_threads = 1
            with threadpool_limits(limits=1, user_api="blas"):
                result = self._minimize(objective, params)
        else:
            result = self._minimize(objective, params)
        if not result.success:
            warnings.warn(
                f"SoftmaxClassifier: L-BFGS failed to converge after {result.nit} "
                f"iteration(s) (status={result.status}): {result.message}. Increase "
                "max_iter or scale the data (e.g. with StandardScaler).",
                ConvergenceWarning)
        self.n_iter_ = int(result.nit)
        self._unpack(objective, result.x)
        return self

    def _minimize(self, objective, params):
        def record(intermediate_result):
            self.loss_curve_.append(float(intermediate_result.fun))
            if self.verbose:
                print(f"iteration {len(self.loss_curve_)}: objective {intermediate_result.fun:.10g}")

        # The options are scikit-learn's for lbfgs, so that both stop at the same point.
        return scipy.optimize.minimize(
            objective.loss_gradient, params, method="L-BFGS-B", jac=True, callback=record,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                     "ftol": 64 * np.finfo(float).eps})

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Adagrad steps on one chunk of a stream; multinomial for three classes or more.

        The stream is treated as one growing data set: after chunks ``1..t`` the target
        is :meth:`fit`'s solution on all of them. :meth:`fit`'s objective over chunks is
        the sum of the chunk objectives ``C * sum_{i in chunk} s_i l_i +
        (sum_chunk s / sum_all s) ||W||^2 / 2``; with ``sum_all s`` the running total of
        the weights seen so far, each chunk is cut into batches of ``batch_size`` rows and
        each batch takes one Adagrad step ``w -= learning_rate * g / sqrt(sum of past
        g**2)`` on its scaled objective ``sum_batch s_i l_i / sum_batch s +
        ||W||^2 / (2 C sum_seen s)`` (the scaling :meth:`fit` uses, whose gradient is
        O(1)). Batch gradients are unbiased estimates of the gradient of the scaled
        objective, and Adagrad's decaying steps converge towards its minimiser. Passing
        the same data again counts it again, as :meth:`fit` on the repeated rows would
        (i.e. ``C`` times the number of passes). First-order steps converge slowly on
        ill-conditioned problems: use :meth:`fit` when the data fit in memory.

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
        self._check_params()
        first_call = not hasattr(self, "_adagrad_sum")
        if first_call:
            if classes is None and not hasattr(self, "classes_"):
                raise ValueError("classes must be passed on the first call to partial_fit.")
            if classes is not None:
                classes = np.unique(np.asarray(classes))
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
        check_classification_targets(y)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y contains labels {unknown!r} not in classes_={self.classes_!r}")
        y_enc = np.searchsorted(self.classes_, y)
        if first_call:
            self._class_sw_seen = np.zeros(len(self.classes_))
        if self.class_weight == "balanced":
            # A chunk's class frequencies are not the stream's: weight by the running
            # (sample-weighted) class totals, which equal fit's after one pass.
            sw = _check_sample_weight(sample_weight, X, dtype=np.float64, copy=True)
            self._class_sw_seen += np.bincount(y_enc, weights=sw, minlength=len(self.classes_))
            seen = self._class_sw_seen
            with np.errstate(divide="ignore"):
                cw = seen.sum() / (np.count_nonzero(seen) * seen)
            sw *= cw[y_enc]
        else:
            sw = self._sample_weight(X, y, sample_weight)

        n_outputs = 1 if len(self.classes_) == 2 else len(self.classes_)
        if not hasattr(self, "coef_"):
            self.coef_ = np.zeros((n_outputs, X.shape[1]))
            self.intercept_ = np.zeros(n_outputs)
        if first_call:
            self._adagrad_sum = None
            self._sw_seen = 0.0
            self.n_iter_ = 0
            self.loss_curve_ = []
        self._sw_seen += float(sw.sum())
        for start in range(0, X.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            if not sw[rows].sum() > 0:
                continue
            objective = self._objective(X[rows], y_enc[rows], sw[rows], self._sw_seen)
            params = self._pack(objective)
            value, grad = objective.loss_gradient(params)
            if self._adagrad_sum is None:
                self._adagrad_sum = np.zeros_like(grad)
            self._adagrad_sum += grad * grad
            params -= self.learning_rate * grad / (np.sqrt(self._adagrad_sum) + 1e-12)
            self._unpack(objective, params)
            self.loss_curve_.append(value)
            self.n_iter_ += 1
        return self

    # -- prediction --------------------------------------------------------------------

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
        X = validate_data(self, X, accept_sparse="csr", dtype=[np.float64, np.float32],
                          reset=False)
        scores = np.asarray(X @ self.coef_.T.astype(X.dtype, copy=False))
        scores += self.intercept_.astype(X.dtype, copy=False)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def _class_logits(self, X):
        """One logit per class; for two classes ``[0, z]``, whose softmax is the sigmoid."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.column_stack([np.zeros_like(scores), scores])
        return scores

    def predict(self, X):
        """Most probable class of each sample.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        scores = self.decision_function(X)
        indices = (scores > 0).astype(np.intp) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[indices]

    def predict_proba(self, X):
        """Class probabilities: the softmax of the logits (the sigmoid for two classes).

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        return softmax(self._class_logits(X), axis=1, backend=self.backend,
                       n_threads=self.n_threads)

    def predict_log_proba(self, X):
        """Log-probabilities computed as ``logits - logsumexp(logits)``, never ``log(p)``.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return log_softmax(self._class_logits(X), axis=1, backend=self.backend,
                           n_threads=self.n_threads)
