"""The package's layering: imports run one way, top to bottom, and only the registry
reaches a backend. Oracle: cecore's own source, parsed with ``ast`` (lazy imports inside
functions count too)."""

import ast
import os
import subprocess
import sys
import textwrap

import cecore

PACKAGE = os.path.dirname(os.path.abspath(cecore.__file__))
ROOT = os.path.dirname(PACKAGE)

# Higher imports lower (or its own package). The facade cecore/__init__.py is not ranked:
# it re-exports from every layer, lazily for the heavy ones.
RANKS = {
    "cecore.cli": 90,
    "cecore.demo": 80,
    "cecore._dask": 72, "cecore.batch": 71, "cecore._io": 70,
    "cecore.torch": 65,
    "cecore.classifier": 60, "cecore.metrics": 60,
    "cecore.losses": 52, "cecore.linear": 51, "cecore.functional": 50,
    "cecore._backends": 30,
    "cecore._numba": 20, "cecore_ext": 20,
    "cecore._validation": 10, "cecore._reduce": 10,
    "cecore._config": 0,
}
BACKENDS = ("cecore._numba", "cecore_ext")


def _rank(module):
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name, RANKS[name]
    return None, None


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[:-9] if rel.endswith(".__init__") else rel), path


def _imports(module, path):
    """cecore modules imported anywhere in ``path`` (absolute names)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module
            found.add(target)
            # "from . import x" imports the submodule x when there is one
            found.update(f"{target}.{a.name}" for a in node.names)
    known = dict(_modules())
    return {m for m in found if m.split(".")[0] in ("cecore", "cecore_ext")
            and (m in known or m == "cecore_ext")}


def test_imports_run_one_way_and_only_the_registry_reaches_a_backend():
    graph = {module: _imports(module, path) for module, path in _modules()}
    problems = []
    for module, targets in graph.items():
        if module == "cecore":
            continue
        group, rank = _rank(module)
        assert rank is not None, f"{module} has no layer in RANKS: add it"
        for target in targets:
            tgroup, trank = _rank(target)
            if target == "cecore" or tgroup is None:
                continue
            if tgroup in BACKENDS and group not in BACKENDS + ("cecore._backends",):
                problems.append(f"{module} imports the backend module {target}")
            if trank > rank or (trank == rank and tgroup != group):
                problems.append(f"{module} (layer {rank}) imports {target} (layer {trank})")
    assert not problems, "\n".join(problems)
    # and no cycles among cecore's own modules
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt == "cecore" or nxt not in graph:
                continue
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state and node != "cecore":
            visit(node, [])


def test_log_loss_with_the_default_backend_does_not_import_numba():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import cecore.metrics
        p = np.random.default_rng(0).dirichlet(np.ones(3), 100)
        cecore.metrics.log_loss(np.arange(100) % 3, p)
        import cecore
        cecore.cross_entropy(np.log(p), np.arange(100) % 3)
        print("numba" in sys.modules, "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_both_backends_implement_every_kernel_of_the_contract():
    from cecore._backends import BACKENDS, KERNELS, get_backend

    for name in BACKENDS:
        module = get_backend(name)
        assert [k for k in KERNELS if not callable(getattr(module, k, None))] == [], name
