"""Evaluation metrics of logits from the same pass as their cross-entropy.

:func:`score_rows` runs the kernels over the rows: for class-index targets the contract's
``softmax_ce_report``, which computes each row's loss together with its softmax entropy,
top-label confidence, sum of squared probabilities and the target's rank while the row
is in cache, and sums them per block of ``REDUCE_BLOCK`` rows; rows short of a whole
block, and probability targets, through per-row metrics (``softmax_ce_scores``,
:func:`block_scores`) that :class:`ReportSums` sums with the kernels' ``report_sums``, the
same sums bit for bit. Every sum is a fixed-block sum (:mod:`cecore._reduce`) in row
order, so the metrics are the same whether the rows arrive in one array, in chunks of a
stream or from Dask workers.
:func:`classification_report_from_logits` is the in-memory front end; ``cecore score``
(:mod:`cecore.batch`) is the streaming one.

Definitions (over the rows whose target is not ignored; ``p = softmax(logits)``):

- ``accuracy``: the first largest logit is the target's (``argmax``);
- ``top_k_accuracy``: fewer than ``k`` classes have a larger logit than the target's;
- ``mean_entropy``: mean of ``-sum_c p_c log p_c``;
- ``ece``: top-label expected calibration error with ``n_bins`` equal-width confidence
  bins and the L1 norm, as torchmetrics' ``CalibrationError(norm='l1')`` defines it
  (confidence ``max_c p_c`` falls in bin ``k`` when ``k / n_bins <= conf < (k + 1) /
  n_bins``, edges in float64; a confidence of exactly 1 has a bin of its own).
  torchmetrics' edges are float32 (``torch.linspace``): some round up by an ulp, so a
  confidence exactly on such an edge (0.2 = 3/15, say) falls one bin lower there;
- ``brier``: mean of ``sum_c (p_c - y_c)**2``, ``y`` the one-hot (or probability) target.

For probability targets only the loss, ``mean_entropy`` and ``brier`` are defined; the
others are None. Rows whose softmax is undefined (NaN or +inf logits) count as wrong and
make the means they enter NaN (``mean_entropy``, ``brier``), except ``ece``, where they
count at confidence 0 (torchmetrics' would be NaN).
"""

import copy

import numpy as np

from .. import _reduce
from .. import _validation as V
from .._backends import get_backend
from .._config import REDUCE_BLOCK, REPORT_ROWS, SMALL_C, block_rows

__all__ = ["classification_report_from_logits"]


def score_rows(kernels, x, t, proba, weight, ignore_index, eps, n_threads, sums):
    """Score rows into ``sums``, in row order; return their losses.

    ``x`` (n, C) of the compute dtype, C-contiguous; ``t`` the flat int64 class indices or
    the (n, C) probabilities of that dtype. Class-index targets of at most ``SMALL_C``
    classes, from the first block boundary of the stream in these rows to the last, go
    through the kernels' ``softmax_ce_report``, which sums each block's metrics without
    writing per-row ones (at ten classes those outputs and their second read took about
    40 % of the time). With 15 bins that is one call: every call is an OpenMP region,
    whose second thread may have gone to sleep since the last (a call per ``REPORT_ROWS``:
    2.6e6 x 10 float32 in memory, Intel Xeon, 2 threads, 0.65 of loss-only scoring's
    throughput, one call 0.70). The rows before and after (fewer than a block each),
    probability targets and rows of more classes through per-row metrics,
    :func:`block_scores`, ``REPORT_ROWS`` at a time (about 110 bytes a row with their
    bookkeeping: 2e6 rows of ten classes took 228 MB in one block).

    Returns
    -------
    loss : ndarray of shape (n,), float64
        Per-row losses (0 for ignored rows).
    """
    n, c = x.shape
    loss = np.empty(n)
    lo = hi = n
    # Only rows of few classes: there the per-row outputs weigh as much as the logits,
    # and a block of REDUCE_BLOCK rows is little work. At 50257 classes a block is about
    # 0.2 s of one thread (bench_batch.py's kernel time), too coarse to share among
    # threads, and 48 bytes of outputs beside 200 KB of logits cost nothing.
    if not proba and 0 < c <= SMALL_C:
        lo = min(n, sums.rows_to_block())
        hi = lo + (n - lo) // REDUCE_BLOCK * REDUCE_BLOCK
    if sums.keeps_weights:  # their own sum, in row order, a bounded piece at a time
        for a in range(0, n, REPORT_ROWS):
            tb = t[a:a + REPORT_ROWS]
            sums.add_weights(weight[tb[tb != ignore_index]])
    _score_per_row(kernels, x[:lo], t[:lo], proba, weight, ignore_index, eps, n_threads,
                   loss[:lo], sums)
    # Block sums of about 16 (n_bins + 4) bytes per REDUCE_BLOCK rows: as many rows a
    # call as take REPORT_ROWS rows' at MAX_BINS (5 MB), so that few bins make one call.
    step = REPORT_ROWS * ((MAX_BINS + 4) // (sums.n_bins + 4))
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        block_sums, block_counts = sums.new_blocks(b - a)
        kernels.softmax_ce_report(x[a:b], t[a:b], weight, ignore_index, eps, sums.top_k,
                                  sums.edges, loss[a:b], block_sums, block_counts,
                                  min(n_threads, len(block_sums)))
        sums.add_blocks(loss[a:b], block_sums, block_counts)
    _score_per_row(kernels, x[hi:], t[hi:], proba, weight, ignore_index, eps, n_threads,
                   loss[hi:], sums)
    return loss


def _score_per_row(kernels, x, t, proba, weight, ignore_index, eps, n_threads, loss, sums):
    """:func:`score_rows` through per-row metrics, ``REPORT_ROWS`` at a time."""
    n = x.shape[0]
    # one pair of per-row buffers for every block (fresh ones page-faulted each block)
    stats, rank = np.empty((min(n, REPORT_ROWS), 4)), np.empty((min(n, REPORT_ROWS), 2), np.int64)
    for a in range(0, n, REPORT_ROWS):
        b = min(n, a + REPORT_ROWS)
        block_rank = block_scores(kernels, x[a:b], t[a:b], proba, weight, ignore_index, eps,
                                  n_threads, loss[a:b], stats[:b - a], rank[:b - a])
        sums.add(loss[a:b], stats[:b - a], block_rank, n_threads)


def block_scores(kernels, x, t, proba, weight, ignore_index, eps, n_threads, loss, stats,
                 rank):
    """Per-row loss and metrics of a block of rows (2-D, compute dtype, C-contiguous).

    Writes the float64 losses to ``loss`` (n,), ``stats`` (n, 4) = ``(entropy, max_p,
    brier, lse)`` and, for class-index targets, ``rank`` (n, 2) = ``(rank, top1)``, as
    ``softmax_ce_scores`` gives them; returns ``rank``, or None for probability targets
    (then ``max_p`` and ``lse`` are NaN: the report uses neither there).
    """
    n, c = x.shape
    if c == 0:  # no kernel call (they write nothing): every index target is ignored
        stats[:] = np.nan
        if proba:  # cross_entropy's mean divides by 0 / 0 here
            loss[:] = np.nan
            return None
        loss[:] = 0.0
        rank[:] = (-1, 0)
        return rank
    if not proba:
        kernels.softmax_ce_scores(x, t, weight, ignore_index, eps, loss, stats, rank,
                                  n_threads)
        return rank
    kernels.softmax_ce_proba(x.reshape(n, c, 1), t.reshape(n, c, 1), weight, eps,
                             np.broadcast_to(0.0, (n, 1)), loss.reshape(n, 1), None,
                             n_threads)
    # Entropy and Brier need every probability: blocks of rows through reused buffers of
    # about PROBA_BLOCK_BYTES each (the softmax, its float64 copy and one float64 work
    # array; no N x C temporary, and no unbudgeted one: a block's temporaries of the
    # plain expressions took 35 MB beside a stream's budget).
    step = block_rows(c * 8)
    p = np.empty((min(n, step), c), x.dtype)
    p64, work = np.empty((2, min(n, step), c))
    for a in range(0, n, step):
        b = min(n, a + step)
        pb, qb, wb = p[:b - a], p64[:b - a], work[:b - a]
        kernels.softmax(x[a:b].reshape(b - a, c, 1), False, pb.reshape(b - a, c, 1),
                        n_threads)
        qb[...] = pb
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # 0 log 0 = 0; a NaN probability (a row whose softmax is undefined) stays NaN;
            # targets of 1e308 or inf give an infinite Brier score, without a warning
            np.log(qb, out=wb)
            np.multiply(qb, wb, out=wb)
            wb[qb == 0] = 0.0
            stats[a:b, 0] = -wb.sum(axis=1)
            np.subtract(qb, t[a:b], out=wb)
            np.square(wb, out=wb)
            stats[a:b, 2] = wb.sum(axis=1)
    stats[:, 1] = stats[:, 3] = np.nan
    return None


MAX_BINS = 10_000  # of the calibration error: far more than its estimate can resolve


class ReportSums:
    """Exact running sums behind the loss and the metrics, fed block by block in row order.

    Every floating-point sum is a fixed-block sum (:mod:`cecore._reduce`) and every count
    an integer, so the report does not depend on how the rows were chunked, nor on which
    Dask worker scored which chunk: a worker sends :meth:`partials` of its rows (whole
    blocks of ``REDUCE_BLOCK``) and the client adds them with :meth:`add_partials`, in
    row order. The mean loss is computed as :func:`cecore.cross_entropy` computes it.
    The metrics' block sums come from the kernels: whole blocks' from
    ``softmax_ce_report`` (:meth:`add_blocks`), per-row values' from ``report_sums``
    (:meth:`add`; 30 NumPy passes took more than the scoring kernel at ten classes),
    whose rows short of a whole block wait for the next ones.
    """

    _SUMS = ("loss", "weight", "entropy", "brier")

    def __init__(self, proba, top_k=5, n_bins=15, defer_weights=False, backend="auto",
                 uniform_weights=False):
        top_k = V.check_int(top_k, "top_k", 1)
        # (capped: the bins' sums are kept per block of rows: 1e8 bins took minutes and GBs)
        n_bins = V.check_int(n_bins, "n_bins", 1, MAX_BINS)
        # (capped: every k above the number of classes counts the same rows)
        self.proba, self.top_k, self.n_bins = proba, min(top_k, 2**63 - 1), n_bins
        # the edges k / n_bins, each rounded once to float64 (not np.linspace's
        # k * (1 / n_bins), an ulp above k / n_bins for some k: 0.30000000000000004 for 3/10)
        self.edges = np.arange(n_bins + 1) / n_bins
        self.backend = backend
        self.sums = {name: _reduce.BlockSum() for name in self._SUMS}
        self.confidence = _reduce.BinnedBlockSum(n_bins + 1)
        # rows, rows ignored, top-1 correct, top-k correct; top-1 correct per bin
        self.counts = np.zeros(4, np.int64)
        self.bin_correct = np.zeros(n_bins + 1, np.int64)
        # stats and rank of the rows after the last whole block
        self._tail = (np.empty((0, 4)), np.empty((0, 2), np.int64))
        # The denominator's blocks run over the non-ignored rows only, so they do not
        # follow the chunks: a Dask worker keeps its weights for the client to sum.
        self._weights = [] if defer_weights else None
        # Every class weight 1: the denominator is the count of scored rows, an integer
        # exact in any grouping, and no weights are gathered (cProfile of a ten-class
        # stream: 23 of its 134 ms in score_rows' own lines, mostly gathering ones).
        self.uniform_weights = uniform_weights

    @property
    def keeps_weights(self):
        """Whether the denominator needs the weights of the non-ignored targets."""
        return not (self.proba or self.uniform_weights)

    def add_weights(self, valid_weight):
        """Add the class weights of the next rows' non-ignored targets, in row order (only
        when :attr:`keeps_weights`)."""
        if self._weights is not None:
            self._weights.append(valid_weight)
        else:
            self.sums["weight"].add(valid_weight)

    def add(self, loss, stats, rank, n_threads=1):
        """Add a block's per-row ``loss`` and ``stats``, ``rank`` from
        :func:`block_scores`; ``n_threads`` for the kernels' ``report_sums``."""
        self.sums["loss"].add(loss)
        self.counts[0] += len(loss)
        if rank is None:  # probability targets: every row is scored, max_p is NaN
            rank = np.zeros((len(loss), 2), np.int64)
        blocks, self._tail = _reduce.whole_blocks(self._tail, (stats, rank))
        for block_stats, block_rank in blocks:
            self._add_blocks(*self._block_sums(block_stats, block_rank, n_threads))

    def rows_to_block(self):
        """Rows still to come before the next one starts a block of ``REDUCE_BLOCK``."""
        return -len(self._tail[0]) % REDUCE_BLOCK

    def new_blocks(self, n_rows):
        """Empty ``(sums, counts)`` for the block sums of n_rows (the kernels' ``sums_out``
        and ``counts_out``)."""
        n_blocks = -(-n_rows // REDUCE_BLOCK)
        return (np.empty((n_blocks, 3 + self.n_bins)),
                np.empty((n_blocks, 4 + self.n_bins), np.int64))

    def add_blocks(self, loss, sums, counts):
        """Add the per-row ``loss`` of whole blocks of rows and the kernels' block sums and
        counts of them (``softmax_ce_report``); they must start a block."""
        if self.rows_to_block():
            raise ValueError("add_blocks: the rows must start a block")
        self.sums["loss"].add(loss)
        self.counts[0] += len(loss)
        self._add_blocks(sums, counts)

    def _block_sums(self, stats, rank, n_threads=1):
        """The kernels' ``report_sums`` of these rows, the first at a block's start."""
        sums, counts = self.new_blocks(len(stats))
        n_blocks = len(sums)
        # (one block, the one a chunk's first rows complete: no OpenMP region for it)
        get_backend(self.backend).report_sums(np.ascontiguousarray(stats),
                                              np.ascontiguousarray(rank), self.top_k,
                                              self.edges, sums, counts,
                                              min(n_threads, n_blocks))
        return sums, counts

    def _add_blocks(self, sums, counts):
        self.sums["entropy"].add_partials(sums[:, 0])
        self.sums["brier"].add_partials(sums[:, 1])
        self.confidence.add_partials(sums[:, 2:])
        self.counts[1:] += counts[:, :3].sum(axis=0)
        self.bin_correct += counts[:, 3:].sum(axis=0)

    def _finished(self):
        """A copy of these sums with the rows after the last whole block added as a
        block of their own (the last of the stream, or of a Dask worker's rows)."""
        if not len(self._tail[0]):
            return self
        done = copy.copy(self)  # a new copy of what the tail's block changes
        done.sums = {**self.sums, "entropy": copy.deepcopy(self.sums["entropy"]),
                     "brier": copy.deepcopy(self.sums["brier"])}
        done.confidence = copy.deepcopy(self.confidence)
        done.counts, done.bin_correct = self.counts.copy(), self.bin_correct.copy()
        done._add_blocks(*self._block_sums(*self._tail))
        done._tail = (np.empty((0, 4)), np.empty((0, 2), np.int64))
        return done

    def partials(self):
        """This object's sums as block partials and counts (small, picklable), made with
        ``defer_weights=True``: the weights of the non-ignored targets come as they are
        (none with ``uniform_weights``, where the counts give the denominator). Weights
        that are only 1 in these rows must come as they are: the client's blocks of the
        sum do not follow the tasks, and a count would change its rounding."""
        done = self._finished()
        weights = np.concatenate(done._weights) if done._weights else np.empty(0)
        sums = {name: s.partials() for name, s in done.sums.items() if name != "weight"}
        return (sums, weights, done.confidence.partials(), done.counts.copy(),
                done.bin_correct.copy())

    def add_partials(self, partials):
        """Add :meth:`partials` of the next rows, computed elsewhere."""
        sums, weights, confidence, counts, bin_correct = partials
        for name, values in sums.items():
            self.sums[name].add_partials(values)
        self.sums["weight"].add(weights)
        self.confidence.add_partials(confidence)
        self.counts += counts
        self.bin_correct += bin_correct

    def report(self, dtype):
        """The loss and metrics as a dict (None where undefined for the targets).

        ``mean_loss`` is rounded to ``dtype``, as :func:`cecore.cross_entropy` returns it.
        """
        self = self._finished()
        rows, ignored, correct, top_k = (int(v) for v in self.counts)
        scored = rows - ignored
        loss_sum = self.sums["loss"].total()
        # the denominators of cecore.cross_entropy's mean, computed the same way
        denominator = np.float64(rows if self.proba else scored if self.uniform_weights
                                 else self.sums["weight"].total())
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf perplexity
            exact_mean = _reduce.mean(loss_sum, denominator)
            mean_loss = float(dtype.type(exact_mean))
            # exp of the mean in the compute dtype, as cecore.perplexity: for float16 logits
            # the float32 mean (exp of a float16-rounded loss of 8 to 16 was 0.4 % off)
            perplexity = float(np.exp(np.float64(V.compute_dtype(dtype).type(exact_mean))))

            def mean(total):
                return float(np.float64(total) / scored) if scored else float("nan")

            result = {"mean_loss": mean_loss, "perplexity": perplexity,
                      "accuracy": None, "top_k_accuracy": None,
                      "mean_entropy": mean(self.sums["entropy"].total()),
                      "ece": None, "brier": mean(self.sums["brier"].total()),
                      "rows": rows, "rows_scored": scored, "rows_ignored": ignored,
                      "loss_sum": float(loss_sum), "denominator": float(denominator)}
            if not self.proba:
                gap = np.abs(self.bin_correct - self.confidence.totals())
                result.update(accuracy=mean(correct), top_k_accuracy=mean(top_k),
                              ece=mean(_reduce.combine(gap)))
        return result


def classification_report_from_logits(logits, target, *, top_k=5, n_bins=15, weight=None,
                                      ignore_index=-100, label_smoothing=0.0,
                                      backend="auto", n_threads=None):
    """Cross-entropy and evaluation metrics of logits, in one pass over them.

    The numbers ``cecore score`` reports, for arrays in memory: each row's loss, softmax
    entropy, confidence and target rank come from the same kernel pass (see the module
    docstring for the definitions), and the results equal ``cecore score`` on the same
    rows streamed from disk or scored on Dask.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
    target : array-like of shape (n_samples,) or (n_samples, n_classes)
        Class indices (any integer dtype, ``ignore_index`` rows skipped) or probabilities.
    top_k : int, default=5
        ``k`` of ``top_k_accuracy``.
    n_bins : int, default=15
        Equal-width confidence bins of the expected calibration error.
    ignore_index : int, default=-100
        Rows whose target equals it are left out of every metric (class-index targets).
    weight, label_smoothing, backend, n_threads
        As :func:`cecore.cross_entropy` (``weight`` and ``label_smoothing`` affect the
        loss only).

    Returns
    -------
    dict
        ``loss`` (``cecore.cross_entropy`` with ``reduction='mean'``, to the last bit),
        ``perplexity``, ``accuracy``, ``top_k_accuracy``, ``mean_entropy``, ``ece``,
        ``brier`` (floats, None where undefined: probability targets have no accuracy,
        top-k accuracy or ECE), ``rows``, ``rows_scored``.
    """
    x = V._to_numpy(logits)
    if x.ndim != 2:
        raise ValueError(f"logits must have shape (n_samples, n_classes), got {x.shape}")
    n_classes = x.shape[1]
    t_raw = V._to_numpy(target)
    proba = t_raw.shape == x.shape
    if not proba:
        V.check_index_classes(n_classes)  # before anything of O(C) is made
    x = V.float_input(x, "logits")
    ignore_index = V.check_ignore_index(ignore_index)
    if proba:
        V.check_proba_target(t_raw.dtype, x.shape, ignore_index, "logits")
    eps = V.check_label_smoothing(label_smoothing)
    w = V.class_weight(weight, n_classes)
    loss_dtype = x.dtype
    if proba:  # wider probabilities promote, as in cecore.cross_entropy
        t_raw = V.float_input(t_raw, "target")
        loss_dtype, _ = V.promoted_dtypes(x.dtype, t_raw.dtype)
    dtype = V.compute_dtype(loss_dtype)
    # targets checked before the logits are copied (a bad one costs no copy)
    t = (np.ascontiguousarray(t_raw, dtype=dtype) if proba else
         V.index_target(t_raw, x.shape, n_classes, ignore_index).reshape(-1))
    x2 = np.ascontiguousarray(x, dtype=dtype)
    kernels = get_backend(backend)
    threads = V.n_threads(n_threads, x.size)
    sums = ReportSums(proba, top_k, n_bins, backend=backend,
                      uniform_weights=bool(np.all(w == 1.0)))
    score_rows(kernels, x2, t, proba, w, ignore_index, eps, threads, sums)
    report = sums.report(loss_dtype)
    report["loss"] = report.pop("mean_loss")
    for key in ("loss_sum", "denominator", "rows_ignored"):
        report.pop(key)
    return report
