"""Unit tests of retry_policy.py: how a failed conversation is retried, as pure logic (real error
objects, no I/O), and its in-place loop (tenacity) driven by the decision."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from batch_outcome import Outcome
from config import load_settings
from error_handler import (
    LLMOutputError,
    LLMServerError,
    LLMTimeoutError,
    NoCustomerTurnError,
    StorageError,
    StorageUnavailableError,
)
from retry_policy import Attempts, Decision, RetryPolicy, Verdict, retried

POLICY = RetryPolicy(llm_retries=3, llm_base_seconds=2.0, storage_retries=2, storage_base_seconds=1.0,
                     queue_passes=3)


# --- tier 1: retry now ----------------------------------------------------------------------------


@pytest.mark.parametrize(("calls", "nominal"), [(1, 2.0), (2, 4.0), (3, 8.0)])
def test_a_transient_llm_error_is_retried_now_after_2_4_8_s(calls: int, nominal: float) -> None:
    decision = POLICY.decide(Outcome.LLM_FAILED, Attempts(calls=calls), LLMTimeoutError("slow"))
    assert decision.verdict is Verdict.RETRY_NOW
    assert nominal <= decision.after <= nominal + 2.0  # plus up to one base of jitter


def test_the_in_place_retries_are_counted_per_kind_of_call() -> None:
    assert POLICY.decide(Outcome.LLM_FAILED, Attempts(calls=4), LLMServerError("500")).verdict is Verdict.GIVE_UP
    write = StorageUnavailableError("MongoDB down")
    assert POLICY.decide(Outcome.WRITE_FAILED, Attempts(calls=2), write).verdict is Verdict.RETRY_NOW
    assert 2.0 <= POLICY.decide(Outcome.WRITE_FAILED, Attempts(calls=2), write).after <= 3.0
    assert POLICY.decide(Outcome.WRITE_FAILED, Attempts(calls=3), write).verdict is Verdict.GIVE_UP


@pytest.mark.parametrize("error", [LLMOutputError("not JSON"), StorageError("validation", transient=False),
                                   RuntimeError("a bug"), None], ids=repr)
def test_an_error_that_is_not_transient_is_never_retried_now(error: BaseException | None) -> None:
    decision = POLICY.decide(Outcome.LLM_FAILED, Attempts(calls=1), error)
    assert decision == Decision(Verdict.GIVE_UP)


# --- tier 2 and 3: the retry queue, then give up -------------------------------------------------------


@pytest.mark.parametrize(("passes", "verdict"), [(0, Verdict.QUEUE), (1, Verdict.QUEUE), (2, Verdict.QUEUE),
                                                 (3, Verdict.GIVE_UP), (7, Verdict.GIVE_UP)])
def test_a_failed_conversation_is_queued_until_its_passes_are_spent(passes: int, verdict: Verdict) -> None:
    for outcome, error in [(Outcome.LLM_FAILED, LLMTimeoutError("slow")),
                           (Outcome.WRITE_FAILED, StorageUnavailableError("down")),
                           (Outcome.LLM_FAILED, LLMOutputError("not JSON"))]:
        # The conversation's question (no calls): the error's own retries are over, transient or not.
        assert POLICY.decide(outcome, Attempts(passes=passes), error).verdict is verdict


def test_invalid_input_is_given_up_at_once() -> None:
    error = NoCustomerTurnError("no customer turn")
    assert POLICY.decide(Outcome.INVALID, Attempts(), error) == Decision(Verdict.GIVE_UP)
    assert POLICY.decide(Outcome.INVALID, Attempts(calls=1), error) == Decision(Verdict.GIVE_UP)


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.ALREADY_CLASSIFIED, Outcome.SKIPPED,
                                     Outcome.LOST_CLAIM])
def test_only_failures_are_decided(outcome: Outcome) -> None:
    with pytest.raises(ValueError, match="not a failure"):
        POLICY.decide(outcome, Attempts())


def test_the_default_policy_is_the_settings() -> None:
    settings = load_settings({"ollama_max_retries": 1, "ollama_retry_base_seconds": 0.5, "mongodb_max_retries": 4,
                              "mongodb_retry_base_seconds": 0.25, "batch_retry_queue_attempts": 5},
                             environ={}, env_file=None)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(1, 0.5, 4, 0.25, 5)


# --- the in-place loop follows the decision --------------------------------------------------------


@dataclass
class Flaky:
    """An async operation that fails with the given errors, then returns ``"ok"``."""

    errors: list[BaseException]
    calls: int = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_retried_calls_again_while_the_policy_says_retry_now(caplog: pytest.LogCaptureFixture) -> None:
    fast = RetryPolicy(llm_retries=2, llm_base_seconds=0.0)
    operation = Flaky([LLMTimeoutError("slow"), LLMServerError("500")])
    with caplog.at_level(logging.WARNING, logger="utils.retry_utils"):
        assert await retried(fast, Outcome.LLM_FAILED, "LLM call for conversation 7", operation) == "ok"
    assert operation.calls == 3
    assert "LLM call for conversation 7 failed (attempt 1 of 3), retrying in" in caplog.text


async def test_retried_raises_the_last_error_once_the_policy_gives_up() -> None:
    fast = RetryPolicy(storage_retries=1, storage_base_seconds=0.0)
    errors: list[BaseException] = [StorageUnavailableError(f"down {i}") for i in range(5)]
    operation = Flaky(list(errors))
    with pytest.raises(StorageUnavailableError) as raised:
        await retried(fast, Outcome.WRITE_FAILED, "result write", operation)
    assert operation.calls == 2 and raised.value is errors[1]


async def test_a_policy_passed_in_replaces_the_rules() -> None:
    class NeverRetry(RetryPolicy):
        def decide(self, outcome: Outcome, attempts: Attempts, error: BaseException | None = None) -> Decision:
            return Decision(Verdict.GIVE_UP)

    operation = Flaky([LLMTimeoutError("slow")])
    with pytest.raises(LLMTimeoutError):
        await retried(NeverRetry(), Outcome.LLM_FAILED, "LLM call", operation)
    assert operation.calls == 1
