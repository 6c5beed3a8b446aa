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
from oracle import random_index_target


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
    ("weight", "weight should be defined"),
    ("weight_text", "neither a file nor"),
    ("budget", "invalid memory size"),
    ("smoothing", "label_smoothing"),
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


def test_subprocess_error_and_success(files, tmp_path):
    x, t, xp, tp = files
    root = os.path.dirname(os.path.dirname(cecore.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
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
