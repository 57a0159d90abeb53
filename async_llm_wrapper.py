"""LLM chat client for the batch processor (asynchronous, ``aiohttp``), either provider.

The same provider entry (:data:`llm_wrapper.PROVIDERS`) and the same pure functions as the sync
client: only the transport differs. One ``aiohttp.ClientSession`` per client, opened and closed by
``async with``.
Build it with :func:`create_async_llm_client`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

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

logger = logging.getLogger(__name__)


class AsyncLLMClient:
    """``async with create_async_llm_client(settings) as client: await client.chat(...)``."""

    def __init__(self, settings: Settings, *, max_connections: int | None = None) -> None:
        self.settings = settings
        self.provider = provider_for(settings)
        self._max_connections = max_connections or settings.batch_max_concurrent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncLLMClient:
        self._session = aiohttp.ClientSession(
            headers=self.provider.headers(self.settings),
            connector=aiohttp.TCPConnector(limit=self._max_connections),
            timeout=aiohttp.ClientTimeout(
                total=self.settings.ollama_timeout,
                sock_connect=min(CONNECT_TIMEOUT_SECONDS, self.settings.ollama_timeout),
            ),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes, Mapping[str, str]]:
        if self._session is None:
            raise RuntimeError("AsyncLLMClient used outside 'async with'")
        url = f"{self.settings.llm_endpoint}{path}"
        try:
            async with self._session.request(method, url, **kwargs) as response:
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
        """Raise unless the server answers and has the configured model (lists its models, no inference)."""
        timeout = aiohttp.ClientTimeout(total=min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout))
        status, body, headers = await self._request("GET", self.provider.ready_path, timeout=timeout)
        read_ready(self.provider, self.settings, status, body, headers)


def create_async_llm_client(settings: Settings, *, max_connections: int | None = None) -> AsyncLLMClient:
    """The asynchronous client for ``settings`` (its provider, endpoint, model and key)."""
    return AsyncLLMClient(settings, max_connections=max_connections)
