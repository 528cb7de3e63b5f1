"""From a parsed epp.query to a scheduler.select request, and from its reply to the epp.query reply."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.api import EppPod, EppQueryReply, EppQueryRequest, SelectReply, SelectRequest, Target
from schemas.hashing import local_block_hashes, salt_seed
from schemas.openai import OpenAiBody

from .prompt import PromptTokens

# Headers set on the forwarded request (docs/protocol.md §5; Dynamo frontend / GAIE names).
DESTINATION = "x-gateway-destination-endpoint"
WORKER_ID = "x-worker-instance-id"
DP_RANK = "x-dp-rank"
PREFILL_ID = "x-prefill-instance-id"
PREFILL_DP_RANK = "x-prefill-dp-rank"
PREFILLER_HOST_PORT = "x-prefiller-host-port"
ROUTING_MODE = "x-dynamo-routing-mode"


def select_request(
    req: EppQueryRequest, body: OpenAiBody, prompt: PromptTokens, allowed: list[int] | None, block_size: int | None = None
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
    cache_salt = (nvext.cache_salt if nvext and nvext.cache_salt else None) or body.cache_salt
    token_ids: list[int] | None = prompt.token_ids
    block_hashes = None
    if block_size:
        block_hashes = local_block_hashes(prompt.token_ids, block_size, salt_seed(lora_name, cache_salt))
        token_ids = None
    return SelectRequest(
        request_id=req.request_id,
        token_ids=token_ids,
        block_hashes=block_hashes,
        isl_tokens=prompt.isl_tokens,
        lora_name=lora_name,
        cache_salt=cache_salt,
        allowed_worker_ids=allowed,
        pinned_worker_id=nvext.backend_instance_id if nvext else None,
        pinned_dp_rank=nvext.dp_rank if nvext and nvext.backend_instance_id is not None else None,
        routing_constraints=nvext.routing_constraints if nvext else None,
        mode=req.mode,
        priority=(hints.priority or 0) if hints else 0,
        expected_output_tokens=expected,
        policy=req.policy,
        book=req.book,
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
