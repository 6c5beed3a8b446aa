"""``grad_out=``: the gradient written into the caller's buffer, in place included.

Oracles: the same call without ``grad_out`` (bit for bit), and torch for two cases.
"""

import numpy as np
import pytest
import torch

import cecore
from oracle import assert_close, check_result, torch_cross_entropy

CASES = {
    "index": lambda rng: (rng.standard_normal((40, 7)), rng.integers(0, 7, 40), {}),
    "index_smooth_weight": lambda rng: (rng.standard_normal((40, 70)), rng.integers(0, 70, 40),
                                        {"label_smoothing": 0.1,
                                         "weight": rng.random(70) + .5}),
    "ignored": lambda rng: (rng.standard_normal((40, 7)),
                            np.where(rng.random(40) < .3, -100, rng.integers(0, 7, 40)), {}),
    # Few classes: blocks of rows transposed in registers, partial blocks of rows and classes.
    "few_classes": lambda rng: (rng.standard_normal((150, 17)),
                                np.where(rng.random(150) < .1, -100,
                                         rng.integers(0, 17, 150)), {}),
    "proba": lambda rng: (rng.standard_normal((40, 7)), rng.dirichlet(np.ones(7), 40), {}),
    # K-dim without label smoothing: written over the logits by the tile kernels, with
    # two tiles of positions per sample (the second partial) and ignored positions.
    "kdim_plain": lambda rng: (rng.standard_normal((2, 5, 3, 110)),
                               np.where(rng.random((2, 3, 110)) < .1, -100,
                                        rng.integers(0, 5, (2, 3, 110))),
                               {"weight": rng.random(5) + .5}),
    "kdim": lambda rng: (rng.standard_normal((3, 5, 4, 6)), rng.integers(0, 5, (3, 4, 6)),
                         {"label_smoothing": 0.2}),
    # K-dim with few positions: blocks of samples transposed into scratch tiles, and
    # positions transposed into rows of many classes (see cecore._config.KDIM_*).
    "kdim_few_positions": lambda rng: (rng.standard_normal((90, 6, 3)),
                                       np.where(rng.random((90, 3)) < .1, -100,
                                                rng.integers(0, 6, (90, 3))), {}),
    "kdim_few_positions_many_classes": lambda rng: (
        rng.standard_normal((7, 300, 2)),
        np.where(rng.random((7, 2)) < .2, -100, rng.integers(0, 300, (7, 2))),
        {"weight": rng.random(300) + .5}),
    "none": lambda rng: (rng.standard_normal((40, 7)), rng.integers(0, 7, 40),
                         {"reduction": "none", "grad_output": rng.standard_normal(40)}),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grad_out_shares_memory_and_in_place_equals_out_of_place(backend, rng, case, dtype):
    x, target, options = CASES[case](rng)
    x = x.astype(dtype)
    if target.dtype.kind == "f":
        target = target.astype(dtype)
    loss, grad = cecore.cross_entropy(x, target, return_grad=True, backend=backend, **options)
    buf = np.full_like(x, np.nan)
    loss2, grad2 = cecore.cross_entropy(x, target, grad_out=buf, backend=backend, **options)
    assert grad2 is buf and np.shares_memory(grad2, buf)
    assert grad2.tobytes() == grad.tobytes() and np.array_equal(loss, loss2, equal_nan=True)
    xi = x.copy()
    loss3, grad3 = cecore.cross_entropy(xi, target, grad_out=xi, backend=backend, **options)
    assert grad3 is xi
    assert grad3.tobytes() == grad.tobytes() and np.array_equal(loss, loss3, equal_nan=True)


def test_grad_out_fortran_order_and_torch(backend, rng):
    x = np.asfortranarray(rng.standard_normal((30, 6)))
    t = rng.integers(0, 6, 30)
    buf = np.empty_like(x)  # Fortran-ordered too
    result = cecore.cross_entropy(x, t, grad_out=buf, backend=backend)
    assert result[1] is buf
    check_result(result, torch_cross_entropy(np.ascontiguousarray(x), t), x.dtype)
    # a C-ordered buffer for Fortran-ordered logits works (written through a copy)
    buf_c = np.empty(x.shape)
    assert np.array_equal(cecore.cross_entropy(x, t, grad_out=buf_c, backend=backend)[1], buf)


def test_bce_grad_out_fortran_order(backend, rng):
    # BCE returns a Fortran-ordered gradient for Fortran-ordered input, yet refused a
    # buffer in that layout (cross_entropy and nll_loss took it; hostile review).
    x = np.asfortranarray(rng.standard_normal((30, 6)))
    y = np.asfortranarray(rng.random((30, 6)))
    loss, grad = cecore.binary_cross_entropy_with_logits(x, y, return_grad=True, backend=backend)
    for buf in (np.empty_like(x), np.empty(x.shape)):  # Fortran-ordered, then C-ordered
        result = cecore.binary_cross_entropy_with_logits(x, y, grad_out=buf, backend=backend)
        assert result[1] is buf and result[0] == loss and np.array_equal(buf, grad)
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    torch.nn.functional.binary_cross_entropy_with_logits(xt, torch.from_numpy(y)).backward()
    assert_close(grad, xt.grad.numpy(), np.float64)


NLL_BCE_CASES = {
    "plain": ((25, 4), {}),
    "weighted": ((25, 4), {"weight": True}),
    "ignored": ((25, 4), {"ignored": True}),
    "kdim": ((6, 4, 3, 5), {"weight": True, "ignored": True}),
    "none": ((25, 4), {"reduction": "none"}),
    "pos_weight": ((25, 4), {"pos_weight": True}),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fn, case", [(fn, case) for fn in ("nll_loss", "bce")
                                      for case in sorted(NLL_BCE_CASES)
                                      if fn == "bce" or case != "pos_weight"])
def test_grad_out_nll_and_bce_in_place(backend, rng, fn, case, dtype):
    shape, spec = NLL_BCE_CASES[case]
    x = rng.standard_normal(shape).astype(dtype)
    n_classes = shape[1]
    options = {"backend": backend}
    if spec.get("reduction"):
        options.update(reduction="none", grad_output=rng.random(
            x.shape if fn == "bce" else (shape[0],) + shape[2:]))
    if fn == "nll_loss":
        t = rng.integers(0, n_classes, (shape[0],) + shape[2:])
        if spec.get("ignored"):
            t[rng.random(t.shape) < 0.3] = -100
        if spec.get("weight"):
            options["weight"] = rng.random(n_classes) + 0.5
        call = lambda a, **kw: cecore.nll_loss(a, t, **options, **kw)  # noqa: E731
    else:
        y = rng.random(shape).astype(dtype)
        if spec.get("weight"):
            options["weight"] = rng.random(shape[-1]) + 0.5
        if spec.get("pos_weight") or spec.get("ignored"):
            options["pos_weight"] = rng.random(shape[-1]) * 3
        call = lambda a, **kw: cecore.binary_cross_entropy_with_logits(  # noqa: E731
            a, y, **options, **kw)
    loss, grad = call(x, return_grad=True)
    xi = x.copy()
    loss2, grad2 = call(xi, grad_out=xi)
    assert grad2 is xi and grad2.tobytes() == grad.tobytes()
    assert np.asarray(loss).tobytes() == np.asarray(loss2).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_bce_in_place_zeros_have_the_same_sign(backend, rng, dtype, reduction):
    # Saturated logits make gradient entries exactly 0. Numba's float64 kernel, compiled
    # with "no signed zeros", gave -0.0 for some of them in place and +0.0 out of place
    # (hostile review): the bits differed. (Both backends give -0.0 for x >> 0, y = 1,
    # -z rounded to zero, where torch computes sigmoid(x) - y = +0.0.)
    x = (rng.choice([-1, 1], (64, 33)) * rng.uniform(100, 2000, (64, 33))).astype(dtype)
    x[:, :3] = rng.standard_normal((64, 3))
    y = rng.integers(0, 2, (64, 33)).astype(dtype)
    options = dict(reduction=reduction, backend=backend)
    if reduction == "none":
        options["grad_output"] = np.ones(x.shape, dtype)
    _, grad = cecore.binary_cross_entropy_with_logits(x, y, return_grad=True, **options)
    xi = x.copy()
    _, grad2 = cecore.binary_cross_entropy_with_logits(xi, y, grad_out=xi, **options)
    assert grad2.tobytes() == grad.tobytes()
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(
        xt, torch.tensor(y), reduction=reduction).backward(
            torch.ones(x.shape, dtype=xt.dtype) if reduction == "none" else None)
    expected = xt.grad.numpy()
    assert (expected == 0).sum() > 100
    assert_close(grad, expected, dtype)


def test_loss_classes_take_grad_out(backend, rng):
    x = rng.standard_normal((10, 3))
    t = rng.integers(0, 3, 10)
    y = rng.random((10, 3))
    for loss_class, function, target in (
            (cecore.CrossEntropyLoss, cecore.cross_entropy, t),
            (cecore.NLLLoss, cecore.nll_loss, t),
            (cecore.BCEWithLogitsLoss, cecore.binary_cross_entropy_with_logits, y)):
        expected = function(x, target, return_grad=True, backend=backend)[1]
        buf = np.empty_like(x)
        loss, grad = loss_class(backend=backend).loss_and_grad(x, target, grad_out=buf)
        assert grad is buf and grad.tobytes() == expected.tobytes(), loss_class
        xi = x.copy()
        assert loss_class(backend=backend).loss_and_grad(xi, target, grad_out=xi)[1] is xi
        assert xi.tobytes() == expected.tobytes(), loss_class


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: np.empty((x.shape[0] + 1, x.shape[1]), x.dtype), ValueError, "shape"),
    (lambda x: np.empty(x.shape, np.float32), TypeError, "dtype"),
    (lambda x: np.empty(x.shape, x.dtype.newbyteorder("S")), TypeError, "byte order"),
    (lambda x: np.empty(x.shape[::-1], x.dtype).T, ValueError, "C-contiguous"),
    (lambda x: np.empty((x.shape[0], 2 * x.shape[1]), x.dtype)[:, ::2], ValueError, "contiguous"),
    (lambda x: np.lib.stride_tricks.as_strided(np.empty(x.shape, x.dtype), writeable=False),
     ValueError, "read-only"),
])
def test_bad_grad_out_is_rejected_before_anything_is_written(backend, rng, bad, error, message):
    x = rng.standard_normal((8, 5))
    t = rng.integers(0, 5, 8)
    buf = bad(x)
    if buf.flags.writeable:
        buf[...] = 7.0
    before = buf.copy()
    for call in (lambda: cecore.cross_entropy(x, t, grad_out=buf, backend=backend),
                 lambda: cecore.nll_loss(x, t, grad_out=buf, backend=backend),
                 lambda: cecore.binary_cross_entropy_with_logits(x, np.zeros_like(x),
                                                                 grad_out=buf, backend=backend)):
        with pytest.raises(error, match=message):
            call()
        assert np.array_equal(buf, before)


@pytest.mark.parametrize("bad", [
    lambda x: x.tolist(),                      # would be written into a temporary, lost
    lambda x: np.asmatrix(np.empty(x.shape, x.dtype)),
])
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_grad_out_that_cannot_be_written_is_a_type_error(backend, rng, bad):
    x = rng.standard_normal((8, 5))
    t = rng.integers(0, 5, 8)
    buf = bad(x)
    with pytest.raises(TypeError, match="grad_out must be a NumPy array"):
        cecore.cross_entropy(x, t, grad_out=buf, backend=backend)
    with pytest.raises(TypeError, match="grad_out must be a NumPy array"):
        cecore.nll_loss(x, t, grad_out=buf, backend=backend)
    with pytest.raises(TypeError, match="grad_out must be a NumPy array"):
        cecore.binary_cross_entropy_with_logits(x, np.zeros_like(x), grad_out=buf,
                                                backend=backend)


def test_masked_grad_out_is_refused_before_anything_is_written(backend, rng):
    # its mask would hide entries of the gradient returned in it
    x = rng.standard_normal((8, 5))
    t = rng.integers(0, 5, 8)
    buf = np.ma.array(np.zeros(x.shape), mask=np.eye(*x.shape, dtype=bool))
    for call in (lambda: cecore.cross_entropy(x, t, grad_out=buf, backend=backend),
                 lambda: cecore.nll_loss(x, t, grad_out=buf, backend=backend),
                 lambda: cecore.binary_cross_entropy_with_logits(x, np.zeros_like(x),
                                                                 grad_out=buf, backend=backend)):
        with pytest.raises(TypeError, match="grad_out is a masked array"):
            call()
        assert not buf.data.any()


@pytest.mark.parametrize("which", ["input", "target", "weight"])
def test_masked_arrays_are_refused(backend, rng, which):
    # The kernels read the values under a mask as if it were not there (a masked logit of
    # 50 made the loss 48): refused rather than silently unmasked.
    x = rng.standard_normal((8, 5))
    args = {"input": x, "target": rng.integers(0, 5, 8), "weight": np.ones(5)}
    args[which] = np.ma.array(args[which], mask=np.zeros(args[which].shape, bool))
    with pytest.raises(TypeError, match="masked arrays are not supported"):
        cecore.cross_entropy(**args, backend=backend)
    with pytest.raises(TypeError, match="masked arrays are not supported"):
        cecore.binary_cross_entropy_with_logits(
            args["input"], np.ma.array(x) if which == "target" else np.zeros_like(x),
            weight=args["weight"], backend=backend)


def test_array_subclasses_are_checked_as_plain_arrays(backend, tmp_path):
    # The target checks called the array's own methods: a subclass whose max() skips
    # entries (as a masked array's does) passed a target of 10**12, and the kernels read
    # far outside the logits (a segfault; found by a hostile review of cecore_ext).
    class ZeroMax(np.ndarray):
        def max(self, *args, **kwargs):
            return 0

        min = max

    t = np.array([0, 1, 2, 10**12]).view(ZeroMax)
    x = np.zeros((4, 5))
    for call in (lambda: cecore.cross_entropy(x, t, backend=backend),
                 lambda: cecore.nll_loss(x, t, backend=backend),
                 lambda: cecore.linear_cross_entropy(np.zeros((4, 3)), np.zeros((5, 3)), t,
                                                     backend=backend)):
        with pytest.raises(IndexError, match="Target 1000000000000 is out of bounds"):
            call()
    # a subclass given as grad_out is the gradient returned (a memmap stays one)
    g = np.empty((4, 5)).view(ZeroMax)
    for fn in (cecore.cross_entropy, cecore.binary_cross_entropy_with_logits):
        target = np.array([0, 1, 2, 3]) if fn is cecore.cross_entropy else np.zeros((4, 5))
        _, grad = fn(x, target, grad_out=g, backend=backend)
        assert grad is g
    labels = np.array([0, 1, 2, 3])
    mm = np.memmap(tmp_path / "g.bin", dtype=np.float64, mode="w+", shape=(4, 5))
    _, grad = cecore.cross_entropy(x, labels, grad_out=mm, backend=backend)
    assert grad is mm
    np.testing.assert_array_equal(
        mm, cecore.cross_entropy(x, labels, return_grad=True, backend=backend)[1])
    # and a subclass otherwise computes as its plain array
    good = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(cecore.cross_entropy(x.view(ZeroMax), good.view(ZeroMax),
                                                       reduction="none", backend=backend),
                                  cecore.cross_entropy(x, good, reduction="none",
                                                       backend=backend))


def test_bfloat16_tensor_grad_out_is_a_type_error(backend):
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        cecore.cross_entropy(x, torch.arange(6) % 5, grad_out=torch.empty_like(x),
                             backend=backend)


def test_tensor_grad_out_is_seen_by_autograd(backend):
    # A tensor grad_out was written through a NumPy view behind autograd's back: a
    # backward that had saved it used the overwritten values (no error), and a leaf that
    # requires grad was filled in place, which torch refuses.
    x = np.array([[1.0, 2.0, 0.5], [0.5, 1.5, 2.5]])
    t = np.array([1, 2])
    a = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    buf = torch.full((2, 3), 3.0, dtype=torch.float64)
    y = (a * buf).sum()  # autograd saves buf
    loss, grad = cecore.cross_entropy(x, t, grad_out=buf, backend=backend)
    assert np.shares_memory(grad, buf.numpy())
    check_result((loss, buf.numpy()), torch_cross_entropy(x, t), x.dtype)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    leaf = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        cecore.cross_entropy(x, t, grad_out=leaf, backend=backend)
    assert not leaf.detach().any()  # nothing written
    # Its detached view is accepted (and shares the leaf's version counter).
    cecore.cross_entropy(x, t, grad_out=leaf.detach(), backend=backend)
    np.testing.assert_array_equal(leaf.detach().numpy(), buf.numpy())


def _overlapping(rng, shape):
    """Logits and a buffer viewing the same memory shifted by one element."""
    buf = rng.standard_normal(int(np.prod(shape)) + 1)
    return buf[:-1].reshape(shape), buf[1:].reshape(shape)


# Buffers that share memory with an operand without being exactly the input: the kernel
# must not write into them while it reads (oracle: the same call on copies).
OVERLAPS = {
    "ce_shifted": lambda rng: (*_overlapping(rng, (300, 5)), rng.integers(0, 5, 300), {}),
    "ce_few_classes_shifted": lambda rng: (*_overlapping(rng, (300, 17)),
                                           rng.integers(0, 17, 300), {}),
    "ce_kdim_shifted": lambda rng: (*_overlapping(rng, (4, 5, 100)),
                                    rng.integers(0, 5, (4, 100)), {}),
    "ce_smooth_shifted": lambda rng: (*_overlapping(rng, (300, 5)), rng.integers(0, 5, 300),
                                      {"label_smoothing": 0.1}),
    "proba_in_place": lambda rng: (lambda x: (x, x, rng.dirichlet(np.ones(5), 300), {}))(
        rng.standard_normal((300, 5))),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_grad_out_overlapping_an_operand_gives_the_out_of_place_result(backend, rng, case):
    x, buf, t, options = OVERLAPS[case](rng)
    expected = cecore.cross_entropy(x.copy(), t.copy(), return_grad=True, backend=backend,
                                    **options)
    loss, grad = cecore.cross_entropy(x, t, grad_out=buf, backend=backend, **options)
    assert grad is buf
    assert loss == expected[0]
    np.testing.assert_array_equal(buf, expected[1])


def test_grad_out_holding_the_weight_or_the_target(backend, rng):
    x = rng.standard_normal((400, 50))
    t = rng.integers(0, 50, 400)
    w = rng.random(50) + 0.5
    expected = cecore.cross_entropy(x, t, weight=w, return_grad=True, backend=backend)
    buf = np.zeros((400, 50))
    buf[7] = w  # the class weight is a row of the buffer
    assert cecore.cross_entropy(x, t, weight=buf[7], grad_out=buf, backend=backend)[0] == expected[0]
    np.testing.assert_array_equal(buf, expected[1])
    buf = np.zeros((400, 50))
    target = buf.reshape(-1)[:400].view(np.int64)  # the target's bytes are in the buffer
    target[:] = t
    assert cecore.cross_entropy(x, target, weight=w, grad_out=buf, backend=backend)[0] == expected[0]
    np.testing.assert_array_equal(buf, expected[1])
    # unbatched: the weight itself as the buffer
    x1, w1 = rng.standard_normal(40), rng.random(40) + 0.5
    expected = cecore.cross_entropy(x1, np.array(3), weight=w1.copy(), return_grad=True,
                                    backend=backend)
    loss, grad = cecore.cross_entropy(x1, np.array(3), weight=w1, grad_out=w1, backend=backend)
    assert loss == expected[0] and grad is w1
    np.testing.assert_array_equal(w1, expected[1])


def test_bce_grad_out_overlapping_an_operand(backend, rng):
    x, buf = _overlapping(rng, (60, 5))
    y = rng.random((60, 5))
    expected = cecore.binary_cross_entropy_with_logits(x.copy(), y, return_grad=True,
                                                       backend=backend)
    loss, grad = cecore.binary_cross_entropy_with_logits(x, y, grad_out=buf, backend=backend)
    assert loss == expected[0] and grad is buf
    np.testing.assert_array_equal(buf, expected[1])
    x = rng.standard_normal((60, 5))
    for name in ("weight", "pos_weight"):
        buf = np.zeros((60, 5))
        buf[3] = rng.random(5) + 0.5  # a weight row broadcast from inside the buffer
        expected = cecore.binary_cross_entropy_with_logits(
            x, y, return_grad=True, backend=backend, **{name: buf[3].copy()})
        loss, grad = cecore.binary_cross_entropy_with_logits(
            x, y, grad_out=buf, backend=backend, **{name: buf[3]})
        assert loss == expected[0]
        np.testing.assert_array_equal(buf, expected[1])


def test_nll_grad_out_overlapping_the_input(backend, rng):
    x, buf = _overlapping(rng, (50, 6))
    t = rng.integers(0, 6, 50)
    expected = cecore.nll_loss(x.copy(), t, return_grad=True, backend=backend)
    loss, grad = cecore.nll_loss(x, t, grad_out=buf, backend=backend)
    assert loss == expected[0] and grad is buf
    np.testing.assert_array_equal(buf, expected[1])


def test_in_place_gradient_allocates_nothing_of_the_inputs_size(backend, rng):
    # Class-index targets without label smoothing: the kernels write over the logits
    # directly (tracemalloc sees NumPy's allocations; O(N) per-position arrays remain).
    import tracemalloc

    x = rng.standard_normal((2000, 500)).astype(np.float32)
    t = rng.integers(0, 500, 2000)
    cecore.cross_entropy(x.copy(), t, grad_out=np.empty_like(x), backend=backend)  # warm-up
    tracemalloc.start()
    try:
        cecore.cross_entropy(x, t, grad_out=x, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 10, peak


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["index", "proba", "softmax"])
def test_outputs_larger_than_the_cache_are_the_same_bits(rng, kind, dtype, backend):
    """The few-classes blocks write outputs of at least STREAM_MIN_BYTES, other than their
    input, with non-temporal stores (cecore._config.STREAM_MIN_BYTES): they must hold what
    the in-place call (normal stores) writes, also into a buffer that starts in the middle
    of a cache line (partial lines at both ends of every block) and, in Cython (which
    streams bytes), into one that is not even aligned to its itemsize. Numba stores such
    an output normally: that choice is checked on its own, as every call with an
    unaligned array compiles another specialisation of each kernel (six more here; see
    kernel_findings.md, fourteenth session, for the suite's time with a fresh cache)."""
    from cecore import _config
    n_classes = 10
    rows = _config.STREAM_MIN_BYTES // (n_classes * np.dtype(dtype).itemsize) + 7
    x = rng.standard_normal((rows, n_classes)).astype(dtype)

    odd = np.empty(x.nbytes + 1, np.uint8)[1:].view(dtype).reshape(x.shape)
    assert not odd.flags.aligned
    if backend == "numba":
        from cecore import _numba
        assert not _numba._streams(odd, x) and _numba._streams(odd.copy(), x)
        odd = np.empty_like(x)

    if kind == "softmax":  # no out= in the API: the kernel contract, as cecore.softmax calls it
        from cecore._backends import get_backend
        k = get_backend(backend)
        fresh = cecore.softmax(x, backend=backend)
        shifted, xi = np.empty(x.size + 1, dtype)[1:].reshape(x.shape), x.copy()
        for src, out in ((x, shifted), (x, odd), (xi, xi)):
            k.softmax(src.reshape(rows, n_classes, 1), False, out.reshape(rows, n_classes, 1), 2)
        assert fresh.tobytes() == shifted.tobytes() == odd.tobytes() == xi.tobytes()
        return
    target = (rng.integers(0, n_classes, rows) if kind == "index"
              else rng.dirichlet(np.ones(n_classes), rows).astype(dtype))
    loss, fresh = cecore.cross_entropy(x, target, return_grad=True, backend=backend)
    shifted = np.empty(x.size + 1, dtype)[1:].reshape(x.shape)  # 4 or 8 bytes into a line
    loss2, grad2 = cecore.cross_entropy(x, target, grad_out=shifted, backend=backend)
    xi = x.copy()
    loss3, grad3 = cecore.cross_entropy(xi, target, grad_out=xi, backend=backend)
    one = np.empty_like(x)  # one thread: the kernel's loop without a parallel region
    loss4, _ = cecore.cross_entropy(x, target, grad_out=one, backend=backend, n_threads=1)
    loss5, _ = cecore.cross_entropy(x, target, grad_out=odd, backend=backend)
    assert grad2 is shifted and grad3 is xi
    assert fresh.tobytes() == shifted.tobytes() == xi.tobytes() == one.tobytes() == odd.tobytes()
    assert loss == loss2 == loss3 == loss4 == loss5


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_empty_read_only_input_gets_a_new_gradient(backend, dtype):
    # (review) the gradient went into the caller's empty read-only array (may_share_memory
    # is False for any empty array): the kernels refused the read-only buffer
    x = np.empty((0, 5), dtype)
    x.flags.writeable = False
    t = np.empty(0, np.int64)
    for call in (lambda: cecore.cross_entropy(x, t, return_grad=True, backend=backend),
                 lambda: cecore.nll_loss(x, t, return_grad=True, backend=backend),
                 lambda: cecore.binary_cross_entropy_with_logits(x, np.empty((0, 5), dtype),
                                                                 return_grad=True,
                                                                 backend=backend)):
        grad = call()[1]
        assert grad.shape == (0, 5) and grad.dtype == dtype and grad.flags.writeable
        assert grad.base is not x and grad is not x
