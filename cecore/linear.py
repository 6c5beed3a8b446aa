"""Fused linear cross-entropy: ``cross_entropy(input @ linear_weight.T + linear_bias, target)``
a chunk of rows at a time, without the N x V logits of a batch larger than a chunk.

The rows of ``input`` are processed in chunks. For each chunk one BLAS product writes the
chunk's logits into a buffer that every chunk reuses; the backend's fused kernel
(``softmax_ce_index``, see :mod:`cecore._backends`) turns them into per-row losses and
d loss / d logits; two more BLAS products turn those into the chunk's rows of
``grad_input`` and its share of ``grad_linear_weight``. Extra memory is O(chunk x V) plus
the outputs. All products go through NumPy's BLAS (``np.matmul``), and BLAS and the
kernels take turns, each with all ``n_threads`` threads.
"""

import functools
import os

import numpy as np

from . import _config
from . import _validation as V
from ._backends import get_backend
from .functional import _grad_scale, _ieee, _index_denominator, _index_loss

__all__ = ["linear_cross_entropy"]


@functools.lru_cache(maxsize=1)
def _last_level_cache_bytes():
    """Size of the CPU's largest cache (Linux sysfs), or DEFAULT_LLC_BYTES when unknown."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    try:
        for entry in os.listdir(root):
            if entry.startswith("index"):
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
                if text[:-1].isdigit() and text[-1] in units:
                    sizes.append(int(text[:-1]) * units[text[-1]])
    except OSError:
        pass
    return max(sizes, default=_config.DEFAULT_LLC_BYTES)


def _chunk_rows(n_rows, n_classes, itemsize, return_grad, over_logits):
    """Rows per chunk when the caller gives no ``chunk_size``.

    A row of a chunk takes ``V * itemsize`` bytes of logits, twice that with the gradient
    unless it is written over the logits. In order:

    1. cache: as many rows as fill half the last-level cache, so that the kernel reads
       the logits the product has just written, and the gradient products read what the
       kernel has just written, from cache instead of memory;
    2. BLAS: at least ``LINEAR_MIN_CHUNK_ROWS`` rows, since every chunk streams
       ``linear_weight`` through two products and ``grad_linear_weight`` through the
       third whatever its rows. With large V this beats the cache rule (a row of 50257
       float32 logits is 200 kB);
    3. memory: the buffers, and with the gradient the block through which
       ``grad_linear_weight`` is accumulated, take at most ``LINEAR_CHUNK_BYTES``; this
       beats rule 2 when V is huge;
    4. at most ``n_rows``, then evened out over the chunks: a thin last chunk would run
       its products slowly.
    """
    n_buffers = 2 if return_grad and not over_logits else 1
    row_bytes = max(1, n_buffers * n_classes * itemsize)  # (no classes: rows of nothing)
    budget = _config.LINEAR_CHUNK_BYTES - (_config.LINEAR_ACCUMULATE_BYTES if return_grad else 0)
    rows = max(_last_level_cache_bytes() // 2 // row_bytes, _config.LINEAR_MIN_CHUNK_ROWS)
    rows = max(1, min(rows, budget // row_bytes, n_rows))
    n_chunks = -(-max(n_rows, 1) // rows)
    return -(-max(n_rows, 1) // n_chunks)


def _float_operand(a, name):
    a = V._to_numpy(a)
    # Checked before float_input, whose message names float16 too, which BLAS lacks.
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        why = " (NumPy has no float16 BLAS products)" if a.dtype.kind == "f" else ""
        raise TypeError(f"{name} must be float32 or float64{why}, got dtype {a.dtype}")
    return V.float_input(a, name)


def _blas_layout(a):
    """``a`` itself when BLAS can read it (C or Fortran order), else a C-ordered copy.

    Done once here: ``np.matmul`` would otherwise copy an unreadable layout in every chunk.
    """
    return a if a.flags.c_contiguous or a.flags.f_contiguous else np.ascontiguousarray(a)


def _operands(input, linear_weight, linear_bias):
    """``(x, w, b)`` checked against each other: x (..., D), w (V, D), b (V,) or None."""
    x = _float_operand(input, "input")
    w = _float_operand(linear_weight, "linear_weight")
    if x.ndim == 0:
        raise ValueError("input must have a feature dimension: expected shape (D,), (N, D) or (..., D)")
    if w.ndim != 2:
        raise ValueError(
            f"linear_weight must have shape (V, D) (one row of D features per class), got "
            f"shape {w.shape}"
        )
    if w.dtype != x.dtype:
        raise TypeError(f"input ({x.dtype}) and linear_weight ({w.dtype}) must have the same dtype")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"input of shape {x.shape} has {x.shape[-1]} features (its last dimension) but "
            f"linear_weight of shape {w.shape} expects {w.shape[1]}"
        )
    b = None
    if linear_bias is not None:
        b = _float_operand(linear_bias, "linear_bias")
        if b.dtype != x.dtype:
            raise TypeError(f"input ({x.dtype}) and linear_bias ({b.dtype}) must have the same dtype")
        if b.shape != (w.shape[0],):
            raise ValueError(
                f"linear_bias must have shape ({w.shape[0]},), one entry per row of "
                f"linear_weight, got shape {b.shape}"
            )
    return x, w, b


def _index_target(target, input_shape, n_classes, ignore_index):
    """Class indices as int64 of shape (N,): one per row of input, range-checked."""
    t = V._to_numpy(target)
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"target must hold class indices (integers), got dtype {t.dtype}; "
            "linear_cross_entropy does not take class-probability targets"
        )
    lead = input_shape[:-1]
    if t.shape != lead:
        raise ValueError(
            f"target of shape {t.shape} does not match input of shape {input_shape}: "
            f"expected one class index per row of input, shape {lead}"
        )
    t = t.reshape(-1)
    return V.index_target(t, (t.size, n_classes), n_classes, ignore_index).reshape(-1)



def _check_needs_grad(needs_grad, has_bias):
    """``(input, linear_weight, linear_bias)`` flags of the gradients to compute."""
    if needs_grad is None:
        return True, True, has_bias
    flags = tuple(needs_grad) if isinstance(needs_grad, (tuple, list)) else None
    if flags is None or len(flags) != 3 or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise TypeError("needs_grad must be a tuple of three bools (input, linear_weight, "
                        f"linear_bias), got {needs_grad!r}")
    return bool(flags[0]), bool(flags[1]), bool(flags[2]) and has_bias


def _add_weight_grad(grad_weight, grad, x, block):
    """``grad_weight += grad.T @ x`` through ``block``, a few vocabulary rows at a time.

    ``np.matmul`` cannot accumulate into its output; a whole (V, D) temporary would double
    the memory of ``grad_weight`` and add a pass over it through memory, whereas each
    product of ``block`` rows is added while it is still in cache.
    """
    for start in range(0, grad_weight.shape[0], block.shape[0]):
        stop = min(start + block.shape[0], grad_weight.shape[0])
        part = block[: stop - start]
        np.matmul(grad[:, start:stop].T, x, out=part)
        grad_weight[start:stop] += part


@_ieee
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0,
                         return_grad=False, grad_output=None, needs_grad=None,
                         chunk_size=None, backend="auto", n_threads=None):
    """Cross-entropy of a linear layer's logits, as ``torch.nn.functional.linear_cross_entropy``.

    Computes ``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` (see
    :func:`cecore.cross_entropy`) a chunk of rows at a time, so only a chunk's logits
    exist at once (see ``chunk_size``: by default at most ``LINEAR_CHUNK_BYTES``, and a
    batch whose logits fit is one chunk); with ``return_grad=True`` the gradients come
    from the same pass.

    Parameters
    ----------
    input : array-like of shape (D,), (N, D) or (..., D)
        float32 or float64. Leading dimensions are rows (torch itself takes only (D,) and
        (N, D)); (D,) is one unbatched row.
    linear_weight : array-like of shape (V, D)
        One row per class, of the input's dtype.
    target : array-like of integers, of shape ``input.shape[:-1]``
        Class indices in ``[0, V)`` or equal to ``ignore_index``; a scalar for (D,) input.
    linear_bias : array-like of shape (V,), optional
        Added to the logits; of the input's dtype.
    weight : array-like of shape (V,), optional
        Per-class weights of the loss.
    reduction : {'mean', 'sum', 'none'}, default='mean'
        'mean' divides by the summed weight of the non-ignored targets.
    ignore_index : int, default=-100
        Target value that contributes neither loss nor gradient (None means -100, as torch).
    label_smoothing : float in [0, 1], default=0.0
    return_grad : bool, default=False
        Also return the gradients of ``sum(grad_output * loss)``.
    grad_output : array-like, optional
        Upstream gradient: a scalar for 'mean'/'sum', the loss's shape for 'none'.
        Defaults to ones. Only with ``return_grad=True``; alone it raises ValueError.
    needs_grad : tuple of 3 bools, optional
        Which of ``(grad_input, grad_linear_weight, grad_linear_bias)`` to compute with
        ``return_grad=True`` (default: all); the others are returned as None and their
        products are skipped. A frozen ``linear_weight`` (fine-tuning below a fixed
        unembedding) saves one of the three N x V x D products.
    chunk_size : int, optional
        Rows per chunk. By default chosen from V, the dtype, the CPU's last-level cache and
        a memory budget (``cecore._config.LINEAR_CHUNK_BYTES``, 128 MiB of buffers).
        Fewer rows take less memory but run the products less efficiently.
    backend : {'auto', 'cython', 'numba'}, default='auto'
    n_threads : int, optional
        Threads of the kernel and of NumPy's BLAS (limited through threadpoolctl for the
        call); defaults to :func:`cecore._config.default_n_threads`.

    Returns
    -------
    loss : scalar or ndarray of the input's dtype
        Shape () for 'mean'/'sum', ``input.shape[:-1]`` for 'none'.
    (grad_input, grad_linear_weight, grad_linear_bias) : tuple of ndarrays
        Only when ``return_grad=True``: what torch leaves in the three ``.grad`` fields after
        ``loss.backward(grad_output)``, of the shapes and dtype of the operands;
        ``grad_linear_bias`` is None without ``linear_bias``, and each is None where
        ``needs_grad`` says so.

    Notes
    -----
    Extra memory is one or two buffers of chunk x V values plus O(N) float64 per-row
    losses and the outputs. The per-row losses are reduced as :func:`cecore.cross_entropy`
    reduces them, so the loss equals ``cross_entropy`` of the full logits up to the last
    bits of BLAS's products. float32 products and ``grad_linear_weight`` stay float32; the
    kernel's sums, the loss reduction and ``grad_linear_bias`` accumulate in float64.
    """
    # Everything is checked before any buffer is allocated or any product runs.
    V.check_grad_output_use(grad_output, return_grad)
    x, w, b = _operands(input, linear_weight, linear_bias)
    n_classes, n_features = w.shape
    if ignore_index is None:
        ignore_index = -100
    ignore_index = V.check_ignore_index(ignore_index)
    t = _index_target(target, x.shape, n_classes, ignore_index)
    class_weight = V.class_weight(weight, n_classes)
    reduction = V.check_reduction(reduction)
    eps = V.check_label_smoothing(label_smoothing)
    chunk_size = V.check_int(chunk_size, "chunk_size", 1, allow_none=True)
    need_x, need_w, need_b = _check_needs_grad(needs_grad, b is not None)
    kernels = get_backend(backend)
    n_rows = t.size
    # BLAS by the products' multiply-adds, the kernel by its logits: the kernel's
    # small-work rule alone held a (256, 20000) x (20000, 200) product to one thread.
    blas_threads = V.n_threads(n_threads, n_rows * n_classes * max(1, n_features))
    threads = blas_threads if n_threads is not None else V.n_threads(None, n_rows * n_classes)
    loss_shape = x.shape[:-1]
    g = V.grad_output_array(grad_output, reduction, loss_shape) if return_grad else None
    wants_grad, return_grad = return_grad, return_grad and (need_x or need_w or need_b)

    x2 = _blas_layout(x.reshape(n_rows, n_features))
    w = _blas_layout(w)
    dtype = x.dtype
    # The 'mean' denominator is known before the first chunk, so each chunk's gradient is
    # scaled (grad_output / denominator) by the kernel as it is written.
    denominator = _index_denominator(t, class_weight, weight is None, ignore_index, reduction)

    # Without label smoothing the kernel writes d loss / d logits over the logits (see the
    # contract): one buffer per chunk, so twice the rows fit the same memory.
    over_logits = eps == 0
    if chunk_size is None:
        rows = _chunk_rows(n_rows, n_classes, dtype.itemsize, return_grad, over_logits)
    else:
        rows = max(1, min(chunk_size, n_rows))
    logits_buf = np.empty((rows, n_classes), dtype)
    # Per-row losses: O(N) float64, reduced in one call exactly as cross_entropy reduces.
    loss_rows = np.empty((n_rows, 1), np.float64)
    if return_grad:
        scale = _grad_scale(g, reduction, denominator, (n_rows, 1))
        grad_buf = logits_buf if over_logits else np.empty_like(logits_buf)
        grad_x = np.empty((n_rows, n_features), dtype) if need_x else None
        grad_w = None
        if need_w:
            grad_w = np.empty(w.shape, dtype) if n_rows else np.zeros(w.shape, dtype)
        grad_b = np.zeros(n_classes, np.float64) if need_b else None
        block = None
        if need_w and n_rows > rows:  # grad_linear_weight accumulates over chunks here
            block_rows = _config.LINEAR_ACCUMULATE_BYTES // max(1, n_features * dtype.itemsize)
            block = np.empty((max(1, min(block_rows, n_classes)), n_features), dtype)
    else:
        scale = np.broadcast_to(np.float64(0.0), (n_rows, 1))

    # (Non-finite hidden states or weights make NaN logits, which the loss gives as torch
    # does: the products' "invalid value in matmul" is one of the warnings @_ieee drops.)
    with _config.limit_blas(blas_threads):
        for start in range(0, n_rows, rows):
            stop = min(start + rows, n_rows)
            n = stop - start
            xc = x2[start:stop]
            logits = logits_buf[:n]
            np.matmul(xc, w.T, out=logits)
            if b is not None:
                logits += b
            grad = grad_buf[:n] if return_grad else None
            kernels.softmax_ce_index(
                logits.reshape(n, n_classes, 1), t[start:stop].reshape(n, 1), class_weight,
                int(ignore_index), eps, scale[start:stop], loss_rows[start:stop],
                None if grad is None else grad.reshape(n, n_classes, 1), threads)
            if grad is None:
                continue
            if need_x:
                np.matmul(grad, w, out=grad_x[start:stop])
            if need_w and start == 0:
                np.matmul(grad.T, xc, out=grad_w)
            elif need_w:
                _add_weight_grad(grad_w, grad, xc, block)
            if grad_b is not None:
                # Summed in float64: a BLAS product (ones @ grad) added a float32 chunk's
                # rows one after another, 5.8e-5 relative error at 400000 x 10 where
                # torch's cascade sum has 2e-8 (noise near an optimum, where the bias
                # gradient is small next to its terms).
                grad_b += grad.sum(axis=0, dtype=np.float64)

    loss = _index_loss(loss_rows, reduction, denominator, loss_shape, dtype, n_classes, eps)
    if not return_grad:
        return (loss, (None, None, None)) if wants_grad else loss
    grads = (None if grad_x is None else grad_x.reshape(x.shape), grad_w,
             None if grad_b is None else grad_b.astype(dtype))
    return loss, grads
