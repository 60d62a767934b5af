"""The package is one stack: every module imports only modules of its own layer or below, and no set of modules
imports each other in a circle (imports inside functions included: they must not hide a circle).

Layers, bottom up: io and assets; config (schema only); the core (torch alone: projections, store, tasks,
models, data, collection, decomposition, recovery, perturbation, analysis, selectivity, baselines,
applications); the run layer (run directories, the steps, comparison, hub, attributions, report); the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "io": 0,
    "assets": 0,
    "config": 1,
    "schema": 1,
    "constraints": 1,
    "commands": 1,
    "rundir": 3,
    "runs": 3,
    "run_locations": 3,
    "compare": 3,
    "hub": 3,
    "attribution": 3,
    "explain": 3,
    "report": 3,
    "trace_run": 3,
    "cli": 4,
}
CORE = 2


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "npeff_lens").rglob("*.py"):
        parts = path.relative_to(ROOT / "npeff_lens").with_suffix("").parts
        mods[".".join(p for p in parts if p != "__init__")] = path
    for path in (ROOT / "triton_kernels").rglob("*.py"):
        parts = ("triton_kernels", *path.relative_to(ROOT / "triton_kernels").with_suffix("").parts)
        mods[".".join(p for p in parts if p != "__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's package imports (module level and inside functions), as top-level package modules."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        package = name.split(".") if is_package else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                for alias in node.names:
                    full = ".".join([*target, alias.name])
                    found.add(full if full in mods else ".".join(target))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("npeff_lens."):
                found.add(node.module.removeprefix("npeff_lens."))
            elif isinstance(node, ast.Import):
                found.update(a.name.removeprefix("npeff_lens.") for a in node.names if a.name.startswith("npeff_lens."))
        top = name.split(".")[0] if name else ""
        edges[top] = edges.get(top, set()) | {t.split(".")[0] for t in found if t and t.split(".")[0] != top}
    return edges


def _layer(top: str) -> int:
    return LAYERS.get(top, CORE)


def test_no_module_imports_one_above_it():
    edges = _imports(_modules())
    upward = sorted((a, b) for a, targets in edges.items() for b in targets if a and b and _layer(b) > _layer(a))
    assert not upward, f"imports of a higher layer: {upward}"


def test_no_import_circles():
    edges = _imports(_modules())
    graph = {a: {b for b in targets if b} for a, targets in edges.items() if a}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other: {circles}"


def test_the_config_module_and_the_help_need_no_torch():
    code = "import sys, npeff_lens.config, npeff_lens.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# The two L1 solvers of App. F keep their iterations in one loop each, as the papers write them.
LONG_FUNCTIONS = {("recovery", "fpc"), ("recovery", "solve_l1")}


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        limit = 700 if name in ("config", "runs") else 1100
        if text.count("\n") > limit:
            long_modules.append((name, text.count("\n"), limit))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > 100 and (name, node.name) not in LONG_FUNCTIONS:
                    long_functions.append((name, node.name, n_lines))
    assert not long_modules, f"modules over their line limit (name, lines, limit): {long_modules}"
    assert not long_functions, f"functions over 100 lines: {long_functions}"


def test_the_method_registry_and_the_config_name_the_same_methods():
    from npeff_lens.baselines import REGISTRY
    from npeff_lens.config import METHODS

    assert tuple(REGISTRY) == METHODS
    for m in REGISTRY.values():
        assert m.space in ("parameters", "activations")
        assert (m.fit is None) == (m.name == "npeff") == (m.folder is None)
        if m.cls is not None:
            assert hasattr(m.estimator, "load") and hasattr(m.estimator, "save")
