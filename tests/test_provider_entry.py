"""A third provider is one entry of ``llm_wrapper.PROVIDERS``: the proof.

The test registers a made-up API ("tiny": ``POST /generate``, ``GET /ready``, errors as
``{"problem": ...}``, a key header) as one entry, with nothing changed in any module, and runs it
against a fake server of that API on loopback through everything that calls an LLM: the settings,
both transports, both pools, the classifier and the real API over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

import llm_wrapper
from aggregator import ConversationIn
from async_llm_wrapper import create_async_llm_client
from classifier import ConversationClassifier
from config import Settings, load_settings
from error_handler import ConfigError, LLMBusyError, LLMError, LLMOutputError, LLMServerError, LLMUnavailableError
from fakes.ollama import Behavior, ChatRecord, ErrorReply, FakeOllama, Reply, default_classification
from llm_pool import AsyncLLMPool
from llm_wrapper import ChatResult, Provider, create_llm_client
from tests.conftest import RunningAPI
from tests.net_helpers import closed_port_url

# --- the new provider: everything it needs is this entry -------------------------------------------


def tiny_payload(settings: Settings, messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
    return {"model": settings.llm_model, "messages": messages, "schema": schema,
            "limit": settings.ollama_num_predict}


def tiny_answer(data: Any, settings: Settings) -> ChatResult:
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise LLMOutputError(f"the tiny server's answer has no text: {str(data)[:100]}")
    return ChatResult(content=data["text"], model=str(data.get("model")), eval_count=data.get("tokens"))


def tiny_error(status: int, body: bytes, settings: Settings, headers: Mapping[str, str] | None) -> LLMError:
    problem = json.loads(body).get("problem", "?")
    if status == 503:
        return LLMBusyError(f"The tiny server is busy: {problem}")
    return LLMServerError(f"The tiny server failed (HTTP {status}): {problem}")


def tiny_models(body: bytes, settings: Settings) -> None:
    if settings.llm_model not in json.loads(body)["loaded"]:
        raise LLMServerError(f"the tiny server has not loaded {settings.llm_model}")


TINY = Provider(
    display_name="the tiny server",
    chat_path="/generate",
    ready_path="/ready",
    build_payload=tiny_payload,
    read_answer=tiny_answer,
    map_error=tiny_error,
    check_models=tiny_models,
    unavailable_hint="Start tiny-server.",
    headers=lambda settings: {"X-Tiny-Key": "k1"},
)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTiny]:
    monkeypatch.setitem(llm_wrapper.PROVIDERS, "tiny", TINY)  # the one change a new provider is
    with FakeTiny() as fake:
        yield fake


# --- a fake server of that API (the fake Ollama's scripting, recording and lifecycle) ---------------


class FakeTiny(FakeOllama):
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/ready", self._ready), web.post("/generate", self._generate)]

    async def _ready(self, request: web.Request) -> web.Response:
        return web.json_response({"loaded": ["llama3"]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = self._record(body, dict(request.headers))
        return await self._serve(request, body, record, self._next_behavior(body))

    async def _answer(
        self, request: web.Request, body: dict[str, Any], record: ChatRecord, behavior: Behavior, delay: float
    ) -> web.StreamResponse:
        if isinstance(behavior, ErrorReply):
            return web.json_response({"problem": behavior.message}, status=behavior.status)
        assert isinstance(behavior, Reply)
        text = behavior.content or json.dumps(default_classification({**body, "format": body["schema"]}))
        return web.json_response({"text": text, "model": body["model"], "tokens": len(text) // 4})


def tiny_settings(url: str, tmp_path: Path) -> Settings:
    return load_settings({"llm_provider": "tiny", "llm_endpoint": url, "ollama_timeout": 5,
                          "batch_files_dir": tmp_path / "batch_files"}, environ={}, env_file=None)


CONVERSATION = {"conversation_number": "7", "messages": [{"sender": "customer", "text": "Where is my parcel?"}]}


# --- the tests --------------------------------------------------------------------------------------


def test_the_settings_accept_exactly_the_names_of_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="LLM_PROVIDER='tiny'.*must be one of ollama, openai"):
        load_settings({}, environ={"LLM_PROVIDER": "tiny"}, env_file=None)
    monkeypatch.setitem(llm_wrapper.PROVIDERS, "tiny", TINY)
    assert load_settings({}, environ={"LLM_PROVIDER": " Tiny "}, env_file=None).llm_provider == "tiny"


def test_both_transports_speak_the_new_api(tiny: FakeTiny, tmp_path: Path) -> None:
    settings = tiny_settings(tiny.url, tmp_path)
    classifier = ConversationClassifier.from_settings(settings)
    prepared = classifier.prepare(ConversationIn.model_validate(CONVERSATION))

    with create_llm_client(settings) as client:
        client.check_ready()
        answer = client.chat(prepared.messages, classifier.schema)

    async def chat_async() -> ChatResult:
        async with create_async_llm_client(settings) as client:
            await client.check_ready()
            return await client.chat(prepared.messages, classifier.schema)

    assert asyncio.run(chat_async()) == answer
    assert json.loads(answer.content)[1] in classifier.schema["prefixItems"][1]["enum"]  # the intent's code
    assert answer.model == "llama3" and answer.eval_count
    first, second = tiny.chat_records
    assert first.body == second.body == tiny_payload(settings, prepared.messages, classifier.schema)
    assert first.headers["X-Tiny-Key"] == second.headers["X-Tiny-Key"] == "k1"


@pytest.mark.parametrize("transport", ["sync", "async"])
def test_its_errors_become_the_typed_errors(tiny: FakeTiny, tmp_path: Path, transport: str) -> None:
    messages, schema = [{"role": "user", "content": "hi"}], {"type": "object", "properties": {}}

    def chat(settings: Settings) -> ChatResult:
        if transport == "sync":
            with create_llm_client(settings) as client:
                return client.chat(messages, schema)

        async def go() -> ChatResult:
            async with create_async_llm_client(settings) as client:
                return await client.chat(messages, schema)

        return asyncio.run(go())

    tiny.enqueue(ErrorReply(503, "warming up"), Reply(content="not json, still an answer"))
    with pytest.raises(LLMBusyError, match="warming up"):
        chat(tiny_settings(tiny.url, tmp_path))
    assert chat(tiny_settings(tiny.url, tmp_path)).content == "not json, still an answer"
    endpoint = closed_port_url()
    with pytest.raises(LLMUnavailableError) as info:
        chat(tiny_settings(endpoint, tmp_path))
    assert info.value.message.startswith(f"Cannot reach the tiny server at {endpoint}")
    assert info.value.hint == "Start tiny-server."


async def test_the_batch_side_pool_and_classifier_use_it(tiny: FakeTiny, tmp_path: Path) -> None:
    settings = tiny_settings(tiny.url, tmp_path)
    classifier = ConversationClassifier.from_settings(settings)
    async with AsyncLLMPool(settings, create_async_llm_client) as pool:
        await pool.check_ready(pause_failed=True)
        outcome = await classifier.classify_async(ConversationIn.model_validate(CONVERSATION), pool)
    assert outcome.classification.intent in classifier.taxonomy.field("intent").names
    assert tiny.chat_count == 1


def test_the_api_serves_it(tiny: FakeTiny, tmp_path: Path, start_api: Callable[[Settings], RunningAPI]) -> None:
    settings = tiny_settings(tiny.url, tmp_path)
    api = start_api(settings)
    with requests.Session() as http:
        ready = http.get(f"{api.url}/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["servers"][0]["ready"] is True
        answer = http.post(f"{api.url}/classify", json=CONVERSATION, timeout=30)
    assert answer.status_code == 200, answer.text
    classifier = ConversationClassifier.from_settings(settings)
    assert tiny.chat_requests[0]["schema"] == classifier.schema  # the answer's schema reached the provider
    assert answer.json()["classification"]["topic"] in classifier.taxonomy.field("topic").names
