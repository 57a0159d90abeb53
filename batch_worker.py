"""The batch worker: one conversation in, one :class:`~batch_outcome.Attempt` out
(docs/architecture.md#outcomes-of-one-conversation).

Like arq's ``run_job`` and procrastinate's worker: it decides what came of the conversation and
writes nothing but the result itself (the fenced upsert, or the stamp of an identical existing
result); the recorder (:mod:`batch_recorder`) writes the rest. Raises only for bugs.

Two steps, so that the processor can give the LLM slot back between them: :meth:`BatchWorker.attempt`
(validation, the model) ends in an :class:`Attempt` or a result :class:`Unwritten` yet, and
:meth:`BatchWorker.write` writes that result under the claim, together with the results of other
conversations that are ready at the same time (one claim check and one upsert statement per group).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aggregator import ConversationIn, content_hash, validate_conversation
from batch_outcome import Attempt, Outcome, WorkItem
from batch_source import BatchSource, conversation_payload
from classifier import ClassificationOutcome, ConversationClassifier
from error_handler import InputError, LLMError, NoCustomerTurnError, StorageError
from llm_pool import AsyncLLMPool
from mongo_client import MongoStore, ProcessingMetadata, ResultDocument
from retry_policy import Policy, retried
from utils.group_commit import GroupCommit
from utils.identical_cache import IdenticalCache, Reusable

logger = logging.getLogger(__name__)

PROCESSOR_VERSION = "1.1.0"

T = TypeVar("T")


@dataclass(frozen=True)
class Unwritten:
    """A result to write under the item's claim (``checked``: the claim was just checked)."""

    result: ResultDocument
    checked: bool = False


@dataclass(frozen=True)
class _Write:
    item: WorkItem
    unwritten: Unwritten


class BatchWorker:
    """Validates, classifies (or reuses an identical conversation's classification) and writes the
    result under the item's claim; failed calls are retried in place as the ``policy`` says."""

    def __init__(self, store: MongoStore, source: BatchSource, llm: AsyncLLMPool, classifier: ConversationClassifier,
                 policy: Policy, identical: IdenticalCache) -> None:
        self.store = store
        self.source = source
        self.llm = llm
        self.classifier = classifier
        self.policy = policy
        #: content hash -> what copies of its first classification in this job need.
        self.identical = identical
        self._writes: GroupCommit[_Write, bool] = GroupCommit(self._write_all)

    async def attempt(self, item: WorkItem, existing_hash: str | None) -> Attempt | Unwritten:
        """The conversation's attempt, or its result still to :meth:`write`; ``existing_hash``: the content
        hash of its result when the batch was read."""
        entry = item.entry
        if entry is not None and Outcome(entry.status) is Outcome.WRITE_FAILED and entry.result is not None:
            replayed = await self._replay(item, entry.result)
            if replayed is not None:
                return replayed
            # The conversation changed since it was classified: item.data holds its text now.
        try:
            conversation = validate_conversation(item.data)
        except InputError as e:
            return Attempt(Outcome.SKIPPED if isinstance(e, NoCustomerTurnError) else Outcome.INVALID, error=e)
        digest = content_hash(conversation)
        if existing_hash == digest:
            try:
                # Its result is this claim's from now on: no late writer of an older claim replaces it.
                if await self._storage("result check", lambda: self.store.stamp_result(
                        item.source_id, digest, item.claim.generation), item):
                    return Attempt(Outcome.ALREADY_CLASSIFIED)
            except StorageError as e:
                return Attempt(Outcome.WRITE_FAILED, error=e)
            # Replaced or removed since the batch was read: classified, and the fenced write decides.
        try:
            result = await self._classified(conversation, item, digest)
        except LLMError as e:
            return Attempt(Outcome.LLM_FAILED, error=e)
        return Unwritten(result)

    async def _replay(self, item: WorkItem, stored: dict[str, Any]) -> Attempt | Unwritten | None:
        """Write a result paid for earlier (a write_failed entry) without asking the LLM again, if the
        claim holds and the conversation is still the one classified; None when it changed
        (``item.data`` then holds its current text, to classify)."""
        metadata = dict(stored.get("processing_metadata") or {})
        metadata.setdefault("processed_at", self.source.now())  # entries of before 1.1 may lack it
        result = ResultDocument.from_mongo({**stored, "processing_metadata": metadata,
                                            "source_conversation_id": item.source_id,
                                            "claim_generation": item.claim.generation})
        try:
            current = await self._storage("check of a claim", lambda: self.source.holding(
                item.source_id, item.claim, conversation=result.content_hash is not None), item)
        except StorageError as e:
            return Attempt(Outcome.WRITE_FAILED, error=e, result=result)
        if current is None:
            return Attempt(Outcome.LOST_CLAIM)
        if result.content_hash is not None and _hash_or_none(current) != result.content_hash:
            logger.info("conversation %s changed since its classification was queued: it is classified again",
                        item.number)
            item.data = conversation_payload(current)
            return None
        return Unwritten(result, checked=True)

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
            outcome = await self._classify(conversation, item)
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
            batch_job_id=self.source.job_id,
            reused_from=reusable.source_id if reused else None,
            llm_tokens=None if reused else reusable.llm_tokens,
        )
        return ResultDocument(conversation.conversation_number, item.source_id, reusable.classification, digest,
                              metadata, item.claim.generation)

    async def _classify(self, conversation: ConversationIn, item: WorkItem) -> ClassificationOutcome:
        """The LLM call: failures retried in place as the policy says, behind the pool's per-server
        circuit breakers."""
        async for attempt in self.policy.in_place(
                Outcome.LLM_FAILED, f"LLM call for conversation {conversation.conversation_number}", item.passes):
            with attempt:
                # Every server's circuit open: pause until one may be tried, as with a single server.
                await self.llm.wait_for_server()
                outcome = await self.classifier.classify_async(conversation, self.llm)
        return outcome

    async def write(self, item: WorkItem, unwritten: Unwritten) -> Attempt:
        """Upsert the result under the item's claim: SUCCESS, WRITE_FAILED (kept for a retry without the
        LLM) or LOST_CLAIM (the claim is no longer current: nothing was written).

        The fence (docs/architecture.md#exactly-once-the-fencing-rule): the claim must still be the
        document's current one (unless it was just ``checked``), and the upsert only replaces a result
        of the same or an older generation. Failures are retried in place.
        """
        result = unwritten.result
        try:
            written = await self._storage(f"result write for conversation {result.conversation_number}",
                                          lambda: self._writes.submit(_Write(item, unwritten)), item)
        except StorageError as e:
            return Attempt(Outcome.WRITE_FAILED, error=e, result=result)
        return Attempt(Outcome.SUCCESS if written else Outcome.LOST_CLAIM, result=result)

    async def _write_all(self, writes: list[_Write]) -> list[bool | StorageError]:
        """A group of results: one read for the claims to check, one upsert statement for those that hold.
        Each answers whether it was written (False: its claim was lost, or a newer claim's result is there)."""
        checks = [i for i, w in enumerate(writes) if not w.unwritten.checked]
        held = await self.source.held([(writes[i].item.source_id, writes[i].item.claim) for i in checks])
        lost = {i for i, holds in zip(checks, held, strict=True) if not holds}
        ready = [i for i in range(len(writes)) if i not in lost]
        answers: list[bool | StorageError] = [False] * len(writes)
        written = await self.store.upsert_results([writes[i].unwritten.result for i in ready],
                                                  created_at=self.source.now())
        for i, answer in zip(ready, written, strict=True):
            answers[i] = answer
        return answers

    async def _storage(self, what: str, operation: Callable[[], Awaitable[T]], item: WorkItem) -> T:
        return await retried(self.policy, Outcome.WRITE_FAILED, what, operation, item.passes)


def _hash_or_none(document: dict[str, Any]) -> str | None:
    """The content hash of a source document's conversation; None when it is no longer valid."""
    try:
        return content_hash(validate_conversation(conversation_payload(document)))
    except InputError:
        return None
