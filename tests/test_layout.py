"""The package's layers: nothing imports from a layer above its own, and grpokit 0.1's flat module
paths still import (as the same module objects as their new homes)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import grpokit

PACKAGE = Path(grpokit.__file__).parent

# Rank of each top-level part of grpokit: a module may import from its own rank or below.
LAYERS = {
    "errors": 0,
    "sandbox": 0,
    "core": 0,
    "engines": 1,
    "data": 1,
    "rewards": 2,
    "tools": 2,
    "train": 3,
    "app": 4,
}


def _part(module: str) -> str:
    return module.split(".")[1]


def _grpokit_imports(path: Path) -> list[str]:
    """Every `grpokit.*` module that `path` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpokit."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("grpokit.")]
    return found


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    parts -= {"__init__", "__pycache__"}
    assert parts == set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative == Path("__init__.py"):
            continue  # the package root re-exports GRPOConfig and GRPOTrainer lazily
        own = relative.parts[0].removesuffix(".py")
        for target in _grpokit_imports(path):
            if LAYERS[_part(target)] > LAYERS[own]:
                upward.append(f"{relative} imports {target}")
    assert upward == []


def test_the_lowest_layers_import_no_other_part() -> None:
    # core, sandbox and errors are leaves: core may import errors, nothing else crosses.
    crossing = []
    for part in ("core", "sandbox"):
        for path in (PACKAGE / part).rglob("*.py"):
            crossing += [t for t in _grpokit_imports(path) if _part(t) not in (part, "errors")]
    assert crossing == []


def test_the_sandbox_worker_script_imports_the_standard_library_only() -> None:
    # sandbox/_child.py runs as `python -I -S -c <its text>` inside the sandbox, where neither
    # grpokit nor any other package can be imported; sandbox.worker imports its task counter from
    # it, never the other way round.
    tree = ast.parse((PACKAGE / "sandbox" / "_child.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.parametrize("old", sorted(grpokit.MOVED_MODULES))
def test_flat_module_paths_of_grpokit_0_1_still_import(old: str) -> None:
    new = grpokit.MOVED_MODULES[old]
    assert importlib.import_module(old) is importlib.import_module(new)
    # The module keeps its own name and spec (pickling, reloading and tracebacks use them).
    module = importlib.import_module(new)
    assert module.__name__ == new and module.__spec__ is not None
    assert module.__spec__.name == new


def test_from_imports_of_the_old_paths_give_the_same_objects() -> None:
    # A fresh interpreter, so the old path is the first import of the module.
    code = (
        "from grpokit.losses import policy_loss\n"
        "from grpokit.core.losses import policy_loss as new\n"
        "from grpokit.core.losses import rollout_importance_weights as old_home\n"
        "from grpokit.core.importance import rollout_importance_weights\n"
        "assert old_home is rollout_importance_weights\n"
        "from grpokit.trainer import GRPOTrainer\n"
        "import grpokit\n"
        "assert policy_loss is new and GRPOTrainer is grpokit.GRPOTrainer\n"
        "import grpokit.core.losses as m\n"
        "assert m.__spec__.name == 'grpokit.core.losses'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
