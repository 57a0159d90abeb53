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
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, PyMongoError

from config import Settings
from error_handler import StorageError
from mongo_client import (
    STATUS_FAILED,
    STATUS_PROCESSED,
    STATUS_PROCESSING,
    STATUS_SKIPPED,
    MongoStore,
    refused_write,
    storage_error,
    unprocessed_filter,
)
from utils.batch_file_manager import BatchConversation, BatchFileManager, PendingBatch, batch_id
from utils.group_commit import GroupCommit
from utils.retry_queue import RetryQueue
from utils.retry_utils import retrying
from utils.server_clock import ServerClock

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Fields of a source document kept in batch files: what classification needs.
CONVERSATION_FIELDS = ("conversation_number", "messages", "tweets")
#: What a claim reads back of the documents it won: their conversations and fencing tokens, no more.
CLAIMED_FIELDS = dict.fromkeys(("_id", "claim_generation", *CONVERSATION_FIELDS), 1)
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


def claimable_branches(
    now: datetime, *, include_failed: bool, run_id: str, home: str | None = None
) -> list[dict[str, Any]]:
    """Documents this worker may take now (``now``: the database server's time), as the branches of
    an ``$or``: each a conjunction that starts with a condition on ``status``."""
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
    return branches


def _accepted_statuses(branch: dict[str, Any]) -> list[Any]:
    """The statuses a branch of :func:`claimable_branches` accepts (None: no status)."""
    status = branch["status"]
    return list(status["$in"]) if isinstance(status, dict) else [status]


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
        self._finishes: GroupCommit[_Finish, bool] = GroupCommit(self._finish_all)

    async def sync_clock(self) -> None:
        await self.clock.sync()

    def now(self) -> datetime:
        return self.clock.now()

    def _branches(self) -> list[dict[str, Any]]:
        return claimable_branches(self.now(), include_failed=self.include_failed, run_id=self.run_id, home=self.home)

    def _filter(self) -> dict[str, Any]:
        return {"$or": self._branches()}

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

        Candidates are read first, then taken by a conditional ``update_many`` that re-checks the
        claimable filter document by document: when processors race for the same candidates each
        document goes to exactly one of them. A loser reads again.

        The re-check is one conjunction per kind of candidate (the branch of the filter its status
        read says; almost always only ``pending``), never the whole ``$or`` beside the ids: with the
        ``$or`` SecantusDB walks every claimable document of the collection and compares each with
        the id list (about 1 s per batch of 100 in a collection of 2,000), with a conjunction it looks
        the ids up (0.2 s): :meth:`_take`.
        """
        token = uuid.uuid4().hex
        try:
            while True:
                branches = self._branches()
                candidates = await self.collection.find({"$or": branches}, projection={"_id": 1, "status": 1}
                                                        ).limit(limit).to_list(length=limit)
                if not candidates:
                    return token, []
                await self._take(candidates, branches, token)
                won = await self.collection.find({"claim_id": token}, projection=CLAIMED_FIELDS).to_list(length=None)
                if won:
                    return token, won
        except PyMongoError as e:
            raise storage_error(e, "claim of unprocessed conversations") from e

    async def _take(self, candidates: list[dict[str, Any]], branches: list[dict[str, Any]], token: str) -> None:
        """Claim ``candidates`` (documents read with their ``status``) under ``token``: one conditional
        update per branch of the filter that accepts the status of some of them, a conjunction of the
        branch and their ids. A document that moved on since the read matches no branch it is tried
        with; one that a branch took (it carries the token now) is not taken again by a later one."""
        update = self._claim_update(token)
        for branch in branches:
            accepted = _accepted_statuses(branch)
            ids = [doc["_id"] for doc in candidates if doc.get("status") in accepted]
            if ids:
                await self.collection.update_many({"_id": {"$in": ids}, **branch, "claim_id": {"$ne": token}}, update)

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
        try:
            found = await self.collection.find({"_id": {"$in": wanted}}, projection={"_id": 1, "status": 1}
                                               ).to_list(length=None)
            await self._take(found, [*self._branches(), mine], token)
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
        the document was reset meanwhile): the newer state is left untouched. Status updates that
        come while one is being sent go together in the next statement (:class:`GroupCommit`).
        """
        return await self._finishes.submit(_Finish(source_id, claim, status, reason, error_type))

    def _finish_update(self, finish: _Finish, now: datetime) -> UpdateOne:
        update: dict[str, Any] = {
            "$set": {"status": finish.status, "last_processed_at": now, "last_job_id": self.job_id,
                     "last_run_id": self.run_id},
            "$unset": {field: "" for field in CLAIM_FIELDS},
        }
        if finish.status == STATUS_PROCESSED:
            update["$unset"].update({"failure_reason": "", "failure_type": "", "error_type": ""})
        else:
            assert finish.status in (STATUS_FAILED, STATUS_SKIPPED), finish.status
            update["$set"].update({"failure_reason": (finish.reason or "")[:1000],
                                   "failure_type": finish.error_type or "", "error_type": finish.error_type or ""})
        return UpdateOne({"_id": finish.source_id, "status": STATUS_PROCESSING, "claim_id": finish.claim.token,
                          "claim_generation": finish.claim.generation}, update)

    async def _finish_all(self, finishes: list[_Finish]) -> list[bool | StorageError]:
        """One unordered ``bulk_write`` of status updates; each answers whether its claim still held."""
        what = f"status update to {'/'.join(sorted({f.status for f in finishes}))}"
        now = self.now()
        answers: list[bool | StorageError | None] = [None] * len(finishes)
        try:
            try:
                written = await self.collection.bulk_write([self._finish_update(f, now) for f in finishes],
                                                           ordered=False)
                matched = written.matched_count
            except BulkWriteError as e:
                matched = int(e.details.get("nMatched", 0))
                for error in e.details.get("writeErrors", []):
                    answers[int(error["index"])] = refused_write(error, what)
            unknown = [i for i, answer in enumerate(answers) if answer is None]
            if matched == len(unknown):
                return [True if answer is None else answer for answer in answers]
            # Some claims were lost: the count does not say which. A document this statement finished
            # carries this run's id, the status given and the claim's generation, without a claim.
            found = {id_key(doc["_id"]): doc async for doc in self.collection.find(
                {"_id": {"$in": [finishes[i].source_id for i in unknown]}},
                projection={"status": 1, "last_run_id": 1, "claim_generation": 1, "claim_id": 1})}
        except PyMongoError as e:
            raise storage_error(e, what) from e
        for i in unknown:
            doc, finish = found.get(id_key(finishes[i].source_id)), finishes[i]
            answers[i] = (doc is not None and doc.get("status") == finish.status and "claim_id" not in doc
                          and doc.get("last_run_id") == self.run_id
                          and doc.get("claim_generation") == finish.claim.generation)
        return [False if answer is None else answer for answer in answers]

    async def held(self, claims: list[tuple[Any, Claim]]) -> list[bool]:
        """For each (source id, claim): whether the claim is still the document's current one. One
        read for them all (the check before a group of result writes: the fencing rule)."""
        if not claims:
            return []
        try:
            current = {id_key(doc["_id"]): Claim(doc["claim_id"], int(doc["claim_generation"]))
                       async for doc in self.collection.find(
                           {"_id": {"$in": [source_id for source_id, _ in claims]}, "status": STATUS_PROCESSING,
                            "claim_id": {"$in": sorted({claim.token for _, claim in claims})}},
                           projection={"claim_id": 1, "claim_generation": 1})}
        except PyMongoError as e:
            raise storage_error(e, "check of a claim") from e
        return [current.get(id_key(source_id)) == claim for source_id, claim in claims]


@dataclass(frozen=True)
class _Finish:
    """One status update of :meth:`BatchSource.finish`, waiting for its group."""

    source_id: Any
    claim: Claim
    status: str
    reason: str | None
    error_type: str | None


class LeaseRenewal:
    """The leases of everything a worker holds (``claimed_by``), renewed three times per lease period
    from :meth:`start` until :meth:`stop`; :meth:`release` lets them expire now (at the end of a run)."""

    #: How long :meth:`stop` waits for the renewal task to end before cancelling it.
    STOP_SECONDS = 5.0

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew(), name="lease renewal")

    async def _renew(self) -> None:
        """Renew until stopped.

        Stopped by an event, not by cancelling it: on Python 3.11 asyncio.wait_for (which PyMongo's
        send uses) can swallow a cancellation that arrives as its operation completes (CPython
        gh-86296), and a cancelled loop that swallowed it would run on and hold the end of the run.
        A renewal that fails, expectedly or not, is logged and tried again: a dead renewal task
        would let the leases run out under the processor's feet.
        """
        interval = self.source.lease.total_seconds() / 3
        while not self._done.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), timeout=interval)
            if self._done.is_set():
                return
            try:
                await self.source.renew()
            except StorageError as e:
                logger.warning("lease renewal failed (%s); trying again in %.1f s", e, interval)
            except Exception:
                logger.exception("lease renewal failed unexpectedly; trying again in %.1f s", interval)

    async def stop(self) -> None:
        self._done.set()
        renewer = self._task
        if renewer is None:
            return
        done, _ = await asyncio.wait({renewer}, timeout=self.STOP_SECONDS)
        if not done:  # stuck in a renewal: cancel it, without waiting on it again
            renewer.cancel()
            logger.warning("lease renewal did not stop within %.0f s; cancelled", self.STOP_SECONDS)
        elif not renewer.cancelled() and renewer.exception() is not None:  # a bug; the release runs anyway
            logger.error("lease renewal ended with an error", exc_info=renewer.exception())

    async def release(self) -> int:
        """Release what this worker still holds; returns how many claims (0 when it could not)."""
        worker = self.source.worker_id
        try:
            released = await self.source.release()
        except StorageError as e:
            logger.warning("could not release the claims of %s (%s); they expire on their own", worker, e)
            return 0
        except Exception:
            logger.exception("could not release the claims of %s; they expire on their own", worker)
            return 0
        if released:
            logger.info("%d claimed conversations left unfinished: released for the next run or another processor",
                        released)
        return released


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
    queue: RetryQueue
    token: str
    #: id_key -> claim_generation of the documents this processor holds under ``token``.
    generations: dict[str, int] = field(default_factory=dict)
    unresolved: set[str] = field(default_factory=set)
    #: id_key -> content hash of results that existed when the batch was read.
    existing: dict[str, str | None] = field(default_factory=dict)
    has_pending_file: bool = True
    successful: int = 0
    failed: int = 0
    #: Seconds the batch's retry-queue pass waits first: the longest the retry policy asked for.
    retry_after: float = 0.0

    @property
    def batch_id(self) -> str:
        return batch_id(self.number)

    def claim_of(self, key: str) -> Claim:
        return Claim(self.token, self.generations[key])

    def queued(self, key: str, after: float) -> None:
        """A conversation of the batch went to its retry queue, for a pass ``after`` seconds from now."""
        self.unresolved.discard(key)
        self.retry_after = max(self.retry_after, after)

    def resolved(self, key: str, kind: str | None = None) -> None:
        """A conversation of the batch left its hands (``kind`` ``success`` or ``failed``: counted)."""
        self.unresolved.discard(key)
        if kind == "success":
            self.successful += 1
        elif kind == "failed":
            self.failed += 1


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

    It yields batches and writes the pending batch files (the processor's crash journal); the
    processor decides when to stop reading (it stops asking), keeps the job's totals, does the work
    and records the outcomes. ``pause(seconds)`` is how it waits for other processors' claims: the
    processor's sleep, False when the run is stopping.
    """

    def __init__(self, settings: Settings, source: BatchSource, files: BatchFileManager,
                 pause: Callable[[float], Awaitable[bool]]) -> None:
        self.settings = settings
        self.source = source
        self.store = source.store
        self.files = files
        self._pause = pause

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        return await with_storage_retries(self.settings, what, operation)

    async def _reclaim(self, what: str, ids: list[Any]) -> tuple[str, dict[str, int]]:
        return await self._retrying(f"claim of {what}", lambda: self.source.reclaim(ids))

    def _keep_claimed(self, number: int, queue: RetryQueue, won: dict[str, int]) -> None:
        """Drop from the queue the entries that are not this processor's any more."""
        gone = [entry.source_id for entry in queue if id_key(entry.source_id) not in won]
        if gone:
            logger.warning("%s: %d queued conversations were finished or taken over by another processor "
                           "meanwhile; dropped from the retry queue", batch_id(number), len(gone))
            queue.remove_all(gone)

    async def recovered(self) -> Batches:
        """Pending files of an earlier run, claimed again; minus what sits in a queue or is no longer ours."""
        for number in self.files.pending_numbers():
            pending = self.files.load_pending(number)
            queue = self.files.retry_queue(number)
            ids = [c.source_id for c in pending.conversations] + [e.source_id for e in queue]
            token, won = await self._reclaim("recovered conversations", ids)
            self._keep_claimed(number, queue, won)
            queued = {id_key(entry.source_id) for entry in queue}
            left = [c for c in pending.conversations if id_key(c.source_id) not in queued]
            todo = [c for c in left if id_key(c.source_id) in won]
            state = BatchState(number, queue, token, won)
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
            if number in pending:
                continue
            queue = self.files.retry_queue(number)
            token, won = await self._reclaim("queued conversations", [e.source_id for e in queue])
            self._keep_claimed(number, queue, won)
            yield BatchState(number, queue, token, won, has_pending_file=False)

    async def claimable(self, limit: int | None) -> int:
        """How many documents are claimable now (at most ``limit``): the job's expected total."""
        count = await self._retrying("count of unprocessed conversations", self.source.count_claimable)
        return count if limit is None else min(count, limit)

    async def claimed(self, limit: int | None) -> Batches:
        """Claim unprocessed documents, ``batch_size`` at a time, until none is left (or ``limit``)."""
        size = self.settings.mongodb_batch_size
        remaining = limit
        waiting: _WaitForOthers | None = None
        while remaining is None or remaining > 0:
            want = size if remaining is None else min(size, remaining)
            token, documents = await self._retrying("claim of unprocessed conversations",
                                                    partial(self.source.claim, want))
            if not documents:
                if waiting is None:
                    waiting = _WaitForOthers(self.source)
                seconds = await self._wait_for_others(waiting)
                if seconds is not None:
                    if not await self._pause(seconds):
                        return
                    continue
                # Nothing worth waiting for is left, but a lease may have expired between the claim
                # above and that check: claim once more before calling the run done.
                token, documents = await self._retrying("claim of unprocessed conversations",
                                                        partial(self.source.claim, want))
                if not documents:
                    break
            waiting = None
            if remaining is not None:
                remaining -= len(documents)
            yield await self._start_batch(token, documents)

    async def _wait_for_others(self, waiting: _WaitForOthers) -> float | None:
        """Batch mode, nothing claimable: how long to wait before claiming again; None: do not wait.

        Other processors' claims may yet come back: finished, or expired when their processor
        died. Waiting is for the working ones only (a claim parked in another processor's retry
        queue stays there until that processor's next run), and never beyond the latest lease
        seen when the wait began: a claim still live after that was renewed since, so its
        processor lives and finishes it. Continuous mode polls again anyway.
        """
        if self.settings.batch_processor_mode != "batch":
            return None
        others = await self._retrying("count of claimed conversations", self.source.claims_of_others)
        if not others.working:
            return None
        if not waiting.started(others):
            logger.info("nothing left to claim; %d conversations claimed by other live processors: waiting up to "
                        "%.0f s for them to finish or expire", others.working, waiting.seconds_left())
        if waiting.seconds_left() <= 0:
            logger.info("%d conversations are still claimed by other processors that renew their leases: they "
                        "finish them; this run stops waiting", others.working)
            return None
        return min(self._claim_wait_seconds(), waiting.seconds_left())

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
        state = BatchState(number, self.files.retry_queue(number), token,
                           {id_key(d["_id"]): int(d["claim_generation"]) for d in documents})
        await self._load_existing(state, pending.conversations)
        logger.info("%s: %d conversations claimed", state.batch_id, len(documents))
        return state, pending.conversations

    async def _load_existing(self, state: BatchState, conversations: list[BatchConversation]) -> None:
        """Remember the content hashes of results that already exist: those conversations are not
        classified again unless their transcript changed."""
        ids = [c.source_id for c in conversations]
        found = await self._retrying("read of existing results", lambda: self.store.result_hashes(ids))
        state.existing = {id_key(source_id): digest for source_id, digest in found}
        state.unresolved = {id_key(c.source_id) for c in conversations}
