"""LLM_ENDPOINT=embedded (OLLAMA_ENDPOINT, its former name, too) with the real llama-server and
SmolLM2-135M (make test-llm).

``python main.py`` and ``python batch_processor.py`` start the embedded model as their child and
classify through it; it stops with them, dies with a killed parent (kill -9), and a server a
crashed run left behind is stopped at the next start while one whose owner still runs is left
alone. Every run folder (pid files, logs) is the test's own (XDG_CACHE_HOME).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from classifier import ConversationClassifier
from config import Settings, env_names, load_settings
from tests.test_dashboard_browser import CHROMEDRIVER, CHROMIUM, browser, wait_until  # noqa: F401 (fixture)
from utils.child_process import PidFile, process_info, threads_running
from utils.command_line import free_port
from utils.embedded_llm import ALIAS, NOTE, LlamaServer, find_binary, model_path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = json.loads((ROOT / "data" / "sample_conversations.json").read_text(encoding="utf-8"))
#: make test-llm builds llama-server once and names it here; run alone, the cached build.
BINARY = os.environ.get("LLAMA_SERVER_BIN") or str(find_binary() or "")
README_EXAMPLE = {
    "conversation_number": "12345",
    "messages": [
        {"sender": "customer", "text": "Where is my order? It was due on Monday."},
        {"sender": "agent", "text": "Let me check for you."},
        {"sender": "customer", "text": "Can you expedite shipping?"},
        {"sender": "agent", "text": "I have requested expedited shipping."},
    ],
}
WAIT_SECONDS = 240  # bounds that only end a failing test: a cold start on 2 busy cores takes seconds

pytestmark = pytest.mark.timeout(1800)


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """No setting of this environment under any name; the embedded model (LLM_ENDPOINT, unless
    ``variables`` name it by its former name OLLAMA_ENDPOINT). OLLAMA_TIMEOUT: the embedded default."""
    settings = {name for field in Settings.model_fields for name in env_names(field)}
    env = {key: value for key, value in os.environ.items() if key not in settings}
    endpoint = {} if "OLLAMA_ENDPOINT" in variables else {"LLM_ENDPOINT": "embedded"}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "cache"), "LLAMA_SERVER_BIN": BINARY, **endpoint, **variables})
    return env


def _runs(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "support-classifier" / "run"


def _embedded_servers(parent: int) -> list[int]:
    """Pids of ``parent``'s children that are the embedded model's llama-server (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := process_info(int(entry.name))) is not None:
            _, ppid, cmdline = info
            if ppid == parent and cmdline[0].endswith(b"llama-server") and ALIAS.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while threads_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not threads_running(pid)


@dataclass
class API:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture
def start_main(tmp_path: Path) -> Iterator[Any]:
    """``start_main()``: ``python main.py`` on LLM_ENDPOINT=embedded, waited for until /ready answers 200."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> API:
        port = free_port()
        log = tmp_path / f"main-{port}.log"
        env = _env(tmp_path, API_HOST="127.0.0.1", API_PORT=str(port), LOG_LEVEL="INFO")
        with log.open("wb") as output:
            process = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                                       stdout=output, stderr=subprocess.STDOUT)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            assert process.poll() is None, f"main.py exited with {process.returncode}:\n{log.read_text()}"
            try:
                if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                    return API(process, url, log)
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"main.py never got ready:\n{log.read_text()}"
            time.sleep(0.2)

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def test_the_api_classifies_with_the_embedded_model_and_names_it(start_main: Any, tmp_path: Path) -> None:
    api = start_main()
    [server] = _embedded_servers(api.process.pid)
    [pid_file] = _runs(tmp_path).glob("llama-server-*.pid")
    assert PidFile(pid_file).read()["pid"] == server and PidFile(pid_file).read()["owner_pid"] == api.process.pid

    with requests.Session() as http:
        ready = http.get(f"{api.url}/ready", timeout=30).json()
        assert ready["embedded"] == NOTE == "SmolLM2-135M (llama.cpp), labels are rough"
        assert ready["model"] == ALIAS and ready["endpoint"].startswith("http://127.0.0.1:")
        answer = http.post(f"{api.url}/classify", json=README_EXAMPLE, timeout=600)
        assert answer.status_code == 200, answer.text
        classification = answer.json()["classification"]
        taxonomy = ConversationClassifier.from_settings(load_settings(environ={}, env_file=None)).taxonomy
        for kind in ("intent", "topic", "sentiment"):  # a 135M model's labels are rough, but valid
            assert classification[kind] in taxonomy.names(kind), classification
        assert http.get(f"{api.url}/api/model", timeout=30).json() == {"model": ALIAS, "embedded": NOTE}
    assert "WARNING - utils.embedded_llm - using the embedded model SmolLM2-135M" in api.log.read_text()

    api.process.send_signal(signal.SIGTERM)  # as a service manager stops it
    # uvicorn shuts down, then re-raises the signal it caught: the exit status says SIGTERM.
    assert api.process.wait(120) in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in api.log.read_text()
    try:
        assert _wait_gone(server), "llama-server outlived the API that stopped"
    finally:
        if threads_running(server):  # the test failed: still, leave no server behind
            os.kill(server, signal.SIGKILL)
    assert list(_runs(tmp_path).glob("llama-server-*")) == []  # pid file and log removed
    assert "Traceback" not in api.log.read_text()


def test_the_model_server_dies_with_its_killed_api_and_the_next_start_clears_its_record(
    start_main: Any, tmp_path: Path
) -> None:
    api = start_main()
    [server] = _embedded_servers(api.process.pid)
    [pid_file] = _runs(tmp_path).glob("llama-server-*.pid")

    api.process.send_signal(signal.SIGKILL)  # as the OOM killer would: no chance to stop its child
    api.process.wait(60)
    try:
        assert _wait_gone(server), "llama-server outlived its killed parent"
    finally:
        if threads_running(server):  # the test failed: still, leave no server behind
            os.kill(server, signal.SIGKILL)
    assert pid_file.exists()  # the record of a run that ended without stopping its server
    with LlamaServer(binary=BINARY, runs=_runs(tmp_path)) as again:
        assert not pid_file.exists()  # recognised: names no running server any more
        assert requests.get(f"{again.url}/health", timeout=30).status_code == 200


def _start_stray(tmp_path: Path, owner: int) -> tuple[subprocess.Popen[bytes], Path]:
    """llama-server started as the embedded model is, but not dying with its parent (as on another
    platform), recorded with ``owner`` as the program that started it."""
    model = model_path()
    assert model is not None
    stray = LlamaServer(binary=BINARY, runs=_runs(tmp_path))
    stray.port = free_port()
    process = subprocess.Popen(stray.command(Path(BINARY), model), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    pid_file = _runs(tmp_path) / f"llama-server-{stray.port}.pid"
    pid_file.write_text(json.dumps({"pid": process.pid, "owner_pid": owner, "port": stray.port}))
    return process, pid_file


def test_a_stale_server_is_stopped_at_start_and_one_in_use_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _runs(tmp_path).mkdir(parents=True)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    stale, stale_file = _start_stray(tmp_path, int(ended.stdout))  # its owner has ended
    in_use, in_use_file = _start_stray(tmp_path, os.getpid())  # its owner (this test) still runs it
    try:
        with caplog.at_level(logging.WARNING, logger="utils.embedded_llm"), \
                LlamaServer(binary=BINARY, runs=_runs(tmp_path)) as server:
            assert stale.wait(60) is not None  # stopped before the new server started
            assert in_use.poll() is None and in_use_file.exists()
            assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
        assert not stale_file.exists()
        stale_port = stale_file.stem.rsplit("-", 1)[1]
        assert [r.getMessage() for r in caplog.records if r.name == "utils.embedded_llm"] == [
            f"stopping a stale embedded model (llama-server pid {stale.pid} on port {stale_port}) "
            "left by a run that ended without stopping it"]
    finally:
        for process in (stale, in_use):
            if process.poll() is None:
                process.kill()
            process.wait()


def test_the_batch_processor_classifies_with_the_embedded_model_and_stops_it(
    tmp_path: Path, mongo_uri: str, mongo_db_name: str, mongo_db: Any
) -> None:
    mongo_db["conversation_set"].insert_many([dict(conversation) for conversation in SAMPLE[:4]])
    # The former name of the setting starts it as well.
    env = _env(tmp_path, OLLAMA_ENDPOINT="embedded", MONGODB_CONNECTION_STRING=mongo_uri,
               MONGODB_DATABASE_NAME=mongo_db_name, BATCH_FILES_DIR=str(tmp_path / "batch_files"),
               BATCH_MAX_CONCURRENT="2")
    result = subprocess.run([sys.executable, str(ROOT / "batch_processor.py"), "--monitoring-mode", "production"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "classified        4" in result.stdout
    assert "using the embedded model SmolLM2-135M" in result.stderr
    results = list(mongo_db["sentimental_analysis"].find())
    assert len(results) == 4
    assert {doc["processing_metadata"]["model_used"] for doc in results} == {ALIAS}  # says which model labelled
    assert list(_runs(tmp_path).glob("llama-server-*")) == []  # stopped, record and log removed


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium (apt-get install chromium chromium-driver)")
def test_the_dashboard_shows_that_the_labels_are_the_embedded_models(browser: Any, start_main: Any) -> None:  # noqa: F811
    api = start_main()
    browser.get(f"{api.url}/dashboard")
    wait_until(browser, "return document.getElementById('embedded').dataset.checked", "true")
    assert browser.execute_script("return document.getElementById('embedded').hidden") is False
    notice = browser.execute_script("return document.getElementById('embedded').textContent")
    assert "embedded model SmolLM2-135M (llama.cpp), labels are rough" in notice
    assert "LLM_ENDPOINT" in notice
