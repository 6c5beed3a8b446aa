"""Scoring on a Dask cluster: each chunk of rows is scored on a worker, the sums combined exactly.

Dask is imported only when one of these functions runs, so cecore works without it
(install the extra ``cecore[dask]``).

Rows are rechunked to multiples of ``REDUCE_BLOCK`` so that every chunk but the last
holds whole reduction blocks: a worker returns the block sums of its per-row losses,
which are exactly the block sums the in-memory computation makes. The mean's
denominator sums the weights of the non-ignored targets in blocks of that compacted
stream, whose block boundaries do not follow the chunks; workers return those weights
(8 bytes a row, only when class weights are given) and the client sums them in row order.
"""

import contextlib
import logging
import warnings

import numpy as np

from . import _reduce
from .batch import (
    DEFAULT_MEMORY_BUDGET, MappedArray, _chunk_rows, _prepare, _score_chunk, _Totals, open_array,
    parse_size,
)
from ._config import REDUCE_BLOCK

__all__ = ["score_dask", "score_files"]


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise ImportError("Dask scoring needs dask: pip install 'cecore[dask]'") from exc
    return dask, da


def _score_block(x, t, opts, uniform_weight):
    """Worker side: score one chunk; return its block sums and counts (small)."""
    loss, valid_weight, n_ignored, n_correct = _score_chunk(np.asarray(x), np.asarray(t), opts)
    weights = None
    if valid_weight is not None:
        # With all-ones weights the blocked sum is an exact integer count: send only that.
        weights = valid_weight.size if uniform_weight else valid_weight
    return _reduce.block_sums(loss), weights, len(loss), n_ignored, n_correct


def _rows_per_chunk(rows):
    return max(REDUCE_BLOCK, rows // REDUCE_BLOCK * REDUCE_BLOCK)


def score_dask(logits, target, *, input_kind="logits", weight=None, ignore_index=-100,
               label_smoothing=0.0, backend="auto", n_threads=1, accuracy=True, client=None,
               chunk_rows=None):
    """Score Dask arrays chunk by chunk on the workers; same result as :func:`cecore.batch.score`.

    Parameters
    ----------
    logits : dask array or array-like of shape (n_rows, n_classes)
    target : dask array or array-like of shape (n_rows,) or (n_rows, n_classes)
    input_kind, weight, ignore_index, label_smoothing, backend, accuracy
        As :func:`cecore.batch.score`.
    n_threads : int, default=1
        Kernel threads per task (one task per worker thread already runs in parallel).
    client : distributed.Client, optional
        Defaults to Dask's current scheduler (the active client, if any).
    chunk_rows : int, optional
        Rows per task, rounded to a multiple of ``REDUCE_BLOCK``; defaults to the logits'
        first row chunk, rounded the same way.

    Returns
    -------
    ScoreResult
        ``mean_loss`` equals ``cecore.cross_entropy`` on the whole array in memory, bit for bit.
    """
    import time

    dask, da = _import_dask()
    x = logits if isinstance(logits, da.Array) else da.from_array(logits, chunks=(REDUCE_BLOCK, -1))
    t = target if isinstance(target, da.Array) else da.from_array(target, chunks=(REDUCE_BLOCK,) + (-1,) * (np.ndim(target) - 1))
    opts = _prepare(x.shape, x.dtype, t.shape, t.dtype, input_kind, weight, ignore_index,
                    label_smoothing, backend, n_threads, accuracy)
    rows = _rows_per_chunk(chunk_rows or (x.chunks[0][0] if x.chunks[0] else REDUCE_BLOCK))
    x = x.rechunk({0: rows, 1: -1})
    t = t.rechunk({0: rows} | ({1: -1} if t.ndim == 2 else {}))
    uniform = bool(np.all(opts.weight == 1.0))
    task = dask.delayed(_score_block, pure=True)
    parts = [task(xb, tb, opts, uniform) for xb, tb in zip(x.to_delayed().ravel(), t.to_delayed().ravel())]

    start_time = time.perf_counter()
    totals = _Totals()
    for partials, weights, n_rows, n_ignored, n_correct in _in_order(parts, client, dask):
        totals.loss.add_partials(partials)
        if isinstance(weights, int):
            totals.weight.add_partials([float(weights)])
        elif weights is not None:
            totals.weight.add(weights)
        totals.add_counts(n_rows, n_ignored, n_correct)
    seconds = time.perf_counter() - start_time
    nbytes = x.shape[0] * x.shape[1] * x.dtype.itemsize
    return totals.result(opts, seconds, nbytes, rows, x.shape[1])


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
        yield future.result()
        futures[i] = None  # let the worker forget a result once it is summed
        future.release()


@contextlib.contextmanager
def _quiet_logs():
    """Distributed logs a failed task at ERROR level with a traceback; the command reports
    the error itself in one line, so for the run only critical records get through."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def score_files(logits, target, *, scheduler=None, n_workers=2, memory_budget=DEFAULT_MEMORY_BUDGET,
                n_threads=None, **options):
    """``cecore score --dask local`` / ``--scheduler ADDRESS``: score files on a Dask cluster.

    Each worker memory-maps the files itself (they must be visible at the same path on
    every worker); ``memory_budget`` sizes the chunks one task reads.
    """
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"the number of Dask workers must be an int >= 1, got {n_workers!r}")
    _import_dask()
    from distributed import Client, LocalCluster

    sources = [open_array(spec) for spec in (logits, target)]
    for source in sources:
        if not isinstance(source, MappedArray):
            raise ValueError(f"{source.path}: compressed .npz members cannot be read in parallel; "
                             "score them without --dask, or save them with np.save / np.savez")
    x_src, t_src = sources
    opts = _prepare(x_src.shape, x_src.dtype, t_src.shape, t_src.dtype,
                    options.get("input_kind", "logits"), options.get("weight"),
                    options.get("ignore_index", -100), options.get("label_smoothing", 0.0),
                    options.get("backend", "auto"), n_threads or 1)
    rows = _rows_per_chunk(_chunk_rows(parse_size(memory_budget), x_src, t_src, opts, False))
    _, da = _import_dask()
    x = da.from_array(x_src, chunks=(rows, -1), asarray=False)
    t = da.from_array(t_src, chunks=(rows,) + (-1,) * (t_src.ndim - 1), asarray=False)
    kwargs = dict(options, n_threads=n_threads or 1, chunk_rows=rows)
    if scheduler:
        with Client(scheduler) as client, _quiet_logs():
            return score_dask(x, t, client=client, **kwargs)
    with warnings.catch_warnings(), _quiet_logs():
        # The scheduler's HTTP endpoint (health checks; no dashboard) falls back to another
        # loopback port when 8787 is taken: nothing for the user to act on.
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None,
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
            return score_dask(x, t, client=client, **kwargs)
