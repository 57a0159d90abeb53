"""Small network helpers for tests of the real-time service (no fixtures: plain functions)."""

from __future__ import annotations

from utils.command_line import free_port

__all__ = ["closed_port_url", "free_port"]


def closed_port_url() -> str:
    """An http:// URL on loopback where connections are refused."""
    return f"http://127.0.0.1:{free_port()}"
