"""Ollama chat client (synchronous, ``requests``) and the parts both LLM wrappers share.

The request payload (:func:`build_chat_payload`) and the reading of Ollama's answer
(:func:`parse_chat_response`, :func:`error_from_response`) live here and are used by
``async_llm_wrapper`` too: only the transport differs between the two.

Ollama's API: ``POST /api/chat`` answers ``{"message": {"role", "content"}, "done",
"done_reason", durations (ns), "prompt_eval_count", "eval_count"}``; failures are
``{"error": "..."}`` with 404 for a model that is not pulled, 503 when its queue is
full ("server busy") and 500 when the model runner fails.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError

from config import Settings
from logger import redact_url
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

logger = logging.getLogger(__name__)

#: Seconds allowed to open a TCP connection to Ollama (the answer itself gets OLLAMA_TIMEOUT).
CONNECT_TIMEOUT_SECONDS = 10.0
#: Seconds allowed for the readiness check (GET /api/tags), which does no inference.
READY_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class ChatResult:
    """Ollama's answer to one chat request."""

    content: str
    model: str
    done_reason: str | None = None
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_count: int | None = None
    eval_duration_ns: int | None = None


def _keep_alive(value: str) -> str | int:
    # Ollama reads a JSON number as seconds and a string as a Go duration ("5m");
    # a bare "300" string would be rejected, so digits are sent as a number.
    return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()


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
    }


def _ollama_message(body: bytes) -> str:
    """Ollama's ``{"error": "..."}`` text, or a preview of a body of another shape."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return text[:200] or "(empty body)"


def server_name(settings: Settings) -> str:
    """The LLM server's URL as errors and logs show it: without its password."""
    return redact_url(settings.ollama_endpoint)


def unavailable_error(settings: Settings, reason: str) -> LLMUnavailableError:
    return LLMUnavailableError(
        f"Cannot reach Ollama at {server_name(settings)} ({reason}).",
        hint="Start Ollama (`ollama serve`) or set OLLAMA_ENDPOINT to where it runs.",
        endpoint=server_name(settings),
    )


def request_failed_error(settings: Settings, url: str, error: Exception) -> LLMError:
    """A request that failed otherwise; the library's text is left out when it could quote a password."""
    where = redact_url(url)
    if where != url:
        if isinstance(error, ValueError):  # e.g. requests' InvalidURL: '/' in a password cuts the host short
            return LLMUnavailableError(
                f"Cannot reach Ollama at {where}: the URL cannot be parsed ({type(error).__name__}).",
                hint="Percent-encode special characters of the user name and password in OLLAMA_ENDPOINT "
                "(/ as %2F, @ as %40, : as %3A, space as %20).",
                endpoint=server_name(settings),
            )
        return LLMServerError(f"Request to Ollama at {where} failed ({type(error).__name__}).")
    return LLMServerError(f"Request to Ollama at {url} failed: {error}")


def timeout_error(settings: Settings) -> LLMTimeoutError:
    return LLMTimeoutError(
        f"Ollama at {server_name(settings)} did not answer within {settings.ollama_timeout:g} s.",
        hint="Retry later, use a smaller model, or raise OLLAMA_TIMEOUT.",
        timeout_seconds=settings.ollama_timeout,
    )


def dropped_error(settings: Settings, reason: str) -> LLMServerError:
    return LLMServerError(
        f"Ollama at {server_name(settings)} closed the connection before answering ({reason}).",
        hint="Check the Ollama server's log; it may have crashed or run out of memory.",
    )


def error_from_response(status: int, body: bytes, settings: Settings) -> LLMError:
    """The typed error for a non-200 answer of Ollama."""
    message = _ollama_message(body)
    if status == 404:
        return ModelNotFoundError(settings.ollama_model, server_name(settings))
    if status == 503:
        return LLMBusyError(
            f"Ollama is busy: {message}",
            hint="Retry later, or raise OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE on the Ollama server.",
        )
    if 400 <= status < 500:
        return LLMRequestRejectedError(f"Ollama rejected the request (HTTP {status}): {message}")
    return LLMServerError(
        f"Ollama failed (HTTP {status}): {message}",
        hint="Check the Ollama server's log; the model runner may have crashed or run out of memory.",
    )


def parse_chat_response(status: int, body: bytes, settings: Settings) -> ChatResult:
    """Read an ``/api/chat`` answer; raise the matching :class:`LLMError` unless it is a complete reply."""
    if status != 200:
        raise error_from_response(status, body, settings)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise LLMOutputError(f"Ollama answered HTTP 200 with a body that is not JSON: {body[:120]!r}") from e
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
    )


def _with_latest(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def require_model(body: bytes, status: int, settings: Settings) -> None:
    """Check a ``GET /api/tags`` answer lists the configured model (``llama3`` == ``llama3:latest``)."""
    if status != 200:
        raise error_from_response(status, body, settings)
    try:
        models = json.loads(body).get("models") or []
        names = {_with_latest(str(m.get("name") or m.get("model"))) for m in models}
    except (ValueError, AttributeError) as e:
        raise LLMServerError(f"Ollama's /api/tags answer is not the expected JSON: {body[:120]!r}") from e
    if _with_latest(settings.ollama_model) not in names:
        raise ModelNotFoundError(settings.ollama_model, server_name(settings))


def _could_not_connect(error: requests.exceptions.ConnectionError) -> bool:
    """True when no connection was made (refused, unknown host), False when one was dropped."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    reason = error.args[0] if error.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


class OllamaClient:
    """Synchronous Ollama client over one pooled ``requests.Session``; close it (or use ``with``)."""

    def __init__(self, settings: Settings, *, pool_size: int = 64) -> None:
        self.settings = settings
        self._session = requests.Session()
        # The API calls this from many worker threads at once; the pool must hold
        # that many connections or urllib3 discards and reopens them.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._timeout = (min(CONNECT_TIMEOUT_SECONDS, settings.ollama_timeout), settings.ollama_timeout)

    def __enter__(self) -> OllamaClient:
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
        """One classification call: ``POST /api/chat``; raises an :class:`LLMError` on any failure."""
        payload = build_chat_payload(self.settings, messages, schema)
        response = self._request("POST", "/api/chat", self._timeout, json=payload)
        return parse_chat_response(response.status_code, response.content, self.settings)

    def check_ready(self) -> None:
        """Raise unless Ollama answers and has the configured model (``GET /api/tags``, no inference)."""
        timeout = min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout)
        response = self._request("GET", "/api/tags", timeout)
        require_model(response.content, response.status_code, self.settings)
