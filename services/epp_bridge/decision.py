"""From a request to route (epp.query or ext_proc) to a scheduler.select request, and from its reply to
the routing headers and the epp.query reply."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgspec

from schemas.api import (
    EppBookRequest,
    EppPod,
    EppQueryReply,
    EppQueryRequest,
    ErrorCode,
    Overrides,
    SelectReply,
    SelectRequest,
    Target,
    mm_objects,
)
from schemas.hashing import effective_salt, local_block_hashes, salt_seed
from schemas.openai import NvExt, OpenAiBody
from schemas.types import MAX_WORKER_ID
from services.runtime.responder import ServiceError

from .prompt import PromptTokens

NO_PROMPT = PromptTokens("completions", [], 0, "token_data")


@dataclass
class RouteAsk:
    """One request to route, from either entry point."""

    request_id: str
    # None: a request without a body (least loaded worker, not booked).
    body: OpenAiBody | None
    # The body as sent (a dict), read only when a chat template needs the messages.
    raw: Callable[[], dict[str, Any]] | None = None
    # epp.query: the gateway's candidate pods (names or addresses).
    pods: Sequence[EppPod] | None = None
    # ext_proc: the subset hint's `ip:port` endpoints; None = no hint.
    endpoints: Sequence[str] | None = None
    mode: str = "auto"
    book: bool = True
    policy: str | None = None
    fallbacks: int = 0
    # The booking's name, when the caller must be able to free it without a reply (ext_proc).
    booking_id: str = ""
    # The gateway's request headers (lower-case names): `x-worker-instance-id`, `x-dp-rank`,
    # `x-prefill-instance-id`, `x-prefill-dp-rank` pin legs (they win over nvext).
    headers: Mapping[str, str] = field(default_factory=dict)
    # epp.book: the targets chosen elsewhere (they win over headers and nvext).
    pins: Pins | None = None


@dataclass
class Routed:
    reply: SelectReply
    prompt: PromptTokens
    # `nvext.annotations: ["query_instance_id"]`: the answer names the workers, nothing was booked.
    query_only: bool = False


# Headers set on the forwarded request (docs/protocol.md §5; Dynamo frontend / GAIE names).
DESTINATION = "x-gateway-destination-endpoint"
WORKER_ID = "x-worker-instance-id"
DP_RANK = "x-dp-rank"
PREFILL_ID = "x-prefill-instance-id"
PREFILL_DP_RANK = "x-prefill-dp-rank"
PREFILLER_HOST_PORT = "x-prefiller-host-port"
ROUTING_MODE = "x-dynamo-routing-mode"


ALT_DP_RANK = "x-data-parallel-rank"  # Dynamo's alias of x-dp-rank
# Dynamo's "unset" value of x-prefill-dp-rank (u32::MAX).
UNSET_RANK = (1 << 32) - 1
MAX_DP_RANK = 65535


class Pins(NamedTuple):
    """Pinned legs of a request: the decode (or aggregated) target and the prefill target."""

    worker_id: int | None = None
    dp_rank: int | None = None
    prefill_worker_id: int | None = None
    prefill_dp_rank: int | None = None


def _header_int(headers: Mapping[str, str], name: str, limit: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isascii() or not text.isdigit():
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"header {name} must be a non-negative integer, got {raw[:64]!r}", f"$.headers.{name}")
    value = int(text)
    if name == PREFILL_DP_RANK and value == UNSET_RANK:
        return None
    if value > limit:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"header {name} is {value}, over the limit {limit}", f"$.headers.{name}")
    return value


def request_pins(headers: Mapping[str, str], nvext: NvExt | None) -> Pins:
    """Pins from the request, as Dynamo's frontend maps them, headers winning over nvext:
    `x-worker-instance-id` → decode worker (else `nvext.decode_worker_id`, else
    `backend_instance_id`), `x-dp-rank` (alias `x-data-parallel-rank`) → its rank (else
    `nvext.dp_rank`), `x-prefill-instance-id` → prefill worker (else `nvext.prefill_worker_id`),
    `x-prefill-dp-rank` → its rank (else `nvext.prefill_dp_rank`). A rank counts only with its
    worker. Header names are matched lower-case; a malformed value is `invalid_request`."""
    h = {k.lower(): v for k, v in headers.items()} if any(k != k.lower() for k in headers) else headers
    worker = _header_int(h, WORKER_ID, MAX_WORKER_ID)
    rank = _header_int(h, DP_RANK, MAX_DP_RANK)
    if rank is None:
        rank = _header_int(h, ALT_DP_RANK, MAX_DP_RANK)
    prefill = _header_int(h, PREFILL_ID, MAX_WORKER_ID)
    prefill_rank = _header_int(h, PREFILL_DP_RANK, MAX_DP_RANK)
    if nvext is not None:
        if worker is None:
            worker = nvext.decode_worker_id if nvext.decode_worker_id is not None else nvext.backend_instance_id
        if rank is None:
            rank = nvext.dp_rank
        if prefill is None:
            prefill = nvext.prefill_worker_id
        if prefill_rank is None:
            prefill_rank = nvext.prefill_dp_rank
    return Pins(worker, rank if worker is not None else None, prefill, prefill_rank if prefill is not None else None)


def overrides_of(nvext: NvExt | None) -> Overrides | None:
    """`nvext.router_config_override` as the select request's cost overrides (None when absent)."""
    o = nvext.router_config_override if nvext is not None else None
    if o is None:
        return None
    credit = o.overlap_score_credit if o.overlap_score_credit is not None else o.overlap_score_weight
    if credit is None and o.prefill_load_scale is None and o.router_temperature is None:
        return None
    return Overrides(overlap_score_credit=credit, prefill_load_scale=o.prefill_load_scale, temperature=o.router_temperature)


class RouteRequest(Protocol):
    """What both entry points know about a request besides its body (`EppQueryRequest` is one)."""

    request_id: str
    mode: str
    book: bool
    policy: str | None


def select_request(
    req: RouteRequest,
    body: OpenAiBody,
    prompt: PromptTokens,
    allowed: list[int] | None,
    block_size: int | None = None,
    *,
    allowed_targets: list[tuple[int, int]] | None = None,
    fallbacks: int = 0,
    pins: Pins | None = None,
    book: bool | None = None,
) -> SelectRequest:
    """With the pool's `block_size` known, the prompt goes as its local block hashes (docs/protocol.md §5
    allows either): a few dozen integers for the scheduler to decode instead of every token id, and
    the hashing it would do anyway done here."""
    nvext = body.nvext
    hints = nvext.agent_hints if nvext else None
    expected = None
    if nvext is not None:
        expected = nvext.expected_output_tokens
        if expected is None and hints is not None:
            expected = hints.osl
    lora_name = nvext.lora_name if nvext else None
    # The body's salt under either name (equal when both are given: checked when the body was decoded).
    cache_salt = effective_salt(
        (nvext.cache_salt if nvext and nvext.cache_salt else None) or body.cache_salt, nvext.cache_namespace if nvext else None
    )
    multimodal = nvext.multimodal if nvext and nvext.multimodal else None
    token_ids: list[int] | None = prompt.token_ids
    block_hashes = None
    if block_size:
        block_hashes = local_block_hashes(prompt.token_ids, block_size, salt_seed(lora_name, cache_salt), mm_objects(multimodal))
        token_ids = None
        multimodal = None  # in the hashes
    if pins is None:
        pins = request_pins(getattr(req, "headers", None) or {}, nvext)
    mode = req.mode
    return SelectRequest(
        request_id=req.request_id,
        token_ids=token_ids,
        block_hashes=block_hashes,
        isl_tokens=prompt.isl_tokens,
        lora_name=lora_name,
        cache_salt=cache_salt,
        multimodal=multimodal,
        allowed_worker_ids=allowed,
        allowed_targets=allowed_targets,
        pinned_worker_id=pins.worker_id,
        pinned_dp_rank=pins.dp_rank,
        pinned_prefill_worker_id=pins.prefill_worker_id,
        pinned_prefill_dp_rank=pins.prefill_dp_rank,
        routing_constraints=nvext.routing_constraints if nvext else None,
        mode=mode,  # type: ignore[arg-type]
        priority=(hints.priority or 0) if hints else 0,
        strict_priority=(hints.strict_priority or 0) if hints else 0,
        expected_output_tokens=expected,
        overrides=overrides_of(nvext),
        policy=req.policy,  # type: ignore[arg-type]
        book=book if book is not None else req.book,
        fallbacks=fallbacks,
    )


def with_offered(reply: SelectReply, offered: Mapping[tuple[int, int], str]) -> SelectReply:
    """The reply with each target's endpoint replaced by the one the gateway offered for it, so the
    destination headers only ever name endpoints the gateway offered (pods.py)."""
    if not offered:
        return reply

    def fix(t: Target) -> Target:
        endpoint = offered.get((t.worker_id, t.dp_rank))
        return t if endpoint is None or endpoint == t.endpoint else msgspec.structs.replace(t, endpoint=endpoint)

    return msgspec.structs.replace(
        reply,
        decode=fix(reply.decode),
        prefill=fix(reply.prefill) if reply.prefill is not None else None,
        fallbacks=[fix(f) for f in reply.fallbacks],
    )


def _pod_endpoint(target: Target, pods: Sequence[EppPod] | None) -> str | None:
    """The gateway's own address for the target's pod, when discovery has none."""
    if not pods or not target.pod_name:
        return None
    for pod in pods:
        if pod.pod_name == target.pod_name and pod.endpoint:
            return pod.endpoint
    return None


def routing_headers(reply: SelectReply, pods: Sequence[EppPod] | None) -> dict[str, str]:
    decode = reply.decode
    headers: dict[str, str] = {}
    endpoint = decode.endpoint or _pod_endpoint(decode, pods)
    if endpoint:
        headers[DESTINATION] = endpoint
    headers[WORKER_ID] = str(decode.worker_id)
    headers[DP_RANK] = str(decode.dp_rank)
    prefill = reply.prefill
    if prefill is not None:
        headers[PREFILL_ID] = str(prefill.worker_id)
        headers[PREFILL_DP_RANK] = str(prefill.dp_rank)
        prefill_endpoint = prefill.endpoint or _pod_endpoint(prefill, pods)
        if prefill_endpoint:
            headers[PREFILLER_HOST_PORT] = prefill_endpoint
        headers[ROUTING_MODE] = "disaggregated"
    else:
        headers[ROUTING_MODE] = "aggregated"
    return headers


def destination(reply: SelectReply, pods: Sequence[EppPod] | None = None) -> list[str]:
    """`x-gateway-destination-endpoint` as a list: the decode target, then its fallbacks (GAIE's
    endpoint picker protocol: the proxy tries them in order when retries are configured)."""
    out: list[str] = []
    for target in (reply.decode, *reply.fallbacks):
        endpoint = target.endpoint or _pod_endpoint(target, pods)
        if endpoint and endpoint not in out:
            out.append(endpoint)
    return out


def query_reply(req: EppQueryRequest | EppBookRequest, reply: SelectReply, prompt: PromptTokens) -> EppQueryReply:
    return EppQueryReply(
        request_id=req.request_id,
        decode=reply.decode,
        prefill=reply.prefill,
        overlap_blocks=reply.overlap_blocks,
        isl_tokens=reply.isl_tokens,
        block_size=reply.block_size,
        cost=reply.cost,
        headers=routing_headers(reply, req.pods),
        token_ids=prompt.token_ids if req.return_token_ids else None,
        mode="disaggregated" if reply.prefill is not None else reply.mode,
        booking_id=reply.booking_id,
    )
