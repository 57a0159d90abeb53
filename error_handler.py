"""The project's exceptions, and the one error body the edges send.

Modules raise these typed exceptions (always ``raise ... from e`` when wrapping);
only the edges convert them: the FastAPI handlers (``status_code`` + the body of
:func:`error_body`), the batch item loop (a retry-queue entry with the error's
``code``) and the command lines (:func:`run_command` / :func:`fail`: the message and
:func:`exit_code_for` the error). ``transient`` says whether trying the same thing again
later may succeed; the retry policy in ``utils.retry_utils`` uses it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# The exit codes of every command line (the only definitions); each documents in --help what
# they mean for it. An error's code is its class's ``exit_code`` (:func:`exit_code_for`).
EXIT_OK = 0
EXIT_FAILURE = 1  # the run broke off
EXIT_USAGE = 2  # bad command line or input file
EXIT_CONFIG = 3  # invalid settings or configuration file, an unusable batch files folder
EXIT_UNAVAILABLE = 4  # MongoDB or Ollama unreachable, or the model not pulled
EXIT_INCOMPLETE = 5  # finished, but not everything: conversations failed or queued, bad rows skipped
EXIT_FAILURE_RATE = 6  # batch: stopped, too many conversations failed because of the model
EXIT_INTERRUPTED = 130


class ClassifierError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"
    status_code = 500
    exit_code = EXIT_FAILURE
    transient = False

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class ConfigError(ClassifierError):
    """A setting or configuration file is invalid; fix the configuration and restart."""

    code = "config_error"
    exit_code = EXIT_CONFIG


class InputError(ClassifierError):
    """A conversation is invalid: missing or malformed fields. ``field`` names the culprit."""

    code = "invalid_input"
    status_code = 422

    def __init__(self, message: str, *, field: str | None = None, status_code: int = 422, **details: Any) -> None:
        super().__init__(message, **({"field": field} if field else {}), **details)
        self.field = field
        self.status_code = status_code


class NoCustomerTurnError(InputError):
    """The conversation has no non-empty customer turn. Sentiment is judged from the customer's
    turns only, so there is nothing to classify: it is never sent to the model (HTTP 422
    ``invalid_input``; the batch gives it a terminal status of its own, ``reason``)."""

    reason = "no_customer_turn"


class PayloadTooLargeError(InputError):
    """The request body is above the configured limit."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Request body is larger than the limit of {limit} bytes.",
            status_code=413,
            limit_bytes=limit,
        )


class UnsupportedMediaTypeError(InputError):
    """A request body not sent as JSON (no Content-Type, a form, text): only JSON bodies are read,
    so a web page cannot make a visitor's browser post one across sites."""

    code = "unsupported_media_type"

    def __init__(self, content_type: str | None) -> None:
        got = f"got {content_type[:100]!r}" if content_type else "no Content-Type header was sent"
        super().__init__(
            f"The body must be JSON sent with 'Content-Type: application/json' ({got}).",
            hint="e.g. curl -H 'Content-Type: application/json' -d @conversation.json http://localhost:8000/classify",
            field="body",
            status_code=415,
        )


class NotAuthenticatedError(ClassifierError):
    """No credentials, or wrong ones, for an endpoint that serves customer data (HTTP 401)."""

    code = "unauthorized"
    status_code = 401


class ForbiddenError(ClassifierError):
    """Credentials are not enough: a missing CSRF token, or no API_TOKENS on a non-loopback API (HTTP 403)."""

    code = "forbidden"
    status_code = 403


class NotFoundError(ClassifierError):
    """The thing named in the URL does not exist (HTTP 404)."""

    code = "not_found"
    status_code = 404


class LLMError(ClassifierError):
    """Base of every failure of the classification call to Ollama."""

    code = "llm_error"
    status_code = 502
    # Only the start-up check lets one reach a command line's edge: Ollama is not usable.
    exit_code = EXIT_UNAVAILABLE


class LLMUnavailableError(LLMError):
    """Ollama cannot be reached at the configured endpoint."""

    code = "llm_unavailable"
    status_code = 503
    transient = True


class ModelNotFoundError(LLMError):
    """The configured model is not pulled on the Ollama server."""

    code = "model_not_found"
    status_code = 503

    def __init__(self, model: str, endpoint: str, *, server: str = "Ollama server", hint: str | None = None) -> None:
        super().__init__(
            f"Model '{model}' is not available on the {server} at {endpoint}.",
            hint=hint or f"Run `ollama pull {model}` there, or set LLM_MODEL to a model it has.",
            model=model,
        )
        self.model = model


class LLMBusyError(LLMError):
    """Ollama answered 503: its request queue is full. Try again later."""

    code = "llm_busy"
    status_code = 503
    transient = True
    retry_after_seconds = 5

    def __init__(self, message: str, *, retry_after_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if retry_after_seconds is not None:  # the server's Retry-After, when it sent one
            self.retry_after_seconds = max(1, math.ceil(retry_after_seconds))


class LLMTimeoutError(LLMError):
    """Ollama did not answer within OLLAMA_TIMEOUT."""

    code = "llm_timeout"
    status_code = 504
    transient = True


class LLMServerError(LLMError):
    """Ollama failed while answering (a 5xx such as a crashed runner, or a dropped connection)."""

    code = "llm_server_error"
    status_code = 502
    transient = True


class LLMRequestRejectedError(LLMError):
    """Ollama refused the request itself (a 4xx other than a missing model)."""

    code = "llm_request_rejected"
    status_code = 502


class LLMOutputError(LLMError):
    """Ollama answered, but the answer is not a usable classification."""

    code = "llm_bad_output"
    status_code = 502


class StorageError(ClassifierError):
    """A MongoDB operation failed. ``transient`` is set from the driver's error."""

    code = "storage_error"
    status_code = 503

    def __init__(self, message: str, *, transient: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        self.transient = transient


class StorageUnavailableError(StorageError):
    """MongoDB cannot be reached."""

    code = "storage_unavailable"
    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, transient=True, **details)


class UsageError(ClassifierError):
    """A script's command line or input file is unusable (a missing file, an unknown format)."""

    code = "usage_error"
    exit_code = EXIT_USAGE


class BatchFileError(ClassifierError):
    """A local batch file cannot be read or written, or its folder is in use by another processor."""

    code = "batch_file_error"


def field_path(loc: Iterable[Any]) -> str:
    """A validation error's location as a field path, ``messages[1].sender``; ``body`` for the whole.

    FastAPI's locations start with ``"body"``; pydantic's own do not: both give the same path.
    """
    path = ""
    for i, part in enumerate(loc):
        if i == 0 and part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    return path or "body"


def invalid_conversation(errors: Sequence[Mapping[str, Any]]) -> InputError:
    """The one :class:`InputError` for a conversation that failed validation (pydantic's ``errors()``):
    the first problem with its field path, and how many more there are. The API, the batch
    processor and the importer all word a bad conversation with it."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid conversation"}
    field = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = "" if field == "body" else f"{field}: "  # a problem of the whole conversation names no field
    return InputError(f"Invalid conversation: {where}{message}{more}", field=field)


class BatchFolderError(BatchFileError):
    """The batch files folder cannot be created or written: fix BATCH_FILES_DIR (a configuration error)."""

    code = "batch_folder_error"
    exit_code = EXIT_CONFIG


def exit_code_for(error: BaseException) -> int:
    """The exit code a command line ends with after ``error``: our errors carry theirs,
    Ctrl-C is 130, anything else is a run that broke off."""
    if isinstance(error, ClassifierError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


class FailureRateExceededError(ClassifierError):
    """A batch job stopped: too many recent conversations failed because of the model
    (BATCH_MAX_FAILURE_RATE over BATCH_FAILURE_WINDOW). Unfinished work stays recoverable."""

    code = "failure_rate_exceeded"
    exit_code = EXIT_FAILURE_RATE


def fail(error: ClassifierError, exit_code: int | None = None, *, extra_hint: str | None = None) -> int:
    """The command-line edge: print ``error: <message>`` and its hint on stderr, no traceback;
    return ``exit_code`` (by default :func:`exit_code_for` the error) for ``main()`` to return."""
    lines = [f"error: {error.message}"] + [f"  {hint}" for hint in (error.hint, extra_hint) if hint]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return exit_code_for(error) if exit_code is None else exit_code


def run_command(body: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Every command line's ``main()`` edge: run ``body`` and return its exit code; one of our
    errors is printed by :func:`fail` (message and hint, no traceback) and exits with its code;
    Ctrl-C prints ``interrupted`` and exits 130."""
    try:
        return body()
    except ClassifierError as e:
        return fail(e)
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr, flush=True)
        return exit_code_for(e)


def error_body(error: ClassifierError) -> dict[str, Any]:
    """The JSON body every failing HTTP answer carries: ``{"error": {"type", "message", ...}}``."""
    body: dict[str, Any] = {"type": error.code, "message": error.message}
    if error.hint:
        body["hint"] = error.hint
    body.update(error.details)
    return {"error": body}
