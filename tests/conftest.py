"""Shared fixtures: real servers on loopback, each stopped by the fixture that started it.

* ``fake_ollama``: the fake Ollama HTTP server of ``fakes/ollama.py`` (fresh per test).
* ``make_settings``: settings that ignore the developer's environment and ``.env``.
* ``api_server``: the real FastAPI app under uvicorn on a loopback port.
* ``mongo_uri`` / ``mongo_db``: a SecantusDB server (MongoDB wire protocol) for the
  session, and a fresh database per test, dropped afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config import Settings, load_settings
from fakes.ollama import FakeOllama

SettingsFactory = Callable[..., Settings]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-llm", action="store_true",
                     help="also collect tests/llm: a real llama.cpp server and model (make test-llm)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # tests/llm needs a built llama-server and a 98 MB model: `make test` stays fast and build-free.
    if collection_path == Path(__file__).resolve().parent / "llm" and not config.getoption("--real-llm"):
        return True
    return None


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Commands run in-process (``evaluate.main``, ``export_reviewed.main``, ...) configure logging for
    the whole process (evaluate sets the root to ERROR): put the root logger back after each test, so
    a test's log assertions never depend on which tests ran before it."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers and getattr(handler, "_classifier_handler", False):
            root.removeHandler(handler)


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture
def make_settings(fake_ollama: FakeOllama, tmp_path: Path) -> SettingsFactory:
    """``make_settings(**overrides)``: settings pointing at the fake Ollama, isolated from the machine."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_endpoint": fake_ollama.url,
            "ollama_timeout": 5,
            "batch_files_dir": tmp_path / "batch_files",
        }
        values.update(overrides)
        return load_settings(values, environ={}, env_file=None)

    return build


@dataclass
class RunningAPI:
    url: str
    settings: Settings


@pytest.fixture
def start_api() -> Iterator[Callable[[Settings], RunningAPI]]:
    """``start_api(settings)``: serve the app over real HTTP on 127.0.0.1; stopped after the test."""
    import uvicorn

    from api import create_app

    started: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(settings: Settings) -> RunningAPI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(settings), log_config=None, access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.01)
        return RunningAPI(f"http://127.0.0.1:{port}", settings)

    yield start
    for server, thread, sock in started:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def api_server(make_settings: SettingsFactory, start_api: Callable[[Settings], RunningAPI]) -> RunningAPI:
    """The API with default settings, talking to the test's fake Ollama."""
    return start_api(make_settings())


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A SecantusDB server for the whole session (in memory, test commands such as failpoints enabled)."""
    from secantus import SecantusDBServer

    with SecantusDBServer(port=0, storage_path=":memory:", enable_test_commands=True) as server:
        yield server.uri


@pytest.fixture
def mongo_db_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mongo_db(mongo_uri: str, mongo_db_name: str) -> Iterator[Any]:
    """A synchronous PyMongo handle on a fresh database (for arranging and checking data)."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        yield client[mongo_db_name]
    finally:
        client.drop_database(mongo_db_name)
        client.close()
