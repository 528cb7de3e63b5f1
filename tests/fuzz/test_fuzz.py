"""Fuzzed requests to every endpoint and fuzzed stream messages, against real services on a real
nats-server (the short version of bench/hostile_input.py): always a reply, never `internal`, no
state change from a rejected request; every malformed stream message counted, no traceback."""

from __future__ import annotations

import os

import msgspec
import pytest
import structlog

from bench.hostile_input import SEEDS, Mutator, Stack, fuzz_endpoints, fuzz_streams
from schemas import codec
from schemas.api import SelectRequest
from services.runtime.embedded import NatsServer

N = int(os.environ.get("KVR_FUZZ_N", "300"))


def test_the_generator_is_seeded_and_hostile() -> None:
    first, second = Mutator(SEEDS["scheduler.select"], 3), Mutator(SEEDS["scheduler.select"], 3)
    a = [first.next() for _ in range(300)]
    b = [second.next() for _ in range(300)]
    assert a == b
    kinds = {kind for _, _, kind in a}
    assert {"invalid_utf8", "deep_field", "deep_whole", "raw_number", "msgpack_bad_utf8"} <= kinds
    rejected = 0
    for data, headers, _ in a:
        try:
            codec.decode(data, SelectRequest, codec.content_type_of(headers))
        except codec.SchemaError:
            rejected += 1
    assert rejected > 200  # mostly invalid, a few still valid (the service must handle both)


@pytest.fixture
async def stack(nats_url: str):
    s = await Stack.start(nats_url)
    try:
        yield s
    finally:
        await s.stop()


async def test_every_endpoint_answers_every_fuzzed_request(stack: Stack, capfd) -> None:
    with structlog.testing.capture_logs() as logs:
        results = await fuzz_endpoints(stack, N, seed=11)
    assert not [e for e in logs if e.get("exc_info") or "exception" in e], "a fuzzed request logged a traceback"
    assert set(results) == set(SEEDS)
    for endpoint, res in results.items():
        assert res.sent == N
        assert res.no_reply == 0, (endpoint, res.examples)
        assert res.internal == 0, (endpoint, res.examples)
        assert res.state_changed == 0, (endpoint, res.examples)
        assert res.codes["invalid_request"] > N // 2, (endpoint, dict(res.codes))
    assert "Traceback" not in "".join(capfd.readouterr())  # what bypasses structlog (e.g. asyncio's handler)


async def test_every_malformed_stream_message_is_counted_without_a_traceback(stack: Stack, capfd) -> None:
    with structlog.testing.capture_logs() as logs:
        res = await fuzz_streams(stack, N, seed=5)
    assert not [e for e in logs if e.get("exc_info") or "exception" in e], "a malformed message logged a traceback"
    for stream in ("kv", "discovery", "bookings"):
        r = res[stream]
        assert r["malformed_expected"] > N // 2, res
        assert r["malformed_counted"] == r["malformed_expected"], (stream, res)
    assert res["kv_counted_by_scheduler_replica"] == res["kv"]["malformed_expected"]
    assert res["discovery_counted_by_scheduler"] == res["discovery"]["malformed_expected"]
    assert res["apply_failures"] == 0
    assert "Traceback" not in "".join(capfd.readouterr())  # what bypasses structlog (e.g. asyncio's handler)


async def test_oversize_requests_are_refused_before_decoding(tmp_path) -> None:
    """With a server that lets 9 MB through, every endpoint still refuses it: `invalid_request`."""
    conf = tmp_path / "big.conf"
    conf.write_text("max_payload: 16MB\n")
    server = NatsServer(extra_args=["-c", str(conf)]).start()
    try:
        s = await Stack.start(server.url)
        try:
            big = b'{"request_id": "big", "token_ids": [' + b"1," * (4_700_000) + b'1], "block_hashes": null}'
            for endpoint, subject in sorted(s.subjects.items()):
                before = await s.fingerprint()
                msg = await s.nc.request(subject, big, timeout=10)
                reply = msgspec.json.decode(msg.data)
                assert reply["error"]["code"] == "invalid_request", (endpoint, reply)
                assert "more than the limit" in reply["error"]["message"]
                assert await s.fingerprint() == before
        finally:
            await s.stop()
    finally:
        server.cleanup()
