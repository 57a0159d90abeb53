"""Unit tests of utils/retry_utils.py (the retry decision, backoff, the policy) and of
mongo_client.storage_error (which driver errors are transient).

Pure logic: real exception objects (our own and PyMongo's, constructed directly) and tenacity's
own RetryCallState. The circuit breaker's tests are in tests/test_circuit_breaker.py.
"""

from __future__ import annotations

import logging

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
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    ModelNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from mongo_client import is_transient_mongo_error, storage_error
from utils.retry_utils import is_transient, retrying

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
