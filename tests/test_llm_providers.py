"""Conformance: both providers (Ollama, OpenAI-compatible), both transports (sync, async), one set of tests.

Each runs against its fake server on loopback with the real request and answer shapes; a failure
of the server must become the same typed error whichever provider and transport met it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aggregator import validate_conversation
from async_llm_wrapper import AsyncLLMClient, create_async_llm_client
from classifier import Classification, ConversationClassifier
from config import Settings, load_settings
from error_handler import (
    LLMBusyError,
    LLMError,
    LLMOutputError,
    LLMRequestRejectedError,
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    ModelNotFoundError,
)
from fakes.ollama import Behavior, Disconnect, ErrorReply, FakeOllama, RawReply, Reply, fake_embedding
from fakes.openai import FakeOpenAI
from llm_wrapper import ChatResult, LLMClient, create_llm_client, retry_after_seconds
from tests.net_helpers import closed_port_url
from tests.test_llm_wrapper import CONVERSATION_A, CONVERSATION_B, chat_messages

PROVIDERS = ["ollama", "openai"]
TRANSPORTS = ["sync", "async"]


@dataclass
class Server:
    provider: str
    fake: FakeOllama
    endpoint: str
    tmp_path: Path

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_provider": self.provider,
            "llm_endpoint": self.endpoint,
            "ollama_timeout": 1,
            "batch_files_dir": self.tmp_path / "batch_files",
        }
        values.update(overrides)
        return load_settings(values, environ={}, env_file=None)


@pytest.fixture(params=PROVIDERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "ollama":
        with FakeOllama() as fake:
            yield Server("ollama", fake, fake.url, tmp_path)
    else:
        with FakeOpenAI() as fake_openai:
            yield Server("openai", fake_openai, fake_openai.base_url, tmp_path)


def run(transport: str, settings: Settings, call: Callable[[Any], Any]) -> Any:
    """``call(client)`` with a fresh client of ``transport``; awaits it for the async one."""
    if transport == "sync":
        with create_llm_client(settings) as client:
            return call(client)

    async def go() -> Any:
        async with create_async_llm_client(settings) as client:
            return await call(client)

    return asyncio.run(go())


def chat(transport: str, settings: Settings, conversation: dict[str, Any] = CONVERSATION_A) -> ChatResult:
    messages, schema = chat_messages(settings, conversation)
    return run(transport, settings, lambda client: client.chat(messages, schema))


def check_ready(transport: str, settings: Settings) -> None:
    run(transport, settings, lambda client: client.check_ready())


@dataclass(frozen=True)
class Case:
    behavior: Behavior
    error: type[LLMError]
    fragments: tuple[str, ...]


CASES: dict[str, Case] = {
    "404": Case(ErrorReply(404, "model 'llama3' not found"), ModelNotFoundError, ("'llama3'", "LLM_MODEL")),
    "503 busy": Case(ErrorReply(503, "server busy"), LLMBusyError, ("busy", "Retry later")),
    "429 too many": Case(ErrorReply(429, "too many requests"), LLMBusyError, ("busy", "too many requests")),
    "500": Case(ErrorReply(500, "runner crashed: exit status 2"), LLMServerError, ("HTTP 500", "runner crashed")),
    "502 html from a proxy": Case(
        RawReply(502, b"<html><body>Bad Gateway</body></html>", "text/html"), LLMServerError,
        ("HTTP 502", "Bad Gateway"),
    ),
    "400 rejected": Case(ErrorReply(400, "invalid schema"), LLMRequestRejectedError, ("HTTP 400", "invalid schema")),
    "200 not json": Case(RawReply(200, b"<html>portal</html>", "text/html"), LLMOutputError, ("not JSON", "portal")),
    "200 json of another shape": Case(RawReply(200, b'{"ok": true}', "application/json"), LLMOutputError, ("no ",)),
    "cut off (length)": Case(
        Reply(content='{"categorization": "Cust', done_reason="length"), LLMOutputError,
        ("cut off", "OLLAMA_NUM_PREDICT"),
    ),
    "empty content": Case(Reply(content="  \n "), LLMOutputError, ("empty content",)),
    "dropped connection": Case(Disconnect(), LLMServerError, ("closed the connection",)),
    "too slow": Case(Reply(delay=3), LLMTimeoutError, ("did not answer within 1 s", "OLLAMA_TIMEOUT")),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_valid_answer_is_read_back(server: Server, transport: str) -> None:
    settings = server.settings()
    messages, schema = chat_messages(settings, CONVERSATION_A)
    result = chat(transport, settings)
    answer = json.loads(result.content)
    items = schema["prefixItems"]  # the fake answers what the schema asks: one value per position
    assert isinstance(answer, list) and len(answer) == len(items) == 4
    for value, spec in zip(answer[1:], items[1:], strict=True):
        assert value in spec["enum"]
    assert 0 < len(answer[0]) <= items[0]["maxLength"]
    assert result.model == "llama3" or result.model == "llama3:latest"
    assert result.done_reason == "stop"
    assert result.eval_count is not None and result.eval_count > 0
    assert result.prompt_tokens is not None and result.prompt_tokens > 0
    [request] = server.fake.chat_requests
    assert request["messages"] == messages
    assert request["temperature" if server.provider == "openai" else "options"] is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_shared_prefix_is_evaluated_once(server: Server, transport: str) -> None:
    settings = server.settings()
    first, second = chat(transport, settings, CONVERSATION_A), chat(transport, settings, CONVERSATION_B)
    assert first.prompt_eval_count is not None and second.prompt_eval_count is not None
    assert second.prompt_eval_count < first.prompt_eval_count
    if server.provider == "openai":  # only OpenAI-compatible servers report the cached part
        assert second.cached_prompt_tokens is not None and second.cached_prompt_tokens > 0
        assert second.prompt_eval_count == second.prompt_tokens - second.cached_prompt_tokens


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_failures_become_the_same_typed_errors(server: Server, transport: str, case: Case) -> None:
    settings = server.settings()
    server.fake.enqueue(case.behavior)
    messages, schema = chat_messages(settings, CONVERSATION_A)

    def call(client: LLMClient | AsyncLLMClient) -> Any:
        if isinstance(client, LLMClient):
            with pytest.raises(case.error) as info:
                client.chat(messages, schema)
            return info.value, client.chat(messages, schema)  # still usable after any failure

        async def go() -> Any:
            with pytest.raises(case.error) as info:
                await client.chat(messages, schema)
            return info.value, await client.chat(messages, schema)

        return go()

    error, after = run(transport, settings, call)
    assert type(error) is case.error
    for fragment in case.fragments:
        assert fragment in str(error)
    assert json.loads(after.content)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("header, seconds", [("7", 7), ("0.2", 1), (None, 5)])
def test_busy_honours_retry_after(server: Server, transport: str, header: str | None, seconds: int) -> None:
    headers = {"Retry-After": header} if header else None
    server.fake.enqueue(ErrorReply(503, "Loading model", headers=headers))
    with pytest.raises(LLMBusyError) as info:
        chat(transport, server.settings())
    assert info.value.retry_after_seconds == seconds
    assert info.value.transient


def test_retry_after_as_an_http_date() -> None:
    from datetime import datetime

    now = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
    assert retry_after_seconds({"Retry-After": "Fri, 27 Nov 2026 10:00:30 GMT"}, now) == 30
    assert retry_after_seconds({"Retry-After": "Fri, 27 Nov 2026 09:00:00 GMT"}, now) == 0
    assert retry_after_seconds({"Retry-After": "soon"}, now) is None
    assert retry_after_seconds({"Retry-After": "86400"}, now) == 300  # capped


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_model_the_server_does_not_have(server: Server, transport: str) -> None:
    server.fake.models = ["mistral:latest" if server.provider == "ollama" else "mistral"]
    settings = server.settings()
    with pytest.raises(ModelNotFoundError) as info:
        chat(transport, settings)
    assert info.value.model == "llama3"
    assert server.endpoint in info.value.message
    with pytest.raises(ModelNotFoundError):
        check_ready(transport, settings)
    assert server.fake.chat_count == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ready_without_inference(server: Server, transport: str) -> None:
    check_ready(transport, server.settings())
    assert server.fake.chat_count == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_readiness_answer_slower_than_the_timeout_is_a_timeout(server: Server, transport: str) -> None:
    server.fake.ready_delay = 1.5  # OLLAMA_TIMEOUT is 1 s here
    with pytest.raises(LLMTimeoutError, match="did not answer within 1 s"):
        check_ready(transport, server.settings())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_user_and_password_in_the_endpoint_go_as_basic_auth(tmp_path: Path, transport: str) -> None:
    # The async client's readiness check is a GET of its own (http.client, not the aiohttp
    # session): it must authenticate as the session's calls and the sync client do.
    seen: list[tuple[str, str | None]] = []

    class Tags(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"models": [{"name": "llama3:latest"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    user, password = "ops@example", "pass-Qz8:word"  # percent-encoded in the URL, as the README says
    with ThreadingHTTPServer(("127.0.0.1", 0), Tags) as httpd:
        serving = threading.Thread(target=httpd.serve_forever, daemon=True)
        serving.start()
        try:
            userinfo = f"{user.replace('@', '%40')}:{password.replace(':', '%3A')}"
            endpoint = f"http://{userinfo}@127.0.0.1:{httpd.server_port}/llm"
            check_ready(transport, Server("ollama", FakeOllama(), endpoint, tmp_path).settings())
        finally:
            httpd.shutdown()
            serving.join()
    assert seen == [("/llm/api/tags", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_server_names_the_endpoint(tmp_path: Path, provider: str, transport: str) -> None:
    endpoint = closed_port_url() + ("/v1" if provider == "openai" else "")
    settings = Server(provider, FakeOllama(), endpoint, tmp_path).settings()
    for call in (chat, check_ready):
        with pytest.raises(LLMUnavailableError) as info:
            call(transport, settings)  # type: ignore[operator]
        assert endpoint in info.value.message
        assert info.value.transient
    assert ("ollama serve" in str(info.value)) == (provider == "ollama")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_logprobs_are_asked_for_and_read(server: Server, transport: str) -> None:
    result = chat(transport, server.settings(llm_top_logprobs=5))
    request = server.fake.chat_requests[0]
    assert request["logprobs"] is True and request["top_logprobs"] == 5
    assert result.logprobs is not None
    assert "".join(t.token for t in result.logprobs) == result.content
    assert all(len(t.top) <= 5 for t in result.logprobs)

    server.fake.reset()
    result = chat(transport, server.settings(llm_top_logprobs=0))
    assert "logprobs" not in server.fake.chat_requests[0]
    assert result.logprobs is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_confidence_off_asks_for_no_logprobs(server: Server, transport: str) -> None:
    result = chat(transport, server.settings(confidence=False, llm_top_logprobs=5))
    request = server.fake.chat_requests[0]
    assert "logprobs" not in request and "top_logprobs" not in request
    assert result.logprobs is None


def sent_schema(provider: str, request: dict[str, Any]) -> dict[str, Any]:
    """The answer schema as the server received it: Ollama's ``format``, OpenAI's ``response_format``."""
    if provider == "ollama":
        return request["format"]
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["strict"] is True
    return request["response_format"]["json_schema"]["schema"]


def classify(transport: str, settings: Settings) -> Classification:
    """CONVERSATION_A through the whole pipeline (prompt, the provider's request, parsing, confidence)."""
    classifier = ConversationClassifier.from_settings(settings)
    conversation = validate_conversation(CONVERSATION_A)
    if transport == "sync":
        with create_llm_client(settings) as client:
            return classifier.classify(conversation, client).classification

    async def go() -> Classification:
        async with create_async_llm_client(settings) as client:
            return (await classifier.classify_async(conversation, client)).classification

    return asyncio.run(go())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_compact_answer_schema_round_trips_through_both_providers(server: Server, transport: str) -> None:
    """What the server is asked for (an array of the categorization and label codes, the bound) is what the
    parser reads back, confidences included; the few-shot answers in the prefix show the same form."""
    classification = classify(transport, server.settings())
    request = server.fake.chat_requests[0]
    schema = sent_schema(server.provider, request)
    assert schema["type"] == "array" and len(schema["prefixItems"]) == 4
    assert schema["prefixItems"][0] == {"type": "string", "minLength": 1, "maxLength": 40}
    assert "Order" in schema["prefixItems"][1]["enum"] and "Order Status" not in schema["prefixItems"][1]["enum"]
    assert classification.categorization and len(classification.categorization) <= 41  # 40 and a "…"
    assert set(classification.labels) == {"intent", "topic", "sentiment"}
    assert classification.confidence == {"intent": 1.0, "topic": 1.0, "sentiment": 1.0}  # the fake is certain
    few_shot = next(m["content"] for m in request["messages"] if m["role"] == "assistant")
    assert few_shot == '["Order status, faster shipping","Order","Shipping","Neutral"]'


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_object_answer_for_servers_without_prefix_items(server: Server, transport: str) -> None:
    """ANSWER_FORMAT=object: one-letter keys, the same labels and confidences."""
    classification = classify(transport, server.settings(answer_format="object"))
    request = server.fake.chat_requests[0]
    schema = sent_schema(server.provider, request)
    assert schema["required"] == list(schema["properties"]) == ["c", "i", "t", "s"]
    assert schema["additionalProperties"] is False
    assert set(classification.labels) == {"intent", "topic", "sentiment"}
    assert classification.confidence == {"intent": 1.0, "topic": 1.0, "sentiment": 1.0}
    few_shot = next(m["content"] for m in request["messages"] if m["role"] == "assistant")
    assert few_shot == '{"c":"Order status, faster shipping","i":"Order","t":"Shipping","s":"Neutral"}'


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_categorization_off_and_no_schema_bound(server: Server, transport: str) -> None:
    classification = classify(transport, server.settings(categorization=False, confidence=False))
    schema = sent_schema(server.provider, server.fake.chat_requests[0])
    assert len(schema["prefixItems"]) == 3 and all("enum" in item for item in schema["prefixItems"])
    assert classification.categorization is None and classification.confidence is None
    assert set(classification.labels) == {"intent", "topic", "sentiment"}

    server.fake.reset()
    classify(transport, server.settings(categorization_max_chars=0))
    assert sent_schema(server.provider, server.fake.chat_requests[0])["prefixItems"][0] == {"type": "string"}


# --- what only the OpenAI-compatible provider has ----------------------------------------------


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def openai_settings(fake: FakeOpenAI, tmp_path: Path, **overrides: Any) -> Settings:
    return Server("openai", fake, fake.base_url, tmp_path).settings(**overrides)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_openai_payload(fake_openai: FakeOpenAI, tmp_path: Path, transport: str) -> None:
    settings = openai_settings(fake_openai, tmp_path, ollama_num_predict=128)
    messages, schema = chat_messages(settings, CONVERSATION_A)
    chat(transport, settings)
    [request] = fake_openai.chat_requests
    assert request == {
        "model": "llama3",
        "messages": messages,
        "stream": False,
        "temperature": 0,
        "max_tokens": 128,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "conversation_classification", "strict": True, "schema": schema},
        },
        "logprobs": True,
        "top_logprobs": 10,
    }
    assert "Authorization" not in fake_openai.chat_records[0].headers


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_openai_api_key_is_sent_as_bearer_and_never_shown(
    fake_openai: FakeOpenAI, tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake_openai.api_key = "sk-test-not-a-real-key"
    caplog.set_level("DEBUG")
    settings = openai_settings(fake_openai, tmp_path, llm_api_key="sk-test-not-a-real-key")
    check_ready(transport, settings)
    chat(transport, settings)
    assert fake_openai.chat_records[0].headers["Authorization"] == "Bearer sk-test-not-a-real-key"
    assert "sk-test" not in repr(settings) and "sk-test" not in str(settings.model_dump())
    assert "sk-test" not in caplog.text

    wrong = openai_settings(fake_openai, tmp_path, llm_api_key="sk-wrong")
    for call in (chat, check_ready):
        with pytest.raises(LLMRequestRejectedError) as info:
            call(transport, wrong)  # type: ignore[operator]
        assert "HTTP 401" in info.value.message and "LLM_API_KEY" in str(info.value)
        assert "sk-wrong" not in str(info.value)


@pytest.mark.parametrize(
    "status, body, error, fragment",
    [
        # OpenAI's own answer for an unknown model.
        (404, {"error": {"message": "The model `x` does not exist", "type": "invalid_request_error",
                         "code": "model_not_found"}}, ModelNotFoundError, "'llama3'"),
        # vLLM's error shape, and a 400 that says the model is missing.
        (400, {"object": "error", "message": "The model `llama3` does not exist.", "type": "NotFoundError",
               "code": 404}, ModelNotFoundError, "/models"),
        (400, {"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError",
               "code": 400}, LLMRequestRejectedError, "max_tokens must be at least 1"),
        # llama.cpp's answer when the prompt does not fit.
        (400, {"error": {"code": 400, "message": "the request exceeds the available context size",
                         "type": "exceed_context_size_error"}}, LLMRequestRejectedError, "context size"),
        (500, {"error": "plain string error"}, LLMServerError, "plain string error"),
    ],
)
def test_openai_error_bodies(
    fake_openai: FakeOpenAI, tmp_path: Path, status: int, body: dict[str, Any], error: type[LLMError], fragment: str
) -> None:
    fake_openai.enqueue(RawReply(status, json.dumps(body).encode(), "application/json"))
    with pytest.raises(error) as info:
        chat("sync", openai_settings(fake_openai, tmp_path))
    assert fragment in str(info.value)


def test_openai_models_answer_of_another_shape(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    # An endpoint without /v1: llama.cpp answers its web UI or a 404; both must say what to fix.
    settings = openai_settings(fake_openai, tmp_path, llm_endpoint=fake_openai.url)
    with pytest.raises(ModelNotFoundError) as info:
        check_ready("sync", settings)
    assert "/v1" in str(info.value)


def test_openai_model_missing_lists_what_is_served(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.models = ["smollm2", "qwen2.5-7b-instruct"]
    with pytest.raises(ModelNotFoundError) as info:
        check_ready("sync", openai_settings(fake_openai, tmp_path))
    assert "smollm2, qwen2.5-7b-instruct" in str(info.value)
    assert "ollama pull" not in str(info.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_openai_model_missing_hides_the_endpoints_password(
    fake_openai: FakeOpenAI, tmp_path: Path, transport: str
) -> None:
    # The message and hint name the endpoint; like every other error they must not quote its password.
    fake_openai.models = ["smollm2"]
    endpoint = fake_openai.base_url.replace("http://", "http://user:s3cret-pw@")
    settings = openai_settings(fake_openai, tmp_path, llm_endpoint=endpoint)
    with pytest.raises(ModelNotFoundError) as info:
        check_ready(transport, settings)
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in (info.value.hint or "")
    assert "/models" in str(info.value)


def test_a_fake_with_its_slots_taken_and_no_queue_answers_busy(server: Server) -> None:
    # The fakes' OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE hold for both providers, in each one's error shape.
    server.fake.parallel, server.fake.max_queue = 1, 0
    server.fake.enqueue(Reply(delay=5))  # holds the only slot while the second call arrives
    settings = server.settings(ollama_timeout=30)
    with ThreadPoolExecutor(1) as threads:
        first = threads.submit(chat, "sync", settings)
        deadline = time.monotonic() + 30
        while server.fake.max_in_flight < 1 and time.monotonic() < deadline and not first.done():
            time.sleep(0.01)
        with pytest.raises(LLMBusyError):
            chat("sync", settings)
        assert first.result().content
    assert server.fake.busy_count == 1


# --- embeddings (few-shot retrieval, EMBEDDING_MODEL) ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_embeddings_come_back_one_per_text_in_order(server: Server, transport: str) -> None:
    settings = server.settings(embedding_model="nomic-embed-text")
    texts = ["where is my order", "refund please", "router is down"]
    vectors = run(transport, settings, lambda client: client.embed(texts))
    assert vectors == [fake_embedding(t) for t in texts]
    assert server.fake.embed_requests == [texts]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_missing_embedding_model_names_embedding_model(server: Server, transport: str) -> None:
    settings = server.settings(embedding_model="no-such-embedder")
    with pytest.raises(ModelNotFoundError) as error:
        run(transport, settings, lambda client: client.embed(["hello"]))
    assert "no-such-embedder" in str(error.value) and "EMBEDDING_MODEL" in str(error.value)
