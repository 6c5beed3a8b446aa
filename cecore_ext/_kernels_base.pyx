# Baseline build of the Cython kernels: no -m flags, so it runs on any CPU the compiler
# targets by default (SSE2 on x86-64). The code is in _kernels.pxi; see setup.py.
include "_kernels.pxi"
