"""The batch processor end to end: the real CLI against SecantusDB (MongoDB wire protocol) and the fake Ollama.

In-process runs (``cli.main``) cover the behaviour; subprocess runs cover what only a real
process can show: a SIGKILL mid-batch, continuous mode, SIGTERM/SIGINT.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

import cli
from config import Settings, env_name
from tests.fake_ollama import ErrorReply, FakeOllama, Reply, last_user_content
from tests.net_helpers import free_port
from utils.batch_file_manager import BatchFileManager

ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "support-classifier-batch"
SOURCE = "conversation_set"
RESULTS = "sentimental_analysis"


def make_conversation(i: int, text: str | None = None, **extra: Any) -> dict[str, Any]:
    """A source document in the design's conversation_set schema (a customer tweet and a reply)."""
    base = 100_000 + 10 * i
    return {
        "conversation_number": str(5000 + i),
        "tweets": [
            {"tweet_id": base, "author_id": f"cust{i}", "inbound": True,
             "created_at": "Tue Oct 31 21:45:10 +0000 2017",
             "text": text or f"@AcmeCare my order {i} has not arrived and I am annoyed"},
            {"tweet_id": base + 1, "author_id": "AcmeCare", "inbound": False,
             "created_at": "Tue Oct 31 21:50:10 +0000 2017",
             "text": f"@cust{i} Sorry to hear that, please DM us your order number."},
        ],
        "status": "pending",
        **extra,
    }


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


def batch_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("batch_*.json"))


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
        "OLLAMA_ENDPOINT": fake_ollama.url,
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
    assert checkpoint["last_object_id"] == str(no_status_ids[-1])
    out = capsys.readouterr().out
    assert "classified        23" in out


def test_result_documents_follow_the_design_schema(batch_env, mongo_db, fake_ollama):
    [source_id] = insert(mongo_db, [make_conversation(1)])
    assert cli.main([]) == cli.EXIT_OK

    result = mongo_db[RESULTS].find_one({})
    assert set(result) == {"_id", "conversation_number", "source_conversation_id", "classification",
                           "processing_metadata", "created_at"}
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
    assert "Customer: @AcmeCare my order 1 has not arrived" in sent
    assert "Agent: @cust1 Sorry to hear that" in sent

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
                                  "classification": {"intent": "Other"}})
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
    [queue] = list(files_dir.glob("batch_*_retry_queue.json"))
    [entry] = json.loads(queue.read_text())
    assert entry["status"] == "llm_failed"
    assert entry["conversation_id"] == str(bad)
    assert entry["retry_count"] == 1
    assert entry["classification_result"] is None
    assert "HTTP 500" in entry["reason"]
    assert entry["conversation_data"]["conversation_number"] == "5009"
    assert mongo_db[SOURCE].find_one({"_id": bad})["status"] == "processing"

    # Run 2: the start-up pass fails again -> given up, marked failed with its reason.
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert not list(files_dir.glob("batch_*_retry_queue.json"))
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


def test_unusable_model_output_is_queued_as_llm_failed(batch_env, files_dir, mongo_db, fake_ollama):
    fake_ollama.responder = lambda request: (
        Reply(content="I think this customer is upset.") if "GARBLED" in last_user_content(request) else None
    )
    insert(mongo_db, [make_conversation(1), make_conversation(2, text="GARBLED please help")])
    assert cli.main([]) == cli.EXIT_INCOMPLETE
    [queue] = list(files_dir.glob("batch_*_retry_queue.json"))
    [entry] = json.loads(queue.read_text())
    assert (entry["status"], entry["error_type"]) == ("llm_failed", "llm_bad_output")
    assert "no JSON object" in entry["reason"]


def test_write_failures_land_later_without_a_second_llm_call(batch_env, files_dir, mongo_db, fake_ollama, capsys):
    # A validator no result satisfies: every result write is rejected (a permanent error).
    mongo_db.create_collection(RESULTS, validator={"$jsonSchema": {"required": ["field_no_result_has"]}})
    ids = insert(mongo_db, [make_conversation(i) for i in range(5)])

    assert cli.main([]) == cli.EXIT_INCOMPLETE
    assert fake_ollama.chat_count == 5
    assert mongo_db[RESULTS].count_documents({}) == 0
    [queue] = list(files_dir.glob("batch_*_retry_queue.json"))
    entries = json.loads(queue.read_text())
    assert {e["status"] for e in entries} == {"write_failed"}
    assert {e["conversation_id"] for e in entries} == {str(i) for i in ids}
    assert all(e["classification_result"]["intent"] for e in entries)
    assert all("Document failed validation" in e["reason"] for e in entries)
    capsys.readouterr()

    mongo_db.command("collMod", RESULTS, validator={})
    assert cli.main([]) == cli.EXIT_OK
    assert fake_ollama.chat_count == 5  # written from the queue, the LLM was not asked again
    assert results_per_source(mongo_db) == {i: 1 for i in ids}
    stored = {r["source_conversation_id"]: r["classification"] for r in mongo_db[RESULTS].find()}
    assert stored == {ObjectId(e["conversation_id"]): e["classification_result"] for e in entries}
    assert statuses(mongo_db) == {"processed": 5}
    assert not list(files_dir.glob("batch_*_retry_queue.json"))


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
    assert not list(files_dir.glob("batch_*_retry_queue.json"))
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
    monkeypatch.setenv("OLLAMA_ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main([]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"error: Cannot reach Ollama at http://127.0.0.1:{port}" in err
    assert "ollama serve" in err
    assert "Traceback" not in err


def test_missing_model_names_the_pull_command(batch_env, monkeypatch, mongo_db, capsys):
    monkeypatch.setenv("OLLAMA_MODEL", "qwen3:8b")
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
        wait_until(lambda: mongo_db[RESULTS].count_documents({}) >= kill_after, what=f"{kill_after} results")
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
    assert not any(name.endswith(("_pending.json", "_retry_queue.json")) for name in batch_files(files_dir))


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
    assert f"holds the batch files of mongodb://" in err and f"{mongo_db.name}.conversation_set" in err
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
