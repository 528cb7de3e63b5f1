"""Subject, stream and bucket names of docs/protocol.md §1, parameterised by prefix and names."""

from __future__ import annotations

from dataclasses import dataclass


def parse_id(token: str, limit: int) -> int | None:
    """A subject or key token as a number: canonical ASCII decimal (no sign, no leading zero, no
    other digits) up to `limit`; None otherwise, so one id has exactly one spelling."""
    if not token or len(token) > 20 or not token.isascii() or not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        return None
    value = int(token)
    return value if value <= limit else None


@dataclass(frozen=True)
class Names:
    prefix: str = "kvr"
    kv_stream: str = "KVR_KV"
    workers_bucket: str = "KVR_WORKERS"
    bookings_stream: str = "KVR_BOOKINGS"
    snapshots_bucket: str = "KVR_SNAPSHOTS"

    # streams / buckets
    def kv_subject(self, pool: str, worker_id: int, dp_rank: int) -> str:
        return f"{self.prefix}.{pool}.kv.{worker_id}.{dp_rank}"

    def kv_filter(self, pool: str = "*") -> str:
        return f"{self.prefix}.{pool}.kv.>"

    def kv_stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.*.kv.>"]

    def bookings_subject(self, pool: str, router_id: str) -> str:
        return f"{self.prefix}.{pool}.bookings.{router_id}"

    def bookings_filter(self, pool: str = "*") -> str:
        return f"{self.prefix}.{pool}.bookings.>"

    def bookings_stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.*.bookings.>"]

    def snapshot_object(self, pool: str) -> str:
        return f"{pool}.index"

    def load_subject(self, pool: str, worker_id: int | str = "*") -> str:
        return f"{self.prefix}.{pool}.load.{worker_id}"

    # request / reply endpoints
    def match(self, pool: str) -> str:
        return f"{self.prefix}.{pool}.indexer.match"

    def dump(self, pool: str) -> str:
        return f"{self.prefix}.{pool}.indexer.dump"

    def select(self, pool: str) -> str:
        return f"{self.prefix}.{pool}.scheduler.select"

    def booking(self, pool: str) -> str:
        """Extension: booking lifecycle (prefill_complete / free) handled by a scheduler replica."""
        return f"{self.prefix}.{pool}.scheduler.booking"

    def scheduler_state(self, pool: str) -> str:
        """Extension: a replica's load view. Not load-balanced: every replica answers."""
        return f"{self.prefix}.{pool}.scheduler.state"

    def epp_query(self, pool: str) -> str:
        return f"{self.prefix}.{pool}.epp.query"

    def epp_book(self, pool: str) -> str:
        """Extension: book a target chosen elsewhere (the split API, docs/protocol.md §5)."""
        return f"{self.prefix}.{pool}.epp.book"

    def epp_cleanup(self, pool: str) -> str:
        return f"{self.prefix}.{pool}.epp.cleanup"

    def generate(self, pool: str, worker_id: int) -> str:
        """Mock workers' generate endpoint."""
        return f"{self.prefix}.{pool}.worker.{worker_id}.generate"
