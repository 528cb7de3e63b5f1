"""`ServiceProcess.scrape`: a GET of a child's endpoint that a long benchmark can make under load.
Whatever the other end does (nothing listening, listening but never answering, a truncated answer),
the scrape comes back with the reason instead of raising; a real answer, 200 or not, is returned."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from services.runtime.embedded import free_port
from services.runtime.procs import ServiceProcess

pytestmark = pytest.mark.unit


def _serve_once_per_connection(answer: Callable[[bytes], bytes]) -> Iterator[int]:
    """A loopback server that reads each request head, writes `answer(head)` and closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)  # so that the loop sees `stop`
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                conn.sendall(answer(head))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def truncating_port() -> Iterator[int]:
    """Promises 100 bytes, sends 5 and hangs up: a process killed mid-answer."""
    yield from _serve_once_per_connection(lambda _head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")


@pytest.fixture
def answering_port() -> Iterator[int]:
    def answer(head: bytes) -> bytes:
        body, status = (b'{"ready": false}', b"503 Service Unavailable") if head.startswith(b"GET /readyz") else (b"kvr_x 1\n", b"200 OK")
        return b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body

    yield from _serve_once_per_connection(answer)


def test_a_scrape_that_times_out_is_returned_not_raised(silent_port: int) -> None:
    proc = ServiceProcess("indexer", http_port=silent_port)
    with pytest.raises(TimeoutError):  # what killed the benchmarks: `get` raises
        proc.get("/metrics", timeout=0.2)
    scrape = proc.scrape("/metrics", timeout=0.2)
    assert not scrape.ok and scrape.status == 0 and scrape.body == ""
    assert scrape.error is not None and scrape.error.startswith("TimeoutError")


def test_a_scrape_of_a_closed_port_is_returned_not_raised() -> None:
    proc = ServiceProcess("indexer", http_port=free_port())  # nothing listens there
    scrape = proc.scrape("/readyz", timeout=1.0)
    assert not scrape.ok and scrape.status == 0
    assert scrape.error is not None and "refused" in scrape.error.lower()


def test_a_truncated_answer_is_returned_not_raised(truncating_port: int) -> None:
    # IncompleteRead is an http.client.HTTPException, not an OSError: catching OSError is not enough.
    scrape = ServiceProcess("indexer", http_port=truncating_port).scrape("/metrics", timeout=2.0)
    assert not scrape.ok and scrape.status == 0
    assert scrape.error is not None and scrape.error.startswith("IncompleteRead")


def test_an_answer_is_returned_whatever_its_status(answering_port: int) -> None:
    proc = ServiceProcess("indexer", http_port=answering_port)
    metrics = proc.scrape("/metrics", timeout=2.0)
    assert metrics.ok and metrics.status == 200 and metrics.body == "kvr_x 1\n"
    readyz = proc.scrape("/readyz", timeout=2.0)
    assert readyz.ok and readyz.status == 503 and readyz.body == '{"ready": false}'
