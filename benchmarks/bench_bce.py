"""binary_cross_entropy_with_logits, side by side: cecore (Cython, Numba) vs torch.

Run: ``python benchmarks/bench_bce.py [--repeat 5] [--rounds 3]``. Writes
``benchmarks/results/runs/bce.json``.

Every competitor runs in this one process on the same float32/float64 logits and 0/1
targets (reduction='mean'): cecore's loss only, and loss + gradient into a reused buffer
(``grad_out=``); torch's ``F.binary_cross_entropy_with_logits`` forward + backward; and
the yardstick of issue 9, one ``torch.exp(x, out=buf)`` pass over the same array. Rounds
alternate the competitors; each number is the median over rounds of per-round medians,
and ratios are to the exp pass of the same run; cecore's calls are also alternated one by
one with the exp pass ("paired / exp", the median of the pairs' ratios). Before timing,
every competitor's loss and gradient are checked against a float64 NumPy reference
written without cancellation.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (describe, format_table, machine_info, median_time,  # noqa: E402
                     paired_ratios, save_json)

import cecore  # noqa: E402

# (B * T, labels) multi-label shapes; a 1-D input and (N, 1) logits (one logit per
# example, as binary classifiers give), which go to the kernels as one long row.
SIZES = [(65536, 1000), (4096, 1000), (1 << 24,), (1 << 24, 1)]
BACKENDS = ("cython", "numba")
# "paired / exp": the median ratio of calls alternated one by one with the exp pass
# (_common.paired_ratios), steadier on a shared machine than the ratio of two medians.
HEADER = ["dtype", "shape", "competitor", "ms", "/ exp", "paired / exp"]


def reference(x, y):
    """Mean loss and its gradient in float64: (1 - y) x + max(-x, 0) + log1p(exp(-|x|))."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    loss = ((1 - y) * x + np.maximum(-x, 0)) + np.log1p(np.exp(-np.abs(x)))
    grad = ((1 - y) - 1 / (1 + np.exp(x))) / x.size
    return loss.mean(), grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per median")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the competitors (the median of their medians)")
    args = parser.parse_args()
    threads = 2  # torch's and cecore's alike
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows, results = [], []
    for dtype in (np.float32, np.float64):
        for shape in SIZES:
            x = rng.standard_normal(shape).astype(dtype)
            y = (rng.random(shape) < 0.3).astype(dtype)
            buf = np.empty_like(x)
            xt, yt, bt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(buf)
            xg = xt.clone().requires_grad_()

            def torch_fwd_bwd():
                xg.grad = None
                loss = torch.nn.functional.binary_cross_entropy_with_logits(xg, yt)
                loss.backward()
                return loss

            competitors = {"exp": lambda: torch.exp(xt, out=bt), "torch fwd+bwd": torch_fwd_bwd}
            for backend in BACKENDS:
                competitors[f"{backend} loss"] = (
                    lambda b=backend: cecore.binary_cross_entropy_with_logits(
                        x, y, backend=b, n_threads=threads))
                competitors[f"{backend} loss+grad reused"] = (
                    lambda b=backend: cecore.binary_cross_entropy_with_logits(
                        x, y, grad_out=buf, backend=b, n_threads=threads))
            # every timed call checked first, torch's too
            e_loss, e_grad = reference(x, y)
            rtol = 1e-5 if dtype == np.float32 else 1e-10
            for name, fn in competitors.items():
                if name == "exp":
                    continue
                buf.fill(np.nan)
                xg.grad = None
                got = fn()
                loss = got[0] if isinstance(got, tuple) else got
                loss = loss.item() if isinstance(loss, torch.Tensor) else loss
                assert abs(loss - e_loss) <= rtol * abs(e_loss), (name, loss, e_loss)
                grad = (xg.grad.numpy() if name.startswith("torch") else
                        got[1] if isinstance(got, tuple) else None)
                if grad is not None:
                    assert name.startswith("torch") or np.shares_memory(grad, buf), name
                    np.testing.assert_allclose(grad, e_grad, rtol=rtol, atol=rtol / x.size)
            times = {name: [] for name in competitors}
            for _ in range(args.rounds):
                for name, fn in competitors.items():
                    times[name].append(median_time(fn, args.repeat)[0] * 1e3)
            ms = {name: float(np.median(v)) for name, v in times.items()}
            paired = {name: float(np.median(paired_ratios(fn, competitors["exp"],
                                                          args.repeat * args.rounds)))
                      for name, fn in competitors.items() if name.split()[0] in BACKENDS}
            results.append(dict(dtype=np.dtype(dtype).name, shape=list(shape), ms=ms,
                                per_round_ms=times, paired_exp_ratio=paired))
            for name, t in ms.items():
                rows.append([np.dtype(dtype).name, "x".join(map(str, shape)), name, f"{t:.1f}",
                             f"{t / ms['exp']:.2f}x",
                             f"{paired[name]:.2f}x" if name in paired else "-"])
            print(format_table(HEADER, rows[-len(ms):]), flush=True)
    info = machine_info(threads=threads, repeat=args.repeat, rounds=args.rounds)
    print(format_table(HEADER, rows))
    path = save_json({"machine": info, "results": results}, "bce.json")
    print(f"{describe(info)}; saved {path}")


if __name__ == "__main__":
    main()
