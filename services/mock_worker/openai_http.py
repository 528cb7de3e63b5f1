"""The OpenAI-compatible HTTP front of one simulated worker: `/v1/completions`, `/v1/chat/completions`.

What a gateway forwards to (the address:port of the worker's discovery record). The prompt becomes
token ids the way the EPP bridge computes them (`services/epp_bridge/prompt.py`: `nvext.token_data`,
prompt ids, or the configured tokenizer and its chat template), so the prefix the router scores is
the prefix this engine caches. The request then runs on the worker's simulated engine like a NATS
generate request; the answer is an OpenAI-shaped completion whose `usage` comes from the engine's
own accounting (`prompt_tokens_details.cached_tokens` = the prefix-cache hit) and whose text is the
engine's stand-in output ids shown as words of a small fixed vocabulary (one word per token: visibly
simulated, and never the arbitrary words that decoding random ids of a real vocabulary gives).
`"stream": true` answers with server-sent events, a chunk per engine pass that produced tokens, as
vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from schemas.api import ErrorCode, mm_objects
from schemas.codec import SchemaError
from schemas.hashing import effective_salt
from services.epp_bridge.prompt import parse_body, prompt_tokens
from services.runtime.http import bound_port
from services.runtime.responder import ServiceError

from .engine import Finished, Rejected, output_token_ids

if TYPE_CHECKING:
    from services.epp_bridge.tokenizer import PoolTokenizer

    from .app import MockWorker

WORKER_HEADER = "x-worker-instance-id"
DEFAULT_MAX_TOKENS = 16
MAX_PROMPT_TOKENS = 1 << 20  # the engine rejects what it can never admit; this only bounds the work
OUTPUT_WORDS = (
    "simulated", "tokens", "from", "a", "mock", "worker", "the", "router", "picked", "this", "engine", "for",
    "its", "cached", "prefix", "and", "load", "each", "word", "is", "one", "output", "token", "of", "kvr",
)


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def requested_max_tokens(raw: dict[str, Any]) -> int:
    value = raw.get("max_completion_tokens", raw.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "max_tokens must be an integer >= 1", "$.max_tokens")
    return value


class OpenAiFront:
    """One aiohttp server per worker (each worker is its own endpoint, as a vLLM pod is)."""

    def __init__(self, worker: MockWorker, tokenizer: PoolTokenizer | None) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = bound_port(site, port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def model(self) -> str:
        return self.worker.fleet.model

    async def _models(self, _req: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "kvr-mock"}]})

    async def _chat(self, req: web.Request) -> web.StreamResponse:
        return await self._serve(req, chat=True)

    async def _completions(self, req: web.Request) -> web.StreamResponse:
        return await self._serve(req, chat=False)

    @staticmethod
    def _text(ids: list[int]) -> str:
        return "".join(" " + OUTPUT_WORDS[i % len(OUTPUT_WORDS)] for i in ids)

    async def _serve(self, req: web.Request, chat: bool) -> web.StreamResponse:
        try:
            raw = json.loads(await req.read())
        except ValueError as exc:
            return error_response(400, f"the body is not JSON: {exc}")
        if not isinstance(raw, dict):
            return error_response(400, "the body must be a JSON object")
        if chat != ("messages" in raw):
            want = '"messages" (chat)' if chat else '"prompt" (completions)'
            return error_response(400, f"this endpoint takes {want}", "messages" if chat else "prompt")
        try:
            body = parse_body(raw)
            prompt = prompt_tokens(raw, body, self.tokenizer, MAX_PROMPT_TOKENS)
            max_tokens = requested_max_tokens(raw)
        except SchemaError as exc:
            return error_response(400, exc.message, exc.path)
        except ServiceError as exc:
            return error_response(400, exc.message, exc.path)
        nvext = body.nvext
        lora = nvext.lora_name if nvext is not None else None
        salt = effective_salt(  # either name of the salt (equal when both: checked at decode)
            (nvext.cache_salt if nvext is not None else None) or body.cache_salt, nvext.cache_namespace if nvext is not None else None
        )
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        multimodal = mm_objects(nvext.multimodal) if nvext is not None else None
        queue = self.worker.submit_local(request_id, prompt.token_ids, max_tokens, lora, salt, multimodal)
        if isinstance(queue, Rejected):
            return error_response(400, queue.reason)
        headers = {WORKER_HEADER: str(self.worker.worker_id)}
        n_prompt = len(prompt.token_ids)
        try:
            if raw.get("stream"):
                include_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
                return await self._stream(req, request_id, chat, n_prompt, queue, headers, include_usage)
            while True:
                kind, item = await queue.get()
                if kind == "done":
                    break
            fin: Finished = item
            text = self._text(output_token_ids(request_id, n_prompt, 0, fin.output_tokens))
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return web.json_response(
                {
                    "id": request_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [choice],
                    "usage": usage(fin),
                },
                headers=headers,
            )
        finally:
            self.worker.forget(request_id)

    async def _stream(
        self,
        req: web.Request,
        request_id: str,
        chat: bool,
        n_prompt: int,
        queue: asyncio.Queue[tuple[str, Any]],
        headers: dict[str, str],
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(req)
        created = int(time.time())
        base = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": self.model}

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            await resp.write(b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n")

        def choice(text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        sent = 0
        first = True
        with contextlib.suppress(ConnectionResetError):
            while True:
                kind, item = await queue.get()
                upto = item.output_tokens if kind == "done" else int(item)
                if upto > sent:
                    await send([choice(self._text(output_token_ids(request_id, n_prompt, sent, upto)), None, first)])
                    sent, first = upto, False
                if kind == "done":
                    await send([choice("", "length")])
                    if include_usage:
                        await send([], usage=usage(item))
                    await resp.write(b"data: [DONE]\n\n")
                    break
            await resp.write_eof()
        return resp


def usage(fin: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.output_tokens,
        "total_tokens": fin.prompt_tokens + fin.output_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }
