"""Every ZMQ context a relay test creates (the relay's, a fake engine's or publisher's) is destroyed
with linger 0 when the test ends, whatever happened in it. `Context.term()` blocks while a socket
of the context is open, so a context a failing test left behind would otherwise block whoever
terminates it later (a garbage collection, the next test) until the per-test timeout. A test that
passes must have closed its own: one left open is reported as an error of that test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq


@pytest.fixture(autouse=True)
def zmq_contexts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[zmq.Context[Any]]]:
    created: list[zmq.Context[Any]] = []
    init = zmq.Context.__init__

    def tracking_init(self: zmq.Context[Any], *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(zmq.Context, "__init__", tracking_init)
    left: list[str] = []
    try:
        yield created
    finally:
        monkeypatch.undo()
        for ctx in created:
            if not ctx.closed:
                left.append(repr(ctx))
                ctx.destroy(linger=0)
    assert not left, f"ZMQ contexts left open by the test (destroyed now): {left}"
