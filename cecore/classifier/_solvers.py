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
    # SciPy takes one iteration with maxiter=0; scikit-learn reports min(nit, max_iter).
    n_iter = min(int(result.nit), max_iter)
    if not result.success:
        warnings.warn(
            f"SoftmaxClassifier: L-BFGS failed to converge after {n_iter} "
            f"iteration(s) (status={result.status}): {result.message}. Increase "
            "max_iter or scale the data (e.g. with StandardScaler).",
            ConvergenceWarning)
    return result.x, n_iter, loss_curve


@dataclass
class AdagradState:
    """What ``partial_fit`` carries from one chunk of a stream to the next.

    Attributes
    ----------
    class_totals : ndarray of shape (n_classes,)
        Sums of the sample weights of each class so far (for ``class_weight='balanced'``).
    weight_seen : float
        Sum of the (class-weighted) sample weights so far: the penalty's weight.
    rows_seen : int
        Rows of nonzero weight so far (``weight_seen / rows_seen`` is the mean weight of
        a row).
    grad_norm : ndarray of shape (n_params,) or None
        Square root of the sum of the squared gradients of all steps so far, accumulated
        with ``hypot`` (a sum of squares overflows from gradients of about 1e154, which
        a tiny ``C`` gives); None before the first step.
    params : ndarray of shape (n_params,) or None
        The parameters after the last step, in float64 (``coef_`` of float32 data is
        float32, which would round away the small late steps); None before it.
    """

    class_totals: np.ndarray
    weight_seen: float = 0.0
    rows_seen: int = 0
    grad_norm: np.ndarray | None = None
    params: np.ndarray | None = None


def adagrad_steps(state, make_objective, X, y_enc, sample_weight, params, *, batch_size,
                  learning_rate):
    """Adagrad steps on one chunk of a stream, one per ``batch_size`` rows.

    Each batch ``B`` takes the step ``w -= learning_rate * g / sqrt(sum of past g**2)``
    with ``g`` the gradient of its batch objective::

        f_B = sum_B s_i l_i / (batch_size * s_mean) + |B| / batch_size * ||W||^2 / (2 C S)

    where ``S`` is the total weight seen so far, ``s_mean = S / rows seen`` and ``|B|``
    the batch's rows, counting only rows of nonzero weight throughout. Over a
    pass over the data these gradients add up to ``n_rows / batch_size`` times the
    gradient of :class:`~cecore.classifier._objective.LinearObjective` on all of it, so a
    batch counts by its weight and its rows: a short last batch of a chunk, or a batch of
    light rows, takes a proportionally smaller step. (Each batch divided by its own
    weight sum gave every batch the same pull: weights that differed between batches
    cancelled out, and a one-row remainder counted as a full batch.) With equal weights
    and full batches ``f_B`` is the batch's mean loss plus the penalty. Batches of zero
    total weight take no step. Rows of weight zero count nowhere, as in ``fit``: counted,
    they scaled up the data term of every batch, and whole batches of them, which take no
    step and so no share of the penalty, weakened the penalty (by 2x for a chunk of half
    such rows at its end).

    Parameters
    ----------
    state : AdagradState
        Updated in place.
    make_objective : callable
        ``make_objective(X, y_enc, sample_weight, penalty_weight=...)`` returns a
        :class:`~cecore.classifier._objective.LinearObjective` of the model.
    X, y_enc, sample_weight : the chunk
    params : ndarray
        Parameters before the chunk (float64); not modified.
    batch_size : int
    learning_rate : float

    Returns
    -------
    params : ndarray
        Parameters after the chunk (also kept in ``state.params``).
    losses : list of float
        The batch objective ``f_B`` before each step.

    Raises
    ------
    ValueError
        When a step made a parameter infinite or NaN (``state`` is then partly updated:
        the caller restores it).
    """
    params = params.copy()
    losses = []
    state.weight_seen += float(sample_weight.sum())
    state.rows_seen += np.count_nonzero(sample_weight)
    for start in range(0, X.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        total, n_rows = float(sample_weight[rows].sum()), np.count_nonzero(sample_weight[rows])
        if not (total > 0 and state.weight_seen > 0):
            continue
        # LinearObjective's f = sum_B s l / total + ||W||^2 / (2 C P) times `scale` is f_B
        # when P = total / n_rows * rows_seen (1 and rows_seen for full, equal batches).
        scale = total * state.rows_seen / (batch_size * state.weight_seen)
        objective = make_objective(X[rows], y_enc[rows], sample_weight[rows],
                                   penalty_weight=total / n_rows * state.rows_seen)
        value, grad = objective.loss_gradient(params)
        value, grad = value * scale, grad * scale
        if state.grad_norm is None:
            state.grad_norm = np.zeros_like(grad)
        np.hypot(state.grad_norm, grad, out=state.grad_norm)
        # grad / norm first: at most 1 in size, so a huge learning rate cannot overflow it
        params -= learning_rate * (grad / (state.grad_norm + 1e-12))
        losses.append(value)
    if not np.isfinite(params).all():
        raise ValueError(
            f"partial_fit: the coefficients overflowed (learning_rate={learning_rate!r}); "
            "lower learning_rate or scale the data (e.g. with StandardScaler)")
    state.params = params
    return params, losses
