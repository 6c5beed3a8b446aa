"""``classification_report_from_logits`` in memory against loss-only ``cross_entropy``.

Run: ``python benchmarks/bench_report.py [--repeat 11]``. Writes
``benchmarks/results/runs/bench_report.json``.

For each backend and shape (float32 logits, class-index targets) it times, alternated in
pairs (:func:`_common.paired_ratios`): the report (every metric; whole blocks of rows
through the kernels' ``softmax_ce_report``); the same report through per-row metrics
(``softmax_ce_scores``, then ``report_sums`` of its outputs: how it ran before
``softmax_ce_report``; the same bits, which it checks); and ``cecore.cross_entropy(x, t)``,
loss only. It prints median milliseconds, the paired ratios and each call's peak NumPy
memory (tracemalloc). Issue 9's target of 0.9x is for ``cecore score``'s stream
(``bench_batch.py``).
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
from cecore._backends import get_backend  # noqa: E402
from cecore._validation import n_threads  # noqa: E402
from cecore.metrics import _report  # noqa: E402

SHAPES = [(2_000_000, 10), (200_000, 100), (2048, 50257)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    info = machine_info()
    print(describe(info))
    rng = np.random.default_rng(0)
    rows, records = [], []
    for n, c in SHAPES:
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        for backend in ("cython", "numba"):
            def report():
                return cecore.metrics.classification_report_from_logits(x, t, backend=backend)

            def per_row():
                sums = _report.ReportSums(False, backend=backend, uniform_weights=True)
                _report._score_per_row(get_backend(backend), x, t, False, np.ones(c), -100,
                                       0.0, n_threads(None, x.size), np.empty(n), sums)
                return sums.report(x.dtype)

            def loss():
                return cecore.cross_entropy(x, t, backend=backend)

            expected = per_row()
            expected["loss"] = expected.pop("mean_loss")
            assert report() == {k: expected[k] for k in report()}  # the same bits
            ms = {name: median_time(fn, args.repeat)[0] * 1e3
                  for name, fn in (("report", report), ("per_row", per_row),
                                   ("loss", loss))}
            vs_loss = statistics.median(paired_ratios(report, loss, args.repeat))
            vs_per_row = statistics.median(paired_ratios(report, per_row, args.repeat))
            peak = {name: traced_peak_bytes(fn) / 1e6
                    for name, fn in (("report", report), ("per_row", per_row),
                                     ("loss", loss))}
            records.append({"shape": [n, c], "backend": backend, "ms": ms,
                            "report_over_loss": vs_loss, "report_over_per_row": vs_per_row,
                            "peak_mb": peak, "logits_mb": x.nbytes / 1e6})
            rows.append([f"{n} x {c}", backend, f"{ms['report']:.1f}",
                         f"{ms['per_row']:.1f}", f"{ms['loss']:.1f}", f"{vs_per_row:.2f}",
                         f"{vs_loss:.2f}", f"{peak['report']:.0f} / {peak['per_row']:.0f}"
                         f" / {peak['loss']:.0f} ({x.nbytes / 1e6:.0f})"])
    print(format_table(["float32 shape", "backend", "report ms", "per-row route ms",
                        "cross_entropy ms", "report / per-row route", "report / loss",
                        "peak MB: report / per-row route / loss (logits)"], rows))
    print("saved", save_json({"machine": info, "results": records}, "bench_report.json"))


if __name__ == "__main__":
    main()
