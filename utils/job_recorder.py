"""A progress reporter that records its batch job in MongoDB's jobs collection (read by the dashboard).

One document per job (``_id`` = the job id): mode, host and pid, started/updated/finished times,
and the counts of the progress snapshot (processed/total, successes, failures, retry queue, rate,
ETA). It is one more :class:`utils.progress.Reporter`: the processor's progress calls reach it like
the console bar and the progress files.

The writes happen in a task of their own with their own small asynchronous client (a pool apart from
the processor's), so that a slow or lost MongoDB never holds up classification: :meth:`update` only
hands over the latest snapshot. The task writes at most every ``interval`` seconds, and at least
every ``heartbeat`` seconds while the job lives (the dashboard shows a running job silent for a
minute as unresponsive). A failed write is logged (once per outage) and the job goes on. Open it
with ``async with``: leaving the block waits a bounded time for the final state (given to
:meth:`close`) to be written.

Not a thread with a synchronous client (as before issue 19): PyMongo joins a synchronous client's
monitor threads when the interpreter exits, and they notice the client closed only at their next
half-second tick, which every batch run paid at its end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from pymongo import DESCENDING, AsyncMongoClient, IndexModel
from pymongo.errors import PyMongoError

from config import Settings
from utils.progress import ProgressSnapshot

logger = logging.getLogger(__name__)

JOBS_APPNAME = "support-classifier-jobs"
WRITE_INTERVAL_SECONDS = 2.0
HEARTBEAT_SECONDS = 10.0
#: How long close() waits for the last write (MongoDB may be gone by then).
CLOSE_TIMEOUT_SECONDS = 10.0
JOB_INDEXES = [[("started_at", DESCENDING)], [("status", 1), ("updated_at", DESCENDING)]]


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def job_fields(snapshot: ProgressSnapshot) -> dict[str, Any]:
    """The counts of a snapshot as the jobs document stores them."""
    return {
        "status": snapshot.status,
        "total": snapshot.total_conversations,
        "processed": snapshot.processed,
        "successful": snapshot.successful,
        "failed": snapshot.failed,
        "queued_for_retry": snapshot.queued_for_retry,
        "already_classified": snapshot.already_classified,
        "lost_claims": snapshot.lost_claims,
        "rate": snapshot.current_rate,
        "eta": _parse_time(snapshot.estimated_completion),
        "percentage": snapshot.percentage_complete,
        "elapsed_seconds": snapshot.elapsed_seconds,
    }


class JobRecorder:
    """Keeps ``settings.mongodb_jobs_collection`` up to date with one job's progress (``async with``)."""

    def __init__(
        self,
        uri: str,
        settings: Settings,
        job_id: str,
        *,
        interval: float = WRITE_INTERVAL_SECONDS,
        heartbeat: float = HEARTBEAT_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.job_id = job_id
        self.interval = interval
        self.heartbeat = heartbeat
        self._clock = clock
        self._identity = {"mode": settings.batch_processor_mode, "host": socket.gethostname(), "pid": os.getpid()}
        self._uri = uri
        self._settings = settings
        self._latest: ProgressSnapshot | None = None
        self._final = False
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._failing = False
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobRecorder:
        timeout_ms = min(self._settings.mongodb_timeout_ms, 5000)
        # Its own client: a lost MongoDB makes these writes wait, never the processor's pool.
        self._client = AsyncMongoClient(
            self._uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms, appname=JOBS_APPNAME, tz_aware=True,
        )
        self._task = asyncio.create_task(self._run(), name=f"job-recorder-{self.job_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Wait (at most CLOSE_TIMEOUT_SECONDS) for the final state given to :meth:`close`, then close
        the client."""
        try:
            if self._task is not None:
                if not self._final:  # no final state was given: nothing more to write
                    self._task.cancel()
                try:
                    await asyncio.wait_for(self._task, CLOSE_TIMEOUT_SECONDS)
                except TimeoutError:  # (wait_for cancelled the task)
                    logger.warning("job %s: its final state could not be recorded within %.0f s", self.job_id,
                                   CLOSE_TIMEOUT_SECONDS)
                except asyncio.CancelledError:
                    if not self._task.cancelled():
                        raise  # we were cancelled ourselves
        finally:
            if self._client is not None:
                await self._client.close()

    # --- the Reporter interface (called on the event loop: never blocks) ----------------------
    def update(self, snapshot: ProgressSnapshot) -> None:
        self._latest = snapshot
        self._wake.set()

    def close(self, snapshot: ProgressSnapshot) -> None:
        """The final state: written before the ``async with`` block ends."""
        self._latest = snapshot
        self._final = True
        self._closing.set()
        self._wake.set()

    # --- the writer task --------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            assert self._client is not None
            jobs = self._client[self._settings.mongodb_database_name][self._settings.mongodb_jobs_collection]
            await self._ensure_indexes(jobs)
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat)
                self._wake.clear()
                snapshot, final = self._latest, self._final
                if snapshot is not None:
                    await self._write(jobs, snapshot, final)
                if final:
                    return
                with suppress(TimeoutError):  # at most one write per interval, unless closing
                    await asyncio.wait_for(self._closing.wait(), self.interval)
        except Exception:  # a bug (or an unusable URI) must not go unnoticed, nor stop the job
            logger.exception("job %s: the jobs recorder stopped", self.job_id)

    async def _ensure_indexes(self, jobs: Any) -> None:
        try:
            await jobs.create_indexes([IndexModel(keys) for keys in JOB_INDEXES])  # one round trip
        except PyMongoError as e:
            logger.warning("job %s: cannot create the jobs collection's indexes (%s)", self.job_id, e)

    async def _write(self, jobs: Any, snapshot: ProgressSnapshot, final: bool) -> None:
        now = self._clock()
        fields = {**job_fields(snapshot), "updated_at": now}
        if final:
            fields["finished_at"] = now
            fields["eta"] = None
        try:
            await jobs.update_one(
                {"_id": self.job_id},
                {"$set": fields,
                 "$setOnInsert": {**self._identity, "started_at": _parse_time(snapshot.start_time) or now}},
                upsert=True,
            )
        except PyMongoError as e:
            if not self._failing:
                logger.warning("job %s: progress not recorded in MongoDB (%s); the job goes on", self.job_id, e)
            self._failing = True
            return
        if self._failing:
            logger.info("job %s: progress recorded in MongoDB again", self.job_id)
        self._failing = False
