"""The dev gateway: curl-style HTTP → ext_proc (the real bridge process) → a mock worker's HTTP front.

Real nats-server, a one-process `kvr epp-bridge` with its ext_proc port and the shipped dev tokenizer,
an in-process mock fleet serving OpenAI HTTP, and the gateway in process. Checked: the chosen worker
in the response headers, KV-aware routing of a repeated chat prompt (cache hit in `usage`), SSE
passing through, ImmediateResponse errors with their status and JSON body, the fallback when the
primary endpoint refuses connections (reported as served), and every booking freed afterwards.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from schemas.api import StateReply, StateRequest
from schemas.subjects import Names
from services.dev_gateway.app import DevGatewayApp
from services.dev_gateway.settings import DevGatewayConfig
from services.mock_worker.app import FleetConfig, MockFleet
from services.mock_worker.engine import EngineConfig
from services.runtime.embedded import free_port
from services.runtime.natsio import StreamSettings, provision
from services.runtime.procs import ServiceProcess
from services.runtime.responder import request

NAMES = Names()
POOL = "gw"
TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
pytestmark = pytest.mark.integration


def chat(text: str, **extra: object) -> dict:
    return {"model": "mock-model", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


async def bookings(nc) -> list[str]:
    return (await request(nc, NAMES.scheduler_state(POOL), StateRequest(), StateReply)).bookings


async def eventually(check, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_dev_gateway_routes_streams_fails_over_and_frees(nc, nats_url, tmp_path) -> None:
    await provision(nc.jetstream(), NAMES, StreamSettings())
    grpc_port = free_port()
    bridge = ServiceProcess(
        "epp-bridge",
        ["--epp-embedded-scheduler", "--embedded-indexer", "--epp-tokenizer-dir", str(TOKENIZER), "--grpc-port", str(grpc_port),
         "--grpc-host", "127.0.0.1", "--seed", "1"],
        nats_url=nats_url, pools=[POOL], log_path=str(tmp_path / "bridge.log"),
    )
    bridge.start()
    fleet = MockFleet(nc, NAMES, FleetConfig(
        pool=POOL, count=2, engine=EngineConfig(block_size=16, kv_blocks=1024), speedup=20.0, openai_port=0,
        tokenizer_dir=str(TOKENIZER), ttl_s=5.0,
    ))
    await fleet.start()
    cfg = DevGatewayConfig(gateway_port=0, extproc_target=f"127.0.0.1:{grpc_port}")
    gateway = DevGatewayApp(cfg)
    try:
        await asyncio.to_thread(bridge.wait_ready, 60)
        await gateway.start()
        assert await eventually(lambda: asyncio.sleep(0, gateway.ready())), "the gateway never saw the picker SERVING"
        endpoints = {f"127.0.0.1:{w.http.port}": w for w in fleet.workers}
        url = f"http://127.0.0.1:{gateway.port}"
        prompt = "Explain how a KV-cache-aware router picks a worker for a long shared system prompt. " * 8
        async with aiohttp.ClientSession() as http:
            # 1. a chat request routes without token ids (the pool's tokenizer) and names its worker
            async with http.post(f"{url}/v1/chat/completions", json=chat(prompt)) as resp:
                assert resp.status == 200, await resp.text()
                first = await resp.json()
                served = resp.headers["x-gateway-destination-endpoint"]
                worker = endpoints[served]
                assert resp.headers["x-worker-instance-id"] == str(worker.worker_id)
            assert first["object"] == "chat.completion" and first["usage"]["completion_tokens"] == 4

            # 2. the same prompt again goes to the worker that now caches it (KV events → index)
            async def repeat_hits() -> dict | None:
                async with http.post(f"{url}/v1/chat/completions", json=chat(prompt)) as r:
                    out = await r.json()
                    same = r.headers["x-worker-instance-id"] == str(worker.worker_id)
                return out if same and out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 else None

            again = await eventually(repeat_hits)
            assert again, "the repeated prompt never went back to the worker holding its prefix"

            # 3. streaming passes through the picker chunk by chunk
            body = chat(prompt, stream=True, stream_options={"include_usage": True})
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
                text = await resp.text()
            events = [b[len("data: "):] for b in text.split("\n\n") if b.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 4

            # 4. an ImmediateResponse comes back with its status and the picker's JSON error body
            async with http.post(f"{url}/v1/chat/completions", data=b'{"messages": []}') as resp:
                assert resp.status == 400
                err = await resp.json()
            assert err["status"] == "error" and err["error"]["code"] == "invalid_request"

            # 5. the primary refuses connections: the next endpoint serves and is reported
            await worker.http.stop()
            async with http.post(f"{url}/v1/chat/completions", json=chat(prompt)) as resp:
                assert resp.status == 200, await resp.text()
                other = resp.headers["x-gateway-destination-endpoint"]
                assert other != served and other in endpoints
                assert resp.headers["x-worker-instance-id"] == str(endpoints[other].worker_id)
                await resp.json()

        # every booking made through ext_proc was freed at the end of its response stream
        assert await eventually(lambda: _no_bookings(nc)), "bookings left open"
        metrics = bridge.metrics()
        assert 'kvr_epp_extproc_requests_total{outcome="routed"}' in metrics
    finally:
        await gateway.stop()
        await fleet.stop()
        bridge.terminate()


async def _no_bookings(nc) -> bool:
    return await bookings(nc) == []
