"""Batch processor: classify the conversations of a MongoDB collection, crash-safe and observable.

``python batch_processor.py --help`` for the command line (``cli.py``).

How a run goes (docs/architecture.md#a-run-step-by-step):

1. **Recovery.** Every ``batch_NNN_pending.json`` left by an earlier run of this folder is
   claimed again (what another processor took over meanwhile is dropped) and finished.
2. **Retry queues.** Every ``batch_NNN_retry_queue.json`` gets a pass: a ``write_failed``
   entry is written again *without* calling the LLM; an ``llm_failed`` entry is redone.
3. **New batches.** Up to ``batch_size`` documents at a time are *claimed* in MongoDB
   (``batch_source.BatchSource``: a conditional update to ``processing`` with this worker's
   id and a lease), saved as a pending batch file, then classified ``max_concurrent`` at a
   time. Leases are renewed while the processor runs; expired claims of a dead processor are
   taken over. In batch mode the run ends when nothing is claimable and no other live
   processor holds a claim.

Each conversation: LLM call (transient errors retried 2/4/8 s with jitter, behind a
circuit breaker; identical conversations of a job are classified once), then an immediate
idempotent upsert of its :class:`~mongo_client.ResultDocument`, fenced by the claim's
generation (MongoDB errors retried 1/2/4 s). Every outcome goes through
:meth:`BatchProcessor._record`, the one place that moves the source status (only while this
run's claim holds it), the retry queue, the progress tracker, the checkpoint and the
failure-rate window; a claim found lost on the way is dropped there (``lost_claim``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from aggregator import ConversationIn, content_hash, validate_conversation
from batch_source import (
    Batches,
    BatchReader,
    BatchSource,
    BatchState,
    Claim,
    OthersClaims,
    conversation_payload,
    default_worker_id,
    id_key,
    with_storage_retries,
)
from classifier import ClassificationOutcome, ConversationClassifier
from config import Settings
from error_handler import (
    ClassifierError,
    FailureRateExceededError,
    InputError,
    LLMError,
    NoCustomerTurnError,
    StorageError,
)
from llm_pool import AsyncLLMPool, concurrency_limit
from mongo_client import (
    STATUS_FAILED,
    STATUS_PROCESSED,
    STATUS_SKIPPED,
    MongoStore,
    ProcessingMetadata,
    ResultDocument,
)
from utils.batch_file_manager import (
    BatchConversation,
    BatchFileManager,
    Checkpoint,
    RetryEntry,
    iso_now,
    utc_now,
)
from utils.change_watch import ChangeWatcher
from utils.identical_cache import IdenticalCache, Reusable
from utils.progress import ProgressReporter, ProgressSnapshot
from utils.retry_utils import retrying

logger = logging.getLogger(__name__)

PROCESSOR_VERSION = "1.1.0"
#: error_type of a failure that is a bug rather than a known failure (logged with its traceback).
UNEXPECTED_ERROR = "internal_error"
#: error_type (and failure_type) of a conversation with no customer turn: status 'skipped'.
NO_CUSTOMER_TURN = "no_customer_turn"
CHECKPOINT_INTERVAL = 50
#: Batches in flight at once: the next one is read and queued while the current one finishes.
BATCH_LOOKAHEAD = 2
#: Distinct transcripts remembered per job for reuse (identical conversations), and the memory they
#: may take (~1.5 KB each with the default taxonomy: labels, confidences, model, token counts).
IDENTICAL_CACHE_SIZE = 20_000
IDENTICAL_CACHE_BYTES = 64 * 1024 * 1024
#: How long the end of a run waits for the lease-renewal task to stop before cancelling it.
RENEWER_STOP_SECONDS = 5.0

# Outcomes of one attempt at a conversation (recorded by BatchProcessor._record).
SUCCESS = "success"
ALREADY_CLASSIFIED = "already_classified"  # a result with the same content hash exists
INVALID = "invalid"
SKIPPED = "skipped"  # no customer turn: nothing to classify
LLM_FAILED = "llm_failed"
WRITE_FAILED = "write_failed"
FAILED = "failed"  # given up after the retry-queue passes
#: The claim was no longer this processor's when it wrote (taken over, or the document reset): its
#: result or status change is dropped, the newer claim's stands (docs/architecture.md#exactly-once-the-fencing-rule).
LOST_CLAIM = "lost_claim"

T = TypeVar("T")


def new_job_id(now: datetime | None = None) -> str:
    """``batch_YYYYMMDD_HHMMSS_xxxxxx``: readable, sortable, and unique although several processors
    start in the same second (a random suffix: worker ids can be long and need not be unique)."""
    return f"batch_{(now or utc_now()):%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"


def describe(error: BaseException) -> tuple[str, str]:
    """(reason, error_type) of a failure for queues, statuses and logs."""
    if isinstance(error, ClassifierError):
        return str(error), error.code
    return f"unexpected {type(error).__name__}: {error}", UNEXPECTED_ERROR


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


@dataclass
class WorkItem:
    """One conversation to attempt: fresh from a batch, or an entry of a retry queue, under ``claim``
    (whose generation every result written for it carries)."""

    source_id: Any
    data: dict[str, Any]
    claim: Claim
    entry: RetryEntry | None = None

    @property
    def key(self) -> str:
        return id_key(self.source_id)

    @property
    def number(self) -> str:
        return str(self.data.get("conversation_number", self.key))


@dataclass
class Outcome:
    kind: str
    error: BaseException | None = None
    result: ResultDocument | None = None


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
        f"Stopped: {window.failures} of the last {len(window._window)} conversations failed because of the model "
        f"(limit {window.max_rate:.0%}); most common: {code} ({count}x), e.g. {example[:300]}",
        hint=f"{fix} Nothing unfinished was marked failed: rerun once fixed and it continues "
        "(BATCH_MAX_FAILURE_RATE=0 turns this check off).",
        most_common=code,
    )


class BatchProcessor:
    """One job over the source collection; :meth:`run` it once, :meth:`request_stop` from a signal."""

    def __init__(
        self,
        settings: Settings,
        store: MongoStore,
        llm: AsyncLLMPool,
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
        self.source = BatchSource(
            store,
            worker_id=settings.batch_worker_id or default_worker_id(),
            home=f"{socket.gethostname()}:{files.directory.resolve()}",
            job_id=self.job_id,
            lease_seconds=settings.batch_lease_seconds,
            include_failed=options.retry_failed,
        )
        self.window = FailureWindow(settings.batch_failure_window, settings.batch_max_failure_rate)
        self._halted: FailureRateExceededError | None = None
        # BATCH_MAX_CONCURRENT in total across the LLM servers (the pool spreads it), or AIMD with auto.
        self._semaphore = concurrency_limit(settings, llm)
        self._stop = asyncio.Event()
        self._stop_requests = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued_this_run: set[str] = set()
        #: content hash -> what copies of its first classification in this job need.
        self.identical = IdenticalCache(IDENTICAL_CACHE_SIZE, IDENTICAL_CACHE_BYTES)
        #: Set when the run ends: the lease renewal stops (it is never cancelled mid-write: see _renew_leases).
        self._renewal_done = asyncio.Event()
        self._checkpoint = files.load_checkpoint() or Checkpoint(self.job_id)
        self._checkpoint.job_id = self.job_id
        self._resolved_since_checkpoint = 0
        self.reader = BatchReader(settings, self.source, files, self.tracker, self._stop)

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
        await self._with_storage_retries("read of the server's time", self.source.sync_clock)
        renewer = asyncio.create_task(self._renew_leases(), name="lease renewal")
        try:
            if self.settings.batch_processor_mode == "continuous":
                await self._run_continuously()
            else:
                await self._run_cycle(self.options.limit)
            status = "stopped" if self.stopping else "completed"
        finally:
            # Every step runs whatever the ones before did: claims are always released.
            await self._cancel_and_wait()
            await self._stop_renewal(renewer)
            left = await self._leftovers(await self._release_claims())
            self.files.save_checkpoint(self._checkpoint)
            snapshot = self.progress.finish("stopped" if self._halted else status)  # closed by its owner (cli.run)
            logger.info("job %s %s; left: %s", self.job_id, snapshot.status, left.describe())
        if self._halted:
            raise self._halted
        return RunSummary(self.job_id, status, snapshot, left)

    async def _run_cycle(self, limit: int | None) -> int:
        """Recovery, retry queues, then new conversations; returns how many new ones were read."""
        await self._pipeline(self.reader.recovered())
        if not self.stopping:
            async with aclosing(self.reader.orphan_queues()) as queues:
                async for state in queues:
                    await self._retry_pass(state)
        read = 0
        if not self.stopping:
            read = await self._pipeline(self.reader.claimed(limit))
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

    # --- leases -------------------------------------------------------------------------
    async def _renew_leases(self) -> None:
        """Renew every lease this worker holds, three times per lease period, until the run ends.

        Stopped by an event, not by cancelling it: on Python 3.11 asyncio.wait_for (which PyMongo's
        send uses) can swallow a cancellation that arrives as its operation completes (CPython
        gh-86296), and a cancelled loop that swallowed it would run on and hold the end of the run.
        A renewal that fails, expectedly or not, is logged and tried again: a dead renewal task
        would let the leases run out under the processor's feet.
        """
        interval = self.settings.batch_lease_seconds / 3
        while not self._renewal_done.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._renewal_done.wait(), timeout=interval)
            if self._renewal_done.is_set():
                return
            try:
                await self.source.renew()
            except StorageError as e:
                logger.warning("lease renewal failed (%s); trying again in %.1f s", e, interval)
            except Exception:
                logger.exception("lease renewal failed unexpectedly; trying again in %.1f s", interval)

    async def _stop_renewal(self, renewer: asyncio.Task[None]) -> None:
        self._renewal_done.set()
        done, _ = await asyncio.wait({renewer}, timeout=RENEWER_STOP_SECONDS)
        if not done:  # stuck in a renewal: cancel it, without waiting on it again
            renewer.cancel()
            logger.warning("lease renewal did not stop within %.0f s; cancelled", RENEWER_STOP_SECONDS)
        elif not renewer.cancelled() and renewer.exception() is not None:  # a bug; the release runs anyway
            logger.error("lease renewal ended with an error", exc_info=renewer.exception())

    async def _release_claims(self) -> int:
        """Release what this worker still holds; returns how many claims (0 when it could not)."""
        try:
            released = await self.source.release()
        except StorageError as e:
            logger.warning("could not release the claims of %s (%s); they expire on their own",
                           self.source.worker_id, e)
            return 0
        except Exception:
            logger.exception("could not release the claims of %s; they expire on their own", self.source.worker_id)
            return 0
        if released:
            logger.info("%d claimed conversations left unfinished: released for the next run or another processor",
                        released)
        return released

    async def _leftovers(self, released: int) -> Leftovers:
        """What this run leaves: its folder's retry queues by kind, released claims, others' live claims."""
        queued: Counter[str] = Counter()
        others = OthersClaims()
        try:
            for number in self.files.retry_queue_numbers():
                queued.update(entry.status for entry in self.files.load_retry_queue(number))
            others = await self.source.claims_of_others()
        except Exception as e:  # a summary must not fail the run
            logger.warning("could not count what the run left (%s)", e)
        return Leftovers(dict(queued), released, others)

    # --- batches ------------------------------------------------------------------------
    async def _pipeline(self, batches: Batches) -> int:
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
                for outcome in await asyncio.gather(*running, return_exceptions=True):
                    if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                        raise outcome
        finally:
            for task in running:
                task.cancel()
        return read

    # --- processing a batch -------------------------------------------------------------
    async def _process_batch(self, state: BatchState, todo: list[BatchConversation]) -> None:
        tasks = [self._spawn(self._process_item(state, self._item(state, c.object_id, c.conversation_data)))
                 for c in todo]
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
        """The batch item loop's edge: every outcome, expected or not, is recorded."""
        async with self._semaphore:
            if self.stopping:
                return  # not started: stays in the pending file / queue for the next run
            try:
                outcome = await self._attempt(state, item)
            except Exception as e:  # a bug, not a known failure: say so loudly, keep the conversation
                logger.exception("conversation %s failed unexpectedly", item.number)
                outcome = Outcome(LLM_FAILED, error=e)
            await self._record(state, item, outcome)

    async def _attempt(self, state: BatchState, item: WorkItem) -> Outcome:
        """Validate, classify (or reuse), write the result under the item's claim. Raises only for bugs."""
        entry = item.entry
        if entry is not None and entry.status == WRITE_FAILED and entry.classification_result is not None:
            replayed = await self._replay(item, entry)
            if replayed is not None:
                return replayed
            # The conversation changed since it was classified: item.data holds its text now.
        try:
            conversation = validate_conversation(item.data)
        except InputError as e:
            return Outcome(SKIPPED if isinstance(e, NoCustomerTurnError) else INVALID, error=e)
        digest = content_hash(conversation)
        if state.existing.get(item.key) == digest:
            try:
                # Its result is this claim's from now on: no late writer of an older claim replaces it.
                if await self._with_storage_retries("result check", lambda: self.store.stamp_result(
                        item.source_id, digest, item.claim.generation)):
                    return Outcome(ALREADY_CLASSIFIED)
            except StorageError as e:
                return Outcome(WRITE_FAILED, error=e)
            # Replaced or removed since the batch was read: classified, and the fenced write decides.
        try:
            result = await self._classified(conversation, item, digest)
        except LLMError as e:
            return Outcome(LLM_FAILED, error=e)
        return await self._write(item, result)

    async def _replay(self, item: WorkItem, entry: RetryEntry) -> Outcome | None:
        """Write a classification paid for earlier (a write_failed entry) without asking the LLM again,
        if the claim holds and the conversation is still the one classified; None when it changed
        (``item.data`` then holds its current text, to classify)."""
        assert entry.classification_result is not None
        result = ResultDocument(item.number, item.source_id, entry.classification_result, entry.content_hash,
                                self._stored_metadata(entry.processing_metadata), item.claim.generation)
        try:
            current = await self._with_storage_retries("check of a claim", lambda: self.source.holding(
                item.source_id, item.claim, conversation=entry.content_hash is not None))
        except StorageError as e:
            return Outcome(WRITE_FAILED, error=e, result=result)
        if current is None:
            return Outcome(LOST_CLAIM)
        if entry.content_hash is not None and _hash_or_none(current) != entry.content_hash:
            logger.info("conversation %s changed since its classification was queued: it is classified again",
                        item.number)
            item.data = conversation_payload(current)
            return None
        return await self._write(item, result, checked=True)

    def _stored_metadata(self, data: dict[str, Any] | None) -> ProcessingMetadata:
        data = dict(data or {})
        data.setdefault("processed_at", self.source.now())
        return ProcessingMetadata.from_mongo(data)

    async def _classified(self, conversation: ConversationIn, item: WorkItem, digest: str) -> ResultDocument:
        """The classification of ``conversation``: from the model, or reused from an identical
        conversation of this job (classified once, even when both are in flight at once)."""
        shared = self.identical.get(digest)
        if shared is not None:
            first = await asyncio.shield(shared)
            if first is not None:  # else the first one failed: classify this one itself
                self.identical.touch(digest)
                logger.info("conversation %s is identical to an earlier one of this job: its classification "
                            "is reused", item.number)
                return self._result_document(conversation, item, digest, first, reused=True)
        future = self.identical.begin(digest)
        try:
            outcome = await self._classify(conversation)
        except BaseException:
            self.identical.finish(digest, future, None)
            raise
        reusable = Reusable(item.source_id, outcome.classification.model_dump(), outcome.chat.model,
                            outcome.chat.token_counts())
        self.identical.finish(digest, future, reusable)
        logger.info("processed conversation %s successfully in %d ms", item.number, outcome.duration_ms)
        return self._result_document(conversation, item, digest, reusable, duration_ms=outcome.duration_ms)

    def _result_document(self, conversation: ConversationIn, item: WorkItem, digest: str, reusable: Reusable, *,
                         duration_ms: int = 0, reused: bool = False) -> ResultDocument:
        metadata = ProcessingMetadata(
            processed_at=self.source.now(),
            model_used=reusable.model,
            processing_duration_ms=0 if reused else duration_ms,
            processor_version=PROCESSOR_VERSION,
            batch_job_id=self.job_id,
            reused_from=reusable.source_id if reused else None,
            llm_tokens=None if reused else reusable.llm_tokens,
        )
        return ResultDocument(conversation.conversation_number, item.source_id, reusable.classification, digest,
                              metadata, item.claim.generation)

    async def _classify(self, conversation: ConversationIn) -> ClassificationOutcome:
        """The LLM call: transient failures retried with backoff, behind the pool's per-server circuit breakers."""
        policy = retrying(
            f"LLM call for conversation {conversation.conversation_number}",
            max_retries=self.settings.ollama_max_retries,
            base_delay=self.settings.ollama_retry_base_seconds,
        )
        async for attempt in policy:
            with attempt:
                # Every server's circuit open: pause until one may be tried, as with a single server.
                await self.llm.wait_for_server()
                outcome = await self.classifier.classify_async(conversation, self.llm)
        return outcome

    async def _write(self, item: WorkItem, result: ResultDocument, *, checked: bool = False) -> Outcome:
        """Upsert the result under the item's claim: SUCCESS, WRITE_FAILED (kept for a retry without the
        LLM) or LOST_CLAIM (the claim is no longer current: nothing was written).

        The fence (docs/architecture.md#exactly-once-the-fencing-rule): the claim must still be the
        document's current one (unless the caller just ``checked``), and the upsert only replaces a
        result of the same or an older generation. Transient failures are retried.
        """
        try:
            if not checked and await self._with_storage_retries("check of a claim", lambda: self.source.holding(
                    item.source_id, item.claim)) is None:
                return Outcome(LOST_CLAIM, result=result)
            written = await self._with_storage_retries(
                f"result write for conversation {result.conversation_number}",
                lambda: self.store.upsert_result(result, created_at=self.source.now()),
            )
        except StorageError as e:
            return Outcome(WRITE_FAILED, error=e, result=result)
        return Outcome(SUCCESS, result=result) if written else Outcome(LOST_CLAIM, result=result)

    async def _with_storage_retries(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await with_storage_retries(self.settings, what, operation)

    # --- outcomes -----------------------------------------------------------------------
    async def _record(self, state: BatchState, item: WorkItem, outcome: Outcome) -> None:
        """The one place an outcome is recorded (like arq's finish_job): MongoDB status (only
        while this run's claim holds the document), retry queue, tracker, checkpoint, failure window."""
        kind = outcome.kind
        if kind == LOST_CLAIM:
            self._lost(state, item, "result write")
            return
        if kind in (SUCCESS, ALREADY_CLASSIFIED):
            try:
                held = await self._finish_in_mongo(item, STATUS_PROCESSED)
            except StorageError as e:
                kind, outcome = WRITE_FAILED, Outcome(WRITE_FAILED, error=e, result=outcome.result)
            else:
                if held:
                    self._resolve(state, item, kind)
                else:
                    self._lost(state, item, "status update")
                return
        if kind in (LLM_FAILED, WRITE_FAILED):
            if self._queue(state, item, outcome):
                return
            kind = FAILED  # retry-queue passes used up
        status = STATUS_SKIPPED if kind == SKIPPED else STATUS_FAILED
        reason, code = describe(outcome.error) if outcome.error else ("failed", "error")
        try:
            held = await self._finish_in_mongo(item, status, reason=reason,
                                               error_type=NO_CUSTOMER_TURN if kind == SKIPPED else code)
        except StorageError as e:
            logger.error("conversation %s could not be marked %s (%s); it stays in the batch files",
                         item.number, status, e)
            return
        if not held:
            self._lost(state, item, "status update")
            return
        if kind == SKIPPED:
            logger.warning("conversation %s skipped: %s", item.number, reason)
        elif item.entry is not None:
            logger.error("failed to process conversation %s after %d retries: %s",
                         item.number, item.entry.retry_count, reason)
        else:
            logger.error("failed to process conversation %s: %s", item.number, reason)
        self._resolve(state, item, kind)

    async def _finish_in_mongo(self, item: WorkItem, status: str, *,
                               reason: str | None = None, error_type: str | None = None) -> bool:
        return await self._with_storage_retries(
            f"status update to {status}",
            lambda: self.source.finish(item.source_id, item.claim, status, reason=reason, error_type=error_type),
        )

    def _lost(self, state: BatchState, item: WorkItem, stage: str) -> None:
        """A claim found lost (at the result write or the status update): what this processor did is
        dropped, the newer claim's state stands. Counted apart; logged with ids only."""
        logger.info("conversation %s (id %s): claim generation %d was no longer current at its %s (taken over "
                    "by another processor, or the document was reset): dropped, the newer state stands",
                    item.number, item.key, item.claim.generation, stage)
        self._resolve(state, item, LOST_CLAIM)

    def _queue(self, state: BatchState, item: WorkItem, outcome: Outcome) -> bool:
        """Put a failure in (or keep it in) the batch's retry queue; False when its passes are used up."""
        assert outcome.error is not None
        reason, code = describe(outcome.error)
        result = outcome.result
        entry = item.entry
        if entry is None:
            entry = RetryEntry(item.source_id, outcome.kind, item.data, reason, code)  # type: ignore[arg-type]
            state.queue.append(entry)
            logger.warning("conversation %s queued for retry (%s): %s", item.number, entry.status, reason)
            if isinstance(outcome.error, LLMError):  # the model failed it, after its retries
                self._window_record((code, reason))
        else:
            entry.retry_count += 1
            entry.reason, entry.error_type, entry.failed_at = reason, code, iso_now()
            entry.status = outcome.kind  # type: ignore[assignment]
            if item.data is not entry.conversation_data:  # changed since it was queued: the current text
                entry.conversation_data = item.data
            if outcome.kind == LLM_FAILED:  # nothing paid for is kept: the next pass classifies
                entry.classification_result = entry.processing_metadata = entry.content_hash = None
            if entry.retry_count >= self.settings.batch_retry_queue_attempts:
                return False
            logger.warning("conversation %s still failing (%s, retry %d of %d): %s", item.number, entry.status,
                           entry.retry_count, self.settings.batch_retry_queue_attempts, reason)
        if result is not None and outcome.kind == WRITE_FAILED:
            entry.classification_result = result.classification
            entry.processing_metadata = result.processing_metadata.to_mongo()
            entry.content_hash = result.content_hash
        if item.entry is None:
            self.files.save_retry_queue(state.number, state.queue)
            self._resolved(state, item.key)
        if item.key not in self._queued_this_run:
            self._queued_this_run.add(item.key)
            self.tracker.record_queued()
        return True

    def _resolve(self, state: BatchState, item: WorkItem, kind: str) -> None:
        """A conversation reached a resting state: out of its queue, counted, checkpointed."""
        if item.entry is not None:
            state.queue.remove(item.entry)
            self.files.save_retry_queue(state.number, state.queue)
        counted = item.key in self._queued_this_run
        self._queued_this_run.discard(item.key)
        if counted and kind in (SUCCESS, FAILED, INVALID):
            self.tracker.record_requeue_resolved(kind == SUCCESS)
        else:
            if counted:
                self.tracker.queued_for_retry -= 1
            if kind == SUCCESS:
                self.tracker.record_success()
            elif kind in (FAILED, INVALID):
                self.tracker.record_failed()
            elif kind == SKIPPED:
                self.tracker.record_skipped()
            else:  # already classified, or no longer ours: not this job's work
                if kind == ALREADY_CLASSIFIED:
                    self.tracker.record_already_classified(1)
                elif kind == LOST_CLAIM:
                    self.tracker.record_lost_claim()
                self.tracker.add_total(-1)
        if kind == SUCCESS:
            state.successful += 1
        elif kind in (FAILED, INVALID):
            state.failed += 1
        if item.entry is None:
            if kind == SUCCESS:
                self._window_record(None)
            self._resolved(state, item.key)
        else:  # a queue entry was counted resolved when it was queued
            self.progress.refresh()

    def _window_record(self, failure: tuple[str, str] | None) -> None:
        if self.window.record(failure) and self._halted is None:
            self._halted = failure_rate_error(self.window)
            logger.error("%s", self._halted)
            if not self.stopping:
                self.request_stop()

    def _resolved(self, state: BatchState, key: str) -> None:
        state.unresolved.discard(key)
        self._resolved_since_checkpoint += 1
        self._checkpoint.conversations_resolved += 1
        if self._resolved_since_checkpoint >= CHECKPOINT_INTERVAL:
            self._resolved_since_checkpoint = 0
            self.files.save_checkpoint(self._checkpoint)
        self.progress.refresh()

    # --- retry queues -------------------------------------------------------------------
    async def _retry_pass(self, state: BatchState) -> None:
        if not state.queue or self.stopping:
            return
        logger.info("%s: retrying %d queued conversations", state.batch_id, len(state.queue))
        items = [self._item(state, entry.conversation_id, entry.conversation_data, entry) for entry in state.queue]
        await asyncio.gather(*(self._spawn(self._process_item(state, item)) for item in items),
                             return_exceptions=True)
        self.files.save_retry_queue(state.number, state.queue)
        if state.queue and not self.stopping:
            await self._park(state)

    async def _park(self, state: BatchState) -> None:
        """What is left in the queue waits for this processor's next run (or cycle): say so on the
        claims, so that batch-mode processors elsewhere do not wait for them."""
        ids = [entry.conversation_id for entry in state.queue]
        try:
            await self._with_storage_retries("update of parked claims", lambda: self.source.park(ids, state.token))
        except StorageError as e:
            logger.warning("%s: could not mark %d queued conversations as parked (%s); processors in batch mode "
                           "may wait for them up to a lease", state.batch_id, len(ids), e)


def _hash_or_none(document: dict[str, Any]) -> str | None:
    """The content hash of a source document's conversation; None when it is no longer valid."""
    try:
        return content_hash(validate_conversation(conversation_payload(document)))
    except InputError:
        return None


if __name__ == "__main__":
    # `python batch_processor.py` (the design's entry point) runs the command line of cli.py, which
    # imports this module: run it by name so that neither module imports the other in a cycle.
    import runpy

    runpy.run_module("cli", run_name="__main__", alter_sys=True)
