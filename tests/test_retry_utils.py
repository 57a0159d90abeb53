"""Unit tests of utils/retry_utils.py (the retry decision, backoff, the policy, the circuit breaker)
and of mongo_client.storage_error (which driver errors are transient).

Pure logic: real exception objects (our own and PyMongo's, constructed directly), tenacity's
own RetryCallState, and a fake clock for the circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WriteError,
)
from tenacity import AsyncRetrying, RetryCallState

from error_handler import (
    InputError,
    LLMBusyError,
    LLMOutputError,
    LLMRequestRejectedError,
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    ModelNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from mongo_client import is_transient_mongo_error, storage_error
from utils.retry_utils import (
    CircuitBreaker,
    CircuitState,
    counts_against_ollama,
    is_transient,
    retrying,
)

# --- the retry decision: .transient ----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (LLMUnavailableError("Ollama is not reachable"), True),
        (LLMTimeoutError("Ollama did not answer within 120 s"), True),
        (LLMBusyError("Ollama is busy"), True),
        (LLMServerError("Ollama answered 500"), True),
        (LLMOutputError("not JSON"), False),
        (ModelNotFoundError("llama3", "http://localhost:11434"), False),
        (InputError("no turns", field="tweets"), False),
        (StorageError("write failed", transient=True), True),
        (StorageError("write failed", transient=False), False),
        (StorageUnavailableError("MongoDB down"), True),
        # The flag decides, never the words: neither a message nor an error of someone else's.
        (LLMOutputError("connection timeout while parsing"), False),
        (TimeoutError("timed out"), False),
        (RuntimeError("Rate limit exceeded, network error"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_the_retry_decision_is_the_transient_flag_of_our_errors(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (AutoReconnect("connection closed"), True),
        (NetworkTimeout("timed out"), True),
        (ServerSelectionTimeoutError("No servers found yet"), True),
        (OperationFailure("interrupted at shutdown", code=91), True),  # ShutdownInProgress
        (OperationFailure("node is recovering", code=11600), True),  # InterruptedAtShutdown
        (OperationFailure("primary stepped down", code=189), True),  # PrimarySteppedDown
        (OperationFailure("write failed", code=2, details={"errorLabels": ["RetryableWriteError"]}), True),
        (OperationFailure("write failed", code=2), False),  # same failure without the label
        (WriteError("Document failed validation", code=121), False),
        (DuplicateKeyError("E11000 duplicate key error", code=11000), False),
        (OperationFailure("out of disk space", code=14031), True),  # resource: worth trying later
        (PyMongoError("network error, rate limit exceeded"), False),  # no code, no label: not by its words
    ],
    ids=[
        "AutoReconnect", "NetworkTimeout", "ServerSelectionTimeout", "code91", "code11600", "code189",
        "RetryableWriteError-label", "same-code-without-label", "WriteError121", "DuplicateKey", "code14031",
        "message-only",
    ],
)
def test_which_driver_errors_are_transient(error: PyMongoError, transient: bool) -> None:
    assert is_transient_mongo_error(error) is transient
    assert storage_error(error, "write").transient is transient


def test_storage_error_for_a_lost_connection_is_storage_unavailable() -> None:
    wrapped = storage_error(ServerSelectionTimeoutError("localhost:27017: connection refused"), "result write")
    assert isinstance(wrapped, StorageUnavailableError)
    assert wrapped.transient is True
    assert "result write" in wrapped.message
    assert "connection refused" in wrapped.message


def test_storage_error_for_a_permanent_server_error() -> None:
    wrapped = storage_error(WriteError("Document failed validation", code=121), "result write")
    assert type(wrapped) is StorageError
    assert wrapped.transient is False
    assert "result write" in wrapped.message
    assert "Document failed validation" in wrapped.message
    assert is_transient(wrapped) is False


# --- backoff: tenacity's wait_exponential_jitter ------------------------------------------------


def _retry_state(attempt_number: int) -> RetryCallState:
    """A RetryCallState built the way tenacity builds one, at the given attempt."""
    state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt_number
    return state


@pytest.mark.parametrize(("base", "nominal"), [(2.0, [2.0, 4.0, 8.0]), (1.0, [1.0, 2.0, 4.0])])
def test_the_llm_delays_are_2_4_8_and_the_mongodb_delays_1_2_4_plus_jitter(base: float, nominal: list[float]) -> None:
    wait = retrying("x", max_retries=3, base_delay=base).wait
    for attempt, delay in enumerate(nominal, 1):
        delays = [wait(_retry_state(attempt)) for _ in range(300)]
        assert all(delay <= d <= delay + base for d in delays)
        assert min(delays) < delay + base / 2 < max(delays)  # the jitter is really applied


def test_delay_is_capped_at_the_maximum() -> None:
    wait = retrying("x", max_retries=20, base_delay=2.0).wait
    assert max(wait(_retry_state(10)) for _ in range(100)) <= 60.0


# --- retrying() -------------------------------------------------------------------------------


class Flaky:
    """An async operation that fails with the given errors, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def _run(policy: AsyncRetrying, operation: Flaky) -> str:
    # The way batch_processor.py drives a policy.
    async for attempt in policy:
        with attempt:
            return await operation()
    raise AssertionError("unreachable")


async def test_transient_failures_are_retried_until_success(caplog: pytest.LogCaptureFixture) -> None:
    operation = Flaky(LLMTimeoutError("slow"), LLMUnavailableError("down"))
    with caplog.at_level(logging.WARNING, logger="utils.retry_utils"):
        result = await _run(retrying("LLM call for conversation 7", max_retries=3, base_delay=0), operation)
    assert result == "ok"
    assert operation.calls == 3
    warnings = [r for r in caplog.records if r.name == "utils.retry_utils" and r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one before each retry
    assert "LLM call for conversation 7" in warnings[0].getMessage()
    assert "attempt 1 of 4" in warnings[0].getMessage()
    assert "attempt 2 of 4" in warnings[1].getMessage()
    assert "slow" in warnings[0].getMessage()


async def test_a_permanent_error_is_raised_after_one_call(caplog: pytest.LogCaptureFixture) -> None:
    error = LLMOutputError("not a classification")
    operation = Flaky(error)
    with caplog.at_level(logging.WARNING, logger="utils.retry_utils"), pytest.raises(LLMOutputError) as raised:
        await _run(retrying("LLM call", max_retries=3, base_delay=0), operation)
    assert raised.value is error
    assert operation.calls == 1
    assert not [r for r in caplog.records if r.name == "utils.retry_utils"]


async def test_retries_are_bounded_and_the_original_error_is_reraised(caplog: pytest.LogCaptureFixture) -> None:
    errors = [StorageError(f"write failed {i}", transient=True) for i in range(10)]
    operation = Flaky(*errors)
    with caplog.at_level(logging.WARNING, logger="utils.retry_utils"), pytest.raises(StorageError) as raised:
        await _run(retrying("result write", max_retries=2, base_delay=0), operation)
    assert operation.calls == 3
    assert raised.value is errors[2]  # the last error itself, not a tenacity RetryError
    assert len([r for r in caplog.records if r.name == "utils.retry_utils"]) == 2


# --- CircuitBreaker ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _still_waiting(awaitable_task: asyncio.Task[None], seconds: float = 0.15) -> bool:
    await asyncio.sleep(seconds)
    return not awaitable_task.done()


async def _until(predicate, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(LLMUnavailableError("down"))
    assert breaker.state is CircuitState.OPEN


async def test_closed_circuit_lets_calls_through() -> None:
    breaker = CircuitBreaker(3, 300, clock=FakeClock())
    for _ in range(5):
        await asyncio.wait_for(breaker.before_call(), timeout=1)
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_opens_after_threshold_consecutive_failures_not_before() -> None:
    breaker = CircuitBreaker(3, 300, clock=FakeClock())
    breaker.record_failure(LLMTimeoutError("slow"))
    breaker.record_failure(LLMTimeoutError("slow"))
    assert breaker.state is CircuitState.CLOSED
    await asyncio.wait_for(breaker.before_call(), timeout=1)
    breaker.record_failure(LLMTimeoutError("slow"))
    assert breaker.state is CircuitState.OPEN
    assert breaker.times_opened == 1
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.before_call(), timeout=0.1)


async def test_a_success_in_between_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(3, 300, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.times_opened == 0
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN


async def test_open_circuit_holds_callers_until_the_recovery_timeout_of_its_clock() -> None:
    clock = FakeClock()
    # 0.05 s of recovery: waiters re-check every 0.05 s of real time; only the fake clock lets them pass.
    breaker = CircuitBreaker(2, 0.05, clock=clock)
    _open(breaker)
    waiters = [asyncio.create_task(breaker.before_call()) for _ in range(3)]
    try:
        clock.now += 0.04
        await asyncio.sleep(0.2)  # several real recovery periods
        assert not any(w.done() for w in waiters)
        assert breaker.state is CircuitState.OPEN

        clock.now += 0.01  # now the recovery timeout has passed
        await _until(lambda: any(w.done() for w in waiters))
        await asyncio.sleep(0.1)
        assert sum(w.done() for w in waiters) == 1  # exactly one probe
        assert breaker.state is CircuitState.HALF_OPEN
    finally:
        await _cancel(waiters)


async def test_probe_success_closes_the_circuit_and_releases_every_waiter() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 300, clock=clock)
    _open(breaker)
    clock.now += 300
    await asyncio.wait_for(breaker.before_call(), timeout=1)  # the probe
    assert breaker.state is CircuitState.HALF_OPEN
    waiters = [asyncio.create_task(breaker.before_call()) for _ in range(3)]
    try:
        assert await _still_waiting(waiters[0])
        assert not any(w.done() for w in waiters)
        breaker.record_success()
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=1)
        assert breaker.state is CircuitState.CLOSED
        assert breaker.consecutive_failures == 0
    finally:
        await _cancel(waiters)


async def test_probe_failure_reopens_the_circuit() -> None:
    clock = FakeClock()
    # Waiting is real (re-checked every 0.05 s); the fake clock decides when the pause is over.
    breaker = CircuitBreaker(2, 0.05, clock=clock)
    _open(breaker)
    clock.now += 0.05
    await asyncio.wait_for(breaker.before_call(), timeout=1)  # the probe
    waiters = [asyncio.create_task(breaker.before_call()) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)
        breaker.record_failure(LLMTimeoutError("still slow"))  # one failure is enough in half-open
        assert breaker.state is CircuitState.OPEN
        assert breaker.times_opened == 2
        assert await _still_waiting(waiters[0])
        assert not waiters[1].done()

        clock.now += 0.05  # another pause later, another single probe
        await _until(lambda: any(w.done() for w in waiters))
        await asyncio.sleep(0.05)
        assert sum(w.done() for w in waiters) == 1
        assert breaker.state is CircuitState.HALF_OPEN
    finally:
        await _cancel(waiters)


async def test_cancel_probe_lets_the_next_caller_probe_at_once() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 300, clock=clock)
    _open(breaker)
    clock.now += 300
    await asyncio.wait_for(breaker.before_call(), timeout=1)  # the probe, cancelled below
    waiters = [asyncio.create_task(breaker.before_call()) for _ in range(3)]
    try:
        assert await _still_waiting(waiters[0], 0.05)
        breaker.cancel_probe()  # the clock has not moved: no new pause
        await _until(lambda: any(w.done() for w in waiters), timeout=1)
        await asyncio.sleep(0.05)
        assert sum(w.done() for w in waiters) == 1
        assert breaker.state is CircuitState.HALF_OPEN
        assert breaker.times_opened == 1  # a cancelled probe is not a failure
    finally:
        await _cancel(waiters)


async def test_cancel_probe_outside_half_open_changes_nothing() -> None:
    breaker = CircuitBreaker(2, 300, clock=FakeClock())
    breaker.cancel_probe()
    assert breaker.state is CircuitState.CLOSED
    _open(breaker)
    breaker.cancel_probe()
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.before_call(), timeout=0.1)


async def test_times_opened_counts_each_opening() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10, clock=clock)
    assert breaker.times_opened == 0
    for round_number in range(1, 4):
        breaker.record_failure()
        assert breaker.times_opened == round_number
        clock.now += 10
        await asyncio.wait_for(breaker.before_call(), timeout=1)  # probe
        breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.times_opened == 3


async def test_recovery_with_the_real_clock_waits_at_least_the_recovery_timeout() -> None:
    breaker = CircuitBreaker(1, 0.05)
    breaker.record_failure(LLMUnavailableError("down"))
    started = time.monotonic()
    await asyncio.wait_for(breaker.before_call(), timeout=2)
    assert time.monotonic() - started >= 0.04
    assert breaker.state is CircuitState.HALF_OPEN


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (LLMUnavailableError("down"), True),
        (LLMTimeoutError("slow"), True),
        (LLMServerError("500"), True),
        (LLMBusyError("busy"), True),
        (ModelNotFoundError("llama3", "http://localhost:11434"), True),
        (LLMRequestRejectedError("400"), True),
        (LLMOutputError("not JSON"), False),
        (StorageUnavailableError("MongoDB down"), False),
        (InputError("bad"), False),
        (TimeoutError(), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_counts_against_ollama(error: BaseException, counts: bool) -> None:
    assert counts_against_ollama(error) is counts


async def test_before_call_tells_the_probe_apart() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 300, clock=clock)
    assert await asyncio.wait_for(breaker.before_call(), timeout=1) is False  # closed: not a probe
    _open(breaker)
    clock.now += 300
    assert await asyncio.wait_for(breaker.before_call(), timeout=1) is True  # the one probe
    waiter = asyncio.create_task(breaker.before_call())
    try:
        assert await _still_waiting(waiter)
        breaker.record_success()
        assert await asyncio.wait_for(waiter, timeout=1) is False  # released by the probe: not a probe
    finally:
        await _cancel([waiter])
