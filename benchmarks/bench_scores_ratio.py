"""The scoring kernel against the loss-only kernel, in cache: what ``cecore score``'s
every-metric stream can reach at most.

Run: ``python benchmarks/bench_scores_ratio.py [--repeat 30]`` (add
``python benchmarks/avx2_code.py`` in front for Numba's AVX2 code). Writes
``benchmarks/results/runs/scores_ratio.json``.

For each backend the CPU can run (the Cython builds ``_kernels_avx512``, ``_kernels_avx2``
and ``_kernels_base`` and Numba) it alternates ``softmax_ce_index`` without a gradient and
``softmax_ce_scores`` on the same logits, one thread, back to back (each sample repeats
the call for at least 2 ms; pauses between calls of 0.1 ms made the first call after
each pause the slower one), and prints loss-only time / scoring time as the median of
the pairs' ratios. Two shapes stay in cache (256 x 1000 in L2, 32 x 50257 in L3), one
(8192 x 1000) is read from memory. In a stream the shared costs (memory, page faults)
dilute the difference further (``bench_batch.py`` measures that).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (describe, format_table, kernel_backends, machine_info,  # noqa: E402
                     save_json, softmax_ce_reference)


SHAPES = [(256, 1000), (32, 50257), (8192, 1000)]


def _paired(fn, ref, repeat):
    """Ratios fn / ref of ``repeat`` back-to-back pairs, each side called ``reps`` times
    per sample, with ``reps`` set so that a sample takes at least 2 ms."""
    fn(), ref()
    start = time.perf_counter()
    ref()
    reps = max(1, int(2e-3 / (time.perf_counter() - start)))
    ratios = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        mid = time.perf_counter()
        for _ in range(reps):
            ref()
        ratios.append((mid - start) / (time.perf_counter() - mid))
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="pairs per cell")
    args = parser.parse_args()
    info = machine_info()
    rows, results = [], []
    for backend, k in kernel_backends().items():
        for n, c in SHAPES:
            for dt in (np.float32, np.float64):
                rng = np.random.default_rng(0)
                x = rng.standard_normal((n, c)).astype(dt)
                t = rng.integers(0, c, n)
                w = np.ones(c)
                loss, stats = np.empty(n), np.empty((n, 4))
                rank = np.empty((n, 2), np.int64)
                zero = np.broadcast_to(0.0, (n, 1))

                def loss_only():
                    k.softmax_ce_index(x[:, :, None], t[:, None], w, -100, 0.0, zero,
                                       loss[:, None], None, 1)

                def scores():
                    k.softmax_ce_scores(x, t, w, -100, 0.0, loss, stats, rank, 1)

                # both calls checked against a float64 NumPy reference before timing
                ref_loss, p = softmax_ce_reference(x, t)
                rtol = 1e-5 if dt == np.float32 else 1e-12
                for fn in (loss_only, scores):
                    loss.fill(np.nan)
                    fn()
                    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
                np.testing.assert_allclose(stats[:, 1], p.max(axis=1), rtol=rtol)
                np.testing.assert_array_equal(rank[:, 0], (x > x[np.arange(n), t][:, None]).sum(1))
                ratio = statistics.median(_paired(loss_only, scores, args.repeat))
                case = f"{np.dtype(dt).name} {n}x{c}"
                rows.append((case, backend, f"{ratio:.2f}"))
                results.append({"case": case, "backend": backend,
                                "loss_only_over_scores": ratio})
    print(format_table(("case", "backend", "loss-only / scores"), rows))
    print(f"{describe(info)}; one thread; median of {args.repeat} paired ratios")
    path = save_json({"machine": info, "results": results}, "scores_ratio.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
