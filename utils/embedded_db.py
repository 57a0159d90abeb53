"""The embedded development database: SecantusDB as a child process.

With ``MONGODB_CONNECTION_STRING=embedded`` the importer, the batch processor and the
report start SecantusDB (a MongoDB-wire-compatible server, GPL-2.0, installed by
``make demo``; it runs as a separate process, nothing links it) on a free loopback
port with its data in ``EMBEDDED_DB_PATH`` (./data/db), and stop it when they end.
It is for development and demos only: any other connection string is used as given,
and nothing ever falls back to the embedded database silently.

A program killed without a chance to stop the server (SIGKILL, the OOM killer) must not leave
it holding the data folder: on Linux the server is started with PR_SET_PDEATHSIG, so the
kernel kills it when its parent dies, and ``secantusdb.pid`` in the data folder names the
server and its owner, so a server left over anyway (an older version, another platform) is
recognised as stale at the next start and stopped, while one whose owner still runs is
left alone (its folder is in use).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from config import Settings
from error_handler import ConfigError, StorageUnavailableError
from utils.command_line import free_port

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
TERM_REPEAT_SECONDS = 1.0
PID_FILE = "secantusdb.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def embedded_database(settings: Settings) -> Iterator[str]:
    """Start SecantusDB on loopback with its data in ``settings.embedded_db_path``; yield its URI."""
    if importlib.util.find_spec("secantus") is None:
        raise ConfigError(
            "MONGODB_CONNECTION_STRING=embedded needs SecantusDB, which is not installed.",
            hint="Run `make demo` (it installs it), or `pip install -r requirements-dev.txt`, "
            "or point MONGODB_CONNECTION_STRING at a MongoDB server.",
        )
    data_dir = Path(settings.embedded_db_path)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "secantusdb.log"
    _clear_stale_server(data_dir)
    port = free_port()
    command = [
        sys.executable, "-m", "secantus",
        "--host", "127.0.0.1", "--port", str(port),
        "--storage-path", str(data_dir), "--log-level", "WARNING",
    ]
    logger.info("starting the embedded database (SecantusDB) on 127.0.0.1:%d with data in %s", port, data_dir)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent()
        )
    try:
        _write_pid_file(data_dir, process.pid, port)  # in the try: a failed write still stops the server
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _accepts_connections(port):
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                busy = "busy" in tail[0].lower()
                raise StorageUnavailableError(
                    f"The embedded database did not start (exit code {process.returncode}): {tail[0]}",
                    hint=(f"Another program is using {data_dir}; stop it (only one program at a time "
                          "can open the embedded database)." if busy else f"See {log_path}."),
                )
            if time.monotonic() > deadline:
                raise StorageUnavailableError(
                    f"The embedded database did not accept connections within {START_TIMEOUT_SECONDS:.0f} s.",
                    hint=f"See {log_path}.",
                )
            time.sleep(0.1)
        yield f"mongodb://127.0.0.1:{port}/"
    finally:
        if process.poll() is None:
            _stop(process, port)
        _remove_pid_file(data_dir, process.pid)
        logger.info("embedded database stopped")


def _stop(process: subprocess.Popen[bytes], port: int) -> None:
    """SIGTERM, repeated while the server evidently missed it; SIGKILL only as the last resort.

    SecantusDB's main thread waits for the stop without a timeout, so a SIGTERM that one of its
    other threads receives can go unnoticed (about one stop in five here): it is sent again while
    the server still accepts connections. Each connection attempt also wakes its accept loop, which
    otherwise keeps a stop waiting 2 s; once the stop has begun, the port refuses connections, so a
    stop in progress is never interrupted by a second SIGTERM.
    """
    process.terminate()
    sent = time.monotonic()
    deadline = sent + STOP_TIMEOUT_SECONDS
    while process.poll() is None:
        if time.monotonic() > deadline:
            logger.warning("the embedded database did not stop within %.0f s; killing it", STOP_TIMEOUT_SECONDS)
            process.kill()
            process.wait()
            return
        if _accepts_connections(port) and time.monotonic() - sent >= TERM_REPEAT_SECONDS:
            logger.debug("the embedded database missed SIGTERM; sending it again")
            process.terminate()
            sent = time.monotonic()
        time.sleep(0.05)


# --- dying with the parent, and stale servers of crashed runs -------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the server when this process dies (Linux).

    SIGKILL, not SIGTERM: nobody is left to repeat a SIGTERM the server misses (see :func:`_stop`),
    and the storage engine recovers from its journal at the next start. The signal follows the
    *thread* that started the server: callers start it from the thread that lives as long as it
    (the main thread: the CLI, the importer, the event loop of the batch processor).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        logger.debug("prctl is not available; the embedded database will not die with this process")
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _write_pid_file(data_dir: Path, pid: int, port: int) -> None:
    """Atomically record the server and its owner (this process) in the data folder."""
    path = data_dir / PID_FILE
    temporary = path.with_name(f".{PID_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"pid": pid, "owner_pid": os.getpid(), "port": port}), encoding="utf-8")
    os.replace(temporary, path)


def _remove_pid_file(data_dir: Path, pid: int) -> None:
    """Remove the pid file if it still names our server (never another program's)."""
    path = data_dir / PID_FILE
    if _read_pid_file(path).get("pid") == pid:
        with suppress(FileNotFoundError):
            path.unlink()


def _read_pid_file(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, int) and not isinstance(value, bool)}


def _process_info(pid: int) -> tuple[str, int, list[bytes]] | None:
    """(state, parent pid, command line) of a live process from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the command may hold spaces and ')'
    if state in ("Z", "X") and not _threads_running(pid):  # a zombie holds no port and no file: it is gone
        return None
    return state, int(ppid), cmdline


def _threads_running(pid: int) -> bool:
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


def _clear_stale_server(data_dir: Path) -> None:
    """Stop the server a crashed run left on ``data_dir``; refuse if its owner still runs."""
    path = data_dir / PID_FILE
    record = _read_pid_file(path)
    pid, owner = record.get("pid"), record.get("owner_pid")
    info = _process_info(pid) if pid else None
    # The pid must still be *that* server: SecantusDB on this folder (pids are reused).
    if not pid or info is None or not (any(b"secantus" in part for part in info[2])
                                       and str(data_dir).encode() in info[2]):
        with suppress(FileNotFoundError):
            path.unlink()  # stale file, no server: nothing to stop
        return
    if owner is not None and info[1] == owner and _process_info(owner) is not None:
        raise StorageUnavailableError(
            f"The embedded database in {data_dir} is already running (pid {pid}, started by pid {owner}).",
            hint=f"Another program is using {data_dir}; stop it (only one program at a time "
            "can open the embedded database).",
        )
    logger.warning("stopping a stale embedded database (pid %d) left on %s by a run that ended without "
                   "stopping it", pid, data_dir)
    _stop_stale(pid, record.get("port"))
    with suppress(FileNotFoundError):
        path.unlink()


def _stop_stale(pid: int, port: int | None) -> None:
    """SIGTERM (repeated, as in :func:`_stop`), then SIGKILL; not our child, so watched through /proc."""
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    sent = 0.0
    while _process_info(pid) is not None:
        now = time.monotonic()
        if now > deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        if now - sent >= TERM_REPEAT_SECONDS and (port is None or _accepts_connections(port) or not sent):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            sent = now
        time.sleep(0.05)
    while _process_info(pid) is not None and time.monotonic() < deadline + STOP_TIMEOUT_SECONDS:
        time.sleep(0.05)  # after SIGKILL: until the kernel has released its files
    if _process_info(pid) is not None:
        raise StorageUnavailableError(
            f"A stale embedded database (pid {pid}) holds the data folder and did not stop.",
            hint=f"Stop process {pid} by hand, then start again.",
        )
