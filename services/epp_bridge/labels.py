"""Per-pool worker-label filter: which discovered workers a pool's requests may use at all.

Semantics follow the endpoint picker's label filter: a worker passes a filter when its label `key`
has one of the valid values; a worker without the label passes only when the filter allows a missing
label. A missing label never matches a valid value, not even the empty string. Several filters of one
pool must all pass. Applied on both entry points (NATS `epp.query` and ext_proc) before the scheduler
is asked, through the pod index.

Setting syntax (`--epp-label-filter`, repeatable): `[pool:]key=value1|value2`; `key?=...` lets
workers without the label pass. Without `pool:` the filter applies to every pool.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_ENTRY = re.compile(r"^(?:(?P<pool>[A-Za-z0-9_-]{1,64}):)?(?P<key>[^=?:|\s]+)(?P<optional>\?)?=(?P<values>.*)$")


@dataclass(frozen=True)
class LabelFilter:
    key: str
    values: frozenset[str]
    allow_missing: bool = False

    def passes(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if value is None:
            return self.allow_missing
        return value in self.values


def passes_all(filters: Sequence[LabelFilter], labels: Mapping[str, str]) -> bool:
    return all(f.passes(labels) for f in filters)


def parse_label_filters(entries: Sequence[str], pools: Sequence[str]) -> dict[str, list[LabelFilter]]:
    """`[pool:]key[?]=v1|v2` entries → filters per pool; raises ValueError on a malformed entry."""
    out: dict[str, list[LabelFilter]] = {}
    for entry in entries:
        m = _ENTRY.match(entry.strip())
        if m is None:
            raise ValueError(
                f"bad --epp-label-filter entry {entry!r} (want [pool:]key=value1|value2, or key?=... to let workers without the label pass)"
            )
        values = frozenset(m.group("values").split("|"))
        f = LabelFilter(m.group("key"), values, m.group("optional") is not None)
        for pool in [m.group("pool")] if m.group("pool") else pools:
            out.setdefault(pool, []).append(f)
    return out
