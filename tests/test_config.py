"""Kernel tunables: defined once in cecore._config, compiled into both backends alike."""

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
    # LANES shapes only the C loops (LLVM chooses the Numba kernels' accumulators)
    numba_names = [name for name in _config.C_MACROS if name != "LANES"]
    assert _tunables(numba_backend.build_info(), numba_names) == {
        name: expected[name] for name in numba_names}
