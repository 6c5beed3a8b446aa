"""Run a command with every competitor restricted to AVX2 code, on a CPU that has AVX-512.

    python benchmarks/avx2_code.py python benchmarks/bench_bce.py

The issue's slower CPU is a Zen 3 (AVX2 + FMA, no AVX-512). On an AVX-512 machine this
runs what a Zen 3 would run, instruction for instruction (not at its speed): the Cython
AVX2 build (``CECORE_SIMD=avx2``), torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``)
and Numba compiled for ``znver3``. For Numba the CPU name is not enough:
``NUMBA_CPU_NAME`` alone keeps the host's feature list, AVX-512 included, so
``NUMBA_CPU_FEATURES`` is set too, to the host's features with every AVX-512 extension
(and the other instructions a Zen 3 lacks) turned off. ``machine_info()`` records what
each competitor ran (``numba_target``, ``torch_capability``, ``cecore_build``).
A separate ``NUMBA_CACHE_DIR`` keeps these compilations apart from the host's. JAX, when
a benchmark runs it, gets ``--xla_cpu_max_isa=AVX2`` (without it XLA's 256-bit code still
used AVX-512VL instructions: ``vscalef``, ``vpternlog``, mask registers).
"""
import os
import subprocess
import sys
import tempfile

# Host features a Zen 3 does not have (besides every "avx512*" one).
_NOT_ON_ZEN3 = {"evex512", "gfni", "avxvnni", "avxifma", "avxneconvert", "avxvnniint8",
                "avxvnniint16", "amx-tile", "amx-int8", "amx-bf16"}


def avx2_code_env(environ=os.environ):
    """A copy of ``environ`` with the variables that restrict each competitor to AVX2."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    flags = ",".join(
        ("-" if name.startswith("avx512") or name in _NOT_ON_ZEN3 or not on else "+") + name
        for name, on in sorted(features.items()))
    env = dict(environ)
    env.update(CECORE_SIMD="avx2", ATEN_CPU_CAPABILITY="avx2", NUMBA_CPU_NAME="znver3",
               NUMBA_CPU_FEATURES=flags)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), "--xla_cpu_max_isa=AVX2"]))
    env.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cecore-numba-avx2"))
    return env


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    try:
        sys.exit(subprocess.call(argv, env=avx2_code_env()))
    except OSError as exc:  # the command is missing or not executable
        sys.exit(f"avx2_code.py: cannot run {argv[0]!r}: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
