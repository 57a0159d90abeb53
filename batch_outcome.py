"""What came of one attempt at a conversation: the words the batch worker, the retry policy and the
recorder share (docs/architecture.md#outcomes-of-one-conversation).

The worker (:mod:`batch_worker`) turns a :class:`WorkItem` into an :class:`Attempt`; the retry
policy (:mod:`retry_policy`) says what a failed one becomes; the recorder (:mod:`batch_recorder`)
writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from batch_source import Claim, id_key
from error_handler import ClassifierError
from mongo_client import ResultDocument
from utils.retry_queue import RetryEntry

#: error_type of a failure that is a bug rather than a known failure (logged with its traceback).
UNEXPECTED_ERROR = "internal_error"
#: error_type (and failure_type) of a conversation with no customer turn: status 'skipped'.
NO_CUSTOMER_TURN = "no_customer_turn"


class Outcome(StrEnum):
    """What one attempt at a conversation came to. The values are the words of the log, the retry
    queue (``llm_failed``, ``write_failed``) and the progress tracker."""

    SUCCESS = "success"  # its result is written under this processor's claim
    ALREADY_CLASSIFIED = "already_classified"  # a result with the same content hash exists
    INVALID = "invalid"  # not a conversation the model can classify (invalid input)
    SKIPPED = "skipped"  # no customer turn: nothing to classify
    LLM_FAILED = "llm_failed"  # an LLMError after its retries, or an unexpected exception
    WRITE_FAILED = "write_failed"  # a StorageError after its retries (a paid result is kept)
    #: The claim was no longer this processor's when it wrote (taken over, or the document reset): its result
    #: or status change is dropped, the newer claim's stands (docs/architecture.md#exactly-once-the-fencing-rule).
    LOST_CLAIM = "lost_claim"


#: Outcomes that are failures of this processor's work: the retry policy decides what follows.
FAILURES = frozenset({Outcome.INVALID, Outcome.LLM_FAILED, Outcome.WRITE_FAILED})


@dataclass(frozen=True)
class Attempt:
    """An outcome with what it carries: the error of a failure, the result of a write (kept in the
    retry queue when its write failed)."""

    outcome: Outcome
    error: BaseException | None = None
    result: ResultDocument | None = None


@dataclass
class WorkItem:
    """One conversation to attempt: fresh from a batch, or an entry of a retry queue, under ``claim``
    (whose generation every result written for it carries)."""

    source_id: Any  # the source document's _id, of any BSON type: the one name for it in the batch code
    data: dict[str, Any]
    claim: Claim
    entry: RetryEntry | None = None

    @property
    def key(self) -> str:
        return id_key(self.source_id)

    @property
    def number(self) -> str:
        return str(self.data.get("conversation_number", self.key))

    @property
    def passes(self) -> int:
        """Retry-queue passes made, counting this one when the item is a queue entry."""
        return 0 if self.entry is None else self.entry.retry_count + 1


def describe(error: BaseException | None) -> tuple[str, str]:
    """(reason, error_type) of a failure for queues, statuses and logs."""
    if error is None:
        return "failed", "error"
    if isinstance(error, ClassifierError):
        return str(error), error.code
    return f"unexpected {type(error).__name__}: {error}", UNEXPECTED_ERROR
