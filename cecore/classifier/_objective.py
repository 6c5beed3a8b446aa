"""The penalised objective of a linear classifier, evaluated through cecore's functional layer.

The solvers (:mod:`cecore.classifier._solvers`) only see a parameter vector, a value
and a gradient; the estimator only builds an objective and reads coefficients back.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import scipy.sparse as sp

from .. import _config
from .._backends import get_backend
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
    (n_features, n_outputs), i.e. ``coef_.T``. Dense ``X`` is evaluated one row block at
    a time (see :meth:`_fused_pass`): a block's logits are ``W.T @ X_block.T``, which BLAS
    writes as Fortran-ordered (n, C) logits that the kernels read without a copy, and its
    gradient share is ``X_block.T @ G``. All products go through NumPy's BLAS: SciPy's
    ``gemm`` is a second OpenBLAS with its own thread pool.

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
        # 1 / (C * sum s), finite: for a C of 1e-320 (or subnormal weights) the product
        # underflows and the penalty was inf, whose gradient inf * 0 made NaN coefficients
        # in partial_fit (fit stopped at its start). 1e300 pins W at 0 all the same.
        denominator = C * penalty_weight
        self.l2 = 1.0 / denominator if denominator > 1e-300 else 1e300
        self.grad_scale = np.ascontiguousarray(sample_weight / sw_sum, dtype=np.float64)
        if n_outputs == 1:
            self.target = y_enc.astype(X.dtype)
        else:
            self.target = y_enc.astype(np.int64, copy=False)
        if not sp.issparse(X):
            self._lanes = _make_lanes(X, self.target, self.grad_scale, n_outputs)
            self.kernels = get_backend(backend)
            self.class_weight = np.ones(n_outputs)

    @property
    def n_params(self):
        return (self.n_features + int(self.fit_intercept)) * self.n_outputs

    def unpack(self, params):
        """``(W, b)`` views of a parameter vector; ``b`` is None without intercept."""
        return unpack(params, self.n_outputs, self.fit_intercept)

    def loss_gradient(self, params):
        """Objective value and gradient at ``params`` (float64, shape (n_params,))."""
        W, b = self.unpack(params)
        if sp.issparse(self.X):
            value, grad_W, grad_b = self._sparse_pass(W, b)
        else:
            value, grad_W, grad_b = self._fused_pass(W, b)
        value += 0.5 * self.l2 * float(np.vdot(W, W))
        grad = np.empty_like(params)
        gW, gb = self.unpack(grad)
        np.add(grad_W, self.l2 * W, out=gW)
        if gb is not None:
            gb[...] = grad_b
        return value, grad

    def _fused_pass(self, W, b):
        """Data term and its gradient, one pass over ``X`` in row blocks (dense ``X``).

        Each block's logits, loss, d loss / d logits (written over the logits) and its
        share of ``X.T @ G`` are computed while the block is in cache, so ``X`` is read from
        memory once per evaluation instead of once per product. The blocks are grouped in
        lanes, each summing its blocks in order into its own float64 accumulators; the
        lanes run on ``n_threads`` worker threads (BLAS on one thread inside each) and are
        added in lane order, so the result does not depend on the number of threads.
        """
        Wt = np.ascontiguousarray(W.T, dtype=self.X.dtype)  # (K, F)
        bx = None if b is None else b.astype(self.X.dtype)[:, None]
        run = partial(self._lane, Wt, bx)
        with _config.limit_blas(1):
            # Lanes are added in lane order. On one thread each lane's gradient is added
            # and dropped before the next lane runs; with a pool the caller collects them
            # all first (taking each as it came woke the caller once per lane). Each lane's
            # scratch lives only while it runs: kept per lane, scratch and gradients were
            # 2 * FIT_LANES copies of coef_ alive at once (tests/test_classifier.py counts
            # the copies with tracemalloc).
            if self.n_threads == 1 or len(self._lanes) == 1:
                parts = map(run, self._lanes)
            else:
                parts = iter(list(_worker_pool(self.n_threads).map(run, self._lanes)))
            value, grad_W, grad_b = next(parts)
            for v, gW, gb in parts:
                value += v
                grad_W += gW
                if gb is not None:
                    grad_b += gb
        return value, grad_W, grad_b

    def _lane(self, Wt, bx, lane):
        """``(value, grad_W, grad_b)`` of one lane's blocks: float64 sums in block order."""
        kernels, class_weight = self.kernels, self.class_weight
        grad_W = np.zeros((Wt.shape[1], Wt.shape[0]), np.float64)
        part = np.empty(grad_W.shape, Wt.dtype)  # X_block.T @ G, in the data's dtype
        grad_b = None if bx is None else np.zeros(Wt.shape[0], np.float64)
        for xT, target, scale, loss, logits, grad, ones in lane.blocks:
            np.matmul(Wt, xT, out=logits)  # (K, n): the (n, K) logits in Fortran order
            if bx is not None:
                logits += bx
            if grad is None:
                # Fortran-ordered (n, K) logits are the kernel's (1, K, n); the gradient is
                # written over them (the contract allows it without label smoothing).
                grad = logits
                kernels.softmax_ce_index(logits[None], target, class_weight, -100, 0.0,
                                         scale, loss, logits[None], 1)
            else:
                kernels.bce_logits(logits, target, ones, ones, scale, loss, grad, 1)
            np.matmul(xT, grad.T, out=part)
            grad_W += part
            if grad_b is not None:
                grad_b += grad.sum(axis=1, dtype=np.float64)
        return float(np.dot(lane.loss, lane.scale)), grad_W, grad_b

    def _sparse_pass(self, W, b):
        """Data term and its gradient for sparse ``X``: the logits of all rows at once."""
        logits = np.asarray(self.X @ W.astype(self.X.dtype, copy=False))
        if b is not None:
            logits += b.astype(self.X.dtype, copy=False)
        # the gradient overwrites the logits: one array of their size, not two
        if self.n_outputs == 1:
            loss, g = binary_cross_entropy_with_logits(
                logits[:, 0], self.target, reduction="none", grad_out=logits[:, 0],
                grad_output=self.grad_scale, backend=self.backend, n_threads=self.n_threads)
            g = g[:, None]
        else:
            loss, g = cross_entropy(
                logits, self.target, reduction="none", grad_out=logits,
                grad_output=self.grad_scale, backend=self.backend, n_threads=self.n_threads)
        value = float(np.dot(loss, self.grad_scale))
        return value, self.X.T @ g, g.sum(axis=0, dtype=np.float64)


class _Lane:
    """One lane's blocks: views of the data and buffers the lane reuses in every pass."""

    def __init__(self, X, target, grad_scale, n_outputs, rows, block_rows):
        n = rows.stop - rows.start
        self.loss = np.empty(n, np.float64)
        self.scale = grad_scale[rows]
        buf = np.empty(n_outputs * min(block_rows, n), X.dtype)
        binary = n_outputs == 1
        gbuf = np.empty(min(block_rows, n), X.dtype) if binary else None
        self.blocks = []
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            m = stop - start
            block = slice(rows.start + start, rows.start + stop)
            self.blocks.append((
                X[block].T,
                target[None, block],
                self.scale[None, start:stop],
                self.loss[None, start:stop],
                buf[: n_outputs * m].reshape(n_outputs, m),
                gbuf[None, :m] if binary else None,
                np.broadcast_to(np.float64(1.0), (1, m)),  # the binary loss's weights
            ))


def _make_lanes(X, target, grad_scale, n_outputs):
    """Row blocks of about ``FIT_BLOCK_BYTES``, grouped into at most ``FIT_LANES`` lanes.

    Both sizes depend on the data only, never on the threads, so neither do the sums.
    """
    n_samples, n_features = X.shape
    block_rows = max(_config.FIT_MIN_BLOCK_ROWS,
                     _config.FIT_BLOCK_BYTES // ((n_features + 2 * n_outputs) * X.dtype.itemsize))
    block_rows = min(block_rows, max(n_samples, 1))
    n_blocks = max(1, -(-n_samples // block_rows))
    n_lanes = min(_config.FIT_LANES, n_blocks)
    bounds = [min(n_blocks * k // n_lanes * block_rows, n_samples) for k in range(n_lanes + 1)]
    bounds[-1] = n_samples
    return [_Lane(X, target, grad_scale, n_outputs, range(lo, hi), block_rows)
            for lo, hi in zip(bounds, bounds[1:])]


_pools = {}
_pools_lock = threading.Lock()


def _worker_pool(n_threads):
    """The process's thread pool of ``n_threads`` workers, made once (again after ``fork``).

    Made once rather than per evaluation, which would start threads a hundred times per
    fit. Pools are shared by concurrent fits and never shut down: idle workers cost
    nothing, and there is at most one pool per thread count. (A fork child never gets
    here: it runs on one thread.)
    """
    key = (os.getpid(), n_threads)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(n_threads, thread_name_prefix="cecore-fit")
    return pool
