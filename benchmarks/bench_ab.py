"""A/B of the kernels: a git revision against the working tree, side by side in one process.

Run: ``python benchmarks/bench_ab.py --base REV [--rounds 5] [--only PARTS]``. Writes
``benchmarks/results/runs/ab.json``.

The base revision is checked out into a temporary git worktree and its extension built
there; its Cython modules are loaded next to the working tree's (under their own module
objects), and its ``cecore`` package is copied as ``cecore_base`` so that its Numba kernels
compile next to the current ones. Rounds alternate base and new; each number is the median
over rounds of per-round medians, and the ratio is new / base (below 1: faster now).
With ``--paired`` the two sides alternate call by call instead (``rounds * repeat``
pairs) and the ratio is the median of the pairs' ratios: on a shared machine whose speed
drifts within seconds, blocks of calls of one side land in different phases, where
calls that alternate share them.
Both sides' Numba kernels are first compiled in a child process, so that the timed
process loads them from the on-disk cache, as every process after a user's first does
(``--no-warm``: compile them in the timed process). The two need not run the same code: a
process that compiles a kernel runs the helpers' own copies, one that loads it the
kernel's copies, optimised again with it (float64 BCE on AVX-512 code: up to 1.5x apart
before ``_tile_scratch``; kernel_findings.md, thirty-fifth and thirty-sixth sessions).
Calls go through the kernel contract (``softmax_ce_index`` with the gradient into a reused
buffer and loss-only, ``softmax_ce_proba``, ``softmax`` (log), ``logsumexp``,
``softmax_ce_scores``, ``bce_logits`` with the loss only and with the gradient), with the
same arrays for both sides; results that differ between the two are reported, not hidden
(a changed polynomial changes bits).
"""

import argparse
import importlib.machinery
import time
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, median_time, save_json  # noqa: E402

from cecore._config import REDUCE_BLOCK, SMALL_C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CE_SHAPES = [(65536, 1000, 1), (4096, 50257, 1), (1000000, 10, 1), (4, 21, 65536),
             # K-dim with few positions (the _config.KDIM_* paths)
             (524288, 8, 2), (131072, 8, 8), (16384, 128, 4), (8192, 1000, 2), (40, 50257, 4),
             (65536, 10, 1)]  # the last in cache (L2/L3), where compute shows
# softmax_ce_proba, softmax and logsumexp: few classes, few positions (small and large C)
OTHER_SHAPES = [(1048576, 8, 1), (524288, 8, 2), (8192, 1000, 2), (16384, 1000, 1),
                (65536, 8, 1)]
SCORE_SHAPES = [(65536, 1000), (4096, 50257),  # softmax_ce_scores and its loss-only call
                (2048, 1000), (64, 50257),  # these two in cache (L3)
                (1000000, 10)]  # few classes: the tile kernels
BCE_SHAPES = [(65536, 1000), (4096, 1000), (512, 1000),  # the last in cache (L3)
              (1, 1 << 24)]  # a 1-D input of 2^24 values, as the functional API passes it


def _load_extension(path, name):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _base_kernels(rev, workdir):
    """{'cython-<build>': module, 'numba': module} of revision ``rev``."""
    tree = workdir / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree),
                    rev], check=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.copytree(tree / "cecore", workdir / "pkg" / "cecore_base")
    sys.path.insert(0, str(workdir / "pkg"))
    kernels = {"numba": importlib.import_module("cecore_base._numba")}
    for so in sorted((tree / "cecore_ext").glob("_kernels_*.so")):
        build = so.name.split(".")[0].removeprefix("_kernels_")
        kernels[f"cython-{build}"] = _load_extension(so, f"cecore_ext._kernels_{build}")
    return kernels


def _new_kernels(builds):
    import cecore._numba
    kernels = {"numba": cecore._numba}
    for build in builds:
        so = next((ROOT / "cecore_ext").glob(f"_kernels_{build}.*so"))
        kernels[f"cython-{build}"] = _load_extension(so, f"cecore_ext._kernels_{build}")
    return kernels


def _cases(rng, threads, only=""):
    """``(name, call, outputs)`` of each case whose name contains one of the
    comma-separated parts of ``only``; only those cases' arrays are made."""
    parts = only.split(",")

    def skip(prefix, *suffixes):
        return not any(part in f"{prefix} {suffix}" for part in parts for suffix in suffixes)

    for dt in (np.float32, np.float64):
        for n, c, s in CE_SHAPES:
            if skip(f"{dt.__name__} {n}x{c}x{s}", "loss+grad reused", "loss only",
                    "smoothed loss+grad reused"):
                continue
            x = rng.standard_normal((n, c, s)).astype(dt)
            t = rng.integers(0, c, (n, s))
            loss, grad = np.empty((n, s)), np.empty_like(x)
            args = (x, t, np.ones(c), -100, 0.0, np.broadcast_to(1.0 / n, (n, s)), loss, grad)
            yield (f"{dt.__name__} {n}x{c}x{s} loss+grad reused",
                   lambda k, a=args: k.softmax_ce_index(*a, threads), (loss, grad))
            if c <= SMALL_C:  # the few-classes path reads less without a gradient
                yield (f"{dt.__name__} {n}x{c}x{s} loss only",
                       lambda k, a=args[:-1] + (None,): k.softmax_ce_index(*a, threads),
                       (loss,))
                # ... and takes other steps with label smoothing
                smoothed = args[:4] + (0.1,) + args[5:]
                yield (f"{dt.__name__} {n}x{c}x{s} smoothed loss+grad reused",
                       lambda k, a=smoothed: k.softmax_ce_index(*a, threads), (loss, grad))
        for n, c, s in OTHER_SHAPES:
            if skip(f"{dt.__name__} {n}x{c}x{s}", "proba loss+grad reused", "log_softmax",
                    "logsumexp"):
                continue
            x = rng.standard_normal((n, c, s)).astype(dt)
            q = rng.random((n, c, s)).astype(dt)
            q /= q.sum(axis=1, keepdims=True)
            loss, grad, out = np.empty((n, s)), np.empty_like(x), np.empty_like(x)
            args = (x, q, np.ones(c), 0.0, np.broadcast_to(1.0 / n, (n, s)), loss, grad)
            yield (f"{dt.__name__} {n}x{c}x{s} proba loss+grad reused",
                   lambda k, a=args: k.softmax_ce_proba(*a, threads), (loss, grad))
            yield (f"{dt.__name__} {n}x{c}x{s} log_softmax",
                   lambda k, a=(x, True, out): k.softmax(*a, threads), (out,))
            lse = np.empty((n, s))
            yield (f"{dt.__name__} {n}x{c}x{s} logsumexp",
                   lambda k, a=(x, lse): k.logsumexp(*a, threads), (lse,))
        for n, c in SCORE_SHAPES:
            if skip(f"{dt.__name__} {n}x{c}", "loss only", "scores", "report"):
                continue
            x = rng.standard_normal((n, c)).astype(dt)
            t = rng.integers(0, c, n)
            loss, stats, rank = np.empty(n), np.empty((n, 4)), np.empty((n, 2), np.int64)
            zero = np.broadcast_to(0.0, (n, 1))
            yield (f"{dt.__name__} {n}x{c} loss only",
                   lambda k, a=(x[:, :, None], t[:, None], np.ones(c), -100, 0.0, zero,
                                loss[:, None], None): k.softmax_ce_index(*a, threads), (loss,))
            yield (f"{dt.__name__} {n}x{c} scores",
                   lambda k, a=(x, t, np.ones(c), -100, 0.0, loss, stats, rank):
                   k.softmax_ce_scores(*a, threads), (loss, stats, rank))
            # what `cecore score` calls for every metric: top-5, 15 bins (a base from c578542 on)
            n_blocks = -(-n // REDUCE_BLOCK)
            sums, counts = np.empty((n_blocks, 18)), np.empty((n_blocks, 19), np.int64)
            yield (f"{dt.__name__} {n}x{c} report",
                   lambda k, a=(x, t, np.ones(c), -100, 0.0, 5, np.arange(16) / 15, loss,
                                sums, counts):
                   k.softmax_ce_report(*a, threads), (loss, sums, counts))
        for n, c in BCE_SHAPES:
            if skip(f"{dt.__name__} {n}x{c}", "bce loss", "bce block sums",
                    "bce loss+grad reused", "bce sums+grad reused",
                    "bce pos_weight sums+grad reused"):
                continue
            x = rng.standard_normal((n, c)).astype(dt)
            y = (rng.random((n, c)) < 0.5).astype(dt)
            one = np.broadcast_to(1.0, (n, c))
            loss = np.empty((n, c))
            args = (x, y, one, one, np.broadcast_to(0.0, (n, c)), loss, None)
            yield (f"{dt.__name__} {n}x{c} bce loss",
                   lambda k, a=args: k.bce_logits(*a, threads), (loss,))
            sums = np.empty(-(-x.size // REDUCE_BLOCK))  # needs a base from 2989c4f on
            args = (x, y, one, one, np.broadcast_to(0.0, (n, c)), sums, None)
            yield (f"{dt.__name__} {n}x{c} bce block sums",
                   lambda k, a=args: k.bce_logits(*a, threads), (sums,))
            grad = np.empty_like(x)
            args = (x, y, one, one, np.broadcast_to(1.0 / x.size, (n, c)), loss, grad)
            yield (f"{dt.__name__} {n}x{c} bce loss+grad reused",
                   lambda k, a=args: k.bce_logits(*a, threads), (loss, grad))
            # 'mean' or 'sum' with the gradient, as binary_cross_entropy_with_logits calls it
            args = (x, y, one, one, np.broadcast_to(1.0 / x.size, (n, c)), sums, grad)
            yield (f"{dt.__name__} {n}x{c} bce sums+grad reused",
                   lambda k, a=args: k.bce_logits(*a, threads), (sums, grad))
            # a per-label pos_weight (strides (0, 8)): the runs that fill float64 arguments
            pw = np.broadcast_to(np.linspace(0.5, 2.0, c), (n, c))
            args = (x, y, one, pw, np.broadcast_to(1.0 / x.size, (n, c)), sums, grad)
            yield (f"{dt.__name__} {n}x{c} bce pos_weight sums+grad reused",
                   lambda k, a=args: k.bce_logits(*a, threads), (sums, grad))


def _warm(args):
    """Child of main(): call each chosen case once with both sides' Numba kernels, which
    compiles them into the on-disk cache."""
    sys.path.insert(0, args.warm_only)
    sides = [importlib.import_module("cecore_base._numba"), _new_kernels([])["numba"]]
    for name, call, _ in _cases(np.random.default_rng(0), args.threads, args.only):
        if any(part in name for part in args.only.split(",")):
            for kernels in sides:
                call(kernels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated: run the cases whose name contains one of these")
    parser.add_argument("--threads", type=int, default=2, help="n_threads of every call (default 2)")
    parser.add_argument("--backends", default="", help="comma-separated, e.g. numba,cython-avx2")
    parser.add_argument("--paired", action="store_true",
                        help="alternate base and new call by call; median of the pairs' ratios")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="compile the Numba kernels in the timed process")
    parser.add_argument("--warm-only", metavar="PKG_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_only:
        _warm(args)
        return
    with tempfile.TemporaryDirectory(prefix="cecore-ab-") as tmp:
        workdir = Path(tmp)
        try:
            base = _base_kernels(args.base, workdir)
            new = _new_kernels([k.split("-", 1)[1] for k in base if k.startswith("cython-")])
            rows, results = [], []
            chosen = [b for b in base if not args.backends or b in args.backends.split(",")]
            if args.warm and "numba" in chosen:
                subprocess.run([sys.executable, __file__, "--base", args.base, "--only",
                                args.only, "--threads", str(args.threads),
                                "--warm-only", str(workdir / "pkg")], check=True)
            for name, call, outputs in _cases(np.random.default_rng(0), args.threads, args.only):
                if not any(part in name for part in args.only.split(",")):
                    continue
                for backend in chosen:
                    times = {"base": [], "new": []}
                    out = {}
                    for side, kernels in (("base", base), ("new", new)):
                        call(kernels[backend])  # compile, fault the pages in
                        out[side] = [o.copy() for o in outputs]
                    for _ in range(args.rounds * (args.repeat if args.paired else 1)):
                        for side, kernels in (("base", base), ("new", new)):
                            k = kernels[backend]
                            if args.paired:
                                start = time.perf_counter()
                                call(k)
                                times[side].append((time.perf_counter() - start) * 1e3)
                            else:
                                times[side].append(median_time(lambda: call(k), args.repeat)[0] * 1e3)
                    ms = {side: float(np.median(v)) for side, v in times.items()}
                    same = all(np.array_equal(a, b, equal_nan=True)
                               for a, b in zip(out["base"], out["new"]))
                    ratio = (float(np.median(np.divide(times["new"], times["base"])))
                             if args.paired else ms["new"] / ms["base"])
                    rows.append([name, backend, f"{ms['base']:.2f}", f"{ms['new']:.2f}",
                                 f"{ratio:.2f}", "yes" if same else "no"])
                    results.append({"case": name, "backend": backend, "ms": ms,
                                    "per_round_ms": times, "new_over_base": ratio,
                                    "bitwise_equal": same})
                    print(format_table(["case", "backend", "base ms", "new ms", "new/base",
                                        "same bits"], rows[-1:]), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(workdir / "tree")], check=False)
    print(format_table(["case", "backend", "base ms", "new ms", "new/base", "same bits"], rows))
    info = machine_info(base=args.base, threads=args.threads, paired=args.paired)
    print(f"CPU: {info['cpu_model']}; saved {save_json({'machine': info, 'results': results}, 'ab.json')}")


if __name__ == "__main__":
    main()
