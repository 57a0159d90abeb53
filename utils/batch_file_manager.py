"""Local batch files: the batch processor's crash-safe memory (docs/architecture.md#batch-files).

::

    batch_files/
    ├── batch_001_pending.json      conversations read from MongoDB, not yet all resolved
    ├── batch_001_retry_queue.jsonl failures of batch 001: llm_failed / write_failed entries (a journal)
    ├── batch_001_completed.json    marker: every conversation of batch 001 was resolved
    ├── checkpoint.json             the last job and its count of resolved conversations
    ├── quarantine/                 unreadable or truncated batch files, moved aside (never deleted)
    └── progress_<job>.json / .csv  progress of a job (utils/progress.py)

Every file but the retry queues is written atomically (:mod:`utils.atomic_files`), so a crash
at any instant leaves the old or the new content, never a torn file. Conversation documents and
their ``_id`` values are stored as MongoDB Extended JSON (relaxed) so ObjectIds, UUIDs, dates and
ids of any BSON type survive the round trip. A retry queue is an append-only journal
(:mod:`utils.retry_queue`); this module finds, reads and sets aside its file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from error_handler import BatchFileError, BatchFolderError
from utils.atomic_files import atomic_write_json, fsync_directory, read_json
from utils.clock import iso_now, utc_now
from utils.retry_queue import RetryQueue

logger = logging.getLogger(__name__)

_BATCH_FILE = re.compile(r"^batch_(\d+)_(pending|retry_queue|completed)\.jsonl?$")


@dataclass
class BatchConversation:
    """One source document in a batch file."""

    source_id: Any  # the source document's _id as its BSON value (any type)
    conversation_data: dict[str, Any]
    created_at: str = field(default_factory=iso_now)

    def to_json(self) -> dict[str, Any]:
        return {"_id": self.source_id, "conversation_data": self.conversation_data, "created_at": self.created_at}

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


    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "job_id": self.job_id,
            "created_at": self.created_at,
            # Informational (never read back): the first and last source ids of the batch.
            "first_object_id": self.conversations[0].source_id if self.conversations else None,
            "last_object_id": self.conversations[-1].source_id if self.conversations else None,
            "conversation_count": len(self.conversations),
            "conversations": [c.to_json() for c in self.conversations],
        }


@dataclass
class Checkpoint:
    """Running counts of the folder's jobs (informational: reading resumes from claims in MongoDB)."""

    job_id: str
    conversations_resolved: int = 0
    updated_at: str = field(default_factory=iso_now)


def _problem(error: BatchFileError) -> str:
    """What is wrong with a file, for a warning that names the file already."""
    cause = error.__cause__
    return str(cause) if isinstance(cause, (OSError, ValueError)) else error.message


_FOLDER_HINT = "Set BATCH_FILES_DIR (or --batch-files-dir) to a folder this user can create and write."

#: What happens to the conversations of a batch file set aside (said in the warning).
SET_ASIDE_CONSEQUENCE = (
    "its conversations stay 'processing' in MongoDB; run with --retry-failed to classify them again"
)


def batch_id(number: int) -> str:
    return f"batch_{number:03d}"


class BatchFileManager:
    """Reads and writes the files of one batch files folder."""

    CHECKPOINT = "checkpoint.json"
    LOCK = ".lock"
    TARGET = "target.json"
    QUARANTINE = "quarantine"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock_fd: int | None = None
        self._queues: dict[int, RetryQueue] = {}
        # Pending batches parsed while listing them (to find unreadable ones), keyed by number,
        # with the (mtime, size) they were read at.
        self._pending_read: dict[int, tuple[tuple[int, int], PendingBatch]] = {}

    # --- folder -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder; once this process holds its lock, remove temporary files left by a
        crash mid-write (never before: they may be a running processor's writes in progress)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BatchFolderError(
                f"Cannot create the batch files folder {self.directory}: {e.strerror or e}", hint=_FOLDER_HINT
            ) from e
        if self._lock_fd is not None:
            for leftover in self.directory.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)

    def lock(self) -> None:
        """Take the folder for this process; a second processor on the same folder is refused.

        Raises :class:`BatchFolderError` (a configuration error) for a folder that cannot be
        created or written, and :class:`BatchFileError` when another processor holds it.
        """
        self.prepare()
        path = self.directory / self.LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BatchFolderError(
                f"The batch files folder {self.directory} is not writable: {e.strerror or e}", hint=_FOLDER_HINT
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BatchFileError(
                f"Another batch processor (pid {owner}) is using {self.directory}.",
                hint="Stop it first, or give this one its own --batch-files-dir.",
            ) from e
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._check_writable()
        except OSError as e:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise BatchFolderError(
                f"The batch files folder {self.directory} is not writable: {e.strerror or e}", hint=_FOLDER_HINT
            ) from e
        self._lock_fd = fd
        self.prepare()  # now ours: clear what a crashed run left half-written

    def _check_writable(self) -> None:
        # An existing, writable .lock says nothing about the folder: create and remove a file in it.
        probe = self.directory / f".write-check.{os.getpid()}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        probe.unlink()

    @contextmanager
    def locked(self) -> Iterator[BatchFileManager]:
        """``with files.locked():`` holds the folder for the block (see :meth:`lock`)."""
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    def tie_to(self, target: str) -> None:
        """Tie the folder to one database and collections; refuse a folder that belongs to another.

        Pending batches and queues hold ObjectIds of one source collection: recovering them
        against another database would write results for documents that are not there.
        """
        path = self.directory / self.TARGET
        owner = None
        if path.exists():
            try:
                owner = read_json(path).get("target")
            except (BatchFileError, AttributeError) as e:
                problem = _problem(e) if isinstance(e, BatchFileError) else "not a JSON object"
                self.quarantine(path, problem, consequence=f"the folder is tied to {target} again")
        if owner is not None:
            if owner != target:
                raise BatchFileError(
                    f"{self.directory} holds the batch files of {owner}, not of {target}.",
                    hint=f"Give this database its own --batch-files-dir; or, if it is the same database under "
                    f"another address, delete {path}.",
                )
            return
        atomic_write_json(path, {"target": target, "tied_at": iso_now()})

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- quarantine -----------------------------------------------------------------------
    def quarantine(self, path: Path, problem: str, *, copy: bool = False, consequence: str = "") -> Path:
        """Move (or ``copy``) an unreadable batch file to ``quarantine/`` beside it, with a warning
        naming both; it is kept for inspection, never deleted. Returns where it went."""
        folder = self.directory / self.QUARANTINE
        try:
            folder.mkdir(exist_ok=True)
            target = folder / path.name
            if target.exists():  # an earlier file of the same name: keep both
                target = folder / f"{path.name}.{utc_now():%Y%m%dT%H%M%S}.{os.getpid()}"
            if copy:
                shutil.copy2(path, target)
            else:
                os.replace(path, target)
        except OSError as e:
            raise BatchFileError(
                f"Batch file {path} is unreadable ({problem}) and cannot be moved to {folder}: {e}",
                hint="Move it out of the batch files folder by hand, then start again.",
            ) from e
        fsync_directory(folder)
        fsync_directory(self.directory)
        logger.warning("batch file %s is unreadable (%s); %s to %s%s", path, problem,
                       "a copy was saved" if copy else "moved", target, f"; {consequence}" if consequence else "")
        return target

    def path(self, number: int, kind: str) -> Path:
        suffix = "jsonl" if kind == "retry_queue" else "json"
        return self.directory / f"{batch_id(number)}_{kind}.{suffix}"

    def _numbers(self, kind: str | None = None) -> list[int]:
        numbers = set()
        for entry in self.directory.glob("batch_*.json*"):
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

    def _read_pending(self, number: int) -> PendingBatch:
        path = self.path(number, "pending")
        data = read_json(path)
        try:
            conversations = [BatchConversation.from_json(c) for c in data["conversations"]]
            return PendingBatch(number, str(data.get("job_id", "")), conversations, str(data.get("created_at", "")))
        except (KeyError, TypeError, AttributeError) as e:
            raise BatchFileError(f"Batch file {path} is not in the expected format: missing {e}") from e

    def _stat(self, path: Path) -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def load_pending(self, number: int) -> PendingBatch:
        """The pending batch ``number``; an unreadable file is quarantined and BatchFileError raised."""
        path = self.path(number, "pending")
        seen = self._pending_read.pop(number, None)
        if seen is not None and seen[0] == self._stat(path):
            return seen[1]
        try:
            return self._read_pending(number)
        except BatchFileError as e:
            if not path.exists():
                raise
            moved = self.quarantine(path, _problem(e), consequence=SET_ASIDE_CONSEQUENCE)
            raise BatchFileError(f"{e.message} (moved to {moved})", hint=SET_ASIDE_CONSEQUENCE) from e

    def pending_numbers(self) -> list[int]:
        """Numbers of the readable pending batches, oldest first. Completed leftovers are removed;
        unreadable or truncated files are moved to ``quarantine/`` (with a warning) and skipped."""
        numbers = []
        read: dict[int, tuple[tuple[int, int], PendingBatch]] = {}
        for number in self._numbers("pending"):
            path = self.path(number, "pending")
            if self.path(number, "completed").exists():
                # Crash between writing the marker and removing the pending file.
                path.unlink(missing_ok=True)
                continue
            stat = self._stat(path)
            try:
                batch = self._read_pending(number)
            except BatchFileError as e:
                if path.exists():
                    self.quarantine(path, _problem(e), consequence=SET_ASIDE_CONSEQUENCE)
                continue
            if stat is not None:
                read[number] = (stat, batch)
            numbers.append(number)
        self._pending_read = read
        return numbers

    def mark_completed(self, number: int, summary: dict[str, Any]) -> None:
        """Write the completed marker, then remove the pending file."""
        atomic_write_json(self.path(number, "completed"), {"batch_id": batch_id(number), "completed_at": iso_now(),
                                                            **summary})
        self.path(number, "pending").unlink(missing_ok=True)

    # --- retry queues -------------------------------------------------------------------
    def retry_queue(self, number: int) -> RetryQueue:
        """The retry queue of batch ``number`` (empty when it has none), read once and then kept: every
        change goes through it to the file. An unreadable file is set aside in ``quarantine/``."""
        queue = self._queues.get(number)
        if queue is None:
            legacy = self.directory / f"{batch_id(number)}_retry_queue.json"  # a JSON list (before 1.1)
            queue = RetryQueue(self.path(number, "retry_queue"), legacy)
            try:
                problems = queue.load()
            except BatchFileError as e:  # unreadable as a whole: set aside, the batch goes on without it
                for path in (queue.path, legacy):
                    if path.exists():
                        self.quarantine(path, _problem(e), consequence=SET_ASIDE_CONSEQUENCE)
                queue = RetryQueue(self.path(number, "retry_queue"), legacy)
            else:
                if problems:  # keep the readable entries; the damaged original goes to quarantine
                    self.quarantine(queue.path, "; ".join(problems), copy=True,
                                    consequence="its readable entries are kept")
                    queue.compact()
                elif not queue and queue.path.exists():
                    queue.delete()  # every entry resolved, then a crash before the file was removed
            self._queues[number] = queue
        return queue

    def retry_queue_numbers(self) -> list[int]:
        return [n for n in self._numbers("retry_queue") if self.retry_queue(n)]

    # --- checkpoint ---------------------------------------------------------------------
    def load_checkpoint(self) -> Checkpoint | None:
        path = self.directory / self.CHECKPOINT
        if not path.exists():
            return None
        try:
            data = read_json(path)
            return Checkpoint(
                job_id=str(data.get("job_id", "")),
                conversations_resolved=int(data.get("conversations_resolved", 0)),
                updated_at=str(data.get("updated_at", "")),
            )
        except (BatchFileError, AttributeError, TypeError, ValueError) as e:
            problem = _problem(e) if isinstance(e, BatchFileError) else f"not a checkpoint: {e}"
            self.quarantine(path, problem, consequence="its running count starts again")
            return None

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        checkpoint.updated_at = iso_now()
        atomic_write_json(self.directory / self.CHECKPOINT, asdict(checkpoint))
