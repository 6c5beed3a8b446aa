"""Scoring hidden states through an unembedding: ``cecore score --hidden``.

Oracles: torch's ``F.linear_cross_entropy`` for the mean loss (float32 accuracy), and
classification_report_from_logits of the materialised logits for every metric.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from cecore import batch
from cecore.cli import main
from cecore.metrics import classification_report_from_logits

KEYS = ("accuracy", "top_k_accuracy", "mean_entropy", "ece", "brier")


@pytest.fixture
def lm(tmp_path, rng):
    h = rng.standard_normal((1500, 48)).astype(np.float32)
    w = (0.2 * rng.standard_normal((300, 48))).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    t = rng.integers(0, 300, 1500)
    t[::13] = -100
    for name, a in (("h", h), ("w", w), ("b", b), ("t", t)):
        np.save(tmp_path / f"{name}.npy", a)
    return h, w, b, t, tmp_path


def test_hidden_scoring_equals_torch_and_the_logits_report(lm, capsys, backend):
    h, w, b, t, d = lm
    assert main(["score", "--hidden", str(d / "h.npy"), "--unembedding", str(d / "w.npy"),
                 "--bias", str(d / "b.npy"), str(d / "t.npy"), "--json", "--backend", backend,
                 "--memory-budget", "200KB"]) == 0
    r = json.loads(capsys.readouterr().out)
    expected = TF.linear_cross_entropy(torch.from_numpy(h), torch.from_numpy(w),
                                       torch.from_numpy(t), linear_bias=torch.from_numpy(b),
                                       ignore_index=-100)
    np.testing.assert_allclose(r["mean_loss"], float(expected), rtol=2e-6)
    report = classification_report_from_logits(h @ w.T + b, t, backend=backend)
    for key in KEYS:
        np.testing.assert_allclose(r[key], report[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert r["chunk_rows"] < 1500  # really streamed in chunks


def test_hidden_scoring_in_python_without_bias(lm, backend):
    h, w, _, t, d = lm
    r = batch.score(h, t, unembedding=w, backend=backend, memory_budget="100KB")
    expected = TF.linear_cross_entropy(torch.from_numpy(h), torch.from_numpy(w),
                                       torch.from_numpy(t), ignore_index=-100)
    np.testing.assert_allclose(r.mean_loss, float(expected), rtol=2e-6)
    assert r.n_classes == 300


def test_big_endian_unembedding_is_converted_once(lm):
    # matmul converted the whole big-endian matrix again for every chunk (a 61 MB weight:
    # 6x slower, and a copy outside the budget each time; hostile review)
    import pickle

    from cecore._io import open_array

    h, w, b, t, d = lm
    np.save(d / "w_be.npy", w.astype(">f4"))
    native = batch.score(str(d / "h.npy"), str(d / "t.npy"), unembedding=str(d / "w.npy"),
                         memory_budget="100KB")
    big = batch.score(str(d / "h.npy"), str(d / "t.npy"), unembedding=str(d / "w_be.npy"),
                      memory_budget="100KB")
    assert big.mean_loss == native.mean_loss and big.chunk_rows < 1500
    head = batch.LinearHead(open_array(str(d / "w_be.npy")))
    np.testing.assert_array_equal(head.logits(h[:10]), h[:10] @ w.T)
    converted = head.__dict__["_native"]
    head.logits(h[10:20])
    assert head.__dict__["_native"] is converted  # not again
    assert "_native" not in pickle.loads(pickle.dumps(head)).__dict__  # Dask gets the reader


def test_float64_probabilities_promote_the_logits_not_the_unembedding():
    # float64 probability targets made every chunk compute hidden (cast to float64) @ W.T,
    # so matmul made a float64 copy of the whole (V, d) unembedding per chunk, outside the
    # budget (found by a hostile review). As torch's linear layer does, the logits are
    # made in the hidden states' dtype, then promoted. Oracle: torch's cross-entropy of
    # the float32 logits against the float64 probabilities; the memory: no allocation
    # near the 41 MB of that copy (the probability targets' fixed buffers are 12 MB).
    import tracemalloc

    rng = np.random.default_rng(7)
    h = rng.standard_normal((200, 256)).astype(np.float32)
    w = (0.1 * rng.standard_normal((20000, 256))).astype(np.float32)
    q = rng.dirichlet(np.ones(20000), 200)
    tracemalloc.start()
    try:
        r = batch.score(h, q, unembedding=w, memory_budget="2MB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.chunk_rows < 200 and peak < 30e6, peak
    expected = TF.cross_entropy(torch.from_numpy(h @ w.T), torch.from_numpy(q))
    assert expected.dtype == torch.float64
    np.testing.assert_allclose(r.mean_loss, float(expected), rtol=1e-6)


def test_a_chunks_logits_are_one_product(lm, monkeypatch):
    # An edit left the product written twice: every chunk paid for two (review).
    h, w, b, t, d = lm
    from cecore._io import open_array

    calls = []
    matmul = np.matmul

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return matmul(*args, **kwargs)

    head = batch.LinearHead(open_array(str(d / "w.npy")), b)
    monkeypatch.setattr(np, "matmul", counted)
    out = head.logits(h[:10])
    monkeypatch.undo()
    assert calls == [(10, 48)]
    np.testing.assert_allclose(out, h[:10] @ w.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("d", "must have shape (V, 48)"),
    ("dtype", "hidden states (float32) and unembedding (float64) must have the same dtype"),
    ("h_dtype", "hidden states must be float32 or float64, got float16"),
    ("bias", "bias must have shape (300,)"),
    ("range", "out of bounds"),
    ("no_w", "--hidden needs --unembedding"),
    ("two", "with --hidden give only TARGET"),
])
def test_hidden_bad_input_one_line_error(lm, capsys, case, message):
    h, w, b, t, d = lm
    np.save(d / "w_d.npy", w[:, :40])
    np.save(d / "w64.npy", w.astype(np.float64))
    np.save(d / "h16.npy", h.astype(np.float16))
    np.save(d / "b_short.npy", b[:-1])
    np.save(d / "t_bad.npy", np.where(np.arange(1500) == 7, 300, t))
    args = {
        "d": ["--unembedding", str(d / "w_d.npy"), str(d / "t.npy")],
        "dtype": ["--unembedding", str(d / "w64.npy"), str(d / "t.npy")],
        "h_dtype": ["--unembedding", str(d / "w.npy"), str(d / "t.npy")],
        "bias": ["--unembedding", str(d / "w.npy"), "--bias", str(d / "b_short.npy"),
                 str(d / "t.npy")],
        "range": ["--unembedding", str(d / "w.npy"), str(d / "t_bad.npy")],
        "no_w": [str(d / "t.npy")],
        "two": ["--unembedding", str(d / "w.npy"), str(d / "h.npy"), str(d / "t.npy")],
    }[case]
    before = sorted(os.listdir(d))
    hidden = d / ("h16.npy" if case == "h_dtype" else "h.npy")
    code = main(["score", "--hidden", str(hidden), *args, "--per-row-out",
                 str(d / "rows.npy")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("cecore score: error: ") and err.count("\n") == 1
    assert message in err
    assert sorted(os.listdir(d)) == before


def test_unembedding_from_a_compressed_npz_member_over_many_chunks(lm, capsys):
    """A compressed .npz member can be read only once, front to back: the unembedding
    was read again for every chunk, so any run of more than one chunk failed."""
    h, w, b, t, d = lm
    np.savez_compressed(d / "w.npz", w=w)
    args = ["score", "--hidden", str(d / "h.npy"), "--bias", str(d / "b.npy"), str(d / "t.npy"),
            "--json", "--memory-budget", "200KB", "--unembedding"]
    assert main(args + [str(d / "w.npz")]) == 0
    compressed = json.loads(capsys.readouterr().out)
    assert main(args + [str(d / "w.npy")]) == 0
    plain = json.loads(capsys.readouterr().out)
    for r in (compressed, plain):  # timings differ
        for key in ("seconds", "rows_per_second", "gb_per_second"):
            del r[key]
    assert compressed["chunk_rows"] < 1500 and compressed == plain


@pytest.mark.parametrize("save", ["npy", "npz", "npz_compressed"])
def test_fortran_ordered_unembedding_file(lm, capsys, save):
    """``np.save(path, kernel.T)`` of a (d, V) matrix (a Dense layer's kernel) writes the
    (V, d) unembedding in Fortran order: it was refused, though it is read whole. Oracle:
    the same scoring from the C-ordered file."""
    h, w, b, t, d = lm
    wf = np.asfortranarray(w)
    path = {"npy": d / "wf.npy", "npz": d / "wf.npz", "npz_compressed": d / "wf.npz"}[save]
    {"npy": np.save, "npz": np.savez, "npz_compressed": np.savez_compressed}[save](path, wf)
    args = ["score", "--hidden", str(d / "h.npy"), "--bias", str(d / "b.npy"), str(d / "t.npy"),
            "--json", "--memory-budget", "200KB", "--unembedding"]
    assert main(args + [str(path)]) == 0
    fortran = json.loads(capsys.readouterr().out)
    assert main(args + [str(d / "w.npy")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert fortran["chunk_rows"] < 1500 and fortran.keys() == plain.keys()
    for key, value in plain.items():  # BLAS may sum a transposed operand in another order
        if isinstance(value, float) and key not in ("seconds", "rows_per_second",
                                                    "gb_per_second"):
            np.testing.assert_allclose(fortran[key], value, rtol=1e-6, err_msg=key)
        elif not isinstance(value, float):
            assert fortran[key] == value, key
    # Fortran-ordered hidden states are still refused: they are streamed by rows.
    np.save(d / "hf.npy", np.asfortranarray(h))
    assert main(["score", "--hidden", str(d / "hf.npy"), "--unembedding", str(d / "w.npy"),
                 str(d / "t.npy")]) == 1
    assert "Fortran order" in capsys.readouterr().err
