"""cecore.torch (losses inside torch autograd) against torch's own losses.

Every expected value comes from torch's function on a clone of the same tensors: the loss,
and ``input.grad`` after ``backward(grad_output)``.
"""

import contextlib
import copy
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import cecore
import cecore.torch as ct
from oracle import BACKENDS, assert_close, subprocess_env

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def gen(request):
    # A torch generator per test, seeded from its id, so failures reproduce.
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # The fallback warning is shown once per process and reason: each test starts afresh.
    monkeypatch.setattr(ct, "_warned", set())


def _np_dtype(dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def _grad_output(gen, loss_shape, reduction, dtype):
    if reduction == "none":
        return torch.randn(loss_shape, generator=gen, dtype=dtype)
    return torch.rand((), generator=gen, dtype=dtype) + 0.5


def _index_target(gen, shape, n_classes, ignore_index=-100, p_ignore=0.0):
    t = torch.randint(0, n_classes, shape, generator=gen)
    if p_ignore:
        t = torch.where(torch.rand(shape, generator=gen) < p_ignore, ignore_index, t)
    return t


def compare(ours, theirs, x, grad_output=None, rtol=None):
    """``ours(x)`` and ``theirs(x)`` (torch's): equal losses and input gradients after backward."""
    x_ours = x.detach().clone().requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    loss, expected = ours(x_ours), theirs(x_theirs)
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    g = torch.ones_like(expected) if grad_output is None else grad_output
    loss.backward(g)
    expected.backward(g)
    dtype = _np_dtype(x.dtype)
    assert_close(loss.detach().numpy(), expected.detach().numpy(), dtype, rtol=rtol)
    assert_close(x_ours.grad.numpy(), x_theirs.grad.numpy(), dtype, rtol=rtol)
    return x_ours


@contextlib.contextmanager
def no_fallback():
    """Turn cecore's fallback warning into an error: the code inside must take cecore's path."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ct.CecoreFallbackWarning)
        yield


# ------------------------------------------------------------------------ import
def test_import_cecore_does_not_import_torch():
    code = ("import sys, numpy as np, cecore\n"
            "cecore.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), return_grad=True)\n"
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            "import cecore.torch\n"
            "assert 'torch' in sys.modules\n")
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5, 2), (5,)])
def test_cross_entropy_index(gen, dtype, reduction, use_weight, label_smoothing, shape):
    x = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = _index_target(gen, t_shape, n_classes, p_ignore=0.3 if t_shape else 0.0)
    weight = torch.rand(n_classes, generator=gen, dtype=dtype) + 0.2 if use_weight else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    with no_fallback():
        compare(lambda x: ct.cross_entropy(x, target, **kw),
                lambda x: TF.cross_entropy(x, target, **kw),
                x, _grad_output(gen, t_shape, reduction, dtype))


@pytest.mark.parametrize("ignore_index", [0, 2, -1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_ignore_index(gen, ignore_index, reduction):
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    target = _index_target(gen, (20,), 4, ignore_index, p_ignore=0.3)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1,
              weight=torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    with no_fallback():
        compare(lambda x: ct.cross_entropy(x, target, **kw),
                lambda x: TF.cross_entropy(x, target, **kw),
                x, _grad_output(gen, (20,), reduction, torch.float64))


def test_zero_dim_tensor_scalars_as_torch(gen):
    # torch takes a 0-d integer tensor as ignore_index and a 0-d tensor (floating or
    # integer, not requiring grad) as label_smoothing; cecore raised TypeError (hostile
    # review)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    target = _index_target(gen, (20,), 4, 2, p_ignore=0.3)
    for loss in ("ce", "nll", "module"):
        kw = dict(ignore_index=torch.tensor(2))
        if loss != "nll":
            kw["label_smoothing"] = torch.tensor(0.1, dtype=torch.float64)
        ours, theirs = {"ce": (ct.cross_entropy, TF.cross_entropy),
                        "nll": (ct.nll_loss, TF.nll_loss),
                        "module": (lambda *a, **k: ct.CrossEntropyLoss(**k)(*a),
                                   lambda *a, **k: torch.nn.CrossEntropyLoss(**k)(*a))}[loss]
        with no_fallback():
            compare(lambda x: ours(x, target, **kw), lambda x: theirs(x, target, **kw), x,
                    _grad_output(gen, (20,), "mean", torch.float64))
    for smoothing in (torch.tensor(0), torch.tensor(1)):
        with no_fallback():
            compare(lambda x: ct.cross_entropy(x, target, label_smoothing=smoothing),
                    lambda x: TF.cross_entropy(x, target, label_smoothing=smoothing), x,
                    _grad_output(gen, (20,), "mean", torch.float64))
    trainable = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(TypeError):
        TF.cross_entropy(x, target, label_smoothing=trainable)
    with pytest.raises(TypeError):
        ct.cross_entropy(x, target, label_smoothing=trainable)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 5)])
def test_cross_entropy_probabilities(gen, dtype, reduction, use_weight, shape):
    x = 2 * torch.randn(shape, generator=gen, dtype=dtype)
    target = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=1)
    weight = torch.rand(shape[1], generator=gen, dtype=dtype) + 0.2 if use_weight else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=0.15)
    with no_fallback():
        compare(lambda x: ct.cross_entropy(x, target, **kw),
                lambda x: TF.cross_entropy(x, target, **kw),
                x, _grad_output(gen, shape[:1] + shape[2:], reduction, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 2, 3), (5,)])
def test_nll_loss(gen, dtype, reduction, shape):
    x = torch.log_softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=-1 if len(shape) == 1 else 1)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = _index_target(gen, t_shape, n_classes, ignore_index=1, p_ignore=0.2 if t_shape else 0.0)
    kw = dict(weight=torch.rand(n_classes, generator=gen, dtype=dtype) + 0.2, ignore_index=1,
              reduction=reduction)
    with no_fallback():
        compare(lambda x: ct.nll_loss(x, target, **kw), lambda x: TF.nll_loss(x, target, **kw),
                x, _grad_output(gen, t_shape, reduction, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "broadcast", "full"])
def test_bce_with_logits(gen, dtype, reduction, weights):
    shape = (6, 4)
    x = 4 * torch.randn(shape, generator=gen, dtype=dtype)
    target = torch.rand(shape, generator=gen, dtype=dtype)
    kw = dict(reduction=reduction)
    if weights == "broadcast":
        kw.update(weight=torch.rand(4, generator=gen, dtype=dtype),
                  pos_weight=torch.rand(4, generator=gen, dtype=dtype) + 0.5)
    elif weights == "full":
        kw.update(weight=torch.rand(shape, generator=gen, dtype=dtype),
                  pos_weight=torch.rand(shape, generator=gen, dtype=dtype) + 0.5)
    with no_fallback():
        compare(lambda x: ct.binary_cross_entropy_with_logits(x, target, **kw),
                lambda x: TF.binary_cross_entropy_with_logits(x, target, **kw),
                x, _grad_output(gen, shape, reduction, dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_and_all_targets_ignored(reduction):
    # 'mean' over no target is 0/0 = NaN, with a zero gradient (as torch).
    for x, target in ((torch.randn(0, 4), torch.zeros(0, dtype=torch.int64)),
                      (torch.randn(3, 4), torch.full((3,), -100))):
        with no_fallback():
            compare(lambda x: ct.cross_entropy(x, target, reduction=reduction),
                    lambda x: TF.cross_entropy(x, target, reduction=reduction), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_and_threads(gen, backend):
    x = torch.randn(300, 7, generator=gen)
    target = _index_target(gen, (300,), 7)
    with no_fallback():
        compare(lambda x: ct.cross_entropy(x, target, backend=backend, n_threads=2),
                lambda x: TF.cross_entropy(x, target), x)


def test_threads_capped_by_torch(gen, monkeypatch):
    seen = []
    real = cecore.functional.cross_entropy
    monkeypatch.setattr(cecore.functional, "cross_entropy",
                        lambda *a, **k: seen.append(k["n_threads"]) or real(*a, **k))
    x = torch.randn(4096, 64, generator=gen)  # big enough for several threads by default
    target = _index_target(gen, (4096,), 64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ct.cross_entropy(x, target)
    finally:
        torch.set_num_threads(before)
    ct.cross_entropy(x, target, n_threads=2)  # an explicit count is honoured
    assert seen == [1, 2]


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs_computed_in_float32(gen, dtype, rtol):
    # The oracle: torch in float32 on the same (rounded) values, rounded to the input's dtype.
    x = (3 * torch.randn(9, 6, generator=gen)).to(dtype)
    target = _index_target(gen, (9,), 6)
    x_ours = x.clone().requires_grad_()
    with no_fallback():
        loss = ct.cross_entropy(x_ours, target, label_smoothing=0.1)
    loss.backward()
    x32 = x.float().requires_grad_()
    expected = TF.cross_entropy(x32, target, label_smoothing=0.1)
    expected.backward()
    assert loss.dtype == dtype and x_ours.grad.dtype == dtype
    assert_close(loss.float().detach().numpy(), expected.to(dtype).float().detach().numpy(),
                 np.float32, rtol=rtol)
    assert_close(x_ours.grad.float().numpy(), x32.grad.to(dtype).float().numpy(), np.float32,
                 rtol=rtol)


def test_float16_gradient_is_scaled_before_it_is_rounded(gen):
    # A float16 model without autocast, its loss scaled by 1024 (as loss scaling does): the
    # gradient was rounded to float16 at grad_output = 1 and then scaled, so 20 % of its
    # entries underflowed to 0 (torch: 23 of 1e6) and its error was 7x torch's (hostile
    # review). The oracle is the float64 gradient of the same float16 logits.
    x = (2 * torch.randn(20000, 50, generator=gen)).half()
    target = _index_target(gen, (20000,), 50)
    reference = x.double().requires_grad_()
    TF.cross_entropy(reference, target).backward(torch.tensor(1024.0, dtype=torch.float64))
    errors, zeros = [], []
    for loss_fn in (ct.cross_entropy, TF.cross_entropy):
        leaf = x.clone().requires_grad_()
        with no_fallback():
            loss_fn(leaf, target).backward(torch.tensor(1024.0, dtype=torch.float16))
        assert leaf.grad.dtype == torch.float16
        g = leaf.grad.double()
        errors.append(((g - reference.grad).norm() / reference.grad.norm()).item())
        zeros.append(int((g == 0).sum()))
    assert errors[0] <= 1.5 * errors[1] and zeros[0] <= zeros[1] + 100, (errors, zeros)


def test_float16_linear_gradients_are_scaled_before_they_are_rounded(gen):
    # The same for the linear loss (hostile review: 264 of 131072 input-gradient entries
    # flushed to 0 at loss scale 32768, torch none, and 4x torch's error). Oracle: the
    # float64 gradients of the same float16 operands.
    n, d, v = 8192, 16, 64
    h = torch.randn(n, d, generator=gen).half()
    w = (0.1 * torch.randn(v, d, generator=gen)).half()
    target = _index_target(gen, (n,), v)
    scale = 32768.0
    ref = [h.double().requires_grad_(), w.double().requires_grad_()]
    TF.linear_cross_entropy(*ref, target).backward(torch.tensor(scale, dtype=torch.float64))
    errors, zeros = [], []
    for loss_fn in (ct.linear_cross_entropy, TF.linear_cross_entropy):
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        with no_fallback():
            loss_fn(*leaves, target).backward(torch.tensor(scale, dtype=torch.float16))
        assert all(a.grad.dtype == torch.float16 for a in leaves)
        errors.append([((a.grad.double() - r.grad).norm() / r.grad.norm()).item()
                       for a, r in zip(leaves, ref)])
        zeros.append(int((leaves[0].grad == 0).sum()))
    assert all(e <= 1.5 * t for e, t in zip(*errors)) and zeros[0] <= zeros[1], (errors, zeros)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_wider_float_targets_promote_the_loss(gen, dtype, reduction):
    # As torch: float64 probabilities make a float64 loss; the gradient keeps the input's
    # dtype. (Values against torch on float64 logits: torch keeps log_softmax in the
    # input's dtype before the product with the probabilities.)
    x = (2 * torch.randn(6, 5, generator=gen)).to(dtype)
    p = torch.softmax(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=1)
    for ours, ref in ((ct.cross_entropy, TF.cross_entropy),
                      (ct.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits)):
        x_ours = x.clone().requires_grad_()
        with no_fallback():
            loss = ours(x_ours, p, reduction=reduction)
        loss.sum().backward()
        assert loss.dtype == ref(x, p, reduction=reduction).dtype == torch.float64
        assert x_ours.grad.dtype == dtype
        x64 = x.double().requires_grad_()
        expected = ref(x64, p, reduction=reduction)
        expected.sum().backward()
        assert_close(loss.detach().numpy(), expected.detach().numpy(), np.float64)
        assert_close(x_ours.grad.float().numpy(), x64.grad.to(dtype).float().numpy(), np.float32,
                     rtol=1e-2 if dtype != torch.float32 else None)


@pytest.mark.parametrize("reduction,grad_output", [("mean", None), ("mean", 2.5), ("none", "random")])
def test_zero_copy(gen, monkeypatch, reduction, grad_output):
    # The kernels read the input tensor's memory, and the gradient they write into a
    # tensor torch allocated becomes input.grad: scaled in place, or as it is after
    # loss.backward().
    seen = {}
    real_cross_entropy, real_fused = cecore.functional.cross_entropy, ct._fused

    def spy_cross_entropy(input, *args, **kwargs):
        seen["input"] = input.__array_interface__["data"][0]
        seen["grad_out"] = kwargs["grad_out"].__array_interface__["data"][0]
        return real_cross_entropy(input, *args, **kwargs)

    def spy_fused(function, grad, *args, **kwargs):
        seen["grad"] = grad.data_ptr()
        return real_fused(function, grad, *args, **kwargs)

    monkeypatch.setattr(cecore.functional, "cross_entropy", spy_cross_entropy)
    monkeypatch.setattr(ct, "_fused", spy_fused)
    x = torch.randn(50, 9, generator=gen)
    target = _index_target(gen, (50,), 9)
    if grad_output == "random":
        grad_output = torch.randn(50, generator=gen)
    elif grad_output is not None:
        grad_output = torch.tensor(grad_output)
    with no_fallback():
        x_ours = compare(lambda x: ct.cross_entropy(x, target, reduction=reduction),
                         lambda x: TF.cross_entropy(x, target, reduction=reduction),
                         x, grad_output)
    assert seen["input"] == x_ours.data_ptr()
    assert seen["grad_out"] == seen["grad"] == x_ours.grad.data_ptr()


# ---------------------------------------------------------------------- modules
def test_modules_match_torch_modules(gen):
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    target = _index_target(gen, (10,), 4)
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    pairs = [
        (ct.CrossEntropyLoss(weight, label_smoothing=0.1, ignore_index=2),
         torch.nn.CrossEntropyLoss(weight, label_smoothing=0.1, ignore_index=2), target),
        (ct.CrossEntropyLoss(reduction="sum", backend="numba", n_threads=1),
         torch.nn.CrossEntropyLoss(reduction="sum"), target),
        (ct.NLLLoss(weight, size_average=False), torch.nn.NLLLoss(weight, size_average=False),
         target),
        (ct.BCEWithLogitsLoss(pos_weight=weight, reduce=False),
         torch.nn.BCEWithLogitsLoss(pos_weight=weight, reduce=False),
         torch.rand(10, 4, generator=gen, dtype=torch.float64)),
    ]
    for ours, theirs, t in pairs:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        assert ours.reduction == theirs.reduction
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        with no_fallback():
            compare(lambda x: ours(x, t), lambda x: theirs(x, t), x)


# ---------------------------------------------------------------------- autograd
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(gen, reduction):
    f64 = dict(dtype=torch.float64)
    x = torch.randn(4, 5, 2, generator=gen, **f64).requires_grad_()
    target = _index_target(gen, (4, 2), 5, p_ignore=0.2)
    weight = torch.rand(5, generator=gen, **f64) + 0.5
    proba = torch.softmax(torch.randn(4, 5, 2, generator=gen, **f64), dim=1)
    y = torch.rand(4, 5, 2, generator=gen, **f64)
    with no_fallback():
        for f in (lambda x: ct.cross_entropy(x, target, weight, reduction=reduction,
                                             label_smoothing=0.1),
                  lambda x: ct.cross_entropy(x, proba, weight, reduction=reduction),
                  lambda x: ct.nll_loss(x, target, weight, reduction=reduction),
                  lambda x: ct.binary_cross_entropy_with_logits(
                      x, y, pos_weight=weight[:, None], reduction=reduction)):
            assert torch.autograd.gradcheck(f, (x,))


def test_second_backward_raises_like_torch(gen):
    x = torch.randn(5, 3, generator=gen, requires_grad=True)
    target = _index_target(gen, (5,), 3)
    with no_fallback():
        loss = ct.cross_entropy(x, target)
    expected = TF.cross_entropy(x, target)
    loss.backward()
    expected.backward()
    with pytest.raises(RuntimeError) as torch_error:
        expected.backward()
    with pytest.raises(RuntimeError) as error:
        loss.backward()
    assert str(error.value) == str(torch_error.value)


def test_retain_graph_accumulates(gen):
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    target = _index_target(gen, (5,), 3)
    x_ours = x.clone().requires_grad_()
    x_theirs = x.clone().requires_grad_()
    with no_fallback():
        loss = ct.cross_entropy(x_ours, target)
    expected = TF.cross_entropy(x_theirs, target)
    for g in (1.0, 2.5, 1.0):  # 1.0 is handed on unscaled; it must not corrupt the saved one
        loss.backward(torch.tensor(g, dtype=torch.float64), retain_graph=True)
        expected.backward(torch.tensor(g, dtype=torch.float64), retain_graph=True)
    assert_close(x_ours.grad.numpy(), x_theirs.grad.numpy())


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "linear"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_saved_tensors_a_pack_hook_keeps_are_not_written(gen, loss, upstream):
    # The saved gradient is scaled in place only when nothing else has seen it; a pack
    # hook of saved_tensors_hooks has, and may keep it (a debugging hook, say).
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kept = []

    def pack(t):
        kept.append((t, t.clone()))
        return t

    with no_fallback(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if loss == "cross_entropy":
            out = ct.cross_entropy(x, _index_target(gen, (6,), 4))
        elif loss == "bce":
            out = ct.binary_cross_entropy_with_logits(x, torch.rand(6, 4, generator=gen,
                                                                    dtype=torch.float64))
        else:
            out = ct.linear_cross_entropy(x, w, _index_target(gen, (6,), 5))
    (out * upstream).backward()
    assert kept and all(torch.equal(t, copy) for t, copy in kept)
    assert x.grad is not None and all(t is not x.grad for t, _ in kept)


def test_second_derivative_raises(gen):
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = _index_target(gen, (4,), 3)
    with no_fallback():
        total = ct.cross_entropy(x, target) + (x ** 2).sum()
    (g,) = torch.autograd.grad(total, x, create_graph=True)
    # The first derivative is right; differentiating it again must not drop the loss's part.
    expected = torch.autograd.grad(TF.cross_entropy(x, target) + (x ** 2).sum(), x)[0]
    assert_close(g.detach().numpy(), expected.numpy())
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.sum().backward()


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "linear_input", "linear_weight",
                                  "linear_none"])
def test_hessians_and_hvps_raise_instead_of_returning_zeros(gen, loss):
    """torch.autograd.functional differentiates only towards its inputs: the second
    derivative must still reach the raising node (it came out as silent zeros)."""
    target = _index_target(gen, (4,), 5)
    h = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(4, 5, generator=gen, dtype=torch.float64)
    fn, at = {
        "cross_entropy": (lambda a: ct.cross_entropy(a, target), h @ w.T),
        "bce": (lambda a: ct.binary_cross_entropy_with_logits(a, y), h @ w.T),
        "linear_input": (lambda a: ct.linear_cross_entropy(a, w, target), h),
        "linear_weight": (lambda a: ct.linear_cross_entropy(h, a, target), w),
        "linear_none": (lambda a: ct.linear_cross_entropy(a, w, target, reduction="none").sum(), h),
    }[loss]
    with no_fallback():
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.functional.hessian(fn, at)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.functional.hvp(fn, at, torch.ones_like(at))
        a = at.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(a), a, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(g.pow(2).sum(), a, allow_unused=True)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "bce", "linear_input",
                                  "linear_weight"])
def test_jvp_by_double_backward_matches_torch(gen, loss):
    # torch.autograd.functional.jvp differentiates the gradient with respect to
    # grad_output, of which it is linear: first-order information. The gradient was
    # detached from grad_output, and the JVP came out as a silent 0 (hostile review).
    target = _index_target(gen, (4,), 5)
    h = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(4, 5, generator=gen, dtype=torch.float64)
    ours, theirs, at = {
        "cross_entropy": (lambda a: ct.cross_entropy(a, target, reduction="none"),
                          lambda a: TF.cross_entropy(a, target, reduction="none"), h @ w.T),
        "nll_loss": (lambda a: ct.nll_loss(a, target), lambda a: TF.nll_loss(a, target), h @ w.T),
        "bce": (lambda a: ct.binary_cross_entropy_with_logits(a, y),
                lambda a: TF.binary_cross_entropy_with_logits(a, y), h @ w.T),
        "linear_input": (lambda a: ct.linear_cross_entropy(a, w, target),
                         lambda a: TF.cross_entropy(a @ w.T, target), h),
        "linear_weight": (lambda a: ct.linear_cross_entropy(h, a, target, reduction="sum"),
                          lambda a: TF.cross_entropy(h @ a.T, target, reduction="sum"), w),
    }[loss]
    v = torch.randn(at.shape, generator=gen, dtype=torch.float64)
    with no_fallback():
        got = torch.autograd.functional.jvp(ours, at, v)[1]
    expected = torch.autograd.functional.jvp(theirs, at, v)[1]
    assert_close(got.numpy(), expected.numpy(), np.float64)
    assert got.abs().max() > 0
    # the 'none' linear loss recomputes its gradient in an operator of its own: it says so
    with no_fallback(), pytest.raises(RuntimeError, match="with respect to grad_output"):
        torch.autograd.functional.jvp(
            lambda a: ct.linear_cross_entropy(a, w, target, reduction="none"), h, h)


def test_forward_mode_ad_goes_to_torch(gen):
    # the operators have no jvp: the tangent was silently dropped (None, zero Jacobians)
    from torch.autograd import forward_ad as fwAD

    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t = _index_target(gen, (5,), 4)
    v = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    with fwAD.dual_level(), pytest.warns(ct.CecoreFallbackWarning, match="forward-mode"):
        tangent = fwAD.unpack_dual(ct.cross_entropy(fwAD.make_dual(x, v), t)).tangent
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(TF.cross_entropy(fwAD.make_dual(x, v), t)).tangent
    assert tangent is not None and torch.allclose(tangent, expected)


def test_batched_backward_and_tensor_subclasses(gen):
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t = _index_target(gen, (5,), 4)
    # nll_loss's check of a non-finite grad_output read the batched one: "Batching rule
    # not implemented for aten::is_nonzero" (hostile review)
    for name in ("cross_entropy", "nll_loss"):
        # an infinite one where the fused gradient times inf is torch's (not softmax's
        # backward, whose -inf + inf at the target is NaN)
        big = np.inf if name == "nll_loss" else 3.0
        for reduction, grad_outputs in (
                ("none", torch.eye(5, dtype=torch.float64)),
                ("mean", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
                ("sum", torch.tensor([1.0, big], dtype=torch.float64))):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            with no_fallback():  # .item() / mul_ on a batched grad_output raised
                (got,) = torch.autograd.grad(getattr(ct, name)(a, t, reduction=reduction), a,
                                             grad_outputs, is_grads_batched=True)
            (expected,) = torch.autograd.grad(getattr(TF, name)(b, t, reduction=reduction),
                                              b, grad_outputs, is_grads_batched=True)
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} {reduction}")
        with no_fallback():
            got = torch.autograd.functional.jacobian(
                lambda z, name=name: getattr(ct, name)(z, t, reduction="none"), x,
                vectorize=True)
        expected = torch.autograd.functional.jacobian(
            lambda z, name=name: getattr(TF, name)(z, t, reduction="none"), x, vectorize=True)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)

    class Sub(torch.Tensor):
        pass

    a = x.clone().requires_grad_()
    loss = ct.cross_entropy(a, t.as_subclass(Sub))  # raised AttributeError (AliasBackward0)
    loss.backward()
    b = x.clone().requires_grad_()
    TF.cross_entropy(b, t).backward()
    assert_close(a.grad.numpy(), b.grad.numpy(), np.float64)
    with pytest.raises(TypeError, match="n_threads must be None or an int"):  # was NoneType
        ct.binary_cross_entropy_with_logits(x, torch.rand(5, 4, dtype=torch.float64),
                                            n_threads=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_computes_the_loss_in_float32_like_torch(gen, dtype):
    # torch returns these losses in float32 under CPU autocast; cecore's came back in the
    # autocast dtype, where a sum overflowed float16 (inf) and GradScaler's scale with it
    lin = torch.nn.Linear(4, 10)
    X = torch.randn(3000, 4, generator=gen) * 30
    Y = _index_target(gen, (3000,), 10)
    y01 = torch.rand(3000, 10, generator=gen)
    W = torch.randn(10, 4, generator=gen)
    for ours, theirs in ((lambda h: ct.cross_entropy(h, Y, reduction="sum"),
                          lambda h: TF.cross_entropy(h, Y, reduction="sum")),
                         (lambda h: ct.nll_loss(h, Y), lambda h: TF.nll_loss(h, Y)),
                         (lambda h: ct.binary_cross_entropy_with_logits(h, y01),
                          lambda h: TF.binary_cross_entropy_with_logits(h, y01)),
                         (lambda h: ct.linear_cross_entropy(X.to(dtype), W.to(dtype), Y),
                          lambda h: TF.linear_cross_entropy(X.to(dtype), W.to(dtype), Y))):
        with torch.autocast("cpu", dtype=dtype), no_fallback():
            got = ours(lin(X))
            expected = theirs(lin(X))
        assert got.dtype == expected.dtype == torch.float32
        # (torch sums 3000 losses of up to ~1e3 in float32, cecore in float64)
        assert torch.isfinite(got) and torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("views, allowed", [(False, False), (True, False), (False, True)])
def test_in_place_modification_before_backward_raises_where_torch_raises(gen, views, allowed):
    # torch's losses save these tensors and raise at backward if one was modified in
    # place (how an optimizer.step() before backward() is caught); cecore's gradient comes
    # from the forward pass, and nothing was raised. With views passed (target.view(-1),
    # weight[:]), cecore's weak references died after the forward and a change of the
    # base went unnoticed (found by a hostile review). Under
    # allow_mutation_on_saved_tensors() torch raises nothing (it keeps the originals), and
    # cecore raised (a later hostile review): then the gradients are compared as well.
    v = (lambda a: a[:]) if views else (lambda a: a)  # noqa: E731
    grads = {}

    def run(module, case):
        if not allowed:
            return run_in(module, case)
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            return run_in(module, case)

    def run_in(module, case):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, generator=g, requires_grad=True)
        z = x * 1
        t, q = torch.tensor([0, 1, 2, 0]), torch.softmax(torch.randn(4, 3, generator=g), 1)
        y, w = torch.rand(4, 3, generator=g), torch.rand(3, generator=g) + 0.5
        lw = torch.randn(3, 3, generator=g, requires_grad=True)
        f = {"ce": lambda: module.cross_entropy(v(z), v(t), weight=v(w)),
             "ce_proba": lambda: module.cross_entropy(v(z), v(q)),
             "nll": lambda: module.nll_loss(v(z), v(t), weight=v(w)),
             "bce": lambda: module.binary_cross_entropy_with_logits(v(z), v(y), weight=v(w),
                                                                    pos_weight=v(w)),
             "linear": lambda: module.linear_cross_entropy(v(z), v(lw), v(t),
                                                           weight=v(w))}[case[0]]
        loss = f()
        with torch.no_grad():
            {"input": z, "target": t, "weight": w, "proba": q, "y": y, "lw": lw}[case[1]].add_(1)
        try:
            loss.backward()
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            return True
        grads[module, case] = x.grad
        return False

    linear_ce = lambda z, lw, t, weight: TF.cross_entropy(z @ lw.T, t, weight=weight)  # noqa: E731

    class Torch:
        cross_entropy, nll_loss = TF.cross_entropy, TF.nll_loss
        binary_cross_entropy_with_logits = TF.binary_cross_entropy_with_logits
        linear_cross_entropy = staticmethod(linear_ce)

    cases = [("ce", "input"), ("ce", "target"), ("ce", "weight"), ("ce_proba", "proba"),
             ("nll", "input"), ("nll", "target"), ("bce", "input"), ("bce", "y"),
             ("bce", "weight"), ("linear", "input"), ("linear", "lw"), ("linear", "target")]
    with no_fallback():
        for case in cases:
            assert run(ct, case) == run(Torch, case), case
            if (ct, case) in grads:
                np.testing.assert_allclose(grads[ct, case].numpy(), grads[Torch, case].numpy(),
                                           rtol=1e-5, atol=1e-7, err_msg=str(case))
    assert not allowed or len(grads) == 2 * len(cases)


def test_option_types_checked_before_the_operator_schema(gen):
    # the schema read chunk_size=True as 1 and gave its own RuntimeErrors for 1.5, "4",
    # 2**70 and backend=None
    x = torch.randn(4, 3, generator=gen, requires_grad=True)
    t, w = _index_target(gen, (4,), 5), torch.randn(5, 3, generator=gen)
    calls = (lambda **kw: ct.cross_entropy(x @ w.T, t, **kw),
             lambda **kw: ct.binary_cross_entropy_with_logits(x, torch.rand(4, 3), **kw),
             lambda **kw: ct.linear_cross_entropy(x, w, t, **kw))
    for call in calls:
        for kw in ({"n_threads": 1.5}, {"n_threads": "4"}, {"backend": None}):
            with pytest.raises(TypeError, match="n_threads|backend"):
                call(**kw)
        with pytest.warns(RuntimeWarning, match="more than"):  # capped, as cecore caps it
            call(n_threads=2**70)
    for chunk_size, error in ((True, TypeError), (1.5, TypeError), (0, ValueError)):
        with pytest.raises(error, match="chunk_size"):
            ct.linear_cross_entropy(x, w, t, chunk_size=chunk_size)
    expected = ct.linear_cross_entropy(x, w, t)
    assert ct.linear_cross_entropy(x, w, t, chunk_size=2**70) == expected


def test_no_grad_computes_loss_only(gen, monkeypatch):
    calls = []
    real = ct._fused
    monkeypatch.setattr(ct, "_fused", lambda f, grad, *a, **k: calls.append(grad) or real(f, grad, *a, **k))
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    target = _index_target(gen, (6,), 4)
    with torch.no_grad():
        loss = ct.cross_entropy(x, target)
    assert calls == [None] and loss.grad_fn is None
    assert_close(loss.numpy(), TF.cross_entropy(x, target).detach().numpy(), np.float32)


def test_torch_func_transforms_use_torch(gen):
    x = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    target = _index_target(gen, (6,), 4)
    with pytest.warns(ct.CecoreFallbackWarning, match="torch.func"):
        grads = torch.func.vmap(torch.func.grad(lambda x: ct.cross_entropy(x, target)))(x)
    expected = torch.func.vmap(torch.func.grad(lambda x: TF.cross_entropy(x, target)))(x)
    assert_close(grads.numpy(), expected.numpy())
    # compiled (per-sample gradients), fullgraph too: Dynamo failed on the operator under
    # the transform, as the check was skipped while compiling (hostile review)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ct.CecoreFallbackWarning)
            grads = torch.compile(torch.func.vmap(torch.func.grad(
                lambda x: ct.cross_entropy(x, target))), fullgraph=fullgraph)(x)
        assert_close(grads.numpy(), expected.numpy())
    torch._dynamo.reset()


# -------------------------------------------------------------- fallback and errors
def test_fallback_warns_once_and_matches_torch(gen):
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64).t()  # (6, 4), not contiguous
    target = _index_target(gen, (6,), 4)
    with pytest.warns(ct.CecoreFallbackWarning, match="contiguous"):
        compare(lambda x: ct.cross_entropy(x, target), lambda x: TF.cross_entropy(x, target), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.cross_entropy(x, target)  # the same reason again: no second warning
    meta = torch.empty(6, 4, device="meta")
    with pytest.warns(ct.CecoreFallbackWarning, match="device 'meta'"):
        assert ct.cross_entropy(meta, target.to("meta"), reduction="none").shape == (6,)


def test_fallback_warning_as_error_raises_every_time(gen):
    # The reason was recorded as shown before warnings.warn raised: under "error" only the
    # first fallback call failed, later ones fell back silently (hostile review).
    x = torch.randn(4, 6, generator=gen).t()
    target = _index_target(gen, (6,), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ct.CecoreFallbackWarning)
        for _ in range(2):
            with pytest.raises(ct.CecoreFallbackWarning, match="contiguous"):
                ct.cross_entropy(x, target)


def test_fallback_compiles_with_fullgraph(gen):
    # (N, L, C) logits transposed to (N, C, L), the sequence-model pattern, are not
    # contiguous and go to torch; its warning broke torch.compile(fullgraph=True) ("call
    # to a function marked as skipped: warnings.warn") unless it had been shown in eager
    # mode before (hostile review).
    torch._dynamo.reset()
    h = torch.randn(2, 6, 5, generator=gen, requires_grad=True)
    t = _index_target(gen, (2, 6), 5)
    compiled = torch.compile(lambda h, t: ct.cross_entropy(h.transpose(1, 2), t),
                             fullgraph=True)
    loss = compiled(h, t)
    loss.backward()
    expected = TF.cross_entropy(h.detach().transpose(1, 2), t)
    assert_close(loss.detach().numpy(), expected.numpy(), np.float32)
    assert ct._warned == set()  # nothing shown while compiling; an eager call warns


def test_target_requiring_grad_goes_to_torch(gen):
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    proba = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), 1).requires_grad_()
    with pytest.warns(ct.CecoreFallbackWarning, match="requires grad"):
        ct.cross_entropy(x, proba).backward()
    expected = torch.autograd.grad(TF.cross_entropy(x, proba), proba)[0]
    assert_close(proba.grad.numpy(), expected.numpy())


def test_bad_arguments_raise_torch_errors(gen):
    x = torch.randn(3, 4, generator=gen)
    t = torch.tensor([0, 1, 2])
    bad_calls = [
        ("cross_entropy", (x, torch.tensor([0, 1, 7])), {}),
        ("cross_entropy", (x, t), dict(weight=torch.ones(3))),
        ("cross_entropy", (x, t), dict(label_smoothing=1.5)),
        ("cross_entropy", (x, t), dict(reduction="average")),
        ("cross_entropy", (x, torch.tensor([0, 1])), {}),
        ("cross_entropy", (x, t.float()), {}),
        ("cross_entropy", (x, torch.softmax(x, 1)), dict(ignore_index=1)),
        ("cross_entropy", (torch.randn(3, generator=gen), t), {}),
        ("nll_loss", (x, torch.tensor([0, -5, 2])), {}),
        ("nll_loss", (x, t), dict(weight=torch.ones(5))),
        ("binary_cross_entropy_with_logits", (x, torch.rand(3, 5)), {}),
        ("binary_cross_entropy_with_logits", (x, torch.rand(3, 4)), dict(pos_weight=torch.ones(3))),
    ]
    for name, args, kw in bad_calls:
        with pytest.raises(Exception) as expected:
            getattr(TF, name)(*args, **kw)
        with pytest.raises(expected.type):
            with no_fallback():
                getattr(ct, name)(*args, **kw)


# ------------------------------------------------------------ linear cross-entropy
def compare_linear(ours, theirs, operands, grad_output, rtol=None):
    """``ours`` and torch's ``theirs`` of (input, linear_weight, linear_bias): equal losses and
    equal gradients of all three operands after backward(grad_output)."""
    results = []
    for f in (ours, theirs):
        leaves = [None if a is None else a.detach().clone().requires_grad_() for a in operands]
        loss = f(*leaves)
        loss.backward(grad_output)
        results.append((loss.detach(), *(None if a is None else a.grad for a in leaves)))
    (loss, *grads), (expected, *expected_grads) = results
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    dtype = _np_dtype(operands[0].dtype)
    assert_close(loss.numpy(), expected.numpy(), dtype, rtol=rtol)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close(g.numpy(), e.numpy(), dtype, rtol=rtol)


def _linear_operands(gen, dtype, batch=(11,), n_features=5, n_classes=7, bias=True):
    return (torch.randn(*batch, n_features, generator=gen, dtype=dtype),
            torch.randn(n_classes, n_features, generator=gen, dtype=dtype) / 2,
            torch.randn(n_classes, generator=gen, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("options", ["plain", "weighted"])
def test_linear_cross_entropy(gen, dtype, reduction, bias, options):
    operands = _linear_operands(gen, dtype, bias=bias)
    kw = dict(reduction=reduction)
    if options == "weighted":
        kw.update(weight=torch.rand(7, generator=gen, dtype=dtype) + 0.2, ignore_index=2,
                  label_smoothing=0.2)
    target = _index_target(gen, (11,), 7, kw.get("ignore_index", -100), p_ignore=0.3)
    with no_fallback():
        # chunk_size=4: three chunks, the last one short
        compare_linear(
            lambda x, w, b: ct.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4, **kw),
            lambda x, w, b: TF.linear_cross_entropy(x, w, target, linear_bias=b, **kw),
            operands, _grad_output(gen, (11,), reduction, dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_unbatched(gen, reduction):
    operands = _linear_operands(gen, torch.float64, batch=())
    target = torch.tensor(3)
    with no_fallback():
        compare_linear(lambda x, w, b: ct.linear_cross_entropy(x, w, target, linear_bias=b,
                                                               reduction=reduction),
                       lambda x, w, b: TF.linear_cross_entropy(x, w, target, linear_bias=b,
                                                               reduction=reduction),
                       operands, _grad_output(gen, (), reduction, torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", [(True, False, False), (False, True, True),
                                       (False, False, True), (True, True, False)])
def test_linear_cross_entropy_computes_no_gradient_of_frozen_operands(gen, reduction,
                                                                      trainable, monkeypatch):
    # Fine-tuning below a frozen unembedding: the weight's N x V x D gradient product is
    # not computed (cecore's numpy function is asked for the other gradients only), and
    # the gradients that are computed are torch's.
    x, w, b = _linear_operands(gen, torch.float64)
    target = _index_target(gen, (11,), 7, -100, p_ignore=0.2)
    asked = []
    real = ct._L.linear_cross_entropy
    monkeypatch.setattr(ct._L, "linear_cross_entropy",
                        lambda *a, **kw: asked.append(kw.get("needs_grad")) or real(*a, **kw))
    g = _grad_output(gen, (11,), reduction, torch.float64)
    grads = []
    for f in (ct.linear_cross_entropy, TF.linear_cross_entropy):
        leaves = [a.detach().clone().requires_grad_(r) for a, r in zip((x, w, b), trainable)]
        with no_fallback():
            f(leaves[0], leaves[1], target, linear_bias=leaves[2],
              reduction=reduction).backward(g)
        grads.append([a.grad for a in leaves])
    for ours, torchs, r in zip(*grads, trainable):
        assert (ours is None) == (torchs is None) == (not r)
        if r:
            assert_close(ours.numpy(), torchs.numpy(), np.float64)
    # forward ('mean') or the backward pass ('none') computed exactly the trainable ones
    assert asked[-1] == trainable
    # the operator called directly with a mask that leaves out a gradient backward needs
    h, lw = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = torch.ops.cecore.linear_cross_entropy(h, lw, target, None, None, -100, "sum", 0.0,
                                                 1, None, "auto", None)[0]
    with pytest.raises(RuntimeError, match="grad_mask=1, without the gradient of linear_weight"):
        loss.backward()


def test_linear_cross_entropy_half_computed_in_float32(gen):
    x, w, b = (a.half() for a in _linear_operands(gen, torch.float32))
    target = _index_target(gen, (11,), 7)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    with no_fallback():
        loss = ct.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2])
    loss.backward()
    leaves32 = [a.float().requires_grad_() for a in (x, w, b)]
    expected = TF.linear_cross_entropy(leaves32[0], leaves32[1], target, linear_bias=leaves32[2])
    expected.backward()
    assert loss.dtype == torch.float16
    assert_close(loss.float().detach().numpy(), expected.half().float().detach().numpy(),
                 np.float32, rtol=2e-3)
    for ours, theirs in zip(leaves, leaves32):
        assert ours.grad.dtype == torch.float16
        assert_close(ours.grad.float().numpy(), theirs.grad.half().float().numpy(), np.float32,
                     rtol=2e-3)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, None),
                                    (torch.float32, torch.bfloat16, None),
                                    (torch.float32, torch.float32, torch.float16)])
def test_linear_cross_entropy_mixed_dtypes_refused_as_torch(gen, dtypes):
    # Half operands are computed in float32: beside a float32 one they went through where
    # torch refuses, and the float32 weight's gradient came back rounded to bfloat16.
    x, w, b = _linear_operands(gen, torch.float32)
    x, w = x.to(dtypes[0]).requires_grad_(), w.to(dtypes[1]).requires_grad_()
    b = None if dtypes[2] is None else b.to(dtypes[2])
    target = _index_target(gen, (11,), 7)
    with pytest.raises(RuntimeError) as theirs:
        TF.linear_cross_entropy(x, w, target, linear_bias=b)
    with pytest.raises(RuntimeError) as ours:
        ct.linear_cross_entropy(x, w, target, linear_bias=b)
    assert str(ours.value) == str(theirs.value)
    # under autocast torch casts them alike: so does cecore
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TF.linear_cross_entropy(x, w, target, linear_bias=b)
        loss = ct.linear_cross_entropy(x, w, target, linear_bias=b)
    assert loss.dtype == expected.dtype == torch.float32


def test_linear_cross_entropy_zero_copy(gen, monkeypatch):
    seen = {}
    real = cecore.linear.linear_cross_entropy

    def spy(input, linear_weight, *args, **kwargs):
        seen["operands"] = [a.__array_interface__["data"][0] for a in (input, linear_weight)]
        result = real(input, linear_weight, *args, **kwargs)
        seen["grads"] = [g.__array_interface__["data"][0] for g in result[1][:2]]
        return result

    monkeypatch.setattr(cecore.linear, "linear_cross_entropy", spy)
    x, w, _ = _linear_operands(gen, torch.float32, bias=False)
    x.requires_grad_()
    w.requires_grad_()
    with no_fallback():
        ct.linear_cross_entropy(x, w, _index_target(gen, (11,), 7)).backward()
    assert seen["operands"] == [x.data_ptr(), w.data_ptr()]
    assert seen["grads"] == [x.grad.data_ptr(), w.grad.data_ptr()]


def test_linear_gradcheck(gen):
    operands = [a.requires_grad_() for a in _linear_operands(gen, torch.float64, batch=(6,))]
    target = _index_target(gen, (6,), 7, p_ignore=0.2)
    weight = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    with no_fallback():
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda x, w, b: ct.linear_cross_entropy(
                    x, w, target, linear_bias=b, weight=weight, reduction=reduction,
                    label_smoothing=0.1, chunk_size=4), operands)


def test_linear_module_matches_torch(gen):
    torch.manual_seed(0)
    ours = ct.LinearCrossEntropyLoss(5, 7, bias=True, label_smoothing=0.1, chunk_size=3)
    theirs = torch.nn.LinearCrossEntropyLoss(5, 7, bias=True, label_smoothing=0.1)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    x = torch.randn(10, 5, generator=gen)
    target = _index_target(gen, (10,), 7)
    with no_fallback():
        ours(x, target).backward()
    theirs(x, target).backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad.numpy(), q.grad.numpy(), np.float32)


def test_linear_fallbacks_and_backward_twice(gen):
    x, w, b = (a.requires_grad_() for a in _linear_operands(gen, torch.float64))
    proba = torch.softmax(torch.randn(11, 7, generator=gen, dtype=torch.float64), 1)
    with pytest.warns(ct.CecoreFallbackWarning, match="probability"):
        loss = ct.linear_cross_entropy(x, w, proba, linear_bias=b)
    assert_close(loss.detach().numpy(),
                 TF.linear_cross_entropy(x, w, proba, linear_bias=b).detach().numpy())
    with pytest.warns(ct.CecoreFallbackWarning, match="K-dimensional"):
        ct.linear_cross_entropy(x, torch.randn(7, 2, 5, dtype=torch.float64),
                                _index_target(gen, (11, 2), 7))
    target = _index_target(gen, (11,), 7)
    for reduction in ("sum", "none"):
        with no_fallback():
            loss = ct.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction)
        loss.sum().backward(retain_graph=True)
        loss.sum().backward()
        with pytest.raises(RuntimeError, match="second time"):
            loss.sum().backward()
    # Two reductions, two backwards each: four times the gradient of one.
    expected = torch.autograd.grad(TF.linear_cross_entropy(x, w, target, linear_bias=b,
                                                           reduction="sum"), (x, w, b))
    for operand, e in zip((x, w, b), expected):
        assert_close(operand.grad.numpy(), 4 * e.numpy())


# ------------------------------------------------------------ custom op machinery
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 2, generator=gen, requires_grad=True)
    t = _index_target(gen, (4, 2), 5, p_ignore=0.3)
    p = torch.softmax(torch.randn(4, 5, 2, generator=gen), dim=1)
    w = torch.rand(5, generator=gen) + 0.5
    y = torch.rand(4, 5, 2, generator=gen)
    cases = [
        (torch.ops.cecore.cross_entropy.default, (x, t, w, -100, "mean", 0.1, True, "auto", None)),
        (torch.ops.cecore.cross_entropy.default, (x, p, None, -100, "none", 0.0, True, "auto", None)),
        (torch.ops.cecore.cross_entropy.default, (x.detach(), t, None, -100, "sum", 0.0, False, "auto", None)),
        (torch.ops.cecore.nll_loss.default, (x, t, w, -100, "none", True, "auto", None)),
        (torch.ops.cecore.binary_cross_entropy_with_logits.default,
         (x, y, None, w[:, None], "mean", True, "auto", None)),
        # wider probabilities: a float64 loss from float32 logits (the fake must agree)
        (torch.ops.cecore.cross_entropy.default, (x, p.double(), None, -100, "none", 0.0, True,
                                                  "auto", None)),
        (torch.ops.cecore.binary_cross_entropy_with_logits.default,
         (x, y.double(), None, None, "mean", True, "auto", None)),
    ]
    h = torch.randn(6, 3, generator=gen, requires_grad=True)
    lw = torch.randn(5, 3, generator=gen, requires_grad=True)
    lt = _index_target(gen, (6,), 5, p_ignore=0.3)
    cases += [
        (torch.ops.cecore.linear_cross_entropy.default,
         (h, lw, lt, w.requires_grad_(), None, -100, "mean", 0.1, 7, 4, "auto", None)),
        (torch.ops.cecore.linear_cross_entropy.default,
         (h, lw, lt, None, w, -100, "none", 0.0, 0, None, "auto", None)),
        # only the input's gradient (a frozen linear_weight)
        (torch.ops.cecore.linear_cross_entropy.default,
         (h, lw.detach(), lt, None, None, -100, "sum", 0.0, 1, None, "auto", None)),
        (torch.ops.cecore.linear_cross_entropy_backward.default,
         (torch.randn(6, generator=gen), h.detach(), lw.detach(), lt, None, w.detach(), -100,
          0.0, 2, "auto", None, 7)),
        (torch.ops.cecore.linear_cross_entropy_backward.default,
         (torch.randn(6, generator=gen), h.detach(), lw.detach(), lt, None, w.detach(), -100,
          0.0, 2, "auto", None, 2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_model_fullgraph(gen):
    # One compiled graph (fullgraph: a graph break is an error) with two of the operators.
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 5)
    reference = copy.deepcopy(torch.nn.ModuleList([body, head]))
    loss_fn = ct.CrossEntropyLoss(label_smoothing=0.1)

    def total_loss(ce, linear_ce, body, head, a, t):
        h = body(a)
        return ce(head(h), t) + linear_ce(h, head.weight, t, linear_bias=head.bias,
                                          reduction="sum")

    compiled = torch.compile(lambda a, t: total_loss(loss_fn, ct.linear_cross_entropy, body,
                                                     head, a, t), fullgraph=True)
    a = torch.randn(12, 6, generator=gen)
    t = _index_target(gen, (12,), 5, p_ignore=0.2)
    with no_fallback():
        loss = compiled(a, t)
    loss.backward()
    expected = total_loss(lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.1),
                          TF.linear_cross_entropy, *reference, a, t)
    expected.backward()
    assert_close(loss.detach().numpy(), expected.detach().numpy(), np.float32)
    for p, q in zip([*body.parameters(), *head.parameters()], reference.parameters()):
        assert_close(p.grad.numpy(), q.grad.numpy(), np.float32)


# ---------------------------------------------------------------------- training
def test_sgd_training_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7))
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 10, generator=gen), torch.randint(0, 7, (64,), generator=gen))
            for _ in range(20)]
    for net, loss_fn in ((model, ct.CrossEntropyLoss()), (reference, torch.nn.CrossEntropyLoss())):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for a, t in data:
            optimizer.zero_grad()
            loss_fn(net(a), t).backward()
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6)


class _LossDataset(torch.utils.data.Dataset):
    """Each item: cecore's loss and input gradient for a fixed random batch, and its inputs."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(256, 300, generator=gen, requires_grad=True)
        t = torch.randint(0, 300, (256,), generator=gen)
        loss = ct.cross_entropy(x, t, n_threads=2)
        loss.backward()
        return x.detach(), t, loss.detach(), x.grad


def test_dataloader_fork_workers():
    # Use cecore's threads in the parent first: a thread pool that does not survive fork
    # would hang the workers (the timeout turns a hang into a failure).
    ct.cross_entropy(torch.randn(512, 300), torch.randint(0, 300, (512,)), n_threads=2)
    loader = torch.utils.data.DataLoader(_LossDataset(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    n_items = 0
    for x, t, loss, grad in loader:
        x = x.requires_grad_()
        expected = TF.cross_entropy(x, t)
        expected.backward()
        assert_close(loss.numpy(), expected.detach().numpy(), np.float32)
        assert_close(grad.numpy(), x.grad.numpy(), np.float32)
        n_items += 1
    assert n_items == 4


@pytest.mark.parametrize("loss", ["ce", "ce_smooth", "ce_kdim", "nll"])
@pytest.mark.parametrize("upstream", ["sqrt", "inf_mean"])
def test_ignored_positions_get_zero_gradient_whatever_grad_output(gen, loss, upstream):
    # torch skips ignored positions; cecore multiplied their saved zero gradient by
    # grad_output, and the loss's sqrt (infinite slope at an ignored loss of 0) or an
    # infinite scalar made them NaN, which then spread into every parameter
    shape, tshape = ((4, 5, 3), (4, 3)) if loss == "ce_kdim" else ((4, 5), (4,))
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = _index_target(gen, tshape, 5)
    t.view(-1)[1] = -100
    kw = {"label_smoothing": 0.2} if loss == "ce_smooth" else {}
    grads = []
    for fn in ((ct.nll_loss, TF.nll_loss) if loss == "nll" else (ct.cross_entropy, TF.cross_entropy)):
        x = x0.clone().requires_grad_()
        if upstream == "sqrt":
            fn(x, t, reduction="none", **kw).sqrt().sum().backward()
        else:
            fn(x, t, **kw).backward(torch.tensor(float("inf"), dtype=torch.float64))
        grads.append(x.grad)
    ours, theirs = grads
    ignored = (t == -100).unsqueeze(1).expand(shape)
    assert (ours[ignored] == 0).all() and (theirs[ignored] == 0).all()
    if upstream == "sqrt":
        assert_close(ours.numpy(), theirs.numpy(), np.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [float("inf"), float("nan")])
def test_linear_ignored_rows_get_zero_gradient_whatever_grad_output(gen, reduction, upstream):
    # The linear loss's mean/sum backward scaled its saved gradients by grad_output, so an
    # infinite or NaN one made the ignored rows' zeros NaN; torch gives 0 there.
    x0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t = _index_target(gen, (6,), 5)
    t[[1, 4]] = -100
    grads = []
    for fn in (ct.linear_cross_entropy, TF.linear_cross_entropy):
        x = x0.clone().requires_grad_()
        fn(x, w, t, reduction=reduction).backward(torch.tensor(upstream, dtype=torch.float64))
        grads.append(x.grad)
    for grad in grads:
        assert (grad[[1, 4]] == 0).all()
        assert not torch.isfinite(grad[[0, 2, 3, 5]]).any()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduction, upstream", [("sum", float("inf")), ("mean", float("nan")),
                                                  ("none", "nan_row"), ("none", "inf_row")])
def test_nll_loss_non_targets_stay_zero_whatever_grad_output(gen, reduction, upstream,
                                                             compiled):
    # torch's nll_loss backward writes the targets' entries only; the saved zeros of the
    # others times an infinite or NaN grad_output were NaN (compiled: still, until the
    # select ran there too). Oracle: torch, bit for bit.
    x0 = torch.log_softmax(torch.randn(5, 4, 2, generator=gen, dtype=torch.float64), 1)
    t = _index_target(gen, (5, 2), 4)
    t[2, 1] = -100
    if isinstance(upstream, float):
        g = torch.tensor(upstream, dtype=torch.float64)
    else:
        g = torch.ones(5, 2, dtype=torch.float64)
        g[1, 0] = float("nan") if upstream == "nan_row" else float("inf")
    grads = []
    for fn in (ct.nll_loss, TF.nll_loss):
        x = x0.clone().requires_grad_()
        with no_fallback():
            (torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn)(
                x, t, reduction=reduction).backward(g)
        grads.append(x.grad)
    np.testing.assert_array_equal(grads[0].numpy(), grads[1].numpy())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [float("inf"), float("nan")])
def test_linear_every_row_ignored_gives_zero_gradients_whatever_grad_output(gen, reduction,
                                                                           upstream, compiled):
    # The weight's and bias's gradients are sums over rows: all of them ignored, torch's
    # are 0, and the saved zeros times an infinite or NaN grad_output were NaN (compiled:
    # still, until selects replaced the branch on the data there).
    x0, w0, b0 = (torch.randn(*s, generator=gen, dtype=torch.float64)
                  for s in ((3, 2), (4, 2), (4,)))
    t = torch.full((3,), -100)
    grads = []
    for fn in (ct.linear_cross_entropy, TF.linear_cross_entropy):
        x, w, b = (a.clone().requires_grad_() for a in (x0, w0, b0))
        with no_fallback():
            (torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn)(
                x, w, t, linear_bias=b, reduction=reduction).backward(
                torch.tensor(upstream, dtype=torch.float64))
        grads.append((x.grad, w.grad, b.grad))
    for ours, theirs in zip(*grads):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


@pytest.mark.parametrize("dtype, ignore_index, cls", [(torch.uint8, -100, 156),
                                                       (torch.int16, 65538, 2)])
@pytest.mark.parametrize("loss", ["ce", "nll"])
def test_narrow_targets_do_not_match_a_wrapped_ignore_index(gen, dtype, ignore_index, cls,
                                                            loss):
    # The ignored positions were found by comparing the target with ignore_index in the
    # target's dtype, where torch wraps -100 to 156 in uint8 (65538 to 2 in int16): every
    # position of that class got a zero gradient, while the loss stayed right. That mask
    # runs with reduction='none', and for 'mean' under create_graph or torch.compile.
    C = 200
    t = torch.tensor([cls, 3, cls, 5], dtype=dtype)
    x0 = torch.randn(4, C, generator=gen, dtype=torch.float64)
    ours_fn, theirs_fn = (ct.nll_loss, TF.nll_loss) if loss == "nll" else \
        (ct.cross_entropy, TF.cross_entropy)
    prep = (lambda a: torch.log_softmax(a, 1)) if loss == "nll" else (lambda a: a)
    for kw, upstream in (({"reduction": "none"}, torch.ones(4, dtype=torch.float64)),
                         ({}, None)):
        x = x0.clone().requires_grad_()
        ours = torch.autograd.grad(ours_fn(prep(x), t, ignore_index=ignore_index, **kw), x,
                                   upstream, create_graph=not kw)[0]
        x = x0.clone().requires_grad_()
        theirs = torch.autograd.grad(theirs_fn(prep(x), t.long(), **kw), x, upstream)[0]
        assert ours[0].abs().sum() > 0
        assert_close(ours.detach().numpy(), theirs.numpy(), np.float64)


def test_jvp_through_temporaries_and_hessians_still_raise(gen):
    # The guard that makes second derivatives raise was hung on a weak reference to the
    # logits; a temporary (x @ W, a reshaped weight, an autocast copy) was gone by backward
    # and a JVP raised "differentiable once" although it needs no second derivative.
    h = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = _index_target(gen, (4,), 5)
    v = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    module = ct.LinearCrossEntropyLoss(3, 5, dtype=torch.float64)
    reference = torch.nn.LinearCrossEntropyLoss(3, 5, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    for ours, theirs in ((lambda a: ct.cross_entropy(a @ w.T, t), lambda a: TF.cross_entropy(a @ w.T, t)),
                         (lambda a: ct.nll_loss(torch.log_softmax(a @ w.T, 1), t),
                          lambda a: TF.nll_loss(torch.log_softmax(a @ w.T, 1), t)),
                         (lambda a: module(a, t), lambda a: reference(a, t))):
        with no_fallback():
            got = torch.autograd.functional.jvp(ours, h, v)[1]
            with pytest.raises(RuntimeError, match="differentiable once"):
                torch.autograd.functional.hessian(ours, h)
        assert_close(got.numpy(), torch.autograd.functional.jvp(theirs, h, v)[1].numpy(),
                     np.float64)


def test_jit_trace_with_inputs_that_need_no_gradient(gen):
    # the trace recorded with_grad=False as a constant: its losses then had no gradient
    x = torch.randn(6, 4, generator=gen)
    t = _index_target(gen, (6,), 4)
    with no_fallback():
        traced = torch.jit.trace(lambda a, b: ct.cross_entropy(a, b), (x, t))
        a = x.clone().requires_grad_()
        traced(a, t).backward()
    b = x.clone().requires_grad_()
    TF.cross_entropy(b, t).backward()
    assert_close(a.grad.numpy(), b.grad.numpy(), np.float32)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_integer_class_weights_give_torchs_error_or_torchs_loss(gen, dtype):
    # torch refuses an integer class weight with class-index targets ("expected scalar
    # type Float but found Long") and takes it with probability targets and in BCE;
    # cecore took it everywhere (found by a hostile review). Oracle: torch's own calls.
    x = torch.randn(4, 3, generator=gen)
    t, q, y = torch.tensor([0, 1, 2, 0]), torch.softmax(torch.randn(4, 3, generator=gen), 1), \
        torch.rand(4, 3, generator=gen)
    w = torch.ones(3, dtype=dtype)
    calls = {"ce": lambda m: m.cross_entropy(x, t, weight=w),
             "nll": lambda m: m.nll_loss(x, t, weight=w),
             "linear": lambda m: m.linear_cross_entropy(x, torch.ones(3, 3), t, weight=w),
             "ce_proba": lambda m: m.cross_entropy(x, q, weight=w),
             "bce": lambda m: m.binary_cross_entropy_with_logits(x, y, weight=torch.ones(
                 4, 3, dtype=dtype), pos_weight=w)}
    for name, call in calls.items():
        try:
            expected = call(TF)
        except RuntimeError as error:
            with pytest.raises(RuntimeError) as ours:
                call(ct)
            assert str(ours.value) == str(error), name
            assert name in ("ce", "nll", "linear")
        else:
            assert_close(call(ct).numpy(), expected.numpy(), np.float32)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "bce"])
def test_program_exported_under_no_grad_trains_like_torchs(gen, loss):
    # torch.export recorded with_grad=False as a constant when exported under no_grad:
    # the program's backward then raised, where torch's own loss's works (found by a
    # hostile review). Oracle: the same module with torch's loss, exported the same way.
    class Model(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.lin, self.fn = torch.nn.Linear(4, 3), fn

        def forward(self, x, t):
            z = self.lin(x)
            return self.fn(torch.log_softmax(z, 1) if loss == "nll_loss" else z, t)

    x = torch.randn(5, 4, generator=gen)
    t = torch.rand(5, 3, generator=gen) if loss == "bce" else _index_target(gen, (5,), 3)
    name = "binary_cross_entropy_with_logits" if loss == "bce" else loss
    grads = []
    for fn in (getattr(ct, name), getattr(TF, name)):
        torch.manual_seed(0)
        model = Model(fn)
        with no_fallback(), torch.no_grad():
            program = torch.export.export(model, (x, t))
        module = program.module()
        module(x, t).backward()
        grads.append([p.grad for p in module.parameters()])
    assert len(grads[0]) == 2
    for ours, theirs in zip(*grads):
        assert_close(ours.numpy(), theirs.numpy(), np.float32)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "bce"])
def test_jit_trace_of_logits_that_are_an_intermediate(gen, loss):
    # The anchors' clones were recorded under names the trace's check run did not
    # reproduce: torch.jit.trace raised "Graphs differed across invocations" by default.
    ours, theirs = {
        "cross_entropy": (lambda a, w, t: ct.cross_entropy(a @ w, t),
                          lambda a, w, t: TF.cross_entropy(a @ w, t)),
        "nll_loss": (lambda a, w, t: ct.nll_loss((a @ w).log_softmax(1), t),
                     lambda a, w, t: TF.nll_loss((a @ w).log_softmax(1), t)),
        "bce": (lambda a, w, t: ct.binary_cross_entropy_with_logits(a @ w, t),
                lambda a, w, t: TF.binary_cross_entropy_with_logits(a @ w, t)),
    }[loss]
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    w = torch.randn(4, 4, generator=gen, requires_grad=True)
    t = torch.rand(6, 4, generator=gen) if loss == "bce" else _index_target(gen, (6,), 4)
    with no_fallback(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.trace's own, in torch 2.13
        traced = torch.jit.trace(ours, (x, w, t))
        got = torch.autograd.grad(traced(x, w, t), (x, w))
    expected = torch.autograd.grad(theirs(x, w, t), (x, w))
    for a, b in zip(got, expected):
        assert_close(a.numpy(), b.numpy(), np.float32)


def test_fx_symbolic_trace_keeps_cecores_losses_in_the_graph(gen):
    # FX's proxies are not tensors: the functions passed them to torch's loss, which then
    # stood in the graph in cecore's place, without a warning
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 6)
            self.ce = ct.CrossEntropyLoss(label_smoothing=0.1)
            self.lce = ct.LinearCrossEntropyLoss(4, 6)

        def forward(self, x, t):
            logits = self.linear(x)
            return (self.ce(logits, t) + ct.nll_loss(logits.log_softmax(1), t)
                    + ct.binary_cross_entropy_with_logits(logits, logits.detach().sigmoid())
                    + self.lce(x, t))

    model = Model()
    graph = torch.fx.symbolic_trace(model)
    for name in ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
                 "linear_cross_entropy"):
        assert f"cecore_torch_{name}(" in graph.code
    x = torch.randn(5, 4, generator=gen)
    t = _index_target(gen, (5,), 6)
    with no_fallback():
        assert_close(graph(x, t).detach().numpy(), model(x, t).detach().numpy(), np.float32)


def test_probabilities_with_a_wider_class_weight_give_torchs_loss_dtype(gen):
    # torch multiplies the float32 log-probabilities by the float64 weight: a float64 loss
    x = torch.randn(4, 5, generator=gen, requires_grad=True)
    p = torch.rand(4, 5, generator=gen).softmax(1)
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    for reduction in ("mean", "none"):
        expected = TF.cross_entropy(x, p, weight=w, reduction=reduction)
        for fn in (ct.cross_entropy, torch.compile(ct.cross_entropy, fullgraph=True)):
            with no_fallback():
                got = fn(x, p, weight=w, reduction=reduction)
            assert got.dtype == expected.dtype == torch.float64
            assert_close(got.detach().numpy(), expected.detach().numpy(), np.float32)
            assert torch.autograd.grad(got.sum(), x)[0].dtype == torch.float32


@pytest.mark.parametrize("case", ["bias", "input_frozen_weight", "weight_frozen_input"])
def test_linear_in_place_checks_follow_what_torch_saves(gen, case):
    # torch's linear saves the input only for the weight's gradient and the weight only
    # for the input's, and never the bias: cecore raised in all three cases
    def run(fn):
        g = torch.Generator().manual_seed(0)
        # "input_frozen_weight": the input is modified, the weight needs no gradient
        h = torch.randn(4, 3, generator=g, dtype=torch.float64,
                        requires_grad=case != "weight_frozen_input")
        w = torch.randn(5, 3, generator=g, dtype=torch.float64,
                        requires_grad=case != "input_frozen_weight")
        b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0, 1, 4, 2])
        loss = fn(h, w, t, linear_bias=b)
        with torch.no_grad():
            {"bias": b, "input_frozen_weight": h, "weight_frozen_input": w}[case].add_(1)
        loss.backward()
        return [p.grad for p in (h, w, b) if p.requires_grad]

    with no_fallback():
        ours = run(ct.linear_cross_entropy)
    theirs = run(TF.linear_cross_entropy)
    for a, b in zip(ours, theirs):
        assert_close(a.numpy(), b.numpy(), np.float64)


def test_inference_tensors_and_integer_probability_shaped_targets_give_torchs_errors(gen):
    with torch.inference_mode():
        t = torch.tensor([1, 0])
    x = torch.randn(2, 3, generator=gen, requires_grad=True)
    for fn in (TF.cross_entropy, ct.cross_entropy):
        with pytest.raises(RuntimeError, match="make a clone"):
            fn(x, t)
    # an integer target of shape (N, V): torch blames its dtype; cecore's -100 in place of
    # torch's default ignore_index made torch blame ignore_index
    h, w = torch.randn(2, 3, generator=gen), torch.randn(4, 3, generator=gen)
    for fn in (TF.linear_cross_entropy, ct.linear_cross_entropy):
        with pytest.raises(RuntimeError, match="Expected floating point type for target"):
            fn(h, w, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out_of_range_uint8_target_raises_an_index_error(gen, reduction):
    # The segmentation case without ignore_index=255: torch 2.13's own message fails to
    # decode for reduction='none' (UnicodeDecodeError), and that was what cecore re-raised.
    x = torch.randn(3, 5, generator=gen, requires_grad=True)
    t = torch.tensor([0, 255, 1], dtype=torch.uint8)
    with pytest.raises(IndexError, match="Target 255 is out of bounds"):
        ct.cross_entropy(x, t, reduction=reduction)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "linear"])
def test_uint64_target_beyond_int64_is_named_as_given(gen, loss):
    # torch takes no uint64 target; replayed as int64, 2**63 + 5 was reported as
    # -9223372036854775803.
    value = 2**63 + 5
    t = torch.tensor([0, value, 1], dtype=torch.uint64)
    x = torch.randn(3, 5, generator=gen, requires_grad=True)
    with pytest.raises(IndexError, match=f"Target {value} is out of bounds"):
        if loss == "linear":
            ct.linear_cross_entropy(x, torch.randn(4, 5, generator=gen), t)
        else:
            getattr(ct, loss)(x, t)


@pytest.mark.parametrize("case", ["int32 target", "int8 target", "float64 weight", "nll int16",
                                  "linear int8"])
def test_out_of_range_target_error_with_dtypes_only_cecore_takes(gen, case):
    # cecore takes integer targets of any width and weights of any float dtype; for a
    # target out of range it replayed the call through torch, which blamed the dtype
    # ("expected target dtype to be Long") instead. The oracle: torch's error for the
    # same call in the dtypes it takes.
    x = torch.randn(3, 5, generator=gen)
    t = torch.tensor([1, 2, 7])
    dtype = {"int32 target": torch.int32, "int8 target": torch.int8,
             "nll int16": torch.int16, "linear int8": torch.int8}.get(case, torch.long)
    weight = torch.ones(5, dtype=torch.float64) if case == "float64 weight" else None
    if case == "linear int8":
        h, w = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
        ours, theirs = (lambda: ct.linear_cross_entropy(h, w, t.to(dtype)),
                        lambda: TF.linear_cross_entropy(h, w, t))
    else:
        ct_fn, tf_fn = ((ct.nll_loss, TF.nll_loss) if case.startswith("nll")
                        else (ct.cross_entropy, TF.cross_entropy))
        ours = lambda: ct_fn(x, t.to(dtype), weight)  # noqa: E731
        theirs = lambda: tf_fn(x, t, None if weight is None else weight.float())  # noqa: E731
    with pytest.raises(IndexError) as expected:
        theirs()
    with pytest.raises(IndexError) as got:
        ours()
    assert str(got.value) == str(expected.value)


def test_elementwise_mean_is_torchs_deprecated_mean(gen):
    # torch 2.13 still takes reduction='elementwise_mean' with a deprecation warning;
    # cecore refused it.
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 3, 0])
    y = torch.rand(4, 5, generator=gen, dtype=torch.float64)
    h, w = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen,
                                                                             dtype=torch.float64)
    for ours, theirs, args in ((ct.cross_entropy, TF.cross_entropy, (x, t)),
                               (ct.nll_loss, TF.nll_loss, (x, t)),
                               (ct.binary_cross_entropy_with_logits,
                                TF.binary_cross_entropy_with_logits, (x, y)),
                               (ct.linear_cross_entropy, TF.linear_cross_entropy, (h, w, t)),
                               (cecore.cross_entropy, TF.cross_entropy, (x, t))):
        with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
            theirs(*args, reduction="elementwise_mean")
        expected = theirs(*args, reduction="mean")
        with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
            got = ours(*(a.numpy() if ours is cecore.cross_entropy else a for a in args),
                       reduction="elementwise_mean")
        assert_close(np.asarray(got), expected.numpy(), np.float64)


@pytest.mark.parametrize("ignore", [[2], [[2]], [2.0], [2, 3]])
def test_ignore_index_as_a_tensor_as_torch_takes_it(gen, ignore):
    # torch takes an integer tensor of one element, of any number of dimensions, for
    # ignore_index; cecore took only 0-d ones. The oracle: torch's value or error.
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    for ours, theirs in ((ct.cross_entropy, TF.cross_entropy), (ct.nll_loss, TF.nll_loss)):
        try:
            expected = theirs(x, t, ignore_index=torch.tensor(ignore))
        except TypeError as error:
            with pytest.raises(TypeError) as got:
                ours(x, t, ignore_index=torch.tensor(ignore))
            assert str(got.value) == str(error)
        else:
            assert_close(ours(x, t, ignore_index=torch.tensor(ignore)).numpy(),
                         expected.numpy(), np.float64)


def test_a_sparse_target_falls_back_to_torch(gen):
    # The fallback checked the input's layout only: a sparse probability target reached
    # cecore's operator, which has no sparse kernel (NotImplementedError). torch's forward
    # computes it (its backward does not), so it goes there with the warning.
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), 1).to_sparse()
    with pytest.warns(ct.CecoreFallbackWarning, match="not a dense tensor"):
        got = ct.cross_entropy(x, q)
    assert_close(got.numpy(), TF.cross_entropy(x, q).numpy(), np.float64)


@pytest.mark.parametrize("case", ["float64 index target", "float16 index target",
                                  "int32 probability-shaped target", "int16 bce target"])
def test_dtype_errors_name_the_dtype_passed(gen, case):
    # The replay through torch converted targets and weights to torch's dtypes for every
    # error (to report a target out of range as torch does), so a dtype torch refuses
    # came back named as the converted one ("got Float" for a float64 target).
    x = torch.randn(3, 5, generator=gen)
    ours, theirs, target = {
        "float64 index target": (ct.cross_entropy, TF.cross_entropy,
                                 torch.tensor([1.0, 2, 3], dtype=torch.float64)),
        "float16 index target": (ct.nll_loss, TF.nll_loss,
                                 torch.tensor([1.0, 2, 3], dtype=torch.float16)),
        "int32 probability-shaped target": (ct.cross_entropy, TF.cross_entropy,
                                            torch.zeros(3, 5, dtype=torch.int32)),
        "int16 bce target": (ct.binary_cross_entropy_with_logits,
                             TF.binary_cross_entropy_with_logits,
                             torch.zeros(3, 5, dtype=torch.int16)),
    }[case]
    with pytest.raises(RuntimeError) as expected:
        theirs(x, target)
    with pytest.raises(RuntimeError) as got:
        ours(x, target)
    assert str(got.value) == str(expected.value)


def test_elementwise_mean_warns_at_the_caller_and_compiles(gen):
    # The warning pointed into cecore (the functions' wrapper), so the default filter
    # showed it once for every call site; and under torch.compile(fullgraph=True) Dynamo
    # could not trace it, where torch's own function compiles.
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    for call in (lambda: cecore.cross_entropy(x.numpy(), t.numpy(), reduction="elementwise_mean"),
                 lambda: cecore.CrossEntropyLoss(reduction="elementwise_mean")(x.numpy(),
                                                                                t.numpy()),
                 lambda: ct.cross_entropy(x, t, reduction="elementwise_mean")):
        with pytest.warns(UserWarning, match="elementwise_mean") as caught:
            call()
        assert caught[0].filename == __file__
    compiled = torch.compile(lambda a, b: ct.cross_entropy(a, b, reduction="elementwise_mean"),
                             fullgraph=True)
    assert_close(compiled(x, t).numpy(), TF.cross_entropy(x, t).numpy(), np.float64)


@pytest.mark.parametrize("n_threads", [2**31, 2**63, 2**64])
def test_huge_n_threads_warns_with_the_number_asked(gen, n_threads):
    # capped to int32 for the operator's schema first, the warning said
    # "n_threads=2147483647 is more than ..." (hostile review)
    from cecore._config import cpus_available
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = _index_target(gen, (4,), 3)
    with pytest.warns(RuntimeWarning, match=f"n_threads={n_threads} is more than the "
                                            f"{cpus_available()} CPUs"):
        loss = ct.cross_entropy(x, t, n_threads=n_threads)
    loss.backward()
    b = x.detach().clone().requires_grad_()
    TF.cross_entropy(b, t).backward()
    assert_close(x.grad.numpy(), b.grad.numpy(), np.float64)
    # compiled: capping there called what Dynamo cannot trace (the CPU count), and
    # fullgraph=True failed (a later review)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ct.cross_entropy(a, b, n_threads=n_threads),
                             backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_close(compiled(b.detach(), t).numpy(), TF.cross_entropy(b.detach(), t).numpy(),
                     np.float64)
    torch._dynamo.reset()
