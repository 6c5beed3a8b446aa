"""Solvers of a :class:`~cecore.classifier._objective.LinearObjective`.

:func:`lbfgs` minimises one objective (``fit``); :func:`adagrad_steps` takes stochastic
steps on the batch objectives of a stream (``partial_fit``), carrying everything from one
chunk to the next in one :class:`AdagradState`.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
from sklearn.exceptions import ConvergenceWarning

from .. import _config

__all__ = ["AdagradState", "adagrad_steps", "lbfgs"]


def lbfgs(objective, params, *, max_iter, tol, verbose):
    """Minimise ``objective`` from ``params`` with scipy's L-BFGS-B.

    Parameters
    ----------
    objective : LinearObjective
    params : ndarray of shape (objective.n_params,)
        Starting point.
    max_iter : int
    tol : float
        Bound on every component of the projected gradient at convergence.
    verbose : int
        Print the objective after each iteration when positive.

    Returns
    -------
    params : ndarray of shape (objective.n_params,)
    n_iter : int
    loss_curve : list of float
        The objective after each iteration.

    Warns
    -----
    ConvergenceWarning
        When L-BFGS stops before convergence.
    """
    loss_curve = []

    def record(intermediate_result):
        loss_curve.append(float(intermediate_result.fun))
        if verbose:
            print(f"iteration {len(loss_curve)}: objective {intermediate_result.fun:.10g}")

    # Every BLAS library on one thread for the whole solve: the objective runs BLAS
    # inside its own threads, and SciPy's OpenBLAS (which L-BFGS-B calls between
    # evaluations) would otherwise keep threads spinning on the cores the next
    # evaluation needs (benchmarks/bench_classifier.py times the fits).
    with _config.limit_blas(1):
        # The options are scikit-learn's for lbfgs, so that both stop at the same point.
        result = scipy.optimize.minimize(
            objective.loss_gradient, params, method="L-BFGS-B", jac=True, callback=record,
            options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                     "ftol": 64 * np.finfo(float).eps})
    if not result.success:
        warnings.warn(
            f"SoftmaxClassifier: L-BFGS failed to converge after {result.nit} "
            f"iteration(s) (status={result.status}): {result.message}. Increase "
            "max_iter or scale the data (e.g. with StandardScaler).",
            ConvergenceWarning)
    # SciPy takes one iteration with maxiter=0; scikit-learn reports min(nit, max_iter).
    return result.x, min(int(result.nit), max_iter), loss_curve


@dataclass
class AdagradState:
    """What ``partial_fit`` carries from one chunk of a stream to the next.

    Attributes
    ----------
    class_totals : ndarray of shape (n_classes,)
        Sums of the sample weights of each class so far (for ``class_weight='balanced'``).
    weight_seen : float
        Sum of the (class-weighted) sample weights so far: the penalty's weight.
    sum_sq_grad : ndarray of shape (n_params,) or None
        Sum of the squared gradients of all steps so far; None before the first step.
    """

    class_totals: np.ndarray
    weight_seen: float = 0.0
    sum_sq_grad: np.ndarray | None = None


def adagrad_steps(state, make_objective, X, y_enc, sample_weight, params, *, batch_size,
                  learning_rate):
    """Adagrad steps on one chunk of a stream, one per ``batch_size`` rows.

    Each batch takes the step ``w -= learning_rate * g / sqrt(sum of past g**2)`` with
    ``g`` the gradient of ``make_objective(X_b, y_b, s_b, penalty_weight=sum_seen s)``;
    batches of zero total weight are skipped.

    Parameters
    ----------
    state : AdagradState
        Updated in place.
    make_objective : callable
        ``make_objective(X, y_enc, sample_weight, penalty_weight=...)`` returns a
        :class:`~cecore.classifier._objective.LinearObjective` of the model.
    X, y_enc, sample_weight : the chunk
    params : ndarray
        Parameters before the chunk; not modified.
    batch_size : int
    learning_rate : float

    Returns
    -------
    params : ndarray
        Parameters after the chunk.
    losses : list of float
        The batch objective before each step.
    """
    params = params.copy()
    losses = []
    state.weight_seen += float(sample_weight.sum())
    for start in range(0, X.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        if not sample_weight[rows].sum() > 0:
            continue
        objective = make_objective(X[rows], y_enc[rows], sample_weight[rows],
                                   penalty_weight=state.weight_seen)
        value, grad = objective.loss_gradient(params)
        if state.sum_sq_grad is None:
            state.sum_sq_grad = np.zeros_like(grad)
        state.sum_sq_grad += grad * grad
        params -= learning_rate * grad / (np.sqrt(state.sum_sq_grad) + 1e-12)
        losses.append(value)
    return params, losses
