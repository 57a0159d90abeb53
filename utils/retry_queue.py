"""The retry queue of one batch, which is its journal on disk (docs/architecture.md#batch-files).

A retry queue changes one entry at a time, so rewriting it whole on every change would cost the
square of its size (300 failures of 4 KB wrote 200 MB). The queue is a journal instead: every
change is one JSON line appended and fsynced before the call returns (``put`` an entry, ``set``
some of its fields, ``remove`` it), so a change writes bytes in proportion to itself, and what
the file says is what the queue holds: there is no second copy to reconcile. When the dead lines
outweigh the live entries the journal is compacted (rewritten atomically with only the live
entries); when its last entry is resolved the file is removed. A crash mid-append can only tear
the last line: that change was never confirmed to the caller and is dropped on reading.

Entries keep only what a retry needs: an ``llm_failed`` entry the conversation (it is classified
again); a ``write_failed`` entry the result whose write failed (``result``: a
``mongo_client.ResultDocument`` as ``to_mongo()`` gives it), so the retry writes it without a
second LLM call, and of the conversation only its number.

Older files still load: the JSON list of before 1.1 (``batch_NNN_retry_queue.json``) and journals
whose entries name the conversation ``conversation_id`` and keep a paid classification as three
fields (``classification_result``, ``processing_metadata``, ``content_hash``). Either is rewritten
in today's form (atomically) as soon as it is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from bson import json_util

from error_handler import BatchFileError
from utils.atomic_files import JSON_OPTIONS, atomic_write_text, dumps_json, fsync_directory, read_json
from utils.clock import iso_now

# Journal keys: canonical Extended JSON tells 1 from 1.0 and keeps embedded documents hashable.
_KEY_OPTIONS = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True)
#: A journal is compacted once it is this much larger than twice its live entries.
JOURNAL_COMPACT_SLACK_BYTES = 64 * 1024
#: Longest failure reason kept in a retry entry (the source document keeps 1000 characters).
MAX_REASON_CHARS = 2000
#: What a ``write_failed`` entry keeps of its conversation: the retry writes the stored result.
WRITE_FAILED_CONVERSATION_FIELDS = ("conversation_number",)
#: Fields of entries written before 1.2 (a paid classification in three parts, the id's old name).
_OLD_FIELDS = ("conversation_id", "classification_result", "processing_metadata", "content_hash")

RetryStatus = Literal["llm_failed", "write_failed"]


@dataclass(frozen=True)
class RetryEntry:
    """One entry of a retry queue: a conversation whose LLM call or result write failed. A value:
    change it with :func:`dataclasses.replace` and :meth:`RetryQueue.update`."""

    source_id: Any  # the source document's _id, as its BSON value (any type)
    status: RetryStatus
    conversation_data: dict[str, Any]
    reason: str
    error_type: str
    retry_count: int = 0  # retry-queue passes that failed it
    failed_at: str = field(default_factory=iso_now)
    #: ``write_failed``: the result whose write failed (``ResultDocument.to_mongo()``), written by the retry.
    result: dict[str, Any] | None = None

    def stored(self) -> RetryEntry:
        """What the queue keeps of this entry: a ``write_failed`` entry with its result keeps only the
        conversation's number (the retry writes the stored result, no LLM call); a long reason is cut."""
        data = self.conversation_data
        if self.status == "write_failed" and self.result is not None:
            data = {k: data[k] for k in WRITE_FAILED_CONVERSATION_FIELDS if k in data}
        return replace(self, conversation_data=data, reason=self.reason[:MAX_REASON_CHARS])

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: values stay shared

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryEntry:
        """An entry as stored, today's form or an older one (see the module's docstring)."""
        conversation_data = dict(data.get("conversation_data") or {})
        source_id = data["source_id"] if "source_id" in data else data["conversation_id"]
        result = data.get("result")
        if result is None and data.get("classification_result") is not None:
            result = {
                "conversation_number": str(conversation_data.get("conversation_number", "")),
                "source_conversation_id": source_id,
                "classification": data["classification_result"],
                "content_hash": data.get("content_hash"),
                "processing_metadata": dict(data.get("processing_metadata") or {}),
            }
        return cls(
            source_id=source_id,
            status=data["status"],
            conversation_data=conversation_data,
            reason=str(data.get("reason", "")),
            error_type=str(data.get("error_type", "")),
            retry_count=int(data.get("retry_count", 0)),
            failed_at=str(data.get("failed_at", "")),
            result=result,
        )


def journal_key(source_id: Any) -> str:
    return json_util.dumps(source_id, json_options=_KEY_OPTIONS)


class RetryQueue:
    """The retry queue of one batch: :meth:`put`, :meth:`update` and :meth:`remove` append the
    change to ``path`` (fsynced) before they return; the entries in memory are the file's, replayed.

    The folder lock makes this process the only writer, so what it replayed stays the truth.
    """

    def __init__(self, path: Path, legacy_path: Path | None = None) -> None:
        self.path = path
        self.legacy_path = legacy_path
        self._live: dict[str, RetryEntry] = {}
        self._sizes: dict[str, int] = {}
        self.journal_bytes = 0

    # --- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __iter__(self) -> Iterator[RetryEntry]:
        return iter(list(self._live.values()))

    def get(self, source_id: Any) -> RetryEntry | None:
        return self._live.get(journal_key(source_id))

    def entries(self) -> list[RetryEntry]:
        return list(self._live.values())

    @property
    def live_bytes(self) -> int:
        return sum(self._sizes.values())

    def load(self) -> list[str]:
        """Replay the journal (or a legacy JSON list); returns what was wrong with it, if anything.
        A file of an older form is rewritten in today's form."""
        problems: list[str] = []
        old_form = False
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
            records: dict[str, dict[str, Any]] = {}
            for number, line in enumerate(lines, 1):
                try:
                    op = json_util.loads(line.decode("utf-8"), json_options=JSON_OPTIONS)
                    old_form = _replay(records, op) or old_form
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    problems.append(f"line {number} is unreadable ({type(e).__name__}: {e})")
                else:
                    self._sizes[_op_key(op)] = self._sizes.get(_op_key(op), 0) + len(line) + 1
            for key, record in records.items():
                try:
                    self._live[key] = RetryEntry.from_json(record).stored()
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    problems.append(f"the entry of {key} is unreadable ({type(e).__name__}: {e})")
            self._sizes = {key: self._sizes.get(key, 0) for key in self._live}
            if self.legacy_path is not None and self.legacy_path.exists():
                # A crash between writing the journal and removing the legacy list: the journal is newer.
                self.legacy_path.unlink()
        elif self.legacy_path is not None and self.legacy_path.exists():
            data = read_json(self.legacy_path)
            if not isinstance(data, list):
                raise BatchFileError(f"Retry queue {self.legacy_path} must hold a JSON list.")
            try:
                for item in data:
                    entry = RetryEntry.from_json(item).stored()
                    self._live[journal_key(entry.source_id)] = entry
            except (KeyError, TypeError, AttributeError) as e:
                raise BatchFileError(f"Retry queue {self.legacy_path} is not in the expected format: {e}") from e
            old_form = True
        if old_form and not problems:
            self.compact()
        return problems

    # --- changing -----------------------------------------------------------------------
    def put(self, entry: RetryEntry) -> None:
        """Queue ``entry`` (replacing the entry of its conversation, which moves to the end)."""
        entry = entry.stored()
        self._write([{"op": "put", "entry": entry.to_json()}], [entry])

    def update(self, entry: RetryEntry) -> None:
        """Record what changed in a queued entry (retry count, reason, status, a result): one ``set``."""
        entry = entry.stored()
        old = self._live.get(journal_key(entry.source_id))
        if old is None:
            self.put(entry)
            return
        changed = {f.name: getattr(entry, f.name) for f in fields(entry)
                   if getattr(entry, f.name) != getattr(old, f.name)}
        if changed:
            self._write([{"op": "set", "source_id": entry.source_id, "fields": changed}], [entry])

    def remove(self, source_id: Any) -> None:
        """Take a conversation out of the queue (resolved); the file goes with the last entry."""
        self.remove_all([source_id])

    def remove_all(self, source_ids: Iterable[Any]) -> None:
        ops = [{"op": "remove", "source_id": source_id} for source_id in source_ids
               if journal_key(source_id) in self._live]
        self._write(ops, [])

    def _write(self, ops: list[dict[str, Any]], entries: list[RetryEntry]) -> None:
        """Append ``ops`` (fsynced), then apply them (``entries``: the new values of put and set);
        compact when the dead lines dominate."""
        if not ops:
            return
        lines = [(dumps_json(self.path, op) + "\n").encode("utf-8") for op in ops]
        new_file = not self.path.exists()
        try:
            with open(self.path, "ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise BatchFileError(f"Cannot write {self.path}: {e}", hint="Check free disk space and permissions.") from e
        if new_file:
            fsync_directory(self.path.parent)
        values = iter(entries)
        for op, line in zip(ops, lines, strict=True):
            key = _op_key(op)
            if op["op"] == "remove":
                self._live.pop(key, None)
                self._sizes.pop(key, None)
                continue
            if op["op"] == "put":
                self._live.pop(key, None)  # a put moves the entry to the end
                self._sizes[key] = 0
            self._live[key] = next(values)
            self._sizes[key] += len(line)
        self.journal_bytes += sum(len(line) for line in lines)
        if not self._live:
            self.delete()
        elif self.journal_bytes > 2 * self.live_bytes + JOURNAL_COMPACT_SLACK_BYTES:
            self.compact()

    def compact(self) -> None:
        """Rewrite the journal atomically with one ``put`` line per live entry (the legacy list goes)."""
        if not self._live:
            self.delete()
            return
        lines = [dumps_json(self.path, {"op": "put", "entry": entry.to_json()}) + "\n" for entry in self._live.values()]
        atomic_write_text(self.path, "".join(lines))
        self._sizes = {key: len(line.encode("utf-8")) for key, line in zip(self._live, lines, strict=True)}
        self.journal_bytes = sum(self._sizes.values())
        if self.legacy_path is not None and self.legacy_path.exists():
            self.legacy_path.unlink()
            fsync_directory(self.path.parent)

    def delete(self) -> None:
        """Forget every entry and remove the file (and a legacy list)."""
        self._live.clear()
        self._sizes.clear()
        self.journal_bytes = 0
        for path in (self.path, self.legacy_path):
            if path is not None:
                path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)


def _op_key(op: dict[str, Any]) -> str:
    if op["op"] == "put":
        entry = op["entry"]
        return journal_key(entry["source_id"] if "source_id" in entry else entry["conversation_id"])
    return journal_key(op["source_id"] if "source_id" in op else op["conversation_id"])


def _replay(records: dict[str, dict[str, Any]], op: dict[str, Any]) -> bool:
    """Apply one journal line to the stored records; True when it is of an older form."""
    kind = op["op"]
    key = _op_key(op)
    if kind == "put":
        entry = op["entry"]
        if not isinstance(entry, dict) or "status" not in entry:
            raise ValueError("a put without an entry")
        records.pop(key, None)
        records[key] = entry
        return any(name in entry for name in _OLD_FIELDS)
    if kind == "set":
        records[key] = {**records[key], **op["fields"]}
        return "conversation_id" in op or any(name in op["fields"] for name in _OLD_FIELDS)
    if kind == "remove":
        records.pop(key, None)
        return "conversation_id" in op
    raise ValueError(f"unknown journal operation {kind!r}")
