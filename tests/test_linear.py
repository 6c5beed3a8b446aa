"""cecore.linear_cross_entropy and LinearCrossEntropyLoss.

Oracles: torch's ``F.linear_cross_entropy`` with ``backward(grad_output)`` (the three
``.grad`` fields), cecore's own ``cross_entropy`` of the full logits ``x @ W.T + b`` (which
the chunked pass must reproduce), and float64 central finite differences.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import cecore
import cecore.linear
from oracle import assert_close, random_index_target

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float32, np.float64]
N, D, V = 36, 6, 13
CHUNKS = [None, 12, 7, 100]  # default, divides N, does not divide N, more than N


def _problem(rng, dtype, n=N, bias=True, p_ignore=0.0, ignore_index=-100):
    x = rng.standard_normal((n, D)).astype(dtype)
    w = (0.7 * rng.standard_normal((V, D))).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    t = random_index_target(rng, (n,), V, ignore_index, p_ignore)
    return x, w, b, t


def _grad_output(rng, reduction, shape):
    return rng.standard_normal(shape) if reduction == "none" else np.float64(rng.uniform(0.5, 2))


def _torch(x, w, b, t, grad_output=None, weight=None, **kw):
    """(loss, (grad_x, grad_w, grad_b)) from torch, computed in the input's dtype."""
    def leaf(a):
        return torch.from_numpy(np.array(a)).requires_grad_(True)
    xt, wt = leaf(x), leaf(w)
    bt = None if b is None else leaf(b)
    wcls = None if weight is None else torch.from_numpy(np.asarray(weight, x.dtype))
    loss = TF.linear_cross_entropy(xt, wt, torch.from_numpy(np.asarray(t)), linear_bias=bt,
                                   weight=wcls, **kw)
    g = torch.ones_like(loss) if grad_output is None else \
        torch.from_numpy(np.asarray(grad_output, x.dtype)).reshape(loss.shape)
    loss.backward(g)
    return (loss.detach().numpy(),
            (xt.grad.numpy(), wt.grad.numpy(), None if bt is None else bt.grad.numpy()))


def _via_cross_entropy(x, w, b, t, backend, grad_output=None, **kw):
    """The same quantities from cecore.cross_entropy of the full logits."""
    logits = x @ w.T if b is None else x @ w.T + b
    loss, g = cecore.cross_entropy(logits, t, return_grad=True, grad_output=grad_output,
                                   backend=backend, **kw)
    return loss, (g @ w, g.T @ x, None if b is None else g.sum(axis=0, dtype=np.float64))


def _check(actual, expected, dtype, rtol=None):
    (loss, grads), (e_loss, e_grads) = actual, expected
    assert np.asarray(loss).dtype == dtype
    assert_close(loss, e_loss, dtype, rtol=rtol)
    for got, want in zip(grads, e_grads):
        if want is None:
            assert got is None
        else:
            assert got.dtype == dtype
            assert_close(got, want, dtype, rtol=rtol)


OPTIONS = [
    {},
    {"label_smoothing": 0.2},
    {"weight": True},
    {"ignore_index": 2},
    {"bias": False, "weight": True, "ignore_index": -100, "label_smoothing": 0.1},
    {"weight": True, "ignore_index": 0, "label_smoothing": 1.0},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch_and_cross_entropy(backend, rng, dtype, reduction, options):
    options = dict(options)
    ignore_index = options.get("ignore_index", -100)
    x, w, b, t = _problem(rng, dtype, bias=options.pop("bias", True),
                          p_ignore=0.3 if "ignore_index" in options else 0.0,
                          ignore_index=ignore_index)
    if options.get("weight"):
        options["weight"] = rng.uniform(0.3, 3.0, V)
    g = _grad_output(rng, reduction, (N,))
    kw = dict(options, reduction=reduction)
    expected = _torch(x, w, b, t, grad_output=g, **kw)
    same = _via_cross_entropy(x, w, b, t, backend, grad_output=g, **kw)
    for chunk_size in CHUNKS:
        loss = cecore.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk_size,
                                           backend=backend, **kw)
        result = cecore.linear_cross_entropy(x, w, t, linear_bias=b, return_grad=True,
                                             grad_output=g, chunk_size=chunk_size,
                                             backend=backend, **kw)
        assert np.asarray(loss).tobytes() == np.asarray(result[0]).tobytes()
        _check(result, expected, dtype)
        # cross_entropy of the full logits: the same per-row losses and reduction.
        _check(result, same, dtype, rtol=1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, rng, reduction):
    x, w, b, _ = _problem(rng, np.float64, n=5)
    t = np.full(5, -100)
    expected = _torch(x, w, b, t, reduction=reduction)
    for chunk_size in (None, 2):
        result = cecore.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                             return_grad=True, chunk_size=chunk_size,
                                             backend=backend)
        _check(result, expected, np.float64)
    if reduction == "mean":
        assert np.isnan(result[0])  # 0 / 0, as torch


def test_shapes_unbatched_leading_dims_and_empty(backend, rng):
    x, w, b, t = _problem(rng, np.float64, n=12)
    # (D,) is one unbatched row, as in torch: scalar target, scalar 'none' loss.
    for reduction in REDUCTIONS:
        expected = _torch(x[3], w, b, t[3], reduction=reduction)
        result = cecore.linear_cross_entropy(x[3], w, t[3], linear_bias=b, reduction=reduction,
                                             return_grad=True, backend=backend)
        assert np.shape(result[0]) == () and result[1][0].shape == (D,)
        _check(result, expected, np.float64)
    # (..., D): torch takes only 2-D input; the leading dimensions are rows.
    x3, t3 = x.reshape(3, 4, D), t.reshape(3, 4)
    g = rng.standard_normal((3, 4))
    loss, grads = cecore.linear_cross_entropy(x3, w, t3, linear_bias=b, reduction="none",
                                              return_grad=True, grad_output=g, chunk_size=5,
                                              backend=backend)
    e_loss, e_grads = _torch(x, w, b, t, grad_output=g.reshape(-1), reduction="none")
    assert loss.shape == (3, 4) and grads[0].shape == (3, 4, D)
    _check((loss.reshape(-1), (grads[0].reshape(-1, D),) + grads[1:]), (e_loss, e_grads),
           np.float64)
    # No rows: torch's mean is NaN, its sum 0, its gradients zeros.
    for reduction in REDUCTIONS:
        expected = _torch(x[:0], w, b, t[:0], reduction=reduction)
        result = cecore.linear_cross_entropy(x[:0], w, t[:0], linear_bias=b,
                                             reduction=reduction, return_grad=True,
                                             backend=backend)
        _check(result, expected, np.float64)


def test_layouts_and_torch_tensors(backend, rng):
    x, w, b, t = _problem(rng, np.float64, n=20)
    expected = _torch(x, w, b, t)
    # Fortran-ordered input and weight, a strided weight (copied once), torch tensors.
    variants = [
        (np.asfortranarray(x), np.asfortranarray(w)),
        (x, np.repeat(w, 2, axis=0)[::2]),
        (torch.from_numpy(x), torch.from_numpy(w).requires_grad_(True)),
    ]
    for xv, wv in variants:
        result = cecore.linear_cross_entropy(xv, wv, t, linear_bias=b, return_grad=True,
                                             chunk_size=6, backend=backend)
        _check(result, expected, np.float64)


def test_float32_many_chunks_against_float64_torch(backend, rng, monkeypatch):
    # Large enough that grad_linear_weight is accumulated over many chunks in several
    # vocabulary blocks, and the bias gradient over many float32 column sums.
    n, d, v = 300, 24, 700
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = (0.3 * rng.standard_normal((v, d))).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32)
    t = random_index_target(rng, (n,), v, p_ignore=0.1)
    expected = _torch(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), t,
                      label_smoothing=0.1)
    monkeypatch.setattr(cecore._config, "LINEAR_ACCUMULATE_BYTES", 100 * d * 4)  # 100 rows
    result = cecore.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1,
                                         return_grad=True, chunk_size=32, backend=backend)
    _check(result, expected, np.float32)


def test_float32_bias_gradient_of_many_rows_is_summed_in_float64(backend, rng):
    # One chunk of 400000 rows and 10 classes: its column sums were a float32 BLAS
    # product (rows added one after another), 5.8e-5 relative error where torch's float32
    # cascade sum has 2e-8. Oracle: torch in float64.
    n, d, v = 400_000, 4, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((v, d)).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32)
    t = rng.integers(0, v, n)
    _, (_, _, grad_b) = cecore.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum",
                                                    return_grad=True, backend=backend)
    expected = _torch(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), t,
                      reduction="sum")[1][2]
    assert np.abs(grad_b - expected).max() <= 1e-6 * np.abs(expected).max()


def test_default_chunks_stay_within_the_memory_budget(backend, rng, monkeypatch):
    # N x V float32 logits would be 12 MB: the default chunks and the accumulation block
    # must fit a 2 MiB budget, so the call's peak NumPy memory is its outputs plus that.
    import tracemalloc

    n, d, v = 2000, 8, 1500
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((v, d)).astype(np.float32)
    t = rng.integers(0, v, n)
    monkeypatch.setattr(cecore._config, "LINEAR_CHUNK_BYTES", 2 << 20)
    monkeypatch.setattr(cecore._config, "LINEAR_ACCUMULATE_BYTES", 1 << 18)
    monkeypatch.setattr(cecore._config, "LINEAR_MIN_CHUNK_ROWS", 1)
    expected = cecore.cross_entropy(x @ w.T, t, backend=backend)
    tracemalloc.start()
    try:
        loss, grads = cecore.linear_cross_entropy(x, w, t, return_grad=True, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = sum(g.nbytes for g in grads if g is not None)
    # (slack: the O(N) per-row losses and targets, and NumPy's small temporaries)
    assert peak < outputs + (2 << 20) + (1 << 19), (peak, outputs)
    assert_close(loss, expected, np.float32, rtol=1e-6)


def test_non_finite_hidden_states_are_silent_and_match_torch(backend, rng):
    # NaN logits from an inf hidden state are answers (torch's); NumPy's "invalid value
    # in matmul" warnings leaked out of the internal products, and under
    # np.errstate(invalid="raise") the call failed with FloatingPointError (hostile review).
    x, w, b, t = _problem(rng, np.float64)
    x[3, 1] = np.inf
    w[0, 1] = 0.0  # inf * 0 in the product: the invalid operation NumPy reported
    x[5, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            result = cecore.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none",
                                                 return_grad=True, backend=backend)
    expected = _torch(x, w, b, t, reduction="none")
    assert_close(result[0], expected[0], np.float64)
    for got, want in zip(result[1], expected[1]):
        assert_close(got, want, np.float64)


def test_products_get_threads_by_their_work(monkeypatch, rng):
    # The kernel's small-work rule (one thread per 65536 logits) also limited BLAS: a
    # (256 x 20000) @ (20000 x 200) product ran on one thread (hostile review). Pretend
    # there are 8 CPUs and record the limits.
    from cecore import _config
    monkeypatch.setattr(_config, "default_n_threads", lambda: 8)
    monkeypatch.setattr(_config, "cpus_available", lambda: 8)
    seen = []
    limit = _config.limit_blas
    monkeypatch.setattr(_config, "limit_blas", lambda n: (seen.append(n), limit(1))[1])
    x = rng.standard_normal((256, 20000)).astype(np.float32)
    w = rng.standard_normal((200, 20000)).astype(np.float32)
    cecore.linear_cross_entropy(x, w, rng.integers(0, 200, 256), return_grad=True)
    assert seen == [8]
    seen.clear()  # small products stay on one thread
    cecore.linear_cross_entropy(x[:4, :10], w[:3, :10], np.zeros(4, int))
    assert seen == [1]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients_by_finite_differences(backend, rng, reduction):
    n, d, v = 7, 3, 5
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((v, d)), rng.standard_normal(v)
    t = rng.integers(0, v, n)
    t[2] = 1  # ignored below
    g = _grad_output(rng, reduction, (n,))
    kw = dict(weight=rng.uniform(0.5, 2.0, v), ignore_index=1, label_smoothing=0.2,
              reduction=reduction, chunk_size=3, backend=backend)
    _, grads = cecore.linear_cross_entropy(x, w, t, linear_bias=b, return_grad=True,
                                           grad_output=g, **kw)

    def objective(xx, ww, bb):
        return float(np.sum(g * cecore.linear_cross_entropy(xx, ww, t, linear_bias=bb, **kw)))

    h = 1e-6
    params = [x, w, b]
    for which, grad in enumerate(grads):
        expected = np.empty_like(grad)
        for i in np.ndindex(grad.shape):
            plus = [p.copy() for p in params]
            minus = [p.copy() for p in params]
            plus[which][i] += h
            minus[which][i] -= h
            expected[i] = (objective(*plus) - objective(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


X, W, B, T = (np.ones((4, 3)), np.ones((5, 3)), np.ones(5), np.array([0, 1, 4, 2]))

BAD = [
    # (arguments, keyword arguments, exception, message pattern)
    ((X, np.ones((5, 2)), T), {}, ValueError, r"has 3 features .* expects 2"),
    ((X, np.ones(5), T), {}, ValueError, r"linear_weight must have shape \(V, D\)"),
    ((X, np.ones((5, 2, 3)), T), {}, ValueError, r"linear_weight must have shape \(V, D\)"),
    ((X, W.astype(np.float32), T), {}, TypeError, r"same dtype"),
    ((X.astype(np.float16), W.astype(np.float16), T), {}, TypeError, r"float16"),
    # (one message for both: it named float16 among the accepted types for int64 input)
    ((X.astype(np.int64), W, T), {}, TypeError, r"input must be float32 or float64, got dtype int64"),
    ((X, W.astype(np.float16), T), {}, TypeError,
     r"linear_weight must be float32 or float64 .* float16"),
    ((np.float64(1.0), W, T), {}, ValueError, r"feature dimension"),
    ((X, W, T), {"linear_bias": np.ones(4)}, ValueError, r"linear_bias must have shape \(5,\)"),
    ((X, W, T), {"linear_bias": np.ones(5, np.float32)}, TypeError, r"linear_bias .* same dtype"),
    ((X, W, np.array([0, 1, 5, 2])), {}, IndexError, r"Target 5 is out of bounds"),
    ((X, W, np.array([0, -1, 4, 2])), {}, IndexError, r"Target -1 is out of bounds"),
    ((X, W, T[:3]), {}, ValueError, r"target of shape \(3,\) does not match input"),
    ((X, W, T.astype(np.float64)), {}, TypeError, r"class indices \(integers\)"),
    ((X, W, T), {"weight": np.ones(4)}, ValueError, r"weight.*all 5 classes"),
    ((X, W, T), {"reduction": "avg"}, ValueError, r"reduction"),
    ((X, W, T), {"label_smoothing": -0.1}, ValueError, r"label_smoothing"),
    ((X, W, T), {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    ((X, W, T), {"chunk_size": 0}, ValueError, r"chunk_size must be None or an int >= 1"),
    ((X, W, T), {"chunk_size": 2.5}, TypeError, r"chunk_size must be None or an int"),
    ((X, W, T), {"chunk_size": True}, TypeError, r"chunk_size must be None or an int"),
    ((X, W, T), {"return_grad": True, "grad_output": np.ones(4)}, ValueError, r"grad_output"),
    ((X, W, T), {"reduction": "none", "return_grad": True, "grad_output": np.ones(3)},
     ValueError, r"grad_output"),
    ((X, W, T), {"n_threads": 0}, ValueError, r"n_threads"),
    ((X, W, T), {"return_grad": True, "needs_grad": (True, False)}, TypeError, r"needs_grad"),
    ((X, W, T), {"return_grad": True, "needs_grad": "input"}, TypeError, r"needs_grad"),
    ((X, W, T), {"return_grad": True, "needs_grad": (1, 0, 0)}, TypeError, r"needs_grad"),
    ((X, W, T), {"backend": "fortran"}, ValueError, r"backend"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD)
def test_bad_input(backend, monkeypatch, args, kwargs, exc, match):
    kwargs = dict({"backend": backend}, **kwargs)

    def no_work(n_threads):
        raise AssertionError("products started before the input was checked")
    monkeypatch.setattr(cecore._config, "limit_blas", no_work)
    copies = [np.array(a, copy=True) for a in args]
    with pytest.raises(exc, match=match):
        cecore.linear_cross_entropy(*args, **kwargs)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)  # inputs untouched


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True),
                                   (False, False, True), (False, False, False)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_needs_grad_computes_only_the_gradients_asked_for(backend, rng, needs, reduction,
                                                          monkeypatch):
    # A frozen unembedding (fine-tuning below it) needs no grad_linear_weight: its product
    # is skipped, and the gradients that are computed are torch's.
    x, w, b, t = _problem(rng, np.float64, p_ignore=0.2)
    g = _grad_output(rng, reduction, (N,))
    products = []
    real_add = cecore.linear._add_weight_grad
    monkeypatch.setattr(cecore.linear, "_add_weight_grad",
                        lambda *a: products.append(1) or real_add(*a))
    loss, grads = cecore.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                              return_grad=True, grad_output=g, needs_grad=needs,
                                              chunk_size=7, backend=backend)
    e_loss, e_grads = _torch(x, w, b, t, grad_output=g, reduction=reduction)
    _check((loss, grads), (e_loss, tuple(e if n else None for e, n in zip(e_grads, needs))),
           np.float64)
    assert bool(products) == needs[1]  # grad_linear_weight accumulated over chunks or not
    # without a bias, its flag asks for nothing
    _, grads = cecore.linear_cross_entropy(x, w, t, return_grad=True, needs_grad=needs,
                                           backend=backend)
    assert grads[2] is None and (grads[0] is None) != needs[0]
    # needs_grad has no effect without return_grad
    assert cecore.linear_cross_entropy(x, w, t, needs_grad=needs, backend=backend) == \
        cecore.linear_cross_entropy(x, w, t, backend=backend)


def test_torch_rejects_the_same_shapes():
    # The shape errors above are errors for torch too.
    xt, tt = torch.ones(4, 3), torch.tensor([0, 1, 4, 2])
    for wt, bt in ((torch.ones(5, 2), None), (torch.ones(5, 3), torch.ones(4))):
        with pytest.raises(RuntimeError):
            TF.linear_cross_entropy(xt, wt, tt, linear_bias=bt)
    with pytest.raises(IndexError):
        TF.linear_cross_entropy(xt, torch.ones(5, 3), torch.tensor([0, 1, 5, 2]))


def test_loss_class(backend, rng):
    x, w, b, t = _problem(rng, np.float64, p_ignore=0.2, ignore_index=3)
    options = dict(weight=rng.uniform(0.5, 2, V), reduction="sum", ignore_index=3,
                   label_smoothing=0.1, chunk_size=5)
    criterion = cecore.LinearCrossEntropyLoss(backend=backend, **options)
    assert "chunk_size=5" in repr(criterion)
    expected = _torch(x, w, b, t, grad_output=1.5, **{k: v for k, v in options.items()
                                                       if k != "chunk_size"})
    assert_close(criterion(x, w, t, b), expected[0], np.float64)
    _check(criterion.loss_and_grad(x, w, t, b, grad_output=1.5), expected, np.float64)
    _, grads = criterion.loss_and_grad(x, w, t)
    assert grads[2] is None


@pytest.mark.parametrize("n_rows", [0, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_no_classes_give_torchs_answers(backend, n_rows, reduction, bias, eps):
    # A (0, D) unembedding was refused ("at least one row"); torch gives NaN / 0 / empty
    # losses and zero gradients when every target is ignored (and an IndexError else);
    # with label smoothing NaN losses (eps / V = inf times an empty sum), as cross_entropy.
    h = torch.randn(n_rows, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(0, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.full((n_rows,), -100)
    expected = TF.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction,
                                       label_smoothing=eps)
    grads = torch.autograd.grad(expected.sum(), [h, w] + ([b] if bias else []))
    loss, got = cecore.linear_cross_entropy(
        h.detach().numpy(), w.detach().numpy(), t.numpy(),
        linear_bias=None if b is None else b.detach().numpy(), reduction=reduction,
        label_smoothing=eps, return_grad=True, backend=backend)
    assert_close(np.asarray(loss), expected.detach().numpy(), np.float64)
    for ours, theirs in zip(got, grads):
        assert ours.shape == theirs.shape
        assert_close(ours, theirs.numpy(), np.float64)
    if n_rows:
        with pytest.raises(IndexError, match="out of bounds"):
            cecore.linear_cross_entropy(h.detach().numpy(), w.detach().numpy(),
                                        np.zeros(n_rows, int), backend=backend)
