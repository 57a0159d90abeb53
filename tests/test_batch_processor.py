"""The batch processor end to end: the real CLI against SecantusDB (MongoDB wire protocol) and the fake Ollama.

In-process runs (``cli.main``) cover the behaviour; subprocess runs cover what only a real
process can show: a SIGKILL mid-batch, continuous mode, SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

import cli
import error_handler
from aggregator import content_hash, validate_conversation
from batch_outcome import Outcome
from batch_processor import BatchProcessor
from config import Settings, env_name
from fakes.ollama import ErrorReply, FakeOllama, Reply, last_user_content
from retry_policy import Attempts, Decision, RetryPolicy, Verdict
from scripts.bench.harness import make_conversation as sample_conversation
from tests.net_helpers import free_port
from utils.batch_file_manager import BatchFileManager
from utils.retry_queue import RetryQueue

ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "support-classifier-batch"
SOURCE = "conversation_set"
RESULTS = "sentimental_analysis"


def make_conversation(i: int, text: str | None = None, **extra: Any) -> dict[str, Any]:
    """A source document in the design's conversation_set schema (a customer tweet and a reply): the
    benchmark's, with the customer's text replaced when given."""
    document = sample_conversation(i)
    if text:
        document["tweets"][0]["text"] = text
    return {**document, **extra}


def insert(db: Any, docs: list[dict[str, Any]]) -> list[Any]:
    return list(db[SOURCE].insert_many(docs).inserted_ids)


def statuses(db: Any) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for doc in db[SOURCE].find({}, {"status": 1}):
        counts[doc.get("status")] = counts.get(doc.get("status"), 0) + 1
    return counts


def results_per_source(db: Any) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for doc in db[RESULTS].find({}, {"source_conversation_id": 1}):
        counts[doc["source_conversation_id"]] = counts.get(doc["source_conversation_id"], 0) + 1
    return counts


def queue_entries(path: Path) -> list[dict[str, Any]]:
    """The live entries of a retry-queue journal, as stored."""
    queue = RetryQueue(path)
    queue.load()
    return [entry.to_json() for entry in queue]


def batch_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("batch_*.json*"))


@pytest.fixture
def batch_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongo_uri: str, mongo_db_name: str, fake_ollama: FakeOllama
) -> dict[str, str]:
    """Environment for a processor run: this test's database and fake Ollama, fast retries, no .env."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    env = {
        "MONGODB_CONNECTION_STRING": mongo_uri,
        "MONGODB_DATABASE_NAME": mongo_db_name,
        "LLM_ENDPOINT": fake_ollama.url,
        "OLLAMA_TIMEOUT": "10",
        "BATCH_FILES_DIR": str(tmp_path / "batch_files"),
        "BATCH_MONITORING_MODE": "production",
        "OLLAMA_RETRY_BASE_SECONDS": "0.01",
        "MONGODB_RETRY_BASE_SECONDS": "0.01",
        "CIRCUIT_BREAKER_RECOVERY_SECONDS": "0.2",
        "MONGODB_TIMEOUT_MS": "5000",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no developer .env is read
    return env


@pytest.fixture
def files_dir(batch_env: dict[str, str]) -> Path:
    return Path(batch_env["BATCH_FILES_DIR"])


# --- batch mode ---------------------------------------------------------------------------


def test_batch_mode_classifies_every_pending_conversation(batch_env, files_dir, mongo_db, fake_ollama, capsys):
    pending = insert(mongo_db, [make_conversation(i) for i in range(20)])
    no_status = [make_conversation(100 + i) for i in range(3)]
    for doc in no_status:
        del doc["status"]
    no_status_ids = insert(mongo_db, no_status)
    done_ids = insert(mongo_db, [make_conversation(200 + i, status="processed") for i in range(2)])

    assert cli.main(["--batch-size", "10", "--max-concurrent", "4"]) == cli.EXIT_OK

    per_source = results_per_source(mongo_db)
    assert set(per_source) == set(pending) | set(no_status_ids)
    assert all(count == 1 for count in per_source.values())
    assert not set(done_ids) & set(per_source)
    assert fake_ollama.chat_count == 23
    assert statuses(mongo_db) == {"processed": 25}
    assert all(doc.get("last_processed_at") for doc in mongo_db[SOURCE].find({"_id": {"$in": pending}}))
    assert batch_files(files_dir) == ["batch_001_completed.json", "batch_002_completed.json",
                                      "batch_003_completed.json"]
    checkpoint = json.loads((files_dir / "checkpoint.json").read_text())
    assert checkpoint["conversations_resolved"] == 23
    out = capsys.readouterr().out
    assert "classified        23" in out


def test_result_documents_follow_the_design_schema(batch_env, mongo_db, fake_ollama):
    [source_id] = insert(mongo_db, [make_conversation(1)])
    assert cli.main([]) == cli.EXIT_OK

    result = mongo_db[RESULTS].find_one({})
    assert set(result) == {"_id", "conversation_number", "source_conversation_id", "classification",
                           "content_hash", "processing_metadata", "created_at", "claim_generation"}
    assert result["claim_generation"] == 1  # the fencing token of the one claim it was written under
    assert result["content_hash"].startswith("sha256:")
    assert result["source_conversation_id"] == source_id
    assert result["_id"] != source_id
    assert result["conversation_number"] == "5001"
    assert set(result["classification"]) == {"categorization", "intent", "topic", "sentiment", "confidence",
                                             "needs_review"}
    metadata = result["processing_metadata"]
    assert set(metadata) == {"processed_at", "model_used", "processing_duration_ms", "llm_tokens",
                             "processor_version", "batch_job_id"}
    assert metadata["model_used"] == "llama3"
    assert metadata["batch_job_id"].startswith("batch_")
    assert isinstance(metadata["processing_duration_ms"], int)
    # The request the model saw: the conversation, role-labelled, last.
    sent = last_user_content(fake_ollama.chat_requests[0])
    assert 'Customer: "@AcmeCare my order 1 has not arrived' in sent
    assert 'Agent: "Sorry to hear that' in sent  # a reply, without the mention it starts with

    source_indexes = {tuple(v["key"]) for v in mongo_db[SOURCE].index_information().values()}
    result_info = mongo_db[RESULTS].index_information()
    assert {(("status", 1),), (("conversation_number", 1),), (("last_processed_at", 1),)} <= source_indexes
    unique = [v for v in result_info.values() if v["key"] == [("source_conversation_id", 1)]]
    assert unique and unique[0].get("unique") is True
    for field in ("conversation_number", "processing_metadata.batch_job_id", "processing_metadata.processed_at",
                  "classification.intent", "classification.topic", "classification.sentiment"):
        assert any(v["key"] == [(field, 1)] for v in result_info.values()), field


def test_limit_stops_after_n_conversations(batch_env, mongo_db, fake_ollama):
    insert(mongo_db, [make_conversation(i) for i in range(12)])
    assert cli.main(["--limit", "5", "--batch-size", "3"]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 5
    assert statuses(mongo_db) == {"processed": 5, "pending": 7}
    assert cli.main([]) == cli.EXIT_OK
    assert statuses(mongo_db) == {"processed": 12}
    assert len(results_per_source(mongo_db)) == 12


def test_reruns_never_create_a_second_result(batch_env, mongo_db, fake_ollama, capsys):
    ids = insert(mongo_db, [make_conversation(i) for i in range(6)])
    # One conversation was classified before but its status update was lost: skipped, not redone.
    mongo_db[RESULTS].insert_one({"source_conversation_id": ids[0], "conversation_number": "5000",
                                  "classification": {"intent": "Other"},
                                  "content_hash": content_hash(validate_conversation(make_conversation(0)))})
    assert cli.main([]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 5
    assert "already done      1" in capsys.readouterr().out
    mongo_db[SOURCE].update_many({}, {"$set": {"status": "pending"}})  # someone resets every status
    assert cli.main([]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 5
    assert results_per_source(mongo_db) == {i: 1 for i in ids}


def test_invalid_document_is_failed_with_its_reason_and_no_llm_call(batch_env, mongo_db, fake_ollama):
    good = insert(mongo_db, [make_conversation(1)])
    [bad] = insert(mongo_db, [{"conversation_number": "bad-1", "tweets": [], "status": "pending"}])
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert fake_ollama.chat_count == 1
    failed = mongo_db[SOURCE].find_one({"_id": bad})
    assert failed["status"] == "failed"
    assert failed["failure_type"] == "invalid_input"
    assert "tweets" in failed["failure_reason"]
    assert set(results_per_source(mongo_db)) == set(good)


def test_llm_failures_are_retried_queued_and_finally_marked_failed(batch_env, files_dir, monkeypatch, mongo_db,
                                                                    fake_ollama, capsys):
    monkeypatch.setenv("OLLAMA_MAX_RETRIES", "1")
    monkeypatch.setenv("BATCH_RETRY_QUEUE_ATTEMPTS", "2")
    monkeypatch.setenv("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "100")
    broken = {"on": True}

    def respond(request: dict[str, Any]) -> ErrorReply | None:
        if broken["on"] and "BROKEN" in last_user_content(request):
            return ErrorReply(500, "llama runner process has terminated: exit status 2")
        return None

    fake_ollama.responder = respond
    insert(mongo_db, [make_conversation(i) for i in range(4)])
    [bad] = insert(mongo_db, [make_conversation(9, text="BROKEN conversation")])

    # Run 1: 2 inline attempts, queued, 2 more in the end-of-batch pass -> still queued (1 of 2 passes).
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert "in retry queue    1" in capsys.readouterr().out
    [queue] = list(files_dir.glob("batch_*_retry_queue.jsonl"))
    [entry] = queue_entries(queue)
    assert entry["status"] == "llm_failed"
    assert entry["source_id"] == bad  # the BSON value, kept through Extended JSON
    assert entry["retry_count"] == 1
    assert entry["result"] is None
    assert "HTTP 500" in entry["reason"]
    assert entry["conversation_data"]["conversation_number"] == "5009"
    assert mongo_db[SOURCE].find_one({"_id": bad})["status"] == "processing"

    # Run 2: the start-up pass fails again -> given up, marked failed with its reason.
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert not list(files_dir.glob("batch_*_retry_queue.jsonl"))
    failed = mongo_db[SOURCE].find_one({"_id": bad})
    assert failed["status"] == "failed"
    assert failed["failure_type"] == "llm_server_error"
    assert "llama runner process has terminated" in failed["failure_reason"]
    llm_calls_for_bad = sum("BROKEN" in last_user_content(r) for r in fake_ollama.chat_requests)
    assert llm_calls_for_bad == 6  # 2 inline + 2 (end-of-batch pass) + 2 (start-up pass)

    # Ollama is fixed; failed conversations are only picked up again when asked.
    broken["on"] = False
    assert cli.main([]) == cli.EXIT_OK
    assert mongo_db[SOURCE].find_one({"_id": bad})["status"] == "failed"
    assert cli.main(["--retry-failed"]) == cli.EXIT_OK
    repaired = mongo_db[SOURCE].find_one({"_id": bad})
    assert repaired["status"] == "processed"
    assert "failure_reason" not in repaired
    assert results_per_source(mongo_db)[bad] == 1


def test_a_retry_policy_passed_in_decides_the_tiers(batch_env, monkeypatch, mongo_db, fake_ollama, caplog):
    # The retry policy is the processor's to be given (retry_policy.py): this one never retries a call in
    # place and asks for a pause before the queue's pass. One 500 answer: queued, paused, then written.
    class QueueAtOnce(RetryPolicy):
        def decide(self, outcome: Outcome, attempts: Attempts, error: BaseException | None = None) -> Decision:
            if attempts.calls is not None:
                return Decision(Verdict.GIVE_UP)  # no in-place retry
            return super().decide(outcome, attempts, error)

    class WithPolicy(BatchProcessor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, policy=QueueAtOnce(queue_passes=2, queue_after_seconds=0.3))

    monkeypatch.setattr(cli, "BatchProcessor", WithPolicy)
    fake_ollama.enqueue(ErrorReply(500, "llama runner process has terminated"))
    insert(mongo_db, [make_conversation(1)])

    assert cli.main([]) == cli.EXIT_OK

    assert fake_ollama.chat_count == 2  # the failed call was not retried in place: once more in the pass
    assert "queued for retry (llm_failed)" in caplog.text  # (the default policy retries it in place)
    assert "queued conversations are retried in 0.3 s" in caplog.text
    assert statuses(mongo_db) == {"processed": 1}


def test_unusable_model_output_is_queued_as_llm_failed(batch_env, files_dir, mongo_db, fake_ollama):
    fake_ollama.responder = lambda request: (
        Reply(content="I think this customer is upset.") if "GARBLED" in last_user_content(request) else None
    )
    insert(mongo_db, [make_conversation(1), make_conversation(2, text="GARBLED please help")])
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    [queue] = list(files_dir.glob("batch_*_retry_queue.jsonl"))
    [entry] = queue_entries(queue)
    assert (entry["status"], entry["error_type"]) == ("llm_failed", "llm_bad_output")
    assert "no JSON object" in entry["reason"]


def test_write_failures_land_later_without_a_second_llm_call(batch_env, files_dir, mongo_db, fake_ollama, capsys):
    # A validator no result satisfies: every result write is rejected (a permanent error).
    mongo_db.create_collection(RESULTS, validator={"$jsonSchema": {"required": ["field_no_result_has"]}})
    ids = insert(mongo_db, [make_conversation(i) for i in range(5)])

    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert fake_ollama.chat_count == 5
    assert mongo_db[RESULTS].count_documents({}) == 0
    [queue] = list(files_dir.glob("batch_*_retry_queue.jsonl"))
    entries = queue_entries(queue)
    assert {e["status"] for e in entries} == {"write_failed"}
    assert sorted(str(e["source_id"]) for e in entries) == sorted(str(i) for i in ids)
    assert all(isinstance(e["source_id"], ObjectId) for e in entries)  # the BSON type survives
    assert all(e["result"]["classification"]["intent"] for e in entries)  # the result whose write failed
    assert all("Document failed validation" in e["reason"] for e in entries)
    capsys.readouterr()

    mongo_db.command("collMod", RESULTS, validator={})
    assert cli.main([]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 5  # written from the queue, the LLM was not asked again
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    stored = {r["source_conversation_id"]: r["classification"] for r in mongo_db[RESULTS].find()}
    assert stored == {e["source_id"]: e["result"]["classification"] for e in entries}
    assert statuses(mongo_db) == {"processed": 5}
    assert not list(files_dir.glob("batch_*_retry_queue.jsonl"))


def test_transient_write_failures_are_retried_in_place(batch_env, files_dir, mongo_db, fake_ollama, caplog):
    ids = insert(mongo_db, [make_conversation(i) for i in range(3)])
    # Skip the batch's "processing" status update; fail the next three updates: the first result
    # upsert (tried twice by the driver itself, a retryable write) and its first retry by us.
    mongo_db.client.admin.command({
        "configureFailPoint": "failCommand", "mode": {"skip": 1, "times": 3},
        "data": {"failCommands": ["update"], "errorCode": 6, "appName": APP_NAME},
    })
    try:
        assert cli.main(["--max-concurrent", "1"]) == cli.EXIT_OK
    finally:
        mongo_db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert not list(files_dir.glob("batch_*_retry_queue.jsonl"))
    assert fake_ollama.chat_count == 3
    retries = [r.message for r in caplog.records if "retrying in" in r.message]
    assert retries and all(m.startswith("result write for conversation") for m in retries)


def test_circuit_breaker_pauses_calls_while_ollama_keeps_failing(batch_env, monkeypatch, mongo_db, fake_ollama,
                                                                  caplog):
    monkeypatch.setenv("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "3")
    monkeypatch.setenv("CIRCUIT_BREAKER_RECOVERY_SECONDS", "0.6")
    monkeypatch.setenv("OLLAMA_MAX_RETRIES", "5")
    fake_ollama.enqueue(*[ErrorReply(500, "llama runner process has terminated")] * 3)
    ids = insert(mongo_db, [make_conversation(i) for i in range(3)])

    assert cli.main(["--max-concurrent", "1"]) == cli.EXIT_OK

    times = [record.received_at for record in fake_ollama.chat_records]
    assert len(times) == 6  # 3 failures, then the probe and the two others
    assert times[3] - times[2] >= 0.55  # no call while the circuit was open
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert any("circuit Ollama open after 3 consecutive failures" in r.message for r in caplog.records)


def test_progress_files_follow_the_design_schema(batch_env, files_dir, mongo_db, fake_ollama):
    insert(mongo_db, [make_conversation(i) for i in range(4)])
    assert cli.main(["--monitoring-mode", "development", "--progress-files"]) == cli.EXIT_OK
    [progress_json] = list(files_dir.glob("progress_*.json"))
    progress = json.loads(progress_json.read_text())
    for key in ("job_id", "status", "start_time", "total_conversations", "processed", "successful", "failed",
                "current_rate", "estimated_completion", "percentage_complete"):
        assert key in progress
    assert (progress["status"], progress["total_conversations"], progress["successful"]) == ("completed", 4, 4)
    assert progress["percentage_complete"] == 100.0
    rows = progress_json.with_suffix(".csv").read_text().strip().splitlines()
    assert rows[0].startswith("job_id,status,")
    assert rows[-1].split(",")[1] == "completed"


# --- start-up failures ---------------------------------------------------------------------


@contextmanager
def pymongo_monitor_socket_leak_ignored() -> Iterator[None]:
    """Collect, ignoring only it, the socket PyMongo leaks when a client closes while its monitor
    is still connecting to a server that is down (PyMongo bug PYTHON-5867: a cancelled async
    connect does not close its socket). Anything else left unclosed still fails the test."""
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"unclosed <socket\.socket", category=ResourceWarning)
        gc.collect()


def test_unreachable_mongodb_is_a_one_line_error(batch_env, monkeypatch, capsys):
    port = free_port()
    uri = f"mongodb://user:pass-4sQz@127.0.0.1:{port}/"  # made-up credentials
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", uri)
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "500")
    with pymongo_monitor_socket_leak_ignored():
        assert cli.main([]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"error: Cannot reach MongoDB at {uri.replace('pass-4sQz', '***')}" in err
    assert "4sQz" not in err
    assert "Traceback" not in err


def test_unreachable_ollama_is_a_one_line_error(batch_env, monkeypatch, mongo_db, capsys):
    port = free_port()
    monkeypatch.setenv("LLM_ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main([]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"error: Cannot reach Ollama at http://127.0.0.1:{port}" in err
    assert "ollama serve" in err
    assert "Traceback" not in err


def test_missing_model_names_the_pull_command(batch_env, monkeypatch, mongo_db, capsys):
    monkeypatch.setenv("LLM_MODEL", "qwen3:8b")
    assert cli.main([]) == cli.EXIT_UNAVAILABLE
    assert "ollama pull qwen3:8b" in capsys.readouterr().err


def test_invalid_settings_exit_with_the_config_code(batch_env, monkeypatch, capsys):
    monkeypatch.setenv("BATCH_MAX_CONCURRENT", "0")
    assert cli.main([]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "BATCH_MAX_CONCURRENT" in err and "Traceback" not in err


def test_command_line_wins_over_the_environment(batch_env, monkeypatch):
    monkeypatch.setenv("MONGODB_BATCH_SIZE", "7")
    monkeypatch.setenv("BATCH_MAX_CONCURRENT", "3")
    settings = cli.settings_from_args(cli.build_parser().parse_args(["--batch-size", "11"]))
    assert (settings.mongodb_batch_size, settings.batch_max_concurrent) == (11, 3)


def test_a_second_processor_on_the_same_folder_is_refused(batch_env, files_dir, mongo_db, capsys):
    holder = BatchFileManager(files_dir)
    holder.lock()
    try:
        assert cli.main([]) == cli.EXIT_FAILURE
    finally:
        holder.unlock()
    assert f"Another batch processor (pid {os.getpid()})" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_environment_variable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag, env in (("--mode", "BATCH_PROCESSOR_MODE"), ("--batch-size", "MONGODB_BATCH_SIZE"),
                      ("--max-concurrent", "BATCH_MAX_CONCURRENT"), ("--poll-interval", "BATCH_POLL_INTERVAL"),
                      ("--batch-files-dir", "BATCH_FILES_DIR"), ("--monitoring-mode", "BATCH_MONITORING_MODE")):
        assert flag in text and env in text
    for flag in ("--limit", "--console", "--logs", "--progress-files", "--retry-failed", "--verbose"):
        assert flag in text
    assert "exit codes" in text


# --- real processes: crash, continuous mode, signals ------------------------------------------


@pytest.fixture
def start_processor(batch_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python batch_processor.py`` as a real process; every one is stopped after the test."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "batch_processor.py"), *args],
            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_mid_batch_then_restarted_every_conversation_has_exactly_one_result(
    start_processor, files_dir, mongo_db, fake_ollama
):
    ids = insert(mongo_db, [make_conversation(i) for i in range(60)])
    fake_ollama.latency = 0.05
    for kill_after in (8, 25):
        process = start_processor("--batch-size", "20", "--max-concurrent", "4")
        wait_until(lambda n=kill_after: mongo_db[RESULTS].count_documents({}) >= n, what=f"{kill_after} results")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert mongo_db[RESULTS].count_documents({}) < 60, "killed too late to test recovery"
        assert any(name.endswith("_pending.json") for name in batch_files(files_dir))

    fake_ollama.latency = 0
    final = start_processor("--batch-size", "20")
    output, _ = final.communicate(timeout=60)
    assert final.returncode == cli.EXIT_OK, output
    assert "recovering batch_" in output
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert statuses(mongo_db) == {"processed": 60}
    assert not any(name.endswith(("_pending.json", "_retry_queue.jsonl")) for name in batch_files(files_dir))


def test_continuous_mode_picks_up_new_documents_and_stops_on_sigterm(start_processor, mongo_db, fake_ollama):
    insert(mongo_db, [make_conversation(i) for i in range(5)])
    process = start_processor("--mode", "continuous", "--poll-interval", "0.2")
    wait_until(lambda: statuses(mongo_db).get("processed") == 5, what="the first 5 conversations")
    insert(mongo_db, [make_conversation(100 + i) for i in range(4)])
    wait_until(lambda: statuses(mongo_db).get("processed") == 9, what="the conversations inserted later")

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    assert process.returncode == cli.EXIT_OK, output
    assert "stopped" in output
    assert len(results_per_source(mongo_db)) == 9


def test_sigint_mid_batch_leaves_the_rest_recoverable(start_processor, files_dir, mongo_db, fake_ollama):
    ids = insert(mongo_db, [make_conversation(i) for i in range(10)])
    fake_ollama.latency = 2.0
    process = start_processor("--max-concurrent", "2", BATCH_SHUTDOWN_GRACE_SECONDS="0.3")
    assert fake_ollama.wait_for_chats(2, timeout=20)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=15)
    assert process.returncode == cli.EXIT_OK, output
    assert "Job batch_" in output and "stopped" in output
    assert statuses(mongo_db).get("processing") == 10  # nothing finished; all of it is recoverable
    assert batch_files(files_dir) == ["batch_001_pending.json"]
    progress = json.loads(next(files_dir.glob("progress_*.json")).read_text())
    assert progress["status"] == "stopped"

    fake_ollama.latency = 0
    final = start_processor()
    output, _ = final.communicate(timeout=60)
    assert final.returncode == cli.EXIT_OK, output
    assert results_per_source(mongo_db) == {i: 1 for i in ids}


def test_a_batch_files_folder_of_another_database_is_refused(batch_env, files_dir, monkeypatch, mongo_db, capsys):
    insert(mongo_db, [make_conversation(1)])
    assert cli.main([]) == cli.EXIT_OK
    assert "target.json" in {p.name for p in files_dir.iterdir()}
    # The same folder, now pointed at another database: its ObjectIds mean nothing there.
    monkeypatch.setenv("MONGODB_DATABASE_NAME", mongo_db.name + "_other")
    assert cli.main([]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "holds the batch files of mongodb://" in err and f"{mongo_db.name}.conversation_set" in err
    assert "--batch-files-dir" in err


@pytest.mark.timeout(60)
def test_an_unexpected_error_on_the_probe_neither_hangs_the_run_nor_loses_the_conversation(
    batch_env, files_dir, monkeypatch, mongo_db, fake_ollama, caplog
):
    # A bug stands in as a RuntimeError from our own pipeline, raised on the circuit breaker's probe.
    from classifier import ConversationClassifier

    monkeypatch.setenv("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "2")
    monkeypatch.setenv("OLLAMA_MAX_RETRIES", "3")
    fake_ollama.enqueue(ErrorReply(500, "llama runner process has terminated"),
                        ErrorReply(500, "llama runner process has terminated"))
    original = ConversationClassifier.classify_async
    calls = {"n": 0}

    async def classify_with_a_bug(self, conversation, client):
        calls["n"] += 1
        if calls["n"] == 3:  # after two failures opened the circuit: the probe
            raise RuntimeError("a bug in the pipeline")
        return await original(self, conversation, client)

    monkeypatch.setattr(ConversationClassifier, "classify_async", classify_with_a_bug)
    ids = insert(mongo_db, [make_conversation(i) for i in range(3)])

    assert cli.main(["--max-concurrent", "1"]) == cli.EXIT_OK  # the failed conversation's retry pass succeeds

    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    unexpected = [r for r in caplog.records if "failed unexpectedly" in r.message]
    assert unexpected and unexpected[0].exc_info and "a bug in the pipeline" in str(unexpected[0].exc_info[1])
    assert any("queued for retry (llm_failed): unexpected RuntimeError: a bug in the pipeline" in r.message
               for r in caplog.records)


# --- any _id type (issue 8 item 2) -------------------------------------------------------------


def mixed_id_documents() -> list[dict[str, Any]]:
    """One conversation per BSON type an _id may have, 24-hex string that is not an ObjectId included."""
    import uuid

    from bson import Binary

    ids: list[Any] = [ObjectId(), 7, 2.5, "conv-abc", "5f1d7a2b3c4d5e6f708192a3",
                      Binary.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678")), {"shop": "eu", "n": 3}]
    return [make_conversation(i, _id=value) for i, value in enumerate(ids)]


def test_every_id_type_keeps_its_type_and_value_end_to_end(batch_env, files_dir, mongo_db, fake_ollama):
    docs = mixed_id_documents()
    ids = insert(mongo_db, docs)
    assert cli.main(["--batch-size", "3"]) == cli.EXIT_OK

    assert fake_ollama.chat_count == len(ids)
    assert statuses(mongo_db) == {"processed": len(ids)}
    stored = [r["source_conversation_id"] for r in mongo_db[RESULTS].find()]
    assert len(stored) == len(ids)
    for source_id in ids:
        matches = [s for s in stored if s == source_id and type(s) is type(source_id)]
        assert len(matches) == 1, f"no result of the same type and value for {source_id!r}"
    # The 24-hex string stays a string: no result for an ObjectId nobody has.
    assert mongo_db[RESULTS].count_documents({"source_conversation_id": ObjectId("5f1d7a2b3c4d5e6f708192a3")}) == 0


def test_ids_survive_the_batch_files_of_a_crashed_run(batch_env, files_dir, mongo_db, fake_ollama):
    # A write failure keeps each conversation in the retry queue file; the next run reads the ids back.
    mongo_db.create_collection(RESULTS, validator={"$jsonSchema": {"required": ["field_no_result_has"]}})
    ids = insert(mongo_db, mixed_id_documents())
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    [queue] = list(files_dir.glob("batch_*_retry_queue.jsonl"))
    assert '"$oid"' in queue.read_text() and '"$binary"' in queue.read_text()
    mongo_db.command("collMod", RESULTS, validator={})
    assert cli.main([]) == cli.EXIT_OK
    assert fake_ollama.chat_count == len(ids)  # written from the queue, no second LLM call
    stored = [r["source_conversation_id"] for r in mongo_db[RESULTS].find()]
    assert sorted(map(repr, stored)) == sorted(map(repr, ids))
    assert statuses(mongo_db) == {"processed": len(ids)}


def test_a_collection_mixing_id_types_is_read_completely_across_runs(batch_env, mongo_db, fake_ollama):
    ids = insert(mongo_db, mixed_id_documents()[:4])
    assert cli.main(["--limit", "2", "--batch-size", "1"]) == cli.EXIT_OK
    # Documents of other types arrive later, "behind" any position a reader could keep.
    ids += insert(mongo_db, [make_conversation(50, _id=1), make_conversation(51, _id="a"),
                             make_conversation(52, _id=ObjectId("000000000000000000000001"))])
    assert cli.main(["--batch-size", "2"]) == cli.EXIT_OK
    assert statuses(mongo_db) == {"processed": len(ids)}
    assert fake_ollama.chat_count == len(ids)


def test_one_bad_document_never_stops_a_run(batch_env, mongo_db, fake_ollama):
    good = insert(mongo_db, [make_conversation(i) for i in range(3)])
    bad = insert(mongo_db, [
        {"_id": 1001, "conversation_number": {"nested": "number"}, "tweets": [], "status": "pending"},
        {"_id": 1002, "conversation_number": "bad-2", "tweets": "not a list", "status": "pending"},
        {"_id": 1003, "conversation_number": "bad-3", "messages": [{"sender": 5, "text": None}], "status": "pending"},
        {"_id": 1004, "status": "pending"},
    ])
    assert cli.main(["--batch-size", "2"]) == cli.EXIT_INCOMPLETE
    assert set(results_per_source(mongo_db)) == set(good)
    for doc in mongo_db[SOURCE].find({"_id": {"$in": bad}}):
        assert doc["status"] == "failed" and doc["failure_reason"], doc


# --- claims with leases (issue 9) ------------------------------------------------------------


def chats_per_conversation(fake_ollama: FakeOllama) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in fake_ollama.chat_requests:
        text = last_user_content(request)
        counts[text] = counts.get(text, 0) + 1
    return counts


def test_several_processors_share_a_collection_one_result_and_one_llm_call_each(
    start_processor, tmp_path, mongo_db, fake_ollama
):
    ids = insert(mongo_db, [make_conversation(i) for i in range(90)])
    fake_ollama.latency = 0.02
    processes = [
        start_processor("--batch-size", "7", "--max-concurrent", "3", "--batch-files-dir", str(tmp_path / f"files_{n}"),
                        "--worker-id", f"worker-{n}")
        for n in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == cli.EXIT_OK, output
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert fake_ollama.chat_count == 90
    assert set(chats_per_conversation(fake_ollama).values()) == {1}
    assert statuses(mongo_db) == {"processed": 90}
    # Nothing of a claim is left on a finished document.
    assert mongo_db[SOURCE].count_documents({"claimed_by": {"$exists": True}}) == 0
    # Started in the same second, they are three jobs (the split of the work is not asserted: timing).
    assert mongo_db["jobs"].count_documents({}) == 3
    assert {r["processing_metadata"]["batch_job_id"] for r in mongo_db[RESULTS].find()} <= set(
        mongo_db["jobs"].distinct("_id"))


def test_an_abandoned_claim_is_taken_over_and_a_live_one_is_waited_for(batch_env, mongo_db, fake_ollama, caplog):
    from datetime import datetime, timedelta

    now = datetime.now(UTC)
    expired = insert(mongo_db, [make_conversation(i, status="processing", claimed_by="dead-worker", claim_id="t1",
                                                  lease_expires_at=now - timedelta(seconds=5)) for i in range(3)])
    # Left 'processing' by a processor of before leases: nobody renews it.
    legacy = insert(mongo_db, [make_conversation(10, status="processing")])
    # Held by a live processor (lease running): a batch run waits until it finishes or expires.
    live = insert(mongo_db, [make_conversation(20, status="processing", claimed_by="other-worker", claim_id="t2",
                                               lease_expires_at=now + timedelta(seconds=2))])
    fresh = insert(mongo_db, [make_conversation(30)])

    assert cli.main(["--worker-id", "me"]) == cli.EXIT_OK

    assert results_per_source(mongo_db) == {i: 1 for i in expired + legacy + live + fresh}
    assert statuses(mongo_db) == {"processed": 6}
    assert fake_ollama.chat_count == 6
    assert any("claimed by other live processors: waiting up to" in r.message for r in caplog.records)


def test_a_processor_that_lost_its_claim_never_overwrites_the_newer_state(batch_env, mongo_db, fake_ollama):
    # While the model answers, the document is reset to pending (edited by a user): the run's
    # status update must not mark it processed over that reset.
    [source_id] = insert(mongo_db, [make_conversation(1)])
    fake_ollama.latency = 0.5

    import threading

    def reset_while_classifying() -> None:
        if fake_ollama.wait_for_chats(1, timeout=20):
            mongo_db[SOURCE].update_one({"_id": source_id}, {"$set": {"status": "pending"},
                                                             "$unset": {"claim_id": "", "claimed_by": ""}})

    thread = threading.Thread(target=reset_while_classifying)
    thread.start()
    try:
        assert cli.main(["--limit", "1"]) == cli.EXIT_OK
    finally:
        thread.join()
    assert mongo_db[SOURCE].find_one({"_id": source_id})["status"] == "pending"


def test_a_killed_processor_s_claims_are_taken_over_by_another(start_processor, tmp_path, mongo_db, fake_ollama):
    ids = insert(mongo_db, [make_conversation(i) for i in range(30)])
    fake_ollama.latency = 0.3
    lease = {"BATCH_LEASE_SECONDS": "1.5"}
    victim = start_processor("--batch-size", "10", "--max-concurrent", "4", "--worker-id", "victim",
                             "--batch-files-dir", str(tmp_path / "victim"), **lease)
    wait_until(lambda: mongo_db[SOURCE].count_documents({"claimed_by": "victim"}) > 0, what="the victim's claims")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    held = mongo_db[SOURCE].count_documents({"claimed_by": "victim", "status": "processing"})
    assert held > 0, "killed too late to test a take-over"

    fake_ollama.latency = 0
    survivor = start_processor("--batch-size", "10", "--worker-id", "survivor",
                               "--batch-files-dir", str(tmp_path / "survivor"), **lease)
    output, _ = survivor.communicate(timeout=120)
    assert survivor.returncode == cli.EXIT_OK, output
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert statuses(mongo_db) == {"processed": 30}


def test_leases_are_renewed_while_a_slow_model_works(start_processor, tmp_path, mongo_db, fake_ollama):
    # Each answer takes longer than the lease: without renewal the second processor would take
    # the first one's conversations over and classify them again.
    ids = insert(mongo_db, [make_conversation(i) for i in range(6)])
    fake_ollama.latency = 2.0
    lease = {"BATCH_LEASE_SECONDS": "0.9"}
    first = start_processor("--max-concurrent", "6", "--worker-id", "first",
                            "--batch-files-dir", str(tmp_path / "first"), **lease)
    wait_until(lambda: fake_ollama.chat_count >= 6, what="the first processor's calls")
    second = start_processor("--worker-id", "second", "--batch-files-dir", str(tmp_path / "second"), **lease)
    for process in (first, second):
        output, _ = process.communicate(timeout=120)
        assert process.returncode == cli.EXIT_OK, output
    assert fake_ollama.chat_count == 6
    assert results_per_source(mongo_db) == {i: 1 for i in ids}


# --- edited conversations (issue 8 item 4) -----------------------------------------------------


def test_an_edited_conversation_reset_to_pending_is_classified_again(batch_env, mongo_db, fake_ollama):
    ids = insert(mongo_db, [make_conversation(i) for i in range(3)])
    assert cli.main([]) == cli.EXIT_OK
    first = {r["source_conversation_id"]: r for r in mongo_db[RESULTS].find()}
    edited = make_conversation(0, text="@AcmeCare actually it arrived today, thank you so much!")
    mongo_db[SOURCE].update_one({"_id": ids[0]}, {"$set": {"tweets": edited["tweets"], "status": "pending"}})
    mongo_db[SOURCE].update_one({"_id": ids[1]}, {"$set": {"status": "pending"}})  # reset, not edited

    assert cli.main([]) == cli.EXIT_OK

    assert fake_ollama.chat_count == 4  # the edited one only
    assert "it arrived today" in last_user_content(fake_ollama.chat_requests[-1])
    after = {r["source_conversation_id"]: r for r in mongo_db[RESULTS].find()}
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    assert after[ids[0]]["content_hash"] != first[ids[0]]["content_hash"]
    assert after[ids[0]]["processing_metadata"]["batch_job_id"] is not None
    assert after[ids[1]]["content_hash"] == first[ids[1]]["content_hash"]
    assert after[ids[1]]["processing_metadata"] == first[ids[1]]["processing_metadata"]
    assert statuses(mongo_db) == {"processed": 3}


def test_content_hash_depends_on_speakers_and_text_only():
    a = validate_conversation(make_conversation(1))
    same = validate_conversation({**make_conversation(1), "conversation_number": "other", "status": "x"})
    spaced = make_conversation(1)
    spaced["tweets"][0]["text"] = "  @AcmeCare my order 1   has not arrived and I am annoyed "
    flipped = make_conversation(1)
    flipped["tweets"][1]["inbound"] = True  # the reply now reads as the customer's
    assert content_hash(a) == content_hash(same) == content_hash(validate_conversation(spaced))
    assert content_hash(a) != content_hash(validate_conversation(flipped))
    assert content_hash(a) != content_hash(validate_conversation(make_conversation(2)))


# --- no customer turn (issue 8 item 3) -----------------------------------------------------------


def test_a_conversation_without_a_customer_turn_is_skipped_without_an_llm_call(batch_env, mongo_db, fake_ollama,
                                                                               capsys):
    good = insert(mongo_db, [make_conversation(1)])
    agent_only = make_conversation(2)
    agent_only["tweets"] = [t for t in agent_only["tweets"] if not t["inbound"]]
    blank_customer = make_conversation(3)
    blank_customer["tweets"][0]["text"] = "   "
    messages = {"conversation_number": "m4", "status": "pending",
                "messages": [{"sender": "agent", "text": "Hello, how can we help?"}]}
    skipped = insert(mongo_db, [agent_only, blank_customer, messages])

    assert cli.main([]) == cli.EXIT_OK  # nothing failed: there was nothing to classify

    assert fake_ollama.chat_count == 1
    assert set(results_per_source(mongo_db)) == set(good)
    for doc in mongo_db[SOURCE].find({"_id": {"$in": skipped}}):
        assert doc["status"] == "skipped"
        assert doc["error_type"] == "no_customer_turn"
        assert "no customer turn" in doc["failure_reason"]
    out = capsys.readouterr().out
    assert "skipped           3" in out and "classified        1" in out and "failed            0" in out
    # Terminal: not picked up again, not even by --retry-failed.
    assert cli.main(["--retry-failed"]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 1


# --- --retry-failed never loops (issue 8 item 7) ---------------------------------------------------


def garbled_for(marker: str) -> Callable[[dict[str, Any]], Reply | None]:
    return lambda request: Reply(content="no idea") if marker in last_user_content(request) else None


def test_retry_failed_ends_even_when_the_answers_stay_unusable(batch_env, monkeypatch, files_dir, mongo_db,
                                                               fake_ollama):
    monkeypatch.setenv("BATCH_RETRY_QUEUE_ATTEMPTS", "1")
    fake_ollama.responder = garbled_for("GARBLED")
    failed = insert(mongo_db, [make_conversation(i, text=f"GARBLED {i}", status="failed", failure_reason="earlier")
                               for i in range(4)])
    # Left 'processing' with no batch file (a lost folder): picked up without --retry-failed.
    orphan = insert(mongo_db, [make_conversation(10, status="processing")])

    assert cli.main(["--retry-failed", "--batch-size", "2"]) == cli.EXIT_INCOMPLETE

    # Each failed conversation was taken once by this run: one call, then one retry-queue pass.
    per_conversation = chats_per_conversation(fake_ollama)
    assert sorted(n for text, n in per_conversation.items() if "GARBLED" in text) == [2, 2, 2, 2]
    assert mongo_db[SOURCE].count_documents({"_id": {"$in": failed}, "status": "failed"}) == 4
    assert results_per_source(mongo_db) == {orphan[0]: 1}
    assert len(batch_files(files_dir)) <= 3
    # The next --retry-failed run takes them again, once each.
    assert cli.main(["--retry-failed"]) == cli.EXIT_INCOMPLETE
    assert fake_ollama.chat_count == 1 + 8 + 8


def test_continuous_retry_failed_does_not_reread_permanent_failures_every_cycle(start_processor, files_dir, mongo_db,
                                                                                 fake_ollama):
    fake_ollama.responder = garbled_for("GARBLED")
    [bad] = insert(mongo_db, [make_conversation(0, text="GARBLED forever", status="failed")])
    process = start_processor("--mode", "continuous", "--poll-interval", "0.1", "--retry-failed",
                              BATCH_RETRY_QUEUE_ATTEMPTS="2")
    wait_until(lambda: mongo_db[SOURCE].find_one({"_id": bad}).get("last_run_id") is not None, timeout=60,
               what="the failed conversation to be given up again")
    # Many poll cycles later (each new conversation needs at least one more cycle)...
    for i in range(1, 6):
        insert(mongo_db, [make_conversation(i)])
        wait_until(lambda n=i: statuses(mongo_db).get("processed") == n, timeout=60, what=f"conversation {i}")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == cli.EXIT_INCOMPLETE, output
    calls = sum("GARBLED" in last_user_content(r) for r in fake_ollama.chat_requests)
    assert calls == 3  # 1 attempt + 2 retry-queue passes, then never again in this run
    assert mongo_db[SOURCE].find_one({"_id": bad})["status"] == "failed"
    assert len(batch_files(files_dir)) <= 12
    assert output.count("GARBLED") == 0  # conversation text is not logged at INFO


# --- failure-rate stop (issue 8 item 12) ---------------------------------------------------------


def test_a_job_whose_model_answers_are_mostly_unusable_stops_and_leaves_the_rest_recoverable(
    batch_env, monkeypatch, mongo_db, fake_ollama, capsys
):
    monkeypatch.setenv("BATCH_FAILURE_WINDOW", "10")
    monkeypatch.setenv("BATCH_MAX_FAILURE_RATE", "0.2")
    fake_ollama.responder = lambda request: Reply(content="I think this customer is upset.")
    ids = insert(mongo_db, [make_conversation(i) for i in range(60)])
    # Invalid input does not count against the model.
    insert(mongo_db, [{"conversation_number": f"bad-{i}", "tweets": [], "status": "pending"} for i in range(15)])

    assert cli.main(["--batch-size", "5", "--max-concurrent", "2"]) == error_handler.EXIT_FAILURE_RATE

    err = capsys.readouterr().err
    assert "error: Stopped:" in err and "failed because of the model" in err
    assert "llm_bad_output" in err and "LLM_MODEL" in err and "BATCH_MAX_FAILURE_RATE=0" in err
    assert "Traceback" not in err
    assert fake_ollama.chat_count < 30  # it stopped early, not after burning the collection
    # Nothing the model failed on was marked failed: all of it is recoverable.
    assert mongo_db[SOURCE].count_documents({"_id": {"$in": ids}, "status": "failed"}) == 0
    assert mongo_db[SOURCE].count_documents({"_id": {"$in": ids}, "lease_expires_at": {"$gt": utcnow()}}) == 0

    fake_ollama.responder = None  # the model is fixed
    monkeypatch.setenv("BATCH_RETRY_QUEUE_ATTEMPTS", "1")
    assert cli.main(["--batch-size", "20"]) == cli.EXIT_INCOMPLETE  # (the invalid ones are failed)
    assert results_per_source(mongo_db) == {i: 1 for i in ids}


def test_failure_window_counts_model_failures_over_the_last_n():
    from batch_recorder import FailureWindow

    window = FailureWindow(4, 0.25)
    assert not window.record(("llm_bad_output", "x"))
    assert not window.record(("llm_bad_output", "x"))
    assert not window.record(None)
    assert window.record(None)  # full: 2 of 4 > 25 %
    for _ in range(4):
        window.record(None)
    assert not window.exceeded and window.failures == 0
    off = FailureWindow(2, 0)
    assert not off.record(("llm_timeout", "t")) and not off.record(("llm_timeout", "t"))
    assert off.most_common() == ("llm_timeout", 2, "t")


def utcnow() -> Any:
    from datetime import datetime

    return datetime.now(UTC)


# --- identical conversations (issue 9) -------------------------------------------------------------


def test_identical_conversations_are_classified_once_per_job(batch_env, mongo_db, fake_ollama):
    fake_ollama.latency = 0.2  # identical ones are in flight together: they wait for the first answer
    templates = [make_conversation(t) for t in range(3)]
    docs = [{**templates[i % 3], "conversation_number": f"dup-{i}"} for i in range(12)]
    ids = insert(mongo_db, docs)
    distinct = insert(mongo_db, [make_conversation(50)])

    assert cli.main(["--max-concurrent", "6", "--batch-size", "5"]) == cli.EXIT_OK

    assert fake_ollama.chat_count == 4
    results = {r["source_conversation_id"]: r for r in mongo_db[RESULTS].find()}
    assert set(results) == set(ids) | set(distinct)
    reused = [r for r in results.values() if r["processing_metadata"].get("classification_reused")]
    assert len(reused) == 9
    for result in reused:
        original = results[result["processing_metadata"]["reused_from"]]
        assert not original["processing_metadata"].get("classification_reused")
        assert original["content_hash"] == result["content_hash"]
        assert original["classification"] == result["classification"]
        assert result["conversation_number"] != original["conversation_number"]
    assert statuses(mongo_db) == {"processed": 13}


def test_recordings_in_flight_are_bounded_by_the_concurrency(batch_env, monkeypatch, mongo_db, fake_ollama):
    # The LLM slot is given back before the status update (issue 17), but the recordings must not pile up
    # without bound behind a database slower than the model: they were up to a whole batch per processor
    # (18 MongoDB commands in flight per process instead of 6-7 before, 3 processors on one SecantusDB,
    # counted in /tmp by a CommandListener: the extra load on the shared database). Counted, not timed: at
    # most BATCH_MAX_CONCURRENT recordings at once while each one is held back.
    monkeypatch.setenv("BATCH_MAX_CONCURRENT", "2")
    monkeypatch.setenv("MONGODB_BATCH_SIZE", "20")
    in_flight = 0
    most = 0

    class SlowRecording(BatchProcessor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            record = self.recorder.record

            async def held_back(*record_args: Any) -> None:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                try:
                    await asyncio.sleep(0.05)  # a database slower than the (instant) fake model
                    await record(*record_args)
                finally:
                    in_flight -= 1

            self.recorder.record = held_back  # type: ignore[method-assign]

    monkeypatch.setattr(cli, "BatchProcessor", SlowRecording)
    insert(mongo_db, [make_conversation(i) for i in range(20)])

    assert cli.main([]) == cli.EXIT_OK

    assert statuses(mongo_db) == {"processed": 20}
    assert fake_ollama.chat_count == 20
    assert 1 <= most <= 2
