"""Progress of a batch job (docs/architecture.md#progress-and-monitoring): one tracker, several reporters.

* :class:`ConsoleProgressReporter` - a rich progress bar with success, failed, rate and ETA.
* :class:`StructuredProgressLogger` - a progress log line every ``interval`` seconds and at the end.
* :class:`ProgressFileReporter` - ``progress_<job>.json`` (the design's schema, rewritten
  atomically at most once a second) and ``progress_<job>.csv`` (one row per update)
  in the batch files folder, for external monitoring.

Monitoring modes: ``development`` = console; ``production`` = logs + files;
``interactive`` = console + logs. ``--console``, ``--logs`` and ``--progress-files``
add a component to the mode.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from utils.batch_file_manager import atomic_write_json

logger = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class ProgressSnapshot:
    """The progress file schema of the design, plus the retry-queue, skip and lost-claim counts."""

    job_id: str
    status: str
    start_time: str
    total_conversations: int
    processed: int
    successful: int
    failed: int
    queued_for_retry: int
    already_classified: int
    skipped: int  # no customer turn: nothing to classify (status 'skipped')
    #: Dropped because the claim was no longer this processor's (taken over, or the document reset):
    #: not this job's work, so not in ``processed`` nor the total.
    lost_claims: int
    current_rate: float
    estimated_completion: str | None
    percentage_complete: float
    elapsed_seconds: float


class ProgressTracker:
    """Counts of a job and its rate over the last minute.
    ``processed`` = successful + failed + queued + skipped."""

    def __init__(self, job_id: str, total: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id = job_id
        self.total = total
        self.successful = 0
        self.failed = 0
        self.queued_for_retry = 0
        self.already_classified = 0
        self.skipped = 0
        self.lost_claims = 0
        self.status = "running"
        self._clock = clock
        self._started = clock()
        self._start_wall = datetime.now(UTC)
        self._completions: deque[float] = deque()

    @property
    def processed(self) -> int:
        return self.successful + self.failed + self.queued_for_retry + self.skipped

    def add_total(self, count: int) -> None:
        self.total += count

    def _completed(self) -> None:
        now = self._clock()
        self._completions.append(now)
        while self._completions and self._completions[0] < now - RATE_WINDOW_SECONDS:
            self._completions.popleft()

    def record_success(self) -> None:
        self.successful += 1
        self._completed()

    def record_failed(self) -> None:
        self.failed += 1
        self._completed()

    def record_skipped(self) -> None:
        self.skipped += 1
        self._completed()

    def record_queued(self) -> None:
        self.queued_for_retry += 1
        self._completed()

    def record_requeue_resolved(self, succeeded: bool) -> None:
        """A conversation counted as queued left the queue: now successful or failed."""
        self.queued_for_retry -= 1
        if succeeded:
            self.successful += 1
        else:
            self.failed += 1

    def record_already_classified(self, count: int = 1) -> None:
        self.already_classified += count

    def record_lost_claim(self) -> None:
        self.lost_claims += 1

    def rate(self) -> float:
        """Conversations resolved per second over the last minute (or since the start)."""
        now = self._clock()
        while self._completions and self._completions[0] < now - RATE_WINDOW_SECONDS:
            self._completions.popleft()
        window = min(RATE_WINDOW_SECONDS, max(now - self._started, 1e-9))
        return len(self._completions) / window

    def snapshot(self) -> ProgressSnapshot:
        rate = self.rate()
        remaining = max(self.total - self.processed, 0)
        eta = None
        if rate > 0 and self.status == "running":
            eta = (datetime.now(UTC) + timedelta(seconds=remaining / rate)).isoformat(timespec="seconds")
        percentage = 100.0 * self.processed / self.total if self.total else (100.0 if self.status != "running" else 0.0)
        return ProgressSnapshot(
            job_id=self.job_id,
            status=self.status,
            start_time=self._start_wall.isoformat(timespec="seconds"),
            total_conversations=self.total,
            processed=self.processed,
            successful=self.successful,
            failed=self.failed,
            queued_for_retry=self.queued_for_retry,
            already_classified=self.already_classified,
            skipped=self.skipped,
            lost_claims=self.lost_claims,
            current_rate=round(rate, 3),
            estimated_completion=eta,
            percentage_complete=round(min(percentage, 100.0), 2),
            elapsed_seconds=round(self._clock() - self._started, 3),
        )


class Reporter(Protocol):
    def update(self, snapshot: ProgressSnapshot) -> None: ...

    def close(self, snapshot: ProgressSnapshot) -> None: ...


class ConsoleProgressReporter:
    """``|████----| 60.0% 600/1000 Success: 580 Failed: 20 Rate: 2.5/s ETA 0:02:40``."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TextColumn("Success: [green]{task.fields[successful]}[/] Failed: [red]{task.fields[failed]}[/]"
                       " Retry: {task.fields[queued]} Rate: {task.fields[rate]:.2f}/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("classifying", total=None, successful=0, failed=0, queued=0, rate=0.0)
        self._progress.start()

    def update(self, snapshot: ProgressSnapshot) -> None:
        self._progress.update(
            self._task,
            total=snapshot.total_conversations or None,
            completed=snapshot.processed,
            successful=snapshot.successful,
            failed=snapshot.failed,
            queued=snapshot.queued_for_retry,
            rate=snapshot.current_rate,
        )

    def close(self, snapshot: ProgressSnapshot) -> None:
        self.update(snapshot)
        self._progress.stop()


class StructuredProgressLogger:
    """A progress line in the log every ``interval`` seconds, and a last one at the end."""

    def __init__(self, interval: float = 10.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = clock()

    def _log(self, snapshot: ProgressSnapshot) -> None:
        logger.info(
            "job %s %s: %d/%d conversations (%.1f%%), %d successful, %d failed, %d queued for retry, "
            "%d already classified, %d lost claims, %.2f/s",
            snapshot.job_id, snapshot.status, snapshot.processed, snapshot.total_conversations,
            snapshot.percentage_complete, snapshot.successful, snapshot.failed, snapshot.queued_for_retry,
            snapshot.already_classified, snapshot.lost_claims, snapshot.current_rate,
        )

    def update(self, snapshot: ProgressSnapshot) -> None:
        if self._clock() - self._last >= self.interval:
            self._last = self._clock()
            self._log(snapshot)

    def close(self, snapshot: ProgressSnapshot) -> None:
        self._log(snapshot)


class ProgressFileReporter:
    """``progress_<job>.json`` (latest state) and ``progress_<job>.csv`` (history) in ``directory``."""

    FIELDS = [f for f in ProgressSnapshot.__dataclass_fields__]

    def __init__(self, directory: Path, job_id: str, *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.json_path = Path(directory) / f"progress_{job_id}.json"
        self.csv_path = Path(directory) / f"progress_{job_id}.csv"
        self.interval = interval
        self._clock = clock
        self._last = float("-inf")
        new_csv = not self.csv_path.exists()
        self._csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.FIELDS)
        if new_csv:
            self._csv.writeheader()

    def _write(self, snapshot: ProgressSnapshot) -> None:
        atomic_write_json(self.json_path, asdict(snapshot))
        self._csv.writerow(asdict(snapshot))
        self._csv_file.flush()

    def update(self, snapshot: ProgressSnapshot) -> None:
        if self._clock() - self._last >= self.interval:
            self._last = self._clock()
            self._write(snapshot)

    def close(self, snapshot: ProgressSnapshot) -> None:
        self._write(snapshot)
        self._csv_file.close()


class ProgressReporter:
    """The tracker and the reporters chosen by the monitoring mode; reporters are told at most 4 times a second.

    Owned by whoever opens it: ``with build_progress(...) as progress:`` (or ``async with``) closes
    every reporter (the bar stopped, the CSV file closed) however the block ends. The job itself
    only calls :meth:`finish` with its outcome.
    """

    def __init__(self, tracker: ProgressTracker, reporters: list[Reporter], *, min_interval: float = 0.25) -> None:
        self.tracker = tracker
        self.reporters = reporters
        self._min_interval = min_interval
        self._last = float("-inf")
        self._final: ProgressSnapshot | None = None
        self._closed = False

    def refresh(self, *, force: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last < self._min_interval:
            return
        self._last = now
        snapshot = self.tracker.snapshot()
        for reporter in self.reporters:
            reporter.update(snapshot)

    def finish(self, status: str) -> ProgressSnapshot:
        """Record the job's outcome (``completed``, ``stopped``, ``failed``); the reporters show it on closing."""
        self.tracker.status = status
        self._final = self.tracker.snapshot()
        return self._final

    def close(self) -> ProgressSnapshot:
        """Close every reporter with the final snapshot (once; later calls return it again)."""
        if self._final is None:
            self.finish("failed")  # closed without an outcome: the job never said it finished
        assert self._final is not None
        if self._closed:
            return self._final
        self._closed = True
        for reporter in self.reporters:
            try:
                reporter.close(self._final)
            except Exception:  # a reporter failing at the end must not hide the job's outcome
                logger.exception("progress reporter %s failed while closing", type(reporter).__name__)
        return self._final

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ProgressReporter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


MONITORING_MODES = {
    "development": {"console"},
    "production": {"logs", "files"},
    "interactive": {"console", "logs"},
}


def monitoring_components(mode: str, *, console: bool = False, logs: bool = False, files: bool = False) -> set[str]:
    """The components of ``mode`` plus the ones asked for by flags."""
    components = set(MONITORING_MODES[mode])
    components |= {name for name, wanted in (("console", console), ("logs", logs), ("files", files)) if wanted}
    return components


def build_progress(
    tracker: ProgressTracker, components: set[str], directory: Path, *, console: Console | None = None
) -> ProgressReporter:
    reporters: list[Reporter] = []
    if "console" in components:
        reporters.append(ConsoleProgressReporter(console))
    if "logs" in components:
        reporters.append(StructuredProgressLogger())
    if "files" in components:
        reporters.append(ProgressFileReporter(directory, tracker.job_id))
    return ProgressReporter(tracker, reporters)
