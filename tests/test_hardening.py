"""Regression tests for defects found by using cecore as a hostile user would.

Each test is named after what it guards. Oracles: torch (semantics), scikit-learn
(log_loss), the file system itself (what exists before and after), and cecore's own
in-memory functions for the streamed results.
"""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss

import cecore
from cecore import batch
from cecore.cli import main
from cecore.metrics import log_loss
from oracle import assert_close, check_result, subprocess_env, torch_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cecore.__file__)))
PACKAGE = os.path.dirname(os.path.abspath(cecore.__file__))


def _python(code, env=None, timeout=300):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------ log_loss indices
def test_log_loss_kernel_never_reads_past_the_columns_under_numba_boundscheck(tmp_path):
    # More classes in y_true than columns in y_proba: the pass over y_proba must not pick
    # proba[i, target[i]] for a target past the last column. With bounds checking on, an
    # out-of-bounds read raises instead of reading (or crashing on) foreign memory.
    result = _python("""
        import numpy as np
        from cecore.metrics import log_loss
        for y, p, kw in [(np.arange(3000), np.full((3000, 2), .5), {}),
                         (np.arange(3) % 3, np.full((3, 2), .5), {"labels": [0, 1, 2]})]:
            try:
                log_loss(y, p, **kw)
            except ValueError as exc:
                print("ValueError:", str(exc)[:40])
    """, env={"NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ValueError:") == 2, result.stdout + result.stderr
    assert "SystemError" not in result.stderr and "IndexError" not in result.stderr


def test_log_loss_one_column_is_the_positive_class_like_sklearn():
    y, p = [0, 1, 1, 0], np.array([[.2], [.7], [.9], [.4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "do not sum to one" warning either
        assert log_loss(y, p) == sk_log_loss(y, p)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_log_loss_is_bit_identical_to_sklearn_in_every_precision(rng, dtype):
    y = rng.integers(0, 4, 500)
    p = rng.dirichlet(np.ones(4), 500).astype(dtype)
    sw = rng.random(500)
    p1 = rng.random(500).astype(dtype)
    y1 = rng.integers(0, 2, 500)
    indicator = np.eye(4, dtype=int)[y]
    cases = [((y, p), {}), ((y, p), {"sample_weight": sw}), ((y, p), {"normalize": False}),
             ((y1, p1), {}), ((indicator, p), {}), ((y1, p1[:, None]), {})]
    for args, kwargs in cases:
        assert log_loss(*args, **kwargs) == sk_log_loss(*args, **kwargs), kwargs


# ------------------------------------------------------------------ --per-row-out
@pytest.fixture
def scored_files(tmp_path, rng):
    x = rng.standard_normal((300, 7)).astype(np.float32)
    t = rng.integers(0, 7, 300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "w.npy", np.linspace(.5, 2, 7))
    return x, t, tmp_path


def _snapshot(directory):
    return {name: (os.lstat(directory / name).st_mode, (directory / name).read_bytes()
                   if (directory / name).is_file() else None)
            for name in sorted(os.listdir(directory))}


def _score(args, capsys):
    code = main(["score", *args, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_per_row_out_never_replaces_an_input(scored_files, capsys):
    _, _, d = scored_files
    os.link(d / "x.npy", d / "hard.npy")
    os.symlink(d / "t.npy", d / "tlink.npy")
    before = _snapshot(d)
    for out in ("x.npy", "t.npy", "w.npy", "hard.npy", "tlink.npy", "./x.npy"):
        code, stdout, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--weight",
                                    str(d / "w.npy"), "--per-row-out", str(d / out)], capsys)
        assert code == 1 and stdout == "", out
        assert err.startswith("cecore score: error: ") and err.count("\n") == 1, err
        assert "refusing to overwrite an input" in err
    assert _snapshot(d) == before  # nothing changed, nothing left behind


def test_per_row_out_through_a_missing_directory_and_dotdot(scored_files, capsys):
    # "missing/../x.npy" was taken as x.npy (os.path.realpath collapses "missing/.." as
    # text) without any check: it replaced the input, or a read-only non-.npy file; the
    # system finds no such directory, and neither should cecore.
    _, _, d = scored_files
    (d / "config.yaml").write_text("lr: 0.1\n")
    os.chmod(d / "config.yaml", 0o444)
    os.symlink("missing/../x.npy", d / "dangling.npy")
    before = _snapshot(d)
    for out in ("missing/../x.npy", "missing/../config.yaml", "missing/../new.npy",
                "dangling.npy"):
        code, stdout, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                                    str(d / out)], capsys)
        assert code == 1 and stdout == "", out
        assert "its directory does not exist" in err and err.count("\n") == 1, err
    assert _snapshot(d) == before
    os.mkdir(d / "sub")  # with the directory there, ".." is the parent again
    code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                           str(d / "sub/../x.npy")], capsys)
    assert code == 1 and "refusing to overwrite an input" in err
    batch.score(d / "x.npy", d / "t.npy", per_row_out=os.fsencode(d / "sub/../new.npy"))
    assert np.load(d / "new.npy").shape == (300,)  # a bytes path, as the inputs take


def test_per_row_out_never_replaces_the_bias_file(tmp_path, rng, capsys):
    np.save(tmp_path / "h.npy", rng.standard_normal((50, 4)).astype(np.float32))
    np.save(tmp_path / "W.npy", rng.standard_normal((10, 4)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal(10).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 10, 50))
    before = _snapshot(tmp_path)
    code, out, err = _score(["--hidden", str(tmp_path / "h.npy"), "--unembedding",
                             str(tmp_path / "W.npy"), "--bias", str(tmp_path / "b.npy"),
                             str(tmp_path / "t.npy"), "--per-row-out", str(tmp_path / "b.npy")],
                            capsys)
    assert code == 1 and "refusing to overwrite an input" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_per_row_out_never_replaces_a_file_mapped_in_memory(tmp_path, rng):
    # The input's memory map reaches score() in wrappers that hide its file name.
    torch = pytest.importorskip("torch")
    np.save(tmp_path / "x.npy", rng.standard_normal((100, 10)).astype(np.float32))
    t = rng.integers(0, 10, 100)
    m = np.load(tmp_path / "x.npy", mmap_mode="r+")
    before = (tmp_path / "x.npy").read_bytes()
    for wrapped in (torch.from_numpy(m), np.frombuffer(m, np.float32).reshape(100, 10),
                    np.lib.stride_tricks.as_strided(m, m.shape, m.strides)):
        with pytest.raises(ValueError, match="memory-mapped by this process"):
            batch.score(wrapped, t, per_row_out=tmp_path / "x.npy")
    assert (tmp_path / "x.npy").read_bytes() == before
    batch.score(m, t, per_row_out=tmp_path / "out.npy")  # another file is written
    assert np.load(tmp_path / "out.npy").shape == (100,)


def test_per_row_out_with_a_trailing_slash_is_refused(scored_files, capsys):
    _, _, d = scored_files
    np.save(d / "old.npy", np.zeros(3))
    before = _snapshot(d)
    for out in ("new/", "old.npy/"):
        code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                               f"{d}/{out}"], capsys)  # (pathlib drops the slash)
        assert code == 1 and "names a directory" in err and err.count("\n") == 1
    assert _snapshot(d) == before


def test_json_reports_infinite_values_as_strings(tmp_path, rng, capsys):
    # A huge loss: perplexity exp(loss) is inf, which JSON has no number for.
    np.save(tmp_path / "x.npy", (1000 * rng.standard_normal((100, 10))).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 10, 100))
    code = main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    result = json.loads(out)
    assert result["perplexity"] == "inf" and float(result["perplexity"]) == np.inf
    assert np.isfinite(result["mean_loss"])


def test_per_row_out_writes_through_a_symlink_like_np_save(scored_files, capsys):
    x, t, d = scored_files
    np.save(d / "old.npy", np.zeros(3))
    os.symlink("old.npy", d / "link.npy")
    code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                           str(d / "link.npy")], capsys)
    assert code == 0, err
    assert os.path.islink(d / "link.npy") and os.readlink(d / "link.npy") == "old.npy"
    np.testing.assert_array_equal(np.load(d / "old.npy"),
                                  cecore.cross_entropy(x, t, reduction="none"))


def test_per_row_out_refuses_fifos_and_directories(scored_files, capsys):
    _, _, d = scored_files
    os.mkfifo(d / "fifo.npy")
    os.mkdir(d / "dir.npy")
    before = _snapshot(d)
    for out in ("fifo.npy", "dir.npy"):
        code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                               str(d / out)], capsys)
        assert code == 1 and "is not a regular file" in err and err.count("\n") == 1
    assert _snapshot(d) == before
    assert stat.S_ISFIFO(os.lstat(d / "fifo.npy").st_mode)


def test_per_row_out_gets_the_umask_permissions_or_keeps_the_old_ones(scored_files, capsys):
    _, _, d = scored_files
    old = os.umask(0o027)
    try:
        code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                               str(d / "new.npy")], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(d / "new.npy").st_mode) == 0o640  # as open() gives
    os.chmod(d / "new.npy", 0o604)
    assert _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                   str(d / "new.npy")], capsys)[0] == 0
    assert stat.S_IMODE(os.stat(d / "new.npy").st_mode) == 0o604


# ------------------------------------------------------------------ Numba's cache
def test_numba_cache_stays_outside_the_installed_package(tmp_path):
    def package_files():
        return {os.path.join(r, f) for r, _, fs in os.walk(PACKAGE) for f in fs}

    before = package_files()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_CACHE_DIR": ""}
    code = """
        import gc, os, numpy as np, cecore, numba
        from cecore.metrics import log_loss
        # 40 classes: the row kernel, which compiles in half the time of the few-classes one
        cecore.cross_entropy(np.zeros((3, 40)), [0, 1, 2], backend="numba")
        log_loss([0, 1, 2], np.full((3, 3), 1 / 3))
        # every cached dispatcher of cecore, wherever its files may already be
        package = os.path.dirname(cecore.__file__) + os.sep
        paths = [d._cache._cache_path for d in gc.get_objects()
                 if isinstance(d, numba.core.dispatcher.Dispatcher)
                 and d.py_func.__module__.startswith("cecore")
                 and hasattr(d._cache, "_cache_path")]
        assert paths and not [p for p in paths if p.startswith(package)], paths
        # and each writes its data files under names of their own (see the next test)
        from cecore._numba._runtime import _KeyedCacheFile
        files = [type(d._cache._cache_file) for d in gc.get_objects()
                 if isinstance(d, numba.core.dispatcher.Dispatcher)
                 and d.py_func.__module__.startswith("cecore") and hasattr(d._cache, "_cache_file")]
        assert files and set(files) == {_KeyedCacheFile}, set(files)
    """
    result = _python(code, env=env)
    assert result.returncode == 0, result.stderr
    new = package_files() - before
    assert not new, new
    cached = [f for r, _, fs in os.walk(tmp_path / "xdg") for f in fs if f.endswith(".nbi")]
    assert cached, "nothing was cached in the user's cache directory"
    # NUMBA_CACHE_DIR is honoured
    result = _python(code, env={"NUMBA_CACHE_DIR": str(tmp_path / "mine")})
    assert result.returncode == 0, result.stderr
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path / "mine") for f in fs)
    assert package_files() - before == set()


def test_numba_cache_writers_in_two_processes_keep_their_own_code(tmp_path):
    # Numba names a new data file by the first number its copy of the index lacks. Two
    # processes compiling different specialisations at once (here: B read the index
    # before A wrote it, and A's data write landed last) took the same number, and B's
    # entry then loaded A's code (numba#4807). (Numba's own class, run through these
    # steps, returns "code A" for sig B.)
    from cecore._numba._runtime import _KeyedCacheFile

    a = _KeyedCacheFile(str(tmp_path), "kernel-10.py311", "stamp")
    b = _KeyedCacheFile(str(tmp_path), "kernel-10.py311", "stamp")
    delayed = []
    a._save_data = lambda name, data: delayed.append((name, data))
    a.save(("sig A", "cpu"), "code A")
    b._load_index = lambda: {}  # its view of the index, from before A's save
    b.save(("sig B", "cpu"), "code B")
    for name, data in delayed:  # A's data write, last
        _KeyedCacheFile._save_data(a, name, data)
    reader = _KeyedCacheFile(str(tmp_path), "kernel-10.py311", "stamp")
    assert reader.load(("sig B", "cpu")) == "code B"
    assert reader.load(("sig A", "cpu")) in (None, "code A")  # dropped: compiled again
    reader.save(("sig A", "cpu"), "code A")
    assert (reader.load(("sig A", "cpu")), reader.load(("sig B", "cpu"))) == ("code A", "code B")


def test_numba_cache_is_not_reused_after_a_helper_module_changes(tmp_path):
    # A kernel inlines the helpers of _math.py. Numba keys its cache by the kernel's own
    # file, so a change to _math.py alone (an upgrade, an edit) kept loading kernels
    # compiled from the old code. A copy of the package (mtimes kept) is run, its exp
    # changed in _math.py only, and run again on the same cache: the second run must
    # compute with the new exp (a stale kernel gives the first run's bits).
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "cecore", ignore=shutil.ignore_patterns("__pycache__"))
    code = """
        import numpy as np, cecore
        assert cecore.__file__.startswith({root!r}), cecore.__file__
        x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(4, 10)
        print(cecore.logsumexp(x, axis=1, backend="numba", n_threads=1).tobytes().hex())
    """.format(root=str(copy))

    def run(cache):
        env = dict(os.environ, PYTHONPATH=str(copy), NUMBA_CACHE_DIR=str(cache))
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=copy,
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    before = run(tmp_path / "cache")
    math_py = copy / "cecore" / "_numba" / "_math.py"
    text = math_py.read_text()
    assert "4.9999994040e-1" in text  # the exp polynomial's last coefficient
    math_py.write_text(text.replace("4.9999994040e-1", "5.9999994040e-1"))
    after = run(tmp_path / "cache")
    assert after != before


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("n_threads", [40000, 2**31])
def test_n_threads_above_the_cpus_is_capped_with_a_warning(backend, n_threads):
    x, t = np.random.default_rng(0).standard_normal((300, 50)).astype(np.float32), np.zeros(300, int)
    with pytest.warns(RuntimeWarning, match="more than the .* CPUs available"):
        loss, grad = cecore.cross_entropy(x, t, return_grad=True, n_threads=n_threads,
                                          backend=backend)
    one = cecore.cross_entropy(x, t, return_grad=True, n_threads=1, backend=backend)
    assert loss == one[0] and np.array_equal(grad, one[1])


def test_cli_threads_above_the_cpus_warns_in_one_line(scored_files, capsys):
    x, t, d = scored_files
    code, out, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--threads", "40000",
                             "--json"], capsys)
    assert code == 0
    assert err.startswith("cecore score: warning: --threads 40000 is more than the ")
    assert err.count("\n") == 1, err
    assert np.float32(json.loads(out)["mean_loss"]) == cecore.cross_entropy(x, t)


def test_cli_names_options_not_files(scored_files, capsys, tmp_path, monkeypatch):
    # Messages beginning with a parameter's name were rewritten to name the option; a
    # file named like a parameter was renamed too ("--top-k is not a valid .npy").
    _, _, d = scored_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "top_k").write_bytes(b"garbage" * 20)
    code, _, err = _score(["top_k", str(d / "t.npy")], capsys)
    assert code == 1 and err.startswith("cecore score: error: top_k is not a valid .npy")
    code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--threads", "0"], capsys)
    assert code == 1 and err == "cecore score: error: --threads must be -1 or an int >= 1, got 0\n"


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_dask_local_with_no_workers_is_a_bad_argument(scored_files, capsys, workers):
    _, _, d = scored_files
    code, out, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--dask", "local",
                             "--workers", workers], capsys)
    assert code == 1 and out == ""
    assert "error: --workers must be an int >= 1" in err and err.count("\n") == 1


# ------------------------------------------------------------------ semantics vs torch
def test_fortran_ordered_logits_with_probability_targets(backend, rng):
    x = np.asfortranarray(rng.standard_normal((9, 5)))
    p = rng.dirichlet(np.ones(5), 9)
    for target in (p, np.asfortranarray(p)):
        result = cecore.cross_entropy(x, target, return_grad=True, backend=backend)
        check_result(result, torch_cross_entropy(np.ascontiguousarray(x), p), x.dtype)


@pytest.mark.parametrize("case", [
    dict(weight=[1, 1, np.nan], target=[0, 1]),
    dict(weight=[1, 1, np.nan], target=[0, 2], reduction="sum"),
    dict(weight=[1, 1, np.nan], target=[0, 2], reduction="none"),
    dict(weight=[1, 1, np.nan], target=[0, 1], label_smoothing=0.1, reduction="none"),
    dict(weight=[1, 1, np.inf], target=[0, 1], label_smoothing=0.1, reduction="none"),
    dict(weight=[1, 1, np.inf], target=[0, 1], label_smoothing=0.1),
    dict(weight=[1, 1, np.inf], target="proba", reduction="none"),
    dict(weight=[1, 1, np.nan], target="proba", reduction="none"),
    dict(weight=[-1, 1, 2], target=[0, 1], label_smoothing=0.1),
    dict(weight=[0, 0, 1], target=[0, 1]),
])
def test_nan_and_inf_class_weights_give_torchs_loss_and_gradient(backend, case):
    case = dict(case)
    x = np.array([[0.0, 0.0, 50.0], [1.0, 2.0, 3.0]])
    target = case.pop("target")
    target = np.array([[.2, .3, .5], [1, 0, 0]]) if target == "proba" else np.array(target)
    weight = np.array(case.pop("weight"), dtype=np.float64)
    for xs in (x, np.zeros_like(x)):
        result = cecore.cross_entropy(xs, target, weight=weight, return_grad=True,
                                      backend=backend, **case)
        expected = torch_cross_entropy(xs, target, weight=weight, **case)
        if case.get("reduction", "mean") == "mean" and target.ndim == 1 \
                and weight[target].sum() == 0:
            # 'mean' over a zero total weight divides by 0. Which values are then inf and
            # which NaN depends on the order of torch's autograd ops (with label smoothing
            # it divides two partial sums separately); only non-finiteness is promised.
            for ours, theirs in zip(result, expected):
                assert not np.isfinite(ours).any() and not np.isfinite(theirs).any()
        else:
            assert_close(result[0], expected[0])
            assert_close(result[1], expected[1])


@pytest.mark.parametrize("n_classes", [3, 300])  # tiles of positions, and rows
@pytest.mark.parametrize("scale, dtype", [(1e-300, np.float64), (1e300, np.float64),
                                          (1e-44, np.float32), (1e38, np.float32)])
def test_label_smoothing_with_weights_beyond_float32s_range(backend, rng, n_classes, scale,
                                                              dtype):
    """float32 logits, label smoothing, and class weights whose 'mean' scale (1 / their
    total) float32 cannot hold. The few-classes kernels multiplied the weight and that
    scale in float32: 0 * inf = NaN gradients for float64 weights of 1e-300 and 1e300,
    -inf for float32 weights of 1e-44. Oracle: torch in float64 (torch itself takes no
    float64 weights with float32 logits)."""
    x = rng.standard_normal((100, n_classes)).astype(np.float32)
    target = rng.integers(0, n_classes, 100)
    weight = (scale * rng.uniform(1, 2, n_classes)).astype(dtype)
    result = cecore.cross_entropy(x, target, weight=weight, label_smoothing=0.1,
                                  return_grad=True, backend=backend)
    expected = torch_cross_entropy(x.astype(np.float64), target, weight=weight,
                                   label_smoothing=0.1)
    check_result(result, [e.astype(np.float32) for e in expected], np.float32)


@pytest.mark.parametrize("weight", [1e37, 1e38])
@pytest.mark.parametrize("shape", [(20000, 4), (200, 4, 100)])  # rows, and K-dim positions
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_with_huge_uniform_weights_under_mean(backend, rng, weight, shape,
                                                              reduction):
    # float32 logits of few classes: the tiles form the smoothing term of the gradient
    # as two float32 factors, grad_scale * eps / C and the weight; under 'mean' the first
    # is 1 / (N * weight) * eps / C, which underflowed, and the term was lost (9 % error
    # in the worst row at 1e38; found by a numerical review). Uniform weights change
    # nothing under 'mean': the oracle is the unweighted float64 gradient, row by row.
    # 'none' with that mean's scale as a per-position grad_output (no broadcast value:
    # each tile checks its positions) is the same gradient.
    x = rng.standard_normal(shape).astype(np.float32)
    target = rng.integers(0, 4, (shape[0],) + shape[2:])
    _, expected = cecore.cross_entropy(x.astype(np.float64), target, label_smoothing=0.01,
                                       return_grad=True, backend=backend)
    upstream = None if reduction == "mean" else np.full(target.shape, 1 / (target.size * weight))
    _, grad = cecore.cross_entropy(x, target, weight=np.full(4, weight), label_smoothing=0.01,
                                   reduction=reduction, grad_output=upstream, return_grad=True,
                                   backend=backend)
    err = np.abs(grad - expected).max(axis=1) / np.abs(expected).max(axis=1)
    assert err.max() < 1e-5, err.max()


@pytest.mark.parametrize("dtype, weight, logit", [(np.float32, [1e30, 1e-20, 1.0], -200.0),
                                                   (np.float64, [1e300, 1e-300, 1.0], -800.0)])
def test_label_smoothing_keeps_tiny_weights_next_to_huge_ones(backend, dtype, weight, logit):
    # Weights that are all normal numbers of the input's type are not rescaled: scaled by
    # the largest, a weight 2**126 times smaller (float32) became 0, and the gradient of
    # a class whose probability underflowed, -eps / C * scale * weight, became 0 too.
    x = np.zeros((4, 3), dtype)
    x[:, 1] = logit
    target, weight = np.array([0, 2, 0, 2]), np.array(weight)
    _, grad = cecore.cross_entropy(x, target, weight=weight, label_smoothing=0.1,
                                   reduction="sum", return_grad=True, backend=backend)
    _, expected = torch_cross_entropy(x.astype(np.float64), target, weight=weight,
                                      label_smoothing=0.1, reduction="sum")
    assert (expected[:, 1] < 0).all()
    np.testing.assert_allclose(grad[:, 1], expected[:, 1], rtol=1e-6)


def test_zero_classes_give_torchs_answers(backend):
    x = np.zeros((3, 0))
    tx = torch.zeros((3, 0), dtype=torch.float64)
    np.testing.assert_array_equal(cecore.logsumexp(x, axis=1, backend=backend),
                                  torch.logsumexp(tx, 1).numpy())
    for reduction in ("sum", "none", "mean"):
        loss, grad = cecore.cross_entropy(x, np.zeros((3, 0)), reduction=reduction,
                                          return_grad=True, backend=backend)
        expected = torch_cross_entropy(x, np.zeros((3, 0)), reduction=reduction)
        assert_close(loss, expected[0])
        assert grad.shape == (3, 0)
        # every target ignored: the only class-index targets zero classes allow
        loss = cecore.cross_entropy(x, np.full(3, -100), reduction=reduction, backend=backend)
        assert_close(loss, torch_cross_entropy(x, np.full(3, -100), reduction=reduction)[0])
    with pytest.raises(IndexError, match="out of bounds"):
        cecore.cross_entropy(x, np.zeros(3, int), backend=backend)
    for fn in (cecore.softmax, cecore.log_softmax):
        assert fn(x, axis=1, backend=backend).shape == (3, 0)
    # zero-size spatial dimensions
    loss = cecore.cross_entropy(np.zeros((2, 3, 0)), np.zeros((2, 0), int), backend=backend)
    assert_close(loss, torch_cross_entropy(np.zeros((2, 3, 0)), np.zeros((2, 0), int))[0])


@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_nll_loss_with_zero_classes_gives_torchs_answers(backend, reduction):
    # nll_loss picked class 0 of every (ignored) row: numpy's raw IndexError
    for x, t in ((np.zeros((3, 0)), np.full(3, -100)), (np.zeros(0), np.array(-100))):
        tx = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
        expected = torch.nn.functional.nll_loss(tx, torch.as_tensor(t), reduction=reduction)
        expected.sum().backward()
        loss, grad = cecore.nll_loss(x, t, reduction=reduction, return_grad=True,
                                     backend=backend)
        assert_close(loss, expected.detach().numpy())
        assert grad.shape == x.shape


def test_nll_loss_float_targets_are_not_sent_to_probabilities():
    # the shared check told nll_loss users to pass probabilities, which it does not take
    with pytest.raises(TypeError, match=r"must be integers, got floating point \(dtype float64\)$"):
        cecore.nll_loss(np.zeros((2, 3)), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"expected class indices of shape \(2,\)$"):
        cecore.nll_loss(np.zeros((2, 3)), np.zeros((2, 3), int))


def test_cli_zero_classes_is_a_one_line_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((5, 0), np.float32))
    np.save(tmp_path / "t.npy", np.zeros(5, int))
    code, out, err = _score([str(tmp_path / "x.npy"), str(tmp_path / "t.npy")], capsys)
    assert code == 1 and "have no classes" in err and err.count("\n") == 1


@pytest.mark.parametrize("grad_output", [np.ones(1), np.ones((1, 1))])
def test_grad_output_must_be_a_scalar_for_mean_and_sum_as_in_torch(backend, grad_output):
    x, t = np.zeros((3, 4)), np.array([0, 1, 2])
    for reduction in ("mean", "sum"):
        with pytest.raises(ValueError, match="grad_output must be a scalar"):
            cecore.cross_entropy(x, t, reduction=reduction, return_grad=True,
                                 grad_output=grad_output, backend=backend)
        xt = torch.zeros((3, 4), requires_grad=True)
        with pytest.raises(RuntimeError, match="Mismatch in shape"):  # the oracle agrees
            torch.nn.functional.cross_entropy(xt, torch.tensor(t), reduction=reduction
                                              ).backward(torch.tensor(grad_output))


# ------------------------------------------------------------------ scoring files
def test_score_reads_big_endian_logits_and_targets(tmp_path, rng, capsys):
    x = rng.standard_normal((500, 6)).astype(np.float32)
    t = rng.integers(0, 6, 500)
    expected = cecore.cross_entropy(x, t)
    assert batch.score(x.astype(">f4"), t.astype(">i8")).mean_loss == expected
    np.save(tmp_path / "x.npy", x.astype(">f4"))
    np.save(tmp_path / "t.npy", t.astype(">i4"))
    code, out, err = _score([str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json"], capsys)
    assert code == 0, err
    assert np.float32(json.loads(out)["mean_loss"]) == expected
    p = rng.dirichlet(np.ones(6), 500)
    assert batch.score(x.astype(">f4"), p.astype(">f8")).mean_loss == cecore.cross_entropy(x, p)


def test_json_has_null_not_nan_for_metrics_not_computed(tmp_path, rng, capsys):
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)).astype(np.float32))
    np.save(tmp_path / "t.npy", np.full(50, -100))  # all ignored: the mean loss is NaN
    code, out, err = _score([str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json",
                             "--no-accuracy"], capsys)
    assert code == 0, err
    result = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert result["accuracy"] is None and result["mean_loss"] is None


def test_damaged_npz_header_says_the_file_is_not_a_valid_array(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    data = (tmp_path / "bad.npz").read_bytes()
    i = data.index(b"{'descr'")
    (tmp_path / "bad.npz").write_bytes(data[:i + 5] + b"(((((" + data[i + 10:])
    np.save(tmp_path / "t.npy", np.zeros(3, int))
    code, out, err = _score([str(tmp_path / "bad.npz"), str(tmp_path / "t.npy")], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "is not a valid .npy/.npz array" in err and "EOF in multi-line" not in err


def test_dask_worker_errors_are_one_line_without_a_traceback(tmp_path, rng):
    np.save(tmp_path / "x.npy", rng.standard_normal((100, 5)).astype(np.float32))
    t = np.zeros(100, int)
    t[50] = 7  # found only by the worker that scores that chunk
    np.save(tmp_path / "t.npy", t)
    result = subprocess.run(
        [sys.executable, "-m", "cecore.cli", "score", str(tmp_path / "x.npy"),
         str(tmp_path / "t.npy"), "--dask", "local", "--workers", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 1
    assert result.stderr.startswith("cecore score: error: Target 7 is out of bounds")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_weight_and_bias_files_that_are_not_arrays(scored_files, capsys, tmp_path):
    _, _, d = scored_files
    os.mkfifo(d / "fifo.npy")  # reading it would block forever
    (d / "zeros.npy").write_bytes(bytes(100))
    for option, path, message in (("--weight", "fifo.npy", "is not a regular file"),
                                  ("--weight", "zeros.npy", "is not a valid .npy/.npz array")):
        code, out, err = _score([str(d / "x.npy"), str(d / "t.npy"), option, str(d / path)],
                                capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="is not a regular file"):
        batch.score(d / "x.npy", d / "t.npy", unembedding=np.ones((7, 7), np.float32),
                    bias=d / "fifo.npy")


def test_a_large_weight_or_bias_file_is_refused_before_it_is_read(scored_files, capsys):
    """--weight x.npy (the logits, given by mistake) was read whole into memory and
    refused only then: a 100 GB logits file would take the machine down first."""
    _, _, d = scored_files
    big = np.lib.format.open_memmap(d / "big.npy", "w+", np.float32, (20000, 5000))
    del big  # a 400 MB file, all but its header unwritten (sparse)
    for option in ("--weight", "--bias"):
        extra = [] if option == "--weight" else [
            "--hidden", str(d / "x.npy"), "--unembedding", str(d / "x.npy")]
        tracemalloc.start()
        try:
            code, out, err = _score(
                ([str(d / "x.npy")] if option == "--weight" else extra)
                + [str(d / "t.npy"), option, str(d / "big.npy")], capsys)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 1 and "holds an array of shape (20000, 5000)" in err, err
        assert peak < 50 << 20


def test_npy_header_with_a_negative_dimension(tmp_path, capsys):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-5, 10), }"
    header += " " * (118 - len(header)) + "\n"
    (tmp_path / "neg.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                       + header.encode())
    np.save(tmp_path / "t.npy", np.zeros(5, np.int64))
    code, _, err = _score([str(tmp_path / "neg.npy"), str(tmp_path / "t.npy")], capsys)
    assert code == 1 and "declares the shape (-5, 10)" in err


def test_result_to_a_full_disk_or_a_closed_pipe(scored_files):
    _, _, d = scored_files
    cmd = [sys.executable, "-m", "cecore.cli", "score", str(d / "x.npy"), str(d / "t.npy")]
    with open("/dev/full", "w") as full:
        p = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1 and "cannot write the result" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.Popen(cmd + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the result is printed
    assert p.wait() in (0, 141) and b"Traceback" not in p.stderr.read()


def test_closed_streams_and_info_to_a_full_disk(scored_files):
    # (hostile review) stderr closed: 'NoneType' has no isatty, exit 1 and no scoring;
    # stdout closed: exit 0 with the result thrown away; `cecore info` to a full disk or a
    # closed pipe: tracebacks
    _, _, d = scored_files
    cmd = f"'{sys.executable}' -m cecore.cli score '{d / 'x.npy'}' '{d / 't.npy'}'"
    p = subprocess.run(cmd + " 2>&-", shell=True, capture_output=True, text=True)
    assert p.returncode == 0 and "mean loss" in p.stdout
    p = subprocess.run(cmd + " >&-", shell=True, capture_output=True, text=True)
    assert p.returncode == 1 and "stdout is closed" in p.stderr
    for command in ("info", "demo --datasets iris"):  # they exited 0, having printed nothing
        p = subprocess.run(f"'{sys.executable}' -m cecore.cli {command} >&-", shell=True,
                           capture_output=True, text=True)
        assert p.returncode == 1 and "stdout is closed" in p.stderr, (command, p.stderr)
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "cecore.cli", "info"], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1 and "cannot write the output" in p.stderr
    assert "Traceback" not in p.stderr


def test_the_per_row_temporary_is_pending_before_it_exists(tmp_path, monkeypatch):
    # A signal handled between creating the hidden temporary file and noting it for the
    # handler to remove left it behind (a CI run: SIGXCPU sent as soon as it appeared).
    # Likewise a Ctrl-C landing there, before atomic_npy's own cleanup could run.
    from cecore import _io
    from cecore.cli import main

    np.save(tmp_path / "x.npy", np.zeros((5, 3), np.float32))
    np.save(tmp_path / "t.npy", np.zeros(5, np.int64))
    real_open, seen = os.open, []

    def interrupted(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith(".tmp"):
            seen.append(str(path) in _io.PENDING)
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(os, "open", interrupted)
    code = main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--per-row-out",
                 str(tmp_path / "o.npy")])
    assert code == 130 and seen == [True]
    assert sorted(os.listdir(tmp_path)) == ["t.npy", "x.npy"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGALRM",
                                     "SIGXCPU"])
def test_sigterm_removes_the_partial_per_row_file(tmp_path, signame):
    # SIGHUP: a terminal or ssh session that closes (it left a hidden file behind);
    # SIGUSR1, SIGALRM and SIGXCPU (a CPU-time limit) left it too
    import signal
    import time

    signum = getattr(signal, signame)

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((200000, 50)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 50, 200000))
    (tmp_path / "out").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "cecore.cli", "score", str(tmp_path / "x.npy"),
                          str(tmp_path / "t.npy"), "--memory-budget", "1B", "--per-row-out",
                          str(tmp_path / "out" / "o.npy")], stderr=subprocess.PIPE,
                         # as from a terminal: the signal's default action (under nohup,
                         # as CI may run, SIGHUP is ignored, and cecore leaves it so)
                         preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not os.listdir(tmp_path / "out") and time.monotonic() < deadline:
        time.sleep(0.05)  # until the temporary file exists
    assert os.listdir(tmp_path / "out"), "the command did not start writing"
    p.send_signal(signum)
    code = p.wait(timeout=60)
    assert code == 128 + signum, p.stderr.read()
    assert os.listdir(tmp_path / "out") == []


def test_demo_rejects_bad_options():
    for option, value in (("-C", "0"), ("-C", "nan"), ("--tol", "-1"), ("--tol", "inf")):
        p = subprocess.run([sys.executable, "-m", "cecore.cli", "demo", option, value],
                           capture_output=True, text=True)
        assert p.returncode == 2 and "must be a finite number > 0" in p.stderr
        assert "Traceback" not in p.stderr


@pytest.mark.parametrize("bins", ["0", "10001", "100000000"])
def test_ece_bins_out_of_range_is_refused_at_once(scored_files, capsys, bins):
    _, _, d = scored_files
    code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--ece-bins", bins], capsys)
    assert code == 1 and "--ece-bins must be an int in [1, 10000]" in err


def test_memory_budget_holds_for_narrow_logits(tmp_path):
    """Two classes: the per-row arrays outweigh the logits (the chunks were sized as if
    they did not: 440 MB at a 200MB budget). Peak RSS of a child above its baseline."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((20_000_000, 2)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 2, 20_000_000))
    code = textwrap.dedent(f"""
        import numpy as np
        from cecore.batch import score
        score(np.zeros((10, 2), np.float32), np.zeros(10, int))  # imports, kernels
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # high-water mark := current RSS
        base = status("VmRSS")
        score("{tmp_path / 'x.npy'}", "{tmp_path / 't.npy'}", memory_budget="200MB")
        print(status("VmHWM") - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 0 < int(out) < 220e6, out


def test_score_takes_tensors_that_require_grad_bytes_paths_and_rejects_none(tmp_path):
    x = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 4, (50,))
    assert batch.score(x, t).mean_loss == cecore.cross_entropy(x.detach().numpy(), t.numpy())
    with pytest.raises(TypeError, match="got None"):
        batch.score(x, None)
    np.save(tmp_path / "x.npy", x.detach().numpy())
    np.save(tmp_path / "t.npy", t.numpy())
    assert batch.score(os.fsencode(tmp_path / "x.npy"), os.fsencode(tmp_path / "t.npy")
                       ).mean_loss == cecore.cross_entropy(x.detach().numpy(), t.numpy())


def test_per_row_out_only_replaces_an_earlier_npy_file(scored_files, capsys):
    x, t, d = scored_files
    (d / "config.txt").write_text("keep me\n")  # say, a mistyped path to a config file
    code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                           str(d / "config.txt")], capsys)
    assert code == 1 and "is not a .npy file" in err and err.count("\n") == 1
    assert (d / "config.txt").read_text() == "keep me\n"
    for name in ("old.npy", "empty.npy"):
        if name == "old.npy":
            np.save(d / name, np.zeros(3))
        else:
            (d / name).touch()
        code, _, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out",
                               str(d / name)], capsys)
        assert code == 0, err
        np.testing.assert_array_equal(np.load(d / name), cecore.cross_entropy(x, t, reduction="none"))


def test_messages_for_odd_paths(scored_files, capsys, tmp_path):
    """A zip with no arrays, an empty output path and a symlink loop were reported as
    'holds arrays []: choose one', ' exists and is not a regular file' and 'no such file'."""
    import zipfile

    _, _, d = scored_files
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as z:
        z.writestr("readme.txt", "not an array")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    for args, message in (
            ([str(tmp_path / "notes.zip"), str(d / "t.npy")], "with no .npy arrays in it"),
            ([str(d / "x.npy"), str(d / "t.npy"), "--per-row-out", ""], "output path is empty"),
            ([str(tmp_path / "loop_a"), str(d / "t.npy")], "a symbolic link to a missing file")):
        code, out, err = _score(args, capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err


def test_logits_file_given_as_the_targets_too(scored_files, capsys, tmp_path):
    """`cecore score x.npy x.npy` scored the logits as their own probability targets,
    silently (mean loss -5.97, perplexity 0.0025); members of one .npz are fine."""
    _, _, d = scored_files
    x = np.load(d / "x.npy")
    np.savez(tmp_path / "both.npz", logits=x, target=np.exp(x) / np.exp(x).sum(1, keepdims=True))
    code, out, err = _score([str(d / "x.npy"), str(d / "x.npy")], capsys)
    assert code == 1 and "the logits and the targets are the same array" in err
    code, out, err = _score([f"{tmp_path / 'both.npz'}:logits", f"{tmp_path / 'both.npz'}:target"],
                            capsys)
    assert code == 0, err


@pytest.mark.parametrize("value, error", [
    ("0", "Number of threads"),
    # Numba took it, and every parallel call raised "Invalid number of threads. This
    # likely indicates a bug in Numba." (hostile review)
    (str(2**31), f"NUMBA_NUM_THREADS={2**31} does not fit in a C int")])
def test_info_with_a_bad_numba_setting(value, error):
    # NUMBA_NUM_THREADS=0 made `cecore info` (and show_config) end in a traceback, with
    # nothing printed, Cython's backend included: a ValueError from importing Numba was
    # taken for a bad CECORE_SIMD.
    env = {**subprocess_env(), "NUMBA_NUM_THREADS": value}
    out = subprocess.run([sys.executable, "-m", "cecore.cli", "info"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "cython: available=True" in out.stdout
    assert f"numba: available=False, error=ValueError: {error}" in out.stdout


@pytest.mark.parametrize("var", ["CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"])
@pytest.mark.parametrize("value", ["\u00b2", "0", "-1", "abc", "1e3", "", " "])
def test_odd_thread_variables_are_ignored(monkeypatch, var, value):
    # "²" passed str.isdigit() and then crashed every call with n_threads=None in int().
    # cecore's own variable, set to something else than a positive integer, is ignored
    # with a warning (once per value); it was ignored silently.
    from cecore import _config

    for name in ("CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_config, "_ignored_values", set())
    monkeypatch.setenv(var, value)
    if var == "CECORE_NUM_THREADS" and value:
        with pytest.warns(RuntimeWarning, match="CECORE_NUM_THREADS=.* is not a positive "
                                                "integer; ignored"):
            assert _config._env_threads() == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _config._env_threads() == (None, None)
    monkeypatch.setenv(var, "3")
    assert _config._env_threads() == (var, 3)


def test_only_omp_num_threads_is_a_list(monkeypatch):
    # OMP_NUM_THREADS may list a count per nesting level ("4,2": 4 outside); cecore's
    # own variable was read the same way, so "1,2" meant 1 and ",2" or " " were ignored
    # without the warning the README promises (hostile review).
    from cecore import _config

    for name in ("CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_config, "_ignored_values", set())
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1,2")  # Numba refuses it: skipped
    assert _config._env_threads() == (None, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert _config._env_threads() == ("OMP_NUM_THREADS", 4)
    for value in ("1,2", ",2"):
        monkeypatch.setenv("CECORE_NUM_THREADS", value)
        with pytest.warns(RuntimeWarning, match=f"CECORE_NUM_THREADS='{value}' is not"):
            assert _config._env_threads() == ("OMP_NUM_THREADS", 4)


def test_numba_disable_jit_leaves_the_cython_backend():
    # Under NUMBA_DISABLE_JIT=1 the Numba backend loaded and every call failed with
    # "<intrinsic _view> is not usable in pure-python".
    code = ("import numpy as np, cecore\n"
            "print(cecore.available_backends())\n"
            "print(cecore.cross_entropy(np.zeros((2, 3)), np.zeros(2, np.int64)))\n"
            "cecore.cross_entropy(np.zeros((2, 3)), np.zeros(2, np.int64), backend='numba')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**subprocess_env(), "NUMBA_DISABLE_JIT": "1"}, timeout=120)
    assert out.stdout.split("\n")[:2] == ["['cython']", repr(float(np.log(3)))], out
    assert "RuntimeError: the 'numba' backend is unavailable: ImportError: NUMBA_DISABLE_JIT" \
        in out.stderr


def test_no_rows_of_a_huge_declared_class_count(tmp_path):
    # A 128-byte .npy declaring (0, 3e8) made `cecore score` fill a 2.4 GB vector of class
    # weights (6.8 s) before finding nothing to score.
    with open(tmp_path / "x.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (0, 3 * 10**8)})
    np.save(tmp_path / "t.npy", np.zeros(0, np.int64))
    tracemalloc.start()
    try:
        result = batch.score(tmp_path / "x.npy", tmp_path / "t.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.rows == 0 and np.isnan(result.mean_loss) and result.n_classes == 3 * 10**8
    assert peak < 10**7, peak
    with pytest.raises(ValueError, match="for all 300000000 classes"):
        batch.score(tmp_path / "x.npy", tmp_path / "t.npy", weight=np.ones(3))


def test_score_in_memory_misuse():
    # Both were silent: a bias without its unembedding was dropped (the command line
    # refuses it), and the logits passed as their own targets were scored as
    # probabilities (mean loss -85.75).
    x = np.random.default_rng(0).standard_normal((5, 3))
    with pytest.raises(ValueError, match="bias is the unembedding's"):
        batch.score(x, np.zeros(5, np.int64), bias=np.zeros(3))
    for target in (x, x[:, :], np.asarray(x)):
        with pytest.raises(ValueError, match="the logits and the targets are the same array"):
            batch.score(x, target)
    p = np.full((5, 3), 1 / 3)
    assert batch.score(x, p).mean_loss == pytest.approx(cecore.cross_entropy(x, p))


def _npy_header(shape, descr="<f4"):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def test_npz_members_whose_header_or_directory_lies_about_their_size(tmp_path, capsys):
    # A 340-byte compressed .npz whose member declares (2, 10**8) took `cecore score` to
    # 820 MB (class weights and a chunk buffer of the declared size) before it found the
    # member truncated; a stored member whose zip directory overstates its size got
    # NumPy's bare "buffer is smaller than requested size".
    import zipfile
    target = tmp_path / "t.npy"
    np.save(target, np.zeros(2, np.int64))
    with zipfile.ZipFile(tmp_path / "packed.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_header((2, 10**8)))
    with zipfile.ZipFile(tmp_path / "stored.npz", "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", _npy_header((1000, 5)) + bytes(100))
    tracemalloc.start()
    try:
        for name in ("packed.npz", "stored.npz"):
            code, out, err = _score([str(tmp_path / name), str(target)], capsys)
            assert code == 1 and err.count("\n") == 1, err
            assert f"{name}:x is truncated or damaged: the array needs" in err, err
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10**7, peak
    # an honest compressed member still streams, and gives the in-memory result
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((600, 5)).astype(np.float32), rng.integers(0, 5, 600)
    np.savez_compressed(tmp_path / "ok.npz", x=x, t=t)
    streamed = batch.score(f"{tmp_path / 'ok.npz'}:x", f"{tmp_path / 'ok.npz'}:t")
    assert streamed.mean_loss == cecore.cross_entropy(x, t)


@pytest.mark.parametrize("option", ["--weight", "--bias"])
def test_weight_and_bias_files_with_damaged_headers_name_the_option(scored_files, capsys,
                                                                    option):
    # A header Python cannot tokenize, or with a shape past C long, leaked the raw
    # "('EOF in multi-line statement', (2, 0))" or "Python int too large to convert to
    # C long", naming no file.
    _, _, d = scored_files
    (d / "tok.npy").write_bytes(b"\x93NUMPY\x01\x00\x46\x00{'descr': '<f8', 'fortran_order': "
                                b"False, 'shape': ((3,), }" + b" " * 9 + b"\n")
    (d / "huge.npy").write_bytes(_npy_header((10**30,), "<f8"))
    np.save(d / "two_d.npy", np.ones((7, 1)))
    extra = [] if option == "--weight" else [
        "--hidden", str(d / "x.npy"), "--unembedding", str(d / "x.npy")]
    first = [str(d / "x.npy")] if option == "--weight" else []
    for path, message in (("tok.npy", "is not a valid .npy/.npz array"),
                          ("huge.npy", "is truncated or damaged"),
                          ("two_d.npy", "expected a 1-D array")):
        code, out, err = _score([*first, str(d / "t.npy"), *extra, option, str(d / path)],
                                capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert message in err and (option if option == "--weight" else "bias") in err, err


def test_score_takes_logits_and_targets_that_share_a_buffer_but_no_element():
    # Fields of one record array, or interleaved views, were refused as "the same array"
    # (np.may_share_memory compares bounds only).
    rng = np.random.default_rng(0)
    rec = np.zeros(500, [("x", "f4", (5,)), ("t", "i8")])
    rec["x"], rec["t"] = rng.standard_normal((500, 5)), rng.integers(0, 5, 500)
    assert batch.score(rec["x"], rec["t"]).mean_loss == cecore.cross_entropy(
        np.ascontiguousarray(rec["x"]), rec["t"])
    z = rng.random((500, 2, 5))
    z[:, 1] /= z[:, 1].sum(axis=1, keepdims=True)
    assert batch.score(z[:, 0], z[:, 1]).mean_loss == pytest.approx(
        cecore.cross_entropy(z[:, 0], z[:, 1]), rel=1e-12)
    with pytest.raises(ValueError, match="the logits and the targets are the same array"):
        batch.score(z[:, 0], z[:, 0, :])


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_reductions_of_non_finite_and_huge_losses_are_torchs_without_warnings(backend):
    # math.fsum raised "-inf + inf in fsum" when +inf and -inf losses fell in different
    # blocks of REDUCE_BLOCK positions, and "intermediate overflow" for a finite sum past
    # float64's range; NumPy's RuntimeWarnings leaked from the block sums and the final
    # cast (errors under np.errstate(all="raise") or -W error). Oracle: torch.
    n = 20000  # rows of class 1 start past the first block
    t = (np.arange(n) >= n // 2).astype(np.int64)
    cases = [
        (np.zeros((n, 2)), dict(weight=np.array([np.inf, -np.inf]))),
        (np.tile([1e308, -1e308], (n, 1)), {}),
        (np.tile([0.0, -1e308], (n, 1)), {}),
        (np.tile([0.0, -1e305], (n, 1)), {}),  # blocks of finite sums, a total past the range
        (np.array([[np.inf, 0.0], [0.0, -np.inf]], np.float32), {}),
        (np.array([[3e38, -3e38], [-3e38, 3e38]], np.float32), {}),  # float32 overflow
    ]
    for x, kwargs in cases:
        target = t if len(x) == n else np.array([1, 0])
        for reduction in ("sum", "mean"):
            with warnings.catch_warnings(), np.errstate(all="raise"):
                warnings.simplefilter("error")
                got = cecore.cross_entropy(x, target, reduction=reduction, backend=backend,
                                           **kwargs)
            expected = torch_cross_entropy(x, target, reduction=reduction, **kwargs)[0]
            np.testing.assert_array_equal(got, expected)
    # the other entry points, on the cases that warned (values checked elsewhere)
    x = np.array([[np.inf, 0.0], [0.0, -np.inf], [3e38, -3e38]], np.float32)
    t, w = np.array([0, 1, 1]), np.array([np.inf, -np.inf])
    p = np.array([[1e308, 0.0], [np.inf, 1.0], [0.5, 0.5]])
    calls = [lambda: cecore.nll_loss(x, t, reduction="sum", return_grad=True),
             lambda: cecore.cross_entropy(x, p, weight=w, return_grad=True),
             lambda: cecore.binary_cross_entropy_with_logits(x, x, weight=w, pos_weight=w),
             lambda: cecore.linear_cross_entropy(x, np.eye(2, dtype=np.float32), t, weight=w,
                                                 reduction="sum", return_grad=True),
             lambda: cecore.log_softmax(np.array([6e4, -6e4], np.float16)),  # -inf
             lambda: batch.score(x, p), lambda: batch.score(x, t, weight=w)]
    for call in calls:
        with warnings.catch_warnings(), np.errstate(all="raise"):
            warnings.simplefilter("error")
            call()
    # what fsum gave for finite sums is unchanged: exactly rounded
    assert cecore._reduce.combine([1e308, 1e308, -1e308]) == 1e308
    assert cecore._reduce.combine([0.1] * 10) == 1.0


@pytest.mark.parametrize("numba_threads", [None, "1"])
def test_threadpool_limits_hold_from_the_first_call(numba_threads):
    # threadpoolctl limits the OpenMP runtimes loaded when its block is entered; cecore's
    # was loaded by the first kernel call, so a block around a fresh process's first
    # calls did not limit them (2 threads inside threadpool_limits(1)). And
    # NUMBA_NUM_THREADS applied only until the Cython kernels had loaded the runtime.
    code = textwrap.dedent("""
        import numpy as np, cecore
        from threadpoolctl import threadpool_limits
        from cecore._config import cpus_available, default_n_threads
        seen = []
        with threadpool_limits(1, user_api="openmp"):
            seen.append(default_n_threads())
            cecore.cross_entropy(np.zeros((4, 3), np.float32), np.zeros(4, int),
                                 backend="cython")
            seen.append(default_n_threads())
        seen.append(default_n_threads())
        print(seen, cpus_available())
    """)
    env = subprocess_env()
    for name in ("CECORE_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(name, None)
    if numba_threads:
        env["NUMBA_NUM_THREADS"] = numba_threads
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    seen, cpus = out.stdout.rsplit(" ", 1)
    after = 1 if numba_threads else int(cpus)
    assert seen == f"[1, 1, {after}]", out.stdout


def _fork_while_held(lock, child, setup=""):
    """Run ``child`` (code that exits 0 when it computed the right answer) in a process
    forked while another thread holds ``lock`` (an expression, run after ``setup``); True
    if the child exited 0, where a child that inherited the held lock waits until its
    alarm (SIGALRM)."""
    code = textwrap.dedent("""
        import os, signal, threading, numpy as np, cecore
        from cecore import _backends, _config, _io, batch
        {setup}
        held, done = threading.Event(), threading.Event()
        def hold():
            with {lock}:
                held.set(); done.wait()
        threading.Thread(target=hold).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a hung child must not outlive the test
            {child}
        done.set()
        print(os.waitpid(pid, 0)[1])
    """).format(lock=lock, child=child, setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "0"


def test_a_child_forked_while_a_backend_loads_does_not_hang():
    # The backend registry's lock was held for the whole import of a backend (0.3 s for
    # Numba); a child forked in that window inherited it held by a thread it does not
    # have, and its first call waited forever. Here a thread holds the lock across fork.
    assert _fork_while_held("_backends._lock", (
        "loss = cecore.cross_entropy(np.zeros((4, 3)), np.zeros(4, int), backend='cython'); "
        "os._exit(0 if abs(loss - np.log(3)) < 1e-12 else 3)"))


def test_a_child_forked_while_a_head_reads_its_weight_does_not_hang(tmp_path):
    # Scoring hidden states, one thread reads the unembedding under a lock while others
    # wait; a child forked then inherited that lock held (review of the fix that added it).
    np.savez_compressed(tmp_path / "w.npz", w=np.eye(3, dtype=np.float32))
    assert _fork_while_held("batch._HEAD_LOCK", (
        f"head = batch.LinearHead(_io.open_array({str(tmp_path / 'w.npz')!r})); "
        "out = head.logits(np.ones((2, 3), np.float32)); "
        "os._exit(0 if out.tolist() == [[1, 1, 1], [1, 1, 1]] else 3)"))


def test_a_child_forked_during_a_fits_blas_limit_does_not_hang():
    # limit_blas's lock was not made anew after fork: a child forked while another thread
    # held it (a fit entering or leaving its BLAS limit) waited forever in its own fit.
    assert _fork_while_held("_config._blas_lock", (
        "from sklearn.datasets import load_iris; "
        "X, y = load_iris(return_X_y=True); "
        "model = cecore.SoftmaxClassifier(max_iter=5).fit(X, y); "
        "os._exit(0 if model.score(X, y) > 0.5 else 3)"))


def test_a_child_forked_inside_a_blas_limit_gets_the_limits_from_before():
    # Forked while another thread's call held BLAS to one thread, the child kept that
    # limit for good: the count of calls inside limit_blas came with it, so none of the
    # child's calls was the last to leave, which restores the limits.
    code = textwrap.dedent("""
        import json, os, signal, threading
        from threadpoolctl import threadpool_info
        from cecore import _config
        def blas():
            return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        seen, held, done = {"before": blas()}, threading.Event(), threading.Event()
        def hold():
            with _config.limit_blas(1):
                held.set(); done.wait()
        threading.Thread(target=hold).start()
        held.wait()
        seen["inside"] = blas()
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)
            print(json.dumps({"child": blas()}), flush=True)
            os._exit(0)
        done.set()
        seen["status"] = os.waitpid(pid, 0)[1]
        print(json.dumps(seen))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    seen = {k: v for line in out.stdout.splitlines() for k, v in json.loads(line).items()}
    assert seen["status"] == 0 and set(seen["inside"]) == {1}, seen
    assert seen["child"] == seen["before"], seen


@pytest.mark.parametrize("xdg", ["", "relative/dir"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(tmp_path, xdg):
    # XDG_CACHE_HOME="" put the Numba cache in ./cecore/numba, a folder that then
    # shadowed the package (import cecore found a namespace package without
    # cross_entropy). The XDG spec says to ignore empty and relative values.
    from cecore._numba import _math

    code = textwrap.dedent(f"""
        from cecore._numba._runtime import _CacheLocator
        import cecore._numba._math as m
        print(_CacheLocator.from_function(m._bce_f64, {_math.__file__!r})._cache_path)
    """)
    env = {**subprocess_env(), "XDG_CACHE_HOME": xdg, "HOME": str(tmp_path / "home"),
           "NUMBA_CACHE_DIR": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path / "home" / ".cache" / "cecore" / "numba")), out.stdout
    assert not (tmp_path / "cecore").exists() and not (tmp_path / "relative").exists()


def test_weight_from_an_npz_member(scored_files, capsys):
    # --weight FILE.npz:NAME was read as a list of numbers ("neither a file nor a
    # comma-separated list"): the option tested os.path.exists before reading a file.
    x, t, d = scored_files
    w = np.linspace(0.5, 2, 7)
    np.savez(d / "weights.npz", w=w, other=np.ones(3))
    outs = []
    for spec in (f"{d / 'weights.npz'}:w", ",".join(repr(float(v)) for v in w)):
        code, out, err = _score([str(d / "x.npy"), str(d / "t.npy"), "--weight", spec,
                                 "--json"], capsys)
        assert code == 0, err
        outs.append(json.loads(out)["mean_loss"])
    assert outs[0] == outs[1] == pytest.approx(cecore.cross_entropy(x, t, weight=w), rel=1e-6)


_LSE = textwrap.dedent("""
    import numpy as np, cecore
    x = np.arange(80.0).reshape(2, 40)
    for a in (x, x.astype(np.float32)):
        print(repr(cecore.logsumexp(a, axis=1, backend="numba", n_threads=1).tolist()))
""")


def _run_lse(env, cwd=None):
    return subprocess.run([sys.executable, "-c", _LSE], capture_output=True, text=True,
                          env={**subprocess_env(), **env}, cwd=cwd, timeout=300)


@pytest.mark.parametrize("damage", ["empty index", "garbage data", "swapped data"])
def test_a_damaged_numba_cache_entry_is_recompiled(tmp_path, damage):
    # A truncated or garbage index or data file raised EOFError / UnpicklingError from
    # the call in every later process (nothing repaired it), and data files swapped
    # between two keys raised "can't unbox array". Now a miss: compiled and rewritten.
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = _run_lse(env)
    assert first.returncode == 0, first.stderr
    lse = f"{tmp_path}/cache/*/_kernels._logsumexp_rows_serial-*"
    index, = glob.glob(lse + ".nbi")
    data = sorted(glob.glob(lse + ".nbc"))
    assert len(data) == 2
    if damage == "empty index":
        open(index, "w").close()
    elif damage == "garbage data":
        for path in data:
            with open(path, "wb") as f:
                f.write(os.urandom(100))
    else:
        os.rename(data[0], str(tmp_path / "swap"))
        os.rename(data[1], data[0])
        os.rename(str(tmp_path / "swap"), data[1])
    for _ in range(2):  # the damaged process, then one that loads the rewritten entry
        out = _run_lse(env)
        assert out.returncode == 0, out.stderr
        assert out.stdout == first.stdout


def test_an_unwritable_numba_cache_costs_the_cache_not_the_result(tmp_path):
    # NUMBA_CACHE_DIR relative, then a chdir to where it cannot be made (a file is in
    # the way): Numba let the OSError out of the kernel call, every time. Also what a full
    # disk did.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "rc").write_text("in the way")
    code = "import os, cecore._numba; os.chdir(os.environ['GO_TO'])\n" + _LSE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**subprocess_env(), "NUMBA_CACHE_DIR": "rc",
                              "GO_TO": str(tmp_path / "b")},
                         cwd=tmp_path / "a", timeout=300)
    assert out.returncode == 0, out.stderr
    x = np.arange(80.0).reshape(2, 40)
    m = x.max(axis=1)
    reference = np.log(np.exp(x - m[:, None]).sum(axis=1)) + m  # naive float64
    np.testing.assert_allclose(eval(out.stdout.splitlines()[0]), reference, rtol=1e-14)
    assert out.stderr.count("cannot write its Numba cache") == 1, out.stderr


def test_the_tmp_cache_is_used_only_when_private(tmp_path):
    # The last-resort cache, <tmp>/cecore-numba-<uid>, has a guessable name: a directory
    # someone else made there, or one others can write to, could hold pickles that run
    # their code when loaded. This user's own is emptied (unread) and made private;
    # another user's is not used, a new private one is.
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    planted = tmp / f"cecore-numba-{os.getuid()}"
    (planted / "_numba_x").mkdir(parents=True)
    (planted / "_numba_x" / "planted.nbi").write_bytes(b"not a pickle")
    planted.chmod(0o777)
    home.mkdir()
    (home / ".cache").write_text("a file: no user cache")
    code = _LSE + "from cecore._numba import _runtime\nprint(_runtime._tmp_dir)\n"
    env = {**subprocess_env(), "HOME": str(home), "TMPDIR": str(tmp), "NUMBA_CACHE_DIR": ""}
    env.pop("XDG_CACHE_HOME", None)
    for _ in range(2):  # emptied and made private, then used as it is
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == str(planted)
        assert stat.S_IMODE(planted.stat().st_mode) == 0o700
        assert not (planted / "_numba_x").exists() and any(planted.iterdir())


def test_another_users_tmp_cache_is_not_used(tmp_path, monkeypatch):
    # Made by this process's user, the directory belongs to "another user" once getuid
    # says otherwise: left alone (not emptied, not used), and a new private one is made.
    from cecore._numba import _runtime

    other_uid = os.getuid() + 1
    planted = tmp_path / f"cecore-numba-{other_uid}"
    planted.mkdir()
    (planted / "planted.nbi").write_bytes(b"not a pickle")
    planted.chmod(0o777)
    monkeypatch.setattr(_runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(_runtime.os, "getuid", lambda: other_uid)
    monkeypatch.setattr(_runtime, "_tmp_dir", None)
    used = _runtime._private_tmp_dir()
    assert os.path.dirname(used) == str(tmp_path) and used != str(planted)
    assert stat.S_IMODE(os.stat(used).st_mode) == 0o700
    assert (planted / "planted.nbi").exists() and stat.S_IMODE(planted.stat().st_mode) == 0o777


def test_no_usable_temporary_directory_means_no_cache():
    # tempfile.gettempdir raises FileNotFoundError when no candidate is writable (a
    # read-only /tmp, HOME and working directory): that escaped the cache locator and made
    # the Numba backend unavailable; and with no directory of cecore's, Numba's own
    # locators decided, which on a read-only installation raise (hostile reviews). The
    # kernels compile uncached, with a warning.
    code = textwrap.dedent("""
        import os, tempfile, warnings
        os.environ.pop("NUMBA_CACHE_DIR", None)
        os.environ["HOME"] = os.environ["XDG_CACHE_HOME"] = "/proc/self/no-home"
        def none_usable():
            raise FileNotFoundError("No usable temporary directory found")
        tempfile.gettempdir = none_usable
        from numba.core import caching  # a read-only installation: no __pycache__ either
        caching.InTreeCacheLocator.from_function = classmethod(lambda cls, f, p: None)
        import numpy as np, cecore
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(cecore.logsumexp(np.zeros((2, 3)), backend="numba", n_threads=1)[0])
        print(sum("cannot write its Numba cache" in str(w.message) for w in caught) >= 1)
    """)
    env = {k: v for k, v in subprocess_env().items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    value, warned = out.stdout.split()
    assert float(value) == pytest.approx(np.log(3)) and warned == "True"


def test_score_chunk_refuses_a_chunk_unlike_its_options(backend):
    # score_chunk (public, per chunk) took any chunk: the kernels index the class weights
    # by target, so a chunk of 100 classes for options of 7 read past the weights (loss 0
    # for log(100)) and one of 3e6 classes crashed the process; a probability-target
    # chunk for index options failed in a reshape.
    opts = batch.prepare_options((100, 7), np.float32, (100,), np.int64, backend=backend)
    for x, t, match in ((np.zeros((1, 100), np.float32), np.array([99]), r"shape \(rows, 7\)"),
                        (np.zeros(7, np.float32), np.array([1]), r"shape \(rows, 7\)"),
                        (np.zeros((3, 7), np.float32), np.zeros((3, 7)), r"must have shape \(3,\)"),
                        (np.zeros((3, 7), np.float32), np.zeros(2, int), r"must have shape \(3,\)")):
        with pytest.raises(ValueError, match=match):
            batch.score_chunk(x, t, opts, opts.new_sums())
    proba = batch.prepare_options((100, 7), np.float32, (100, 7), np.float32, backend=backend)
    with pytest.raises(ValueError, match=r"its logits' shape \(3, 7\)"):
        batch.score_chunk(np.zeros((3, 7), np.float32), np.zeros(3, int), proba,
                          proba.new_sums())
    empty = batch.prepare_options((0, 7), np.float32, (0,), np.int64, backend=backend)
    with pytest.raises(ValueError, match="prepared for an input of no rows"):
        batch.score_chunk(np.zeros((3, 7), np.float32), np.zeros(3, int), empty,
                          empty.new_sums())
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    t = np.arange(5)
    loss = batch.score_chunk(x, t, opts, opts.new_sums())  # a matching chunk still scores
    np.testing.assert_allclose(loss, cecore.cross_entropy(x, t, reduction="none"), rtol=1e-6)


def test_readers_refuse_rows_out_of_range(tmp_path):
    # MappedArray.rows(-1, 1) read the .npy header as two rows of data, and rows(5, 2) gave
    # the rows from 5 to the end; every reader now checks its range.
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    np.save(tmp_path / "x.npy", x)
    np.savez_compressed(tmp_path / "x.npz", x=x)
    for source in (batch.open_array(tmp_path / "x.npy"), batch.open_array(f"{tmp_path}/x.npz:x"),
                   batch.InMemoryArray(x)):
        for start, stop in ((-1, 1), (5, 2), (0, 8)):
            with pytest.raises(ValueError, match=f"rows {start}:{stop} of an array of 7 rows"):
                source.rows(start, stop)
        np.testing.assert_array_equal(source.rows(0, 7), x)


def test_a_corrupt_compressed_member_names_its_file(tmp_path, capsys):
    # A CRC error said "Bad CRC-32 for file 'arr_0.npy'", the member name of every
    # np.savez array: which of the two inputs was damaged, it did not say.
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "x.npz", rng.standard_normal((2000, 50)).astype(np.float32))
    np.savez_compressed(tmp_path / "t.npz", rng.integers(0, 50, 2000))
    data = bytearray((tmp_path / "t.npz").read_bytes())
    data[len(data) // 2:len(data) // 2 + 40] = bytes(40)
    (tmp_path / "t.npz").write_bytes(bytes(data))
    code, out, err = _score([str(tmp_path / "x.npz"), str(tmp_path / "t.npz")], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{tmp_path / 't.npz'}: member arr_0.npy" in err, err


def test_commands_other_than_score_print_warnings_as_one_line(monkeypatch, capsys):
    # `cecore info` with a bad CECORE_NUM_THREADS printed Python's two-line warning,
    # naming the entry-point script's line.
    monkeypatch.setenv("CECORE_NUM_THREADS", "abc")
    assert main(["info"]) == 0
    err = capsys.readouterr().err
    assert err == "cecore info: warning: CECORE_NUM_THREADS='abc' is not a positive " \
                  "integer; ignored\n", err
