"""From a request to route (epp.query or ext_proc) to a scheduler.select request, and from its reply to
the routing headers and the epp.query reply."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.api import (
    EppPod,
    EppQueryReply,
    EppQueryRequest,
    SelectReply,
    SelectRequest,
    Target,
    mm_objects,
)
from schemas.hashing import effective_salt, local_block_hashes, salt_seed
from schemas.openai import OpenAiBody

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


@dataclass
class Routed:
    reply: SelectReply
    prompt: PromptTokens


# Headers set on the forwarded request (docs/protocol.md §5; Dynamo frontend / GAIE names).
DESTINATION = "x-gateway-destination-endpoint"
WORKER_ID = "x-worker-instance-id"
DP_RANK = "x-dp-rank"
PREFILL_ID = "x-prefill-instance-id"
PREFILL_DP_RANK = "x-prefill-dp-rank"
PREFILLER_HOST_PORT = "x-prefiller-host-port"
ROUTING_MODE = "x-dynamo-routing-mode"


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
        pinned_worker_id=nvext.backend_instance_id if nvext else None,
        pinned_dp_rank=nvext.dp_rank if nvext and nvext.backend_instance_id is not None else None,
        routing_constraints=nvext.routing_constraints if nvext else None,
        mode=req.mode,  # type: ignore[arg-type]
        priority=(hints.priority or 0) if hints else 0,
        expected_output_tokens=expected,
        policy=req.policy,  # type: ignore[arg-type]
        book=req.book,
        fallbacks=fallbacks,
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


def query_reply(req: EppQueryRequest, reply: SelectReply, prompt: PromptTokens) -> EppQueryReply:
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
    )
