"""Threads: results independent of n_threads (bit for bit), safe under concurrent Python
threads, and usable in a child process forked after the parent ran parallel kernels."""

import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import joblib  # a scikit-learn dependency
import numpy as np
import pytest

import cecore
from oracle import check_result, subprocess_env, torch_cross_entropy

SHAPES = [(3000, 50), (300, 1000), (6, 7, 40, 30)]


def _problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(np.float32 if seed % 2 else np.float64)
    t_shape = shape[:1] + shape[2:]
    target = rng.integers(0, shape[1], t_shape)
    target[rng.random(t_shape) < 0.1] = -100
    weight = rng.uniform(0.5, 2.0, shape[1])
    return x, target, weight, rng.standard_normal(t_shape)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_results_do_not_depend_on_n_threads(backend, shape):
    x, target, weight, g = _problem(shape)
    proba = np.abs(x[::-1]) / np.abs(x).sum(axis=1, keepdims=True).clip(1)
    calls = {
        "mean": lambda nt: cecore.cross_entropy(x, target, weight=weight, label_smoothing=0.1,
                                                return_grad=True, backend=backend, n_threads=nt),
        "sum": lambda nt: cecore.cross_entropy(x, target, reduction="sum", return_grad=True,
                                               backend=backend, n_threads=nt),
        "none": lambda nt: cecore.cross_entropy(x, target, reduction="none", grad_output=g,
                                                return_grad=True, backend=backend, n_threads=nt),
        "proba": lambda nt: cecore.cross_entropy(x, proba, return_grad=True, backend=backend,
                                                 n_threads=nt),
        "bce": lambda nt: cecore.binary_cross_entropy_with_logits(
            x, proba, reduction="sum", return_grad=True, backend=backend, n_threads=nt),
        "log_softmax": lambda nt: (cecore.log_softmax(x, axis=1, backend=backend, n_threads=nt),
                                   cecore.logsumexp(x, axis=1, backend=backend, n_threads=nt)),
    }
    for name, call in calls.items():
        reference = call(1)
        for n_threads in (2,):  # more than the CPUs would be capped (2 here)
            result = call(n_threads)
            for a, b in zip(reference, result):
                assert _same_bits(a, b), (name, n_threads)
    # and the thread-independent answer is torch's
    check_result(calls["mean"](2), torch_cross_entropy(x, target, weight=weight,
                                                       label_smoothing=0.1), x.dtype)


def _job(args):
    shape, seed, backend = args
    x, target, weight, g = _problem(shape, seed)
    return cecore.cross_entropy(x, target, weight=weight, label_smoothing=0.05,
                                reduction="none", grad_output=g, return_grad=True,
                                backend=backend, n_threads=2)


def test_concurrent_python_threads(backend):
    jobs = [((200 + 37 * i, 20 + i) if i % 3 else (4, 5, 30, 20 + i), i, backend)
            for i in range(40)]
    serial = [_job(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(_job, jobs))
    for (l1, g1), (l2, g2) in zip(serial, concurrent):
        assert _same_bits(l1, l2) and _same_bits(g1, g2)


def test_joblib_threading_backend(backend):
    jobs = [((500 + 11 * i, 40), i, backend) for i in range(16)]
    serial = [_job(job) for job in jobs]
    with joblib.parallel_backend("threading", n_jobs=4):
        concurrent = joblib.Parallel()(joblib.delayed(_job)(job) for job in jobs)
    for (l1, g1), (l2, g2) in zip(serial, concurrent):
        assert _same_bits(l1, l2) and _same_bits(g1, g2)


def _child_run(backend):
    from cecore import _config
    x, target, weight, g = _problem((2000, 40), 3)
    loss, grad = cecore.cross_entropy(x, target, weight=weight, return_grad=True,
                                      backend=backend, n_threads=2)
    return loss, grad, _config.default_n_threads()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX-only")
def test_fork_after_parallel_kernels(backend):
    x, target, weight, g = _problem((2000, 40), 3)
    # Start the parent's thread pool (OpenMP / Numba) before forking.
    expected = cecore.cross_entropy(x, target, weight=weight, return_grad=True,
                                    backend=backend, n_threads=2)
    cecore.cross_entropy(*_problem((50, 7, 30, 30))[:2], backend=backend, n_threads=2)
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(1)
    try:
        loss, grad, child_threads = pool.apply_async(_child_run, (backend,)).get(timeout=60)
    finally:
        pool.terminate()
        pool.join()
    assert child_threads == 1
    assert _same_bits(loss, expected[0]) and _same_bits(grad, expected[1])


_CACHE_CHILD = """
import hashlib, sys, numpy as np, cecore
rng = np.random.default_rng(5)
x = rng.standard_normal((3000, 77)) * 3
t = rng.integers(0, 77, 3000)
for n in map(int, sys.argv[1:]):
    loss, g = cecore.cross_entropy(x, t, return_grad=True, backend="numba", n_threads=n)
    print(hashlib.sha256(np.float64(loss).tobytes() + g.tobytes()).hexdigest())
"""


def test_numba_kernels_from_the_cache_give_the_bits_of_fresh_ones(tmp_path):
    """n_threads picks the serial or the parallel copy of a Numba kernel; a process may
    load one from the on-disk cache and compile the other. They must still agree (they
    gave float64 gradients 1 ulp apart: see _runtime.helper)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run(*threads):
        out = subprocess.run([sys.executable, "-c", _CACHE_CHILD, *threads], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    compiled = run("1")  # compiles the serial kernel and caches it
    assert run("1", "2") == compiled * 2  # serial from the cache, parallel compiled


def test_overlapping_blas_limits_restore_the_settings_from_before():
    # Calls in two threads whose BLAS limits cross (A enters, B enters, A leaves, B
    # leaves): each restored what it saw on entry, so B put back A's limit and NumPy's
    # BLAS stayed at one thread for the rest of the process (hostile review).
    from threadpoolctl import ThreadpoolController

    from cecore import _config
    blas = ThreadpoolController().select(user_api="blas")

    def limits():
        return [lib["num_threads"] for lib in blas.info()]

    with blas.limit(limits=3):  # the user's setting
        a, b = _config.limit_blas(1), _config.limit_blas(1)
        a.__enter__()
        b.__enter__()
        assert set(limits()) == {1}
        a.__exit__(None, None, None)
        assert set(limits()) == {1}  # B still runs
        b.__exit__(None, None, None)
        assert set(limits()) == {3}
        with _config.limit_blas(2):  # and a lone call as before
            assert set(limits()) == {2}
        assert set(limits()) == {3}


def test_blas_limit_holds_in_a_thread_that_does_not_control_openblas():
    # threadpoolctl lets one thread of a process set OpenBLAS's limit and ignores the
    # others: a fit in another thread (joblib's threading backend) ran its products on
    # all CPUs beside its own kernel threads, 24x slower (concurrency review).
    import threading

    from threadpoolctl import ThreadpoolController

    from cecore import _config
    blas = ThreadpoolController().select(user_api="blas")

    def limits():
        return [lib["num_threads"] for lib in blas.info()]

    with blas.limit(limits=2):  # this thread now controls OpenBLAS, and the setting is 2
        seen = {}

        def other_thread():
            with _config.limit_blas(1):
                seen["inside"] = limits()
            seen["after"] = limits()

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert set(seen["inside"]) == {1}, seen
        assert set(seen["after"]) == {2}, seen


def test_numba_calls_leave_the_callers_thread_count_alone():
    # Each launch set Numba's (thread-local) count to cecore's and left it there: the
    # caller's own parallel Numba code then ran on cecore's threads.
    import numba

    previous = numba.get_num_threads()
    x, target, _, _ = _problem((3000, 50))
    try:
        numba.set_num_threads(1)
        cecore.cross_entropy(x, target, backend="numba", n_threads=2)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)


def test_an_unloadable_numba_threading_layer_is_named_in_the_error():
    # A threading layer Numba cannot load (tbb without the tbb package, a misspelt name)
    # failed at the first call on two threads with Numba's message alone, which does not
    # name the variable that asked for it
    code = ("import numpy as np, cecore\n"
            "try:\n"
            "    cecore.cross_entropy(np.zeros((3000, 50)), np.zeros(3000, int),"
            " backend='numba', n_threads=2)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = dict(subprocess_env(), NUMBA_THREADING_LAYER="no-such-layer")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert "NUMBA_THREADING_LAYER='no-such-layer'" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("binding", [{"OMP_PROC_BIND": "true"}, {"OMP_PLACES": "cores"}])
def test_openmp_thread_binding_does_not_cap_cecore_at_one_cpu(binding):
    # With binding asked for, loading the OpenMP runtime at `import cecore` pins the main
    # thread to one CPU; cecore read that mask as the CPUs available and capped every
    # call, an explicit n_threads=2 included, at one thread
    code = ("import os; before = len(os.sched_getaffinity(0)); import cecore; "
            "print(before, cecore._config.cpus_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(subprocess_env(), **binding), timeout=300)
    before, after = out.stdout.split()
    assert before == after, out.stderr


def test_kernels_leave_the_floating_point_mode_as_they_found_it(backend):
    # The kernels flush subnormal results to zero on their threads (MXCSR's FTZ bit, see
    # cec_ftz_begin and _ftz_begin) and must put the bit back: the caller's thread and the
    # worker threads of OpenMP and Numba, which run other code too, keep IEEE subnormals.
    from numba import njit, prange

    @njit(parallel=True)
    def products(a, b):
        out = np.empty_like(a)
        for i in prange(a.shape[0]):
            out[i] = a[i] * b[i]
        return out

    rng = np.random.default_rng(0)
    x = (30 * rng.standard_normal((4096, 10))).astype(np.float32)
    t = rng.integers(0, 10, 4096)
    a, b = np.full(256, 1e-30, np.float32), np.full(256, 1e-10, np.float32)
    for n_threads in (1, 2):
        _, grad = cecore.cross_entropy(x, t, return_grad=True, backend=backend,
                                       n_threads=n_threads)
        assert (grad == 0).any()  # (a call that reached the flushed range)
        assert a[0] * b[0] != 0  # this thread
        assert (products(a, b) != 0).all()  # Numba's workers
        assert (a * b != 0).all()


def test_a_small_openmp_stack_runs_on_one_thread():
    # OMP_STACKSIZE=64K (libgomp accepts down to 16K) crashed the Cython kernels, whose
    # block items keep their scratch on the worker threads' stacks (hostile review)
    code = ("import numpy as np, cecore\n"
            "from cecore.metrics import classification_report_from_logits as r\n"
            "x, t = np.zeros((200000, 7)), np.zeros(200000, int)\n"
            "print(r(x, t, backend='cython', n_threads=2)['loss'],"
            " float(cecore.cross_entropy(x.astype(np.float32), t, backend='cython')))\n")
    env = {**subprocess_env(), "OMP_STACKSIZE": "64K"}
    env.pop("CECORE_NUM_THREADS", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert [float(v) for v in p.stdout.split()] == pytest.approx([np.log(7)] * 2)
    assert p.stderr.count("65536 bytes of stack") == 1, p.stderr


def test_the_openmp_stack_is_read_as_libgomp_reads_it():
    from cecore._config import _omp_stack_bytes as stack
    assert stack({"OMP_STACKSIZE": "64K"}) == stack({"OMP_STACKSIZE": " 64 "}) == 65536
    assert stack({"OMP_STACKSIZE": "2m"}) == 2 << 20 and stack({"OMP_STACKSIZE": "7B"}) == 7
    assert stack({"OMP_STACKSIZE": "64KB", "GOMP_STACKSIZE": "8"}) == 8192  # invalid: next
    assert stack({}) is None and stack({"OMP_STACKSIZE": "abc"}) is None
