"""cecore's functional API and loss classes against torch (the semantic oracle).

Each test computes torch's loss and ``input.grad`` (after ``loss.backward(grad_output)``)
on the same data and compares, for both backends.
"""

import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cecore
from oracle import (
    assert_close, check_result, random_index_target, random_proba_target, torch_bce,
    torch_cross_entropy, torch_nll_loss,
)


def _peak_memory(call):
    """Peak NumPy memory (tracemalloc) of ``call()``, after a warm-up call (which may
    compile a Numba kernel)."""
    call()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_float16_softmax_is_computed_by_blocks(backend, rng, fn):
    # (review) float16 input made a float32 copy and a float32 output, 5 times the
    # input's bytes at the peak; now a block of samples at a time, the same bits
    f = getattr(cecore, fn)
    x = rng.standard_normal((200000, 100)).astype(np.float16)  # 10 blocks of samples
    x[::7, 3] = -np.inf
    for xx, axis in ((x, -1), (x.reshape(2000, 100, 100), 1)):
        expected = f(xx.astype(np.float32), axis=axis, backend=backend).astype(np.float16)
        result = f(xx, axis=axis, backend=backend)
        assert result.dtype == np.float16 and result.tobytes() == expected.tobytes()
        assert _peak_memory(lambda: f(xx, axis=axis, backend=backend)) < 1.5 * x.nbytes
    for empty in (np.empty((0, 5), np.float16), np.empty((0, 3, 4), np.float16)):
        for axis in (-1, 1):  # (review) x[0] of no rows raised IndexError
            assert f(empty, axis=axis, backend=backend).shape == empty.shape
    ref = getattr(torch, fn)(torch.tensor(x, dtype=torch.float32), dim=-1).numpy()
    np.testing.assert_allclose(f(x, backend=backend), ref.astype(np.float16), rtol=1e-3,
                               atol=1e-7)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_float16_gradient_overwrites_the_float32_copy(backend, rng, loss):
    # (review) the float32 copy of float16 input and a second float32 array for the
    # gradient: 5 times the input's bytes at the peak (7 for BCE, whose target is copied
    # too), where the copy can take the gradient (index targets without smoothing, BCE)
    x = rng.standard_normal((20000, 50)).astype(np.float16)
    if loss == "bce":
        y = (rng.random(x.shape) < 0.5).astype(np.float16)
        call = lambda: cecore.binary_cross_entropy_with_logits(
            x, y, reduction="sum", return_grad=True, backend=backend)
        copies = 2 + 2 + 1  # x and y in float32, the float16 gradient returned
        ref = torch_bce(x.astype(np.float32), y.astype(np.float32), reduction="sum")
    else:
        t = rng.integers(0, 50, 20000)
        call = lambda: cecore.cross_entropy(x, t, reduction="sum", return_grad=True,
                                            backend=backend)
        copies = 2 + 1
        ref = torch_cross_entropy(x.astype(np.float32), t, reduction="sum")
    assert _peak_memory(call) < (copies + 0.5) * x.nbytes
    grad = call()[1]  # (the float16 sum overflows to inf)
    assert grad.dtype == np.float16 and grad.shape == x.shape
    np.testing.assert_allclose(grad, ref[1], rtol=1e-3, atol=1e-7)


def _grad_output(rng, reduction, loss_shape):
    if reduction == "none":
        return rng.standard_normal(loss_shape)
    return np.float64(rng.uniform(0.5, 2.0))


# ------------------------------------------------------------- class-index targets
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5, 2), (4, 1), (6, 40)])
def test_cross_entropy_index(backend, rng, dtype, reduction, use_weight, label_smoothing, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    n_classes = shape[1]
    t_shape = shape[:1] + shape[2:]
    target = random_index_target(rng, t_shape, n_classes, ignore_index=-100, p_ignore=0.3)
    weight = rng.uniform(0.2, 3.0, n_classes) if use_weight else None
    g = _grad_output(rng, reduction, t_shape)
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    expected = torch_cross_entropy(x, target, grad_output=g, **kw)
    assert_close(cecore.cross_entropy(x, target, backend=backend, **kw), expected[0], dtype)
    result = cecore.cross_entropy(x, target, return_grad=True, grad_output=g,
                                  backend=backend, **kw)
    check_result(result, expected, dtype)


@pytest.mark.parametrize("ignore_index", [-100, 0, 2, -1])
def test_cross_entropy_ignore_index_values(backend, rng, ignore_index):
    x = rng.standard_normal((30, 4))
    target = random_index_target(rng, (30,), 4, ignore_index, p_ignore=0.3)
    for kw in (dict(), dict(label_smoothing=0.2, weight=rng.uniform(0.5, 2, 4))):
        expected = torch_cross_entropy(x, target, ignore_index=ignore_index, **kw)
        result = cecore.cross_entropy(x, target, ignore_index=ignore_index, return_grad=True,
                                      backend=backend, **kw)
        check_result(result, expected, np.float64)


def test_cross_entropy_unbatched(backend, rng):
    x = rng.standard_normal(6)
    for target in (np.int64(3), 3, np.array(5, dtype=np.int16)):
        for kw in (dict(), dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2, 6))):
            expected = torch_cross_entropy(x, target, **kw)
            result = cecore.cross_entropy(x, target, return_grad=True, backend=backend, **kw)
            check_result(result, expected, np.float64)
            assert np.shape(result[0]) == ()
    proba = random_proba_target(rng, (6,), class_axis=0)
    for reduction in REDUCTIONS:
        expected = torch_cross_entropy(x, proba, reduction=reduction)
        result = cecore.cross_entropy(x, proba, reduction=reduction, return_grad=True,
                                      backend=backend)
        check_result(result, expected, np.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(backend, rng, reduction):
    x = rng.standard_normal((5, 3, 2))
    target = np.full((5, 2), -100)
    for kw in (dict(), dict(label_smoothing=0.2), dict(weight=rng.uniform(0.5, 2, 3))):
        expected = torch_cross_entropy(x, target, reduction=reduction, **kw)
        result = cecore.cross_entropy(x, target, reduction=reduction, return_grad=True,
                                      backend=backend, **kw)
        check_result(result, expected, np.float64)
        nll_kw = {"weight": kw["weight"]} if "weight" in kw else {}
        expected = torch_nll_loss(x, target, reduction=reduction, **nll_kw)
        result = cecore.nll_loss(x, target, reduction=reduction, return_grad=True,
                                 backend=backend, **nll_kw)
        check_result(result, expected, np.float64)


def test_empty_batch(backend):
    x = np.zeros((0, 4))
    for reduction in REDUCTIONS:
        expected = torch_cross_entropy(x, np.zeros(0, np.int64), reduction=reduction)
        result = cecore.cross_entropy(x, np.zeros(0, np.int64), reduction=reduction,
                                      return_grad=True, backend=backend)
        check_result(result, expected, np.float64)


# ---------------------------------------------------------- class-probability targets
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 5), (5, 50)])
def test_cross_entropy_proba(backend, rng, dtype, reduction, use_weight, label_smoothing, shape):
    x = (2 * rng.standard_normal(shape)).astype(dtype)
    target = random_proba_target(rng, shape, dtype)
    weight = rng.uniform(0.2, 3.0, shape[1]) if use_weight else None
    g = _grad_output(rng, reduction, shape[:1] + shape[2:])
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    expected = torch_cross_entropy(x, target, grad_output=g, **kw)
    result = cecore.cross_entropy(x, target, return_grad=True, grad_output=g, backend=backend, **kw)
    check_result(result, expected, dtype)


def test_proba_targets_not_normalised_and_negative_ignore_index(backend, rng):
    # Probability targets need not sum to 1; a negative ignore_index is accepted.
    x = rng.standard_normal((4, 3))
    target = rng.random((4, 3)) * 3
    expected = torch_cross_entropy(x, target, ignore_index=-5)
    check_result(cecore.cross_entropy(x, target, ignore_index=-5, return_grad=True,
                                      backend=backend), expected, np.float64)


# ----------------------------------------------------------------------------- nll
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 2, 3), (5,)])
def test_nll_loss(backend, rng, reduction, shape):
    x = TF.log_softmax(torch.from_numpy(rng.standard_normal(shape)), dim=0 if len(shape) == 1 else 1).numpy()
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = random_index_target(rng, t_shape, n_classes, 1, p_ignore=0.3 if t_shape else 0)
    weight = rng.uniform(0.3, 2.0, n_classes)
    g = _grad_output(rng, reduction, t_shape)
    for kw in (dict(), dict(weight=weight), dict(weight=weight, ignore_index=1)):
        expected = torch_nll_loss(x, target, reduction=reduction, grad_output=g, **kw)
        result = cecore.nll_loss(x, target, reduction=reduction, return_grad=True,
                                 grad_output=g, backend=backend, **kw)
        check_result(result, expected, np.float64)
        assert_close(cecore.nll_loss(x, target, reduction=reduction, backend=backend, **kw),
                     expected[0])


def test_nll_of_log_softmax_is_cross_entropy(backend, rng):
    x = rng.standard_normal((10, 6))
    target = rng.integers(0, 6, 10)
    logp = cecore.log_softmax(x, backend=backend)
    assert_close(cecore.nll_loss(logp, target, backend=backend),
                 torch_cross_entropy(x, target)[0])


# ----------------------------------------------------------------------------- BCE
BCE_SHAPES = [((6, 4), (4,), (6, 4)), ((6, 4), (1,), (4,)), ((3, 2, 5), (5,), (2, 1)),
              ((7,), (), (7,)), ((), (), ())]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", BCE_SHAPES)
def test_bce_with_logits(backend, rng, dtype, reduction, shapes):
    shape, pw_shape, w_shape = shapes
    x = (4 * rng.standard_normal(shape)).astype(dtype)
    y = rng.random(shape).astype(dtype)
    g = _grad_output(rng, reduction, shape)
    for kw in (dict(), dict(pos_weight=rng.uniform(0.5, 5, pw_shape)),
               dict(weight=rng.uniform(0.5, 2, w_shape), pos_weight=rng.uniform(0.5, 5, pw_shape))):
        expected = torch_bce(x, y, reduction=reduction, grad_output=g, **kw)
        result = cecore.binary_cross_entropy_with_logits(
            x, y, reduction=reduction, return_grad=True, grad_output=g, backend=backend, **kw)
        check_result(result, expected, dtype)


@pytest.mark.parametrize("shape", [(1001, 13), (30000,), (2, 20000), (3, 1)])
def test_bce_reduced_in_the_kernel_equals_the_sum_of_none(backend, rng, shape):
    """'mean' and 'sum' are summed by the kernel, block by block of REDUCE_BLOCK positions
    (blocks that span rows, a 1-D input of several blocks, rows longer than a block): the
    result must be the exactly rounded sum of the 'none' losses to float64 precision,
    the same for any n_threads, and the gradient that of 'none' with the same scale."""
    x = 4 * rng.standard_normal(shape)
    y = rng.random(shape)
    w = rng.uniform(0.5, 2, shape[-1:])
    none = cecore.binary_cross_entropy_with_logits(x, y, weight=w, reduction="none",
                                                   backend=backend)
    total = math.fsum(none.ravel().tolist())
    for reduction, expected, scale in (("sum", total, 1.0), ("mean", total / x.size, 1 / x.size)):
        results = [cecore.binary_cross_entropy_with_logits(
            x, y, weight=w, reduction=reduction, return_grad=True, backend=backend,
            n_threads=n) for n in (1, 2)]
        (loss, grad), (loss2, grad2) = results
        assert loss == loss2
        np.testing.assert_array_equal(grad, grad2)
        assert abs(loss - expected) <= 1e-14 * abs(expected)
        _, grad_none = cecore.binary_cross_entropy_with_logits(
            x, y, weight=w, reduction="none", return_grad=True,
            grad_output=np.full(x.shape, scale), backend=backend)
        np.testing.assert_array_equal(grad, grad_none)
        assert_close(grad, torch_bce(x, y, weight=w, reduction=reduction)[1], np.float64)


def test_bce_mean_of_a_long_1d_input_allocates_no_elementwise_array(backend, rng):
    """A 1-D input is one long row: 'mean' used to take its elementwise float64 losses
    through a buffer of one whole row, twice the size of float32 logits."""
    x = rng.standard_normal(1 << 20).astype(np.float32)
    y = (x > 0).astype(np.float32)
    peak = _peak_memory(lambda: cecore.binary_cross_entropy_with_logits(x, y, backend=backend))
    assert peak < x.nbytes / 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_small_losses_keep_their_relative_accuracy(backend, dtype):
    """y = 0 and x << 0 (or y = 1 and x >> 0): the loss log1p(exp(-|x|)) is tiny next to
    |x|. Written as x + softplus(-x) it cancels to noise (torch's float32 answer is off by
    up to 100% there); cecore sums the exactly cancelling terms first. Oracle: log1p(exp)
    in float64, which has no cancellation. float32: about one ulp (1.1e-7 to 1.3e-7 in
    every build; 2.0e-7 with the 2 atanh(z / (2 + z)) series cecore used for log1p
    before); float64: 5.1e-16 in both backends (the oracle's own rounding included)."""
    x = np.concatenate([np.linspace(-60, -1e-3, 50001), np.linspace(1e-3, 60, 50001)])
    x = x.astype(dtype)
    y = (x > 0).astype(dtype)
    loss = cecore.binary_cross_entropy_with_logits(x, y, reduction="none", backend=backend)
    expected = np.log1p(np.exp(-np.abs(x.astype(np.float64))))
    rtol = 1.6e-7 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(loss, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_keeps_its_relative_accuracy_for_any_pos_weight(backend, dtype):
    """(review) float64 summed (1 - y) x + lw max(-x, 0) as two rounded products, which
    cancel for pos_weight 0 (lw = 1 - y): x = -1e20 gave a loss of -5329, x = -50 one of
    -1.1e-15 (exact: 1.7e-22). Oracle: the same loss as a sum of non-negative terms,
    (1 - y) softplus(x) + pw y softplus(-x), in float64 (np.logaddexp is exact to an ulp)."""
    x = np.concatenate([-np.logspace(-3, 20, 200), np.logspace(-3, 20, 200)]).astype(dtype)
    x, y = np.broadcast_arrays(x, np.linspace(0, 1, 9, dtype=dtype)[:, None])
    for pw in (0.0, 1e-3, 0.5, 1.0, 3.0):
        loss = cecore.binary_cross_entropy_with_logits(
            x, y, reduction="none", pos_weight=np.array(pw, dtype), backend=backend)
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        expected = (1 - y64) * np.logaddexp(0, x64) + pw * y64 * np.logaddexp(0, -x64)
        rtol = 1e-6 if dtype == np.float32 else 4e-15
        np.testing.assert_allclose(loss, expected, rtol=rtol, atol=np.finfo(dtype).tiny,
                                   err_msg=f"pw={pw}")  # (subnormal: absolute)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 3), (2, 4, 0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_empty_like_torch(backend, shape, reduction):
    # An empty last dimension made reshape(-1, 0) fail.
    x, y = np.zeros(shape), np.zeros(shape)
    kw = {"pos_weight": np.ones(shape[-1])}
    loss, grad = cecore.binary_cross_entropy_with_logits(
        x, y, reduction=reduction, return_grad=True, backend=backend, **kw)
    expected = torch_bce(x, y, reduction=reduction, **kw)
    np.testing.assert_array_equal(loss, expected[0])
    assert grad.shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_small_gradients_keep_their_relative_accuracy(backend, dtype):
    """y = 0 and x << 0 (or y = 1 and x >> 0): the gradient sigmoid(x) - y is tiny. As
    (1 - y) - sigmoid(-x) it cancelled to 0 from about |x| > 17 (float32) or 37 (float64);
    regrouped per sign of x it keeps its relative accuracy. Oracle: the float64 sigmoid
    written without cancellation for each sign."""
    top = 80 if dtype == np.float32 else 700
    x = np.concatenate([np.linspace(-top, -1, 501), np.linspace(1, top, 501)]).astype(dtype)
    y = (x > 0).astype(dtype)
    for pw in (1.0, 3.0):
        _, grad = cecore.binary_cross_entropy_with_logits(
            x, y, reduction="sum", pos_weight=np.full(x.shape, pw), return_grad=True,
            backend=backend)
        x64 = x.astype(np.float64)
        e = np.exp(-np.abs(x64))  # sigmoid(x) - y = e / (1 + e) for x < 0 (y = 0), and
        expected = np.where(x64 < 0, e, -pw * e) / (1 + e)  # -pw (1 - sigmoid(x)) for y = 1
        tiny = np.abs(expected) < np.finfo(dtype).tiny / np.finfo(dtype).eps
        rtol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(grad[~tiny], expected[~tiny], rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_extreme_logits(backend, dtype):
    # Infinite logits with every kind of target: torch's NaN where (1 - y) x and
    # pos_weight y max(-x, 0) are inf - inf or 0 inf, its inf elsewhere.
    x = np.array([-1000.0, -50.0, -1e-8, 0.0, 1e-8, 50.0, 1000.0, np.inf, -np.inf, np.nan,
                  np.inf, np.inf, -np.inf, -np.inf], dtype=dtype)
    y = np.array([0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.5],
                 dtype=dtype)
    pos_weight = np.full(x.size, 3.0, dtype=dtype)
    for reduction in ("none", "sum"):
        expected = torch_bce(x, y, reduction=reduction, pos_weight=pos_weight)
        result = cecore.binary_cross_entropy_with_logits(
            x, y, reduction=reduction, pos_weight=pos_weight, return_grad=True,
            backend=backend)
        check_result(result, expected, dtype)


# ------------------------------------------------------------ softmax family, perplexity
@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
@pytest.mark.parametrize("shape,axis", [((5, 7), -1), ((5, 7), 0), ((3, 4, 6), 1), ((2, 300, 3), 1),
                                        ((9,), 0), ((4, 2, 3, 5), -2)])
def test_softmax_family(backend, rng, dtype, shape, axis):
    x = (5 * rng.standard_normal(shape)).astype(dtype)
    xt = torch.from_numpy(x.astype(np.float32) if dtype == np.float16 else x)
    for fn, ref in ((cecore.softmax, torch.softmax), (cecore.log_softmax, torch.log_softmax),
                    (cecore.logsumexp, torch.logsumexp)):
        out = fn(x, axis=axis, backend=backend)
        assert out.dtype == dtype
        assert_close(out, ref(xt, axis).numpy().astype(dtype), dtype)


def test_softmax_extremes(backend):
    x = np.array([[0.0, 1e4, -1e4], [-np.inf, 0.0, 1.0], [np.nan, 0.0, 1.0],
                  [np.inf, 0.0, 1.0], [-np.inf, -np.inf, -np.inf], [800.0, 800.0, -800.0],
                  [np.inf, np.nan, 0.0], [0.0, np.nan, -np.inf], [np.inf, -np.inf, 0.0]])
    xt = torch.from_numpy(x)
    assert_close(cecore.softmax(x, backend=backend), torch.softmax(xt, 1).numpy())
    assert_close(cecore.log_softmax(x, backend=backend), torch.log_softmax(xt, 1).numpy())
    assert_close(cecore.logsumexp(x, backend=backend), torch.logsumexp(xt, 1).numpy())
    # the same rows through the K-dim (tiled) path
    x3 = np.repeat(x[:, :, None], 3, axis=2)
    xt3 = torch.from_numpy(x3)
    assert_close(cecore.softmax(x3, axis=1, backend=backend), torch.softmax(xt3, 1).numpy())
    assert_close(cecore.log_softmax(x3, axis=1, backend=backend),
                 torch.log_softmax(xt3, 1).numpy())
    assert_close(cecore.logsumexp(x3, axis=1, backend=backend), torch.logsumexp(xt3, 1).numpy())


@pytest.mark.parametrize("axis", [0, -1])
def test_softmax_family_of_a_scalar_as_torch(backend, axis):
    # torch takes a 0-d tensor as one class along dim 0 or -1; cecore raised ValueError
    for value in (3.0, -np.inf, np.nan):
        x = np.float64(value)
        for fn, ref in ((cecore.softmax, torch.softmax), (cecore.log_softmax, torch.log_softmax),
                        (cecore.logsumexp, torch.logsumexp)):
            out = fn(x, axis=axis, backend=backend)
            expected = ref(torch.tensor(value, dtype=torch.float64), axis).numpy()
            assert out.shape == () and out.dtype == np.float64
            assert_close(out, expected)
    with pytest.raises(ValueError, match="axis 1 is out of bounds"):
        cecore.softmax(np.float64(1.0), axis=1, backend=backend)


def test_no_numpy_warnings_where_torch_is_silent(backend, recwarn):
    # A -inf log-probability of a class of weight 0 (its loss -inf * 0 = NaN, as torch), and
    # float16 log-probabilities below -65504 (-inf, as torch): NumPy's RuntimeWarnings
    # leaked, errors for code run with warnings as errors.
    lp = np.array([[-np.inf, -0.7, -0.7], [-1.6, -1.2, -0.7]])
    t, w = np.array([0, 2]), np.array([0.0, 1.0, 1.0])
    loss = cecore.nll_loss(lp, t, weight=w, reduction="sum", backend=backend)
    expected = TF.nll_loss(torch.tensor(lp), torch.tensor(t), weight=torch.tensor(w),
                           reduction="sum").item()
    assert np.isnan(loss) and np.isnan(expected)
    x = np.array([60000, -60000], np.float16)
    out = cecore.log_softmax(x, backend=backend)
    assert_close(out, torch.log_softmax(torch.from_numpy(x).float(), 0).half().numpy(), np.float16)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], \
        [str(w.message) for w in recwarn]


def test_softmax_integer_input_is_float64(backend):
    x = np.arange(12).reshape(3, 4)
    out = cecore.log_softmax(x, backend=backend)
    assert out.dtype == np.float64
    assert_close(out, torch.log_softmax(torch.from_numpy(x).double(), 1).numpy())


def test_perplexity(backend, rng):
    x = rng.standard_normal((40, 11))
    target = random_index_target(rng, (40,), 11, -100, p_ignore=0.25)
    expected = torch.exp(TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(target))).item()
    result = cecore.perplexity(x, target, backend=backend)
    assert isinstance(result, float)
    assert_close(result, expected)
    target[target == -100] = 7
    expected = torch.exp(TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(target),
                                          ignore_index=7)).item()
    assert_close(cecore.perplexity(x, target, ignore_index=7, backend=backend), expected)


# ------------------------------------------------------------------ dtypes and inputs
@pytest.mark.parametrize("tdtype", [np.int8, np.int16, np.int32, np.int64, np.uint8,
                                    np.uint16, np.uint32, np.uint64])
def test_target_integer_dtypes(backend, rng, tdtype):
    x = rng.standard_normal((12, 5))
    target = rng.integers(0, 5, 12).astype(tdtype)
    expected = torch_cross_entropy(x, target.astype(np.int64), weight=np.arange(1, 6.0))
    check_result(cecore.cross_entropy(x, target, weight=np.arange(1, 6.0), return_grad=True,
                                      backend=backend), expected, np.float64)
    check_result(cecore.nll_loss(x, target, return_grad=True, backend=backend),
                 torch_nll_loss(x, target.astype(np.int64)), np.float64)
    if np.dtype(tdtype).kind == "i":  # ignore_index in a narrow signed dtype
        target[::3] = -100
        check_result(cecore.cross_entropy(x, target, return_grad=True, backend=backend),
                     torch_cross_entropy(x, target.astype(np.int64)), np.float64)


def test_float16_input_computed_in_float32(backend, rng):
    x = (3 * rng.standard_normal((20, 6))).astype(np.float16)
    target = rng.integers(0, 6, 20)
    loss, grad = cecore.cross_entropy(x, target, label_smoothing=0.1, return_grad=True,
                                      backend=backend)
    e_loss, e_grad = torch_cross_entropy(x.astype(np.float32), target, label_smoothing=0.1)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    # One float16 rounding of the float32 result: equal or one ulp apart.
    np.testing.assert_array_max_ulp(loss, e_loss.astype(np.float16), maxulp=1)
    np.testing.assert_array_max_ulp(grad, e_grad.astype(np.float16), maxulp=1)
    y = rng.random((20, 6)).astype(np.float16)
    loss, grad = cecore.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=backend)
    e_loss, e_grad = torch_bce(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_array_max_ulp(loss, e_loss.astype(np.float16), maxulp=1)
    np.testing.assert_array_max_ulp(grad, e_grad.astype(np.float16), maxulp=1)


def test_input_kinds(backend, rng, tmp_path):
    base = rng.standard_normal((9, 4))
    target = rng.integers(0, 4, 9)
    expected = torch_cross_entropy(base, target, label_smoothing=0.1)
    path = tmp_path / "x.npy"
    np.save(path, base)
    raw = np.memmap(tmp_path / "x.raw", dtype=np.float64, mode="w+", shape=base.shape)
    raw[:] = base
    raw.flush()
    readonly = base.copy()
    readonly.flags.writeable = False
    t_readonly = target.copy()
    t_readonly.flags.writeable = False
    inputs = {
        "list": (base.tolist(), target.tolist()),
        "readonly": (readonly, t_readonly),
        "np.load mmap": (np.load(path, mmap_mode="r"), target),
        "np.memmap r": (np.memmap(tmp_path / "x.raw", dtype=np.float64, mode="r",
                                  shape=base.shape), target),
        "torch": (torch.from_numpy(base), torch.from_numpy(target)),
        "torch requires_grad": (torch.from_numpy(base.copy()).requires_grad_(True),
                                torch.from_numpy(target)),
        "fortran": (np.asfortranarray(base), target),
        "strided": (np.repeat(base, 2, axis=0)[::2], np.repeat(target, 3)[::3]),
        "transposed": (np.ascontiguousarray(base.T).T, target),
    }
    for name, (x, t) in inputs.items():
        loss, grad = cecore.cross_entropy(x, t, label_smoothing=0.1, return_grad=True,
                                          backend=backend)
        check_result((loss, grad), expected, np.float64)
        assert type(grad) is np.ndarray, name


def test_class_weight_kinds(backend, rng):
    x = rng.standard_normal((9, 4))
    target = rng.integers(0, 4, 9)
    w = np.array([1, 2, 3, 4])
    expected = torch_cross_entropy(x, target, weight=w.astype(float))
    for weight in (w, w.tolist(), w.astype(np.float32), torch.from_numpy(w.astype(float))):
        check_result(cecore.cross_entropy(x, target, weight=weight, return_grad=True,
                                          backend=backend), expected, np.float64)


def test_zero_class_weights(backend, rng):
    # The targets all have weight 0: torch gives nan for 'mean'.
    x = rng.standard_normal((6, 3))
    target = np.array([0, 0, 1, 1, 0, 1])
    weight = np.array([0.0, 0.0, 2.0])
    for reduction in REDUCTIONS:
        # with label smoothing too: the smoothing terms are > 0, and their mean over a zero
        # weight sum was inf where torch gives nan (its NLL part is 0 / 0)
        for eps in (0.0, 0.1):
            expected = torch_cross_entropy(x, target, weight=weight, reduction=reduction,
                                           label_smoothing=eps)
            check_result(cecore.cross_entropy(x, target, weight=weight, reduction=reduction,
                                              label_smoothing=eps, return_grad=True,
                                              backend=backend), expected, np.float64)
    report = cecore.metrics.classification_report_from_logits(x, target, weight=weight,
                                                               label_smoothing=0.1,
                                                               backend=backend)
    assert np.isnan(report["loss"])


def test_nonfinite_logits(backend):
    inf, nan = np.inf, np.nan
    x = np.array([[nan, 0.0, 1.0], [inf, 0.0, 1.0], [-inf, 0.0, 1.0], [0.0, -inf, 1.0],
                  [-inf, -inf, -inf], [inf, inf, 0.0], [1e300, -1e300, 0.0], [0.5, 1.5, -0.5]])
    target = np.array([1, 2, 1, 1, 0, 2, 1, 0])
    x3 = np.repeat(x[:, :, None], 3, axis=2)  # the same rows through the K-dim path
    t3 = np.repeat(target[:, None], 3, axis=1)
    for xx, tt in ((x, target), (x3, t3), (x.astype(np.float32), target)):
        for kw in (dict(reduction="none"), dict(reduction="sum"),
                   dict(reduction="none", label_smoothing=0.2, weight=np.array([1.0, 2.0, 0.5]))):
            expected = torch_cross_entropy(xx, tt, **kw)
            result = cecore.cross_entropy(xx, tt, return_grad=True, backend=backend, **kw)
            check_result(result, expected, xx.dtype)
        proba = np.full(xx.shape, 1 / 3, dtype=xx.dtype)
        expected = torch_cross_entropy(xx, proba, reduction="none")
        check_result(cecore.cross_entropy(xx, proba, reduction="none", return_grad=True,
                                          backend=backend), expected, xx.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e6, 1e15, -1e15, 1e30])
def test_logits_of_large_magnitude(backend, rng, dtype, offset):
    # Logits a few ulps apart around a large offset (some rows all equal): the loss is
    # formed as (max - x_t) + log(sum), as torch forms it; max + log(sum) first rounded
    # log(sum) away (1.125 for log(3) at 1e15 in float32, 0 at 1e30).
    x = (dtype(offset) + np.spacing(dtype(offset)) * rng.integers(-3, 4, (8, 5))).astype(dtype)
    x[:2] = dtype(offset)
    target = rng.integers(0, 5, 8)
    x3, t3 = np.repeat(x[:, :, None], 3, axis=2), np.repeat(target[:, None], 3, axis=1)
    proba = random_proba_target(rng, x.shape, dtype)
    for xx, tt in ((x, target), (x3, t3), (x, proba)):
        for kw in (dict(reduction="none"), dict(reduction="mean", label_smoothing=0.2,
                                                  weight=rng.uniform(0.5, 2.0, 5))):
            expected = torch_cross_entropy(xx, tt, **kw)
            result = cecore.cross_entropy(xx, tt, return_grad=True, backend=backend, **kw)
            check_result(result, expected, dtype)
        xt = torch.from_numpy(xx)
        assert_close(cecore.log_softmax(xx, axis=1, backend=backend),
                     torch.log_softmax(xt, 1).numpy(), dtype)
        assert_close(cecore.logsumexp(xx, axis=1, backend=backend),
                     torch.logsumexp(xt.double(), 1).numpy(), dtype)
    report = cecore.metrics.classification_report_from_logits(x, target, backend=backend)
    assert_close(report["loss"], torch_cross_entropy(x, target)[0], dtype)


def test_saturated_rows_have_a_zero_target_gradient(backend):
    # p_t = 1 to float64 precision: the target's gradient gs * w_t * (p_t - 1) is below
    # 1e-40, and 0 in torch. Numba fused gs * w_t into the subtraction (an FMA) and gave
    # the product's rounding error, 1e-17, which linear_cross_entropy multiplies by the
    # activations.
    x = np.array([[100.0, 0.0, -5.0], [0.0, 200.0, 1.0], [3.0, -400.0, 1000.0]])
    t, w = np.array([0, 1, 2]), np.array([0.3, 1.7, 2.9])
    for xx, tt in ((x, t), (np.repeat(x[:, :, None], 2, axis=2), np.repeat(t[:, None], 2, axis=1))):
        _, e_grad = torch_cross_entropy(xx, tt, weight=w)
        for n_threads in (1, 2):
            _, grad = cecore.cross_entropy(xx, tt, weight=w, return_grad=True, backend=backend,
                                           n_threads=n_threads)
            np.testing.assert_allclose(grad, e_grad, rtol=1e-15, atol=1e-40)


@pytest.mark.parametrize("x_dtype,t_dtype", [(np.float32, np.float64), (np.float16, np.float32),
                                             (np.float16, np.float64)])
def test_wider_float_targets_promote_like_torch(backend, rng, x_dtype, t_dtype):
    # torch returns a loss of the wider dtype (the gradient keeps the input's dtype);
    # cecore computed in the input's dtype and returned a float32 loss. (torch's
    # log_softmax stays in float32 before the product with float64 probabilities, so
    # the oracle for the values is torch on float64 logits.)
    x = (2 * rng.standard_normal((6, 5))).astype(x_dtype)
    for fn, ref, target in ((cecore.cross_entropy, TF.cross_entropy,
                             random_proba_target(rng, x.shape, t_dtype)),
                            (cecore.binary_cross_entropy_with_logits,
                             TF.binary_cross_entropy_with_logits, rng.random(x.shape).astype(t_dtype))):
        if x_dtype != np.float16:
            assert ref(torch.from_numpy(x), torch.from_numpy(target)).numpy().dtype == t_dtype
        xg = torch.from_numpy(x.astype(t_dtype)).requires_grad_(True)
        expected = ref(xg, torch.from_numpy(target))
        expected.backward()
        for grad_out in (None, np.empty_like(x)):
            loss, grad = fn(x, target, return_grad=True, grad_out=grad_out, backend=backend)
            assert loss.dtype == t_dtype and grad.dtype == x_dtype
            assert grad_out is None or grad is grad_out
            assert_close(loss, expected.detach().numpy(), t_dtype)
            assert_close(grad, xg.grad.numpy().astype(x_dtype), x_dtype)


# -------------------------------------------------------------------------- classes
def test_loss_classes(backend, rng):
    x = rng.standard_normal((10, 4, 3))
    target = random_index_target(rng, (10, 3), 4, 2, p_ignore=0.2)
    weight = rng.uniform(0.5, 2.0, 4)
    g = rng.standard_normal((10, 3))
    ours = cecore.CrossEntropyLoss(weight=weight, ignore_index=2, reduction="none",
                                   label_smoothing=0.15, backend=backend, n_threads=2)
    theirs = nn.CrossEntropyLoss(weight=torch.from_numpy(weight), ignore_index=2,
                                 reduction="none", label_smoothing=0.15)
    xt = torch.from_numpy(x).requires_grad_(True)
    e_loss = theirs(xt, torch.from_numpy(target))
    e_loss.backward(torch.from_numpy(g))
    assert_close(ours(x, target), e_loss.detach().numpy())
    assert_close(ours.forward(x, target), e_loss.detach().numpy())
    check_result(ours.loss_and_grad(x, target, g), (e_loss.detach().numpy(), xt.grad.numpy()),
                 np.float64)

    logp = TF.log_softmax(torch.from_numpy(x), 1).numpy()
    ours = cecore.NLLLoss(weight=weight, ignore_index=2, backend=backend)
    theirs = nn.NLLLoss(weight=torch.from_numpy(weight), ignore_index=2)
    check_result(ours.loss_and_grad(logp, target), torch_nll_loss(logp, target, weight, 2),
                 np.float64)
    assert_close(ours(logp, target), theirs(torch.from_numpy(logp), torch.from_numpy(target)).numpy())

    y = rng.random((10, 4, 3))
    pw = rng.uniform(1, 4, 3)
    ours = cecore.BCEWithLogitsLoss(pos_weight=pw, reduction="sum", backend=backend)
    theirs = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pw), reduction="sum")
    assert_close(ours(x, y), theirs(torch.from_numpy(x), torch.from_numpy(y)).numpy())
    check_result(ours.loss_and_grad(x, y, 0.5), torch_bce(x, y, reduction="sum", pos_weight=pw,
                                                         grad_output=0.5), np.float64)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_reduction_arguments(backend, rng, size_average, reduce):
    x = rng.standard_normal((6, 3))
    target = rng.integers(0, 3, 6)
    y = rng.random((6, 3))
    with pytest.warns(UserWarning) if (size_average, reduce) != (None, None) else _nothing():
        pairs = [
            (cecore.CrossEntropyLoss(size_average=size_average, reduce=reduce, backend=backend),
             nn.CrossEntropyLoss(size_average=size_average, reduce=reduce), target),
            (cecore.NLLLoss(size_average=size_average, reduce=reduce, backend=backend),
             nn.NLLLoss(size_average=size_average, reduce=reduce), target),
            (cecore.BCEWithLogitsLoss(size_average=size_average, reduce=reduce, backend=backend),
             nn.BCEWithLogitsLoss(size_average=size_average, reduce=reduce), y),
        ]
    for ours, theirs, t in pairs:
        assert ours.reduction == theirs.reduction
        assert_close(ours(x, t), theirs(torch.from_numpy(x), torch.from_numpy(t)).numpy())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------ hypothesis
@st.composite
def ce_problems(draw):
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 7))
    spatial = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    unbatched = not spatial and draw(st.booleans())
    shape = (c,) if unbatched else (n, c) + spatial
    dtype = draw(st.sampled_from(DTYPES))
    proba = draw(st.booleans())
    options = dict(
        reduction=draw(st.sampled_from(REDUCTIONS)),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
    )
    if draw(st.booleans()):
        options["weight"] = np.array(draw(st.lists(st.floats(0.1, 4.0), min_size=c, max_size=c)))
    if not proba:
        options["ignore_index"] = draw(st.sampled_from([-100, 0, c - 1]))
    return shape, dtype, proba, options, draw(st.integers(0, 2 ** 32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=ce_problems())
def test_cross_entropy_hypothesis(backend, problem):
    shape, dtype, proba, options, seed = problem
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    class_axis = 0 if len(shape) == 1 else 1
    if proba:
        target = random_proba_target(rng, shape, dtype, class_axis)
        loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    else:
        loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        target = random_index_target(rng, loss_shape, shape[class_axis], options["ignore_index"],
                                     p_ignore=0.2)
    g = _grad_output(rng, options["reduction"], loss_shape)
    expected = torch_cross_entropy(x, target, grad_output=g, **options)
    result = cecore.cross_entropy(x, target, return_grad=True, grad_output=g, backend=backend,
                                  n_threads=2, **options)
    check_result(result, expected, dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), max_size=3).map(tuple),
       reduction=st.sampled_from(REDUCTIONS), use_w=st.booleans(), use_pw=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_bce_hypothesis(backend, shape, reduction, use_w, use_pw, seed):
    rng = np.random.default_rng(seed)
    x = 5 * rng.standard_normal(shape)
    y = rng.random(shape)
    # weight broadcasts from a random suffix of the shape with some dims set to 1
    w = rng.uniform(0.1, 3, tuple(d if rng.random() < 0.5 else 1 for d in shape[rng.integers(0, len(shape) + 1):])) if use_w else None
    pw = rng.uniform(0.1, 5, shape[-1:]) if use_pw else None
    g = _grad_output(rng, reduction, shape)
    expected = torch_bce(x, y, weight=w, reduction=reduction, pos_weight=pw, grad_output=g)
    result = cecore.binary_cross_entropy_with_logits(
        x, y, weight=w, reduction=reduction, pos_weight=pw, return_grad=True, grad_output=g,
        backend=backend)
    check_result(result, expected, np.float64)


@pytest.mark.parametrize("chunk", [7, 30, 1 << 18])
@pytest.mark.parametrize("shape", [(5, 3), (2, 20), (30,), (40, 1)])
def test_bce_none_in_chunks(backend, rng, monkeypatch, chunk, shape):
    """reduction='none' runs the kernel over chunks of positions (whole rows, or pieces of
    one row) through a reused float64 buffer, converting an array grad_output chunk by
    chunk: the loss and gradient are torch's, and the bits do not depend on the chunk."""
    import cecore.functional as F
    x = (4 * rng.standard_normal(shape)).astype(np.float32)
    y = rng.random(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    pw = rng.uniform(0.5, 2, shape[-1:])
    expected = cecore.binary_cross_entropy_with_logits(
        x, y, pos_weight=pw, reduction="none", grad_output=g, return_grad=True,
        backend=backend)
    monkeypatch.setattr(F, "BCE_CHUNK", chunk)
    result = cecore.binary_cross_entropy_with_logits(
        x, y, pos_weight=pw, reduction="none", grad_output=g, return_grad=True,
        backend=backend)
    for a, b in zip(result, expected):
        assert a.dtype == np.float32 and a.shape == shape
        np.testing.assert_array_equal(a, b)
    check_result(result, torch_bce(x, y, pos_weight=pw, reduction="none", grad_output=g),
                 np.float32)


def test_bce_none_allocates_the_result_and_gradient_only(backend, rng):
    """'none' used to make a float64 loss array (2x float32 logits) and cast it, and a
    float64 copy of an array grad_output: 6x the input with the gradient."""
    x = rng.standard_normal((2048, 1024)).astype(np.float32)
    y = (x > 0).astype(np.float32)
    g = np.ones_like(x)
    call = lambda: cecore.binary_cross_entropy_with_logits(  # noqa: E731
        x, y, reduction="none", grad_output=g, return_grad=True, backend=backend)
    peak = _peak_memory(call)
    assert peak < 2 * x.nbytes + (5 << 20)  # loss + gradient + two 2 MB buffers


@pytest.mark.parametrize("weights", ["none", "scalar pos_weight", "full weight",
                                     "column pos_weight"])
def test_bce_one_column_goes_to_the_kernel_as_one_row(backend, rng, monkeypatch, weights):
    """(N, 1) logits (a binary classifier's) with operands that can be viewed as one row
    go to the kernel as (1, N): its runs stop at the end of a row, so (N, 1) was one call
    of the vector loop per element. Checked against torch either way."""
    import cecore.functional as F
    n = 5000
    x = 4 * rng.standard_normal((n, 1))
    y = rng.random((n, 1))
    kw = {"none": {}, "scalar pos_weight": {"pos_weight": np.array([2.0])},
          "full weight": {"weight": rng.uniform(0.5, 2, (n, 1))},
          "column pos_weight": {"pos_weight": rng.uniform(0.5, 2, (n, 1))[::1]}}[weights]
    kernels = F.get_backend(backend)
    seen = []

    class Spy:
        def bce_logits(self, x, *args):
            seen.append(x.shape)
            return kernels.bce_logits(x, *args)

    monkeypatch.setattr(F, "get_backend", lambda name: Spy())
    result = cecore.binary_cross_entropy_with_logits(x, y, return_grad=True, **kw)
    assert seen == [(1, n)]
    check_result(result, torch_bce(x, y, **kw), np.float64)
    # 'none' with an array grad_output (converted chunk by chunk) too
    g = rng.standard_normal((n, 1)).astype(np.float32)
    seen.clear()
    result = cecore.binary_cross_entropy_with_logits(x, y, reduction="none", grad_output=g,
                                                     return_grad=True, **kw)
    assert seen == [(1, n)]
    check_result(result, torch_bce(x, y, reduction="none", grad_output=g, **kw), np.float64)


def test_nll_loss_of_float16_does_not_copy_the_input(rng):
    """The loss is a gather of N values: a float16 input used to be converted whole to
    float32 first (2x the input, and 1000x torch's time). Loss and gradient stay torch's."""
    x = rng.standard_normal((1024, 2048)).astype(np.float16)
    t = rng.integers(0, 2048, 1024)
    peak = _peak_memory(lambda: cecore.nll_loss(x, t))
    assert peak < x.nbytes / 16
    result = cecore.nll_loss(x, t, return_grad=True)
    assert result[1].dtype == np.float16
    check_result(result, torch_nll_loss(x, t), np.float16)


@pytest.mark.parametrize("shape", [(400000, 3), (2, 3, 200000)])
def test_nll_loss_temporaries_are_chunks(rng, shape):
    """The gathers and the gradient's scatter made about five temporaries of 8 bytes per
    position (a (1, 3, 715M) float32 input ran out of 24 GB where torch fits), and took
    4.6x torch's time at (2M, 3). Now chunks of positions: the extra memory is the
    gradient (and, for 'none', the loss) plus O(chunk). Values against torch, with ignored
    targets in some chunks only."""
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 3, (shape[0],) + shape[2:])
    t.reshape(-1)[:70000:7] = -100
    w = rng.random(3) + 0.5
    n_pos = t.size
    assert _peak_memory(lambda: cecore.nll_loss(x, t, weight=w)) < 4 << 20
    peak = _peak_memory(lambda: cecore.nll_loss(x, t, weight=w, return_grad=True))
    assert peak < x.nbytes + (4 << 20)
    peak = _peak_memory(lambda: cecore.nll_loss(x, t, reduction="none", return_grad=True))
    assert peak < x.nbytes + 4 * n_pos + (4 << 20)
    for reduction in ("mean", "sum", "none"):
        g = rng.standard_normal(t.shape) if reduction == "none" else None
        check_result(cecore.nll_loss(x, t, weight=w, reduction=reduction, grad_output=g,
                                     return_grad=True),
                     torch_nll_loss(x, t, weight=w, reduction=reduction, grad_output=g),
                     np.float32)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bce_fortran_input_is_not_copied(backend, rng, reduction):
    """A Fortran-ordered 2-D input and target (elementwise: any layout will do) were
    copied to C order; they are computed as their transposes, weights too, and the loss
    and gradient keep the input's layout, as torch's do."""
    x = np.asfortranarray(4 * rng.standard_normal((3000, 70)).astype(np.float32))
    y = np.asfortranarray(rng.random(x.shape).astype(np.float32))
    kw = dict(weight=rng.uniform(0.5, 2, 70), pos_weight=rng.uniform(0.5, 2, (3000, 1)))
    g = np.asfortranarray(rng.standard_normal(x.shape)) if reduction == "none" else None
    result = cecore.binary_cross_entropy_with_logits(
        x, y, reduction=reduction, grad_output=g, return_grad=True, backend=backend, **kw)
    check_result(result, torch_bce(x, y, reduction=reduction, grad_output=g, **kw), np.float32)
    assert result[1].flags.f_contiguous
    if reduction == "none":
        assert result[0].flags.f_contiguous
    peak = _peak_memory(lambda: cecore.binary_cross_entropy_with_logits(x, y, backend=backend))
    assert peak < x.nbytes / 8


@pytest.mark.parametrize("axis", [0, 1])
def test_softmax_family_of_a_fortran_array_reads_it_in_place(backend, rng, axis):
    """A Fortran-ordered 2-D array along axis 0 was copied whole to C order (along axis 1
    it was already read in place): both are its transpose's rows or columns."""
    x = np.asfortranarray(3 * rng.standard_normal((700, 300)).astype(np.float32))
    xt = torch.from_numpy(np.ascontiguousarray(x))
    for fn, ref in ((cecore.softmax, torch.softmax), (cecore.log_softmax, torch.log_softmax)):
        out = fn(x, axis=axis, backend=backend)
        assert out.flags.f_contiguous
        assert_close(out, ref(xt, axis).numpy(), np.float32)
    lse = cecore.logsumexp(x, axis=axis, backend=backend)
    assert_close(lse, torch.logsumexp(xt, axis).numpy(), np.float32)
    peak = _peak_memory(lambda: cecore.logsumexp(x, axis=axis, backend=backend))
    assert peak < x.nbytes / 8
