"""Synchronous Ollama client against the fake Ollama server: the payload it sends and every failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aggregator import validate_conversation
from classifier import ConversationClassifier
from config import Settings
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
from fakes.ollama import BUSY, RUNNER_CRASHED, Behavior, Disconnect, ErrorReply, FakeOllama, RawReply, Reply
from llm_wrapper import LLMClient
from prompt_builder import output_schema
from tests.net_helpers import closed_port_url

SettingsFactory = Callable[..., Settings]

CONVERSATION_A = {
    "conversation_number": "A",
    "messages": [
        {"sender": "customer", "text": "Where is my parcel? It was due Monday."},
        {"sender": "agent", "text": "Let me check."},
    ],
}
CONVERSATION_B = {
    "conversation_number": "B",
    "messages": [{"sender": "customer", "text": "I was charged twice for my plan."}],
}


def chat_messages(settings: Settings, conversation: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    classifier = ConversationClassifier.from_settings(settings)
    prepared = classifier.prepare(validate_conversation(conversation))
    return prepared.messages, classifier.schema


@dataclass(frozen=True)
class ErrorCase:
    """A scripted failure of the fake and the error both clients must raise for it."""

    behavior: Behavior
    error: type[LLMError]
    fragments: tuple[str, ...]  # all must appear in str(error)


#: Shared with tests/test_async_llm_wrapper.py: both transports must map failures the same way.
ERROR_CASES: dict[str, ErrorCase] = {
    "404 model not found": ErrorCase(
        ErrorReply(404, "model 'llama3' not found, try pulling it first"),
        ModelNotFoundError,
        ("'llama3'", "ollama pull llama3"),
    ),
    "503 busy": ErrorCase(BUSY, LLMBusyError, ("busy", "Retry later")),
    "500 runner crashed": ErrorCase(
        RUNNER_CRASHED, LLMServerError, ("HTTP 500", "llama runner process has terminated")
    ),
    "502 html from a proxy": ErrorCase(
        RawReply(502, b"<html><body>Bad Gateway</body></html>", "text/html"),
        LLMServerError,
        ("HTTP 502", "Bad Gateway"),
    ),
    "400 rejected": ErrorCase(
        ErrorReply(400, 'invalid format: expected "json" or a JSON schema'),
        LLMRequestRejectedError,
        ("HTTP 400", "invalid format"),
    ),
    "200 not json": ErrorCase(
        RawReply(200, b"<html>captive portal</html>", "text/html"), LLMOutputError, ("not JSON", "captive portal")
    ),
    # json.loads recurses per level: a body nested past the recursion limit raised RecursionError (a 500).
    "200 json nested too deeply": ErrorCase(
        RawReply(200, b"[" * 100_000 + b"]" * 100_000, "application/json"), LLMOutputError, ("not JSON",)
    ),
    "200 json without message": ErrorCase(
        RawReply(200, b'{"done": true}', "application/json"), LLMOutputError, ("no message.content",)
    ),
    "done_reason length": ErrorCase(
        Reply(content='{"categorization": "Customer asks', done_reason="length"),
        LLMOutputError,
        ("cut off", "OLLAMA_NUM_PREDICT", "256"),
    ),
    "done false": ErrorCase(Reply(done=False), LLMOutputError, ("cut off", "done=False", "OLLAMA_NUM_PREDICT")),
    "empty content": ErrorCase(Reply(content="  \n "), LLMOutputError, ("empty content",)),
    "dropped connection": ErrorCase(Disconnect(), LLMServerError, ("closed the connection",)),
    "too slow": ErrorCase(Reply(delay=3), LLMTimeoutError, ("did not answer within 1 s", "OLLAMA_TIMEOUT")),
}


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(ollama_timeout=1)


# --- the payload ----------------------------------------------------------------------------


def test_payload_as_the_fake_received_it(settings: Settings, fake_ollama: FakeOllama) -> None:
    messages, schema = chat_messages(settings, CONVERSATION_A)
    with LLMClient(settings) as client:
        result = client.chat(messages, schema)

    [request] = fake_ollama.chat_requests
    assert request["model"] == "llama3"
    assert request["stream"] is False
    assert request["think"] is False
    assert request["options"] == {"temperature": 0, "num_predict": 256}
    assert request["keep_alive"] == "5m"
    assert request["messages"] == messages
    assert request["format"] == output_schema(ConversationClassifier.from_settings(settings).taxonomy)
    assert request["format"]["type"] == "array" and len(request["format"]["prefixItems"]) == 4
    # The answer is read back.
    answer = json.loads(result.content)
    assert answer[1] in schema["prefixItems"][1]["enum"]
    assert result.model == "llama3"
    assert result.done_reason == "stop"
    assert result.prompt_eval_count == fake_ollama.chat_records[0].prompt_eval_count
    assert result.eval_count is not None and result.total_duration_ns is not None


@pytest.mark.parametrize(
    "keep_alive, sent", [("5m", "5m"), (" 10m ", "10m"), ("300", 300), ("-1", -1), ("0", 0), ("1h30m", "1h30m")]
)
def test_keep_alive_from_settings(
    make_settings: SettingsFactory, fake_ollama: FakeOllama, keep_alive: str, sent: Any
) -> None:
    settings = make_settings(ollama_keep_alive=keep_alive)
    with LLMClient(settings) as client:
        client.chat(*chat_messages(settings, CONVERSATION_A))
    assert fake_ollama.chat_requests[0]["keep_alive"] == sent
    assert type(fake_ollama.chat_requests[0]["keep_alive"]) is type(sent)


def test_model_and_num_predict_from_settings(make_settings: SettingsFactory, fake_ollama: FakeOllama) -> None:
    fake_ollama.models = ["qwen3:4b"]
    settings = make_settings(llm_model="qwen3:4b", ollama_num_predict=128)
    with LLMClient(settings) as client:
        client.chat(*chat_messages(settings, CONVERSATION_A))
    request = fake_ollama.chat_requests[0]
    assert request["model"] == "qwen3:4b"
    assert request["options"]["num_predict"] == 128


def test_the_environment_s_proxy_is_used(make_settings: SettingsFactory, fake_ollama: FakeOllama,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads the proxy settings once (requests would on every request: issue 19), not never.
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fake_ollama.url)  # the fake serves the proxied request itself
    settings = make_settings(llm_endpoint="http://llm.invalid:11434", ollama_timeout=5)
    with LLMClient(settings) as client:
        client.chat(*chat_messages(settings, CONVERSATION_A))
    [record] = fake_ollama.chat_records
    assert record.headers["Host"] == "llm.invalid:11434"  # sent to the proxy, for the endpoint


def test_a_redirect_is_followed(settings: Settings, fake_ollama: FakeOllama) -> None:
    # The client hands requests to the transport adapter itself (issue 19); a server behind a proxy
    # that redirects (307 keeps the method and body) is still reached, as with Session.request.
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", f"{fake_ollama.url}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        redirected = settings.model_copy(update={"llm_endpoint": f"http://127.0.0.1:{server.server_port}"})
        with LLMClient(redirected) as client:
            result = client.chat(*chat_messages(redirected, CONVERSATION_A))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.content and len(fake_ollama.chat_requests) == 1


def test_prefix_is_byte_identical_across_conversations(settings: Settings, fake_ollama: FakeOllama) -> None:
    with LLMClient(settings) as client:
        client.chat(*chat_messages(settings, CONVERSATION_A))
        client.chat(*chat_messages(settings, CONVERSATION_B))

    first, second = fake_ollama.chat_requests
    assert json.dumps(first["messages"][:-1]) == json.dumps(second["messages"][:-1])
    assert first["messages"][0]["role"] == "system"
    assert first["messages"][-1] != second["messages"][-1]
    assert second["messages"][-1] == {
        "role": "user",
        "content": 'Conversation:\nCustomer: "I was charged twice for my plan."',
    }
    assert json.dumps(first["format"]) == json.dumps(second["format"])
    # The fake's prompt cache sees the shared prefix.
    one, two = fake_ollama.chat_records
    assert one.cached_chars == 0
    prefix_chars = sum(len(m["content"]) for m in second["messages"][:-1])
    assert two.cached_chars == prefix_chars > 0
    assert two.prompt_eval_count < one.prompt_eval_count


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_failures_raise_typed_errors(settings: Settings, fake_ollama: FakeOllama, case: ErrorCase) -> None:
    fake_ollama.enqueue(case.behavior)
    with LLMClient(settings) as client:
        with pytest.raises(case.error) as info:
            client.chat(*chat_messages(settings, CONVERSATION_A))
        assert type(info.value) is case.error
        for fragment in case.fragments:
            assert fragment in str(info.value)
        # The client is still usable after any failure.
        assert json.loads(client.chat(*chat_messages(settings, CONVERSATION_B)).content)
    assert fake_ollama.chat_count == 2


def test_model_not_pulled_on_the_server(make_settings: SettingsFactory, fake_ollama: FakeOllama) -> None:
    fake_ollama.models = ["mistral:latest"]
    settings = make_settings()
    with LLMClient(settings) as client, pytest.raises(ModelNotFoundError) as info:
        client.chat(*chat_messages(settings, CONVERSATION_A))
    assert info.value.model == "llama3"
    assert "Model 'llama3' is not available" in info.value.message
    assert fake_ollama.url in info.value.message
    assert info.value.hint is not None and "`ollama pull llama3`" in info.value.hint


def test_connection_refused_names_the_endpoint(make_settings: SettingsFactory) -> None:
    endpoint = closed_port_url()
    settings = make_settings(llm_endpoint=endpoint)
    with LLMClient(settings) as client, pytest.raises(LLMUnavailableError) as info:
        client.chat(*chat_messages(settings, CONVERSATION_A))
    assert endpoint in info.value.message
    assert "ollama serve" in str(info.value)
    assert info.value.details["endpoint"] == endpoint
    assert info.value.transient


# --- readiness ------------------------------------------------------------------------------


def test_check_ready_ok_without_a_chat(settings: Settings, fake_ollama: FakeOllama) -> None:
    with LLMClient(settings) as client:
        client.check_ready()
    assert fake_ollama.chat_count == 0


@pytest.mark.parametrize(
    "configured, served, ready",
    [
        ("llama3", ["llama3:latest"], True),
        ("llama3:latest", ["llama3"], True),
        ("llama3", ["llama3:8b", "mistral"], False),
        ("llama3:8b", ["llama3"], False),
        ("library/llama3", ["library/llama3:latest"], True),
    ],
)
def test_check_ready_matches_model_names(
    make_settings: SettingsFactory, fake_ollama: FakeOllama, configured: str, served: list[str], ready: bool
) -> None:
    fake_ollama.models = [name if ":" in name else f"{name}:latest" for name in served]
    settings = make_settings(llm_model=configured)
    with LLMClient(settings) as client:
        if ready:
            client.check_ready()
        else:
            with pytest.raises(ModelNotFoundError) as info:
                client.check_ready()
            assert f"ollama pull {configured}" in str(info.value)


def test_check_ready_with_a_fresh_server_lacking_the_model(make_settings: SettingsFactory) -> None:
    with FakeOllama(models=["other"]) as other:
        settings = make_settings(llm_endpoint=other.url)
        with LLMClient(settings) as client, pytest.raises(ModelNotFoundError) as info:
            client.check_ready()
    assert other.url in info.value.message


def test_check_ready_unreachable(make_settings: SettingsFactory) -> None:
    endpoint = closed_port_url()
    with LLMClient(make_settings(llm_endpoint=endpoint)) as client, pytest.raises(LLMUnavailableError) as info:
        client.check_ready()
    assert endpoint in info.value.message
