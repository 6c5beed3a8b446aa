"""Kernels on confident logits: time with logits of sigma * N(0, 1), sigma = 12 and 30,
over the time with sigma = 3, side by side in one process, torch alongside.

Run: ``python benchmarks/bench_confident.py [--repeat 15]``. Writes
``benchmarks/results/runs/confident.json``.

The wider the logits, the more of a row's exps are tiny, and a product of tiny float32
numbers can be a subnormal number (below 2**-126), which on the CPUs we measured costs
a microcode assist of about a hundred cycles per operation. Nothing else in these kernels
depends on the values, so a ratio above 1 here is that cost. The calls, per backend
(the Cython builds and Numba, 2 threads) and float32 shape (262144 x 10, 8192 x 1000,
32 x 50257): ``softmax_ce_scores`` (what ``cecore score`` runs), loss + gradient with
``reduction='mean'`` into a reused buffer (``softmax_ce_index``, grad_scale 1/N), and
``bce_logits`` loss + gradient, 'mean'. torch: ``F.cross_entropy`` and
``F.binary_cross_entropy_with_logits`` forward + backward on the same arrays. Each cell
is the median of ``repeat`` paired ratios (sigma's call, then sigma = 3's).
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (describe, format_table, kernel_backends, machine_info,  # noqa: E402
                     paired_ratios, save_json)

SHAPES = [(262144, 10), (8192, 1000), (32, 50257)]
SIGMAS = (12.0, 30.0)
THREADS = 2


def _arrays(n, c, sigma):
    rng = np.random.default_rng(0)
    x = (sigma * rng.standard_normal((n, c))).astype(np.float32)
    t = rng.integers(0, c, n)
    y = (rng.random((n, c)) < 0.5).astype(np.float32)
    return x, t, y


def _calls(k, n, c, x, t, y):
    """{name: call} of backend k on one set of arrays."""
    w = np.ones(c)
    loss, stats, rank = np.empty(n), np.empty((n, 4)), np.empty((n, 2), np.int64)
    grad = np.empty((n, c, 1), np.float32)
    gs = np.broadcast_to(1.0 / n, (n, 1))
    one = np.broadcast_to(1.0, (n, c))
    sums = np.empty(-(-x.size // 8192))
    bce_grad = np.empty_like(x)
    return {
        "scores": lambda: k.softmax_ce_scores(x, t, w, -100, 0.0, loss, stats, rank,
                                              THREADS),
        "loss+grad mean": lambda: k.softmax_ce_index(x[:, :, None], t[:, None], w, -100,
                                                     0.0, gs, loss[:, None], grad, THREADS),
        "bce loss+grad mean": lambda: k.bce_logits(
            x, y, one, one, np.broadcast_to(1.0 / x.size, (n, c)), sums, bce_grad, THREADS),
    }


def _torch_calls(torch, x, t, y):
    xt = torch.from_numpy(x).requires_grad_()
    tt, yt = torch.from_numpy(t), torch.from_numpy(y)
    f = torch.nn.functional

    def ce():
        f.cross_entropy(xt, tt).backward()
        xt.grad = None

    def bce():
        f.binary_cross_entropy_with_logits(xt, yt).backward()
        xt.grad = None

    return {"loss+grad mean": ce, "bce loss+grad mean": bce}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="pairs per cell")
    args = parser.parse_args()
    try:
        import torch
        torch.set_num_threads(THREADS)
    except ImportError:
        torch = None
    info = machine_info(threads=THREADS)
    rows, results = [], []
    for n, c in SHAPES:
        base = _arrays(n, c, 3.0)
        wide = {sigma: _arrays(n, c, sigma) for sigma in SIGMAS}
        sides = {name: (lambda a, k=k: _calls(k, n, c, *a)) for name, k in
                 kernel_backends().items()}
        if torch is not None and n * c <= 2**22:
            sides["torch"] = lambda a: _torch_calls(torch, *a)
        for side, make in sides.items():
            ref = make(base)
            for call in ref:
                cells = []
                for sigma in SIGMAS:
                    fn = make(wide[sigma])[call]
                    ratio = statistics.median(paired_ratios(fn, ref[call], args.repeat))
                    cells.append(ratio)
                    results.append({"shape": [n, c], "call": call, "side": side,
                                    "sigma": sigma, "time_over_sigma_3": ratio})
                rows.append((f"float32 {n}x{c}", call, side, *(f"{r:.2f}" for r in cells)))
    print(format_table(("shape", "call", "side", *(f"sigma {s:g} / 3" for s in SIGMAS)),
                       rows))
    print(f"{describe(info)}; {THREADS} threads; median of {args.repeat} paired ratios")
    print(f"saved {save_json({'machine': info, 'results': results}, 'confident.json')}")


if __name__ == "__main__":
    main()
