"""The torch oracle and comparison helpers shared by the tests.

Every expected value in the suite is computed here by torch (float64, or float32 for
float32/float16 input) or by another independent oracle inside the test itself.
"""

import os

import numpy as np
import torch
import torch.nn.functional as TF

import cecore

# Both backends always: a backend that does not load fails its tests, it never skips.
BACKENDS = ["numba", "cython"]

def subprocess_env():
    """The environment for a child Python that must import this cecore (the checkout's,
    not an installed one): its folder first on PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(cecore.__file__))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))


RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


def _tensor(a, dtype=None):
    arr = np.asarray(a)
    if dtype is not None:
        arr = arr.astype(dtype)
    # np.array, not np.ascontiguousarray: the latter turns a 0-d array into shape (1,).
    return torch.from_numpy(np.array(arr, order="C", copy=True))


def _oracle_dtype(dtype):
    # float16 is computed in float32 by cecore, and so by the oracle.
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _run_torch(fn, x, grad_output, out_dtype):
    xt = _tensor(x, _oracle_dtype(x.dtype)).requires_grad_(True)
    loss = fn(xt)
    g = torch.ones_like(loss) if grad_output is None else _tensor(grad_output, _oracle_dtype(x.dtype))
    loss.backward(g.reshape(loss.shape))
    return (loss.detach().numpy().astype(out_dtype),
            xt.grad.numpy().astype(out_dtype))


def torch_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, grad_output=None):
    """(loss, grad) from torch.nn.functional.cross_entropy and backward()."""
    x = np.asarray(x)
    target = np.asarray(target)
    dt = _oracle_dtype(x.dtype)
    if target.shape == x.shape:
        tt = _tensor(target, dt)
    else:
        tt = _tensor(target, np.int64)
    wt = None if weight is None else _tensor(weight, dt)
    return _run_torch(
        lambda xt: TF.cross_entropy(xt, tt, weight=wt, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing),
        x, grad_output, x.dtype)


def torch_nll_loss(x, target, weight=None, ignore_index=-100, reduction="mean",
                   grad_output=None):
    x = np.asarray(x)
    dt = _oracle_dtype(x.dtype)
    tt = _tensor(target, np.int64)
    wt = None if weight is None else _tensor(weight, dt)
    return _run_torch(
        lambda xt: TF.nll_loss(xt, tt, weight=wt, ignore_index=ignore_index,
                               reduction=reduction),
        x, grad_output, x.dtype)


def torch_bce(x, target, weight=None, reduction="mean", pos_weight=None, grad_output=None):
    x = np.asarray(x)
    dt = _oracle_dtype(x.dtype)
    tt = _tensor(target, dt)
    wt = None if weight is None else _tensor(weight, dt)
    pt = None if pos_weight is None else _tensor(pos_weight, dt)
    return _run_torch(
        lambda xt: TF.binary_cross_entropy_with_logits(xt, tt, weight=wt, reduction=reduction,
                                                       pos_weight=pt),
        x, grad_output, x.dtype)


def assert_close(actual, expected, dtype=None, scale=None, rtol=None):
    """Compare to the oracle with the dtype's tolerance; NaNs must match NaNs.

    ``atol = rtol * scale`` (default scale: the largest finite magnitude of ``expected``,
    at least 1) absorbs cancellation in values much smaller than their inputs.
    """
    expected = np.asarray(expected)
    actual_arr = np.asarray(actual)
    if dtype is None:
        dtype = expected.dtype
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    if scale is None:
        finite = np.abs(expected[np.isfinite(expected)]).astype(np.float64)
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    assert actual_arr.shape == expected.shape, (actual_arr.shape, expected.shape)
    np.testing.assert_allclose(actual_arr.astype(np.float64), expected.astype(np.float64),
                               rtol=rtol, atol=rtol * scale, equal_nan=True)


def check_result(result, expected, dtype, scale=None):
    """``result`` = (loss, grad) from cecore, ``expected`` from torch: values and dtypes."""
    (loss, grad), (e_loss, e_grad) = result, expected
    assert np.asarray(loss).dtype == np.dtype(dtype)
    assert grad.dtype == np.dtype(dtype)
    assert_close(loss, e_loss, dtype, scale)
    assert_close(grad, e_grad, dtype, scale)


def random_index_target(rng, shape, n_classes, ignore_index=-100, p_ignore=0.0):
    t = rng.integers(0, n_classes, size=shape)
    if p_ignore:
        t = np.where(rng.random(shape) < p_ignore, ignore_index, t)
    return t


def random_proba_target(rng, shape, dtype=np.float64, class_axis=1):
    p = rng.random(shape) + 0.05
    return (p / p.sum(axis=class_axis, keepdims=True)).astype(dtype)

