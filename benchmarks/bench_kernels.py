"""Fused softmax cross-entropy, side by side: cecore (Cython, Numba) vs torch, sklearn, NumPy, JAX.

Usage::

    python benchmarks/bench_kernels.py            # full run, about 5-10 minutes on 2 cores
    python benchmarks/bench_kernels.py --quick    # smoke test with small shapes
    python benchmarks/bench_kernels.py --sizes 65536x1000 4x21x256x256 --repeat 7

Every competitor runs in this one process on the same arrays: class-index targets,
reduction='mean', "loss" (forward only) and "loss+grad" (loss and d loss / d logits into a
fresh array). cecore also runs "loss+grad reused" (``grad_out=`` a buffer allocated once)
and "loss+grad in place" (``grad_out=`` the logits themselves). Two yardsticks run beside
them on the same array: "exp" is ``torch.exp(x, out=buf)`` (read, one exp per element,
write: the least a fused loss+grad must do) and "copy" is ``np.copyto(buf, x)``.
Each timing is the median of ``--repeat`` calls after a warm-up call; the gradient-into-a-
buffer modes are also alternated call by call with the exp pass, and the median of those
pairs' ratios reported (steadier on a shared machine than two medians taken apart): at
least ``--repeat`` pairs, more for short calls (about half a second of exp passes).
Before any timing, every competitor's loss and gradient are checked against a float64
NumPy reference, so a fast but wrong kernel stops the run instead of being reported.

Results go to ``benchmarks/results/runs/kernels.json`` and ``kernels.png`` (``kernels_quick.*``
with ``--quick``).
"""

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

FULL_SIZES = ["65536x1000", "4096x50257", "1000000x10", "4x21x256x256"]
QUICK_SIZES = ["8192x1000", "256x50257", "100000x10", "2x21x64x64"]
MODES = ("loss", "loss+grad", "loss+grad reused", "loss+grad in place")
NOTES = []


def note(message):
    """Print a note now and keep it for the JSON results."""
    print(f"note: {message}", flush=True)
    NOTES.append(message)


# ------------------------------------------------------------------------- reference
def numpy_cross_entropy(x, t, return_grad):
    """Mean softmax cross-entropy of logits ``x`` (N, C, ...) and class indices ``t`` (N, ...).

    Plain NumPy: log-sum-exp from the row max, gather of the target logit, gradient as
    softmax minus one-hot divided by the number of positions. It allocates one array of
    ``x``'s size (exp, turned into the gradient in place) and computes in ``x``'s dtype.
    """
    m = x.max(axis=1, keepdims=True)
    e = np.subtract(x, m)
    np.exp(e, out=e)
    s = e.sum(axis=1, keepdims=True)
    lse = np.log(s) + m
    picked = np.take_along_axis(x, t[:, None], axis=1)
    loss = np.mean(lse - picked, dtype=np.float64)
    if not return_grad:
        return loss
    e /= s
    idx = t[:, None]
    np.put_along_axis(e, idx, np.take_along_axis(e, idx, axis=1) - 1, axis=1)
    e /= t.size
    return loss, e


def max_violation(got, ref, rtol, atol, scale=1.0, rows=256):
    """Largest ``|scale * got - ref| - (atol + rtol * |ref|)``, computed a few rows at a time.

    Positive means ``np.allclose`` would fail. Chunking keeps the check's temporaries small
    for gradients of several GB.
    """
    worst = -np.inf
    for i in range(0, got.shape[0], rows):
        g = np.asarray(got[i:i + rows], dtype=np.float64) * scale
        r = ref[i:i + rows]
        worst = max(worst, float(np.max(np.abs(g - r) - (atol + rtol * np.abs(r)))))
    return worst


# ------------------------------------------------------------------------ competitors
class Competitor:
    """One implementation: ``prepare(x, t)`` returns ``{mode: callable}``.

    Each callable takes no argument and returns the competitor's raw outputs; ``to_numpy``
    turns them into ``(loss, grad or None)`` for the correctness check. ``extra_bytes``
    estimates the peak memory a call adds beyond the inputs (to skip what does not fit).
    """

    name = ""
    numpy_memory = True  # allocates through NumPy, so tracemalloc sees its memory

    def skip_reason(self, shape, dtype):
        return None

    def extra_bytes(self, nbytes, mode):
        return nbytes

    def to_numpy(self, out, n_positions):
        return (float(out), None) if not isinstance(out, tuple) else (float(out[0]), out[1])


class Cecore(Competitor):
    def __init__(self, backend, threads):
        import cecore
        self.cecore, self.backend, self.threads = cecore, backend, threads
        self.name = f"cecore-{backend}"

    def extra_bytes(self, nbytes, mode):
        # the fresh gradient, or the reused buffer plus the in-place copy of the logits
        return 2 * nbytes if mode.startswith("loss+grad") else 0

    def prepare(self, x, t):
        ce, b, n = self.cecore.cross_entropy, self.backend, self.threads
        buf = np.empty_like(x)
        # In place overwrites the logits with their gradient: it gets its own copy, which
        # after the first call holds gradients (the same work: the kernels do not branch
        # on values).
        own = x.copy()
        return {
            "loss": lambda: ce(x, t, backend=b, n_threads=n),
            "loss+grad": lambda: ce(x, t, return_grad=True, backend=b, n_threads=n),
            "loss+grad reused": lambda: ce(x, t, grad_out=buf, backend=b, n_threads=n),
            "loss+grad in place": lambda: ce(own, t, grad_out=own, backend=b, n_threads=n),
        }


class CecoreBuild(Cecore):
    """The Cython backend's AVX2 build where ``cecore_ext`` loaded its AVX-512 build: the
    code an AVX2-only CPU (such as Zen 3) runs, side by side with the loaded one. The
    registry is pointed at the build for the duration of each call."""

    def __init__(self, variant, threads):
        import importlib
        super().__init__("cython", threads)
        self.name = f"cecore-cython-{variant}"
        self.module = importlib.import_module(f"cecore_ext._kernels_{variant}")

    def prepare(self, x, t):
        from cecore import _backends

        def swapped(fn):
            def run():
                loaded = _backends._loaded["cython"]
                _backends._loaded["cython"] = self.module
                try:
                    return fn()
                finally:
                    _backends._loaded["cython"] = loaded
            return run

        return {mode: swapped(fn) for mode, fn in super().prepare(x, t).items()}


class Yardstick(Competitor):
    """A pass over the same array that is not cross-entropy, timed in every gradient mode:
    ``exp`` (``torch.exp(x, out=buf)``) or ``copy`` (``np.copyto(buf, x)``)."""

    numpy_memory = False

    def __init__(self, name, threads):
        self.name = name
        if name == "exp":
            import torch
            torch.set_num_threads(threads)
            self.torch = torch

    def extra_bytes(self, nbytes, mode):
        return nbytes

    def prepare(self, x, t):
        buf = np.empty_like(x)
        if self.name == "exp":
            xt, bt = self.torch.from_numpy(x), self.torch.from_numpy(buf)
            run = lambda: self.torch.exp(xt, out=bt)  # noqa: E731
        else:
            run = lambda: np.copyto(buf, x)  # noqa: E731
        return {m: run for m in MODES if m.startswith("loss+grad")}


class Torch(Competitor):
    name = "torch"
    numpy_memory = False

    def __init__(self, threads):
        import torch
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        torch.set_num_threads(threads)

    def extra_bytes(self, nbytes, mode):
        # log-softmax saved for backward, its gradient, and x.grad
        return 3 * nbytes if mode == "loss+grad" else nbytes

    def prepare(self, x, t):
        torch, F = self.torch, self.F
        xt = torch.from_numpy(x)  # shares x's memory: no copy
        tt = torch.from_numpy(t)
        leaf = torch.from_numpy(x).requires_grad_(True)

        def loss_only():
            with torch.no_grad():
                return F.cross_entropy(xt, tt)

        def loss_grad():
            leaf.grad = None  # a fresh gradient each call, as the other competitors allocate
            loss = F.cross_entropy(leaf, tt)
            loss.backward()
            return loss.detach(), leaf.grad

        return {"loss": loss_only, "loss+grad": loss_grad}

    def to_numpy(self, out, n_positions):
        if isinstance(out, tuple):
            return float(out[0]), out[1].numpy()
        return float(out), None


class Sklearn(Competitor):
    """sklearn's fused Cython kernel ``HalfMultinomialLoss`` (2-D input only).

    It returns per-sample losses and the gradient of their *sum*; the timed call adds the
    (cheap) mean of the losses but does not rescale the gradient by 1/N.
    """

    name = "sklearn"

    def __init__(self, threads):
        from sklearn._loss.loss import HalfMultinomialLoss
        self.loss, self.threads = HalfMultinomialLoss(), threads

    def skip_reason(self, shape, dtype):
        if len(shape) != 2:
            return "sklearn's HalfMultinomialLoss takes (n_samples, n_classes) only"
        return None

    def extra_bytes(self, nbytes, mode):
        return nbytes if mode == "loss+grad" else 0

    def prepare(self, x, t):
        y = t.astype(x.dtype)  # sklearn wants y_true in the logits' float dtype
        hml, n = self.loss, self.threads

        def loss_only():
            return hml.loss(y_true=y, raw_prediction=x, n_threads=n).mean(dtype=np.float64)

        def loss_grad():
            loss_out, grad_out = hml.loss_gradient(y_true=y, raw_prediction=x, n_threads=n)
            return loss_out.mean(dtype=np.float64), grad_out

        return {"loss": loss_only, "loss+grad": loss_grad}

    def to_numpy(self, out, n_positions):
        if isinstance(out, tuple):
            return float(out[0]), (out[1], 1.0 / n_positions)  # gradient of the sum
        return float(out), None


class NumpyRef(Competitor):
    name = "numpy"

    def prepare(self, x, t):
        return {"loss": lambda: numpy_cross_entropy(x, t, False),
                "loss+grad": lambda: numpy_cross_entropy(x, t, True)}


class Jax(Competitor):
    name = "jax"
    numpy_memory = False

    def __init__(self):
        import jax
        jax.config.update("jax_enable_x64", True)  # so float64 runs in float64
        import jax.numpy as jnp
        self.jax = jax

        def loss_fn(x, t):
            lse = jax.nn.logsumexp(x, axis=1)
            picked = jnp.take_along_axis(x, t[:, None], axis=1)[:, 0]
            return jnp.mean(lse - picked)

        self.loss = jax.jit(loss_fn)
        self.loss_grad = jax.jit(jax.value_and_grad(loss_fn))

    def extra_bytes(self, nbytes, mode):
        # a device copy of x, and the gradient plus one fused temporary
        return 3 * nbytes if mode == "loss+grad" else 2 * nbytes

    def prepare(self, x, t):
        jax = self.jax
        xj, tj = jax.device_put(x), jax.device_put(t)
        jax.block_until_ready((xj, tj))
        return {"loss": lambda: jax.block_until_ready(self.loss(xj, tj)),
                "loss+grad": lambda: jax.block_until_ready(self.loss_grad(xj, tj))}

    def to_numpy(self, out, n_positions):
        if isinstance(out, tuple):
            return float(out[0]), np.asarray(out[1])
        return float(out), None


def cecore_ext_variant():
    import cecore_ext
    return cecore_ext.build_info()["variant"]


def make_competitors(threads, use_jax):
    comps = []
    import cecore
    available = cecore.available_backends()
    for backend in ("cython", "numba"):
        if backend in available:
            comps.append(Cecore(backend, threads))
        else:
            note(f"cecore backend {backend!r} is unavailable here, its column is skipped")
    if "cython" in available and cecore_ext_variant() == "avx512":
        comps.append(CecoreBuild("avx2", threads))
        note("cecore-cython is the AVX-512 build; cecore-cython-avx2 is the AVX2 build "
             "of the same source, run on the same CPU")
    for cls, args in ((Torch, (threads,)), (Sklearn, (threads,)), (NumpyRef, ()),
                      (Yardstick, ("exp", threads)), (Yardstick, ("copy", threads))):
        try:
            comps.append(cls(*args))
        except ImportError as exc:
            note(f"{cls.__name__} skipped: {exc}")
    if use_jax:
        try:
            comps.append(Jax())
            note("jax runs on CPU with XLA's own thread pool (all usable cores), "
                 "inputs placed on the device before timing, outputs not copied back")
        except ImportError as exc:
            note(f"jax is not importable ({exc}); its column is skipped")
    return comps


# ------------------------------------------------------------------------- the run
def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}, expected e.g. 65536x1000") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need N x C [x d1 ...], all >= 1")
    return shape


def make_data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=dtype)
    x *= 2  # spread the probabilities a little beyond a standard normal's
    t = rng.integers(0, shape[1], size=(shape[0],) + shape[2:], dtype=np.int64)
    return x, t


def check(comps, x, t, tol):
    """Assert every competitor's loss and gradient match the float64 NumPy reference."""
    x64 = x if x.dtype == np.float64 else x.astype(np.float64)
    ref_loss, ref_grad = numpy_cross_entropy(x64, t, True)
    del x64
    gmax = float(np.max(np.abs(ref_grad)))
    status = {}
    for comp, fns in comps:
        if isinstance(comp, Yardstick):
            continue
        if "loss+grad reused" in fns:
            fresh = fns["loss+grad"]()
            for mode in ("loss+grad reused", "loss+grad in place"):
                other = fns[mode]()
                if other[0] != fresh[0] or other[1].tobytes() != fresh[1].tobytes():
                    raise AssertionError(f"{comp.name}: {mode} differs from loss+grad")
            del fresh, other
        loss, grad = comp.to_numpy(fns["loss+grad"](), t.size)
        scale = 1.0
        if isinstance(grad, tuple):
            grad, scale = grad
        loss_only, _ = comp.to_numpy(fns["loss"](), t.size)
        bad = []
        for label, value in (("loss", loss), ("loss-only", loss_only)):
            if not abs(value - ref_loss) <= tol * abs(ref_loss):
                bad.append(f"{label} {value!r} vs reference {ref_loss!r}")
        if grad.shape != ref_grad.shape:
            bad.append(f"gradient shape {grad.shape} vs {ref_grad.shape}")
        else:
            v = max_violation(grad, ref_grad, rtol=tol, atol=1e-2 * tol * gmax, scale=scale)
            if v > 0:
                bad.append(f"gradient off the reference by up to {v:.3g} beyond tolerance")
        del grad
        if bad:
            raise AssertionError(f"{comp.name} is wrong on {x.shape} {x.dtype}: " + "; ".join(bad))
        status[comp.name] = "ok"
    return status


def run(args):
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    shapes = [parse_shape(s) if isinstance(s, str) else s for s in sizes]
    repeat = args.repeat or (3 if args.quick else 5)
    budget = args.mem_budget_gb * C.GB
    comps = make_competitors(args.threads, not args.no_jax)
    names = [c.name for c in comps]

    bandwidth = C.copy_bandwidth()
    print(f"memory copy bandwidth (np.copyto, 256 MB float32, median): {bandwidth / C.GB:.2f} GB/s")
    print(f"threads: {args.threads}; repeats: {repeat} (median reported); "
          f"competitors: {', '.join(names)}", flush=True)

    records = []
    for shape in shapes:
        for dtype in (np.float32, np.float64):
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            base = nbytes + int(np.prod((shape[0],) + shape[2:])) * 8
            label = f"{'x'.join(map(str, shape))} {dtype.name}"
            active = []
            for comp in comps:
                reason = comp.skip_reason(shape, dtype)
                need = base + max(comp.extra_bytes(nbytes, m) for m in MODES)
                if reason is None and need > budget:
                    reason = (f"needs about {need / C.GB:.1f} GB, over the "
                              f"{args.mem_budget_gb:g} GB budget")
                if reason:
                    note(f"{comp.name} skipped on {label}: {reason}")
                    records += [{"shape": list(shape), "dtype": dtype.name, "mode": m,
                                 "competitor": comp.name, "skipped": reason} for m in MODES]
                else:
                    active.append(comp)
            # the check holds the float64 reference and gradient besides x
            if base + 2 * nbytes * 8 // dtype.itemsize > budget:
                note(f"{label} skipped: its float64 correctness check needs more than the budget")
                continue
            print(f"\n{label}: generating data", flush=True)
            x, t = make_data(shape, dtype)
            prepared = [(comp, comp.prepare(x, t)) for comp in active]
            tol = 1e-4 if dtype == np.float32 else 1e-9
            check(prepared, x, t, tol)
            print(f"{label}: all {len(prepared)} competitors match the float64 reference "
                  f"(rtol {tol:g})", flush=True)
            for mode in MODES:
                moved = nbytes * (2 if mode.startswith("loss+grad") else 1)
                for comp, fns in prepared:
                    if mode not in fns:
                        continue
                    fn = fns[mode]
                    seconds, times = C.median_time(fn, repeat, warmup=1)
                    rec = {"shape": list(shape), "dtype": dtype.name, "mode": mode,
                           "competitor": comp.name, "median_ms": seconds * 1e3,
                           "times_ms": [s * 1e3 for s in times], "grad_mb": nbytes / C.MB}
                    if comp.name.startswith("cecore"):
                        rec["gbs"] = moved / seconds / C.GB
                        rec["frac_copy"] = moved / seconds / bandwidth
                    if comp.numpy_memory:
                        rec["peak_extra_mb"] = C.traced_peak_bytes(fn) / C.MB
                    records.append(rec)
                    extra = (f"  {rec['gbs']:.2f} GB/s ({rec['frac_copy']:.0%} of copy)"
                             if "gbs" in rec else "")
                    mem = (f"  peak extra {rec['peak_extra_mb']:.1f} MB"
                           if "peak_extra_mb" in rec else "")
                    print(f"  {mode:9s} {comp.name:14s} {seconds * 1e3:10.2f} ms{extra}{mem}",
                          flush=True)
            # --quick, a smoke test: `repeat` pairs, not seconds' worth of them
            records += paired_with_exp(prepared, shape, dtype, repeat,
                                       0.0 if args.quick else PAIRED_MIN_SECONDS)
            del prepared, x, t
            gc.collect()

    if not any(n.startswith("cecore") for n in names):
        note("no cecore backend loaded: ratios are empty")
    if "torch" in names:
        note("torch allocates outside NumPy, so tracemalloc cannot see its memory")
    if "sklearn" in names:
        note("sklearn's gradient is of the summed loss (not divided by N); the timed call "
             "computes the mean of its per-sample losses but does not rescale the gradient")
    note("GB/s counts logits read (+ gradient written for loss+grad); targets "
         "(8 bytes per position) are not counted")
    return {"settings": {"threads": args.threads, "repeat": repeat, "warmup": 1,
                         "quick": args.quick, "mem_budget_gb": args.mem_budget_gb,
                         "sizes": ["x".join(map(str, s)) for s in shapes]},
            "copy_bandwidth_gbs": bandwidth / C.GB,
            "competitors": names, "results": records, "notes": NOTES}


# Pairs of the paired ratios: at least ``repeat``, and enough for about this many seconds
# of exp passes (at most PAIRED_MAX_PAIRS). At 1e6 x 10 a call takes 5-15 ms, and with 11
# pairs the same cell read 1.32x here and 1.10x in bench_small_c.py in the same hour.
PAIRED_MIN_SECONDS = 0.5
PAIRED_MAX_PAIRS = 101


def paired_with_exp(prepared, shape, dtype, repeat, min_seconds):
    """Each cecore gradient-into-a-buffer mode alternated call by call with the exp pass
    (:func:`_common.paired_ratios`), in at least ``repeat`` pairs and about
    ``min_seconds`` of exp passes: the median and range of the pairs' time ratios."""
    exp = next((fns for comp, fns in prepared if comp.name == "exp"), None)
    if exp is None:
        return []
    records = []
    for mode in ("loss+grad reused", "loss+grad in place"):
        took = np.inf
        for _ in range(3):
            start = time.perf_counter()
            exp[mode]()
            took = min(took, time.perf_counter() - start)
        pairs = max(repeat, min(PAIRED_MAX_PAIRS, int(min_seconds / max(took, 1e-9))))
        for comp, fns in prepared:
            if not comp.name.startswith("cecore") or mode not in fns:
                continue
            ratios = C.paired_ratios(fns[mode], exp[mode], pairs)
            q10, q50, q90 = np.percentile(ratios, [10, 50, 90])
            records.append({"shape": list(shape), "dtype": dtype.name, "mode": mode,
                            "competitor": comp.name, "paired_exp_ratio": q50,
                            "paired_exp_ratios": ratios})
            print(f"  paired with exp, {mode}: {comp.name:14s} {q50:.2f}x the exp pass "
                  f"(10-90%: {q10:.2f}-{q90:.2f}, {pairs} pairs)", flush=True)
    return records


# ---------------------------------------------------------------------- reporting
def _ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def print_tables(data):
    names = data["competitors"]
    by_key, paired = {}, {}
    for r in data["results"]:
        key = ("x".join(map(str, r["shape"])), r["dtype"], r["mode"])
        (paired if "paired_exp_ratio" in r else by_key).setdefault(key, {})[r["competitor"]] = r
    # "cecore" in the single-backend ratios is the default backend ("auto" prefers Cython)
    main = next((n for n in ("cecore-cython", "cecore-numba") if n in names), None)
    ratio_cols = [("torch/cy", "torch", "cecore-cython"), ("torch/nb", "torch", "cecore-numba"),
                  ("sklearn/ce", "sklearn", main), ("numpy/ce", "numpy", main),
                  ("jax/ce", "jax", main),
                  # below 1 means cecore is slower than one exp pass over the array
                  ("exp/cy", "exp", "cecore-cython"), ("exp/nb", "exp", "cecore-numba")]
    header = ["shape", "dtype", "mode"] + [f"{n} ms" for n in names] + [c[0] for c in ratio_cols]
    header += ["cy GB/s", "cy %copy", "nb GB/s", "nb %copy"]
    rows = []
    for (shape, dtype, mode), recs in by_key.items():
        ms = {n: recs.get(n, {}).get("median_ms") for n in names}
        row = [shape, dtype, mode] + [f"{ms[n]:.2f}" if ms[n] else "-" for n in names]
        row += [_ratio(ms.get(a), ms.get(b)) for _, a, b in ratio_cols]
        for n in ("cecore-cython", "cecore-numba"):
            r = recs.get(n, {})
            row += [f"{r['gbs']:.2f}", f"{r['frac_copy']:.0%}"] if "gbs" in r else ["-", "-"]
        rows.append(row)
    print(f"\n{C.describe(data['machine'])}")
    print("median time per call (ms); ratios > 1 mean cecore is faster; "
          f"'ce' = {main}; copy bandwidth {data['copy_bandwidth_gbs']:.2f} GB/s")
    print(C.format_table(header, rows))

    if paired:
        cecores = [n for n in names if n.startswith("cecore")]
        rows = [[shape, dtype, mode] + [f"{recs[n]['paired_exp_ratio']:.2f}" if n in recs else "-"
                                        for n in cecores]
                for (shape, dtype, mode), recs in paired.items()]
        print("\ncecore / exp pass, alternated call by call (median of the pairs' ratios; "
              "below 1 means cecore is faster than one exp pass)")
        print(C.format_table(["shape", "dtype", "mode"] + cecores, rows))

    mem_names = [n for n in names if n not in ("torch", "jax", "exp", "copy")]
    header = ["shape", "dtype", "mode", "grad MB"] + [f"{n} MB" for n in mem_names]
    rows = []
    for (shape, dtype, mode), recs in by_key.items():
        grad_mb = next((r["grad_mb"] for r in recs.values() if "grad_mb" in r), None)
        if grad_mb is None:
            continue
        row = [shape, dtype, mode, f"{grad_mb:.1f}"]
        for n in mem_names:
            r = recs.get(n, {})
            row.append(f"{r['peak_extra_mb']:.1f} ({r['peak_extra_mb'] / grad_mb:.2f}x)"
                       if "peak_extra_mb" in r else "skip")
        rows.append(row)
    print("\npeak extra NumPy memory per call (tracemalloc, outputs included; "
          "in brackets: relative to the gradient's size). torch/jax memory is not visible.")
    print(C.format_table(header, rows))


def plot(data, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = data["competitors"]
    recs = [r for r in data["results"]
            if r["dtype"] == "float32" and r["mode"] == "loss+grad" and "median_ms" in r]
    shapes = list(dict.fromkeys("x".join(map(str, r["shape"])) for r in recs))
    if not shapes:
        return None
    times = {(("x".join(map(str, r["shape"]))), r["competitor"]): r["median_ms"] for r in recs}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(shapes)), 4.5))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(shapes))]
        ys = [times.get((s, name), np.nan) for s in shapes]
        ax.bar(xs, ys, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_title(f"softmax cross-entropy, loss + gradient, float32, "
                 f"{data['settings']['threads']} threads (lower is better)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats (smoke test)")
    parser.add_argument("--sizes", nargs="+", type=parse_shape, metavar="NxC[xd1...]",
                        help=f"shapes to run (default: {' '.join(FULL_SIZES)})")
    parser.add_argument("--repeat", type=int, help="timed calls per measurement (default 5, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every competitor (default 2)")
    parser.add_argument("--mem-budget-gb", type=float, default=16.0,
                        help="skip combinations estimated to need more memory (default 16)")
    parser.add_argument("--no-jax", action="store_true", help="leave JAX out")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")

    data = run(args)
    import io

    import cecore
    data["machine"] = C.machine_info(threads=args.threads,
                                     cecore_config=cecore.show_config(file=io.StringIO()),
                                     omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    print_tables(data)
    stem = "kernels_quick" if args.quick else "kernels"
    print(f"\nsaved {C.save_json(data, stem + '.json')}")
    png = plot(data, C.RESULTS_DIR / (stem + ".png"))
    if png:
        print(f"saved {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
