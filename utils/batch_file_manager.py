"""Local batch files: the batch processor's crash-safe memory (design sections 3.1-3.5).

::

    batch_files/
    ├── batch_001_pending.json      conversations read from MongoDB, not yet all resolved
    ├── batch_001_retry_queue.json  failures of batch 001: llm_failed / write_failed entries
    ├── batch_001_completed.json    marker: every conversation of batch 001 was resolved
    ├── checkpoint.json             last ObjectId read into a batch file, and counts
    └── progress_<job>.json / .csv  progress of a job (utils/progress.py)

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``, fsync
of the folder), so a crash at any instant leaves the old or the new content, never a
torn file. Conversation documents and their ``_id`` values are stored as MongoDB Extended
JSON (relaxed) so ObjectIds, UUIDs, dates and ids of any BSON type survive the round trip.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from bson import json_util

from error_handler import BatchFileError

logger = logging.getLogger(__name__)

_BATCH_FILE = re.compile(r"^batch_(\d+)_(pending|retry_queue|completed)\.json$")
_JSON_OPTIONS = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)

RetryStatus = Literal["llm_failed", "write_failed"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_now() -> str:
    return utc_now().isoformat(timespec="seconds").replace("+00:00", "Z")


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one."""
    try:
        text = json_util.dumps(data, json_options=_JSON_OPTIONS, indent=1)
    except (TypeError, ValueError) as e:  # serialize before touching the disk: no temp file left behind
        raise BatchFileError(f"Cannot write {path}: the data is not JSON-serializable: {e}") from e
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BatchFileError(f"Cannot write {path}: {e}", hint="Check free disk space and permissions.") from e
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    try:
        return json_util.loads(path.read_text(encoding="utf-8"), json_options=_JSON_OPTIONS)
    except (OSError, ValueError) as e:
        raise BatchFileError(
            f"Cannot read batch file {path}: {e}",
            hint="Move the file out of the batch files folder if it is not needed; its conversations "
            "stay in status 'processing' and are picked up again with --retry-failed.",
        ) from e


@dataclass
class BatchConversation:
    """One source document in a batch file."""

    object_id: Any  # the source _id as its BSON value (any type)
    conversation_data: dict[str, Any]
    created_at: str = field(default_factory=iso_now)

    def to_json(self) -> dict[str, Any]:
        return {"_id": self.object_id, "conversation_data": self.conversation_data, "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchConversation:
        return cls(data["_id"], dict(data.get("conversation_data") or {}), str(data.get("created_at", "")))


@dataclass
class PendingBatch:
    """The content of ``batch_NNN_pending.json``."""

    number: int
    job_id: str
    conversations: list[BatchConversation]
    created_at: str = field(default_factory=iso_now)

    @property
    def batch_id(self) -> str:
        return batch_id(self.number)

    @property
    def first_object_id(self) -> str | None:
        return self.conversations[0].object_id if self.conversations else None

    @property
    def last_object_id(self) -> str | None:
        return self.conversations[-1].object_id if self.conversations else None

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "job_id": self.job_id,
            "created_at": self.created_at,
            "first_object_id": self.first_object_id,
            "last_object_id": self.last_object_id,
            "conversation_count": len(self.conversations),
            "conversations": [c.to_json() for c in self.conversations],
        }


@dataclass
class RetryEntry:
    """One entry of a retry queue: a conversation whose LLM call or result write failed."""

    conversation_id: Any  # the source _id as its BSON value (any type)
    status: RetryStatus
    conversation_data: dict[str, Any]
    reason: str
    error_type: str
    classification_result: dict[str, Any] | None = None
    processing_metadata: dict[str, Any] | None = None
    retry_count: int = 0
    failed_at: str = field(default_factory=iso_now)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryEntry:
        return cls(
            conversation_id=data["conversation_id"],
            status=data["status"],
            conversation_data=dict(data.get("conversation_data") or {}),
            reason=str(data.get("reason", "")),
            error_type=str(data.get("error_type", "")),
            classification_result=data.get("classification_result"),
            processing_metadata=data.get("processing_metadata"),
            retry_count=int(data.get("retry_count", 0)),
            failed_at=str(data.get("failed_at", "")),
        )


@dataclass
class Checkpoint:
    """Where reading stopped: the last ObjectId written into a batch file, and running counts."""

    last_object_id: str | None
    job_id: str
    conversations_resolved: int = 0
    updated_at: str = field(default_factory=iso_now)


def batch_id(number: int) -> str:
    return f"batch_{number:03d}"


class BatchFileManager:
    """Reads and writes the files of one batch files folder."""

    CHECKPOINT = "checkpoint.json"
    LOCK = ".lock"
    TARGET = "target.json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock_fd: int | None = None

    # --- folder -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder and remove temporary files left by a crash mid-write."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BatchFileError(f"Cannot create the batch files folder {self.directory}: {e}") from e
        for leftover in self.directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def lock(self) -> None:
        """Take the folder for this process; a second processor on the same folder is refused."""
        self.prepare()
        path = self.directory / self.LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BatchFileError(
                f"Another batch processor (pid {owner}) is using {self.directory}.",
                hint="Stop it first, or give this one its own --batch-files-dir.",
            ) from e
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def claim(self, target: str) -> None:
        """Tie the folder to one database and collections; refuse a folder that belongs to another.

        Pending batches and queues hold ObjectIds of one source collection: recovering them
        against another database would write results for documents that are not there.
        """
        path = self.directory / self.TARGET
        if path.exists():
            owner = read_json(path).get("target")
            if owner != target:
                raise BatchFileError(
                    f"{self.directory} holds the batch files of {owner}, not of {target}.",
                    hint=f"Give this database its own --batch-files-dir; or, if it is the same database under "
                    f"another address, delete {path}.",
                )
            return
        atomic_write_json(path, {"target": target, "claimed_at": iso_now()})

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def path(self, number: int, kind: str) -> Path:
        return self.directory / f"{batch_id(number)}_{kind}.json"

    def _numbers(self, kind: str | None = None) -> list[int]:
        numbers = set()
        for entry in self.directory.glob("batch_*.json"):
            match = _BATCH_FILE.match(entry.name)
            if match and (kind is None or match.group(2) == kind):
                numbers.add(int(match.group(1)))
        return sorted(numbers)

    def next_batch_number(self) -> int:
        numbers = self._numbers()
        return (numbers[-1] + 1) if numbers else 1

    # --- pending batches ----------------------------------------------------------------
    def write_pending(self, batch: PendingBatch) -> Path:
        path = self.path(batch.number, "pending")
        atomic_write_json(path, batch.to_json())
        return path

    def load_pending(self, number: int) -> PendingBatch:
        path = self.path(number, "pending")
        data = read_json(path)
        try:
            conversations = [BatchConversation.from_json(c) for c in data["conversations"]]
            return PendingBatch(number, str(data.get("job_id", "")), conversations, str(data.get("created_at", "")))
        except (KeyError, TypeError) as e:
            raise BatchFileError(f"Batch file {path} is not in the expected format: missing {e}") from e

    def pending_numbers(self) -> list[int]:
        """Numbers of the batches with a pending file, oldest first (completed leftovers removed)."""
        numbers = []
        for number in self._numbers("pending"):
            if self.path(number, "completed").exists():
                # Crash between writing the marker and removing the pending file.
                self.path(number, "pending").unlink(missing_ok=True)
            else:
                numbers.append(number)
        return numbers

    def mark_completed(self, number: int, summary: dict[str, Any]) -> None:
        """Write the completed marker, then remove the pending file."""
        atomic_write_json(self.path(number, "completed"), {"batch_id": batch_id(number), "completed_at": iso_now(),
                                                            **summary})
        self.path(number, "pending").unlink(missing_ok=True)

    # --- retry queues -------------------------------------------------------------------
    def load_retry_queue(self, number: int) -> list[RetryEntry]:
        path = self.path(number, "retry_queue")
        if not path.exists():
            return []
        data = read_json(path)
        if not isinstance(data, list):
            raise BatchFileError(f"Retry queue {path} must hold a JSON list.")
        try:
            return [RetryEntry.from_json(entry) for entry in data]
        except (KeyError, TypeError) as e:
            raise BatchFileError(f"Retry queue {path} is not in the expected format: missing {e}") from e

    def save_retry_queue(self, number: int, entries: list[RetryEntry]) -> None:
        """Write the queue of batch ``number``; an empty queue removes the file."""
        path = self.path(number, "retry_queue")
        if entries:
            atomic_write_json(path, [entry.to_json() for entry in entries])
        else:
            path.unlink(missing_ok=True)
            _fsync_directory(self.directory)

    def retry_queue_numbers(self) -> list[int]:
        return self._numbers("retry_queue")

    def queued_conversation_ids(self) -> set[str]:
        return {entry.conversation_id for n in self.retry_queue_numbers() for entry in self.load_retry_queue(n)}

    # --- checkpoint ---------------------------------------------------------------------
    def load_checkpoint(self) -> Checkpoint | None:
        path = self.directory / self.CHECKPOINT
        if not path.exists():
            return None
        data = read_json(path)
        return Checkpoint(
            last_object_id=data.get("last_object_id"),
            job_id=str(data.get("job_id", "")),
            conversations_resolved=int(data.get("conversations_resolved", 0)),
            updated_at=str(data.get("updated_at", "")),
        )

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        checkpoint.updated_at = iso_now()
        atomic_write_json(self.directory / self.CHECKPOINT, asdict(checkpoint))
