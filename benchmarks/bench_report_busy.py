"""``cecore score``'s block size of per-row metrics on a quiet machine and on a busy one.

Run: ``python benchmarks/bench_report_busy.py [--busy 2] [--rounds 5]``. Writes
``benchmarks/results/runs/bench_report_busy.json``.

Each block of ``REPORT_ROWS`` rows is two kernel calls (the scoring kernel and
``report_sums``), each an OpenMP region when it has more than one thread; with other
processes busy on every core, a region can wait a scheduler time slice for its second
thread. This script writes a (4e6, 10) float32 file of logits, then streams it with
``cecore.batch.score`` (in this process, default budget) with ``REPORT_ROWS`` at 65536
rows, at its default and as one block per chunk (more rows than the file), alternated for
``--rounds`` rounds: first alone, then beside ``--busy`` processes that spin in a Python
loop. It prints the median seconds of each and deletes the file.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe, format_table, machine_info, save_json  # noqa: E402

from cecore import batch  # noqa: E402
from cecore.metrics import _report  # noqa: E402

ROWS, CLASSES = 4_000_000, 10


def timed_rounds(x_path, t_path, variants, rounds):
    """Median seconds of a stream per block size, the variants alternated each round."""
    times = {name: [] for name in variants}
    default = _report.REPORT_ROWS
    try:
        for name, rows in variants.items():  # compiled, loaded, in the page cache
            _report.REPORT_ROWS = rows
            batch.score(x_path, t_path)
        for _ in range(rounds):
            for name, rows in variants.items():
                _report.REPORT_ROWS = rows
                start = time.perf_counter()
                batch.score(x_path, t_path)
                times[name].append(time.perf_counter() - start)
    finally:
        _report.REPORT_ROWS = default
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside it")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    info = machine_info()
    print(describe(info))
    variants = {"65536 rows": 65536, f"{_report.REPORT_ROWS} rows (default)":
                _report.REPORT_ROWS, "one block per chunk": 1 << 62}
    with tempfile.TemporaryDirectory() as tmp:
        x_path, t_path = os.path.join(tmp, "x.npy"), os.path.join(tmp, "t.npy")
        rng = np.random.default_rng(0)
        np.save(x_path, rng.standard_normal((ROWS, CLASSES), dtype=np.float32))
        np.save(t_path, rng.integers(0, CLASSES, ROWS))
        quiet = timed_rounds(x_path, t_path, variants, args.rounds)
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(args.busy)]
        try:
            busy = timed_rounds(x_path, t_path, variants, args.rounds)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    print(format_table([f"{ROWS} x {CLASSES} float32, seconds", "quiet",
                        f"{args.busy} busy processes"],
                       [[name, f"{quiet[name]:.3f}", f"{busy[name]:.3f}"] for name in variants]))
    print("saved", save_json({"machine": info, "busy": args.busy, "quiet_s": quiet,
                              "busy_s": busy}, "bench_report_busy.json"))


if __name__ == "__main__":
    main()
