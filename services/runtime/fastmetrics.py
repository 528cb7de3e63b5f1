"""Counters and histograms for per-request hot paths, updated without a lock.

prometheus_client takes a lock on every increment: a histogram observation costs ≈ 1.4 µs here and
a counter increment ≈ 0.45 µs, and one routed query makes about ten observations across the
bridge, scheduler and index (≈ 15 µs of a ≈ 250 µs query). These keep plain lists that the event
loop updates and hand prometheus_client the same metric families at scrape time through a custom
collector, so `/metrics` reads exactly as with `prometheus_client.Counter` / `Histogram`.

Update them from one thread — the service's event loop. The scrape runs on the HTTP thread and only
reads; a scrape racing an observation can see a histogram's `_sum` one observation apart from its
buckets, never a bucket count going down.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # `le` buckets are inclusive: the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry | None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def describe(self) -> Iterator[Any]:
        return self._families(with_samples=False)

    def collect(self) -> Iterator[Any]:
        return self._families(with_samples=True)

    def _families(self, with_samples: bool) -> Iterator[Any]:
        raise NotImplementedError


class Counter(_Family):
    """`prometheus_client.Counter`'s exposition (`<name>_total`, `<name>_created`) without its lock."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), registry: CollectorRegistry | None = REGISTRY) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._children[()].inc(amount)

    def _families(self, with_samples: bool) -> Iterator[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for key, child in list(self._children.items()):
                family.add_metric(key, child.value, created=child.created)
        yield family


class Histogram(_Family):
    """`prometheus_client.Histogram`'s exposition (cumulative `le` buckets, `_count`, `_sum`) without
    its lock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and at least one must be finite")
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def _families(self, with_samples: bool) -> Iterator[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
            for key, child in list(self._children.items()):
                total, buckets = 0, []
                for edge, n in zip(edges, list(child.counts), strict=False):
                    total += n
                    buckets.append((edge, total))
                family.add_metric(key, buckets, child.sum)
        yield family
