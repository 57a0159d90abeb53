"""make demo (scripts/demo.py): without Ollama it stops at once with the fix; with it, the whole path runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from config import Settings, env_name
from tests.net_helpers import closed_port_url

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, ollama: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in Settings.model_fields}}
    env.update({
        "OLLAMA_ENDPOINT": ollama,
        "MONGODB_CONNECTION_STRING": "embedded",
        "EMBEDDED_DB_PATH": str(tmp_path / "db"),
        "MONGODB_TIMEOUT_MS": "10000",
    })
    return env


def _demo(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--chart", str(tmp_path / "chart.png"),
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


def test_the_demo_imports_classifies_and_reports_and_can_run_again(tmp_path, fake_ollama):
    env = _env(tmp_path, fake_ollama.url)
    first = _demo(tmp_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "added                32" in first.stdout
    assert "classified        32" in first.stdout
    assert "32 results in customer_support.sentimental_analysis" in first.stdout
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fake_ollama.chat_count == 32

    again = _demo(tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already present      32" in again.stdout
    assert "classified        0" in again.stdout
    assert fake_ollama.chat_count == 32  # nothing classified twice
