"""Kernel tunables: defined once in cecore._config, compiled into both backends alike."""

import importlib
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

import cecore_ext
from cecore import _config
from cecore import _numba as numba_backend
from cecore_ext import _kernels_base


def _tunables(info, names=_config.C_MACROS):
    return {name: info[name.lower()] for name in names}


def test_backends_report_the_config_tunables():
    expected = {name: getattr(_config, name) for name in _config.C_MACROS}
    assert all(type(v) is int and v > 0 for v in expected.values())
    # The loaded Cython build (AVX2 or baseline), the baseline build, and Numba.
    assert _tunables(cecore_ext.build_info()) == expected
    assert _tunables(_kernels_base.build_info()) == expected
    # LANES, SMALL_C_ROWS and PREFETCH_MIN_ROW_BYTES_AMD shape only the C loops (LLVM
    # chooses the Numba kernels' accumulators; Numba's few-classes blocks are TILE rows,
    # it measured no faster with fewer, nor with a prefetch)
    numba_names = [n for n in _config.C_MACROS
                   if n not in ("LANES", "SMALL_C_ROWS", "PREFETCH_MIN_ROW_BYTES_AMD")]
    assert _tunables(numba_backend.build_info(), numba_names) == {
        name: expected[name] for name in numba_names}


# The SIMD builds this CPU can run (the test must not import one it cannot: SIGILL).
_RUNNABLE = [name for name, needs in cecore_ext._VARIANTS
             if all(cecore_ext._cpu_features().get(f) for f in needs)]


@pytest.mark.parametrize("variant", _RUNNABLE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_runnable_build_matches_a_float64_reference(variant, dtype):
    # Each build is compiled from the same source with other vector flags: all of them
    # give the float64 reference's loss and gradient, and report their tunables.
    module = importlib.import_module(f"cecore_ext._kernels_{variant}")
    assert module.build_info()["variant"] == variant
    assert _tunables(module.build_info()) == {n: getattr(_config, n) for n in _config.C_MACROS}
    rng = np.random.default_rng(0)
    for n, c in [(300, 1000), (1000, 7), (5, 40000)]:
        x = (rng.standard_normal((n, c)) * 4).astype(dtype)
        t = rng.integers(0, c, n)
        loss = np.empty((n, 1))
        grad = np.empty((n, c, 1), dtype)
        module.softmax_ce_index(x.reshape(n, c, 1), t.reshape(n, 1), np.ones(c), -100, 0.0,
                                np.broadcast_to(1.0, (n, 1)), loss, grad, 2)
        x64 = x.astype(np.float64)
        lse = logsumexp(x64, axis=1)
        p = np.exp(x64 - lse[:, None])
        p[np.arange(n), t] -= 1
        rtol = 1e-6 if dtype == np.float32 else 1e-13
        # lse - x[t] cancels for confident rows: absolute error ~ eps * |x|
        np.testing.assert_allclose(loss[:, 0], lse - x64[np.arange(n), t], rtol=rtol,
                                   atol=8 * np.finfo(dtype).eps * np.abs(x64).max())
        # p - 1 at the target is rounded in the logits' type: absolute error ~ eps
        np.testing.assert_allclose(grad[..., 0], p, rtol=rtol, atol=4 * np.finfo(dtype).eps)


def _guarded(shape, dtype, fill=np.nan):
    """An array of ``shape`` inside a larger one whose cells around it hold a sentinel,
    and a function that asserts they still do (a copy past the block would not show in
    the array itself)."""
    size = int(np.prod(shape))
    buf = np.full(size + 128, -7.0, dtype=dtype)
    a = buf[64:64 + size].reshape(shape)
    a[...] = fill

    def intact():
        assert (buf[:64] == -7.0).all() and (buf[64 + size:] == -7.0).all(), "wrote past"
    return a, intact


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("vendor_id")), None)
    except OSError:
        return None


@pytest.mark.parametrize("variant", _RUNNABLE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_runnable_build_keeps_exps_near_the_normal_limit(variant, dtype):
    # (review) The exp ends in (P(r) - 1) 2**k + 2**k. Without FMA (the base build) the
    # product alone is subnormal from x = -81 (float32), and under the kernels'
    # flush-to-zero it was 0: softmax([0, -86.9]) gave 2**-126, 29 % above the exp.
    # Oracle: NumPy's float64 exp; softmax of [0, x] is exp(x) / (1 + exp(x)) = exp(x).
    module = importlib.import_module(f"cecore_ext._kernels_{variant}")
    lo, hi = (-87.3, -75.0) if dtype == np.float32 else (-708.3, -690.0)
    x = np.linspace(lo, hi, 4001).astype(dtype)
    rows = np.zeros((x.size, 2, 1), dtype)
    rows[:, 1, 0] = x
    out = np.empty_like(rows)
    module.softmax(rows, False, out, 2)
    ref = np.exp(x.astype(np.float64))
    ulps = np.abs(out[:, 1, 0] - ref) / np.spacing(ref.astype(dtype)).astype(np.float64)
    assert ulps.max() < 2.5, (x[np.argmax(ulps)], ulps.max())


@pytest.mark.parametrize("variant", _RUNNABLE)
def test_block_prefetch_follows_the_cpu_vendor(variant):
    # The few-classes blocks prefetch their successor except on AMD CPUs, where that was
    # measured to slow small blocks down (cec_prefetch_min_row_bytes, from the compiler's
    # cpuid builtins; /proc/cpuinfo is the independent check).
    info = importlib.import_module(f"cecore_ext._kernels_{variant}").build_info()
    amd = _config.PREFETCH_MIN_ROW_BYTES_AMD
    vendor = _cpu_vendor()
    if vendor is None:  # no /proc/cpuinfo to check it against
        assert info["block_prefetch_min_row_bytes"] in (0, amd)
    else:
        expected = amd if vendor == "AuthenticAMD" else 0
        assert info["block_prefetch_min_row_bytes"] == expected, vendor


@pytest.mark.parametrize("variant", _RUNNABLE + ["numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_build_transposes_few_classes_right(variant, dtype):
    # The few-classes path transposes blocks of rows with register blocks of 8 x 8 floats
    # (4 x 4 doubles) in the AVX2 and AVX-512 builds and in Numba (_tr_block, any CPU);
    # where C or a block's rows are not a multiple of that, the last register block
    # overlaps the one before it (C % 8 == 2 float32 classes: 8 x 2 register blocks
    # instead; in Cython also C % 4 == 2 float64: 4 x 2), and below it the copies go
    # element by element. Every C of that path, and row counts around the register and
    # row block sizes (SMALL_C_ROWS rows in Cython, TILE in Numba), against the float64
    # softmax, loss and gradient (also written over the logits), on 1 and 2 threads, with
    # sentinels around every output.
    if variant == "numba":
        module, rows = numba_backend, _config.TILE
    else:
        module = importlib.import_module(f"cecore_ext._kernels_{variant}")
        rows = _config.SMALL_C_ROWS
    rng = np.random.default_rng(1)
    rtol = 1e-5 if dtype == np.float32 else 1e-12  # a wrong copy is off by O(1)
    atol = 4 * np.finfo(dtype).eps
    for c in range(1, _config.SMALL_C + 1):
        for n in (1, 3, 4, 5, 8, 9, 12, rows - 1, rows + 5, 2 * rows + 9):
            n_threads = 1 + (c + n) % 2
            x = (rng.standard_normal((n, c, 1)) * 3).astype(dtype)
            t = rng.integers(0, c, (n, 1))
            x64 = x[..., 0].astype(np.float64)
            lse = logsumexp(x64, axis=1)
            p = np.exp(x64 - lse[:, None])
            where = f"C={c}, N={n}, {n_threads} thread(s)"
            out, intact = _guarded(x.shape, dtype)
            module.softmax(x, False, out, n_threads)
            intact()
            np.testing.assert_allclose(out[..., 0], p, rtol=rtol, atol=1e-30,
                                       err_msg=f"softmax, {where}")
            p[np.arange(n), t[:, 0]] -= 1
            for in_place in (False, True):
                grad, intact = _guarded(x.shape, dtype, x if in_place else np.nan)
                loss, loss_intact = _guarded((n, 1), np.float64)
                module.softmax_ce_index(grad if in_place else x, t, np.ones(c), -100, 0.0,
                                        np.broadcast_to(1.0, (n, 1)), loss, grad, n_threads)
                intact()
                loss_intact()
                np.testing.assert_allclose(grad[..., 0], p, rtol=rtol, atol=atol,
                                           err_msg=f"gradient, in place {in_place}, {where}")
                np.testing.assert_allclose(loss[:, 0], lse - x64[np.arange(n), t[:, 0]],
                                           rtol=rtol, atol=8 * np.finfo(dtype).eps * 3 * 6,
                                           err_msg=f"loss, {where}")


def test_cecore_simd_caps_the_build():
    code = "import cecore_ext; print(cecore_ext.build_info()['variant'])"
    for cap in _RUNNABLE:
        env = dict(os.environ, CECORE_SIMD=cap)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == cap
    # A misspelt setting is an error, also through backend="auto" (no silent Numba).
    env = dict(os.environ, CECORE_SIMD="avx1024")
    code = "import numpy as np, cecore; cecore.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ValueError: CECORE_SIMD must be 'auto' or one of" in result.stderr
    # and the command line says so in one line
    result = subprocess.run([sys.executable, "-m", "cecore.cli", "info"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "cecore info: error: CECORE_SIMD must be 'auto' or one of "
        "['avx512', 'avx2', 'base'], got 'avx1024'"]


def test_limit_blas_covers_scipys_blas_loaded_later():
    # A controller made before SciPy's linear algebra was imported must not leave SciPy's
    # own OpenBLAS (the one L-BFGS-B calls) out of the limit.
    code = """
        import sys
        from cecore import _config
        assert "scipy.linalg" not in sys.modules
        with _config.limit_blas(1):
            pass
        before = {lib["filepath"] for lib in _config._blas.info()}
        import scipy.linalg
        with _config.limit_blas(1):
            during = {lib["filepath"]: lib["num_threads"] for lib in _config._blas.info()}
        scipy_libs = [p for p in during if p not in before]
        print(len(scipy_libs), sorted(set(during.values())))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, check=True).stdout.split(maxsplit=1)
    # SciPy ships its own OpenBLAS next to NumPy's; both are held to one thread
    assert int(out[0]) >= 1 and out[1].strip() == "[1]"



def test_info_prints_every_tunable():
    # the README says `cecore info` prints every tunable; it listed 12 of the 20
    import io

    import cecore

    shown = cecore.show_config(file=io.StringIO())["tunables"]
    expected = {name for name, value in vars(_config).items()
                if name.isupper() and not name.startswith("_") and isinstance(value, (int, str))}
    assert set(shown) == expected and {"LINEAR_CHUNK_BYTES", "FIT_BLOCK_BYTES"} <= expected


def test_a_build_without_openmp_warns_where_it_is_seen(monkeypatch):
    # setup.py's warning about a compiler without OpenMP is hidden by pip (build output
    # shows only with -v): loading the backend repeats it, once (hostile review). Under
    # -W error it raises once and the backend still loads: at import it had made the
    # backend unavailable, and "auto" went to Numba without a word.
    from cecore import _backends

    info = cecore_ext.build_info()
    monkeypatch.setattr(cecore_ext.unchecked, "build_info", lambda: {**info, "openmp": False})
    monkeypatch.setattr(_backends, "_loaded", {})
    monkeypatch.setattr(_backends, "_errors", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="built without OpenMP"):
            _backends.get_backend("cython")
        assert _backends.get_backend("cython") is cecore_ext.unchecked  # said once, then loaded
        assert _backends.get_backend("auto") is cecore_ext.unchecked
    monkeypatch.setattr(_backends, "_loaded", {})
    # an OpenMP build says nothing (forced: on a serial build the real one warns, and this
    # test failed there; packaging review)
    monkeypatch.setattr(cecore_ext.unchecked, "build_info", lambda: {**info, "openmp": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.get_backend("cython") is cecore_ext.unchecked
