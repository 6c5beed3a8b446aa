"""Dask scale-out: chunks scored on worker processes, partial sums combined exactly.

Oracle: cecore.cross_entropy on the whole array in memory (the combined mean must equal it
bit for bit) and a naive argmax for the accuracy. One LocalCluster (2 worker processes,
loopback only) serves the module.
"""

import json
import time

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

import cecore
from cecore import _dask
from cecore._config import REDUCE_BLOCK
from cecore.cli import main
from cecore.metrics import classification_report_from_logits
from oracle import random_index_target, random_proba_target

N_ROWS = 3 * REDUCE_BLOCK + 517


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


def test_dask_array_index_targets_bitwise(client, rng):
    n_classes = 31
    x = (3 * rng.standard_normal((N_ROWS, n_classes))).astype(np.float32)
    t = random_index_target(rng, N_ROWS, n_classes, p_ignore=0.15)
    w = rng.random(n_classes) + 0.2
    # chunks that are not multiples of the reduction block, and differ between x and t
    xd = da.from_array(x, chunks=(5000, n_classes))
    td = da.from_array(t, chunks=7001)
    r = _dask.score_dask(xd, td, weight=w, label_smoothing=0.1, client=client)
    assert r.chunk_rows % REDUCE_BLOCK == 0
    assert r.mean_loss == cecore.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    keep = t != -100
    assert r.rows_scored == keep.sum()
    assert r.accuracy == np.mean(np.argmax(x, axis=1)[keep] == t[keep])
    unweighted = _dask.score_dask(xd, td, client=client)
    assert unweighted.mean_loss == cecore.cross_entropy(x, t)
    # every metric equals the in-memory report bit for bit
    report = classification_report_from_logits(x, t, weight=w, label_smoothing=0.1)
    for key in ("accuracy", "top_k_accuracy", "mean_entropy", "ece", "brier"):
        assert getattr(r, key) == report[key], key


def test_dask_probability_targets_bitwise(client, rng):
    x = rng.standard_normal((N_ROWS, 6))
    p = random_proba_target(rng, (N_ROWS, 6))
    r = _dask.score_dask(da.from_array(x, chunks=(9000, 6)), da.from_array(p, chunks=(9000, 6)),
                         client=client)
    assert r.mean_loss == cecore.cross_entropy(x, p)
    report = classification_report_from_logits(x, p)
    assert r.accuracy is None and r.ece is None
    assert (r.mean_entropy, r.brier) == (report["mean_entropy"], report["brier"])


def test_cli_scheduler_address(client, rng, tmp_path, capsys):
    x = (2 * rng.standard_normal((N_ROWS, 10))).astype(np.float32)
    t = random_index_target(rng, N_ROWS, 10, p_ignore=0.05)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    # a small budget: several tasks, each memory-mapping its own rows on a worker
    code = main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json",
                 "--scheduler", client.scheduler.address, "--memory-budget", "400KB",
                 "--weight", ",".join(["1", "2"] * 5)])
    out, err = capsys.readouterr()
    assert code == 0, err
    w = np.array([1.0, 2.0] * 5)
    assert np.float32(json.loads(out)["mean_loss"]) == cecore.cross_entropy(x, t, weight=w)


def test_cli_dask_local(rng, tmp_path, capsys):
    x = rng.standard_normal((N_ROWS, 4))
    t = random_index_target(rng, N_ROWS, 4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    code = main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json", "--dask", "local"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["mean_loss"] == cecore.cross_entropy(x, t)


def test_dask_rejects_compressed_npz(tmp_path, capsys):
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((10, 3)), t=np.zeros(10, np.int64))
    code = main(["score", f"{tmp_path}/d.npz:x", f"{tmp_path}/d.npz:t", "--dask", "local"])
    _, err = capsys.readouterr()
    assert code == 1 and "compressed .npz members cannot be read in parallel" in err


def test_dask_refuses_the_logits_as_their_own_targets(client, rng, tmp_path, capsys):
    # Scoring without Dask refuses this; through Dask the logits were scored as their own
    # probability targets (mean loss -80.1, exit 0; found by a hostile review).
    x = rng.standard_normal((50, 4))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "z.npz", x=x)
    for args in ([str(tmp_path / "x.npy")] * 2, [f"{tmp_path / 'z.npz'}:x"] * 2):
        code = main(["score", *args, "--scheduler", client.scheduler.address])
        _, err = capsys.readouterr()
        assert code == 1 and "the logits and the targets are the same array" in err, err
    xd = da.from_array(x, chunks=(20, 4))
    xt = torch.from_numpy(x)
    for logits, target in ((x, x), (x, x[:, :]), (xd, xd), (xt, xt)):
        with pytest.raises(ValueError, match="the logits and the targets are the same"):
            _dask.score_dask(logits, target, client=client)
    # equal but distinct probabilities are scored (dask names them alike: content hashes)
    p = np.full((50, 4), 0.25)
    r = _dask.score_dask(da.from_array(p, chunks=(20, 4)), da.from_array(p.copy(),
                         chunks=(20, 4)), input_kind="probs", client=client)
    assert r.mean_loss == pytest.approx(np.log(4))


@pytest.mark.parametrize("kind", ["compressed", "fortran"])
def test_cli_dask_takes_any_unembedding_file(client, rng, tmp_path, capsys, kind):
    # The README says a compressed unembedding is decompressed by each task on Dask (as
    # score_dask does); the command refused it with the logits' "cannot be read in
    # parallel". A Fortran-ordered one (np.save of a transposed (d, V) kernel), read whole
    # and transposed, was refused as "stored in Fortran order". Oracle: in memory.
    from cecore import batch
    h = rng.standard_normal((300, 8)).astype(np.float32)
    w = (0.3 * rng.standard_normal((12, 8))).astype(np.float32)
    t = random_index_target(rng, 300, 12)
    np.save(tmp_path / "h.npy", h)
    np.save(tmp_path / "t.npy", t)
    if kind == "compressed":
        path = tmp_path / "w.npz"
        np.savez_compressed(path, w=w)
    else:
        path = tmp_path / "w.npy"
        np.save(path, np.asfortranarray(w))
    code = main(["score", "--hidden", str(tmp_path / "h.npy"), "--unembedding", str(path),
                 str(tmp_path / "t.npy"), "--json", "--scheduler", client.scheduler.address])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = batch.score(h, t, unembedding=w).mean_loss
    np.testing.assert_allclose(json.loads(out)["mean_loss"], expected, rtol=1e-6)
    r = _dask.score_dask(da.from_array(h, chunks=(70, 8)), da.from_array(t, chunks=70),
                         unembedding=str(path), client=client)
    np.testing.assert_allclose(r.mean_loss, expected, rtol=1e-6)


def test_dask_hidden_states_equal_in_memory(client, rng):
    h = rng.standard_normal((N_ROWS, 16)).astype(np.float32)
    w = (0.3 * rng.standard_normal((40, 16))).astype(np.float32)
    t = random_index_target(rng, N_ROWS, 40, p_ignore=0.1)
    r = _dask.score_dask(da.from_array(h, chunks=(6000, 16)), da.from_array(t, chunks=6000),
                         unembedding=w, client=client)
    from cecore import batch
    expected = batch.score(h, t, unembedding=w)
    # To rounding, not bit for bit (README): BLAS's last bits depend on how many rows it
    # multiplies (OpenBLAS 0.3.31 on an AMD Zen 5: 8192-row and 6000-row products differ).
    for key in ("mean_loss", "accuracy", "top_k_accuracy", "mean_entropy", "ece", "brier"):
        np.testing.assert_allclose(getattr(r, key), getattr(expected, key), rtol=1e-5,
                                   atol=1e-7, err_msg=key)


def test_dask_hidden_states_with_a_compressed_unembedding(client, rng, tmp_path, monkeypatch):
    # The unembedding in a compressed .npz member: on worker processes the reader did not
    # pickle (an open ZipFile), and Dask's threads read its one stream at once (a "Bad
    # CRC-32" on a valid file, intermittently). Oracle: the in-memory unembedding.
    import threading
    import time

    from cecore import _io, batch
    h = rng.standard_normal((N_ROWS, 16)).astype(np.float32)
    w = (0.3 * rng.standard_normal((40, 16))).astype(np.float32)
    t = random_index_target(rng, N_ROWS, 40, p_ignore=0.1)
    np.savez_compressed(tmp_path / "w.npz", w=w)
    expected = batch.score(h, t, unembedding=w)
    hd, td = da.from_array(h, chunks=(6000, 16)), da.from_array(t, chunks=6000)
    readers, lock = [], threading.Lock()
    rows = _io.StreamedArray.rows

    def slow_rows(self, start, stop):  # widens the window two threads would share
        with lock:
            readers.append(threading.get_ident())
        time.sleep(0.05)
        return rows(self, start, stop)

    monkeypatch.setattr(_io.StreamedArray, "rows", slow_rows)

    def no_client():
        raise ValueError("No clients found")

    monkeypatch.setattr("distributed.get_client", no_client)  # Dask's threaded scheduler
    with dask.config.set(scheduler="threads", num_workers=4):
        in_threads = _dask.score_dask(hd, td, unembedding=tmp_path / "w.npz")
    assert len(readers) == 1  # read once, by one of the threads
    monkeypatch.undo()
    on_workers = _dask.score_dask(hd, td, unembedding=tmp_path / "w.npz", client=client)
    for r in (in_threads, on_workers):
        for key in ("mean_loss", "accuracy", "brier"):
            np.testing.assert_allclose(getattr(r, key), getattr(expected, key), rtol=1e-5,
                                       atol=1e-7, err_msg=key)


@pytest.mark.parametrize("on_files", [False, True])
def test_task_scores_its_rows_in_budget_sized_pieces(rng, tmp_path, monkeypatch, on_files):
    # A task holds whole blocks of REDUCE_BLOCK rows; it must score them in pieces of at
    # most the budget's rows, with the same block sums as in one piece.
    from cecore import _io, batch

    x = (2 * rng.standard_normal((N_ROWS, 7))).astype(np.float32)
    t = random_index_target(rng, N_ROWS, 7, p_ignore=0.1)
    if on_files:
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "t.npy", t)
        x, t = _io.open_array(tmp_path / "x.npy"), _io.open_array(tmp_path / "t.npy")
    opts = batch.prepare_options(x.shape, x.dtype, t.shape, t.dtype, "logits", None, -100,
                                 0.0, "auto", None, 5, 15, None, None)
    whole = _dask._score_block(x, t, REDUCE_BLOCK, N_ROWS, opts, N_ROWS)
    seen = []
    score_chunk = _dask.score_chunk
    monkeypatch.setattr(_dask, "score_chunk", lambda xc, *a: seen.append(len(xc)) or score_chunk(xc, *a))
    pieces = _dask._score_block(x, t, REDUCE_BLOCK, N_ROWS, opts, 1000)
    assert max(seen) == 1000 and sum(seen) == N_ROWS - REDUCE_BLOCK
    np.testing.assert_equal(pieces, whole)


def test_worker_memory_follows_the_budget(tmp_path):
    # Hidden states: a task of 8192 rows would make 8192 x 20000 float32 logits (655 MB)
    # at once; in budget-sized pieces the worker's peak stays near its baseline (measured:
    # 727 MB before, 139 MB after, with a 64MB budget).
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    np.save(tmp_path / "h.npy", rng.standard_normal((REDUCE_BLOCK + 100, 32)).astype(np.float32))
    np.save(tmp_path / "w.npy", (0.1 * rng.standard_normal((20000, 32))).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.integers(0, 20000, REDUCE_BLOCK + 100))
    script = (
        "import resource\n"
        "from cecore._dask import score_files\n"
        "if __name__ == '__main__':\n"
        "    score_files('h.npy', 't.npy', n_workers=1, memory_budget='64MB', unembedding='w.npy')\n"
        "    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n")
    (tmp_path / "run.py").write_text(script)
    out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 400, out.stdout


def test_cli_empty_scheduler_and_absurd_workers(rng, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)))
    np.save(tmp_path / "t.npy", rng.integers(0, 3, 50))
    args = ["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json"]
    # an empty address was taken as "no scheduler" and scored locally
    assert main(args + ["--scheduler", ""]) == 1
    assert "scheduler address is empty" in capsys.readouterr().err
    # --workers without --dask local was ignored, even --workers -3
    assert main(args + ["--workers", "-3"]) == 1
    assert "--workers is for --dask local" in capsys.readouterr().err
    # 10**5 worker processes: started as many as the CPUs, with a warning
    started = []
    monkeypatch.setattr(_dask, "cpus_available", lambda: 2)
    import distributed

    class Cluster(distributed.LocalCluster):
        def __init__(self, n_workers, **kw):
            started.append(n_workers)
            super().__init__(n_workers=n_workers, **kw)

    monkeypatch.setattr(distributed, "LocalCluster", Cluster)
    assert main(args + ["--dask", "local", "--workers", "100000"]) == 0
    out, err = capsys.readouterr()
    assert started == [2] and "100000 Dask workers is more than the 2 CPUs" in err
    assert json.loads(out)["mean_loss"] == cecore.cross_entropy(np.load(tmp_path / "x.npy"),
                                                                 np.load(tmp_path / "t.npy"))


def test_weighted_mean_bitwise_when_a_task_has_only_unit_weights(client):
    # The second task's targets all have class weight 1, the others' do not. It sent them
    # as a bare count, which the client's weight sum grouped into other blocks than the
    # in-memory sum (the first task has ignored rows, so the blocks of non-ignored rows
    # do not follow the tasks): the last bit of the mean moved (seed 11; found by a
    # hostile review).
    n = 3 * REDUCE_BLOCK + 100
    for seed in (10, 11):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 3))
        t = np.empty(n, np.int64)
        t[:REDUCE_BLOCK] = rng.integers(1, 3, REDUCE_BLOCK)
        t[:REDUCE_BLOCK:rng.integers(5, 50)] = -100
        t[REDUCE_BLOCK:2 * REDUCE_BLOCK] = 0
        t[2 * REDUCE_BLOCK:] = rng.integers(1, 3, n - 2 * REDUCE_BLOCK)
        w = np.array([1.0, rng.uniform(0.01, 5), rng.uniform(0.01, 5)])
        r = _dask.score_dask(x, t, weight=w, client=client)
        assert r.mean_loss == cecore.cross_entropy(x, t, weight=w), seed


def test_score_dask_other_inputs(client, rng):
    # torch tensors as the functional API reads them (da.from_array rejected them); a dask
    # array of unknown length is a clear error (it was "logits have nan rows")
    import torch
    x, t = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)), torch.arange(300) % 5
    r = _dask.score_dask(x, t, client=client)
    assert r.mean_loss == cecore.cross_entropy(x.numpy(), t.numpy())
    xd = da.from_array(rng.random((100, 5)), chunks=50)
    xd = xd[xd[:, 0] > 0.5]
    with pytest.raises(ValueError, match="unknown size.*compute_chunk_sizes"):
        _dask.score_dask(xd, np.zeros(50, np.int64), client=client)


def test_cli_scheduler_that_never_answers_or_has_no_workers(rng, tmp_path, capsys):
    """A port that accepts and never speaks Dask (an HTTP port, a tunnel to something
    else) made `--scheduler` wait forever, and so did a scheduler without workers: both
    are errors within about distributed's connect timeout."""
    import socket
    import time

    import dask
    import distributed

    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)))
    np.save(tmp_path / "t.npy", rng.integers(0, 3, 50))
    args = ["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json"]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)  # accepts connections (the kernel does), never answers
            start = time.monotonic()
            assert main(args + ["--scheduler", "tcp://127.0.0.1:%d" % silent.getsockname()[1]]) == 1
            assert time.monotonic() - start < 30
            assert "no Dask scheduler answered" in capsys.readouterr().err
        with distributed.LocalCluster(n_workers=0, processes=False,
                                      dashboard_address=None) as cluster:
            start = time.monotonic()
            assert main(args + ["--scheduler", cluster.scheduler_address]) == 1
            assert time.monotonic() - start < 30
            assert "has no workers" in capsys.readouterr().err


def test_cli_default_workers_on_one_cpu(rng, tmp_path, capsys, monkeypatch):
    """--dask local without --workers on a 1-CPU machine warned that '2 Dask workers is
    more than the 1 CPUs available', about a number the user never gave."""
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)))
    np.save(tmp_path / "t.npy", rng.integers(0, 3, 50))
    monkeypatch.setattr(_dask, "cpus_available", lambda: 1)
    assert main(["score", str(tmp_path / "x.npy"), str(tmp_path / "t.npy"), "--json",
                 "--dask", "local"]) == 0
    assert "more than" not in capsys.readouterr().err


def test_score_dask_checks_shapes_and_chunk_rows_first(client):
    # 1-D and 3-D NumPy logits failed inside da.from_array ("Chunks do not add up to
    # shape"), and chunk_rows=0, -5 or 2.5 were silently replaced by the default.
    for x in (np.zeros(5, np.float32), np.zeros((4, 3, 2), np.float32)):
        with pytest.raises(ValueError, match=r"logits must have shape \(rows, classes\)"):
            _dask.score_dask(x, np.zeros(4, np.int64), client=client)
    x, t = np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    for rows, error in ((0, ValueError), (-5, ValueError), (2.5, TypeError),
                        (True, TypeError), ("8", TypeError)):
        with pytest.raises(error, match="chunk_rows must be None or an int >= 1"):
            _dask.score_dask(x, t, chunk_rows=rows, client=client)
    assert _dask.score_dask(x, t, chunk_rows=np.int64(3), client=client).mean_loss == \
        cecore.cross_entropy(x, t)


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 6.78 EiB"),
                                   __import__("struct").error("unpack_from requires")])
def test_a_service_that_speaks_first_is_no_scheduler(error):
    # an SMTP or SSH banner read as a Dask frame: "Unable to allocate 6.78 EiB for an
    # array", or a struct.error, reached the user as they were (hostile review)
    def client_class(address, timeout):
        raise error

    with pytest.raises(ValueError, match="cannot connect to a Dask scheduler at tcp://x:25"):
        _dask._connect(client_class, "tcp://x:25")


def test_quiet_logs_covers_the_client_logger():
    # distributed.client has a level of its own: a lost scheduler printed its reconnection
    # attempts and a traceback around the one-line error (hostile review)
    import logging
    with _dask._quiet_logs():
        assert logging.getLogger("distributed.client").getEffectiveLevel() == logging.CRITICAL
        assert logging.getLogger("distributed").getEffectiveLevel() == logging.CRITICAL


def test_a_cluster_without_workers_is_an_error_not_a_hang(monkeypatch):
    # With --scheduler, a run whose workers all died waited forever: distributed waits
    # for workers without end (hostile review). Fakes: a result that never comes, a
    # cluster with no worker; the patience is the connect timeout.
    class Never:
        def result(self, timeout):
            time.sleep(timeout)
            raise TimeoutError

    class Empty:
        def scheduler_info(self):
            return {"workers": {}}

    monkeypatch.setattr(_dask, "_POLL", 0.01)
    with dask.config.set({"distributed.comm.timeouts.connect": "0.1s"}):
        start = time.monotonic()
        with pytest.raises(ValueError, match="has had no worker for 0.1 s"):
            _dask._result(Never(), Empty(), dask)
    assert time.monotonic() - start < 5


def test_a_bias_without_its_unembedding_is_refused():
    # score_dask dropped it and scored the logits alone (mean loss 2.01 where the biased
    # logits give 8.37); batch.score and the command line refuse it.
    x = np.random.default_rng(0).standard_normal((100, 5))
    with pytest.raises(ValueError, match="bias is the unembedding's"):
        _dask.score_dask(x, np.zeros(100, np.int64), bias=np.array([10.0, 0, 0, 0, 0]))
