"""The embedded development database: SecantusDB as a child process.

With ``MONGODB_CONNECTION_STRING=embedded`` the importer, the batch processor and the
report start SecantusDB (a MongoDB-wire-compatible server, GPL-2.0, installed by
``make demo``; it runs as a separate process, nothing links it) on a free loopback
port with its data in ``EMBEDDED_DB_PATH`` (./data/db), and stop it when they end.
It is for development and demos only: any other connection string is used as given,
and nothing ever falls back to the embedded database silently.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from config import Settings
from error_handler import ConfigError, StorageUnavailableError

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
TERM_REPEAT_SECONDS = 1.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = _free_port()
    command = [
        sys.executable, "-m", "secantus",
        "--host", "127.0.0.1", "--port", str(port),
        "--storage-path", str(data_dir), "--log-level", "WARNING",
    ]
    logger.info("starting the embedded database (SecantusDB) on 127.0.0.1:%d with data in %s", port, data_dir)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
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
