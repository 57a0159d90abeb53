"""A fake Ollama HTTP server on loopback, for tests and benchmarks.

It speaks Ollama's real shapes (docs/api.md of ollama/ollama):

* ``GET /api/tags`` -> ``{"models": [{"name": "llama3:latest", ...}]}``
* ``POST /api/chat`` -> ``{"model", "created_at", "message": {"role", "content"}, "done",
  "done_reason", "total_duration", "load_duration", "prompt_eval_count",
  "prompt_eval_duration", "eval_count", "eval_duration"}``; streamed as NDJSON unless
  ``"stream": false`` (as Ollama does);
* ``POST /api/embed`` -> ``{"model", "embeddings": [[float, ...], ...], "total_duration",
  "load_duration", "prompt_eval_count"}``: one vector per ``input`` (a string or a list), for the
  models of ``embedding_models`` (and the chat models); :func:`fake_embedding` makes them, so that
  texts sharing words are near each other;
* failures as ``{"error": "..."}``: 404 ``model 'x' not found, try pulling it first``
  for a model it does not have, and whatever a test scripts (500 runner errors,
  503 ``server busy``, malformed or truncated output, dropped connections, delays).

By default a chat is answered with a valid classification chosen deterministically
from the enums of the request's ``format`` schema (a hash of the conversation), after
``latency`` seconds. Tests script other answers with :meth:`FakeOllama.enqueue` (next
requests, in order) or :attr:`FakeOllama.responder` (a function of the request).
``prompt_eval_count`` simulates Ollama's prompt cache: only the part of the prompt
that differs from the previous request is counted (about 4 characters a token).

Run standalone (benchmarks): ``python -m fakes.ollama --port 11434 --latency 0.5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from fakes.loopback import LoopbackServer

CHARS_PER_TOKEN = 4


@dataclass
class Reply:
    """A 200 chat answer. ``content`` None means: a valid classification for the request."""

    content: str | None = None
    done: bool = True
    done_reason: str = "stop"
    delay: float | None = None  # None: the server's latency
    # Token log-probabilities sent when the request asks for them: [{"token", "logprob",
    # "top_logprobs": [{"token", "logprob"}]}]. None: one token per 4 characters, each certain.
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class ErrorReply:
    """An Ollama error: ``{"error": message}`` with ``status``."""

    status: int
    message: str
    delay: float | None = None
    headers: dict[str, str] | None = None  # e.g. Retry-After


@dataclass
class RawReply:
    """Any status and body, e.g. a proxy's HTML page or a 200 that is not JSON."""

    status: int
    body: bytes
    content_type: str = "text/plain"
    delay: float | None = None


@dataclass
class Disconnect:
    """Close the connection without answering."""

    delay: float | None = None


Behavior = Reply | ErrorReply | RawReply | Disconnect
Responder = Callable[[dict[str, Any]], Behavior | None]

BUSY = ErrorReply(503, "server busy, please try again.  maximum pending requests exceeded")
RUNNER_CRASHED = ErrorReply(500, "llama runner process has terminated: exit status 2")


def _with_latest(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def last_user_content(request: dict[str, Any]) -> str:
    """The last user message of a chat request (the conversation, in this project's prompts)."""
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


FREE_TEXT = "Customer contacts support about their issue"


def default_classification(request: dict[str, Any]) -> dict[str, str] | list[str]:
    """A valid answer for the request's schema, chosen by a hash of its last user message: an object of
    exactly the schema's properties in its order, or an array of its ``prefixItems``; each ``enum``
    value gets one of its values, each free-text value a sentence (cut to its ``maxLength``). Without a
    schema, just a categorization."""
    schema = request.get("format") if isinstance(request.get("format"), dict) else {}
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    items = schema.get("prefixItems") if isinstance(schema, dict) else None
    if isinstance(items, list) and items:
        properties = {str(i): spec for i, spec in enumerate(items)}
    if not properties:
        return {"categorization": FREE_TEXT}
    digest = zlib.crc32(last_user_content(request).encode())
    answer = {}
    enums = 0
    for key, spec in properties.items():
        spec = spec if isinstance(spec, dict) else {}
        enum = spec.get("enum")
        if enum:
            # A byte of the hash per field (the fifth field reuses the first byte, rotated).
            answer[key] = enum[((digest >> (8 * (enums % 4))) + enums // 4) % len(enum)]
            enums += 1
        else:
            limit = spec.get("maxLength")
            answer[key] = FREE_TEXT[:limit] if isinstance(limit, int) and limit > 0 else FREE_TEXT
    return list(answer.values()) if items else answer


EMBEDDING_DIMENSIONS = 64
_WORD = re.compile(r"[a-z0-9]+")


def fake_embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector of the text's words hashed into ``dimensions`` buckets (feature hashing): texts
    that share words get a high cosine similarity, as with a real embedding model, deterministically."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        if len(word) > 2:  # drop "a", "is", ... and the transcript's quoting
            vector[zlib.crc32(word.encode()) % dimensions] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]


def embed_inputs(body: dict[str, Any]) -> list[str] | None:
    """The texts of an embeddings request (``input``: a string or a list of strings), None when malformed."""
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return None
    return texts


def logprobs_for(content: str, reply: Reply, top: Any) -> list[dict[str, Any]]:
    """The reply's scripted log-probabilities, or certain 4-character tokens spelling ``content``."""
    if reply.logprobs is not None:
        entries = reply.logprobs
    else:
        pieces = [content[i : i + CHARS_PER_TOKEN] for i in range(0, len(content), CHARS_PER_TOKEN)]
        entries = [{"token": piece, "logprob": 0.0, "top_logprobs": [{"token": piece, "logprob": 0.0}]}
                   for piece in pieces]
    limit = top if isinstance(top, int) and top >= 0 else 0
    return [{**entry, "bytes": list(entry["token"].encode()), "top_logprobs": [
        {**alt, "bytes": list(alt["token"].encode())} for alt in entry.get("top_logprobs", [])[:limit]]}
        for entry in entries]


@dataclass
class ChatRecord:
    """What one chat request looked like, as the fake saw it."""

    body: dict[str, Any]
    prompt_chars: int
    cached_chars: int
    prompt_eval_count: int
    received_at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict)


class FakeOllama(LoopbackServer):
    """The fake server. ``with FakeOllama() as fake: ... fake.url ...`` or start()/stop()
    (the lifecycle: :class:`fakes.loopback.LoopbackServer`)."""

    name = "fake Ollama"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: tuple[str, ...] | list[str] = ("llama3:latest",),
        latency: float = 0.0,
        parallel: int | None = None,
        max_queue: int | None = None,
        embedding_models: tuple[str, ...] | list[str] = ("nomic-embed-text",),
    ) -> None:
        super().__init__(host=host, port=port)
        self.models = [_with_latest(m) for m in models]
        self.embedding_models = [_with_latest(m) for m in embedding_models]
        #: The texts of every embeddings request, oldest first (one list per request).
        self.embed_requests: list[list[str]] = []
        #: When set, embeddings requests get this error (e.g. a server without an embeddings endpoint).
        self.embed_error: ErrorReply | None = None
        self.latency = latency
        # Seconds the readiness answer (GET /api/tags, the OpenAI fake's /v1/models) takes.
        self.ready_delay = 0.0
        # Like Ollama's OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE: at most `parallel` chats are
        # served at a time, the rest wait; beyond `max_queue` waiting, 503 "server busy".
        self.parallel = parallel
        self.max_queue = max_queue
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self.busy_count = 0
        self.responder: Responder | None = None
        self._script: deque[Behavior] = deque()
        self._records: list[ChatRecord] = []
        self._lock = threading.Lock()
        self._previous_messages: list[dict[str, Any]] = []
        self._in_flight = 0
        self.max_in_flight = 0

    # --- scripting ----------------------------------------------------------------------
    def enqueue(self, *behaviors: Behavior) -> None:
        """Answer the next chat requests with ``behaviors``, in order."""
        with self._lock:
            self._script.extend(behaviors)

    def reset(self) -> None:
        """Forget recorded requests, scripted answers and the responder."""
        with self._lock:
            self._script.clear()
            self._records.clear()
            self._previous_messages = []
            self.embed_requests.clear()
            self.embed_error = None
            self.responder = None
            self.max_in_flight = 0
            self.busy_count = 0

    @property
    def chat_records(self) -> list[ChatRecord]:
        with self._lock:
            return list(self._records)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of every ``/api/chat`` request received, oldest first."""
        return [record.body for record in self.chat_records]

    @property
    def chat_count(self) -> int:
        with self._lock:
            return len(self._records)

    def wait_for_chats(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` chat requests arrived (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.chat_count >= count:
                return True
            time.sleep(0.01)
        return self.chat_count >= count

    # --- HTTP handlers ------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self._root), web.get("/api/version", self._version), web.get("/api/tags", self._tags),
                web.post("/api/chat", self._chat), web.post("/api/embed", self._embed)]

    def _embed_request(self, body: Any, model_ok: Callable[[str], bool]) -> tuple[int, str, list[str]]:
        """(status, error message, texts) of an embeddings request, the same checks for each provider."""
        texts = embed_inputs(body) if isinstance(body, dict) else None
        if texts is None:
            return 400, "input must be a string or a non-empty list of strings", []
        if not model_ok(str(body.get("model", ""))):
            return 404, f"model '{body.get('model')}' not found", []
        if self.embed_error is not None:
            return self.embed_error.status, self.embed_error.message, []
        with self._lock:
            self.embed_requests.append(texts)
        return 200, "", texts

    async def _embed(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid character in request body"}, status=400)
        status, message, texts = self._embed_request(
            body, lambda model: _with_latest(model) in self.embedding_models + self.models)
        if status != 200:
            return web.json_response({"error": message}, status=status)
        return web.json_response({
            "model": body["model"], "embeddings": [fake_embedding(text) for text in texts],
            "total_duration": 14_000_000, "load_duration": 1_000_000,
            "prompt_eval_count": sum(max(1, len(t) // CHARS_PER_TOKEN) for t in texts),
        })

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def _tags(self, request: web.Request) -> web.Response:
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-09-24T10:30:00.000000Z",
                "size": 4661224676,
                "digest": f"{zlib.crc32(name.encode()):08x}" * 8,
                "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B",
                            "quantization_level": "Q4_0"},
            }
            for name in self.models
        ]
        return web.json_response({"models": models})

    def _record(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> ChatRecord:
        messages = body.get("messages") or []
        with self._lock:
            shared = 0
            for mine, previous in zip(messages, self._previous_messages, strict=False):
                if mine != previous:
                    break
                shared += 1
            self._previous_messages = messages
            prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
            cached_chars = sum(len(str(m.get("content", ""))) for m in messages[:shared])
            uncached = prompt_chars - cached_chars
            record = ChatRecord(body, prompt_chars, cached_chars, max(1, math.ceil(uncached / CHARS_PER_TOKEN)),
                                headers=dict(headers or {}))
            self._records.append(record)
            return record

    def _next_behavior(self, body: dict[str, Any]) -> Behavior:
        with self._lock:
            if self._script:
                return self._script.popleft()
        if self.responder is not None:
            chosen = self.responder(body)
            if chosen is not None:
                return chosen
        return Reply()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid character in request body"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response({"error": "messages is required"}, status=400)
        model = _with_latest(str(body.get("model", "")))
        if model not in self.models:
            return web.json_response({"error": f"model '{body.get('model')}' not found, try pulling it first"},
                                     status=404)

        record = self._record(body, dict(request.headers))
        return await self._serve(request, body, record, self._next_behavior(body))

    async def _serve(
        self, request: web.Request, body: dict[str, Any], record: ChatRecord, behavior: Behavior
    ) -> web.StreamResponse:
        """Answer one chat, in one of ``parallel`` slots when set (every provider's fake comes here,
        so the slots and the busy answer beyond ``max_queue`` hold for each; the busy answer goes
        through ``_answer``, in the provider's error shape)."""
        if self.parallel is None:
            return await self._serve_now(request, body, record, behavior)
        if self._slots is None:  # created on the server's own loop
            self._slots = asyncio.Semaphore(self.parallel or 1)
        if self.max_queue is not None and self._slots.locked() and self._waiting >= self.max_queue:
            self.busy_count += 1
            return await self._answer(request, body, record, BUSY, 0.0)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await self._serve_now(request, body, record, behavior)
        finally:
            self._slots.release()

    async def _serve_now(
        self, request: web.Request, body: dict[str, Any], record: ChatRecord, behavior: Behavior
    ) -> web.StreamResponse:
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            delay = self.latency if behavior.delay is None else behavior.delay
            if delay > 0:
                await asyncio.sleep(delay)
            return await self._answer(request, body, record, behavior, delay)
        finally:
            self._in_flight -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], record: ChatRecord, behavior: Behavior, delay: float
    ) -> web.StreamResponse:
        if isinstance(behavior, ErrorReply):
            return web.json_response({"error": behavior.message}, status=behavior.status, headers=behavior.headers)
        if isinstance(behavior, RawReply):
            return web.Response(status=behavior.status, body=behavior.body, content_type=behavior.content_type)
        if isinstance(behavior, Disconnect):
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing is sent: the client sees a dropped connection

        content = behavior.content
        if content is None:
            content = json.dumps(default_classification(body), separators=(",", ":"))
        eval_count = max(1, math.ceil(len(content) / CHARS_PER_TOKEN))
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        duration_ns = int(delay * 1e9)
        final = {
            "model": body.get("model"),
            "created_at": now,
            "message": {"role": "assistant", "content": content},
            "done_reason": behavior.done_reason,
            "done": behavior.done,
            "total_duration": duration_ns + 1_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": record.prompt_eval_count,
            "prompt_eval_duration": duration_ns // 4,
            "eval_count": eval_count,
            "eval_duration": duration_ns - duration_ns // 4,
        }
        if body.get("logprobs"):
            final["logprobs"] = logprobs_for(content, behavior, body.get("top_logprobs"))
        if body.get("stream", True) is False:
            return web.json_response(final)
        # Ollama streams NDJSON by default: content pieces, then the statistics.
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for start in range(0, len(content), 8):
            piece = {"model": body.get("model"), "created_at": now,
                     "message": {"role": "assistant", "content": content[start : start + 8]}, "done": False}
            await response.write((json.dumps(piece) + "\n").encode())
        await response.write((json.dumps({**final, "message": {"role": "assistant", "content": ""}}) + "\n").encode())
        await response.write_eof()
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Ollama server for tests and benchmarks (loopback).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds before each chat answer (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="chats served at a time, like OLLAMA_NUM_PARALLEL (default: no limit)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="chats that may wait for a slot before 503 busy, like OLLAMA_MAX_QUEUE "
                        "(default: no limit)")
    parser.add_argument("--model", action="append", default=None, help="model to offer (repeatable; default: llama3)")
    args = parser.parse_args(argv)
    fake = FakeOllama(host=args.host, port=args.port, models=args.model or ["llama3"], latency=args.latency,
                      parallel=args.parallel, max_queue=args.max_queue)
    asyncio.run(fake.serve(lambda: print(
        f"fake Ollama listening on {fake.url} (latency {fake.latency:g} s, parallel {fake.parallel or 'any'}, "
        f"models {', '.join(fake.models)})", flush=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
