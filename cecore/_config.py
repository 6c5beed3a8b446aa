"""All of cecore's tunables and its thread policy, in one place.

The kernel tunables below are plain int literals: ``setup.py`` reads them from this file
(without importing cecore) and passes them to the C compiler as ``CEC_*`` macros, the
Numba backend imports them, and ``show_config()`` prints them, so both backends always
use the same values.
"""

import contextlib
import os
import sys
import threading
import warnings

# Backend tried first by backend="auto". Cython needs no JIT, so it starts fastest.
AUTO_ORDER = ("cython", "numba")

# Positions reduced per block by cecore._reduce. A fixed block makes sums independent of
# thread counts and of how a stream is chunked (chunks are multiples of this). Also the
# positions per work item of bce_logits, which sums each item's losses itself for
# reduction 'mean' and 'sum'.
REDUCE_BLOCK = 8192

# Bytes of per-block, per-bin partial sums a BinnedBlockSum keeps (the calibration
# error's bins) before it replaces them by their exact sums: a stream's memory must not
# grow with its rows.
BINNED_PARTIALS_BYTES = 8 << 20

# Up to this many classes, 2-D class-index inputs use the "across rows" kernels: rows
# that short do not fill a vector register, so blocks of rows are transposed and the
# loops run across rows.
SMALL_C = 32

# Rows per transposed block of the Cython few-classes path (C <= SMALL_C): a block's
# scratch stays in L1, and short blocks keep the reads of the logits from memory
# interleaved with the arithmetic (0-20% faster than TILE rows; the Numba kernels,
# which transpose TILE float32 rows (TILE / 2 float64), measured no faster with 64).
SMALL_C_ROWS = 64

# Positions per tile of the tile kernels (K-dim input, and transposed blocks of rows of
# few classes): a tile's per-position scratch (a few arrays of TILE values) stays in L1.
TILE = 256

# K-dim inputs (N, C, S) whose S positions of a class take fewer bytes than a vector
# register: tiles of S positions would run the loops over part of a vector. Up to
# KDIM_BLOCK_MAX_BYTES (S * itemsize: float32 S <= 8, float64 S <= 4) and
# KDIM_BLOCK_MAX_C classes, blocks of samples are transposed into one tile of positions
# (as the few-classes path does with rows); up to KDIM_ROWS_MAX_BYTES (float32 S <= 4,
# float64 S <= 2) of more classes, each sample's positions are transposed into rows for
# the row kernel, in groups whose rows fit in KDIM_ROWS_GROUP_BYTES. Measured in
# benchmarks/results/kernel_findings.md (eighth session).
KDIM_BLOCK_MAX_BYTES = 32
KDIM_BLOCK_MAX_C = 128
KDIM_ROWS_MAX_BYTES = 16
KDIM_ROWS_GROUP_BYTES = 1048576  # 1 MiB

# Classes per block of a row's exp pass: the exps of a block are written by one loop and
# summed in float64 by another (fused, the float64 adds would halve the float32 exp's
# vector width); a block's exps stay in L1 between the two loops.
SUM_BLOCK = 256

# Rows per parallel task in the Numba row kernels (amortises the per-task scratch row).
ROWS_PER_TASK = 16

# Independent float64 accumulators of the C row max and row sums (combined in a fixed
# order): one per vector lane would wait on one add's latency per vector. 16 = four
# AVX2 vectors of doubles. (The Numba kernels leave this to LLVM.)
LANES = 16

# On AMD CPUs the Cython few-classes blocks prefetch the next block only when a block's
# row of classes takes at least this many bytes (elsewhere always). Zen 4, bench_ab.py,
# without / with the prefetch: 1e6 x 10 float32 loss + gradient 0.70-1.03, probability
# targets (524288, 8, 2) 0.56-0.83, but 128 classes of (16384, 128, 4) 1.02-1.24; on a
# Sapphire Rapids the prefetch took the path to 0.77-0.93 (kernel_findings.md, sixth and
# twelfth sessions).
PREFETCH_MIN_ROW_BYTES_AMD = 256

# The few-classes blocks write an output (gradient, softmax) of at least this many bytes,
# other than their input, with non-temporal stores: it is larger than the last-level
# cache of the CPUs seen here (32 MB per Zen 3 / Zen 4 CCD), so it would not stay in cache,
# and a normal store first reads the line it writes. Zen 4, bench_ab.py against the commit
# before (same bits), new / old: Cython (results/ab_stream_zen4.json) 1e6 x 10 loss +
# gradient float64 0.82-0.87, float32 0.92-0.96, (524288, 8, 2) 0.88-0.98 (AVX2 and
# AVX-512 builds); Numba (results/ab_numba_stream_zen4*.json) 1e6 x 10 0.91-0.95,
# log-softmax (1048576, 8) 0.79-0.90 (kernel_findings.md, thirteenth and fourteenth
# sessions).
STREAM_MIN_BYTES = 33554432  # 32 MiB

# How far ahead (bytes) the BCE loops of both backends ask for the lines of x and y, one
# block of LANES values at a time between blocks of arithmetic (cec_bce_sums_values_bcast,
# _bce_row): without it the loops, bound by their arithmetic, also waited on memory (two
# input streams where an exp pass reads one). bench_ab.py, new / old: Cython, Zen 4,
# float32 'mean' with the gradient, two threads 0.92-1.00, one thread 0.88-1.04
# (results/ab_bce_pf_zen4*.json); Numba, Zen 5, one thread, every BCE case, float32
# 0.77-0.94, float64 0.87-1.00 (results/ab_numba_bce_pf_blocks_zen5*.json). The same requests made as one burst per
# run took 0.96-1.42 (Cython) and 1.14-1.38 (Numba) of the time without any.
BCE_AHEAD = 2048

# Kernel tunables passed to the C compiler as CEC_<NAME> macros (see setup.py).
C_MACROS = ("SMALL_C", "SMALL_C_ROWS", "TILE", "SUM_BLOCK", "LANES", "REDUCE_BLOCK",
            "KDIM_BLOCK_MAX_BYTES", "KDIM_BLOCK_MAX_C", "KDIM_ROWS_MAX_BYTES",
            "KDIM_ROWS_GROUP_BYTES", "PREFETCH_MIN_ROW_BYTES_AMD", "STREAM_MIN_BYTES",
            "BCE_AHEAD")

# binary_cross_entropy_with_logits with reduction='none': positions per chunk of the
# reused float64 buffer that takes the kernel's losses before they are cast to the loss's
# dtype (float32 input), and of a grad_output array converted to float64 (2 MB).
BCE_CHUNK = 1 << 18

# nll_loss: positions per chunk of its gathers and of its gradient's scatter (a few
# temporaries of 8 bytes per position each: about 3 MB).
NLL_CHUNK = 1 << 16

# Rows per block of log_loss's label-indicator path (bounds its temporaries).
LOG_LOSS_ROW_BLOCK = 8192

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

# cecore score: default memory for one chunk of rows; with probability targets, the bytes
# of the reused softmax buffer through which entropy and Brier score are computed.
DEFAULT_MEMORY_BUDGET = "512MB"
PROBA_BLOCK_BYTES = 4 << 20


def block_rows(row_bytes):
    """Rows per block of PROBA_BLOCK_BYTES for the NumPy passes that go a block of rows at
    a time (a block's temporaries instead of the whole array's), at least one."""
    return max(1, PROBA_BLOCK_BYTES // max(1, row_bytes))

# Rows of per-row metrics at a time (probability targets, class-index targets of more
# than SMALL_C classes, and those of fewer short of a whole block, see
# cecore.metrics._report.score_rows): a multiple of
# REDUCE_BLOCK. Their arrays take about 80 bytes a row (20 MB here); each block is two
# kernel calls, two OpenMP regions, and on a machine whose cores are busy with other
# work a region can wait a scheduler time slice for its second thread. Chosen when
# class-index targets went this way too, and not measured since for probability targets
# (results/bench_report_busy*_zen4.json, 4e6 x 10
# stream, quiet / beside two spinning processes): 65536 rows 0.072 / 0.339 s, 262144
# rows 0.062 / 0.216 s, one block per chunk 0.105 / 0.171 s (and 228 MB of NumPy
# temporaries for 2e6 rows in memory).
REPORT_ROWS = 32 * REDUCE_BLOCK

# With n_threads=None, a call gets one thread per this many logits (at least one):
# below it, waking an OpenMP team costs more than the work (and far more on a busy
# machine). An explicit n_threads is always honoured.
MIN_ELEMENTS_PER_THREAD = 1 << 16

# Below this many multiply-adds per product X @ W (n_samples * n_features * n_outputs),
# SoftmaxClassifier.fit runs on one thread unless n_threads is given (fit_threads below):
# waking threads costs more than such products (benchmarks/bench_classifier.py, digits:
# LogisticRegression 0.33 s with default threads, 0.02 s with one BLAS thread).
SERIAL_FIT_WORK = 1 << 22

# SoftmaxClassifier.fit on dense X evaluates its objective one row block at a time
# (cecore/classifier/_objective.py): a block's rows of X, its logits and its gradient take
# about FIT_BLOCK_BYTES, so the block is still in cache when X.T @ G reads it again. The
# blocks are summed in FIT_LANES lanes, the most threads one fit uses for them.
# A block has at least FIT_MIN_BLOCK_ROWS rows however wide X is: each block costs a few
# Python calls (~30 us), which one-row products of very wide X would not amortise.
FIT_BLOCK_BYTES = 1 << 20
FIT_MIN_BLOCK_ROWS = 64
FIT_LANES = 8

# cecore.torch asks Linux for transparent huge pages on gradient buffers of at least this
# many bytes, as NumPy does for its arrays: a fresh buffer is written once, and faulting
# it in 4 kB pages costs more than the kernel's pass over it (a 262 MB float32 buffer:
# about 220 ms of page faults with 4 kB pages, 85 ms with huge pages, on 2 cores).
HUGEPAGE_MIN_BYTES = 1 << 22

_forked_child = False


def _after_fork_in_child():
    # GNU OpenMP (used by the Cython backend and by Numba's "omp" layer) keeps a thread
    # pool that does not survive fork(): a parallel region in the child can hang. Like
    # torch, a forked child runs kernels on one thread, through the serial code paths.
    global _forked_child, _blas_lock, _blas_users
    _forked_child = True
    # limit_blas's lock, held by another thread at the fork, stayed held in the child,
    # where that thread is gone: its next fit waited forever. The calls of the threads
    # that are gone leave here; the limit is undone if none is left (as the last of them
    # would have undone it), else the forking thread's own calls undo it as they leave.
    _blas_lock = threading.Lock()
    own = getattr(_blas_depth, "n", 0)
    if _blas_users > own:
        _blas_users = own + 1
        _leave_blas()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# The smallest stack of an OpenMP worker thread the Cython kernels run in: their block
# items keep a block's scratch on the stack (about 40 KB deep at most), and OMP_STACKSIZE
# of 64K (libgomp accepts down to 16K) crashed them (hostile review).
MIN_OMP_STACK_BYTES = 256 << 10


def _omp_stack_bytes(environ=os.environ):
    """The worker threads' stack size libgomp takes from the environment (as it parses
    it: OMP_STACKSIZE, else GOMP_STACKSIZE; a number with an optional B, K, M or G, K by
    default; an invalid value is skipped), or None."""
    for var in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        value = environ.get(var, "").strip()
        unit = value[-1:].upper() if value[-1:].isalpha() else "K"
        digits = value[:-1].rstrip() if value[-1:].isalpha() else value
        if digits.isdigit() and digits.isascii() and unit in "BKMG":
            return int(digits) << {"B": 0, "K": 10, "M": 20, "G": 30}[unit]
    return None


_omp_stack = _omp_stack_bytes()
_stack_warned = False


def _threads_that_can_run(threads):
    """``threads``, or 1 where OpenMP's worker threads cannot run the kernels: in a child
    created by fork, and with a worker stack below MIN_OMP_STACK_BYTES (warned once)."""
    global _stack_warned
    if _forked_child:
        return 1
    if threads > 1 and _omp_stack is not None and _omp_stack < MIN_OMP_STACK_BYTES:
        if not _stack_warned:
            _stack_warned = True
            warnings.warn(f"OpenMP's worker threads get {_omp_stack} bytes of stack "
                          f"(OMP_STACKSIZE or GOMP_STACKSIZE), less than the "
                          f"{MIN_OMP_STACK_BYTES} the kernels need: running on one thread",
                          RuntimeWarning, stacklevel=caller_stacklevel())
        return 1
    return threads


def _affinity():
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return None


def cpus_available():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    mask = _affinity()
    if mask is None:
        return os.cpu_count() or 1
    if mask == _MASK_SET_BY_GOMP:
        # With OMP_PROC_BIND or OMP_PLACES set, loading the OpenMP runtime (below) pinned
        # this thread to the first of its places: the mask from before is the process's.
        # (Not when torch or scikit-learn, whose own runtimes pin it too, came first; and
        # a mask narrowed later to exactly that CPU is read as the one from before.)
        mask = _MASK_BEFORE_GOMP
    return max(1, len(mask))


def _env_threads():
    for var in ("CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        raw = os.environ.get(var, "")
        # OMP_NUM_THREADS may list one count per nesting level: the first is the outer one
        value = (raw.split(",")[0] if var == "OMP_NUM_THREADS" else raw).strip()
        if value.isascii() and value.isdigit() and int(value) > 0:  # not "²": int() refuses it
            return var, int(value)
        if var == "CECORE_NUM_THREADS" and raw and raw not in _ignored_values:
            # (the others are their runtimes' to judge, as libgomp and Numba do)
            _ignored_values.add(raw)
            warnings.warn(f"CECORE_NUM_THREADS={raw!r} is not a positive integer; ignored",
                          RuntimeWarning, stacklevel=caller_stacklevel())
    return None, None


_ignored_values = set()  # the CECORE_NUM_THREADS values warned about (once each)


def _load_openmp():
    """``omp_get_max_threads`` of the GNU OpenMP runtime (the one the Cython kernels link),
    which it loads at import. Its value reflects ``OMP_NUM_THREADS`` and the limits
    threadpoolctl sets (``threadpool_limits(n, user_api="openmp")`` calls
    ``omp_set_num_threads``); but threadpoolctl limits only the runtimes loaded when its
    block is entered, and the kernels are imported lazily, so a block around a process's
    first call did not limit it until the runtime was loaded here. None where there is
    no such runtime (not Linux, no GCC runtime).
    """
    try:
        import ctypes

        get = ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL).omp_get_max_threads
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    return get


_MASK_BEFORE_GOMP = _affinity()
_gomp = _load_openmp()
_MASK_SET_BY_GOMP = _affinity()
if _MASK_SET_BY_GOMP == _MASK_BEFORE_GOMP:
    _MASK_SET_BY_GOMP = None  # (not pinned: the usual case)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def caller_stacklevel():
    """``stacklevel`` of the first frame outside cecore, for warnings about the caller's
    arguments (the public functions are wrapped, and some call others)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def default_n_threads():
    """Threads used when a call passes ``n_threads=None``.

    In order: 1 in a child created by ``fork`` (after cecore was imported) or with an
    OpenMP worker stack below ``MIN_OMP_STACK_BYTES``; ``CECORE_NUM_THREADS``; the OpenMP
    runtime's limit (``OMP_NUM_THREADS``, or a threadpoolctl ``threadpool_limits``
    context); ``NUMBA_NUM_THREADS``; else the CPUs available. Never more than the CPUs
    available.
    """
    if _forked_child:
        return 1
    cpus = cpus_available()
    var, value = _env_threads()
    if var != "CECORE_NUM_THREADS" and _gomp is not None:
        limit = int(_gomp())
        # Unlimited, the runtime reports the CPUs: NUMBA_NUM_THREADS, if set, comes next.
        if var != "NUMBA_NUM_THREADS" or limit != cpus:
            value = limit
    return _threads_that_can_run(max(1, min(cpus, value or cpus)))


def resolve_n_threads(n_threads, n_elements=None, warn=True):
    """Threads for one call: the one place every public entry point resolves them.

    Parameters
    ----------
    n_threads : None, int >= 1, or -1
        None: :func:`default_n_threads`, reduced for small work to one thread per
        ``MIN_ELEMENTS_PER_THREAD`` elements (``n_elements``). -1: all CPUs available.
        An int above the CPUs available is capped at that number with a
        ``RuntimeWarning`` (OpenMP aborts the process when it cannot create threads).
    n_elements : int, optional
        Size of the work, for the small-work rule.
    warn : bool, default=True
        Whether capping warns: not for each chunk of a stream, whose request was checked
        (and warned about) once before its first chunk.

    Returns
    -------
    int
        At least 1; 1 in a child created by ``fork`` or with a small OpenMP stack (see
        :func:`default_n_threads`).
    """
    if n_threads is None:
        threads = default_n_threads()
        if n_elements is not None:
            threads = max(1, min(threads, n_elements // MIN_ELEMENTS_PER_THREAD))
        return threads
    if isinstance(n_threads, bool) or not hasattr(n_threads, "__index__"):
        raise TypeError(f"n_threads must be None or an int, got {type(n_threads).__name__}")
    n_threads = int(n_threads.__index__())
    cpus = cpus_available()
    if n_threads == -1:
        n_threads = cpus
    if n_threads < 1:
        raise ValueError(f"n_threads must be None, -1 or an int >= 1, got {n_threads}")
    if n_threads > cpus and warn:
        warnings.warn(f"n_threads={n_threads} is more than the {cpus} CPUs available; "
                      f"using {cpus}", RuntimeWarning, stacklevel=caller_stacklevel())
    return _threads_that_can_run(min(n_threads, cpus))


def fit_threads(n_threads, n_logits, work):
    """Threads of one fit (or of one ``partial_fit`` chunk), resolved once.

    Parameters
    ----------
    n_threads : None, int >= 1, or -1
        As for :func:`resolve_n_threads`.
    n_logits : int
        The amount of work that :func:`resolve_n_threads`'s small-work rule weighs:
        logits per kernel call (sparse ``X``) or multiply-adds of one pass over the row
        blocks (dense ``X``).
    work : int
        Multiply-adds of one product ``X @ W``.

    Returns
    -------
    int
        1 when ``n_threads`` is None and ``work < SERIAL_FIT_WORK``, else
        ``resolve_n_threads(n_threads, n_logits)``.
    """
    if n_threads is None and work < SERIAL_FIT_WORK:
        return 1
    return resolve_n_threads(n_threads, n_logits)


_blas = None
_blas_has_scipy = False
_blas_lock = threading.Lock()
_blas_users = 0  # calls inside limit_blas now, in any thread
_blas_depth = threading.local()  # .n: calls inside limit_blas now, in this thread
_blas_limiter = None  # the first of them's limit, which restores the original settings
_blas_forced = []  # (setter, previous count) of the OpenBLAS limits set past threadpoolctl


def _force_openblas(controller, n_threads):
    """Set the (process-wide) limit of each pthreads OpenBLAS that ``controller.limit``
    left alone, and return ``(setter, previous)`` pairs to restore it.

    threadpoolctl lets only the first thread that sets an OpenBLAS limit set it again,
    and ignores the others while that thread lives: a fit in any other thread (joblib's
    threading backend, a web server) ran its products on all CPUs beside its own kernel
    threads (digits, 200 iterations: 17.6x the main thread's time;
    benchmarks/bench_fit_threads.py). The
    limit is process-wide either way, shared by overlapping calls as described in
    :func:`limit_blas`; this only makes it hold whichever thread comes first.
    """
    forced = []
    for lib in controller.lib_controllers:
        get_symbol = getattr(lib, "_get_symbol", None)  # threadpoolctl's, with the affixes
        if getattr(lib, "internal_api", None) != "openblas" or get_symbol is None or \
                getattr(lib, "threading_layer", None) == "openmp":  # per-thread there
            continue
        previous = lib.get_num_threads()
        setter = get_symbol("openblas_set_num_threads") if previous != n_threads else None
        if setter is not None:
            setter(n_threads)
            forced.append((setter, previous))
    return forced


@contextlib.contextmanager
def limit_blas(n_threads):
    """Context manager holding the BLAS libraries (NumPy's, SciPy's) to ``n_threads``.

    One threadpoolctl controller serves every call: making one scans the loaded
    libraries, which a fresh ``threadpool_limits`` would repeat on every call. It is made
    again once after SciPy's linear algebra (and its own OpenBLAS) has been loaded, so
    a controller made earlier never leaves SciPy's BLAS out.

    The limits are process-wide. Calls that overlap in several threads share the first
    one's limit, and the last to leave restores the settings from before the first: each
    restoring what it saw on entry left BLAS at one thread when two calls crossed.
    """
    global _blas, _blas_has_scipy, _blas_users, _blas_limiter, _blas_forced
    with _blas_lock:
        if _blas_users == 0:
            has_scipy = "scipy.linalg" in sys.modules
            if _blas is None or (has_scipy and not _blas_has_scipy):
                from threadpoolctl import ThreadpoolController
                _blas = ThreadpoolController().select(user_api="blas")
                _blas_has_scipy = has_scipy
            _blas_limiter = _blas.limit(limits=n_threads)
            _blas_forced = _force_openblas(_blas, n_threads)
        _blas_users += 1
    _blas_depth.n = getattr(_blas_depth, "n", 0) + 1
    try:
        yield
    finally:
        _blas_depth.n -= 1
        with _blas_lock:
            _leave_blas()


def _leave_blas():
    """One call leaves :func:`limit_blas` (under its lock); the last restores the limits."""
    global _blas_users, _blas_limiter
    _blas_users -= 1
    if _blas_users == 0:
        for set_threads, previous in _blas_forced:
            set_threads(previous)
        _blas_limiter.restore_original_limits()
        _blas_limiter = None
