"""Keep the README's configuration table identical to `kvr config-table` (used by tests and `make docs`)."""

from __future__ import annotations

import re
from pathlib import Path

from services.config_table import render

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def current_section(text: str) -> str:
    m = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    return m.group(1) if m else ""


def update(path: Path = README) -> bool:
    text = path.read_text()
    new = text.replace(f"{START}\n{current_section(text)}{END}", f"{START}\n{render()}{END}")
    changed = new != text
    path.write_text(new)
    return changed
