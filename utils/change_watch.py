"""Continuous mode's wake-up: a MongoDB change stream on the source collection.

Instead of sleeping ``--poll-interval`` between cycles, continuous mode waits on
:meth:`ChangeWatcher.wait`, which returns as soon as a conversation to classify is inserted (or
replaced) with status ``pending`` or none, or updated back to ``pending`` or to no status
(``$unset``, or ``null``). The processor's own status changes (``processing``, ``processed``,
``failed``) and lease renewals are filtered out on the server, so they never wake it.

* **No change streams** (a standalone server answers "only supported on replica sets"): the
  watcher says so once and ``wait`` is the plain poll interval, as before.
* **Connection lost**: the watcher reopens the stream with the resume token of the last event it
  saw (1, 2, 4 ... 30 s apart), so changes made while it was away are replayed; when the server no
  longer has that history, it starts afresh. Either way it wakes the processor once it is back,
  and the processor's cycle reads every pending conversation, so nothing that arrived meanwhile
  waits for the next poll.
* The poll interval stays as a safety net: expired claims and changes no stream reports (a
  restored backup, a dropped event) are still picked up on time.
* **Closing** never depends on cancelling the watch: on Python 3.11 ``asyncio.wait_for``, which
  PyMongo's send uses, can swallow a cancellation that arrives as the send completes (CPython
  gh-86296); the cancelled stream then went on with its getMores and the processor never exited.
  The watch loop reads with ``try_next`` (each getMore waits at most ``MAX_AWAIT_MS``) and stops at
  a closing flag; the exit waits a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

logger = logging.getLogger(__name__)

#: Server error codes meaning "this deployment has no change streams" (standalone server, or the
#: stage is not allowed here): fall back to polling for good.
UNSUPPORTED_CODES = {40573, 40324, 115, 303}
#: The resume token is no longer usable: start a new stream (and catch up by a full cycle).
LOST_HISTORY_CODES = {280, 286, 260}
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: How long entering the context waits for the stream to open before the first cycle.
OPEN_TIMEOUT_SECONDS = 10.0
#: The longest one getMore waits on the server for a change: how soon the watch sees it must close.
MAX_AWAIT_MS = 1000
#: How long leaving the context waits for the watch to close (then again after cancelling it).
CLOSE_TIMEOUT_SECONDS = 5.0

#: Only what makes work for the processor reaches it.
WAKE_PIPELINE: list[dict[str, Any]] = [{"$match": {"$or": [
    {"operationType": {"$in": ["insert", "replace"]}, "fullDocument.status": {"$in": ["pending", None]}},
    {"operationType": "update", "updateDescription.updatedFields.status": "pending"},
    # Reset to "no status" ($unset, or $set to null), which also means "to classify". Not `: None`:
    # that matches every update that leaves status alone (a lease renewal) too.
    {"operationType": "update", "updateDescription.removedFields": "status"},
    {"operationType": "update", "updateDescription.updatedFields.status": {"$type": "null"}},
]}}]


class ChangeWatcher:
    """``async with ChangeWatcher(collection) as watcher: ... await watcher.wait(stop, interval)``."""

    def __init__(self, collection: Any, *, enabled: bool = True,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self.collection = collection
        self.enabled = enabled
        self.retry_delays = retry_delays
        #: None until known; False: the server has no change streams (polling only).
        self.supported: bool | None = None if enabled else False
        self.resume_token: Any = None
        self.events = 0
        self.reconnects = 0
        self.interruptions = 0
        self.last_document_key: Any = None
        self._wake = asyncio.Event()
        self._opened = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChangeWatcher:
        if self.enabled:
            self._task = asyncio.create_task(self._watch(), name="change-watcher")
            try:
                # Open the stream before the first cycle reads, so nothing inserted during it is missed.
                await asyncio.wait_for(self._opened.wait(), OPEN_TIMEOUT_SECONDS)
            except TimeoutError:
                logger.warning("the change stream did not open within %.0f s; polling until it does",
                               OPEN_TIMEOUT_SECONDS)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._closing.set()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_SECONDS)
        if not done:  # stuck opening the stream, say: cancel it, and still wait a bounded time only
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_SECONDS)
        if not done:
            logger.warning("the change stream of %s did not close within %.0f s; left to the client's close",
                           self.collection.name, 2 * CLOSE_TIMEOUT_SECONDS)
        elif not task.cancelled() and task.exception() is not None:
            logger.error("the change stream watch of %s failed", self.collection.name, exc_info=task.exception())

    async def wait(self, stop: asyncio.Event, timeout: float) -> str:
        """Until a change ("change"), ``stop`` ("stop") or ``timeout`` seconds ("timeout")."""
        waiters = {asyncio.ensure_future(stop.wait()): "stop", asyncio.ensure_future(self._wake.wait()): "change"}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if stop.is_set():
            return "stop"
        if self._wake.is_set():
            # Cleared before the cycle runs: a change during the cycle wakes the next wait at once.
            self._wake.clear()
            return "change"
        return "timeout"

    # --- the stream -------------------------------------------------------------------------------
    async def _watch(self) -> None:
        failures = 0
        while not self._closing.is_set():
            try:
                async with await self.collection.watch(WAKE_PIPELINE, resume_after=self.resume_token,
                                                       max_await_time_ms=MAX_AWAIT_MS) as stream:
                    if self.supported is not True:
                        logger.info("continuous mode wakes on change streams of %s", self.collection.name)
                    self.supported = True
                    self._opened.set()
                    if failures:
                        self.reconnects += 1
                        logger.info("change stream of %s reopened (%s); catching up",
                                    self.collection.name, "resumed" if self.resume_token else "new")
                        self._wake.set()  # a full cycle picks up whatever the stream cannot replay
                    failures = 0
                    while stream.alive and not self._closing.is_set():
                        change = await stream.try_next()  # one getMore, at most MAX_AWAIT_MS
                        if stream.resume_token is not None:
                            self.resume_token = stream.resume_token
                        if change is not None:
                            self.events += 1
                            self.last_document_key = change.get("documentKey", {}).get("_id")
                            self._wake.set()
                if self._closing.is_set():
                    return
                # The stream ended without an error (invalidated: the collection was dropped or renamed).
                self.resume_token = None
                failures += 1
            except OperationFailure as e:
                if e.code in UNSUPPORTED_CODES or "replica set" in str(e).lower():
                    self.supported = False
                    self._opened.set()
                    logger.info("the server has no change streams (%s); continuous mode polls", e.details and
                                e.details.get("errmsg") or e)
                    return
                if e.code in LOST_HISTORY_CODES:
                    logger.warning("change stream history lost (%s); starting a new stream", e)
                    self.resume_token = None
                failures += 1
            except PyMongoError as e:
                failures += 1
                logger.warning("change stream of %s interrupted (%s); reopening", self.collection.name, e)
            self.interruptions += 1
            self._opened.set()  # the first cycle need not wait for a server that is down
            with suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(),
                                       timeout=self.retry_delays[min(failures, len(self.retry_delays)) - 1])
