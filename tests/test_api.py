"""The real-time API over real HTTP (uvicorn on loopback) against the fake Ollama server.

Every row of the error table of design decision 2 (docs/architecture.md#errors) has a test
here; every failing answer is checked to be JSON ``{"error": {"type", "message", ...}}``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import requests
from starlette.requests import Request

from config import Settings
from fakes.ollama import BUSY, RUNNER_CRASHED, Disconnect, ErrorReply, FakeOllama, RawReply, Reply
from fakes.openai import FakeOpenAI
from tests.conftest import RunningAPI
from tests.net_helpers import closed_port_url

SettingsFactory = Callable[..., Settings]
StartAPI = Callable[[Settings], RunningAPI]

ROOT = Path(__file__).resolve().parents[1]
TAXONOMY = json.loads((ROOT / "config" / "taxonomy.json").read_text(encoding="utf-8"))
LABELS = {field["name"]: {entry["name"] for entry in field["labels"]} for field in TAXONOMY["fields"]}
SAMPLES = json.loads((ROOT / "data" / "sample_conversations.json").read_text(encoding="utf-8"))

CONVERSATION = {
    "conversation_number": "12345",
    "messages": [
        {"sender": "customer", "text": "Where is my order? It was due on Monday.", "timestamp": "2025-09-24T10:00:00Z"},
        {"sender": "agent", "text": "Let me check for you.", "timestamp": "2025-09-24T10:01:00Z"},
    ],
}
GOOD_ANSWER = {
    "categorization": "Customer asks where a late order is",
    "intent": "Order Status",
    "topic": "Shipping/Delivery",
    "sentiment": "Negative",
}


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


#: What the fake's default log-probabilities (every token certain) give for a well-spelled answer.
SURE = {"confidence": {"intent": 1.0, "topic": 1.0, "sentiment": 1.0}, "needs_review": False}

def post(http: requests.Session, api: RunningAPI, body: Any = None, **kwargs: Any) -> requests.Response:
    if body is not None:
        kwargs["json"] = body
    return http.post(f"{api.url}/classify", timeout=30, **kwargs)


def error_of(response: requests.Response, status: int) -> dict[str, Any]:
    """The error object of a failing answer, after checking the status and the body's shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def text_of(error: dict[str, Any]) -> str:
    return f"{error['message']} {error.get('hint', '')}"


# --- the request path ------------------------------------------------------------------------


def test_no_route_depends_on_a_plain_function(make_settings: Callable[..., Settings]) -> None:
    # FastAPI runs a plain-function dependency in its thread pool: a worker-thread hop on every request
    # (the dashboard's database getter cost /classify one; issue 19). Dependencies are coroutines.
    from fastapi.dependencies.models import Dependant

    from api import create_app

    def calls(dependant: Dependant) -> Iterator[Any]:
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    app = create_app(make_settings())
    plain = sorted({f"{route.path}: {call.__module__}.{call.__qualname__}"
                    for route in app.routes if isinstance(getattr(route, "dependant", None), Dependant)
                    for call in calls(route.dependant) if not inspect.iscoroutinefunction(call)})
    assert plain == []


# --- 200 ------------------------------------------------------------------------------------


def test_classify_echoes_messages_exactly_and_labels_are_canonical(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    messages = [
        {
            "sender": "CUSTOMER",
            "text": "Where is   my order?",
            "timestamp": 1727172000,
            "channel": "chat",
            "meta": {"a": [1, None]},
        },
        {"sender": "Agent", "text": "Checking now.", "timestamp": None},
        {"sender": "customer", "text": "Thanks", "ünïcode": "✓"},
    ]
    fake_ollama.enqueue(
        Reply(
            content=json.dumps(
                {
                    "categorization": "  Customer   asks where\nthe order is ",
                    "intent": "  order status ",
                    "topic": "SHIPPING / DELIVERY",
                    "sentiment": "neutral",
                }
            )
        )
    )
    response = post(http, api_server, {"conversation_number": 42, "messages": messages, "expected": "ignored"})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "conversation_number": "42",
        "messages": messages,
        "classification": {
            "categorization": "Customer asks where the order is",
            "intent": "Order Status",
            "topic": "Shipping/Delivery",
            "sentiment": "Neutral",
            # Labels the model spelled otherwise than the taxonomy cannot be scored: null, not a guess.
            "confidence": {"intent": None, "topic": None, "sentiment": None},
            "needs_review": False,
        },
    }
    [request] = fake_ollama.chat_requests
    assert request["messages"][-1]["content"] == (
        'Conversation:\nCustomer: "Where is my order?"\nAgent: "Checking now."\nCustomer: "Thanks"'
    )


def test_default_answer_labels_are_taxonomy_values(http: requests.Session, api_server: RunningAPI) -> None:
    body = post(http, api_server, CONVERSATION).json()
    classification = body["classification"]
    assert set(classification) == {"categorization", "intent", "topic", "sentiment", "confidence", "needs_review"}
    for name, labels in LABELS.items():
        assert classification[name] in labels
        assert 0 <= classification["confidence"][name] <= 1
    assert body["conversation_number"] == "12345"
    assert body["messages"] == CONVERSATION["messages"]
    assert "tweets" not in body


def test_tweets_input_is_classified_and_echoed(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    document = SAMPLES[0]  # a source-collection document, with extra keys (status, expected)
    fake_ollama.enqueue(Reply(content=json.dumps(GOOD_ANSWER)))
    response = post(http, api_server, document)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"conversation_number", "tweets", "classification"}
    assert body["conversation_number"] == document["conversation_number"]
    assert body["tweets"] == document["tweets"]
    assert body["classification"] == {**GOOD_ANSWER, **SURE}
    lines = fake_ollama.chat_requests[0]["messages"][-1]["content"].split("\n")
    assert lines[0] == "Conversation:"
    speakers = [line.split(":")[0] for line in lines[1:]]
    assert speakers == ["Customer" if t["inbound"] else "Agent" for t in document["tweets"]]


def test_unknown_intent_becomes_other(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="classifier")
    fake_ollama.enqueue(Reply(content=json.dumps({**GOOD_ANSWER, "intent": "Weather", "topic": "Astrology"})))
    response = post(http, api_server, CONVERSATION)
    assert response.status_code == 200
    classification = response.json()["classification"]
    assert (classification["intent"], classification["topic"]) == ("Other", "Other")
    assert any("'Weather' is not in the taxonomy" in r.getMessage() for r in caplog.records)


def test_model_prose_and_fences_are_tolerated(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    wrapped = json.dumps({"classification": GOOD_ANSWER})
    fake_ollama.enqueue(Reply(content=f"<think>hmm</think>Here you go:\n```json\n{wrapped}\n```"))
    response = post(http, api_server, CONVERSATION)
    assert response.status_code == 200
    assert response.json()["classification"] == {**GOOD_ANSWER, **SURE}


def test_concurrent_requests_get_their_own_answers(api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    fake_ollama.latency = 0.05

    def classify(i: int) -> dict[str, Any]:
        body = {"conversation_number": f"n-{i}", "messages": [{"sender": "customer", "text": f"question {i}"}]}
        with requests.Session() as session:
            response = session.post(f"{api_server.url}/classify", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, range(16)))
    assert [a["conversation_number"] for a in answers] == [f"n-{i}" for i in range(16)]
    assert [a["messages"][0]["text"] for a in answers] == [f"question {i}" for i in range(16)]
    assert fake_ollama.chat_count == 16


# --- 400 / 422: invalid input ---------------------------------------------------------------

INVALID_INPUTS: dict[str, tuple[dict[str, Any], tuple[int, ...], str | None, str]] = {
    # name: (request kwargs, allowed statuses, field, fragment of the message)
    "malformed JSON": (
        {"data": b'{"conversation_number": "1", "messages": [', "headers": {"Content-Type": "application/json"}},
        (400,),
        "body",
        "not valid JSON",
    ),
    "empty body": ({"data": b"", "headers": {"Content-Type": "application/json"}}, (400,), "body", "empty"),
    "not an object": ({"json": [CONVERSATION]}, (400, 422), "body", "object"),
    "a string": ({"json": "hello"}, (400, 422), "body", "object"),
    "wrong sender": (
        {
            "json": {
                "conversation_number": "1",
                "messages": [{"sender": "customer", "text": "a"}, {"sender": "bot", "text": "b"}],
            }
        },
        (422,),
        "messages[1].sender",
        "customer / user / client",
    ),
    "missing text": (
        {"json": {"conversation_number": "1", "messages": [{"sender": "customer"}]}},
        (422,),
        "messages[0].text",
        "messages[0].text",
    ),
    "missing conversation_number": (
        {"json": {"messages": CONVERSATION["messages"]}},
        (422,),
        "conversation_number",
        "conversation_number",
    ),
    "boolean conversation_number": (
        {"json": {"conversation_number": True, "messages": CONVERSATION["messages"]}},
        (422,),
        "conversation_number",
        "conversation_number",
    ),
    "both messages and tweets": (
        {"json": {**CONVERSATION, "tweets": SAMPLES[0]["tweets"]}},
        (422,),
        "body",
        "not both",
    ),
    "neither messages nor tweets": ({"json": {"conversation_number": "1"}}, (422,), "body", "'messages' or 'tweets'"),
    "empty messages": ({"json": {"conversation_number": "1", "messages": []}}, (422,), "body", "empty"),
    "only blank texts": (
        {"json": {"conversation_number": "1", "messages": [{"sender": "customer", "text": "  "}]}},
        (422,),
        "body",
        "empty text",
    ),
    "tweet without inbound": (
        {
            "json": {
                "conversation_number": "1",
                "tweets": [{k: v for k, v in SAMPLES[0]["tweets"][0].items() if k != "inbound"}],
            }
        },
        (422,),
        "tweets[0]",  # inbound may be left out when a role names the speaker
        "give 'inbound'",
    ),
    "NaN in an echoed field": (
        {
            "data": b'{"conversation_number": "1", "messages": [{"sender": "customer", "text": "hi", "score": NaN}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "NaN",
    ),
    "Infinity as a timestamp": (
        {
            "data": b'{"conversation_number": "1", '
            b'"messages": [{"sender": "customer", "text": "hi", "timestamp": Infinity}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "Infinity",
    ),
    # Python reads these as inf: not NaN, yet no JSON answer can carry them back (a 500 after the call).
    "1e999 in an echoed field": (
        {
            "data": b'{"conversation_number": "1", "messages": [{"sender": "customer", "text": "hi", "score": 1e999}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "1e999",
    ),
    "-1e400 as a timestamp": (
        {
            "data": b'{"conversation_number": "1", '
            b'"messages": [{"sender": "customer", "text": "hi", "timestamp": -1E+400}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "-1E+400",
    ),
    "1e999 as the conversation number": (
        {
            "data": b'{"conversation_number": 1e999, "messages": [{"sender": "customer", "text": "hi"}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "too large",
    ),
    "unpaired surrogate in a text": (
        {
            "data": b'{"conversation_number": "1", '
            b'"messages": [{"sender": "customer", "text": "broken \\ud800 emoji"}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "surrogate",
    ),
    "unpaired surrogate in a UTF-16 body (no escape needed)": (
        {
            "data": '{"conversation_number": "1", "messages": [{"sender": "customer", "text": "hi \ud800"}]}'.encode(
                "utf-16-le", "surrogatepass"),
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "surrogate",
    ),
    "unpaired surrogate in an extra field": (
        {
            "data": b'{"conversation_number": "1", "messages": [{"sender": "customer", "text": "hi", "x": "\\udfff"}]}',
            "headers": {"Content-Type": "application/json"},
        },
        (400,),
        "body",
        "surrogate",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_INPUTS.values()), ids=list(INVALID_INPUTS))
def test_invalid_input(
    http: requests.Session,
    api_server: RunningAPI,
    fake_ollama: FakeOllama,
    case: tuple[dict[str, Any], tuple[int, ...], str | None, str],
) -> None:
    kwargs, statuses, field, fragment = case
    response = post(http, api_server, **kwargs)
    assert response.status_code in statuses, response.text
    error = error_of(response, response.status_code)
    assert error["type"] == "invalid_input"
    assert error["field"] == field
    assert fragment in error["message"]
    assert fake_ollama.chat_count == 0  # invalid input never reaches the model


def test_speaker_spellings_of_real_exports_are_classified(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    roles = ("Customer", "Service Provider")
    tweets = [{**tweet, "role": role} for tweet, role in zip(SAMPLES[0]["tweets"][:2], roles, strict=True)]
    tweets[1].pop("inbound")  # the role alone names the speaker
    response = post(http, api_server, {"conversation_number": "export-1", "tweets": tweets})
    assert response.status_code == 200, response.text
    lines = fake_ollama.chat_requests[0]["messages"][-1]["content"].split("\n")[1:]
    assert [line.split(":")[0] for line in lines] == ["Customer", "Agent"]


def test_conversation_without_a_customer_turn_never_reaches_the_model(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    agent_only = {"conversation_number": "lone-reply", "messages": [
        {"sender": "Service Provider", "text": "We have fixed the outage, sorry!"},
        {"sender": "Customer", "text": "   "},
    ]}
    error = error_of(post(http, api_server, agent_only), 422)
    assert error["type"] == "invalid_input"
    assert "no customer turn" in error["message"]
    assert fake_ollama.chat_count == 0


# --- 415: only JSON bodies (a web page cannot make a browser post one across sites) ---------

NOT_JSON = {
    "no Content-Type": None,
    "form (curl -d, an HTML form)": "application/x-www-form-urlencoded",
    "multipart form": "multipart/form-data; boundary=x",
    "text/plain (a cross-site 'simple' request)": "text/plain",
    "text/plain with a charset": "text/plain; charset=utf-8",
    "text/json": "text/json",
    "a lookalike": "application/jsonx",
}


@pytest.mark.parametrize("content_type", list(NOT_JSON.values()), ids=list(NOT_JSON))
def test_a_body_not_sent_as_json_gets_415(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama, content_type: str | None
) -> None:
    request = requests.Request("POST", f"{api_server.url}/classify", data=json.dumps(CONVERSATION).encode()).prepare()
    assert "Content-Type" not in request.headers
    if content_type is not None:
        request.headers["Content-Type"] = content_type
    error = error_of(http.send(request, timeout=30), 415)
    assert error["type"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]
    assert (content_type or "no Content-Type") in error["message"]
    assert fake_ollama.chat_count == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/vnd.api+json",
        "application/merge-patch+json; charset=utf-8",
    ],
)
def test_json_media_types_are_accepted(http: requests.Session, api_server: RunningAPI, content_type: str) -> None:
    response = post(http, api_server, data=json.dumps(CONVERSATION).encode(), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["messages"] == CONVERSATION["messages"]


def test_body_that_is_not_utf8(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    body = json.dumps({**CONVERSATION, "messages": [{"sender": "customer", "text": "caf\u00e9"}]}, ensure_ascii=False)
    response = post(http, api_server, data=body.encode("latin-1"), headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert (error["type"], error["field"]) == ("invalid_input", "body")
    assert "not valid JSON" in error["message"] and "utf-8" in error["message"]
    assert fake_ollama.chat_count == 0


def test_body_nested_too_deeply(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    body = '{"conversation_number": "1", "messages": [{"sender": "customer", "text": "hi", "x": ' + nested + "}]}"
    error = error_of(post(http, api_server, data=body, headers={"Content-Type": "application/json"}), 400)
    assert (error["type"], error["field"]) == ("invalid_input", "body")
    assert "recursion" in error["message"]
    assert fake_ollama.chat_count == 0


# --- 413: body too large --------------------------------------------------------------------


def test_body_over_the_default_limit_with_content_length(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    assert api_server.settings.api_max_body_bytes == 1_000_000
    big = {**CONVERSATION, "messages": [{"sender": "customer", "text": "x" * 1_000_001}]}
    response = post(http, api_server, big)
    error = error_of(response, 413)
    assert error["type"] == "payload_too_large"
    assert "1000000 bytes" in error["message"]
    assert error["limit_bytes"] == 1_000_000
    assert fake_ollama.chat_count == 0


def test_declared_oversize_body_is_refused_before_it_is_sent(api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    # Only the headers go out: the 413 must come from Content-Length alone, without waiting for 50 MB.
    host, port = api_server.url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", "/classify")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(50_000_000))
        connection.endheaders()
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413
    assert body["error"]["type"] == "payload_too_large"
    assert fake_ollama.chat_count == 0


def test_chunked_body_over_the_limit(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"conversation_number": "1", "messages": [{"sender": "customer", "text": "'
        for _ in range(25):
            yield b"y" * 50_000
        yield b'"}]}'

    response = post(http, api_server, data=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    error = error_of(response, 413)
    assert "1000000 bytes" in error["message"]
    assert fake_ollama.chat_count == 0


def test_chunked_body_under_the_limit_is_classified(http: requests.Session, api_server: RunningAPI) -> None:
    encoded = json.dumps(CONVERSATION).encode()
    response = post(
        http,
        api_server,
        data=iter([encoded[:10], encoded[10:50], encoded[50:]]),
        headers={"Content-Type": "application/json"},
    )
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["messages"] == CONVERSATION["messages"]


def test_custom_small_limit(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(api_max_body_bytes=2048))
    small = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "a" * 1500}]}
    assert len(json.dumps(small)) < 2048
    assert post(http, api, small).status_code == 200

    big = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "a" * 2100}]}
    error = error_of(post(http, api, big), 413)
    assert "2048 bytes" in error["message"]
    assert error["limit_bytes"] == 2048

    chunked = iter([json.dumps(big).encode()[:1000], json.dumps(big).encode()[1000:]])
    error = error_of(post(http, api, data=chunked, headers={"Content-Type": "application/json"}), 413)
    assert "2048 bytes" in error["message"]
    assert fake_ollama.chat_count == 1


# --- 503: Ollama unreachable, model not pulled, Ollama busy ---------------------------------


def test_ollama_unreachable(http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI) -> None:
    endpoint = closed_port_url()
    api = start_api(make_settings(llm_endpoint=endpoint))
    error = error_of(post(http, api, CONVERSATION), 503)
    assert error["type"] == "llm_unavailable"
    assert endpoint in error["message"]
    assert "ollama serve" in error["hint"]
    assert error["endpoint"] == endpoint


def test_model_not_pulled(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    fake_ollama.models = ["mistral:latest"]
    error = error_of(post(http, api_server, CONVERSATION), 503)
    assert error["type"] == "model_not_found"
    assert "'llama3'" in error["message"]
    assert "ollama pull llama3" in error["hint"]
    assert error["model"] == "llama3"


def test_ollama_busy_has_retry_after(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(BUSY)
    response = post(http, api_server, CONVERSATION)
    error = error_of(response, 503)
    assert error["type"] == "llm_busy"
    assert "busy" in error["message"]
    assert "Retry later" in error["hint"]
    assert int(response.headers["Retry-After"]) > 0
    # and the next request, once Ollama has room again, succeeds
    assert post(http, api_server, CONVERSATION).status_code == 200


# --- 504: timeout ---------------------------------------------------------------------------


def test_llm_timeout(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(ollama_timeout=1))
    fake_ollama.enqueue(Reply(delay=3))
    error = error_of(post(http, api, CONVERSATION), 504)
    assert error["type"] == "llm_timeout"
    assert "within 1 s" in error["message"]
    assert "OLLAMA_TIMEOUT" in error["hint"]
    assert error["timeout_seconds"] == 1


# --- 502: unusable output, Ollama 5xx -------------------------------------------------------

BAD_GATEWAY = {
    "runner crashed (500)": (RUNNER_CRASHED, "llm_server_error", "llama runner process has terminated"),
    "proxy page (502)": (RawReply(502, b"<html>Bad Gateway</html>", "text/html"), "llm_server_error", "HTTP 502"),
    "dropped connection": (Disconnect(), "llm_server_error", "closed the connection"),
    "request rejected (400)": (ErrorReply(400, "invalid options"), "llm_request_rejected", "invalid options"),
    "200 that is not JSON": (RawReply(200, b"<html>hello</html>", "text/html"), "llm_bad_output", "not JSON"),
    "no JSON in the answer": (Reply(content="I am not able to classify that."), "llm_bad_output", "no JSON object"),
    "missing key": (
        Reply(content=json.dumps({k: v for k, v in GOOD_ANSWER.items() if k != "sentiment"})),
        "llm_bad_output",
        "'sentiment' is missing",
    ),
    "unknown sentiment": (Reply(content=json.dumps({**GOOD_ANSWER, "sentiment": "Meh"})), "llm_bad_output", "'Meh'"),
    "truncated (length)": (Reply(done_reason="length"), "llm_bad_output", "cut off"),
    "truncated (done false)": (Reply(done=False), "llm_bad_output", "cut off"),
    "empty content": (Reply(content=""), "llm_bad_output", "empty content"),
}


@pytest.mark.parametrize("case", list(BAD_GATEWAY.values()), ids=list(BAD_GATEWAY))
def test_bad_gateway(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama, case: tuple[Any, str, str]
) -> None:
    behavior, error_type, fragment = case
    fake_ollama.enqueue(behavior)
    error = error_of(post(http, api_server, CONVERSATION), 502)
    assert error["type"] == error_type
    assert fragment in error["message"]
    # The service recovers: the next conversation is classified.
    assert post(http, api_server, CONVERSATION).status_code == 200


def test_truncated_answer_says_how_to_fix_it(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    fake_ollama.enqueue(Reply(done_reason="length"))
    error = error_of(post(http, api_server, CONVERSATION), 502)
    assert "OLLAMA_NUM_PREDICT" in error["hint"]


# --- health, readiness, docs, unknown paths -------------------------------------------------


def test_health_makes_no_llm_call(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    response = http.get(f"{api_server.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert fake_ollama.chat_count == 0


def test_health_is_ok_even_without_ollama(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI
) -> None:
    api = start_api(make_settings(llm_endpoint=closed_port_url()))
    assert http.get(f"{api.url}/health", timeout=10).status_code == 200


def test_ready(http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama) -> None:
    response = http.get(f"{api_server.url}/ready", timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready", "model": "llama3", "endpoint": fake_ollama.url,
        "servers": [{"server": fake_ollama.url, "ready": True, "circuit": "closed", "in_flight": 0, "answered": 0}],
    }
    assert fake_ollama.chat_count == 0


def test_ready_503_when_the_model_is_not_pulled(
    http: requests.Session, api_server: RunningAPI, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models = ["other:latest"]
    error = error_of(http.get(f"{api_server.url}/ready", timeout=10), 503)
    assert error["type"] == "model_not_found"
    assert "'llama3'" in error["message"]
    assert "ollama pull llama3" in error["hint"]


def test_ready_503_when_ollama_is_unreachable(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI
) -> None:
    endpoint = closed_port_url()
    api = start_api(make_settings(llm_endpoint=endpoint))
    error = error_of(http.get(f"{api.url}/ready", timeout=10), 503)
    assert error["type"] == "llm_unavailable"
    assert endpoint in error["message"]
    assert "ollama serve" in error["hint"]


def test_a_slow_ready_never_pauses_a_server(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    # Issue 16 item 9: /ready is unauthenticated and only reports. A readiness answer that came too
    # late (here at start-up and on /ready) must not open the server's circuit: its share of
    # /classify would go to the others for CIRCUIT_BREAKER_RECOVERY_SECONDS (or be refused with 503).
    with FakeOllama() as slow:
        slow.ready_delay = 3.0  # beyond the readiness timeout: min(5 s, OLLAMA_TIMEOUT)
        api = start_api(make_settings(llm_endpoint=f"{slow.url},{fake_ollama.url}", ollama_timeout=2))
        response = http.get(f"{api.url}/ready", timeout=30)
        assert response.status_code == 200, response.text  # the other server is ready
        servers = {status["server"]: status for status in response.json()["servers"]}
        assert servers[slow.url]["ready"] is False and "did not answer" in servers[slow.url]["error"]
        assert servers[slow.url]["circuit"] == "closed"
        for _ in range(4):
            assert post(http, api, CONVERSATION).status_code == 200
        assert (slow.chat_count, fake_ollama.chat_count) == (2, 2)  # the slow server keeps its share


def test_docs_are_served(http: requests.Session, api_server: RunningAPI) -> None:
    response = http.get(f"{api_server.url}/docs", timeout=10)
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "swagger" in response.text.lower()


def test_openapi_has_examples_and_error_responses(http: requests.Session, api_server: RunningAPI) -> None:
    document = http.get(f"{api_server.url}/openapi.json", timeout=10).json()
    classify = document["paths"]["/classify"]["post"]
    examples = classify["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) >= {"messages", "tweets"}
    assert "messages" in examples["messages"]["value"]
    assert "tweets" in examples["tweets"]["value"]
    responses = classify["responses"]
    assert set(responses) >= {"200", "400", "413", "415", "422", "502", "503", "504"}
    for status in ("400", "413", "415", "422", "502", "503", "504"):
        content = responses[status]["content"]["application/json"]
        assert content["schema"]["$ref"].endswith("/ErrorResponse")
        assert content["example"]["error"]["type"]
    schemas = document["components"]["schemas"]
    assert schemas["ClassifyResponse"]["examples"][0]["classification"]["intent"] == "Order Status"
    assert "503" in document["paths"]["/ready"]["get"]["responses"]
    assert "/health" in document["paths"]


def test_a_fourth_label_field_is_answered_and_documented(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    """TAXONOMY_FILE alone adds a field: the schema sent, the answer and /openapi.json follow it."""
    api = start_api(make_settings(taxonomy_file=ROOT / "config" / "taxonomy-urgency.example.json"))
    body = post(http, api, CONVERSATION).json()
    classification = body["classification"]
    assert list(classification) == ["categorization", "intent", "topic", "sentiment", "urgency", "confidence",
                                    "needs_review"]
    assert classification["urgency"] in ("Low", "Medium", "High")
    assert set(classification["confidence"]) == {"intent", "topic", "sentiment", "urgency"}
    [request] = fake_ollama.chat_requests
    assert request["format"]["prefixItems"][4] == {"type": "string", "enum": ["Low", "Medium", "High"]}

    schema = http.get(f"{api.url}/openapi.json", timeout=10).json()["components"]["schemas"]["Classification"]
    assert schema["properties"]["urgency"]["enum"] == ["Low", "Medium", "High"]
    assert schema["properties"]["urgency"]["description"] == "how soon the customer needs an answer"
    assert schema["properties"]["intent"]["enum"] == sorted(LABELS["intent"], key=list(
        entry["name"] for entry in TAXONOMY["fields"][0]["labels"]).index)
    assert {"categorization", "intent", "topic", "sentiment", "urgency"} <= set(schema["required"])


def test_unknown_path_is_a_json_404(http: requests.Session, api_server: RunningAPI) -> None:
    error = error_of(http.get(f"{api_server.url}/nope", timeout=10), 404)
    assert error["type"] == "not_found"
    assert "/nope" in error["message"]


def test_wrong_method_is_a_json_405(http: requests.Session, api_server: RunningAPI) -> None:
    error = error_of(http.get(f"{api_server.url}/classify", timeout=10), 405)
    assert error["type"] == "method_not_allowed"


# --- long conversations ---------------------------------------------------------------------


def test_long_conversation_is_cut_before_the_llm_and_logged(
    http: requests.Session,
    make_settings: SettingsFactory,
    start_api: StartAPI,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    api = start_api(make_settings(conversation_char_budget=1000))
    messages = [
        {"sender": "customer" if i % 2 == 0 else "agent", "text": f"turn {i:02d} PRIVATE-TEXT " + "z" * 80}
        for i in range(60)
    ]
    response = post(http, api, {"conversation_number": "long-9", "messages": messages})

    assert response.status_code == 200, response.text
    assert response.json()["messages"] == messages  # the answer still echoes everything
    content = fake_ollama.chat_requests[0]["messages"][-1]["content"]
    transcript = content.removeprefix("Conversation:\n")
    assert len(transcript) <= 1000
    lines = transcript.split("\n")
    assert lines[0].startswith('Customer: "turn 00 ')
    assert lines[1].startswith("[... ") and "omitted ...]" in lines[1]
    assert lines[-1].startswith('Agent: "turn 59 ')
    cut = [r for r in caplog.records if r.name == "aggregator" and "long-9" in r.getMessage()]
    assert len(cut) == 1 and cut[0].levelno == logging.INFO
    assert "cut" in cut[0].getMessage()
    # Conversation text stays out of INFO-and-above log lines.
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "PRIVATE-TEXT" in r.getMessage()]


def test_start_up_says_whether_ollama_is_ready(make_settings, start_api, fake_ollama, caplog):
    caplog.set_level(logging.INFO, logger="api")
    start_api(make_settings())
    deadline = time.monotonic() + 5
    while not any("is ready with model llama3" in r.message for r in caplog.records):
        assert time.monotonic() < deadline, [r.message for r in caplog.records]
        time.sleep(0.02)
    assert fake_ollama.chat_count == 0  # the check lists models; it runs no inference


def test_start_up_names_the_llm_server_as_its_provider_does(make_settings, start_api, caplog):
    # An OpenAI-compatible server (vLLM, the embedded model's llama-server) is not Ollama.
    caplog.set_level(logging.INFO, logger="api")
    with FakeOpenAI() as fake_openai:
        start_api(make_settings(llm_provider="openai", llm_endpoint=fake_openai.base_url))
        deadline = time.monotonic() + 5
        while not any("is ready with model llama3" in r.message for r in caplog.records):
            assert time.monotonic() < deadline, [r.message for r in caplog.records]
            time.sleep(0.02)
    [line] = [r.message for r in caplog.records if "is ready with model" in r.message]
    assert line.startswith("The LLM server at "), line


# --- wiring: dependencies, the body-limit middleware, one error wording ----------------------


@pytest.fixture
def serve_asgi() -> Iterator[Callable[[Any], str]]:
    """``serve_asgi(app)``: any ASGI app under uvicorn on 127.0.0.1; its base URL. Stopped after the test."""
    import socket
    import threading

    import uvicorn

    started: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def serve(app: Any) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, thread, sock in started:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_body_limit_middleware_takes_its_limit_as_a_parameter(
    http: requests.Session, serve_asgi: Callable[[Any], str]
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from api import BodySizeLimitMiddleware

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    # A bare app with no settings on its state: the limit comes from the argument alone.
    url = serve_asgi(BodySizeLimitMiddleware(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=1500))
    assert http.post(url, data=b"x" * 1500, timeout=10).text == "1500"
    error = error_of(http.post(url, data=b"x" * 1501, timeout=10), 413)
    assert error["limit_bytes"] == 1500
    chunked = http.post(url, data=iter([b"x" * 1000, b"x" * 1000]), timeout=10)
    assert error_of(chunked, 413)["limit_bytes"] == 1500


WHOLE_AND_FIELD_PROBLEMS = [
    {"conversation_number": "1"},
    {"conversation_number": "1", "messages": CONVERSATION["messages"], "tweets": SAMPLES[0]["tweets"]},
    {"conversation_number": "1", "messages": []},
    {"conversation_number": "1", "messages": [{"sender": "customer", "text": "a"}, {"sender": "bot", "text": "b"}]},
    {"messages": CONVERSATION["messages"]},
    {"conversation_number": "1", "messages": [{"sender": "x"}, {"sender": "y"}]},
]


@pytest.mark.parametrize("body", WHOLE_AND_FIELD_PROBLEMS)
def test_the_api_words_an_invalid_conversation_as_the_batch_does(
    http: requests.Session, api_server: RunningAPI, body: dict[str, Any]
) -> None:
    # One formatter for field paths and messages: the importer and the batch processor report
    # a document exactly as the API reports the same conversation.
    from aggregator import validate_conversation
    from error_handler import InputError

    with pytest.raises(InputError) as expected:
        validate_conversation(body)
    error = error_of(post(http, api_server, body), 422)
    assert (error["message"], error["field"]) == (expected.value.message, expected.value.field)


def test_routes_get_their_classifier_through_a_dependency(
    http: requests.Session,
    make_settings: SettingsFactory,
    serve_asgi: Callable[[Any], str],
    fake_ollama: FakeOllama,
    tmp_path: Path,
) -> None:
    # The routes declare what they need (Annotated[..., Depends()]), so a test or another part can
    # substitute one piece: here a classifier whose taxonomy has an intent "Zebra" (the default's has not).
    from api import create_app
    from api_dependencies import Classifying, get_classifying
    from classifier import ConversationClassifier

    taxonomy = json.loads(json.dumps(TAXONOMY))
    taxonomy["fields"][0]["labels"] = [{"name": name, "description": f"{name} things."} for name in ("Zebra", "Other")]
    (tmp_path / "taxonomy.json").write_text(json.dumps(taxonomy), encoding="utf-8")
    few_shots = tmp_path / "few_shots.json"
    few_shots.write_text("[]", encoding="utf-8")
    other = ConversationClassifier.from_settings(make_settings(taxonomy_file=tmp_path / "taxonomy.json",
                                                               few_shots_file=few_shots))
    app = create_app(make_settings())

    async def classifying_with_other(request: Request) -> Classifying:
        return dataclasses.replace(request.state.classifying, classifier=other)

    app.dependency_overrides[get_classifying] = classifying_with_other
    url = serve_asgi(app)
    fake_ollama.enqueue(Reply(content=json.dumps({**GOOD_ANSWER, "intent": "zebra"})))
    response = http.post(f"{url}/classify", json=CONVERSATION, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["classification"]["intent"] == "Zebra"



def test_start_up_leaves_its_objects_out_of_the_garbage_collector(
    http: requests.Session, serve_asgi: Callable[[Any], str], make_settings: SettingsFactory
) -> None:
    """What start-up built lives as long as the process: frozen, every later full collection skips it.
    Walking it took ~50 ms per collection on a 2-core machine, a pause /health waited through too
    (benchmark section 4: /health while a dozen large bodies wait)."""
    import gc

    from api import create_app

    gc.unfreeze()  # this test process may have started an app already
    assert gc.get_freeze_count() == 0
    url = serve_asgi(create_app(make_settings()))
    assert http.get(f"{url}/health", timeout=10).status_code == 200
    assert gc.get_freeze_count() > 10_000  # the modules, schemas and taxonomy of the app

# --- backpressure: LLM calls in flight are bounded per process ------------------------------


def _occupy_the_only_slot(api: RunningAPI, fake_ollama: FakeOllama, seconds: float) -> ThreadPoolExecutor:
    """Send one request the fake answers after ``seconds``; return once the fake has it."""
    fake_ollama.enqueue(Reply(delay=seconds))
    pool = ThreadPoolExecutor(1)
    pool.submit(requests.post, f"{api.url}/classify", json=CONVERSATION, timeout=60)
    assert fake_ollama.wait_for_chats(1, timeout=30)
    return pool


def test_a_request_that_cannot_start_in_time_gets_503_llm_busy(
    http: requests.Session, make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(api_max_concurrency=1, api_queue_timeout=0.5, ollama_timeout=30))
    with _occupy_the_only_slot(api, fake_ollama, seconds=4):
        response = post(http, api, CONVERSATION)
        error = error_of(response, 503)
        assert error["type"] == "llm_busy"
        assert "API_MAX_CONCURRENCY" in error["hint"]
        assert int(response.headers["Retry-After"]) > 0
        assert fake_ollama.chat_count == 1  # the refused request never reached the model
    assert post(http, api, CONVERSATION).status_code == 200  # the slot is free again


def test_requests_beyond_the_limit_wait_their_turn(
    make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(api_max_concurrency=2, api_queue_timeout=60, api_max_waiting=6))
    fake_ollama.latency = 0.2

    def classify(i: int) -> int:
        body = {"conversation_number": f"w-{i}", "messages": [{"sender": "customer", "text": f"question {i}"}]}
        return requests.post(f"{api.url}/classify", json=body, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(classify, range(8)))
    assert statuses == [200] * 8
    assert fake_ollama.chat_count == 8
    assert fake_ollama.max_in_flight == 2


def _wait_for_log(caplog: pytest.LogCaptureFixture, fragment: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(fragment in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no log record with {fragment!r}"
        time.sleep(0.02)


def test_requests_beyond_api_max_waiting_get_503_at_once(
    http: requests.Session,
    make_settings: SettingsFactory,
    start_api: StartAPI,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="api_dependencies")
    api = start_api(make_settings(api_max_concurrency=1, api_max_waiting=2, api_queue_timeout=60, ollama_timeout=30))
    with _occupy_the_only_slot(api, fake_ollama, seconds=4), ThreadPoolExecutor(2) as waiting:
        waiters = [waiting.submit(requests.post, f"{api.url}/classify", json=CONVERSATION, timeout=60)
                   for _ in range(2)]
        _wait_for_log(caplog, "request admitted: 3 in this process")  # the slot's holder and two waiting
        response = post(http, api, CONVERSATION)
        error = error_of(response, 503)
        assert error["type"] == "llm_busy" and "API_MAX_WAITING" in error["hint"]
        assert error["max_waiting"] == 2
        assert int(response.headers["Retry-After"]) > 0
        assert fake_ollama.chat_count == 1  # answered before any of the waiting ones reached the model
        assert [w.result().status_code for w in waiters] == [200, 200]  # the two waiting got their turn
    assert fake_ollama.chat_count == 3


def test_a_dozen_large_bodies_beyond_the_bound_are_refused_and_health_answers(
    make_settings: SettingsFactory, start_api: StartAPI, fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(api_max_concurrency=1, api_max_waiting=2, api_queue_timeout=60, ollama_timeout=30))
    text = "My parcel has not arrived. " * 400  # ~10 KB a message, ~0.9 MB a body
    body = {"conversation_number": "big", "messages": [
        {"sender": "customer" if i % 2 == 0 else "agent", "text": text} for i in range(85)]}
    assert 800_000 < len(json.dumps(body)) < api.settings.api_max_body_bytes

    def classify(_: int) -> int:
        return requests.post(f"{api.url}/classify", json=body, timeout=60).status_code

    with _occupy_the_only_slot(api, fake_ollama, seconds=3), ThreadPoolExecutor(12) as pool:
        statuses = pool.map(classify, range(12))
        assert requests.get(f"{api.url}/health", timeout=30).json() == {"status": "ok"}
        assert sorted(statuses) == [200] * 2 + [503] * 10  # every refused client got its answer
    assert fake_ollama.chat_count == 3


def _abandon_requests(api: RunningAPI, count: int) -> None:
    """Send ``count`` complete /classify requests and hang up on each without reading the answer."""
    import socket

    body = json.dumps(CONVERSATION).encode()
    host, port = api.url.removeprefix("http://").split(":")
    request = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(count):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)


def test_a_client_that_left_before_its_turn_never_reaches_the_model(
    http: requests.Session,
    make_settings: SettingsFactory,
    start_api: StartAPI,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="api")
    api = start_api(make_settings(api_max_concurrency=1, api_queue_timeout=60, ollama_timeout=30, api_max_waiting=20))
    with _occupy_the_only_slot(api, fake_ollama, seconds=3):
        _abandon_requests(api, 20)
        # Wait until the API has seen every hang-up (or, as before the fix, the model got the requests).
        deadline = time.monotonic() + 30
        while sum("left before its turn" in r.getMessage() for r in caplog.records) < 20:
            if fake_ollama.chat_count > 1 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert post(http, api, CONVERSATION).status_code == 200
    assert fake_ollama.chat_count == 2  # the first request and the last one: none of the 20 abandoned
    assert sum("left before its turn" in r.getMessage() for r in caplog.records) == 20


# --- secrets: credentials in LLM_ENDPOINT appear in no answer and no log line ------------

# Placeholder credentials (user:pass-...), written as users write them: not percent-encoded.
PASSWORDS = ["pass-tok3n", "pass-7q/xZ@9k w0rd"]


def _with_credentials(url: str, password: str) -> str:
    return url.replace("http://", f"http://user:{password}@")


def _assert_secret_free(text: str, password: str) -> None:
    for fragment in [password, *password.replace("@", " ").replace("/", " ").split()]:
        if len(fragment) > 3:
            assert fragment not in text, text


@pytest.mark.parametrize("password", PASSWORDS)
def test_credentials_in_the_endpoint_appear_in_no_answer_and_no_log_line(
    http: requests.Session,
    make_settings: SettingsFactory,
    start_api: StartAPI,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
    password: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []
    served = start_api(make_settings(llm_endpoint=_with_credentials(fake_ollama.url, password), ollama_timeout=1))
    refused = start_api(make_settings(llm_endpoint=_with_credentials(closed_port_url(), password)))
    for api in (served, refused):
        for response in (http.get(f"{api.url}/ready", timeout=10), post(http, api, CONVERSATION)):
            answers.append(response.text)
            assert response.status_code in (200, 503), response.text
    ready = http.get(f"{served.url}/ready", timeout=10)
    if ready.status_code == 200:  # the URL with an unencoded '/' in its password cannot be used at all
        assert ready.json()["endpoint"] == fake_ollama.url  # the pool names servers by scheme://host:port
        fake_ollama.models = ["other:latest"]  # 503 model_not_found names the server
        answers.append(error_of(post(http, served, CONVERSATION), 503)["message"])
        fake_ollama.models = ["llama3:latest"]
        fake_ollama.enqueue(Reply(delay=3))  # 504 llm_timeout names it too
        answers.append(error_of(post(http, served, CONVERSATION), 504)["message"])
    assert any("user:***@127.0.0.1" in answer for answer in answers)
    _assert_secret_free("\n".join(answers), password)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "user:***@127.0.0.1" in logged
    _assert_secret_free(logged, password)


# --- log forging: request values are logged on one line ---------------------------------------


@pytest.fixture
def log_output() -> Iterator[Any]:
    """The project's own log handler (logger.configure_logging) writing to a StringIO; restored after."""
    import io

    from logger import _QUIET_LIBRARIES, configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in _QUIET_LIBRARIES}
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


def test_a_conversation_number_cannot_forge_a_log_line(
    http: requests.Session, api_server: RunningAPI, log_output: Any
) -> None:
    forged = "2026-01-01 00:00:00,000 - INFO - api - classified conversation 7 in 1 ms: all refunded"
    number = "1\n" + forged + "\r\u2028x"
    response = post(http, api_server, {**CONVERSATION, "conversation_number": number})
    assert response.status_code == 200, response.text
    assert response.json()["conversation_number"] == number  # the answer keeps the value as sent
    lines = log_output.getvalue().splitlines()
    [line] = [line for line in lines if "classified conversation 1" in line]
    assert "1\\n2026-01-01" in line and "\\r\\u2028x" in line
    assert not [line for line in lines if line.startswith("2026-01-01 00:00:00,000")]
