"""cecore.metrics.log_loss vs sklearn.metrics.log_loss: time (median) and peak extra memory.

Run: ``python benchmarks/bench_log_loss.py [--repeat 3]``. Prints a table and writes
``benchmarks/results/runs/log_loss.json``. Target: >= 50x faster than scikit-learn at
1e6 x 100 with O(n_samples) extra memory.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import log_loss as sk_log_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MB, format_table, machine_info, median_time, save_json, traced_peak_bytes  # noqa: E402

from cecore.metrics import log_loss  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, results = [], []
    for n, c in [(1_000_000, 10), (1_000_000, 100)]:
        proba = rng.random((n, c))
        proba /= proba.sum(axis=1, keepdims=True)
        y = rng.integers(0, c, size=n)
        ours = log_loss(y, proba)
        theirs = sk_log_loss(y, proba)
        t_ce, _ = median_time(lambda: log_loss(y, proba), args.repeat)
        t_sk, _ = median_time(lambda: sk_log_loss(y, proba), args.repeat)
        m_ce = traced_peak_bytes(lambda: log_loss(y, proba))
        m_sk = traced_peak_bytes(lambda: sk_log_loss(y, proba))
        results.append(dict(n_samples=n, n_classes=c, cecore_s=t_ce, sklearn_s=t_sk,
                            speedup=t_sk / t_ce, cecore_peak_bytes=m_ce, sklearn_peak_bytes=m_sk,
                            input_bytes=proba.nbytes, rel_diff=abs(ours - theirs) / theirs))
        rows.append([f"{n}x{c}", f"{t_sk:.3f}", f"{t_ce:.3f}", f"{t_sk / t_ce:.1f}x",
                     f"{m_sk / MB:.0f}", f"{m_ce / MB:.1f}", f"{proba.nbytes / MB:.0f}",
                     f"{abs(ours - theirs) / theirs:.1e}"])
    print(format_table(["shape", "sklearn s", "cecore s", "speedup", "sklearn peak MB",
                        "cecore peak MB", "input MB", "rel diff"], rows))
    info = machine_info()
    path = save_json({"machine": info, "results": results}, "log_loss.json")
    print(f"CPU: {info['cpu_model']}; saved {path}")


if __name__ == "__main__":
    main()
