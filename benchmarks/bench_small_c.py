"""The few-classes path against one exp pass, every build side by side, in and out of cache.

Run: ``python benchmarks/bench_small_c.py [--repeat 41]`` (add
``python benchmarks/avx2_code.py`` in front for what a Zen 3 runs: torch's AVX2 exp,
Numba's AVX2 code). Writes ``benchmarks/results/runs/small_c.json``.

Issue 9's small-C target is loss + gradient into a reused buffer at 1e6 x 10 within 1.25x
one ``torch.exp(x, out=buf)`` pass. ``bench_kernels.py`` measures it for the loaded
build at 2 threads; here every backend the CPU can run (``_kernels_avx512``,
``_kernels_avx2``, ``_kernels_base``, Numba) is called in the same loop as the exp pass,
call after call, at 1 and 2 threads, and also at 65536 x 10 (2.6 MB float32, in L2/L3),
where the kernels' arithmetic shows without memory time. Each cell is the median over
``repeat`` iterations of (kernel time / exp-pass time) of the same iteration.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (describe, format_table, kernel_backends, machine_info,  # noqa: E402
                     save_json, softmax_ce_reference)


SHAPES = [(1000000, 10), (65536, 10)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=41, help="iterations per cell")
    args = parser.parse_args()
    info = machine_info()
    backends = kernel_backends()
    rows, results = [], []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, c in SHAPES:
            for dt in (np.float32, np.float64):
                rng = np.random.default_rng(0)
                x = rng.standard_normal((n, c, 1)).astype(dt)
                t = rng.integers(0, c, (n, 1))
                w = np.ones(c)
                gs = np.broadcast_to(1.0 / n, (n, 1))
                loss, grad = np.empty((n, 1)), np.empty_like(x)
                xt, buf = torch.from_numpy(x), torch.from_numpy(np.empty_like(x))
                calls = {"exp": lambda: torch.exp(xt, out=buf)}
                for name, k in backends.items():
                    calls[f"{name} loss only"] = (
                        lambda k=k: k.softmax_ce_index(x, t, w, -100, 0.0, gs, loss, None,
                                                       threads))
                    calls[f"{name} loss+grad reused"] = (
                        lambda k=k: k.softmax_ce_index(x, t, w, -100, 0.0, gs, loss, grad,
                                                       threads))
                # every kernel checked against a float64 NumPy reference before it is
                # timed (compiling it, and faulting the pages in)
                ref_loss, ref_grad = softmax_ce_reference(x[:, :, 0], t[:, 0])
                ref_grad[np.arange(n), t[:, 0]] -= 1
                rtol = 1e-5 if dt == np.float32 else 1e-12
                for key, fn in calls.items():
                    fn(), fn()
                    if key != "exp":
                        np.testing.assert_allclose(loss[:, 0], ref_loss, rtol=rtol, atol=rtol,
                                                   err_msg=key)
                    if key.endswith("grad reused"):
                        np.testing.assert_allclose(grad[:, :, 0] * n, ref_grad, rtol=rtol,
                                                   atol=rtol, err_msg=key)
                times = {key: [] for key in calls}
                reps = args.repeat if n * c >= 1e6 else 5 * args.repeat
                for _ in range(reps):
                    for key, fn in calls.items():
                        start = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - start)
                exp_t = np.array(times.pop("exp"))
                case = f"{np.dtype(dt).name} {n}x{c} {threads} thread{'s' * (threads > 1)}"
                for key, ts in times.items():
                    ratio = statistics.median(np.array(ts) / exp_t)
                    rows.append((case, key, f"{1e3 * np.median(ts):.2f}",
                                 f"{1e3 * np.median(exp_t):.2f}", f"{ratio:.2f}"))
                    results.append({"case": case, "kernel": key, "ratio_to_exp": ratio,
                                     "ms": float(np.median(ts)),
                                     "exp_ms": float(np.median(exp_t))})
    print(format_table(("case", "kernel", "ms", "exp ms", "kernel / exp"), rows))
    print(f"{describe(info)}; medians of per-iteration ratios, {args.repeat} "
          f"iterations out of cache, {5 * args.repeat} in cache")
    print(f"saved {save_json({'machine': info, 'results': results}, 'small_c.json')}")


if __name__ == "__main__":
    main()
