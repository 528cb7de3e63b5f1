"""Dynamo's request fields over the wire (issue 18): `nvext.multimodal` enters the block hashes,
`cache_namespace` is the salt under Dynamo's name, on epp.query and scheduler.select alike.
One `kvr epp-bridge` process (embedded scheduler and index replica) against a real nats-server."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from schemas import codec
from schemas.events import RouterEvent, kv_msg_id
from schemas.hashing import SEED, local_block_hashes, salt_seed
from schemas.subjects import Names
from services.runtime.procs import ServiceProcess

from .helpers import record, register

NAMES = Names()
pytestmark = pytest.mark.integration
TOKENS = list(range(700, 700 + 6 * 4))
IMAGE = (0xFEEDFACE_CAFEBEEF, 4, 8)  # the image's placeholders: positions 4..11 (blocks 1 and 2)


def stored(worker_id: int, hashes: list[int]) -> bytes:
    blocks = [{"block_hash": 1_000_000 * worker_id + i + 1, "tokens_hash": h} for i, h in enumerate(hashes)]
    event = {"worker_id": worker_id, "event": {"event_id": 1, "data": {"stored": {"parent_hash": None, "blocks": blocks}}}}
    codec.decode(codec.encode_json(event), RouterEvent)
    return codec.encode_json(event)


async def ask(nc, subject: str, payload: dict) -> dict:
    msg = await nc.request(subject, codec.encode_json(payload), timeout=10)
    return msgspec.json.decode(msg.data)


async def test_multimodal_and_cache_namespace_route_to_the_worker_that_cached_them(nats_url, tmp_path):
    bridge = ServiceProcess(
        "epp-bridge", ["--epp-embedded-scheduler", "--embedded-indexer", "--block-size", "4"],
        nats_url=nats_url, pools=["mm"], log_path=str(tmp_path / "bridge.log"),
    )
    bridge.start().wait_ready(60)
    try:
        nc = await nats.connect(nats_url)
        try:
            await register(nc, [record(w, pool="mm") for w in (1, 2, 3)])
            js = nc.jetstream()
            per_worker = {
                1: local_block_hashes(TOKENS, 4),  # the text alone
                2: local_block_hashes(TOKENS, 4, SEED, [IMAGE]),  # the prompt with its image
                3: local_block_hashes(TOKENS, 4, salt_seed(None, "tenant-a")),  # salted
            }
            assert per_worker[2][0] == per_worker[1][0] and per_worker[2][1:3] != per_worker[1][1:3]
            for w, hashes in per_worker.items():
                await js.publish(NAMES.kv_subject("mm", w, 0), stored(w, hashes), headers={"Nats-Msg-Id": kv_msg_id("mm", w, 0, 1)})

            async def query(nvext: dict) -> dict:
                body = {"prompt": "", "nvext": {"token_data": TOKENS, **nvext}}
                for _ in range(200):
                    reply = await ask(nc, NAMES.epp_query("mm"), {"request_id": "q-1", "body": body, "book": False})
                    if reply.get("status") != "ok" or reply["overlap_blocks"] == 6:
                        return reply
                    await asyncio.sleep(0.05)
                return reply

            image = {"mm_hash": IMAGE[0], "offset": IMAGE[1], "length": IMAGE[2]}
            with_image = await query({"multimodal": [image]})
            assert (with_image["decode"]["worker_id"], with_image["overlap_blocks"]) == (2, 6), with_image
            text = await query({})
            assert (text["decode"]["worker_id"], text["overlap_blocks"]) == (1, 6), text
            both = {"cache_salt": "tenant-a", "cache_namespace": "tenant-a"}
            for salt in ({"cache_namespace": "tenant-a"}, {"cache_salt": "tenant-a"}, both):
                salted = await query(salt)
                assert (salted["decode"]["worker_id"], salted["overlap_blocks"]) == (3, 6), (salt, salted)
            body = {"prompt": [1, 2], "nvext": {"cache_salt": "a", "cache_namespace": "b"}}
            bad = await ask(nc, NAMES.epp_query("mm"), {"request_id": "q-2", "body": body})
            assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request", bad

            # scheduler.select takes the same fields with token ids
            sel = await ask(nc, NAMES.select("mm"), {"request_id": "s-1", "token_ids": TOKENS, "multimodal": [image], "book": False})
            assert (sel["decode"]["worker_id"], sel["overlap_blocks"]) == (2, 6), sel
            ns = {"request_id": "s-2", "token_ids": TOKENS, "cache_namespace": "tenant-a", "book": False}
            sel = await ask(nc, NAMES.select("mm"), ns)
            assert (sel["decode"]["worker_id"], sel["overlap_blocks"]) == (3, 6), sel
            bad = await ask(nc, NAMES.select("mm"), {"request_id": "s-3", "token_ids": TOKENS, "cache_salt": "x", "cache_namespace": "y"})
            assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request", bad
        finally:
            await nc.close()
    finally:
        assert bridge.terminate() == 0
