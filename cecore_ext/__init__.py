"""Cython + OpenMP backend of cecore's kernel contract (see :mod:`cecore._backends`).

Two builds of one source exist: ``_kernels_avx2`` (AVX2 + FMA, x86-64) and
``_kernels_base`` (the compiler's default target). The best one the running CPU supports
is chosen at import; ``CECORE_SIMD=base`` forces the baseline build.
"""

import os

__all__ = ["softmax_ce_index", "softmax_ce_scores", "softmax_ce_proba", "bce_logits",
           "softmax", "logsumexp", "log_loss_pass", "build_info"]


def _cpu_has_avx2_fma():
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return bool(__cpu_features__.get("AVX2") and __cpu_features__.get("FMA3"))


def _load():
    choice = os.environ.get("CECORE_SIMD", "auto").strip().lower() or "auto"
    if choice not in ("auto", "base"):
        raise ImportError(f"CECORE_SIMD must be 'auto' or 'base', got {choice!r}")
    # Importing the AVX2 build on a CPU without AVX2 could die with SIGILL, so it is only
    # imported after the CPU check; it is absent on non-x86 builds.
    if choice == "auto" and _cpu_has_avx2_fma():
        try:
            from . import _kernels_avx2
            return _kernels_avx2
        except ImportError:
            pass
    from . import _kernels_base
    return _kernels_base


_impl = _load()

softmax_ce_index = _impl.softmax_ce_index
softmax_ce_scores = _impl.softmax_ce_scores
softmax_ce_proba = _impl.softmax_ce_proba
bce_logits = _impl.bce_logits
softmax = _impl.softmax
logsumexp = _impl.logsumexp
log_loss_pass = _impl.log_loss_pass


def build_info():
    """Describe the loaded build: SIMD variant, OpenMP, compiler and its flags.

    Returns
    -------
    dict
        ``variant`` ("avx2" or "base"), ``openmp`` (bool), ``openmp_version`` (the
        ``_OPENMP`` date, 0 without OpenMP), ``max_threads``, ``compiler``,
        ``compile_args``, the tunables ``tile``, ``small_c`` and ``sum_block`` (as
        compiled), ``exp`` and ``simd_env`` (``CECORE_SIMD``).
    """
    return {**_impl.build_info(), "simd_env": os.environ.get("CECORE_SIMD", "auto")}
