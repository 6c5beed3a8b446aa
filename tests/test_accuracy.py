"""Float32 reductions against a naive float64 reference (issue 9: "float32 mean loss within
2e-7 relative of a float64 reference at any N and C").

The kernels compute each position's loss in float64 from float32 logits (or in float32,
for BCE) and sum in float64, so the mean of many losses carries no accumulated float32
rounding; the result is rounded to float32 once (6e-8). The oracle is NumPy in float64 on
the same float32 values, upcast. Measured: at most 4.2e-8 over these cases; a float32
running sum of the same losses is 2e-4 off at 2**20 positions.
"""

import numpy as np
import pytest

import cecore

# (N, C) and K-dim shapes through every kernel path: one huge row, large C, the row
# kernels, the few-classes tiles, binary, and spatial inputs with few and many positions.
SHAPES = [(1, 50257), (64, 50257), (4096, 1000), (1 << 20, 10), (300_000, 2), (3, 7),
          (4, 21, 64, 64), (2, 1000, 3)]


def _ref_mean(x, t, eps):
    """Mean of torch's cross-entropy with label smoothing eps, in float64."""
    x = np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, x.shape[1])
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    nll = -np.take_along_axis(logp, t.reshape(-1, 1), axis=1)[:, 0]
    return ((1 - eps) * nll - eps * logp.mean(axis=1)).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_mean_loss_within_2e7_of_float64(backend, rng, shape, eps):
    # spread logits around a common offset: exps far from 1 and a max that matters
    x = (4 * rng.standard_normal(shape) + 30).astype(np.float32)
    t_shape = (shape[0],) + shape[2:]
    t = rng.integers(0, shape[1], t_shape)
    got = cecore.cross_entropy(x, t, label_smoothing=eps, backend=backend)
    ref = _ref_mean(x, t, eps)
    assert got.dtype == np.float32
    assert abs(float(got) - ref) <= 2e-7 * abs(ref), (float(got), ref)


@pytest.mark.parametrize("shape", [(1 << 22,), (4096, 1000), (1 << 20, 1), (5,)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float32_bce_mean_within_2e7_of_float64(backend, rng, shape):
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    y = rng.random(shape).astype(np.float32)
    got = cecore.binary_cross_entropy_with_logits(x, y, backend=backend)
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ref = ((1 - yd) * xd + np.logaddexp(0, -xd)).mean()
    assert got.dtype == np.float32
    assert abs(float(got) - ref) <= 2e-7 * abs(ref), (float(got), ref)
