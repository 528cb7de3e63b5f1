"""Driving `epp.query` at a rate (open loop) or with N requests outstanding (closed loop), and the
latency percentiles of the answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import nats
from nats.aio.msg import Msg

from .measure import percentile
from .stack import NAMES, POOL
from .wire import WireClient


class _Reply(msgspec.Struct):
    """The fields of an epp.query answer this generator reads (ok or error envelope)."""

    status: str = ""
    request_id: str = ""
    error: dict[str, Any] | None = None


_REPLY = msgspec.json.Decoder(_Reply)


_REPLY = msgspec.json.Decoder(_Reply)


async def drive(
    url: str, payloads: list[bytes], rate: float | None, concurrency: int, duration: float, book: bool, client: str = "wire"
) -> dict[str, Any]:
    """Open loop (rate given): one pacing loop publishes request k at start + k/rate (all requests due
    by now, as a burst when the loop wakes late) and its latency counts from that due time, so neither
    a late generator nor a stalled stack can hide queueing (no coordinated omission). Closed loop:
    `concurrency` requests outstanding, each reply sends the next; latency from its send.

    Replies come back on one wildcard inbox subscription: no coroutine, future or timer per request.
    The generator shares the 2 cores with the stack it measures, and this keeps its own CPU low: at
    3,000/s ≈ 25 % of a core with `client="wire"` (`WireClient`), ≈ 36 % with nats-py, against ≈ 41 %
    for one `nc.request` coroutine per request."""
    nc: Any = await WireClient.connect(url) if client == "wire" else await nats.connect(url, pending_size=256 * 1024 * 1024)
    subject = NAMES.epp_query(POOL)
    cleanup = NAMES.epp_cleanup(POOL)
    inbox = nc.new_inbox()
    free_inbox = nc.new_inbox()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    due_of: dict[str, float] = {}  # reply token → due (open loop) or send time (closed loop)
    frees = {"sent": 0, "answered": 0}
    run = {"next": 0, "refill": 0, "measuring": False}

    async def send(k: int, due: float) -> None:
        token = str(k)
        due_of[token] = due
        await nc.publish(subject, payloads[k % len(payloads)], reply=f"{inbox}.{token}")

    async def on_reply(msg: Msg) -> None:
        due = due_of.pop(msg.subject[len(inbox) + 1 :], None)
        if due is None:
            return
        dt = time.perf_counter() - due
        reply = _REPLY.decode(msg.data)
        if reply.status != "ok":
            code = (reply.error or {}).get("code", "malformed")
            errors[code] = errors.get(code, 0) + 1
        else:
            if run["measuring"]:
                latencies.append(dt)
            if book:
                frees["sent"] += 1
                free = msgspec.json.encode({"request_id": reply.request_id, "phase": "free"})
                await nc.publish(cleanup, free, reply=free_inbox)
        if run["refill"] > 0:  # closed loop (and warm-up): the answer makes room for the next request
            run["refill"] -= 1
            k = run["next"]
            run["next"] = k + 1
            await send(k, time.perf_counter())

    async def on_free(_msg: Msg) -> None:
        frees["answered"] += 1

    async def settle(limit: float) -> None:
        deadline = time.perf_counter() + limit
        while (due_of or frees["answered"] < frees["sent"]) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)

    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    await nc.subscribe(free_inbox, cb=on_free)
    run["refill"] = 49  # warm-up: 50 requests one at a time, not measured
    run["next"] = 1
    await send(0, time.perf_counter())
    while run["refill"] > 0 or due_of:
        await asyncio.sleep(0.005)
    await settle(5)
    errors.clear()
    run["measuring"] = True
    start = time.perf_counter()
    base = run["next"]
    if rate is None:
        run["refill"] = 1 << 62
        for _ in range(concurrency):
            k = run["next"]
            run["next"] = k + 1
            await send(k, time.perf_counter())
        await asyncio.sleep(duration)
        run["refill"] = 0
    else:
        total = int(duration * rate)
        k = 0
        while k < total:
            now = time.perf_counter()
            while k < total and start + k / rate <= now:
                await send(base + k, start + k / rate)
                k += 1
            if k < total:
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
        run["next"] = base + total
    await settle(5)
    elapsed = time.perf_counter() - start
    sent = run["next"] - base
    if due_of:
        errors["no_reply_within_5s"] = len(due_of)
    if frees["answered"] < frees["sent"]:
        errors["free_unanswered"] = frees["sent"] - frees["answered"]
    await nc.close()
    lat = sorted(latencies)
    return {
        "sent": sent,
        "ok": len(lat),
        "errors": errors,
        "throughput_qps": round(len(lat) / elapsed, 1),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 3),
        "p90_ms": round(percentile(lat, 0.90) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3) if lat else None,
    }
