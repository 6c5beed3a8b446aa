"""Build the Cython + OpenMP kernels (cecore_ext); the metadata is in pyproject.toml.

Three extension modules are compiled from one source (cecore_ext/_kernels.pxi):

* ``cecore_ext._kernels_base``: default flags for the target (SSE2 on x86-64);
* ``cecore_ext._kernels_avx2``: ``-mavx2 -mfma``, x86-64 only; cecore_ext imports it
  only when the running CPU has AVX2 and FMA;
* ``cecore_ext._kernels_avx512``: AVX-512 (F, DQ, VL, BW) with 512-bit vectors preferred,
  x86-64 only; imported only when the running CPU has those.

OpenMP is probed with the compiler setuptools will use: if ``-fopenmp`` does not compile
and link, the kernels are built serial (with a warning) and the ``#pragma omp simd``
vectorisation hints are still honoured through ``-fopenmp-simd`` when available.

The kernel tunables (``cecore._config.C_MACROS``: tile sizes, the few-classes limit) are
read from ``cecore/_config.py`` as literals, without importing cecore (its dependencies
are absent under pip's build isolation), and passed as ``-DCEC_<NAME>=<value>``.

Never add ``-ffast-math`` (or ``-ffinite-math-only``): NaN and inf logits must follow
IEEE rules. Reassociation is granted per loop by the ``omp simd reduction`` pragmas; the
only relaxed flag is ``-fno-trapping-math``, which leaves all results unchanged.
"""

import ast
import glob
import os
import platform
import shutil
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = os.path.join("cecore", "_config.py")


def _config_macros():
    """``[("CEC_TILE", "256"), ...]``: the names in ``C_MACROS`` of cecore/_config.py.

    Read with ``ast``: each must be assigned an int literal at the module's top level.
    """
    path = os.path.join(_HERE, _CONFIG)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    literals = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                literals[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal (an expression, a call): not a macro
                pass
    names = literals.get("C_MACROS")
    if not isinstance(names, tuple) or not names:
        raise RuntimeError(f"{_CONFIG}: C_MACROS must be a tuple of names given as a literal")
    macros = []
    for name in names:
        value = literals.get(name)
        if type(value) is not int or value < 1:
            raise RuntimeError(f"{_CONFIG}: {name} must be assigned a positive int literal, "
                               f"got {value!r}")
        macros.append((f"CEC_{name}", str(value)))
    return macros


_PROBE_SOURCE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel for reduction(+:n)
    for (int i = 0; i < 4; i++) n += 1;
    return n == 4 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""

_PLAIN_SOURCE = "int main(void) { return 0; }\n"

_SIMD_PROBE_SOURCE = r"""
int main(void) {
    float a[8] = {0}, s = 0;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < 8; i++) s += a[i];
    return (int)s;
}
"""


def _compiles(compiler, source, compile_args, link_args=None):
    """True if ``source`` compiles (and, with ``link_args``, links) with these flags."""
    tmp = tempfile.mkdtemp(prefix="cecore_probe_")
    try:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        # -Werror: an unknown pragma or flag must count as a failure, not a warning.
        strict = [] if compiler.compiler_type == "msvc" else ["-Werror"]
        objects = compiler.compile([path], output_dir=tmp,
                                   extra_postargs=compile_args + strict)
        if link_args is not None:
            compiler.link_executable(objects, "probe", output_dir=tmp,
                                     extra_postargs=link_args)
        return True
    except Exception:  # CompileError, LinkError, or a missing compiler
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """build_ext that chooses optimisation, OpenMP and SIMD flags per compiler."""

    def build_extensions(self):
        cc = self.compiler
        msvc = cc.compiler_type == "msvc"
        base_args = ["/O2"] if msvc else ["-O3"]
        # -fno-trapping-math only drops the promise to raise FP exception *flags* in
        # program order; results, NaN and inf included, are unchanged. Without it gcc
        # does not vectorise the exp loops (see _rowkernels.h). Not -ffast-math!
        if not msvc and _compiles(cc, _PLAIN_SOURCE, ["-fno-trapping-math"]):
            base_args.append("-fno-trapping-math")
        omp_compile, omp_link = (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"])

        # "0", "false", "no", "off" or empty: not set (a value of 0 made a serial build,
        # and the warnings blamed the compiler)
        no_openmp = os.environ.get("CECORE_NO_OPENMP", "").strip().lower() not in (
            "", "0", "false", "no", "off")
        openmp = not no_openmp and _compiles(cc, _PROBE_SOURCE, omp_compile, omp_link)
        if openmp:
            compile_args, link_args = base_args + omp_compile, omp_link
        else:
            why = ("CECORE_NO_OPENMP is set" if no_openmp else
                   "the C compiler does not support OpenMP (-fopenmp)")
            msg = (f"cecore: {why}; building the Cython kernels single-threaded "
                   "(n_threads is then ignored).")
            warnings.warn(msg)
            print("WARNING: " + msg)
            compile_args, link_args = list(base_args), []
            if not msvc and _compiles(cc, _SIMD_PROBE_SOURCE, ["-fopenmp-simd"]):
                compile_args.append("-fopenmp-simd")  # keeps the omp simd hints

        simd_args = {
            "avx2": ["/arch:AVX2"] if msvc else ["-mavx2", "-mfma"],
            # gcc and clang prefer 256-bit vectors even with AVX-512 available (to dodge
            # the frequency drop of older Xeons); the exp loops gain from 512 bits.
            "avx512": ["/arch:AVX512"] if msvc else [
                "-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw",
                "-mprefer-vector-width=512"],
        }
        keep = []
        for ext in self.extensions:
            variant = ext.name.rsplit("_", 1)[-1]  # "base", "avx2" or "avx512"
            args = list(compile_args)
            if variant in simd_args:
                if not _compiles(cc, _SIMD_PROBE_SOURCE, args + simd_args[variant]):
                    print(f"cecore: compiler rejects {variant} flags; skipping " + ext.name)
                    continue
                args += simd_args[variant]
            ext.extra_compile_args = args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
            ext.define_macros += [
                ("CEC_VARIANT", f'"{variant}"'),
                ("CEC_COMPILE_ARGS", '"' + " ".join(args) + '"'),
            ]
            keep.append(ext)
        self.extensions = keep
        super().build_extensions()


def _extensions():
    macros = _config_macros()
    names = ["base"]
    # The SIMD variants only make sense when compiling for x86-64 (not cross-compiling to
    # arm64 on macOS, for example).
    target = (os.environ.get("_PYTHON_HOST_PLATFORM") or platform.machine()).lower()
    if "x86_64" in target or "amd64" in target:
        names += ["avx2", "avx512"]
    exts = [
        Extension(
            f"cecore_ext._kernels_{name}",
            [f"cecore_ext/_kernels_{name}.pyx"],
            include_dirs=[np.get_include(), "cecore_ext"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")] + macros,
            # _config.py too: a changed tunable must rebuild (the header's #error catches
            # a missing macro, the build_info test a stale value).
            depends=["cecore_ext/_kernels.pxi", "cecore_ext/_rowkernels.h", _CONFIG],
        )
        for name in names
    ]
    return cythonize(
        exts,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
    )


class Sdist(sdist):
    """sdist whose tests run: setuptools adds tests/test*.py by itself, not the modules
    they import (conftest.py, oracle.py); without a MANIFEST.in, they are added here."""

    def make_distribution(self):
        have = set(self.filelist.files)
        self.filelist.extend(f for f in sorted(glob.glob(os.path.join("tests", "*.py")))
                             if f not in have)
        super().make_distribution()


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt, "sdist": Sdist})
