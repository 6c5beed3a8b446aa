"""SoftmaxClassifier: scikit-learn's estimator checks, and LogisticRegression as the oracle.

Objectives are evaluated by ``naive_objective`` below (float64 NumPy, written for the
test), gradients against finite differences, probabilities against scipy.special.
"""

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit, log_softmax, logsumexp, softmax
from sklearn import datasets
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from cecore import SoftmaxClassifier
from cecore.classifier._objective import LinearObjective


def naive_objective(X, y, coef, intercept, C, sample_weight=None):
    """``C * sum_i s_i l_i + ||coef||^2 / 2`` of a linear classifier, in float64."""
    classes = np.unique(y)
    t = np.searchsorted(classes, y)
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
    Z = np.asarray(X, dtype=np.float64) @ coef.T + intercept
    if coef.shape[0] == 1:
        z = Z[:, 0]
        loss = np.logaddexp(0.0, z) - (t == 1) * z
    else:
        loss = logsumexp(Z, axis=1) - Z[np.arange(len(t)), t]
    return C * np.dot(s, loss) + 0.5 * np.sum(coef ** 2)


def load(name):
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def tight_pair(C=1.0, **params):
    lr = LogisticRegression(C=C, tol=1e-10, max_iter=10000, **params)
    ce = SoftmaxClassifier(C=C, tol=1e-10, max_iter=10000, **params)
    return lr, ce


@pytest.fixture(autouse=True)
def one_blas_thread():
    # The data are small; BLAS threads only add noise on a shared 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# -- scikit-learn's estimator checks --------------------------------------------------------

ESTIMATORS = [SoftmaxClassifier(),
              SoftmaxClassifier(C=0.5, class_weight="balanced", backend="numba")]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    name = getattr(check, "func", check).__name__
    if name == "check_array_api_input" and not os.environ.get("SCIPY_ARRAY_API"):
        # scipy reads SCIPY_ARRAY_API once at import, so this check would only skip here:
        # run it in a fresh interpreter that has the variable set.
        code = (
            "from sklearn.utils.estimator_checks import check_estimator\n"
            "from cecore import SoftmaxClassifier\n"
            f"est = {estimator!r}\n"
            "res = [r for r in check_estimator(est, on_fail=None)"
            " if r['check_name'] == 'check_array_api_input']\n"
            "assert res and all(r['status'] == 'passed' for r in res), res\n"
        )
        env = dict(os.environ, SCIPY_ARRAY_API="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    check(estimator)


# -- agreement with LogisticRegression ------------------------------------------------------

@pytest.mark.parametrize("name", ["iris", "wine", "digits", "breast_cancer"])
def test_matches_logistic_regression(name):
    X, y = load(name)
    lr, ce = tight_pair()
    lr.fit(X, y)
    ce.fit(X, y)
    assert ce.coef_.shape == lr.coef_.shape
    obj_lr = naive_objective(X, y, lr.coef_, lr.intercept_, 1.0)
    obj_ce = naive_objective(X, y, ce.coef_, ce.intercept_, 1.0)
    assert obj_ce <= obj_lr * (1 + 1e-9)
    np.testing.assert_allclose(obj_ce, obj_lr, rtol=1e-9)
    np.testing.assert_allclose(ce.coef_, lr.coef_, atol=1e-4 * np.abs(lr.coef_).max())
    np.testing.assert_allclose(ce.intercept_, lr.intercept_, atol=1e-4 * max(1, np.abs(lr.intercept_).max()))
    np.testing.assert_allclose(ce.predict_proba(X), lr.predict_proba(X), atol=1e-5)
    np.testing.assert_array_equal(ce.predict(X), lr.predict(X))
    # the recorded curve ends at the objective, in fit's scaling
    np.testing.assert_allclose(ce.loss_curve_[-1] * 1.0 * len(y), obj_ce, rtol=1e-9)


@pytest.mark.parametrize("name", ["iris", "breast_cancer"])
@pytest.mark.parametrize("params", [
    dict(C=0.01), dict(C=30.0), dict(fit_intercept=False), dict(class_weight="balanced"),
    dict(class_weight="dict"),
])
def test_matches_logistic_regression_options(name, params):
    X, y = load(name)
    if params.get("class_weight") == "dict":
        params = dict(class_weight={c: 1.0 + i for i, c in enumerate(np.unique(y))})
    rng = np.random.default_rng(0)
    sw = rng.uniform(0.2, 3.0, size=len(y))
    lr, ce = tight_pair(**params)
    lr.fit(X, y, sample_weight=sw)
    ce.fit(X, y, sample_weight=sw)
    C = params.get("C", 1.0)
    s = sw.copy()
    if "class_weight" in params:
        cw = params["class_weight"]
        if cw == "balanced":  # n / (k * weighted class count), as scikit-learn computes it
            counts = np.array([sw[y == c].sum() for c in np.unique(y)])
            cw = dict(zip(np.unique(y), sw.sum() / (len(counts) * counts)))
        s *= np.array([cw[v] for v in y])
    obj_lr = naive_objective(X, y, lr.coef_, lr.intercept_, C, s)
    obj_ce = naive_objective(X, y, ce.coef_, ce.intercept_, C, s)
    np.testing.assert_allclose(obj_ce, obj_lr, rtol=1e-9)
    np.testing.assert_allclose(ce.predict_proba(X), lr.predict_proba(X), atol=1e-5)


def test_balanced_with_a_class_of_zero_weight():
    # compute_class_weight gives such a class an infinite weight, and 0 * inf used to make
    # the objective NaN (L-BFGS "ABNORMAL" after 0 iterations).
    X, y = load("iris")
    sw = np.random.default_rng(3).uniform(0.5, 2.0, size=len(y))
    sw[y == 2] = 0
    _, ce = tight_pair(class_weight="balanced")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.fit(X, y, sample_weight=sw)
    # the oracle: 'balanced' over the 2 classes that weigh something, n / (2 * count)
    cw = {c: sw.sum() / (2 * sw[y == c].sum()) for c in (0, 1)}
    cw[2] = 1.0  # any finite weight: the samples of class 2 weigh zero
    lr, _ = tight_pair(class_weight=cw)
    lr.fit(X, y, sample_weight=sw)
    s = sw * np.array([cw[v] for v in y])
    np.testing.assert_allclose(naive_objective(X, y, ce.coef_, ce.intercept_, 1.0, s),
                               naive_objective(X, y, lr.coef_, lr.intercept_, 1.0, s), rtol=1e-9)
    np.testing.assert_allclose(ce.predict_proba(X), lr.predict_proba(X), atol=1e-5)

    # scikit-learn's check_classifiers_one_label_sample_weights: only class 1 weighs
    rnd = np.random.RandomState(0)
    Xb, yb = rnd.uniform(size=(10, 10)), np.arange(10) % 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binary = SoftmaxClassifier(class_weight="balanced").fit(Xb, yb, sample_weight=yb)
    np.testing.assert_array_equal(binary.predict(rnd.uniform(size=(10, 10))), np.ones(10))


def test_sample_weight_equals_repetition():
    X, y = load("iris")
    rng = np.random.default_rng(1)
    reps = rng.integers(0, 3, size=len(y))
    _, a = tight_pair()
    _, b = tight_pair()
    a.fit(X, y, sample_weight=reps)
    b.fit(np.repeat(X, reps, axis=0), np.repeat(y, reps))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-8)


def test_sparse_and_float32():
    X, y = load("digits")
    dense = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(X, y)
    sparse = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(sp.csr_matrix(X), y)
    np.testing.assert_allclose(naive_objective(X, y, sparse.coef_, sparse.intercept_, 1.0),
                               naive_objective(X, y, dense.coef_, dense.intercept_, 1.0), rtol=1e-10)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, atol=1e-4)
    np.testing.assert_allclose(sparse.predict_proba(sp.csr_matrix(X)), dense.predict_proba(X), atol=1e-5)
    X32 = X.astype(np.float32)
    single = SoftmaxClassifier(tol=1e-5, max_iter=1000).fit(X32, y)
    assert single.decision_function(X32).dtype == np.float32
    obj64 = naive_objective(X, y, dense.coef_, dense.intercept_, 1.0)
    obj32 = naive_objective(X, y, single.coef_, single.intercept_, 1.0)
    assert abs(obj32 - obj64) <= 1e-3 * obj64


def test_torch_tensors_under_array_api_dispatch(monkeypatch):
    # With scikit-learn's array API dispatch on, fit and predict_proba failed inside
    # validate_data on NumPy's dtypes (LogisticRegression works there). cecore computes
    # on NumPy: a CPU tensor gives what its NumPy array gives, as NumPy arrays.
    import sklearn
    torch = pytest.importorskip("torch")

    monkeypatch.setenv("SCIPY_ARRAY_API", "1")  # scikit-learn asks for it
    X, y = load("iris")
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    expected = SoftmaxClassifier().fit(X, y, sample_weight=w)
    stream = SoftmaxClassifier().partial_fit(X, y, classes=np.unique(y))
    with sklearn.config_context(array_api_dispatch=True):
        Xt, yt = torch.tensor(X), torch.tensor(y)
        got = SoftmaxClassifier().fit(Xt, yt, sample_weight=torch.tensor(w))
        np.testing.assert_array_equal(got.coef_, expected.coef_)
        for method in ("decision_function", "predict", "predict_proba", "predict_log_proba"):
            np.testing.assert_array_equal(getattr(got, method)(Xt),
                                          getattr(expected, method)(X))
        assert got.score(Xt, yt) == expected.score(X, y)
        streamed = SoftmaxClassifier().partial_fit(Xt, yt, classes=torch.tensor(np.unique(y)))
        np.testing.assert_array_equal(streamed.coef_, stream.coef_)
        assert cross_val_score(SoftmaxClassifier(), Xt, yt, cv=3).shape == (3,)


@pytest.mark.parametrize("fit_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint16,
                                   np.int64, bool])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # LogisticRegression's log
def test_prediction_dtypes_follow_logistic_regression(fit_dtype, dtype):
    # Predictions follow NumPy's promotion of X with the coefficients, as LogisticRegression's:
    # float16 or int8 data on a float32 model gave float64 (X was cast to float64 first).
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)).astype(fit_dtype), np.arange(40) % 3
    X_new = (rng.normal(size=(7, 3)) * 3).astype(dtype)
    ours = SoftmaxClassifier().fit(X, y)
    theirs = LogisticRegression().fit(X, y)
    for method in ("decision_function", "predict_proba", "predict_log_proba"):
        expected = getattr(theirs, method)(X_new)
        got = getattr(ours, method)(X_new)
        assert got.dtype == expected.dtype, (method, got.dtype, expected.dtype)
        assert np.all(np.isfinite(got))


@pytest.mark.parametrize("n_outputs", [1, 4])
def test_objective_gradient_finite_differences(n_outputs):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    y = rng.integers(0, 2 if n_outputs == 1 else n_outputs, size=40)
    sw = rng.uniform(0.5, 2, size=40)
    obj = LinearObjective(X, y, sw, 0.7, n_outputs, fit_intercept=True, backend="auto", n_threads=1)
    params = rng.normal(size=obj.n_params)
    value, grad = obj.loss_gradient(params)
    h = 1e-6
    numeric = np.array([(obj.loss_gradient(params + h * e)[0] - obj.loss_gradient(params - h * e)[0]) / (2 * h)
                        for e in np.eye(obj.n_params)])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    # and the value is the naive objective scaled by 1 / (C * sum(s))
    W, b = obj.unpack(params)
    expected = naive_objective(X, y, W.T, b, 0.7, sw) / (0.7 * sw.sum())
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def naive_gradient(X, y, sw, C, W, b):
    """Gradient of ``LinearObjective``'s value with respect to ``(W, b)``, float64 NumPy."""
    X = np.asarray(X, np.float64)
    Z = X @ W + (0 if b is None else b)
    if W.shape[1] == 1:
        G = 1 / (1 + np.exp(-Z)) - (y == 1)[:, None]
    else:
        G = softmax(Z, axis=1)
        G[np.arange(len(y)), y] -= 1
    G *= (sw / sw.sum())[:, None]
    return X.T @ G + W / (C * sw.sum()), G.sum(axis=0)


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_outputs", [1, 5])
def test_fused_pass_over_many_blocks(monkeypatch, backend, dtype, fit_intercept, n_outputs):
    # Row blocks of a few rows, so the pass runs many blocks in FIT_LANES lanes: value and
    # gradient match a float64 reference, and do not depend on the number of threads.
    from cecore import _config
    monkeypatch.setattr(_config, "FIT_BLOCK_BYTES", 512)
    monkeypatch.setattr(_config, "FIT_MIN_BLOCK_ROWS", 1)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1001, 7)).astype(dtype)
    y = rng.integers(0, 2 if n_outputs == 1 else n_outputs, size=1001)
    sw = rng.uniform(0.5, 2, size=1001)
    results = []
    for n_threads in (1, 2):
        obj = LinearObjective(X, y, sw, 0.7, n_outputs, fit_intercept=fit_intercept,
                              backend=backend, n_threads=n_threads)
        assert len(obj._lanes) == _config.FIT_LANES
        params = np.random.default_rng(6).normal(size=obj.n_params)
        results.append(obj.loss_gradient(params))
    (v1, g1), (v2, g2) = results
    assert v1 == v2
    np.testing.assert_array_equal(g1, g2)
    W, b = obj.unpack(params)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    expected = naive_objective(X, y, W.T, 0 if b is None else b, 0.7, sw) / (0.7 * sw.sum())
    np.testing.assert_allclose(v1, expected, rtol=rtol)
    grad_W, grad_b = naive_gradient(X, y, sw, 0.7, W, b)
    gW, gb = obj.unpack(g1)
    np.testing.assert_allclose(gW, grad_W, rtol=rtol, atol=rtol * np.abs(grad_W).max())
    if fit_intercept:
        np.testing.assert_allclose(gb, grad_b, rtol=rtol, atol=rtol * np.abs(grad_b).max())


def test_concurrent_fits_share_the_worker_pool(monkeypatch):
    # Fits on several Python threads at once (GridSearchCV with a threading backend), each
    # on 2 worker threads over many row blocks: every result equals the sequential fit's.
    from concurrent.futures import ThreadPoolExecutor
    from cecore import _config
    monkeypatch.setattr(_config, "FIT_BLOCK_BYTES", 4096)
    X, y = load("digits")
    fits = [dict(C=C, n_threads=n) for C in (0.1, 1.0) for n in (1, 2)]
    expected = [SoftmaxClassifier(**p).fit(X, y).coef_ for p in fits]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: SoftmaxClassifier(**p).fit(X, y).coef_, fits * 2))
    for coef, want in zip(got, expected * 2):
        np.testing.assert_array_equal(coef, want)
    # and n_threads does not change the result
    np.testing.assert_array_equal(expected[0], expected[1])


def test_probabilities_are_stable():
    X, y = load("iris")
    clf = SoftmaxClassifier(C=1e4, tol=1e-8, max_iter=2000).fit(X, y)
    X_far = X * 1e3  # logits in the thousands: naive exp would overflow
    logits = clf.decision_function(X_far)
    assert np.isfinite(clf.predict_log_proba(X_far)).all()
    np.testing.assert_allclose(clf.predict_log_proba(X_far), log_softmax(logits, axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(X_far), softmax(logits, axis=1), atol=1e-15)

    Xb, yb = load("breast_cancer")
    binary = SoftmaxClassifier().fit(Xb, yb)
    z = binary.decision_function(Xb * 100)
    assert z.shape == (len(yb),)
    proba = binary.predict_proba(Xb * 100)
    np.testing.assert_allclose(proba[:, 1], expit(z), rtol=1e-12)
    np.testing.assert_allclose(proba[:, 0], expit(-z), rtol=1e-12)  # not 1 - p: exact tails
    np.testing.assert_allclose(binary.predict_log_proba(Xb * 100)[:, 0], -np.logaddexp(0, z),
                               rtol=1e-12, atol=1e-15)


def test_convergence_warning_and_warm_start():
    X, y = load("digits")
    with pytest.warns(ConvergenceWarning, match="failed to converge"):
        SoftmaxClassifier(max_iter=3).fit(X, y)
    clf = SoftmaxClassifier(tol=1e-6, max_iter=1000, warm_start=True).fit(X, y)
    first = clf.n_iter_
    clf.set_params(C=1.1).fit(X, y)
    assert clf.n_iter_ < first


def test_bad_parameters_and_labels():
    X, y = load("iris")
    with pytest.raises(ValueError, match="'C' parameter"):
        SoftmaxClassifier(C=-1).fit(X, y)
    with pytest.raises(ValueError, match="class_weight"):
        SoftmaxClassifier(class_weight="weird").fit(X, y)
    with pytest.raises(ValueError, match="only one class"):
        SoftmaxClassifier().fit(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="Unknown label type"):
        SoftmaxClassifier().fit(X, y + 0.5)
    with pytest.raises(ValueError, match="weighs zero after class_weight"):
        SoftmaxClassifier(class_weight={0: 0, 1: 0, 2: 0}).fit(X, y)
    for n_threads in (0, True, 2.5):  # (True passed the constraint: a bare TypeError)
        with pytest.raises(ValueError, match="'n_threads' parameter"):
            SoftmaxClassifier(n_threads=n_threads).fit(X, y)
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        SoftmaxClassifier(batch_size=0).partial_fit(X, y, classes=[0, 1, 2])


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_binary_probabilities_of_an_overflowing_decision(dtype):
    # (review) a decision of +inf gave [nan, nan]: the softmax of [0, inf] is inf - inf
    X = np.array([[-1.0], [1.0], [-2.0], [2.0]], dtype)
    y = [0, 1, 0, 1]
    big = np.finfo(dtype).max
    Xt = np.array([[big], [-big]], dtype)
    ours = SoftmaxClassifier(C=10).fit(X, y)
    theirs = LogisticRegression(C=10).fit(X, y)
    assert np.array_equal(ours.decision_function(Xt), [np.inf, -np.inf])
    # [[0, 1], [1, 0]]
    np.testing.assert_array_equal(ours.predict_proba(Xt), theirs.predict_proba(Xt))
    log_proba = ours.predict_log_proba(Xt)
    assert np.array_equal(ours.predict(Xt), theirs.predict(Xt))
    assert log_proba[0, 1] == 0 and log_proba[1, 0] == 0 and log_proba[0, 0] < -1e30


def test_threads_resolved_once_and_passed_down(monkeypatch):
    import cecore.classifier._estimator as estimator_module

    seen = []

    class Recording(LinearObjective):
        def __init__(self, *args, n_threads, **kwargs):
            seen.append(n_threads)
            super().__init__(*args, n_threads=n_threads, **kwargs)

    monkeypatch.setattr(estimator_module, "LinearObjective", Recording)
    X, y = load("iris")
    model = SoftmaxClassifier().fit(X, y)
    # small work with n_threads=None: one thread, and the estimator's parameter is untouched
    assert seen == [1] and model.n_threads is None
    seen.clear()
    SoftmaxClassifier(n_threads=-1).fit(X, y)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert seen == [cpus]


def test_pipeline_gridsearch_clone_pickle_pandas():
    pd = pytest.importorskip("pandas")
    X, y = datasets.load_wine(return_X_y=True)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    pipe = make_pipeline(StandardScaler(), SoftmaxClassifier())
    search = GridSearchCV(pipe, {"softmaxclassifier__C": [0.1, 1.0]}, cv=3).fit(frame, y)
    assert search.best_score_ > 0.9
    model = SoftmaxClassifier().fit(frame, y)
    assert list(model.feature_names_in_) == list(frame.columns)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_proba(frame), model.predict_proba(frame))
    fresh = clone(model)
    assert not hasattr(fresh, "coef_") and fresh.get_params() == model.get_params()
    assert cross_val_score(SoftmaxClassifier(), StandardScaler().fit_transform(X), y, cv=3).mean() > 0.9


def test_objective_memory_is_a_few_copies_of_the_coefficients():
    # Each of the FIT_LANES lanes kept a scratch copy of coef_ for good and returned its own
    # float64 gradient, all alive until the last lane was done: 2 * FIT_LANES + 1 copies
    # (a helper measured 897 MB of peak RSS for 600 classes x 5000 features, against
    # LogisticRegression's 566). On one thread a lane's copies now live only while it runs.
    import tracemalloc

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((640, 2000)), np.arange(640) % 200
    coef_bytes = 2001 * 200 * 8
    tracemalloc.start()
    try:
        objective = LinearObjective(X, y, np.ones(640), 1.0, 200, fit_intercept=True,
                                    backend="auto", n_threads=1)
        assert len(objective._lanes) == 8
        objective.loss_gradient(np.zeros(objective.n_params))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # about 6 now (the transposed weights, one lane's gradient and scratch, the running
    # sum, the gradient returned and its penalty term); 18 before
    assert peak < 8 * coef_bytes, peak / coef_bytes


def test_sparse_objective_holds_one_array_of_logits():
    # (review) the sparse pass held the logits and a second array of their size for the
    # gradient; the gradient now overwrites them
    import tracemalloc

    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    X = sp.random(20000, 200, density=0.05, format="csr", random_state=0)
    for n_classes in (2, 50):
        y = np.arange(20000) % n_classes
        objective = LinearObjective(X, y, np.ones(20000), 1.0, n_classes,
                                    fit_intercept=True, backend="auto", n_threads=1)
        w = rng.standard_normal(objective.n_params) * 0.01
        expected = objective.loss_gradient(w)
        logits_bytes = 20000 * n_classes * 8
        tracemalloc.start()
        try:
            value, grad = objective.loss_gradient(w)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert value == expected[0] and np.array_equal(grad, expected[1])
        if n_classes > 2:  # (binary: one logit per row, and O(rows) arrays besides)
            assert peak < 1.6 * logits_bytes, peak / logits_bytes
        # against the dense pass, which computes by blocks of rows
        dense = LinearObjective(X.toarray(), y, np.ones(20000), 1.0, n_classes,
                                fit_intercept=True, backend="auto", n_threads=1)
        d_value, d_grad = dense.loss_gradient(w)
        np.testing.assert_allclose(value, d_value, rtol=1e-12)
        np.testing.assert_allclose(grad, d_grad, rtol=1e-9, atol=1e-12)


# -- partial_fit ----------------------------------------------------------------------------

def test_partial_fit_converges_towards_fit_on_a_stream():
    X, y = datasets.make_classification(40000, 20, n_informative=10, n_classes=5, random_state=0)
    best = SoftmaxClassifier(tol=1e-8, max_iter=1000).fit(X, y)
    optimum = naive_objective(X, y, best.coef_, best.intercept_, 1.0)
    stream = SoftmaxClassifier()
    gaps = []
    for i, chunk in enumerate(np.array_split(np.arange(len(y)), 40)):
        stream.partial_fit(X[chunk], y[chunk], classes=np.unique(y))
        if i in (0, 9, 39):
            gaps.append(naive_objective(X, y, stream.coef_, stream.intercept_, 1.0) / optimum - 1)
    assert gaps[0] > gaps[1] > gaps[2] >= 0
    assert gaps[2] < 0.01
    assert abs(stream.score(X, y) - best.score(X, y)) < 0.01
    assert stream.coef_.shape == best.coef_.shape and stream.n_iter_ == 160


def test_partial_fit_binary_and_balanced():
    X, y = load("breast_cancer")
    best = SoftmaxClassifier(class_weight="balanced").fit(X, y)
    stream = SoftmaxClassifier(class_weight="balanced")
    for chunk in np.array_split(np.random.default_rng(0).permutation(len(y)), 5):
        stream.partial_fit(X[chunk], y[chunk], classes=[0, 1])
    assert stream.coef_.shape == (1, X.shape[1])
    assert stream.score(X, y) > best.score(X, y) - 0.03


def test_partial_fit_balanced_with_a_class_of_zero_weight():
    # rows of weight 0 count as absent: the same step as without them (a batch holding
    # such a row used to get a NaN total weight and be skipped)
    X, y = load("iris")
    sw = np.where(y == 2, 0.0, 1.0)
    keep = y != 2
    weighted = SoftmaxClassifier(class_weight="balanced", batch_size=1000)
    weighted.partial_fit(X, y, classes=[0, 1, 2], sample_weight=sw)
    removed = SoftmaxClassifier(class_weight="balanced", batch_size=1000)
    removed.partial_fit(X[keep], y[keep], classes=[0, 1, 2])
    assert weighted.n_iter_ == removed.n_iter_ == 1
    np.testing.assert_allclose(weighted.coef_, removed.coef_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weighted.intercept_, removed.intercept_, rtol=1e-10, atol=1e-12)


def test_partial_fit_rows_of_zero_weight_count_nowhere():
    # Rows of weight 0 were counted in the rows seen, which scales every batch's data
    # term, while whole batches of them took no step and so no share of the penalty: the
    # stream with them converged to fit with C doubled (hostile review). Now the same
    # steps as without them; the other oracle is fit on the rows of nonzero weight.
    X, y = load("iris")
    Z = X[::-1] + 1.0
    plain = SoftmaxClassifier(C=0.01, batch_size=50, learning_rate=0.5, n_threads=1)
    padded = SoftmaxClassifier(C=0.01, batch_size=50, learning_rate=0.5, n_threads=1)
    for _ in range(3):
        plain.partial_fit(X, y, classes=[0, 1, 2])
        padded.partial_fit(np.vstack([X, Z]), np.r_[y, y[::-1]], classes=[0, 1, 2],
                           sample_weight=np.r_[np.ones(len(y)), np.zeros(len(y))])
    np.testing.assert_array_equal(padded.coef_, plain.coef_)
    np.testing.assert_array_equal(padded.intercept_, plain.intercept_)


def test_partial_fit_weighs_batches_by_their_weight_and_rows():
    # Each batch was divided by its own weight sum, so all batches pulled alike: weights
    # that differ between batches cancelled out (a: 0.50 where the weighted optimum is
    # 0.83), and the one-row remainder of a chunk counted as a full batch (b: 0.48 where
    # the optimum is 0.004). The oracle is LogisticRegression on the same (weighted) rows.
    rng = np.random.default_rng(0)
    X = 0.01 * rng.standard_normal((200, 1))  # no signal: P(y=1) is the weighted rate
    y = np.r_[np.arange(100) < 90, np.arange(100) < 10].astype(int)
    sw = np.r_[np.full(100, 10.0), np.ones(100)]
    stream = SoftmaxClassifier(C=1e6, batch_size=100, learning_rate=0.5, n_threads=1)
    for _ in range(300):
        stream.partial_fit(X, y, classes=[0, 1], sample_weight=sw)
    oracle = LogisticRegression(C=1e6).fit(X, y, sample_weight=sw)
    expected = oracle.predict_proba(X[:1])[0, 1]
    assert expected > 0.8
    assert abs(stream.predict_proba(X[:1])[0, 1] - expected) < 0.01

    X = 0.01 * rng.standard_normal((257, 1))
    y = np.r_[np.zeros(256, int), 1]
    stream = SoftmaxClassifier(learning_rate=1.0, n_threads=1)  # batches of 256 and 1
    for _ in range(300):
        stream.partial_fit(X, y, classes=[0, 1])
    # 300 passes: fit's C times 300 (see partial_fit's docstring)
    expected = LogisticRegression(C=300).fit(X, y).predict_proba(X[:1])[0, 1]
    assert expected < 0.01
    assert abs(stream.predict_proba(X[:1])[0, 1] - expected) < 0.002


def test_partial_fit_refuses_a_changed_fit_intercept():
    X, y = load("iris")
    clf = SoftmaxClassifier().partial_fit(X, y, classes=[0, 1, 2])
    clf.set_params(fit_intercept=False)
    with pytest.raises(ValueError, match="fit_intercept changed"):
        clf.partial_fit(X, y)


def test_a_failed_partial_fit_changes_nothing():
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    X, y = load("iris")
    clf = SoftmaxClassifier()
    # (refused by scikit-learn >= 1.8 itself, by cecore with 1.7)
    with pytest.raises(ValueError, match="non-zero"):
        clf.partial_fit(X, y, classes=[0, 1, 2], sample_weight=np.zeros(len(y)))
    with pytest.raises(NotFittedError):  # it predicted class 0 with zero coefficients
        check_is_fitted(clf)
    clf.partial_fit(X, y + 1, classes=[1, 2, 3])  # a retry may choose other classes
    before = _state(clf)
    with pytest.raises(ValueError, match="non-zero"):
        clf.partial_fit(X, y + 1, sample_weight=np.zeros(len(y)))
    assert _state(clf) == before


def test_a_failed_fit_changes_nothing():
    # fit set classes_ before it failed: the old coef_ then went with the new classes_
    # (predict gave stale labels or raised IndexError). Found by a hostile review.
    X, y = load("iris")
    clf = SoftmaxClassifier().fit(X, y)

    before = _state(clf)
    for params, y_new, error in (({"n_threads": True}, y % 2, TypeError),
                                 ({"class_weight": {0: 0, 1: 0}}, y % 2, ValueError)):
        with pytest.raises(error):
            clf.set_params(**params).fit(X, y_new)
        clf.set_params(n_threads=None, class_weight=None)
        assert {k: v for k, v in _state(clf).items() if k not in ("n_threads", "class_weight")} == \
            {k: v for k, v in before.items() if k not in ("n_threads", "class_weight")}
        np.testing.assert_array_equal(clf.predict(X), SoftmaxClassifier().fit(X, y).predict(X))


def test_zero_iterations_and_zero_tol_like_logistic_regression():
    # LogisticRegression takes max_iter=0 and tol=0 (a grid may hold them); cecore refused
    X, y = load("iris")
    for params in ({"max_iter": 0}, {"tol": 0.0, "max_iter": 30}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ours = SoftmaxClassifier(**params).fit(X, y)
            theirs = LogisticRegression(**params).fit(X, y)
        assert ours.n_iter_ == theirs.n_iter_[0]
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-6)
    # the warning counts the iterations as n_iter_ does (it said 1 for max_iter=0)
    with pytest.warns(ConvergenceWarning, match="after 0 iteration"):
        SoftmaxClassifier(max_iter=0).fit(X, y)


def test_vanishing_C_gives_finite_coefficients():
    # C * sum(weights) underflowed, the penalty 1 / (C * sum) was inf and inf * 0 made the
    # coefficients NaN in partial_fit (hostile review); fit gives LogisticRegression's zeros
    X, y = load("iris")
    clf = SoftmaxClassifier(C=1e-320).partial_fit(X, y, classes=[0, 1, 2])
    assert np.isfinite(clf.coef_).all() and np.isfinite(clf.predict_proba(X)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_array_equal(SoftmaxClassifier(C=1e-320).fit(X, y).coef_, 0.0)


def _state(clf):
    """Everything an estimator holds, comparable (in a fixed order of names)."""
    return {name: pickle.dumps(value) for name, value in sorted(vars(clf).items())}


def test_partial_fit_extreme_C_and_learning_rate():
    # Adagrad summed the squared gradients, which overflow from about 1e154: with a tiny C
    # (whose penalty gradient is huge) every step after the first was 0 and the
    # coefficients stayed at +-learning_rate (0.1; fit and LogisticRegression give 0),
    # with a huge learning rate they became NaN; NumPy's RuntimeWarning was the only sign
    # (hostile review).
    X, y = load("iris")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = SoftmaxClassifier(C=1e-160)
        for _ in range(3):
            clf.partial_fit(X, y, classes=[0, 1, 2])
        assert np.abs(clf.coef_).max() < 1e-9  # 1e-11 of the first step's 0.1
        assert np.abs(LogisticRegression(C=1e-160).fit(X, y).coef_).max() < 1e-9
        clf = SoftmaxClassifier(learning_rate=1e200)
        for _ in range(3):
            clf.partial_fit(X, y, classes=[0, 1, 2])
        assert np.isfinite(clf.coef_).all() and np.isfinite(clf.predict_proba(X)).all()
    # Steps that do overflow the coefficients are an error, and change nothing.
    clf = SoftmaxClassifier(learning_rate=1e308).partial_fit(X, y, classes=[0, 1, 2])
    before = _state(clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's, on the way to the error
        with pytest.raises(ValueError, match="overflowed"):
            clf.partial_fit(X, y)
    assert _state(clf) == before


def test_negative_total_sample_weight_is_an_error():
    # The penalty is scaled by 1 / (C * total weight): a negative total turned it into a
    # reward, and fit returned zero coefficients without a word (hostile review).
    X, y = load("iris")
    sw = np.where(y == 0, -3.0, 1.0)  # sums to -50
    with pytest.raises(ValueError, match="sum to -50"):
        SoftmaxClassifier().fit(X, y, sample_weight=sw)
    clf = SoftmaxClassifier().partial_fit(X, y, classes=[0, 1, 2])
    before = _state(clf)
    with pytest.raises(ValueError, match="so far in the stream"):
        clf.partial_fit(X, y, sample_weight=np.where(y == 0, -10.0, 1.0))  # 150 - 550 < 0
    assert _state(clf) == before
    # Signs that cancel exactly: the penalty's 1 / (C * 0) gave an all-zero model with
    # NumPy's division warnings only (fit), or without a word (partial_fit).
    sw = np.zeros(len(y))
    sw[:2] = 1.0, -1.0
    with pytest.raises(ValueError, match="sum to 0"):
        SoftmaxClassifier().fit(X, y, sample_weight=sw)
    with pytest.raises(ValueError, match="sum to 0 so far in the stream"):
        SoftmaxClassifier().partial_fit(X, y, classes=[0, 1, 2], sample_weight=sw)
    with pytest.raises(ValueError, match="sum to 0"):
        SoftmaxClassifier(class_weight={0: 1.0, 1: -1.0, 2: 0.0}).fit(
            X, y, sample_weight=np.ones(len(y)))
    # A total that overflows: the mean loss is NaN, and the model was all zeros with only
    # "overflow encountered in reduce" (review)
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="sum to inf"):
        SoftmaxClassifier().fit(X, y, sample_weight=np.full(len(y), 1e308))
    # Mixed signs with a positive total are weights like any other.
    sw = np.ones(len(y))
    sw[::10] = -0.2
    ours = SoftmaxClassifier(tol=1e-10).fit(X, y, sample_weight=sw)
    theirs = LogisticRegression(tol=1e-10, max_iter=10000).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-4)


def test_partial_fit_on_chunks_of_a_stream_of_many_classes_does_not_warn():
    # check_classification_targets warns when more than half of a chunk's labels are
    # distinct ("could be a regression problem"): every short chunk of a stream of many
    # classes did, as SGDClassifier's and GaussianNB's partial_fit do not.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 5)), rng.permutation(np.arange(64) % 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SoftmaxClassifier().partial_fit(X, y, classes=np.arange(50))
    with pytest.raises(ValueError, match="Unknown label type"):
        SoftmaxClassifier().partial_fit(X, y + 0.5, classes=np.arange(50) + 0.5)


def test_partial_fit_keeps_float32_like_fit():
    # partial_fit stored float64 coefficients for float32 data (fit and SGDClassifier keep
    # float32); the stream itself goes on in float64, so it follows the float64 stream.
    X, y = load("iris")
    X32 = X.astype(np.float32)
    a, b = SoftmaxClassifier(), SoftmaxClassifier()
    for chunk in np.array_split(np.arange(len(y)), 10):
        a.partial_fit(X32[chunk], y[chunk], classes=[0, 1, 2])
        b.partial_fit(X32[chunk].astype(np.float64), y[chunk], classes=[0, 1, 2])
    assert a.coef_.dtype == a.intercept_.dtype == np.float32
    assert a.predict_proba(X32).dtype == np.float32
    assert b.coef_.dtype == np.float64
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-5, atol=1e-6)


def test_partial_fit_errors_and_missing_classes():
    X, y = load("iris")
    with pytest.raises(ValueError, match="classes must be passed"):
        SoftmaxClassifier().partial_fit(X, y)
    clf = SoftmaxClassifier().partial_fit(X[y == 0], y[y == 0], classes=[0, 1, 2])
    assert clf.coef_.shape == (3, X.shape[1])
    clf.partial_fit(X[y == 2], y[y == 2])  # a chunk with another single class
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(X[:5], np.full(5, 7))
    with pytest.raises(ValueError, match="not the same"):
        clf.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(X[:, :2], y)
    # a NaN class was accepted (no row can hold it); SGDClassifier, the oracle, refuses it
    nan_classes = [0.0, 1.0, 2.0, np.nan]
    with pytest.raises(ValueError):
        SGDClassifier().partial_fit(X, y.astype(float), classes=nan_classes)
    with pytest.raises(ValueError, match="classes contains NaN"):
        SoftmaxClassifier().partial_fit(X, y.astype(float), classes=nan_classes)


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("n_classes", [2, 40])
def test_predict_proba_writes_over_its_scores(backend, n_classes):
    # The softmax goes over the decision scores, as scikit-learn's softmax(copy=False):
    # both were held before, twice the result's memory. Oracle: SciPy's softmax of
    # decision_function (and cecore's own out-of-place softmax, bit for bit).
    import tracemalloc

    import cecore
    rng = np.random.default_rng(n_classes)
    X, y = rng.standard_normal((600, 5)), rng.integers(0, n_classes, 600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = SoftmaxClassifier(max_iter=3, backend=backend).fit(X, y)
    Xb = rng.standard_normal((20000, 5))
    logits = clf._class_logits(Xb)
    for method, log in (("predict_proba", False), ("predict_log_proba", True)):
        getattr(clf, method)(Xb)  # a first Numba call compiles or loads its kernel
        tracemalloc.start()
        try:
            result = getattr(clf, method)(Xb)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # (two classes: the decision function's one column besides, half the result)
        bound = 1.25 if n_classes > 2 else 1.75
        assert peak < bound * result.nbytes, (method, peak / result.nbytes)
        ref = (log_softmax if log else softmax)(logits, axis=1)
        np.testing.assert_allclose(result, ref, rtol=1e-13, atol=1e-300)
        np.testing.assert_array_equal(
            result, (cecore.log_softmax if log else cecore.softmax)(logits, axis=1,
                                                                   backend=backend))


@pytest.mark.parametrize("layout", ["C", "F", "strided", "read-only"])
def test_softmax_over_scores_writes_over_them_only_when_it_can(layout):
    # C- and F-ordered scores are written over (each softmax line is one of theirs);
    # strided and read-only ones get a new array and are left alone. Oracle: SciPy.
    from cecore.functional import _softmax_over
    base = np.random.default_rng(0).normal(size=(50, 14))
    scores = {"C": base.copy(), "F": np.asfortranarray(base), "strided": base.copy()[:, ::2],
              "read-only": base.copy()}[layout]
    if layout == "read-only":
        scores.flags.writeable = False
    before = scores.copy()
    out = _softmax_over(scores, True, "auto", None)
    np.testing.assert_allclose(out, log_softmax(before, axis=1), rtol=1e-13)
    assert np.shares_memory(out, scores) == (layout in ("C", "F"))
    if layout not in ("C", "F"):
        np.testing.assert_array_equal(scores, before)
