"""All of cecore's tunables and its thread policy, in one place."""

import os

# Backend tried first by backend="auto". Cython needs no JIT, so it starts fastest.
AUTO_ORDER = ("cython", "numba")

# Positions reduced per block by cecore._reduce. A fixed block makes sums independent of
# thread counts and of how a stream is chunked (chunks are multiples of this).
REDUCE_BLOCK = 8192

# Up to this many classes, 2-D class-index inputs use the "across rows" kernels: rows
# that short do not fill a vector register, so blocks of rows are transposed and the
# loops run across rows.
SMALL_C = 32

# With n_threads=None, a call gets one thread per this many logits (at least one):
# below it, waking an OpenMP team costs more than the work (and far more on a busy
# machine). An explicit n_threads is always honoured.
MIN_ELEMENTS_PER_THREAD = 1 << 16

# Below this many multiply-adds per BLAS product (n_samples * n_features * n_outputs),
# SoftmaxClassifier.fit runs BLAS and the kernels on one thread unless n_threads is
# given: waking threads costs more than such products (benchmarks/bench_classifier.py,
# digits: LogisticRegression 0.33 s with default threads, 0.02 s with one BLAS thread).
SERIAL_FIT_WORK = 1 << 22

_forked_child = False


def _after_fork_in_child():
    # GNU OpenMP (used by the Cython backend and by Numba's "omp" layer) keeps a thread
    # pool that does not survive fork(): a parallel region in the child can hang. Like
    # torch, a forked child runs kernels on one thread, through the serial code paths.
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_threads():
    for var in ("CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def default_n_threads():
    """Threads used when a call passes ``n_threads=None``.

    The first of ``CECORE_NUM_THREADS``, ``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS`` that is
    set, else the CPUs this process may run on. 1 in a child created by ``fork``.
    """
    if _forked_child:
        return 1
    env = _env_threads()
    if env is not None:
        return env
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_n_threads(n_threads, n_elements=None):
    """Validate a user's ``n_threads`` (None, or an int >= 1, or -1 for all CPUs).

    For None, the default is capped by ``n_elements // MIN_ELEMENTS_PER_THREAD``.
    """
    if n_threads is None:
        if n_elements is None:
            return default_n_threads()
        return max(1, min(default_n_threads(), n_elements // MIN_ELEMENTS_PER_THREAD))
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int,)) and not hasattr(
        n_threads, "__index__"
    ):
        raise TypeError(f"n_threads must be None or an int, got {type(n_threads).__name__}")
    n_threads = int(n_threads)
    if n_threads == -1:
        n_threads = os.cpu_count() or 1
    if n_threads < 1:
        raise ValueError(f"n_threads must be None, -1 or an int >= 1, got {n_threads}")
    return 1 if _forked_child else n_threads


# cecore.linear_cross_entropy without chunk_size (the rule is in cecore/linear.py,
# _chunk_rows): the chunk's buffers (logits, and d loss / d logits) and the block that
# accumulates grad_linear_weight take at most this many bytes ...
LINEAR_CHUNK_BYTES = 128 << 20
# ... and, within that budget, at least this many rows: every chunk streams all of
# linear_weight through BLAS twice and reads and writes grad_linear_weight once, a cost
# per chunk that does not depend on its rows (measured on one thread: 256-row chunks run
# the products at about 90% of the speed of 1024-row ones, 2048 x 768 -> 50257 float32).
LINEAR_MIN_CHUNK_ROWS = 256
# grad_linear_weight is accumulated over chunks through a buffer of at most this many
# bytes (a block of vocabulary rows), which stays in cache between BLAS and the add.
LINEAR_ACCUMULATE_BYTES = 8 << 20
# Used for the chunk rule when the last-level cache size cannot be read.
DEFAULT_LLC_BYTES = 32 << 20
