"""The entry point, run as the user runs it: ``python main.py`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config import Settings, env_name
from tests.net_helpers import closed_port_url, free_port

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my order?"}]}


def clean_env(**variables: str) -> dict[str, str]:
    """Every setting at its default, then ``variables``: a developer's .env cannot leak in."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"}
    for name, info in Settings.model_fields.items():
        env[env_name(name)] = "" if info.default is None else str(info.default)  # unset, not the word "None"
    env.update(variables)
    return env


def run_main(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_documents_flags_with_env_names_and_defaults() -> None:
    result = run_main("--help", env=clean_env())
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for flag, env, default in (
        ("--host", "API_HOST", "0.0.0.0"),
        ("--port", "API_PORT", "8000"),
        ("--log-level", "LOG_LEVEL", "INFO"),
    ):
        assert flag in text
        assert f"[env {env}; default: {default}]" in text
    assert "POST /classify" in text


@pytest.mark.parametrize(
    "variables, fragment",
    [
        ({"OLLAMA_TIMEOUT": "abc"}, "OLLAMA_TIMEOUT='abc'"),
        ({"LLM_ENDPOINT": "localhost:11434"}, "LLM_ENDPOINT"),
        ({"TAXONOMY_FILE": "/nonexistent/taxonomy.json"}, "TAXONOMY_FILE"),
    ],
)
def test_bad_configuration_exits_3_with_one_line(variables: dict[str, str], fragment: str) -> None:
    result = run_main(env=clean_env(**variables))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_log_level_flag_in_any_case_like_the_variable() -> None:
    # The flag is accepted (the run then stops at the invalid timeout, exit 3, not argparse's 2).
    result = run_main("--log-level", "debug", env=clean_env(OLLAMA_TIMEOUT="abc"))
    assert result.returncode == 3, result.stderr
    assert "OLLAMA_TIMEOUT" in result.stderr


def test_invalid_flag_is_a_usage_error() -> None:
    result = run_main("--port", "eighty", env=clean_env())
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def served_without_ollama(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """``python main.py --port P`` with LLM_ENDPOINT on a closed port; yields (api url, endpoint, log)."""
    port = free_port()
    endpoint = closed_port_url()
    log = tmp_path / "main.log"
    # API_PORT says one port, --port another: the command line must win.
    env = clean_env(LLM_ENDPOINT=endpoint, API_HOST="127.0.0.1", API_PORT=str(free_port()), LOG_LEVEL="INFO")
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--port", str(port)], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"main.py exited with {process.returncode}:\n{log.read_text()}"
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"main.py did not answer on {url}:\n{log.read_text()}"
            time.sleep(0.05)
        yield url, endpoint, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_serves_and_reports_unreachable_ollama(served_without_ollama: tuple[str, str, Path]) -> None:
    url, endpoint, log = served_without_ollama
    with requests.Session() as http:
        health = http.get(f"{url}/health", timeout=10)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}

        response = http.post(f"{url}/classify", json=CONVERSATION, timeout=30)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "llm_unavailable"
        assert endpoint in error["message"]
        assert "ollama serve" in error["hint"]

        ready = http.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503
        assert endpoint in ready.json()["error"]["message"]

    text = log.read_text()
    assert " - INFO - api - API ready: model llama3 at " + endpoint in text
    assert f" - WARNING - api - Ollama is not ready: Cannot reach Ollama at {endpoint}" in text  # said at start-up
    assert "-> 503 llm_unavailable" in text
    assert "Traceback" not in text


def test_importing_main_reads_and_connects_nothing() -> None:
    # `uvicorn main:app` imports the module; the settings are loaded by the lifespan only.
    code = "import main; print(callable(main.app)); print(main.build_parser().parse_args([]).api_port)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(OLLAMA_TIMEOUT="not-a-number", LLM_ENDPOINT=closed_port_url()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # Unset flags are None so that the environment wins.
    assert result.stdout.splitlines() == ["True", "None"]


def test_uvicorn_main_app_serves_with_settings_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    endpoint = closed_port_url()
    log = tmp_path / "uvicorn.log"
    env = clean_env(LLM_ENDPOINT=endpoint, API_MAX_BODY_BYTES="2048")
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with requests.Session() as http:
            answer = http.post(f"{url}/classify", json=CONVERSATION, timeout=30)
            assert answer.status_code == 503 and endpoint in answer.json()["error"]["message"]
            too_big = http.post(f"{url}/classify", data=b"x" * 4096, timeout=30)
            assert too_big.status_code == 413  # API_MAX_BODY_BYTES came from the environment
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    "variables, fragment",
    [({"OLLAMA_TIMEOUT": "abc"}, "OLLAMA_TIMEOUT='abc'"), ({"TAXONOMY_FILE": "/nonexistent/t.json"}, "TAXONOMY_FILE")],
)
def test_uvicorn_main_app_with_a_bad_setting_fails_to_start_with_one_line(
    variables: dict[str, str], fragment: str
) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=clean_env(**variables), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_endpoint_with_credentials_is_reported_without_the_password() -> None:
    result = run_main(env=clean_env(LLM_ENDPOINT="ftp://user:pass-s3cr/et@llm.example:11434"))
    assert result.returncode == 3
    assert "LLM_ENDPOINT: 'ftp://user:***@llm.example:11434', must start with http://" in result.stderr
    assert "s3cr" not in result.stderr
