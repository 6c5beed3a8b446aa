"""Fused linear cross-entropy: cecore vs torch's F.linear_cross_entropy vs the bare GEMMs.

Usage::

    python benchmarks/bench_linear.py            # 2048x768x50257, 8192x256x50257 float32
    python benchmarks/bench_linear.py --quick    # small shapes, about a minute
    python benchmarks/bench_linear.py --shapes 4096x1024x32000 --repeat 5 --dtype float64

A shape ``NxDxV`` is input (N, D) and linear_weight (V, D) (no bias), class-index targets,
reduction='mean'. Competitors, all on ``--threads`` threads, in this one process:

* ``gemm``: ``X @ W.T``, the logits product alone (the floor of "loss");
* ``3 gemms``: ``L = X @ W.T``, ``L @ W`` and ``L.T @ X`` with the N x V ``L``: the
  products of a linear cross-entropy and nothing else (the floor of "loss+grads");
* ``cecore-cython``, ``cecore-numba``: ``cecore.linear_cross_entropy`` with the default
  chunks; "loss+grads" returns the loss and the three gradients (``--chunk-sizes 1024``
  adds ``cecore-cython-chunk1024``, ... with that ``chunk_size``);
* ``torch``: ``F.linear_cross_entropy`` with ``options=None`` (the N x V logits exist),
  then ``loss.backward()``; "loss" runs under ``torch.no_grad()``;
* ``torch-chunked``: the same with ``options=LinearCrossEntropyOptions()``.

Mode "frozen W" is fine-tuning below a frozen unembedding: the loss and the input's
gradient only (cecore: ``needs_grad=(True, False, False)``; torch: a ``linear_weight``
without ``requires_grad``; the floor ``2 gemms``: ``L = X @ W.T`` and ``L @ W``).

Times are medians over ``--repeat`` interleaved rounds (each round calls every
competitor once, in turn, after one warm-up round), because the machine is shared.
Before timing, cecore's loss and gradients are checked against torch's.

Memory: "peak RSS" is the resident memory a call adds at its peak: each (competitor,
mode) runs in a fresh process, warms up on a tiny problem, resets the kernel's
high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM`` after one call. For NumPy
code the tracemalloc peak is given too (torch's allocations are invisible to it). Both
include the call's outputs; "working" memory is the peak minus the outputs' bytes
(the gradients, the same for every competitor).

The issue's targets are printed as ratios: cecore loss+grads <= 1.15 x 3 gemms, loss
<= 1.1 x gemm, faster than torch and torch-chunked, peak extra memory <= 1/8 of torch's.
Results go to ``benchmarks/results/runs/linear.json`` (``linear_quick.json`` with --quick).
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

FULL_SHAPES = ["2048x768x50257", "8192x256x50257"]
QUICK_SHAPES = ["512x256x8192", "256x128x50257"]
MODES = ("loss", "loss+grads", "frozen W")
NOTES = []


def note(message):
    print(f"note: {message}", flush=True)
    NOTES.append(message)


def make_data(shape, dtype, seed=0):
    n, d, v = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=dtype)
    w = rng.standard_normal((v, d), dtype=dtype)
    w *= 2 / np.sqrt(d)  # logits of standard deviation about 2
    t = rng.integers(0, v, size=n)
    return x, w, t


# ------------------------------------------------------------------------ competitors
def competitors(x, w, t, threads, names=None, chunk_sizes=()):
    """``{name: {mode: callable}}``; each callable returns its outputs (dropped by the timer).

    ``chunk_sizes`` adds ``cecore-<backend>-chunk<rows>`` competitors with that chunk_size.
    """
    import cecore
    import torch
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions

    torch.set_num_threads(threads)
    out = {}

    def three_gemms():
        logits = x @ w.T
        return logits @ w, logits.T @ x

    out["gemm"] = {"loss": lambda: x @ w.T}
    out["3 gemms"] = {"loss+grads": three_gemms}
    out["2 gemms"] = {"frozen W": lambda: (x @ w.T) @ w}
    for backend in cecore.available_backends():
        for rows in (None, *chunk_sizes):
            def loss(backend=backend, rows=rows):
                return cecore.linear_cross_entropy(x, w, t, chunk_size=rows, backend=backend,
                                                   n_threads=threads)

            def loss_grads(backend=backend, rows=rows, needs=None):
                return cecore.linear_cross_entropy(x, w, t, return_grad=True, chunk_size=rows,
                                                   needs_grad=needs, backend=backend,
                                                   n_threads=threads)
            name = f"cecore-{backend}" + ("" if rows is None else f"-chunk{rows}")
            out[name] = {"loss": loss, "loss+grads": loss_grads,
                         "frozen W": lambda f=loss_grads: f(needs=(True, False, False))}

    xt = torch.from_numpy(x).requires_grad_(True)  # shares x's memory
    wt = torch.from_numpy(w).requires_grad_(True)
    w_frozen = torch.from_numpy(w)
    tt = torch.from_numpy(t)
    for name, options in (("torch", None), ("torch-chunked", LinearCrossEntropyOptions())):
        def loss(options=options):
            with torch.no_grad():
                return F.linear_cross_entropy(xt, wt, tt, options=options)

        def loss_grads(options=options):
            xt.grad = wt.grad = None  # fresh gradients, as the other competitors allocate
            result = F.linear_cross_entropy(xt, wt, tt, options=options)
            result.backward()
            return result.detach(), xt.grad, wt.grad

        def loss_grad_input(options=options):
            xt.grad = None
            result = F.linear_cross_entropy(xt, w_frozen, tt, options=options)
            result.backward()
            return result.detach(), xt.grad
        out[name] = {"loss": loss, "loss+grads": loss_grads, "frozen W": loss_grad_input}
    if names is not None:
        out = {k: v for k, v in out.items() if k in names}
    return out


def _parts(result):
    """``(loss, grad_input, grad_linear_weight or None)`` of a competitor's output, as
    cecore (``(loss, (gx, gw, gb))``) or torch (``(loss, gx[, gw])``) returns it."""
    loss, *rest = result
    grads = rest[0] if isinstance(rest[0], tuple) else tuple(rest) + (None,)
    return (np.asarray(loss), np.asarray(grads[0]),
            None if grads[1] is None else np.asarray(grads[1]))


def check(comps, dtype):
    """Every competitor's loss and gradients (cecore's, torch's chunked path, each one's
    frozen-W call) against torch's default path on the benchmark data."""
    ref_loss, ref_gx, ref_gw = _parts(comps["torch"]["loss+grads"]())
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    for name in [n for n in comps if n.startswith(("cecore", "torch"))]:
        loss, gx, gw = _parts(comps[name]["loss+grads"]())
        frozen_loss, frozen_gx, none_w = _parts(comps[name]["frozen W"]())
        if none_w is not None or not np.allclose(frozen_gx, gx, rtol=rtol, atol=0) \
                or not np.isclose(frozen_loss, loss, rtol=rtol):
            raise AssertionError(f"{name}: the frozen-W call differs from the full one")
        loss_only = comps[name]["loss"]()
        bad = []
        for label, value in (("loss", loss), ("loss-only", loss_only)):
            if not abs(float(value) - float(ref_loss)) <= rtol * abs(float(ref_loss)):
                bad.append(f"{label} {float(value)!r} vs torch {float(ref_loss)!r}")
        for label, got, ref in (("grad_input", gx, ref_gx), ("grad_linear_weight", gw, ref_gw)):
            err = float(np.max(np.abs(got - ref))) / max(float(np.max(np.abs(ref))), 1e-30)
            if not err <= 10 * rtol:
                bad.append(f"{label} off torch's by {err:.2g} of its largest entry")
        if bad:
            raise AssertionError(f"{name} is wrong: " + "; ".join(bad))
    return rtol


def interleaved(fns, repeat, pause=0.2):
    """Median seconds per callable over ``repeat`` rounds that call each in turn.

    One untimed warm-up round first. The pause before each call lets the previous
    competitor's worker threads (OpenBLAS, OpenMP) stop spinning.
    """
    times = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            time.sleep(pause)
            gc.collect()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if round_:
                times[name].append(elapsed)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


# ------------------------------------------------------------------ memory (processes)
def _vm_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_child(spec):
    """In a fresh process: the peak resident bytes one call adds (printed as JSON)."""
    shape, dtype, name, mode, threads = (tuple(spec["shape"]), np.dtype(spec["dtype"]),
                                         spec["name"], spec["mode"], spec["threads"])
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=threads, user_api="blas")
    # A warm-up call first: imports, JIT, thread pools, and the BLAS libraries' packing
    # buffers (fixed-size, touched by any product this large) are not counted.
    small = make_data((512, 256, 32768), dtype)
    competitors(*small, threads, [name], spec["chunk_sizes"])[name][mode]()
    del small
    x, w, t = make_data(shape, dtype)
    fn = competitors(x, w, t, threads, [name], spec["chunk_sizes"])[name][mode]
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # return freed heap memory, or the call may reuse it
    before = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak, to the current RSS
    result = fn()
    peak = _vm_kb("VmHWM")
    outputs = [a for a in (result if isinstance(result, tuple) else (result,))]
    if len(outputs) == 2 and isinstance(outputs[1], tuple):  # cecore: (loss, grads)
        outputs = [outputs[0], *outputs[1]]
    out_bytes = sum(int(np.asarray(a).nbytes) for a in outputs if a is not None)
    print(json.dumps({"peak_rss_bytes": (peak - before) * 1024, "output_bytes": out_bytes}))


def peak_rss(shape, dtype, name, mode, threads, chunk_sizes):
    spec = {"shape": list(shape), "dtype": np.dtype(dtype).name, "name": name, "mode": mode,
            "threads": threads, "chunk_sizes": list(chunk_sizes)}
    proc = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        note(f"peak RSS of {name} {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- the run
def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}, expected NxDxV") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}, expected NxDxV, all >= 1")
    return shape


def run_shape(shape, dtype, args):
    import cecore.linear

    n, d, v = shape
    label = f"{n}x{d}->{v} {np.dtype(dtype).name}"
    print(f"\n{label}: generating data", flush=True)
    x, w, t = make_data(shape, dtype)
    comps = competitors(x, w, t, args.threads, chunk_sizes=args.chunk_sizes)
    rtol = check(comps, dtype)
    print(f"{label}: cecore matches torch (loss rtol {rtol:g})", flush=True)
    if args.only:
        comps = {k: v for k, v in comps.items() if k in args.only}
    rows = {mode: cecore.linear._chunk_rows(n, v, np.dtype(dtype).itemsize, mode != "loss", True)
            for mode in MODES}
    record = {"shape": list(shape), "dtype": np.dtype(dtype).name, "default_chunk_rows": rows,
              "gemm_gflop": 2 * n * d * v / 1e9, "results": {}}
    for mode in MODES:
        fns = {name: modes[mode] for name, modes in comps.items() if mode in modes}
        timed = interleaved(fns, args.repeat)
        for name, (seconds, times) in timed.items():
            rec = {"median_s": seconds, "times_s": times}
            if name in ("gemm", "3 gemms") or name.startswith("cecore"):
                rec["tracemalloc_peak_bytes"] = C.traced_peak_bytes(fns[name])
            if not args.no_rss:
                rec.update(peak_rss(shape, dtype, name, mode, args.threads,
                                    args.chunk_sizes) or {})
            record["results"][f"{name} | {mode}"] = rec
            mem = ""
            if "peak_rss_bytes" in rec:
                mem = (f"  peak RSS +{rec['peak_rss_bytes'] / C.MB:.0f} MB "
                       f"(outputs {rec['output_bytes'] / C.MB:.0f} MB)")
            if "tracemalloc_peak_bytes" in rec:
                mem += f"  tracemalloc {rec['tracemalloc_peak_bytes'] / C.MB:.0f} MB"
            print(f"  {mode:10s} {name:14s} {seconds:8.3f} s{mem}", flush=True)
    del comps, x, w, t
    gc.collect()
    return record


def _get(record, name, mode, key="median_s"):
    return record["results"].get(f"{name} | {mode}", {}).get(key)


def _ratio(a, b):
    return a / b if a and b else None


def summarize(records, names):
    """Ratios against the issue's targets, one row per shape and cecore backend."""
    rows, summary = [], []
    for r in records:
        shape = "{}x{}->{}".format(*r["shape"]) + f" {r['dtype']}"
        for ce in [n for n in names if n.startswith("cecore")]:
            lg = _get(r, ce, "loss+grads")
            ce_rss = _get(r, ce, "loss+grads", "peak_rss_bytes")
            t_rss = _get(r, "torch", "loss+grads", "peak_rss_bytes")
            out = _get(r, ce, "loss+grads", "output_bytes") or 0
            s = {"shape": shape, "competitor": ce,
                 "vs_3_gemms": _ratio(lg, _get(r, "3 gemms", "loss+grads")),
                 "loss_vs_gemm": _ratio(_get(r, ce, "loss"), _get(r, "gemm", "loss")),
                 "torch_over_cecore": _ratio(_get(r, "torch", "loss+grads"), lg),
                 "torch_chunked_over_cecore": _ratio(_get(r, "torch-chunked", "loss+grads"), lg),
                 "frozen_vs_2_gemms": _ratio(_get(r, ce, "frozen W"), _get(r, "2 gemms", "frozen W")),
                 "frozen_vs_all_grads": _ratio(_get(r, ce, "frozen W"), lg),
                 "torch_frozen_over_cecore": _ratio(_get(r, "torch", "frozen W"),
                                                    _get(r, ce, "frozen W")),
                 "rss_vs_torch": _ratio(ce_rss, t_rss),
                 "working_rss_vs_torch": _ratio(ce_rss and ce_rss - out, t_rss and t_rss - out)}
            summary.append(s)
            rows.append([shape, ce] + ["-" if s[k] is None else f"{s[k]:.2f}" for k in
                                       ("vs_3_gemms", "loss_vs_gemm", "torch_over_cecore",
                                        "torch_chunked_over_cecore", "rss_vs_torch",
                                        "working_rss_vs_torch", "frozen_vs_2_gemms",
                                        "frozen_vs_all_grads", "torch_frozen_over_cecore")])
    print("\nratios (targets: loss+grads / 3 gemms <= 1.15; loss / gemm <= 1.1; torch / cecore > 1;"
          "\npeak extra memory / torch's <= 0.125, with and without the outputs;"
          "\nfrozen W: its time / 2 gemms, / cecore's loss+grads, torch's frozen W / cecore's)")
    print(C.format_table(["shape", "cecore", "lg/3gemm", "loss/gemm", "torch/ce",
                          "chunked/ce", "rss/torch", "working/torch", "frz/2gemm",
                          "frz/all", "torch frz/ce"], rows))
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="NxDxV",
                        help=f"default: {' '.join(FULL_SHAPES)}")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=C.machine_info()["usable_cpus"],
                        help="threads of every competitor (default: all usable CPUs)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[], metavar="ROWS",
                        help="also time cecore with these chunk_size values")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="time only these competitors (e.g. gemm '3 gemms' cecore-cython)")
    parser.add_argument("--output", help="results file name in benchmarks/results/runs/ "
                        "(default linear.json, linear_quick.json with --quick)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=args.threads, user_api="blas")  # the bare GEMMs' threads
    shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else FULL_SHAPES)]
    print(f"CPU: {C._cpu_model()}; threads: {args.threads}; rounds: {args.repeat} "
          "(median reported)", flush=True)
    load_before = os.getloadavg()
    records = [run_shape(shape, np.dtype(args.dtype), args) for shape in shapes]
    names = [k.split(" | ")[0] for k in records[0]["results"]]
    names = list(dict.fromkeys(names))
    summary = summarize(records, names)
    note(f"load average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()} "
         f"on {C.machine_info()['usable_cpus']} usable CPUs; other processes' threads slow "
         "down every multi-threaded call that has to wait for a descheduled thread")
    whole = [r["shape"] for r in records
             if any(rows >= r["shape"][0] for rows in r["default_chunk_rows"].values())]
    note("3 gemms materialise the N x V logits (as torch's default path does); cecore "
         "makes them a chunk of rows at a time (default_chunk_rows)"
         + (f", which at {whole} is all the rows: its default chunk is sized by memory, "
            "and those logits are small" if whole else "")
         + ". Times include allocating outputs.")
    data = {"settings": {"threads": args.threads, "repeat": args.repeat, "quick": args.quick,
                         "dtype": args.dtype},
            "machine": C.machine_info(
                threads=args.threads,
                openblas_thread_timeout=os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                load_average_before_after=[load_before, os.getloadavg()]),
            "records": records, "summary": summary, "notes": NOTES}
    path = C.save_json(data, args.output or ("linear_quick.json" if args.quick else "linear.json"))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
