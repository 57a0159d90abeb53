"""The reading side of the batch processor: claims with leases in MongoDB (DESIGN.md section 9).

MongoDB is the only coordinator between processors. A processor takes documents with a
conditional update that only matches what nobody holds::

    status pending | absent                       -> processing, claimed_by, claim_id, lease_expires_at
    status processing with an expired lease        (its processor died: taken over)
    status failed of an earlier job               (only with --retry-failed)

``claim_id`` is a fresh token per claim: only the holder of that token may move the
document on (``processed`` / ``failed`` / ``skipped``), so a processor that lost its claim
(lease expired and taken over, or a user reset the document to ``pending``) can never
overwrite what happened since. Leases are renewed every third of ``BATCH_LEASE_SECONDS``
for everything the worker still holds.

Nothing here orders or compares ``_id`` values: MongoDB compares ``$gt`` within one BSON
type only, and source ``_id`` values may be of any type. ``_id`` values are kept as they
are (ObjectId, int, double, string, UUID binary, embedded document ...) end to end.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from bson import json_util
from pymongo.errors import PyMongoError

from mongo_client import (
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PROCESSED,
    STATUS_PROCESSING,
    STATUS_SKIPPED,
    MongoStore,
)
from utils.batch_file_manager import utc_now
from utils.retry_utils import storage_error

logger = logging.getLogger(__name__)

_CANONICAL = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True)
#: Fields a claim adds to a source document (removed when the holder finishes it).
CLAIM_FIELDS = ("claimed_by", "claim_id", "claim_home", "lease_expires_at", "claimed_at")


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def id_key(value: Any) -> str:
    """A hashable, type-preserving key for any BSON ``_id`` (1, 1.0 and "1" stay distinct)."""
    return json_util.dumps(value, json_options=_CANONICAL, sort_keys=False)


def claimable_filter(
    now: datetime, *, include_failed: bool, run_id: str, home: str | None = None, started_at: datetime | None = None
) -> dict[str, Any]:
    """Documents this worker may take now."""
    branches: list[dict[str, Any]] = [
        {"status": {"$in": [STATUS_PENDING, None]}},
        {"status": STATUS_PROCESSING, "lease_expires_at": {"$lt": now}},
        # 'processing' without a lease: left by a processor of before leases; nobody renews it.
        {"status": STATUS_PROCESSING, "lease_expires_at": {"$exists": False}},
    ]
    if home is not None and started_at is not None:
        # Claimed from this batch folder before this processor started: by a processor that
        # crashed (the folder lock proves it is not running), and possibly lost from its files.
        branches.append({"status": STATUS_PROCESSING, "claim_home": home, "claimed_at": {"$lt": started_at}})
    if include_failed:
        # Failed in an earlier run only: a run never picks up its own failures again.
        branches.append({"status": STATUS_FAILED, "last_run_id": {"$ne": run_id}})
    return {"$or": branches}


class BatchSource:
    """Claims, lease renewal and conditional status updates on the source collection."""

    def __init__(
        self,
        store: MongoStore,
        *,
        worker_id: str,
        home: str,
        job_id: str,
        lease_seconds: float,
        include_failed: bool = False,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.collection = store.source
        self.worker_id = worker_id
        #: This processor's batch folder (host:path): its own claims from before a crash are its to recover.
        self.home = home
        self.job_id = job_id
        #: Unique per run (job ids have a one-second resolution); marks what this run finished.
        self.run_id = uuid.uuid4().hex
        self.lease = timedelta(seconds=lease_seconds)
        self.include_failed = include_failed
        self._clock = clock
        # At BSON's millisecond precision, so that no claim of this processor compares before it.
        now = clock()
        self.started_at = now.replace(microsecond=now.microsecond // 1000 * 1000)

    def _filter(self) -> dict[str, Any]:
        return claimable_filter(self._clock(), include_failed=self.include_failed, run_id=self.run_id,
                                home=self.home, started_at=self.started_at)

    def _claim_update(self, token: str) -> dict[str, Any]:
        now = self._clock()
        return {"$set": {"status": STATUS_PROCESSING, "claimed_by": self.worker_id, "claim_id": token,
                         "claim_home": self.home, "claimed_at": now, "lease_expires_at": now + self.lease,
                         "last_processed_at": now}}

    async def count_claimable(self) -> int:
        try:
            return await self.collection.count_documents(self._filter())
        except PyMongoError as e:
            raise storage_error(e, "count of unprocessed conversations") from e

    async def claim(self, limit: int) -> tuple[str, list[dict[str, Any]]]:
        """Claim up to ``limit`` documents; returns the claim token and the documents won.

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

    async def reclaim(self, ids: Iterable[Any]) -> tuple[str, set[str]]:
        """Claim again documents named in this folder's batch files (recovery, retry queues).

        Taken when claimable, or when still claimed from this folder (by this processor or a
        crashed earlier one: the folder lock says it is not running). Returns the new token
        and the :func:`id_key` of the documents won; the others were finished or taken over
        by another processor since, and are not this processor's any more.
        """
        token = uuid.uuid4().hex
        wanted = list(ids)
        if not wanted:
            return token, set()
        mine = {"status": STATUS_PROCESSING, "claim_home": self.home}
        query = {"$and": [{"_id": {"$in": wanted}}, {"$or": [self._filter(), mine]}]}
        try:
            await self.collection.update_many(query, self._claim_update(token))
            won = await self.collection.find({"claim_id": token}, projection={"_id": 1}).to_list(length=None)
        except PyMongoError as e:
            raise storage_error(e, "claim of recovered conversations") from e
        return token, {id_key(doc["_id"]) for doc in won}

    async def renew(self) -> int:
        """Extend the lease of everything this worker holds; returns how many documents."""
        try:
            result = await self.collection.update_many(
                {"status": STATUS_PROCESSING, "claimed_by": self.worker_id},
                {"$set": {"lease_expires_at": self._clock() + self.lease}},
            )
        except PyMongoError as e:
            raise storage_error(e, "lease renewal") from e
        return result.matched_count

    async def release(self) -> int:
        """Let the leases of what this worker still holds expire now (at exit): others may take
        them at once. Its own batch folder still recovers them on its next start if nobody did."""
        try:
            result = await self.collection.update_many(
                {"status": STATUS_PROCESSING, "claimed_by": self.worker_id},
                {"$set": {"lease_expires_at": self._clock()}},
            )
        except PyMongoError as e:
            raise storage_error(e, "release of claims") from e
        return result.matched_count

    async def live_claims_of_others(self) -> int:
        """Documents other processors hold with a live lease (batch mode waits for them)."""
        query = {"status": STATUS_PROCESSING, "claimed_by": {"$ne": self.worker_id},
                 "lease_expires_at": {"$gte": self._clock()}}
        try:
            return await self.collection.count_documents(query)
        except PyMongoError as e:
            raise storage_error(e, "count of claimed conversations") from e

    async def finish(self, source_id: Any, token: str, status: str, *, reason: str | None = None,
                     error_type: str | None = None) -> bool:
        """Move a claimed document to ``status``, only while this claim holds it.

        False when the claim was lost (the lease expired and another processor took it, or
        the document was reset meanwhile): the newer state is left untouched.
        """
        now = self._clock()
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
                {"_id": source_id, "status": STATUS_PROCESSING, "claim_id": token}, update
            )
        except PyMongoError as e:
            raise storage_error(e, f"status update to {status}") from e
        return result.matched_count == 1
