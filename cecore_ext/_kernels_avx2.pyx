# AVX2 + FMA build of the Cython kernels (x86-64 only). Even importing it may execute
# AVX instructions, so cecore_ext/__init__.py imports it only on CPUs with AVX2 and FMA.
# The code is in _kernels.pxi; see setup.py.
include "_kernels.pxi"
