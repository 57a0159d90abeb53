"""Continuous mode's wake-up: a MongoDB change stream on the source collection.

Instead of sleeping ``--poll-interval`` between cycles, continuous mode waits on
:meth:`ChangeWatcher.wait`, which returns as soon as a conversation to classify is inserted (or
replaced) with status ``pending`` or none, or updated back to ``pending``. The processor's own
status changes (``processing``, ``processed``, ``failed``) are filtered out on the server, so they
never wake it.

* **No change streams** (a standalone server answers "only supported on replica sets"): the
  watcher says so once and ``wait`` is the plain poll interval, as before.
* **Connection lost**: the watcher reopens the stream with the resume token of the last event it
  saw (1, 2, 4 ... 30 s apart), so changes made while it was away are replayed; when the server no
  longer has that history, it starts afresh. Either way it wakes the processor once it is back,
  and the processor's cycle reads every pending conversation, so nothing that arrived meanwhile
  waits for the next poll.
* The poll interval stays as a safety net: expired claims and changes no stream reports (a
  restored backup, a dropped event) are still picked up on time.
"""

from __future__ import annotations

import asyncio
import logging
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

#: Only what makes work for the processor reaches it.
WAKE_PIPELINE: list[dict[str, Any]] = [{"$match": {"$or": [
    {"operationType": {"$in": ["insert", "replace"]}, "fullDocument.status": {"$in": ["pending", None]}},
    {"operationType": "update", "updateDescription.updatedFields.status": "pending"},
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
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
        while True:
            try:
                async with await self.collection.watch(WAKE_PIPELINE, resume_after=self.resume_token) as stream:
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
                    async for change in stream:
                        self.resume_token = stream.resume_token
                        self.events += 1
                        self.last_document_key = change.get("documentKey", {}).get("_id")
                        self._wake.set()
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
            await asyncio.sleep(self.retry_delays[min(failures, len(self.retry_delays)) - 1])
