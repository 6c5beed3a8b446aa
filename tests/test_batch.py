"""cecore.batch.score: streamed scoring of arrays on disk.

Oracles: cecore.cross_entropy on the whole array in memory (the streamed mean must equal it
bit for bit, since both reduce in the same fixed blocks), torch (semantics), a naive NumPy
argmax (accuracy), and the process's own peak RSS (memory bound).
"""

import math
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest

import cecore
from cecore import _reduce, batch
from cecore._config import REDUCE_BLOCK
from oracle import (assert_close, random_index_target, random_proba_target, subprocess_env,
                    torch_cross_entropy, torch_nll_loss)

# More rows than two reduction blocks, so that chunks straddle block boundaries.
N_ROWS = 2 * REDUCE_BLOCK + 1234


def _save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def _logits(rng, n, c, dtype):
    return (3 * rng.standard_normal((n, c))).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [
    {},
    {"ignore_index": -100, "p_ignore": 0.2, "weight": True},
    {"ignore_index": 3, "p_ignore": 0.1, "label_smoothing": 0.15, "weight": True},
])
@pytest.mark.parametrize("budget", ["300KB", "64MB"])
def test_index_targets_equal_in_memory_bitwise(tmp_path, rng, backend, dtype, options, budget):
    n_classes = 23
    x = _logits(rng, N_ROWS, n_classes, dtype)
    ignore_index = options.get("ignore_index", -100)
    t = random_index_target(rng, N_ROWS, n_classes, ignore_index, options.get("p_ignore", 0.0))
    w = rng.random(n_classes) + 0.2 if options.get("weight") else None
    eps = options.get("label_smoothing", 0.0)
    result = batch.score(_save(tmp_path, "x.npy", x), _save(tmp_path, "t.npy", t), weight=w,
                         ignore_index=ignore_index, label_smoothing=eps, memory_budget=budget,
                         backend=backend)
    if budget == "300KB":
        assert result.chunk_rows < REDUCE_BLOCK  # many chunks, none aligned to the blocks
    expected = cecore.cross_entropy(x, t, weight=w, ignore_index=ignore_index,
                                    label_smoothing=eps, backend=backend)
    assert result.mean_loss == expected
    assert np.float64(result.mean_loss).astype(dtype) == expected  # no precision beyond the dtype's
    torch_loss, _ = torch_cross_entropy(x, t, weight=w, ignore_index=ignore_index, label_smoothing=eps)
    assert_close(result.mean_loss, torch_loss, dtype)
    keep = t != ignore_index
    assert result.rows == N_ROWS
    assert result.rows_ignored == N_ROWS - keep.sum()
    assert result.rows_scored == keep.sum()
    assert result.accuracy == np.mean(np.argmax(x, axis=1)[keep] == t[keep])
    assert result.perplexity == np.exp(np.float64(expected))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_targets_equal_in_memory_bitwise(tmp_path, rng, backend, dtype):
    n_classes = 9
    x = _logits(rng, N_ROWS, n_classes, dtype)
    p = random_proba_target(rng, (N_ROWS, n_classes), np.float64)  # promotes float32 x, as cross_entropy
    w = rng.random(n_classes) + 0.5
    result = batch.score(_save(tmp_path, "x.npy", x), _save(tmp_path, "p.npy", p), weight=w,
                         label_smoothing=0.05, memory_budget="200KB", backend=backend)
    expected = cecore.cross_entropy(x, p, weight=w, label_smoothing=0.05, backend=backend)
    assert result.target_kind == "probabilities"
    assert result.mean_loss == expected
    assert_close(result.mean_loss, torch_cross_entropy(x, p, weight=w, label_smoothing=0.05)[0], dtype)
    assert result.accuracy is None  # undefined for probability targets (reported as null)


def test_log_probs_and_probs_inputs(tmp_path, rng, backend):
    n_classes = 17
    x = _logits(rng, N_ROWS, n_classes, np.float64)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    t = random_index_target(rng, N_ROWS, n_classes, p_ignore=0.1)
    torch_nll, _ = torch_nll_loss(log_p, t)

    r_log = batch.score(_save(tmp_path, "lp.npy", log_p), _save(tmp_path, "t.npy", t),
                        input_kind="log_probs", memory_budget="500KB", backend=backend)
    assert r_log.mean_loss == cecore.cross_entropy(log_p, t, backend=backend)
    assert_close(r_log.mean_loss, torch_nll, np.float64)

    probs = np.exp(log_p)
    r_p = batch.score(_save(tmp_path, "p.npy", probs), str(tmp_path / "t.npy"),
                      input_kind="probs", memory_budget="500KB", backend=backend)
    assert r_p.mean_loss == cecore.cross_entropy(np.log(probs), t, backend=backend)
    assert_close(r_p.mean_loss, torch_nll, np.float64)
    assert r_p.accuracy == r_log.accuracy

    probs[5, 2] = -0.1
    with pytest.raises(ValueError, match="negative"):
        batch.score(_save(tmp_path, "bad.npy", probs), str(tmp_path / "t.npy"), input_kind="probs")


@pytest.mark.parametrize("kind", ["probs", "log_probs"])
def test_probabilities_of_zero_against_probability_targets(tmp_path, rng, backend, kind):
    # A class of probability 0 (float32 softmax underflows) whose target is 0 made the
    # row's loss 0 * inf = NaN, and the file's mean loss null (hostile review). Oracle: a
    # naive float64 -sum_c w_c q_c log p_c with 0 log 0 = 0.
    n, c = 3000, 12
    x = (40 * rng.standard_normal((n, c))).astype(np.float32)
    probs = np.exp(x - x.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[:, -1] = 0.0  # never predicted
    assert (probs == 0).any(axis=1).all()
    q = np.where((rng.random((n, c)) < 0.5) | (probs == 0), 0.0, rng.random((n, c)))
    q[np.arange(n), probs.argmax(axis=1)] += 0.01  # no row without a target
    q = (q / q.sum(axis=1, keepdims=True)).astype(np.float32)
    w = rng.random(c) + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        inputs = probs if kind == "probs" else np.log(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(probs.astype(np.float64))
        log_p -= np.log(probs.astype(np.float64).sum(axis=1, keepdims=True))
        expected = -np.where(q > 0, w * q * log_p, 0.0).sum(axis=1)
    assert np.isfinite(expected).all()
    out = tmp_path / "rows.npy"
    result = batch.score(_save(tmp_path, "p.npy", inputs), _save(tmp_path, "q.npy", q),
                         weight=w, input_kind=kind, memory_budget="100KB",
                         per_row_out=out, backend=backend)
    np.testing.assert_allclose(np.load(out), expected, rtol=2e-5, atol=1e-6)
    assert_close(result.mean_loss, expected.mean(), np.float32)
    assert result.mean_loss == batch.score(inputs, q, weight=w, input_kind=kind,
                                           backend=backend).mean_loss  # in memory
    # A target on a class of probability 0 is an infinite loss; a NaN stays NaN, and so
    # does a row without any probability above 0 (its softmax is undefined, not uniform).
    q[0, -1], q[1, 0], probs[2, 3] = 0.5, 0.0, np.nan
    probs[3], q[3] = 0.0, 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        inputs = probs if kind == "probs" else np.log(probs)
    r = batch.score(inputs[:4], q[:4], input_kind=kind, per_row_out=out, backend=backend)
    rows = np.load(out)
    assert rows[0] == np.inf and np.isfinite(rows[1]) and np.isnan(rows[2:]).all()
    assert np.isnan(r.mean_entropy)
    if kind == "log_probs":  # the lowest value as the largest: the -inf may not join it
        low = np.finfo(np.float32).min
        r = batch.score(np.array([[-np.inf, low, low]], np.float32),
                        np.array([[0, 0.5, 0.5]], np.float32), input_kind=kind,
                        backend=backend)
        assert r.mean_entropy == pytest.approx(np.log(2)) and r.brier == 0


def test_float16_logits(tmp_path, rng, backend):
    x = _logits(rng, 3000, 11, np.float16)
    t = random_index_target(rng, 3000, 11)
    r = batch.score(_save(tmp_path, "x.npy", x), _save(tmp_path, "t.npy", t), memory_budget="20KB",
                    backend=backend)
    expected = cecore.cross_entropy(x, t, backend=backend)
    # As floats: comparing with np.float16 would first round mean_loss to float16.
    assert expected.dtype == np.float16 and r.mean_loss == float(expected)
    assert r.dtype == "float32"  # computed in float32


def test_per_row_out_matches_reduction_none(tmp_path, rng):
    x = _logits(rng, N_ROWS, 13, np.float32)
    t = random_index_target(rng, N_ROWS, 13, p_ignore=0.1)
    w = rng.random(13) + 0.3
    out = tmp_path / "per_row.npy"
    r = batch.score(_save(tmp_path, "x.npy", x), _save(tmp_path, "t.npy", t), weight=w,
                    memory_budget="100KB", per_row_out=out)
    per_row = np.load(out)
    expected = cecore.cross_entropy(x, t, weight=w, reduction="none")
    assert per_row.dtype == np.float32 and per_row.shape == (N_ROWS,)
    assert np.array_equal(per_row, expected)
    assert r.per_row_out == str(out)
    assert sorted(os.listdir(tmp_path)) == ["per_row.npy", "t.npy", "x.npy"]  # no temp left


def test_failure_leaves_no_per_row_file(tmp_path, rng):
    x = _logits(rng, N_ROWS, 5, np.float32)
    t = random_index_target(rng, N_ROWS, 5)
    t[-1] = 7  # out of range, found only in the last chunk
    out = tmp_path / "per_row.npy"
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        batch.score(_save(tmp_path, "x.npy", x), _save(tmp_path, "t.npy", t),
                    memory_budget="100KB", per_row_out=out)
    assert sorted(os.listdir(tmp_path)) == ["t.npy", "x.npy"]


def test_npz_members_mapped_or_streamed(tmp_path, rng):
    x = _logits(rng, N_ROWS, 7, np.float32)
    t = random_index_target(rng, N_ROWS, 7, p_ignore=0.1).astype(np.int32)
    expected = cecore.cross_entropy(x, t)
    stored, packed = tmp_path / "stored.npz", tmp_path / "packed.npz"
    np.savez(stored, logits=x, target=t)
    np.savez_compressed(packed, logits=x, target=t)
    src = batch.open_array(f"{stored}:logits")
    assert isinstance(src, batch.MappedArray)  # uncompressed: memory-mapped in place
    assert np.array_equal(src.rows(0, N_ROWS), x)
    src.close()
    assert isinstance(batch.open_array(f"{packed}:logits"), batch.StreamedArray)
    for path in (stored, packed):
        r = batch.score(f"{path}:logits", f"{path}:target", memory_budget="100KB")
        assert r.mean_loss == expected
    single = tmp_path / "single.npz"
    np.savez(single, x)
    assert isinstance(batch.open_array(single), batch.MappedArray)
    with pytest.raises(ValueError, match="choose one"):
        batch.open_array(stored)
    with pytest.raises(ValueError, match="no array 'nope'"):
        batch.open_array(f"{stored}:nope")
    # member names with colons (split at the last colon before, "no such file")
    coloned = tmp_path / "c:d.npz"
    np.savez(coloned, **{"a:b": x, "t": t})
    assert np.array_equal(batch.open_array(f"{coloned}:a:b").rows(0, N_ROWS), x)
    assert batch.score(f"{coloned}:a:b", f"{coloned}:t").mean_loss == expected
    # a zip of another name (np.savez to a .zip): "choose one with FILE:NAME" said the
    # error, and FILE:NAME was then "no such file"
    zipped = tmp_path / "arrays.zip"
    os.replace(stored, zipped)
    with pytest.raises(ValueError, match="choose one"):
        batch.open_array(zipped)
    assert batch.score(f"{zipped}:logits", f"{zipped}:target").mean_loss == expected


def test_in_memory_and_memmap_inputs(tmp_path, rng):
    x = _logits(rng, 5000, 6, np.float64)
    t = random_index_target(rng, 5000, 6)
    mm = np.load(_save(tmp_path, "x.npy", x), mmap_mode="r")
    assert batch.score(mm, t, memory_budget="10KB").mean_loss == cecore.cross_entropy(x, t)
    assert batch.score(np.asfortranarray(x), t.tolist(), memory_budget="10KB").mean_loss == \
        cecore.cross_entropy(x, t)


def test_file_replaced_after_its_header_was_read(tmp_path, rng, monkeypatch):
    # Dask workers map a file by path a second or two after the client read its header;
    # a file replaced in between (here float32 -> float64) was read with the old dtype: a
    # wrong mean loss, exit 0 (found by a hostile review).
    import pickle

    from cecore._io import open_array

    x = rng.standard_normal((50, 4))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    source = open_array(tmp_path / "x.npy")
    np.save(tmp_path / "new.npy", x)
    os.replace(tmp_path / "new.npy", tmp_path / "x.npy")
    for src in (source, pickle.loads(pickle.dumps(source))):
        with pytest.raises(ValueError, match="changed after its header was read"):
            src.rows(0, 10)
    # a worker resolves paths in its own working directory: they travel absolute
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        relative = open_array("x.npy")
    moved = pickle.loads(pickle.dumps(relative))
    assert moved.path == str(tmp_path / "x.npy")
    np.testing.assert_array_equal(moved.rows(0, 50), x)


def test_a_workers_copy_of_the_file_at_the_same_path_is_read(tmp_path, rng, monkeypatch):
    # On a cluster each worker sees the file through its own host: a network mount or a
    # copy at the same path, with that host's device and inode numbers (and timestamps
    # perhaps kept to the second only). Every task failed with "changed after its header
    # was read" (found by a hostile review). On the machine that read the header (its
    # process, or a local cluster's workers) a replaced file is still refused.
    import pickle
    import shutil

    from cecore import _io
    from cecore._io import open_array

    x = rng.standard_normal((50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    source = open_array(tmp_path / "x.npy")
    sent = pickle.dumps(source)
    shutil.copy2(tmp_path / "x.npy", tmp_path / "copy.npy")  # another inode, same mtime
    st = os.stat(tmp_path / "copy.npy")
    os.utime(tmp_path / "copy.npy", ns=(st.st_atime_ns, st.st_mtime_ns // 10**9 * 10**9))
    os.replace(tmp_path / "copy.npy", tmp_path / "x.npy")
    for here in (source, pickle.loads(sent)):  # this machine: replaced
        with pytest.raises(ValueError, match="changed after its header was read"):
            here.rows(0, 10)
    monkeypatch.setattr(_io, "_view_of_files", lambda: ("another host's boot", 1))
    np.testing.assert_array_equal(pickle.loads(sent).rows(0, 50), x)
    # a rewrite of the same size a second later is another version, there too
    os.utime(tmp_path / "x.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="is not the file whose header was read .* the "
                                         "workers must see the same files"):
        pickle.loads(sent).rows(0, 10)


def test_block_sum_matches_fixed_sum_for_any_chunking(rng):
    values = rng.standard_normal(5 * REDUCE_BLOCK + 77) * 10.0 ** rng.integers(-8, 8, 5 * REDUCE_BLOCK + 77)
    expected = _reduce.fixed_sum(values)
    for _ in range(5):
        cuts = np.sort(rng.integers(0, values.size, rng.integers(1, 40)))
        acc = _reduce.BlockSum()
        for piece in np.split(values, cuts):
            acc.add(piece)
        assert acc.total() == expected
    assert _reduce.BlockSum().total() == 0.0


def test_binned_block_sum_memory_is_bounded_and_its_totals_unchanged(rng, monkeypatch):
    # The calibration bins' per-block partials grew with the stream (hostile review:
    # --ece-bins 10000 over 20M rows held 400 MB whatever --memory-budget said). Past
    # BINNED_PARTIALS_BYTES they are replaced by their exact sums: totals bit for bit
    # those of the partials kept whole (independent oracle: math.fsum of every block's
    # per-bin sum), for values over 16 decades and partials arriving a few blocks at a time.
    n_bins, n = 40, 60 * REDUCE_BLOCK + 123
    bins = rng.integers(0, n_bins, n)
    values = rng.random(n) * 10.0 ** rng.integers(-8, 8, n)
    block = np.arange(n) // REDUCE_BLOCK
    partials = np.stack([np.bincount(block[bins == b], weights=values[bins == b],
                                     minlength=block[-1] + 1) for b in range(n_bins)], axis=1)
    expected = [math.fsum(partials[:, b].tolist()) for b in range(n_bins)]
    monkeypatch.setattr(_reduce, "BINNED_PARTIALS_BYTES", 8 * n_bins * 5)  # 5 blocks' worth
    acc, largest = _reduce.BinnedBlockSum(n_bins), 0
    cuts = np.unique(rng.integers(0, len(partials), 12))
    for piece in np.split(partials, cuts):
        acc.add_partials(piece)
        largest = max(largest, sum(len(p) for p in acc._partials))
    assert acc.totals().tolist() == expected
    assert largest <= 25  # the budget, one piece's blocks and the exact sums (61 blocks kept)
    # the partials handed on (to a Dask client) add up to the same totals
    client = _reduce.BinnedBlockSum(n_bins)
    client.add_partials(acc.partials())
    assert client.totals().tolist() == expected
    # a non-finite partial is kept once, beside the exact terms of the rest: compaction
    # goes on (it stopped, and every later block re-summed all rows kept), same totals
    acc = _reduce.BinnedBlockSum(n_bins)
    acc.add_partials(np.where(np.arange(n_bins) == 3, np.inf, 1.0)[None])
    for piece in np.split(partials, cuts):
        acc.add_partials(piece)
    assert sum(len(p) for p in acc._partials) <= 25
    assert acc.totals()[3] == np.inf
    assert acc.totals()[:3].tolist() == [math.fsum([e, 1.0]) for e in expected[:3]]
    # bins with nothing in them (compaction skips them) and a NaN, compacted: the same
    partials[:, 5] = 0.0
    partials[7, 6] = np.nan
    acc = _reduce.BinnedBlockSum(n_bins)
    for piece in np.split(partials, cuts):
        acc.add_partials(piece)
    totals = acc.totals()
    assert totals[5] == 0.0 and np.isnan(totals[6])
    assert [totals[b] for b in range(n_bins) if b not in (5, 6)] == \
        [expected[b] for b in range(n_bins) if b not in (5, 6)]


@pytest.mark.parametrize("text, expected", [
    ("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1.5G", 1_500_000_000), ("4096", 4096),
    (100, 100), ("64 kib", 65536), ("0.1KB", 100),
    ("9" * 400, int("9" * 400)),  # went through a float: "cannot convert float infinity"
])
def test_parse_size(text, expected):
    assert batch.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12XB", "-5MB", "0", "MB", True, "0.5"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        batch.parse_size(text)


def test_parse_size_names_the_least_budget():
    # 0.5 bytes rounds to 0: "must be positive, got '0.5'" (hostile review)
    with pytest.raises(ValueError, match="at least 1 byte, got '0.5'"):
        batch.parse_size("0.5")


def test_thread_cap_warns_once_per_run(tmp_path, rng):
    # each chunk warned again, and the command's recorded warnings grew with the chunks
    # (40000 one-row chunks: 20 MB outside the budget; hostile review)
    from cecore._config import cpus_available
    x = rng.standard_normal((3000, 2)).astype(np.float32)
    t = rng.integers(0, 2, 3000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = batch.score(x, t, memory_budget=2000, n_threads=cpus_available() + 3)
    assert r.chunk_rows < 100
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        f"n_threads={cpus_available() + 3} is more than the {cpus_available()} CPUs "
        f"available; using {cpus_available()}"]


def test_bad_inputs_raise_clear_errors(tmp_path, rng):
    x = _logits(rng, 100, 4, np.float32)
    xp, tp = _save(tmp_path, "x.npy", x), _save(tmp_path, "t.npy", np.zeros(100, np.int64))
    with pytest.raises(FileNotFoundError, match="no such file"):
        batch.score(str(tmp_path / "missing.npy"), tp)
    with pytest.raises(ValueError, match="rows but target has"):
        batch.score(xp, _save(tmp_path, "t99.npy", np.zeros(99, np.int64)))
    with pytest.raises(TypeError, match="integers"):
        batch.score(xp, _save(tmp_path, "tf.npy", np.zeros(100)))
    with pytest.raises(TypeError, match="floating point"):
        batch.score(_save(tmp_path, "xi.npy", np.zeros((100, 4), np.int32)), tp)
    with pytest.raises(ValueError, match="shape"):
        batch.score(_save(tmp_path, "x3.npy", np.zeros((10, 4, 2), np.float32)), tp)
    with pytest.raises(ValueError, match="Fortran"):
        batch.score(_save(tmp_path, "xf.npy", np.asfortranarray(x)), tp)
    truncated = tmp_path / "trunc.npy"
    truncated.write_bytes(open(xp, "rb").read()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        batch.score(str(truncated), tp)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not an array" * 10)
    with pytest.raises(ValueError, match="not a valid .npy"):
        batch.score(str(garbage), tp)
    with pytest.raises(ValueError, match="input_kind"):
        batch.score(xp, tp, input_kind="scores")
    with pytest.raises(ValueError, match="weight"):
        batch.score(xp, tp, weight=[1.0, 2.0])


def test_peak_rss_stays_within_budget(tmp_path):
    """Score a file 8x larger than the budget in a fresh process; its peak RSS grows by
    about the budget, not the file size (the mapped pages are released chunk by chunk)."""
    n_rows, n_classes, budget = 100_000, 1000, 50 * 10**6  # 400 MB of float32
    x_path, t_path = tmp_path / "x.npy", tmp_path / "t.npy"
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n_rows, n_classes))
    for start in range(0, n_rows, 10_000):  # written in slices: the test itself stays small
        x[start:start + 10_000] = np.random.default_rng(start).standard_normal((10_000, n_classes))
    x.flush()
    del x
    np.save(t_path, np.random.default_rng(1).integers(0, n_classes, n_rows))
    script = textwrap.dedent(f"""
        import numpy as np, cecore
        from cecore import batch
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        batch.score(np.zeros((10, 5), np.float32), np.zeros(10, np.int64))  # JIT warm-up
        before = hwm()
        r = batch.score({str(x_path)!r}, {str(t_path)!r}, memory_budget={budget})
        print(before, hwm(), r.rows)
    """)
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, rows = map(int, out.stdout.split())
    assert rows == n_rows
    file_size = os.path.getsize(x_path)
    assert file_size > 7 * budget
    assert after - before < budget + 30 * 10**6, (before, after)  # slack: imports, thread stacks


def test_a_npy_whose_data_looks_like_a_zip_end_record_is_a_npy(tmp_path, rng):
    # is_zipfile scans the last 64 kB for a zip's end record; a .npy whose data held those
    # bytes by chance was refused as a broken zip (hostile review). np.load reads the magic.
    x = rng.standard_normal((64, 8)).astype(np.float32)
    raw = bytearray(x.tobytes())
    raw[-22:] = b"PK\x05\x06" + bytes(18)
    x = np.frombuffer(bytes(raw), np.float32).reshape(64, 8)
    t = rng.integers(0, 8, 64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    r = batch.score(str(tmp_path / "x.npy"), str(tmp_path / "t.npy"))
    assert r.mean_loss == float(cecore.cross_entropy(x, t))


def test_per_row_out_refuses_a_file_it_may_not_write(tmp_path, rng, monkeypatch):
    # the atomic rename needs only the directory's permission: a .npy its owner had made
    # read-only was replaced where np.save fails (hostile review, as a non-root user)
    import cecore._io as io

    x = rng.standard_normal((10, 4))
    t = rng.integers(0, 4, 10)
    keep = tmp_path / "keep.npy"
    np.save(keep, np.arange(3))
    real_access = os.access
    monkeypatch.setattr(io.os, "access", lambda p, mode: False if os.fspath(p) == str(keep)
                        else real_access(p, mode))
    with pytest.raises(PermissionError, match="not writable"):
        batch.score(x, t, per_row_out=str(keep))
    np.testing.assert_array_equal(np.load(keep), np.arange(3))


def test_top_k_beyond_int64_does_not_count_undefined_rows(rng):
    x = np.array([[np.nan, 0.0, 0.0], [0.0, 1.0, 2.0]])
    for k in (3, 2**62, 2**63, 2**70):
        assert batch.score(x, np.array([0, 2]), top_k=k).top_k_accuracy == 0.5


def test_npy_version_3_and_npz_class_weights(tmp_path, rng):
    # (hostile review) a version-3.0 .npy, which np.load reads, was "damaged"; an .npz
    # given as --weight was read as its member names ("got dtype <U1")
    import numpy.lib.format as npy_format

    from cecore.cli import main

    x = rng.standard_normal((20, 4)).astype(np.float32)
    t = rng.integers(0, 4, 20)
    with open(tmp_path / "x.npy", "wb") as f:
        npy_format.write_array(f, x, version=(3, 0))
    np.save(tmp_path / "t.npy", t)
    w = rng.random(4) + 0.5
    np.savez(tmp_path / "w.npz", w)
    r = batch.score(str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), weight=w)
    assert r.mean_loss == float(cecore.cross_entropy(x, t, weight=w))
    assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"),
                 "--weight", str(tmp_path / "w.npz")]) == 0
    np.savez(tmp_path / "w2.npz", a=w, b=w)
    assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"),
                 "--weight", str(tmp_path / "w2.npz")]) == 1


def test_unwritable_output_directory_names_the_output(tmp_path, rng, monkeypatch):
    # the error named the hidden temporary file (".o.npy.kjeltq03.tmp"), not the path given
    # (a refusing os.open stands for the directory: root may write anywhere)
    import os

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match=r"cannot write .*o\.npy: Permission denied"):
        batch.score(rng.standard_normal((4, 3)), np.zeros(4, int),
                    per_row_out=str(tmp_path / "o.npy"))


def test_a_read_error_names_its_file(tmp_path, monkeypatch):
    # EIO from a failing disk (or /proc/self/mem) came without a file name: "[Errno 5]
    # Input/output error", and the user could not tell which input failed; in a header it
    # was called damage, and while decompressing it was not named either (hostile reviews)
    from cecore import _io
    path, packed = tmp_path / "x.npy", tmp_path / "x.npz"
    np.save(path, np.zeros((3, 2), np.float32))
    np.savez_compressed(packed, x=np.zeros((3, 2), np.float32))

    def failing(*args):
        raise OSError(5, "Input/output error")

    source = _io.open_array(str(packed))
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipExtFile, "readinto", failing)
        with pytest.raises(OSError, match=r"Input/output error: '.*x\.npz'"):
            source.rows(0, 3)
    source.close()
    monkeypatch.setattr(np.lib.format, "read_magic", failing)
    with pytest.raises(OSError, match=r"Input/output error: '.*x\.npy'"):
        _io.open_array(str(path))
    monkeypatch.setattr(_io, "_open_regular", failing)
    with pytest.raises(OSError, match=r"Input/output error: '.*x\.npy'"):
        _io.open_array(str(path))


def test_a_compressed_member_replaced_after_its_header_is_refused(tmp_path, monkeypatch):
    # A Dask worker reopened the member by path and trusted the pickled dtype and shape:
    # an unembedding replaced (float32 by float64) while the cluster started scored
    # 3.9e20 (hostile review). Its copy is opened at the first read, by absolute path, and
    # only if it is the file whose header was read.
    import pickle

    from cecore import _io
    path = tmp_path / "w.npz"
    np.savez_compressed(path, w=np.ones((4, 3), np.float32))
    monkeypatch.chdir(tmp_path)
    source = _io.open_array("w.npz")
    copy = pickle.loads(pickle.dumps(source))
    assert copy._stream is None and os.path.isabs(copy.path)  # nothing opened yet
    monkeypatch.chdir(tmp_path.parent)  # a worker's working directory
    np.testing.assert_array_equal(copy.rows(0, 4), np.ones((4, 3), np.float32))
    copy.close()
    again = pickle.loads(pickle.dumps(source))
    os.remove(path)
    np.savez_compressed(path, w=np.ones((4, 3), np.float64))
    with pytest.raises(ValueError, match="changed after its header was read"):
        again.rows(0, 4)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="changed after its header was read"):
        source.rows(0, 4)


def test_weight_and_bias_files_are_copied_once_checked(tmp_path):
    # A --weight or --bias file stayed a map of the file, read at every chunk: rewritten
    # in place while a run went on (or a Dask cluster started), the weights changed
    # midway (5.3188 for 5.3518; a bias gave 3.7e19; hostile review).
    from cecore import _io
    from cecore import _validation as V
    np.save(tmp_path / "w.npy", np.linspace(0.5, 2.0, 6))
    mapped = _io.load_small(str(tmp_path / "w.npy"), "--weight")
    assert not np.shares_memory(V.class_weight(mapped, 6), mapped)
    np.save(tmp_path / "b.npy", np.zeros(6, np.float32))
    bias = _io.load_small(str(tmp_path / "b.npy"), "bias")
    head, _ = batch._linear_head((5, 3), np.float32, _io.InMemoryArray(np.ones((6, 3), np.float32)),
                                 bias, "logits")
    assert not np.shares_memory(head.bias, bias)
