"""SoftmaxClassifier vs LogisticRegression(lbfgs): fit time to the same objective.

Both models fit the same data with the same ``C``, ``tol`` and ``max_iter`` (their
defaults, 1e-4 and 100, unless given). The objective ``C * sum_i l_i + ||W||^2 / 2`` is
evaluated by one NumPy function for both. Run:
``python benchmarks/bench_classifier.py [--repeat 3] [--skip-large]``; writes
``benchmarks/results/classifier.json``. Target: >= 3x faster than LogisticRegression to
an objective no worse (relative 1e-6).
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, median_time, save_json  # noqa: E402

from cecore import SoftmaxClassifier  # noqa: E402
from cecore.demo import penalized_objective  # noqa: E402


def fit_quietly(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


def compare(name, X, y, repeat, tol, max_iter, blas_threads=None):
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _compare(name, X, y, repeat, tol, max_iter)


def _compare(name, X, y, repeat, tol, max_iter):
    y_index = np.searchsorted(np.unique(y), y)
    out = {"data": name, "shape": list(X.shape), "n_classes": int(y_index.max() + 1)}
    for label, make in [("sklearn", lambda: LogisticRegression(tol=tol, max_iter=max_iter)),
                        ("cecore", lambda: SoftmaxClassifier(tol=tol, max_iter=max_iter))]:
        models = []  # fitted models are small: keep the last one to evaluate
        seconds, times = median_time(lambda: models.append(fit_quietly(make(), X, y)), repeat,
                                     warmup=0)
        model = models[-1]
        out[label] = {"seconds": seconds, "times": times, "n_iter": int(np.max(model.n_iter_)),
                      "objective": penalized_objective(X, y_index, model.coef_, model.intercept_, 1.0),
                      "accuracy": float(model.score(X, y))}
    out["speedup"] = out["sklearn"]["seconds"] / out["cecore"]["seconds"]
    out["relative_objective_gap"] = (out["cecore"]["objective"] - out["sklearn"]["objective"]) \
        / out["sklearn"]["objective"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fits per model on digits")
    parser.add_argument("--large-repeat", type=int, default=1, help="fits per model on the large data")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    # Default threads (cecore's fit uses one BLAS thread on data this small, scikit-learn
    # all of them), then both models restricted to one BLAS thread.
    runs = [compare("digits (standardised)", X, y, args.repeat, args.tol, args.max_iter),
            compare("digits, 1 BLAS thread", X, y, args.repeat, args.tol, args.max_iter, 1)]
    if not args.skip_large:
        X, y = make_classification(200_000, 100, n_informative=40, n_redundant=10, n_classes=20,
                                   n_clusters_per_class=1, random_state=0)
        runs.append(compare("make_classification", X, y, args.large_repeat, args.tol, args.max_iter))
    rows = [[r["data"], "x".join(map(str, r["shape"])), r["n_classes"],
             f"{r['sklearn']['seconds']:.2f}", r["sklearn"]["n_iter"], f"{r['sklearn']['objective']:.8g}",
             f"{r['cecore']['seconds']:.2f}", r["cecore"]["n_iter"], f"{r['cecore']['objective']:.8g}",
             f"{r['speedup']:.1f}x", f"{r['relative_objective_gap']:+.1e}"] for r in runs]
    print(format_table(["data", "shape", "k", "sklearn s", "it", "sklearn objective",
                        "cecore s", "it", "cecore objective", "speedup", "rel. gap"], rows))
    path = save_json({"machine": machine_info(), "tol": args.tol, "max_iter": args.max_iter,
                      "runs": runs}, "classifier.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
