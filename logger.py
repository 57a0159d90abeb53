"""Logging, configured once by each entry point.

Modules only call ``logging.getLogger(__name__)``. INFO lines carry ids, counts and
durations; conversation text is logged at DEBUG only. Connection strings go
through :func:`redact_uri` before they reach a log line or an error message.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"

# Libraries whose INFO/DEBUG chatter drowns ours.
_QUIET_LIBRARIES = ("pymongo", "urllib3", "asyncio", "secantus", "aiohttp.access", "uvicorn.access")

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]*)@")


def redact_uri(uri: str) -> str:
    """Replace the password of a URI (``mongodb://user:pass@host``) with ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time, so a live progress bar that redirects
    stderr (rich) prints log lines above itself instead of being torn by them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (stderr) in the project's structured line format.

    Safe to call more than once: the handler it installs replaces the previous one.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_classifier_handler", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or _CurrentStderr())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._classifier_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # At DEBUG everything speaks; otherwise the libraries only report problems.
    library_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
