"""The layout promises of docs/ARCHITECTURE.md: the engine and data layers import no Lightning and no
callback; no module is much above 400 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_synth"
LOWER = sorted((PACKAGE / "engine").glob("*.py")) + sorted((PACKAGE / "data").glob("*.py")) + [PACKAGE / "probing.py"]


def _module_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # module level only: a lazy alias inside a function is allowed
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", LOWER, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_engine_and_data_import_no_lightning_and_no_callback(path):
    shell = ("lightning_synth.callbacks", "lightning_synth.datamodule")
    bad = {n for n in _module_imports(path) if n.split(".")[0] == "lightning" or n.startswith(shell)}
    assert not bad, f"{path.name} imports {bad}"


def test_no_engine_module_is_much_above_400_lines():
    mine = [*LOWER, PACKAGE / "datamodule.py", *sorted((PACKAGE / "callbacks").glob("*.py"))]
    long = {p.name: n for p in mine if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_no_module_exceeds_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these by concern (issue 11): {long}"
