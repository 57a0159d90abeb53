"""Asynchronous Ollama client (batch processor) against the fake Ollama server.

Same payload and the same error mapping as the synchronous client: only the transport differs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from async_llm_wrapper import AsyncLLMClient
from config import Settings
from error_handler import LLMUnavailableError, ModelNotFoundError
from fakes.ollama import FakeOllama, Reply
from llm_wrapper import build_ollama_payload
from tests.net_helpers import closed_port_url
from tests.test_llm_wrapper import CONVERSATION_A, CONVERSATION_B, ERROR_CASES, ErrorCase, chat_messages

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(ollama_timeout=1)


async def test_payload_as_the_fake_received_it(settings: Settings, fake_ollama: FakeOllama) -> None:
    messages, schema = chat_messages(settings, CONVERSATION_A)
    async with AsyncLLMClient(settings) as client:
        result = await client.chat(messages, schema)

    [request] = fake_ollama.chat_requests
    assert request == build_ollama_payload(settings, messages, schema)  # the shared payload, as sent by sync
    assert request["model"] == "llama3"
    assert request["stream"] is False
    assert request["think"] is False
    assert request["options"] == {"temperature": 0, "num_predict": 256}
    assert request["keep_alive"] == "5m"
    assert request["format"] == schema
    # The answer is an array of the categorization and label codes (AnswerFormat): intent second, sentiment last.
    assert set(schema["prefixItems"][1]["enum"]) >= {"Order", "Other"}
    assert json.loads(result.content)[-1] in schema["prefixItems"][-1]["enum"]
    assert result.prompt_eval_count == fake_ollama.chat_records[0].prompt_eval_count


async def test_numeric_keep_alive_is_sent_as_a_number(make_settings: SettingsFactory, fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_keep_alive="300")
    async with AsyncLLMClient(settings) as client:
        await client.chat(*chat_messages(settings, CONVERSATION_A))
    assert fake_ollama.chat_requests[0]["keep_alive"] == 300


async def test_prefix_is_byte_identical_across_conversations(settings: Settings, fake_ollama: FakeOllama) -> None:
    async with AsyncLLMClient(settings) as client:
        await client.chat(*chat_messages(settings, CONVERSATION_A))
        await client.chat(*chat_messages(settings, CONVERSATION_B))
    first, second = fake_ollama.chat_requests
    assert json.dumps(first["messages"][:-1]) == json.dumps(second["messages"][:-1])
    assert first["messages"][-1]["role"] == second["messages"][-1]["role"] == "user"
    assert first["messages"][-1] != second["messages"][-1]
    assert fake_ollama.chat_records[1].cached_chars > 0


@pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
async def test_failures_raise_typed_errors(settings: Settings, fake_ollama: FakeOllama, case: ErrorCase) -> None:
    fake_ollama.enqueue(case.behavior)
    async with AsyncLLMClient(settings) as client:
        with pytest.raises(case.error) as info:
            await client.chat(*chat_messages(settings, CONVERSATION_A))
        assert type(info.value) is case.error
        for fragment in case.fragments:
            assert fragment in str(info.value)
        # The session is still usable after any failure.
        assert json.loads((await client.chat(*chat_messages(settings, CONVERSATION_B))).content)
    assert fake_ollama.chat_count == 2


async def test_model_not_pulled_on_the_server(make_settings: SettingsFactory, fake_ollama: FakeOllama) -> None:
    fake_ollama.models = ["mistral:latest"]
    settings = make_settings()
    async with AsyncLLMClient(settings) as client:
        with pytest.raises(ModelNotFoundError) as info:
            await client.chat(*chat_messages(settings, CONVERSATION_A))
    assert "'llama3'" in info.value.message
    assert "ollama pull llama3" in str(info.value)


async def test_connection_refused_names_the_endpoint(make_settings: SettingsFactory) -> None:
    endpoint = closed_port_url()
    settings = make_settings(llm_endpoint=endpoint)
    async with AsyncLLMClient(settings) as client:
        with pytest.raises(LLMUnavailableError) as info:
            await client.chat(*chat_messages(settings, CONVERSATION_A))
    assert endpoint in info.value.message
    assert "ollama serve" in str(info.value)


async def test_check_ready(make_settings: SettingsFactory, fake_ollama: FakeOllama) -> None:
    async with AsyncLLMClient(make_settings()) as client:
        await client.check_ready()
    fake_ollama.models = ["other:latest"]
    async with AsyncLLMClient(make_settings()) as client:
        with pytest.raises(ModelNotFoundError):
            await client.check_ready()
    async with AsyncLLMClient(make_settings(llm_model="other")) as client:
        await client.check_ready()  # "other" == "other:latest"
    assert fake_ollama.chat_count == 0


async def test_check_ready_unreachable(make_settings: SettingsFactory) -> None:
    endpoint = closed_port_url()
    async with AsyncLLMClient(make_settings(llm_endpoint=endpoint)) as client:
        with pytest.raises(LLMUnavailableError) as info:
            await client.check_ready()
    assert endpoint in info.value.message


async def test_used_outside_async_with(settings: Settings) -> None:
    client = AsyncLLMClient(settings)
    with pytest.raises(RuntimeError, match="async with"):
        await client.chat(*chat_messages(settings, CONVERSATION_A))


async def test_concurrent_chats_respect_the_connection_limit(
    make_settings: SettingsFactory, fake_ollama: FakeOllama
) -> None:
    settings = make_settings()
    fake_ollama.latency = 0.05
    conversations = [
        {"conversation_number": str(i), "messages": [{"sender": "customer", "text": f"question number {i}"}]}
        for i in range(8)
    ]
    async with AsyncLLMClient(settings, max_connections=2) as client:
        results = await asyncio.gather(*(client.chat(*chat_messages(settings, c)) for c in conversations))
    assert len(results) == 8
    assert fake_ollama.chat_count == 8
    assert 1 <= fake_ollama.max_in_flight <= 2
    # Each answer belongs to its own request (the fake answers from the request's last message).
    received = {r["messages"][-1]["content"] for r in fake_ollama.chat_requests}
    assert received == {f'Conversation:\nCustomer: "question number {i}"' for i in range(8)}


async def test_scripted_reply_is_returned(settings: Settings, fake_ollama: FakeOllama) -> None:
    content = json.dumps({"categorization": "x", "intent": "Other", "topic": "Other", "sentiment": "Neutral"})
    fake_ollama.enqueue(Reply(content=content))
    async with AsyncLLMClient(settings) as client:
        result = await client.chat(*chat_messages(settings, CONVERSATION_A))
    assert result.content == content
