"""The load generator's minimal NATS client (bench/lib/wire.py) against a real nats-server: the
latency figures in docs/benchmarks.md depend on it delivering every reply, whole, to the right
callback."""

from __future__ import annotations

import asyncio

import nats

from bench.lib.wire import WireClient


async def test_requests_and_replies_round_trip_with_and_without_headers(nats_url: str) -> None:
    responder = await nats.connect(nats_url)

    async def echo(msg) -> None:
        # Every third reply carries headers (HMSG); payloads vary in size, up to several TCP reads.
        headers = {"Content-Type": "application/json"} if msg.data[-1] % 3 == 0 else None
        await responder.publish(msg.reply, msg.data * (1 + msg.data[-1] % 50), headers=headers)

    await responder.subscribe("svc", cb=echo)
    await responder.flush()

    client = await WireClient.connect(nats_url)
    inbox = client.new_inbox()
    got: dict[str, bytes] = {}

    async def on_reply(msg) -> None:
        got[msg.subject] = msg.data

    await client.subscribe(f"{inbox}.*", cb=on_reply)
    sent = {f"{inbox}.{k}": f"request-{k}".encode() + bytes([k % 256]) for k in range(600)}
    for reply, payload in sent.items():
        await client.publish("svc", payload, reply=reply)
    for _ in range(200):
        if len(got) == len(sent):
            break
        await asyncio.sleep(0.02)
    assert got == {reply: p * (1 + p[-1] % 50) for reply, p in sent.items()}
    await client.close()
    await responder.close()


async def test_a_callback_that_suspends_is_refused(nats_url: str) -> None:
    client = await WireClient.connect(nats_url)
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception") or RuntimeError(ctx["message"])))

    async def slow(_msg) -> None:
        await asyncio.sleep(0.01)

    await client.subscribe("slow", cb=slow)
    await client.publish("slow", b"x")
    for _ in range(100):
        if errors:
            break
        await asyncio.sleep(0.01)
    assert any(isinstance(e, RuntimeError) and "must not suspend" in str(e) for e in errors)
    await client.close()
