"""Unit tests of utils/retry_queue.py (the retry queue is its journal) and of how the batch files
folder finds, reads and sets aside a queue's file (utils/batch_file_manager.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId, json_util

from mongo_client import ProcessingMetadata, ResultDocument
from utils.atomic_files import atomic_write_json
from utils.batch_file_manager import BatchConversation, BatchFileManager, PendingBatch
from utils.retry_queue import RetryEntry, RetryQueue

# BSON dates (and so Extended JSON) keep milliseconds: test values are millisecond-precise.
PROCESSED_AT = datetime(2025, 9, 24, 10, 30, 0, 123000, tzinfo=UTC)
CLASSIFICATION = {"intent": "Complaint", "topic": "Service Quality", "sentiment": "Negative",
                  "categorization": "refund request"}


def _llm_failed(source_id: Any) -> RetryEntry:
    return RetryEntry(
        source_id=source_id,
        status="llm_failed",
        conversation_data={"conversation_number": "1", "tweets": [{"text": "help"}]},
        reason="Ollama did not answer within 120 s",
        error_type="llm_timeout",
        retry_count=1,
    )


def _result(source_id: Any) -> ResultDocument:
    metadata = ProcessingMetadata(PROCESSED_AT, "llama3", 45000, "1.1.0", "batch_20250924_103000")
    return ResultDocument("2", source_id, CLASSIFICATION, "sha256:abc", metadata, 3)


def _write_failed(source_id: Any) -> RetryEntry:
    return RetryEntry(
        source_id=source_id,
        status="write_failed",
        conversation_data={"conversation_number": "2", "tweets": [{"text": "refund"}]},
        reason="MongoDB result write failed",
        error_type="storage_unavailable",
        result=_result(source_id).to_mongo(),
    )


def _queue(tmp_path: Path, number: int = 1) -> RetryQueue:
    files = BatchFileManager(tmp_path)
    files.prepare()
    return files.retry_queue(number)


def _reread(tmp_path: Path, number: int = 1) -> list[RetryEntry]:
    return BatchFileManager(tmp_path).retry_queue(number).entries()


def _journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the queue is its journal -----------------------------------------------------------------


def test_a_write_failed_entry_keeps_its_result_document_and_not_the_conversation(tmp_path: Path) -> None:
    queue = _queue(tmp_path, 4)
    entries = [_llm_failed(ObjectId()), _write_failed(ObjectId())]
    for entry in entries:
        queue.put(entry)

    lines = _journal_lines(tmp_path / "batch_004_retry_queue.jsonl")
    assert [line["op"] for line in lines] == ["put", "put"]
    raw = [line["entry"] for line in lines]
    assert raw[0]["status"] == "llm_failed" and raw[0]["result"] is None
    assert raw[0]["conversation_data"] == entries[0].conversation_data
    assert raw[1]["status"] == "write_failed"
    assert raw[1]["conversation_data"] == {"conversation_number": "2"}  # the result is what the retry writes
    for entry in raw:
        assert {"source_id", "status", "result", "conversation_data", "retry_count", "failed_at"} <= entry.keys()

    for loaded in (queue.entries(), _reread(tmp_path, 4)):  # from memory, and from the file
        assert loaded[0] == entries[0]
        assert isinstance(loaded[0].source_id, ObjectId)
        result = ResultDocument.from_mongo(loaded[1].result or {})
        assert result == _result(entries[1].source_id)  # the whole document, its dates and ids typed
        assert isinstance(result.processing_metadata.processed_at, datetime)


def test_put_update_and_remove_each_append_one_line_and_replay(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    a, b, c = _llm_failed("a"), _llm_failed("b"), _write_failed("c")
    queue.put(a)
    queue.put(b)
    queue.update(replace(b, retry_count=2, reason="still down"))
    queue.put(c)
    queue.remove("a")
    queue.update(replace(c))  # nothing changed: nothing written
    queue.remove("nobody")  # not queued: nothing written
    lines = _journal_lines(queue.path)
    assert [line["op"] for line in lines] == ["put", "put", "set", "put", "remove"]
    assert lines[2] == {"op": "set", "source_id": "b", "fields": {"retry_count": 2, "reason": "still down"}}
    assert [(e.source_id, e.retry_count) for e in _reread(tmp_path)] == [("b", 2), ("c", 0)]
    assert len(queue) == 2 and queue.get("b") == replace(b, retry_count=2, reason="still down")

    queue.remove_all(["b", "c"])
    assert not queue.path.exists() and not queue
    assert BatchFileManager(tmp_path).retry_queue_numbers() == []


def test_a_long_reason_is_cut(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queue.put(replace(_llm_failed("a"), reason="x" * 5000))
    assert len(_reread(tmp_path)[0].reason) == 2000


def _bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux /proc accounting)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_a_growing_retry_queue_writes_bytes_in_proportion_to_its_changes(tmp_path: Path) -> None:
    # Regression: the queue was rewritten whole on each change; 300 failures of 4 KB wrote ~200 MB.
    queue = _queue(tmp_path)
    start = _bytes_written()
    for i in range(300):
        queue.put(replace(_llm_failed(f"conversation-{i}"),
                          conversation_data={"conversation_number": str(i), "tweets": [{"text": "x" * 4096}]}))
    for entry in queue:  # a retry pass counts a failed attempt for each
        queue.update(replace(entry, retry_count=entry.retry_count + 1))
    for entry in queue:  # then they are resolved one by one
        queue.remove(entry.source_id)
    written = _bytes_written() - start
    payload = 300 * 4096
    assert written < 4 * payload, f"{written} bytes written for {payload} bytes of queued conversations"
    assert not queue.path.exists()


def test_the_journal_is_compacted_when_dead_lines_dominate(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queue.put(_llm_failed("keep"))
    for i in range(200):
        queue.put(replace(_llm_failed(f"gone-{i}"),
                          conversation_data={"conversation_number": str(i), "tweets": [{"text": "y" * 2048}]}))
        queue.remove(f"gone-{i}")
    assert queue.path.stat().st_size < 2 * 2048 + 64 * 1024 + 4096  # not 200 dead entries
    assert [e.source_id for e in _reread(tmp_path)] == ["keep"]


# --- crash safety: what a crash or damage leaves ---------------------------------------------------


def test_a_retry_queue_with_a_torn_last_line_keeps_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    queue = _queue(tmp_path)
    queue.put(_llm_failed("a"))
    queue.put(_write_failed("b"))
    with open(queue.path, "ab") as f:
        f.write(b'{"op": "put", "entry": {"source_id": "c", "sta')  # a crash mid-append
    original = queue.path.read_bytes()
    reader = BatchFileManager(tmp_path)
    assert [e.source_id for e in reader.retry_queue(1)] == ["a", "b"]
    assert (tmp_path / "quarantine" / queue.path.name).read_bytes() == original
    assert "cut short" in caplog.text and queue.path.name in caplog.text
    reader.retry_queue(1).put(_llm_failed("d"))  # appends after a clean line again
    assert [e.source_id for e in _reread(tmp_path)] == ["a", "b", "d"]


def test_a_journal_whose_entries_were_all_resolved_is_removed_on_reading(tmp_path: Path) -> None:
    path = tmp_path / "batch_001_retry_queue.jsonl"
    path.write_text(json.dumps({"op": "put", "entry": _llm_failed("a").to_json()}) + "\n"
                    '{"op": "remove", "source_id": "a"}\n')  # a crash before the last resolve removed it
    assert BatchFileManager(tmp_path).retry_queue_numbers() == []
    assert not path.exists()


def test_a_retry_queue_with_a_damaged_line_keeps_the_readable_entries(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    for name in "abc":
        queue.put(_llm_failed(name))
    lines = queue.path.read_bytes().split(b"\n")
    lines[1] = b"\x00garbage"
    queue.path.write_bytes(b"\n".join(lines))
    reader = BatchFileManager(tmp_path)
    assert reader.retry_queue_numbers() == [1]
    assert [e.source_id for e in reader.retry_queue(1)] == ["a", "c"]
    assert (tmp_path / "quarantine" / queue.path.name).exists()


# --- files of earlier versions ---------------------------------------------------------------------


def _old_entry(source_id: Any, **fields: Any) -> dict[str, Any]:
    """An entry as versions before 1.2 wrote it: the id as conversation_id, a paid classification in three fields."""
    return {"conversation_id": source_id, "status": "llm_failed", "reason": "r", "error_type": "llm_timeout",
            "conversation_data": {"conversation_number": "7", "tweets": [{"text": "hi"}]},
            "classification_result": None, "processing_metadata": None, "retry_count": 0,
            "failed_at": "2025-09-24T10:30:00Z", "content_hash": None, **fields}


def test_a_journal_of_an_earlier_version_loads_and_is_rewritten(tmp_path: Path) -> None:
    paid = {"classification_result": CLASSIFICATION, "content_hash": "sha256:abc", "status": "write_failed",
            "processing_metadata": {"processed_at": PROCESSED_AT, "model_used": "llama3"}}
    path = tmp_path / "batch_001_retry_queue.jsonl"
    lines = [{"op": "put", "entry": _old_entry("a")}, {"op": "put", "entry": _old_entry(7)},
             {"op": "set", "conversation_id": 7, "fields": {**paid, "retry_count": 1}},
             {"op": "put", "entry": _old_entry("gone")}, {"op": "remove", "conversation_id": "gone"}]
    path.write_text("".join(json_util.dumps(line) + "\n" for line in lines))

    entries = BatchFileManager(tmp_path).retry_queue(1).entries()

    assert [(e.source_id, e.status, e.retry_count) for e in entries] == [("a", "llm_failed", 0),
                                                                         (7, "write_failed", 1)]
    assert entries[0].result is None
    assert entries[0].conversation_data["tweets"] == [{"text": "hi"}]
    result = entries[1].result or {}
    assert (result["source_conversation_id"], result["conversation_number"]) == (7, "7")
    assert (result["classification"], result["content_hash"]) == (CLASSIFICATION, "sha256:abc")
    assert result["processing_metadata"]["processed_at"] == PROCESSED_AT
    assert entries[1].conversation_data == {"conversation_number": "7"}
    # Rewritten in today's form at once: one put per entry, no old field names left.
    assert [line["op"] for line in _journal_lines(path)] == ["put", "put"]
    assert '"conversation_id"' not in path.read_text() and "classification_result" not in path.read_text()
    assert _reread(tmp_path) == entries


def test_a_legacy_retry_queue_list_is_read_and_migrated(tmp_path: Path) -> None:
    legacy = tmp_path / "batch_002_retry_queue.json"
    atomic_write_json(legacy, [_old_entry("a"), _old_entry("b", status="write_failed",
                                                            classification_result=CLASSIFICATION)])
    files = BatchFileManager(tmp_path)
    assert files.retry_queue_numbers() == [2]
    assert [e.source_id for e in files.retry_queue(2)] == ["a", "b"]
    assert not legacy.exists()  # rewritten as a journal when read
    assert [e.source_id for e in _reread(tmp_path, 2)] == ["a", "b"]
    assert (_reread(tmp_path, 2)[1].result or {})["classification"] == CLASSIFICATION


def test_an_unreadable_legacy_retry_queue_is_quarantined(tmp_path: Path) -> None:
    legacy = tmp_path / "batch_003_retry_queue.json"
    legacy.write_text('[{"conversation_id": "a", "sta')
    assert BatchFileManager(tmp_path).retry_queue_numbers() == []
    assert (tmp_path / "quarantine" / legacy.name).read_text() == '[{"conversation_id": "a", "sta'


def test_legacy_retry_queue_that_is_not_a_list_is_quarantined(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    atomic_write_json(tmp_path / "batch_001_retry_queue.json", {"conversation_id": "a"})
    assert not BatchFileManager(tmp_path).retry_queue(1)
    assert (tmp_path / "quarantine" / "batch_001_retry_queue.json").exists()
    assert "batch_001_retry_queue.json" in caplog.text and "must hold a JSON list" in caplog.text


def test_retry_queue_numbers(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    files.retry_queue(12).put(_write_failed("c"))
    files.retry_queue(3).put(_llm_failed("a"))
    files.retry_queue(7)  # an empty queue has no file
    files.write_pending(PendingBatch(5, "job", [BatchConversation("d", {"conversation_number": "1"})]))
    assert files.retry_queue_numbers() == [3, 12]
