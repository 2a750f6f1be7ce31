"""The layering drawn in docs/architecture.md: imports point down the layers (and down the modules of a
layer that is a package with an order), only the passes import Ray, and the product never imports
research or onboarding."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "fimood"
# Bottom up. A layer may import its own layer and any below it; layers on one level never import each other.
LAYERS = {
    "version": 0,
    "storage": 0,
    "progress": 0,
    "plotting": 1,  # the reports' figures, written through storage
    "models": 1,
    "engine": 2,
    "method": 3,
    "lake": 3,
    "passes": 4,
    "evaluation": 5,  # product: `fimood evaluate`
    "monitor": 5,  # product: the nightly monitor
    "onboarding": 6,  # the demo, its bundled data, training a checkpoint from a table
    "research": 7,  # studies, their reports, benchmarks
    "cli": 8,
}
# Inside these packages, modules are ordered the same way: a module imports only modules on lower levels.
MODULES = {
    "passes": {"config": 0, "runtime": 0, "reading": 1, "actors": 2, "fit_pass": 3, "score_pass": 3, "summaries": 3},
    "monitor": {"result": 0, "history": 1, "report": 1, "runner": 2},
}


def imports(path: Path) -> list[str]:
    """Every module a file imports, absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # `from fimood.passes import actors` names both
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
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


def test_modules_inside_an_ordered_package_import_down():
    wrong = []
    for package, order in MODULES.items():
        assert {path.stem for path in (PACKAGE / package).glob("*.py")} - {"__init__"} == set(order), package
        for path in (PACKAGE / package).glob("*.py"):
            if path.stem == "__init__":
                continue
            for module in imports(path):
                parts = module.split(".")
                if parts[:2] == ["fimood", package] and len(parts) > 2 and order[parts[2]] >= order[path.stem]:
                    wrong.append(f"{package}/{path.name} imports {module}")
    assert not wrong, wrong


def test_the_product_never_imports_research_or_onboarding():
    product = [p for p in PACKAGE.rglob("*.py") if layer_of(p) not in ("research", "onboarding", "cli", None)]
    wrong = [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in product
        for module in imports(path)
        if module.split(".")[:2] in (["fimood", "research"], ["fimood", "onboarding"])
    ]
    assert not wrong, wrong


def test_the_product_loads_without_research_onboarding_or_ray():
    """What a Ray worker imports to run an actor, and what `import fimood` costs, measured in a fresh interpreter."""
    import subprocess
    import sys

    probe = (
        "import sys, fimood; assert 'ray' not in sys.modules, 'import fimood imported ray'; "
        "import fimood.monitor, fimood.passes.actors; "
        "print(sorted(m for m in sys.modules if m.startswith(('fimood.research', 'fimood.onboarding', "
        "'fimood.evaluation'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def test_only_the_passes_import_ray():
    importers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if any(module.split(".")[0] == "ray" for module in imports(path))
    }
    assert importers and all(path.startswith("passes/") for path in importers), importers
