"""Peak memory of a fit: SoftmaxClassifier vs LogisticRegression(lbfgs), side by side.

Run: ``python benchmarks/bench_fit_memory.py``. Writes ``benchmarks/results/runs/fit_memory.json``.

Each fit runs in a fresh process (so that one's peak does not hide the other's) on the
same wide problem, where the model's own arrays dominate: 600 rows, 5000 features, 600
classes (``coef_`` is 23 MB), two L-BFGS iterations. Reported: the peak resident set of
the process minus its resident set just before the fit, in MB, and the ratio to
LogisticRegression's. Both keep L-BFGS's history (10 pairs of parameter-sized vectors).
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env, format_table, machine_info, save_json  # noqa: E402

CHILD = r"""
import json, resource, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
which, threads = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
n, F, K = 600, 5000, 600
X = rng.standard_normal((n, F))
y = np.arange(n) % K
if which == "cecore":
    from cecore import SoftmaxClassifier as M
    model = M(n_threads=threads, max_iter=2)
else:
    from sklearn.linear_model import LogisticRegression as M
    model = M(max_iter=2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.fit(X, y)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - before) / 1024, "coef_mb": model.coef_.nbytes / 2**20}))
"""


def main():
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help
    runs = [("LogisticRegression", "sklearn", 1), ("SoftmaxClassifier, 1 thread", "cecore", 1),
            ("SoftmaxClassifier, 2 threads", "cecore", 2)]
    results = {}
    for name, which, threads in runs:
        out = subprocess.run([sys.executable, "-c", CHILD, which, str(threads)], check=True,
                             capture_output=True, text=True, env=child_env()).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    base = results["LogisticRegression"]["extra_mb"]
    rows = [[name, f"{r['extra_mb']:.0f}", f"{r['extra_mb'] / base:.2f}x", f"{r['coef_mb']:.0f}"]
            for name, r in results.items()]
    info = machine_info()
    print(f"CPU: {info['cpu_model']}; peak RSS added by the fit, 600 x 5000, 600 classes")
    print(format_table(["model", "peak extra MB", "vs LogisticRegression", "coef_ MB"], rows))
    print(f"saved {save_json({'machine': info, 'results': results}, 'fit_memory.json')}")


if __name__ == "__main__":
    main()
