"""Arrays on disk for streaming, and the atomic ``.npy`` writer: the I/O of batch scoring.

- **Reading.** A ``.npy`` file, or an uncompressed (``np.savez``) ``.npz`` member, is an
  array at a known byte offset, so it is memory-mapped; C-ordered (streamed arrays must
  be), a chunk of rows is a contiguous view handed to the kernel without a copy (a
  Fortran-ordered unembedding is read whole, as a transposed view). Pages of a mapping that have been
  touched count toward the process's resident memory (RSS) until they are unmapped, so
  each chunk's pages are dropped with ``madvise(MADV_DONTNEED)`` once it is scored; the
  file stays in the page cache, which is not RSS. A compressed ``.npz`` member cannot be
  mapped: it is decompressed sequentially into one reused chunk buffer instead.
- **Writing.** :func:`atomic_npy` writes a new ``.npy`` beside its target and renames it
  over the target only when complete; :func:`check_output_path` refuses targets that
  would destroy data (an input, a FIFO, a directory).
"""

import contextlib
import math
import mmap
import os
import stat
import struct
import zipfile
import zlib

import numpy as np

from ._validation import _to_numpy

__all__ = ["MappedArray", "StreamedArray", "InMemoryArray", "open_array", "as_source",
           "source_path", "check_output_path", "atomic_npy"]

_PAGE = mmap.PAGESIZE


def _identity(st):
    """What tells one version of a file from another: device, inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _view_of_files():
    """What tells this machine's view of the files from another's: the boot and the
    mount namespace (a Dask worker of a local cluster shares both with the client; one
    on another host, or in a container, does not). None where Linux's /proc is not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip(), os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None


def _same_version(st, identity, view):
    """Whether the file of stat ``st`` is the version of ``identity``, recorded where the
    files look as ``view`` (:func:`_view_of_files`). Elsewhere (a Dask worker on another
    host) the path may be a network mount or a copy, whose device and inode numbers are
    that host's and whose timestamps may be coarser: there, size and mtime to the second
    must match, unless it is the same inode."""
    now = _identity(st)
    if (view is not None and view == _view_of_files()) or now[:2] == identity[:2]:
        return now == identity
    return now[2] == identity[2] and now[3] // 10**9 == identity[3] // 10**9


def _changed(path, view):
    """The error for a file that is not the version whose header was read, where the
    files look as ``view`` (:func:`_view_of_files`)."""
    if view is not None and view != _view_of_files():  # a worker of another host
        return ValueError(f"{path} here (a Dask worker's view of the files) is not the file "
                          "whose header was read (its size or time differ): the workers must "
                          "see the same files as the client")
    return ValueError(f"{path} changed after its header was read (it was replaced or "
                      "rewritten): score it again")


class _OnDisk:
    """The file an array reader was opened on, as its header was read: its identity,
    absolute path (as the opener's working directory has it) and this machine's view of
    the files. A reader pickles as that absolute path (a worker's working directory is
    not the client's) and reads only that version of the file."""

    def _record(self, path):
        self.path = os.fspath(path)
        self._identity = _identity(os.stat(self.path))
        self._abspath, self._view = os.path.abspath(self.path), _view_of_files()

    def _check(self, f):
        """Raise unless the open file ``f`` is the version whose header was read."""
        if not _same_version(os.fstat(f.fileno()), self._identity, self._view):
            raise _changed(self.path, self._view)

    def _state(self, *transient):
        """``__dict__`` to pickle: ``transient`` attributes reset to None, the path absolute."""
        return self.__dict__ | dict.fromkeys(transient) | {"path": self._abspath}


class MappedArray(_OnDisk):
    """A C-ordered array stored in a file at a byte offset, read through a memory map.

    It pickles as its absolute path and layout (the map is reopened where it is
    unpickled), so Dask workers read their own rows of the file. The file is mapped only
    if it is still the one whose header was read (same inode, size and modification
    time; on a worker of another host, where the path may be a copy or a network mount,
    size and modification time to the second): a file replaced in between, e.g. while a Dask
    cluster starts, would otherwise be read with the old header's dtype and shape.
    :meth:`rows` and :meth:`release` are the zero-copy pair used for streaming.
    A Fortran-ordered array (``fortran=True``, an unembedding only) is read whole, as a
    transposed view of the map.
    """

    def __init__(self, path, offset, dtype, shape, fortran=False):
        self._record(path)
        self.offset = int(offset)
        self.dtype, self.shape = np.dtype(dtype), tuple(int(n) for n in shape)
        self.ndim, self.fortran = len(self.shape), fortran
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._map = None

    def __getstate__(self):
        return self._state("_map")

    def __dask_tokenize__(self):
        return ("cecore.MappedArray", self._abspath, self.offset, str(self.dtype), self.shape,
                self._identity)

    def _mapped(self):
        if self._map is None:
            # A private (copy-on-write) map: nothing ever writes to it, but arrays over a
            # read-only buffer make np.argmax copy the whole chunk, and make Numba compile
            # a second, read-only specialisation of every kernel.
            with open(self.path, "rb") as f:
                self._check(f)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if hasattr(mmap, "MADV_SEQUENTIAL"):  # more read-ahead when the file is cold
                self._map.madvise(mmap.MADV_SEQUENTIAL)
        return self._map

    def rows(self, start, stop):
        """Rows ``start:stop`` as a view of the mapped file (no copy; the map is
        private, so a write to the view would change this process's copy, never the
        file)."""
        _check_rows(self, start, stop)
        if self.fortran:
            _check_whole(self, start, stop)
            return np.frombuffer(self._mapped(), self.dtype, math.prod(self.shape),
                                 self.offset).reshape(self.shape[::-1]).T
        count = (stop - start) * self._row_bytes // self.dtype.itemsize
        flat = np.frombuffer(self._mapped(), self.dtype, count, self.offset + start * self._row_bytes)
        return flat.reshape((stop - start,) + self.shape[1:])

    def release(self, start, stop):
        """Drop the pages of rows ``start:stop`` from this process (they stay in the page cache)."""
        if self._map is None or self.fortran or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = (self.offset + start * self._row_bytes) // _PAGE * _PAGE
        end = min(-(-(self.offset + stop * self._row_bytes) // _PAGE) * _PAGE, len(self._map))
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self):
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: let GC close it
                self._map.close()
            self._map = None


class StreamedArray(_OnDisk):
    """A compressed ``.npz`` member, decompressed front to back into one reused buffer.

    :meth:`rows` must be called with consecutive, increasing ranges (one pass); a
    Fortran-ordered array (``fortran=True``) with the whole range. The member is opened
    at the first :meth:`rows`, not before: a copy unpickled where it is not read (a Dask
    scheduler, which may not see the file) opens nothing. As :class:`MappedArray`, it
    pickles as its absolute path, and reads only the file whose header was read (same
    identity, and the same dtype and shape in the member's header).
    """

    def __init__(self, path, member, dtype, shape, fortran=False):
        self._record(path)
        self.member = member
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.ndim, self.fortran = len(self.shape), fortran
        self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self._zip = self._stream = None
        self._next_row, self._buffer = 0, None

    def _open(self):
        with open(self.path, "rb") as f:
            self._check(f)
        self._zip = zipfile.ZipFile(self.path)
        self._stream = self._zip.open(self.member)
        if _read_header(self._stream, self.path, any_order=self.fortran) != (
                self.shape, self.dtype, self.fortran):
            self.close()
            raise _changed(self.path, self._view)

    def rows(self, start, stop):
        _check_rows(self, start, stop)
        if self.fortran:
            _check_whole(self, start, stop)
        if start != self._next_row:
            raise ValueError("a compressed .npz member can only be read once, front to back")
        if self._stream is None:
            self._open()
        nbytes = (stop - start) * self._row_bytes
        if self._buffer is None or self._buffer.nbytes < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        view = memoryview(self._buffer)[:nbytes]
        got = 0
        while got < nbytes:
            try:
                n = self._stream.readinto(view[got:])
            except OSError as exc:
                _name_file(exc, self.path)
                raise
            except (zipfile.BadZipFile, zlib.error) as exc:  # (a CRC error named only the
                raise zipfile.BadZipFile(  # member: arr_0.npy in every np.savez file)
                    f"{self.path}: member {self.member}: {exc}") from exc
            if not n:
                raise ValueError(f"{self.path}: member {self.member} is truncated")
            got += n
        self._next_row = stop
        flat = self._buffer[:nbytes].view(self.dtype)
        if self.fortran:
            return flat.reshape(self.shape[::-1]).T
        return flat.reshape((stop - start,) + self.shape[1:])

    def __getstate__(self):
        # A Dask worker's copy opens the member afresh (an open ZipFile does not pickle):
        # decompressed again by each task that receives it (a .npy is memory-mapped).
        return self._state("_zip", "_stream", "_buffer") | {"_next_row": 0}

    def release(self, start, stop):
        """Nothing to release: the buffer is reused for the next chunk."""

    def close(self):
        if self._stream is not None:
            self._stream.close()
            self._zip.close()
        self._zip = self._stream = None


class InMemoryArray:
    """An array already in memory (or a ``np.memmap``), scored by the same chunked loop."""

    def __init__(self, array):
        self.array = _to_numpy(array)  # a tensor that requires grad, bfloat16 included
        self.dtype, self.shape, self.ndim = self.array.dtype, self.array.shape, self.array.ndim

    def rows(self, start, stop):
        _check_rows(self, start, stop)
        return self.array[start:stop]

    def release(self, start, stop):
        """Memory owned by the caller is left alone."""

    def close(self):
        pass


def _check_rows(source, start, stop):
    """Rows start:stop must be in order and inside the array (a negative start read the
    .npy header as data; a start past stop gave the rows after start)."""
    if not 0 <= start <= stop <= source.shape[0]:
        raise ValueError(f"rows {start}:{stop} of an array of {source.shape[0]} rows: "
                         f"expected 0 <= start <= stop <= {source.shape[0]}")


def _check_whole(source, start, stop):
    if (start, stop) != (0, source.shape[0]):
        raise ValueError(f"{source.path}: a Fortran-ordered array is read whole, not rows "
                         f"{start}:{stop}")


def _read_header(f, path, any_order=False):
    """``(shape, dtype, fortran)`` of the array whose ``.npy`` header starts at ``f``'s
    position. Fortran order is refused for more than one dimension unless ``any_order``
    (an unembedding, read whole): the rows of such an array are not contiguous."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):  # 3.0: 2.0 with a UTF-8 header (np.save writes
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)  # it for such names)
        else:
            raise ValueError(f"unsupported format version {version}")
    except OSError as exc:  # EIO of a failing disk is no damaged header
        _name_file(exc, path)
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header raises all kinds of errors
        raise ValueError(f"{path} is not a valid .npy/.npz array: its header is damaged "
                         f"({type(exc).__name__}: {exc})") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{path} is not a valid .npy/.npz array: its header declares the "
                         f"shape {shape}")
    if dtype.hasobject:
        raise ValueError(f"{path}: arrays of Python objects cannot be scored")
    fortran = bool(fortran) and len(shape) > 1
    if fortran and not any_order:
        raise ValueError(
            f"{path}: the array is stored in Fortran order, so its rows are not contiguous; "
            "re-save it with np.save(path, np.ascontiguousarray(a))"
        )
    if dtype.subdtype is not None:  # ('<f4', (6,)) of shape (50,): NumPy reads (50, 6) f4
        dtype, inner = dtype.subdtype
        if fortran:  # NumPy itself cannot read a Fortran-ordered array of such a dtype
            raise ValueError(f"{path}: a Fortran-ordered array of dtype {dtype} with "
                             f"subarray {inner} cannot be read")
        shape = tuple(shape) + inner
    return shape, dtype, fortran


def _zip_data_offset(f, info):
    """Offset in the zip file of member ``info``'s first byte (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _split_member(spec):
    """``"a.npz:logits"`` -> ``("a.npz", "logits")``; any other path -> ``(path, None)``.

    The file is the first ``.npz`` before a colon that exists, else the first existing
    zip file of another name before a colon (``np.savez`` to ``a.zip``), else the first
    ``.npz`` before a colon; so member names may hold colons (``"a.npz:x:y"`` is member
    ``x:y``).
    """
    spec = os.fspath(spec)
    if os.path.exists(spec):
        return spec, None
    colons = [i for i, ch in enumerate(spec) if ch == ":"]
    cuts = [i for i in colons if spec[:i].lower().endswith(".npz")]
    for i in cuts:
        if os.path.isfile(spec[:i]):
            return spec[:i], spec[i + 1:]
    for i in colons:
        if os.path.isfile(spec[:i]) and zipfile.is_zipfile(spec[:i]):
            return spec[:i], spec[i + 1:]
    return (spec[:cuts[0]], spec[cuts[0] + 1:]) if cuts else (spec, None)


def open_array(spec, any_order=False):
    """Open an array on disk for streaming, without reading its data.

    Parameters
    ----------
    spec : str or path-like
        A ``.npy`` file; or a ``.npz`` file holding one array, or ``"file.npz:name"`` for
        its member ``name``.
    any_order : bool, default=False
        Accept a Fortran-ordered array (``np.save`` of a transposed matrix), to be read
        whole: an unembedding. Streamed arrays must be C-ordered.

    Returns
    -------
    MappedArray or StreamedArray
        A :class:`MappedArray` for ``.npy`` files and uncompressed ``.npz`` members, a
        :class:`StreamedArray` (one sequential pass) for compressed members.
    """
    path, member = _split_member(spec)
    _check_regular(path)
    try:
        return _open_regular(path, member, any_order)
    except OSError as exc:
        _name_file(exc, path)
        raise


def _name_file(exc, path):
    """Give ``exc`` the file name ``path`` when it has none (EIO of a failing disk said
    "[Errno 5] Input/output error", and not which input it was)."""
    if exc.filename is None and exc.errno is not None:
        exc.filename = path


def _open_regular(path, member, any_order):
    with open(path, "rb") as f:
        # the .npy magic first, as np.load: is_zipfile looks for a zip's end record in the
        # last 64 kB, which a .npy's data can contain by chance
        npy = f.read(6) == b"\x93NUMPY"
        f.seek(0)
        if npy or not zipfile.is_zipfile(f):
            if member is not None:
                raise ValueError(f"{path} is not an .npz (zip) file")
            f.seek(0)
            shape, dtype, fortran = _read_header(f, path, any_order)
            source = MappedArray(path, f.tell(), dtype, shape, fortran)
            size = os.fstat(f.fileno()).st_size
        else:
            with zipfile.ZipFile(f) as zf:
                names = [n for n in zf.namelist() if n.endswith(".npy")]
                if member is None:
                    if not names:
                        raise ValueError(f"{path} is a zip file with no .npy arrays in it, "
                                         "not an .npz of arrays")
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
                        shape, dtype, fortran = _read_header(stream, f"{path}:{name[:-4]}",
                                                             any_order)
                        header = stream.tell()
                    # Checked before anything of the array's size is allocated (the
                    # scorer's buffers follow the header's shape): against the member's
                    # size as the zip directory records it and, for deflate, which
                    # expands at most 1032-fold, against its compressed bytes, which a
                    # lying directory cannot inflate past the file's length.
                    size = info.file_size
                    if info.compress_type == zipfile.ZIP_DEFLATED:
                        packed = min(info.compress_size, os.fstat(f.fileno()).st_size)
                        size = min(size, 1032 * packed + 64)
                    _check_size(f"{path}:{name[:-4]}", header + dtype.itemsize * math.prod(shape),
                                size)
                    return StreamedArray(path, name, dtype, shape, fortran)
                start = _zip_data_offset(f, info)
            f.seek(start)
            shape, dtype, fortran = _read_header(f, f"{path}:{name[:-4]}", any_order)
            source = MappedArray(path, f.tell(), dtype, shape, fortran)
            # the directory's size, but never past the file's end (a directory can lie)
            size = min(start + info.file_size, os.fstat(f.fileno()).st_size)
            path = f"{path}:{name[:-4]}"
    _check_size(path, source.offset + source.dtype.itemsize * math.prod(source.shape), size)
    return source


def _check_size(what, need, size):
    if size < need:
        raise ValueError(f"{what} is truncated or damaged: the array needs {need} bytes, "
                         f"the file holds {size}")


def _check_regular(path):
    """A FIFO or device would block or never end; a directory is not an array."""
    if not os.path.exists(path):
        if os.path.islink(path):
            raise FileNotFoundError(f"{path}: a symbolic link to a missing file, or a loop")
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file")


def load_small(path, what):
    """A small 1-D array (class weights, a bias) from a ``.npy`` file or an ``.npz`` of one
    array, with one-line errors that name it as ``what``.

    Its header is read and checked as :func:`open_array` checks the logits', and a
    ``.npy`` comes back memory-mapped, not read: its length is checked against the
    classes by the caller, so a large file given by mistake (the logits, say) is refused
    before it is read into memory (a 2 GB file was read whole, then refused).
    """
    try:
        source = open_array(path)
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from None
    try:
        if source.ndim != 1:
            raise ValueError(f"{what} {path} holds an array of shape {source.shape}: "
                             "expected a 1-D array")
        values = source.rows(0, source.shape[0])
        return values if isinstance(source, MappedArray) else values.copy()
    finally:
        if isinstance(source, StreamedArray):
            source.close()


def as_source(obj, any_order=False):
    """A reader for ``obj``: a path (see :func:`open_array`), a reader, or an array."""
    if isinstance(obj, (MappedArray, StreamedArray, InMemoryArray)):
        return obj
    if isinstance(obj, (str, os.PathLike, bytes)):
        return open_array(os.fsdecode(obj), any_order)
    if obj is None:
        raise TypeError("expected an array or the path of a .npy/.npz file, got None")
    return InMemoryArray(obj)


def source_path(source):
    """The file a source reads (None for arrays in memory that are not memory maps)."""
    if isinstance(source, InMemoryArray):
        return getattr(source.array, "filename", None) or getattr(
            getattr(source.array, "base", None), "filename", None)
    return source.path


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
    replaced and the link stays. An existing target must be a regular ``.npy`` file (or
    empty; not a FIFO, device, directory or any other file) and must not be one of
    ``inputs`` (compared by device and inode, so hard links and other spellings of the
    same path count) nor memory-mapped by this process.

    Returns
    -------
    (real_path, mode) : the path to replace, and the permission bits the new file gets
        (the existing file's, else those ``open()`` would give under the umask).
    """
    path = os.fsdecode(path)
    if not path:
        raise ValueError("the output path is empty: give the path of a .npy file")
    if path.endswith(("/", os.sep)):
        raise ValueError(f"{path} names a directory: give the path of a .npy file")
    try:
        st = os.stat(path)  # through symlinks (or to a pipe)
    except FileNotFoundError:
        if os.path.islink(path):  # a new file where the link points, as np.save makes
            return check_output_path(os.path.join(os.path.dirname(path), os.readlink(path)),
                                     inputs)
        # The directory as spelled: realpath alone makes "missing/../input.npy" the input
        # by collapsing "missing/.." as text, where the system finds no such directory.
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{path}: its directory does not exist") from None
        real = os.path.join(os.path.realpath(parent), os.path.basename(path))
        return real, 0o666 & ~_umask()
    real = os.path.realpath(path)  # every part exists (a pipe's /proc link only to stat)
    if stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        # /dev/stdout and the like: replacing the file would lose what the command prints
        # there, and a pipe has no directory to write a file beside it (a terminal or
        # /dev/null is refused just below, as not a regular file)
        for fd, name in ((1, "output"), (2, "error"), (0, "input")):
            try:
                same = os.path.samestat(st, os.fstat(fd))
            except OSError:  # that stream is closed
                same = False
            if same:
                raise ValueError(f"{path} is this process's standard {name}: give the path "
                                 "of a .npy file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} exists and is not a regular file: refusing to replace it")
    if not os.access(real, os.W_OK):
        # np.save would fail there; the atomic rename needs only the directory's permission
        # and would have replaced a file its owner had made read-only
        raise PermissionError(f"{path} exists and is not writable: refusing to replace it")
    for other in inputs:
        if other is None:
            continue
        try:
            o = os.stat(other)
        except OSError:
            continue
        if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
            raise ValueError(f"{path} is the input file {other}: refusing to overwrite an input")
    if _mapped_here(st):
        raise ValueError(f"{path} is memory-mapped by this process (an input array read from "
                         "it?): refusing to replace it")
    if st.st_size > 0:  # an empty file holds nothing to lose
        with open(real, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            # per-row losses only replace an earlier .npy: a typo must not cost a config file
            raise ValueError(f"{path} exists and is not a .npy file: refusing to replace it "
                             "(remove it first if that is what you want)")
    return real, stat.S_IMODE(st.st_mode)


def _mapped_here(st):
    """Whether this process has the file of ``os.stat`` result ``st`` memory-mapped.

    This catches an input memory map that reached cecore in a wrapper whose file cannot be
    found from the array (a torch tensor over it, ``np.frombuffer``, ``as_strided``), which
    ``inputs`` misses. Linux only (/proc/self/maps); elsewhere False.
    """
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[4] == "0" or int(fields[4]) != st.st_ino:
                    continue
                major, minor = (int(v, 16) for v in fields[3].split(":"))
                if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
                    return True
    except (OSError, ValueError):
        pass
    return False


@contextlib.contextmanager
def atomic_npy(path, n_rows, dtype, inputs=()):
    """Yield a ``write(array)`` that appends rows to a new ``.npy`` file at ``path``.

    The rows go to a temporary file beside the target (see :func:`check_output_path`),
    renamed over it only when all ``n_rows`` were written without error: a failure leaves
    no partial file behind, and the target is never one of ``inputs``.
    """
    real, mode = check_output_path(path, inputs)
    fd, tmp = _new_temporary(path, real)
    written = [0]
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:  # unbuffered: no write error deferred to close
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": (n_rows,)}
            try:
                os.fchmod(f.fileno(), mode)  # created 0600
                np.lib.format.write_array_header_1_0(f, header)
            except OSError as exc:  # a full disk: name the file, as the rows' writes do
                raise _write_error(path, exc) from None
            size = f.tell() + n_rows * np.dtype(dtype).itemsize  # when complete

            def write(values):
                # Not ndarray.tofile: its buffered fwrite can fail (a full disk, a
                # file-size limit) without an error, and a short file was installed.
                values = np.ascontiguousarray(values, dtype=dtype)
                data = memoryview(values.reshape(-1)).cast("B")
                try:
                    while data:  # a raw file: a write may be short
                        n = f.write(data)
                        if not n:
                            raise OSError(f"{len(data)} bytes not written")
                        data = data[n:]
                except OSError as exc:
                    raise _write_error(path, exc) from None
                written[0] += len(values)

            yield write
            if written[0] != n_rows:
                raise RuntimeError(f"wrote {written[0]} of {n_rows} per-row losses")
            try:
                os.fsync(f.fileno())
            except OSError as exc:
                raise _write_error(path, exc) from None
            actual = os.fstat(f.fileno()).st_size
            if actual != size:  # whatever the cause: never install a short file
                raise OSError(f"cannot write {path}: {actual} of {size} bytes written")
        try:
            os.replace(tmp, real)
        except OSError as exc:
            raise _write_error(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        PENDING.discard(tmp)


def _new_temporary(path, real):
    """A new hidden file beside ``real``, open for writing, and its name, in PENDING.

    Its name is in PENDING before the file exists (tempfile.mkstemp named it only after
    creating it): a signal handled in between removed nothing and left the file behind
    (a CI run on a busy machine, SIGXCPU sent as soon as the file appeared). The name's
    64 random bits make another file of that name, one this process must not remove,
    impossible in practice.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(os.path.dirname(real),
                           f".{os.path.basename(real)}.{os.urandom(8).hex()}.tmp")
        PENDING.add(tmp)
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            PENDING.discard(tmp)
        except OSError as exc:  # name the file asked for, not the hidden temporary one
            PENDING.discard(tmp)
            raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror} (in its "
                                       "directory, where it is written first)") from None


def _write_error(path, exc):
    """An OSError naming the file asked for (not its hidden temporary) and the cause."""
    if exc.errno:
        return OSError(exc.errno, f"cannot write {path}: {exc.strerror}")
    return OSError(f"cannot write {path}: {exc} (a full disk, or a file-size limit?)")


# Temporary files of atomic_npy being written, for a signal handler that must end the
# process at once (see cecore.cli) to remove.
PENDING = set()


def remove_pending():
    for tmp in list(PENDING):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
