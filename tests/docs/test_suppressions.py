"""Suppression markers only for tools that run (`make lint`: ruff, mypy; no formatter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
FORMATTER_MARKER = re.compile(r"#\s*fmt:\s*(skip|off|on)\b|#\s*yapf:|#\s*isort:\s*skip")


def test_no_formatter_markers_without_a_formatter():
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for top in ("services", "schemas", "bench", "tests", "deploy", "tools")
        for path in sorted((REPO / top).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FORMATTER_MARKER.search(line) and path != Path(__file__).resolve()
    ]
    assert not found, f"formatter markers, but no formatter runs (docs/development.md): {found}"
