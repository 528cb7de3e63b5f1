"""Write the Kubernetes ConfigMap env files from the settings registry (one line per setting).

    .venv/bin/python deploy/k8s/render_config.py           # (re)write the env files
    .venv/bin/python deploy/k8s/render_config.py --check   # exit 1 if they no longer match the registry

Every setting a deployed service accepts appears in its ConfigMap with the code's default (or the
container override below), so an operator sees and edits the whole surface in one place. Values
already present in a file are kept on regeneration: the files are meant to be edited.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.config_table import load_all
from services.runtime.config import COMMON, REGISTRY, Setting

# Values that differ from the code defaults because the process runs in a container next to the
# NATS Helm release `nats` in the same namespace.
CONTAINER_OVERRIDES: dict[str, str] = {
    "nats_url": "nats://nats:4222",
    "http_port": "8080",
    "http_host": "0.0.0.0",
    "log_format": "json",
}

# Settings set per pod in the Deployment (Downward API), not in the shared ConfigMap.
POD_SCOPED: dict[str, str] = {
    "router_id": "set per pod from metadata.name in the Deployment",
}


@dataclass(frozen=True)
class EnvFile:
    path: Path
    scope: str  # registry scope ("common" = services.runtime.config.COMMON)


ENV_FILES = (
    EnvFile(HERE / "base/config/common.env", "common"),
    EnvFile(HERE / "base/config/indexer.env", "indexer"),
    EnvFile(HERE / "base/config/scheduler.env", "scheduler"),
    EnvFile(HERE / "base/config/epp-bridge.env", "epp-bridge"),
    EnvFile(HERE / "overlays/dev/mock-workers.env", "mock-workers"),
)


def _norm(scope: str) -> str:
    return scope.replace("_", "-").lower()


def settings_of(scope: str) -> list[Setting]:
    """The settings of one scope, without the COMMON ones (those live in common.env)."""
    load_all()
    if scope == "common":
        return list(COMMON)
    common = {s.name for s in COMMON}
    for name, items in REGISTRY.groups.items():
        if _norm(name) == scope:
            return [s for s in items if s.name not in common]
    return []


def default_text(s: Setting) -> str | None:
    if s.name in CONTAINER_OVERRIDES:
        return CONTAINER_OVERRIDES[s.name]
    d = s.default
    if d is None:
        return None
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, (list, tuple)):
        return ",".join(str(x) for x in d)
    return str(d)


def read_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's configMapGenerator `envs` reads them (comments skipped)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {raw!r}")
        values[key.strip()] = value
    return values


def documented_names(path: Path) -> set[str]:
    """Env names present as KEY=VALUE or as a commented `# KEY=` placeholder (unset settings)."""
    names = set(read_env(path))
    if path.exists():
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("# KVR_") and "=" in line:
                names.add(line[2:].split("=", 1)[0].strip())
    return names


def render(env_file: EnvFile) -> str:
    current = read_env(env_file.path)
    lines = [
        f"# kvr settings, scope {env_file.scope!r}: written by deploy/k8s/render_config.py from the",
        "# settings registry; edit values freely, rerun the script after adding or removing settings.",
    ]
    for s in settings_of(env_file.scope):
        lines.append(f"# {s.help}" + (f" (one of: {', '.join(s.choices)})" if s.choices else ""))
        if s.name in POD_SCOPED:
            lines.append(f"# {s.env}=  ({POD_SCOPED[s.name]})")
            continue
        value = current.get(s.env, default_text(s))
        if value is None:
            lines.append(f"# {s.env}=  (unset by default)")
        else:
            lines.append(f"{s.env}={value}")
    return "\n".join(lines) + "\n"


def problems(files: Iterable[EnvFile] = ENV_FILES) -> list[str]:
    """Names missing from / unknown to the registry, and values the setting's parser rejects."""
    found: list[str] = []
    for f in files:
        settings = settings_of(f.scope)
        if not settings:
            continue  # the service has not registered settings (yet): nothing to compare
        rel = f.path.relative_to(REPO)
        if not f.path.exists():
            found.append(f"{rel}: missing")
            continue
        want = {s.env for s in settings}
        have = documented_names(f.path)
        for name in sorted(want - have):
            found.append(f"{rel}: {name} is a setting of {f.scope!r} but is not listed")
        for name in sorted(have - want):
            found.append(f"{rel}: {name} is not a setting of {f.scope!r}")
        by_env = {s.env: s for s in settings}
        for name, value in read_env(f.path).items():
            s = by_env.get(name)
            if s is None:
                continue
            try:
                parsed = s.parse(value)
            except Exception as exc:  # noqa: BLE001 - any parser failure is a bad value
                found.append(f"{rel}: {name}={value!r} does not parse: {exc}")
                continue
            if s.choices and parsed not in s.choices:
                found.append(f"{rel}: {name}={value!r} is not one of {list(s.choices)}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check the files against the registry")
    args = parser.parse_args(argv)
    if args.check:
        issues = problems()
        for issue in issues:
            print(issue, file=sys.stderr)
        if issues:
            print("run: .venv/bin/python deploy/k8s/render_config.py", file=sys.stderr)
        return 1 if issues else 0
    for f in ENV_FILES:
        if not settings_of(f.scope):
            print(f"skip {f.path.relative_to(REPO)}: no settings registered for {f.scope!r}")
            continue
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.write_text(render(f))
        print(f.path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
