# AVX-512 build of the Cython kernels (x86-64 only): 16 float32 lanes per vector where the
# AVX2 build has 8. Even importing it may execute AVX-512 instructions, so
# cecore_ext/__init__.py imports it only on CPUs with AVX512F/DQ/VL/BW.
# The code is in _kernels.pxi; see setup.py.
include "_kernels.pxi"
