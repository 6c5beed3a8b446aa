"""Is a Numba kernel as fast in the process that compiles it as in one that loads it from
the on-disk cache? (Numba's float64 BCE on AVX-512 code was not, up to 1.5x slower where
it was compiled, until its exps' scratch moved to the stack: kernel_findings.md,
thirty-fifth and thirty-sixth sessions.)

Pairs of fresh processes share a new ``NUMBA_CACHE_DIR``: the first compiles the kernels
(and caches them), the second loads them. Each times float64 binary cross-entropy sums
(``bce_logits``, the 'mean' call) and float64 softmax cross-entropy loss + gradient on
one and two threads, medians of ``--repeat`` calls. Prints both processes' times and
load / compile ratios, pair by pair. Run:
``python benchmarks/numba_compile_vs_load.py [--pairs 2] [--rows 16384] [--repeat 21]``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env, format_table, machine_info  # noqa: E402

_CHILD = """
import json, sys, time
import numpy as np
from cecore._backends import get_backend
from cecore._config import REDUCE_BLOCK
rows, repeat = int(sys.argv[1]), int(sys.argv[2])
k = get_backend("numba")
rng = np.random.default_rng(0)
x = rng.standard_normal((rows, 1000)); y = rng.random((rows, 1000))
one = np.broadcast_to(1.0, x.shape); gs = np.broadcast_to(1 / x.size, x.shape)
sums = np.empty(-(-x.size // REDUCE_BLOCK))
t = rng.integers(0, 1000, (rows, 1)); w = np.ones(1000)
loss, grad = np.empty((rows, 1)), np.empty((rows, 1000, 1))
calls = {
    "bce sums": lambda n: k.bce_logits(x, y, one, one, gs, sums, None, n),
    "ce loss+grad": lambda n: k.softmax_ce_index(x.reshape(rows, 1000, 1), t, w, -100, 0.0,
                                                 np.broadcast_to(1 / rows, (rows, 1)), loss,
                                                 grad, n),
}
out = {}
for name, call in calls.items():
    for n in (1, 2):
        call(n)
        took = []
        for _ in range(repeat):
            start = time.perf_counter(); call(n); took.append(time.perf_counter() - start)
        out[f"{name}, {n} thread{'s' if n > 1 else ''}"] = 1e3 * float(np.median(took))
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    rows = []
    for pair in range(1, args.pairs + 1):
        with tempfile.TemporaryDirectory(prefix="cecore_compile_vs_load_") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            runs = []
            for _ in ("compile", "load"):
                out = subprocess.run([sys.executable, "-c", _CHILD, str(args.rows),
                                      str(args.repeat)], env=child_env(env), capture_output=True,
                                     text=True, check=True)
                runs.append(json.loads(out.stdout))
        for case in runs[0]:
            compiled, loaded = runs[0][case], runs[1][case]
            rows.append([pair, case, f"{compiled:.2f}", f"{loaded:.2f}",
                         f"{loaded / compiled:.2f}"])
    print(format_table(["pair", f"float64 {args.rows}x1000", "compiling ms", "loading ms",
                        "load / compile"], rows))
    info = machine_info()
    print(f"CPU: {info['cpu_model']}, {info['usable_cpus']} usable")


if __name__ == "__main__":
    main()
