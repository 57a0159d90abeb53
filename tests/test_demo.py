"""make demo (scripts/demo.py): without Ollama it stops at once with the fix; with it, the whole path runs,
in the demo's own database, and a .env makes the next commands reach the same development database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from config import Settings, env_name, load_settings
from scripts.demo import DEMO_DATABASE, remember_embedded_database
from tests.net_helpers import closed_port_url


def _env(tmp_path: Path, ollama: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in Settings.model_fields}}
    env.update({
        "LLM_ENDPOINT": ollama,
        "MONGODB_CONNECTION_STRING": "embedded",
        "EMBEDDED_DB_PATH": str(tmp_path / "db"),
        "MONGODB_TIMEOUT_MS": "10000",
    })
    return env


def _demo(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--chart", str(tmp_path / "chart.png"),
         "--batch-files-dir", str(tmp_path / "batch_files")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )


def test_without_ollama_the_demo_stops_at_once_with_the_fix(tmp_path):
    url = closed_port_url()
    result = _demo(tmp_path, _env(tmp_path, url))
    assert result.returncode == 4
    assert f"Cannot reach Ollama at {url}" in result.stderr
    assert "ollama pull llama3" in result.stderr and "make demo" in result.stderr
    assert "make demo-small" in result.stderr  # the way to try it without Ollama
    assert not (tmp_path / "db").exists()  # it stopped before touching the database
    assert not (tmp_path / ".env").exists()


def test_the_demo_imports_classifies_and_reports_and_can_run_again(tmp_path, fake_ollama):
    env = _env(tmp_path, fake_ollama.url)
    first = _demo(tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "added                32" in first.stdout
    assert "classified        32" in first.stdout
    assert f"32 results in {DEMO_DATABASE}.sentimental_analysis" in first.stdout  # not the user's database
    assert "MONGODB_CONNECTION_STRING=embedded" in (tmp_path / ".env").read_text()
    assert f"Wrote {tmp_path / '.env'}" in first.stdout
    assert f"MONGODB_DATABASE_NAME={DEMO_DATABASE} python -m scripts.report" in first.stdout
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fake_ollama.chat_count == 32

    again = _demo(tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already present      32" in again.stdout
    assert "classified        0" in again.stdout
    assert fake_ollama.chat_count == 32  # nothing classified twice


def _settings(connection_string: str) -> Settings:
    return load_settings({"mongodb_connection_string": connection_string}, environ={}, env_file=None)


def test_with_the_development_database_and_no_env_file_the_demo_writes_one(tmp_path):
    note = remember_embedded_database(_settings("embedded"), tmp_path)
    assert note is not None and ".env" in note and "MONGODB_CONNECTION_STRING=embedded" in note
    # The next commands read it: they reach the same development database.
    assert load_settings(environ={}, env_file=tmp_path / ".env").uses_embedded_database
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary file left behind

    assert remember_embedded_database(_settings("embedded"), tmp_path) is None  # said once


def test_an_existing_env_file_is_never_touched(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LLM_MODEL=qwen2.5:7b\n")
    assert remember_embedded_database(_settings("embedded"), tmp_path) is None
    assert env_file.read_text() == "LLM_MODEL=qwen2.5:7b\n"


def test_with_another_mongodb_no_env_file_is_written_and_the_user_is_told(tmp_path):
    note = remember_embedded_database(_settings("mongodb://localhost:27017"), tmp_path)
    assert note is not None and "MONGODB_CONNECTION_STRING" in note
    assert list(tmp_path.iterdir()) == []
