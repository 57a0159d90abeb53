"""Fixtures of the real-model tests: one llama.cpp server with SmolLM2-135M for the session.

Collected only with ``--real-llm`` (``make test-llm``). The server is started here, on a loopback
port, and stopped when the session ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]

from scripts.llama_server import LlamaServer  # noqa: E402

#: Slots of the test server: two requests at once, as the API and the batch processor send them.
PARALLEL = 2


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    with LlamaServer(parallel=PARALLEL) as server:
        yield server


@pytest.fixture
def real_settings(llama: LlamaServer, tmp_path: Path) -> Callable[..., Settings]:
    """``real_settings(**overrides)``: the OpenAI-compatible provider pointed at the real server."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_provider": "openai",
            "llm_endpoint": llama.base_url,
            "llm_model": llama.alias,
            "ollama_timeout": 300,  # 2 shared cores: a cold prefix takes seconds
            "batch_files_dir": tmp_path / "batch_files",
        }
        values.update(overrides)
        return load_settings(values, environ={}, env_file=None)

    return build
