"""LLM chat client for the batch processor (asynchronous, ``aiohttp``), either provider.

The same provider entry (:data:`llm_wrapper.PROVIDERS`) and the same pure functions as the sync
client: only the transport differs. One ``aiohttp.ClientSession`` per client, opened by the first
call that needs it and closed at the end of ``async with``.
Build it with :func:`create_async_llm_client`.

The readiness check, the one request of every run (one that finds nothing to classify included),
is a plain GET over the standard library's ``http.client`` in a worker thread: aiohttp is imported
with the session, at the first chat. Importing it costs more than a third of a run on an empty
collection (it loads the system's CA certificates into two TLS contexts at import, https endpoint
or not: issue 19).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from config import Settings
from llm_wrapper import (
    CONNECT_TIMEOUT_SECONDS,
    READY_TIMEOUT_SECONDS,
    ChatResult,
    dropped_error,
    embed_request,
    provider_for,
    read_chat,
    read_embed,
    read_ready,
    request_failed_error,
    timeout_error,
    unavailable_error,
)

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)


class AsyncLLMClient:
    """``async with create_async_llm_client(settings) as client: await client.chat(...)``."""

    def __init__(self, settings: Settings, *, max_connections: int | None = None) -> None:
        self.settings = settings
        self.provider = provider_for(settings)
        self._max_connections = max_connections or settings.batch_max_concurrent
        self._open = False
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncLLMClient:
        self._open = True  # the session itself is opened by the first call that needs it
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._open = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("AsyncLLMClient used outside 'async with'")

    def _opened_session(self) -> aiohttp.ClientSession:
        self._require_open()
        if self._session is None:
            import aiohttp  # the first chat of the run (see the module's docstring)

            self._session = aiohttp.ClientSession(
                headers=self.provider.headers(self.settings),
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.ollama_timeout,
                    sock_connect=min(CONNECT_TIMEOUT_SECONDS, self.settings.ollama_timeout),
                ),
            )
        return self._session

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes, Mapping[str, str]]:
        session = self._opened_session()
        import aiohttp  # imported by _opened_session: a dictionary lookup

        url = f"{self.settings.llm_endpoint}{path}"
        try:
            async with session.request(method, url, **kwargs) as response:
                return response.status, await response.read(), response.headers
        except aiohttp.ClientConnectorError as e:
            raise unavailable_error(self.settings, "connection refused or host unknown") from e
        except aiohttp.ConnectionTimeoutError as e:
            raise unavailable_error(self.settings, "connection timed out") from e
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise timeout_error(self.settings) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
            raise dropped_error(self.settings, type(e).__name__) from e
        except aiohttp.ClientError as e:
            raise request_failed_error(self.settings, url, e) from e

    async def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult:
        """One classification call; raises an ``LLMError`` on any failure."""
        payload = self.provider.build_payload(self.settings, messages, schema)
        status, body, headers = await self._request("POST", self.provider.chat_path, json=payload)
        return read_chat(self.provider, self.settings, status, body, headers)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text from EMBEDDING_MODEL; raises an ``LLMError`` on any failure."""
        path, payload = embed_request(self.provider, self.settings, texts)
        status, body, headers = await self._request("POST", path, json=payload)
        return read_embed(self.provider, self.settings, status, body, len(texts), headers)

    async def check_ready(self) -> None:
        """Raise unless the server answers and has the configured model (lists its models, no inference).

        A GET over ``http.client`` in a worker thread, not the session (see the module's docstring).
        """
        self._require_open()
        timeout = min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout)
        status, body, headers = await asyncio.to_thread(
            plain_get, self.settings, self.provider.ready_path, self.provider.headers(self.settings), timeout
        )
        read_ready(self.provider, self.settings, status, body, headers)


def plain_get(
    settings: Settings, path: str, headers: dict[str, str], timeout: float
) -> tuple[int, bytes, Mapping[str, str]]:
    """GET ``path`` of the LLM endpoint with the standard library (blocking: run it in a thread): the
    status, body and headers, or the typed error that the aiohttp transport gives for the same failure.

    As the session would: no proxy from the environment, the system's CA certificates for https
    (a TLS context is made for an https endpoint only), a user and password in the URL sent as Basic
    auth. Unlike it, a redirect is not followed: the readiness path answers directly on every
    server this project speaks to. ``timeout`` bounds the connection and each read.
    """
    import http.client

    url = f"{settings.llm_endpoint}{path}"
    connection: http.client.HTTPConnection
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port  # .port raises ValueError on a typo or out of range
        if not host:
            raise ValueError("no host")
        if parts.scheme == "https":
            import ssl

            connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
    except (ValueError, http.client.InvalidURL) as e:  # its text may quote the URL: request_failed_error hides it
        raise request_failed_error(settings, url, e) from e
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers = {**headers, "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
    try:
        try:
            connection.connect()
        except TimeoutError as e:
            raise unavailable_error(settings, "connection timed out") from e
        except OSError as e:  # refused, unknown host, a TLS handshake that failed
            raise unavailable_error(settings, "connection refused or host unknown") from e
        try:
            connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = connection.getresponse()
            body = response.read()
        except TimeoutError as e:
            raise timeout_error(settings) from e
        except http.client.InvalidURL as e:
            raise request_failed_error(settings, url, e) from e
        except (http.client.HTTPException, OSError) as e:  # closed early, reset, not HTTP
            raise dropped_error(settings, type(e).__name__) from e
        # http.client's headers (an email Message) are read like aiohttp's: .get(name), any case.
        return response.status, body, cast(Mapping[str, str], response.headers)
    finally:
        connection.close()


async def import_transport() -> None:
    """Import aiohttp in a worker thread: for a run that has conversations to classify, while its
    first batch is claimed (database round trips), so that the first chat does not pay for the
    import on the job's clock (about a quarter of a second; issue 19)."""
    await asyncio.to_thread(importlib.import_module, "aiohttp")


def create_async_llm_client(settings: Settings, *, max_connections: int | None = None) -> AsyncLLMClient:
    """The asynchronous client for ``settings`` (its provider, endpoint, model and key)."""
    return AsyncLLMClient(settings, max_connections=max_connections)
