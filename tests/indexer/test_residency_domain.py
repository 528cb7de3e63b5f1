"""Dynamo's `residency_domain` (docs/protocol.md §2): only the worker's own cache is indexed."""

from __future__ import annotations

import msgspec
import pytest

from schemas import codec
from schemas.events import RouterEvent, cleared_event, stored_event
from services.indexer.index import PrefixIndex


def with_domain(ev: RouterEvent, domain: object) -> RouterEvent:
    raw = codec.to_builtins(ev)
    raw["residency_domain"] = domain
    return codec.decode(codec.encode_json(raw), RouterEvent)


@pytest.mark.parametrize("domain", ["cache_owner", "something_new", None])
def test_events_of_another_domain_are_counted_and_never_applied_as_the_workers(domain):
    """Seed behaviour: the field was dropped, so a `cache_owner` cleared wiped the worker's blocks."""
    index = PrefixIndex()
    assert index.apply(stored_event(1, 1, [(11, 101), (12, 102)])) == "ok"
    assert index.apply(with_domain(stored_event(1, 2, [(21, 201)]), domain)) == "other_domain"
    assert index.apply(with_domain(cleared_event(1, 3), domain)) == "other_domain"
    assert index.find_matches([101, 102]).scores == {(1, 0): 2}  # still the worker's two blocks
    assert index.find_matches([201]).scores == {}
    assert index.counters[("stored", "other_domain")] == 1 and index.counters[("cleared", "other_domain")] == 1
    # the publisher's ids went on: the next worker event is in sequence, not a gap
    assert index.apply(stored_event(1, 4, [(13, 103)], parent_hash=12)) == "ok"


def test_worker_domain_and_absent_domain_are_the_workers():
    index = PrefixIndex()
    assert index.apply(with_domain(stored_event(1, 1, [(11, 101)]), "worker")) == "ok"
    assert index.apply(with_domain(cleared_event(1, 2), "worker")) == "ok"
    assert index.find_matches([101]).scores == {}


def test_the_field_round_trips_and_is_omitted_when_absent():
    ev = with_domain(cleared_event(1, 1), "cache_owner")
    assert codec.decode(codec.encode_msgpack(ev), RouterEvent, codec.MSGPACK).residency_domain == "cache_owner"
    assert b"residency_domain" not in codec.encode_json(cleared_event(1, 1))
    with pytest.raises(codec.SchemaError):
        codec.decode(msgspec.json.encode({**codec.to_builtins(cleared_event(1, 1)), "residency_domain": 5}), RouterEvent)
