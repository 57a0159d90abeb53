"""The processor's own wall clock, in UTC: timestamps of batch files, job ids and retry entries.

Lease times never come from here: they are the database server's (:mod:`utils.server_clock`).
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_now() -> str:
    """Now as ``2026-12-02T01:37:37Z``: to the second, readable in a file."""
    return utc_now().isoformat(timespec="seconds").replace("+00:00", "Z")
