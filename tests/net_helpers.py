"""Small network helpers for tests of the real-time service (no fixtures: plain functions)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port that nothing listens on right now (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An http:// URL on loopback where connections are refused."""
    return f"http://127.0.0.1:{free_port()}"
