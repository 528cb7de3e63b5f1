"""Publisher restarts (docs/protocol.md §2): a new epoch in the Nats-Msg-Id, or a `cleared` going
back, starts a publisher's event ids over; the cursor of the old run no longer hides its events."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import cleared_event, kv_msg_epoch, kv_msg_id, stored_event
from services.indexer.index import PrefixIndex
from services.indexer.treecodec import decode_snapshot, encode_snapshot

from .model import ModelIndex
from .test_index_properties import OPS, build


def test_msg_ids_carry_the_epoch_and_old_ids_stay_readable():
    assert kv_msg_id("p", 7, 1, 42) == "p:7:1:42"  # no epoch: the first format
    assert kv_msg_id("p", 7, 1, 42, epoch=1764000000000) == "p:7:1:1764000000000:42"
    assert kv_msg_epoch("p:7:1:1764000000000:42") == 1764000000000
    for old in ("p:7:1:42", None, "", "garbage", "p:7:1:x:42", "p:7:1:99999999999999999999:1"):
        assert kv_msg_epoch(old) == 0


def test_a_restarted_publisher_is_applied_under_a_new_epoch():
    """Seed behaviour: ids from 1 again under the same worker were dropped as duplicates until they
    passed the old cursor (here: 500 events)."""
    index = PrefixIndex()
    for i in range(1, 501):
        index.apply(stored_event(1, i, [(i, 10_000 + i)]), epoch=100)
    assert index.apply(cleared_event(1, 1), epoch=200) == "ok"
    assert index.apply(stored_event(1, 2, [(9, 19)]), epoch=200) == "ok"
    assert index.find_matches([19]).scores == {(1, 0): 1} and index.find_matches([10_001]).scores == {}
    assert index.apply(stored_event(1, 2, [(9, 19)]), epoch=200) == "duplicate"  # within the run: as before
    assert index.restarts == 1 and index.epochs == {(1, 0): 200}


def test_a_publisher_without_epochs_restarts_with_a_cleared():
    index = PrefixIndex()
    for i in range(1, 50):
        index.apply(stored_event(1, i, [(i, 10_000 + i)]))
    assert index.apply(stored_event(1, 3, [(3, 3)])) == "duplicate"
    assert index.apply(cleared_event(1, 1)) == "ok"  # going back with a cleared: a new run
    assert index.apply(stored_event(1, 2, [(9, 19)])) == "ok"
    assert index.find_matches([19]).scores == {(1, 0): 1} and index.find_matches([10_001]).scores == {}


def test_epochs_survive_a_snapshot_and_a_worker_removal_forgets_them():
    index = PrefixIndex()
    index.apply(stored_event(1, 5, [(1, 11)]), epoch=300)
    index.apply(stored_event(2, 5, [(1, 11)]))
    restored = decode_snapshot(encode_snapshot(index, 9))[0]
    assert restored.epochs == {(1, 0): 300} and restored.cursors == index.cursors
    assert restored.apply(stored_event(1, 5, [(1, 11)]), epoch=300) == "duplicate"
    index.remove_worker(1)
    assert index.epochs == {} and (1, 0) not in index.cursors


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.lists(st.sampled_from([0, 0, 0, 7, 8]), min_size=40, max_size=40))
def test_outcomes_and_cursors_agree_with_the_model_under_changing_epochs(ops, epochs):
    index, model = PrefixIndex(), ModelIndex()
    for ev, epoch in zip(build(ops), epochs, strict=False):
        if isinstance(ev, tuple):
            index.remove_worker(ev[1])
            model.remove_worker(ev[1])
            continue
        assert index.apply(ev, epoch=epoch) == model.apply(ev, epoch)
    assert index.cursors == model.cursors
    assert index.epochs == {k: e for k, e in model.epochs.items() if e}
