"""Servers we run as child processes: the embedded database (SecantusDB) and the embedded model
(llama.cpp's llama-server). Both need the same care, so it lives here once:

* started on a loopback port with stdin closed and their output in a log file;
* **dying with their parent**: on Linux the child is started with PR_SET_PDEATHSIG, so the kernel
  SIGKILLs it when the program that started it dies without a chance to stop it (kill -9, the OOM
  killer);
* **a pid file** naming the server, its owner (this process) and its port, written atomically once
  the child runs and removed when it stops: a server left over anyway (another platform, an older
  version) is recognised at the next start (:func:`leftover`) and stopped (:func:`stop_stale`),
  while one whose owner still runs is left to it;
* stopped by SIGTERM (repeated while it evidently missed it), SIGKILL only as the last resort.

:func:`child_server` is the whole life cycle as a context manager; the callers
(``utils.embedded_db``, ``utils.embedded_llm``) say what the server is, when it is ready and
which error a failed start is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

logger = logging.getLogger(__name__)
T = TypeVar("T")

STOP_TIMEOUT_SECONDS = 15.0
TERM_REPEAT_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def accepts_connections(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when this process dies (Linux).

    SIGKILL, not SIGTERM: nobody is left to repeat a SIGTERM the server misses (see :func:`stop`).
    The signal follows the *thread* that started the child: callers start it from a thread that
    lives as long as it (the main thread: the CLI, the importer, the event loop of the batch
    processor and of the API, or a :class:`ThreadOwned`), never from a pool's worker thread,
    which may end any time.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only where a child is started: not every start-up of the processor (issue 19)

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        logger.debug("prctl is not available; child servers will not die with this process")
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# --- pid files ------------------------------------------------------------------------------------


class PidFile:
    """``{"pid", "owner_pid", "port"}`` of one child server, at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, pid: int, port: int) -> None:
        """Atomically record the server and its owner (this process)."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": pid, "owner_pid": os.getpid(), "port": port}), encoding="utf-8")
        os.replace(temporary, self.path)

    def read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: value for key, value in data.items() if isinstance(value, int) and not isinstance(value, bool)}

    def remove(self, pid: int | None = None) -> None:
        """Remove the file; with ``pid``, only if it still names that server (never another program's)."""
        if pid is None or self.read().get("pid") == pid:
            with suppress(FileNotFoundError):
                self.path.unlink()


@dataclass(frozen=True)
class Leftover:
    """A server a pid file names that still runs."""

    pid: int
    port: int | None
    owner_pid: int | None
    owner_running: bool  # its owner still runs and is still its parent: the server is in use


def process_info(pid: int) -> tuple[str, int, list[bytes]] | None:
    """(state, parent pid, command line) of a live process from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the command may hold spaces and ')'
    if state in ("Z", "X") and not threads_running(pid):  # a zombie holds no port and no file: it is gone
        return None
    return state, int(ppid), cmdline


def threads_running(pid: int) -> bool:
    """True while a thread of ``pid`` has not finished: a killed process's leader turns zombie
    before its other threads have exited and released its files and ports."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        except OSError:
            continue
    return False


def leftover(pid_file: PidFile, is_server: Callable[[list[bytes]], bool]) -> Leftover | None:
    """The server ``pid_file`` names if it still runs, else None (and a file naming nothing is removed).

    ``is_server(cmdline)`` tells whether the pid is still *that* server: pids are reused.
    """
    record = pid_file.read()
    pid, owner = record.get("pid"), record.get("owner_pid")
    info = process_info(pid) if pid else None
    if not pid or info is None or not is_server(info[2]):
        pid_file.remove()  # stale file, no server: nothing to stop
        return None
    owner_running = owner is not None and info[1] == owner and process_info(owner) is not None
    return Leftover(pid, record.get("port"), owner, owner_running)


# --- stopping -------------------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes], port: int, name: str, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM, repeated while the server evidently missed it; SIGKILL only as the last resort.

    A server whose main thread waits for the stop without a timeout (SecantusDB) can miss a
    SIGTERM that another of its threads receives (about one stop in five there): it is sent again
    while the server still accepts connections. Each connection attempt also wakes an accept loop,
    which otherwise keeps a stop waiting; once the stop has begun the port refuses connections, so
    a stop in progress is never interrupted by a second SIGTERM.
    """
    process.terminate()
    sent = time.monotonic()
    deadline = sent + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            logger.warning("%s did not stop within %.0f s; killing it", name, timeout)
            process.kill()
            process.wait()
            return
        if accepts_connections(port) and time.monotonic() - sent >= TERM_REPEAT_SECONDS:
            logger.debug("%s missed SIGTERM; sending it again", name)
            process.terminate()
            sent = time.monotonic()
        time.sleep(0.05)


def stop_stale(server: Leftover, timeout: float = STOP_TIMEOUT_SECONDS) -> bool:
    """Stop a server a crashed run left behind (not our child: watched through /proc); True once it
    is gone. SIGTERM (repeated, as in :func:`stop`), then SIGKILL."""
    pid, port = server.pid, server.port
    deadline = time.monotonic() + timeout
    sent = 0.0
    while process_info(pid) is not None:
        now = time.monotonic()
        if now > deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        if now - sent >= TERM_REPEAT_SECONDS and (port is None or accepts_connections(port) or not sent):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            sent = now
        time.sleep(0.05)
    while process_info(pid) is not None and time.monotonic() < deadline + timeout:
        time.sleep(0.05)  # after SIGKILL: until the kernel has released its files
    return process_info(pid) is None


# --- the thread that owns a child -----------------------------------------------------------------


class ThreadOwned(Generic[T]):
    """A context manager entered, and later exited, in a thread of its own that lives until :meth:`close`.

    PR_SET_PDEATHSIG follows the *thread* that started a child. Code that must not block its event
    loop starts children from a pool's worker thread (Starlette's ``run_in_threadpool``), and anyio
    retires a worker idle for 10 s: the kernel then kills the child with it. Entered through this
    class instead (``await run_in_threadpool(owned.enter)``), the child belongs to a thread that
    ends only when :meth:`close` exits the context.
    """

    def __init__(self, context: AbstractContextManager[T], *, name: str = "child-owner") -> None:
        self._context = context
        self._entered = threading.Event()
        self._closing = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._own, name=name, daemon=True)

    def _own(self) -> None:
        try:
            with self._context as value:
                self._value = value
                self._entered.set()
                self._closing.wait()
        except BaseException as e:  # raised by enter() (entering failed) or close() (exiting did)
            self._error = e
        finally:
            self._entered.set()

    def enter(self) -> T:
        """Enter the context in the owner thread (blocks until it is entered); raises what entering raised."""
        self._thread.start()
        self._entered.wait()
        if self._error is not None:
            self._thread.join()  # it has ended: nothing to close
            error, self._error = self._error, None
            raise error
        return cast(T, self._value)

    def close(self) -> None:
        """Exit the context (blocks until it is exited, the child stopped); harmless twice or unentered."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error


# --- the life cycle -------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 1) -> list[str]:
    """The last ``lines`` non-empty lines of a child's log (for the error of a failed start)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@contextmanager
def child_server(
    command: list[str],
    *,
    name: str,
    port: int,
    pid_file: PidFile,
    log_path: Path,
    ready: Callable[[], bool],
    start_timeout: float,
    failed: Callable[[int | None], Exception],
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (a server on 127.0.0.1:``port``) for the ``with`` block.

    The child dies with this process (:func:`die_with_parent`), is recorded in ``pid_file`` and is
    waited for until ``ready()``; ``failed(exit code)`` (None: not ready within ``start_timeout``)
    is the error raised when it does not get there. Whatever happens, the child is stopped and its
    pid file removed when the block ends.
    """
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent()
        )
    try:
        pid_file.write(process.pid, port)  # in the try: a failed write (a full disk) still stops the child
        deadline = time.monotonic() + start_timeout
        while not ready():
            if process.poll() is not None:
                raise failed(process.returncode)
            if time.monotonic() > deadline:
                raise failed(None)
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            stop(process, port, name, stop_timeout)
        pid_file.remove(process.pid)
