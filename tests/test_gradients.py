"""Every gradient against central finite differences of cecore's own loss (float64).

The oracle is independent of torch: ``d/dx sum(grad_output * loss(x))`` estimated as
``(f(x + h e_i) - f(x - h e_i)) / 2h`` coordinate by coordinate on small random inputs.
"""

import numpy as np
import pytest

import cecore

H = 1e-6


def _finite_difference(f, x):
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += H
        xm[i] -= H
        grad[i] = (f(xp) - f(xm)) / (2 * H)
    return grad


def _check(fn, x, target, reduction, grad_output, **kwargs):
    """``fn``'s return_grad gradient vs finite differences of its loss."""
    _, grad = fn(x, target, reduction=reduction, return_grad=True, grad_output=grad_output,
                 **kwargs)
    g = 1.0 if grad_output is None else np.asarray(grad_output)

    def objective(xx):
        return float(np.sum(g * fn(xx, target, reduction=reduction, **kwargs)))
    expected = _finite_difference(objective, x)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


def _grad_output(rng, reduction, shape):
    return rng.standard_normal(shape) if reduction == "none" else rng.uniform(0.5, 2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 2, 2)])
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.3}, {"weight": True}, {"ignore_index": 1},
    {"label_smoothing": 0.2, "weight": True, "ignore_index": 2},
    {"label_smoothing": 1.0, "weight": True},
])
def test_cross_entropy_index_gradient(backend, rng, reduction, shape, options):
    x = 2 * rng.standard_normal(shape)
    n_classes = shape[1]
    t_shape = shape[:1] + shape[2:]
    target = rng.integers(0, n_classes, t_shape)
    kwargs = dict(options, backend=backend)
    if options.get("weight"):
        kwargs["weight"] = rng.uniform(0.3, 3.0, n_classes)
    if "ignore_index" in options:
        target.flat[0] = options["ignore_index"]  # at least one ignored position
    _check(cecore.cross_entropy, x, target, reduction, _grad_output(rng, reduction, t_shape),
           **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 3)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.25, "weight": True}])
def test_cross_entropy_proba_gradient(backend, rng, reduction, shape, options):
    x = 2 * rng.standard_normal(shape)
    target = rng.random(shape)
    target /= target.sum(axis=1, keepdims=True)
    kwargs = dict(options, backend=backend)
    if options.get("weight"):
        kwargs["weight"] = rng.uniform(0.3, 3.0, shape[1])
    _check(cecore.cross_entropy, x, target, reduction,
           _grad_output(rng, reduction, shape[:1] + shape[2:]), **kwargs)


def test_cross_entropy_unbatched_gradient(backend, rng):
    x = rng.standard_normal(5)
    _check(cecore.cross_entropy, x, np.int64(2), "none", np.float64(1.7), backend=backend,
           label_smoothing=0.1, weight=rng.uniform(0.5, 2.0, 5))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": True}, {"weight": True, "ignore_index": 0}])
def test_nll_loss_gradient(backend, rng, reduction, options):
    x = rng.standard_normal((6, 4, 2))
    target = rng.integers(0, 4, (6, 2))
    target[0, 0] = 0
    kwargs = dict(options, backend=backend)
    if options.get("weight"):
        kwargs["weight"] = rng.uniform(0.3, 3.0, 4)
    _check(cecore.nll_loss, x, target, reduction, _grad_output(rng, reduction, (6, 2)), **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    {}, {"weight": (3, 1)}, {"pos_weight": (4,)}, {"weight": (4,), "pos_weight": (1,)},
])
def test_bce_gradient(backend, rng, reduction, options):
    x = 3 * rng.standard_normal((3, 4))
    y = rng.random((3, 4))
    y[0] = [0.0, 1.0, 0.0, 1.0]
    kwargs = {k: rng.uniform(0.3, 4.0, shape) for k, shape in options.items()}
    _check(cecore.binary_cross_entropy_with_logits, x, y, reduction,
           _grad_output(rng, reduction, x.shape), backend=backend, **kwargs)


def test_softmax_is_the_gradient_of_logsumexp(backend, rng):
    # The softmax kernel checked through its defining identity: d logsumexp / dx = softmax.
    x = rng.standard_normal((7, 5))
    g = rng.standard_normal(7)
    expected = _finite_difference(lambda xx: float(g @ cecore.logsumexp(xx, backend=backend)), x)
    np.testing.assert_allclose(g[:, None] * cecore.softmax(x, backend=backend), expected,
                               rtol=1e-6, atol=1e-8)
    # and the cross-entropy gradient is softmax minus the one-hot target
    target = rng.integers(0, 5, 7)
    _, grad = cecore.cross_entropy(x, target, reduction="sum", return_grad=True, backend=backend)
    onehot = np.eye(5)[target]
    np.testing.assert_allclose(grad, cecore.softmax(x, backend=backend) - onehot,
                               rtol=1e-12, atol=1e-15)
