"""The docs name only things that exist, and the per-service file tables are complete.

Checked in README.md, data/README.md and docs/*.md:
- every repository path (a token whose first segment is a top-level entry of the repository, e.g.
  `services/scheduler/app.py`, `bench/results/x.json`, `deploy/k8s/`) exists; patterns
  (`bench/results/scheduler_*.json`) and `kubectl` resources (`deploy/kvr-indexer`) are not paths;
- every bare module name in backticks (`feed.py`) is the name of some file of the repository;
- every `path.py::name` names a function, class or assignment of that file;
- every relative markdown link points to an existing file inside the repository, and its `#anchor`
  to a heading of the target;
- each file table of `FILE_TABLES` names only existing files and names every module of its
  service folders (a new module needs its row).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# (doc, heading of the section holding the table, service folders it must cover)
FILE_TABLES = [
    ("docs/architecture.md", "Code layout: functional core, imperative shell", ["services/runtime"]),
    ("docs/indexer.md", "Files", ["services/indexer"]),
    ("docs/scheduler.md", "Files", ["services/scheduler"]),
    ("docs/epp_bridge.md", "Files", ["services/epp_bridge", "services/dev_gateway"]),
    ("docs/relay.md", "Files", ["services/relay"]),
    ("docs/simulation.md", "Files", ["services/mock_worker", "services/replay"]),
]

PATH_TOKEN = re.compile(r"(?<![\w./:~-])((?:\.?[\w-]+)(?:/[\w.-]+)+/?)")
BARE_MODULE = re.compile(r"`([\w]+\.py)`")
SYMBOL_REF = re.compile(r"`([\w./-]+\.py)::([\w.]+)")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.M)
MODULE_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w]+\.py)\b")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return out.split()


TRACKED = tracked()
TOP_LEVEL = {name.split("/")[0] for name in TRACKED if "/" in name}
BASENAMES = {Path(name).name for name in TRACKED}


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def section(text: str, title: str) -> str:
    """The text under heading `title` up to the next heading of the same or a higher level."""
    for m in HEADING.finditer(text):
        if m.group(2) == title:
            level = len(m.group(1))
            rest = text[m.end() :]
            nxt = re.search(rf"^#{{1,{level}}}\s", rest, re.M)
            return rest[: nxt.start()] if nxt else rest
    raise AssertionError(f"no heading {title!r}")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_repository_paths_in_docs_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for m in PATH_TOKEN.finditer(text):
        token = m.group(1).rstrip(".,;:")
        if token.split("/")[0] not in TOP_LEVEL:
            continue  # not a path of this repository (another project's, a URL's, a placeholder's)
        if text[m.end() : m.end() + 1] in ("*", "{", "<"):
            continue  # a pattern (`bench/results/scheduler_*.json`), not one file
        line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
        if "kubectl" in line and "." not in token:
            continue  # a cluster resource (`kubectl rollout status deploy/kvr-indexer`)
        if not (REPO / token).exists():
            missing.append(f"{doc_id(doc)}:{line_of(text, m.start())}: {token}")
    for m in BARE_MODULE.finditer(text):
        if m.group(1) not in BASENAMES:
            missing.append(f"{doc_id(doc)}:{line_of(text, m.start())}: {m.group(1)} (no such module anywhere)")
    assert not missing, "the doc names files that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_symbols_named_with_their_file_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for m in SYMBOL_REF.finditer(text):
        path, name = REPO / m.group(1), m.group(2).split(".")[-1]
        source = path.read_text() if path.is_file() else ""
        if not re.search(rf"^\s*(?:async\s+def|def|class)\s+{name}\b|^\s*{name}\s*[:=]", source, re.M):
            missing.append(f"{doc_id(doc)}:{line_of(text, m.start())}: {m.group(1)}::{m.group(2)}")
    assert not missing, "the doc names functions or classes that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_links_stay_inside_the_repository_and_resolve(doc: Path) -> None:
    text = doc.read_text()
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: outside links are allowed
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc_id(doc)}:{line_of(text, m.start())}: {target}"
        if not dest.is_relative_to(REPO) or not dest.exists():
            bad.append(f"{where} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for _, h in HEADING.findall(dest.read_text())}:
            bad.append(f"{where} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize(("doc", "title", "folders"), FILE_TABLES, ids=[t[0] for t in FILE_TABLES])
def test_file_tables_are_true_and_complete(doc: str, title: str, folders: list[str]) -> None:
    named: set[Path] = set()
    missing = []
    for line in section((REPO / doc).read_text(), title).splitlines():
        # a bare name belongs to the folder of the last full path on its line, else to the folders
        base: list[Path] = [REPO / f for f in folders]
        for name in MODULE_NAME.findall(line):
            if "/" in name:
                path = REPO / name
                base = [path.parent]
                candidates = [path]
            else:
                candidates = [b / name for b in base]
            found = [c for c in candidates if c.is_file()]
            if not found:
                missing.append(name)
            named.update(found)
    modules = {p for f in folders for p in (REPO / f).glob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(str(p.relative_to(REPO)) for p in modules - named)
    assert not missing, f"{doc} § {title} names files that do not exist: {missing}"
    assert not unnamed, f"{doc} § {title} does not describe: {unnamed} (add a row)"


def test_checks_catch_drift(tmp_path: Path) -> None:
    """The helpers see a stale path, a dead anchor and a missing row (so the tests above can fail)."""
    assert slug("5. Request/reply endpoints") == "5-requestreply-endpoints"
    assert slug("4. Bookings (`KVR_BOOKINGS`): the replicated in-flight load") == (
        "4-bookings-kvr_bookings-the-replicated-in-flight-load"
    )
    stale = "see `services/scheduler/feed.py` and `deploy/compose/compose.yaml`"
    tokens = [m.group(1) for m in PATH_TOKEN.finditer(stale)]
    assert tokens == ["services/scheduler/feed.py", "deploy/compose/compose.yaml"]
    assert not (REPO / tokens[0]).exists() and (REPO / tokens[1]).exists()
    assert [m.group(1) for m in PATH_TOKEN.finditer("https://github.com/kvcache-ai/Mooncake/tree/main")] == []
    text = "# T\n\n## Files\n\n| `services/relay/app.py`, `convert.py` | x |\n\n## Next\n`decode.py`\n"
    assert section(text, "Files").count(".py") == 2
