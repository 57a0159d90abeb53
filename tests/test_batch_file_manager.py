"""Unit tests of utils/batch_file_manager.py: batch files, checkpoint, lock (retry queues: test_retry_queue.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId

from error_handler import EXIT_CONFIG, BatchFileError, BatchFolderError
from utils.atomic_files import atomic_write_json, read_json
from utils.batch_file_manager import (
    BatchConversation,
    BatchFileManager,
    Checkpoint,
    PendingBatch,
)

ROOT = Path(__file__).resolve().parents[1]

# BSON dates (and so Extended JSON) keep milliseconds: test values are millisecond-precise.
PROCESSED_AT = datetime(2025, 9, 24, 10, 30, 0, 123000, tzinfo=UTC)


def _temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".tmp"))


def _conversation(oid: str, number: int) -> BatchConversation:
    return BatchConversation(
        oid,
        {"conversation_number": str(number), "tweets": [{"tweet_id": number, "inbound": True, "text": "hi"}]},
        created_at="2025-09-24T10:30:00Z",
    )



# --- pending batches --------------------------------------------------------------------------


def test_pending_batch_round_trip_and_file_layout(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path / "batch_files")
    files.prepare()
    first, middle, last = (str(ObjectId()) for _ in range(3))
    batch = PendingBatch(1, "batch_20250924_103000", [_conversation(first, 1), _conversation(middle, 2),
                                                       _conversation(last, 3)])
    path = files.write_pending(batch)

    assert path == tmp_path / "batch_files" / "batch_001_pending.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    # The pending file's fields (docs/architecture.md#batch-files).
    assert {"batch_id", "created_at", "first_object_id", "last_object_id", "conversation_count",
            "conversations"} <= raw.keys()
    assert raw["batch_id"] == "batch_001"
    assert raw["first_object_id"] == first
    assert raw["last_object_id"] == last
    assert raw["conversation_count"] == 3
    assert datetime.fromisoformat(raw["created_at"].replace("Z", "+00:00"))
    assert [set(c) for c in raw["conversations"]] == [{"_id", "conversation_data", "created_at"}] * 3
    assert raw["conversations"][0]["_id"] == first
    assert raw["conversations"][0]["conversation_data"]["conversation_number"] == "1"

    loaded = files.load_pending(1)
    assert loaded == batch
    assert loaded.batch_id == "batch_001"
    assert loaded.conversations[0].source_id == first


def test_next_batch_number_continues_after_any_kind_of_batch_file(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    assert files.next_batch_number() == 1
    (tmp_path / "batch_001_completed.json").write_text("{}")
    assert files.next_batch_number() == 2
    (tmp_path / "batch_007_retry_queue.json").write_text("[]")
    assert files.next_batch_number() == 8
    (tmp_path / "batch_999_pending.json").write_text("{}")
    assert files.next_batch_number() == 1000
    # Names that are not batch files are ignored.
    (tmp_path / "batch_5000_notes.json").write_text("{}")
    (tmp_path / "batch_abc_pending.json").write_text("{}")
    (tmp_path / "checkpoint.json").write_text("{}")
    assert files.next_batch_number() == 1000


def test_batch_numbers_go_past_999_and_sort_numerically(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    for number in (1000, 999, 10, 2):
        files.write_pending(PendingBatch(number, "job", [_conversation(str(ObjectId()), number)]))
    assert (tmp_path / "batch_1000_pending.json").exists()
    assert files.pending_numbers() == [2, 10, 999, 1000]
    assert files.next_batch_number() == 1001
    assert files.load_pending(1000).batch_id == "batch_1000"


def test_mark_completed_writes_the_marker_and_removes_the_pending_file(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    files.write_pending(PendingBatch(3, "job", [_conversation(str(ObjectId()), 1)]))
    files.mark_completed(3, {"successful": 1, "failed": 0})
    assert not (tmp_path / "batch_003_pending.json").exists()
    marker = json.loads((tmp_path / "batch_003_completed.json").read_text(encoding="utf-8"))
    assert marker["batch_id"] == "batch_003"
    assert marker["successful"] == 1
    assert "completed_at" in marker
    assert files.pending_numbers() == []
    assert files.next_batch_number() == 4


def test_pending_numbers_removes_pending_files_that_have_a_completed_marker(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    for number in (1, 2, 12):
        files.write_pending(PendingBatch(number, "job", [_conversation(str(ObjectId()), number)]))
    # A crash between writing the marker of batch 2 and removing its pending file.
    atomic_write_json(files.path(2, "completed"), {"batch_id": "batch_002"})
    assert files.pending_numbers() == [1, 12]
    assert not files.path(2, "pending").exists()
    assert files.path(2, "completed").exists()
    assert files.path(1, "pending").exists()


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data[: len(data) // 2]


def test_a_truncated_pending_file_is_quarantined_and_the_others_go_on(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    for number in (1, 2, 3):
        files.write_pending(PendingBatch(number, "job", [_conversation(str(ObjectId()), number)]))
    damaged = _truncate(files.path(2, "pending"))
    assert files.pending_numbers() == [1, 3]
    moved = tmp_path / "quarantine" / "batch_002_pending.json"
    assert moved.read_bytes() == damaged  # kept as it was, never deleted
    assert not files.path(2, "pending").exists()
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "batch_002_pending.json" in warning.message and "quarantine" in warning.message
    assert "--retry-failed" in warning.message
    assert files.load_pending(1).number == 1 and files.load_pending(3).number == 3


def test_loading_a_truncated_pending_file_quarantines_it_with_a_hint(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    path = files.write_pending(PendingBatch(1, "job", [_conversation(str(ObjectId()), 1)]))
    _truncate(path)
    with pytest.raises(BatchFileError) as raised:
        files.load_pending(1)
    assert "batch_001_pending.json" in raised.value.message
    assert "quarantine" in raised.value.message
    assert raised.value.hint is not None and "--retry-failed" in raised.value.hint
    assert (tmp_path / "quarantine" / "batch_001_pending.json").exists()
    # A second damaged file of the same name is kept beside the first.
    path = files.write_pending(PendingBatch(1, "job", [_conversation(str(ObjectId()), 1)]))
    _truncate(path)
    assert files.pending_numbers() == []
    assert len(list((tmp_path / "quarantine").iterdir())) == 2


def test_a_pending_file_changed_after_listing_is_read_again(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    files.write_pending(PendingBatch(1, "job", [_conversation("a", 1)]))
    assert files.pending_numbers() == [1]
    files.write_pending(PendingBatch(1, "job", [_conversation("b", 1), _conversation("c", 2)]))
    assert [c.source_id for c in files.load_pending(1).conversations] == ["b", "c"]


def test_a_damaged_checkpoint_or_target_is_quarantined(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    files.save_checkpoint(Checkpoint("job"))
    _truncate(tmp_path / "checkpoint.json")
    assert files.load_checkpoint() is None
    assert (tmp_path / "quarantine" / "checkpoint.json").exists()
    (tmp_path / "target.json").write_text('{"target": "mongodb://loc')
    files.tie_to("mongodb://localhost:27017 db.a -> b")
    assert (tmp_path / "quarantine" / "target.json").exists()
    assert read_json(tmp_path / "target.json")["target"] == "mongodb://localhost:27017 db.a -> b"
    assert "checkpoint.json" in caplog.text and "target.json" in caplog.text


def test_pending_file_without_conversations_is_a_batch_file_error(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    atomic_write_json(files.path(1, "pending"), {"batch_id": "batch_001"})
    with pytest.raises(BatchFileError) as raised:
        files.load_pending(1)
    assert "batch_001_pending.json" in raised.value.message


# --- checkpoint -------------------------------------------------------------------------------


def test_checkpoint_save_and_load(tmp_path: Path) -> None:
    files = BatchFileManager(tmp_path)
    files.prepare()
    assert files.load_checkpoint() is None
    checkpoint = Checkpoint(job_id="batch_20250924_103000", conversations_resolved=50, updated_at="")
    files.save_checkpoint(checkpoint)
    loaded = files.load_checkpoint()
    assert loaded is not None
    assert loaded.job_id == "batch_20250924_103000"
    assert loaded.conversations_resolved == 50
    assert loaded.updated_at  # stamped on save
    assert loaded == checkpoint
    # A checkpoint of an earlier version (with the last _id read, never used to read) still loads.
    (tmp_path / "checkpoint.json").write_text('{"last_object_id": "abc", "job_id": "old", "conversations_resolved": 7}')
    assert files.load_checkpoint() == Checkpoint("old", 7, "")


# --- folder: prepare and lock -----------------------------------------------------------------


def test_lock_creates_the_folder_and_removes_leftover_temp_files(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "batch_files"
    files = BatchFileManager(folder)
    files.prepare()
    assert folder.is_dir()
    (folder / ".batch_001_pending.json.4242.tmp").write_text("{ half")
    (folder / ".checkpoint.json.17.tmp").write_text("")
    (folder / "batch_001_pending.json").write_text("{}")
    (folder / "notes.tmp").write_text("not ours")
    files.prepare()  # not locked: nothing removed (the files may be a running processor's)
    assert len(list(folder.iterdir())) == 4
    with files.locked():
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "batch_001_pending.json", "notes.tmp"]


def test_a_refused_second_processor_leaves_the_running_ones_temporary_files(tmp_path: Path) -> None:
    folder = tmp_path / "batch_files"
    with BatchFileManager(folder).locked():
        in_progress = folder / f".batch_002_pending.json.{os.getpid()}.tmp"
        in_progress.write_text('{"being": "written"}')
        with pytest.raises(BatchFileError):
            BatchFileManager(folder).lock()
        assert in_progress.read_text() == '{"being": "written"}'


def test_locked_releases_the_folder_on_leaving_the_block(tmp_path: Path) -> None:
    folder = tmp_path / "batch_files"
    with pytest.raises(RuntimeError), BatchFileManager(folder).locked():
        raise RuntimeError("boom")
    with BatchFileManager(folder).locked() as files:
        assert files.directory == folder


def test_a_folder_that_cannot_be_created_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(BatchFolderError) as raised:
        BatchFileManager(tmp_path / "a_file" / "batch_files").lock()
    assert raised.value.exit_code == EXIT_CONFIG
    assert "a_file/batch_files" in raised.value.message and "BATCH_FILES_DIR" in str(raised.value.hint)


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: a chmod 555 folder, or for root (who ignores the mode)
    sysfs, which refuses new files to everyone."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_a_read_only_folder_is_a_configuration_error(tmp_path: Path) -> None:
    folder = _read_only_folder(tmp_path)
    with pytest.raises(BatchFolderError) as raised:
        BatchFileManager(folder).lock()
    assert raised.value.exit_code == EXIT_CONFIG
    assert f"{folder} is not writable" in raised.value.message


def test_a_second_manager_cannot_lock_the_same_folder_until_unlocked(tmp_path: Path) -> None:
    # flock locks belong to an open file description: two managers in one process do conflict.
    first = BatchFileManager(tmp_path / "batch_files")
    second = BatchFileManager(tmp_path / "batch_files")
    first.lock()
    try:
        with pytest.raises(BatchFileError) as raised:
            second.lock()
        assert f"pid {os.getpid()}" in raised.value.message
        assert raised.value.hint is not None
    finally:
        first.unlock()
    second.lock()
    try:
        third = BatchFileManager(tmp_path / "batch_files")
        with pytest.raises(BatchFileError):
            third.lock()
    finally:
        second.unlock()


def test_lock_held_by_another_process_names_its_pid(tmp_path: Path) -> None:
    folder = tmp_path / "batch_files"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from utils.batch_file_manager import BatchFileManager;"
         "m = BatchFileManager(Path(sys.argv[1])); m.lock(); print('locked', flush=True);"
         "sys.stdin.readline(); m.unlock()",
         str(folder)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        files = BatchFileManager(folder)
        with pytest.raises(BatchFileError) as raised:
            files.lock()
        assert f"pid {holder.pid}" in raised.value.message
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        files.lock()  # released by the other process
        files.unlock()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
