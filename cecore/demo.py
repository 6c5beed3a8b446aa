"""``cecore demo``: train SoftmaxClassifier on built-in data and compare with scikit-learn.

For each data set (standardised) it fits :class:`cecore.SoftmaxClassifier` and
``sklearn.linear_model.LogisticRegression`` with the same ``C`` and ``tol``, and prints
their accuracy, log loss (by scikit-learn and by cecore), fit time, iterations and the
penalised objective ``C * sum_i l_i + ||W||^2 / 2`` evaluated by one plain NumPy
function for both. When torch is installed it also checks cecore's cross-entropy and
gradient against ``torch.nn.functional.cross_entropy`` on the fitted logits.
"""

import argparse
import time
import warnings

import numpy as np

from ._backends import BACKENDS

DATASETS = ("digits", "breast_cancer")


def configure_parser(parser):
    parser.add_argument("--datasets", nargs="+", choices=("digits", "breast_cancer", "iris", "wine"),
                        default=list(DATASETS),
                        help="built-in scikit-learn data sets to use (default: "
                             f"{' '.join(DATASETS)})")
    parser.add_argument("-C", type=_positive_float, default=1.0,
                        help="inverse regularisation strength (> 0; default: %(default)s)")
    parser.add_argument("--tol", type=_positive_float, default=1e-6,
                        help="L-BFGS tolerance of both models (> 0; default: %(default)s, "
                             "tighter than the estimators' default 1e-4: the demo compares "
                             "optima)")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS))


def penalized_objective(X, y_index, coef, intercept, C):
    """``C * sum_i l_i + ||coef||^2 / 2`` in float64 NumPy, for any linear classifier.

    ``l_i`` is the softmax cross-entropy of ``X @ coef.T + intercept`` (the binary
    logistic loss when ``coef`` has one row); ``y_index`` holds class positions.
    """
    scores = np.asarray(X, dtype=np.float64) @ np.asarray(coef, dtype=np.float64).T + intercept
    if scores.shape[1] == 1:
        z = scores[:, 0]
        losses = np.logaddexp(0.0, z) - (y_index == 1) * z
    else:
        shift = scores.max(axis=1, keepdims=True)
        lse = np.log(np.exp(scores - shift).sum(axis=1)) + shift[:, 0]
        losses = lse - scores[np.arange(len(y_index)), y_index]
    return C * float(losses.sum()) + 0.5 * float(np.sum(np.asarray(coef, dtype=np.float64) ** 2))


def _load(name):
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _timed_fit(model, X, y):
    from threadpoolctl import threadpool_limits

    # Both fits get one BLAS thread: on these small data sets waking BLAS threads costs
    # more than the products (benchmarks/bench_classifier.py, digits: LogisticRegression
    # 0.33 s with default threads, 0.02 s with one).
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, \
            threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always")
        model.fit(X, y)
    return time.perf_counter() - start, [str(w.message).splitlines()[0] for w in caught]


def _torch_check(logits, y_index):
    """Largest differences of cecore's mean cross-entropy and gradient from torch's."""
    try:
        import torch
    except ImportError:
        return None
    from .functional import cross_entropy

    t_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(y_index))
    t_loss.backward()
    loss, grad = cross_entropy(logits, y_index, return_grad=True)
    return abs(float(loss) - t_loss.item()), float(np.abs(grad - t_logits.grad.numpy()).max())


def _report(name, C, tol, backend):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss as sk_log_loss

    from .classifier import SoftmaxClassifier
    from .metrics import log_loss, log_loss_from_logits

    X, y = _load(name)
    models = {
        "cecore SoftmaxClassifier": SoftmaxClassifier(C=C, tol=tol, max_iter=1000, backend=backend),
        "sklearn LogisticRegression": LogisticRegression(C=C, tol=tol, max_iter=1000),
    }
    classes = np.unique(y)
    y_index = np.searchsorted(classes, y)
    print(f"\n== {name}: {X.shape[0]} samples, {X.shape[1]} features, {len(classes)} classes "
          f"(standardised), C={C}, tol={tol:g}")
    header = f"  {'model':<28}{'fit s':>8}{'iters':>7}{'accuracy':>10}{'log loss (sk)':>15}" \
             f"{'log loss (ce)':>15}{'objective':>16}"
    print(header)
    objectives = {}
    for label, model in models.items():
        seconds, messages = _timed_fit(model, X, y)
        proba = model.predict_proba(X)
        objective = penalized_objective(X, y_index, model.coef_, model.intercept_, C)
        objectives[label] = objective
        n_iter = int(np.max(model.n_iter_))
        print(f"  {label:<28}{seconds:>8.3f}{n_iter:>7d}{model.score(X, y):>10.4f}"
              f"{sk_log_loss(y, proba):>15.8f}{log_loss(y, proba):>15.8f}{objective:>16.8f}")
        for message in messages:
            print(f"    warning: {message}")
    ce_model = models["cecore SoftmaxClassifier"]
    sk_model = models["sklearn LogisticRegression"]
    ce_obj, sk_obj = objectives.values()
    print(f"  objective: cecore - sklearn = {ce_obj - sk_obj:+.3g} (relative {(ce_obj - sk_obj) / sk_obj:+.2g}); "
          f"max |coef difference| = {np.abs(ce_model.coef_ - sk_model.coef_).max():.2g}")
    logits = ce_model.decision_function(X)
    print(f"  exact log loss from logits (cecore): {log_loss_from_logits(y, logits):.10f}")
    if logits.ndim == 1:
        logits = np.column_stack([np.zeros_like(logits), logits])
    check = _torch_check(logits, y_index)
    if check is None:
        print("  torch: not installed, skipped the comparison")
    else:
        print(f"  torch cross_entropy on the fitted logits: |loss difference| = {check[0]:.2g}, "
              f"max |gradient difference| = {check[1]:.2g}")
    return check


def _positive_float(text):
    """A finite number > 0 (argparse reports the error in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def run(args):
    print("cecore demo: SoftmaxClassifier vs scikit-learn's LogisticRegression (lbfgs), same objective")
    for name in args.datasets:
        _report(name, args.C, args.tol, args.backend)
    print("\nThe objective is C * sum(loss) + ||coef||^2 / 2, computed by one NumPy function "
          "for both models; lower is better. Both fits ran with one BLAS thread.")
    return 0
