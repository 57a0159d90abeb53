"""Identical conversations of a job are classified once (docs/architecture.md#content-hash-and-identical-conversations).

The batch processor keys each classification by the transcript's content hash; an identical
conversation that comes later (or is in flight at the same time) gets a copy. What is kept per
hash is only what a copy needs: the labels and confidences, the model, the token counts and
the id of the conversation it came from; never the transcript, the prompt or the token
log-probabilities (those made an entry ~100 KB). The cache is bounded in entries and in bytes
(the BSON size of what is kept plus a fixed allowance for the Python objects), oldest first out:
a continuous run lives for weeks.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import bson

#: Allowance for the Python objects around each entry's data (dicts, strings, the future, the key).
ENTRY_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class Reusable:
    """What a copy of a classification needs."""

    source_id: Any
    classification: dict[str, Any]
    model: str
    llm_tokens: dict[str, int | None] | None

    def size(self) -> int:
        data = {"source_id": self.source_id, "classification": self.classification, "model": self.model,
                "llm_tokens": self.llm_tokens}
        return len(bson.encode(data)) + ENTRY_OVERHEAD_BYTES


class IdenticalCache:
    """content hash -> future of its first classification in this job (None when that one failed).

    ``begin`` registers the one classification in flight for a hash; the others ``get`` its future
    and wait for it.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._futures: OrderedDict[str, asyncio.Future[Reusable | None]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._futures)

    def get(self, digest: str) -> asyncio.Future[Reusable | None] | None:
        return self._futures.get(digest)

    def touch(self, digest: str) -> None:
        """A copy was made: the entry is recent again."""
        if digest in self._futures:
            self._futures.move_to_end(digest)

    def begin(self, digest: str) -> asyncio.Future[Reusable | None]:
        future: asyncio.Future[Reusable | None] = asyncio.get_running_loop().create_future()
        self._forget(digest)
        self._futures[digest] = future
        self._evict()
        return future

    def finish(self, digest: str, future: asyncio.Future[Reusable | None], reusable: Reusable | None) -> None:
        """Hand the outcome to the waiters; a failure (None) is forgotten, so the next one classifies."""
        future.set_result(reusable)
        if self._futures.get(digest) is not future:
            return  # evicted meanwhile
        if reusable is None:
            self._forget(digest)
            return
        size = reusable.size()
        self._sizes[digest] = size
        self.bytes += size
        self._evict()

    def _forget(self, digest: str) -> None:
        self._futures.pop(digest, None)
        self.bytes -= self._sizes.pop(digest, 0)

    def _evict(self) -> None:
        while self._futures and (len(self._futures) > self.max_entries or self.bytes > self.max_bytes):
            oldest = next(iter(self._futures))
            self._forget(oldest)
