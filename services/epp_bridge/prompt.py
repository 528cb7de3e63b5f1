"""Turn an OpenAI body into the prompt's token ids: `nvext.token_data`, prompt ids, or the pool's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from schemas import codec
from schemas.api import ErrorCode
from schemas.codec import SchemaError
from schemas.openai import OpenAiBody
from services.runtime.responder import ServiceError

from .tokenizer import PoolTokenizer, TemplateInputError

TokenSource = Literal["token_data", "prompt_ids", "tokenizer"]


@dataclass(frozen=True)
class PromptTokens:
    kind: Literal["chat", "completions"]
    token_ids: list[int]
    # Tokens the engine will prefill; larger than len(token_ids) only for a batch of prompts,
    # which is routed on its first prompt (the others rarely share its cache prefix anyway).
    isl_tokens: int
    source: TokenSource


def parse_body(body: dict[str, Any]) -> OpenAiBody:
    """Validate the routing-relevant part of the body; field paths are reported from `$.body`."""
    try:
        return codec.convert(body, OpenAiBody)
    except SchemaError as exc:
        path = "$.body" + (exc.path[1:] if exc.path and exc.path.startswith("$") else "")
        raise SchemaError(exc.message, path) from None


def needs_tokenizer(body: OpenAiBody) -> bool:
    """Whether the prompt is text (not `nvext.token_data` or token ids)."""
    if body.nvext is not None and body.nvext.token_data is not None:
        return False
    return not (isinstance(body.prompt, list) and not isinstance(body.prompt[0], str))


# A prompt list holds one kind of item (`OpenAiBody` refuses mixed lists), so its first item says
# what all are.
def _token_ids(prompt: list[Any]) -> TypeGuard[list[int]]:
    return isinstance(prompt[0], int)


def _token_id_lists(prompt: list[Any]) -> TypeGuard[list[list[int]]]:
    return isinstance(prompt[0], list)


def _check_size(tokens: list[int], isl: int, max_tokens: int, path: str) -> None:
    if not tokens:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "the prompt is empty (no tokens)", path)
    if isl > max_tokens:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"the prompt has {isl} tokens, more than the limit of {max_tokens}", path)


def prompt_tokens(raw: dict[str, Any] | None, body: OpenAiBody, tokenizer: PoolTokenizer | None, max_tokens: int) -> PromptTokens:
    """`raw` is the body as received (its message dicts go to the chat template unchanged); only a
    prompt that needs the tokenizer reads it."""
    kind: Literal["chat", "completions"] = "chat" if body.messages is not None else "completions"
    nvext = body.nvext
    if nvext is not None and nvext.token_data is not None:
        tokens = nvext.token_data
        _check_size(tokens, len(tokens), max_tokens, "$.body.nvext.token_data")
        return PromptTokens(kind, tokens, len(tokens), "token_data")

    prompt = body.prompt
    if isinstance(prompt, list) and _token_ids(prompt):
        _check_size(prompt, len(prompt), max_tokens, "$.body.prompt")
        return PromptTokens(kind, prompt, len(prompt), "prompt_ids")
    if isinstance(prompt, list) and _token_id_lists(prompt):
        total = sum(len(p) for p in prompt)
        _check_size(prompt[0], total, max_tokens, "$.body.prompt")
        return PromptTokens(kind, prompt[0], total, "prompt_ids")

    if tokenizer is None:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, "no tokenizer is configured for this pool; send token ids in nvext.token_data", "$.body"
        )
    if prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        if isinstance(prompt, str):
            tokens = tokenizer.encode_text(prompt, add_special)
            _check_size(tokens, len(tokens), max_tokens, "$.body.prompt")
            return PromptTokens(kind, tokens, len(tokens), "tokenizer")
        batch = tokenizer.encode_batch(prompt, add_special)  # type: ignore[arg-type]
        total = sum(len(t) for t in batch)
        _check_size(batch[0], total, max_tokens, "$.body.prompt")
        return PromptTokens(kind, batch[0], total, "tokenizer")

    extra = dict(body.chat_template_kwargs or {})
    if body.continue_final_message:
        extra.setdefault("continue_final_message", True)
    if raw is None:
        raise TypeError("a chat body needs the raw body for its template")
    try:
        tokens = tokenizer.encode_chat(
            raw["messages"],
            raw.get("tools"),
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            extra=extra,
            add_special_tokens=bool(body.add_special_tokens),
        )
    except TemplateInputError as exc:
        raise ServiceError(ErrorCode.INVALID_REQUEST, str(exc), "$.body.messages") from None
    _check_size(tokens, len(tokens), max_tokens, "$.body.messages")
    return PromptTokens(kind, tokens, len(tokens), "tokenizer")
