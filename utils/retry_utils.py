"""Retry policy of the batch processor: which errors are retried, and the backoff between tries.

* :func:`retrying` builds the tenacity policy: ``max_retries`` retries of errors whose
  ``transient`` flag is set (error_handler), after ``base, 2*base, 4*base ...`` seconds
  (LLM 2/4/8 s, MongoDB 1/2/4 s) plus up to ``base`` seconds of random jitter, capped at 60 s.
  Whether an error is transient is decided where it is raised: the LLM clients for Ollama's
  answers, ``mongo_client.storage_error`` for the driver's errors.

The circuit breaker, which pauses calls to an LLM server in trouble, is :mod:`utils.circuit_breaker`.
"""

from __future__ import annotations

import logging

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from error_handler import ClassifierError

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
