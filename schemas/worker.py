"""Mock workers' generate endpoint `kvr.{pool}.worker.{worker_id}.generate` (extension, docs/protocol.md §5).

The requester publishes a `GenerateRequest` with a reply inbox; the worker streams to that inbox a
`first_token` message when the first output token exists, then a `done` message with its own
accounting (or an error envelope `{"status": "error", ...}` instead of either).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .types import MAX_TOKENS, DpRank, FiniteFloat, NonNegInt, RequestId, TokenId, WorkerId

OptStr = Annotated[str, Meta(max_length=1024)] | None


class GenerateRequest(msgspec.Struct, omit_defaults=True):
    request_id: RequestId
    token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_TOKENS)]
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 16
    dp_rank: DpRank = 0
    lora_name: OptStr = None
    cache_salt: OptStr = None


class GenerateFirstToken(msgspec.Struct, tag_field="type", tag="first_token", kw_only=True):
    request_id: str
    worker_id: WorkerId
    dp_rank: DpRank = 0
    # simulated milliseconds (already multiplied back by the worker's speed-up)
    queue_ms: FiniteFloat = 0.0
    ttft_ms: FiniteFloat = 0.0
    status: Literal["ok"] = "ok"


class GenerateDone(msgspec.Struct, tag_field="type", tag="done", kw_only=True):
    request_id: str
    worker_id: WorkerId
    dp_rank: DpRank = 0
    prompt_tokens: NonNegInt
    cached_tokens: NonNegInt
    output_tokens: NonNegInt
    ttft_ms: FiniteFloat
    e2e_ms: FiniteFloat
    preemptions: NonNegInt = 0
    status: Literal["ok"] = "ok"


GenerateProgress = GenerateFirstToken | GenerateDone
