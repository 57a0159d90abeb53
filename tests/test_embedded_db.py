"""Tests of utils/embedded_db.py with the real SecantusDB of the virtualenv, started as a child process."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from config import Settings, load_settings
from error_handler import ConfigError, StorageUnavailableError
from utils.embedded_db import embedded_database


def _settings(data_dir: Path) -> Settings:
    return load_settings({"embedded_db_path": data_dir}, environ={}, env_file=None)


def _port(uri: str) -> int:
    return int(uri.rstrip("/").rsplit(":", 1)[1])


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _database_children(port: int) -> list[int]:
    """Pids of this process's children running SecantusDB on ``port`` (read from /proc)."""
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
        if parent == os.getpid() and b"secantus" in cmdline and str(port).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _client(uri: str) -> MongoClient[dict[str, Any]]:
    return MongoClient(uri, serverSelectionTimeoutMS=5000)


@pytest.fixture(autouse=True)
def stopped_gracefully(caplog: pytest.LogCaptureFixture) -> Any:
    """Every database of a test is stopped by SIGTERM, never killed (a kill is logged as a warning)."""
    with caplog.at_level(logging.DEBUG, logger="utils.embedded_db"):
        yield
    kills = [r.getMessage() for r in caplog.records if r.name == "utils.embedded_db" and r.levelno >= logging.WARNING]
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
    assert not _accepts_connections(port)
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
        with pytest.raises(StorageUnavailableError) as raised:
            with embedded_database(settings):
                pytest.fail("a second database started on the same folder")
        assert raised.value.hint is not None
        assert "Another program is using" in raised.value.hint
        assert str(tmp_path / "db") in raised.value.hint
        client = _client(uri)  # the first one is unharmed
        try:
            assert client.admin.command("ping")["ok"] == 1
        finally:
            client.close()
    assert not _accepts_connections(port)
    assert _database_children(port) == []


def test_missing_secantusdb_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is the import system's documented way to make a module
    # unimportable (find_spec returns None for it); monkeypatch restores the real entry afterwards.
    monkeypatch.setitem(sys.modules, "secantus", None)
    with pytest.raises(ConfigError) as raised:
        with embedded_database(_settings(tmp_path / "db")):
            pytest.fail("started without SecantusDB")
    assert "SecantusDB" in raised.value.message
    assert raised.value.hint is not None
    assert "requirements-dev.txt" in raised.value.hint
    assert not (tmp_path / "db").exists()  # nothing was created or started
