"""The workers' OpenAI HTTP front against a real nats-server: shapes, streaming, usage, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from schemas import WorkerRecord, codec
from schemas.subjects import Names
from services.mock_worker.app import FleetConfig, MockFleet
from services.mock_worker.engine import EngineConfig
from services.runtime.natsio import StreamSettings, provision

NAMES = Names()
TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me about KV caches and prefix reuse. " * 12}], "max_tokens": 6}


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_and_completions_over_http(nc) -> None:
    await provision(nc.jetstream(), NAMES, StreamSettings())
    cfg = FleetConfig(
        pool="oa", count=2, worker_id_base=500, engine=EngineConfig(block_size=16, kv_blocks=512), speedup=20.0,
        openai_port=0, tokenizer_dir=str(TOKENIZER), model="mock-model",
    )
    fleet = MockFleet(nc, NAMES, cfg)
    await fleet.start()
    try:
        worker = fleet.workers[0]
        kv = await nc.jetstream().key_value("KVR_WORKERS")
        rec = codec.decode((await kv.get("oa.500")).value, WorkerRecord)
        assert (rec.address, rec.port) == ("127.0.0.1", worker.http.port) and rec.port > 0
        base = f"http://127.0.0.1:{worker.http.port}"
        async with aiohttp.ClientSession() as http:
            # non-streaming chat: OpenAI shape, usage from the engine, the worker named in a header
            async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200 and resp.headers["x-worker-instance-id"] == "500"
                first = await resp.json()
            assert first["object"] == "chat.completion" and first["model"] == "mock-model"
            assert first["choices"][0]["message"]["role"] == "assistant" and first["choices"][0]["finish_reason"] == "length"
            assert len(first["choices"][0]["message"]["content"].split()) == 6  # one word per output token
            u = first["usage"]
            want_prompt = len(worker.tokenizer.encode_chat(CHAT["messages"]))
            assert u["prompt_tokens"] == want_prompt and u["completion_tokens"] == 6 and u["total_tokens"] == want_prompt + 6
            assert u["prompt_tokens_details"]["cached_tokens"] == 0

            # the same prompt again, streamed: SSE chunks, [DONE], usage on request, and a cache hit
            body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
                events = sse_events(await resp.text())
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
            streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            assert len(streamed.split()) == 6
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
            cached = chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == (want_prompt // 16) * 16 > 0  # every full block of the repeated prompt

            # completions with token ids, streamed without usage
            ids_body = {"prompt": [1, 2, 3, 4, 5], "max_tokens": 3, "stream": True}
            async with http.post(f"{base}/v1/completions", json=ids_body) as resp:
                events = sse_events(await resp.text())
            assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
            assert events[0]["object"] == "text_completion"

            # errors: OpenAI error objects, no state change
            for path, payload, status in (
                ("/v1/chat/completions", b"{nope", 400),
                ("/v1/chat/completions", json.dumps({"prompt": "x"}).encode(), 400),
                ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400),
                ("/v1/completions", json.dumps({"prompt": [1], "max_tokens": 10**9}).encode(), 400),
            ):
                async with http.post(base + path, data=payload) as resp:
                    assert resp.status == status, (path, payload)
                    err = await resp.json()
                    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
            assert worker.engine.idle and not worker._streams
    finally:
        await fleet.stop()


async def test_without_tokenizer_text_prompts_are_refused_but_ids_work(nc) -> None:
    await provision(nc.jetstream(), NAMES, StreamSettings())
    engine = EngineConfig(block_size=16, kv_blocks=256)
    cfg = FleetConfig(pool="ob", count=1, worker_id_base=600, engine=engine, speedup=20.0, openai_port=0)
    fleet = MockFleet(nc, NAMES, cfg)
    await fleet.start()
    try:
        base = f"http://127.0.0.1:{fleet.workers[0].http.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/completions", json={"prompt": "hello"}) as resp:
                assert resp.status == 400 and "tokenizer" in (await resp.json())["error"]["message"]
            body = {"prompt": "", "nvext": {"token_data": list(range(40))}, "max_tokens": 2}
            async with http.post(f"{base}/v1/completions", json=body) as resp:
                out = await resp.json()
            assert resp.status == 200 and out["usage"]["prompt_tokens"] == 40 and out["choices"][0]["text"]
    finally:
        await fleet.stop()
