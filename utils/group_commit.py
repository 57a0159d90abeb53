"""Group commit: writes that arrive while one is being sent go together in the next one.

The batch processor writes each conversation's result and status as its model answer comes back,
up to ``BATCH_MAX_CONCURRENT`` at once. Sent one by one, that is one database statement per
conversation per write; sent as a group, one statement per group (``bulk_write``), and the database
(the bottleneck on a small machine: SecantusDB is pure Python) parses, plans and answers once.

No timer: the first write of an idle group is sent at once (a lone conversation waits for nobody),
and whatever arrives while it is on its way is sent together as soon as it is back. So a group is
exactly what piled up behind the database, and its size is bounded by the callers' concurrency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: A flush answers each write with its result, or with the exception that write alone failed with.
Flush = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class GroupCommit(Generic[T, R]):
    """``await submit(write)`` returns what ``flush`` answered for that write (or raises its error).

    ``flush(writes)`` sends a group and answers each write in order; an exception it raises fails the
    whole group (every caller gets it, and its own retry policy decides). A caller cancelled while
    waiting gives up its answer only: a group already sent is not taken back.
    """

    def __init__(self, flush: Flush[T, R]) -> None:
        self._flush = flush
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None
        #: Groups sent and writes in them (for logs and tests).
        self.groups = 0
        self.writes = 0

    async def submit(self, write: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            group = [(write, future) for write, future in group if not future.done()]  # cancelled callers
            if not group:
                continue
            self.groups += 1
            self.writes += len(group)
            try:
                answers = await self._flush([write for write, _ in group])
            except BaseException as e:
                for _, future in group:
                    if not future.done():
                        future.set_exception(e)
                if not isinstance(e, Exception):  # cancelled (the loop is closing): stop sending
                    for _, future in self._waiting:
                        future.cancel()
                    raise
                continue
            assert len(answers) == len(group), (len(answers), len(group))
            for (_, future), answer in zip(group, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
