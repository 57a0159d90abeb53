"""Tests of utils/embedded_db.py with the real SecantusDB of the virtualenv, started as a child process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient, WriteConcern

from config import Settings, load_settings
from error_handler import ConfigError, StorageUnavailableError
from utils.child_process import accepts_connections, threads_running
from utils.command_line import free_port
from utils.embedded_db import PID_FILE, embedded_database

ROOT = Path(__file__).resolve().parents[1]


def _settings(data_dir: Path) -> Settings:
    return load_settings({"embedded_db_path": data_dir}, environ={}, env_file=None)


def _port(uri: str) -> int:
    return int(uri.rstrip("/").rsplit(":", 1)[1])


def _database_children(port: int, parent_pid: int | None = None) -> list[int]:
    """Pids of this (or ``parent_pid``'s) children running SecantusDB on ``port`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        if parent == (parent_pid or os.getpid()) and b"secantus" in cmdline and str(port).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _client(uri: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000)


@pytest.fixture(autouse=True)
def stopped_gracefully(caplog: pytest.LogCaptureFixture) -> Any:
    """Every database of a test is stopped by SIGTERM, never killed (a kill is logged as a warning)."""
    # The stop itself is utils.child_process's (shared with the embedded model).
    loggers = ("utils.embedded_db", "utils.child_process")
    with caplog.at_level(logging.DEBUG, logger="utils.embedded_db"), caplog.at_level(logging.DEBUG,
                                                                                    logger="utils.child_process"):
        yield
    kills = [r.getMessage() for r in caplog.records if r.name in loggers and r.levelno >= logging.WARNING
             and not r.getMessage().startswith("stopping a stale embedded database")]  # not ours: a crashed run's
    assert kills == []


def test_embedded_database_serves_pymongo_and_stops_on_exit(tmp_path: Path) -> None:
    with embedded_database(_settings(tmp_path / "db")) as uri:
        port = _port(uri)
        assert uri.startswith("mongodb://127.0.0.1:")
        assert len(_database_children(port)) == 1
        client = _client(uri)
        try:
            client.demo.items.insert_one({"name": "first", "n": 1})
            assert client.demo.items.find_one({"name": "first"}, {"_id": 0}) == {"name": "first", "n": 1}
        finally:
            client.close()
    assert not accepts_connections(port)
    assert _database_children(port) == []
    assert (tmp_path / "db" / "secantusdb.log").exists()


def test_embedded_data_persists_across_restarts(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "db")
    with embedded_database(settings) as uri:
        client = _client(uri)
        try:
            client.demo.items.insert_many([{"n": i} for i in range(3)])
        finally:
            client.close()
    with embedded_database(settings) as uri:
        client = _client(uri)
        try:
            assert sorted(doc["n"] for doc in client.demo.items.find()) == [0, 1, 2]
        finally:
            client.close()


def test_two_embedded_databases_on_one_folder_are_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "db")
    with embedded_database(settings) as uri:
        port = _port(uri)
        with pytest.raises(StorageUnavailableError) as raised, embedded_database(settings):
            pytest.fail("a second database started on the same folder")
        assert raised.value.hint is not None
        assert "Another program is using" in raised.value.hint
        assert str(tmp_path / "db") in raised.value.hint
        client = _client(uri)  # the first one is unharmed
        try:
            assert client.admin.command("ping")["ok"] == 1
        finally:
            client.close()
    assert not accepts_connections(port)
    assert _database_children(port) == []


def test_missing_secantusdb_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is the import system's documented way to make a module
    # unimportable (find_spec returns None for it); monkeypatch restores the real entry afterwards.
    monkeypatch.setitem(sys.modules, "secantus", None)
    with pytest.raises(ConfigError) as raised, embedded_database(_settings(tmp_path / "db")):
        pytest.fail("started without SecantusDB")
    assert "SecantusDB" in raised.value.message
    assert raised.value.hint is not None
    assert "requirements-dev.txt" in raised.value.hint
    assert not (tmp_path / "db").exists()  # nothing was created or started


# --- a crashed owner (issue 8, item 9) ------------------------------------------------------------

PARENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from config import load_settings
from utils.embedded_db import embedded_database
with embedded_database(load_settings({"embedded_db_path": sys.argv[2]}, environ={}, env_file=None)) as uri:
    print(uri, flush=True)
    time.sleep(600)
"""


# True while a thread of the pid runs (a zombie, holding no port and no file, counts as gone).
_alive = threads_running


def _wait_gone(pid: int, bound: float = 60.0) -> bool:
    """Wait until ``pid`` is gone; the bound only ends a failing test, it is not a timed assertion."""
    deadline = time.monotonic() + bound
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_server_dies_with_its_killed_parent_and_a_new_start_works(tmp_path: Path) -> None:
    data_dir = tmp_path / "db"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT), str(data_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = 0
    try:
        assert parent.stdout is not None
        uri = parent.stdout.readline().strip()
        assert uri.startswith("mongodb://127.0.0.1:"), parent.stderr.read() if parent.stderr else ""
        [server] = _database_children(_port(uri), parent.pid)
        pid_file = data_dir / PID_FILE
        record = json.loads(pid_file.read_text(encoding="utf-8")) if pid_file.exists() else {}
        client = _client(uri)
        try:
            # Acknowledged with the journal (j): a crash may lose only what was never acknowledged so.
            client.demo.get_collection("items", write_concern=WriteConcern(j=True)).insert_one(
                {"written": "before the crash"})
        finally:
            client.close()

        parent.send_signal(signal.SIGKILL)  # as the OOM killer would: no chance to stop the server
        parent.wait()

        assert _wait_gone(server), "the embedded database outlived its killed parent"
        assert (record.get("pid"), record.get("owner_pid")) == (server, parent.pid)  # for a stale server's sake
        assert not accepts_connections(_port(uri))
        with embedded_database(_settings(data_dir)) as again:
            client = _client(again)
            try:
                assert client.demo.items.find_one({}, {"_id": 0}) == {"written": "before the crash"}
            finally:
                client.close()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()


def test_stale_server_of_a_crashed_run_is_stopped_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A server that outlived its owner (started here without dying with its parent), and the
    # pid file naming an owner that has ended.
    data_dir = tmp_path / "db"
    data_dir.mkdir()
    port = free_port()
    stale = subprocess.Popen(
        [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port), "--storage-path",
         str(data_dir), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        owner = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True)
        (data_dir / PID_FILE).write_text(json.dumps({"pid": stale.pid, "owner_pid": int(owner.stdout), "port": port}))
        deadline = time.monotonic() + 60
        while not accepts_connections(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert accepts_connections(port)

        with embedded_database(_settings(data_dir)) as uri:
            assert stale.poll() is not None  # stopped before the new server started
            client = _client(uri)
            try:
                assert client.admin.command("ping")["ok"] == 1
            finally:
                client.close()
        warnings = [r.getMessage() for r in caplog.records if r.name == "utils.embedded_db"
                    and r.levelno == logging.WARNING]
        assert warnings == [f"stopping a stale embedded database (pid {stale.pid}) left on {data_dir} by a run "
                            "that ended without stopping it"]
        assert not (data_dir / PID_FILE).exists()
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()


def test_a_failed_pid_file_write_leaves_no_server_running(tmp_path: Path) -> None:
    # A folder where the pid file's temporary file goes makes the write fail (as a full disk would)
    # after the server was started: the server must be stopped, not left running unrecorded.
    data_dir = tmp_path / "db"
    data_dir.mkdir()
    (data_dir / f".{PID_FILE}.{os.getpid()}.tmp").mkdir()
    with pytest.raises(OSError), embedded_database(_settings(data_dir)):
        pytest.fail("started without its pid file")
    assert _servers_on(data_dir) == []


def _servers_on(data_dir: Path) -> list[int]:
    """Pids of this process's children running SecantusDB with their data in ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and str(data_dir).encode() in cmdline:
            pids.append(int(entry.name))
    return pids
