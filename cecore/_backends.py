"""Kernel contract and backend registry.

The kernel contract
-------------------
Every backend module (``cecore._numba`` and ``cecore_ext.unchecked``) exposes exactly
these nine functions (``KERNELS``). They never validate (the caller passes arrays of the
shapes and dtypes below; the few size checks some wrappers make guard a raw-pointer write,
and are no substitute; ``cecore_ext``'s own names are the same kernels with their
arguments checked, for other callers), never allocate anything of size N x C, and return
``None``: results go into the ``*_out`` arrays the caller passes. Everything above this module talks
to kernels only through :func:`get_backend`.

Shapes use ``N`` (batch), ``C`` (classes), ``S`` (product of the spatial dims d1..dK, 1
for plain ``(N, C)`` input). ``floating`` is float32 or float64, the same for every
``floating`` argument of one call. Unless said otherwise arrays are C-contiguous.
``n_threads`` is an ``int >= 1``. ``grad_out=None`` means "loss only": the kernel then
reads the logits once. On x86 the kernels run with flush-to-zero on each of their threads
and restore the caller's mode after: results below the type's normal range are 0, never
subnormal numbers (each of which costs a microcode assist); inputs are read as they are.
``C`` may be 0: losses are then empty sums (0) and ``logsumexp`` is ``-inf``. Sums that
the loss needs are taken class by class (``sum_c w[c] * (lse - x[c])``, never
``sum(w) * lse - sum(w * x)``), so infinite class weights give torch's ``inf``, and the
label-smoothing terms enter only when ``label_smoothing > 0``, so a NaN weight affects
only the rows that use it. Each ``lse - x[c]`` is formed as ``(m - x[c]) + log(s)``
(``m`` the max, ``s`` the sum of ``exp(x - m)``), as torch forms it: ``m + log(s)``
first rounds ``log(s)`` away for logits of large magnitude (an ulp of 1e15 is 0.125).
Log-softmax likewise is ``(x - m) - log(s)``.

``softmax_ce_index(logits, target, weight, ignore_index, label_smoothing, grad_scale, loss_out, grad_out, n_threads)``
    Softmax cross-entropy with class-index targets (torch semantics, including
    label smoothing)::

        lse    = log(sum_c exp(logits[n, c, s]))
        loss   = (1 - eps) * w[t] * (lse - x[t]) + eps / C * sum_c w[c] * (lse - x[c])
        d loss / d x[c] = p[c] * ((1 - eps) * w[t] + eps / C * sum(w))
                          - (1 - eps) * w[t] * [c == t] - eps / C * w[c]

    - logits : const floating (N, C, S)
    - target : const int64 (N, S), each in ``[0, C)`` or equal to ``ignore_index``
    - weight : const float64 (C,), class weights (ones when the user gave none)
    - ignore_index : int; ignored positions get loss 0 and gradient 0 (NaN where
      the position's softmax is NaN, i.e. NaN or +inf logits or all -inf: as torch)
    - label_smoothing : float in [0, 1]
    - grad_scale : const float64 (N, S), any strides (a broadcast scalar has strides
      0); the gradient written is ``grad_scale[n, s] * d loss[n, s] / d logits[n, :, s]``
    - loss_out : float64 (N, S), the per-position loss above
    - grad_out : floating (N, C, S), or None for loss only. With
      ``label_smoothing == 0`` it may be ``logits`` itself: the gradient is then written
      over the logits (each target's logit is read before its row is overwritten).

``softmax_ce_scores(logits, target, weight, ignore_index, label_smoothing, loss_out, stats_out, rank_out, n_threads)``
    Loss-only ``softmax_ce_index`` of 2-D logits plus per-row evaluation metrics, from the
    same pass over each row (batch scoring)::

        entropy = -sum_c p[c] log p[c],  max_p = max_c p[c],  brier = sum_c (p[c] - [c == t])**2
        lse     = log(sum_c exp(x[c])),  rank = #{c : x[c] > x[t]},
        top1    = 1 if the first largest logit is x[t]

    - logits : const floating (N, C); target : const int64 (N,); weight : float64 (C,)
    - loss_out : float64 (N,), equal bit for bit to ``softmax_ce_index``'s (but for
      the sign of a NaN, where a row holds +inf and NaN)
    - stats_out : float64 (N, 4), ``(entropy, max_p, brier, lse)``; the sums behind entropy
      and Brier score (``sum_c e_c (x_c - max)`` and ``sum_{c != t} e_c**2``) are taken in
      the logits' type within blocks of ``SUM_BLOCK`` classes and in float64 across
      blocks, the target's terms apart: Brier is ``sum_{c != t} p_c**2 + (1 - p_t)**2``
      with ``1 - p_t = (s - e_t) / s`` in float64 (no cancellation for confident rows)
    - rank_out : int64 (N, 2), ``(rank, top1)``
    Ignored rows (not read by the row kernels; the few-classes tiles transpose them with
    their block): loss 0, stats NaN, rank ``(-1, 0)``. Rows whose softmax is
    undefined (NaN or +inf logits): entropy, max_p and brier NaN, rank ``(C, 0)``; ``lse``
    is ``logsumexp``'s (+inf with a +inf logit, NaN with a NaN).

``report_sums(stats, rank, top_k, edges, sums_out, counts_out, n_threads)``
    What the report's metrics add up, from ``softmax_ce_scores``' ``stats_out`` and
    ``rank_out`` of N rows, for each block ``b`` of ``REDUCE_BLOCK`` consecutive rows (the
    last may be shorter), over the block's rows in order. A row with ``rank < 0`` is
    ignored: it is only counted. Every other row adds its entropy and Brier score; if its
    ``max_p`` is in [0, 1] (not NaN: a defined softmax), also ``max_p`` to the sum of its
    confidence bin ``k`` (``edges[k] <= max_p < edges[k + 1]``; bin ``n_bins`` holds
    ``max_p == edges[n_bins]``), and its hits::

        sums_out[b]   = (sum entropy, sum brier, sum max_p in bin 0, ..., in bin n_bins)
        counts_out[b] = (ignored rows, top1 == 1, rank < top_k,
                         top1 == 1 in bin 0, ..., in bin n_bins)

    - stats : const float64 (N, 4); rank : const int64 (N, 2)
    - top_k : int >= 1
    - edges : const float64 (n_bins + 1,), ``k / n_bins`` rounded once (``n_bins >= 1``);
      passed in, not computed, so that no compiler's reciprocal moves an edge (Numba's
      "arcp" made 3/5 ``3 * (1/5)``, an ulp above 0.6)
    - sums_out : float64 (ceil(N / REDUCE_BLOCK), 3 + n_bins): entropy and Brier each
      summed in ``LANES`` lanes (row ``i`` of the block in lane ``i % LANES``), each lane
      in row order with Neumaier's compensation, then the lanes' sums in lane order with
      it and their errors added last (within about an ulp of the exact sum; an infinite
      or NaN sum as a plain sum gives it); the confidences plainly in row order; the same
      bits for any ``n_threads``, and in both backends (but for the sign of a NaN, which
      x86 takes from whichever operand of an addition the compiler put first)
    - counts_out : int64 (ceil(N / REDUCE_BLOCK), 4 + n_bins)

``softmax_ce_report(logits, target, weight, ignore_index, label_smoothing, top_k, edges, loss_out, sums_out, counts_out, n_threads)``
    ``softmax_ce_scores`` followed by ``report_sums`` of its ``stats_out`` and
    ``rank_out``, without them: each block of ``REDUCE_BLOCK`` rows is scored and summed
    a few rows at a time while they are in cache (at ten classes the per-row outputs,
    48 bytes a row, cost more memory traffic than the logits). ``loss_out``, ``sums_out``
    and ``counts_out`` are those two kernels' outputs bit for bit, for any
    ``n_threads``; arguments as theirs, with ``C >= 1``.

``softmax_ce_proba(logits, target, weight, label_smoothing, grad_scale, loss_out, grad_out, n_threads)``
    Softmax cross-entropy with probability targets, ``q = (1 - eps) * target + eps / C``::

        loss = sum_c w[c] * q[c] * (lse - x[c])
        d loss / d x[c] = p[c] * sum_k w[k] * q[k] - w[c] * q[c]

    - target : const floating (N, C, S); other arguments as above.

``bce_logits(input, target, weight, pos_weight, grad_scale, loss_out, grad_out, n_threads)``
    Binary cross-entropy on logits, elementwise over ``(R, L)``::

        loss = w * ((1 - y) * x + (1 + (pw - 1) * y) * softplus(-x))
        d loss / d x = w * ((1 - y) - (1 + (pw - 1) * y) * sigmoid(-x))

    - input, target : const floating (R, L)
    - weight, pos_weight, grad_scale : const float64 (R, L), any strides (broadcast views)
    - loss_out : float64 (R, L) for the elementwise losses, or (ceil(R * L / B),) for
      their sums over consecutive blocks of B = ``REDUCE_BLOCK`` positions of the
      row-major stream (reduction 'mean' and 'sum'; each block summed in an order that
      depends on the shape only); grad_out : floating (R, L), or None for loss only; it
      may be ``input`` or ``target`` itself (each element is read before its gradient
      is written)

``softmax(logits, log, out, n_threads)``
    ``out[n, :, s]`` = softmax (``log=False``) or log-softmax (``log=True``) of
    ``logits[n, :, s]``. logits : const floating (N, C, S); out : floating (N, C, S),
    which may be ``logits`` itself (the estimator's probabilities, over its scores).

``logsumexp(logits, out, n_threads)``
    ``out[n, s] = log(sum_c exp(logits[n, c, s]))``; out : float64 (N, S).

``log_loss_pass(proba, target, lo, hi, rtol, stats_out, picked_out, n_threads)``
    The pass over the probabilities of :func:`cecore.metrics.log_loss`: scikit-learn's
    checks, and each row's clipped true-class probability while the row is in cache::

        stats_out = [values v with v > 1 or v < 0,
                     rows whose float64 sum s is finite and |s - 1| > 1e-8 + rtol,
                     rows whose float64 sum is not finite]
        picked_out[i] = min(max(proba[i, target[i]], lo), hi)     (NaN stays NaN)

    - proba : const floating (N, C)
    - target : const int64 (N,), each in ``[0, C)`` (the caller checks), or None: no pick
    - lo, hi : clip bounds, values of proba's dtype; rtol : float
    - stats_out : float64 (3,), the counts above (exact, whatever ``n_threads``)
    - picked_out : floating (N,), or None (exactly when target is None)

All backends compute ``exp`` with the same range-reduction + polynomial scheme
(``exp(x) = 2**k * P(r)``, ``r = x - k ln2``; about 1 ulp at most against libm's
double-precision exp, see ``benchmarks/results/kernel_findings.md``) so that they
vectorise and agree closely; sums over classes are accumulated in
float64. Per-position results do not depend on
``n_threads`` (each position is computed by one thread, in a fixed order), so anything
reduced from ``loss_out`` in a fixed order is bitwise identical for any thread count.
"""

import os
import threading
import warnings

from . import _config

BACKENDS = ("cython", "numba")
KERNELS = ("softmax_ce_index", "softmax_ce_scores", "report_sums", "softmax_ce_report",
           "softmax_ce_proba", "bce_logits", "softmax", "logsumexp", "log_loss_pass")

_loaded = {}
_errors = {}
_lock = threading.Lock()


def _new_lock():
    # A child forked while another thread was loading a backend inherits the lock held,
    # by a thread that does not exist in the child: every call there waited forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


def _load(name):
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name in _loaded or name in _errors:
            return _loaded.get(name)
        try:
            if name == "cython":
                from cecore_ext import unchecked as module
            else:
                from . import _numba as module
        except Exception as exc:  # an unbuilt extension, a broken numba, NUMBA_NUM_THREADS=0
            if isinstance(exc, ValueError) and str(exc).startswith("CECORE_"):
                raise  # a bad setting of ours: the user must see it
            _errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        _loaded[name] = module
    if name == "cython":  # after the lock and the registry: under -W error it raises once
        _warn_if_serial(module.build_info())
    return module


def _warn_if_serial(info):
    """setup.py's warning that the compiler had no OpenMP, which pip hides (it shows a
    build's output only with -v), repeated where it is seen: when the backend loads."""
    if not info["openmp"]:
        warnings.warn("cecore_ext was built without OpenMP (CECORE_NO_OPENMP was set at "
                      "build time, or the C compiler did not take -fopenmp): the Cython "
                      "kernels run on one thread whatever n_threads says. Reinstall without "
                      "CECORE_NO_OPENMP, with a compiler that supports OpenMP, or use "
                      "backend='numba'.", RuntimeWarning, stacklevel=2)


def get_backend(backend="auto"):
    """Return the kernel module for ``backend`` ("auto", "cython" or "numba").

    "auto" prefers Cython: it needs no JIT warm-up, so short scripts and the CLI start fast.
    """
    if backend == "auto":
        for name in _config.AUTO_ORDER:
            module = _load(name)
            if module is not None:
                return module
        raise RuntimeError(f"no cecore backend could be loaded: {_errors}")
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be 'auto', 'cython' or 'numba', got {backend!r}"
        )
    module = _load(backend)
    if module is None:
        raise RuntimeError(f"the {backend!r} backend is unavailable: {_errors[backend]}")
    return module


def available_backends():
    """Names of the backends that load on this machine."""
    return [name for name in BACKENDS if _load(name) is not None]


def show_config(file=None):
    """Print which backends load, with their threads, tunables and build flags; return it
    as a dict."""
    # every tunable of _config: its upper-case int and str settings (not the name tuples)
    tunables = {name: value for name, value in vars(_config).items()
                if name.isupper() and not name.startswith("_")
                and isinstance(value, (int, str))}
    info = {"default_n_threads": _config.default_n_threads(), "tunables": tunables,
            "backends": {}}
    for name in BACKENDS:
        module = _load(name)
        if module is None:
            info["backends"][name] = {"available": False, "error": _errors[name]}
        else:
            info["backends"][name] = {"available": True, **module.build_info()}
    lines = [f"cecore default n_threads: {info['default_n_threads']} "
             f"(cpus available: {_config.cpus_available()})",
             "  tunables: " + ", ".join(f"{k}={v}" for k, v in tunables.items())]
    for name, entry in info["backends"].items():
        details = ", ".join(f"{k}={v}" for k, v in entry.items())
        lines.append(f"  {name}: {details}")
    print("\n".join(lines), file=file)
    return info
