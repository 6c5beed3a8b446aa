"""The penalised objective of a linear classifier, evaluated through cecore's functional layer.

The solvers (:mod:`cecore.classifier._solvers`) only see a parameter vector, a value
and a gradient; the estimator only builds an objective and reads coefficients back.
"""

import numpy as np
import scipy.sparse as sp

from ..functional import binary_cross_entropy_with_logits, cross_entropy

__all__ = ["LinearObjective", "coef_intercept", "pack", "unpack"]


# The parameter vector is [W.ravel(), b] with W = coef.T of shape (n_features, n_outputs)
# (see LinearObjective for why); b, the intercept, only with fit_intercept.

def pack(coef, intercept, fit_intercept):
    """The parameter vector (float64) of ``coef`` (n_outputs, n_features) and ``intercept``."""
    parts = [coef.T.ravel()] + ([intercept] if fit_intercept else [])
    return np.concatenate(parts).astype(np.float64, copy=False)


def unpack(params, n_outputs, fit_intercept):
    """``(W, b)`` views of a parameter vector; ``b`` is None without intercept."""
    n_features = params.size // n_outputs - int(fit_intercept)
    W = params[: n_features * n_outputs].reshape(n_features, n_outputs)
    b = params[n_features * n_outputs:] if fit_intercept else None
    return W, b


def coef_intercept(params, n_outputs, fit_intercept):
    """``(coef, intercept)`` of a parameter vector as new arrays; zero intercept without one."""
    W, b = unpack(params, n_outputs, fit_intercept)
    return np.ascontiguousarray(W.T), (b.copy() if b is not None else np.zeros(n_outputs))


class LinearObjective:
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

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_samples, n_features), float32 or float64
        The logits and the kernels are computed in this dtype.
    y_enc : ndarray of shape (n_samples,)
        Class indices in ``[0, n_classes)``.
    sample_weight : ndarray of shape (n_samples,)
        ``s_i``, float64, with a positive sum.
    C : float
        Inverse regularisation strength.
    n_outputs : int
        1 for two classes (one logit per sample), else the number of classes.
    fit_intercept : bool
    backend : str
        cecore kernel backend.
    n_threads : int
        Threads of the kernels, already resolved by the caller: the objective never
        changes it.
    penalty_weight : float, optional
        The ``sum_i s_i`` of the penalty term; defaults to ``sum(sample_weight)``. The
        batch objectives of ``partial_fit`` pass the running total of the stream's
        weights instead of the batch's own.
    """

    def __init__(self, X, y_enc, sample_weight, C, n_outputs, *, fit_intercept, backend,
                 n_threads, penalty_weight=None):
        self.X = X
        self.n_features = X.shape[1]
        self.n_outputs = n_outputs
        self.fit_intercept = fit_intercept
        self.backend = backend
        self.n_threads = n_threads
        sw_sum = float(np.sum(sample_weight))
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
        return unpack(params, self.n_outputs, self.fit_intercept)

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
