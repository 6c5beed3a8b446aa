"""The scoring engine: cross-entropy metrics of arrays too large for memory, chunk by chunk.

:func:`score` streams the rows of logits on disk (:mod:`cecore._io` reads them) through
the loss-only kernels in chunks sized from a memory budget. The per-chunk API is public
and documented, and the Dask scale-out (:mod:`cecore._dask`) is a thin caller of it:

- :func:`prepare_options` checks shapes, dtypes and options once and returns the
  picklable :class:`ScoreOptions` every chunk uses;
- :func:`score_chunk` scores one chunk of rows (in memory) into the running sums of
  :class:`cecore.metrics._report.ReportSums` (``opts.new_sums()``), in row order;
- :func:`make_result` turns those sums into a :class:`ScoreResult`;
- :func:`chunk_rows` sizes chunks from a memory budget.

**Exact results.** :func:`cecore.cross_entropy` sums per-position losses in fixed blocks
of ``REDUCE_BLOCK`` consecutive values (:mod:`cecore._reduce`) and divides by a sum
computed the same way over the weights of the non-ignored targets.
:class:`cecore._reduce.BlockSum` reproduces those blocks from values arriving in chunks of
any length, so the streamed mean loss equals the in-memory one bit for bit.
"""

import contextlib
import math
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from . import _validation as V
from ._backends import get_backend
from ._config import DEFAULT_MEMORY_BUDGET, block_rows
from ._io import (InMemoryArray, MappedArray, StreamedArray, as_source, atomic_npy,
                  load_small, open_array, source_path)
from .metrics._report import ReportSums, score_rows

__all__ = ["score", "ScoreResult", "ScoreOptions", "prepare_options", "score_chunk",
           "make_result", "chunk_rows", "parse_size", "open_array",
           "MappedArray", "StreamedArray", "InMemoryArray", "INPUT_KINDS",
           "DEFAULT_MEMORY_BUDGET"]

INPUT_KINDS = ("logits", "log_probs", "probs")
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
        value = int(Fraction(match.group(1)) * _UNITS[unit])  # exact: no float overflow
    if value <= 0:
        raise ValueError(f"memory size must be at least 1 byte, got {size!r}")
    return value


@dataclass
class ScoreResult:
    """What :func:`score` measured.

    ``mean_loss`` equals ``cecore.cross_entropy(logits, target, ...)`` on the whole array
    in memory (same dtype, bit for bit); ``perplexity`` is ``cecore.perplexity``'s,
    ``exp(mean_loss)`` (for float16 logits, of the float32 mean). The metrics
    (``accuracy``, ``top_k_accuracy``, ``mean_entropy``, ``ece``, ``brier``) are those of
    :func:`cecore.metrics.classification_report_from_logits`, over the rows whose target
    is not ignored; None where undefined (probability targets have no accuracy, top-k
    accuracy or ECE).
    """

    mean_loss: float
    perplexity: float
    accuracy: float
    top_k_accuracy: float
    mean_entropy: float
    ece: float
    brier: float
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
    top_k: int
    n_bins: int
    chunk_rows: int
    per_row_out: str = None

    def to_dict(self):
        """The fields as a dict for JSON: an undefined value (NaN) is None (null), an
        infinite one (a loss of inf, its perplexity) the string "inf" or "-inf", as JSON
        has no number for it (``float("inf")`` reads it back)."""
        def json_value(v):
            if not isinstance(v, float) or math.isfinite(v):
                return v
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")

        return {k: json_value(v) for k, v in asdict(self).items()}


def check_distinct(x_src, t_src):
    """Refuse logits and targets that are the same array (see :func:`_same_data`)."""
    if _same_data(x_src, t_src):
        where = getattr(x_src, "path", "in memory")
        raise ValueError(f"the logits and the targets are the same array ({where}): "
                         "give the targets' file or array as TARGET")


def _same_data(a, b):
    """Whether two readers read the same array (the same file and .npz member, or
    overlapping memory): a float array of the logits' shape would pass as probability
    targets. Fields of one record array, or interleaved views, share a buffer but no
    element: not the same."""
    key = {MappedArray: "offset", StreamedArray: "member"}
    if isinstance(a, InMemoryArray) and isinstance(b, InMemoryArray):
        try:
            return np.shares_memory(a.array, b.array, max_work=10**6)
        except np.exceptions.TooHardError:  # strides too intricate to tell: let it be
            return False
    if type(a) is not type(b) or type(a) not in key:
        return False
    try:
        same_file = os.path.samefile(a.path, b.path)
    except OSError:
        return False
    return same_file and getattr(a, key[type(a)]) == getattr(b, key[type(b)])


_HEAD_LOCK = threading.Lock()  # see LinearHead.logits


def _new_head_lock():
    # A child forked while another thread read a head's weight inherits the lock held by
    # a thread it does not have: its first logits() waited forever (as _backends' lock).
    global _HEAD_LOCK
    _HEAD_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_head_lock)


@dataclass
class LinearHead:
    """The unembedding ``logits = hidden @ weight.T + bias`` of scoring from hidden states.

    ``weight`` is a reader of the ``(V, d)`` matrix (:mod:`cecore._io`: a memory map of a
    file is opened once per process, and pickles as its path for Dask workers); ``bias``
    is None or a ``(V,)`` array of the same dtype.
    """

    weight: object
    bias: np.ndarray = None

    def logits(self, hidden):
        """``hidden @ weight.T + bias`` (one BLAS product, NumPy's)."""
        w = self.__dict__.get("_native")
        if w is None:
            # Dask's threads share this head: one of them reads (a stream read by two at
            # once failed its CRC check), the others wait for it.
            with _HEAD_LOCK:
                w = self.__dict__.get("_native")
                if w is None:
                    w = self._read_weight()
        out = np.matmul(hidden, w.T)
        if self.bias is not None:
            out += self.bias
        return out

    def _read_weight(self):
        w = self.weight.rows(0, self.weight.shape[0])
        # Kept once per process: a compressed .npz member can be read only once, front to
        # back; and matmul converted a big-endian matrix again for every chunk.
        if isinstance(self.weight, StreamedArray) or not w.dtype.isnative:
            w = self.__dict__["_native"] = w.astype(w.dtype.newbyteorder("="), copy=False)
        return w

    def __getstate__(self):  # a Dask worker gets the reader, not the converted copy
        return {k: v for k, v in self.__dict__.items() if k != "_native"}


@dataclass
class ScoreOptions:
    """Validated options shared by every chunk; picklable, so Dask workers get a copy.

    Made by :func:`prepare_options`; ``dtype`` is the dtype the kernels compute in,
    ``loss_dtype`` that of the losses reported (:func:`cecore.cross_entropy`'s).
    ``n_threads`` is the caller's request (None: the default): each chunk resolves it
    with :func:`cecore._config.resolve_n_threads` where it runs, so a Dask worker uses
    its own machine's policy (distributed starts workers with ``OMP_NUM_THREADS=1``).
    """

    input_kind: str
    proba: bool
    weight: np.ndarray
    ignore_index: int
    label_smoothing: float
    backend: str
    n_threads: int
    dtype: np.dtype
    top_k: int
    n_bins: int
    head: LinearHead = None
    loss_dtype: np.dtype = None
    n_classes: int = None  # of the logits (the unembedding's V with a head)

    def new_sums(self, defer_weights=False):
        """Empty :class:`cecore.metrics._report.ReportSums` for these options."""
        return ReportSums(self.proba, self.top_k, self.n_bins, defer_weights, self.backend,
                          uniform_weights=bool(np.all(self.weight == 1.0)))


def prepare_options(x_shape, x_dtype, t_shape, t_dtype, input_kind="logits", weight=None,
                    ignore_index=-100, label_smoothing=0.0, backend="auto", n_threads=None,
                    top_k=5, n_bins=15, unembedding=None, bias=None):
    """Check shapes, dtypes and options once, before any chunk is read.

    Parameters
    ----------
    x_shape, x_dtype : shape and dtype of the logits, (n_rows, n_classes), or of the
        hidden states, (n_rows, d), when ``unembedding`` is given
    t_shape, t_dtype : shape and dtype of the targets, (n_rows,) or (n_rows, n_classes)
    input_kind, weight, ignore_index, label_smoothing, backend, n_threads, top_k, n_bins
        As :func:`score`.
    unembedding, bias : reader (see :func:`cecore._io.as_source`) of shape (V, d), and
        array-like of shape (V,), optional
        Score hidden states through ``hidden @ unembedding.T + bias``.

    Returns
    -------
    ScoreOptions
    """
    head = None
    if bias is not None and unembedding is None:  # (the Dask path had ignored it)
        raise ValueError("bias is the unembedding's: give unembedding too (or no bias)")
    if unembedding is not None:
        head, x_shape = _linear_head(x_shape, x_dtype, unembedding, bias, input_kind)
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
        V.check_proba_target(t_dtype, x_shape, ignore_index, "logits")
    else:
        if np.dtype(t_dtype).kind not in "iu":
            raise TypeError(f"class-index targets must be integers, got dtype {t_dtype} "
                            f"(probability targets must have the logits' shape {tuple(x_shape)})")
        if len(t_shape) != 1:
            raise ValueError(f"target of shape {tuple(t_shape)} does not match logits of shape "
                             f"{tuple(x_shape)}: expected ({n_rows},) or {tuple(x_shape)}")
        if t_shape[0] != n_rows:
            raise ValueError(f"logits have {n_rows} rows but target has {t_shape[0]}")
        V.check_index_classes(n_classes)
    get_backend(backend)  # fail now, not on the first chunk
    V.n_threads(n_threads)  # likewise; resolved per chunk where it runs
    ReportSums(proba, top_k, n_bins)  # checks top_k and n_bins
    # As cecore.cross_entropy: probabilities of a wider dtype promote the computation and
    # the loss; hidden states give logits of their own dtype, then promoted as logits.
    loss_dtype, dtype = V.promoted_dtypes(x_dtype, t_dtype if proba else x_dtype)
    # No rows, no kernel call: a header declaring 3e8 classes and no data must not make
    # a 2.4 GB vector of ones (a given weight is still checked against n_classes).
    n_weights = n_classes if n_rows or weight is not None else 0
    return ScoreOptions(input_kind, proba, V.class_weight(weight, n_weights),
                        V.check_ignore_index(ignore_index),
                        V.check_label_smoothing(label_smoothing), backend,
                        n_threads, dtype, int(top_k), int(n_bins), head,
                        dtype if head is not None else loss_dtype, n_classes)


def _linear_head(h_shape, h_dtype, unembedding, bias, input_kind):
    """Check hidden states against their unembedding; return the head and logits' shape."""
    if input_kind != "logits":
        raise ValueError("hidden states give logits: input_kind must be 'logits'")
    if len(h_shape) != 2:
        raise ValueError(f"hidden states must have shape (rows, d), got {tuple(h_shape)}")
    if len(unembedding.shape) != 2 or unembedding.shape[1] != h_shape[1]:
        raise ValueError(f"the unembedding must have shape (V, {h_shape[1]}) for hidden "
                         f"states of shape {tuple(h_shape)}, got {tuple(unembedding.shape)}")
    h_dtype = np.dtype(h_dtype).newbyteorder("=")
    if h_dtype.kind != "f" or h_dtype == np.float16:
        raise TypeError(f"hidden states must be float32 or float64, got {h_dtype}")
    if unembedding.dtype.newbyteorder("=") != h_dtype:
        raise TypeError(f"hidden states ({h_dtype}) and unembedding "
                        f"({unembedding.dtype.newbyteorder('=')}) must have the same dtype")
    if isinstance(bias, (str, os.PathLike)):
        bias = load_small(bias, "bias")
    if bias is not None:
        if np.shape(bias) != (unembedding.shape[0],):  # before float_input may copy it
            raise ValueError(f"bias must have shape ({unembedding.shape[0]},), "
                             f"got {tuple(np.shape(bias))}")
        # a copy: a bias file's map was read at every chunk (and pickled for Dask when
        # the cluster had started), so a file rewritten meanwhile changed the bias midway
        bias = V.float_input(bias, "bias").copy()
        if bias.dtype != h_dtype:
            raise TypeError(f"bias must have the hidden states' dtype {h_dtype}, got {bias.dtype}")
    return LinearHead(unembedding, bias), (h_shape[0], unembedding.shape[0])


def score_chunk(x, t, opts, sums):
    """Score one chunk of rows in memory and add it to ``sums``; return its per-row losses.

    Each row's loss and metrics come from one pass over it
    (:func:`cecore.metrics._report.score_rows`); the O(rows) results are then reduced.

    Parameters
    ----------
    x : array of shape (rows, n_classes), or (rows, d)
        The chunk's logits (log-probabilities, probabilities: ``opts.input_kind``), or its
        hidden states when ``opts.head`` is set (their logits are one BLAS product).
    t : array of shape (rows,) or (rows, n_classes)
        The chunk's targets.
    opts : ScoreOptions
    sums : ReportSums
        Accumulates the chunk, after the rows that came before it.

    Returns
    -------
    loss : ndarray of shape (rows,), float64
        Per-row losses (0 for ignored rows).
    """
    if opts.head is not None:
        # in the hidden states' dtype, as torch's linear layer makes them: float64 targets
        # promote the chunk's logits below, not the (V, d) unembedding (a float64 copy of
        # it per chunk, outside the budget: 8x the time with a 50257 x 256 float32 one and
        # a 16MB budget, one measurement)
        x = opts.head.logits(x)
    _check_chunk(x, t, opts)
    n_rows, n_classes = x.shape
    if opts.input_kind == "probs":
        with np.errstate(divide="ignore", invalid="raise"):
            try:
                x2 = np.log(x, dtype=opts.dtype)
            except FloatingPointError:
                raise ValueError("input_kind='probs' but the input has negative values") from None
    else:
        # log-probabilities are scored as logits: log_softmax(log p) = log p, so the loss
        # is -log p[target] (nll_loss) when they are normalised, and stays right if not.
        x2 = np.ascontiguousarray(x, dtype=opts.dtype)
    kernels = get_backend(opts.backend)
    n_threads = V.n_threads(opts.n_threads, x.size, warn=False)  # warned once, before
    if opts.proba:
        t = np.ascontiguousarray(t, dtype=opts.dtype)
    else:
        t = V.index_target(t, (n_rows, n_classes), n_classes, opts.ignore_index).reshape(-1)
    if opts.proba and opts.input_kind != "logits" and not opts.label_smoothing:
        x2 = _zero_log_zero(x2, t, owned=opts.input_kind == "probs")
    return score_rows(kernels, x2, t, opts.proba, opts.weight, opts.ignore_index,
                      opts.label_smoothing, n_threads, sums)


def _check_chunk(x, t, opts):
    """A chunk must have the shape the options were prepared for: the kernels index the
    class weights by target, and a chunk of more classes than weights read past them
    (zero losses at 100 classes for 7, a segfault at 3e6)."""
    want = f"(rows, {opts.n_classes})"
    if np.ndim(x) != 2 or np.shape(x)[1] != opts.n_classes:
        raise ValueError(f"a chunk of logits must have shape {want}, as the options were "
                         f"prepared for, got {np.shape(x)}")
    rows = np.shape(x)[0]
    if rows and len(opts.weight) != opts.n_classes:
        raise ValueError("these options were prepared for an input of no rows; prepare "
                         "them with the shape of the rows to score")
    shape = np.shape(t)
    if opts.proba and shape != np.shape(x):
        raise ValueError(f"probability targets of a chunk must have its logits' shape "
                         f"{np.shape(x)}, got {shape}")
    if not opts.proba and shape != (rows,):
        raise ValueError(f"class-index targets of a chunk of {rows} rows must have shape "
                         f"({rows},), got {shape}")


def _zero_log_zero(log_p, q, owned):
    """Log-probabilities against probability targets with 0 log 0 = 0: a class of
    probability 0 (log p = -inf, as float32 softmax outputs often hold) that the target
    gives 0 gets the lowest finite log-probability instead.

    Its exp is 0 all the same, so the softmax and every metric stay as they were, and its
    loss term is 0 * (finite) = 0, where with -inf it was 0 * inf = NaN (as in torch's
    cross_entropy of log p) and made the file's mean NaN. A target above 0 on such a class
    still gives an infinite loss; a row with no probability above 0 keeps its NaN loss
    and metrics. Without label smoothing only (with it every class has a target above 0).
    ``log_p`` is written over where ``owned``, else copied if it must change; the masks go
    a block of rows at a time (PROBA_BLOCK_BYTES, as cecore.metrics._report.block_scores).
    """
    lowest = np.finfo(log_p.dtype).min
    step = block_rows(log_p.shape[1])  # of boolean masks
    for a in range(0, log_p.shape[0], step):
        block = log_p[a:a + step]
        if block.min() > -np.inf:  # no -inf (nor NaN): nothing to change, and the masks
            continue               # cost 1.2x the call (results/probs_zeros_zen4*.txt)
        hit = np.isneginf(block)
        hit &= q[a:a + step] == 0
        # not in a row with no probability above 0 (or a NaN): that row's softmax stays
        # undefined (NaN), where lowest values throughout would make it uniform; nor in
        # one whose largest value is the lowest itself, with which they would tie
        hit &= (block.max(axis=1) > lowest)[:, None]
        if hit.any():
            if not owned:
                log_p, owned = log_p.copy(), True
            log_p[a:a + step][hit] = lowest
    return log_p


def make_result(sums, opts, seconds, nbytes, chunk_rows, n_classes, per_row_out=None):
    """The :class:`ScoreResult` of accumulated ``sums``; ``mean_loss`` rounded to
    ``opts.loss_dtype``, as :func:`cecore.cross_entropy` returns it."""
    report = sums.report(opts.loss_dtype)
    return ScoreResult(
        **report, seconds=seconds,
        rows_per_second=report["rows"] / seconds if seconds else float("inf"),
        gb_per_second=nbytes / seconds / 1e9 if seconds else float("inf"),
        input_kind=opts.input_kind, target_kind="probabilities" if opts.proba else "indices",
        dtype=str(opts.dtype), n_classes=n_classes, top_k=opts.top_k, n_bins=opts.n_bins,
        chunk_rows=chunk_rows,
        per_row_out=None if per_row_out is None else os.fspath(per_row_out),
    )


def chunk_rows(memory_budget, x_src, t_src, opts, per_row=False):
    """Rows per chunk so that one chunk's memory stays within ``memory_budget`` bytes.

    ``x_src`` and ``t_src`` are readers (:mod:`cecore._io`); ``per_row``: per-row losses
    are also written."""
    n_classes = x_src.shape[1]
    row = x_src.dtype.itemsize * n_classes + t_src.dtype.itemsize * math.prod(t_src.shape[1:])
    if opts.head is not None:  # hidden states in: the chunk's logits are made in memory
        n_classes = opts.head.weight.shape[0]
        row += opts.dtype.itemsize * n_classes
    if opts.input_kind == "probs" or x_src.dtype != opts.dtype:
        row += opts.dtype.itemsize * n_classes  # the converted copy of the chunk
    if opts.proba and t_src.dtype != opts.dtype:
        row += opts.dtype.itemsize * n_classes
    # O(rows) arrays: 20 float64s per row, what a chunk held when its metrics were made
    # at once (2.4x the budget on 20e6 x 2 logits when 6 were counted). Now a chunk holds
    # about 3 per row (int64 targets, masks, loss; measured 25 bytes a row), the metrics
    # of class-index targets none (softmax_ce_report sums them per block), and per-row
    # metrics (probability targets, rows short of a block) REPORT_ROWS rows of about 8 at
    # a time: the count is conservative. Not counted: block_scores' buffers for
    # probability targets, a fixed 3 x PROBA_BLOCK_BYTES (12 MB) whatever the budget,
    # which a budget of a few MB does not cover (a review measured 57 MB peak RSS at 2MB
    # against 46 MB with class indices).
    row += 8 * 20 + (8 if per_row else 0)
    if isinstance(t_src, StreamedArray) or isinstance(x_src, StreamedArray):
        row *= 2  # the decompression buffer is resident while the kernel runs
    return max(1, min(x_src.shape[0], parse_size(memory_budget) // row))


def score(logits, target, *, input_kind="logits", weight=None, ignore_index=-100,
          label_smoothing=0.0, memory_budget=DEFAULT_MEMORY_BUDGET, per_row_out=None,
          backend="auto", n_threads=None, top_k=5, n_bins=15, progress=False, protect=(),
          unembedding=None, bias=None, accuracy=None):
    """Cross-entropy and evaluation metrics of an array too large for memory.

    With ``unembedding``, ``logits`` holds hidden states ``(n_rows, d)`` and each chunk's
    logits are made by one BLAS product, ``hidden @ unembedding.T + bias``, then scored
    the same way: only a chunk's logits exist at once, never the ``(n_rows, V)`` of a
    stream larger than the chunks.

    The rows are read in chunks sized from ``memory_budget``; each block of a chunk goes
    once through the loss-only kernel that also yields the metrics. The mean equals
    ``cecore.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
    label_smoothing=label_smoothing)`` on the whole array, bit for bit, and the metrics
    equal :func:`cecore.metrics.classification_report_from_logits`'s.

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
        them unchanged); probabilities are scored through their logarithm. For either,
        against probability targets, a class of probability 0 whose target is 0 adds 0
        to the loss (0 log 0 = 0), where ``cross_entropy`` of the logarithm gives NaN.
    weight : array-like of shape (n_classes,), optional
        Class weights, as in :func:`cecore.cross_entropy` (they weight the loss only).
    ignore_index : int, default=-100
        Target value whose rows are skipped (class-index targets only).
    label_smoothing : float in [0, 1], default=0.0
    memory_budget : int or str, default='512MB'
        Bytes one chunk of rows may occupy (``"512MB"``, ``"2GiB"``, ...).
    per_row_out : str or path-like, optional
        Write the per-row losses (in the loss's dtype: the logits', or the probability
        targets' when wider; 0 for ignored rows) to this ``.npy`` file, created atomically.
    backend : {'auto', 'cython', 'numba'}, default='auto'
    n_threads : int, optional
    top_k : int, default=5
        ``k`` of ``top_k_accuracy``.
    n_bins : int, default=15
        Confidence bins of the expected calibration error.
    progress : bool, default=False
        Show a tqdm progress bar on stderr.
    protect : sequence of paths, optional
        Files that ``per_row_out`` must not replace besides the inputs (e.g. a weight
        file); see :func:`cecore._io.check_output_path`.
    unembedding : str, path-like or array of shape (V, d), optional
        The output layer of a language model (memory-mapped once when a file); same dtype
        as the hidden states, float32 or float64.
    bias : str, path-like or array of shape (V,), optional
    accuracy : ignored
        Accepted for one release: every metric now comes from the same pass.

    Returns
    -------
    ScoreResult
    """
    if logits is None or target is None:
        raise TypeError("score needs the logits (or hidden states) and the targets: an array "
                        "or the path of a .npy/.npz file each, got None")
    sources = []
    try:
        for spec, any_order in ((logits, False), (target, False), (unembedding, True)):
            sources.append(None if spec is None else as_source(spec, any_order))
        x_src, t_src, w_src = sources
        check_distinct(x_src, t_src)
        if isinstance(bias, (str, os.PathLike)):
            protect = (*protect, bias)  # per_row_out must not replace it either
        opts = prepare_options(x_src.shape, x_src.dtype, t_src.shape, t_src.dtype, input_kind,
                               weight, ignore_index, label_smoothing, backend, n_threads,
                               top_k, n_bins, w_src, bias)
        n_rows = x_src.shape[0]
        n_classes = x_src.shape[1] if w_src is None else w_src.shape[0]
        chunk = chunk_rows(memory_budget, x_src, t_src, opts, per_row_out is not None)
        out_dtype = opts.loss_dtype
        sums = opts.new_sums()
        inputs = [source_path(src) for src in sources if src is not None] + list(protect)
        writer = (atomic_npy(per_row_out, n_rows, out_dtype, inputs) if per_row_out is not None
                  else contextlib.nullcontext(None))
        from tqdm.auto import tqdm

        start_time = time.perf_counter()
        with writer as write, tqdm(total=n_rows, unit="row", unit_scale=True, disable=not progress,
                                   file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, n_rows, chunk):
                stop = min(n_rows, start + chunk)
                loss = score_chunk(x_src.rows(start, stop), t_src.rows(start, stop), opts, sums)
                x_src.release(start, stop)
                t_src.release(start, stop)
                if write is not None:
                    write(loss.astype(out_dtype))
                bar.update(stop - start)
        seconds = time.perf_counter() - start_time
        nbytes = n_rows * x_src.shape[1] * x_src.dtype.itemsize  # the bytes read
        return make_result(sums, opts, seconds, nbytes, chunk, n_classes, per_row_out)
    finally:
        for src in sources:
            if src is not None:
                src.close()
