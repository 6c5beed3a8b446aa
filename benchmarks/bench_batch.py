"""Streamed scoring of a 4 GB float32 .npy: peak RSS and throughput, every metric vs loss only.

1. Writes a (20480, 50257) float32 file of logits (4.1 GB) and its targets under /tmp.
2. Scores it with ``cecore score`` (loss, perplexity, accuracy, top-k accuracy, entropy,
   ECE, Brier: one pass) in fresh processes, ``--memory-budget 512MB``: once to fill the
   page cache (reported, not counted), then ``--runs`` times interleaved, in alternating
   order, with as many runs of a loss-only stream of the same file in the same chunks
   through the same kernels (``softmax_ce_index`` without gradient: what ``cecore score``
   did before it computed the metrics); reports the children's peak RSS (/proc VmHWM)
   and both throughputs (medians).
3. Times ``cecore.cross_entropy(x, t)`` (loss only) on a slice of the same array that fits
   in memory, and prints streamed / in-memory throughput (medians).
4. Alternates both streams in this process, where neither pays for a process start
   (:func:`in_process_ratio`; the fresh processes' runs spread 1.0-2.5 GB/s at ten
   classes on one machine), and prints the median of the paired ratios.
5. Times the loss-only kernel's calls and the scoring (``score_rows``: its kernels and
   block sums) alone over the same mapped chunks, in this process (:func:`kernel_split`):
   the scoring's share of the streamed ratio.
Deletes the files at the end. Usage: ``python benchmarks/bench_batch.py [--rows N]``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import GB, child_env, machine_info, median_time, save_json  # noqa: E402

import cecore  # noqa: E402


def write_logits(path, n_rows, n_classes, slab=512):
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, n_classes))
    rng = np.random.default_rng(0)
    for start in range(0, n_rows, slab):
        stop = min(n_rows, start + slab)
        x[start:stop] = rng.standard_normal((stop - start, n_classes), dtype=np.float32)
    x.flush()
    del x


_CHILD = """
import json, sys
from cecore.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) * 1024, file=sys.stderr)
sys.exit(code)
"""


def loss_only_stream(x_path, t_path, budget, backend):
    """The loss-only stream: the same chunks through the same kernels
    (``softmax_ce_index`` without gradient, what ``cecore score`` did before it computed
    the metrics). Returns its seconds, its throughput in GB/s and the mean loss."""
    from cecore import _io, _reduce
    from cecore import _validation as V
    from cecore._backends import get_backend
    from cecore.batch import chunk_rows, prepare_options

    x, t = _io.open_array(x_path), _io.open_array(t_path)
    opts = prepare_options(x.shape, x.dtype, t.shape, t.dtype, backend=backend)
    rows = chunk_rows(budget, x, t, opts)
    kernels, total = get_backend(backend), _reduce.BlockSum()
    w = np.ones(x.shape[1])
    start = time.perf_counter()
    for a in range(0, x.shape[0], rows):
        b = min(x.shape[0], a + rows)
        xc = x.rows(a, b)
        tc = V.index_target(t.rows(a, b), (b - a, x.shape[1]), x.shape[1], -100)
        loss = np.empty((b - a, 1))
        kernels.softmax_ce_index(xc.reshape(b - a, -1, 1), tc, w, -100, 0.0,
                                 np.broadcast_to(0.0, (b - a, 1)), loss, None,
                                 V.n_threads(None, xc.size))
        total.add(loss)
        x.release(a, b)
        t.release(a, b)
    seconds = time.perf_counter() - start
    x.close()
    t.close()
    return seconds, x.shape[0] * x.shape[1] * 4 / seconds / GB, total.total() / x.shape[0]


_LOSS_ONLY_CHILD = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from bench_batch import loss_only_stream
x_path, t_path, budget, backend = sys.argv[1:]
_, gb_per_second, mean_loss = loss_only_stream(x_path, t_path, budget, backend)
print(json.dumps({{"gb_per_second": gb_per_second, "mean_loss": mean_loss}}))
"""


def in_process_ratio(x_path, t_path, budget, backend, rounds=15):
    """Every metric / loss only, both streams alternated in this process (no process
    start, page mapping or kernel loading in either): the median of the rounds' ratios
    of throughput, and its range."""
    from cecore import batch

    def score():
        return batch.score(x_path, t_path, memory_budget=budget, backend=backend).seconds

    score(), loss_only_stream(x_path, t_path, budget, backend)  # kernels loaded
    ratios = []
    for _ in range(rounds):
        metrics = score()
        ratios.append(loss_only_stream(x_path, t_path, budget, backend)[0] / metrics)
    return float(np.median(ratios)), min(ratios), max(ratios)


def loss_only_subprocess(x_path, t_path, budget, backend):
    out = subprocess.run([sys.executable, "-c", _LOSS_ONLY_CHILD, x_path, t_path, budget,
                          backend], capture_output=True, text=True, check=True, env=child_env())
    return json.loads(out.stdout)


def score_subprocess(x_path, t_path, budget, backend, extra=()):
    """Run ``cecore score`` in a fresh process; return (result, the process's peak RSS).

    The peak comes from the child's own /proc VmHWM: ``getrusage(RUSAGE_CHILDREN)`` would
    also count this process's high-water mark, which Linux carries across fork + exec.
    """
    cmd = [sys.executable, "-c", _CHILD, "score", x_path, t_path, "--json", "--quiet",
           "--memory-budget", budget, "--backend", backend, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=child_env())
    return json.loads(out.stdout), int(out.stderr.split()[-1])


def kernel_split(x_path, t_path, budget, backend, rounds=7):
    """Seconds of the calls alone and of the page releases, loss-only ``softmax_ce_index``
    against the stream's scoring (``score_rows``: its kernels and the block sums of the
    metrics), over the same mapped chunks of the file in this process, alternated
    (medians of ``rounds``): how much of the streamed ratio is the scoring's extra work."""
    from cecore import _io
    from cecore._backends import get_backend
    from cecore.batch import chunk_rows, prepare_options
    from cecore.metrics._report import score_rows

    x, t = _io.open_array(x_path), _io.open_array(t_path)
    opts = prepare_options(x.shape, x.dtype, t.shape, t.dtype, backend=backend)
    step, kernels, w = chunk_rows(budget, x, t, opts), get_backend(backend), np.ones(x.shape[1])

    def run(scores):
        kernel = release = 0.0
        sums = opts.new_sums()
        for a in range(0, x.shape[0], step):
            b = min(x.shape[0], a + step)
            xc, tc, n = x.rows(a, b), np.ascontiguousarray(t.rows(a, b), np.int64), b - a
            loss = None if scores else np.empty((n, 1))
            start = time.perf_counter()
            if scores:
                score_rows(kernels, xc, tc.reshape(-1), False, w, -100, 0.0, 2, sums)
            else:
                kernels.softmax_ce_index(xc.reshape(n, -1, 1), tc.reshape(n, 1), w, -100, 0.0,
                                         np.broadcast_to(0.0, (n, 1)), loss, None, 2)
            mid = time.perf_counter()
            x.release(a, b)
            t.release(a, b)
            kernel, release = kernel + mid - start, release + time.perf_counter() - mid
        return kernel, release

    times = {False: [], True: []}
    for _ in range(rounds):
        for scores in (False, True):
            times[scores].append(run(scores))
    x.close()
    t.close()
    return {("scores" if k else "loss_only"): np.median(np.array(v), axis=0).tolist()
            for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20480)
    parser.add_argument("--classes", type=int, default=50257)
    parser.add_argument("--budget", default="512MB")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--slice-rows", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="cecore_bench_batch_", dir="/tmp")
    x_path, t_path = os.path.join(tmp, "logits.npy"), os.path.join(tmp, "target.npy")
    try:
        write_logits(x_path, args.rows, args.classes)
        t = np.random.default_rng(1).integers(0, args.classes, args.rows)
        np.save(t_path, t)
        size = os.path.getsize(x_path)
        print(f"file: {x_path} {args.rows} x {args.classes} float32 = {size / GB:.2f} GB")

        # A first, untimed run reads the file into the page cache, so that neither side
        # of the comparison pays for the disk; then the pairs are interleaved, in turns.
        cold = score_subprocess(x_path, t_path, args.budget, args.backend)
        runs, bare = [], []
        for i in range(args.runs):
            pair = [lambda: runs.append(score_subprocess(x_path, t_path, args.budget,
                                                         args.backend)),
                    lambda: bare.append(loss_only_subprocess(x_path, t_path, args.budget,
                                                             args.backend))]
            for run in pair[::1 if i % 2 == 0 else -1]:
                run()
        # both sides scored the same thing: the same mean loss (the same block sums; the
        # score's is float32, the logits' dtype, as cross_entropy's)
        losses = {r[0]["mean_loss"] for r in [cold, *runs]} | {
            float(np.float32(r["mean_loss"])) for r in bare}
        assert len(losses) == 1, f"the streams' mean losses differ: {sorted(losses)}"
        streamed = [r[0]["gb_per_second"] for r in runs]
        streamed_bare = [r["gb_per_second"] for r in bare]
        peak = max(r[1] for r in [cold, *runs])
        result = runs[-1][0]

        x_mem = np.load(x_path, mmap_mode="r")[: args.slice_rows].copy()
        t_mem = t[: args.slice_rows]
        seconds, _ = median_time(lambda: cecore.cross_entropy(x_mem, t_mem, backend=args.backend), 5)
        in_memory = x_mem.nbytes / seconds / GB
        median_streamed = float(np.median(streamed))
        median_bare = float(np.median(streamed_bare))
        ratio, ratio_bare = median_streamed / in_memory, median_bare / in_memory
        info = machine_info()
        print(f"CPU: {info['cpu_model']}; Cython build: {info['cecore_build']}")
        print(f"in-memory cross_entropy (loss only) on {args.slice_rows} rows: {in_memory:.3f} GB/s")
        print(f"first run (page cache cold, not counted): {cold[0]['gb_per_second']:.3f} GB/s")
        print(f"streamed, every metric (budget {args.budget}): {median_streamed:.3f} GB/s "
              f"(runs: {', '.join(f'{s:.3f}' for s in streamed)}); / in-memory {ratio:.2f}")
        print(f"streamed, loss only: {median_bare:.3f} GB/s "
              f"(runs: {', '.join(f'{s:.3f}' for s in streamed_bare)}); / in-memory {ratio_bare:.2f}")
        paired = [a / b for a, b in zip(streamed, streamed_bare)]  # run i of each side
        print(f"every metric / loss only: {median_streamed / median_bare:.2f} (target >= 0.9); "
              f"median of the {len(paired)} paired runs' ratios {np.median(paired):.2f}")
        split = kernel_split(x_path, t_path, args.budget, args.backend)
        (k_loss, r_loss), (k_scores, r_scores) = split["loss_only"], split["scores"]
        print(f"calls alone over the same chunks (this process, medians): loss-only kernel "
              f"{k_loss:.3f} s, scoring (score_rows) {k_scores:.3f} s ({k_scores / k_loss:.2f}x); with the "
              f"page releases ({r_loss:.3f} / {r_scores:.3f} s) every metric / loss only "
              f"{(k_loss + r_loss) / (k_scores + r_scores):.2f}")
        paired_here = in_process_ratio(x_path, t_path, args.budget, args.backend)
        print(f"every metric / loss only, alternated in this process: {paired_here[0]:.2f} "
              f"(rounds {paired_here[1]:.2f}-{paired_here[2]:.2f})")
        print(f"peak RSS of the scoring process: {peak / 1e6:.0f} MB (file {size / 1e6:.0f} MB)")
        print(f"mean loss {result['mean_loss']:.6f}")
        path = save_json({
            "machine": info, "rows": args.rows, "classes": args.classes,
            "file_bytes": size, "memory_budget": args.budget, "backend": args.backend,
            "cold_cache_gb_per_s": cold[0]["gb_per_second"], "streamed_gb_per_s": streamed,
            "in_memory_gb_per_s": in_memory, "streamed_loss_only_gb_per_s": streamed_bare,
            "ratio": ratio, "ratio_loss_only": ratio_bare,
            "metrics_over_loss_only": median_streamed / median_bare,
            "metrics_over_loss_only_paired": paired, "peak_rss_bytes": peak,
            "chunk_rows": result["chunk_rows"], "kernel_and_release_seconds": split,
            "metrics_over_loss_only_in_process": paired_here,
        }, "bench_batch.json")
        print(f"saved {path}")
    finally:
        for p in (x_path, t_path):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
