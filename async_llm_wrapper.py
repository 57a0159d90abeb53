"""Ollama chat client for the batch processor (asynchronous, ``aiohttp``).

Same payload and answer parsing as ``llm_wrapper`` (imported from there); one
``aiohttp.ClientSession`` per process, opened and closed by ``async with``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from config import Settings
from llm_wrapper import (
    CONNECT_TIMEOUT_SECONDS,
    READY_TIMEOUT_SECONDS,
    ChatResult,
    build_chat_payload,
    dropped_error,
    parse_chat_response,
    request_failed_error,
    require_model,
    timeout_error,
    unavailable_error,
)

logger = logging.getLogger(__name__)


class AsyncOllamaClient:
    """``async with AsyncOllamaClient(settings) as client: await client.chat(...)``."""

    def __init__(self, settings: Settings, *, max_connections: int | None = None) -> None:
        self.settings = settings
        self._max_connections = max_connections or settings.batch_max_concurrent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncOllamaClient:
        self._session = aiohttp.ClientSession(
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

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        if self._session is None:
            raise RuntimeError("AsyncOllamaClient used outside 'async with'")
        url = f"{self.settings.ollama_endpoint}{path}"
        try:
            async with self._session.request(method, url, **kwargs) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectorError as e:
            raise unavailable_error(self.settings, "connection refused or host unknown") from e
        except aiohttp.ConnectionTimeoutError as e:
            raise unavailable_error(self.settings, "connection timed out") from e
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise timeout_error(self.settings) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
            raise dropped_error(self.settings, type(e).__name__) from e
        except aiohttp.ClientError as e:
            raise request_failed_error(self.settings, url, e) from e

    async def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult:
        """One classification call: ``POST /api/chat``; raises an ``LLMError`` on any failure."""
        payload = build_chat_payload(self.settings, messages, schema)
        status, body = await self._request("POST", "/api/chat", json=payload)
        return parse_chat_response(status, body, self.settings)

    async def check_ready(self) -> None:
        """Raise unless Ollama answers and has the configured model (``GET /api/tags``)."""
        timeout = aiohttp.ClientTimeout(total=min(READY_TIMEOUT_SECONDS, self.settings.ollama_timeout))
        status, body = await self._request("GET", "/api/tags", timeout=timeout)
        require_model(body, status, self.settings)
