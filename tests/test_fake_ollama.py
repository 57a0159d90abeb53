"""The fake Ollama server itself: the shapes of real Ollama, streaming, errors, scripting, the prompt cache.

Every other test of the LLM side trusts this fake; these tests keep it honest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fakes.ollama import (
    BUSY,
    RUNNER_CRASHED,
    Disconnect,
    ErrorReply,
    FakeOllama,
    RawReply,
    Reply,
    default_classification,
    last_user_content,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "object",
    "properties": {
        "categorization": {"type": "string"},
        "intent": {"type": "string", "enum": ["Order Status", "Other"]},
        "topic": {"type": "string", "enum": ["Shipping/Delivery", "Other"]},
        "sentiment": {"type": "string", "enum": ["Positive", "Neutral", "Negative"]},
    },
    "required": ["categorization", "intent", "topic", "sentiment"],
}
STATS = {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def chat_body(text: str = "Customer: where is it", **extra: Any) -> dict[str, Any]:
    return {
        "model": "llama3",
        "messages": [{"role": "system", "content": "classify"}, {"role": "user", "content": text}],
        "stream": False,
        "format": SCHEMA,
        **extra,
    }


def chat(http: requests.Session, fake: FakeOllama, body: Any, **kwargs: Any) -> requests.Response:
    return http.post(f"{fake.url}/api/chat", json=body, timeout=10, **kwargs)


def test_root_version_and_tags(http: requests.Session, fake_ollama: FakeOllama) -> None:
    assert http.get(fake_ollama.url, timeout=10).text == "Ollama is running"
    assert "version" in http.get(f"{fake_ollama.url}/api/version", timeout=10).json()
    tags = http.get(f"{fake_ollama.url}/api/tags", timeout=10).json()
    [model] = tags["models"]
    assert model["name"] == model["model"] == "llama3:latest"
    assert {"modified_at", "size", "digest", "details"} <= set(model)


def test_models_are_named_with_latest() -> None:
    assert FakeOllama(models=["llama3", "qwen3:4b", "library/mistral"]).models == [
        "llama3:latest",
        "qwen3:4b",
        "library/mistral:latest",
    ]


def test_non_streaming_chat_has_ollamas_shape(http: requests.Session, fake_ollama: FakeOllama) -> None:
    response = chat(http, fake_ollama, chat_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["model"] == "llama3"
    assert data["created_at"].endswith("Z")
    assert data["message"]["role"] == "assistant"
    assert data["done"] is True and data["done_reason"] == "stop"
    assert set(data) >= STATS
    answer = json.loads(data["message"]["content"])
    assert answer == default_classification(chat_body())
    assert list(answer) == SCHEMA["required"]
    for key in SCHEMA["required"][1:]:
        assert answer[key] in SCHEMA["properties"][key]["enum"]


def test_the_default_answer_follows_the_schema_it_receives() -> None:
    """Any label field of the schema gets one of its labels: a fourth field needs no change here."""
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"],
                                       "urgency": {"type": "string", "enum": ["Low", "Medium", "High"]}}}
    seen = set()
    for i in range(40):
        answer = default_classification(chat_body(f"Customer: {i}", format=schema))
        assert set(answer) == set(schema["properties"])
        assert answer["urgency"] in ("Low", "Medium", "High")
        seen.add(answer["urgency"])
    assert seen == {"Low", "Medium", "High"}  # the hash spreads the answers over the labels
    assert default_classification(chat_body(format=None)) == {
        "categorization": "Customer contacts support about their issue"}


def test_default_answer_is_deterministic_per_conversation(http: requests.Session, fake_ollama: FakeOllama) -> None:
    first = chat(http, fake_ollama, chat_body("Customer: a")).json()["message"]["content"]
    again = chat(http, fake_ollama, chat_body("Customer: a")).json()["message"]["content"]
    assert first == again
    assert last_user_content(chat_body("Customer: a")) == "Customer: a"


@pytest.mark.parametrize("stream", [None, True])
def test_streams_ndjson_unless_stream_is_false(
    http: requests.Session, fake_ollama: FakeOllama, stream: bool | None
) -> None:
    body = chat_body()
    if stream is None:
        del body["stream"]  # Ollama streams by default
    else:
        body["stream"] = stream
    response = chat(http, fake_ollama, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    chunks = [json.loads(line) for line in response.text.splitlines()]
    assert len(chunks) >= 3
    assert all(c["done"] is False for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True and final["message"]["content"] == ""
    assert set(final) >= STATS
    content = "".join(c["message"]["content"] for c in chunks)
    assert json.loads(content) == default_classification(body)


def test_unknown_model_is_404(http: requests.Session, fake_ollama: FakeOllama) -> None:
    response = chat(http, fake_ollama, chat_body(model="mistral"))
    assert response.status_code == 404
    assert response.json() == {"error": "model 'mistral' not found, try pulling it first"}
    assert fake_ollama.chat_count == 0


@pytest.mark.parametrize("body", [None, {"model": "llama3"}, ["not", "an", "object"]])
def test_bad_request_is_400(http: requests.Session, fake_ollama: FakeOllama, body: Any) -> None:
    if body is None:
        response = http.post(f"{fake_ollama.url}/api/chat", data=b"{not json", timeout=10)
    else:
        response = chat(http, fake_ollama, body)
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str)


def test_scripted_behaviours_in_order(http: requests.Session, fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(
        BUSY,
        RUNNER_CRASHED,
        ErrorReply(400, "bad"),
        RawReply(200, b"<html>", "text/html"),
        Reply(content="hello", done=False, done_reason="length"),
    )
    busy = chat(http, fake_ollama, chat_body())
    assert (busy.status_code, busy.json()["error"]) == (503, BUSY.message)
    crashed = chat(http, fake_ollama, chat_body())
    assert (crashed.status_code, crashed.json()["error"]) == (500, RUNNER_CRASHED.message)
    assert chat(http, fake_ollama, chat_body()).status_code == 400
    raw = chat(http, fake_ollama, chat_body())
    assert (raw.status_code, raw.text) == (200, "<html>")
    cut = chat(http, fake_ollama, chat_body()).json()
    assert (cut["message"]["content"], cut["done"], cut["done_reason"]) == ("hello", False, "length")
    # Script exhausted: the default answer again.
    assert chat(http, fake_ollama, chat_body()).json()["done"] is True
    assert fake_ollama.chat_count == 6


def test_responder_answers_from_the_request(http: requests.Session, fake_ollama: FakeOllama) -> None:
    fake_ollama.responder = lambda body: ErrorReply(500, "boom") if "fail" in last_user_content(body) else None
    assert chat(http, fake_ollama, chat_body("Customer: please fail")).status_code == 500
    assert chat(http, fake_ollama, chat_body("Customer: fine")).status_code == 200


def test_disconnect_drops_the_connection(http: requests.Session, fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Disconnect())
    with pytest.raises(requests.ConnectionError):
        chat(http, fake_ollama, chat_body())
    assert chat(http, fake_ollama, chat_body()).status_code == 200


def test_delay_holds_the_answer_back(http: requests.Session, fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Reply(delay=2))
    with pytest.raises(requests.ReadTimeout):
        http.post(f"{fake_ollama.url}/api/chat", json=chat_body(), timeout=(5, 0.3))
    assert chat(http, fake_ollama, chat_body()).status_code == 200


def test_records_and_prompt_cache(http: requests.Session, fake_ollama: FakeOllama) -> None:
    chat(http, fake_ollama, chat_body("Customer: first conversation"))
    chat(http, fake_ollama, chat_body("Customer: second one"))
    first, second = fake_ollama.chat_records
    assert fake_ollama.chat_requests[1]["messages"][-1]["content"] == "Customer: second one"
    assert first.cached_chars == 0
    assert second.cached_chars == len("classify")  # the shared system message
    assert second.prompt_chars == len("classify") + len("Customer: second one")
    assert second.prompt_eval_count == -(-len("Customer: second one") // 4)
    assert first.prompt_eval_count > second.prompt_eval_count
    fake_ollama.reset()
    assert fake_ollama.chat_requests == []
    assert fake_ollama.wait_for_chats(0, timeout=0.1)


def test_standalone_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fakes.ollama", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "--latency" in result.stdout and "--model" in result.stdout
