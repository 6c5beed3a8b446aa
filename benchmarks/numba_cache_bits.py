"""Do Numba kernels loaded from the on-disk cache give the bits of the same kernels
compiled in the process? (They did not before the twenty-eighth session: see
kernel_findings.md; tests/test_threads.py checks the same two steps.)

Three fresh processes share one new ``NUMBA_CACHE_DIR``: the first computes a float64
loss + gradient with ``n_threads=1`` (compiling and caching the serial kernel); the
second with ``n_threads=1`` (serial kernel from the cache) and ``2`` (parallel kernel
compiled there); the third with both (both from the cache). Prints each gradient's
checksum and exits 1 when one process's two thread counts disagree.
Usage: ``python benchmarks/numba_cache_bits.py [--rows 3000] [--classes 77]``.
"""

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = """
import sys, numpy as np, cecore
rows, classes = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(5)
x = rng.standard_normal((rows, classes)) * 3
t = rng.integers(0, classes, rows)
for n in map(int, sys.argv[3:]):
    _, g = cecore.cross_entropy(x, t, return_grad=True, backend="numba", n_threads=n)
    print(n, int(g.view(np.int64).sum()))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=77)
    args = parser.parse_args()
    disagree = False
    with tempfile.TemporaryDirectory(prefix="cecore_cache_bits_") as cache:
        # the checkout beside this script first, before an installed cecore
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        for step, threads in enumerate((["1"], ["1", "2"], ["1", "2"]), 1):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(args.rows),
                                  str(args.classes), *threads],
                                 capture_output=True, text=True, env=env, check=True)
            sums = dict(line.split() for line in out.stdout.split("\n") if line)
            print(f"process {step}: " + ", ".join(f"n_threads={n}: gradient checksum {c}"
                                                  for n, c in sums.items()))
            disagree |= len(set(sums.values())) > 1
    print("n_threads=1 and 2 disagree in a process" if disagree else "bitwise identical")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
