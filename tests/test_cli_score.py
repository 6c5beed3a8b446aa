"""``cecore score``: output formats, the per-row file, and one-line errors on bad input.

Oracle: cecore.cross_entropy on the whole array in memory (bitwise) and a naive argmax.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cecore
from cecore.cli import main
from oracle import random_index_target, subprocess_env


@pytest.fixture
def files(tmp_path, rng):
    x = (2 * rng.standard_normal((20000, 12))).astype(np.float32)
    t = random_index_target(rng, 20000, 12, p_ignore=0.1)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    return x, t, str(tmp_path / "x.npy"), str(tmp_path / "t.npy")


def test_json_output_equals_in_memory(files, capsys):
    x, t, xp, tp = files
    w = [1.0 + i / 10 for i in range(12)]
    code = main(["score", xp, tp, "--json", "--weight", ",".join(map(str, w)),
                 "--label-smoothing", "0.1", "--memory-budget", "100KB"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""  # not a terminal: no progress bar
    result = json.loads(out)
    expected = cecore.cross_entropy(x, t, weight=np.array(w), label_smoothing=0.1)
    assert np.float32(result["mean_loss"]) == expected
    keep = t != -100
    assert result["rows"] == 20000 and result["rows_ignored"] == 20000 - keep.sum()
    assert result["accuracy"] == np.mean(np.argmax(x, axis=1)[keep] == t[keep])


def test_text_output_and_per_row_file(files, capsys, tmp_path):
    x, t, xp, tp = files
    np.save(tmp_path / "w.npy", np.linspace(0.5, 2.0, 12))
    out_path = tmp_path / "rows.npy"
    code = main(["score", xp, tp, "--weight", str(tmp_path / "w.npy"), "--per-row-out",
                 str(out_path), "--quiet", "--threads", "1", "--backend", "numba"])
    out, _ = capsys.readouterr()
    assert code == 0
    expected = cecore.cross_entropy(x, t, weight=np.linspace(0.5, 2.0, 12))
    assert f"mean loss     {float(expected):.6f}" in out
    assert "perplexity" in out and "accuracy" in out and "GB/s" in out
    assert np.array_equal(np.load(out_path),
                          cecore.cross_entropy(x, t, weight=np.linspace(0.5, 2.0, 12), reduction="none"))


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.npy"
    path.write_bytes(b"\x93NUMPY garbage" * 3)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("corrupt", "not a valid .npy"),
    ("rows", "rows but target has"),
    ("range", "Target 12 is out of bounds"),
    ("int_logits", "floating point"),
    ("float_target", "integers"),
    # was "No matching signature found", from the kernel
    ("float128_proba", "target of dtype float128 is not supported"),
    ("weight", "weight should be defined"),
    ("weight_text", "neither a file nor"),
    ("budget", "invalid memory size"),
    ("smoothing", "--label-smoothing must be"),
])
def test_bad_input_one_line_error(files, tmp_path, capsys, case, message):
    x, t, xp, tp = files
    args = {
        "missing": [str(tmp_path / "nope.npy"), tp],
        "corrupt": [_corrupt(tmp_path), tp],
        "rows": [xp, _save(tmp_path, "t2", t[:-1])],
        "range": [xp, _save(tmp_path, "t3", np.where(np.arange(t.size) == 19999, 12, t))],
        "int_logits": [_save(tmp_path, "xi", x.astype(np.int16)), tp],
        "float_target": [xp, _save(tmp_path, "tf", t.astype(np.float32))],
        "float128_proba": [xp, _save(tmp_path, "tq", np.full(x.shape, 1 / 12, np.longdouble))],
        "weight": [xp, tp, "--weight", "1,2,3"],
        "weight_text": [xp, tp, "--weight", "heavy"],
        "budget": [xp, tp, "--memory-budget", "lots"],
        "smoothing": [xp, tp, "--label-smoothing", "1.5"],
    }[case]
    out_path = tmp_path / "rows.npy"
    before = sorted(os.listdir(tmp_path))
    code = main(["score", *args, "--per-row-out", str(out_path), "--memory-budget", "50KB"]
                if case != "budget" else ["score", *args])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    assert err.startswith("cecore score: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no per-row file, no temporary left


def _save(tmp_path, name, array):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


def _score_in_child(args, before="", after="sys.exit(code)", **run_kwargs):
    """Run ``cecore score ARGS`` through ``cli.main`` in a fresh Python, with the code
    ``before`` it (limits, a warm-up) and ``after`` it (``code`` is its exit code)."""
    script = (f"import sys\n{before}\nfrom cecore.cli import main\n"
              f"code = main(sys.argv[1:])\n{after}\n")
    if "stdout" not in run_kwargs and "stderr" not in run_kwargs:
        run_kwargs["capture_output"] = True
    return subprocess.run([sys.executable, "-c", script, "score", *map(str, args)], text=True,
                          env=subprocess_env(), timeout=300, **run_kwargs)


def test_subprocess_error_and_success(files, tmp_path):
    x, t, xp, tp = files
    env = subprocess_env()
    bad = subprocess.run([sys.executable, "-m", "cecore.cli", "score", str(tmp_path / "nope.npy"), tp],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("cecore score: error: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    good = subprocess.run([sys.executable, "-m", "cecore.cli", "score", xp, tp, "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stderr == ""  # piped: no progress bar
    assert np.float32(json.loads(good.stdout)["mean_loss"]) == cecore.cross_entropy(x, t)


@pytest.mark.parametrize("option", ["--weight", "--bias"])
def test_a_huge_weight_or_bias_file_is_refused_before_it_is_read(tmp_path, option):
    # A (100_000_000,) float64 file (sparse: 800 MB that take no disk) given as the class
    # weights or the bias was read whole, then refused for its length; its header says
    # enough. Peak memory of a fresh process stays far below the file's size.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 6)).astype(np.float32))
    np.save(tmp_path / "h.npy", rng.standard_normal((50, 4)).astype(np.float32))
    np.save(tmp_path / "w.npy", rng.standard_normal((6, 4)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 6, 50))
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (100_000_000,)})
        f.truncate(f.tell() + 8 * 100_000_000)
    if option == "--weight":
        args = [tmp_path / "x.npy", tmp_path / "t.npy", "--weight", big]
        message = "weight should be defined either for all 6 classes"
    else:
        args = ["--hidden", tmp_path / "h.npy", tmp_path / "t.npy",
                "--unembedding", tmp_path / "w.npy", "--bias", big]
        message = "bias must have shape (6,), got (100000000,)"
    out = _score_in_child(args, after="hwm = [l for l in open('/proc/self/status') "
                          "if l.startswith('VmHWM')][0]\nprint(code, int(hwm.split()[1]) * 1024)")
    code, peak = map(int, out.stdout.split())
    assert code == 1 and message in out.stderr, out.stderr
    assert peak < 400 * 10**6, peak  # the interpreter, NumPy and cecore: ~100 MB


def _score_under_file_size_limit(args, limit):
    """``cecore score ARGS`` in a child whose files may not grow past ``limit`` bytes (a
    full disk, as far as its writes can tell)."""
    return _score_in_child(
        args,
        # the backend first: Numba's cache files would meet the limit before the losses
        before="import resource, signal, numpy as np, cecore\n"
               "cecore.cross_entropy(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))")


@pytest.mark.parametrize("limit", [65536, 0])
def test_a_full_disk_names_the_per_row_file(tmp_path, limit):
    # A short write of the per-row losses (a full disk; here a file-size limit) came out as
    # "OSError: 2782608 requested and 262112 written", naming neither file nor cause; a
    # disk full before the header is written, as "[Errno 27] File too large".
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((20000, 3)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 3, 20000))
    out_path = tmp_path / "out" / "rows.npy"
    out_path.parent.mkdir()
    out = _score_under_file_size_limit(
        [tmp_path / "x.npy", tmp_path / "t.npy", "--per-row-out", out_path, "--quiet"], limit)
    assert out.returncode == 1
    assert f"cannot write {out_path}: " in out.stderr, out.stderr
    assert list(out_path.parent.iterdir()) == []  # no partial file, no temporary


def test_a_full_disk_in_small_chunks_keeps_the_old_per_row_file(tmp_path):
    # With chunks whose losses fit in stdio's buffer, ndarray.tofile's failed writes
    # went unreported: exit 0, and a good file was replaced by a truncated one whose
    # header promised 20000 rows.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((20000, 4)))
    np.save(tmp_path / "t.npy", rng.integers(0, 4, 20000))
    out_path = tmp_path / "out" / "rows.npy"
    out_path.parent.mkdir()
    np.save(out_path, np.arange(3.0))
    out = _score_under_file_size_limit(
        [tmp_path / "x.npy", tmp_path / "t.npy", "--per-row-out", out_path, "--quiet",
         "--memory-budget", "50KB"], 40960)
    assert out.returncode == 1
    assert f"cannot write {out_path}: " in out.stderr, out.stderr
    assert list(out_path.parent.iterdir()) == [out_path]  # no temporary left
    np.testing.assert_array_equal(np.load(out_path), np.arange(3.0))  # the old file, intact


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_per_row_out_on_the_commands_own_output_is_refused(tmp_path, stream):
    # --per-row-out /dev/stdout with stdout sent to a file replaced that file with the
    # .npy, and the summary printed to the old one was lost (exit 0); into a pipe it
    # failed with "No such file or directory".
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 3, 50))
    args = [tmp_path / "x.npy", tmp_path / "t.npy", "--json", "--per-row-out", f"/dev/{stream}"]
    with open(tmp_path / "captured", "w") as f:
        out = _score_in_child(args, stdout=f if stream == "stdout" else subprocess.PIPE,
                              stderr=f if stream == "stderr" else subprocess.PIPE)
    captured = (tmp_path / "captured").read_text()
    message = f"/dev/{stream} is this process's standard " + \
        {"stdout": "output", "stderr": "error"}[stream]
    assert out.returncode == 1
    assert message in (captured if stream == "stderr" else out.stderr)
    pipe = _score_in_child(args)
    assert pipe.returncode == 1 and "is this process's standard" in pipe.stderr
    # /dev/null as stdin (cron, CI) and as the output: not "standard input", a device
    null = _score_in_child(args[:-1] + ["/dev/null"], stdin=subprocess.DEVNULL)
    assert null.returncode == 1 and "exists and is not a regular file" in null.stderr


def test_only_warnings_python_shows_by_default_are_reprinted(monkeypatch, capsys):
    # With Dask's dashboard port taken, every --dask local run printed "cecore score:
    # warning: unclosed <socket.socket ...>": the command recorded every warning, a
    # library's ResourceWarning included, and reprinted it as its own.
    import types
    import warnings

    from cecore import cli

    def run(args):
        warnings.warn("unclosed <socket.socket fd=6>", ResourceWarning)
        warnings.warn("a library's deprecation", DeprecationWarning)
        warnings.warn("n_threads=64 is more than the 2 CPUs available", UserWarning)
        return types.SimpleNamespace(to_dict=lambda: {"mean_loss": 1.0})

    monkeypatch.setattr(cli, "_score_run", run)
    assert main(["score", "x.npy", "t.npy", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"mean_loss": 1.0}
    assert "warning: --threads 64" in captured.err
    assert "socket" not in captured.err and "deprecation" not in captured.err


def test_a_subarray_dtype_is_read_as_numpy_maps_it(tmp_path, capsys):
    # A header with descr ('<f4', (6,)) and shape (50,) is a (50, 6) float32 array to
    # np.load(mmap_mode='r'); cecore said "logits must have shape (rows, classes), got
    # shape (50,)".
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    t = rng.integers(0, 6, 50)
    np.save(tmp_path / "t.npy", t)
    header = "{'descr': ('<f4', (6,)), 'fortran_order': False, 'shape': (50,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"  # padded to 64 bytes with magic
    with open(tmp_path / "sub.npy", "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        f.write(x.tobytes())
    assert np.load(tmp_path / "sub.npy", mmap_mode="r").shape == (50, 6)
    assert main(["score", str(tmp_path / "sub.npy"), str(tmp_path / "t.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_loss"] == float(cecore.cross_entropy(x, t))
