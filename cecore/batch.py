"""Score logits stored on disk in bounded memory: :func:`score` and the ``cecore score`` command.

Design
------
- **Reading.** A ``.npy`` file, or an uncompressed (``np.savez``) ``.npz`` member, is a
  C-ordered array at a known byte offset, so it is memory-mapped and a chunk of rows is a
  contiguous view handed to the kernel without a copy. Pages of a mapping that have been
  touched count toward the process's resident memory (RSS) until they are unmapped, so
  each chunk's pages are dropped with ``madvise(MADV_DONTNEED)`` once it is scored; the
  file stays in the page cache, which is not RSS. A compressed ``.npz`` member cannot be
  mapped: it is decompressed sequentially into one reused chunk buffer instead.
- **Chunk size.** ``memory_budget`` bounds the bytes that one chunk occupies (its mapped
  logits and targets plus the small per-row arrays and any dtype conversion), so peak RSS
  is the interpreter's baseline plus about the budget, whatever the file size.
- **Exact results.** :func:`cecore.cross_entropy` sums per-position losses in fixed
  blocks of ``_config.REDUCE_BLOCK`` consecutive values (:mod:`cecore._reduce`) and divides
  by a sum computed the same way over the weights of the non-ignored targets.
  :class:`cecore._reduce.BlockSum` reproduces those blocks from values arriving in chunks of any length,
  so the streamed mean loss equals the in-memory one bit for bit.
"""

import argparse
import contextlib
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass

import numpy as np

from . import _reduce
from . import _validation as V
from ._backends import get_backend

__all__ = ["score", "ScoreResult", "open_array", "parse_size"]

INPUT_KINDS = ("logits", "log_probs", "probs")
DEFAULT_MEMORY_BUDGET = "512MB"
_PAGE = mmap.PAGESIZE
# Rows scored per kernel call when top-1 accuracy is wanted (see _score_chunk).
_ACCURACY_BLOCK_BYTES = 4 << 20
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(size):
    """Bytes in ``size``: an int, or a string such as ``"512MB"``, ``"1.5GiB"``, ``"800M"``.

    KB/MB/GB (and K/M/G) are powers of 1000; KiB/MiB/GiB powers of 1024.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"invalid memory size {size!r}: expected e.g. 512MB, 2GiB or a number of bytes")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {size!r}")
    return value


# --------------------------------------------------------------------------- reading


class MappedArray:
    """A C-ordered array stored in a file at a byte offset, read through a memory map.

    It pickles as its path and layout (the map is reopened where it is unpickled), so
    Dask workers read their own rows of the file. Indexing (``a[i:j]``) returns a copy;
    :meth:`rows` and :meth:`release` are the zero-copy pair used for streaming.
    """

    def __init__(self, path, offset, dtype, shape):
        self.path, self.offset = os.fspath(path), int(offset)
        self.dtype, self.shape = np.dtype(dtype), tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._map = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_map"} | {"_map": None}

    def __dask_tokenize__(self):
        stat = os.stat(self.path)
        return ("cecore.MappedArray", self.path, self.offset, str(self.dtype), self.shape,
                stat.st_mtime_ns, stat.st_size)

    def _mapped(self):
        if self._map is None:
            # A private (copy-on-write) map: nothing ever writes to it, but arrays over a
            # read-only buffer make np.argmax copy the whole chunk, and make Numba compile
            # a second, read-only specialisation of every kernel.
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mmap, "MADV_SEQUENTIAL"):  # more read-ahead when the file is cold
                self._map.madvise(mmap.MADV_SEQUENTIAL)
        return self._map

    def rows(self, start, stop):
        """Rows ``start:stop`` as a read-only view of the mapped file (no copy)."""
        count = (stop - start) * self._row_bytes // self.dtype.itemsize
        flat = np.frombuffer(self._mapped(), self.dtype, count, self.offset + start * self._row_bytes)
        return flat.reshape((stop - start,) + self.shape[1:])

    def release(self, start, stop):
        """Drop the pages of rows ``start:stop`` from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = (self.offset + start * self._row_bytes) // _PAGE * _PAGE
        end = min(-(-(self.offset + stop * self._row_bytes) // _PAGE) * _PAGE, len(self._map))
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if index else slice(None)
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (None,) * 3
        if step != 1:
            return np.array(np.asarray(self.rows(0, self.shape[0]))[index])
        return np.array(self.rows(start, max(start, stop))[(slice(None),) + index[1:]])

    def close(self):
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: let GC close it
                self._map.close()
            self._map = None


class StreamedArray:
    """A compressed ``.npz`` member, decompressed front to back into one reused buffer.

    :meth:`rows` must be called with consecutive, increasing ranges (one pass).
    """

    def __init__(self, path, member, dtype, shape):
        self.path, self.member = os.fspath(path), member
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.ndim = len(self.shape)
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._zip = zipfile.ZipFile(self.path)
        self._stream = self._zip.open(member)
        _read_header(self._stream, self.path)
        self._next_row, self._buffer = 0, None

    def rows(self, start, stop):
        if start != self._next_row:
            raise ValueError("a compressed .npz member can only be read once, front to back")
        nbytes = (stop - start) * self._row_bytes
        if self._buffer is None or self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        view = memoryview(self._buffer)[:nbytes]
        got = 0
        while got < nbytes:
            n = self._stream.readinto(view[got:])
            if not n:
                raise ValueError(f"{self.path}: member {self.member} is truncated")
            got += n
        self._next_row = stop
        return self._buffer[:nbytes].view(self.dtype).reshape((stop - start,) + self.shape[1:])

    def release(self, start, stop):
        """Nothing to release: the buffer is reused for the next chunk."""

    def close(self):
        self._stream.close()
        self._zip.close()


class InMemoryArray:
    """An array already in memory (or a ``np.memmap``), scored by the same chunked loop."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.dtype, self.shape, self.ndim = self.array.dtype, self.array.shape, self.array.ndim

    def rows(self, start, stop):
        return self.array[start:stop]

    def release(self, start, stop):
        """Memory owned by the caller is left alone."""

    def close(self):
        pass


def _read_header(f, path):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported format version {version}")
    except Exception as exc:  # noqa: BLE001 - a damaged header raises all kinds of errors
        raise ValueError(f"{path} is not a valid .npy/.npz array: its header is damaged "
                         f"({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: arrays of Python objects cannot be scored")
    if fortran and len(shape) > 1:
        raise ValueError(
            f"{path}: the array is stored in Fortran order, so its rows are not contiguous; "
            "re-save it with np.save(path, np.ascontiguousarray(a))"
        )
    return shape, dtype


def _zip_data_offset(f, info):
    """Offset in the zip file of member ``info``'s first byte (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _split_member(spec):
    """``"a.npz:logits"`` -> ``("a.npz", "logits")``; any other path -> ``(path, None)``."""
    spec = os.fspath(spec)
    head, sep, member = spec.rpartition(":")
    if sep and head.lower().endswith(".npz") and not os.path.exists(spec):
        return head, member
    return spec, None


def open_array(spec):
    """Open an array on disk for streaming, without reading its data.

    Parameters
    ----------
    spec : str or path-like
        A ``.npy`` file; or a ``.npz`` file holding one array, or ``"file.npz:name"`` for
        its member ``name``.

    Returns
    -------
    MappedArray or StreamedArray
        A :class:`MappedArray` for ``.npy`` files and uncompressed ``.npz`` members, a
        :class:`StreamedArray` (one sequential pass) for compressed members.
    """
    path, member = _split_member(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            if member is not None:
                raise ValueError(f"{path} is not an .npz (zip) file")
            f.seek(0)
            shape, dtype = _read_header(f, path)
            source = MappedArray(path, f.tell(), dtype, shape)
            size = os.fstat(f.fileno()).st_size
        else:
            with zipfile.ZipFile(f) as zf:
                names = [n for n in zf.namelist() if n.endswith(".npy")]
                if member is None:
                    if len(names) != 1:
                        raise ValueError(f"{path} holds arrays {[n[:-4] for n in names]}: "
                                         f"choose one with {path}:NAME")
                    name = names[0]
                else:
                    name = member + ".npy"
                    if name not in names:
                        raise ValueError(f"{path} has no array {member!r} "
                                         f"(it holds {[n[:-4] for n in names]})")
                info = zf.getinfo(name)
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(name) as stream:
                        shape, dtype = _read_header(stream, f"{path}:{name[:-4]}")
                    return StreamedArray(path, name, dtype, shape)
                start = _zip_data_offset(f, info)
            f.seek(start)
            shape, dtype = _read_header(f, f"{path}:{name[:-4]}")
            source = MappedArray(path, f.tell(), dtype, shape)
            size = start + info.file_size
    need = source.offset + source.dtype.itemsize * math.prod(source.shape)
    if size < need:
        raise ValueError(f"{path} is truncated: the array needs {need} bytes, the file has {size}")
    return source


def _as_source(obj):
    if isinstance(obj, (MappedArray, StreamedArray, InMemoryArray)):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_array(obj)
    return InMemoryArray(obj)


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """What :func:`score` measured.

    ``mean_loss`` equals ``cecore.cross_entropy(logits, target, ...)`` on the whole array
    in memory (same dtype, bit for bit); ``perplexity = exp(mean_loss)``; ``accuracy`` is
    the unweighted fraction of scored rows whose largest input is the target class (for
    probability targets: the target's largest class).
    """

    mean_loss: float
    perplexity: float
    accuracy: float
    rows: int
    rows_scored: int
    rows_ignored: int
    loss_sum: float
    denominator: float
    seconds: float
    rows_per_second: float
    gb_per_second: float
    input_kind: str
    target_kind: str
    dtype: str
    n_classes: int
    chunk_rows: int
    per_row_out: str = None

    def to_dict(self):
        """The fields as a dict; a metric that was not computed (NaN) is None (JSON null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}


@dataclass
class _Options:
    """Validated options shared by every chunk (picklable, for Dask workers)."""

    input_kind: str
    proba: bool
    accuracy: bool
    weight: np.ndarray
    ignore_index: int
    label_smoothing: float
    backend: str
    n_threads: int
    dtype: np.dtype


def _prepare(x_shape, x_dtype, t_shape, t_dtype, input_kind, weight, ignore_index,
             label_smoothing, backend, n_threads, accuracy=True):
    """Check shapes, dtypes and options once; return the :class:`_Options` for the chunks."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    V.float_input(np.empty(0, x_dtype), "logits")
    if len(x_shape) != 2:
        raise ValueError(f"logits must have shape (rows, classes), got shape {tuple(x_shape)}")
    n_rows, n_classes = x_shape
    if n_classes == 0:
        raise ValueError(f"logits of shape {tuple(x_shape)} have no classes: nothing to score")
    proba = tuple(t_shape) == tuple(x_shape)
    if proba:
        if np.dtype(t_dtype).kind != "f":
            raise TypeError(f"a target of the logits' shape {tuple(x_shape)} holds class probabilities "
                            f"and must be floating point, got dtype {t_dtype}")
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported with class-probability targets")
    else:
        if np.dtype(t_dtype).kind not in "iu":
            raise TypeError(f"class-index targets must be integers, got dtype {t_dtype} "
                            f"(probability targets must have the logits' shape {tuple(x_shape)})")
        if len(t_shape) != 1:
            raise ValueError(f"target of shape {tuple(t_shape)} does not match logits of shape "
                             f"{tuple(x_shape)}: expected ({n_rows},) or {tuple(x_shape)}")
        if t_shape[0] != n_rows:
            raise ValueError(f"logits have {n_rows} rows but target has {t_shape[0]}")
    get_backend(backend)  # fail now, not on the first chunk
    return _Options(input_kind, proba, bool(accuracy), V.class_weight(weight, n_classes), int(ignore_index),
                    V.check_label_smoothing(label_smoothing), backend,
                    V.n_threads(n_threads), V.compute_dtype(np.dtype(x_dtype).newbyteorder("=")))


def _score_chunk(x, t, opts):
    """Score one chunk of rows.

    Returns ``(loss, valid_weight, n_ignored, n_correct)``: the float64 per-row losses,
    the weights of the non-ignored targets in row order (None for probability targets),
    and the counts of ignored rows and of rows whose top-1 class is right.
    """
    n_rows, n_classes = x.shape
    if opts.input_kind == "probs":
        with np.errstate(divide="ignore", invalid="raise"):
            try:
                x3 = np.log(x, dtype=opts.dtype)
            except FloatingPointError:
                raise ValueError("input_kind='probs' but the input has negative values") from None
    else:
        # log-probabilities are scored as logits: log_softmax(log p) = log p, so the loss
        # is -log p[target] (nll_loss) when they are normalised, and stays right if not.
        x3 = np.ascontiguousarray(x, dtype=opts.dtype)
    x3 = x3.reshape(n_rows, n_classes, 1)
    loss = np.empty((n_rows, 1), np.float64)
    no_grad = np.empty((0, 0, 0), opts.dtype)
    scale = np.broadcast_to(np.float64(0.0), loss.shape)
    kernels = get_backend(opts.backend)
    t3 = np.ascontiguousarray(t, dtype=opts.dtype).reshape(x3.shape) if opts.proba else None
    t2 = None if opts.proba else V.index_target(t, (n_rows, n_classes), n_classes,
                                                 opts.ignore_index)
    predicted = np.empty(n_rows, np.intp) if opts.accuracy else None
    # Top-1 accuracy needs a second read of the logits: done per block of rows right after
    # the kernel, while the block is still in cache (an argmax over the whole chunk read
    # it from memory again and halved the throughput).
    step = max(1, _ACCURACY_BLOCK_BYTES // (n_classes * x.dtype.itemsize)) if opts.accuracy else n_rows
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        if opts.proba:
            kernels.softmax_ce_proba(x3[a:b], t3[a:b], opts.weight, opts.label_smoothing,
                                     scale[a:b], loss[a:b], no_grad, opts.n_threads)
        else:
            kernels.softmax_ce_index(x3[a:b], t2[a:b], opts.weight, opts.ignore_index,
                                     opts.label_smoothing, scale[a:b], loss[a:b], no_grad,
                                     opts.n_threads)
        if opts.accuracy:
            np.argmax(x[a:b], axis=1, out=predicted[a:b])
    if opts.proba:
        n_correct = int(np.count_nonzero(predicted == np.argmax(t, axis=1))) if opts.accuracy else 0
        return loss.reshape(-1), None, 0, n_correct
    t1 = t2.reshape(-1)
    keep = t1 != opts.ignore_index
    n_correct = int(np.count_nonzero(predicted[keep] == t1[keep])) if opts.accuracy else 0
    return loss.reshape(-1), opts.weight[t1[keep]], n_rows - int(np.count_nonzero(keep)), n_correct


class _Totals:
    """Accumulates chunk results into a :class:`ScoreResult` (used by the Dask path too)."""

    def __init__(self):
        self.loss, self.weight = _reduce.BlockSum(), _reduce.BlockSum()
        self.rows = self.ignored = self.correct = 0

    def add_counts(self, n_rows, n_ignored, n_correct):
        self.rows += n_rows
        self.ignored += n_ignored
        self.correct += n_correct

    def result(self, opts, seconds, nbytes, chunk_rows, n_classes, per_row_out=None):
        loss_sum = self.loss.total()
        scored = self.rows - self.ignored
        # the denominators of cecore.cross_entropy's mean, computed the same way
        denominator = np.float64(self.rows if opts.proba else self.weight.total())
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = opts.dtype.type(np.float64(loss_sum) / denominator)
        return ScoreResult(
            mean_loss=float(mean), perplexity=float(np.exp(np.float64(mean))),
            accuracy=self.correct / scored if scored and opts.accuracy else float("nan"),
            rows=self.rows, rows_scored=scored, rows_ignored=self.ignored,
            loss_sum=float(loss_sum), denominator=float(denominator), seconds=seconds,
            rows_per_second=self.rows / seconds if seconds else float("inf"),
            gb_per_second=nbytes / seconds / 1e9 if seconds else float("inf"),
            input_kind=opts.input_kind, target_kind="probabilities" if opts.proba else "indices",
            dtype=str(opts.dtype), n_classes=n_classes, chunk_rows=chunk_rows,
            per_row_out=None if per_row_out is None else os.fspath(per_row_out),
        )


def _chunk_rows(memory_budget, x_src, t_src, opts, per_row):
    """Rows per chunk so that one chunk's memory stays within ``memory_budget`` bytes."""
    n_classes = x_src.shape[1]
    row = x_src.dtype.itemsize * n_classes + t_src.dtype.itemsize * math.prod(t_src.shape[1:])
    if opts.input_kind == "probs" or x_src.dtype != opts.dtype:
        row += opts.dtype.itemsize * n_classes  # the converted copy of the chunk
    if opts.proba and t_src.dtype != opts.dtype:
        row += opts.dtype.itemsize * n_classes
    row += 8 * 6 + (8 if per_row else 0)  # loss, argmax, int64 targets, weights, masks
    if isinstance(t_src, StreamedArray) or isinstance(x_src, StreamedArray):
        row *= 2  # the decompression buffer is resident while the kernel runs
    return max(1, min(x_src.shape[0], parse_size(memory_budget) // row))


def _umask():
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path, inputs=()):
    """Where a new ``.npy`` at ``path`` goes, refusing what would destroy data.

    Symlinks are followed, as ``np.save`` follows them: the file they point to is
    replaced and the link stays. An existing target must be a regular file (not a FIFO,
    device or directory) and must not be one of ``inputs`` (compared by device and inode,
    so hard links and other spellings of the same path count).

    Returns
    -------
    (real_path, mode) : the path to replace, and the permission bits the new file gets
        (the existing file's, else those ``open()`` would give under the umask).
    """
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(real)):
            raise FileNotFoundError(f"{path}: its directory does not exist") from None
        return real, 0o666 & ~_umask()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} exists and is not a regular file: refusing to replace it")
    for other in inputs:
        if other is None:
            continue
        try:
            o = os.stat(other)
        except OSError:
            continue
        if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
            raise ValueError(f"{path} is the input file {other}: refusing to overwrite an input")
    return real, stat.S_IMODE(st.st_mode)


@contextlib.contextmanager
def _atomic_npy(path, n_rows, dtype, inputs=()):
    """Yield a ``write(array)`` that appends rows to a new ``.npy`` file at ``path``.

    The rows go to a temporary file beside the target (see :func:`check_output_path`),
    renamed over it only when all ``n_rows`` were written without error: a failure leaves
    no partial file behind, and the target is never one of ``inputs``.
    """
    real, mode = check_output_path(path, inputs)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.",
                               suffix=".tmp")
    written = [0]
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600 files
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": (n_rows,)}
            np.lib.format.write_array_header_1_0(f, header)

            def write(values):
                np.ascontiguousarray(values, dtype=dtype).tofile(f)
                written[0] += len(values)

            yield write
            if written[0] != n_rows:
                raise RuntimeError(f"wrote {written[0]} of {n_rows} per-row losses")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _source_path(source):
    """The file a source reads (None for arrays in memory that are not memory maps)."""
    if isinstance(source, InMemoryArray):
        return getattr(source.array, "filename", None) or getattr(
            getattr(source.array, "base", None), "filename", None)
    return source.path


def score(logits, target, *, input_kind="logits", weight=None, ignore_index=-100,
          label_smoothing=0.0, memory_budget=DEFAULT_MEMORY_BUDGET, per_row_out=None,
          backend="auto", n_threads=None, accuracy=True, progress=False, protect=()):
    """Mean cross-entropy, perplexity and top-1 accuracy of an array too large for memory.

    The rows are read in chunks sized from ``memory_budget`` and scored with the fused
    loss-only kernel; the mean equals ``cecore.cross_entropy(logits, target, weight=weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing)`` on the whole array,
    bit for bit.

    Parameters
    ----------
    logits : str, path-like or array of shape (n_rows, n_classes)
        A ``.npy`` file (memory-mapped), a ``.npz`` file (``"file.npz:name"`` picks a
        member), or an array (e.g. a ``np.memmap``); float16, float32 or float64.
    target : str, path-like or array
        Class indices of shape (n_rows,), any integer dtype, each in ``[0, n_classes)`` or
        equal to ``ignore_index``; or class probabilities of shape (n_rows, n_classes).
    input_kind : {'logits', 'log_probs', 'probs'}, default='logits'
        What ``logits`` holds. Log-probabilities are scored as logits (softmax leaves
        them unchanged); probabilities are scored through their logarithm.
    weight : array-like of shape (n_classes,), optional
        Class weights, as in :func:`cecore.cross_entropy`.
    ignore_index : int, default=-100
        Target value whose rows are skipped (class-index targets only).
    label_smoothing : float in [0, 1], default=0.0
    memory_budget : int or str, default='512MB'
        Bytes one chunk of rows may occupy (``"512MB"``, ``"2GiB"``, ...).
    per_row_out : str or path-like, optional
        Write the per-row losses (the logits' dtype, 0 for ignored rows) to this ``.npy``
        file, created atomically.
    backend : {'auto', 'cython', 'numba'}, default='auto'
    n_threads : int, optional
    accuracy : bool, default=True
        Compute the top-1 accuracy (NaN when False). It reads each chunk a second time.
    progress : bool, default=False
        Show a tqdm progress bar on stderr.
    protect : sequence of paths, optional
        Files that ``per_row_out`` must not replace besides the inputs (e.g. a weight
        file); see :func:`check_output_path`.

    Returns
    -------
    ScoreResult
    """
    x_src = _as_source(logits)
    try:
        t_src = _as_source(target)
    except BaseException:
        x_src.close()
        raise
    try:
        opts = _prepare(x_src.shape, x_src.dtype, t_src.shape, t_src.dtype, input_kind, weight,
                        ignore_index, label_smoothing, backend, n_threads, accuracy)
        n_rows, n_classes = x_src.shape
        chunk = _chunk_rows(memory_budget, x_src, t_src, opts, per_row_out is not None)
        out_dtype = x_src.dtype
        totals = _Totals()
        inputs = [_source_path(x_src), _source_path(t_src), *protect]
        writer = (_atomic_npy(per_row_out, n_rows, out_dtype, inputs) if per_row_out is not None
                  else contextlib.nullcontext(None))
        from tqdm.auto import tqdm

        start_time = time.perf_counter()
        with writer as write, tqdm(total=n_rows, unit="row", unit_scale=True, disable=not progress,
                                   file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, n_rows, chunk):
                stop = min(n_rows, start + chunk)
                loss, valid_weight, n_ignored, n_correct = _score_chunk(
                    x_src.rows(start, stop), t_src.rows(start, stop), opts)
                x_src.release(start, stop)
                t_src.release(start, stop)
                totals.loss.add(loss)
                if valid_weight is not None:
                    totals.weight.add(valid_weight)
                totals.add_counts(stop - start, n_ignored, n_correct)
                if write is not None:
                    write(loss.astype(out_dtype))
                bar.update(stop - start)
        seconds = time.perf_counter() - start_time
        nbytes = n_rows * n_classes * x_src.dtype.itemsize
        return totals.result(opts, seconds, nbytes, chunk, n_classes, per_row_out)
    finally:
        x_src.close()
        t_src.close()


# --------------------------------------------------------------------------- command line


def _parse_weight(text):
    if os.path.exists(text):
        return np.load(text, allow_pickle=False)
    try:
        return np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"--weight {text!r} is neither a file nor a comma-separated list of numbers") from None


def configure_parser(parser):
    """Options of ``cecore score``."""
    parser.description = (
        "Score logits stored on disk against targets: mean cross-entropy (equal to "
        "cecore.cross_entropy on the whole array), perplexity and top-1 accuracy, read in "
        "chunks so that memory stays within --memory-budget."
    )
    parser.add_argument("logits", help="(rows, classes) array: .npy, or .npz[:NAME]")
    parser.add_argument("target", help="class indices (rows,) or probabilities (rows, classes): .npy, or .npz[:NAME]")
    parser.add_argument("--input-kind", choices=INPUT_KINDS, default="logits",
                        help="what LOGITS holds (default: logits)")
    parser.add_argument("--weight", metavar="FILE|W1,W2,...", help="class weights: a .npy file or a comma-separated list")
    parser.add_argument("--ignore-index", type=int, default=-100, help="target value to skip (default: -100)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="in [0, 1] (default: 0)")
    parser.add_argument("--memory-budget", default=DEFAULT_MEMORY_BUDGET,
                        help=f"memory for one chunk of rows, e.g. 256MB, 2GiB (default: {DEFAULT_MEMORY_BUDGET})")
    parser.add_argument("--per-row-out", metavar="FILE.npy", help="write the per-row losses to this .npy file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip the top-1 accuracy (saves a second read of each chunk)")
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel threads, at most the CPUs available (default: the "
                             "thread policy of cecore's functions: CECORE_NUM_THREADS, the "
                             "OpenMP limit, else all CPUs available)")
    parser.add_argument("--backend", choices=("auto", "cython", "numba"), default="auto")
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument("--dask", choices=("local",), help="score on a local Dask cluster started for this run")
    dask.add_argument("--scheduler", metavar="ADDRESS", help="score on the Dask cluster at ADDRESS (files must be visible to its workers)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for --dask local (default: 2)")


def _format_text(result):
    r = result
    lines = [
        f"mean loss     {r.mean_loss:.6f}",
        f"perplexity    {r.perplexity:.4f}",
        f"accuracy      {r.accuracy:.4%}" if r.accuracy == r.accuracy else "accuracy      not computed",
        f"rows          {r.rows} ({r.rows_scored} scored, {r.rows_ignored} ignored)",
        f"time          {r.seconds:.2f} s ({r.rows_per_second:,.0f} rows/s, {r.gb_per_second:.2f} GB/s)",
    ]
    if r.per_row_out:
        lines.append(f"per-row loss  {r.per_row_out}")
    return "\n".join(lines)


def _run(args):
    weight = None if args.weight is None else _parse_weight(args.weight)
    options = dict(input_kind=args.input_kind, weight=weight, ignore_index=args.ignore_index,
                   label_smoothing=args.label_smoothing, backend=args.backend,
                   accuracy=not args.no_accuracy)
    if args.dask or args.scheduler:
        if args.per_row_out:
            raise ValueError("--per-row-out is not supported with --dask/--scheduler")
        from . import _dask

        return _dask.score_files(args.logits, args.target, scheduler=args.scheduler,
                                 n_workers=args.workers, memory_budget=args.memory_budget,
                                 n_threads=args.threads, **options)
    progress = not args.quiet and sys.stderr.isatty()
    weight_file = args.weight if args.weight and os.path.exists(args.weight) else None
    return score(args.logits, args.target, memory_budget=args.memory_budget,
                 per_row_out=args.per_row_out, n_threads=args.threads, progress=progress,
                 protect=[weight_file], **options)


def run(args):
    """Run ``cecore score``; print the result; return the exit code (1 on bad input)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _run(args)
        for w in caught:  # one line each, like the errors
            print(f"cecore score: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("cecore score: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command reports every failure in one line
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, (OSError, zipfile.BadZipFile)) and not isinstance(exc, FileNotFoundError):
            message = f"{type(exc).__name__}: {message}" if not message.startswith("[") else message
        print(f"cecore score: error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2, allow_nan=False) if args.json
          else _format_text(result))
    return 0


def _main(argv=None):  # ``python -m cecore.batch`` is ``cecore score``
    parser = argparse.ArgumentParser(prog="cecore score")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
