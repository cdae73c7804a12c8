"""No import cycle anywhere in flow_pipeline/: module-level and function-level (lazy) imports, relative ones resolved.

An edge goes to the module an import names: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b`` when that is
a module, else ``a`` (a name defined in ``a/__init__.py`` or in module ``a``).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package directory ``root / package``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from X import`` statement inside ``module`` (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (also inside functions)."""
    modules = module_names(root, package)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path.name == "__init__.py", node)
                edges |= {f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                          for alias in node.names}
        graph[module] = (edges & modules.keys()) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_flow_pipeline_has_no_import_cycle():
    graph = import_graph(REPO_ROOT, "flow_pipeline")
    assert len(graph) > 50 and "flow_pipeline.core.metrics.real_side" in graph["flow_pipeline.evaluation.evaluate"]
    assert cycles(graph) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_cycle_is_found_through_lazy_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",
        "pkg/c.py": "from . import a\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    _write(tmp_path, {"pkg/c.py": "x = 1\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_a_submodule_that_imports_a_name_of_its_package_init_is_a_cycle(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from pkg.inner import f\nVALUE = 1\n",
                      "pkg/inner.py": "from pkg.other import g\n", "pkg/other.py": "g = 1\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == []
    _write(tmp_path, {"pkg/inner.py": "from pkg import VALUE\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg", "pkg.inner"]]
