"""KVR_* names in compose, Kubernetes and the Dockerfile = settings of the registry = README table.

Each container's variables are checked against the settings of the very command it runs (COMMON
plus that command's scope), so a variable a service would silently ignore is an error too.
"""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from services.config_table import load_all
from services.runtime.config import COMMON, REGISTRY

from .manifests import (
    COMPOSE_DIR,
    K8S,
    OVERLAYS,
    REPO,
    by_kind,
    containers,
    example_files,
    kustomize_command,
    load_docs,
    load_yaml,
    render,
)

pytestmark = pytest.mark.unit

README_START, README_END = "<!-- config-table:start -->", "<!-- config-table:end -->"
ENV_NAME = re.compile(r"\bKVR_[A-Z0-9_]+\b")


def registry_envs() -> set[str]:
    load_all()
    return {s.env for s in REGISTRY.all()}


def scope_envs(command: str) -> set[str]:
    """Variables `kvr <command>` reads: COMMON plus its registered scope."""
    load_all()
    names = {s.env for s in COMMON}
    for scope, items in REGISTRY.groups.items():
        if scope.replace("_", "-") == command:
            names |= {s.env for s in items}
    return names


def _render_config() -> object:
    spec = importlib.util.spec_from_file_location("kvr_render_config", K8S / "render_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def used_in_compose() -> dict[str, set[str]]:
    spec = load_yaml(COMPOSE_DIR / "compose.yaml")
    used: dict[str, set[str]] = {}
    for name, svc in spec["services"].items():
        env = {k for k in svc.get("environment", {}) if k.startswith("KVR_")}
        if env:
            used[name] = env
    return used


def _container_envs(docs: list[dict], configmaps: dict[str, dict]) -> list[tuple[str, str, set[str]]]:
    """(workload/container, kvr subcommand, KVR_* names it receives) for every kvr container."""
    found = []
    for doc in docs:
        if doc.get("kind") not in ("Deployment", "StatefulSet", "Pod"):
            continue
        for c in containers(doc):
            names = {e["name"] for e in c.get("env", []) if e["name"].startswith("KVR_")}
            for source in c.get("envFrom", []):
                cm = configmaps.get(source.get("configMapRef", {}).get("name", ""))
                if cm is not None:
                    names |= set(cm.get("data", {}))
            args = c.get("args") or c.get("command") or []
            if names:
                found.append((f"{doc['metadata']['name']}/{c['name']}", str(args[0]) if args else "", names))
    return found


def test_env_files_list_exactly_the_registered_settings() -> None:
    issues = _render_config().problems()  # type: ignore[attr-defined]
    assert not issues, "\n".join(issues) + "\nrun: .venv/bin/python deploy/k8s/render_config.py"


def test_compose_variables_are_settings_of_the_command_each_service_runs() -> None:
    spec = load_yaml(COMPOSE_DIR / "compose.yaml")
    for name, env in used_in_compose().items():
        command = str(spec["services"][name]["command"][0])
        unknown = env - scope_envs(command)
        assert not unknown, f"compose service {name} (kvr {command}) sets unknown {sorted(unknown)}"


@pytest.mark.skipif(kustomize_command() is None, reason="kubectl/kustomize not installed: overlays not rendered")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_variables_are_settings_of_the_command_each_container_runs(overlay: str) -> None:
    docs = list(render(K8S / "overlays" / overlay))
    found = _container_envs(docs, by_kind(docs, "ConfigMap"))
    assert len(found) >= 3
    for where, command, names in found:
        unknown = names - scope_envs(command)
        assert not unknown, f"{overlay}: {where} (kvr {command}) receives unknown {sorted(unknown)}"


def test_example_and_dockerfile_variables_are_settings() -> None:
    for path in example_files():
        docs = load_docs(path)
        for where, command, names in _container_envs(docs, by_kind(docs, "ConfigMap")):
            unknown = names - scope_envs(command)
            assert not unknown, f"{path.name}: {where} (kvr {command}) sets unknown {sorted(unknown)}"
    dockerfile = set(ENV_NAME.findall((REPO / "Dockerfile").read_text()))
    assert dockerfile and dockerfile <= {s.env for s in COMMON}


def table_envs(markdown: str) -> set[str]:
    """Env names of the first column of a `kvr config-table` markdown table."""
    names = set()
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("`KVR_"):
            names.add(cells[0].strip("`"))
    return names


def _readme_table_envs() -> set[str] | None:
    text = (REPO / "README.md").read_text()
    if README_START not in text or README_END not in text:
        return None
    return table_envs(text.split(README_START, 1)[1].split(README_END, 1)[0])


def _env_names_in(node: object) -> set[str]:
    """KVR_* names of every container `env:` list found anywhere in a parsed manifest."""
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                names |= {e["name"] for e in value if isinstance(e, dict) and str(e.get("name", "")).startswith("KVR_")}
            else:
                names |= _env_names_in(value)
    elif isinstance(node, list):
        for item in node:
            names |= _env_names_in(item)
    return names


def _all_used_names() -> set[str]:
    """Every variable name the deployment files set: compose environments, ConfigMap env files,
    kustomize literals, container env lists (base, overlays, patches, examples)."""
    used: set[str] = set().union(*used_in_compose().values())
    used |= {k for k in load_yaml(COMPOSE_DIR / "compose.yaml").get("x-kvr-env", {})}
    render_config = _render_config()
    for path in K8S.rglob("*.env"):
        used |= render_config.documented_names(path)  # type: ignore[attr-defined]
    for path in K8S.rglob("*.yaml"):
        for doc in load_docs(path):
            used |= _env_names_in(doc)
            if path.name == "kustomization.yaml":
                for gen in doc.get("configMapGenerator", []):
                    used |= {lit.split("=", 1)[0] for lit in gen.get("literals", [])}
    return used


def test_every_name_in_the_deployment_files_is_a_registered_setting() -> None:
    unknown = _all_used_names() - registry_envs()
    assert not unknown, f"not settings of any kvr command: {sorted(unknown)}"


def test_every_name_in_the_deployment_files_is_in_the_readme_table() -> None:
    table = _readme_table_envs()
    if table is None:
        pytest.skip(f"README.md has no {README_START} … {README_END} section yet (the lead pastes `kvr config-table`)")
    missing = _all_used_names() - table
    assert not missing, (
        f"used in deploy/ but absent from the README table: {sorted(missing)}; "
        "paste the output of `kvr config-table` into README.md"
    )


def test_readme_parser_reads_the_config_table_format() -> None:
    """The parser above understands what `kvr config-table` prints (so the README check is real)."""
    from services.runtime.config import markdown_table

    load_all()
    assert table_envs(markdown_table()) == registry_envs()
