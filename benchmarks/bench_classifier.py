"""SoftmaxClassifier vs LogisticRegression(lbfgs): fit time to the same objective.

Both models fit the same data with the same ``C``, ``tol`` and ``max_iter`` (their
defaults, 1e-4 and 100, unless given) and the same threads (the machine's; scikit-learn's
through BLAS, cecore's through its row blocks). The fits alternate, sklearn then cecore,
and each model's median is reported with its iterations and the objective
``C * sum_i l_i + ||W||^2 / 2`` it reached, evaluated by one NumPy function for both. Run:
``python benchmarks/bench_classifier.py [--repeat 3] [--large-repeat 3] [--skip-large]``;
writes ``benchmarks/results/runs/classifier.json``. Targets (issue 10): at least 3x faster than
LogisticRegression on ``make_classification(100_000, 100, n_informative=50,
n_classes=20)`` and 2x on the same with 2 classes, to an objective no worse.
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, save_json  # noqa: E402

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
    makers = {"sklearn": lambda: LogisticRegression(tol=tol, max_iter=max_iter),
              "cecore": lambda: SoftmaxClassifier(tol=tol, max_iter=max_iter)}
    times = {label: [] for label in makers}
    models = {}
    fit_quietly(makers["cecore"](), X[:100], y[:100])  # imports and kernels loaded once
    for _ in range(repeat):  # alternating, so both see the same machine
        for label, make in makers.items():
            time.sleep(0.3)  # the other model's BLAS threads go idle first
            start = time.perf_counter()
            models[label] = fit_quietly(make(), X, y)
            times[label].append(time.perf_counter() - start)
    for label, model in models.items():
        out[label] = {"seconds": statistics.median(times[label]), "times": times[label],
                      "n_iter": int(np.max(model.n_iter_)),
                      "objective": penalized_objective(X, y_index, model.coef_, model.intercept_, 1.0),
                      "accuracy": float(model.score(X, y))}
    out["speedup"] = out["sklearn"]["seconds"] / out["cecore"]["seconds"]
    out["relative_objective_gap"] = (out["cecore"]["objective"] - out["sklearn"]["objective"]) \
        / out["sklearn"]["objective"]
    return out


def evaluations(X, y, rounds=7):
    """Seconds per evaluation of the objective and its gradient, side by side, at one point.

    * ``cecore``: the fit's evaluation, one pass over row blocks of ``X`` on the machine's
      threads (BLAS on one thread inside each, as during a fit);
    * ``whole-X products``: the same through ``X @ W`` and ``X.T @ G`` over all of ``X``
      (BLAS on its default threads) around cecore's kernel, i.e. ``X`` read twice;
    * ``sklearn``: ``LinearModelLoss.loss_gradient``, what ``LogisticRegression(lbfgs)``
      evaluates (a private scikit-learn API; left out if it has moved).
    Rounds interleave the competitors; medians are reported.
    """
    from cecore import _config, cross_entropy
    from cecore.classifier._objective import LinearObjective
    n_classes = int(y.max()) + 1
    rng = np.random.default_rng(0)
    coef = rng.normal(scale=0.01, size=(n_classes, X.shape[1] + 1))
    params = np.concatenate([coef[:, :-1].T.ravel(), coef[:, -1]])
    sw = np.ones(len(y))
    objective = LinearObjective(X, y, sw, 1.0, n_classes, fit_intercept=True, backend="auto",
                                n_threads=_config.default_n_threads())

    def fused():
        with _config.limit_blas(1):
            objective.loss_gradient(params)

    def whole():
        W, b = objective.unpack(params)
        logits = (W.T @ X.T).T + b
        _, g = cross_entropy(logits, y, reduction="none", return_grad=True,
                             grad_output=sw / sw.sum())
        return X.T @ g, g.sum(axis=0)

    competitors = {"cecore": fused, "whole-X products": whole}
    try:
        from sklearn._loss.loss import HalfMultinomialLoss
        from sklearn.linear_model._linear_loss import LinearModelLoss
        loss = LinearModelLoss(HalfMultinomialLoss(n_classes=n_classes), fit_intercept=True)
        y_float = y.astype(np.float64)
        competitors["sklearn"] = lambda: loss.loss_gradient(
            coef, X, y_float, sw / sw.sum(), l2_reg_strength=1.0 / len(y))
    except ImportError as exc:
        print(f"note: sklearn's LinearModelLoss not importable ({exc}); left out")
    times = {name: [] for name in competitors}
    for _ in range(rounds):
        for name, fn in competitors.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fits per model on digits")
    parser.add_argument("--large-repeat", type=int, default=3, help="fits per model on the large data")
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
    per_evaluation = None
    if not args.skip_large:
        X, y = make_classification(100_000, 100, n_informative=50, n_classes=20, random_state=0)
        per_evaluation = evaluations(X, y)
        for n_classes in (20, 2):
            X, y = make_classification(100_000, 100, n_informative=50, n_classes=n_classes,
                                       random_state=0)
            runs.append(compare(f"make_classification, {n_classes} classes", X, y,
                                args.large_repeat, args.tol, args.max_iter))
    rows = [[r["data"], "x".join(map(str, r["shape"])), r["n_classes"],
             f"{r['sklearn']['seconds']:.2f}", r["sklearn"]["n_iter"], f"{r['sklearn']['objective']:.8g}",
             f"{r['cecore']['seconds']:.2f}", r["cecore"]["n_iter"], f"{r['cecore']['objective']:.8g}",
             f"{r['speedup']:.1f}x", f"{r['relative_objective_gap']:+.1e}"] for r in runs]
    machine = machine_info()
    print(f"CPU: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs")
    print(format_table(["data", "shape", "k", "sklearn s", "it", "sklearn objective",
                        "cecore s", "it", "cecore objective", "speedup", "rel. gap"], rows))
    if per_evaluation:
        base = per_evaluation["cecore"]
        print("\none evaluation of objective + gradient, 100000x100, 20 classes (median ms, "
              "time / cecore's):")
        for name, seconds in per_evaluation.items():
            print(f"  {name:18s} {seconds * 1e3:8.1f} ms  {seconds / base:5.2f}x")
    path = save_json({"machine": machine, "tol": args.tol, "max_iter": args.max_iter,
                      "runs": runs, "seconds_per_evaluation": per_evaluation}, "classifier.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
