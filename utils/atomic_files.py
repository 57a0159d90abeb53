"""Files written whole or not at all, and read back: the batch files' and the reports' one way to write.

``atomic_write_text`` writes a temporary file in the same folder, fsyncs it, ``os.replace``s the
target and fsyncs the folder: a crash at any instant leaves the old or the new content, never a
torn file. JSON is MongoDB Extended JSON (relaxed), so ObjectIds, UUIDs, dates and ids of any BSON
type survive the round trip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bson import json_util

from error_handler import BatchFileError

JSON_OPTIONS = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)


def dumps_json(path: Path, data: Any, indent: int | None = None) -> str:
    try:
        return json_util.dumps(data, json_options=JSON_OPTIONS, indent=indent)
    except (TypeError, ValueError) as e:  # serialize before touching the disk: no temp file left behind
        raise BatchFileError(f"Cannot write {path}: the data is not JSON-serializable: {e}") from e


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one."""
    atomic_write_text(path, dumps_json(path, data, indent=1))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``, fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BatchFileError(f"Cannot write {path}: {e}", hint="Check free disk space and permissions.") from e
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    try:
        return json_util.loads(path.read_text(encoding="utf-8"), json_options=JSON_OPTIONS)
    except (OSError, ValueError) as e:
        raise BatchFileError(
            f"Cannot read batch file {path}: {e}",
            hint="Move the file out of the batch files folder if it is not needed; its conversations "
            "stay in status 'processing' and are picked up again with --retry-failed.",
        ) from e
