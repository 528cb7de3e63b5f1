"""The lock-free hot-path metrics expose exactly what prometheus_client's own types expose."""

from __future__ import annotations

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from services.runtime import fastmetrics

BUCKETS = (0.0001, 0.00025, 0.001, 0.01, 0.1, 1.0)
values = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
labels = st.sampled_from(["parse", "select", "a b\"c"])


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(labels, values), max_size=40), st.lists(st.tuples(labels, st.integers(0, 3)), max_size=20))
def test_exposition_equals_prometheus_client(observations: list[tuple[str, float]], increments: list[tuple[str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h1 = fastmetrics.Histogram("x_seconds", "doc", ["phase"], buckets=BUCKETS, registry=ours)
    h2 = prometheus_client.Histogram("x_seconds", "doc", ["phase"], buckets=BUCKETS, registry=theirs)
    c1 = fastmetrics.Counter("y_total", "doc", ["phase"], registry=ours)
    c2 = prometheus_client.Counter("y_total", "doc", ["phase"], registry=theirs)
    u1 = fastmetrics.Histogram("z_tokens", "doc", buckets=(16, 64, 256), registry=ours)
    u2 = prometheus_client.Histogram("z_tokens", "doc", buckets=(16, 64, 256), registry=theirs)
    for label, value in observations:
        h1.labels(label).observe(value)
        h2.labels(label).observe(value)
        u1.observe(value * 100)
        u2.observe(value * 100)
    for label, n in increments:
        c1.labels(label).inc(n)
        c2.labels(label).inc(n)
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(theirs))
    for label, _ in increments:
        assert ours.get_sample_value("y_created", {"phase": label}) is not None


def test_bucket_edges_are_inclusive_and_sum_counts() -> None:
    reg = CollectorRegistry()
    h = fastmetrics.Histogram("e_seconds", "doc", buckets=(1.0, 2.0), registry=reg)
    for v in (1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert reg.get_sample_value("e_seconds_bucket", {"le": "1.0"}) == 1
    assert reg.get_sample_value("e_seconds_bucket", {"le": "2.0"}) == 3
    assert reg.get_sample_value("e_seconds_bucket", {"le": "+Inf"}) == 4
    assert reg.get_sample_value("e_seconds_count") == 4
    assert reg.get_sample_value("e_seconds_sum") == 7.5


def test_misuse_is_refused() -> None:
    reg = CollectorRegistry()
    c = fastmetrics.Counter("m_total", "doc", ["a"], registry=reg)
    with pytest.raises(ValueError):
        c.labels("x", "y")
    with pytest.raises(ValueError):
        c.labels("x").inc(-1)
    with pytest.raises(ValueError):  # the registry refuses a second family of the same name
        fastmetrics.Counter("m_total", "doc", ["a"], registry=reg)
    with pytest.raises(ValueError):
        fastmetrics.Histogram("h", "doc", buckets=(1.0, 1.0), registry=reg)
