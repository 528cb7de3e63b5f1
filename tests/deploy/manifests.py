"""Loading, rendering and validating the deployment files (shared by the tests in this folder)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from .crd_schemas import CRD_SCHEMAS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
OVERLAYS = ("dev", "production")
# The Kubernetes API version the manifests target (native sidecars need >= 1.29).
K8S_VERSION = "1.32"


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=deep))


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if doc is not None]


def load_yaml(path: Path) -> Any:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    """YAML files under deploy/, except Helm templates (Go templates, rendered by tests/deploy/test_helm.py)."""
    helm_templates = DEPLOY / "helm"
    return sorted(
        p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext)
        if not (p.is_relative_to(helm_templates) and "templates" in p.relative_to(helm_templates).parts)
    )


def kustomization_resources(folder: Path) -> list[Path]:
    """The local manifest files a kustomization lists (not other kustomizations)."""
    kust = load_yaml(folder / "kustomization.yaml")
    files = []
    for entry in kust.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_file():
            files.append(path)
    return files


def example_files() -> list[Path]:
    return sorted((K8S / "examples").rglob("*.yaml"))


@functools.cache
def tool(name: str) -> str | None:
    """`name` from PATH, else from the virtual environment's bin (where `make` puts helm and kubectl)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def kustomize_command() -> tuple[str, ...] | None:
    if kubectl := tool("kubectl"):
        return (kubectl, "kustomize")
    if kustomize := tool("kustomize"):
        return (kustomize, "build")
    return None


@functools.cache
def render(folder: Path) -> tuple[dict[str, Any], ...]:
    cmd = kustomize_command()
    assert cmd is not None
    out = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} {folder} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


class UnknownKind(Exception):
    pass


def validate_k8s(doc: dict[str, Any]) -> None:
    """Validate one object: core APIs with kubernetes-validate (strict), CRDs with crd_schemas."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = CRD_SCHEMAS.get(key)  # type: ignore[arg-type]
    if schema is not None:
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise UnknownKind(f"no schema for {key}: add one to tests/deploy/crd_schemas.py") from exc


def by_kind(docs: Any, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Pod":
        return workload["spec"]
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """Main containers and native sidecars (init containers with restartPolicy Always)."""
    spec = pod_spec(workload)
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*spec.get("containers", []), *sidecars]
