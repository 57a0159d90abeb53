"""Local batch files: the batch processor's crash-safe memory (docs/architecture.md#batch-files).

::

    batch_files/
    ├── batch_001_pending.json      conversations read from MongoDB, not yet all resolved
    ├── batch_001_retry_queue.jsonl failures of batch 001: llm_failed / write_failed entries (a journal)
    ├── batch_001_completed.json    marker: every conversation of batch 001 was resolved
    ├── checkpoint.json             the last job and its count of resolved conversations
    ├── quarantine/                 unreadable or truncated batch files, moved aside (never deleted)
    └── progress_<job>.json / .csv  progress of a job (utils/progress.py)

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``, fsync
of the folder), so a crash at any instant leaves the old or the new content, never a
torn file. Conversation documents and their ``_id`` values are stored as MongoDB Extended
JSON (relaxed) so ObjectIds, UUIDs, dates and ids of any BSON type survive the round trip.

A retry queue changes one entry at a time, so rewriting it whole on every change would
cost the square of its size (300 failures of 4 KB wrote 200 MB). It is a journal instead:
one JSON line per change (``put`` an entry, ``set`` some of its fields, ``remove`` it),
appended and fsynced, so a change writes bytes in proportion to itself. When the dead
lines outweigh the live entries the journal is compacted (rewritten atomically with only
the live entries); when its last entry is resolved the file is removed. A crash mid-append
can only tear the last line: that change was never confirmed to the caller and is dropped
on reading. Entries keep only what a retry needs: a ``write_failed`` entry holds the paid
classification, not the conversation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from bson import json_util

from error_handler import BatchFileError, BatchFolderError
from utils.atomic_files import (
    JSON_OPTIONS,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    fsync_directory,
    read_json,
)
from utils.clock import iso_now, utc_now

logger = logging.getLogger(__name__)

_BATCH_FILE = re.compile(r"^batch_(\d+)_(pending|retry_queue|completed)\.jsonl?$")
# Journal keys: canonical Extended JSON tells 1 from 1.0 and keeps embedded documents hashable.
_KEY_OPTIONS = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True)
#: A journal is compacted once it is this much larger than twice its live entries.
JOURNAL_COMPACT_SLACK_BYTES = 64 * 1024
#: Longest failure reason kept in a retry entry (the source document keeps 1000 characters).
MAX_REASON_CHARS = 2000
#: What a ``write_failed`` entry keeps of its conversation: the retry writes the stored classification.
WRITE_FAILED_CONVERSATION_FIELDS = ("conversation_number",)

RetryStatus = Literal["llm_failed", "write_failed"]


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
    #: With a ``write_failed`` classification: the transcript's hash it was made for (the entry
    #: no longer holds the conversation, so the retry cannot compute it).
    content_hash: str | None = None

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
            content_hash=data.get("content_hash"),
        )


def retry_record(entry: RetryEntry) -> dict[str, Any]:
    """What a retry needs of ``entry``, as stored: a ``write_failed`` entry with its classification
    keeps only the conversation's number (the retry writes the stored result, no LLM call)."""
    record = {f.name: getattr(entry, f.name) for f in fields(entry)}  # shallow: unchanged values stay shared
    if entry.status == "write_failed" and entry.classification_result is not None:
        data = entry.conversation_data
        record["conversation_data"] = {k: data[k] for k in WRITE_FAILED_CONVERSATION_FIELDS if k in data}
    if len(entry.reason) > MAX_REASON_CHARS:
        record["reason"] = entry.reason[:MAX_REASON_CHARS]
    return record


def _journal_key(conversation_id: Any) -> str:
    return json_util.dumps(conversation_id, json_options=_KEY_OPTIONS)


class RetryJournal:
    """The retry queue of one batch: live entries in memory, changes appended to ``path``.

    The folder lock makes this process the only writer, so the in-memory state stays the
    truth between reads.
    """

    def __init__(self, path: Path, legacy_path: Path | None = None) -> None:
        self.path = path
        self.legacy_path = legacy_path
        self.live: dict[str, dict[str, Any]] = {}
        self._sizes: dict[str, int] = {}
        self.journal_bytes = 0
        #: Set when reading found damage: the damaged original was copied to this path.
        self.quarantined: Path | None = None

    @property
    def live_bytes(self) -> int:
        return sum(self._sizes.values())

    # --- reading ------------------------------------------------------------------------
    def load(self) -> list[str]:
        """Replay the journal (or a legacy JSON list); returns what was wrong with it, if anything."""
        problems: list[str] = []
        if self.path.exists():
            try:
                raw = self.path.read_bytes()
            except OSError as e:
                raise BatchFileError(f"Cannot read batch file {self.path}: {e}") from e
            self.journal_bytes = len(raw)
            lines = raw.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            elif lines:  # no newline at the end: a crash tore the last append (never confirmed)
                problems.append("its last line was cut short by an interrupted write")
                lines = lines[:-1]
            for number, line in enumerate(lines, 1):
                try:
                    op = json_util.loads(line.decode("utf-8"), json_options=JSON_OPTIONS)
                    self._apply(op, len(line) + 1, read=True)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    problems.append(f"line {number} is unreadable ({type(e).__name__}: {e})")
            if self.legacy_path is not None and self.legacy_path.exists():
                # A crash between writing the journal and removing the legacy list: the journal is newer.
                self.legacy_path.unlink()
        elif self.legacy_path is not None and self.legacy_path.exists():
            data = read_json(self.legacy_path)
            if not isinstance(data, list):
                raise BatchFileError(f"Retry queue {self.legacy_path} must hold a JSON list.")
            try:
                for item in data:
                    record = retry_record(RetryEntry.from_json(item))
                    self._put(record, 0)
            except (KeyError, TypeError, AttributeError) as e:
                raise BatchFileError(f"Retry queue {self.legacy_path} is not in the expected format: {e}") from e
        return problems

    def _apply(self, op: dict[str, Any], size: int, *, read: bool = False) -> None:
        """Apply one journal operation; ``read``: it comes from the file (validate and normalise it)."""
        kind = op["op"]
        if kind == "put":
            entry = op["entry"]
            self._put(retry_record(RetryEntry.from_json(entry)) if read else entry, size)
        elif kind == "set":
            key = _journal_key(op["conversation_id"])
            self.live[key] = {**self.live[key], **op["fields"]}
            self._sizes[key] += size
        elif kind == "remove":
            key = _journal_key(op["conversation_id"])
            self.live.pop(key, None)
            self._sizes.pop(key, None)
        else:
            raise ValueError(f"unknown journal operation {kind!r}")

    def _put(self, record: dict[str, Any], size: int) -> None:
        key = _journal_key(record["conversation_id"])
        self.live.pop(key, None)  # a put replaces the entry and moves it to the end
        self.live[key] = record
        self._sizes[key] = size

    def entries(self) -> list[RetryEntry]:
        return [RetryEntry(**record) for record in self.live.values()]

    # --- changing -----------------------------------------------------------------------
    def changes_to(self, entries: list[RetryEntry]) -> list[dict[str, Any]]:
        """The journal operations that turn the live entries into ``entries``.

        Cheap when little changed: values an entry shares with the live state compare by identity.
        (So entries are values: replace a field's dict rather than mutating it in place.)
        """
        wanted: dict[str, dict[str, Any]] = {}
        for entry in entries:
            wanted[_journal_key(entry.conversation_id)] = retry_record(entry)
        ops: list[dict[str, Any]] = []
        for key, old in self.live.items():
            if key not in wanted:
                ops.append({"op": "remove", "conversation_id": old["conversation_id"]})
        for key, record in wanted.items():
            op = self.op_for(key, record)
            if op is not None:
                ops.append(op)
        return ops

    def op_for(self, key: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """``put`` for a new entry, ``set`` of the changed fields of a known one, None if unchanged."""
        old = self.live.get(key)
        if old is None:
            return {"op": "put", "entry": record}
        if old == record:  # shared values compare by identity first: cheap when unchanged
            return None
        changed = {name: value for name, value in record.items() if old.get(name) != value}
        return {"op": "set", "conversation_id": record["conversation_id"], "fields": changed}

    def write(self, ops: list[dict[str, Any]], directory: Path) -> None:
        """Append ``ops`` (fsynced), applying them to the live state; compact when the dead lines dominate."""
        if not ops:
            return
        lines = [(dumps_json(self.path, op) + "\n").encode("utf-8") for op in ops]
        if not self.path.exists() and self.legacy_path is not None and self.legacy_path.exists():
            for op, line in zip(ops, lines, strict=True):
                self._apply(op, len(line))
            self.compact()
            return
        new_file = not self.path.exists()
        try:
            with open(self.path, "ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise BatchFileError(f"Cannot write {self.path}: {e}", hint="Check free disk space and permissions.") from e
        if new_file:
            fsync_directory(directory)
        for op, line in zip(ops, lines, strict=True):
            self._apply(op, len(line))
            self.journal_bytes += len(line)
        if not self.live:
            self.remove()
        elif self.journal_bytes > 2 * self.live_bytes + JOURNAL_COMPACT_SLACK_BYTES:
            self.compact()

    def compact(self) -> None:
        """Rewrite the journal atomically with one ``put`` line per live entry."""
        if not self.live:
            self.remove()
            return
        lines = [dumps_json(self.path, {"op": "put", "entry": record}) + "\n" for record in self.live.values()]
        atomic_write_text(self.path, "".join(lines))
        self._sizes = {key: len(line.encode("utf-8")) for key, line in zip(self.live, lines, strict=True)}
        self.journal_bytes = sum(self._sizes.values())
        if self.legacy_path is not None and self.legacy_path.exists():
            self.legacy_path.unlink()
            fsync_directory(self.path.parent)

    def remove(self) -> None:
        self.live.clear()
        self._sizes.clear()
        self.journal_bytes = 0
        for path in (self.path, self.legacy_path):
            if path is not None:
                path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)


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
        self._journals: dict[int, RetryJournal] = {}
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

    def claim(self, target: str) -> None:
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
        atomic_write_json(path, {"target": target, "claimed_at": iso_now()})

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
    def _journal(self, number: int) -> RetryJournal:
        journal = self._journals.get(number)
        if journal is None:
            legacy = self.directory / f"{batch_id(number)}_retry_queue.json"  # a JSON list (before 1.1)
            journal = RetryJournal(self.path(number, "retry_queue"), legacy)
            try:
                problems = journal.load()
            except BatchFileError as e:  # unreadable as a whole: set aside, the batch goes on without it
                for path in (journal.path, legacy):
                    if path.exists():
                        self.quarantine(path, _problem(e), consequence=SET_ASIDE_CONSEQUENCE)
                journal = RetryJournal(self.path(number, "retry_queue"), legacy)
            else:
                if problems:  # keep the readable entries; the damaged original goes to quarantine
                    self.quarantine(journal.path, "; ".join(problems), copy=True,
                                    consequence="its readable entries are kept")
                    journal.compact()
                elif not journal.live and journal.path.exists():
                    journal.remove()  # every entry resolved, then a crash before the file was removed
            self._journals[number] = journal
        return journal

    def load_retry_queue(self, number: int) -> list[RetryEntry]:
        return self._journal(number).entries()

    def save_retry_queue(self, number: int, entries: list[RetryEntry]) -> None:
        """Make the queue of batch ``number`` hold ``entries``; only the changes are written.
        An empty queue removes the file."""
        journal = self._journal(number)
        if not entries:
            journal.remove()
            return
        journal.write(journal.changes_to(entries), self.directory)

    def add_retry_entry(self, number: int, entry: RetryEntry) -> None:
        """Queue ``entry`` (or replace the entry of its conversation): one line appended."""
        journal = self._journal(number)
        journal.write([{"op": "put", "entry": retry_record(entry)}], self.directory)

    def update_retry_entry(self, number: int, entry: RetryEntry) -> None:
        """Record what changed in a queued entry (retry count, reason, status, a paid classification)."""
        journal = self._journal(number)
        op = journal.op_for(_journal_key(entry.conversation_id), retry_record(entry))
        if op is not None:
            journal.write([op], self.directory)

    def remove_retry_entry(self, number: int, conversation_id: Any) -> None:
        """Take a conversation out of the queue (resolved); the file goes with the last entry."""
        journal = self._journal(number)
        if _journal_key(conversation_id) in journal.live:
            journal.write([{"op": "remove", "conversation_id": conversation_id}], self.directory)

    def retry_queue_numbers(self) -> list[int]:
        return [n for n in self._numbers("retry_queue") if self._journal(n).live]

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
