"""LLM chat clients (synchronous, ``requests``) and the provider table both clients read.

A provider is one entry of :data:`PROVIDERS`, chosen by ``LLM_PROVIDER``: a :class:`Provider` that
holds everything that differs between LLM APIs, as data and pure functions (paths, the request
body, reading an answer, mapping an error answer to a typed error, the readiness check, headers,
how messages name the server, the hint for an unreachable one). The sync :class:`LLMClient` here
and ``async_llm_wrapper.AsyncLLMClient`` call the same functions; only the transport differs. A
third provider is a third entry (docs/architecture.md, "Change walk: add a provider").

* ``ollama``: Ollama's ``POST /api/chat`` answers ``{"message": {"role", "content"}, "done",
  "done_reason", durations (ns), "prompt_eval_count", "eval_count", "logprobs"}``; failures are
  ``{"error": "..."}`` with 404 for a model that is not pulled, 503 when its queue is full
  ("server busy") and 500 when the model runner fails. Readiness: ``GET /api/tags``.
* ``openai``: any OpenAI-compatible server (vLLM, llama.cpp's llama-server, LM Studio, LiteLLM,
  Ollama's ``/v1``): ``POST {endpoint}/chat/completions`` with ``response_format`` json_schema,
  answers ``{"choices": [{"message", "finish_reason", "logprobs"}], "usage"}``; failures are
  ``{"error": {"message", "type", "code"}}`` (vLLM: ``{"object": "error", "message", ...}``).
  Readiness: ``GET {endpoint}/models``.

:func:`create_llm_client` is the one way to get a client for a :class:`Settings`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from config import Settings
from error_handler import (
    LLMBusyError,
    LLMError,
    LLMOutputError,
    LLMRequestRejectedError,
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    ModelNotFoundError,
)
from logger import redact_url

if TYPE_CHECKING:
    import requests
# requests (with urllib3) is imported by the synchronous client below, the API's: the batch processor
# reads the provider table here but never makes a synchronous call, and its start-up need not pay
# for the import (issue 19).

logger = logging.getLogger(__name__)

#: Seconds allowed to open a TCP connection to Ollama (the answer itself gets OLLAMA_TIMEOUT).
CONNECT_TIMEOUT_SECONDS = 10.0
#: Seconds allowed for the readiness check (GET /api/tags), which does no inference.
READY_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the most likely alternatives at its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChatResult:
    """The server's answer to one chat request.

    ``prompt_eval_count`` is the prompt tokens the server evaluated (for OpenAI-compatible servers:
    prompt tokens minus cached ones), ``eval_count`` the tokens generated; ``prompt_tokens`` the
    whole prompt and ``cached_prompt_tokens`` the part served from the prompt cache, when the
    server says. ``logprobs`` is None when the server sent no log-probabilities.
    """

    content: str
    model: str
    done_reason: str | None = None
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_count: int | None = None
    eval_duration_ns: int | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None

    def token_counts(self) -> dict[str, int | None]:
        """What the answer cost, as stored with batch results (None where the server did not say)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.eval_count,
        }


def _logprob_request(settings: Settings) -> dict[str, Any]:
    # Both APIs spell it the same way; the alternatives are what label confidences are computed from.
    # Only asked for when confidences are wanted (CONFIDENCE=on): the server ranks the vocabulary per token.
    if not settings.confidence or settings.llm_top_logprobs <= 0:
        return {}
    return {"logprobs": True, "top_logprobs": settings.llm_top_logprobs}


def _token_logprobs(entries: Any) -> tuple[TokenLogprob, ...] | None:
    """``[{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]`` (both APIs), or None."""
    if not isinstance(entries, list) or not entries:
        return None
    tokens = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        try:
            top = tuple(
                (str(alt["token"]), float(alt["logprob"]))
                for alt in entry.get("top_logprobs") or []
                if isinstance(alt, dict) and isinstance(alt.get("token"), str)
            )
            tokens.append(TokenLogprob(entry["token"], float(entry["logprob"]), top))
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
            return None  # a malformed entry: no confidence, never an error
    return tuple(tokens)


def _error_message(body: bytes, *keys: str) -> str:
    """The first of ``keys`` (a dotted path: ``error.message``) that is a string in the JSON ``body``,
    else a preview of the body (not JSON, or of another shape)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    for key in keys:
        value = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return text[:200] or "(empty body)"


def server_kind(settings: Settings, *, capital: bool = False) -> str:
    """How messages call the server: its provider's ``display_name`` ('Ollama', 'the LLM server')."""
    return provider_for(settings).server_kind(capital=capital)


def server_name(settings: Settings) -> str:
    """The LLM server's URL as errors and logs show it: without its password."""
    return redact_url(settings.llm_endpoint)


def unavailable_error(settings: Settings, reason: str) -> LLMUnavailableError:
    return LLMUnavailableError(
        f"Cannot reach {server_kind(settings)} at {server_name(settings)} ({reason}).",
        hint=provider_for(settings).unavailable_hint,
        endpoint=server_name(settings),
    )


def request_failed_error(settings: Settings, url: str, error: Exception) -> LLMError:
    """A request that failed otherwise; the library's text is left out when it could quote a password."""
    where = redact_url(url)
    if where != url:
        if isinstance(error, ValueError):  # e.g. requests' InvalidURL: '/' in a password cuts the host short
            return LLMUnavailableError(
                f"Cannot reach {server_kind(settings)} at {where}: the URL cannot be parsed ({type(error).__name__}).",
                hint="Percent-encode special characters of the user name and password in LLM_ENDPOINT "
                "(/ as %2F, @ as %40, : as %3A, space as %20).",
                endpoint=server_name(settings),
            )
        return LLMServerError(f"Request to {server_kind(settings)} at {where} failed ({type(error).__name__}).")
    return LLMServerError(f"Request to {server_kind(settings)} at {url} failed: {error}")


def timeout_error(settings: Settings) -> LLMTimeoutError:
    return LLMTimeoutError(
        f"{server_kind(settings, capital=True)} at {server_name(settings)} did not answer within "
        f"{settings.ollama_timeout:g} s.",
        hint="Retry later, use a smaller model, or raise OLLAMA_TIMEOUT.",
        timeout_seconds=settings.ollama_timeout,
    )


def dropped_error(settings: Settings, reason: str) -> LLMServerError:
    return LLMServerError(
        f"{server_kind(settings, capital=True)} at {server_name(settings)} closed the connection before "
        f"answering ({reason}).",
        hint=f"Check the log of {server_kind(settings)}; it may have crashed or run out of memory.",
    )


def retry_after_seconds(headers: Mapping[str, str] | None, now: datetime | None = None) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    # A server asking for hours would stall the API's clients; cap it (the batch retries anyway).
    return min(max(seconds, 0.0), 300.0)


def _answer_json(body: bytes, who: str) -> Any:
    """The JSON of an HTTP 200 answer; a body that is not JSON is the server's fault (LLMOutputError)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the interpreter's limit
        raise LLMOutputError(f"{who} answered HTTP 200 with a body that is not JSON: {body[:120]!r}") from e


# --- Ollama ---------------------------------------------------------------------------------------


def _keep_alive(value: str) -> str | int:
    # Ollama reads a JSON number as seconds and a string as a Go duration ("5m");
    # a bare "300" string would be rejected, so digits are sent as a number.
    return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()


def build_ollama_payload(settings: Settings, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
    """Ollama: the body of ``POST /api/chat``: non-streaming, no thinking, deterministic, bounded, schema-bound."""
    return {
        "model": settings.llm_model,
        "messages": messages,
        "stream": False,
        "think": False,
        "format": schema,
        "options": {"temperature": 0, "num_predict": settings.ollama_num_predict},
        "keep_alive": _keep_alive(settings.ollama_keep_alive),
        **_logprob_request(settings),
    }


def _ollama_message(body: bytes) -> str:
    """Ollama's ``{"error": "..."}`` text, or a preview of a body of another shape."""
    return _error_message(body, "error")


def ollama_error(status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None) -> LLMError:
    """Ollama: the typed error for a non-200 answer."""
    message = _ollama_message(body)
    if status == 404:
        return ModelNotFoundError(settings.llm_model, server_name(settings))
    if status in (429, 503):
        return LLMBusyError(
            f"Ollama is busy: {message}",
            hint="Retry later, or raise OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE on the Ollama server.",
            retry_after_seconds=retry_after_seconds(headers),
        )
    if 400 <= status < 500:
        return LLMRequestRejectedError(f"Ollama rejected the request (HTTP {status}): {message}")
    return LLMServerError(
        f"Ollama failed (HTTP {status}): {message}",
        hint="Check the Ollama server's log; the model runner may have crashed or run out of memory.",
    )


def read_ollama_answer(data: Any, settings: Settings) -> ChatResult:
    """Ollama: read the JSON of an HTTP 200 ``/api/chat`` answer; :class:`LLMOutputError` unless it is a
    complete reply."""
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise LLMOutputError(f"Ollama's answer has no message.content: {str(data)[:200]}")
    done_reason = data.get("done_reason")
    if data.get("done") is False or done_reason == "length":
        raise LLMOutputError(
            f"The model's answer was cut off after {data.get('eval_count', '?')} tokens "
            f"(done={data.get('done')}, done_reason={done_reason!r}).",
            hint=f"Raise OLLAMA_NUM_PREDICT (now {settings.ollama_num_predict}).",
        )
    content = message["content"].strip()
    if not content:
        raise LLMOutputError("The model answered with empty content.")
    return ChatResult(
        content=content,
        model=str(data.get("model", settings.llm_model)),
        done_reason=done_reason,
        total_duration_ns=data.get("total_duration"),
        load_duration_ns=data.get("load_duration"),
        prompt_eval_count=data.get("prompt_eval_count"),
        prompt_eval_duration_ns=data.get("prompt_eval_duration"),
        eval_count=data.get("eval_count"),
        eval_duration_ns=data.get("eval_duration"),
        prompt_tokens=data.get("prompt_eval_count"),
        logprobs=_token_logprobs(data.get("logprobs")),
    )


def _with_latest(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def check_ollama_models(body: bytes, settings: Settings) -> None:
    """Ollama: check an HTTP 200 ``GET /api/tags`` answer lists the configured model (``llama3`` ==
    ``llama3:latest``)."""
    try:
        models = json.loads(body).get("models") or []
        names = {_with_latest(str(m.get("name") or m.get("model"))) for m in models}
    except (ValueError, AttributeError) as e:
        raise LLMServerError(f"Ollama's /api/tags answer is not the expected JSON: {body[:120]!r}") from e
    if _with_latest(settings.llm_model) not in names:
        raise ModelNotFoundError(settings.llm_model, server_name(settings))


# --- OpenAI-compatible servers ---------------------------------------------------------------

#: The name the schema is sent under in ``response_format`` (OpenAI requires one).
SCHEMA_NAME = "conversation_classification"

_MODEL_MISSING = re.compile(r"model\b.*\b(does not exist|not found|not exist|is not (served|available|loaded))", re.I)


def build_openai_payload(settings: Settings, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
    """The body of ``POST {endpoint}/chat/completions``: the same messages and schema as Ollama's."""
    return {
        "model": settings.llm_model,
        "messages": messages,
        "stream": False,
        "temperature": 0,
        "max_tokens": settings.ollama_num_predict,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema},
        },
        **_logprob_request(settings),
    }


def _openai_message(body: bytes) -> str:
    """The message of ``{"error": {"message"}}``, ``{"error": "..."}``, vLLM's ``{"message"}``, or a preview."""
    return _error_message(body, "error.message", "error", "message", "detail")


def openai_model_missing(settings: Settings, served: list[str] | None = None) -> ModelNotFoundError:
    listed = f" It serves: {', '.join(served[:10])}." if served else ""
    return ModelNotFoundError(
        settings.llm_model,
        server_name(settings),
        server="LLM server",
        hint=f"Set LLM_MODEL to a model the server serves (GET {server_name(settings)}/models lists them), "
        f"and check that LLM_ENDPOINT is its base URL, usually ending in /v1.{listed}",
    )


def openai_error(status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None) -> LLMError:
    """OpenAI-compatible: the typed error for a non-200 answer (the same types as Ollama's)."""
    message = _openai_message(body)
    if status == 404 or (400 <= status < 500 and _MODEL_MISSING.search(message)):
        return openai_model_missing(settings)
    if status in (429, 503):
        return LLMBusyError(
            f"The LLM server is busy (HTTP {status}): {message}",
            hint="Retry later, or give the server more parallel slots or replicas.",
            retry_after_seconds=retry_after_seconds(headers),
        )
    if status in (401, 403):
        return LLMRequestRejectedError(
            f"The LLM server refused the credentials (HTTP {status}): {message}",
            hint="Set LLM_API_KEY to a key the server accepts.",
        )
    if 400 <= status < 500:
        return LLMRequestRejectedError(f"The LLM server rejected the request (HTTP {status}): {message}")
    return LLMServerError(
        f"The LLM server failed (HTTP {status}): {message}",
        hint="Check the LLM server's log; it may have crashed or run out of memory.",
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (optional parts of an answer)."""
    return value if isinstance(value, dict) else {}


def _ms_to_ns(value: Any) -> int | None:
    return int(value * 1_000_000) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_openai_answer(data: Any, settings: Settings) -> ChatResult:
    """OpenAI-compatible: read the JSON of an HTTP 200 ``/chat/completions`` answer; :class:`LLMOutputError`
    unless it is a complete reply."""
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    message = choice.get("message") if choice else None
    if not isinstance(message, dict):
        raise LLMOutputError(f"The LLM server's answer has no choices[0].message: {str(data)[:200]}")
    assert choice is not None
    usage = _object(data.get("usage"))
    finish_reason = choice.get("finish_reason")
    if finish_reason == "length":
        raise LLMOutputError(
            f"The model's answer was cut off after {usage.get('completion_tokens', '?')} tokens "
            f"(finish_reason='length').",
            hint=f"Raise OLLAMA_NUM_PREDICT (now {settings.ollama_num_predict}).",
        )
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            raise LLMOutputError(f"The model refused to answer: {refusal[:200]}")
        raise LLMOutputError(f"The model answered with empty content (finish_reason={finish_reason!r}).")
    # llama.cpp adds "timings" (ms, and cache_n); OpenAI and vLLM report cached tokens in usage.
    timings = _object(data.get("timings"))
    details = _object(usage.get("prompt_tokens_details"))
    prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
    cached = _int_or_none(details.get("cached_tokens"))
    if cached is None:
        cached = _int_or_none(timings.get("cache_n"))
    evaluated = prompt_tokens - cached if prompt_tokens is not None and cached is not None else prompt_tokens
    prompt_ns, predicted_ns = _ms_to_ns(timings.get("prompt_ms")), _ms_to_ns(timings.get("predicted_ms"))
    logprobs = _object(choice.get("logprobs"))
    return ChatResult(
        content=content.strip(),
        model=str(data.get("model") or settings.llm_model),
        done_reason=finish_reason,
        total_duration_ns=(prompt_ns or 0) + (predicted_ns or 0) if timings else None,
        prompt_eval_count=evaluated,
        prompt_eval_duration_ns=prompt_ns,
        eval_count=_int_or_none(usage.get("completion_tokens")),
        eval_duration_ns=predicted_ns,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=cached,
        logprobs=_token_logprobs(logprobs.get("content")),
    )


def check_openai_models(body: bytes, settings: Settings) -> None:
    """OpenAI-compatible: check an HTTP 200 ``GET {endpoint}/models`` answer (``{"data": [{"id"}]}``) lists
    the configured model."""
    try:
        served = [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise LLMServerError(
            f"The LLM server's /models answer is not the expected JSON: {body[:120]!r}",
            hint="Check that LLM_ENDPOINT is the server's OpenAI-compatible base URL, usually ending in /v1.",
        ) from e
    if settings.llm_model not in served:
        raise openai_model_missing(settings, served)


def bearer_headers(settings: Settings) -> dict[str, str]:
    """OpenAI-compatible: ``Authorization: Bearer <LLM_API_KEY>`` when a key is set (never logged: SecretStr)."""
    if settings.llm_api_key is None:
        return {}
    return {"Authorization": f"Bearer {settings.llm_api_key.get_secret_value()}"}


def no_headers(settings: Settings) -> dict[str, str]:
    return {}


# --- embeddings (similar reviewed conversations, retrieval.py) ------------------------------

#: How much of a transcript is embedded: embedding models have short contexts, and llama.cpp
#: refuses (rather than cuts) an input longer than its batch.
EMBED_CHARS = 2000


def build_ollama_embed_payload(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """The body of Ollama's ``POST /api/embed``: EMBEDDING_MODEL, one input per text, cut to its context."""
    return {"model": settings.embedding_model, "input": [text[:EMBED_CHARS] for text in texts], "truncate": True,
            "keep_alive": _keep_alive(settings.ollama_keep_alive)}


def build_openai_embed_payload(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """The body of ``POST {endpoint}/embeddings`` (OpenAI-compatible)."""
    return {"model": settings.embedding_model, "input": [text[:EMBED_CHARS] for text in texts],
            "encoding_format": "float"}


def _vectors(rows: Any, count: int, who: str) -> list[list[float]]:
    if not isinstance(rows, list) or len(rows) != count:
        raise LLMOutputError(f"{who}'s embeddings answer has {len(rows) if isinstance(rows, list) else 'no'} "
                             f"vectors for {count} inputs.")
    vectors = []
    for row in rows:
        if not isinstance(row, list) or not row or not all(isinstance(v, (int, float)) for v in row):
            raise LLMOutputError(f"{who}'s embeddings answer holds a vector that is not a list of numbers.")
        vectors.append([float(v) for v in row])
    if len({len(v) for v in vectors}) > 1:
        raise LLMOutputError(f"{who}'s embeddings answer holds vectors of different lengths.")
    return vectors


def _embedding_model_missing(settings: Settings, error: LLMError) -> LLMError:
    # The chat model's hint would be wrong here: it is EMBEDDING_MODEL that is missing.
    if isinstance(error, ModelNotFoundError):
        return ModelNotFoundError(settings.embedding_model, server_name(settings), server=server_kind(settings),
                                  hint="Set EMBEDDING_MODEL to an embedding model the server has "
                                  f"(Ollama: `ollama pull {settings.embedding_model}`), or leave it empty for "
                                  "the lexical index.")
    return error


def read_ollama_embeddings(data: Any, count: int, who: str) -> list[list[float]]:
    """Ollama's ``{"embeddings": [[...], ...]}``, one vector per input, in order."""
    return _vectors(data.get("embeddings") if isinstance(data, dict) else None, count, who)


def read_openai_embeddings(data: Any, count: int, who: str) -> list[list[float]]:
    """``{"data": [{"index", "embedding"}, ...]}``, put back in input order by ``index``."""
    rows = data.get("data") if isinstance(data, dict) else None
    if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        rows = [r.get("embedding") for r in sorted(rows, key=lambda r: int(r.get("index", 0)))]
    return _vectors(rows, count, who)


# --- the provider table ------------------------------------------------------------------------




@dataclass(frozen=True)
class Provider:
    """One LLM API: what differs between providers, as data and pure functions of the settings.

    The transports do the I/O and call these; :func:`read_chat` and :func:`read_ready` apply the
    parts every provider shares (a non-200 status is an error answer, a 200 chat answer is JSON).
    """

    #: How messages name the server: "Cannot reach {display_name} at ...".
    display_name: str
    #: Appended to the endpoint for a chat call and for the readiness check.
    chat_path: str
    ready_path: str
    #: The request body of one chat call: (settings, messages, JSON schema of the answer) -> body.
    build_payload: Callable[[Settings, list[dict[str, str]], dict[str, Any]], dict[str, Any]]
    #: The JSON of an HTTP 200 chat answer -> ChatResult; LLMOutputError unless a complete reply.
    read_answer: Callable[[Any, Settings], ChatResult]
    #: A non-200 answer (status, body, settings, headers) -> the typed LLMError to raise.
    map_error: Callable[[int, bytes, Settings, Mapping[str, str] | None], LLMError]
    #: The body of an HTTP 200 readiness answer: raise (ModelNotFoundError, ...) unless the model is served.
    check_models: Callable[[bytes, Settings], None]
    #: The hint of LLMUnavailableError: how to start the server or point the endpoint at it.
    unavailable_hint: str
    #: Headers every request carries (credentials).
    headers: Callable[[Settings], dict[str, str]] = no_headers
    #: Embeddings (retrieval of similar reviewed conversations): the path, the body of one call
    #: (settings, texts), and the JSON of an HTTP 200 answer -> one vector per text (data, count,
    #: server name). None: the provider has no embeddings API (retrieval then uses its lexical index).
    embed_path: str | None = None
    build_embed: Callable[[Settings, list[str]], dict[str, Any]] | None = None
    read_embeddings: Callable[[Any, int, str], list[list[float]]] | None = None

    def server_kind(self, *, capital: bool = False) -> str:
        return self.display_name[:1].upper() + self.display_name[1:] if capital else self.display_name


#: LLM_PROVIDER -> its API. The settings accept exactly these names; a new provider is a new entry.
PROVIDERS: dict[str, Provider] = {
    "ollama": Provider(
        display_name="Ollama",
        chat_path="/api/chat",
        ready_path="/api/tags",
        build_payload=build_ollama_payload,
        read_answer=read_ollama_answer,
        map_error=ollama_error,
        check_models=check_ollama_models,
        unavailable_hint="Start Ollama (`ollama serve`) or set LLM_ENDPOINT to where it runs.",
        embed_path="/api/embed",
        build_embed=build_ollama_embed_payload,
        read_embeddings=read_ollama_embeddings,
    ),
    "openai": Provider(
        display_name="the LLM server",
        chat_path="/chat/completions",
        ready_path="/models",
        build_payload=build_openai_payload,
        read_answer=read_openai_answer,
        map_error=openai_error,
        check_models=check_openai_models,
        unavailable_hint="Start the OpenAI-compatible server (vLLM, llama-server, LM Studio, ...) or set "
        "LLM_ENDPOINT to its base URL, e.g. http://localhost:8000/v1.",
        headers=bearer_headers,
        embed_path="/embeddings",
        build_embed=build_openai_embed_payload,
        read_embeddings=read_openai_embeddings,
    ),
}


def provider_for(settings: Settings) -> Provider:
    """The entry of :data:`PROVIDERS` that LLM_PROVIDER names (the settings accept no other name)."""
    return PROVIDERS[settings.llm_provider]


def read_chat(
    provider: Provider, settings: Settings, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> ChatResult:
    """The answer to a chat call: the provider's typed error unless HTTP 200, else its reading of the JSON."""
    if status != 200:
        raise provider.map_error(status, body, settings, headers)
    return provider.read_answer(_answer_json(body, provider.server_kind(capital=True)), settings)


def embed_request(provider: Provider, settings: Settings, texts: list[str]) -> tuple[str, dict[str, Any]]:
    """The path and body of one embeddings call; LLMRequestRejectedError when the provider has none."""
    if provider.embed_path is None or provider.build_embed is None:
        raise LLMRequestRejectedError(f"{provider.server_kind(capital=True)} has no embeddings API in this project.")
    return provider.embed_path, provider.build_embed(settings, texts)


def read_embed(
    provider: Provider, settings: Settings, status: int, body: bytes, count: int,
    headers: Mapping[str, str] | None = None,
) -> list[list[float]]:
    """The answer to an embeddings call: one vector per text, in order, or the typed error."""
    if status != 200:
        raise _embedding_model_missing(settings, provider.map_error(status, body, settings, headers))
    who = provider.server_kind(capital=True)
    assert provider.read_embeddings is not None  # embed_request refused a provider without it
    return provider.read_embeddings(_answer_json(body, who), count, who)


def read_ready(
    provider: Provider, settings: Settings, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    """The answer to the readiness check: raise the provider's typed error unless it serves the model."""
    if status != 200:
        raise provider.map_error(status, body, settings, headers)
    provider.check_models(body, settings)


def _could_not_connect(error: requests.exceptions.ConnectionError) -> bool:
    """True when no connection was made (refused, unknown host), False when one was dropped."""
    import requests
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    reason = error.args[0] if error.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


def _environment_once(session: requests.Session, endpoint: str) -> None:
    """Read the proxy, CA bundle and ``~/.netrc`` settings of the environment for ``endpoint`` once,
    as requests would on every request: every call goes to that endpoint, and requests' own lookup
    (every environment variable scanned, twice, per request) was a good part of the API's overhead
    per ``/classify`` (issue 19)."""
    import requests.utils

    found = session.merge_environment_settings(endpoint, {}, None, None, None)
    session.proxies.update(found["proxies"])
    session.verify, session.cert = found["verify"], found["cert"]
    session.auth = requests.utils.get_netrc_auth(endpoint)  # None without an entry for its host
    session.trust_env = False


class LLMClient:
    """Synchronous client of the configured provider (its :class:`Provider` entry) over one pooled ``requests.Session``;
    close it (or use ``with``). Build it with :func:`create_llm_client`."""

    def __init__(self, settings: Settings, *, pool_size: int = 64) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self.settings = settings
        self.provider = provider_for(settings)
        self._session = requests.Session()
        self._session.headers.update(self.provider.headers(settings))
        # The API calls this from many worker threads at once; the pool must hold
        # that many connections or urllib3 discards and reopens them.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._adapter = adapter
        _environment_once(self._session, settings.llm_endpoint)
        self._timeout = (min(CONNECT_TIMEOUT_SECONDS, settings.ollama_timeout), settings.ollama_timeout)

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, timeout: Any, payload: Any = None) -> requests.Response:
        import requests  # (imported already by __init__: a dictionary lookup)

        url = f"{self.settings.llm_endpoint}{path}"
        try:
            return self._send(method, url, timeout, payload)
        except requests.exceptions.ConnectionError as e:
            if _could_not_connect(e):
                raise unavailable_error(self.settings, "connection refused or host unknown") from e
            raise dropped_error(self.settings, type(e).__name__) from e
        except requests.exceptions.Timeout as e:
            raise timeout_error(self.settings) from e
        except requests.exceptions.RequestException as e:
            raise request_failed_error(self.settings, url, e) from e

    def _send(self, method: str, url: str, timeout: Any, payload: Any) -> requests.Response:
        """One request, prepared here and handed to the session's transport adapter.

        ``Session.request`` merges the session's settings into every request (runtime-checked
        Protocols, hooks, cookies, redirects): about a third of the API's CPU per ``/classify``
        outside the model's answer (cProfile, issue 19). Every call goes to the one endpoint whose
        environment was read once (:func:`_environment_once`), so this prepares the request from
        those settings directly, the way ``Session.send`` hands it to the adapter. A redirect is
        still followed, by the session, as before."""
        import requests

        session = self._session
        prepared = requests.PreparedRequest()
        if payload is None:
            prepared.prepare(method=method, url=url, headers=session.headers, auth=session.auth)
        else:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
            prepared.prepare(method=method, url=url, headers={**session.headers, "Content-Type": "application/json"},
                             data=body, auth=session.auth)
        verify = True if session.verify is None else session.verify  # (requests' own default)
        response = self._adapter.send(prepared, timeout=timeout, proxies=session.proxies, verify=verify,
                                      cert=session.cert)
        if response.is_redirect:  # rare for an LLM server (a proxy in front of it): let the session follow it
            response.close()
            return session.request(method, url, timeout=timeout, **({} if payload is None else {"json": payload}))
        response.content  # noqa: B018  (read it now, within the timeout, as Session.request does)
        return response

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult:
        """One classification call; raises an :class:`LLMError` on any failure."""
        payload = self.provider.build_payload(self.settings, messages, schema)
        response = self._request("POST", self.provider.chat_path, self._timeout, payload)
        return read_chat(self.provider, self.settings, response.status_code, response.content, response.headers)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text from EMBEDDING_MODEL; raises an :class:`LLMError` on any failure."""
        path, payload = embed_request(self.provider, self.settings, texts)
        response = self._request("POST", path, self._timeout, payload)
        return read_embed(self.provider, self.settings, response.status_code, response.content, len(texts),
                          response.headers)

    def check_ready(self) -> None:
        """Raise unless the server answers and has the configured model (lists its models, no inference)."""
        timeout = min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout)
        response = self._request("GET", self.provider.ready_path, timeout)
        read_ready(self.provider, self.settings, response.status_code, response.content, response.headers)


def create_llm_client(settings: Settings, *, pool_size: int = 64) -> LLMClient:
    """The synchronous client for ``settings`` (its provider, endpoint, model and key)."""
    return LLMClient(settings, pool_size=pool_size)
