"""The house kept in order: the package's layout is checked from its source, so a change that
adds a cycle, lets one stage reach into another, or grows a module past a sitting fails here.

The import graph is read with ``ast`` (every ``import`` and ``from`` of mnist_ray, also inside
functions and under ``if TYPE_CHECKING``), so nothing is imported to check it.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mnist_ray"
STAGES = ("preparation", "training", "inference", "serving", "evaluation")
# Outside the stages, only these may import one: the jobs that chain them and the benchmark.
MAY_IMPORT_STAGES = ("mnist_ray.pipeline", "mnist_ray.cli", "mnist_ray.bench")
# What measures a model: training must never see it, or the measurement measures training.
MEASUREMENT = ("mnist_ray.evaluation.robustness", "mnist_ray.images.measured_photos")
MAX_TOP_LEVEL_MODULES, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 8, 450, 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def owner(name: str) -> str:
    """The module ``name`` (a module, or a name inside one) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imported(name: str, tree: ast.Module) -> set[str]:
    """The mnist_ray modules a module imports (``from pkg import module`` names the module)."""
    found = set()
    is_package = MODULES[name].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "mnist_ray"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "mnist_ray":
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else owner(base))
    return found - {name}


GRAPH = {name: imported(name, tree) for name, tree in TREES.items()}


def part(name: str) -> str:
    """A module's subpackage (``mnist_ray.model``), or the module itself if it is top-level."""
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    assert cycles(GRAPH) == []


def test_no_subpackage_imports_itself_back():
    parts = defaultdict(set)
    for name, targets in GRAPH.items():
        parts[part(name)] |= {part(t) for t in targets if part(t) != part(name)}
    found = cycles(parts)
    where = {" <-> ".join(c): sorted(f"{m} -> {t}" for m in GRAPH for t in GRAPH[m]
                                     if part(m) in c and part(t) in c and part(m) != part(t)) for c in found}
    assert found == [], where


def test_no_stage_imports_another():
    bad = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
                 if part(target).split(".")[-1] in STAGES and part(target) != part(name)
                 and not name.startswith(MAY_IMPORT_STAGES))
    assert bad == [], "what two stages share belongs in a package of its own"


def test_training_never_imports_the_measurements():
    seen, todo = set(), [m for m in GRAPH if m.startswith("mnist_ray.training")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += GRAPH[m]
    assert not seen & set(MEASUREMENT), sorted(seen & set(MEASUREMENT))


def test_no_private_name_is_used_across_modules():
    """``_name`` belongs to its module: another module neither imports it nor reaches for it."""
    bad = []
    for name, tree in TREES.items():
        modules = {}  # local name -> mnist_ray module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnist_ray"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}:{node.lineno} imports {node.module}.{a.name}")
                    if f"{node.module}.{a.name}" in MODULES:
                        modules[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                modules.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("mnist_ray")})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                bad.append(f"{name}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
    assert bad == []


@pytest.mark.parametrize("package", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_importing_a_package_imports_neither_ray_nor_tensorflow(package):
    code = (f"import sys, {package}; "
            "print(' '.join(m for m in ('ray', 'tensorflow', 'tf_keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"import {package} imported {out.stdout.strip()}"


def test_modules_and_functions_read_in_one_sitting():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    long_modules = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
                      for name, tree in TREES.items() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    too_many = top if len(top) > MAX_TOP_LEVEL_MODULES else []
    assert (too_many, long_modules, long_functions) == ([], {}, {}), (
        f"over {MAX_TOP_LEVEL_MODULES} modules in mnist_ray/, modules over {MAX_MODULE_LINES} lines, "
        f"functions over {MAX_FUNCTION_LINES} lines")


def test_the_import_paths_written_before_the_layout_still_work():
    """Deployed Serve configs name `mnist_ray.serve_app:app_builder`; scripts read shards with
    `mnist_ray.shards.read_table`: both are the modules' new homes, not copies."""
    import importlib

    from mnist_ray.formats import shards
    from mnist_ray.serving import serve_app

    assert importlib.import_module("mnist_ray.serve_app").app_builder is serve_app.app_builder
    assert importlib.import_module("mnist_ray.shards").read_table is shards.read_table
