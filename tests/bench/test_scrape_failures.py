"""A benchmark whose service does not answer a /metrics scrape in time (a loaded machine) loses
that row's figure, with the reason, and goes on: the helpers that turn scrapes into figures."""

from __future__ import annotations

import math

import pytest

from bench.ext_proc import frees_confirmed
from bench.lib.measure import phase_means_between
from services.runtime.procs import Scrape, ServiceProcess

pytestmark = pytest.mark.unit

BRIDGE_METRICS = """\
kvr_epp_phase_seconds_sum{{phase="parse"}} {parse_s}
kvr_epp_phase_seconds_count{{phase="parse"}} {n}
kvr_epp_extproc_booking_updates_total{{outcome="known",phase="free"}} {frees}
"""


def metrics(parse_s: float, n: int, frees: int = 0) -> Scrape:
    return Scrape(200, BRIDGE_METRICS.format(parse_s=parse_s, n=n, frees=frees))


def test_phase_means_between_two_answers() -> None:
    means, failed = phase_means_between(metrics(0.5, 100), metrics(0.7, 300))
    assert failed is None and means == {"parse": 1000.0}  # 0.2 s over 200 queries


def test_a_bridge_that_does_not_answer_loses_the_phase_means_not_the_run(silent_port: int) -> None:
    bridge = ServiceProcess("epp-bridge", http_port=silent_port)
    means, failed = phase_means_between(metrics(0.5, 100), bridge.scrape("/metrics", timeout=0.2))
    assert means is None and failed is not None and failed.startswith("TimeoutError")
    means, failed = phase_means_between(bridge.scrape("/metrics", timeout=0.2), metrics(0.5, 100))
    assert means is None and failed is not None and failed.startswith("TimeoutError")


def test_frees_confirmed_of_a_bridge_that_does_not_answer_is_missing_with_the_reason(silent_port: int) -> None:
    total, failed = frees_confirmed([ServiceProcess("epp-bridge", http_port=silent_port)], timeout=0.2)
    assert math.isnan(total)
    assert failed is not None and failed.startswith("epp-bridge /metrics: TimeoutError")
