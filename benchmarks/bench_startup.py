"""Start-up cost of cecore, each case measured in fresh Python processes.

Usage::

    python benchmarks/bench_startup.py            # 5 runs per case
    python benchmarks/bench_startup.py --quick    # 3 runs per case

Cases: ``import cecore``; import + first ``cross_entropy(..., return_grad=True)`` on a small
float32 array with the Cython backend; the same with the Numba backend with a cold JIT
cache (a new, empty ``NUMBA_CACHE_DIR`` per run) and a warm one (the same directory,
filled by a previous run); and, for scale, ``import torch`` + a first ``F.cross_entropy``
with ``backward()``. Inside each process the import and the first call are timed with
``time.perf_counter``; the whole process's wall time (interpreter start-up included) is
timed from outside. Medians are printed and saved to ``benchmarks/results/runs/startup.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Each snippet prints one JSON line of in-process timings, in seconds.
_CECORE_CALL = """
import json, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import cecore
t2 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((64, 10), dtype=np.float32)
t = np.arange(64) % 10
loss, grad = cecore.cross_entropy(x, t, return_grad=True, backend={backend!r})
t3 = time.perf_counter()
print(json.dumps({{"numpy_import": t1 - t0, "import": t2 - t1, "first_call": t3 - t2}}))
"""

_IMPORT_ONLY = """
import json, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
import cecore
t2 = time.perf_counter()
print(json.dumps({"numpy_import": t1 - t0, "import": t2 - t1}))
"""

_TORCH_CALL = """
import json, time
t1 = time.perf_counter()
import torch
import torch.nn.functional as F
t2 = time.perf_counter()
x = torch.randn(64, 10, requires_grad=True)
t = torch.arange(64) % 10
F.cross_entropy(x, t).backward()
t3 = time.perf_counter()
print(json.dumps({"import": t2 - t1, "first_call": t3 - t2}))
"""


def run_snippet(code, env):
    """Run ``code`` in a fresh interpreter; return its JSON timings plus the process wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=C.child_env(env), capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"snippet failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = wall
    return result


def base_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("NUMBA_CACHE_DIR", None)
    return env


def measure(label, code, runs, env_for_run):
    """Run a case ``runs`` times (``env_for_run(i)`` gives each run's environment); medians."""
    samples = [run_snippet(code, env_for_run(i)) for i in range(runs)]
    keys = samples[0].keys()
    medians = {k: statistics.median(s[k] for s in samples) for k in keys}
    print(f"  {label}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in medians.items()),
          flush=True)
    return {"case": label, "runs": runs, "median_s": medians, "samples_s": samples}


def backend_loads(backend, env):
    code = f"import cecore; cecore._backends.get_backend({backend!r})"
    return subprocess.run([sys.executable, "-c", code], env=C.child_env(env),
                          capture_output=True).returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per case instead of 5")
    parser.add_argument("--runs", type=int, help="runs per case (default 5, 3 with --quick)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be >= 1")

    env = base_env()
    notes, cases = [], []
    print(f"fresh-process start-up timings, median of {runs} runs", flush=True)
    cases.append(measure("python -c pass (interpreter only)", "import json, time\n"
                         "print(json.dumps({}))", runs, lambda i: env))
    cases.append(measure("import cecore", _IMPORT_ONLY, runs, lambda i: env))

    if backend_loads("cython", env):
        cases.append(measure("import + first call, cython", _CECORE_CALL.format(backend="cython"),
                             runs, lambda i: env))
    else:
        notes.append("the Cython backend does not load here: its case is skipped")
        print(f"note: {notes[-1]}")

    with tempfile.TemporaryDirectory(prefix="cecore-numba-cache-") as root:
        def cold(i):
            # a new empty cache directory per run: every kernel is compiled from scratch
            return {**env, "NUMBA_CACHE_DIR": os.path.join(root, f"cold{i}")}

        warm_dir = os.path.join(root, "warm")
        code = _CECORE_CALL.format(backend="numba")
        cases.append(measure("import + first call, numba, cold cache", code, runs, cold))
        run_snippet(code, {**env, "NUMBA_CACHE_DIR": warm_dir})  # fills the warm cache
        cases.append(measure("import + first call, numba, warm cache", code, runs,
                             lambda i: {**env, "NUMBA_CACHE_DIR": warm_dir}))

    try:
        cases.append(measure("torch: import + first cross_entropy + backward", _TORCH_CALL,
                             runs, lambda i: env))
    except RuntimeError as exc:
        notes.append(f"torch case skipped: {exc}")
        print(f"note: {notes[-1]}")

    header = ["case", "numpy import ms", "import ms", "first call ms", "import + call ms",
              "process wall ms"]
    rows = []
    for case in cases:
        m = case["median_s"]
        imp, call = m.get("import"), m.get("first_call")
        fmt = lambda v: "-" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
        total = None if imp is None or call is None else imp + call
        rows.append([case["case"], fmt(m.get("numpy_import")), fmt(imp), fmt(call), fmt(total),
                     fmt(m["process_wall"])])
    print("\n" + C.format_table(header, rows))
    print("(medians; cecore's 'import' excludes numpy's own import, shown apart; 'process "
          "wall' includes the interpreter's start-up)")

    data = {"machine": C.machine_info(), "runs": runs, "cases": cases, "notes": notes,
            "call": "cross_entropy(x, t, return_grad=True) on float32 (64, 10), default n_threads"}
    print(f"\nsaved {C.save_json(data, 'startup.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
