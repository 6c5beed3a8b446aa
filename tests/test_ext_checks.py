"""cecore_ext's own names check their arguments before a kernel runs.

The compiled kernels trust their caller (cecore validates above the registry); called
directly with a target out of range, a short buffer or n_threads=-3 they read or wrote
outside their arrays (a segfault, or libgomp aborting the process for 100000 threads).
Oracle: the unchecked kernels on the same valid arguments (same bits), and for bad ones
the error raised before anything was written.
"""

import numpy as np
import pytest

import cecore_ext
from cecore._config import REDUCE_BLOCK
from cecore_ext import unchecked

N, C, S = 50, 7, 3


def _index_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, S)).astype(dtype)
    t = rng.integers(0, C, (N, S))
    t[3, 1] = -100  # ignored
    return dict(logits=x, target=t, weight=rng.uniform(0.5, 2, C), ignore_index=-100,
                label_smoothing=0.1, grad_scale=np.broadcast_to(np.ones((1, 1)), (N, S)),
                loss_out=np.full((N, S), -1.0), grad_out=np.full_like(x, -1.0),
                n_threads=1)


def _scores_args():
    a = _index_args()
    x, t = a["logits"][:, :, 0].copy(), a["target"][:, 0].copy()
    return dict(logits=x, target=t, weight=a["weight"], ignore_index=-100,
                label_smoothing=0.0, loss_out=np.full(N, -1.0),
                stats_out=np.full((N, 4), -1.0), rank_out=np.full((N, 2), -1), n_threads=1)


def _report_args():
    a = _scores_args()
    del a["stats_out"], a["rank_out"]
    n_bins = 15
    return dict(a, top_k=3, edges=np.arange(n_bins + 1) / n_bins,
                sums_out=np.full((1, 3 + n_bins), -1.0),
                counts_out=np.full((1, 4 + n_bins), -1), n_threads=1)


def _bce_args():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C)).astype(np.float32)
    one = np.broadcast_to(np.ones((1, 1)), (N, C))
    return dict(input=x, target=rng.uniform(0, 1, (N, C)).astype(np.float32), weight=one,
                pos_weight=one, grad_scale=one, loss_out=np.full((N, C), -1.0),
                grad_out=np.full_like(x, -1.0), n_threads=1)


def _proba_args():
    a = _index_args()
    q = np.random.default_rng(2).dirichlet(np.ones(C), (N, S)).transpose(0, 2, 1)
    del a["target"], a["ignore_index"]
    return dict(a, target=np.ascontiguousarray(q, dtype=np.float32))


def _log_loss_args():
    p = np.random.default_rng(3).dirichlet(np.ones(C), N)
    return dict(proba=p, target=np.arange(N) % C, lo=1e-15, hi=1 - 1e-15, rtol=1e-6,
                stats_out=np.full(3, -1.0), picked_out=np.full(N, -1.0), n_threads=1)


ARGS = {
    "softmax_ce_index": _index_args,
    "softmax_ce_scores": _scores_args,
    "softmax_ce_report": _report_args,
    "softmax_ce_proba": _proba_args,
    "bce_logits": _bce_args,
    "softmax": lambda: dict(logits=_index_args()["logits"], log=True,
                            out=np.full((N, C, S), -1.0, np.float32), n_threads=1),
    "logsumexp": lambda: dict(logits=_index_args()["logits"], out=np.full((N, S), -1.0),
                              n_threads=1),
    "log_loss_pass": _log_loss_args,
}
OUTPUTS = ("loss_out", "grad_out", "stats_out", "rank_out", "sums_out", "counts_out",
           "out", "picked_out")


def _outputs(args):
    return {k: v.copy() for k, v in args.items() if k in OUTPUTS and v is not None}


def _assert_untouched(args, before):
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v, err_msg=f"{k} was written")


@pytest.mark.parametrize("kernel", sorted(ARGS) + ["report_sums"])
def test_checked_kernels_give_the_unchecked_bits(kernel):
    if kernel == "report_sums":
        scores = _scores_args()
        unchecked.softmax_ce_scores(**scores)
        report = _report_args()
        make = lambda: dict(stats=scores["stats_out"], rank=scores["rank_out"],  # noqa: E731
                            top_k=3, edges=report["edges"],
                            sums_out=report["sums_out"].copy(),
                            counts_out=report["counts_out"].copy(), n_threads=1)
    else:
        make = ARGS[kernel]
    checked, raw = make(), make()
    getattr(cecore_ext, kernel)(**checked)
    getattr(unchecked, kernel)(**raw)
    for k in _outputs(raw):
        np.testing.assert_array_equal(checked[k], raw[k], strict=True)
        assert not np.all(checked[k] == -1), f"{k} was not written"


BAD = [
    # (kernel, argument changes, error, message fragment)
    ("softmax_ce_index", dict(target=lambda a: _set(a["target"], (5, 0), 10**9)),
     IndexError, r"target\[5, 0\] = 1000000000 is not a class index in \[0, 7\)"),
    ("softmax_ce_index", dict(target=lambda a: _set(a["target"], (5, 2), -7)),
     IndexError, r"target\[5, 2\] = -7"),
    ("softmax_ce_index", dict(target=lambda a: _set(a["target"], (0, 0), C)),
     IndexError, "not a class index"),
    ("softmax_ce_index", dict(target=lambda a: a["target"][:3]), ValueError,
     r"target must be an int64 array of shape \(50, 3\), got shape \(3, 3\)"),
    ("softmax_ce_index", dict(weight=lambda a: a["weight"][:2]), ValueError, "weight"),
    ("softmax_ce_index", dict(weight=lambda a: None), TypeError, "weight .* got NoneType"),
    ("softmax_ce_index", dict(loss_out=lambda a: a["loss_out"][:2]), ValueError, "loss_out"),
    ("softmax_ce_index", dict(grad_scale=lambda a: a["grad_scale"][:2]), ValueError,
     "grad_scale"),
    ("softmax_ce_index", dict(grad_out=lambda a: a["grad_out"][:, :3]), ValueError,
     "grad_out .* or None"),
    ("softmax_ce_index", dict(logits=lambda a: a["logits"][:, :, 0]), ValueError,
     r"logits must be a float32 or float64 array of shape \(any, any, any\)"),
    ("softmax_ce_index", dict(label_smoothing=lambda a: 1.5), ValueError, "label_smoothing"),
    ("softmax_ce_index", dict(label_smoothing=lambda a: "0.1"), TypeError,
     "label_smoothing must be a float"),
    # a float ignore_index: 2.0**53 equals 2**53 + 1 in NumPy's comparison, and the
    # compiled function would truncate 2.5 to class 2 (found by a hostile review)
    ("softmax_ce_index", dict(target=lambda a: _set(a["target"], (0, 0), 2**53 + 1),
                              ignore_index=lambda a: float(2**53)), TypeError,
     "ignore_index must be an int"),
    ("softmax_ce_index", dict(ignore_index=lambda a: 2.5), TypeError,
     "ignore_index must be an int"),
    ("softmax_ce_index", dict(ignore_index=lambda a: True), TypeError,
     "ignore_index must be an int"),
    ("softmax_ce_index", dict(target=lambda a: a["target"].astype(np.int32)), TypeError,
     "target must be an int64 array .* got dtype <i4"),
    ("softmax_ce_index", dict(target=lambda a: a["target"].tolist()), TypeError,
     r"target must be an int64 array of shape \(50, 3\) \(numpy\), got list"),
    ("softmax_ce_index", dict(weight=lambda a: a["weight"].astype(">f8")), TypeError,
     "native byte order"),
    ("softmax_ce_index", dict(loss_out=lambda a: _readonly(a["loss_out"])), ValueError,
     "loss_out is an output and must be writeable"),
    ("softmax_ce_index", dict(label_smoothing=lambda a: float("nan")), ValueError,
     "label_smoothing"),
    ("softmax_ce_index", dict(n_threads=lambda a: 0), ValueError,
     "n_threads must be an int >= 1, got 0"),
    ("softmax_ce_index", dict(n_threads=lambda a: -3), ValueError, "n_threads must be"),
    ("softmax_ce_index", dict(n_threads=lambda a: True), TypeError, "n_threads must be"),
    ("softmax_ce_index", dict(n_threads=lambda a: 1.0), TypeError, "n_threads must be"),
    # the gradient over the logits is allowed without label smoothing only (the
    # smoothing term reads every logit of the row after the target's was overwritten)
    ("softmax_ce_index", dict(grad_out=lambda a: a["logits"]), ValueError,
     "grad_out shares memory with logits"),
    ("softmax_ce_scores", dict(target=lambda a: _set(a["target"], (4,), 99)), IndexError,
     r"target\[4\] = 99"),
    ("softmax_ce_scores", dict(stats_out=lambda a: np.empty((N, 3))), ValueError,
     r"stats_out must be a float64 array of shape \(50, 4\)"),
    ("softmax_ce_report", dict(target=lambda a: _set(a["target"], (1,), -1)), IndexError,
     r"target\[1\] = -1"),
    ("softmax_ce_report", dict(top_k=lambda a: 0), ValueError, "top_k must be an int in"),
    ("softmax_ce_report", dict(top_k=lambda a: np.uint64(2**64 - 1)), ValueError, "top_k"),
    ("softmax_ce_report", dict(edges=lambda a: a["edges"][:1]), ValueError, "n_bins"),
    # other edges than k / n_bins bin silently wrong (unsorted, NaN, or simply others)
    ("softmax_ce_report", dict(edges=lambda a: np.array([0, .97, .98, .99, 1.])),
     ValueError, "edges must be np.arange"),
    ("softmax_ce_report", dict(edges=lambda a: _set(a["edges"], (3,), np.nan)), ValueError,
     "edges must be np.arange"),
    ("softmax_ce_report", dict(counts_out=lambda a: np.empty((1, 4), np.int64)), ValueError,
     r"counts_out must be an int64 array of shape \(1, 19\)"),
    ("softmax_ce_report", dict(sums_out=lambda a: np.empty((2, 18))), ValueError,
     r"sums_out must be a float64 array of shape \(1, 18\)"),
    ("softmax_ce_report", dict(logits=lambda a: a["logits"][:, :0]), ValueError,
     "at least one class"),
    ("softmax_ce_proba", dict(target=lambda a: a["target"][:, :2]), ValueError, "target"),
    ("softmax_ce_proba",
     dict(loss_out=lambda a: a["logits"].reshape(-1)[:2 * N * S].view(np.float64).reshape(N, S)),
     ValueError, "loss_out shares memory with logits"),
    ("bce_logits", dict(weight=lambda a: np.ones((N, 2))), ValueError, "weight"),
    ("bce_logits", dict(loss_out=lambda a: np.empty((N, C + 1))), ValueError, "loss_out"),
    # an F-ordered loss_out was reshaped to a copy by the compiled function, and the
    # losses went there (found by a hostile review)
    ("bce_logits", dict(loss_out=lambda a: np.full((C, N), -1.0).T), ValueError,
     r"loss_out \(or 1-D, the block sums\) must be C-contiguous"),
    ("bce_logits", dict(loss_out=lambda a: np.empty(2)), ValueError,
     r"loss_out must be a float64 array of shape \(1,\)"),
    ("bce_logits", dict(loss_out=lambda a: np.empty((2, 2, 2))), ValueError,
     r"loss_out \(or 1-D, the block sums\)"),
    ("softmax", dict(out=lambda a: a["logits"][:, ::-1].copy()[:, ::-1]), ValueError,
     "out must be C-contiguous"),
    ("softmax", dict(log=lambda a: "no"), TypeError, "log must be a bool"),
    ("softmax", dict(out=lambda a: a["logits"].astype(np.float64)), TypeError,
     r"out must be a float32 array of shape \(50, 7, 3\) \(native byte order\), got "
     "dtype <f8"),
    ("softmax", dict(out=lambda a: np.empty((N, C, S + 1), np.float32)), ValueError, "out"),
    ("logsumexp", dict(out=lambda a: np.empty((N,))), ValueError, r"\(50, 3\)"),
    ("log_loss_pass", dict(target=lambda a: _set(a["target"], (9,), C)), IndexError,
     r"target\[9\] = 7 is not a class index in \[0, 7\)$"),
    ("log_loss_pass", dict(picked_out=lambda a: None), ValueError, "both be None"),
    ("log_loss_pass", dict(stats_out=lambda a: np.empty(2)), ValueError, "stats_out"),
    # a masked array's masked values are what the kernel reads, whatever max() says
    # (a masked target of 10**12 segfaulted; found by a hostile review)
    ("softmax_ce_scores", dict(target=lambda a: np.ma.array(_set(a["target"], (4,), 10**12),
                                                            mask=np.arange(N) == 4)),
     TypeError, "target must be an int64 array .* got MaskedArray"),
    ("softmax_ce_index", dict(loss_out=lambda a: np.ma.array(a["loss_out"])), TypeError,
     "loss_out must be .* got MaskedArray"),
    ("softmax_ce_index", dict(label_smoothing=lambda a: 10**400), ValueError,
     "label_smoothing must be between 0.0 and 1.0"),
    ("log_loss_pass", dict(lo=lambda a: "a"), TypeError, "lo must be a float, got 'a'"),
    ("log_loss_pass", dict(rtol=lambda a: None), TypeError, "rtol must be a float"),
    ("log_loss_pass", dict(hi=lambda a: 10**400), ValueError,
     "log_loss_pass: hi is too large for a float"),
]


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _set(a, where, value):
    a = a.copy()
    a[where] = value
    return a


@pytest.mark.parametrize("kernel, changes, error, match", BAD,
                         ids=[f"{k}-{'-'.join(c)}-{i}" for i, (k, c, _, _) in enumerate(BAD)])
def test_bad_arguments_are_refused_before_anything_is_written(kernel, changes, error, match):
    args = ARGS[kernel]()
    args.update({k: f(args) for k, f in changes.items()})
    before = _outputs(args)
    with pytest.raises(error, match=match):
        getattr(cecore_ext, kernel)(**args)
    _assert_untouched(args, before)


def test_report_sums_checks_its_inputs():
    stats, rank = np.zeros((N, 4)), np.zeros((N, 2), np.int64)
    sums, counts = np.full((1, 18), -1.0), np.full((1, 19), -1)
    edges = np.arange(16) / 15
    with pytest.raises(ValueError, match=r"rank must be an int64 array of shape \(50, 2\)"):
        cecore_ext.report_sums(stats, rank[:4], 3, edges, sums, counts, 1)
    with pytest.raises(ValueError, match="sums_out shares memory with stats"):
        cecore_ext.report_sums(stats, rank, 3, edges, stats.reshape(-1)[:18].reshape(1, 18),
                               counts, 1)
    with pytest.raises(ValueError, match="n_threads"):
        cecore_ext.report_sums(stats, rank, 3, edges, sums, counts, 0)
    # one row of sums per REDUCE_BLOCK rows
    with pytest.raises(ValueError, match=r"sums_out must be a float64 array of shape \(2, 18\)"):
        cecore_ext.report_sums(np.zeros((REDUCE_BLOCK + 1, 4)),
                               np.zeros((REDUCE_BLOCK + 1, 2), np.int64), 3, edges, sums,
                               counts, 1)
    assert np.all(sums == -1) and np.all(counts == -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_gradients_the_contract_allows_still_work(dtype):
    # softmax_ce_index without smoothing, and bce_logits over its input: the same bits
    # as out of place
    a = _index_args(dtype)
    a["label_smoothing"] = 0.0
    ref = dict(a, grad_out=np.empty_like(a["logits"]), loss_out=np.empty((N, S)))
    cecore_ext.softmax_ce_index(**ref)
    a["grad_out"] = a["logits"]
    cecore_ext.softmax_ce_index(**a)
    np.testing.assert_array_equal(a["logits"], ref["grad_out"], strict=True)
    b = _bce_args()
    ref = dict(b, grad_out=np.empty_like(b["input"]))
    cecore_ext.bce_logits(**ref)
    b["grad_out"] = b["input"]
    cecore_ext.bce_logits(**b)
    np.testing.assert_array_equal(b["input"], ref["grad_out"], strict=True)


def test_cecore_calls_the_unchecked_kernels():
    from cecore._backends import KERNELS, get_backend
    assert get_backend("cython") is unchecked
    for name in KERNELS:
        assert getattr(cecore_ext, name) is not getattr(unchecked, name), name


def test_more_threads_than_cpus_are_capped_as_cecore_caps_them():
    # libgomp aborted the process for n_threads=100000; as cecore's own n_threads,
    # more than the CPUs available run on all of them, with a warning
    a, ref = _index_args(), _index_args()
    unchecked.softmax_ce_index(**ref)
    a["n_threads"] = 100000
    with pytest.warns(RuntimeWarning, match="more than the"):
        cecore_ext.softmax_ce_index(**a)
    for k in ("loss_out", "grad_out"):
        np.testing.assert_array_equal(a[k], ref[k], strict=True)


def test_softmax_may_overwrite_its_logits_but_not_overlap_them_otherwise():
    a = ARGS["softmax"]()
    ref = a["out"]
    cecore_ext.softmax(**a)
    x = a["logits"].copy()
    cecore_ext.softmax(x, True, x, 1)
    np.testing.assert_array_equal(x, ref, strict=True)
    buf = np.zeros(x.size + 1, np.float32)
    shifted_in, shifted_out = buf[1:].reshape(x.shape), buf[:-1].reshape(x.shape)
    with pytest.raises(ValueError, match=r"out shares memory with logits;.*may be logits itself"):
        cecore_ext.softmax(shifted_in, True, shifted_out, 1)
    assert not buf.any()



def _overlapping(shape_a, dtype_a, shape_b, dtype_b, shift):
    """Two C-contiguous arrays over one buffer, ``b`` starting ``shift`` bytes into ``a``."""
    size_a, size_b = np.prod(shape_a) * np.dtype(dtype_a).itemsize, \
        np.prod(shape_b) * np.dtype(dtype_b).itemsize
    buf = np.zeros(max(size_a, shift + size_b), np.uint8)
    return buf[:size_a].view(dtype_a).reshape(shape_a), \
        buf[shift:shift + size_b].view(dtype_b).reshape(shape_b)


def test_outputs_overlapping_inputs_or_each_other_are_refused():
    a = _index_args()
    a["label_smoothing"] = 0.0
    a["logits"], a["grad_out"] = _overlapping((N, C, S), np.float32, (N, C, S), np.float32, 4)
    b = _scores_args()
    b["stats_out"], b["rank_out"] = _overlapping((N, 4), np.float64, (N, 2), np.int64, 8)
    c = _bce_args()
    c["input"], c["grad_out"] = _overlapping((N, C), np.float32, (N, C), np.float32, 4)
    for kernel, args, match in [
            ("softmax_ce_index", a, "grad_out shares memory with logits"),
            ("softmax_ce_scores", b, "stats_out shares memory with rank_out"),
            ("bce_logits", c, r"grad_out shares memory with input;.*\(grad_out may be input")]:
        before = _outputs(args)
        with pytest.raises(ValueError, match=match):
            getattr(cecore_ext, kernel)(**args)
        _assert_untouched(args, before)


def test_the_compiled_bce_refuses_a_loss_buffer_it_would_copy():
    # bce_logits' loss_out is 1-D or 2-D, so untyped in the compiled function, which
    # reshaped an F-ordered one to a copy and wrote the losses there (hostile review)
    b = _bce_args()
    b["loss_out"] = np.full((C, N), -1.0).T
    with pytest.raises(ValueError, match="loss_out must be C-contiguous"):
        unchecked.bce_logits(**b)
    assert np.all(b["loss_out"] == -1)


def test_what_the_kernel_gets_is_what_was_checked():
    # The checks ran through an array subclass's own methods (a max() that skips
    # entries) and a scalar subclass's __int__ / __float__, while the compiled function
    # read the raw buffer and the value Cython reads: a target of 10**12 got through to
    # a segfault, and label_smoothing=5 to negative losses (found by a hostile review).
    class ZeroMax(np.ndarray):
        def max(self, *args, **kwargs):
            return 0

    class SneakyInt(int):
        def __int__(self):
            return 10**12

    class SneakyFloat(float):
        def __float__(self):
            return 0.0

    a = _scores_args()
    a["target"] = _set(a["target"], (4,), 10**12).view(ZeroMax)
    before = _outputs(a)
    with pytest.raises(IndexError, match=r"target\[4\] = 1000000000000"):
        cecore_ext.softmax_ce_scores(**a)
    _assert_untouched(a, before)
    # the kernel is given the values the checks saw: 10**12 is then ignore_index
    a = _scores_args()
    a["target"], a["ignore_index"] = _set(a["target"], (4,), 10**12), SneakyInt(-100)
    cecore_ext.softmax_ce_scores(**a)
    assert a["loss_out"][4] == 0 and a["rank_out"][4, 0] == -1
    a = _index_args()
    ref = dict(a, label_smoothing=0.0, loss_out=np.empty((N, S)), grad_out=None)
    unchecked.softmax_ce_index(**ref)
    a.update(label_smoothing=SneakyFloat(5.0), grad_out=None)
    cecore_ext.softmax_ce_index(**a)
    np.testing.assert_array_equal(a["loss_out"], ref["loss_out"])
    # other subclasses are their plain arrays
    a, ref = _scores_args(), _scores_args()
    a["logits"] = a["logits"].view(ZeroMax)
    cecore_ext.softmax_ce_scores(**a)
    unchecked.softmax_ce_scores(**ref)
    np.testing.assert_array_equal(a["stats_out"], ref["stats_out"])


def test_in_place_through_a_view_with_another_stride_on_a_length_one_axis():
    # The same elements, but one view's length-1 axis has stride 0 (a[:, :, None]) and
    # the other's 8 (a.reshape): refused as an overlap, though the step is never taken.
    a = np.random.default_rng(5).standard_normal((N, C))
    t = (np.arange(N) % C).reshape(N, 1)
    ref_loss, ref_grad = np.empty((N, 1)), np.empty((N, C, 1))
    unchecked.softmax_ce_index(a.copy()[:, :, None], t, np.ones(C), -100, 0.0,
                               np.ones((N, 1)), ref_loss, ref_grad, 1)
    loss = np.empty((N, 1))
    cecore_ext.softmax_ce_index(a[:, :, None], t, np.ones(C), -100, 0.0, np.ones((N, 1)),
                                loss, a.reshape(N, C, 1), 1)
    np.testing.assert_array_equal(loss, ref_loss)
    np.testing.assert_array_equal(a, ref_grad[:, :, 0])
