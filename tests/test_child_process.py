"""utils/child_process.py beyond what tests/test_embedded_db.py shows: who owns a child started
from a pool's worker thread (PR_SET_PDEATHSIG follows the thread that started it)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.concurrency import run_in_threadpool

from config import load_settings
from dashboard import DashboardDatabase
from utils.child_process import ThreadOwned, process_info
from utils.embedded_db import PID_FILE

#: anyio retires a worker thread idle for this long when another call comes (its WorkerThread.MAX_IDLE_TIME).
WORKER_IDLE_RETIREMENT_SECONDS = 10


async def test_the_dashboards_embedded_database_outlives_the_worker_thread_that_started_it(tmp_path: Path) -> None:
    # Regression: the dashboard started SecantusDB from Starlette's thread pool; once that worker
    # thread was retired (idle 10 s, then any other call to the pool), the kernel killed the
    # database, and the dashboard answered 503 until the API restarted.
    settings = load_settings({"mongodb_connection_string": "embedded", "embedded_db_path": tmp_path / "db"},
                             environ={}, env_file=None)
    holder = DashboardDatabase()
    try:
        database = await holder.database(settings)
        assert (await database.command("ping"))["ok"] == 1
        server = json.loads((tmp_path / "db" / PID_FILE).read_text())["pid"]
        # Two workers, the one that started the database idle first; then one more call after the
        # retirement age makes the pool retire it.
        await asyncio.gather(run_in_threadpool(time.sleep, 0.1), run_in_threadpool(time.sleep, 0.5))
        await asyncio.sleep(WORKER_IDLE_RETIREMENT_SECONDS + 0.5)
        await run_in_threadpool(time.sleep, 0.01)
        await asyncio.sleep(1)  # the kernel's signal, had there been one
        assert process_info(server) is not None, "the embedded database died with a retired worker thread"
        assert (await database.command("ping"))["ok"] == 1
    finally:
        await holder.close()
    assert not (tmp_path / "db" / PID_FILE).exists()  # stopped by close(), as before


@contextmanager
def _recording(events: list[str]) -> Iterator[int]:
    events.append(f"enter in {threading.current_thread().name}")
    try:
        yield threading.get_ident()
    finally:
        events.append(f"exit in {threading.current_thread().name}")


def test_thread_owned_enters_and_exits_in_its_own_thread() -> None:
    events: list[str] = []
    owned = ThreadOwned(_recording(events), name="owner")
    ident = owned.enter()
    assert ident != threading.get_ident()
    assert events == ["enter in owner"]
    owned.close()
    assert events == ["enter in owner", "exit in owner"]
    owned.close()  # twice is harmless


@contextmanager
def _failing() -> Iterator[None]:
    raise ValueError("cannot start")
    yield


def test_thread_owned_raises_what_the_start_raised() -> None:
    owned = ThreadOwned(_failing())
    with pytest.raises(ValueError, match="cannot start"):
        owned.enter()
    owned.close()
