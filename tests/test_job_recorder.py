"""The jobs recorder: a batch job's progress in MongoDB's jobs collection (what the dashboard lists)."""

from __future__ import annotations

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


def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_progress_and_final_state_are_recorded(make_settings: SettingsFactory, mongo_uri: str, mongo_db: Any) -> None:
    settings = make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db.name)
    tracker = ProgressTracker("batch_test_1", total=10)
    recorder = JobRecorder(mongo_uri, settings, tracker.job_id, interval=0.05)
    try:
        for _ in range(3):
            tracker.record_success()
        tracker.record_failed()
        tracker.record_queued()
        recorder.update(tracker.snapshot())
        running = wait_for(lambda: mongo_db["jobs"].find_one({"_id": "batch_test_1", "processed": 5}))
        assert running["status"] == "running"
        counts = (running["total"], running["successful"], running["failed"], running["queued_for_retry"])
        assert counts == (10, 3, 1, 1)
        assert running["mode"] == "batch" and running["pid"] > 0 and running["host"]
        assert running["started_at"] <= running["updated_at"]
        assert "finished_at" not in running
        tracker.record_requeue_resolved(True)
        tracker.status = "completed"
    finally:
        recorder.close(tracker.snapshot())
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
    recorder = JobRecorder(uri, settings, tracker.job_id, interval=0.01)
    for _ in range(3):
        tracker.record_success()
        recorder.update(tracker.snapshot())  # hands the snapshot to the writer thread, never raises
    tracker.status = "completed"
    recorder.close(tracker.snapshot())  # a bounded wait for the last write, which fails
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
