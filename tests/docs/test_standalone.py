"""The repository stands on its own: no committed file points outside it.

A clone has only what is tracked, so no tracked text file may name the `shared` folder beside the
checkout or an absolute path of a development machine. What counts as a machine path (the
patterns are in `OUTSIDE`; the examples below are assembled from parts so this file passes its own
check):

- the worktree root of the machine this was written on, root's and other users' home directories
  (macOS and Linux), the temporary directory of some past run;
- but not `/home/kvr/...`: that is the home of the `kvr` user *inside the image* (Dockerfile,
  compose), a container path like `/models/...`, `/etc/...` or `/opt/kvr` in manifests, which are
  fine anywhere.

A path is only matched where it starts: a `tmp` segment inside `https://host/x/tmp/` or `a/tmp/b` is a
relative path segment, not a machine path. Binary files (a NUL byte in the first 8 KiB, or not
UTF-8) and the generated lock file are skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SKIPPED = {"requirements.lock"}
# Parts of the example paths, so that no line of this file is itself a path outside the repository.
UP, W, R, T, U, H = "..", "/" + "work", "/" + "root", "/" + "tmp", "/" + "Users", "/" + "home"

OUTSIDE = re.compile(
    r"\.\./shared\b"
    r"|(?<![\w.~-])/(?:work|root|tmp|Users)/"
    r"|(?<![\w.~-])/home/(?!kvr\b)[\w.-]+"
)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    out = []
    for name in names:
        path = REPO / name
        if not name or name in SKIPPED or not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" in head:
            continue
        out.append(path)
    return out


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that names a path outside the repository."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_text_files()
    assert len(files) > 100, "git ls-files found too little: is this a checkout?"
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}:{n}: {line[:160]}" for n, line in machine_paths(text)]
    assert not found, "paths outside the repository (use a repo-relative path, e.g. data/...):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        f"kvr replay {UP}/shared/data/mooncake_conversation_trace.jsonl",
        f'"trace": "{W}/shared/data/mooncake_conversation_trace.jsonl"',
        f'"logs": "{T}/kvr-bench-sched-k0lrcx1j"',
        f"cd {R}/kvr && make run",
        f"open {H}/alice/traces/t.jsonl",
        f"see {U}/bob/kvr/README.md",
        f"file://{W}/main/README.md",
    ],
)
def test_machine_paths_are_caught(line: str) -> None:
    assert machine_paths(line) == [(1, line)]


@pytest.mark.parametrize(
    "line",
    [
        "docker cp kvr-replay:/home/kvr/replay ./replay-report",
        "WORKDIR /home/kvr",
        "--epp-tokenizer-dir llama=/models/llama",
        "mountPath: /etc/kvr",
        "COPY --from=build /opt/kvr /opt/kvr",
        "kvr replay data/mooncake_conversation_trace.jsonl.gz",
        f"https://example.com{W}{T}/x",
        f"bench{T}/out.json and docs{W}/notes",
        "nats-server -js -sd /data -m 8222",
    ],
)
def test_legitimate_paths_pass(line: str) -> None:
    assert machine_paths(line) == []
