"""The package's layering: `cqr_lightning/` is the library and the top-level `callbacks/` observe it, so no module
of the library imports an observer (issue 13)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cqr_lightning"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_library_module_imports_from_the_callbacks_folder():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        observers = sorted(name for name in imported_modules(path) if name.split(".")[0] == "callbacks")
        if observers:
            offenders[str(path.relative_to(PACKAGE.parent))] = observers
    assert offenders == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from callbacks.best_adapter import BestAdapterCallback\n")
    assert "callbacks.best_adapter" in imported_modules(module)
