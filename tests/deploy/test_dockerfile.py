"""The Dockerfile, checked statically (no Docker engine here): stages, user, entrypoint, inputs."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest

from .manifests import REPO

pytestmark = pytest.mark.unit

COMPILERS = ("build-essential", "gcc", "g++", "clang", "make ")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with line continuations joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def effective(stage: Stage, stages: list[Stage]) -> Stage:
    """A stage with what it inherits: `FROM <earlier stage>` starts from that stage's instructions."""
    parent = next((s for s in stages if s.name == stage.base and s is not stage), None)
    if parent is None:
        return stage
    inherited = effective(parent, stages)
    return Stage(inherited.base, stage.name, [*inherited.instructions, *stage.instructions])


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    """The default target (the last stage), with what it inherits."""
    return effective(stages[-1], stages)


def test_multi_stage_on_slim_python_311(stages: list[Stage], runtime: Stage) -> None:
    assert len(stages) >= 2
    build = stages[0]
    assert runtime.base.startswith("python:3.11-slim"), runtime.base
    assert build.base == runtime.base, "the virtualenv is copied across stages: same interpreter required"
    copies = runtime.all("COPY")
    assert any(c.startswith(f"--from={build.name} /opt/kvr") for c in copies)


def test_router_image_leaves_out_the_sim_extra_and_the_sim_target_has_it(stages: list[Stage], runtime: Stage) -> None:
    by_name = {s.name: effective(s, stages) for s in stages if s.name}
    venv_of = {
        name: next(c.split()[0].removeprefix("--from=") for c in st.all("COPY") if c.endswith("/opt/kvr /opt/kvr"))
        for name, st in by_name.items()
        if any(c.endswith("/opt/kvr /opt/kvr") for c in st.all("COPY"))
    }
    router_installs = " ".join(by_name[venv_of[stages[-1].name]].all("RUN"))
    assert "pip install --constraint requirements.lock ." in router_installs and "[sim]" not in router_installs
    sim_installs = " ".join(by_name[venv_of["sim"]].all("RUN"))
    assert '".[sim]"' in sim_installs and "--constraint requirements.lock" in sim_installs
    assert by_name["sim"].base == runtime.base and by_name["sim"].all("USER") == runtime.all("USER")


def test_final_stage_runs_kvr_as_a_non_root_user_without_compilers(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    for run in runtime.all("RUN"):
        assert not any(c in run for c in COMPILERS), f"compiler installed in the final stage: {run}"
    assert shlex.split(runtime.all("ENTRYPOINT")[-1].replace("[", "").replace("]", "").replace(",", " ")) == ["kvr"]
    healthcheck = runtime.all("HEALTHCHECK")[-1]
    assert "/healthz" in healthcheck and "KVR_HTTP_PORT" in healthcheck
    env = " ".join(runtime.all("ENV"))
    port = re.search(r"KVR_HTTP_PORT=(\d+)", env)
    assert port is not None and port.group(1) in runtime.all("EXPOSE")[-1].split()


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            ignored = not negate
    return ignored


def test_build_inputs_exist_and_are_not_dockerignored(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must_ignore in (".git", ".venv"):
        assert _dockerignored(must_ignore, patterns), f"{must_ignore} must not be sent to the build"
    for copy in (c for stage in stages for c in stage.all("COPY")):
        if copy.startswith("--from"):
            continue
        *sources, _dest = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert not _dockerignored(source, patterns), f"COPY {source} is excluded by .dockerignore"


def test_image_carries_the_shipped_traces_where_replay_finds_them(runtime: Stage) -> None:
    """`kvr replay data/...` and `kvr dev` resolve `data/` against the runtime WORKDIR."""
    workdir = runtime.all("WORKDIR")[-1]
    assert f"data {workdir}/data" in runtime.all("COPY")
    assert list((REPO / "data").glob("*.jsonl.gz")), "data/ holds the Mooncake traces"


def test_every_runtime_dependency_is_pinned_by_the_lock(stages: list[Stage]) -> None:
    """`pip install --constraint requirements.lock .` pins exactly what the tests ran with."""
    install = " ".join(stages[0].all("RUN"))
    assert "--constraint requirements.lock" in install
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {
        re.split(r"==", line, maxsplit=1)[0].strip().lower().replace("_", "-")
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} is a runtime dependency but not pinned in requirements.lock"


def test_parser_sees_through_continuations_and_comments() -> None:
    args, stages = parse_dockerfile(
        "ARG BASE=python:3.11-slim\nFROM ${BASE} AS b\n# c\nRUN a \\\n  # inner\n  && b\nFROM ${BASE}\nUSER 1:1\n"
    )
    assert args == {"BASE": "python:3.11-slim"}
    assert [s.base for s in stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert stages[0].all("RUN") == ["a  && b"]
    assert stages[1].all("USER") == ["1:1"]
