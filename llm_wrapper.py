"""LLM chat clients (synchronous, ``requests``) and the protocol parts both wrappers share.

Two providers, chosen by ``LLM_PROVIDER``:

* ``ollama``: Ollama's ``POST /api/chat`` answers ``{"message": {"role", "content"}, "done",
  "done_reason", durations (ns), "prompt_eval_count", "eval_count", "logprobs"}``; failures are
  ``{"error": "..."}`` with 404 for a model that is not pulled, 503 when its queue is full
  ("server busy") and 500 when the model runner fails. Readiness: ``GET /api/tags``.
* ``openai``: any OpenAI-compatible server (vLLM, llama.cpp's llama-server, LM Studio, LiteLLM,
  Ollama's ``/v1``): ``POST {endpoint}/chat/completions`` with ``response_format`` json_schema,
  answers ``{"choices": [{"message", "finish_reason", "logprobs"}], "usage"}``; failures are
  ``{"error": {"message", "type", "code"}}`` (vLLM: ``{"object": "error", "message", ...}``).
  Readiness: ``GET {endpoint}/models``.

Each provider is a :class:`Protocol` of pure functions (build the body, read the answer, map an
error); ``async_llm_wrapper`` uses the same ones, so only the transport differs between the two.
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
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError

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


def _keep_alive(value: str) -> str | int:
    # Ollama reads a JSON number as seconds and a string as a Go duration ("5m");
    # a bare "300" string would be rejected, so digits are sent as a number.
    return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()


def _logprob_request(settings: Settings) -> dict[str, Any]:
    # Both APIs spell it the same way; the alternatives are what label confidences are computed from.
    # Only asked for when confidences are wanted (CONFIDENCE=on): the server ranks the vocabulary per token.
    if not settings.confidence or settings.llm_top_logprobs <= 0:
        return {}
    return {"logprobs": True, "top_logprobs": settings.llm_top_logprobs}


def build_chat_payload(settings: Settings, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
    """The body of ``POST /api/chat``: non-streaming, no thinking, deterministic, bounded, schema-constrained."""
    return {
        "model": settings.ollama_model,
        "messages": messages,
        "stream": False,
        "think": False,
        "format": schema,
        "options": {"temperature": 0, "num_predict": settings.ollama_num_predict},
        "keep_alive": _keep_alive(settings.ollama_keep_alive),
        **_logprob_request(settings),
    }


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
        except (KeyError, TypeError, ValueError):
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


def _ollama_message(body: bytes) -> str:
    """Ollama's ``{"error": "..."}`` text, or a preview of a body of another shape."""
    return _error_message(body, "error")


def _is_openai(settings: Settings) -> bool:
    return settings.llm_provider == "openai"


def server_kind(settings: Settings, *, capital: bool = False) -> str:
    """How messages call the server: 'Ollama', or 'the LLM server' for an OpenAI-compatible one."""
    if _is_openai(settings):
        return "The LLM server" if capital else "the LLM server"
    return "Ollama"


def server_name(settings: Settings) -> str:
    """The LLM server's URL as errors and logs show it: without its password."""
    return redact_url(settings.ollama_endpoint)


def unavailable_error(settings: Settings, reason: str) -> LLMUnavailableError:
    if _is_openai(settings):
        hint = ("Start the OpenAI-compatible server (vLLM, llama-server, LM Studio, ...) or set OLLAMA_ENDPOINT "
                "to its base URL, e.g. http://localhost:8000/v1.")
    else:
        hint = "Start Ollama (`ollama serve`) or set OLLAMA_ENDPOINT to where it runs."
    return LLMUnavailableError(
        f"Cannot reach {server_kind(settings)} at {server_name(settings)} ({reason}).",
        hint=hint,
        endpoint=server_name(settings),
    )


def request_failed_error(settings: Settings, url: str, error: Exception) -> LLMError:
    """A request that failed otherwise; the library's text is left out when it could quote a password."""
    where = redact_url(url)
    if where != url:
        if isinstance(error, ValueError):  # e.g. requests' InvalidURL: '/' in a password cuts the host short
            return LLMUnavailableError(
                f"Cannot reach {server_kind(settings)} at {where}: the URL cannot be parsed ({type(error).__name__}).",
                hint="Percent-encode special characters of the user name and password in OLLAMA_ENDPOINT "
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


def error_from_response(
    status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None
) -> LLMError:
    """The typed error for a non-200 answer of Ollama."""
    message = _ollama_message(body)
    if status == 404:
        return ModelNotFoundError(settings.ollama_model, server_name(settings))
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


def _answer_json(body: bytes, who: str) -> Any:
    """The JSON of an HTTP 200 answer; a body that is not JSON is the server's fault (LLMOutputError)."""
    try:
        return json.loads(body)
    except ValueError as e:
        raise LLMOutputError(f"{who} answered HTTP 200 with a body that is not JSON: {body[:120]!r}") from e


def parse_chat_response(
    status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None
) -> ChatResult:
    """Read an ``/api/chat`` answer; raise the matching :class:`LLMError` unless it is a complete reply."""
    if status != 200:
        raise error_from_response(status, body, settings, headers)
    data = _answer_json(body, "Ollama")
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
        model=str(data.get("model", settings.ollama_model)),
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


def require_model(body: bytes, status: int, settings: Settings, headers: Mapping[str, str] | None = None) -> None:
    """Check a ``GET /api/tags`` answer lists the configured model (``llama3`` == ``llama3:latest``)."""
    if status != 200:
        raise error_from_response(status, body, settings, headers)
    try:
        models = json.loads(body).get("models") or []
        names = {_with_latest(str(m.get("name") or m.get("model"))) for m in models}
    except (ValueError, AttributeError) as e:
        raise LLMServerError(f"Ollama's /api/tags answer is not the expected JSON: {body[:120]!r}") from e
    if _with_latest(settings.ollama_model) not in names:
        raise ModelNotFoundError(settings.ollama_model, server_name(settings))


# --- OpenAI-compatible servers ---------------------------------------------------------------

#: The name the schema is sent under in ``response_format`` (OpenAI requires one).
SCHEMA_NAME = "conversation_classification"

_MODEL_MISSING = re.compile(r"model\b.*\b(does not exist|not found|not exist|is not (served|available|loaded))", re.I)


def build_openai_payload(settings: Settings, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
    """The body of ``POST {endpoint}/chat/completions``: the same messages and schema as Ollama's."""
    return {
        "model": settings.ollama_model,
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
        settings.ollama_model,
        server_name(settings),
        server="LLM server",
        hint=f"Set OLLAMA_MODEL to a model the server serves (GET {server_name(settings)}/models lists them), "
        f"and check that OLLAMA_ENDPOINT is its base URL, usually ending in /v1.{listed}",
    )


def openai_error_from_response(
    status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None
) -> LLMError:
    """The typed error for a non-200 answer of an OpenAI-compatible server (same types as Ollama's)."""
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


def parse_openai_response(
    status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None = None
) -> ChatResult:
    """Read a ``/chat/completions`` answer; raise the matching :class:`LLMError` unless it is a complete reply."""
    if status != 200:
        raise openai_error_from_response(status, body, settings, headers)
    data = _answer_json(body, "The LLM server")
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
        model=str(data.get("model") or settings.ollama_model),
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


def require_openai_model(
    body: bytes, status: int, settings: Settings, headers: Mapping[str, str] | None = None
) -> None:
    """Check a ``GET {endpoint}/models`` answer (``{"data": [{"id"}]}``) lists the configured model."""
    if status != 200:
        raise openai_error_from_response(status, body, settings, headers)
    try:
        served = [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError) as e:
        raise LLMServerError(
            f"The LLM server's /models answer is not the expected JSON: {body[:120]!r}",
            hint="Check that OLLAMA_ENDPOINT is the server's OpenAI-compatible base URL, usually ending in /v1.",
        ) from e
    if settings.ollama_model not in served:
        raise openai_model_missing(settings, served)


# --- the provider, chosen once from the settings --------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One provider's API: paths and the pure functions both transports call."""

    name: str
    chat_path: str
    ready_path: str
    build_payload: Callable[[Settings, list[dict[str, str]], dict[str, Any]], dict[str, Any]]
    parse_chat: Callable[[int, bytes, Settings, Mapping[str, str] | None], ChatResult]
    check_models: Callable[[bytes, int, Settings, Mapping[str, str] | None], None]


OLLAMA = Protocol("ollama", "/api/chat", "/api/tags", build_chat_payload, parse_chat_response, require_model)
OPENAI = Protocol(
    "openai", "/chat/completions", "/models", build_openai_payload, parse_openai_response, require_openai_model
)


def protocol_for(settings: Settings) -> Protocol:
    return OPENAI if _is_openai(settings) else OLLAMA


def request_headers(settings: Settings) -> dict[str, str]:
    """Headers every request carries: ``Authorization: Bearer <LLM_API_KEY>`` for an OpenAI-compatible
    server when a key is set (never logged: SecretStr); none for Ollama."""
    if not _is_openai(settings) or settings.llm_api_key is None:
        return {}
    return {"Authorization": f"Bearer {settings.llm_api_key.get_secret_value()}"}


def _could_not_connect(error: requests.exceptions.ConnectionError) -> bool:
    """True when no connection was made (refused, unknown host), False when one was dropped."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    reason = error.args[0] if error.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


class LLMClient:
    """Synchronous client of the configured provider over one pooled ``requests.Session``;
    close it (or use ``with``). Build it with :func:`create_llm_client`."""

    def __init__(self, settings: Settings, *, pool_size: int = 64) -> None:
        self.settings = settings
        self.protocol = protocol_for(settings)
        self._session = requests.Session()
        self._session.headers.update(request_headers(settings))
        # The API calls this from many worker threads at once; the pool must hold
        # that many connections or urllib3 discards and reopens them.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._timeout = (min(CONNECT_TIMEOUT_SECONDS, settings.ollama_timeout), settings.ollama_timeout)

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, timeout: Any, **kwargs: Any) -> requests.Response:
        url = f"{self.settings.ollama_endpoint}{path}"
        try:
            return self._session.request(method, url, timeout=timeout, **kwargs)
        except requests.exceptions.ConnectionError as e:
            if _could_not_connect(e):
                raise unavailable_error(self.settings, "connection refused or host unknown") from e
            raise dropped_error(self.settings, type(e).__name__) from e
        except requests.exceptions.Timeout as e:
            raise timeout_error(self.settings) from e
        except requests.exceptions.RequestException as e:
            raise request_failed_error(self.settings, url, e) from e

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult:
        """One classification call; raises an :class:`LLMError` on any failure."""
        payload = self.protocol.build_payload(self.settings, messages, schema)
        response = self._request("POST", self.protocol.chat_path, self._timeout, json=payload)
        return self.protocol.parse_chat(response.status_code, response.content, self.settings, response.headers)

    def check_ready(self) -> None:
        """Raise unless the server answers and has the configured model (lists its models, no inference)."""
        timeout = min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout)
        response = self._request("GET", self.protocol.ready_path, timeout)
        self.protocol.check_models(response.content, response.status_code, self.settings, response.headers)


def create_llm_client(settings: Settings, *, pool_size: int = 64) -> LLMClient:
    """The synchronous client for ``settings`` (its provider, endpoint, model and key)."""
    return LLMClient(settings, pool_size=pool_size)
