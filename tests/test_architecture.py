"""The layering drawn in docs/architecture.md: imports point down, and only the passes import Ray."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "fimood"
# Bottom up. A layer may import its own layer and any below it; `method` and `lake` never import each other.
LAYERS = {"storage": 0, "models": 1, "engine": 2, "method": 3, "lake": 3, "passes": 4, "apps": 5, "cli": 6}


def imports(path: Path) -> list[str]:
    """Every module a file imports, absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "fimood":  # from fimood import passes
            found += [f"fimood.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    return found


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py") if parts[0] != "__init__.py" else None


def test_every_module_belongs_to_a_layer():
    assert {layer_of(path) for path in PACKAGE.rglob("*.py")} - {None} == set(LAYERS)


def test_imports_point_down_the_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        mine = layer_of(path)
        for module in imports(path):
            parts = module.split(".")
            if mine is None or parts[0] != "fimood" or len(parts) < 2 or parts[1] == mine:
                continue
            if LAYERS[parts[1]] >= LAYERS[mine]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_only_the_passes_import_ray():
    importers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if any(module.split(".")[0] == "ray" for module in imports(path))
    }
    assert importers and all(path.startswith("passes/") for path in importers), importers
