"""The parts of OpenAI `/v1/completions` and `/v1/chat/completions` bodies the EPP bridge reads.

Only what routing needs is typed; every other field of the body (sampling parameters, `stream`, ...)
is ignored, so a real client body passes unchanged. `nvext` follows Dynamo's request extension
(`lib/llm/src/protocols/openai/nvext.rs`): pre-tokenized prompt, pinned worker, constraints, hints.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .api import EppQueryRequest, MultimodalList, OptStr, RoutingConstraints, TokenList
from .hashing import effective_salt
from .types import MAX_TOKENS, DpRank, NonNegInt, TokenId, WorkerId

MAX_MESSAGES = 65_536
MAX_TOOLS = 4_096

I32 = Annotated[int, Meta(ge=-(1 << 31), lt=1 << 31)]


class ContentPart(msgspec.Struct, omit_defaults=True):
    """One part of a multi-part chat message; only `text` parts contribute tokens to routing."""

    type: Annotated[str, Meta(min_length=1, max_length=64)]
    text: str | None = None


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str | Annotated[list[ContentPart], Meta(max_length=MAX_MESSAGES)] | None = None
    name: OptStr = None
    tool_call_id: OptStr = None
    tool_calls: list[dict[str, Any]] | None = None


class ToolFunction(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=1024)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(msgspec.Struct, omit_defaults=True):
    type: Annotated[str, Meta(min_length=1, max_length=64)] = "function"
    function: ToolFunction | None = None


class AgentHints(msgspec.Struct, omit_defaults=True):
    priority: I32 | None = None
    osl: NonNegInt | None = None
    latency_sensitivity: Annotated[float, Meta(ge=-1e6, le=1e6)] | None = None
    # Dynamo's admission tier (u32): a higher tier is always admitted from the queue first.
    strict_priority: Annotated[int, Meta(ge=0, lt=1 << 32)] | None = None


# Bounds of a per-request cost override: wide enough for any sensible tuning, narrow enough that one
# request cannot make its cost arithmetic meaningless.
OverrideWeight = Annotated[float, Meta(ge=0.0, le=100.0)]


class RouterConfigOverride(msgspec.Struct, omit_defaults=True):
    """Dynamo's per-request `router_config_override`: the cost weights for this request only.
    `overlap_score_weight` is Dynamo's older name of the credit (the new name wins). Dynamo's
    `assume_kv_reuse`, `track_prefill_tokens` and `shared_cache_multiplier` are accepted and not
    used (docs/epp_bridge.md, "Request fields")."""

    overlap_score_credit: OverrideWeight | None = None
    overlap_score_weight: OverrideWeight | None = None
    prefill_load_scale: OverrideWeight | None = None
    router_temperature: OverrideWeight | None = None


QUERY_INSTANCE_ID = "query_instance_id"


class NvExt(msgspec.Struct, omit_defaults=True):
    token_data: TokenList | None = None
    routing_constraints: RoutingConstraints | None = None
    backend_instance_id: WorkerId | None = None
    dp_rank: DpRank | None = None
    # Dynamo's pinned legs: `decode_worker_id` pins the decode (or aggregated) target like
    # `backend_instance_id`, `prefill_worker_id` / `prefill_dp_rank` the prefill target.
    decode_worker_id: WorkerId | None = None
    prefill_worker_id: WorkerId | None = None
    prefill_dp_rank: DpRank | None = None
    lora_name: OptStr = None
    cache_salt: OptStr = None
    expected_output_tokens: NonNegInt | None = None
    agent_hints: AgentHints | None = None
    # Dynamo's name for the cache salt: the same hash; given with `cache_salt`, it must be equal.
    cache_namespace: OptStr = None
    # The prompt's multimodal objects (token positions): they enter the hashes of their blocks.
    multimodal: MultimodalList | None = None
    # `["query_instance_id"]`: answer the chosen worker ids without booking (Dynamo's query).
    annotations: Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=64)] | None = None
    router_config_override: RouterConfigOverride | None = None
    # Dynamo: false = the router's state is kept by someone else (the EPP). Accepted; kvr's router
    # always keeps its own bookings, so it changes nothing here.
    enable_local_updates: bool | None = None

    def __post_init__(self) -> None:
        effective_salt(self.cache_salt, self.cache_namespace)  # both given: equal

    @property
    def query_instance_id(self) -> bool:
        """Whether the request only asks which workers would serve it (Dynamo's annotation, with
        or without a value: `query_instance_id` or `query_instance_id:<anything>`)."""
        return any(a == QUERY_INSTANCE_ID or a.startswith(QUERY_INSTANCE_ID + ":") for a in self.annotations or ())


# A completions prompt: a string, a batch of strings, token ids, or a batch of token-id lists.
PromptItem = str | TokenId | Annotated[list[TokenId], Meta(max_length=MAX_TOKENS)]
Prompt = str | Annotated[list[PromptItem], Meta(max_length=MAX_TOKENS)]


class OpenAiBody(msgspec.Struct, omit_defaults=True):
    """A completions body (`prompt`) or a chat body (`messages`); exactly one must be present."""

    model: OptStr = None
    prompt: Prompt | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[ToolDef], Meta(max_length=MAX_TOOLS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    cache_salt: OptStr = None  # vLLM accepts it at top level; nvext.cache_salt wins
    nvext: NvExt | None = None

    def __post_init__(self) -> None:
        if self.nvext is not None and not self.nvext.cache_salt:
            effective_salt(self.cache_salt, self.nvext.cache_namespace)
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('exactly one of "prompt" (completions) or "messages" (chat) must be given')
        if isinstance(self.prompt, list):
            kinds = {type(p) for p in self.prompt}
            if len(kinds) > 1:
                raise ValueError('"prompt" must be a string, a list of strings, a list of token ids or a list of token-id lists')
            if not self.prompt:
                raise ValueError('"prompt" must not be an empty list')


class EppQueryTyped(EppQueryRequest):
    """`epp.query` (`EppQueryRequest`) with its body decoded straight into `OpenAiBody`: one pass over
    a prompt's token list instead of a dict and then a conversion (≈ 7 µs of a 560-token query). The
    bridge decodes the body as a dict again only when a chat template needs the messages as sent."""

    # Narrows `body` for one decoding pass, which breaks substitutability on purpose: code that may
    # hold either type tests `isinstance(req.body, OpenAiBody)` (services/epp_bridge/app.py).
    body: OpenAiBody  # type: ignore[assignment]

