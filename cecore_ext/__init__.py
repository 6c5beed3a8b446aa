"""Cython + OpenMP backend of cecore's kernel contract (see :mod:`cecore._backends`).

Three builds of one source exist: ``_kernels_avx512`` (AVX-512 F/DQ/VL/BW, x86-64),
``_kernels_avx2`` (AVX2 + FMA, x86-64) and ``_kernels_base`` (the compiler's default
target). The best one the running CPU supports is chosen at import. ``CECORE_SIMD`` caps
the choice: ``avx2`` never loads the AVX-512 build (what an AVX2-only CPU such as Zen 3
runs), ``base`` loads the baseline build.

The kernels of the contract (:mod:`cecore._backends`) are this package's names; they
check their arguments (types, dtypes, shapes, class indices, ``n_threads``, overlapping
outputs) and raise ``TypeError`` / ``ValueError`` / ``IndexError`` rather than read or
write outside an array.
:mod:`cecore_ext.unchecked` has the same functions without the checks: what cecore
calls, after validating its inputs once.
"""

import os

__all__ = ["softmax_ce_index", "softmax_ce_scores", "report_sums", "softmax_ce_report",
           "softmax_ce_proba", "bce_logits", "softmax", "logsumexp", "log_loss_pass",
           "build_info"]

# From the most capable down; each with the CPU features it needs (NumPy's names).
_VARIANTS = (
    ("avx512", ("AVX512F", "AVX512DQ", "AVX512VL", "AVX512BW", "AVX2", "FMA3")),
    ("avx2", ("AVX2", "FMA3")),
    ("base", ()),
)


def _cpu_features():
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


def _capped_variants():
    """The entries of ``_VARIANTS`` that ``CECORE_SIMD`` allows, most capable first."""
    names = [name for name, _ in _VARIANTS]
    cap = os.environ.get("CECORE_SIMD", "auto").strip().lower() or "auto"
    if cap != "auto" and cap not in names:
        # ValueError, not ImportError: a misspelt setting must not make backend="auto"
        # fall back to Numba without a word.
        raise ValueError(f"CECORE_SIMD must be 'auto' or one of {names}, got {cap!r}")
    return _VARIANTS[0 if cap == "auto" else names.index(cap):]


def _load():
    features = _cpu_features()
    for name, needs in _capped_variants():
        # Importing a SIMD build on a CPU without its instructions could die with SIGILL,
        # so it is only imported after the CPU check; the SIMD builds are absent on
        # non-x86 machines.
        if not all(features.get(f) for f in needs):
            continue
        try:
            return __import__(f"{__name__}._kernels_{name}", fromlist=["_"])
        except ImportError:
            if name == "base":
                raise
    raise ImportError("no cecore_ext kernel build can run on this CPU")


_impl = _load()

# The package's names check their arguments (_checked); cecore, which validates its
# inputs once above the registry, calls the compiled kernels themselves (unchecked).
from . import unchecked  # noqa: E402
from ._checked import (  # noqa: E402
    bce_logits, log_loss_pass, logsumexp, report_sums, softmax, softmax_ce_index,
    softmax_ce_proba, softmax_ce_report, softmax_ce_scores,
)

build_info = unchecked.build_info
