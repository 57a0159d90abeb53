"""How a failed conversation is retried: the one place to change it
(docs/architecture.md#change-walk-change-the-retry-policy).

Three tiers, each a :class:`Verdict` of :meth:`RetryPolicy.decide`:

1. **Retry now**: a call of the attempt (the LLM call, a MongoDB write) failed with a *transient*
   error (``error.transient``: set where the error is raised, never read from its words): called
   again in place after ``base, 2*base, 4*base`` s plus jitter (:func:`utils.retry_utils.backoff`),
   ``OLLAMA_MAX_RETRIES`` / ``MONGODB_MAX_RETRIES`` times.
2. **Queue**: the attempt failed (``llm_failed``, ``write_failed``): the conversation goes to its
   batch's retry queue, retried in the pass after the batch (``after`` seconds later:
   ``queue_after_seconds``, 0 by default: the pass follows the batch) and on the next start,
   ``BATCH_RETRY_QUEUE_ATTEMPTS`` passes in all.
3. **Give up**: invalid input at once, other failures once the passes are spent: status ``failed``
   with the reason; ``--retry-failed`` (a person's decision) takes them up again in a later run.

The policy is pure logic (no I/O, no clock); the batch processor receives it (``BatchProcessor(...,
policy=...)``), so a test or a deployment can pass another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar

from tenacity import AsyncRetrying

from batch_outcome import Outcome
from config import Settings
from utils.retry_utils import backoff, is_transient, retrying_by

T = TypeVar("T")


class Verdict(Enum):
    RETRY_NOW = "retry now"
    QUEUE = "queue"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    after: float = 0.0  # seconds before the retry (RETRY_NOW: the backoff; QUEUE: before its pass)


@dataclass(frozen=True)
class Attempts:
    """How far a conversation got. ``calls``: calls of the step that just failed, in this pass (None
    when the question is about the conversation, its calls' own retries being over); ``passes``:
    retry-queue passes made, this one included (0 for a conversation fresh from a batch)."""

    calls: int | None = None
    passes: int = 0


class Policy(Protocol):
    def decide(self, outcome: Outcome, attempts: Attempts, error: BaseException | None = None) -> Decision: ...

    def in_place(self, outcome: Outcome, what: str, passes: int = 0) -> AsyncRetrying: ...


@dataclass(frozen=True)
class RetryPolicy:
    """The default policy, from the settings (:meth:`from_settings`)."""

    llm_retries: int = 3
    llm_base_seconds: float = 2.0
    storage_retries: int = 3
    storage_base_seconds: float = 1.0
    queue_passes: int = 3
    queue_after_seconds: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            llm_retries=settings.ollama_max_retries,
            llm_base_seconds=settings.ollama_retry_base_seconds,
            storage_retries=settings.mongodb_max_retries,
            storage_base_seconds=settings.mongodb_retry_base_seconds,
            queue_passes=settings.batch_retry_queue_attempts,
        )

    def decide(self, outcome: Outcome, attempts: Attempts, error: BaseException | None = None) -> Decision:
        """What follows a failure: of one call (``attempts.calls`` set: RETRY_NOW, or GIVE_UP the call,
        the attempt then fails), or of the conversation's attempt (QUEUE or GIVE_UP)."""
        if outcome is Outcome.INVALID:
            return Decision(Verdict.GIVE_UP)  # the input does not change by trying again
        if outcome not in (Outcome.LLM_FAILED, Outcome.WRITE_FAILED):
            raise ValueError(f"{outcome} is not a failure")
        if attempts.calls is not None:
            retries, base = self._in_place(outcome)
            if error is not None and is_transient(error) and attempts.calls <= retries:
                return Decision(Verdict.RETRY_NOW, backoff(attempts.calls, base))
            return Decision(Verdict.GIVE_UP)
        if attempts.passes < self.queue_passes:
            return Decision(Verdict.QUEUE, self.queue_after_seconds)
        return Decision(Verdict.GIVE_UP)

    def in_place(self, outcome: Outcome, what: str, passes: int = 0) -> AsyncRetrying:
        """The tenacity loop of one call, retried as :meth:`decide` says (``async for attempt in ...``)."""

        def delay_after(error: BaseException, calls: int) -> float | None:
            decision = self.decide(outcome, Attempts(calls, passes), error)
            return decision.after if decision.verdict is Verdict.RETRY_NOW else None

        return retrying_by(what, delay_after, calls_at_most=self._in_place(outcome)[0] + 1)

    def _in_place(self, outcome: Outcome) -> tuple[int, float]:
        if outcome is Outcome.LLM_FAILED:
            return self.llm_retries, self.llm_base_seconds
        return self.storage_retries, self.storage_base_seconds



async def retried(policy: Policy, outcome: Outcome, what: str, operation: Callable[[], Awaitable[T]],
                  passes: int = 0) -> T:
    """``operation()``, its failures retried in place as ``policy`` says for ``outcome``; the last error raised."""
    async for attempt in policy.in_place(outcome, what, passes):
        with attempt:
            return await operation()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
