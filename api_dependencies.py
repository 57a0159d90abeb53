"""What the API's routes depend on, declared as FastAPI dependencies (``Annotated[..., Depends()]``).

The lifespan of :func:`api.create_app` opens these once per process and yields them as the
lifespan state (:func:`lifespan_state`); Starlette hands that state to every request as
``request.state``. A route declares what it needs by type (``settings: SettingsDep``), and any
router included in the app (the dashboard's, say) does the same by importing from here, not
from ``api`` (which includes those routers: importing ``api`` from them would be a cycle).
Tests substitute a piece with ``app.dependency_overrides[get_classifier] = ...`` (for ``/classify``:
``get_classifying``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from classifier import ConversationClassifier
from config import Settings
from error_handler import LLMBusyError
from llm_pool import LLMPool

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bodies (and answers) up to this size are parsed (serialised) on the event loop: a typical conversation
#: is a few kB, a fraction of a millisecond of CPU, while each hop to a worker thread and back costs about
#: as much again in wake-ups (issue 19). Larger ones go to a worker thread, so that a dozen bodies of a
#: megabyte never stall the loop (/health, every other request; issue 16 item 8). 8 kB of short turns
#: (the costly shape: every turn a model to validate) is about 150 turns, 1-2 ms of validation.
INLINE_BYTES = 8 * 1024


class ClientLeftError(Exception):
    """The client hung up while its request waited for an LLM slot: nothing is sent to the model."""


class LLMSlots:
    """At most ``limit`` LLM calls in flight in this API process (API_MAX_CONCURRENCY).

    A request waits for a slot at most ``queue_timeout`` seconds (API_QUEUE_TIMEOUT), then gets
    503 ``llm_busy``: a burst queues here instead of piling onto the LLM server until every
    request times out. At most ``max_waiting`` requests wait (API_MAX_WAITING): a request is
    :meth:`admitted` before its body is read, and one more than ``limit + max_waiting`` gets 503
    ``llm_busy`` at once, since each waiting request holds its body and its parsed conversation
    in memory. A request whose client hangs up while it waits gives up its place: 60
    abandoned requests do not make 60 model calls. The calls run in worker threads of their own
    (as many as slots), so the limit is not silently capped by Starlette's shared thread pool.
    """

    def __init__(self, limit: int, queue_timeout: float, max_waiting: int) -> None:
        self.limit = limit
        self.queue_timeout = queue_timeout
        self.max_waiting = max_waiting
        self._semaphore = asyncio.Semaphore(limit)
        self._threads = CapacityLimiter(limit)
        # Reading bodies is CPU under the GIL: one thread at a time, or a dozen large bodies parsed at
        # once take turns with the event loop and /health waits behind all of them.
        self._reading = CapacityLimiter(1)
        self._admitted = 0  # requests from admission to their answer: in flight, or waiting (reading included)

    @asynccontextmanager
    async def admitted(self, request: Request) -> AsyncIterator[None]:
        """A place for ``request`` from before its body is read to its answer, or :class:`LLMBusyError`
        at once when ``limit`` are in flight and ``max_waiting`` wait already (its body is then read
        and dropped unparsed, so that the client gets the answer rather than a reset connection)."""
        if self._admitted >= self.limit + self.max_waiting:
            await _discard_body(request)
            raise LLMBusyError(
                f"{self.max_waiting} requests already wait for the {self.limit} LLM slots of this API process.",
                hint="Retry later (see Retry-After); raise API_MAX_WAITING (each waiting request holds its body "
                "in memory), or API_MAX_CONCURRENCY if the LLM server has room for more parallel requests.",
                max_concurrency=self.limit,
                max_waiting=self.max_waiting,
            )
        self._admitted += 1
        logger.debug("request admitted: %d in this process (%d slots, %d may wait)", self._admitted, self.limit,
                     self.max_waiting)
        try:
            yield
        finally:
            self._admitted -= 1

    async def read(self, function: Callable[[bytes], T], body: bytes) -> T:
        """``function(body)`` (parsing and validating a body): at once for a small body, else in the one
        worker thread for reading."""
        if len(body) <= INLINE_BYTES:
            return function(body)
        return await anyio.to_thread.run_sync(function, body, limiter=self._reading)

    async def run(self, request: Request, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker thread once a slot is free; raises :class:`LLMBusyError`
        when none frees up in time, :class:`ClientLeftError` when the client left before its turn."""
        async with self._slot(request):
            return await anyio.to_thread.run_sync(function, *args, limiter=self._threads)

    @asynccontextmanager
    async def _slot(self, request: Request) -> AsyncIterator[None]:
        if not self._semaphore.locked():  # a slot is free and nobody waits: no waiting to watch
            await self._semaphore.acquire()  # (returns at once)
            try:
                yield
            finally:
                self._semaphore.release()
            return
        acquiring = asyncio.ensure_future(self._semaphore.acquire())
        leaving = asyncio.ensure_future(_until_client_left(request))
        try:
            await asyncio.wait({acquiring, leaving}, timeout=self.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            acquiring.cancel()  # a no-op once it holds the slot
            got_slot = acquiring.done() and not acquiring.cancelled()
            left = leaving.done() and not leaving.cancelled()
            if got_slot and (left or sys.exc_info()[0] is not None):  # (we were cancelled ourselves)
                self._semaphore.release()
        if left:
            raise ClientLeftError()
        if not got_slot:
            raise LLMBusyError(
                f"All {self.limit} LLM slots of this API process stayed busy for {self.queue_timeout:g} s.",
                hint="Retry later (see Retry-After), or raise API_MAX_CONCURRENCY if the LLM server has room "
                "for more parallel requests (OLLAMA_NUM_PARALLEL).",
                max_concurrency=self.limit,
                queue_timeout_seconds=self.queue_timeout,
            )
        try:
            yield
        finally:
            self._semaphore.release()


async def _discard_body(request: Request) -> None:
    try:
        async for _chunk in request.stream():
            pass
    except ClientDisconnect:
        pass


async def _until_client_left(request: Request) -> None:
    """Return when the client disconnects. The body has been read: the server's next ASGI message
    for this request is ``http.disconnect``, sent when the connection closes."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected after the body; never spin


@dataclass(frozen=True)
class Classifying:
    """What ``POST /classify`` uses, as one dependency built once per process: FastAPI solves every
    declared dependency, and each of theirs, on every request; with five (nested) that was about a
    tenth of the API's CPU per ``/classify`` (yappi, issue 19)."""

    settings: Settings
    classifier: ConversationClassifier
    llm_client: LLMPool
    llm_slots: LLMSlots


def lifespan_state(
    settings: Settings, classifier: ConversationClassifier, llm_client: LLMPool, llm_slots: LLMSlots,
    *, embedded_llm: str | None = None,
) -> dict[str, Any]:
    """The lifespan state the dependencies below read: one place names its keys. ``embedded_llm``
    describes the embedded model when the API runs it (LLM_ENDPOINT=embedded), else None."""
    return {"settings": settings, "classifier": classifier, "llm_client": llm_client, "llm_slots": llm_slots,
            "embedded_llm": embedded_llm, "classifying": Classifying(settings, classifier, llm_client, llm_slots)}


# Coroutines: FastAPI would run plain functions in a worker thread, a needless hop per request.
async def get_settings(request: Request) -> Settings:
    return request.state.settings


async def get_classifier(request: Request) -> ConversationClassifier:
    return request.state.classifier


async def get_llm_client(request: Request) -> LLMPool:
    return request.state.llm_client


async def get_llm_slots(request: Request) -> LLMSlots:
    return request.state.llm_slots


async def get_embedded_llm(request: Request) -> str | None:
    return request.state.embedded_llm


async def get_classifying(request: Request) -> Classifying:
    return request.state.classifying


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClassifierDep = Annotated[ConversationClassifier, Depends(get_classifier)]
LLMClientDep = Annotated[LLMPool, Depends(get_llm_client)]
LLMSlotsDep = Annotated[LLMSlots, Depends(get_llm_slots)]
EmbeddedLLMDep = Annotated[str | None, Depends(get_embedded_llm)]
ClassifyingDep = Annotated[Classifying, Depends(get_classifying)]
