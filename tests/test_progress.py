"""Unit tests of utils/progress.py: the tracker, the monitoring modes and the three reporters."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from utils.progress import (
    ConsoleProgressReporter,
    ProgressFileReporter,
    ProgressReporter,
    ProgressSnapshot,
    ProgressTracker,
    StructuredProgressLogger,
    build_progress,
    monitoring_components,
)

# The design's progress file schema (docs/architecture.md#progress-and-monitoring) ...
DESIGN_FIELDS = {
    "job_id", "status", "start_time", "total_conversations", "processed", "successful", "failed",
    "current_rate", "estimated_completion", "percentage_complete",
}
# ... plus our additions.
SNAPSHOT_FIELDS = DESIGN_FIELDS | {"queued_for_retry", "already_classified", "elapsed_seconds", "skipped",
                                   "lost_claims"}


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tracker(clock: FakeClock, total: int = 10) -> ProgressTracker:
    """A tracker with 3 successful, 1 failed and 1 queued conversations, all 10 s after the start."""
    tracker = ProgressTracker("batch_20250924_103000", total, clock=clock)
    clock.now += 10
    for _ in range(3):
        tracker.record_success()
    tracker.record_failed()
    tracker.record_queued()
    return tracker


# --- ProgressTracker --------------------------------------------------------------------------


def test_counts_and_processed() -> None:
    tracker = _tracker(FakeClock())
    assert (tracker.successful, tracker.failed, tracker.queued_for_retry) == (3, 1, 1)
    assert tracker.processed == 5
    tracker.record_already_classified(4)
    assert tracker.already_classified == 4
    assert tracker.processed == 5  # skipped conversations are not processed by this job
    tracker.add_total(5)
    assert tracker.total == 15


def test_rate_is_over_the_last_60_seconds() -> None:
    clock = FakeClock()
    tracker = _tracker(clock)  # 5 completions at start + 10 s
    assert tracker.rate() == pytest.approx(5 / 10)  # less than a minute since the start
    clock.now += 60  # the completions are exactly 60 s old: still in the window
    assert tracker.rate() == pytest.approx(5 / 60)
    clock.now += 1  # now they are out of the window
    assert tracker.rate() == 0.0
    tracker.record_success()
    tracker.record_success()
    assert tracker.rate() == pytest.approx(2 / 60)


def test_snapshot_has_the_design_schema_and_our_additions() -> None:
    clock = FakeClock()
    tracker = _tracker(clock)
    tracker.record_already_classified(2)
    snapshot = tracker.snapshot()
    data = asdict(snapshot)
    assert set(data) == SNAPSHOT_FIELDS
    assert data["job_id"] == "batch_20250924_103000"
    assert data["status"] == "running"
    assert data["total_conversations"] == 10
    assert (data["processed"], data["successful"], data["failed"]) == (5, 3, 1)
    assert data["queued_for_retry"] == 1
    assert data["already_classified"] == 2
    assert data["current_rate"] == 0.5
    assert data["percentage_complete"] == 50.0
    assert data["elapsed_seconds"] == 10.0
    start = datetime.fromisoformat(data["start_time"])
    assert abs(datetime.now(UTC) - start) < timedelta(minutes=1)


def test_eta_while_running_is_remaining_over_rate() -> None:
    clock = FakeClock()
    tracker = _tracker(clock)  # 5 remaining at 0.5/s: about 10 s from now
    before = datetime.now(UTC)
    eta_text = tracker.snapshot().estimated_completion
    after = datetime.now(UTC)
    assert eta_text is not None
    eta = datetime.fromisoformat(eta_text)
    # isoformat(timespec="seconds") drops the fraction: allow one second.
    assert before + timedelta(seconds=9) <= eta <= after + timedelta(seconds=10)


def test_no_eta_without_a_rate_or_once_done() -> None:
    clock = FakeClock()
    tracker = ProgressTracker("job", 10, clock=clock)
    assert tracker.snapshot().estimated_completion is None  # nothing resolved yet
    assert tracker.snapshot().percentage_complete == 0.0
    clock.now += 5
    tracker.record_success()
    assert tracker.snapshot().estimated_completion is not None
    tracker.status = "completed"
    snapshot = tracker.snapshot()
    assert snapshot.estimated_completion is None
    assert snapshot.percentage_complete == 10.0


def test_percentage_of_an_empty_job() -> None:
    tracker = ProgressTracker("job", 0, clock=FakeClock())
    assert tracker.snapshot().percentage_complete == 0.0
    tracker.status = "completed"
    assert tracker.snapshot().percentage_complete == 100.0


def test_record_requeue_resolved_moves_a_queued_conversation() -> None:
    tracker = _tracker(FakeClock())
    tracker.record_queued()
    assert tracker.queued_for_retry == 2
    tracker.record_requeue_resolved(True)
    assert (tracker.successful, tracker.failed, tracker.queued_for_retry) == (4, 1, 1)
    tracker.record_requeue_resolved(False)
    assert (tracker.successful, tracker.failed, tracker.queued_for_retry) == (4, 2, 0)
    assert tracker.processed == 6  # unchanged by the moves


# --- monitoring modes -------------------------------------------------------------------------


def test_monitoring_components_of_each_mode() -> None:
    assert monitoring_components("development") == {"console"}
    assert monitoring_components("production") == {"logs", "files"}
    assert monitoring_components("interactive") == {"console", "logs"}


def test_monitoring_flags_add_components() -> None:
    assert monitoring_components("development", files=True) == {"console", "files"}
    assert monitoring_components("production", console=True) == {"console", "logs", "files"}
    assert monitoring_components("interactive", logs=True) == {"console", "logs"}
    assert monitoring_components("development", console=True, logs=True, files=True) == {"console", "logs", "files"}
    # Adding a flag does not change the mode for later calls.
    assert monitoring_components("development") == {"console"}


def test_unknown_monitoring_mode_is_refused() -> None:
    with pytest.raises(KeyError):
        monitoring_components("verbose")


# --- ProgressFileReporter ---------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def test_progress_files_are_written_throttled_and_closed(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = _tracker(clock)
    reporter = ProgressFileReporter(tmp_path, tracker.job_id, interval=1.0, clock=clock)
    json_path = tmp_path / "progress_batch_20250924_103000.json"
    csv_path = tmp_path / "progress_batch_20250924_103000.csv"
    assert (reporter.json_path, reporter.csv_path) == (json_path, csv_path)
    try:
        reporter.update(tracker.snapshot())
        data = json.loads(json_path.read_text(encoding="utf-8"))
        assert set(data) == SNAPSHOT_FIELDS
        assert data["processed"] == 5
        assert data["status"] == "running"

        clock.now += 0.5  # within the interval: no write
        tracker.record_success()
        reporter.update(tracker.snapshot())
        assert json.loads(json_path.read_text(encoding="utf-8"))["processed"] == 5
        assert len(_read_csv(csv_path)[1]) == 1

        clock.now += 0.5  # the interval has passed
        reporter.update(tracker.snapshot())
        assert json.loads(json_path.read_text(encoding="utf-8"))["processed"] == 6
    finally:
        tracker.status = "completed"
        reporter.close(tracker.snapshot())

    assert reporter._csv_file.closed
    final = json.loads(json_path.read_text(encoding="utf-8"))
    assert final["status"] == "completed"
    assert final["estimated_completion"] is None
    header, rows = _read_csv(csv_path)
    assert set(header) == SNAPSHOT_FIELDS
    assert [row["processed"] for row in rows] == ["5", "6", "6"]
    assert [row["status"] for row in rows] == ["running", "running", "completed"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_progress_csv_is_appended_without_a_second_header(tmp_path: Path) -> None:
    clock = FakeClock()
    tracker = _tracker(clock)
    for _ in range(2):
        reporter = ProgressFileReporter(tmp_path, "job", clock=clock)
        reporter.close(tracker.snapshot())
    lines = (tmp_path / "progress_job.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("job_id,")
    assert not lines[2].startswith("job_id,")


# --- StructuredProgressLogger -----------------------------------------------------------------


def _progress_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "utils.progress"]


def test_structured_logger_logs_at_the_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    tracker = _tracker(clock)
    progress_log = StructuredProgressLogger(interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="utils.progress"):
        progress_log.update(tracker.snapshot())  # just created: nothing yet
        clock.now += 9.9
        progress_log.update(tracker.snapshot())
        assert _progress_messages(caplog) == []
        clock.now += 0.1
        progress_log.update(tracker.snapshot())
        assert len(_progress_messages(caplog)) == 1
        clock.now += 5
        progress_log.update(tracker.snapshot())
        assert len(_progress_messages(caplog)) == 1
        tracker.status = "completed"
        progress_log.close(tracker.snapshot())
    messages = _progress_messages(caplog)
    assert len(messages) == 2
    assert "batch_20250924_103000" in messages[0]
    assert "5/10" in messages[0]
    assert "3 successful" in messages[0]
    assert "1 failed" in messages[0]
    assert "1 queued for retry" in messages[0]
    assert "completed" in messages[1]


# --- ConsoleProgressReporter ------------------------------------------------------------------


def test_console_reporter_renders_counts_and_rate() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=False, width=200)
    tracker = _tracker(FakeClock())
    reporter = ConsoleProgressReporter(console)
    reporter.update(tracker.snapshot())
    tracker.status = "completed"
    reporter.close(tracker.snapshot())
    text = output.getvalue()
    assert "Success: 3" in text
    assert "Failed: 1" in text
    assert "5/10" in text
    assert "Rate: 0.50/s" in text
    assert "50%" in text


# --- ProgressReporter -------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail_on_close: bool = False) -> None:
        self.updates: list[ProgressSnapshot] = []
        self.closed: list[ProgressSnapshot] = []
        self.fail_on_close = fail_on_close

    def update(self, snapshot: ProgressSnapshot) -> None:
        self.updates.append(snapshot)

    def close(self, snapshot: ProgressSnapshot) -> None:
        if self.fail_on_close:
            raise OSError("disk full")
        self.closed.append(snapshot)


def test_progress_reporter_throttles_refreshes_unless_forced() -> None:
    tracker = _tracker(FakeClock())
    recorder = Recorder()
    progress = ProgressReporter(tracker, [recorder], min_interval=1000.0)
    progress.refresh()
    progress.refresh()
    assert len(recorder.updates) == 1
    progress.refresh(force=True)
    assert len(recorder.updates) == 2


def test_a_failing_reporter_does_not_hide_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    tracker = _tracker(FakeClock())
    failing, healthy = Recorder(fail_on_close=True), Recorder()
    progress = ProgressReporter(tracker, [failing, healthy])
    with caplog.at_level(logging.ERROR, logger="utils.progress"):
        progress.finish("completed")
        snapshot = progress.close()
    assert snapshot.status == "completed"
    assert healthy.closed == [snapshot]
    assert any("Recorder" in message for message in _progress_messages(caplog))


def test_the_owner_closes_the_reporters_with_the_outcome_the_job_recorded() -> None:
    recorder = Recorder()
    with ProgressReporter(_tracker(FakeClock()), [recorder]) as progress:
        snapshot = progress.finish("stopped")
        assert recorder.closed == []  # finishing is not closing: the owner's block does that
    assert recorder.closed == [snapshot]
    assert snapshot.status == "stopped"
    assert progress.close() == snapshot  # once only
    progress.refresh(force=True)
    assert recorder.closed == [snapshot] and recorder.updates == []


async def test_async_with_closes_the_reporters_even_when_the_job_breaks() -> None:
    recorder = Recorder()
    with pytest.raises(RuntimeError):
        async with ProgressReporter(_tracker(FakeClock()), [recorder]):
            raise RuntimeError("MongoDB lost")
    [snapshot] = recorder.closed
    assert snapshot.status == "failed"


def test_a_progress_csv_is_closed_by_the_owners_block(tmp_path: Path) -> None:
    with build_progress(_tracker(FakeClock()), {"files"}, tmp_path) as progress:
        [reporter] = progress.reporters
        assert isinstance(reporter, ProgressFileReporter)
        progress.finish("completed")
    assert reporter._csv_file.closed
    assert json.loads(reporter.json_path.read_text())["status"] == "completed"
