"""Batch processor: classify the conversations of a MongoDB collection, crash-safe and observable.

``python batch_processor.py --help`` for the command line (``cli.py``).

How a run goes (docs/architecture.md#a-run-step-by-step):

1. **Recovery.** Every ``batch_NNN_pending.json`` left by an earlier run of this folder is
   claimed again (what another processor took over meanwhile is dropped) and finished.
2. **Retry queues.** Every ``batch_NNN_retry_queue.jsonl`` gets a pass: a ``write_failed``
   entry is written again *without* calling the LLM; an ``llm_failed`` entry is redone.
3. **New batches.** Up to ``batch_size`` documents at a time are *claimed* in MongoDB
   (``batch_source.BatchSource``: a conditional update to ``processing`` with this worker's
   id and a lease), saved as a pending batch file, then classified ``max_concurrent`` at a
   time. Leases are renewed while the processor runs; expired claims of a dead processor are
   taken over. In batch mode the run ends when nothing is claimable and no other live
   processor holds a claim.

Three parts, in the manner of arq and procrastinate (docs/architecture.md#the-batch-core):
:class:`BatchProcessor` here is the run loop (start, the main loop, the two-stage stop, lease
renewal, totals); ``batch_worker.BatchWorker`` turns one conversation into an
``batch_outcome.Attempt`` (the LLM call, identical conversations classified once, the result
upserted under the claim's generation); ``batch_recorder.Recorder`` writes each outcome once:
source status, retry queue, progress, checkpoint, failure-rate window. How a failure is retried is
``retry_policy.RetryPolicy``'s.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python batch_processor.py` (the design's entry point) runs the command line of cli.py, which
    # imports this module: run it by name, so that neither module imports the other in a cycle, and
    # before this file's imports, which cli's import of the module would otherwise run a second time.
    # The cyclic garbage collector is off while the modules load: their objects live until the exit,
    # and collections during the imports only traversed them (cli turns it on again, issue 19).
    import gc
    import runpy

    gc.disable()
    runpy.run_module("cli", run_name="__main__", alter_sys=True)

import asyncio
import logging
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from async_llm_wrapper import import_transport
from batch_outcome import Attempt, Outcome, WorkItem
from batch_recorder import FailureWindow, Recorder
from batch_source import (
    Batches,
    BatchReader,
    BatchSource,
    BatchState,
    LeaseRenewal,
    OthersClaims,
    default_worker_id,
    id_key,
    with_storage_retries,
)
from batch_worker import BatchWorker
from classifier import ConversationClassifier
from config import Settings
from error_handler import StorageError
from llm_pool import AsyncLLMPool, concurrency_limit
from mongo_client import MongoStore
from retry_policy import Policy, RetryPolicy
from utils.batch_file_manager import BatchConversation, BatchFileManager
from utils.change_watch import ChangeWatcher
from utils.clock import utc_now
from utils.identical_cache import IdenticalCache
from utils.progress import ProgressReporter, ProgressSnapshot, ProgressTracker
from utils.retry_queue import RetryEntry

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Batches in flight at once: the next one is read and queued while the current one finishes.
BATCH_LOOKAHEAD = 2
#: Distinct transcripts remembered per job for reuse (identical conversations), and the memory they
#: may take (~1.5 KB each with the default taxonomy: labels, confidences, model, token counts).
IDENTICAL_CACHE_SIZE = 20_000
IDENTICAL_CACHE_BYTES = 64 * 1024 * 1024


def new_job_id(now: datetime | None = None) -> str:
    """``batch_YYYYMMDD_HHMMSS_xxxxxx``: readable, sortable, and unique although several processors
    start in the same second (a random suffix: worker ids can be long and need not be unique)."""
    return f"batch_{(now or utc_now()):%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunOptions:
    """What the command line asks of one run, beyond the settings."""

    limit: int | None = None
    retry_failed: bool = False


@dataclass(frozen=True)
class Leftovers:
    """What a run left when it ended, by kind (said in the log and the summary)."""

    queued: dict[str, int]  # this folder's retry queues, by entry status: retried on the next run
    released: int = 0  # claims this run still held at exit, released for anyone
    others: OthersClaims = OthersClaims()  # live claims of other processors at the end

    def describe(self) -> str:
        parts = []
        if self.queued:
            kinds = ", ".join(f"{count} {status}" for status, count in sorted(self.queued.items()))
            parts.append(f"{sum(self.queued.values())} in the retry queue ({kinds}) for the next run")
        if self.released:
            parts.append(f"{self.released} claims released")
        if self.others.working or self.others.parked:
            parts.append(f"other processors hold {self.others.working + self.others.parked} "
                         f"({self.others.working} being worked on, {self.others.parked} in their retry queues)")
        return "; ".join(parts) or "nothing"


@dataclass(frozen=True)
class RunSummary:
    job_id: str
    status: str  # completed | stopped
    progress: ProgressSnapshot
    left: Leftovers = field(default_factory=lambda: Leftovers({}))

    @property
    def all_succeeded(self) -> bool:
        return self.progress.failed == 0 and self.progress.queued_for_retry == 0


class _Expected:
    """The job's total while new batches are claimed: the count of claimable documents at the start,
    corrected as batches arrive (more came, or fewer: taken by another processor, a stale count)."""

    def __init__(self, tracker: ProgressTracker, expected: int) -> None:
        self.tracker = tracker
        self.expected = expected
        self.fetched = 0
        tracker.add_total(expected)

    def batch(self, state: BatchState, todo: list[BatchConversation]) -> None:
        self.fetched += len(todo)
        if self.fetched > self.expected:
            self.tracker.add_total(self.fetched - self.expected)
            self.expected = self.fetched

    def end(self) -> None:
        if self.fetched < self.expected:
            self.tracker.add_total(self.fetched - self.expected)


class BatchProcessor:
    """One job over the source collection; :meth:`run` it once, :meth:`request_stop` from a signal.

    The run loop: it reads batches (:class:`~batch_source.BatchReader`), hands each conversation to
    the worker under the concurrency limit, and each attempt to the recorder.
    """

    def __init__(
        self,
        settings: Settings,
        store: MongoStore,
        llm: AsyncLLMPool,
        classifier: ConversationClassifier,
        files: BatchFileManager,
        progress: ProgressReporter,
        options: RunOptions,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.progress = progress
        self.tracker = progress.tracker
        self.options = options
        self.job_id = progress.tracker.job_id
        self.policy = policy or RetryPolicy.from_settings(settings)
        self.source = BatchSource(
            store,
            worker_id=settings.batch_worker_id or default_worker_id(),
            home=f"{socket.gethostname()}:{files.directory.resolve()}",
            job_id=self.job_id,
            lease_seconds=settings.batch_lease_seconds,
            include_failed=options.retry_failed,
        )
        #: content hash -> what copies of its first classification in this job need.
        self.identical = IdenticalCache(IDENTICAL_CACHE_SIZE, IDENTICAL_CACHE_BYTES)
        self.worker = BatchWorker(store, self.source, llm, classifier, self.policy, self.identical)
        window = FailureWindow(settings.batch_failure_window, settings.batch_max_failure_rate)
        self.recorder = Recorder(self.source, files, progress, self.policy, window, on_halt=self._halt)
        # BATCH_MAX_CONCURRENT in total across the LLM servers (the pool spreads it), or AIMD with auto.
        self._semaphore = concurrency_limit(settings, llm)
        # Recordings wait for the database, not the model: they get their own slots, as many as the LLM's,
        # so that behind a database slower than the model they queue here rather than as connections and
        # commands piling up on the database (shared by every processor of the collection).
        self._recording = asyncio.Semaphore(settings.batch_max_concurrent)
        self._stop = asyncio.Event()
        self._stop_requests = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.reader = BatchReader(settings, self.source, files, self._pause)

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

    def _halt(self) -> None:
        """The failure-rate stop fired (the recorder): stop as a first signal would."""
        if not self.stopping:
            self.request_stop()

    def _cancel_in_flight(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False when the run is stopping (the reader's way to wait)."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return not self.stopping

    # --- the job ------------------------------------------------------------------------
    async def run(self) -> RunSummary:
        """Run in the configured mode; returns when done (batch) or stopped (both modes).

        Raises :class:`FailureRateExceededError` when the job stopped on too many model failures.
        """
        logger.info(
            "job %s started: worker %s, mode %s, batch size %d, %d concurrent, lease %.0f s, model %s, data %s, "
            "batch files %s",
            self.job_id, self.source.worker_id, self.settings.batch_processor_mode, self.settings.mongodb_batch_size,
            self.settings.batch_max_concurrent, self.settings.batch_lease_seconds, self.settings.llm_model,
            self.store.description, self.files.directory,
        )
        status = "failed"
        await with_storage_retries(self.settings, "read of the server's time", self.source.sync_clock)
        leases = LeaseRenewal(self.source)
        leases.start()
        try:
            if self.settings.batch_processor_mode == "continuous":
                await self._run_continuously()
            else:
                await self._run_cycle(self.options.limit)
            status = "stopped" if self.stopping else "completed"
        finally:
            # Every step runs whatever the ones before did: claims are always released.
            await self._cancel_and_wait()
            await leases.stop()
            left = await self._leftovers(await leases.release())
            self.recorder.save_checkpoint()
            halted = self.recorder.halted
            snapshot = self.progress.finish("stopped" if halted else status)  # closed by its owner (cli.run)
            logger.info("job %s %s; left: %s", self.job_id, snapshot.status, left.describe())
        if halted:
            raise halted
        return RunSummary(self.job_id, status, snapshot, left)

    async def _run_cycle(self, limit: int | None) -> int:
        """Recovery, retry queues, then new conversations; returns how many new ones were read."""
        await self._pipeline(self.reader.recovered(), lambda state, todo: self.tracker.add_total(
            len(todo) + len(state.queue)))
        if not self.stopping:
            async with aclosing(self.reader.orphan_queues()) as queues:
                async for state in queues:
                    self.tracker.add_total(len(state.queue))
                    await self._retry_pass(state)
                    if self.stopping:
                        break
        read = 0
        if not self.stopping:
            expected = _Expected(self.tracker, await self.reader.claimable(limit))
            # Conversations ahead: the model's HTTP client is imported meanwhile (an empty run never imports it).
            importing = asyncio.create_task(import_transport()) if expected.expected else None
            try:
                read = await self._pipeline(self.reader.claimed(limit), expected.batch)
            finally:
                if importing is not None:
                    await asyncio.gather(importing, return_exceptions=True)  # a failed import fails the first chat
            expected.end()
        self.progress.refresh(force=True)
        return read

    async def _run_continuously(self) -> None:
        # Wake on the source collection's change stream where the server has one; else poll.
        async with ChangeWatcher(self.store.source, enabled=self.settings.batch_change_streams) as watcher:
            await self._poll_until_stopped(watcher)

    async def _poll_until_stopped(self, watcher: ChangeWatcher) -> None:
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
                logger.debug("no new conversations; waiting for a change, or %.0f s", interval)
                await watcher.wait(self._stop, interval)

    async def _cancel_and_wait(self) -> None:
        if self._tasks:
            self._cancel_in_flight()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- what is left ------------------------------------------------------------------
    async def _leftovers(self, released: int) -> Leftovers:
        """What this run leaves: its folder's retry queues by kind, released claims, others' live claims."""
        queued: Counter[str] = Counter()
        others = OthersClaims()
        try:
            for number in self.files.retry_queue_numbers():
                queued.update(entry.status for entry in self.files.retry_queue(number))
            others = await self.source.claims_of_others()
        except Exception as e:  # a summary must not fail the run
            logger.warning("could not count what the run left (%s)", e)
        return Leftovers(dict(queued), released, others)

    # --- batches ------------------------------------------------------------------------
    async def _pipeline(self, batches: Batches, count: Callable[[BatchState, list[BatchConversation]], None]) -> int:
        """Process batches as they come, with up to BATCH_LOOKAHEAD in flight (``count``: each one's
        place in the job's total); returns the count read."""
        running: set[asyncio.Task[None]] = set()
        read = 0
        try:
            async with aclosing(batches) as stream:
                async for state, todo in stream:
                    read += len(todo)
                    count(state, todo)
                    running.add(asyncio.create_task(self._process_batch(state, todo), name=state.batch_id))
                    while len(running) >= BATCH_LOOKAHEAD:
                        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                    if self.stopping:
                        break
            if running:
                for outcome in await asyncio.gather(*running, return_exceptions=True):
                    if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                        raise outcome
        finally:
            for task in running:
                task.cancel()
        return read

    # --- processing a batch -------------------------------------------------------------
    async def _process_batch(self, state: BatchState, todo: list[BatchConversation]) -> None:
        tasks = [self._spawn(self._process_item(state, self._item(state, c.source_id, c.conversation_data)))
                 for c in todo]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.stopping:
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

    @staticmethod
    def _item(state: BatchState, source_id: Any, data: dict[str, Any], entry: RetryEntry | None = None) -> WorkItem:
        """A conversation of ``state`` under this processor's claim on it (the fencing token travels with it)."""
        return WorkItem(source_id, data, state.claim_of(id_key(source_id)), entry)

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_item(self, state: BatchState, item: WorkItem) -> None:
        """The batch item loop's edge: every outcome, expected or not, is recorded.

        The LLM slot is held for the model's part of the attempt only: the result write and the
        recording (the status update, the retry queue) run after it is given back, so the next
        conversation's LLM call does not wait for the database; at most BATCH_MAX_CONCURRENT of them
        run at once, and writes that meet there go to the database together (``BatchWorker.write``,
        ``BatchSource.finish``)."""
        async with self._semaphore:
            if self.stopping:
                return  # not started: stays in the pending file / queue for the next run
            step = await self._unexpected(item, lambda: self.worker.attempt(item, state.existing.get(item.key)))
        async with self._recording:
            attempt = step if isinstance(step, Attempt) else await self._unexpected(
                item, lambda: self.worker.write(item, step))
            await self.recorder.record(state, item, attempt)

    @staticmethod
    async def _unexpected(item: WorkItem, step: Callable[[], Awaitable[T]]) -> T | Attempt:
        """``step()``; an exception is a bug, not a known failure: said loudly, the conversation kept."""
        try:
            return await step()
        except Exception as e:
            logger.exception("conversation %s failed unexpectedly", item.number)
            return Attempt(Outcome.LLM_FAILED, error=e)

    # --- retry queues -------------------------------------------------------------------
    async def _retry_pass(self, state: BatchState) -> None:
        if not state.queue or self.stopping:
            return
        if state.retry_after > 0:  # the retry policy asked for a pause before the queue's pass
            logger.info("%s: %d queued conversations are retried in %.1f s", state.batch_id, len(state.queue),
                        state.retry_after)
            if not await self._pause(state.retry_after):
                return
        logger.info("%s: retrying %d queued conversations", state.batch_id, len(state.queue))
        items = [self._item(state, entry.source_id, entry.conversation_data, entry) for entry in state.queue]
        await asyncio.gather(*(self._spawn(self._process_item(state, item)) for item in items),
                             return_exceptions=True)
        if state.queue and not self.stopping:
            await self._park(state)

    async def _park(self, state: BatchState) -> None:
        """What is left in the queue waits for this processor's next run (or cycle): say so on the
        claims, so that batch-mode processors elsewhere do not wait for them."""
        ids = [entry.source_id for entry in state.queue]
        try:
            await with_storage_retries(self.settings, "update of parked claims",
                                       lambda: self.source.park(ids, state.token))
        except StorageError as e:
            logger.warning("%s: could not mark %d queued conversations as parked (%s); processors in batch mode "
                           "may wait for them up to a lease", state.batch_id, len(ids), e)

