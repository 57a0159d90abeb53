"""An aiohttp application served on a loopback port: the lifecycle the fake servers share.

In a background thread for tests (``with server: ...`` or :meth:`LoopbackServer.start` /
:meth:`LoopbackServer.stop`), or in the foreground for benchmarks (:meth:`LoopbackServer.serve`,
until SIGINT/SIGTERM). The socket is bound before the site starts, so ``port=0`` gets a free port
that :attr:`LoopbackServer.url` names at once.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable
from typing import Self

from aiohttp import web


class LoopbackServer:
    """Subclasses declare the API they serve (:meth:`routes`)."""

    #: Names the server in its thread and its errors.
    name = "loopback server"
    #: The largest request body taken (aiohttp's default, 1 MiB, is less than the long transcripts
    #: and large batches the tests and benchmarks send).
    max_body_bytes = 64 * 1024 * 1024

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._socket: socket.socket | None = None

    def routes(self) -> list[web.RouteDef]:
        """The paths this server answers and their handlers."""
        raise NotImplementedError

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.add_routes(self.routes())
        return app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _bind(self, backlog: int) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.port))
        self._socket.listen(backlog)
        self.port = self._socket.getsockname()[1]

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(self.build_app(), shutdown_timeout=0.2, handler_cancellation=True,
                                     access_log=None)
        await self._runner.setup()
        assert self._socket is not None, "the socket is bound before the site starts"
        await web.SockSite(self._runner, self._socket).start()

    # --- in a background thread (tests) ------------------------------------------------------
    def start(self) -> Self:
        """Serve in a background thread; returns once the port accepts connections."""
        self._bind(512)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_site())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=self.name.replace(" ", "-"), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def stop(self) -> None:
        """Stop serving and release the port and the thread."""
        if self._loop is None:
            return
        loop = self._loop
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        if self._socket is not None:
            self._socket.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- in the foreground (benchmarks) -----------------------------------------------------
    async def serve(self, started: Callable[[], None] = lambda: None) -> None:
        """Serve on the running loop until SIGINT or SIGTERM; ``started`` is called once listening."""
        self._bind(1024)
        await self._start_site()
        started()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        assert self._runner is not None
        await self._runner.cleanup()
        assert self._socket is not None
        self._socket.close()
