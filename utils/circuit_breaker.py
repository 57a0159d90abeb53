"""The circuit breaker of one LLM server: consecutive failures open it, a pause, then one probe.

It never waits: a caller asks :meth:`CircuitBreaker.try_acquire` and gets its answer at once (call,
probe, or not now). Whoever prefers to wait for the pause to end does so on its own terms with
:meth:`CircuitBreaker.seconds_until_probe` (the batch processor, through
``llm_pool.AsyncLLMPool.wait_for_server``); the API's threads never wait on it. So one breaker
serves the thread pool and the asyncio pool alike.

What counts as a failure is the caller's decision (``llm_pool.counts_against_server``); the
breaker only counts. Not thread-safe by itself: the sync pool holds its lock around every call.
The clock is injectable (monotonic seconds), so tests move time by hand.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class CircuitState(enum.Enum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # paused: no call until the pause is over
    HALF_OPEN = "half_open"  # one probe call is in flight; no other call until its outcome


class CircuitBreaker:
    """Consecutive-failure circuit breaker, asked without waiting.

    After ``failure_threshold`` consecutive failures the circuit opens for ``recovery_timeout``
    seconds; then :meth:`try_acquire` makes the next caller the probe. The probe's success closes
    the circuit, its failure opens it again, and a probe that ended without a verdict
    (:meth:`cancel_probe`) lets the next caller probe at once.
    """

    def __init__(
        self,
        failure_threshold: int,
        recovery_timeout: float,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.name = name
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._times_opened = 0

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def times_opened(self) -> int:
        return self._times_opened

    # --- asking ------------------------------------------------------------------------------

    def try_acquire(self) -> bool | None:
        """May a call go now? None: not now (open and pausing, or its probe in flight). False:
        closed, call. True: the pause is over and this call is the probe (it must end in
        :meth:`record_success`, :meth:`record_failure` or :meth:`cancel_probe`)."""
        if self._state is CircuitState.CLOSED:
            return False
        if self._state is CircuitState.OPEN and self.seconds_until_probe() <= 0:
            logger.info("circuit %s half-open: sending one probe request", self.name)
            self._state = CircuitState.HALF_OPEN
            return True
        return None

    def seconds_until_probe(self) -> float:
        """0 when a call may go now; the rest of the pause when open; inf while the probe is out."""
        if self._state is CircuitState.CLOSED:
            return 0.0
        if self._state is CircuitState.HALF_OPEN:
            return float("inf")
        return max(0.0, self._opened_at + self.recovery_timeout - self._clock())

    def probe_early(self) -> bool:
        """Make the caller the probe now, before the pause is over (every other server is paused
        too, and a server that came back should not sit out its pause). False unless open."""
        if self._state is not CircuitState.OPEN:
            return False
        logger.info("circuit %s half-open early: every server is paused, probing this one", self.name)
        self._state = CircuitState.HALF_OPEN
        return True

    # --- telling -----------------------------------------------------------------------------

    def record_success(self) -> None:
        if self._state is not CircuitState.CLOSED:
            logger.info("circuit %s closed: %s answers again", self.name, self.name)
            self._state = CircuitState.CLOSED
        self._consecutive_failures = 0

    def record_failure(self, error: BaseException | None = None) -> None:
        self._consecutive_failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._consecutive_failures >= self.failure_threshold
        ):
            self._open(f"after {self._consecutive_failures} consecutive failures (last: {error})")

    def cancel_probe(self) -> None:
        """The probe ended without a verdict (cancelled, or an error that says nothing of the
        server): open again with the pause already over, so the next caller probes at once."""
        if self._state is CircuitState.HALF_OPEN:
            self._opened_at = self._clock() - self.recovery_timeout
            self._state = CircuitState.OPEN

    def trip(self, error: BaseException) -> None:
        """Open now, whatever the count (the server failed a check its owner trusts, e.g. the batch
        processor's start-up check): no call is spent finding out again. Only a closed circuit trips."""
        if self._state is CircuitState.CLOSED:
            self._open(f"at once (failed its check: {error})")

    def _open(self, why: str) -> None:
        self._opened_at = self._clock()
        self._times_opened += 1
        self._state = CircuitState.OPEN
        logger.warning("circuit %s open %s; pausing calls for %.0f s", self.name, why, self.recovery_timeout)
