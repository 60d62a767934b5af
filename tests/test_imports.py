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
    "errors": 0,
    "formatting": 0,
    "config": 1,
    "schema": 1,
    "constraints": 1,
    "commands": 1,
    "rundir": 3,
    "runs": 3,
    "run_locations": 3,
    "run_perturbation": 3,
    "comparison": 3,
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
LONG_FUNCTIONS = {("sensing", "fpc"), ("sensing", "solve_l1")}
MODULE_LINES = 800
# Modules allowed more lines, each because one concern needs them (name: (limit, the concern)).
LONG_MODULES = {
    "store": (950, "the crash-safe PEF store: its one on-disk format written, read, verified and repaired"),
}
# Modules held to fewer lines than the rest: the schema every command reads, and the steps of a run.
SHORT_MODULES = {"config": 700, "runs": 700}


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        limit = SHORT_MODULES.get(name) or LONG_MODULES.get(name, (MODULE_LINES, ""))[0]
        if text.count("\n") > limit:
            long_modules.append((name, text.count("\n"), limit))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > 100 and (name, node.name) not in LONG_FUNCTIONS:
                    long_functions.append((name, node.name, n_lines))
    assert not long_modules, f"modules over their line limit (name, lines, limit): {long_modules}"
    assert not long_functions, f"functions over 100 lines: {long_functions}"


def _source_files() -> list[Path]:
    """Every Python file but the tests: the package, the kernels, the benchmarks and the tools."""
    folders = ("npeff_lens", "triton_kernels", "benchmarks", "tools")
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _package_target(node: ast.ImportFrom, path: Path) -> str | None:
    """The package module an ``from ... import`` reads from (dotted, without ``npeff_lens.``), or None."""
    if node.level:
        package = path.relative_to(ROOT).with_suffix("").parts[:-1]
        if package and package[0] == "triton_kernels":
            package = ("npeff_lens", *package)
        base = package[: len(package) - (node.level - 1)]
        return ".".join([*base[1:], *(node.module.split(".") if node.module else [])])
    module = node.module or ""
    if module == "npeff_lens" or module.startswith("npeff_lens."):
        return module.removeprefix("npeff_lens").removeprefix(".")
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_crosses_a_module():
    """A name with a leading underscore is its module's own: no other module (benchmarks and tools included; tests
    aside) imports it or reads it off the module (``perturb._fmt``)."""
    found = []
    for path in _source_files():
        tree = ast.parse(path.read_text())
        modules = set()  # local names bound to package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _package_target(node, path) is not None:
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("npeff_lens", "triton_kernels"):
                        modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in modules:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {ast.unparse(node)}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


# Files whose functions import the package lazily, and why.
LAZY_IMPORTS = {
    "npeff_lens/cli.py": "each command imports its step when it runs, so that `npeff --help` needs no torch",
}
# Package modules imported inside functions wherever they are used, and why.
LAZY_TARGETS = {
    "triton_kernels": "the Triton kernels import triton, which only CUDA hosts have",
}


def test_package_imports_sit_at_the_top():
    """Inside a function, a package import hides what a module depends on; only the files of ``LAZY_IMPORTS``
    do it, for the reason given there (third-party imports: ruff's PLC0415, with its per-file exceptions)."""
    found = []
    for path in _source_files():
        rel = str(path.relative_to(ROOT))
        if not rel.startswith(("npeff_lens/", "triton_kernels/")) or rel in LAZY_IMPORTS:
            continue
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    targets = [_package_target(node, path)]
                elif isinstance(node, ast.Import):
                    targets = [a.name.removeprefix("npeff_lens.") for a in node.names if a.name.startswith("npeff_")]
                else:
                    continue
                if any(t is not None and t.split(".")[0] not in LAZY_TARGETS for t in targets):
                    found.append(f"{rel}:{node.lineno} in {func.name}")
    assert not found, "package imports inside functions:\n" + "\n".join(sorted(set(found)))


def test_the_method_registry_and_the_config_name_the_same_methods():
    from npeff_lens.baselines import REGISTRY
    from npeff_lens.config import METHODS

    assert tuple(REGISTRY) == METHODS
    for m in REGISTRY.values():
        assert m.space in ("parameters", "activations")
        assert (m.fit is None) == (m.name == "npeff") == (m.folder is None)
        if m.cls is not None:
            assert hasattr(m.cls, "load") and hasattr(m.cls, "save")
