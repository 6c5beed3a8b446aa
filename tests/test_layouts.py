"""The input matrix: dtype x memory layout x read-only x n_threads, on both backends.

Each cell runs the index, probability and BCE paths (loss and gradient) and the softmax
family on the same values in a different layout, against torch on a contiguous copy.
"""

import numpy as np
import pytest
import torch

import cecore
from oracle import assert_close, check_result, torch_bce, torch_cross_entropy


def _layout(a, layout):
    """The values of ``a`` in the requested memory layout (never C-contiguous unless 'C')."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        out = np.asfortranarray(a)
        assert a.ndim < 2 or not out.flags.c_contiguous
        return out
    # every other element of a twice-as-long buffer along the first and last axes
    strided = (0, a.ndim - 1)
    big = np.zeros(tuple(2 * d if i in strided else d for i, d in enumerate(a.shape)),
                   dtype=a.dtype)
    view = big[tuple(slice(i == a.ndim - 1 and a.ndim > 1, None, 2) if i in strided
                     else slice(None) for i in range(a.ndim))]
    view[...] = a
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    return view


def _prepare(a, layout, readonly):
    out = _layout(a, layout)
    if readonly:
        out.flags.writeable = False
    return out


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 5), (23, 70), (3, 4, 5, 6)])
def test_layout_matrix(backend, rng, shape, dtype, layout, readonly, n_threads):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    n_classes = shape[1]
    t_shape = shape[:1] + shape[2:]
    target = rng.integers(0, n_classes, t_shape)
    target[rng.random(t_shape) < 0.2] = -100
    proba = rng.random(shape).astype(dtype)
    y = rng.random(shape).astype(dtype)
    weight = rng.uniform(0.5, 2.0, n_classes)
    g = rng.standard_normal(t_shape)
    common = dict(backend=backend, n_threads=n_threads, return_grad=True)

    xl = _prepare(x, layout, readonly)
    tl = _prepare(target, layout, readonly)
    pl = _prepare(proba, layout, readonly)
    yl = _prepare(y, layout, readonly)
    wl = _prepare(weight, layout, readonly)

    kw = dict(weight=weight, label_smoothing=0.1, reduction="none", grad_output=g)
    check_result(cecore.cross_entropy(xl, tl, **dict(kw, weight=wl), **common),
                 torch_cross_entropy(x, target, **kw), dtype)
    kw = dict(weight=weight, reduction="mean")
    check_result(cecore.cross_entropy(xl, tl, **dict(kw, weight=wl), **common),
                 torch_cross_entropy(x, target, **kw), dtype)
    check_result(cecore.cross_entropy(xl, pl, label_smoothing=0.2, **common),
                 torch_cross_entropy(x, proba, label_smoothing=0.2), dtype)
    pos_weight = rng.uniform(0.5, 3.0, shape[-1])
    check_result(cecore.binary_cross_entropy_with_logits(xl, yl, pos_weight=pos_weight,
                                                         reduction="sum", **common),
                 torch_bce(x, y, pos_weight=pos_weight, reduction="sum"), dtype)
    xt = torch.from_numpy(x)
    for fn, ref in ((cecore.log_softmax, torch.log_softmax), (cecore.softmax, torch.softmax),
                    (cecore.logsumexp, torch.logsumexp)):
        out = fn(xl, axis=1, backend=backend, n_threads=n_threads)
        assert out.dtype == dtype
        assert_close(out, ref(xt, 1).numpy(), dtype)
    if readonly:  # nothing was written to the caller's arrays
        assert not xl.flags.writeable


def test_inputs_are_not_modified(backend, rng):
    x = rng.standard_normal((20, 6))
    target = rng.integers(0, 6, 20)
    proba = rng.random((20, 6))
    copies = [a.copy() for a in (x, target, proba)]
    cecore.cross_entropy(x, target, return_grad=True, label_smoothing=0.3, backend=backend)
    cecore.cross_entropy(x, proba, return_grad=True, backend=backend)
    cecore.binary_cross_entropy_with_logits(x, proba, return_grad=True, backend=backend)
    cecore.softmax(x, backend=backend)
    for a, b in zip((x, target, proba), copies):
        np.testing.assert_array_equal(a, b)


def test_gradient_is_a_new_array(backend, rng):
    x = rng.standard_normal((8, 3))
    _, grad = cecore.cross_entropy(x, rng.integers(0, 3, 8), return_grad=True, backend=backend)
    assert not np.shares_memory(grad, x)
    assert grad.flags.writeable and grad.shape == x.shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_byte_swapped_inputs(backend, dtype):
    """Big-endian arrays (e.g. from a file written elsewhere) give torch's answer, as
    native-order arrays of the input's precision."""
    rng = np.random.default_rng(7)
    native = (3 * rng.standard_normal((40, 6))).astype(dtype)
    swapped = native.astype(native.dtype.newbyteorder(">"))
    target = rng.integers(0, 6, 40)
    result = cecore.cross_entropy(swapped, target.astype(">i8"), return_grad=True,
                                  backend=backend)
    check_result(result, torch_cross_entropy(native, target), native.dtype)
    proba = rng.random((40, 6)).astype(swapped.dtype)
    result = cecore.binary_cross_entropy_with_logits(swapped, proba, return_grad=True,
                                                     backend=backend)
    check_result(result, torch_bce(native, proba.astype(dtype)), native.dtype)
    assert_close(cecore.log_softmax(swapped, axis=1, backend=backend),
                 torch.log_softmax(torch.from_numpy(native), 1).numpy(), native.dtype)
