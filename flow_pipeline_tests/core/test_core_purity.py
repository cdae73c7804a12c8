"""flow_pipeline.core never imports dagster, wandb, pydantic, nor flow_pipeline outside core: in its sources and
when every core module is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_DIR = REPO_ROOT / "flow_pipeline" / "core"
FORBIDDEN = ("dagster", "wandb", "pydantic")


def _forbidden(name: str) -> bool:
    """A module the core must not import: a forbidden package, or any of flow_pipeline outside flow_pipeline.core."""
    return name.split(".")[0] in FORBIDDEN or (name.startswith("flow_pipeline") and name != "flow_pipeline"
                                               and not name.startswith("flow_pipeline.core"))


def _core_modules() -> list[str]:
    modules = []
    for path in sorted(CORE_DIR.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


def test_core_sources_never_import_dagster_wandb_pydantic_or_the_layers_above():
    files = sorted(CORE_DIR.rglob("*.py"))
    assert len(files) >= 10
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            offenders += [f"{path}:{node.lineno} {name}" for name in names if _forbidden(name)]
    assert offenders == []


def test_importing_all_of_core_loads_no_dagster_wandb_pydantic_or_the_layers_above():
    modules = _core_modules()
    assert "flow_pipeline.core.trainer" in modules and "flow_pipeline.core.models.dit" in modules
    code = "; ".join(f"import {m}" for m in modules) + (
        "; import sys; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'wandb', 'pydantic')"
        " or (m.startswith('flow_pipeline.') and not m.startswith('flow_pipeline.core')))"
        "; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
