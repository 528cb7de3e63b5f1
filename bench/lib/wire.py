"""The load generator's own minimal NATS client (bench/epp_query.py, bench/ext_proc.py)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, NamedTuple

CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"lang":"python-bench","protocol":1}\r\n'


class _Delivered(NamedTuple):
    subject: str
    data: bytes


class WireClient(asyncio.Protocol):
    """The load generator's own minimal NATS connection (`--client wire`): the client protocol's PUB,
    SUB, MSG/HMSG and PING/PONG on an `asyncio.Protocol`, with every publish of one event-loop turn
    written in one `write`. The generator shares the 2 cores with the stack it measures; at 3,000/s
    this costs it about half the CPU of nats-py (whose per-message streams, queues, tasks and
    futures are what a service needs and a load generator does not). Bench code only: no
    reconnect, no TLS or auth, and callbacks must not suspend."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.subs: dict[bytes, Any] = {}
        self.pong: asyncio.Future[None] | None = None
        self.info = asyncio.get_running_loop().create_future()
        self._sid = 0
        self._inbox = 0

    @classmethod
    async def connect(cls, url: str) -> WireClient:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, int(port))
        await client.info
        client.pong = loop.create_future()
        assert client.transport is not None
        client.transport.write(CONNECT + b"PING\r\n")
        await client.pong
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def new_inbox(self) -> str:
        self._inbox += 1
        return f"_INBOX.bench{os.getpid()}x{self._inbox}"

    async def subscribe(self, subject: str, cb: Any) -> None:
        self._sid += 1
        self.subs[str(self._sid).encode()] = cb
        self._queue(f"SUB {subject} {self._sid}\r\n".encode())

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self._queue(b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, b"\r\n")))

    def _queue(self, data: bytes) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    async def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            head = bytes(buf[:eol]).split(b" ")
            op = head[0]
            if op in (b"MSG", b"HMSG"):
                total = int(head[-1])
                start = eol + 2 + (int(head[-2]) if op == b"HMSG" else 0)
                end = eol + 2 + total
                if len(buf) < end + 2:
                    return
                msg = _Delivered(head[1].decode(), bytes(buf[start:end]))
                del buf[: end + 2]
                cb = self.subs.get(head[2])
                if cb is not None:
                    try:
                        cb(msg).send(None)
                    except StopIteration:
                        continue
                    raise RuntimeError("WireClient callbacks must not suspend")
                continue
            del buf[: eol + 2]
            if op == b"PING":
                self._queue(b"PONG\r\n")
            elif op == b"PONG" and self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
            elif op == b"INFO" and not self.info.done():
                self.info.set_result(None)
            elif op == b"-ERR":
                raise RuntimeError(f"nats-server: {bytes(b' '.join(head))!r}")
