"""Scoring on a Dask cluster: each chunk of rows is scored on a worker, the sums combined exactly.

Dask is imported only when one of these functions runs, so cecore works without it
(install the extra ``cecore[dask]``).

Rows are rechunked to multiples of ``REDUCE_BLOCK`` so that every chunk but the last
holds whole reduction blocks: a worker scores its chunk with the engine's
:func:`cecore.batch.score_chunk`, in pieces that fit the memory budget, and returns the
block sums and counts of :meth:`cecore.metrics._report.ReportSums.partials`, which are
exactly the blocks the in-memory computation makes; the client adds them in row order.
"""

import contextlib
import logging
import struct
import threading
import time
import warnings

import numpy as np

from . import _validation as V
from ._config import DEFAULT_MEMORY_BUDGET, REDUCE_BLOCK, cpus_available
from ._io import InMemoryArray, MappedArray, as_source, open_array
from ._validation import _to_numpy
from .batch import chunk_rows as chunk_rows_for_budget
from .batch import check_distinct, make_result, prepare_options, score_chunk

__all__ = ["score_dask", "score_files"]


def _connect(client_class, address):
    """A client of the scheduler at ``address``, or a ValueError within about the
    connect timeout (``distributed.comm.timeouts.connect``, 30 s by default).

    distributed bounds the TCP connect but not the handshake after it: a port that
    accepts and never answers (the dashboard's HTTP port, a tunnel to something else)
    made ``Client`` wait forever. So the client is made on a helper thread that is given
    up after the timeout; and a scheduler with no workers would run nothing, so one
    worker must join within the same time."""
    import dask

    timeout = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
    made = {}

    def connect():
        try:
            made["client"] = client_class(address, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            made["error"] = exc

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 5)
    # ValueError, TypeError: e.g. inproc://, tls://; MemoryError, struct.error: a service
    # that speaks first (SMTP, SSH) read as a Dask frame ("cannot allocate 6.78 EiB")
    if isinstance(made.get("error"), (ValueError, TypeError, MemoryError, struct.error)):
        raise ValueError(f"cannot connect to a Dask scheduler at {address}: "
                         f"{type(made['error']).__name__}: {made['error']}") from None
    if "error" in made:
        raise made["error"]
    if "client" not in made:
        raise ValueError(f"no Dask scheduler answered at {address} within {timeout:g} s "
                         "(is it a Dask scheduler's address, port 8786 by default?)")
    client = made["client"]
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise ValueError(f"the Dask scheduler at {address} has no workers (none joined "
                         f"within {timeout:g} s)") from None
    return client


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise ImportError("Dask scoring needs dask: pip install 'cecore[dask]'") from exc
    return dask, da


def _score_block(x, t, start, stop, opts, piece_rows):
    """Worker side: score rows ``start:stop`` of ``x`` and ``t`` in pieces of at most
    ``piece_rows`` rows; return their block sums and counts (small).

    ``x`` and ``t`` are a chunk in memory, or file readers (:mod:`cecore._io`), whose
    pages each piece maps and then drops, so that a task holds about one piece however
    many rows it scores. Block sums carry over from piece to piece
    (:class:`cecore.metrics._report.ReportSums`), so the pieces do not change a bit.
    """
    sums = opts.new_sums(defer_weights=True)
    with warnings.catch_warnings():
        # The client warned once already; every task on every worker would print it again.
        warnings.filterwarnings("ignore", r"n_threads=\d+ is more than", RuntimeWarning)
        for r0 in range(start, stop, piece_rows) if stop > start else (start,):
            r1 = min(stop, r0 + piece_rows)
            if hasattr(x, "release"):
                score_chunk(x.rows(r0, r1), t.rows(r0, r1), opts, sums)
                x.release(r0, r1)
                t.release(r0, r1)
            else:
                score_chunk(np.asarray(x[r0:r1]), np.asarray(t[r0:r1]), opts, sums)
    return sums.partials()


def _rows_per_chunk(rows):
    return max(REDUCE_BLOCK, rows // REDUCE_BLOCK * REDUCE_BLOCK)


def score_dask(logits, target, *, input_kind="logits", weight=None, ignore_index=-100,
               label_smoothing=0.0, backend="auto", n_threads=None, top_k=5, n_bins=15,
               client=None, chunk_rows=None, memory_budget=DEFAULT_MEMORY_BUDGET,
               unembedding=None, bias=None, accuracy=None):
    """Score Dask arrays chunk by chunk on the workers; same result as :func:`cecore.batch.score`.

    Parameters
    ----------
    logits : dask array or array-like of shape (n_rows, n_classes)
    target : dask array or array-like of shape (n_rows,) or (n_rows, n_classes)
    input_kind, weight, ignore_index, label_smoothing, backend, top_k, n_bins, accuracy
        As :func:`cecore.batch.score`.
    unembedding, bias : optional
        Score hidden states: as :func:`cecore.batch.score`. A reader of a file
        (:func:`cecore._io.open_array`) reaches the workers as its path and is
        memory-mapped once by each (a compressed ``.npz`` member is decompressed by each
        task); an array is sent to them.
    n_threads : int, optional
        Kernel threads per task, resolved on the worker by cecore's thread policy (the
        default there is one thread: distributed starts its workers with
        ``OMP_NUM_THREADS=1``, and its worker threads already run tasks in parallel).
    client : distributed.Client, optional
        Defaults to Dask's current scheduler (the active client, if any).
    chunk_rows : int, optional
        Rows per task, rounded to a multiple of ``REDUCE_BLOCK``; defaults to the logits'
        first row chunk, rounded the same way.
    memory_budget : int or str, default='512MB'
        What a task scores at once: it goes through its chunk in pieces sized as
        :func:`cecore.batch.score` sizes its chunks (the chunk itself, which Dask hands
        to the task, is on top of this).

    Returns
    -------
    ScoreResult
        ``mean_loss`` equals ``cecore.cross_entropy`` on the whole array in memory, bit for bit.
    """
    dask, da = _import_dask()
    chunk_rows = V.check_int(chunk_rows, "chunk_rows", 1, allow_none=True)

    def as_dask(a):  # any other array-like, a torch tensor included, as the functional API
        if isinstance(a, da.Array):
            return a
        a = _to_numpy(a)  # chunked by rows whatever its dimensions (checked below)
        return da.from_array(a, chunks=(REDUCE_BLOCK,) + (-1,) * (a.ndim - 1) if a.ndim else ())

    # The same array passed twice is refused, as batch.score refuses it. (Dask names
    # hash contents: equal but distinct arrays share one, so they are not compared.)
    if logits is target and isinstance(logits, da.Array):
        raise ValueError("the logits and the targets are the same dask array: give the "
                         "targets' array as target")
    logits, target = (a if isinstance(a, da.Array) else _to_numpy(a) for a in (logits, target))
    if not isinstance(logits, da.Array) and not isinstance(target, da.Array):
        check_distinct(InMemoryArray(logits), InMemoryArray(target))
    x, t = as_dask(logits), as_dask(target)
    for name, a in (("logits", x), ("target", t)):
        if any(np.isnan(n) for n in a.shape):
            raise ValueError(f"{name}: a dask array with chunks of unknown size (from a "
                             "filter or a dataframe): call .compute_chunk_sizes() on it first")
    if unembedding is not None:
        unembedding = as_source(unembedding, any_order=True)
    opts = prepare_options(x.shape, x.dtype, t.shape, t.dtype, input_kind, weight,
                           ignore_index, label_smoothing, backend, n_threads, top_k, n_bins,
                           unembedding, bias)
    rows = _rows_per_chunk(chunk_rows or (x.chunks[0][0] if x.chunks[0] else REDUCE_BLOCK))
    x = x.rechunk({0: rows, 1: -1})
    t = t.rechunk({0: rows} | ({1: -1} if t.ndim == 2 else {}))
    piece_rows = chunk_rows_for_budget(memory_budget, x, t, opts)
    task = dask.delayed(_score_block, pure=True)
    parts = [task(xb, tb, 0, n, opts, piece_rows)
             for xb, tb, n in zip(x.to_delayed().ravel(), t.to_delayed().ravel(), x.chunks[0])]
    return _combine(parts, client, dask, opts, x.shape, x.dtype, rows, unembedding)


def _combine(parts, client, dask, opts, shape, dtype, rows, unembedding):
    """The :class:`cecore.batch.ScoreResult` of the tasks ``parts``, summed in row order."""
    start_time = time.perf_counter()
    sums = opts.new_sums()
    for partials in _in_order(parts, client, dask):
        sums.add_partials(partials)
    seconds = time.perf_counter() - start_time
    nbytes = shape[0] * shape[1] * dtype.itemsize
    n_classes = shape[1] if unembedding is None else unembedding.shape[0]
    return make_result(sums, opts, seconds, nbytes, rows, n_classes)


def _in_order(parts, client, dask):
    """Results of ``parts`` in order; with a distributed client, fetched one at a time."""
    if client is None:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            client = None
    if client is None:
        yield from dask.compute(*parts)
        return
    futures = client.compute(parts)
    for i, future in enumerate(futures):
        yield _result(future, client, dask)
        futures[i] = None  # let the worker forget a result once it is summed
        future.release()


_POLL = 5.0  # seconds between looks at the cluster while a result is awaited


def _result(future, client, dask):
    """``future.result()``, or a ValueError once the cluster has had no worker for the
    connect timeout: distributed waits for workers without end, so a run whose workers
    all died (on a cluster of the user's, which nothing restarts) hung forever."""
    patience = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
    alone_since = None
    while True:
        try:
            return future.result(timeout=_POLL)
        except TimeoutError:
            if client.scheduler_info().get("workers"):
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > patience:
                raise ValueError(f"the Dask cluster has had no worker for {patience:g} s "
                                 "(they died or left): start workers, then score again") from None


@contextlib.contextmanager
def _quiet_logs():
    """Distributed logs a failed task at ERROR level with a traceback; the command reports
    the error itself in one line, so for the run only critical records get through
    (``distributed.client`` has a level of its own: a lost scheduler printed its
    reconnection attempts with tracebacks)."""
    loggers = [logging.getLogger(name) for name in ("distributed", "distributed.client")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def score_files(logits, target, *, scheduler=None, n_workers=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                n_threads=None, **options):
    """``cecore score --dask local`` / ``--scheduler ADDRESS``: score files on a Dask cluster.

    Each worker memory-maps the files itself (they must be visible at the same path on
    every worker); ``memory_budget`` sizes the pieces a task reads at once. ``n_workers``
    (local cluster only) defaults to 2, or the CPUs available if fewer.
    """
    if n_workers is None:
        n_workers = min(2, cpus_available())
    n_workers = V.check_int(n_workers, "n_workers", 1)
    if scheduler is not None:
        scheduler = str(scheduler).strip()
        if not scheduler:
            raise ValueError("the Dask scheduler address is empty; expected e.g. tcp://host:8786")
    if scheduler is None and n_workers > cpus_available():
        # Each worker is a process of its own (about 150 MB before any work): 10**5 of
        # them would take the machine down, and more than the CPUs only wait on each other.
        warnings.warn(f"{n_workers} Dask workers is more than the {cpus_available()} CPUs "
                      f"available; starting {cpus_available()}", RuntimeWarning, stacklevel=2)
        n_workers = cpus_available()
    dask, _ = _import_dask()
    from distributed import Client, LocalCluster

    specs = [logits, target] + ([options["unembedding"]] if options.get("unembedding") else [])
    sources = [open_array(spec, any_order=i == 2) for i, spec in enumerate(specs)]
    for source in sources[:2]:  # (an unembedding is read whole, by each task: any kind)
        if not isinstance(source, MappedArray):
            raise ValueError(f"{source.path}: compressed .npz members cannot be read in parallel; "
                             "score them without --dask, or save them with np.save / np.savez")
    x_src, t_src = sources[:2]
    check_distinct(x_src, t_src)
    if len(sources) == 3:
        options["unembedding"] = sources[2]
    opts = prepare_options(x_src.shape, x_src.dtype, t_src.shape, t_src.dtype,
                           n_threads=n_threads, **options)
    piece_rows = chunk_rows_for_budget(memory_budget, x_src, t_src, opts)
    rows = _rows_per_chunk(piece_rows)
    # Tasks get the readers (they pickle as paths) and their row ranges, not chunks of
    # data: a worker then maps and drops one budget-sized piece at a time, even when
    # the task's whole blocks of REDUCE_BLOCK rows are many times the budget.
    task = dask.delayed(_score_block, pure=True)
    n_rows = x_src.shape[0]
    parts = [task(x_src, t_src, r0, min(n_rows, r0 + rows), opts, piece_rows)
             for r0 in range(0, n_rows, rows) or (0,)]

    def run(client):
        return _combine(parts, client, dask, opts, x_src.shape, x_src.dtype, rows,
                        options.get("unembedding"))

    if scheduler:
        with _connect(Client, scheduler) as client, _quiet_logs():
            return run(client)
    with warnings.catch_warnings(), _quiet_logs():
        # The scheduler's HTTP endpoint (health checks; no dashboard) falls back to another
        # loopback port when 8787 is taken: nothing for the user to act on.
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None,
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
            return run(client)
