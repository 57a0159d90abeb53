"""The one place an outcome is written (docs/architecture.md#outcomes-of-one-conversation).

Like arq's ``finish_job``: the worker (:mod:`batch_worker`) decides what came of a conversation,
:class:`Recorder` writes it, with one call each to the source collection (``BatchSource.finish``,
only while this run's claim holds the document), the batch's retry queue (``put`` / ``update`` /
``remove``) and the progress tracker (``record_queued`` / ``record_resolved``), then the checkpoint
and the failure-rate window. What a failure becomes is the retry policy's (:mod:`retry_policy`).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace

from batch_outcome import FAILURES, NO_CUSTOMER_TURN, Attempt, Outcome, WorkItem, describe
from batch_source import BatchSource, BatchState
from error_handler import FailureRateExceededError, LLMError, StorageError
from mongo_client import STATUS_FAILED, STATUS_PROCESSED, STATUS_SKIPPED
from retry_policy import Attempts, Policy, Verdict, retried
from utils.batch_file_manager import BatchFileManager, Checkpoint
from utils.clock import iso_now
from utils.progress import ProgressReporter
from utils.retry_queue import RetryEntry, RetryStatus

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 50
#: The tracker's word for each resting state (a failure given up on is ``failed``).
_RESTING = {Outcome.SUCCESS: "success", Outcome.ALREADY_CLASSIFIED: "already_classified",
            Outcome.SKIPPED: "skipped", Outcome.LOST_CLAIM: "lost_claim", Outcome.INVALID: "failed",
            Outcome.LLM_FAILED: "failed", Outcome.WRITE_FAILED: "failed"}


class FailureWindow:
    """The design's error threshold: the share of model failures over the last N finished conversations."""

    def __init__(self, size: int, max_rate: float) -> None:
        self.size = size
        self.max_rate = max_rate
        self._window: deque[str | None] = deque(maxlen=size)
        self._examples: dict[str, str] = {}

    def record(self, failure: tuple[str, str] | None) -> bool:
        """Record a finished conversation ((error_type, reason) when the model failed it);
        True once the window is full and its failure share is above the limit."""
        self._window.append(failure[0] if failure else None)
        if failure:
            self._examples[failure[0]] = failure[1]
        return self.exceeded

    @property
    def seen(self) -> int:
        """Finished conversations in the window (at most ``size``)."""
        return len(self._window)

    @property
    def failures(self) -> int:
        return sum(1 for code in self._window if code is not None)

    @property
    def exceeded(self) -> bool:
        return (self.max_rate > 0 and len(self._window) >= self.size
                and self.failures / len(self._window) > self.max_rate)

    def most_common(self) -> tuple[str, int, str]:
        code, count = Counter(c for c in self._window if c is not None).most_common(1)[0]
        return code, count, self._examples.get(code, "")


FAILURE_FIXES = {
    "llm_bad_output": "The model's answers are not usable classifications: check LLM_MODEL (a model that "
    "follows JSON schemas), TAXONOMY_FILE and FEW_SHOTS_FILE; try one conversation with python -m scripts.api_client.",
    "llm_timeout": "The model is too slow: raise OLLAMA_TIMEOUT, or lower --max-concurrent.",
    "llm_unavailable": "Ollama cannot be reached: check that it runs at LLM_ENDPOINT (ollama serve).",
    "llm_server_error": "Ollama fails while answering: check its log (out of memory? a crashed runner?).",
    "llm_busy": "Ollama is overloaded: lower --max-concurrent, or raise OLLAMA_NUM_PARALLEL on the server.",
    "model_not_found": "The model is not on the server: ollama pull it, or set LLM_MODEL.",
    "llm_request_rejected": "Ollama rejects the requests: check LLM_MODEL and OLLAMA_NUM_PREDICT.",
}


def failure_rate_error(window: FailureWindow) -> FailureRateExceededError:
    code, count, example = window.most_common()
    fix = FAILURE_FIXES.get(code, "Check the model and the Ollama server.")
    return FailureRateExceededError(
        f"Stopped: {window.failures} of the last {window.seen} conversations failed because of the model "
        f"(limit {window.max_rate:.0%}); most common: {code} ({count}x), e.g. {example[:300]}",
        hint=f"{fix} Nothing unfinished was marked failed: rerun once fixed and it continues "
        "(BATCH_MAX_FAILURE_RATE=0 turns this check off).",
        most_common=code,
    )


class Recorder:
    """Writes each :class:`~batch_outcome.Attempt` of a job: source status, retry queue, tracker,
    checkpoint, failure-rate window. ``on_halt`` is called once when the failure rate stops the job."""

    def __init__(self, source: BatchSource, files: BatchFileManager, progress: ProgressReporter, policy: Policy,
                 window: FailureWindow, on_halt: Callable[[], None]) -> None:
        self.source = source
        self.files = files
        self.progress = progress
        self.tracker = progress.tracker
        self.policy = policy
        self.window = window
        self._on_halt = on_halt
        #: Set when the failure-rate stop fired: the run raises it at its end.
        self.halted: FailureRateExceededError | None = None
        #: Conversations counted as queued for retry in this job (by id_key).
        self._queued: set[str] = set()
        self.checkpoint = files.load_checkpoint() or Checkpoint(progress.tracker.job_id)
        self.checkpoint.job_id = progress.tracker.job_id
        self._since_checkpoint = 0

    async def record(self, state: BatchState, item: WorkItem, attempt: Attempt) -> None:
        """Write ``attempt``: processed, queued for retry, or given up (failed / skipped); a claim found
        lost at the result write or at the status update is dropped."""
        outcome, error = attempt.outcome, attempt.error
        if outcome is Outcome.LOST_CLAIM:
            self._rest(state, item, outcome, lost_at="result write")
            return
        if outcome in (Outcome.SUCCESS, Outcome.ALREADY_CLASSIFIED):
            try:
                held = await self._finish(item, STATUS_PROCESSED)
            except StorageError as e:  # the result stands, its status does not: retried as a write
                outcome, error = Outcome.WRITE_FAILED, e
            else:
                self._rest(state, item, outcome if held else Outcome.LOST_CLAIM, lost_at="status update")
                return
        if outcome in FAILURES:
            decision = self.policy.decide(outcome, Attempts(passes=item.passes), error)
            if decision.verdict is not Verdict.GIVE_UP:
                self._queue(state, item, Attempt(outcome, error, attempt.result), decision.after)
                return
        await self._give_up(state, item, outcome, error)

    async def _give_up(self, state: BatchState, item: WorkItem, outcome: Outcome, error: BaseException | None) -> None:
        """Status ``skipped`` (no customer turn) or ``failed`` with the reason, under this run's claim."""
        skipped = outcome is Outcome.SKIPPED
        status = STATUS_SKIPPED if skipped else STATUS_FAILED
        reason, code = describe(error)
        try:
            held = await self._finish(item, status, reason=reason, error_type=NO_CUSTOMER_TURN if skipped else code)
        except StorageError as e:
            logger.error("conversation %s could not be marked %s (%s); it stays in the batch files",
                         item.number, status, e)
            return
        if not held:
            self._rest(state, item, Outcome.LOST_CLAIM, lost_at="status update")
            return
        if skipped:
            logger.warning("conversation %s skipped: %s", item.number, reason)
        elif item.entry is not None:
            logger.error("failed to process conversation %s after %d retries: %s",
                         item.number, item.passes, reason)
        else:
            logger.error("failed to process conversation %s: %s", item.number, reason)
        self._rest(state, item, outcome)

    async def _finish(self, item: WorkItem, status: str, *, reason: str | None = None,
                      error_type: str | None = None) -> bool:
        return await retried(
            self.policy, Outcome.WRITE_FAILED, f"status update to {status}",
            lambda: self.source.finish(item.source_id, item.claim, status, reason=reason, error_type=error_type),
        )

    def _queue(self, state: BatchState, item: WorkItem, attempt: Attempt, after: float) -> None:
        """Put a failure in its batch's retry queue (its pass ``after`` seconds from now), or record
        another failed pass of a queued one."""
        reason, code = describe(attempt.error)
        kept = attempt.result.to_mongo() if attempt.result is not None else None
        entry = item.entry
        if entry is None:
            entry = RetryEntry(item.source_id, _queued_as(attempt.outcome), item.data, reason, code,
                               result=kept if attempt.outcome is Outcome.WRITE_FAILED else None)
            state.queue.put(entry)
            logger.warning("conversation %s queued for retry (%s): %s", item.number, entry.status, reason)
            if isinstance(attempt.error, LLMError):  # the model failed it, after its retries
                self._window_record((code, reason))
            state.queued(item.key, after)
            self._checkpointed()
        else:
            if kept is None and attempt.outcome is Outcome.WRITE_FAILED:
                kept = entry.result  # failed before its write (a claim check): the paid result stays
            entry = replace(entry, status=_queued_as(attempt.outcome), retry_count=item.passes, reason=reason,
                            error_type=code, failed_at=iso_now(), conversation_data=item.data, result=kept)
            state.queue.update(entry)
            logger.warning("conversation %s still failing (%s, retry %d): %s", item.number, entry.status,
                           entry.retry_count, reason)
        if item.key not in self._queued:
            self._queued.add(item.key)
            self.tracker.record_queued()

    def _rest(self, state: BatchState, item: WorkItem, outcome: Outcome, *, lost_at: str = "") -> None:
        """A conversation reached a resting state: out of its queue, counted, checkpointed."""
        if outcome is Outcome.LOST_CLAIM:
            logger.info("conversation %s (id %s): claim generation %d was no longer current at its %s (taken over "
                        "by another processor, or the document was reset): dropped, the newer state stands",
                        item.number, item.key, item.claim.generation, lost_at)
        if item.entry is not None:
            state.queue.remove(item.source_id)
        was_queued = item.key in self._queued
        self._queued.discard(item.key)
        kind = _RESTING[outcome]
        self.tracker.record_resolved(kind, was_queued=was_queued)
        state.resolved(item.key, kind)
        if item.entry is None:
            if kind == "success":
                self._window_record(None)
            self._checkpointed()
        else:  # a queue entry was counted resolved when it was queued
            self.progress.refresh()

    def _window_record(self, failure: tuple[str, str] | None) -> None:
        if self.window.record(failure) and self.halted is None:
            self.halted = failure_rate_error(self.window)
            logger.error("%s", self.halted)
            self._on_halt()

    def _checkpointed(self) -> None:
        """One more conversation of a batch resolved (at rest, or in the retry queue)."""
        self._since_checkpoint += 1
        self.checkpoint.conversations_resolved += 1
        if self._since_checkpoint >= CHECKPOINT_INTERVAL:
            self.save_checkpoint()
        self.progress.refresh()

    def save_checkpoint(self) -> None:
        self._since_checkpoint = 0
        self.files.save_checkpoint(self.checkpoint)


def _queued_as(outcome: Outcome) -> RetryStatus:
    """A retry entry's status: what is redone (the whole attempt, or only the write)."""
    return "write_failed" if outcome is Outcome.WRITE_FAILED else "llm_failed"
