"""Bad input: wherever torch raises, cecore raises a ValueError/IndexError/TypeError that
says what is wrong. Each case first checks that torch rejects the same input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import cecore
from cecore.metrics import classification_report_from_logits

X = np.random.default_rng(0).standard_normal((4, 3))
T = np.array([0, 1, 2, 1])
P = np.full((4, 3), 1 / 3)


def _t(a):
    return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a


def _torch(name):
    fn = {"cross_entropy": TF.cross_entropy, "nll_loss": TF.nll_loss,
          "binary_cross_entropy_with_logits": TF.binary_cross_entropy_with_logits}[name]

    def call(x, t, **kw):
        return fn(_t(x), _t(t), **{k: _t(v) for k, v in kw.items()})
    return call


CASES = [
    # (function, input, target, kwargs, exception, message pattern)
    ("cross_entropy", X, np.array([0, 1, 3, 1]), {}, IndexError, r"Target 3 is out of bounds"),
    ("cross_entropy", X, np.array([0, -1, 2, 1]), {}, IndexError, r"Target -1 is out of bounds"),
    ("cross_entropy", X, np.array([0, 1, 2, 1]), {"ignore_index": 1, "weight": np.ones(3)},
     None, None),  # sanity: a valid call
    ("cross_entropy", X, np.array([0, 1, 2]), {}, ValueError, r"batch_size \(4\).*batch_size \(3\)"),
    ("cross_entropy", np.zeros((2, 3, 4)), np.zeros((2, 5), np.int64), {}, ValueError,
     r"spatial shape"),
    ("cross_entropy", np.zeros((2, 3, 4)), np.zeros((2,), np.int64), {}, ValueError,
     r"target of shape \(2,\) does not match input of shape \(2, 3, 4\)"),
    ("cross_entropy", X, np.zeros((4, 2), np.int64), {}, ValueError, r"does not match input"),
    ("cross_entropy", np.zeros(3), np.array([0, 1]), {}, ValueError, r"unbatched"),
    ("cross_entropy", X, T.astype(np.float64), {}, TypeError, r"class-index targets must be integers"),
    ("cross_entropy", X, np.ones((4, 3), np.int64), {}, TypeError, r"probabilities and must be floating"),
    ("cross_entropy", X, T, {"weight": np.ones(4)}, ValueError, r"weight.*all 3 classes"),
    ("cross_entropy", X, T, {"weight": np.ones((1, 3))}, ValueError, r"weight.*all 3 classes"),
    ("cross_entropy", X, P, {"ignore_index": 0}, ValueError, r"ignore_index is not supported"),
    ("cross_entropy", X, T, {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be between"),
    ("cross_entropy", X, T, {"reduction": "avg"}, ValueError, r"'avg' is not a valid value for reduction"),
    # not truncated to 1 (the kernels ignored class 1, the mean's denominator nothing)
    ("cross_entropy", X, T, {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    ("cross_entropy", X, T, {"label_smoothing": "0.1"}, TypeError, r"label_smoothing must be a float"),
    ("nll_loss", X, T, {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    ("cross_entropy", X.astype(np.int64), T, {}, TypeError, r"input must be a floating point"),
    ("cross_entropy", np.float64(1.0), np.int64(0), {}, ValueError, r"class dimension"),
    ("nll_loss", X, np.array([0, 1, 5, 1]), {}, IndexError, r"Target 5 is out of bounds"),
    ("nll_loss", X, np.array([0, 1]), {}, ValueError, r"batch_size"),
    ("nll_loss", X, T.astype(np.float32), {}, TypeError, r"integers"),
    ("nll_loss", X, T, {"weight": np.ones(2)}, ValueError, r"weight"),
    ("nll_loss", X, T, {"reduction": "mean "}, ValueError, r"reduction"),
    ("nll_loss", X.astype(np.int32), T, {}, TypeError, r"floating point"),
    ("binary_cross_entropy_with_logits", X, np.ones((4, 2)), {}, ValueError,
     r"Target size \(\(4, 2\)\) must be the same as input size \(\(4, 3\)\)"),
    ("binary_cross_entropy_with_logits", X, np.ones((4, 3), np.int64), {}, TypeError,
     r"target must be floating point"),
    ("binary_cross_entropy_with_logits", X, P, {"weight": np.ones(4)}, ValueError,
     r"weight of shape \(4,\) cannot be broadcast"),
    ("binary_cross_entropy_with_logits", X, P, {"pos_weight": np.ones(4)}, ValueError,
     r"pos_weight of shape \(4,\) cannot be broadcast"),
    ("binary_cross_entropy_with_logits", X, P, {"reduction": "max"}, ValueError, r"reduction"),
    ("binary_cross_entropy_with_logits", X.astype(np.int64), P, {}, TypeError, r"floating point"),
]


@pytest.mark.parametrize("name,x,target,kwargs,exc,match", CASES)
def test_bad_input_like_torch(backend, name, x, target, kwargs, exc, match):
    if exc is None:
        _torch(name)(x, target, **kwargs)
        getattr(cecore, name)(x, target, backend=backend, **kwargs)
        return
    with pytest.raises(Exception):
        _torch(name)(x, target, **kwargs)
    with pytest.raises(exc, match=match):
        getattr(cecore, name)(x, target, backend=backend, **kwargs)
    with pytest.raises(exc, match=match):  # the gradient path validates the same way
        getattr(cecore, name)(x, target, backend=backend, return_grad=True, **kwargs)


@pytest.mark.parametrize("dtype", ["i1", "u1", ">i2", "<u2", "i4", ">u4", "i8", ">i8", "u8"])
def test_target_range_every_integer_type(backend, dtype):
    # The range check reads the targets as unsigned integers of their width (one pass):
    # the extremes of every type and byte order, and the first value past each end.
    info = np.iinfo(np.dtype(dtype))
    for bad in sorted({info.min, info.max, 3} | ({-1} if info.min < 0 else set())):
        if bad < info.min or bad > info.max or 0 <= bad < 3:
            continue
        target = np.array([0, 1, bad, 2], dtype=dtype)
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            cecore.cross_entropy(X, target, backend=backend)
        if bad < 2**63:  # ignore_index fits int64: then the value is skipped
            loss = cecore.cross_entropy(X, target, ignore_index=int(bad), backend=backend)
            expected = TF.cross_entropy(torch.from_numpy(X), torch.tensor([0, 1, -100, 2]))
            np.testing.assert_allclose(loss, expected.item(), rtol=1e-12)


@pytest.mark.parametrize("dtype, n_classes", [("i1", 129), ("i1", 250), (">i2", 40000)])
def test_negative_narrow_targets_of_many_classes(backend, dtype, n_classes):
    # Read as unsigned, int8's -56 is 200: below 250 classes, so it passed the range check
    # and reached the kernels, which read and wrote outside the arrays (wrong losses,
    # garbage, a segfault with label smoothing; hostile review). torch: IndexError.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, n_classes, 3))
    target = np.zeros((4, 3), dtype=dtype)
    target[2, 1] = -(n_classes // 2) if n_classes < 256 else -30000
    match = f"Target {target[2, 1]} is out of bounds"
    with pytest.raises(IndexError, match=match):
        TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(target.astype(np.int64)))
    for call in (
            lambda: cecore.cross_entropy(x, target, label_smoothing=0.1, return_grad=True,
                                         backend=backend),
            lambda: cecore.nll_loss(x, target, return_grad=True, backend=backend),
            lambda: cecore.linear_cross_entropy(rng.standard_normal((12, 2)),
                                                rng.standard_normal((n_classes, 2)),
                                                target.reshape(-1), backend=backend),
            lambda: classification_report_from_logits(x[:, :, 0], target[:, 1])):
        with pytest.raises(IndexError, match=match):
            call()
    target[2, 1] = -100  # the ignore_index, negative too, is still skipped
    loss = cecore.cross_entropy(x, target, backend=backend)
    np.testing.assert_allclose(loss, TF.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(target.astype(np.int64))).item(), rtol=1e-12)


def test_more_classes_than_int32_counts_are_refused_before_any_copy(backend):
    # The kernels count a target's rank (softmax_ce_scores) and name its class (tile
    # kernels) in int32: 2**31 classes would overflow them. A broadcast row of that many
    # classes is refused before it is copied (8.6 GB, or converted from big-endian) and
    # before the float64 unit class weights are made (17 GB; review).
    import tracemalloc

    from cecore import batch
    x = np.broadcast_to(np.float32(0), (1, 2**31))
    big = np.broadcast_to(np.array(0, ">f4"), (1, 2**31))
    t = np.array([0])
    calls = [lambda: cecore.cross_entropy(x, t, backend=backend),
             lambda: cecore.cross_entropy(big, t, backend=backend),
             lambda: cecore.nll_loss(x, t, backend=backend),
             lambda: classification_report_from_logits(x, t, backend=backend),
             lambda: classification_report_from_logits(big, t, backend=backend),
             lambda: batch.score(x, t, backend=backend),
             lambda: cecore.linear_cross_entropy(np.ones((1, 1), np.float32),
                                                 np.broadcast_to(np.float32(1), (2**31, 1)),
                                                 t, backend=backend)]
    tracemalloc.start()
    try:
        for call in calls:
            with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
                call()
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20  # x would be 8.6 GB
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0001, float("nan")])
def test_label_smoothing_outside_unit_interval(backend, label_smoothing):
    # torch 2.13 accepts some negative values silently; cecore always rejects them.
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        cecore.cross_entropy(X, T, label_smoothing=label_smoothing, backend=backend)


def test_huge_unsigned_targets(backend):
    # beyond int64 (torch has no uint64 targets): still an IndexError, never a wrap-around
    target = np.array([0, 1, 2**63 + 1, 1], dtype=np.uint64)
    with pytest.raises(IndexError, match="out of bounds"):
        cecore.cross_entropy(X, target, backend=backend)
    with pytest.raises(IndexError, match="out of bounds"):
        cecore.nll_loss(X, target, backend=backend, return_grad=True)


def test_grad_output_shape(backend):
    xt = torch.from_numpy(X.copy()).requires_grad_(True)
    loss = TF.cross_entropy(xt, torch.from_numpy(T), reduction="none")
    with pytest.raises(RuntimeError):
        loss.backward(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"grad_output must have the loss's shape \(4,\)"):
        cecore.cross_entropy(X, T, reduction="none", return_grad=True, grad_output=np.ones(3),
                             backend=backend)
    with pytest.raises(ValueError, match="grad_output must be a scalar"):
        cecore.cross_entropy(X, T, return_grad=True, grad_output=np.ones(4), backend=backend)
    with pytest.raises(ValueError, match="grad_output must be a scalar"):
        cecore.binary_cross_entropy_with_logits(X, P, return_grad=True, grad_output=np.ones(2),
                                                backend=backend)
    with pytest.raises(TypeError, match="grad_output must be numeric"):
        cecore.nll_loss(X, T, return_grad=True, grad_output="one", backend=backend)


def test_bad_backend_and_threads(backend):
    with pytest.raises(ValueError, match="backend must be 'auto', 'cython' or 'numba'"):
        cecore.cross_entropy(X, T, backend="jax")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="n_threads must be"):
            cecore.cross_entropy(X, T, backend=backend, n_threads=bad)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="n_threads must be None or an int"):
            cecore.cross_entropy(X, T, backend=backend, n_threads=bad)


def test_softmax_bad_axis(backend):
    for fn, ref in ((cecore.softmax, torch.softmax), (cecore.log_softmax, torch.log_softmax),
                    (cecore.logsumexp, torch.logsumexp)):
        with pytest.raises(IndexError):
            ref(torch.from_numpy(X), 2)
        with pytest.raises(ValueError, match="axis 2 is out of bounds"):
            fn(X, axis=2, backend=backend)
        with pytest.raises(TypeError, match="axis must be an int"):
            fn(X, axis=1.0, backend=backend)
        with pytest.raises(TypeError, match="floating point"):
            fn(X.astype(np.complex128), backend=backend)


def test_errors_leave_no_partial_state(backend):
    # A rejected call must not poison later ones (e.g. a half-initialised thread pool).
    with pytest.raises(IndexError):
        cecore.cross_entropy(X, np.array([0, 1, 9, 1]), backend=backend, n_threads=2)
    expected = TF.cross_entropy(torch.from_numpy(X), torch.from_numpy(T)).item()
    np.testing.assert_allclose(cecore.cross_entropy(X, T, backend=backend, n_threads=2),
                               expected, rtol=1e-10)


def test_torch_bridge_rejects_what_torch_rejects_before_coercing(backend):
    import cecore.torch as ct

    x, t = torch.from_numpy(X), torch.from_numpy(T)
    for fn, kw in ((ct.cross_entropy, {"ignore_index": 1.5}), (ct.nll_loss, {"ignore_index": 1.5}),
                   (ct.cross_entropy, {"label_smoothing": "0.1"})):
        with pytest.raises(TypeError):  # torch's own TypeError, not a silent int(1.5)
            fn(x, t, backend=backend, **kw)
    with pytest.raises(TypeError, match="n_threads"):
        ct.cross_entropy(x, t, backend=backend, n_threads=True)


def test_scorer_from_logits_must_be_a_bool():
    from cecore.metrics import make_cross_entropy_scorer

    with pytest.raises(TypeError, match="from_logits must be a bool"):
        make_cross_entropy_scorer(from_logits="no")


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
                                  "linear_cross_entropy"])
def test_grad_output_without_a_gradient_is_refused(backend, name):
    # Ignored before: loss, grad = cross_entropy(x, t, reduction='none', grad_output=g)
    # (return_grad forgotten) unpacked two rows of losses as "loss" and "grad".
    x2 = X[:2]
    args = (x2, np.eye(3), np.array([0, 2])) if name == "linear_cross_entropy" else \
        (x2, P[:2] if name.startswith("binary") else T[:2])
    g = np.ones((2, 3) if name.startswith("binary") else 2)
    fn = getattr(cecore, name)
    with pytest.raises(ValueError, match="grad_output scales the gradient"):
        loss, grad = fn(*args, reduction="none", grad_output=g, backend=backend)
    with pytest.raises(ValueError, match="grad_output scales the gradient"):
        fn(*args, grad_output="junk", backend=backend)
    loss, grad = fn(*args, reduction="none", grad_output=g, return_grad=True, backend=backend)
    assert loss.shape == g.shape
