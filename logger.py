"""Logging, configured once by each entry point.

Modules only call ``logging.getLogger(__name__)``. INFO lines carry ids, counts and
durations; conversation text is logged at DEBUG only. URLs (connection strings, LLM
endpoints) go through :func:`redact_url` before they reach a log line, an answer or an
error message.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"

# Libraries whose INFO/DEBUG chatter drowns ours.
_QUIET_LIBRARIES = ("pymongo", "urllib3", "asyncio", "secantus", "aiohttp.access", "uvicorn.access")

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_%")


def _is_host_list(text: str) -> bool:
    """``host[:port]`` or ``[ipv6][:port]``, comma-separated (MongoDB lists several)."""
    for host in text.split(","):
        name, port = host, ""
        if host.startswith("["):
            end = host.find("]")
            if end < 2:
                return False
            name, port = "h", host[end + 1 :].removeprefix(":")
            if host[end + 1 :] and not host[end + 1 :].startswith(":"):
                return False
        elif ":" in host:
            name, port = host.split(":", 1)
        if not name or not set(name) <= _HOST_CHARS or (port and not port.isdigit()):
            return False
    return True


def redact_url(url: str) -> str:
    """``scheme://user:***@host...``: ``url`` with its password hidden, by parsing the URL.

    Users paste passwords unencoded, with ``/``, ``@``, ``:``, spaces, ``?`` or ``#`` in them,
    which a standard URL parser (or a regular expression stopping at ``/`` or ``@``) splits in
    the wrong place, leaking part of the password. Here the credentials end at the *last*
    ``@`` that is followed by a host list (then the end, ``/``, ``?`` or ``#``): it errs on the
    side of hiding too much (an ``@`` in a path), never too little. The user name stays (it is
    not a secret, and says which account); a URL without a password is returned unchanged.

    A URL that does not parse (a typo in the port, ``http://user:pw@127.0.0.1:1x``; nothing
    after the ``@``; a host of characters no host has; no valid scheme) is exactly where a
    password is at risk, as every library then quotes it whole: everything between ``://`` (or
    the start, without one) and the last ``@`` is hidden, ``http://***@127.0.0.1:1x``.
    Use it for every URL that reaches a log line, an answer or an error message.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    at = len(rest)
    while (at := rest.rfind("@", 0, at)) != -1:
        after = rest[at + 1 :]
        end = min((i for i in (after.find(c) for c in "/?#") if i != -1), default=len(after))
        if _is_host_list(after[:end]):
            break
    prefix = f"{scheme}://" if separator else ""
    if at == -1 or not scheme or not set(scheme) <= _SCHEME_CHARS:
        return f"{prefix}***@{rest.rpartition('@')[2]}"  # does not parse: hide all up to the last '@'
    user, colon, _password = rest[:at].partition(":")
    if not colon:
        return url
    return f"{prefix}{user}:***@{rest[at + 1 :]}"


def _escape_table() -> dict[int, str]:
    """Control characters and Unicode line boundaries, each to its visible escape (``\\n``, ``\\x1b``)."""
    codes = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
    return {code: repr(chr(code))[1:-1] for code in codes if code != ord("\t")}


_ESCAPES = _escape_table()


def escape_controls(text: str) -> str:
    """``text`` with every control character and line boundary escaped: it stays on one line, and
    a terminal shows escape sequences instead of running them. Tabs are kept."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """One record, one line: values from requests and documents (conversation numbers, labels, ids)
    cannot start a new line that looks like a record of its own (log forging), whichever call
    site logs them. A traceback follows its record with every line indented, so it cannot either."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # _Escaped stands in for the record (same attributes, values escaped): duck-typed on purpose.
        return super().formatMessage(cast(logging.LogRecord, _Escaped(record)))

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the message escaped and the traceback indented. The
        # record's cached exc_text is not used: another handler may have cached it unindented.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        blocks = [self.formatException(record.exc_info)] if record.exc_info else []
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            line += "".join("\n    " + escape_controls(part) for part in block.splitlines())
        return line


class _Escaped:
    """A read-only view of a record whose ``message`` is escaped (the record itself is shared by
    every handler, pytest's among them, and stays as it was)."""

    def __init__(self, record: logging.LogRecord) -> None:
        self.__dict__.update(record.__dict__)
        self.message = escape_controls(record.message)


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
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    handler._classifier_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # At DEBUG everything speaks; otherwise the libraries only report problems.
    library_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
