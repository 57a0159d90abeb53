"""The batch processor's command line (cli.py) against real servers: what a user sees when the
batch files folder is damaged, unusable or shared, and which database a folder belongs to."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from bson import ObjectId

import cli
from mongo_client import mongodb_address
from tests.net_helpers import free_port
from tests.test_batch_processor import (  # noqa: F401 (fixtures)
    SOURCE,
    batch_env,
    files_dir,
    insert,
    make_conversation,
    pymongo_monitor_socket_leak_ignored,
    statuses,
)
from utils.batch_file_manager import BatchConversation, BatchFileManager, PendingBatch, read_json


def _pending(files: BatchFileManager, number: int, docs: list[dict], ids: list[ObjectId]) -> Path:
    conversations = [
        BatchConversation(str(i), {k: d[k] for k in ("conversation_number", "tweets")}) for d, i in zip(docs, ids)
    ]
    return files.write_pending(PendingBatch(number, "batch_earlier", conversations))


def test_a_truncated_batch_file_is_quarantined_and_the_run_goes_on(batch_env, files_dir, mongo_db, fake_ollama,
                                                                   caplog):
    docs = [make_conversation(i, status="processing") for i in range(3)]
    ids = insert(mongo_db, docs)
    files = BatchFileManager(files_dir)
    files.prepare()
    damaged = _pending(files, 1, docs[:2], ids[:2])
    truncated = damaged.read_bytes()[:100]
    damaged.write_bytes(truncated)
    _pending(files, 2, docs[2:], ids[2:])
    caplog.set_level(logging.WARNING)

    assert cli.main([]) == cli.EXIT_OK
    assert (files_dir / "quarantine" / "batch_001_pending.json").read_bytes() == truncated
    assert not damaged.exists()
    assert any("batch_001_pending.json" in r.message and "quarantine" in r.message for r in caplog.records)
    assert mongo_db[SOURCE].find_one({"_id": ids[2]})["status"] == "processed"
    # The quarantined batch's conversations wait in 'processing' until --retry-failed takes them.
    assert statuses(mongo_db) == {"processing": 2, "processed": 1}
    assert cli.main(["--retry-failed"]) == cli.EXIT_OK
    assert statuses(mongo_db) == {"processed": 3}
    assert (files_dir / "quarantine" / "batch_001_pending.json").exists()  # kept, never deleted


# --- the batch files folder ---------------------------------------------------------------------


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def test_a_folder_that_cannot_be_created_exits_3_with_one_line(batch_env, monkeypatch, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("BATCH_FILES_DIR", str(tmp_path / "a_file" / "batch_files"))
    assert cli.main([]) == cli.EXIT_CONFIG == 3
    err = capsys.readouterr().err
    assert "Cannot create the batch files folder" in _one_line_error(err)
    assert "BATCH_FILES_DIR" in err


def test_a_read_only_folder_exits_3_with_one_line(batch_env, monkeypatch, tmp_path, capsys):
    if os.geteuid() == 0:
        folder = Path("/sys")  # root ignores file modes; sysfs refuses new files to everyone
    else:
        folder = tmp_path / "read_only"
        folder.mkdir(mode=0o555)
    monkeypatch.setenv("BATCH_FILES_DIR", str(folder))
    assert cli.main([]) == 3
    assert f"{folder} is not writable" in _one_line_error(capsys.readouterr().err)


def test_a_refused_second_processor_leaves_the_running_ones_files_alone(batch_env, files_dir, mongo_db, capsys):
    with BatchFileManager(files_dir).locked():
        in_progress = files_dir / f".batch_007_pending.json.{os.getpid()}.tmp"
        in_progress.write_text('{"half": "written"}')
        assert cli.main([]) == cli.EXIT_FAILURE
        assert in_progress.read_text() == '{"half": "written"}'
    assert "Another batch processor" in capsys.readouterr().err


def test_a_run_that_never_reaches_mongodb_does_not_tie_the_folder(batch_env, files_dir, monkeypatch, mongo_db,
                                                                  fake_ollama):
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", f"mongodb://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "500")
    with pymongo_monitor_socket_leak_ignored():
        assert cli.main([]) == cli.EXIT_UNAVAILABLE
    assert not (files_dir / "target.json").exists()
    # The right database may then use the folder.
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", batch_env["MONGODB_CONNECTION_STRING"])
    insert(mongo_db, [make_conversation(1)])
    assert cli.main([]) == cli.EXIT_OK
    assert (files_dir / "target.json").exists()


def test_two_spellings_of_one_address_are_the_same_database(batch_env, files_dir, monkeypatch, mongo_db,
                                                            fake_ollama):
    uri = batch_env["MONGODB_CONNECTION_STRING"]
    host_port = uri.split("://", 1)[1].rstrip("/").split("/")[0].split("?")[0]
    insert(mongo_db, [make_conversation(1)])
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", f"mongodb://{host_port}/?appname=x")
    assert cli.main([]) == cli.EXIT_OK
    tied = read_json(files_dir / "target.json")["target"]
    insert(mongo_db, [make_conversation(2)])
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", host_port)
    assert cli.main([]) == cli.EXIT_OK
    assert read_json(files_dir / "target.json")["target"] == tied
    assert statuses(mongo_db) == {"processed": 2}


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("localhost:27017", "mongodb://localhost:27017"),
        ("mongodb://localhost:27017", "mongodb://localhost:27017"),
        ("mongodb://localhost", "mongodb://localhost:27017"),
        ("  mongodb://LocalHost:27017/?retryWrites=true ", "mongodb://localhost:27017"),
        ("mongodb://user:p%40ss@localhost:27017/admin", "mongodb://localhost:27017"),
        ("mongodb://user:pa/ss@db2:27018,db1/customer_support?replicaSet=rs0", "mongodb://db1:27017,db2:27018"),
        ("mongodb://[::1]", "mongodb://[::1]:27017"),
        ("mongodb+srv://user:pw@Cluster0.example.net/?w=majority", "mongodb+srv://cluster0.example.net"),
    ],
)
def test_mongodb_address_spells_an_address_one_way(uri: str, address: str) -> None:
    assert mongodb_address(uri) == address
    assert "pw" not in mongodb_address(uri) and "ss" not in mongodb_address(uri)
