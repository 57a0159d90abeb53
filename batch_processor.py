"""Batch processor: classify the conversations of a MongoDB collection, crash-safe and observable.

``python batch_processor.py --help`` for the command line (``cli.py``).

How a run goes (design Phase 2, DESIGN.md sections 5-6):

1. **Recovery.** Every ``batch_NNN_pending.json`` left by an earlier run is finished:
   conversations that already have a result are skipped, the rest are classified.
2. **Retry queues.** Every ``batch_NNN_retry_queue.json`` gets a pass: a ``write_failed``
   entry is written again *without* calling the LLM; an ``llm_failed`` entry is redone.
3. **New batches.** Unprocessed documents (status ``pending`` or none; ``failed`` too with
   ``--retry-failed``) are read ``batch_size`` at a time by ``_id > checkpoint``, saved as a
   pending batch file, marked ``processing``, then classified ``max_concurrent`` at a time.
   The next batch is read while the current one finishes, so the LLM never idles and at
   most two batches are in memory.

Each conversation: LLM call (transient errors retried 2/4/8 s with jitter, behind a
circuit breaker), then an immediate idempotent upsert of its result and ``processed``
status (MongoDB errors retried 1/2/4 s). What still fails goes to the batch's retry
queue (``llm_failed`` or ``write_failed``); after ``BATCH_RETRY_QUEUE_ATTEMPTS`` passes it
is marked ``failed`` with its reason. An invalid document is marked ``failed`` at once.
When every conversation of a batch is resolved, ``batch_NNN_completed.json`` replaces
its pending file. A checkpoint of the reading position is saved every 50 conversations.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from bson import ObjectId

from aggregator import validate_conversation
from async_llm_wrapper import AsyncOllamaClient
from classifier import ClassificationOutcome, ConversationClassifier
from config import Settings
from error_handler import InputError, LLMError, LLMOutputError, StorageError
from mongo_client import STATUS_PROCESSING, MongoStore
from utils.batch_file_manager import (
    BatchConversation,
    BatchFileManager,
    Checkpoint,
    PendingBatch,
    RetryEntry,
    batch_id,
    iso_now,
    utc_now,
)
from utils.progress import ProgressReporter, ProgressSnapshot
from utils.retry_utils import CircuitBreaker, counts_against_ollama, retrying

logger = logging.getLogger(__name__)

PROCESSOR_VERSION = "1.0.0"
#: error_type of a failure that is a bug rather than a known failure (logged with its traceback).
UNEXPECTED_ERROR = "internal_error"
CHECKPOINT_INTERVAL = 50
#: Batches in flight at once: the next one is read and queued while the current one finishes.
BATCH_LOOKAHEAD = 2
#: Fields of a source document kept in batch files: what classification needs.
CONVERSATION_FIELDS = ("conversation_number", "messages", "tweets")

T = TypeVar("T")


def new_job_id(now: datetime | None = None) -> str:
    return f"batch_{(now or utc_now()):%Y%m%d_%H%M%S}"


def conversation_payload(document: dict[str, Any]) -> dict[str, Any]:
    return {key: document[key] for key in CONVERSATION_FIELDS if key in document}


@dataclass(frozen=True)
class RunOptions:
    """What the command line asks of one run, beyond the settings."""

    limit: int | None = None
    retry_failed: bool = False


@dataclass(frozen=True)
class RunSummary:
    job_id: str
    status: str  # completed | stopped
    progress: ProgressSnapshot

    @property
    def all_succeeded(self) -> bool:
        return self.progress.failed == 0 and self.progress.queued_for_retry == 0


@dataclass
class BatchState:
    """A batch being worked on: what is left of it and its retry queue."""

    number: int
    queue: list[RetryEntry]
    unresolved: set[str] = field(default_factory=set)
    has_pending_file: bool = True
    successful: int = 0
    failed: int = 0

    @property
    def batch_id(self) -> str:
        return batch_id(self.number)


class BatchProcessor:
    """One job over the source collection; :meth:`run` it once, :meth:`request_stop` from a signal."""

    def __init__(
        self,
        settings: Settings,
        store: MongoStore,
        llm: AsyncOllamaClient,
        classifier: ConversationClassifier,
        files: BatchFileManager,
        progress: ProgressReporter,
        options: RunOptions,
    ) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.classifier = classifier
        self.files = files
        self.progress = progress
        self.tracker = progress.tracker
        self.options = options
        self.job_id = progress.tracker.job_id
        self.breaker = CircuitBreaker(
            settings.circuit_breaker_failure_threshold, settings.circuit_breaker_recovery_seconds
        )
        self._semaphore = asyncio.Semaphore(settings.batch_max_concurrent)
        self._stop = asyncio.Event()
        self._stop_requests = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued_this_run: set[str] = set()
        self._checkpoint = files.load_checkpoint() or Checkpoint(None, self.job_id)
        self._checkpoint.job_id = self.job_id
        self._resolved_since_checkpoint = 0

    # --- stopping -----------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """First call: read no more, let in-flight conversations finish within the grace period.
        Second call: cancel them at once. Unfinished work stays in the batch files."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            grace = self.settings.batch_shutdown_grace_seconds
            logger.warning(
                "stop requested: no new conversations; %d in flight get up to %.0f s to finish "
                "(stop again to cancel them; unfinished work resumes on the next start)",
                len(self._tasks), grace,
            )
            self._stop.set()
            asyncio.get_running_loop().call_later(grace, self._cancel_in_flight)
        else:
            self._cancel_in_flight()

    def _cancel_in_flight(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- the job ------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        """Run in the configured mode; returns when done (batch) or stopped (both modes)."""
        logger.info(
            "job %s started: mode %s, batch size %d, %d concurrent, model %s, data %s, batch files %s",
            self.job_id, self.settings.batch_processor_mode, self.settings.mongodb_batch_size,
            self.settings.batch_max_concurrent, self.settings.ollama_model, self.store.description,
            self.files.directory,
        )
        status = "failed"
        try:
            if self.settings.batch_processor_mode == "continuous":
                await self._run_continuously()
            else:
                await self._run_cycle(self.options.limit)
            status = "stopped" if self.stopping else "completed"
        finally:
            await self._cancel_and_wait()
            self.files.save_checkpoint(self._checkpoint)
            snapshot = self.progress.close(status)
        return RunSummary(self.job_id, status, snapshot)

    async def _run_cycle(self, limit: int | None) -> int:
        """Recovery, retry queues, then new conversations; returns how many new ones were read."""
        await self._pipeline(self._recovered_batches())
        if not self.stopping:
            await self._drain_orphan_queues()
        read = 0
        if not self.stopping:
            read = await self._pipeline(self._new_batches(limit))
        self.progress.refresh(force=True)
        return read

    async def _run_continuously(self) -> None:
        interval = self.settings.batch_poll_interval
        while not self.stopping:
            try:
                read = await self._run_cycle(None)
            except StorageError as e:
                if not e.transient:
                    raise
                logger.error("MongoDB unavailable (%s); trying again in %.0f s", e, interval)
                read = 0
            if read == 0 and not self.stopping:
                logger.debug("no new conversations; next poll in %.0f s", interval)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=interval)
                except TimeoutError:
                    pass

    async def _cancel_and_wait(self) -> None:
        if self._tasks:
            self._cancel_in_flight()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- reading batches ----------------------------------------------------------------
    async def _pipeline(self, batches: AsyncIterator[tuple[BatchState, list[BatchConversation]]]) -> int:
        """Process batches as they come, with up to BATCH_LOOKAHEAD in flight; returns the count read."""
        running: set[asyncio.Task[None]] = set()
        read = 0
        try:
            async with aclosing(batches) as stream:
                async for state, todo in stream:
                    read += len(todo)
                    running.add(asyncio.create_task(self._process_batch(state, todo), name=state.batch_id))
                    while len(running) >= BATCH_LOOKAHEAD:
                        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                    if self.stopping:
                        break
            if running:
                for task in await asyncio.gather(*running, return_exceptions=True):
                    if isinstance(task, BaseException) and not isinstance(task, asyncio.CancelledError):
                        raise task
        finally:
            for task in running:
                task.cancel()
        return read

    async def _recovered_batches(self) -> AsyncIterator[tuple[BatchState, list[BatchConversation]]]:
        """Pending files of an earlier run, minus what already has a result or sits in a queue."""
        for number in self.files.pending_numbers():
            if self.stopping:
                return
            pending = self.files.load_pending(number)
            state = BatchState(number, self.files.load_retry_queue(number))
            queued = {entry.conversation_id for entry in state.queue}
            self._expect_queued(state.queue)
            left = [c for c in pending.conversations if c.object_id not in queued]
            self.tracker.add_total(len(left))
            todo = await self._skip_classified(state, left)
            logger.info(
                "recovering %s: %d of %d conversations left, %d in its retry queue",
                state.batch_id, len(todo), len(pending.conversations), len(queued),
            )
            yield state, todo

    async def _new_batches(self, limit: int | None) -> AsyncIterator[tuple[BatchState, list[BatchConversation]]]:
        """Unprocessed documents, ``batch_size`` at a time, from the checkpoint onwards."""
        include_failed = self.options.retry_failed
        size = self.settings.mongodb_batch_size
        remaining = limit
        expected = await self._with_storage_retries(
            "count of unprocessed conversations", lambda: self.store.count_unprocessed(include_failed=include_failed)
        )
        expected = expected if remaining is None else min(expected, remaining)
        self.tracker.add_total(expected)
        if include_failed:
            async with aclosing(self._orphan_batches(remaining)) as orphans:
                async for state, todo in orphans:
                    remaining = None if remaining is None else remaining - len(todo)
                    yield state, todo
        fetched = 0
        position = ObjectId(self._checkpoint.last_object_id) if self._checkpoint.last_object_id else None
        wrapped = position is None
        while not self.stopping and (remaining is None or remaining > 0):
            want = size if remaining is None else min(size, remaining)
            documents = await self._with_storage_retries(
                "read of unprocessed conversations",
                lambda: self.store.fetch_unprocessed(position, want, include_failed=include_failed),
            )
            if not documents:
                if not wrapped and position is not None:
                    wrapped = True
                    behind = await self._with_storage_retries(
                        "read of unprocessed conversations",
                        lambda: self.store.has_unprocessed_before(position, include_failed=include_failed),
                    )
                    if behind:  # documents inserted behind the checkpoint (or failed ones being retried)
                        position = None
                        continue
                break
            position = documents[-1]["_id"]
            fetched += len(documents)
            if fetched > expected:  # documents arrived during the run
                self.tracker.add_total(fetched - expected)
                expected = fetched
            if remaining is not None:
                remaining -= len(documents)
            yield await self._start_batch(documents)
        if fetched < expected:  # fewer than counted (taken by another reader, or the count was stale)
            self.tracker.add_total(fetched - expected)

    async def _orphan_batches(self, limit: int | None) -> AsyncIterator[tuple[BatchState, list[BatchConversation]]]:
        """Documents left in 'processing' with no batch file (e.g. the folder was lost): with --retry-failed."""
        queued = [ObjectId(i) for i in self.files.queued_conversation_ids()]
        while not self.stopping and (limit is None or limit > 0):
            want = self.settings.mongodb_batch_size if limit is None else min(self.settings.mongodb_batch_size, limit)
            documents = await self._with_storage_retries(
                "read of orphaned conversations",
                lambda: self.store.find_by_status(STATUS_PROCESSING, queued, want),
            )
            if not documents:
                return
            logger.warning("%d conversations were 'processing' with no batch file; classifying them again",
                           len(documents))
            self.tracker.add_total(len(documents))
            if limit is not None:
                limit -= len(documents)
            yield await self._start_batch(documents)

    async def _start_batch(self, documents: list[dict[str, Any]]) -> tuple[BatchState, list[BatchConversation]]:
        """Save documents as a pending batch file, then mark them processing."""
        number = self.files.next_batch_number()
        pending = PendingBatch(
            number, self.job_id, [BatchConversation(str(d["_id"]), conversation_payload(d)) for d in documents]
        )
        self.files.write_pending(pending)
        ids = [d["_id"] for d in documents]
        await self._with_storage_retries("status update", lambda: self.store.mark_processing(ids, utc_now()))
        self._checkpoint.last_object_id = pending.last_object_id
        self.files.save_checkpoint(self._checkpoint)
        state = BatchState(number, [])
        todo = await self._skip_classified(state, pending.conversations)
        logger.info("%s: %d conversations read (%s .. %s)", state.batch_id, len(documents),
                    pending.first_object_id, pending.last_object_id)
        return state, todo

    async def _skip_classified(self, state: BatchState, conversations: list[BatchConversation]) -> list[BatchConversation]:
        """Drop conversations that already have a result (marking them processed): never classify twice."""
        ids = [ObjectId(c.object_id) for c in conversations]
        done = await self._with_storage_retries("read of existing results", lambda: self.store.ids_with_results(ids))
        if done:
            await self._with_storage_retries(
                "status update", lambda: self.store.mark_processed_many(sorted(done), utc_now())
            )
            self.tracker.record_already_classified(len(done))
            self.tracker.add_total(-len(done))
        todo = [c for c in conversations if ObjectId(c.object_id) not in done]
        state.unresolved = {c.object_id for c in todo}
        return todo

    def _expect_queued(self, entries: list[RetryEntry]) -> None:
        self.tracker.add_total(len(entries))

    # --- processing a batch -------------------------------------------------------------
    async def _process_batch(self, state: BatchState, todo: list[BatchConversation]) -> None:
        tasks = [self._spawn(self._process_conversation(state, c)) for c in todo]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.stopping:
            self.files.save_retry_queue(state.number, state.queue)
            return
        await self._retry_pass(state)
        if not state.unresolved:
            if state.has_pending_file:
                self.files.mark_completed(
                    state.number,
                    {"job_id": self.job_id, "successful": state.successful, "failed": state.failed,
                     "queued_for_retry": len(state.queue)},
                )
            logger.info("%s done: %d successful, %d failed, %d in its retry queue",
                        state.batch_id, state.successful, state.failed, len(state.queue))

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_conversation(self, state: BatchState, item: BatchConversation) -> None:
        """The batch item loop's edge: every outcome, expected or not, ends recorded somewhere."""
        async with self._semaphore:
            if self.stopping:
                return  # not started: stays in the pending file for the next run
            number = str(item.conversation_data.get("conversation_number", item.object_id))
            try:
                await self._classify_and_store(state, item, number)
            except Exception as e:  # a bug, not a known failure: say so loudly, keep the conversation
                logger.exception("conversation %s failed unexpectedly", number)
                self._enqueue(state, RetryEntry(item.object_id, "llm_failed", item.conversation_data,
                                                f"unexpected {type(e).__name__}: {e}", UNEXPECTED_ERROR))

    async def _classify_and_store(self, state: BatchState, item: BatchConversation, number: str) -> None:
        try:
            conversation = validate_conversation(item.conversation_data)
        except InputError as e:
            await self._give_up(state, item.object_id, number, e)
            return
        try:
            outcome = await self._classify(conversation)
        except LLMError as e:
            self._enqueue(state, RetryEntry(item.object_id, "llm_failed", item.conversation_data, str(e), e.code))
            return
        result, metadata = self._result_document(item.object_id, number, outcome)
        try:
            await self._store(result)
        except StorageError as e:
            self._enqueue(
                state,
                RetryEntry(item.object_id, "write_failed", item.conversation_data, str(e), e.code,
                           classification_result=result["classification"], processing_metadata=metadata),
            )
            return
        logger.info("processed conversation %s successfully in %d ms", number, outcome.duration_ms)
        state.successful += 1
        self._resolved(state, item.object_id)
        self.tracker.record_success()

    def _result_document(
        self, object_id: str, number: str, outcome: ClassificationOutcome
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        metadata = {
            "processed_at": utc_now(),
            "model_used": outcome.chat.model,
            "processing_duration_ms": outcome.duration_ms,
            "llm_tokens": outcome.chat.token_counts(),
            "processor_version": PROCESSOR_VERSION,
            "batch_job_id": self.job_id,
        }
        result = {
            "conversation_number": number,
            "source_conversation_id": ObjectId(object_id),
            "classification": outcome.classification.model_dump(),
            "processing_metadata": metadata,
        }
        return result, metadata

    async def _classify(self, conversation: Any) -> ClassificationOutcome:
        """The LLM call: transient failures retried with backoff, behind the circuit breaker."""
        policy = retrying(
            f"LLM call for conversation {conversation.conversation_number}",
            max_retries=self.settings.ollama_max_retries,
            base_delay=self.settings.ollama_retry_base_seconds,
        )
        async for attempt in policy:
            with attempt:
                probe = await self.breaker.before_call()
                try:
                    outcome = await self.classifier.classify_async(conversation, self.llm)
                except LLMOutputError:
                    self.breaker.record_success()  # Ollama answered; the answer was the problem
                    raise
                except LLMError as e:
                    if counts_against_ollama(e):
                        self.breaker.record_failure(e)
                    raise
                except BaseException:
                    # Cancelled, or a bug: no verdict on Ollama, but a probe must not keep the others waiting.
                    if probe:
                        self.breaker.cancel_probe()
                    raise
                self.breaker.record_success()
        return outcome

    async def _store(self, result: dict[str, Any]) -> None:
        """Upsert the result, then mark the source processed; transient failures retried."""
        source_id = result["source_conversation_id"]

        async def write() -> None:
            now = utc_now()
            await self.store.upsert_result(result, created_at=now)
            await self.store.mark_processed(source_id, now)

        await self._with_storage_retries(f"result write for conversation {result['conversation_number']}", write)

    async def _with_storage_retries(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        policy = retrying(
            what, max_retries=self.settings.mongodb_max_retries, base_delay=self.settings.mongodb_retry_base_seconds
        )
        async for attempt in policy:
            with attempt:
                return await operation()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    # --- outcomes -----------------------------------------------------------------------
    def _resolved(self, state: BatchState, object_id: str) -> None:
        state.unresolved.discard(object_id)
        self._resolved_since_checkpoint += 1
        self._checkpoint.conversations_resolved += 1
        if self._resolved_since_checkpoint >= CHECKPOINT_INTERVAL:
            self._resolved_since_checkpoint = 0
            self.files.save_checkpoint(self._checkpoint)
        self.progress.refresh()

    def _enqueue(self, state: BatchState, entry: RetryEntry) -> None:
        """Put a failure in the batch's retry queue (saved at once)."""
        number = str(entry.conversation_data.get("conversation_number", entry.conversation_id))
        logger.warning("conversation %s queued for retry (%s): %s", number, entry.status, entry.reason)
        state.queue.append(entry)
        self.files.save_retry_queue(state.number, state.queue)
        self._queued_this_run.add(entry.conversation_id)
        self._resolved(state, entry.conversation_id)
        self.tracker.record_queued()

    async def _give_up(self, state: BatchState, object_id: str, number: str, error: Exception) -> bool:
        """Mark the source document failed with its reason; False when even that write failed."""
        code = getattr(error, "code", type(error).__name__)
        try:
            await self._with_storage_retries(
                "status update to failed",
                lambda: self.store.mark_failed(ObjectId(object_id), str(error), code, utc_now()),
            )
        except StorageError as e:
            logger.error("conversation %s could not be marked failed (%s); it stays in the batch files", number, e)
            return False
        logger.error("failed to process conversation %s: %s", number, error)
        state.failed += 1
        self._resolved(state, object_id)
        self.tracker.record_failed()
        return True

    # --- retry queues -------------------------------------------------------------------
    async def _drain_orphan_queues(self) -> None:
        """One pass over the retry queues of batches that have no pending file any more."""
        pending = set(self.files.pending_numbers())
        for number in self.files.retry_queue_numbers():
            if self.stopping or number in pending:
                continue
            state = BatchState(number, self.files.load_retry_queue(number), has_pending_file=False)
            self._expect_queued(state.queue)
            await self._retry_pass(state)

    async def _retry_pass(self, state: BatchState) -> None:
        if not state.queue or self.stopping:
            return
        logger.info("%s: retrying %d queued conversations", state.batch_id, len(state.queue))
        entries = list(state.queue)
        await asyncio.gather(*(self._spawn(self._retry_entry(state, entry)) for entry in entries),
                             return_exceptions=True)
        self.files.save_retry_queue(state.number, state.queue)

    async def _retry_entry(self, state: BatchState, entry: RetryEntry) -> None:
        async with self._semaphore:
            if self.stopping:
                return
            number = str(entry.conversation_data.get("conversation_number", entry.conversation_id))
            counted = entry.conversation_id in self._queued_this_run
            try:
                if entry.status == "write_failed" and entry.classification_result is not None:
                    # The classification is already paid for: write it, no LLM call.
                    result = {
                        "conversation_number": number,
                        "source_conversation_id": ObjectId(entry.conversation_id),
                        "classification": entry.classification_result,
                        "processing_metadata": entry.processing_metadata or {},
                    }
                    await self._store(result)
                else:
                    conversation = validate_conversation(entry.conversation_data)
                    outcome = await self._classify(conversation)
                    result, metadata = self._result_document(entry.conversation_id, number, outcome)
                    try:
                        await self._store(result)
                    except StorageError:
                        entry.status = "write_failed"
                        entry.classification_result = result["classification"]
                        entry.processing_metadata = metadata
                        raise
            except InputError as e:
                await self._finish_entry(state, entry, succeeded=False, counted=counted, error=e)
                return
            except Exception as e:  # LLM or storage failures, and bugs (logged with their traceback)
                known = isinstance(e, (LLMError, StorageError))
                if not known:
                    logger.exception("queued conversation %s failed unexpectedly", number)
                entry.retry_count += 1
                entry.reason = str(e) if known else f"unexpected {type(e).__name__}: {e}"
                entry.error_type = getattr(e, "code", UNEXPECTED_ERROR)
                entry.failed_at = iso_now()
                if entry.retry_count >= self.settings.batch_retry_queue_attempts:
                    await self._finish_entry(state, entry, succeeded=False, counted=counted, error=e)
                else:
                    logger.warning("conversation %s still failing (%s, retry %d of %d): %s", number, entry.status,
                                   entry.retry_count, self.settings.batch_retry_queue_attempts, e)
                    if not counted:
                        self._queued_this_run.add(entry.conversation_id)
                        self.tracker.record_queued()
                return
            logger.info("processed queued conversation %s successfully (%s)", number, entry.status)
            await self._finish_entry(state, entry, succeeded=True, counted=counted)

    async def _finish_entry(
        self, state: BatchState, entry: RetryEntry, *, succeeded: bool, counted: bool, error: Exception | None = None
    ) -> None:
        """Take an entry out of its queue: it succeeded, or it is given up and marked failed."""
        if not succeeded:
            number = str(entry.conversation_data.get("conversation_number", entry.conversation_id))
            reason = error or RuntimeError(entry.reason)
            code = getattr(reason, "code", entry.error_type)
            try:
                await self._with_storage_retries(
                    "status update to failed",
                    lambda: self.store.mark_failed(ObjectId(entry.conversation_id), str(reason), code, utc_now()),
                )
            except StorageError as e:
                logger.error("conversation %s could not be marked failed (%s); it stays queued", number, e)
                return
            logger.error("failed to process conversation %s after %d retries: %s", number, entry.retry_count, reason)
        state.queue.remove(entry)
        self.files.save_retry_queue(state.number, state.queue)
        if counted:
            self.tracker.record_requeue_resolved(succeeded)
            self._queued_this_run.discard(entry.conversation_id)
        elif succeeded:
            self.tracker.record_success()
        else:
            self.tracker.record_failed()
        if succeeded:
            state.successful += 1
        else:
            state.failed += 1
        self.progress.refresh()


if __name__ == "__main__":
    from cli import main

    raise SystemExit(main())
