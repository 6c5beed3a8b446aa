"""``classification_report_from_logits`` in memory against loss-only ``cross_entropy``.

Run: ``python benchmarks/bench_report.py [--repeat 11]``. Writes
``benchmarks/results/runs/bench_report.json``.

For each backend and shape (float32 logits, class-index targets) it times, alternated in
pairs (:func:`_common.paired_ratios`): the report (every metric, one pass of the scoring
kernel, the per-row metrics ``REPORT_ROWS`` rows at a time); the same report with all rows
in one block (``REPORT_ROWS`` set above the row count: how it ran before the blocks); and
``cecore.cross_entropy(x, t)``, loss only. It prints median milliseconds, the paired
ratios and each call's peak NumPy memory (tracemalloc). Issue 9's target of 0.9x is for
``cecore score``'s stream (``bench_batch.py``); with few classes the per-row bookkeeping
in NumPy, not the kernel, sets the report's time.
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (describe, format_table, machine_info, median_time,  # noqa: E402
                     paired_ratios, save_json, traced_peak_bytes)

import cecore  # noqa: E402
from cecore.metrics import _report  # noqa: E402

SHAPES = [(2_000_000, 10), (200_000, 100), (2048, 50257)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    info = machine_info()
    print(describe(info))
    blocked = _report.REPORT_ROWS
    rng = np.random.default_rng(0)
    rows, records = [], []
    for n, c in SHAPES:
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        for backend in ("cython", "numba"):
            def report(block=blocked):
                _report.REPORT_ROWS = block
                try:
                    return cecore.metrics.classification_report_from_logits(
                        x, t, backend=backend)
                finally:
                    _report.REPORT_ROWS = blocked

            def one_block():
                return report(n + 1)

            def loss():
                return cecore.cross_entropy(x, t, backend=backend)

            assert report() == one_block()  # the blocks change no bit
            ms = {name: median_time(fn, args.repeat)[0] * 1e3
                  for name, fn in (("report", report), ("one_block", one_block),
                                   ("loss", loss))}
            vs_loss = statistics.median(paired_ratios(report, loss, args.repeat))
            vs_block = statistics.median(paired_ratios(report, one_block, args.repeat))
            peak = {name: traced_peak_bytes(fn) / 1e6
                    for name, fn in (("report", report), ("one_block", one_block),
                                     ("loss", loss))}
            records.append({"shape": [n, c], "backend": backend, "ms": ms,
                            "report_over_loss": vs_loss, "report_over_one_block": vs_block,
                            "peak_mb": peak, "logits_mb": x.nbytes / 1e6})
            rows.append([f"{n} x {c}", backend, f"{ms['report']:.1f}",
                         f"{ms['one_block']:.1f}", f"{ms['loss']:.1f}", f"{vs_block:.2f}",
                         f"{vs_loss:.2f}", f"{peak['report']:.0f} / {peak['one_block']:.0f}"
                         f" / {peak['loss']:.0f} ({x.nbytes / 1e6:.0f})"])
    print(format_table(["float32 shape", "backend", "report ms", "one block ms",
                        "cross_entropy ms", "report / one block", "report / loss",
                        "peak MB: report / one block / loss (logits)"], rows))
    print("saved", save_json({"machine": info, "results": records}, "bench_report.json"))


if __name__ == "__main__":
    main()
