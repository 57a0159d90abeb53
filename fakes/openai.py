"""A fake OpenAI-compatible HTTP server on loopback (llama.cpp's llama-server, vLLM, LM Studio).

It speaks the real shapes, under ``/v1`` as those servers do (so ``LLM_ENDPOINT`` is
``fake.url + "/v1"``, the way users configure them):

* ``GET /v1/models`` -> ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``
* ``POST /v1/chat/completions`` -> ``{"id", "object": "chat.completion", "created", "model",
  "choices": [{"index": 0, "message": {"role", "content"}, "finish_reason", "logprobs":
  {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}}], "usage": {"prompt_tokens",
  "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}},
  "timings": {...}}`` (``timings`` as llama.cpp adds them);
* ``POST /v1/embeddings`` -> ``{"object": "list", "data": [{"object": "embedding", "index",
  "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}`` (vectors of
  :func:`fakes.ollama.fake_embedding`);
* failures as ``{"error": {"message", "type", "code"}}``: 404 ``model_not_found`` for a model it
  does not serve, 401 without the right ``Authorization: Bearer`` when ``api_key`` is set, and
  whatever a test scripts with the behaviours of :mod:`fakes.ollama` (an ``ErrorReply`` is
  sent in the OpenAI error shape, with its headers, e.g. ``Retry-After``).

A scripted ``Reply(done_reason="length")`` becomes ``finish_reason: "length"``. The default answer
is a valid classification chosen from the enums of ``response_format.json_schema.schema``.
Prompt caching is simulated as in the fake Ollama: ``cached_tokens`` is the shared prefix.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from typing import Any

from aiohttp import web

from fakes.ollama import (
    CHARS_PER_TOKEN,
    Behavior,
    ChatRecord,
    Disconnect,
    ErrorReply,
    FakeOllama,
    RawReply,
    Reply,
    default_classification,
    fake_embedding,
    logprobs_for,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               429: "rate_limit_error", 503: "unavailable_error"}


def openai_error(status: int, message: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": code if code is not None else status}}


class FakeOpenAI(FakeOllama):
    """``with FakeOpenAI() as fake: ... fake.base_url ...``; scripted like :class:`FakeOllama`."""

    def __init__(self, *, api_key: str | None = None, models: tuple[str, ...] | list[str] = ("llama3",),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # OpenAI-compatible servers use model ids as given: no ":latest".
        self.models = list(models)
        self.embedding_models = [m.removesuffix(":latest") for m in self.embedding_models]
        self.api_key = api_key

    @property
    def base_url(self) -> str:
        """What users set LLM_ENDPOINT to."""
        return f"{self.url}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/health", self._health), web.get("/v1/models", self._models),
                web.post("/v1/chat/completions", self._completions), web.post("/v1/embeddings", self._embeddings)]

    async def _read(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """The request's JSON body, or the answer to give instead (401 without the key, 400 not JSON)."""
        denied = self._unauthorized(request)
        if denied is not None:
            return None, denied
        try:
            return await request.json(), None
        except ValueError:
            return None, web.json_response(openai_error(400, "Failed to parse the request body as JSON"), status=400)

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        status, message, texts = self._embed_request(
            body, lambda model: model in self.embedding_models + self.models)
        if status != 200:
            return web.json_response(openai_error(status, message), status=status)
        tokens = sum(max(1, len(t) // CHARS_PER_TOKEN) for t in texts)
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": fake_embedding(t)} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return web.json_response(openai_error(401, "Invalid API Key"), status=401)

    async def _models(self, request: web.Request) -> web.Response:
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        data = [{"id": name, "object": "model", "created": 1730000000, "owned_by": "llamacpp"} for name in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, refused = await self._read(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(openai_error(400, "'messages' is required"), status=400)
        if body.get("model") not in self.models:
            message = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return web.json_response(openai_error(404, message, "model_not_found"), status=404)

        record = self._record(body, dict(request.headers))
        # Slots, in-flight accounting and delays are FakeOllama's; only the answer's shape differs (_answer).
        return await self._serve(request, body, record, self._next_behavior(body))

    async def _answer(
        self, request: web.Request, body: dict[str, Any], record: ChatRecord, behavior: Behavior, delay: float
    ) -> web.StreamResponse:
        if isinstance(behavior, ErrorReply):
            return web.json_response(openai_error(behavior.status, behavior.message), status=behavior.status,
                                     headers=behavior.headers)
        if isinstance(behavior, RawReply):
            return web.Response(status=behavior.status, body=behavior.body, content_type=behavior.content_type)
        if isinstance(behavior, Disconnect):
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        assert isinstance(behavior, Reply)
        content = behavior.content
        if content is None:
            schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema", {})
            content = json.dumps(default_classification({**body, "format": schema}), separators=(",", ":"))
        prompt_tokens = max(1, math.ceil(record.prompt_chars / CHARS_PER_TOKEN))
        cached = min(prompt_tokens - 1, record.cached_chars // CHARS_PER_TOKEN)
        completion_tokens = max(1, math.ceil(len(content) / CHARS_PER_TOKEN))
        finish_reason = "length" if behavior.done_reason == "length" else "stop"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
        if body.get("logprobs"):
            choice["logprobs"] = {"content": logprobs_for(content, behavior, body.get("top_logprobs"))}
        answer = {
            "id": f"chatcmpl-{zlib.crc32(content.encode()):08x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "b11434-fake",
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
            "timings": {
                "cache_n": cached,
                "prompt_n": prompt_tokens - cached,
                "prompt_ms": delay * 250,
                "predicted_n": completion_tokens,
                "predicted_ms": delay * 750,
            },
        }
        return web.json_response(answer)
