"""Retry policy of the batch processor: backoff and the circuit breaker.

* :func:`retrying` builds the tenacity policy: ``max_retries`` retries of errors whose
  ``transient`` flag is set (error_handler), after ``base, 2*base, 4*base ...`` seconds
  (LLM 2/4/8 s, MongoDB 1/2/4 s) plus up to ``base`` seconds of random jitter, capped at 60 s.
  Whether an error is transient is decided where it is raised: the LLM clients for Ollama's
  answers, ``mongo_client.storage_error`` for the driver's errors.
* :class:`CircuitBreaker` pauses LLM calls after consecutive LLM-server failures instead
  of burning through the queue, and lets one probe through after the pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from error_handler import ClassifierError, LLMError, LLMOutputError

logger = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 60.0


def is_transient(error: BaseException) -> bool:
    """The retry decision: one of our errors that says trying again later may succeed."""
    return isinstance(error, ClassifierError) and error.transient


def retrying(what: str, *, max_retries: int, base_delay: float) -> AsyncRetrying:
    """An async tenacity policy: ``max_retries`` retries of transient errors with jittered backoff.

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
        wait=wait_exponential_jitter(multiplier=base_delay, max=MAX_RETRY_DELAY_SECONDS, jitter=base_delay),
        retry=retry_if_exception(is_transient),
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=remaining)
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
