"""The real-time API: ``POST /classify``, ``GET /health``, ``GET /ready``.

Built by :func:`create_app`; the lifespan loads the settings (unless given), the
taxonomy and few-shot files, and opens the one Ollama client the app uses. Errors
are typed exceptions inside; the handlers here turn them into the status codes of
DESIGN.md section 2 with an ``{"error": {"type", "message", ...}}`` body.
"""

from __future__ import annotations

import json
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message as ASGIMessage, Receive, Scope, Send

from aggregator import ConversationIn, Message, Tweet
from classifier import Classification, ConversationClassifier
from config import Settings, load_settings
from error_handler import ClassifierError, InputError, LLMBusyError, LLMError, PayloadTooLargeError, error_body
from llm_wrapper import OllamaClient, create_llm_client
from logger import configure_logging

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"

# Worker threads that may call Ollama at once (Starlette's thread pool holds 40);
# the HTTP connection pool is sized to match so connections are reused, not reopened.
OLLAMA_POOL_SIZE = 64

MESSAGES_EXAMPLE = {
    "conversation_number": "12345",
    "messages": [
        {"sender": "customer", "text": "Where is my order? It was due on Monday.", "timestamp": "2025-09-24T10:00:00Z"},
        {"sender": "agent", "text": "Let me check for you.", "timestamp": "2025-09-24T10:01:00Z"},
        {"sender": "customer", "text": "Can you expedite shipping?", "timestamp": "2025-09-24T10:02:00Z"},
        {"sender": "agent", "text": "I have requested expedited shipping.", "timestamp": "2025-09-24T10:03:00Z"},
    ],
}
TWEETS_EXAMPLE = {
    "conversation_number": 8,
    "tweets": [
        {
            "tweet_id": 8,
            "author_id": "115712",
            "inbound": True,
            "created_at": "Tue Oct 31 21:45:10 +0000 2017",
            "text": "@sprintcare is the worst customer service",
        },
        {
            "tweet_id": 6,
            "author_id": "sprintcare",
            "inbound": False,
            "created_at": "Tue Oct 31 21:46:24 +0000 2017",
            "text": "@115712 Can you please send us a private message, so that I can gain further details?",
        },
    ],
}
CLASSIFICATION_EXAMPLE = {
    "categorization": "Customer asks where a late order is and wants it expedited",
    "intent": "Order Status",
    "topic": "Shipping/Delivery",
    "sentiment": "Neutral",
}


class ClassifyResponse(BaseModel):
    """The conversation as received, with its classification. Carries ``messages`` or ``tweets``."""

    conversation_number: str
    messages: list[Message] | None = Field(None, description="Exactly as received (when sent as messages).")
    tweets: list[Tweet] | None = Field(None, description="Exactly as received (when sent as tweets).")
    classification: Classification

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "conversation_number": "12345",
                    "messages": MESSAGES_EXAMPLE["messages"],
                    "classification": CLASSIFICATION_EXAMPLE,
                }
            ]
        }
    }


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error type, e.g. llm_unavailable.")
    message: str = Field(description="What went wrong.")
    hint: str | None = Field(None, description="What to do about it.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _error_example(status: int, error_type: str, message: str, hint: str | None = None) -> dict[str, Any]:
    error = {"type": error_type, "message": message, **({"hint": hint} if hint else {})}
    return {"model": ErrorResponse, "content": {"application/json": {"example": {"error": error}}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_example(400, "invalid_input", "Invalid conversation: body: the body is not valid JSON"),
    413: _error_example(413, "payload_too_large", "Request body is larger than the limit of 1000000 bytes."),
    422: _error_example(422, "invalid_input", "Invalid conversation: messages[0].sender: must be 'customer' or 'agent'"),
    502: _error_example(502, "llm_bad_output", "The model's answer is unusable: 'sentiment' is missing."),
    503: _error_example(
        503,
        "model_not_found",
        "Model 'llama3' is not available on the Ollama server at http://localhost:11434.",
        "Run `ollama pull llama3` there, or set OLLAMA_MODEL to a model it has.",
    ),
    504: _error_example(504, "llm_timeout", "Ollama at http://localhost:11434 did not answer within 120 s."),
}


class BodySizeLimitMiddleware:
    """Answer 413 for a body above API_MAX_BODY_BYTES, declared (Content-Length) or streamed (chunked).

    The limit is read from the settings the lifespan put on the application's state.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = scope["app"].state.settings.api_max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > max_bytes:
                await self._reject(scope, receive, send, max_bytes)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read up to the limit here, then replay the body.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                await self._reject(scope, receive, send, max_bytes)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        error = PayloadTooLargeError(max_bytes)
        logger.warning("%s %s rejected: %s", scope.get("method"), scope.get("path"), error.message)
        await JSONResponse(error_body(error), status_code=413, headers={"Connection": "close"})(scope, receive, send)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    return path or "body"


def _input_error_from_validation(exc: RequestValidationError, content_type: str) -> InputError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body", "type": ""}
    if tuple(first.get("loc", ())) == ("body",) and content_type and "json" not in content_type:
        # e.g. `curl -d` without -H sends application/x-www-form-urlencoded.
        return InputError(
            f"The body must be JSON sent with 'Content-Type: application/json' (got {content_type!r}).",
            field="body",
            status_code=400,
        )
    if first.get("type") == "json_invalid":
        return InputError(
            f"The body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            field="body",
            status_code=400,
        )
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InputError("The body is empty: send a JSON conversation.", field="body", status_code=400)
    field = _field_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return InputError(f"Invalid conversation: {field}: {message}{more}", field=field)


def _reject_constant(name: str) -> Any:
    raise InputError(f"The body is not valid JSON: {name} is not a JSON value.", field="body", status_code=400)


def _body_to_echo(body: bytes) -> dict[str, Any]:
    """The request body as received, for the answer; a 400 if JSON cannot carry it back.

    Python's json module reads NaN, Infinity and unpaired surrogate escapes (``"\\ud800"``), which
    the answer could not be encoded with: they fail here, before the LLM call, not as a 500 after it.
    """
    raw = json.loads(body, parse_constant=_reject_constant)
    try:
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            "The body is not valid JSON text: it holds an unpaired surrogate escape such as \\ud800.",
            field="body",
            status_code=400,
        ) from e
    return raw


def _error_response(error: ClassifierError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_seconds)} if isinstance(error, LLMBusyError) else None
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClassifierError)
    async def classifier_error(request: Request, exc: ClassifierError) -> JSONResponse:
        logger.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.code, exc)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _input_error_from_validation(exc, request.headers.get("content-type", ""))
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, error.status_code, error.message)
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI could not read the body at all (not UTF-8, nested too deeply, a huge integer).
            error = InputError(f"The body is not valid JSON: {exc.__cause__}", field="body", status_code=400)
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, error.status_code, error.message)
            return _error_response(error)
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"type": error_type, "message": f"{request.method} {request.url.path}: {exc.detail}"}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed unexpectedly", request.method, request.url.path)
        return JSONResponse(
            {"error": {"type": "internal_error", "message": f"Unexpected {type(exc).__name__}; see the server log."}},
            status_code=500,
        )


async def _report_ollama_readiness(ollama: OllamaClient) -> None:
    """Log whether Ollama answers and has the model; /classify answers 503 until it does."""
    try:
        await run_in_threadpool(ollama.check_ready)
    except LLMError as e:
        logger.warning("Ollama is not ready: %s /classify answers 503 until it is.", e)
    else:
        logger.info("Ollama at %s is ready with model %s", ollama.settings.ollama_endpoint, ollama.settings.ollama_model)


def create_app(settings: Settings | None = None, *, classifier: ConversationClassifier | None = None) -> FastAPI:
    """The FastAPI application. Without ``settings`` the lifespan loads them (``uvicorn main:app``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        active = settings
        if active is None:
            # Started as `uvicorn main:app`: the lifespan is the entry point.
            active = load_settings()
            configure_logging(active.log_level)
        pipeline = classifier or ConversationClassifier.from_settings(active)
        with create_llm_client(active, pool_size=OLLAMA_POOL_SIZE) as ollama:
            app.state.settings = active
            app.state.classifier = pipeline
            app.state.ollama = ollama
            logger.info(
                "API ready: model %s at %s, %d intents, %d topics, prompt prefix %d chars",
                active.ollama_model,
                active.ollama_endpoint,
                len(pipeline.taxonomy.intents),
                len(pipeline.taxonomy.topics),
                pipeline.prompt_builder.prefix_chars,
            )
            # Say at once whether Ollama is there, without holding up start-up.
            startup_check = asyncio.create_task(_report_ollama_readiness(ollama))
            yield
            startup_check.cancel()

    app = FastAPI(
        title="Customer Support Conversation Classifier",
        version=API_VERSION,
        description=(
            "Classifies a customer-support conversation into intent, topic and sentiment "
            "(judged from the customer's turns only), plus a one-line categorization, "
            "with a local model served by Ollama."
        ),
        lifespan=lifespan,
        strict_content_type=False,  # a JSON body without a Content-Type header is still read as JSON
    )
    app.add_middleware(BodySizeLimitMiddleware)
    _install_error_handlers(app)

    @app.post(
        "/classify",
        summary="Classify one conversation",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
    )
    async def classify(
        request: Request,
        conversation: ConversationIn = Body(
            openapi_examples={
                "messages": {"summary": "Chat transcript", "value": MESSAGES_EXAMPLE},
                "tweets": {"summary": "Twitter thread (source schema)", "value": TWEETS_EXAMPLE},
            }
        ),
    ) -> JSONResponse:
        started = time.perf_counter()
        raw = _body_to_echo(await request.body())  # the body as received, echoed unchanged
        outcome = await run_in_threadpool(
            request.app.state.classifier.classify, conversation, request.app.state.ollama
        )
        field = conversation.source_field
        logger.info(
            "classified conversation %s (%d %s) in %d ms: %s / %s / %s",
            conversation.conversation_number,
            len(raw[field]),
            field,
            (time.perf_counter() - started) * 1000,
            outcome.classification.intent,
            outcome.classification.topic,
            outcome.classification.sentiment,
        )
        return JSONResponse(
            {
                "conversation_number": conversation.conversation_number,
                field: raw[field],
                "classification": outcome.classification.model_dump(),
            }
        )

    @app.get("/health", summary="Liveness: the process answers (no Ollama call)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: Ollama answers and the model is pulled",
        responses={503: ERROR_RESPONSES[503]},
    )
    async def ready(request: Request) -> dict[str, str]:
        await run_in_threadpool(request.app.state.ollama.check_ready)
        active: Settings = request.app.state.settings
        return {"status": "ready", "model": active.ollama_model, "endpoint": active.ollama_endpoint}

    return app

