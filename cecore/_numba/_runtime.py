"""Numba backend, runtime: where compiled code is cached, how kernels are compiled
(a parallel and a serial copy of each) and launched on threads.

Nothing here knows what a kernel computes; :mod:`cecore._numba._kernels` uses
:func:`jit` and :data:`helper`, and the contract adapters run kernels with
:func:`launch`.
"""

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import types as types_module
import warnings

import numba
from numba import njit
from numba.core import caching


class _CacheLocator(caching.UserWideCacheLocator):
    """Numba's on-disk cache for cecore's own functions, outside the installed package.

    Numba would write it into ``cecore/__pycache__`` when that is writable; a later
    ``pip uninstall`` leaves those files behind, and an empty ``cecore`` folder then
    shadows the package as a namespace package. So cecore's kernels are cached in
    ``NUMBA_CACHE_DIR`` when it is set, else in the user's cache directory
    (``~/.cache/cecore/numba`` on Linux), else in a temporary directory (see
    :func:`_private_tmp_dir`). Functions of other modules keep Numba's own rules.
    """

    _package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def __init__(self, py_func, py_file, cache_dir):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(cache_dir, self.get_suitable_cache_subpath(py_file))

    def get_source_stamp(self):
        """The cache entries' key: every source the compiled code depends on.

        Numba keys an entry by the modification time and size of the function's own
        file only, but a kernel inlines the helpers of ``_math.py`` and freezes the
        constants of ``_config.py``: with a change to those files alone (an upgrade, an
        edit), Numba would go on loading kernels built from the old code, and a
        specialisation compiled afresh beside them would compute with the new code.
        """
        return _sources_digest()

    def ensure_cache_path(self):
        """Numba calls this before every save: a directory that stopped being writable
        (a full disk, a relative ``NUMBA_CACHE_DIR`` after a ``chdir``) must cost the
        cache entry, not the computation (Numba lets the OSError out of the kernel call)."""
        try:
            super().ensure_cache_path()
        except OSError as error:
            _cannot_write(self._cache_path, error)

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.abspath(py_file).startswith(cls._package_dir):
            return None
        user = caching.AppDirs(appname="cecore", appauthor=False).user_cache_dir
        if not os.path.isabs(user):
            # XDG_CACHE_HOME set but empty or relative, which the XDG spec says to
            # ignore: Numba's AppDirs made it ./cecore, a folder that then shadowed the
            # package in the working directory (as a namespace package).
            user = os.path.join(os.path.expanduser("~"), ".cache", "cecore")
        fallback = None
        for cache_dir in (numba.config.CACHE_DIR, os.path.join(user, "numba"), _private_tmp_dir):
            if callable(cache_dir):  # made only when the others failed
                cache_dir = cache_dir()
            if not cache_dir:
                continue
            self = cls(py_func, py_file, cache_dir)
            try:  # Numba's check, which raises (this class's own only warns)
                super(_CacheLocator, self).ensure_cache_path()
            except OSError:
                fallback = fallback or self
                continue
            return self
        # Nowhere to write (read-only home, working directory and /tmp): the first choice
        # all the same, so that kernels compile uncached with one warning per directory
        # (ensure_cache_path, _KeyedCacheFile.save); with None, Numba's own locators
        # decided, and on a read-only installation they raised at import.
        return fallback


_tmp_dir = None


def _private_tmp_dir():
    """The last resort for the cache: ``<tmp>/cecore-numba-<uid>`` when this user owns it
    and no one else can write to it, else a new private directory for this process.

    The name can be guessed, and a directory another local user made there could hold
    pickles that run their code when loaded (or compiled code that computes wrong
    results): it is used only if it is a real directory (not a link), owned by this user,
    with no write permission for group or others, as ``tempfile.mkdtemp`` would make it.
    One of this user's that others could write to (earlier cecore versions made it with
    the umask's permissions) is emptied, unread, and made private. A directory made for
    the process is removed at exit."""
    global _tmp_dir
    if _tmp_dir is None:
        try:
            tmp = tempfile.gettempdir()
        except OSError:  # no usable temporary directory at all (see from_function)
            _tmp_dir = ""
            return _tmp_dir
        path = os.path.join(tmp, f"cecore-numba-{os.getuid()}")
        try:
            os.mkdir(path, 0o700)
        except OSError:
            pass  # there already, or not makeable: checked below
        if not (_trusted(path) or _made_private(path)):
            try:
                path = tempfile.mkdtemp(prefix="cecore-numba-")
                atexit.register(shutil.rmtree, path, ignore_errors=True)
            except OSError:
                path = ""
        _tmp_dir = path
    return _tmp_dir


def _made_private(path):
    """Whether ``path``, a real directory of this user's that others could write to, was
    made private (mode 0700) and emptied without reading anything in it."""
    try:
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()):
            return False  # another user's, a link, or not there
        os.chmod(path, 0o700)  # no one else can add entries from now on
        for name in os.listdir(path):
            entry = os.path.join(path, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
    except OSError:
        return False
    return _trusted(path)


def _trusted(path):
    """Whether ``path`` is a real directory of this user's that no one else can write to."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


_unwritable = set()


def _cannot_write(cache_path, error):
    """Warn, once per cache directory, that compiled kernels are not being cached."""
    root = os.path.dirname(cache_path)
    if root not in _unwritable:
        _unwritable.add(root)
        warnings.warn(f"cecore cannot write its Numba cache in {root!r} "
                      f"({error.strerror or error}): kernels compiled now are not cached",
                      RuntimeWarning, stacklevel=2)


_digest = None


def _sources_digest():
    """SHA-256 of the Numba backend's sources and of ``cecore/_config.py``, read once."""
    global _digest
    if _digest is None:
        package = os.path.dirname(_CacheLocator._package_dir.rstrip(os.sep))
        paths = [os.path.join(package, "_config.py")] + sorted(
            os.path.join(package, "_numba", name)
            for name in os.listdir(os.path.join(package, "_numba")) if name.endswith(".py"))
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
        _digest = h.hexdigest()
    return _digest


# Consulted before Numba's own locators (the first that accepts a function wins).
caching.CacheImpl._locator_classes.insert(0, _CacheLocator)


class _KeyedCacheFile(caching.IndexDataCacheFile):
    """Numba's index and data files, with each data file named after its entry's key.

    Numba names a new entry's data file by the first number its copy of the index does
    not use. Two processes that compile different specialisations of one function at
    once (Dask workers, joblib, two scripts) can pick the same number: the later data
    write wins, and the index then points one key at the other's code (numba#4807): code
    for other array types, wrong results or a crash. Named after the key, a file only
    ever holds that key's code, written whole (Numba writes to a temporary and renames)
    before the index names it; concurrent writers can at worst drop each other's index
    entries, which costs a recompilation.

    Each data file also holds its key's digest, and an entry that cannot be read back
    (a truncated, damaged or foreign file) is a miss: the kernel is compiled again and
    the entry rewritten. A write that fails (a full disk) costs the entry only.
    """

    @staticmethod
    def _digest(key):
        return hashlib.sha256(repr(key).encode()).hexdigest()[:24]

    def load(self, key):
        try:
            name = self._load_index().get(key)
            if name is None:
                return None
            digest, data = self._load_data(name)
        except Exception:  # any unpickling error: EOFError, UnpicklingError, TypeError...
            return None
        return data if digest == self._digest(key) else None

    def save(self, key, data):
        digest = self._digest(key)
        name = f"{self._index_name[:-len('.nbi')]}.{digest}.nbc"
        try:
            self._save_data(name, (digest, data))
            try:
                overloads = self._load_index()
            except Exception:  # damaged: rewritten with this entry
                overloads = {}
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)
        except OSError as error:
            _cannot_write(self._cache_path, error)


def cached_njit(*args, **options):
    """``numba.njit(..., cache=True)`` with the cache's data files named by key
    (:class:`_KeyedCacheFile`); every cached cecore function is made by it."""
    def decorate(fn):
        dispatcher = njit(*args, cache=True, **options)(fn)
        cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
        if cache_file is not None:  # not under NUMBA_DISABLE_JIT=1 (a plain function)
            cache_file.__class__ = _KeyedCacheFile
        return dispatcher
    return decorate


# No "nnan"/"ninf": NaN and inf logits must follow IEEE rules to give torch's answers.
# "reassoc" for the kernels' own bodies (index arithmetic, no sums: see helper), none for
# the helpers.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_HELPER_FASTMATH = FASTMATH - {"reassoc"}


def jit(fn):
    """Compile ``fn`` twice: parallel (prange runs on threads) and serial (prange = range).

    The serial copy gets its own name: Numba's on-disk cache keys functions by name and
    line, not by ``parallel``, so with one name both would load whichever compiled first
    (and a forked child would run OpenMP code after all).
    """
    serial_fn = types_module.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                          fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    # nogil: kernels touch no Python object, and callers may run them on several Python
    # threads at once (SoftmaxClassifier's row blocks, Dask's threaded workers).
    parallel = cached_njit(parallel=True, fastmath=FASTMATH, nogil=True)(fn)
    serial = cached_njit(parallel=False, fastmath=FASTMATH, nogil=True)(serial_fn)
    return parallel, serial


# The functions every loop that reduces lives in, so that serial and parallel kernels sum
# in the same order. Not "reassoc": each kernel carries its own copy of the helpers it
# calls, optimised again with it, and which copy runs depends on whether the kernel was
# compiled in the process (it calls the helper's first copy) or loaded from the on-disk
# cache (its own); with "reassoc" LLVM vectorised the copies' sums differently (1-ulp
# float64 gradients between n_threads 1 and 2 in a process that had compiled one kernel
# of a pair and loaded the other; benchmarks/numba_cache_bits.py). Without it, sums are
# written in explicit lanes (_math._lanes, _add_moments, _add_wdev) and every copy gives
# the same bits.
# error_model="numpy": a float division by zero gives inf or NaN, as in NumPy, instead of
# Python's check and ZeroDivisionError, a branch that kept the tiles' per-position loops
# (one division each) scalar.
# _nrt=False: no reference counting. A function that receives an array counts a reference
# on entry and drops it on exit (and one per slice it takes): atomic updates of a counter
# that every thread using the array shares, and an atomic update first waits for the
# thread's earlier stores, non-temporal ones included, to leave the core. Called per tile
# of 256 rows of few classes, the counting took 18 % of that kernel's samples, one thread
# (bench_ab.py: median 0.89 of the time on one thread, 0.96 on two, same bits;
# benchmarks/results/kernel_findings.md, twenty-fourth session). Helpers only work on
# arrays their kernel holds for the call; Numba refuses to compile an allocation here.
helper = cached_njit(fastmath=_HELPER_FASTMATH, error_model="numpy", _nrt=False)


# Numba's "workqueue" layer aborts the process when two Python threads launch parallel
# kernels at once. Until a parallel kernel has run we do not know which layer Numba chose,
# so launches are serialised until then, and for good if it is "workqueue".
_launch_lock = threading.Lock()
_layer = None


def threads_used(n_threads):
    """The threads :func:`launch` runs a kernel on (kernels that split their work per
    thread take it as an argument: asked for inside a kernel, Numba's thread count is a
    dynamic global, which keeps the kernel out of the on-disk cache)."""
    return 1 if n_threads <= 1 else min(n_threads, numba.config.NUMBA_NUM_THREADS)


def launch(kernel, n_threads, *args):
    """Run a ``(parallel, serial)`` pair made by :func:`jit` on ``n_threads`` threads.

    ``n_threads`` comes resolved by :func:`cecore._config.resolve_n_threads` (1 in a
    forked child, where OpenMP pools are unusable); one thread runs the serial copy,
    which has no parallel region at all. Numba's thread count is set for the call (it is
    thread-local) and restored after it, and launches are serialised while the threading
    layer may be "workqueue".
    """
    global _layer
    parallel, serial = kernel
    n_threads = threads_used(n_threads)
    if n_threads == 1:
        return serial(*args)
    try:
        # The caller's own count is put back: it is what the thread's other parallel
        # Numba code uses, and a call left it at cecore's.
        previous = numba.get_num_threads()  # (starts the threading layer)
    except ValueError as error:  # Numba's "No threading layer could be loaded."
        raise ValueError(
            f"{error}\nNUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r} names no layer "
            "this Numba can load (tbb needs the tbb package); unset it, or pass n_threads=1 "
            "or backend='cython'") from error
    numba.set_num_threads(n_threads)
    try:
        if _layer is None or _layer == "workqueue":
            with _launch_lock:
                result = parallel(*args)
                _layer = numba.threading_layer()
                return result
        return parallel(*args)
    finally:
        numba.set_num_threads(previous)


def threading_layer():
    """The threading layer Numba chose, or what it will choose from."""
    return _layer or f"not chosen yet ({numba.config.THREADING_LAYER})"
