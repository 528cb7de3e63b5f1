"""Test harness: real nats-server processes on free loopback ports (never a mock).

`KVR_TEST_NATS_URL` points the suite at an existing server instead; with a Docker engine and
`KVR_TEST_DOCKER=1`, testcontainers supplies the server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from services.runtime.embedded import NatsCluster, NatsServer


class _External:
    def __init__(self, url: str) -> None:
        self.url = url

    def restart(self) -> None:  # pragma: no cover - only with an external server
        pytest.skip("cannot restart an external NATS server")

    def cleanup(self) -> None:
        pass


def _docker_server():  # pragma: no cover - needs a Docker engine
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = DockerContainer("nats:2.14.2-alpine").with_command("-js").with_exposed_ports(4222)
    container.start()
    wait_for_logs(container, "Server is ready")
    url = f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
    server = _External(url)
    server.cleanup = container.stop
    return server


def start_server() -> NatsServer | _External:
    if os.environ.get("KVR_TEST_NATS_URL"):
        return _External(os.environ["KVR_TEST_NATS_URL"])
    if os.environ.get("KVR_TEST_DOCKER") == "1":
        return _docker_server()
    return NatsServer().start()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A fresh JetStream server per test (starts in ~50 ms), with its own temporary store."""
    server = start_server()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.cleanup()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator:
    import nats

    conn = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    cluster = NatsCluster().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes the handshake) and never
    answers: a service process too loaded to answer a scrape in time."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that use a server fixture are integration tests; everything else is a fast unit test.
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"nats_server", "nats_url", "nc", "nats_cluster"} or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
