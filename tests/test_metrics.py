"""cecore.metrics against scikit-learn's log_loss (the oracle), and the scorers in CV."""

import tracemalloc
import warnings

import numpy as np
import pytest
from scipy.special import expit, log_softmax
from sklearn.datasets import load_iris
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score, cross_validate
from sklearn.preprocessing import StandardScaler

from cecore import SoftmaxClassifier
from cecore.metrics import (log_loss, log_loss_from_logits, make_cross_entropy_scorer,
                            neg_log_loss_scorer)

pd = pytest.importorskip("pandas")
torch = pytest.importorskip("torch")

P2 = [[.5, .5], [.1, .9], [.3, .7]]
CASES = {
    "continuous labels": ([0.5, 1.5, 0.5], P2),
    "mixed object labels": (np.array([1, "a", 1], dtype=object), P2),
    "mixed list labels": ([1, "a", 1], P2),
    "indicator 2 columns": (np.array([[1, 0], [0, 1]]), [[.5, .5], [.2, .8]]),
    "multilabel indicator": (np.array([[1, 0, 1], [0, 1, 1]]), [[.3, .3, .4], [.5, .2, .3]]),
    "multiclass multioutput": (np.array([[1, 2], [0, 1]]), [[.5, .5], [.5, .5]]),
    "integral float labels, 1-D proba": (np.array([1., 0., 1.]), [.2, .3, .4]),
    "empty": ([], []),
    "3-D proba": ([0, 1], np.ones((2, 2, 1)) * .5),
    "nan": ([0, 1], [[np.nan, .5], [.5, .5]]),
    "inf": ([0, 1], [[np.inf, .5], [.5, .5]]),
    "greater than 1": ([0, 1], [[1.5, .5], [.5, .5]]),
    "lower than 0": ([0, 1], [[-.5, .5], [.5, .5]]),
    "strings": (["spam", "ham", "ham", "spam"], [[.1, .9], [.9, .1], [.8, .2], [.35, .65]]),
    "y_proba None": ([0, 1], None),
    "duplicate labels": ([0, 1], [[.5, .5], [.5, .5]], dict(labels=[1, 0, 1])),
    "unsorted labels": ([0, 1], [[.5, .5], [.2, .8]], dict(labels=[1, 0])),
    "label not in labels": ([0, 2], [[.5, .5], [.5, .5]], dict(labels=[0, 1])),
    "one label in labels": ([0, 0], [[.5, .5], [.5, .5]], dict(labels=[0])),
    "one label": ([0, 0], [[.5, .5], [.5, .5]]),
    "labels with unseen class": ([0, 2], [[.2, .3, .5], [.1, .1, .8]], dict(labels=[0, 1, 2])),
    "labels vs columns": ([0, 2], [[.2, .8], [.1, .9]], dict(labels=[0, 1, 2])),
    "classes vs columns": ([0, 2, 1], [[.2, .8], [.1, .9], [.5, .5]]),
    "bool labels": (np.array([True, False]), [[.5, .5], [.4, .6]]),
    # accepted by the fast path before (hostile review): scikit-learn raises for both
    "bytes labels": ([b"a", b"b"], [[.5, .5], [.4, .6]]),
    "floats beyond int64": ([1e20, 0.0], [[.5, .5], [.4, .6]]),
    "sample_weight length": ([0, 1], [[.5, .5], [.5, .5]], dict(sample_weight=[1, 2, 3])),
    "zero sample_weight": ([0, 1], [[.5, .5], [.5, .5]], dict(sample_weight=[0, 0])),
    "sample_weight": ([0, 1, 1], P2, dict(sample_weight=[1, 2, 0.5])),
    "sum with sample_weight": ([0, 1, 1], P2, dict(sample_weight=[1, 2, 0.5], normalize=False)),
    "sum": ([0, 1, 1], P2, dict(normalize=False)),
    "normalize not bool": ([0, 1, 1], P2, dict(normalize=1)),
    "integer proba (clipped)": ([0, 1], [[0, 1], [1, 0]]),
    "rows not summing to one": ([0, 1], [[.2, .3], [.4, .4]]),
    "float32": ([0, 1, 2], np.array([[.2, .3, .5], [0, 1, 0], [.1, 0, .9]], np.float32)),
    "float32 1-D": ([0, 1, 1], np.array([.2, 1, 0], np.float32)),
    "pandas": (pd.Series(["x", "y", "x"]), pd.DataFrame([[.2, .8], [.1, .9], [.6, .4]])),
    "pandas categorical": (pd.Series(["x", "y", "x"], dtype="category"),
                           pd.DataFrame([[.2, .8], [.1, .9], [.6, .4]])),
    "scalar": (0, .5),
    "deprecated y_pred": ([0, 1], None, dict(y_pred=[[.5, .5], [.2, .8]])),
    "y_pred and y_proba": ([0, 1], [[.5, .5], [.2, .8]], dict(y_pred=[[.5, .5], [.2, .8]])),
    "fortran": ([0, 1, 2], np.asfortranarray([[.2, .3, .5], [0, 1, 0], [.1, 0, .9]])),
    "strided": ([0, 1, 2], np.array([[.2, .3, .5, 9], [0, 1, 0, 9], [.1, 0, .9, 9]])[:, :3]),
    "float16": ([0, 1, 2], np.array([[.2, .3, .5], [0, 1, 0], [.1, 0, .9]], np.float16)),
    # the fast path scored the data behind the mask (hostile review)
    "masked labels": (np.ma.array([0, 1, 1], mask=[0, 0, 1]), P2),
    "masked labels, nothing masked": (np.ma.array([0, 1, 1], mask=[0, 0, 0]), P2),
    "column of labels": (np.array([[0], [1], [1]]), P2),
}


def outcome(fn, case):
    y_true, y_proba, kwargs = (*case, {})[:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(y_true, y_proba, **kwargs)
        except Exception as exc:
            result = (type(exc), str(exc))
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("name", CASES)
def test_same_values_warnings_and_errors_as_sklearn(name):
    expected, expected_warnings = outcome(sk_log_loss, CASES[name])
    got, got_warnings = outcome(log_loss, CASES[name])
    assert got_warnings == expected_warnings
    if isinstance(expected, tuple):
        assert got == expected  # same exception type and message
    else:
        # float16: scikit-learn computes logs in float16, cecore in float64
        rtol = 2e-3 if name == "float16" else 1e-6 if name.startswith("float32") else 1e-12
        assert isinstance(got, float)
        np.testing.assert_allclose(got, expected, rtol=rtol)


@pytest.mark.parametrize("n_classes", [2, 3, 17])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_probabilities(n_classes, dtype):
    rng = np.random.default_rng(n_classes)
    n = 5000
    logits = rng.normal(scale=8, size=(n, n_classes))  # many probabilities clip
    proba = np.exp(log_softmax(logits, axis=1)).astype(dtype)
    y = rng.choice(np.array(list("abcdefghijklmnopq"))[:n_classes], size=n)
    sw = rng.uniform(0, 2, size=n)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for kwargs in [{}, dict(sample_weight=sw), dict(normalize=False, sample_weight=sw)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # float32 rows may not sum to one
            np.testing.assert_allclose(log_loss(y, proba, **kwargs), sk_log_loss(y, proba, **kwargs), rtol=rtol)
    if n_classes == 2:
        np.testing.assert_allclose(log_loss(y, proba[:, 1]), sk_log_loss(y, proba[:, 1]), rtol=rtol)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sum_to_one_warning_at_the_tolerance_is_sklearns(dtype, order):
    # Rows whose sum is within rounding of 1 +- sqrt(eps): the fused pass's float64 sums
    # alone decided, and float16 rows (604 of 3000) and float32 rows (2 of 3000) warned
    # where scikit-learn did not, or the reverse (hostile review). In Fortran order
    # (DataFrame.to_numpy()) NumPy adds a row's columns one by one, further from the
    # exact sum than its pairwise sum: the margin assumed the pairwise one, and such rows
    # did not warn where scikit-learn did (a later hostile review).
    rng = np.random.default_rng(7)
    tolerance = 1e-8 + np.sqrt(np.finfo(dtype).eps)  # isclose's atol + rtol
    # sums within a few dozen of their rounding errors of the tolerance
    spread = {np.float16: 0.03, np.float32: 5e-4, np.float64: 1e-6}[dtype]
    warned = {True: 0, False: 0}
    for trial in range(400):
        c = int(rng.choice([3, 4, 50, 300]))
        scale = 1 + rng.choice([-1, 1]) * tolerance * (1 + spread * rng.uniform(-1, 1))
        proba = np.asarray((rng.dirichlet(np.ones(c), size=2) * scale).astype(dtype),
                           order=order)
        y = rng.integers(0, c, 2)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = sk_log_loss(y, proba, labels=range(c))
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            got = log_loss(y, proba, labels=range(c))
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs], (trial, c)
        assert got == expected
        warned[bool(theirs)] += 1
    assert min(warned.values()) > 50, warned  # both sides of the tolerance were tried


@pytest.mark.parametrize("dtype, c, value", [(np.float32, 4063, 0.0002461991098243743),
                                              (np.float16, 150, 0.00647)])
def test_sum_to_one_warning_in_fortran_order_is_sklearns(dtype, c, value):
    # Rows of equal values whose exact sums are inside the tolerance (1.000307 in float32,
    # 0.97046 in float16) but whose column-by-column sums in NumPy are not (1.00036,
    # 0.957): scikit-learn warns; cecore did not (a hostile review's repro).
    proba = np.asfortranarray(np.full((2, c), value, dtype=dtype))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = sk_log_loss([0, 1], proba, labels=np.arange(c))
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = log_loss([0, 1], proba, labels=np.arange(c))
    assert theirs and [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert got == expected


def test_memory_is_linear_in_samples():
    rng = np.random.default_rng(0)
    n, c = 20000, 200
    proba = rng.dirichlet(np.ones(c), size=n)
    y = rng.integers(0, c, size=n)
    log_loss(y, proba)  # compile outside the measurement
    tracemalloc.start()
    value = log_loss(y, proba)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * n * 8  # a few float64/intp vectors; one n x c copy would be 25x more
    assert value == pytest.approx(sk_log_loss(y, proba), rel=1e-12)


@pytest.mark.parametrize("layout", ["fortran", "strided", "float16"])
def test_memory_is_linear_in_samples_for_any_layout(layout):
    # Fortran-ordered (DataFrame.to_numpy()), column-strided and float16 probabilities were
    # copied whole (hostile review: 400k x 50 Fortran, 173 MB extra); they now go through
    # a buffer of about PROBA_BLOCK_BYTES. Same value as scikit-learn's, bit for bit.
    rng = np.random.default_rng(1)
    n, c = 40000, 50
    proba = rng.dirichlet(np.ones(c), size=n)
    proba = {"fortran": np.asfortranarray(proba), "strided": np.repeat(proba, 2, axis=1)[:, ::2],
             "float16": proba.astype(np.float16)}[layout]
    y = rng.integers(0, c, size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # float16 rows may not sum to one
        expected = sk_log_loss(y, proba)
        log_loss(y, proba)  # compile outside the measurement
        tracemalloc.start()
        value = log_loss(y, proba)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert value == expected
    assert peak < 8 * n * 8 + (4 << 20)  # vectors and one block; a copy: 16 MB (float16: 8)


def test_float16_logits_are_computed_in_float32():
    # float16 logits were converted to float64 (four times their memory); float32 is
    # exact for them, as the functional API computes them. Oracle: float64 log_softmax.
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3, size=(20000, 50)).astype(np.float16)
    y = rng.integers(0, 50, size=20000)
    log_loss_from_logits(y[:10], logits[:10], labels=np.arange(50))  # loads a backend
    tracemalloc.start()
    try:
        loss = log_loss_from_logits(y, logits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * logits.nbytes, peak / logits.nbytes  # the float32 copy is 2x
    exact = -log_softmax(logits.astype(np.float64), axis=1)[np.arange(20000), y].mean()
    np.testing.assert_allclose(loss, exact, rtol=2e-7)
    assert loss == log_loss_from_logits(y, logits.astype(np.float32))


def test_log_loss_from_logits_is_exact():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 4))
    y = rng.integers(0, 4, size=300)
    np.testing.assert_allclose(log_loss_from_logits(y, logits),
                               sk_log_loss(y, np.exp(log_softmax(logits, axis=1))), rtol=1e-12)
    far = logits * 1000  # probabilities round to 0/1: log_loss clips, logits stay exact
    exact = -log_softmax(far, axis=1)[np.arange(300), y]
    sw = rng.uniform(size=300)
    np.testing.assert_allclose(log_loss_from_logits(y, far, sample_weight=sw),
                               np.average(exact, weights=sw), rtol=1e-12)
    np.testing.assert_allclose(log_loss_from_logits(y, far, normalize=False), exact.sum(), rtol=1e-12)
    z = rng.normal(scale=50, size=300)  # binary decision_function
    yb = np.where(rng.random(300) < 0.5, "neg", "pos")
    expected = np.mean(np.logaddexp(0, z) - (yb == "pos") * z)
    np.testing.assert_allclose(log_loss_from_logits(yb, z), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        log_loss_from_logits([0, 1, 2], logits[:3, :2])
    # a column of labels, as log_loss takes it (it was "not a label indicator matrix")
    assert log_loss_from_logits(y[:, None], logits) == log_loss_from_logits(y, logits)
    # a column of logits is the positive class's, as log_loss reads a column of
    # probabilities (it was "1 columns; pass all the classes through labels=")
    assert log_loss_from_logits(yb, z[:, None]) == log_loss_from_logits(yb, z)
    np.testing.assert_allclose(log_loss_from_logits(yb, z[:, None] / 50),  # nothing clipped
                               sk_log_loss(yb, expit(z / 50)[:, None]), rtol=1e-12)
    with pytest.raises(ValueError, match="3 classes.*2 columns; the logits need one column"):
        log_loss_from_logits([0, 1, 2], logits[:3, :2], labels=[0, 1, 2])


def test_labels_ending_in_nul_are_refused():
    """NumPy's str dtype drops trailing NULs, so "a" and "a\\0" would be one class.
    scikit-learn's LabelBinarizer keeps both in classes_ but encodes "a\\0" as a row of
    zeros, and its log_loss scores those rows as a loss of 0: a silent wrong answer that
    a clear error replaces here."""
    names = np.array(["a", "a\0", "b"], dtype=object)
    y = np.array([0, 1, 2, 1])
    proba = np.full((4, 3), 1 / 3)
    assert sk_log_loss(names[y], proba) < np.log(3) * 0.6  # the zero rows (the oracle's bug)
    for y_true in (names[y], list(names[y]), tuple(names[y]), pd.Series(names[y])):
        for score in (lambda t: log_loss(t, proba),
                      lambda t: log_loss_from_logits(t, np.log(proba))):
            with pytest.raises(ValueError, match="ends in a NUL character"):
                score(y_true)
    # the same strings without the NUL are scored as before
    assert log_loss(["a", "b", "c"], proba[:3]) == pytest.approx(np.log(3), rel=1e-15)


@pytest.fixture
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def test_scorer_matches_sklearn_and_survives_missing_class(iris):
    X, y = iris
    cv = KFold(3, shuffle=True, random_state=0)
    ours = cross_val_score(SoftmaxClassifier(), X, y, cv=cv, scoring=neg_log_loss_scorer)
    theirs = cross_val_score(SoftmaxClassifier(), X, y, cv=cv, scoring="neg_log_loss")
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    # test folds that miss class 2 (the models are trained on all three classes)
    rng = np.random.default_rng(0)
    splits = []
    for _ in range(3):
        test = rng.permutation(np.flatnonzero(y < 2))[:30]
        splits.append((np.setdiff1d(np.arange(len(y)), test), test))
    scores = cross_val_score(SoftmaxClassifier(), X, y, cv=splits, scoring=neg_log_loss_scorer,
                             error_score="raise")
    assert np.all(np.isfinite(scores)) and np.all(scores <= 0)
    with pytest.raises(ValueError, match="different number of classes"):
        cross_val_score(SoftmaxClassifier(), X, y, cv=splits, scoring="neg_log_loss",
                        error_score="raise")
    # the value is log_loss with labels=classes_ of the fold's model
    train, test = splits[0]
    model = SoftmaxClassifier().fit(X[train], y[train])
    expected = -sk_log_loss(y[test], model.predict_proba(X[test]), labels=model.classes_)
    assert scores[0] == pytest.approx(expected, rel=1e-12)


def test_scorers_in_gridsearch_multimetric(iris):
    X, y = iris
    scoring = {"nll": neg_log_loss_scorer,
               "smooth": make_cross_entropy_scorer(label_smoothing=0.1),
               "logits": make_cross_entropy_scorer(from_logits=True),
               "accuracy": "accuracy"}
    search = GridSearchCV(SoftmaxClassifier(), {"C": [0.1, 1.0]}, scoring=scoring, refit="nll",
                          cv=KFold(3, shuffle=True, random_state=1)).fit(X, y)
    results = search.cv_results_
    np.testing.assert_allclose(results["mean_test_logits"], results["mean_test_nll"], rtol=1e-6)
    assert np.all(results["mean_test_smooth"] < results["mean_test_nll"])
    res = cross_validate(SoftmaxClassifier(), X, y, cv=3, scoring=scoring)
    assert np.all(np.isfinite(res["test_smooth"]))


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_label_smoothing_scorer_matches_torch(iris, from_logits, binary):
    X, y = iris
    if binary:
        X, y = X[y > 0], y[y > 0]
    model = SoftmaxClassifier(C=0.5).fit(X, y)
    logits = model.decision_function(X)
    if logits.ndim == 1:
        logits = np.column_stack([np.zeros_like(logits), logits])
    if not from_logits:  # the scorer smooths clipped probabilities' logs
        logits = np.log(np.clip(model.predict_proba(X), np.finfo(float).eps, 1 - np.finfo(float).eps))
    target = torch.tensor(np.searchsorted(model.classes_, y))
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), target, label_smoothing=0.2).item()
    scorer = make_cross_entropy_scorer(label_smoothing=0.2, from_logits=from_logits)
    assert scorer(model, X, y) == pytest.approx(-expected, rel=1e-10)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_cross_entropy_scorer(label_smoothing=1.5)


def test_label_smoothing_scorer_of_float16_binary_probabilities():
    # (review) 1 - p was computed in float16 before the conversion (-0.91421913 for
    # -0.91423535): the uniform term is the float64 one of the same values
    class Model:
        classes_ = np.array([0, 1])

        def __init__(self, proba):
            self.proba = proba

        def predict_proba(self, X):
            return self.proba

    rng = np.random.default_rng(0)
    p16 = rng.uniform(0.01, 0.99, 500).astype(np.float16)
    X, y = np.zeros((500, 1)), rng.integers(0, 2, 500)
    scorer = make_cross_entropy_scorer(label_smoothing=0.2)
    p = np.column_stack([1 - p16.astype(np.float64), p16.astype(np.float64)])
    eps = np.finfo(np.float64).eps
    uniform = -np.log(np.clip(p, eps, 1 - eps)).mean(axis=1)
    expected = 0.8 * sk_log_loss(y, p16) + 0.2 * uniform.mean()
    assert scorer(Model(p16), X, y) == pytest.approx(-expected, rel=1e-14)


def test_label_smoothing_scorer_copies_no_probabilities():
    # (review) the smoothed score copied the model's N x C probabilities to clip and log
    # them: twice their size at the peak; now by blocks of rows
    class Model:
        classes_ = np.arange(200)

        def predict_proba(self, X):
            return np.full((len(X), 200), 1 / 200)

    X, y = np.zeros((20000, 1)), np.arange(20000) % 200
    scorer = make_cross_entropy_scorer(label_smoothing=0.1)
    proba_bytes = 20000 * 200 * 8
    scorer(Model(), X, y)
    tracemalloc.start()
    try:
        score = scorer(Model(), X, y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * proba_bytes, peak / proba_bytes
    assert score == pytest.approx(np.log(1 / 200), rel=1e-12)  # uniform: every term log C


@pytest.mark.parametrize("options", [{"from_logits": True}, {"label_smoothing": 0.1}])
def test_scorer_sample_weight_of_the_wrong_length(iris, options):
    from cecore.metrics import make_cross_entropy_scorer

    X, y = iris
    clf = SoftmaxClassifier().fit(X, y)
    scorer = make_cross_entropy_scorer(**options)
    # scikit-learn's checks and messages, as neg_log_loss_scorer gives them (all-NaN
    # weights scored nan, all-zero ones raised ZeroDivisionError)
    for bad, message in ((np.ones(len(y) - 1), "inconsistent numbers of samples"),
                         (np.full(len(y), np.nan), "sample_weight contains NaN"),
                         (np.zeros(len(y)), "at least one non-zero")):
        for s in (scorer, neg_log_loss_scorer):
            with pytest.raises(ValueError, match=message):
                s(clf, X, y, sample_weight=bad)
    assert scorer(clf, X, y, sample_weight=np.ones(len(y))) == scorer(clf, X, y)


def test_scorers_refuse_what_is_not_the_classes_probabilities(iris):
    from sklearn.svm import SVC

    X, y = iris
    # one decision column per pair of classes: the scorer gave a score, not an error
    ovo = SVC(decision_function_shape="ovo").fit(X, np.arange(len(y)) % 4)
    for options in ({"from_logits": True}, {"from_logits": True, "label_smoothing": 0.1}):
        with pytest.raises(ValueError, match="6 columns for 4 classes_"):
            make_cross_entropy_scorer(**options)(ovo, X, np.arange(len(y)) % 4)

    class Unnormalised:  # rows that do not sum to one: smoothing renormalised them silently
        classes_ = np.array([0, 1, 2])

        def predict_proba(self, X):
            return np.tile([0.5, 0.3, 0.5], (len(X), 1))

    for scorer in (neg_log_loss_scorer, make_cross_entropy_scorer(label_smoothing=0.1)):
        with pytest.warns(UserWarning, match="do not sum to one"):
            scorer(Unnormalised(), X, y)
    # ... and the smoothed score took the log-softmax of log p, i.e. renormalised them:
    # it jumped from -log_loss at 0 to another value for any smoothing > 0
    nll = -np.log(np.array([0.5, 0.3, 0.5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for eps in (1e-12, 0.1, 1.0):
            expected = -np.mean((1 - eps) * nll[y] + eps * nll.mean())
            score = make_cross_entropy_scorer(label_smoothing=eps)(Unnormalised(), X, y)
            assert score == pytest.approx(expected, rel=1e-12)

    # three classes, three pairs: as many columns as classes, still not logits
    from sklearn.pipeline import make_pipeline

    y3 = np.arange(len(y)) % 3
    for ovo3 in (SVC(decision_function_shape="ovo").fit(X, y3),
                 make_pipeline(StandardScaler(), SVC(decision_function_shape="ovo")).fit(X, y3),
                 # a search forwards decision_function to its best estimator
                 GridSearchCV(SVC(decision_function_shape="ovo"), {"C": [1.0]}, cv=2).fit(X, y3)):
        with pytest.raises(ValueError, match="one-vs-one"):
            make_cross_entropy_scorer(from_logits=True)(ovo3, X, y3)
    binary = SVC(decision_function_shape="ovo").fit(X, y3 > 0)  # one margin: a logit
    assert np.isfinite(make_cross_entropy_scorer(from_logits=True)(binary, X, y3 > 0))
    with pytest.raises(TypeError, match="label_smoothing"):  # as every other label_smoothing
        make_cross_entropy_scorer(label_smoothing=True)


def test_scorers_take_sample_weight_through_metadata_routing(iris):
    import sklearn
    from sklearn.exceptions import UnsetMetadataPassedError
    from sklearn.model_selection import KFold, cross_validate

    X, y = iris
    w = np.random.default_rng(0).uniform(0.1, 3.0, len(y))
    cv = KFold(3, shuffle=True, random_state=0)
    with sklearn.config_context(enable_metadata_routing=True):
        est = SoftmaxClassifier().set_fit_request(sample_weight=True)
        for scorer in (make_cross_entropy_scorer(), make_cross_entropy_scorer(from_logits=True)):
            # unset: scikit-learn's error asking for set_score_request (the weights were
            # silently left out of the score)
            with pytest.raises(UnsetMetadataPassedError):
                cross_validate(est, X, y, cv=cv, scoring=scorer, params={"sample_weight": w})
            scores = cross_validate(est, X, y, cv=cv, scoring=scorer.set_score_request(
                sample_weight=True), params={"sample_weight": w})["test_score"]
            for score, (train, test) in zip(scores, cv.split(X)):
                fitted = SoftmaxClassifier().fit(X[train], y[train], sample_weight=w[train])
                assert score == scorer(fitted, X[test], y[test], sample_weight=w[test])
    with pytest.raises(RuntimeError, match="metadata routing"):
        make_cross_entropy_scorer().set_score_request(sample_weight=True)


def test_the_shared_scorer_is_never_changed_by_a_request():
    # (review) neg_log_loss_scorer.set_score_request set the request on the module's one
    # instance: every later use of it in the process weighted its score
    import sklearn

    with sklearn.config_context(enable_metadata_routing=True):
        weighted = neg_log_loss_scorer.set_score_request(sample_weight=True)
        assert weighted is not neg_log_loss_scorer and repr(weighted) == "neg_log_loss_scorer"
        assert weighted.get_metadata_routing().score.requests == {"sample_weight": True}
        assert neg_log_loss_scorer.get_metadata_routing().score.requests.get(
            "sample_weight") is None
        own = make_cross_entropy_scorer()
        assert own.set_score_request(sample_weight=True) is own  # as scikit-learn's


def test_set_score_request_checks_the_alias_as_scikit_learn_does():
    # An invalid alias was stored, and failed only inside a later search; scikit-learn's
    # scorers (the oracle) refuse it at the call, and a call without it resets the request.
    import sklearn
    from sklearn.metrics import log_loss, make_scorer

    with sklearn.config_context(enable_metadata_routing=True):
        theirs = make_scorer(log_loss, response_method="predict_proba")
        ours = make_cross_entropy_scorer()
        for alias in (3, "not an identifier!", [1]):
            with pytest.raises(ValueError) as expected:
                theirs.set_score_request(sample_weight=alias)
            with pytest.raises(ValueError) as got:
                ours.set_score_request(sample_weight=alias)
            assert str(got.value) == str(expected.value)
        for scorer in (theirs, ours):
            scorer.set_score_request(sample_weight="w")
            assert scorer.get_metadata_routing().score.requests == {"sample_weight": "w"}
            scorer.set_score_request()  # not requested (theirs drops the entry)
            assert scorer.get_metadata_routing().score.requests.get("sample_weight") is None


def test_labels_in_an_object_array_take_the_fast_path(iris):
    """Strings in an object array are what a pandas string column gives (pandas >= 3):
    log_loss_from_logits and the from_logits scorer took them for a label indicator
    matrix and raised; log_loss took the slow path (an n x C one-hot)."""
    import pandas as pd

    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])  # np.str_ elements
    labels = pd.Series(names[y]).astype(object)
    logits = SoftmaxClassifier().fit(X, y).decision_function(X)
    expected = sk_log_loss(names[y], np.exp(log_softmax(logits, axis=1)))
    for y_true in (labels, labels.to_numpy(), labels.astype("category"),
                   labels.astype("string")):
        assert log_loss_from_logits(y_true, logits) == pytest.approx(expected, rel=1e-12)
        assert log_loss(y_true, np.exp(log_softmax(logits, axis=1))) == pytest.approx(
            expected, rel=1e-12)
    scores = cross_val_score(SoftmaxClassifier(), X, labels, cv=3,
                             scoring=make_cross_entropy_scorer(from_logits=True))
    assert np.array_equal(scores, cross_val_score(
        SoftmaxClassifier(), X, y, cv=3, scoring=make_cross_entropy_scorer(from_logits=True)))
    many = np.array([f"class {i:03d}" for i in range(400)], dtype=object)[np.arange(20000) % 400]
    proba = np.full((many.size, 400), 1 / 400)
    tracemalloc.start()
    try:
        assert log_loss(many, proba) == pytest.approx(np.log(400), rel=1e-12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < proba.nbytes / 8  # no n x C one-hot (as large as proba)


def test_log_loss_and_scorers_under_array_api_dispatch(monkeypatch):
    # With scikit-learn's array API dispatch on, log_loss kept torch tensors through
    # check_array and failed on NumPy's dtypes, and the scorers on a tensor classes_;
    # scikit-learn's log_loss and 'neg_log_loss' (the oracles) work there.
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import get_scorer
    from sklearn.metrics import log_loss as sk_log_loss

    monkeypatch.setenv("SCIPY_ARRAY_API", "1")  # scikit-learn asks for it
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((60, 4)))
    y = torch.tensor(np.arange(60) % 3)
    w = torch.tensor(rng.uniform(0.5, 2.0, 60))
    with sklearn.config_context(array_api_dispatch=True):
        est = LogisticRegression().fit(X, y)
        p = est.predict_proba(X)
        assert torch.is_tensor(p)
        expected = sk_log_loss(y, p, sample_weight=w)
        assert log_loss(y, p, sample_weight=w) == pytest.approx(expected, rel=1e-12)
        assert log_loss(y.numpy(), p, sample_weight=w) == pytest.approx(expected, rel=1e-12)
        assert log_loss_from_logits(y, torch.log(p), sample_weight=w) == pytest.approx(
            expected, rel=1e-12)
        assert neg_log_loss_scorer(est, X, y) == pytest.approx(
            get_scorer("neg_log_loss")(est, X, y), rel=1e-12)
        assert make_cross_entropy_scorer(from_logits=True)(est, X, y) == pytest.approx(
            get_scorer("neg_log_loss")(est, X, y), rel=1e-9)


def test_log_loss_of_float32_tensors_under_array_api_dispatch(monkeypatch):
    # check_array with the dispatch off read a float32 tensor as float64: clipped at
    # float64's epsilon (18.2 where scikit-learn gives 8.19) and rows that sum to one in
    # float32 warned. scikit-learn's log_loss (the oracle) computes in the tensor's dtype.
    import sklearn
    from sklearn.metrics import log_loss as sk_log_loss

    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    y = torch.tensor([1, 0, 1, 0])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float32)
    rng = np.random.default_rng(0)
    p2 = torch.tensor(rng.dirichlet([1, 1, 1], 20), dtype=torch.float32)
    y2 = torch.tensor(rng.integers(0, 3, 20))
    with sklearn.config_context(array_api_dispatch=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels, proba in [(y, p), (y2, p2), (y2, p2.half())]:
            assert log_loss(labels, proba) == pytest.approx(sk_log_loss(labels, proba),
                                                            rel=1e-6)
    # bfloat16 (rows that do not sum to one, for either) and a tensor that requires grad
    # (torch warns inside scikit-learn) were a TypeError and a RuntimeError
    with sklearn.config_context(array_api_dispatch=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for proba in (p2.bfloat16(), p2.clone().requires_grad_(True)):
            assert log_loss(y2, proba) == pytest.approx(sk_log_loss(y2, proba), rel=1e-6)


def test_labels_in_a_tensor_are_labels():
    # A 1-D tensor of labels went to scikit-learn's slow path, which made it a label
    # indicator matrix: log_loss_from_logits refused it.
    y = np.array([0, 1, 2, 1])
    logits = np.log([[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.3, .4, .3]])
    assert log_loss_from_logits(torch.tensor(y), logits) == log_loss_from_logits(y, logits)
    assert log_loss(torch.tensor(y), np.exp(logits)) == log_loss(y, np.exp(logits))
