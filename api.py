"""The real-time API: ``POST /classify``, ``GET /health``, ``GET /ready``.

Built by :func:`create_app` from the settings (``python main.py``), or by
:func:`app_from_environment` when the server starts (``uvicorn main:app``). The lifespan
loads the taxonomy and few-shot files and opens the one Ollama client the app uses; the
routes receive them as dependencies (``api_dependencies``). Errors are typed exceptions
inside; the handlers here turn them into the status codes of docs/architecture.md#errors with an
``{"error": {"type", "message", ...}}`` body.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

import access
import conversations
import dashboard
from aggregator import ConversationIn, Message, Tweet, validate_conversation
from api_dependencies import (
    INLINE_BYTES,
    ClassifyingDep,
    ClientLeftError,
    EmbeddedLLMDep,
    LLMClientDep,
    LLMSlots,
    SettingsDep,
    lifespan_state,
)
from classifier import Classification, ConversationClassifier, document_label_fields
from config import Settings, load_settings
from dashboard import DashboardDatabaseDep
from error_handler import (
    ClassifierError,
    ConfigError,
    InputError,
    LLMBusyError,
    LLMError,
    NotAuthenticatedError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    error_body,
    invalid_conversation,
)
from llm_pool import LLMPool
from llm_wrapper import create_llm_client, server_kind
from logger import configure_logging
from prompt_builder import Taxonomy
from utils.embedded_llm import NOTE as EMBEDDED_NOTE
from utils.embedded_llm import embedded_llm

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"

# HTTP connections kept to Ollama beyond one per LLM slot (API_MAX_CONCURRENCY): readiness checks.
# A pool smaller than the calls in flight makes urllib3 discard and reopen connections.
SPARE_CONNECTIONS = 4
# The status logged for a request whose client left before its turn (nobody reads the answer).
CLIENT_CLOSED_REQUEST = 499

MESSAGES_EXAMPLE: dict[str, Any] = {
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
CLASSIFICATION_EXAMPLE: dict[str, Any] = {
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
    415: _error_example(
        415,
        "unsupported_media_type",
        "The body must be JSON sent with 'Content-Type: application/json' (got 'text/plain').",
    ),
    422: _error_example(
        422, "invalid_input", "Invalid conversation: messages[0].sender: must be 'customer' or 'agent' (any case)"
    ),
    502: _error_example(502, "llm_bad_output", "The model's answer is unusable: 'sentiment' is missing."),
    503: _error_example(
        503,
        "model_not_found",
        "Model 'llama3' is not available on the Ollama server at http://localhost:11434.",
        "Run `ollama pull llama3` there, or set LLM_MODEL to a model it has.",
    ),
    504: _error_example(504, "llm_timeout", "Ollama at http://localhost:11434 did not answer within 120 s."),
}


#: How much of a body that is refused (413) is still read, so that the client gets the answer.
REJECTED_BODY_DRAIN_BYTES = 4 * 1024 * 1024


async def _drain(receive: Receive, limit: int) -> None:
    drained = 0
    while drained <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodySizeLimitMiddleware:
    """Answer 413 for a body above ``max_bytes`` (API_MAX_BODY_BYTES), declared (Content-Length)
    or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > max_bytes:
                # A modest excess is read and dropped; a huge one is refused from its headers alone.
                unread = int(declared) <= max_bytes + REJECTED_BODY_DRAIN_BYTES
                await self._reject(scope, receive, send, max_bytes, unread=unread)
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
                await self._reject(scope, receive, send, max_bytes, unread=message.get("more_body", False))
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

    async def _reject(self, scope: Scope, receive: Receive, send: Send, max_bytes: int, *, unread: bool) -> None:
        if unread:
            # Read (and drop) a bounded rest of the body first: a server that answers and closes
            # with unread data makes the client's kernel see a reset instead of the 413.
            await _drain(receive, REJECTED_BODY_DRAIN_BYTES)
        error = PayloadTooLargeError(max_bytes)
        logger.warning("%s %s rejected: %s", scope.get("method"), scope.get("path"), error.message)
        await JSONResponse(error_body(error), status_code=413, headers={"Connection": "close"})(scope, receive, send)


class StartupErrorMiddleware:
    """A start-up that fails with one of our errors (the embedded model cannot start) is reported as
    ``error: <message> <hint>``, in one line like a configuration error, not as Starlette's traceback.

    The lifespan puts the error in ``errors`` before it re-raises; Starlette then sends
    ``lifespan.startup.failed`` with the traceback's text, which this replaces.
    """

    def __init__(self, app: ASGIApp, errors: list[ClassifierError]) -> None:
        self.app = app
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: ASGIMessage) -> None:
            if message["type"] == "lifespan.startup.failed" and self.errors:
                message = {**message, "message": f"error: {self.errors[-1]}"}
            await send(message)

        await self.app(scope, receive, send_one_line)


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, any parameters (charset) and case."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


class JSONBodyOnlyMiddleware:
    """Answer 415 to a request carrying a body that is not declared JSON.

    Browsers send cross-site forms and ``text/plain`` bodies without asking the server first (no
    CORS preflight), so a web page could otherwise make a visitor's browser trigger
    classifications; a JSON Content-Type cannot be sent that way. Requests without a body
    (GET, an empty POST) pass, and so do POSTs to ``form_paths`` (the login form, which guards
    itself: access.py).
    """

    def __init__(self, app: ASGIApp, form_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            has_body = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if has_body and not is_json_media_type(content_type) and scope.get("path") not in self.form_paths:
                error = UnsupportedMediaTypeError(content_type)
                logger.warning("%s %s -> 415: %s", scope.get("method"), scope.get("path"), error.message)
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _input_error_from_validation(exc: RequestValidationError) -> InputError:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid body", "type": ""}
    if first.get("type") == "json_invalid":
        return InputError(
            f"The body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            field="body",
            status_code=400,
        )
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InputError("The body is empty: send a JSON conversation.", field="body", status_code=400)
    return invalid_conversation(errors)


def _reject_constant(name: str) -> Any:
    raise InputError(f"The body is not valid JSON: {name} is not a JSON value.", field="body", status_code=400)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999, -1E+400: Python reads infinity, which no JSON answer can carry
        raise InputError(f"The body holds the number {text[:40]}, too large for a JSON number this API can "
                         "answer with (it reads as infinity).", field="body", status_code=400)
    return value


def read_classify_body(body: bytes) -> tuple[dict[str, Any], ConversationIn]:
    """The body of ``POST /classify`` parsed once: the JSON as received (echoed in the answer) and the
    validated conversation. A large body is read in a worker thread (``LLMSlots.read``): a 1 MB body
    is milliseconds of CPU that the event loop (``/health``, every other request) must not wait for.

    Everything the answer could not carry back fails here with a 400, before the LLM call, not as a
    500 after it: NaN and Infinity, numbers that read as infinity (``1e999``), unpaired surrogate
    escapes (``"\\ud800"``); so does JSON nested too deeply for the decoder.
    """
    if not body.strip():
        raise InputError("The body is empty: send a JSON conversation.", field="body", status_code=400)
    try:
        raw = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as e:
        raise InputError(f"The body is not valid JSON: it is nested too deeply ({e}).", field="body",
                         status_code=400) from e
    except ValueError as e:  # JSONDecodeError, not UTF-8, an integer of thousands of digits
        if isinstance(e, InputError):
            raise
        raise InputError(f"The body is not valid JSON: {e}", field="body", status_code=400) from e
    try:
        # Unpaired surrogates come from \\uD800-\\uDFFF escapes (UTF-8 cannot carry them raw; UTF-16 and
        # UTF-32 bodies can): without either, the whole body need not be encoded once more to find out.
        if json.detect_encoding(body) != "utf-8" or _SURROGATE_ESCAPE.search(body):
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            "The body is not valid JSON text: it holds an unpaired surrogate escape such as \\ud800.",
            field="body",
            status_code=400,
        ) from e
    if not isinstance(raw, dict):  # well-formed JSON of the wrong shape: 422, as for any invalid conversation
        kind = "an array" if isinstance(raw, list) else "a string" if isinstance(raw, str) else "a number or a constant"
        raise InputError(f"Invalid conversation: the body must be a JSON object, not {kind}.", field="body")
    return raw, validate_conversation(raw)


async def _read_body(request: Request) -> bytes:
    # Not request.body(): that keeps the bytes on the request until the answer; parsed, they can go.
    return b"".join([chunk async for chunk in request.stream()])


def _error_response(error: ClassifierError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_seconds)} if isinstance(error, LLMBusyError) else None
    if isinstance(error, NotAuthenticatedError):
        headers = {"WWW-Authenticate": 'Bearer realm="conversations"'}
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClassifierError)
    async def classifier_error(request: Request, exc: ClassifierError) -> JSONResponse:
        logger.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.code, exc)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _input_error_from_validation(exc)
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


async def _report_ollama_readiness(ollama: LLMPool) -> None:
    """Log whether the LLM server answers and has the model; /classify answers 503 until it does.
    The server is named as its provider names it (an OpenAI-compatible one, such as the embedded
    model's llama-server, is not Ollama)."""
    kind = server_kind(ollama.settings, capital=True)
    try:
        await run_in_threadpool(ollama.check_ready)
    except LLMError as e:
        logger.warning("%s is not ready: %s /classify answers 503 until it is.", kind, e)
    else:
        logger.info("%s at %s is ready with model %s", kind, _endpoint_names(ollama), ollama.settings.llm_model)


def _endpoint_names(ollama: LLMPool) -> str:
    """The LLM servers as logs and /ready show them: scheme://host:port, no credentials."""
    return ", ".join(server.name for server in ollama.servers)


@contextmanager
def _llm_started(settings: Settings, errors: list[ClassifierError]) -> Iterator[Settings]:
    """The settings of the LLM calls: with LLM_ENDPOINT=embedded, those of the embedded model,
    started here for the app's life. The lifespan calls this in the event loop's thread, blocking
    (nothing is served yet): a child dies with the thread that started it. An error of the start
    goes to ``errors`` too (StartupErrorMiddleware reports it in one line)."""
    with ExitStack() as stack:
        try:
            llm_settings = stack.enter_context(embedded_llm(settings))
        except ClassifierError as e:
            errors.append(e)
            raise
        yield llm_settings


def _freeze_startup_objects() -> None:
    """Leave what start-up built (modules, pydantic's schemas, the taxonomy, the prompt prefix) out of
    every later collection of the cyclic garbage collector: it lives as long as the process.

    A full collection traverses every tracked object; on this project's imports alone that took about
    50 ms on a 2-core machine, a pause in which the event loop answers nothing (/health neither), and
    a dozen large bodies waiting for the LLM set off a dozen of them (benchmark section 4). Collected
    first, so that no garbage is frozen with them; what is frozen is still freed by reference counting.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, classifier: ConversationClassifier | None = None) -> FastAPI:
    """The FastAPI application for ``settings``; building it reads and connects nothing (the lifespan does)."""
    documented: list[Taxonomy] = []
    startup_errors: list[ClassifierError] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        pipeline = classifier or ConversationClassifier.from_settings(settings)
        pool_size = settings.api_max_concurrency + SPARE_CONNECTIONS
        # One client per LLM server (LLM_ENDPOINT may list several); each call to the least busy.
        with _llm_started(settings, startup_errors) as llm_settings, \
                LLMPool(llm_settings, lambda server: create_llm_client(server, pool_size=pool_size)) as ollama:
            logger.info(
                "API ready: model %s at %s, %s, prompt prefix %d chars",
                llm_settings.llm_model,
                _endpoint_names(ollama),
                pipeline.taxonomy.summary(),
                pipeline.prompt_builder.prefix_chars,
            )
            documented.append(pipeline.taxonomy)  # /openapi.json names the taxonomy's label fields
            _freeze_startup_objects()  # before the readiness task: nothing short-lived is frozen
            # Say at once whether Ollama is there, without holding up start-up.
            startup_check = asyncio.create_task(_report_ollama_readiness(ollama))
            # The lifespan state: every request sees it on request.state (see api_dependencies).
            slots = LLMSlots(settings.api_max_concurrency, settings.api_queue_timeout, settings.api_max_waiting)
            embedded = EMBEDDED_NOTE if settings.uses_embedded_llm else None
            yield {**lifespan_state(llm_settings, pipeline, ollama, slots, embedded_llm=embedded),
                   **access.lifespan_state(settings)}
            startup_check.cancel()

    app = FastAPI(
        title="Customer Support Conversation Classifier",
        version=API_VERSION,
        description=(
            "Classifies a customer-support conversation into the label fields of its taxonomy "
            "(TAXONOMY_FILE; by default intent, topic and sentiment, judged from the customer's turns only), "
            "plus a one-line categorization, with a local model served by Ollama."
        ),
        lifespan=lifespan,
        docs_url=None,  # /docs is served by dashboard.install with local Swagger UI assets (works offline)
        redoc_url=None,  # ReDoc loads its script from a CDN
    )
    # The last added runs first: the size limit, then the media type.
    app.add_middleware(JSONBodyOnlyMiddleware, form_paths=access.FORM_PATHS)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(StartupErrorMiddleware, errors=startup_errors)
    _install_error_handlers(app)
    _document_label_fields(app, documented)
    _add_classification_routes(app)
    _document_the_classify_body(app)
    # Routers of other parts are included here, one line each; they take what they need from
    # api_dependencies.
    dashboard.install(app)  # GET /dashboard, /api/stats, /api/jobs, /static, offline /docs
    access.install(app)  # /login, /logout, /api/session
    conversations.install(app)  # /api/conversations..., /conversations (its database is the dashboard's)
    return app


def _document_label_fields(app: FastAPI, taxonomies: list[Taxonomy]) -> None:
    """``/openapi.json`` names the label fields and labels of the taxonomy the lifespan loaded in
    ``Classification`` (the model itself cannot: the fields are the taxonomy file's)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = build()  # cached by FastAPI after the first call
        if fresh and taxonomies:
            document_label_fields(schema["components"]["schemas"]["Classification"], taxonomies[-1])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_the_classify_body(app: FastAPI) -> None:
    """Put ``ConversationIn`` (and the models it uses) into the OpenAPI components: ``/classify``
    reads its body itself, so FastAPI does not know its schema; the route's ``openapi_extra`` refers
    to it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schema = ConversationIn.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in schema.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas.setdefault("ConversationIn", schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _add_classification_routes(app: FastAPI) -> None:
    """``POST /classify``, ``GET /health``, ``GET /ready``."""

    @app.post(
        "/classify",
        summary="Classify one conversation",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ConversationIn"},
            "examples": {
                "messages": {"summary": "Chat transcript", "value": MESSAGES_EXAMPLE},
                "tweets": {"summary": "Twitter thread (source schema)", "value": TWEETS_EXAMPLE},
            },
        }}}},
    )
    async def classify(request: Request, using: ClassifyingDep, holder: DashboardDatabaseDep) -> Response:
        # The body is read here, not declared as a parameter: FastAPI would parse and validate it on
        # the event loop, before any bound on waiting requests applies (see read_classify_body).
        started = time.perf_counter()
        classifier, llm_client, llm_slots = using.classifier, using.llm_client, using.llm_slots
        await conversations.fresh_examples(using.settings, classifier, llm_client, holder)
        async with llm_slots.admitted(request):  # 503 llm_busy at once when API_MAX_WAITING wait already
            try:
                body = await _read_body(request)
            except ClientDisconnect:
                logger.info("a client left before its turn, its body unread; not sent to the model")
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            raw, conversation = await llm_slots.read(read_classify_body, body)
            body_bytes = len(body)
            del body  # parsed: the bytes can go while the request waits for its turn
            try:
                outcome = await llm_slots.run(request, classifier.classify, conversation, llm_client)
            except ClientLeftError:
                logger.info(
                    "conversation %s: the client left before its turn; not sent to the model",
                    conversation.conversation_number,
                )
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            field = conversation.source_field
            answer = {
                "conversation_number": conversation.conversation_number,
                field: raw[field],  # the body as received, echoed unchanged
                "classification": outcome.classification.model_dump(),
            }
            # Serialising a large echo is CPU too: in a worker thread, as parsing it was.
            response = (JSONResponse(answer) if body_bytes <= INLINE_BYTES
                        else await run_in_threadpool(JSONResponse, answer))
        logger.info(
            "classified conversation %s (%d %s) in %d ms: %s",
            conversation.conversation_number,
            len(raw[field]),
            field,
            (time.perf_counter() - started) * 1000,
            " / ".join(outcome.classification.labels.values()),
        )
        return response

    @app.get("/health", summary="Liveness: the process answers (no Ollama call)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: Ollama answers and the model is pulled",
        responses={503: ERROR_RESPONSES[503]},
    )
    async def ready(settings: SettingsDep, llm_client: LLMClientDep, embedded: EmbeddedLLMDep) -> dict[str, Any]:
        """Ready when at least one LLM server answers with the model; each server is reported.

        It only reports: however slow or failed a server's answer here, its circuit breaker is left
        as it is (only /classify calls move it), so an unauthenticated probe cannot pause a server."""
        # None ready: the first server's typed error (503 with its hint).
        statuses = await run_in_threadpool(lambda: llm_client.readiness(require_one=True))
        answer = {"status": "ready", "model": settings.llm_model, "endpoint": _endpoint_names(llm_client),
                  "servers": [status.as_dict() for status in statuses]}
        if embedded:  # nobody should take its labels for a real model's
            answer["embedded"] = embedded
        return answer


class _AppFromEnvironment:
    """The application of ``uvicorn main:app``: built from the environment when the server starts.

    Importing ``main`` must read and connect nothing, yet the app (its body limit, its routes)
    is built from the settings. So the settings are loaded on the first ASGI event, the
    lifespan's ``startup``: a configuration error then fails the start-up with its one-line
    message (uvicorn exits 3), as ``python main.py`` does.
    """

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    def _build(self) -> FastAPI:
        if self._app is None:
            settings = load_settings()
            configure_logging(settings.log_level)
            # The taxonomy and few-shot files are read now too, so that their errors are one line as well.
            self._app = create_app(settings, classifier=ConversationClassifier.from_settings(settings))
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None or scope["type"] != "lifespan":
            # (Without a lifespan, e.g. `uvicorn --lifespan off`, the first request builds it.)
            await self._build()(scope, receive, send)
            return
        startup = await receive()
        try:
            app = self._build()
        except ConfigError as e:
            await send({"type": "lifespan.startup.failed", "message": f"error: {e}"})
            return
        replayed = False

        async def receive_again() -> ASGIMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        await app(scope, receive_again, send)


def app_from_environment() -> ASGIApp:
    """For ``uvicorn main:app``: an ASGI app that loads the settings when the server starts."""
    return _AppFromEnvironment()

