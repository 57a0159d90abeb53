"""The jobs recorder: a batch job's progress in MongoDB's jobs collection (what the dashboard lists)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import cli
from config import Settings, env_name
from fakes.ollama import FakeOllama
from tests.conftest import SettingsFactory
from tests.net_helpers import free_port
from utils.job_recorder import JobRecorder
from utils.progress import ProgressTracker

ROOT = Path(__file__).resolve().parents[1]


async def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    """``predicate()`` once true (a synchronous MongoDB read: the recorder's task runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_progress_and_final_state_are_recorded(make_settings: SettingsFactory, mongo_uri: str, mongo_db: Any) -> None:
    settings = make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db.name)
    tracker = ProgressTracker("batch_test_1", total=10)

    async def run() -> dict[str, Any]:
        async with JobRecorder(mongo_uri, settings, tracker.job_id, interval=0.05) as recorder:
            for _ in range(3):
                tracker.record_success()
            tracker.record_failed()
            tracker.record_queued()
            recorder.update(tracker.snapshot())
            running = await wait_for(lambda: mongo_db["jobs"].find_one({"_id": "batch_test_1", "processed": 5}))
            tracker.record_requeue_resolved(True)
            tracker.finish("completed")
            recorder.close(tracker.snapshot())
        return running

    running = asyncio.run(run())
    assert running["status"] == "running"
    counts = (running["total"], running["successful"], running["failed"], running["queued_for_retry"])
    assert counts == (10, 3, 1, 1)
    assert running["mode"] == "batch" and running["pid"] > 0 and running["host"]
    assert running["started_at"] <= running["updated_at"]
    assert "finished_at" not in running
    done = mongo_db["jobs"].find_one({"_id": "batch_test_1"})
    assert done["status"] == "completed"
    assert (done["successful"], done["queued_for_retry"]) == (4, 0)
    assert done["finished_at"] >= done["started_at"]
    assert done["eta"] is None
    assert mongo_db["jobs"].count_documents({}) == 1
    assert {"started_at_-1", "status_1_updated_at_-1"} <= set(mongo_db["jobs"].index_information())


def test_a_lost_mongodb_is_logged_and_the_job_goes_on(make_settings: SettingsFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}"
    settings = make_settings(mongodb_connection_string=uri, mongodb_timeout_ms=300)
    tracker = ProgressTracker("batch_test_2", total=3)

    async def run() -> None:
        async with JobRecorder(uri, settings, tracker.job_id, interval=0.01) as recorder:
            for _ in range(3):
                tracker.record_success()
                recorder.update(tracker.snapshot())  # hands the snapshot to the writer task, never raises
                await asyncio.sleep(0.4)  # (a write attempt fails meanwhile)
            tracker.finish("completed")
            recorder.close(tracker.snapshot())
        # leaving the block: a bounded wait for the last write, which fails

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if "progress not recorded" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per outage, not once per write
    assert "batch_test_2" in warnings[0]


@pytest.fixture
def batch_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongo_uri: str, mongo_db_name: str,
              fake_ollama: FakeOllama) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    for key, value in {
        "MONGODB_CONNECTION_STRING": mongo_uri,
        "MONGODB_DATABASE_NAME": mongo_db_name,
        "LLM_ENDPOINT": fake_ollama.url,
        "BATCH_FILES_DIR": str(tmp_path / "batch_files"),
        "BATCH_MONITORING_MODE": "production",
        "MONGODB_TIMEOUT_MS": "5000",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)


def test_a_batch_run_leaves_no_thread_behind(batch_env: None, mongo_db: Any) -> None:
    # The interpreter joins PyMongo's monitor threads of a synchronous client at exit, and they see
    # their client closed only at their next half-second tick: the recorder's own synchronous client
    # made every run end about that much later (issue 19). Nothing the run starts may outlive it.
    # (A process of its own: the tests' clients have monitor threads too.)
    probe = ("import sys, threading, cli; code = cli.main([]); "
             "print(code, sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=ROOT).stdout.strip().splitlines()
    assert out[-1] == f"{cli.EXIT_OK} []"  # an empty collection: the fixed cost of a run
    (job,) = list(mongo_db["jobs"].find())
    assert (job["status"], job["total"]) == ("completed", 0)


def test_a_batch_run_records_its_job(batch_env: None, mongo_db: Any) -> None:
    mongo_db["conversation_set"].insert_many([
        {"conversation_number": str(i), "status": "pending",
         "messages": [{"sender": "customer", "text": f"Where is my order {i}?"}]}
        for i in range(4)
    ] + [{"conversation_number": "bad", "status": "pending", "messages": []}])
    assert cli.main([]) == cli.EXIT_INCOMPLETE  # the invalid one failed
    (job,) = list(mongo_db["jobs"].find())
    result = mongo_db["sentimental_analysis"].find_one()
    assert job["_id"] == result["processing_metadata"]["batch_job_id"]
    summary = (job["status"], job["mode"], job["total"], job["successful"], job["failed"])
    assert summary == ("completed", "batch", 5, 4, 1)
    assert job["finished_at"] >= job["started_at"]
