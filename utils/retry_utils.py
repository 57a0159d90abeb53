"""Retries in place: which errors are retried, the backoff between tries, and the loop (tenacity).

* :func:`retrying` builds the tenacity policy of one operation: ``max_retries`` retries of errors
  whose ``transient`` flag is set (error_handler), after ``base, 2*base, 4*base ...`` seconds
  (LLM 2/4/8 s, MongoDB 1/2/4 s) plus up to ``base`` seconds of random jitter, capped at 60 s
  (:func:`backoff`). Whether an error is transient is decided where it is raised: the LLM clients
  for the servers' answers, ``mongo_client.storage_error`` for the driver's errors.
* :func:`retrying_by` is the same loop with the decision handed in: the batch processor's
  ``retry_policy.RetryPolicy`` decides there how a conversation's calls are retried.

The circuit breaker, which pauses calls to an LLM server in trouble, is :mod:`utils.circuit_breaker`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, stop_never

from error_handler import ClassifierError

logger = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 60.0

#: (the error of a call, how many calls were made) -> seconds to wait before the next call, or None: stop.
DelayAfter = Callable[[BaseException, int], "float | None"]


def is_transient(error: BaseException) -> bool:
    """The retry decision: one of our errors that says trying again later may succeed."""
    return isinstance(error, ClassifierError) and error.transient


def backoff(calls: int, base: float, jitter: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds before call ``calls + 1``: ``base * 2**(calls - 1)`` plus up to ``base`` of jitter, at most 60."""
    return min(base * 2 ** (calls - 1) + jitter(0, base), MAX_RETRY_DELAY_SECONDS)


def retrying(what: str, *, max_retries: int, base_delay: float) -> AsyncRetrying:
    """An async tenacity policy: ``max_retries`` retries of transient errors with jittered backoff.

    The last error is re-raised as is once the retries are spent.
    """

    def delay_after(error: BaseException, calls: int) -> float | None:
        return backoff(calls, base_delay) if is_transient(error) and calls <= max_retries else None

    return retrying_by(what, delay_after, calls_at_most=max_retries + 1)


def retrying_by(what: str, delay_after: DelayAfter, *, calls_at_most: int) -> AsyncRetrying:
    """An async tenacity policy asking ``delay_after`` after each failed call whether (and when) to
    call again; ``calls_at_most`` is only for the log line. The last error is re-raised as is."""

    def delay(state: RetryCallState) -> float | None:
        error = state.outcome.exception() if state.outcome else None
        return None if error is None else delay_after(error, state.attempt_number)

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        seconds = state.next_action.sleep if state.next_action else 0
        logger.warning(
            "%s failed (attempt %d of %d), retrying in %.1f s: %s",
            what, state.attempt_number, calls_at_most, seconds, error,
        )

    return AsyncRetrying(
        stop=stop_never,
        wait=lambda state: delay(state) or 0.0,
        retry=lambda state: delay(state) is not None,
        before_sleep=log_retry,
        reraise=True,
    )
