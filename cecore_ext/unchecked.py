"""The kernels of the loaded build as the contract in :mod:`cecore._backends` defines
them, unchecked: they trust their arguments (the shapes, the class indices,
``n_threads >= 1``), and anything else may make them read or write outside an array.
This is what cecore's backend registry hands out, after cecore has validated its inputs;
the package's own names (:mod:`cecore_ext`) check first.
"""

import os

from . import _impl

softmax_ce_index = _impl.softmax_ce_index
softmax_ce_scores = _impl.softmax_ce_scores
report_sums = _impl.report_sums
softmax_ce_report = _impl.softmax_ce_report
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
        ``variant`` ("avx512", "avx2" or "base"), ``openmp`` (bool), ``openmp_version`` (the
        ``_OPENMP`` date, 0 without OpenMP), ``max_threads``, ``compiler``,
        ``compile_args``, the tunables as compiled (``tile``, ``small_c``, ``sum_block``,
        ``lanes``, ``reduce_block`` and the block and prefetch sizes of
        ``cecore/_config.py``), ``exp`` and ``simd_env`` (``CECORE_SIMD``).
    """
    return {**_impl.build_info(), "simd_env": os.environ.get("CECORE_SIMD", "auto")}
