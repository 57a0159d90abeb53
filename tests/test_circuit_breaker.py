"""Unit tests of utils/circuit_breaker.py: pure logic with a clock moved by hand.

How the pools use it (routing around an open circuit, the batch processor waiting for a pause
to end) is tested against real fake servers in tests/test_llm_pool.py.
"""

from __future__ import annotations

import logging

import pytest

from error_handler import LLMTimeoutError, LLMUnavailableError
from utils.circuit_breaker import CircuitBreaker, CircuitState


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, recovery: float = 300, clock: FakeClock | None = None) -> CircuitBreaker:
    return CircuitBreaker(threshold, recovery, name="test server", clock=clock or FakeClock())


def opened(b: CircuitBreaker) -> CircuitBreaker:
    for _ in range(b.failure_threshold):
        b.record_failure(LLMUnavailableError("down"))
    assert b.state is CircuitState.OPEN
    return b


def test_a_closed_circuit_lets_every_call_through_and_none_is_a_probe() -> None:
    b = breaker()
    assert [b.try_acquire() for _ in range(5)] == [False] * 5
    assert b.state is CircuitState.CLOSED and b.seconds_until_probe() == 0


def test_it_opens_after_threshold_consecutive_failures_not_before(caplog: pytest.LogCaptureFixture) -> None:
    b = breaker(3)
    b.record_failure(LLMTimeoutError("slow"))
    b.record_failure(LLMTimeoutError("slow"))
    assert b.state is CircuitState.CLOSED and b.try_acquire() is False
    with caplog.at_level(logging.WARNING, logger="utils.circuit_breaker"):
        b.record_failure(LLMTimeoutError("slow"))
    assert b.state is CircuitState.OPEN and b.times_opened == 1
    assert b.try_acquire() is None  # not now: it answers at once, it never waits
    assert "circuit test server open after 3 consecutive failures (last: slow)" in caplog.text


def test_a_success_in_between_resets_the_count() -> None:
    b = breaker(3)
    b.record_failure()
    b.record_failure()
    b.record_success()
    assert b.consecutive_failures == 0
    b.record_failure()
    b.record_failure()
    assert b.state is CircuitState.CLOSED and b.times_opened == 0
    b.record_failure()
    assert b.state is CircuitState.OPEN


def test_the_pause_is_measured_on_its_clock_and_then_one_caller_is_the_probe() -> None:
    clock = FakeClock()
    b = opened(breaker(2, 300, clock))
    clock.now += 299.5
    assert b.seconds_until_probe() == pytest.approx(0.5)
    assert b.try_acquire() is None
    clock.now += 0.5
    assert b.seconds_until_probe() == 0
    assert b.try_acquire() is True  # the probe
    assert b.state is CircuitState.HALF_OPEN
    assert [b.try_acquire() for _ in range(3)] == [None] * 3  # no other call while it is out
    assert b.seconds_until_probe() == float("inf")


def test_the_probes_success_closes_the_circuit() -> None:
    clock = FakeClock()
    b = opened(breaker(2, 300, clock))
    clock.now += 300
    assert b.try_acquire() is True
    b.record_success()
    assert b.state is CircuitState.CLOSED and b.consecutive_failures == 0
    assert b.try_acquire() is False


def test_the_probes_failure_opens_it_for_another_pause() -> None:
    clock = FakeClock()
    b = opened(breaker(2, 300, clock))
    clock.now += 300
    assert b.try_acquire() is True
    b.record_failure(LLMTimeoutError("still slow"))  # one failure is enough in half-open
    assert b.state is CircuitState.OPEN and b.times_opened == 2
    assert b.seconds_until_probe() == 300
    clock.now += 300
    assert b.try_acquire() is True


def test_a_cancelled_probe_lets_the_next_caller_probe_at_once() -> None:
    clock = FakeClock()
    b = opened(breaker(2, 300, clock))
    clock.now += 300
    assert b.try_acquire() is True
    b.cancel_probe()  # the clock has not moved: no new pause
    assert b.state is CircuitState.OPEN and b.seconds_until_probe() == 0
    assert b.try_acquire() is True
    assert b.times_opened == 1  # a cancelled probe is not a failure


def test_cancel_probe_outside_half_open_changes_nothing() -> None:
    b = breaker(2)
    b.cancel_probe()
    assert b.state is CircuitState.CLOSED
    opened(b)
    b.cancel_probe()
    assert b.state is CircuitState.OPEN and b.try_acquire() is None


def test_probe_early_skips_the_rest_of_the_pause_only_when_open() -> None:
    b = breaker(2)
    assert b.probe_early() is False and b.state is CircuitState.CLOSED
    opened(b)
    assert b.probe_early() is True and b.state is CircuitState.HALF_OPEN
    assert b.probe_early() is False  # its probe is already out


def test_trip_opens_a_closed_circuit_at_once_and_nothing_else() -> None:
    clock = FakeClock()
    b = breaker(5, 300, clock)
    b.trip(LLMUnavailableError("refused"))
    assert b.state is CircuitState.OPEN and b.times_opened == 1 and b.seconds_until_probe() == 300
    clock.now += 300
    assert b.try_acquire() is True
    b.trip(LLMUnavailableError("refused"))  # half-open: the probe's own outcome decides
    assert b.state is CircuitState.HALF_OPEN and b.times_opened == 1


def test_times_opened_counts_each_opening() -> None:
    clock = FakeClock()
    b = breaker(1, 10, clock)
    for round_number in range(1, 4):
        b.record_failure()
        assert b.times_opened == round_number
        clock.now += 10
        assert b.try_acquire() is True
        b.record_success()
    assert b.state is CircuitState.CLOSED and b.times_opened == 3
