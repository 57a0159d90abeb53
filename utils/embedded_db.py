"""The embedded development database: SecantusDB as a child process.

With ``MONGODB_CONNECTION_STRING=embedded`` the importer, the batch processor and the
report start SecantusDB (a MongoDB-wire-compatible server, GPL-2.0, installed by
``make demo``; it runs as a separate process, nothing links it) on a free loopback
port with its data in ``EMBEDDED_DB_PATH`` (./data/db), and stop it when they end.
It is for development and demos only: any other connection string is used as given,
and nothing ever falls back to the embedded database silently.

A program killed without a chance to stop the server (SIGKILL, the OOM killer) must not leave
it holding the data folder: the server dies with its parent, and ``secantusdb.pid`` in the data
folder names the server and its owner, so a server left over anyway is recognised as stale at the
next start and stopped, while one whose owner still runs is left alone (its folder is in use).
The machinery is :mod:`utils.child_process`, shared with the embedded model.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from config import Settings
from error_handler import ConfigError, StorageUnavailableError
from utils.child_process import PidFile, accepts_connections, child_server, leftover, log_tail, stop_stale
from utils.command_line import free_port

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
PID_FILE = "secantusdb.pid"


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
    with child_server(
        command, name="the embedded database", port=port, pid_file=PidFile(data_dir / PID_FILE), log_path=log_path,
        ready=partial(accepts_connections, port), start_timeout=START_TIMEOUT_SECONDS,
        failed=partial(_start_failed, data_dir, log_path),
    ):
        yield f"mongodb://127.0.0.1:{port}/"
    logger.info("embedded database stopped")


def _start_failed(data_dir: Path, log_path: Path, exit_code: int | None) -> StorageUnavailableError:
    if exit_code is None:
        return StorageUnavailableError(
            f"The embedded database did not accept connections within {START_TIMEOUT_SECONDS:.0f} s.",
            hint=f"See {log_path}.",
        )
    tail = (log_tail(log_path) or ["(no output)"])[0]
    return StorageUnavailableError(
        f"The embedded database did not start (exit code {exit_code}): {tail}",
        hint=(_in_use_hint(data_dir) if "busy" in tail.lower() else f"See {log_path}."),
    )


def _in_use_hint(data_dir: Path) -> str:
    return f"Another program is using {data_dir}; stop it (only one program at a time can open the embedded database)."


def _clear_stale_server(data_dir: Path) -> None:
    """Stop the server a crashed run left on ``data_dir``; refuse if its owner still runs."""
    # The pid must still be *that* server: SecantusDB on this folder (pids are reused).
    folder = str(data_dir).encode()
    server = leftover(PidFile(data_dir / PID_FILE),
                      lambda cmdline: any(b"secantus" in part for part in cmdline) and folder in cmdline)
    if server is None:
        return
    if server.owner_running:
        raise StorageUnavailableError(
            f"The embedded database in {data_dir} is already running (pid {server.pid}, started by pid "
            f"{server.owner_pid}).",
            hint=_in_use_hint(data_dir),
        )
    logger.warning("stopping a stale embedded database (pid %d) left on %s by a run that ended without "
                   "stopping it", server.pid, data_dir)
    if not stop_stale(server):
        raise StorageUnavailableError(
            f"A stale embedded database (pid {server.pid}) holds the data folder and did not stop.",
            hint=f"Stop process {server.pid} by hand, then start again.",
        )
    PidFile(data_dir / PID_FILE).remove()
