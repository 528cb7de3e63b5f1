"""The README's first screen and configuration table stay true to the code."""

from __future__ import annotations

from pathlib import Path

from services.config_table import render
from services.readme_table import README, current_section


def test_first_screen_shows_the_two_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:12])
    assert "make run" in first_screen and "make test" in first_screen


def test_configuration_table_matches_the_code():
    assert current_section(README.read_text()) == render(), "run: .venv/bin/python -c 'from services.readme_table import update; update()'"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
