"""The batch processor's command line (cli.py) against real servers: what a user sees when the
batch files folder is damaged, unusable or shared, and which database a folder belongs to."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bson import ObjectId

import cli
from config import Settings, env_name
from error_handler import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    BatchFileError,
    BatchFolderError,
    ConfigError,
    LLMUnavailableError,
    StorageError,
    StorageUnavailableError,
    UsageError,
    exit_code_for,
    run_command,
)
from mongo_client import mongodb_address
from tests import test_batch_processor
from tests.test_batch_processor import (
    insert,
    make_conversation,
    pymongo_monitor_socket_leak_ignored,
    statuses,
)
from utils.atomic_files import read_json
from utils.batch_file_manager import BatchConversation, BatchFileManager, PendingBatch
from utils.command_line import free_port, non_empty_text, positive_float, positive_int

# The batch processor's fixtures: this test's database, fake Ollama and batch files folder.
batch_env = test_batch_processor.batch_env
files_dir = test_batch_processor.files_dir


def _pending(files: BatchFileManager, number: int, docs: list[dict], ids: list[ObjectId]) -> Path:
    conversations = [
        BatchConversation(str(i), {k: d[k] for k in ("conversation_number", "tweets")})
        for d, i in zip(docs, ids, strict=True)
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
    # The quarantined batch's conversations were left 'processing' with no claim of a live
    # processor: they are taken over in the same run (claims with leases), nothing is lost.
    assert statuses(mongo_db) == {"processed": 3}
    assert fake_ollama.chat_count == 3
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


def test_with_both_services_down_the_error_is_mongodbs(batch_env, files_dir, monkeypatch, capsys):
    # The LLM check runs alongside MongoDB's round trips (cli.check_services); the error reported is
    # still the one of the first service the run needs, as when the checks ran one after the other.
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", f"mongodb://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "500")
    monkeypatch.setenv("LLM_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pymongo_monitor_socket_leak_ignored():
        assert cli.main([]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert _one_line_error(err).startswith("error: Cannot reach MongoDB at "), err
    assert "Ollama" not in err
    assert not (files_dir / "target.json").exists()


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
        ("mongodb://user:pass%40word@localhost:27017/admin", "mongodb://localhost:27017"),
        ("mongodb://user:pa/ss@db2:27018,db1/customer_support?replicaSet=rs0", "mongodb://db1:27017,db2:27018"),
        ("mongodb://[::1]", "mongodb://[::1]:27017"),
        ("mongodb+srv://user:pass@Cluster0.example.net/?w=majority", "mongodb+srv://cluster0.example.net"),
    ],
)
def test_mongodb_address_spells_an_address_one_way(uri: str, address: str) -> None:
    assert mongodb_address(uri) == address
    assert "pw" not in mongodb_address(uri) and "ss" not in mongodb_address(uri)


# --- one command-line edge ------------------------------------------------------------------------


def test_help_lists_every_setting_without_a_flag_from_the_settings_themselves(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    epilog = text[text.index("other settings"):]
    for name, info in Settings.model_fields.items():
        if name in cli.FLAG_SETTINGS or name.startswith("api_") or name == "log_level":
            continue
        assert env_name(name) in epilog, name
        assert (info.description or "")[:40] in epilog.replace("\n", " ")
    for code in (EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_INCOMPLETE, EXIT_INTERRUPTED):
        assert f"  {code} " in epilog[epilog.index("exit codes"):]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad"), EXIT_CONFIG),
        (UsageError("bad"), EXIT_USAGE),
        (StorageUnavailableError("down"), EXIT_UNAVAILABLE),
        (LLMUnavailableError("down"), EXIT_UNAVAILABLE),
        (StorageError("lost"), EXIT_FAILURE),
        (BatchFileError("locked"), EXIT_FAILURE),
        (BatchFolderError("read-only"), EXIT_CONFIG),
        (KeyboardInterrupt(), EXIT_INTERRUPTED),
        (RuntimeError("bug"), EXIT_FAILURE),
    ],
)
def test_exit_code_for_each_kind_of_error(error: BaseException, code: int) -> None:
    assert exit_code_for(error) == code


def test_run_command_prints_one_error_and_returns_its_code(capsys):
    def broken() -> int:
        raise ConfigError("BATCH_MAX_CONCURRENT must be at least 1", hint="Fix .env")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command(lambda: 0) == EXIT_OK
    assert run_command(broken) == EXIT_CONFIG
    assert capsys.readouterr().err == "error: BATCH_MAX_CONCURRENT must be at least 1\n  Fix .env\n"
    assert run_command(interrupted, interrupted="stopped; rerun to continue") == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "stopped; rerun to continue\n"


@pytest.mark.parametrize("text", ["0", "-3", "x", "1.5", ""])
def test_positive_int_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int(text)


def test_positive_numbers_accept_what_they_should() -> None:
    assert positive_int("12") == 12
    assert positive_float("0.5") == 0.5
    for text in ("0", "-1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(text)


def test_non_empty_text_folds_white_space_and_refuses_none() -> None:
    assert non_empty_text("  before\n the  fix ") == "before the fix"
    for text in ("", "  ", "\n\t"):
        with pytest.raises(argparse.ArgumentTypeError, match="must not be empty"):
            non_empty_text(text)


def test_a_bad_count_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--batch-size", "0"])
    assert exit_info.value.code == EXIT_USAGE
    assert "must be at least 1" in capsys.readouterr().err


def test_free_port_is_free() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


#: Libraries the batch processor's start-up must not import (issue 19: its fixed cost is mostly
#: imports): the API's synchronous HTTP client (requests, urllib3) and web framework (fastapi,
#: starlette), the retrieval's numpy/scipy/bm25s, the console bar's rich, aiohttp, which the first
#: chat imports (the readiness check is a GET over http.client), python-dotenv (only with a .env
#: file) and ctypes (only to start a child server).
NOT_AT_START_UP = ("requests", "urllib3", "fastapi", "starlette", "numpy", "scipy", "bm25s", "rich", "aiohttp",
                   "dotenv", "ctypes")


def test_start_up_imports_only_what_a_batch_run_uses() -> None:
    probe = f"import sys, cli; print(sorted(m for m in {NOT_AT_START_UP!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"


def test_a_run_with_nothing_to_classify_imports_none_of_them(batch_env: dict[str, str], files_dir: Path) -> None:
    # The whole run, the MongoDB and LLM checks included: the readiness check reached the fake
    # Ollama (exit 0, not 4) without aiohttp.
    probe = (f"import sys, cli; code = cli.main(['--mode', 'batch']); "
             f"print(code, sorted(m for m in {NOT_AT_START_UP!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{EXIT_OK} []", result.stdout
