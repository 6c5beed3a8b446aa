"""Helpers shared by the benchmark scripts: timing, machine description, JSON output.

The benchmarks are scripts, not tests: they time competitors side by side in one process,
report medians (the machine is shared and noisy) and never assert a speed.
"""

import contextlib
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

# The checkout these scripts sit in, before an installed cecore: a benchmark measures the
# code beside it (the scripts import this module before cecore). Child processes the
# scripts start get it through PYTHONPATH (child_env).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


def child_env(environ=os.environ):
    """``environ`` with the checkout first on PYTHONPATH, for a script's child processes."""
    path = environ.get("PYTHONPATH")
    return {**environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}

# Where runs are saved: an untracked folder, so that a run never replaces a committed
# record (those in results/ are named after what they are and where they ran, e.g.
# bce_zen4_avx2_code_adfddac.json: copy a run there under such a name to keep it).
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "runs"
MB = 1e6
GB = 1e9


def median_time(fn, repeat, warmup=1):
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    The result of each call is dropped before the next one starts, so one call's output
    (e.g. a gradient of N x C) never coexists with the next call's. A short pause first
    lets the previous competitor's worker threads (OpenMP spin-waits, XLA's pool) go idle
    instead of competing with this one for the cores.
    """
    time.sleep(0.3)
    for _ in range(warmup):
        fn()
    times = []
    with _no_gc():
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


@contextlib.contextmanager
def _no_gc():
    """No garbage collection inside the timed calls: collected once before, then off.
    (A gc.collect() before each call did the same at 0.12 s per call once torch and
    scikit-learn were loaded: more than the calls themselves at small shapes.)"""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def paired_ratios(fn, ref, repeat, warmup=1, pause=0.03):
    """Per-pair time ratios ``fn / ref`` of ``repeat`` pairs: the two calls alternate, each
    timed alone, after ``warmup`` untimed calls of each.

    Timed in blocks (:func:`median_time`), two competitors can land in different phases
    of a shared machine (this one's speed moved by 1.5x within minutes); calls that
    alternate share them, so the median of the pairs' ratios is the steadier comparison.
    The pairs start 0.3 s after the call, and each call ``pause`` seconds after the
    previous one ended, a precaution: an OpenMP runtime's workers spin for milliseconds
    after a parallel region (libgomp's GOMP_SPINCOUNT), and back to back the other
    library's call could share the cores with them (for calls of 10 ms at 1e6 x 10 no such
    slowdown was measured; kernel_findings.md, seventeenth session).
    """
    time.sleep(0.3)
    for _ in range(warmup):
        fn()
        ref()
    ratios = []
    with _no_gc():
        for _ in range(repeat):
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            time.sleep(pause)
            start = time.perf_counter()
            ref()
            ratios.append(took / (time.perf_counter() - start))
    return ratios


def traced_peak_bytes(fn):
    """Peak bytes allocated through tracemalloc while ``fn()`` runs, beyond what was live before.

    NumPy reports its data buffers to tracemalloc, so this is the extra NumPy memory of a
    call (outputs included). Memory allocated by torch, JAX/XLA or OpenMP runtimes is
    invisible to it.
    """
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - before


def softmax_ce_reference(x, t):
    """Per-row cross-entropy of logits ``x`` (N, C) with class indices ``t`` (N,), and
    the softmax, in float64: the reference a kernel is checked against before it is timed."""
    x64 = np.asarray(x, dtype=np.float64)
    lse = np.logaddexp.reduce(x64, axis=1)
    return lse - x64[np.arange(len(t)), t], np.exp(x64 - lse[:, None])


def copy_bandwidth(nbytes=256 * 2**20, repeat=7):
    """Memory copy bandwidth in bytes/s: ``2 * nbytes / median(np.copyto time)``.

    The factor 2 counts the bytes read plus the bytes written.
    """
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch dst's pages so the timing excludes page faults
    seconds, _ = median_time(lambda: np.copyto(dst, src), repeat)
    return 2 * nbytes / seconds


def _cpu_model():
    """The CPU's model name, with its family, model number and widest vector extension:
    a hypervisor may show only "AMD EPYC", which is a Zen 3 (family 25, model 1, AVX2)
    or a Zen 4 (family 25, model 17, AVX-512), and the kernels differ by 2x between them."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    from cecore_ext import _cpu_features  # the flags that pick cecore's build

    features = _cpu_features()
    simd = next((label for flag, label in (("AVX512F", "AVX-512"), ("AVX2", "AVX2"),
                                           ("SSE42", "SSE4.2")) if features.get(flag)), None)
    details = [f"family {fields['cpu family']}" if "cpu family" in fields else None,
               f"model {fields['model']}" if "model" in fields else None, simd]
    details = ", ".join(d for d in details if d)
    return f"{name} ({details})" if details else name


def _version(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except Exception as exc:  # not installed, or broken: record why rather than fail
        return f"unavailable ({type(exc).__name__})"


def _cecore_build():
    """The Cython build cecore_ext loaded ('avx512', 'avx2' or 'base'; CECORE_SIMD can
    choose a narrower one), or why there is none."""
    try:
        return importlib.import_module("cecore_ext").build_info()["variant"]
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def _numba_target():
    """The CPU Numba compiles for and its widest vector extension: NUMBA_CPU_NAME alone
    keeps the host's features (AVX-512 included), so the name does not say it."""
    try:
        from numba.core.registry import cpu_target

        _, name, features = cpu_target.target_context.codegen().magic_tuple()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
    simd = next((label for flag, label in (("+avx512f", "AVX-512"), ("+avx2", "AVX2"))
                 if flag in features.split(",")), "no AVX2")
    return f"{name}, {simd}"


def _torch_capability():
    """The vector kernels torch dispatches to (ATEN_CPU_CAPABILITY can narrow them)."""
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def kernel_backends():
    """{'cython-<build>': module, 'numba': module}: every kernel build this CPU can run
    (the repository's in-place builds, when it is on sys.path first) up to the one
    ``CECORE_SIMD`` caps the choice at (under avx2_code.py: no AVX-512 build), and Numba."""
    import cecore_ext

    features = cecore_ext._cpu_features()
    kernels = {}
    for name, needs in cecore_ext._capped_variants():
        if all(features.get(f) for f in needs):
            try:
                kernels[f"cython-{name}"] = importlib.import_module(
                    f"cecore_ext._kernels_{name}")
            except ImportError:  # not built here
                pass
    kernels["numba"] = importlib.import_module("cecore._numba")
    return kernels


def machine_info(**extra):
    """CPU model, core counts, memory, library versions, the loaded Cython build and the
    code Numba and torch run (see avx2_code.py), for the JSON results."""
    try:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem_total = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_total_gb": None if mem_total is None else round(mem_total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in
                     ("numpy", "numba", "torch", "sklearn", "jax", "cecore")},
        "cecore_build": _cecore_build(),
        "numba_target": _numba_target(),
        "torch_capability": _torch_capability(),
        **extra,
    }


def describe(info):
    """One line for a table's caption: the CPU and the code each competitor ran on it."""
    return (f"CPU: {info['cpu_model']}; code: cecore build {info['cecore_build']}, Numba "
            f"{info['numba_target']}, torch {info['torch_capability']}")


def save_json(data, name):
    """Write ``data`` to ``benchmarks/results/runs/<name>`` (see RESULTS_DIR) and return
    the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    return path


def format_table(header, rows):
    """Plain-text table with columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
