"""The real router (indexer, scheduler, epp-bridge child processes) on a fresh nats-server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from services.runtime.procs import ServiceProcess


@pytest.fixture
def router_stack(nats_url: str) -> Iterator[dict[str, ServiceProcess]]:
    pool = "replay"
    logs = tempfile.mkdtemp(prefix="kvr-replay-test-")
    procs = {
        "indexer": ServiceProcess("indexer", nats_url=nats_url, pools=[pool], log_path=os.path.join(logs, "indexer.log")),
        "scheduler": ServiceProcess(
            # Busy thresholds off: round robin then cycles over all four workers whatever the
            # machine's load (a worker past the threshold would be skipped for a request), so the
            # comparison's baseline is exact.
            "scheduler", ["--seed", "7", "--active-decode-blocks-threshold", "off"], nats_url=nats_url, pools=[pool], log_path=os.path.join(logs, "scheduler.log")
        ),
        "epp-bridge": ServiceProcess("epp-bridge", nats_url=nats_url, pools=[pool], log_path=os.path.join(logs, "epp.log")),
    }
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready(60)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
