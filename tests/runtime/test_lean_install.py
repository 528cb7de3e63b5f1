"""The router image leaves out the `kvr[sim]` extra (and the dev-only pyyaml): services must run without numpy,
matplotlib, rich and yaml."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIM = ("numpy", "matplotlib", "rich")
NOT_IN_IMAGE = (*SIM, "yaml")  # pyyaml is a dev dependency

CHECK = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import services.scheduler.app, services.indexer.app, services.epp_bridge.app
    import services.relay.app, services.mock_worker.app
    from services.cli import main
    for command in ("indexer", "scheduler", "epp-bridge", "relay", "mock-workers", "epp", "config-table", "provision", "nats-config"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([command, "--help"] if command != "config-table" else [command])
        assert "KVR_" in out.getvalue() or "usage" in out.getvalue(), command
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["nats-config", "--format", "helm"]) == 0
    assert "accounts" in json.loads(out.getvalue())["config"]["merge"]  # JSON is YAML: helm reads it
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {sim!r})
    assert not loaded, loaded
    print("services ok without the sim extra")
    """
)


@pytest.mark.integration
def test_services_import_and_parse_without_the_sim_extra(tmp_path):
    # Shadow packages that fail to import, as in an environment where they are not installed.
    for name in NOT_IN_IMAGE:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", CHECK.format(sim=set(NOT_IN_IMAGE))], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "services ok without the sim extra" in proc.stdout


@pytest.mark.unit
@pytest.mark.parametrize("command", ["replay", "dev"])
def test_sim_commands_without_the_extra_say_how_to_get_it_in_one_line(command, monkeypatch, capsys):
    import importlib.util

    from services import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("numpy", "rich") else real(name, *a))
    assert cli.main([command, "trace.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"kvr {command}: needs the simulation extra (numpy, rich not installed): pip install 'kvr[sim]' (the image: build the `sim` target)"
    ]


@pytest.mark.unit
def test_the_sim_extra_holds_the_simulation_libraries_and_dev_includes_it():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in project["dependencies"]}
    sim = {d.split(">")[0].split("<")[0].strip() for d in project["optional-dependencies"]["sim"]}
    assert set(SIM) <= sim and not (set(SIM) & runtime)
    assert "kvr[sim]" in project["optional-dependencies"]["dev"]


@pytest.mark.unit
def test_make_clean_removes_what_make_run_writes():
    recipe = subprocess.run(["make", "-n", "clean"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    removed = recipe.split("rm -rf", 1)[1].split()
    assert ".kvr" in removed and ".venv" in removed
