"""The reading side of the batch processor: claims with leases in MongoDB
(docs/architecture.md#claims-and-leases).

:class:`BatchSource` talks to the source collection (claims, leases, conditional status
updates); :class:`BatchReader` turns it and the batch files folder into the batches a
processor works on.

MongoDB is the only coordinator between processors. A processor takes documents with a
conditional update that only matches what nobody holds::

    status pending | absent                       -> processing, claimed_by, claim_id, lease_expires_at,
    status processing with an expired lease           claim_generation + 1
    (its processor died: taken over)
    status failed of an earlier run               (only with --retry-failed)

``claim_id`` is a fresh token per claim: only the holder of that token may move the
document on (``processed`` / ``failed`` / ``skipped``), so a processor that lost its claim
(lease expired and taken over, or a user reset the document to ``pending``) can never
overwrite what happened since. ``claim_generation`` grows with every claim of the document and
fences its result: see :class:`Claim` and docs/architecture.md#exactly-once-the-fencing-rule.
Leases are renewed every third of ``BATCH_LEASE_SECONDS`` for everything the worker still
holds; every lease time is the database server's (:mod:`utils.server_clock`).

Nothing here orders or compares ``_id`` values: MongoDB compares ``$gt`` within one BSON
type only, and source ``_id`` values may be of any type. ``_id`` values are kept as they
are (ObjectId, int, double, string, UUID binary, embedded document ...) end to end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from bson import json_util
from pymongo.errors import PyMongoError

from config import Settings
from mongo_client import (
    STATUS_FAILED,
    STATUS_PROCESSED,
    STATUS_PROCESSING,
    STATUS_SKIPPED,
    MongoStore,
    storage_error,
    unprocessed_filter,
)
from utils.batch_file_manager import (
    BatchConversation,
    BatchFileManager,
    PendingBatch,
    RetryEntry,
    batch_id,
)
from utils.progress import ProgressTracker
from utils.retry_utils import retrying
from utils.server_clock import ServerClock

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Fields of a source document kept in batch files: what classification needs.
CONVERSATION_FIELDS = ("conversation_number", "messages", "tweets")
_CANONICAL = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True)
#: Batch mode waits for other processors' claims until the latest lease seen would have expired, plus this.
WAIT_MARGIN_SECONDS = 1.0
#: Fields a claim adds to a source document (removed when the holder finishes it). ``claim_generation``
#: is not among them: it stays, so that the next claim's generation is higher.
CLAIM_FIELDS = ("claimed_by", "claim_id", "claim_run", "claim_home", "lease_expires_at", "claimed_at", "claim_parked")


def conversation_payload(document: dict[str, Any]) -> dict[str, Any]:
    return {key: document[key] for key in CONVERSATION_FIELDS if key in document}


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def id_key(value: Any) -> str:
    """A hashable, type-preserving key for any BSON ``_id`` (1, 1.0 and "1" stay distinct)."""
    return json_util.dumps(value, json_options=_CANONICAL, sort_keys=False)


@dataclass(frozen=True)
class Claim:
    """This processor's hold on one document: the token of the claim (``claim_id``, shared by the
    documents claimed together) and the document's ``claim_generation`` under it, the fencing token
    that every result written under the claim carries."""

    token: str
    generation: int


def claimable_filter(
    now: datetime, *, include_failed: bool, run_id: str, home: str | None = None
) -> dict[str, Any]:
    """Documents this worker may take now (``now``: the database server's time)."""
    branches: list[dict[str, Any]] = [
        unprocessed_filter(include_failed=False),
        {"status": STATUS_PROCESSING, "lease_expires_at": {"$lt": now}},
        # 'processing' without a lease: left by a processor of before leases; nobody renews it.
        {"status": STATUS_PROCESSING, "lease_expires_at": {"$exists": False}},
    ]
    if home is not None:
        # Claimed from this batch folder by another run: a processor that crashed (the folder lock
        # proves it is not running), whose claims may be lost from its files.
        branches.append({"status": STATUS_PROCESSING, "claim_home": home, "claim_run": {"$ne": run_id}})
    if include_failed:
        # Failed in an earlier run only: a run never picks up its own failures again.
        branches.append({"status": STATUS_FAILED, "last_run_id": {"$ne": run_id}})
    return {"$or": branches}


@dataclass(frozen=True)
class OthersClaims:
    """Live claims of other processors: ``working`` on, or only ``parked`` in their retry queues
    until their next run; ``latest_expiry`` of the working ones (server time)."""

    working: int = 0
    parked: int = 0
    latest_expiry: datetime | None = None


class BatchSource:
    """Claims, lease renewal and conditional status updates on the source collection.

    Every time here is the database server's (:class:`~utils.server_clock.ServerClock`, read by
    :meth:`sync_clock` before the first claim and again with every renewal)."""

    def __init__(
        self,
        store: MongoStore,
        *,
        worker_id: str,
        home: str,
        job_id: str,
        lease_seconds: float,
        include_failed: bool = False,
        clock: ServerClock | None = None,
    ) -> None:
        self.store = store
        self.collection = store.source
        self.worker_id = worker_id
        #: This processor's batch folder (host:path): its own claims from before a crash are its to recover.
        self.home = home
        self.job_id = job_id
        #: Unique per run (job ids have a one-second resolution); marks what this run claimed and finished.
        self.run_id = uuid.uuid4().hex
        self.lease = timedelta(seconds=lease_seconds)
        self.include_failed = include_failed
        self.clock = clock or ServerClock(store.server_time)

    async def sync_clock(self) -> None:
        await self.clock.sync()

    def now(self) -> datetime:
        return self.clock.now()

    def _filter(self) -> dict[str, Any]:
        return claimable_filter(self.now(), include_failed=self.include_failed, run_id=self.run_id, home=self.home)

    def _claim_update(self, token: str) -> dict[str, Any]:
        now = self.now()
        return {"$set": {"status": STATUS_PROCESSING, "claimed_by": self.worker_id, "claim_id": token,
                         "claim_run": self.run_id, "claim_home": self.home, "claimed_at": now,
                         "lease_expires_at": now + self.lease, "last_processed_at": now},
                # The fencing token: one more than any earlier claim of the document, whoever made it.
                "$inc": {"claim_generation": 1},
                "$unset": {"claim_parked": ""}}

    async def count_claimable(self) -> int:
        try:
            return await self.collection.count_documents(self._filter())
        except PyMongoError as e:
            raise storage_error(e, "count of unprocessed conversations") from e

    async def claim(self, limit: int) -> tuple[str, list[dict[str, Any]]]:
        """Claim up to ``limit`` documents; returns the claim token and the documents won (each
        with its ``claim_generation``).

        Candidates are read first, then taken by one conditional ``update_many`` that
        re-checks the claimable filter document by document: when processors race for the
        same candidates each document goes to exactly one of them. A loser reads again.
        """
        token = uuid.uuid4().hex
        try:
            while True:
                candidates = await self.collection.find(self._filter(), projection={"_id": 1}).limit(limit).to_list(
                    length=limit
                )
                if not candidates:
                    return token, []
                ids = [doc["_id"] for doc in candidates]
                await self.collection.update_many({"$and": [{"_id": {"$in": ids}}, self._filter()]},
                                                  self._claim_update(token))
                won = await self.collection.find({"claim_id": token}).to_list(length=None)
                if won:
                    return token, won
        except PyMongoError as e:
            raise storage_error(e, "claim of unprocessed conversations") from e

    async def reclaim(self, ids: Iterable[Any]) -> tuple[str, dict[str, int]]:
        """Claim again documents named in this folder's batch files (recovery, retry queues).

        Taken when claimable, or when still claimed from this folder (by this processor or a
        crashed earlier one: the folder lock says it is not running). Returns the new token
        and the :func:`id_key` -> ``claim_generation`` of the documents won; the others were
        finished or taken over by another processor since, and are not this processor's any more.
        """
        token = uuid.uuid4().hex
        wanted = list(ids)
        if not wanted:
            return token, {}
        mine = {"status": STATUS_PROCESSING, "claim_home": self.home}
        query = {"$and": [{"_id": {"$in": wanted}}, {"$or": [self._filter(), mine]}]}
        try:
            await self.collection.update_many(query, self._claim_update(token))
            won = await self.collection.find({"claim_id": token}, projection={"_id": 1, "claim_generation": 1}
                                             ).to_list(length=None)
        except PyMongoError as e:
            raise storage_error(e, "claim of recovered conversations") from e
        return token, {id_key(doc["_id"]): int(doc["claim_generation"]) for doc in won}

    async def holding(self, source_id: Any, claim: Claim, *, conversation: bool = False) -> dict[str, Any] | None:
        """The document while ``claim`` is still its current claim (with its conversation fields
        when asked), else None: the claim was lost (taken over, released and taken, or reset)."""
        projection = {key: 1 for key in CONVERSATION_FIELDS} if conversation else {"_id": 1}
        try:
            return await self.collection.find_one(
                {"_id": source_id, "status": STATUS_PROCESSING, "claim_id": claim.token,
                 "claim_generation": claim.generation},
                projection=projection,
            )
        except PyMongoError as e:
            raise storage_error(e, "check of a claim") from e

    async def renew(self) -> int:
        """Read the server's time again and extend the lease of everything this worker holds;
        returns how many documents."""
        await self.sync_clock()
        try:
            result = await self.collection.update_many(
                {"status": STATUS_PROCESSING, "claimed_by": self.worker_id},
                {"$set": {"lease_expires_at": self.now() + self.lease}},
            )
        except PyMongoError as e:
            raise storage_error(e, "lease renewal") from e
        return result.matched_count

    async def park(self, ids: list[Any], token: str) -> None:
        """Say that these claims only wait in this processor's retry queue for its next run: batch
        mode elsewhere does not wait for them (the lease still keeps them this processor's)."""
        try:
            await self.collection.update_many(
                {"_id": {"$in": ids}, "status": STATUS_PROCESSING, "claim_id": token},
                {"$set": {"claim_parked": True}},
            )
        except PyMongoError as e:
            raise storage_error(e, "update of parked claims") from e

    async def release(self) -> int:
        """Let the leases of what this worker still holds expire now (at exit): others may take
        them at once. Its own batch folder still recovers them on its next start if nobody did."""
        try:
            result = await self.collection.update_many(
                {"status": STATUS_PROCESSING, "claimed_by": self.worker_id},
                {"$set": {"lease_expires_at": self.now()}},
            )
        except PyMongoError as e:
            raise storage_error(e, "release of claims") from e
        return result.matched_count

    async def claims_of_others(self) -> OthersClaims:
        """What other processors hold with a live lease (batch mode waits for the working ones)."""
        query = {"status": STATUS_PROCESSING, "claimed_by": {"$ne": self.worker_id},
                 "lease_expires_at": {"$gte": self.now()}}
        working = parked = 0
        latest: datetime | None = None
        try:
            async for doc in self.collection.find(query, projection={"lease_expires_at": 1, "claim_parked": 1}):
                if doc.get("claim_parked"):
                    parked += 1
                    continue
                working += 1
                expiry = doc.get("lease_expires_at")
                if isinstance(expiry, datetime) and (latest is None or expiry > latest):
                    latest = expiry
        except PyMongoError as e:
            raise storage_error(e, "count of claimed conversations") from e
        return OthersClaims(working, parked, latest)

    async def finish(self, source_id: Any, claim: Claim, status: str, *, reason: str | None = None,
                     error_type: str | None = None) -> bool:
        """Move a claimed document to ``status``, only while ``claim`` holds it.

        False when the claim was lost (the lease expired and another processor took it, or
        the document was reset meanwhile): the newer state is left untouched.
        """
        now = self.now()
        update: dict[str, Any] = {
            "$set": {"status": status, "last_processed_at": now, "last_job_id": self.job_id,
                     "last_run_id": self.run_id},
            "$unset": {field: "" for field in CLAIM_FIELDS},
        }
        if status == STATUS_PROCESSED:
            update["$unset"].update({"failure_reason": "", "failure_type": "", "error_type": ""})
        else:
            assert status in (STATUS_FAILED, STATUS_SKIPPED), status
            update["$set"].update({"failure_reason": (reason or "")[:1000], "failure_type": error_type or "",
                                   "error_type": error_type or ""})
        try:
            result = await self.collection.update_one(
                {"_id": source_id, "status": STATUS_PROCESSING, "claim_id": claim.token,
                 "claim_generation": claim.generation},
                update,
            )
        except PyMongoError as e:
            raise storage_error(e, f"status update to {status}") from e
        return result.matched_count == 1


async def with_storage_retries(settings: Settings, what: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Run a MongoDB operation, retrying transient failures (MONGODB_MAX_RETRIES, 1/2/4 s)."""
    policy = retrying(what, max_retries=settings.mongodb_max_retries, base_delay=settings.mongodb_retry_base_seconds)
    async for attempt in policy:
        with attempt:
            return await operation()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover


@dataclass
class BatchState:
    """A batch being worked on: its claim token, the generation of each document under it, what is
    left of it and its retry queue."""

    number: int
    queue: list[RetryEntry]
    token: str
    #: id_key -> claim_generation of the documents this processor holds under ``token``.
    generations: dict[str, int] = field(default_factory=dict)
    unresolved: set[str] = field(default_factory=set)
    #: id_key -> content hash of results that existed when the batch was read.
    existing: dict[str, str | None] = field(default_factory=dict)
    has_pending_file: bool = True
    successful: int = 0
    failed: int = 0

    @property
    def batch_id(self) -> str:
        return batch_id(self.number)

    def claim_of(self, key: str) -> Claim:
        return Claim(self.token, self.generations[key])


Batches = AsyncGenerator[tuple[BatchState, list[BatchConversation]], None]


class _WaitForOthers:
    """How long batch mode may still wait for other processors' claims: until the latest lease seen
    when the wait began would have expired (plus a little for the time between two renewals)."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self._deadline: float | None = None

    def started(self, others: OthersClaims) -> bool:
        """Whether the wait had begun already; begins it otherwise."""
        if self._deadline is not None:
            return True
        lease_left = self.source.lease.total_seconds()
        if others.latest_expiry is not None:
            lease_left = min(lease_left, max((others.latest_expiry - self.source.now()).total_seconds(), 0.0))
        self._deadline = time.monotonic() + lease_left + WAIT_MARGIN_SECONDS
        return False

    def seconds_left(self) -> float:
        return 0.0 if self._deadline is None else self._deadline - time.monotonic()


class BatchReader:
    """What a processor works on next, in order: its own pending batch files (claimed again),
    its retry queues without a pending file, then newly claimed batches.

    Writes the pending batch files (the processor's crash journal) and keeps the tracker's
    expected total; :class:`BatchProcessor` does the work and records the outcomes.
    """

    def __init__(self, settings: Settings, source: BatchSource, files: BatchFileManager, tracker: ProgressTracker,
                 stop: asyncio.Event) -> None:
        self.settings = settings
        self.source = source
        self.store = source.store
        self.files = files
        self.tracker = tracker
        self._stop = stop

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await with_storage_retries(self.settings, what, operation)

    async def _reclaim(self, what: str, ids: list[Any]) -> tuple[str, dict[str, int]]:
        return await self._retrying(f"claim of {what}", lambda: self.source.reclaim(ids))

    def _keep_claimed(self, number: int, queue: list[RetryEntry], won: dict[str, int]) -> list[RetryEntry]:
        """The queue entries still this processor's; the others are dropped from the queue file."""
        kept = [entry for entry in queue if id_key(entry.conversation_id) in won]
        if len(kept) != len(queue):
            logger.warning("%s: %d queued conversations were finished or taken over by another processor "
                           "meanwhile; dropped from the retry queue", batch_id(number), len(queue) - len(kept))
            self.files.save_retry_queue(number, kept)
        return kept

    async def recovered(self) -> Batches:
        """Pending files of an earlier run, claimed again; minus what sits in a queue or is no longer ours."""
        for number in self.files.pending_numbers():
            if self.stopping:
                return
            pending = self.files.load_pending(number)
            queue = self.files.load_retry_queue(number)
            ids = [c.object_id for c in pending.conversations] + [e.conversation_id for e in queue]
            token, won = await self._reclaim("recovered conversations", ids)
            queue = self._keep_claimed(number, queue, won)
            queued = {id_key(entry.conversation_id) for entry in queue}
            left = [c for c in pending.conversations if id_key(c.object_id) not in queued]
            todo = [c for c in left if id_key(c.object_id) in won]
            state = BatchState(number, queue, token, won)
            self.tracker.add_total(len(todo) + len(queue))
            await self._load_existing(state, todo)
            logger.info(
                "recovering %s: %d of %d conversations left, %d in its retry queue, %d finished or taken over "
                "by another processor meanwhile",
                state.batch_id, len(todo), len(pending.conversations), len(queue), len(left) - len(todo),
            )
            yield state, todo

    async def orphan_queues(self) -> AsyncGenerator[BatchState, None]:
        """The retry queues of batches that have no pending file any more, claimed again."""
        pending = set(self.files.pending_numbers())
        for number in self.files.retry_queue_numbers():
            if self.stopping or number in pending:
                continue
            queue = self.files.load_retry_queue(number)
            token, won = await self._reclaim("queued conversations", [e.conversation_id for e in queue])
            state = BatchState(number, self._keep_claimed(number, queue, won), token, won, has_pending_file=False)
            self.tracker.add_total(len(state.queue))
            yield state

    async def claimed(self, limit: int | None) -> Batches:
        """Claim unprocessed documents, ``batch_size`` at a time, until none is left (or ``limit``)."""
        size = self.settings.mongodb_batch_size
        remaining = limit
        expected = await self._retrying("count of unprocessed conversations", self.source.count_claimable)
        expected = expected if remaining is None else min(expected, remaining)
        self.tracker.add_total(expected)
        fetched = 0
        waiting: _WaitForOthers | None = None
        while not self.stopping and (remaining is None or remaining > 0):
            want = size if remaining is None else min(size, remaining)
            token, documents = await self._retrying("claim of unprocessed conversations",
                                                    partial(self.source.claim, want))
            if not documents:
                if waiting is None:
                    waiting = _WaitForOthers(self.source)
                if await self._wait_for_others(waiting):
                    continue
                # Nothing worth waiting for is left, but a lease may have expired between the claim
                # above and that check: claim once more before calling the run done.
                token, documents = await self._retrying("claim of unprocessed conversations",
                                                        partial(self.source.claim, want))
                if not documents:
                    break
            waiting = None
            fetched += len(documents)
            if fetched > expected:  # documents arrived (or were given back) during the run
                self.tracker.add_total(fetched - expected)
                expected = fetched
            if remaining is not None:
                remaining -= len(documents)
            yield await self._start_batch(token, documents)
        if fetched < expected:  # fewer than counted (taken by another processor, or the count was stale)
            self.tracker.add_total(fetched - expected)

    async def _wait_for_others(self, waiting: _WaitForOthers) -> bool:
        """Batch mode, nothing claimable: whether to wait (a while) and claim again.

        Other processors' claims may yet come back: finished, or expired when their processor
        died. Waiting is for the working ones only (a claim parked in another processor's retry
        queue stays there until that processor's next run), and never beyond the latest lease
        seen when the wait began: a claim still live after that was renewed since, so its
        processor lives and finishes it. Continuous mode polls again anyway.
        """
        if self.settings.batch_processor_mode != "batch":
            return False
        others = await self._retrying("count of claimed conversations", self.source.claims_of_others)
        if not others.working:
            return False
        if not waiting.started(others):
            logger.info("nothing left to claim; %d conversations claimed by other live processors: waiting up to "
                        "%.0f s for them to finish or expire", others.working, waiting.seconds_left())
        if waiting.seconds_left() <= 0:
            logger.info("%d conversations are still claimed by other processors that renew their leases: they "
                        "finish them; this run stops waiting", others.working)
            return False
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=min(self._claim_wait_seconds(), waiting.seconds_left()))
        return True

    def _claim_wait_seconds(self) -> float:
        return min(self.settings.batch_poll_interval, max(self.settings.batch_lease_seconds / 10, 0.1), 5.0)

    async def _start_batch(
        self, token: str, documents: list[dict[str, Any]]
    ) -> tuple[BatchState, list[BatchConversation]]:
        """Save claimed documents as a pending batch file (this processor's crash journal)."""
        number = self.files.next_batch_number()
        pending = PendingBatch(
            number, self.source.job_id,
            [BatchConversation(d["_id"], conversation_payload(d)) for d in documents],
        )
        self.files.write_pending(pending)
        state = BatchState(number, [], token, {id_key(d["_id"]): int(d["claim_generation"]) for d in documents})
        await self._load_existing(state, pending.conversations)
        logger.info("%s: %d conversations claimed", state.batch_id, len(documents))
        return state, pending.conversations

    async def _load_existing(self, state: BatchState, conversations: list[BatchConversation]) -> None:
        """Remember the content hashes of results that already exist: those conversations are not
        classified again unless their transcript changed."""
        ids = [c.object_id for c in conversations]
        found = await self._retrying("read of existing results", lambda: self.store.result_hashes(ids))
        state.existing = {id_key(source_id): digest for source_id, digest in found}
        state.unresolved = {id_key(c.object_id) for c in conversations}
