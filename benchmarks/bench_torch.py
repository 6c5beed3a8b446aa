"""cecore inside torch training (``cecore.torch``) against torch's own loss, side by side.

Usage::

    python benchmarks/bench_torch.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_torch.py --quick    # smoke test with small shapes

Four measurements, float32 on the CPU, with every competitor in this one process on the
same tensors:

``loss``
    Forward + backward of the mean cross-entropy of a leaf logits tensor:
    ``cecore.torch.cross_entropy(x, t).backward()`` against
    ``torch.nn.functional.cross_entropy(x, t).backward()`` (65536x1000 and 4096x50257).
``step``
    One SGD training step (zero_grad, forward, loss, backward, step) of a small language
    model, embedding -> linear -> cross-entropy over a 50257-token vocabulary, built twice
    with the same parameters: cecore's loss module against torch's (sizes are
    tokens x embedding dim x vocabulary).
``nll``
    Forward + backward of ``nll_loss`` of log-probabilities (a leaf tensor), cecore.torch
    against torch: few classes and many rows, where cecore's NumPy gather is weakest.
``overhead``
    The bridge against cecore called directly on NumPy views of the same memory
    (``cecore.cross_entropy(x, t, return_grad=True)``, a new gradient array per call as
    the bridge allocates a new gradient tensor): what autograd, the custom operator and
    the tensor wrapping cost on top of the kernel.

Timings are medians of interleaved rounds: each round calls every competitor once, in an
order rotated from round to round, so a busy phase of a shared machine hits all of them.
Before timing, the competitors' losses and gradients are checked against each other.
Results go to ``benchmarks/results/runs/torch.json`` (``torch_quick.json`` with ``--quick``,
``torch_<sections>.json`` with ``--sections`` naming only some of them).
"""

import argparse
import copy
import gc
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

FULL = {"loss": ["65536x1000", "4096x50257"], "step": ["2048x256x50257"],
        "nll": ["2000000x3", "4096x1000"], "overhead": ["1024x1000", "65536x1000", "4096x50257"]}
QUICK = {"loss": ["8192x1000", "256x50257"], "step": ["256x64x50257"],
         "nll": ["200000x3", "1024x1000"], "overhead": ["1024x1000", "8192x1000"]}
NOTES = []


def note(message):
    print(f"note: {message}", flush=True)
    NOTES.append(message)


def interleaved_medians(fns, repeat, warmup=1):
    """``({name: median seconds}, {name: [seconds]})`` of the callables in ``fns``.

    After ``warmup`` untimed calls of each, ``repeat`` rounds call every competitor once,
    the order rotated by one each round. Results are dropped right after each call.
    """
    time.sleep(0.3)  # let the previous measurement's worker threads go idle
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def assert_close(name, ours, theirs, rtol=1e-4):
    """Stop the run when ``ours`` differs from ``theirs`` beyond ``rtol`` (of the largest value)."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    scale = max(float(theirs.abs().max()), 1e-30)
    worst = float((ours - theirs).abs().max())
    if not worst <= rtol * scale:
        raise AssertionError(f"{name}: off by {worst:.3g} (largest value {scale:.3g})")


def _thp_mode():
    """Linux's transparent huge page mode (the bracketed word), or 'unknown'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def parse(size):
    return tuple(int(v) for v in size.split("x"))


def record(records, section, size, medians, times, baseline, competitor):
    """Store the section's timings and return ``baseline / competitor`` (speed-up)."""
    for name, seconds in medians.items():
        records.append({"section": section, "size": size, "competitor": name,
                        "median_ms": seconds * 1e3, "times_ms": [s * 1e3 for s in times[name]]})
    return medians[baseline] / medians[competitor]


# ------------------------------------------------------------------------- sections
def bench_loss(size, threads, repeat, records):
    import torch
    import torch.nn.functional as F

    import cecore.torch as ct

    n, c = parse(size)
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(n, c, generator=gen)).requires_grad_()
    t = torch.randint(0, c, (n,), generator=gen)

    def with_torch():
        x.grad = None  # a fresh gradient each call, as in training
        F.cross_entropy(x, t).backward()

    def with_cecore():
        x.grad = None
        ct.cross_entropy(x, t, n_threads=threads).backward()

    with_torch()
    expected_loss, expected_grad = F.cross_entropy(x, t).detach(), x.grad
    with_cecore()
    assert_close(f"loss {size}", ct.cross_entropy(x, t), expected_loss)
    assert_close(f"gradient {size}", x.grad, expected_grad)
    del expected_grad
    x.grad = None
    medians, times = interleaved_medians({"torch": with_torch, "cecore.torch": with_cecore}, repeat)
    speedup = record(records, "loss", size, medians, times, "torch", "cecore.torch")
    print(f"  loss {size:>14s}: torch {medians['torch'] * 1e3:9.1f} ms  cecore.torch "
          f"{medians['cecore.torch'] * 1e3:9.1f} ms  speed-up {speedup:.2f}x", flush=True)
    return {"section": "loss", "size": size, "speedup_vs_torch": speedup}


def bench_nll(size, threads, repeat, records):
    import torch
    import torch.nn.functional as F

    import cecore.torch as ct

    n, c = parse(size)
    gen = torch.Generator().manual_seed(0)
    x = torch.log_softmax(2 * torch.randn(n, c, generator=gen), 1).requires_grad_()
    t = torch.randint(0, c, (n,), generator=gen)

    def run(loss_fn, **kw):
        def call():
            x.grad = None
            loss_fn(x, t, **kw).backward()
        return call

    with_torch, with_cecore = run(F.nll_loss), run(ct.nll_loss, n_threads=threads)
    with_torch()
    expected_grad = x.grad
    with_cecore()
    assert_close(f"nll_loss {size}", ct.nll_loss(x, t), F.nll_loss(x, t).detach())
    assert_close(f"nll_loss gradient {size}", x.grad, expected_grad)
    medians, times = interleaved_medians({"torch": with_torch, "cecore.torch": with_cecore}, repeat)
    speedup = record(records, "nll", size, medians, times, "torch", "cecore.torch")
    print(f"  nll  {size:>14s}: torch {medians['torch'] * 1e3:9.1f} ms  cecore.torch "
          f"{medians['cecore.torch'] * 1e3:9.1f} ms  speed-up {speedup:.2f}x", flush=True)
    return {"section": "nll", "size": size, "speedup_vs_torch": speedup}


def bench_step(size, threads, repeat, records):
    import torch

    import cecore.torch as ct

    n_tokens, dim, vocab = parse(size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab))
    models = {"torch": model, "cecore.torch": copy.deepcopy(model)}
    losses = {"torch": torch.nn.CrossEntropyLoss(),
              "cecore.torch": ct.CrossEntropyLoss(n_threads=threads)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=gen)
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)

    def step(name):
        def run():
            optimizers[name].zero_grad(set_to_none=True)
            losses[name](models[name](tokens), targets).backward()
            optimizers[name].step()
        return run

    # One step's gradients from equal parameters must agree before anything is timed.
    grads = {}
    for name, m in models.items():
        m.zero_grad(set_to_none=True)
        losses[name](m(tokens), targets).backward()
        grads[name] = [p.grad.clone() for p in m.parameters()]
    for ours, theirs in zip(grads["cecore.torch"], grads["torch"]):
        assert_close(f"step {size} parameter gradient", ours, theirs)
    del grads
    medians, times = interleaved_medians({name: step(name) for name in models}, repeat)
    speedup = record(records, "step", size, medians, times, "torch", "cecore.torch")
    print(f"  step {size:>14s}: torch {medians['torch'] * 1e3:9.1f} ms  cecore.torch "
          f"{medians['cecore.torch'] * 1e3:9.1f} ms  speed-up {speedup:.2f}x", flush=True)
    return {"section": "step", "size": size, "tokens": n_tokens, "dim": dim, "vocab": vocab,
            "speedup_vs_torch": speedup}


def bench_overhead(size, threads, repeat, records):
    import torch

    import cecore
    import cecore.torch as ct

    n, c = parse(size)
    gen = torch.Generator().manual_seed(2)
    x = (2 * torch.randn(n, c, generator=gen)).requires_grad_()
    t = torch.randint(0, c, (n,), generator=gen)
    x_np, t_np = x.detach().numpy(), t.numpy()  # the same memory

    def direct():
        cecore.cross_entropy(x_np, t_np, return_grad=True, n_threads=threads)

    def bridge():
        x.grad = None
        ct.cross_entropy(x, t, n_threads=threads).backward()

    loss, grad = cecore.cross_entropy(x_np, t_np, return_grad=True, n_threads=threads)
    bridge()
    assert_close(f"overhead {size} gradient", x.grad, torch.from_numpy(grad), rtol=1e-6)
    del grad
    x.grad = None
    medians, times = interleaved_medians({"cecore (NumPy)": direct, "cecore.torch": bridge},
                                         repeat)
    ratio = record(records, "overhead", size, medians, times, "cecore.torch", "cecore (NumPy)")
    print(f"  overhead {size:>10s}: NumPy {medians['cecore (NumPy)'] * 1e3:9.2f} ms  "
          f"cecore.torch {medians['cecore.torch'] * 1e3:9.2f} ms  overhead {ratio - 1:+.1%}",
          flush=True)
    return {"section": "overhead", "size": size, "overhead": ratio - 1}


SECTIONS = {"loss": bench_loss, "step": bench_step, "nll": bench_nll,
            "overhead": bench_overhead}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke test)")
    parser.add_argument("--repeat", type=int, help="timed rounds (default 7, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for torch and cecore (default 2)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    repeat = args.repeat or (3 if args.quick else 7)

    import torch

    import cecore

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    machine = C.machine_info(threads=args.threads,
                             cecore_config=cecore.show_config(file=io.StringIO()),
                             torch_threads=torch.get_num_threads())
    print(f"CPU: {machine['cpu_model']}; threads: {args.threads}; rounds: {repeat} "
          "(median reported); float32", flush=True)
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    records, summary = [], []
    for section in args.sections:
        for size in sizes[section]:
            summary.append(SECTIONS[section](size, args.threads, repeat, records))
            gc.collect()

    note("loss, step and nll: speed-up = torch's median time / cecore.torch's (> 1: cecore faster)")
    note("overhead = cecore.torch's median time / cecore on NumPy views with return_grad=True "
         "- 1 (the same kernel and a new gradient buffer each; the difference is autograd, the "
         "custom operator and wrapping)")
    note(f"transparent huge pages: {_thp_mode()}; THP_MEM_ALLOC_ENABLE="
         f"{os.environ.get('THP_MEM_ALLOC_ENABLE')!r} (torch's allocator uses 4 kB pages "
         "unless it is 1; cecore.torch advises huge pages for its gradient buffers, as NumPy "
         "does for its arrays)")
    rows = []
    for s in summary:
        value = (f"{s['overhead']:+.1%} overhead" if s["section"] == "overhead"
                 else f"{s['speedup_vs_torch']:.2f}x faster than torch")
        ms = {r["competitor"]: r["median_ms"] for r in records
              if r["section"] == s["section"] and r["size"] == s["size"]}
        rows.append([s["section"], s["size"]] + [f"{k} {v:.2f} ms" for k, v in ms.items()] + [value])
    width = max(len(r) for r in rows)
    rows = [r[:-1] + [""] * (width - len(r)) + r[-1:] for r in rows]
    print()
    print(C.format_table(["section", "size"] + ["median"] * (width - 3) + ["result"], rows))
    note(f"load average (1, 5, 15 min) at the start {load_before}, at the end "
         f"{os.getloadavg()}: above 0 means other processes shared the CPUs")
    data = {"settings": {"threads": args.threads, "repeat": repeat, "warmup": 1,
                         "quick": args.quick, "dtype": "float32", "sizes": sizes},
            "summary": summary, "results": records, "notes": NOTES, "machine": machine}
    name = ("torch_quick.json" if args.quick else "torch.json" if args.sections == list(SECTIONS)
            else f"torch_{'_'.join(args.sections)}.json")
    print(f"\nsaved {C.save_json(data, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
