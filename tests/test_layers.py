"""The packages depend one way: keystile (the command line) -> admin -> gateway."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"), [("gateway", {"admin", "keystile"}), ("admin", {"keystile"})]
)
def test_no_import_against_the_layering(package: str, forbidden: set[str]) -> None:
    offenders = {
        module: sorted(names & forbidden)
        for module, names in _imported_packages(package).items()
        if names & forbidden
    }
    assert offenders == {}


def test_serving_does_not_load_the_mcp_sdk() -> None:
    """The SDK (and pydantic) is for tool discovery only, loaded on the first one: a serving
    process that never discovers does not carry it."""
    code = (
        "import sys, keystile.cli, gateway.app, admin.api, gateway.oauth.endpoints; "
        "print(sorted(m for m in ('mcp', 'pydantic', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
