"""SoftmaxClassifier.fit outside the main thread: BLAS held to one thread or not.

threadpoolctl lets only the first thread that sets an OpenBLAS limit set it again, so
``cecore._config.limit_blas`` also sets the limit of an OpenBLAS that threadpoolctl left
alone (``_force_openblas``). Three variants fit the same data in one process, alternated
round by round: on the main thread (which controls OpenBLAS), on a worker thread, and on
a worker thread with ``_force_openblas`` switched off (threadpoolctl alone, as before the
fix; joblib's threading backend and web servers run fits this way). Prints the median
fit times and their ratios to the main-thread fit. Run:
``python benchmarks/bench_fit_threads.py [--rounds 7] [--max-iter 200]``.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info  # noqa: E402

from cecore import SoftmaxClassifier, _config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-iter", type=int, default=200)
    args = parser.parse_args()
    X, y = load_digits(return_X_y=True)

    def fit():
        start = time.perf_counter()
        SoftmaxClassifier(max_iter=args.max_iter).fit(X, y)
        return time.perf_counter() - start

    def in_thread():
        took = []
        worker = threading.Thread(target=lambda: took.append(fit()))
        worker.start()
        worker.join()
        return took[0]

    def without_fix():
        force, _config._force_openblas = _config._force_openblas, lambda *a: []
        try:
            return in_thread()
        finally:
            _config._force_openblas = force

    variants = {"main thread": fit, "worker thread": in_thread,
                "worker thread, threadpoolctl alone": without_fix}
    fit()  # the main thread takes control of OpenBLAS (and everything is imported)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            time.sleep(0.5)  # OpenBLAS threads left at 2 spin ~0.1 s before they sleep
            times[name].append(run())
    base = statistics.median(times["main thread"])
    rows = [[name, f"{statistics.median(t) * 1e3:.1f}", f"{statistics.median(t) / base:.2f}x"]
            for name, t in times.items()]
    print(format_table(["fit of digits", "median ms", "/ main thread"], rows))
    info = machine_info()
    print(f"CPU: {info['cpu_model']}, {info['usable_cpus']} usable; {args.rounds} rounds, "
          f"max_iter={args.max_iter}")


if __name__ == "__main__":
    main()
