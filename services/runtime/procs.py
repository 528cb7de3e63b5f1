"""Start `kvr` services as child processes and wait until they are ready (tests, benches, `kvr dev`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from .embedded import free_port, terminate

# What a GET of a child's endpoint raises besides an HTTP status: URLError (refused), TimeoutError
# (no answer within the timeout: a loaded or stopped process), other OSErrors (reset), and
# HTTPException (a truncated or garbled answer from a process being killed).
SCRAPE_ERRORS: tuple[type[Exception], ...] = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class Scrape:
    """One GET of a child's endpoint that never raises: `error` says why nothing came back."""

    status: int  # the HTTP status; 0 when nothing answered
    body: str = ""
    error: str | None = None  # e.g. "TimeoutError: timed out"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ServiceProcess:
    command: str  # kvr subcommand, e.g. "indexer"
    args: Sequence[str] = ()
    nats_url: str = "nats://127.0.0.1:4222"
    pools: Sequence[str] = ("default",)
    env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    log_path: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        if not self.http_port:
            self.http_port = free_port()
        env = {**os.environ, "KVR_LOG_FORMAT": "json", **self.env}
        argv = [
            sys.executable, "-m", "services.cli", self.command,
            "--nats-url", self.nats_url,
            "--pool", ",".join(self.pools),
            "--http-port", str(self.http_port),
            "--http-host", "127.0.0.1",
            *self.args,
        ]
        # The child holds its own copy of the log file; the parent's closes with the block.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, timeout: float = 1.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self, path: str, timeout: float = 5.0) -> Scrape:
        """`get` for a long run (benchmarks): a failure is returned with its reason, never raised."""
        try:
            status, body = self.get(path, timeout)
        except SCRAPE_ERRORS as exc:
            return Scrape(0, "", f"{type(exc).__name__}: {exc}")
        return Scrape(status, body)

    def readyz(self) -> dict:
        status, body = self.get("/readyz")
        data = json.loads(body) if body else {}
        data["_http_status"] = status
        return data

    def wait_ready(self, timeout: float = 30.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kvr {self.command} exited with {self.proc.returncode} before becoming ready")
            try:
                status, _ = self.get("/readyz", timeout=0.5)
                if status == 200:
                    return self
            except SCRAPE_ERRORS:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"kvr {self.command} not ready after {timeout}s")

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code (0 = clean drain)."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> ServiceProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.terminate()
