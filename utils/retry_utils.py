"""Retry policy of the batch processor: error classification, backoff and the circuit breaker.

* :func:`classify_error` sorts an exception into transient, resource or permanent
  (the design's error matrix); only the first two are retried.
* :func:`retrying` builds the tenacity policy: ``max_retries`` retries, delays
  ``base, 2*base, 4*base ...`` (LLM 2/4/8 s, MongoDB 1/2/4 s) with +/-50 % jitter, capped.
* :class:`CircuitBreaker` pauses LLM calls after consecutive Ollama failures instead
  of burning through the queue, and lets one probe through after the pause.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import random
import time
from collections.abc import Callable

from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from error_handler import ClassifierError, LLMError, LLMOutputError, StorageError, StorageUnavailableError

logger = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 60.0


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"  # network, timeouts, failover, a busy server: try again
    RESOURCE = "resource"  # out of memory, disk full, rate limits: try again, later
    PERMANENT = "permanent"  # bad data, bad output, authentication: retrying cannot help


# Server error codes that mean "try again": network, failover, interruption, time limits.
TRANSIENT_MONGO_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50, 112, 134, 150, 317, 358}
)
RESOURCE_MONGO_CODES = frozenset({14031, 146, 292})  # OutOfDiskSpace, ExceededMemoryLimit, QueryExceededMemoryLimit

ERROR_PATTERNS: dict[ErrorKind, tuple[str, ...]] = {
    ErrorKind.TRANSIENT: (
        "connection timeout", "network error", "temporary unavailable", "temporarily unavailable",
        "service temporarily unavailable", "rate limit exceeded", "connection reset", "timed out",
    ),
    ErrorKind.PERMANENT: (
        "invalid json", "malformed data", "authentication failed", "permission denied",
        "invalid conversation format", "not authorized",
    ),
    ErrorKind.RESOURCE: ("out of memory", "disk full", "cpu limit", "too many requests", "no space left"),
}


def _mongo_kind(error: PyMongoError) -> ErrorKind:
    if isinstance(error, ConnectionFailure):  # AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
        return ErrorKind.TRANSIENT
    if error.has_error_label("RetryableWriteError") or error.has_error_label("TransientTransactionError"):
        return ErrorKind.TRANSIENT
    if isinstance(error, DuplicateKeyError):
        return ErrorKind.PERMANENT
    code = getattr(error, "code", None)
    if isinstance(error, (OperationFailure, WriteConcernError)) and code is not None:
        if code in TRANSIENT_MONGO_CODES:
            return ErrorKind.TRANSIENT
        if code in RESOURCE_MONGO_CODES:
            return ErrorKind.RESOURCE
        return ErrorKind.PERMANENT
    return _kind_from_message(str(error))


def _kind_from_message(message: str) -> ErrorKind:
    text = message.lower()
    for kind in (ErrorKind.RESOURCE, ErrorKind.TRANSIENT, ErrorKind.PERMANENT):
        if any(pattern in text for pattern in ERROR_PATTERNS[kind]):
            return kind
    return ErrorKind.PERMANENT


def classify_error(error: BaseException) -> ErrorKind:
    """Which kind of failure ``error`` is; unknown errors are permanent (never retried blindly)."""
    if isinstance(error, ClassifierError):
        return ErrorKind.TRANSIENT if error.transient else ErrorKind.PERMANENT
    if isinstance(error, PyMongoError):
        return _mongo_kind(error)
    if isinstance(error, MemoryError):
        return ErrorKind.RESOURCE
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.ENOMEM, errno.EMFILE):
        return ErrorKind.RESOURCE
    if isinstance(error, (ConnectionError, TimeoutError)):
        return ErrorKind.TRANSIENT
    return _kind_from_message(str(error))


def is_retryable(error: BaseException) -> bool:
    """True for transient and resource errors."""
    return classify_error(error) is not ErrorKind.PERMANENT


def storage_error(error: PyMongoError, operation: str) -> StorageError:
    """Wrap a driver error as a :class:`StorageError` whose ``transient`` follows :func:`classify_error`."""
    message = f"MongoDB {operation} failed: {error}"
    if isinstance(error, ConnectionFailure):
        return StorageUnavailableError(message)
    return StorageError(message, transient=classify_error(error) is not ErrorKind.PERMANENT)


class wait_exponential_jitter(wait_base):  # noqa: N801 (tenacity's naming style)
    """``base * 2**(attempt-1)`` seconds, times a random factor in [1-jitter, 1+jitter], capped at ``maximum``."""

    def __init__(self, base: float, *, jitter: float = 0.5, maximum: float = MAX_RETRY_DELAY_SECONDS) -> None:
        self.base = base
        self.jitter = jitter
        self.maximum = maximum

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = min(self.maximum, self.base * 2 ** (retry_state.attempt_number - 1))
        # Cap after the jitter too: the design's delays range from 2 s to 60 s, never above.
        return min(self.maximum, max(0.0, delay * random.uniform(1 - self.jitter, 1 + self.jitter)))


def retrying(
    what: str, *, max_retries: int, base_delay: float, retry_on: Callable[[BaseException], bool] = is_retryable
) -> AsyncRetrying:
    """An async tenacity policy: ``max_retries`` retries of retryable errors with jittered backoff.

    The last error is re-raised as is once the retries are spent.
    """

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0
        logger.warning(
            "%s failed (attempt %d of %d), retrying in %.1f s: %s",
            what, state.attempt_number, max_retries + 1, delay, error,
        )

    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_exponential_jitter(base_delay),
        retry=retry_if_exception(retry_on),
        before_sleep=log_retry,
        reraise=True,
    )


class CircuitState(enum.Enum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # calls wait until the recovery timeout has passed
    HALF_OPEN = "half_open"  # one probe call is in flight; the others wait for its result


def counts_against_ollama(error: BaseException) -> bool:
    """Failures that say Ollama itself is in trouble (not a bad answer of a working model)."""
    return isinstance(error, LLMError) and not isinstance(error, LLMOutputError)


class CircuitBreaker:
    """Consecutive-failure circuit breaker for the asyncio workers calling Ollama.

    After ``failure_threshold`` consecutive failures the circuit opens: :meth:`before_call`
    makes callers wait ``recovery_timeout`` seconds, then lets a single probe through.
    The probe's success closes the circuit; its failure opens it again.
    """

    def __init__(
        self,
        failure_threshold: int,
        recovery_timeout: float,
        *,
        name: str = "Ollama",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.name = name
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._changed = asyncio.Event()
        self.times_opened = 0

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    def _transition(self, state: CircuitState) -> None:
        self._state = state
        # Wake every waiter; they re-check the state. A fresh event serves the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def before_call(self) -> bool:
        """Return when a call may be made: at once while closed; after the pause while open.

        Returns True for the probe: the one caller let through when the pause ends. The probe
        must end in :meth:`record_success`, :meth:`record_failure` or :meth:`cancel_probe`,
        or the other callers wait for it forever.
        """
        while True:
            if self._state is CircuitState.CLOSED:
                return False
            changed = self._changed
            if self._state is CircuitState.OPEN:
                remaining = self._opened_at + self.recovery_timeout - self._clock()
                if remaining <= 0:
                    logger.info("circuit %s half-open: sending one probe request", self.name)
                    self._transition(CircuitState.HALF_OPEN)
                    return True
                try:
                    await asyncio.wait_for(changed.wait(), timeout=remaining)
                except TimeoutError:
                    pass
            else:  # HALF_OPEN: wait for the probe's outcome
                await changed.wait()

    def record_success(self) -> None:
        if self._state is not CircuitState.CLOSED:
            logger.info("circuit %s closed: %s answers again", self.name, self.name)
            self._transition(CircuitState.CLOSED)
        self._consecutive_failures = 0

    def cancel_probe(self) -> None:
        """The probe ended without an answer (cancelled, or an error unrelated to Ollama):
        let the next caller probe at once."""
        if self._state is CircuitState.HALF_OPEN:
            self._opened_at = self._clock() - self.recovery_timeout
            self._transition(CircuitState.OPEN)

    def record_failure(self, error: BaseException | None = None) -> None:
        self._consecutive_failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._consecutive_failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self.times_opened += 1
            logger.warning(
                "circuit %s open after %d consecutive failures (last: %s); pausing calls for %.0f s",
                self.name, self._consecutive_failures, error, self.recovery_timeout,
            )
            self._transition(CircuitState.OPEN)
