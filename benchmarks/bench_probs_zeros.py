"""``cecore score --input-kind probs`` against probability targets: what 0 log 0 = 0 costs.

Run: ``python benchmarks/bench_probs_zeros.py [--repeat 9]``. Writes
``benchmarks/results/runs/probs_zeros.json``.

``batch.score`` of 4000 x 8000 float32 probabilities (one-hot probability targets, in
memory, 2 threads) with ``batch._zero_log_zero`` as it is, against the same call with it
replaced by a no-op, the calls alternating (median of the pairs' ratios):

* probabilities without zeros: what its check costs where nothing needs changing;
* half of every row 0 (as float32 softmax outputs of large vocabularies hold): what the
  masks cost where they are needed (the no-op gives NaN losses there, so it is a cost,
  not a competitor).
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, paired_ratios, save_json  # noqa: E402

from cecore import batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, c = 4000, 8000
    plain = rng.random((n, c), dtype=np.float32) + 0.01
    plain /= plain.sum(axis=1, keepdims=True)
    zeros = plain.copy()
    zeros[:, ::2] = 0
    zeros /= zeros.sum(axis=1, keepdims=True)
    q = np.zeros((n, c), np.float32)
    q[np.arange(n), 1 + 2 * rng.integers(0, c // 2, n)] = 1  # on classes above 0
    real = batch._zero_log_zero

    def score(probs, masks):
        def call():
            batch._zero_log_zero = real if masks else (lambda log_p, *a, **k: log_p)
            try:
                batch.score(probs, q, input_kind="probs", n_threads=2)
            finally:
                batch._zero_log_zero = real
        return call

    rows, results = [], {}
    for name, probs in (("no zeros", plain), ("half zeros", zeros)):
        ratios = paired_ratios(score(probs, True), score(probs, False), args.repeat)
        results[name] = {"ratios": ratios, "median": statistics.median(ratios)}
        rows.append([f"{n}x{c} float32, {name}", f"{statistics.median(ratios):.3f}",
                     f"{min(ratios):.3f}-{max(ratios):.3f}"])
    info = machine_info()
    print(f"CPU: {info['cpu_model']}; {args.repeat} pairs; with / without the masks")
    print(format_table(["case", "median", "range"], rows))
    save_json({"machine": info, "shape": [n, c], "results": results}, "probs_zeros.json")


if __name__ == "__main__":
    main()
