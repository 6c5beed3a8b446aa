"""The Numba backend's vectorisable exp (cecore._numba._math) against NumPy's float64 exp.

Every kernel's softmax goes through it: its argument is ``x - max`` (<= 0, or NaN). It must
be within about one ulp of the correctly rounded result over the whole normal range, flush
to exactly 0 below it, and give exp(0) = 1, exp(-inf) = 0 and exp(NaN) = NaN. Both
backends' exps are also checked through the public softmax: of a row (0, x), the
probability of x is exp(x) itself once 1 + exp(x) rounds to 1 in the float64 sum.
"""

import numpy as np
import pytest
from numba import njit

import cecore
from cecore._numba._math import _exp_consts, _exp_diff, _exp_nonpos

CASES = {
    # dtype: (smallest argument with a normal result, largest argument flushed to 0)
    np.float32: (-87.3, -88.1),
    np.float64: (-708.3, -709.1),
}


def _apply_py(x, out):
    k = _exp_consts(x)
    for i in range(x.shape[0]):
        out[i] = _exp_nonpos(x[i], k)


# The exp's instructions carry their own flags; a caller compiled with every fastmath
# flag ("reassoc" would undo the range reduction, "nnan" the NaN) must not change them.
_APPLY = {False: njit(_apply_py), True: njit(fastmath=True)(_apply_py)}


def _apply_diff_py(x, m, out):
    k = _exp_consts(x)
    for i in range(x.shape[0]):
        out[i] = _exp_diff(x[i], m[i], k)


_APPLY_DIFF = {False: njit(_apply_diff_py), True: njit(fastmath=True)(_apply_diff_py)}


def _differences(rng, n):
    """float32 pairs x <= m whose difference x - m rounds in float32 (x with finer bits
    than x - m keeps), over the exp's normal range, and the exact differences."""
    x = np.concatenate([rng.uniform(-1, 1, n), rng.uniform(-40, -20, n)]).astype(np.float32)
    m = (x + rng.uniform(0, 87, 2 * n)).astype(np.float32)
    d = x.astype(np.float64) - m.astype(np.float64)  # exact
    keep = (d <= 0) & (d >= -87.3)
    return x[keep], m[keep], d[keep]


@pytest.mark.parametrize("fastmath", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_is_within_one_ulp_and_flushes_below_the_normal_range(dtype, fastmath):
    _apply = _APPLY[fastmath]
    lo, flushed = CASES[dtype]
    rng = np.random.default_rng(0)
    # every magnitude, the ties of k = x / ln2 + 1/2 and the ends of the range
    x = np.concatenate([rng.uniform(lo, 0, 400_000), -np.logspace(-12, np.log10(-lo), 20_000),
                        (np.arange(-126, 1) + 0.5) * np.log(2), [lo, 0.0, -0.0]]).astype(dtype)
    x = x[x >= lo]
    out = np.empty_like(x)
    _apply(x, out)
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(out - ref) / np.spacing(ref.astype(dtype)).astype(np.float64)
    assert ulps.max() < 1.02, (x[np.argmax(ulps)], ulps.max())

    special = np.array([flushed, 10 * flushed, -np.inf, np.nan, 0.0], dtype)
    out = np.empty_like(special)
    _apply(special, out)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0 and np.isnan(out[3]) and out[4] == 1


@pytest.mark.parametrize("fastmath", [False, True])
def test_float32_exp_of_a_difference_is_that_of_the_exact_difference(fastmath):
    # x - m rounded to float32 costs exp(x - m) a relative |x - m| 2**-24 (130 ulps at a
    # difference of 87); _exp_diff puts the rounding error back, even under fastmath
    x, m, d = _differences(np.random.default_rng(2), 200_000)
    assert (x - m != d).mean() > 0.5  # the differences this test is about
    out = np.empty_like(x)
    _APPLY_DIFF[fastmath](x, m, out)
    ref = np.exp(d)
    ulps = np.abs(out - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() < 1.05, (x[np.argmax(ulps)], m[np.argmax(ulps)], ulps.max())
    f = np.float32
    special_x = np.array([-np.inf, np.nan, 3.0, 5.0, 1.0, -3e38, 2.0], f)
    special_m = np.array([0.0, 0.0, 3.0, np.inf, 100.0, 3e38, np.nan], f)
    out = np.empty_like(special_x)
    _APPLY_DIFF[fastmath](special_x, special_m, out)
    assert out[0] == 0 and np.isnan(out[1]) and out[2] == 1 and out[3] == 0
    assert out[4] == 0 and out[5] == 0 and np.isnan(out[6])


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("n_classes", [2, 40])  # the few-classes and the row kernels
def test_float32_softmax_of_a_rounded_difference(backend, n_classes):
    # rows (x, m, -inf, ...) with x - m < -18: the float32 scale 1 / s is exactly 1, so
    # p(x) is the kernels' exp(x - m) (see below), against the exact difference's exp
    x, m, d = _differences(np.random.default_rng(3), 20_000)
    keep = d <= -18
    x, m, d = x[keep], m[keep], d[keep]
    rows = np.full((x.size, n_classes), -np.inf, np.float32)
    rows[:, 0] = x
    rows[:, 1] = m
    p = cecore.softmax(rows, axis=1, backend=backend)[:, 0]
    ref = np.exp(d)
    ulps = np.abs(p - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulps.max() < 1.05, (x[np.argmax(ulps)], m[np.argmax(ulps)], ulps.max())


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("n_classes", [2, 40])  # the few-classes and the row kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_a_tiny_probability_is_the_exp(backend, n_classes, dtype):
    # float32: 1 + exp(x) == 1 in float64 below x = -37, and the float32 scale 1 / s is
    # exactly 1 below x = -18 already; float64: from x = -37
    lo, _ = CASES[dtype]
    hi = -18.0 if dtype == np.float32 else -37.0
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(lo, hi, 20_000), (np.arange(-125, -27) + 0.5) * np.log(2)])
    x = x[(x >= lo) & (x <= hi)].astype(dtype)
    rows = np.full((x.size, n_classes), -np.inf, dtype)
    rows[:, 0] = 0
    rows[:, 1] = x
    p = cecore.softmax(rows, axis=1, backend=backend)[:, 1]
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(p - ref) / np.spacing(ref.astype(dtype)).astype(np.float64)
    # float64: NumPy's own exp is off by up to half an ulp
    assert ulps.max() < (1.02 if dtype == np.float32 else 1.5), (x[np.argmax(ulps)], ulps.max())
