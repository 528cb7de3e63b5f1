"""docs/protocol.md states what the code does: hash vectors, error codes, subjects, common settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import xxhash

from schemas.api import ERROR_HTTP_STATUS
from schemas.hashing import local_block_hashes, salt_seed, sequence_hashes
from schemas.subjects import Names
from services.runtime.config import COMMON

pytestmark = pytest.mark.unit

PROTOCOL = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _ints(cell: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", cell)]


def test_hash_vectors_in_the_doc_are_what_the_code_computes() -> None:
    table = PROTOCOL.split("<!-- hash-vectors:start -->")[1].split("<!-- hash-vectors:end -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert len(rows) >= 3
    for inp, block_size, seed_cell, local_cell, seq_cell in rows:
        first, last = _ints(inp)
        tokens = list(range(first, last + 1))
        lora = re.search(r"LoRA `([^`]+)`", seed_cell)
        seed = salt_seed(lora.group(1)) if lora else 1337
        assert _ints(seed_cell)[-1] == seed, seed_cell
        local = local_block_hashes(tokens, int(block_size), seed)
        assert local == _ints(local_cell), inp
        if seq_cell:
            assert sequence_hashes(local) == _ints(seq_cell), inp
    primitive = re.search(r'XXH3-64\(b"test data", seed 1337\) = (\d+)', PROTOCOL)
    assert primitive and xxhash.xxh3_64_intdigest(b"test data", seed=1337) == int(primitive.group(1))


def test_error_codes_and_http_statuses_match_the_schema() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", PROTOCOL, re.M)
    assert {code: int(status) for code, status in rows} == ERROR_HTTP_STATUS


def test_every_subject_the_code_builds_is_in_the_doc() -> None:
    names = Names()
    built = [
        names.kv_subject("{pool}", "{worker_id}", "{dp_rank}"),  # type: ignore[arg-type]
        names.bookings_subject("{pool}", "{router_id}"),
        names.load_subject("{pool}", "{worker_id}"),
        names.match("{pool}"),
        names.dump("{pool}"),
        names.select("{pool}"),
        names.booking("{pool}"),
        names.scheduler_state("{pool}"),
        names.epp_query("{pool}"),
        names.epp_book("{pool}"),
        names.epp_cleanup("{pool}"),
        names.generate("{pool}", "{worker_id}"),  # type: ignore[arg-type]
        names.snapshot_object("{pool}"),
        names.kv_stream,
        names.workers_bucket,
        names.bookings_stream,
        names.snapshots_bucket,
    ]
    missing = [s for s in built if f"`{s}`" not in PROTOCOL]
    assert not missing, f"docs/protocol.md §1 does not list: {missing}"


def test_common_settings_are_in_the_doc() -> None:
    section = PROTOCOL.split("## 8.")[1]
    missing = [s.flag for s in COMMON if f"`{s.flag}`" not in section]
    assert not missing, f"docs/protocol.md §8 does not list: {missing}"
