"""Request/reply messages of the service endpoints (docs/protocol.md §5) and the error envelope."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .bookings import BookingId
from .events import RouterEvent
from .hashing import effective_salt
from .types import (
    MAX_BLOCK_HASHES,
    MAX_TAINTS,
    MAX_TOKENS,
    MAX_WORKER_IDS,
    U64_MASK,
    BlockSize,
    DpRank,
    FiniteFloat,
    Hash,
    NonNegInt,
    RequestId,
    TokenId,
    WorkerId,
    to_u64,
)


# Services raise `ServiceError(ErrorCode.X, ...)`; the wire carries the values.
class ErrorCode(StrEnum):
    """Error code of an error reply (docs/protocol.md §5)."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    NO_WORKERS = "no_workers"
    CONSTRAINTS_UNSATISFIED = "constraints_unsatisfied"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


ERROR_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.NO_WORKERS: 503,
    ErrorCode.CONSTRAINTS_UNSATISFIED: 503,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}

Mode = Literal["auto", "aggregated", "disaggregated"]


# The one list of policy names: settings, CLIs and the selector's dispatch table derive from it.
class Policy(StrEnum):
    """How the target is chosen among the eligible ones: `kv` by the cost rule (docs/protocol.md §7),
    the others are A/B baselines."""

    KV = "kv"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_LOADED = "least_loaded"


POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)
TokenList = Annotated[list[TokenId], Meta(max_length=MAX_TOKENS)]
HashList = Annotated[list[Hash], Meta(max_length=MAX_BLOCK_HASHES)]
OptStr = Annotated[str, Meta(max_length=1024)] | None
# One routing target, `[worker_id, dp_rank]` on the wire.
TargetRef = tuple[WorkerId, DpRank]
MAX_FALLBACKS = 16


MAX_MM_OBJECTS = 4_096
TokenPos = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]


class MultimodalObject(msgspec.Struct, omit_defaults=True):
    """A multimodal object (image, audio, ...) of a prompt: its u64 hash and the token positions
    [offset, offset + length) its placeholders take (docs/protocol.md §6)."""

    mm_hash: Hash
    offset: TokenPos
    length: TokenPos

    def __post_init__(self) -> None:
        if not 0 <= self.mm_hash <= U64_MASK:
            self.mm_hash = to_u64(self.mm_hash)


MultimodalList = Annotated[list[MultimodalObject], Meta(max_length=MAX_MM_OBJECTS)]


def mm_objects(multimodal: list[MultimodalObject] | None) -> list[tuple[int, int, int]] | None:
    """The `schemas.hashing` form of a request's multimodal objects."""
    return [(o.mm_hash, o.offset, o.length) for o in multimodal] if multimodal else None


def _normalize_hashes(hashes: list[int] | None) -> None:
    # min/max run in C; the per-element rewrite only when some hash is out of the u64 range
    if hashes and (min(hashes) < 0 or max(hashes) > U64_MASK):
        for i, h in enumerate(hashes):
            if not 0 <= h <= U64_MASK:
                hashes[i] = to_u64(h)


# --- error envelope -------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: ErrorCode
    message: str
    path: str | None = None
    # Extension: seconds after which a retry may succeed (an `overloaded` answer of the admission
    # queue; HTTP `Retry-After`).
    retry_after_s: Annotated[float, Meta(ge=0, le=86400)] | None = None


class ErrorReply(msgspec.Struct):
    error: ErrorBody
    status: Literal["error"] = "error"


# --- indexer --------------------------------------------------------------------------------


class MatchRequest(msgspec.Struct, omit_defaults=True):
    block_hashes: HashList | None = None
    token_ids: TokenList | None = None
    lora_name: OptStr = None
    cache_salt: OptStr = None
    early_exit: bool = False
    # Dynamo's name for the cache salt (the same hash); with `token_ids` only, as the salt.
    cache_namespace: OptStr = None
    multimodal: MultimodalList | None = None  # with `token_ids` only

    def __post_init__(self) -> None:
        if (self.block_hashes is None) == (self.token_ids is None):
            raise ValueError('exactly one of "block_hashes" or "token_ids" must be given')
        effective_salt(self.cache_salt, self.cache_namespace)  # both given: equal
        _normalize_hashes(self.block_hashes)


class WorkerScore(msgspec.Struct, array_like=False):
    worker_id: WorkerId
    dp_rank: DpRank
    blocks: NonNegInt


class MatchReply(msgspec.Struct, omit_defaults=False):
    block_size: BlockSize
    scores: list[WorkerScore]
    tier_scores: dict[str, list[WorkerScore]]
    tree_sizes: list[WorkerScore]
    stream_seq: NonNegInt
    status: Literal["ok"] = "ok"


class DumpRequest(msgspec.Struct):
    pass


class DumpReply(msgspec.Struct):
    stream_seq: NonNegInt
    events: list[RouterEvent]
    status: Literal["ok"] = "ok"


# --- scheduler ------------------------------------------------------------------------------


TaintName = Annotated[str, Meta(min_length=1, max_length=253)]
# A preferred taint's weight: Dynamo's multiplier is exp(−tanh(Σ weights)), so one weight is a
# bias in (−1, 1); a larger one would saturate tanh and hide the others.
TaintWeight = Annotated[float, Meta(gt=-1.0, lt=1.0)]


class RoutingConstraints(msgspec.Struct, omit_defaults=True):
    """Dynamo's `RoutingConstraints`, validated as Dynamo validates them: taints non-empty and
    already trimmed (an untrimmed taint would silently match nothing), required taints not
    duplicated, preferred weights in (−1, 1)."""

    required_taints: Annotated[list[TaintName], Meta(max_length=MAX_TAINTS)] = []
    preferred_taints: Annotated[dict[TaintName, TaintWeight], Meta(max_length=MAX_TAINTS)] = {}

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, taint in enumerate(self.required_taints):
            if taint != taint.strip():
                raise ValueError(f"required_taints[{i}] {taint!r} has leading or trailing whitespace (taints must be trimmed)")
            if taint in seen:
                raise ValueError(f"required_taints[{i}] {taint!r} is a duplicate")
            seen.add(taint)
        for taint in self.preferred_taints:
            if taint != taint.strip():
                raise ValueError(f"preferred_taints key {taint!r} has leading or trailing whitespace (taints must be trimmed)")


class Overrides(msgspec.Struct, omit_defaults=True):
    overlap_score_credit: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    prefill_load_scale: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    host_cache_hit_weight: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    disk_cache_hit_weight: Annotated[float, Meta(ge=0, le=1e6)] | None = None


class SelectRequest(msgspec.Struct, omit_defaults=True):
    request_id: RequestId
    token_ids: TokenList | None = None
    block_hashes: HashList | None = None
    isl_tokens: NonNegInt | None = None
    lora_name: OptStr = None
    cache_salt: OptStr = None
    allowed_worker_ids: Annotated[list[WorkerId], Meta(max_length=MAX_WORKER_IDS)] | None = None
    # Extension: restrict to these (worker, dp_rank) targets (the gateway's endpoint subset names ranks).
    allowed_targets: Annotated[list[TargetRef], Meta(max_length=MAX_WORKER_IDS)] | None = None
    pinned_worker_id: WorkerId | None = None
    pinned_dp_rank: DpRank | None = None
    # Extension: pin the prefill leg (Dynamo's `prefill_worker_id` / `prefill_dp_rank`); implies disaggregated.
    pinned_prefill_worker_id: WorkerId | None = None
    pinned_prefill_dp_rank: DpRank | None = None
    routing_constraints: RoutingConstraints | None = None
    mode: Mode = "auto"
    # Dynamo's `agent_hints.priority` (the admission queue's priority jump; negatives count as 0)
    # and `agent_hints.strict_priority` (a tier: a higher tier is always admitted first).
    priority: Annotated[int, Meta(ge=-(1 << 31), lt=1 << 31)] = 0
    strict_priority: Annotated[int, Meta(ge=0, lt=1 << 32)] = 0
    expected_output_tokens: NonNegInt | None = None
    overrides: Overrides | None = None
    policy: Policy | None = None
    book: bool = True
    # Extension: how many next-best decode targets to return in `SelectReply.fallbacks`.
    fallbacks: Annotated[int, Meta(ge=0, le=MAX_FALLBACKS)] = 0
    # This select's booking attempt (a retry of the same attempt reuses it); generated when absent.
    booking_id: BookingId | None = None
    # Dynamo's name for the cache salt (the same hash); hashes `token_ids`, as `multimodal` does.
    cache_namespace: OptStr = None
    multimodal: MultimodalList | None = None
    # Extension: how long a booking select may wait in the admission queue when every eligible
    # target is busy (None = the scheduler's --queue-timeout-s; 0 = answer `overloaded` at once).
    queue_timeout_ms: Annotated[int, Meta(ge=0, le=60_000)] | None = None

    def __post_init__(self) -> None:
        if self.token_ids is None and self.block_hashes is None:
            raise ValueError('one of "token_ids" or "block_hashes" must be given')
        effective_salt(self.cache_salt, self.cache_namespace)  # both given: equal
        _normalize_hashes(self.block_hashes)


class Target(msgspec.Struct):
    worker_id: WorkerId
    dp_rank: DpRank
    pod_name: str | None = None
    endpoint: str | None = None


class SelectReply(msgspec.Struct):
    decode: Target
    prefill: Target | None
    overlap_blocks: NonNegInt
    isl_tokens: NonNegInt
    block_size: BlockSize
    cost: FiniteFloat
    status: Literal["ok"] = "ok"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    policy: str = "kv"
    # Next-best decode targets, best first (as many as `SelectRequest.fallbacks` asked and exist).
    fallbacks: list[Target] = []
    request_id: str = ""
    booking_id: str = ""  # the booking that holds the request ("" = nothing booked)


class StateRequest(msgspec.Struct):
    """Extension (docs/protocol.md §5): ask a scheduler replica for its load view."""


class WorkerLoad(msgspec.Struct):
    worker_id: WorkerId
    dp_rank: DpRank
    active_prefill_tokens: NonNegInt
    active_blocks: NonNegInt
    active_requests: NonNegInt


class StateReply(msgspec.Struct):
    router_id: str
    stream_seq: NonNegInt
    loads: list[WorkerLoad]
    bookings: list[str]
    workers: list[WorkerId]
    status: Literal["ok"] = "ok"
    # Fingerprint of the whole load view (every leg, its tokens, blocks and expiry) on live workers;
    # equal digests = replicas converged.
    digest: str = ""


# --- EPP bridge -----------------------------------------------------------------------------


class EppPod(msgspec.Struct, omit_defaults=True):
    """A candidate endpoint from the gateway; GAIE and Dynamo shapes are both accepted."""

    name: str | None = None
    address: str | None = None
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    labels: dict[str, str] = {}
    podName: str | None = None  # Dynamo's shape
    pod: dict[str, Any] | None = None

    @property
    def pod_name(self) -> str | None:
        if self.name:
            return self.name
        if self.podName:
            return self.podName
        name = self.pod.get("podName") if self.pod else None
        return name if isinstance(name, str) else None

    @property
    def endpoint(self) -> str | None:
        address, port = self.address, self.port
        if self.pod:
            address = address or self.pod.get("address")
            port = port if port is not None else self.pod.get("port")
        if address and port is not None:
            return f"{address}:{port}"
        return None


class EppQueryRequest(msgspec.Struct, omit_defaults=True):
    request_id: RequestId
    body: dict[str, Any]
    headers: dict[str, str] = {}
    pods: Annotated[list[EppPod], Meta(max_length=MAX_WORKER_IDS)] | None = None
    mode: Mode = "auto"
    # Whether the answer is booked (the final pick, GAIE's ext_proc path); false = read-only, as
    # Dynamo's query. Default true, as before the split API (docs/protocol.md §5, "epp.book").
    book: bool = True
    return_token_ids: bool = False
    policy: Policy | None = None


class EppQueryReply(msgspec.Struct):
    request_id: str
    decode: Target
    prefill: Target | None
    overlap_blocks: NonNegInt
    isl_tokens: NonNegInt
    block_size: BlockSize
    cost: FiniteFloat
    headers: dict[str, str]
    token_ids: list[TokenId] | None = None
    status: Literal["ok"] = "ok"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    # Extension: the booking that holds the request ("" = nothing booked: `book: false`, the
    # `query_instance_id` annotation, or a booking cancelled before it landed).
    booking_id: str = ""


class EppBookTarget(msgspec.Struct, omit_defaults=True):
    worker_id: WorkerId
    dp_rank: DpRank = 0


class EppBookRequest(msgspec.Struct, omit_defaults=True):
    """Extension (`kvr.{pool}.epp.book`): book a target chosen elsewhere (a plugin chain that scored
    with `book: false` and picked), under `request_id`. The body is the same OpenAI request as for
    epp.query (the booking needs its blocks); the targets go through the same eligibility checks
    as a query's (pods, label filter, liveness, role, taints, busy), each failure a structured
    error that books nothing. With `prefill` the booking is disaggregated, else aggregated."""

    request_id: RequestId
    body: dict[str, Any]
    decode: EppBookTarget
    prefill: EppBookTarget | None = None
    headers: dict[str, str] = {}
    pods: Annotated[list[EppPod], Meta(max_length=MAX_WORKER_IDS)] | None = None
    return_token_ids: bool = False
    booking_id: BookingId | None = None


class CleanupRequest(msgspec.Struct, omit_defaults=True):
    """`prefill_complete` / `free` a booking, or `move` its decode leg to the target that really
    served the request (a gateway retried on a fallback endpoint); `move` needs `worker_id`."""

    request_id: RequestId
    phase: Literal["prefill_complete", "free", "move"]
    worker_id: WorkerId | None = None
    dp_rank: DpRank | None = None
    # Only this booking of the request id. A `free` of a booking not (yet) made cancels it: a
    # select that books it later (its caller gave up) books nothing.
    booking_id: BookingId | None = None

    def __post_init__(self) -> None:
        if self.phase == "move" and self.worker_id is None:
            raise ValueError('phase "move" needs "worker_id" (and "dp_rank", default 0)')


class CleanupReply(msgspec.Struct):
    request_id: str
    known: bool
    status: Literal["ok"] = "ok"

