"""Few-shot examples from reviewed conversations: the index, the embeddings client, both front doors.

The embeddings client runs against the fake servers' embeddings endpoints (real shapes, both
providers, both transports); the API and the batch processor run for real on loopback with
SecantusDB, and what reaches the model is read from the fake server's record of each request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from classifier import parse_classification
from config import CONFIG_DIR, Settings
from fakes.ollama import FakeOllama, fake_embedding
from prompt_builder import CONVERSATION_HEADER, load_taxonomy
from retrieval import ExampleIndex, ReviewedExample, unit_rows
from tests.conftest import RunningAPI, SettingsFactory
from tests.review_data import CONVERSATIONS, seed_reviewable

EXAMPLES = [
    ReviewedExample("h-order", 'Customer: "Where is my parcel? The order is late."',
                    {"categorization": "late order", "intent": "Order Status", "topic": "Shipping/Delivery",
                     "sentiment": "Negative"}),
    ReviewedExample("h-bill", 'Customer: "I was charged twice on my card."',
                    {"categorization": "double charge", "intent": "Billing Question", "topic": "Account/Billing",
                     "sentiment": "Negative"}),
    ReviewedExample("h-wifi", 'Customer: "My router drops the wifi connection."',
                    {"categorization": "wifi drops", "intent": "Technical Support",
                     "topic": "Network/Connectivity", "sentiment": "Negative"}),
]


# --- the index ----------------------------------------------------------------------------------


def test_bm25_finds_the_examples_sharing_words_most_similar_last() -> None:
    index = ExampleIndex(EXAMPLES)
    chosen = index.nearest(2, text='Customer: "Why was my card charged twice this month?"')
    assert [e.content_hash for e in chosen][-1] == "h-bill"
    assert len(chosen) == 2
    assert len(index.nearest(5, text="anything")) == 3  # never more than it holds


def test_a_conversation_is_never_its_own_example() -> None:
    index = ExampleIndex(EXAMPLES)
    chosen = index.nearest(3, text='Customer: "I was charged twice on my card."', exclude="h-bill")
    assert "h-bill" not in [e.content_hash for e in chosen] and len(chosen) == 2


def test_embeddings_rank_by_cosine_similarity() -> None:
    index = ExampleIndex(EXAMPLES, unit_rows([fake_embedding(e.text) for e in EXAMPLES]))
    query = 'Customer: "the router keeps dropping my wifi connection"'
    assert index.nearest(1, text="", vector=fake_embedding(query))[0].content_hash == "h-wifi"
    # A vector of another length (another model) falls back to the words.
    assert index.nearest(1, text=query, vector=[1.0, 0.0])[0].content_hash == "h-wifi"


def test_an_empty_index_gives_no_examples() -> None:
    assert ExampleIndex([]).nearest(3, text="hello") == []


def test_numpy_and_bm25s_are_loaded_only_by_an_index_with_examples() -> None:
    # They cost about a second of every start (issue 19); most deployments never retrieve examples.
    probe = ("import sys, api, cli; loaded = sorted(m for m in ('numpy', 'scipy', 'bm25s') if m in sys.modules); "
             "from retrieval import ExampleIndex; ExampleIndex([]); "
             "print(loaded, 'bm25s' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[] False"
    assert ExampleIndex(EXAMPLES).nearest(1, text="my parcel is late")  # and the index still works


# --- the API -------------------------------------------------------------------------------------


@pytest.fixture
def reviewed_db(mongo_db: Any, review_labels: dict[str, dict[str, str]]) -> Any:
    """The seeded conversations, each with a current review of ``review_labels[number]``."""
    seed_reviewable(mongo_db)
    for number, labels in review_labels.items():
        result = mongo_db["sentimental_analysis"].find_one({"conversation_number": number})
        mongo_db["sentimental_analysis"].update_one({"_id": result["_id"]}, {"$set": {"review": {
            "labels": labels, "by": "alice", "note": None, "content_hash": result["content_hash"]}}})
    return mongo_db


@pytest.fixture
def review_labels() -> dict[str, dict[str, str]]:
    return {"r1": {"intent": "Complaint"}, "r2": {"topic": "Orders/Returns"}, "r4": {"sentiment": "Neutral"},
            "r0": {}}


def classify(api: RunningAPI, text: str, number: str = "new-1") -> requests.Response:
    body = {"conversation_number": number, "messages": [{"sender": "customer", "text": text}]}
    return requests.post(f"{api.url}/classify", json=body, timeout=60)


def example_pairs(chat_request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (transcript, answer) pairs of a chat request, after the system prompt, before the conversation;
    each answer read back as the parser reads the model's (it is written in the answer's compact form)."""
    messages = chat_request["messages"]
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    middle = messages[1:-1]
    taxonomy = load_taxonomy(CONFIG_DIR / "taxonomy.json")
    unlabelled = {"confidence", "needs_review"}
    return [(middle[i]["content"].removeprefix(CONVERSATION_HEADER),
             parse_classification(middle[i + 1]["content"], taxonomy).model_dump(exclude=unlabelled))
            for i in range(0, len(middle), 2)]


def api_settings(make_settings: SettingsFactory, mongo_uri: str, mongo_db_name: str, **overrides: Any) -> Settings:
    return make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name, **overrides)


def test_reviewed_examples_by_embeddings_computed_once_and_kept(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    mongo_uri: str, mongo_db_name: str, reviewed_db: Any,
) -> None:
    settings = api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="reviewed", few_shot_k=2,
                            embedding_model="nomic-embed-text")
    api = start_api(settings)
    assert classify(api, "I was charged twice on my card, fix my billing").status_code == 200
    # The four reviewed conversations were embedded in one request, then the conversation itself.
    reviewed_batch, query = fake_ollama.embed_requests
    assert len(reviewed_batch) == 4 and len(query) == 1 and "charged twice" in query[0]
    assert reviewed_db["conversation_embeddings"].count_documents({"model": "nomic-embed-text"}) == 4
    pairs = example_pairs(fake_ollama.chat_requests[-1])
    assert len(pairs) == 2
    transcript, answer = pairs[-1]  # the most similar, nearest the conversation
    assert CONVERSATIONS[1][0] in transcript
    # Its reviewed label wins over the model's; the fields nobody reviewed are the model's.
    assert answer == {"categorization": "customer writes about case 1", "intent": "Complaint",
                      "topic": "Account/Billing", "sentiment": "Negative"}
    assert classify(api, "Where is my order?", "new-2").status_code == 200
    assert [len(r) for r in fake_ollama.embed_requests] == [4, 1, 1]  # one call per conversation, no re-embedding

    # Another process (a restart) reads the stored embeddings: only the conversation is embedded.
    fake_ollama.embed_requests.clear()
    again = start_api(settings)
    assert classify(again, "my router drops the connection", "new-3").status_code == 200
    assert [len(r) for r in fake_ollama.embed_requests] == [1]
    assert CONVERSATIONS[4][0] in example_pairs(fake_ollama.chat_requests[-1])[-1][0]


def test_the_prefix_stays_identical_and_examples_follow_it(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    mongo_uri: str, mongo_db_name: str, reviewed_db: Any,
) -> None:
    static = start_api(api_settings(make_settings, mongo_uri, mongo_db_name))
    assert classify(static, "I was charged twice").status_code == 200
    static_messages = fake_ollama.chat_requests[-1]["messages"][:-1]
    both = start_api(api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="both", few_shot_k=3))
    for text in ("I was charged twice", "my router is down", "refund the torn jacket"):
        assert classify(both, text).status_code == 200
    requests_made = fake_ollama.chat_requests[-3:]
    for chat_request in requests_made:
        messages = chat_request["messages"]
        # The static prefix first, byte for byte (the server's prompt cache), then 3 retrieved pairs.
        assert messages[:len(static_messages)] == static_messages
        assert len(messages) == len(static_messages) + 2 * 3 + 1
    # Lexical retrieval (no EMBEDDING_MODEL): no embeddings call at all, and different examples per conversation.
    assert fake_ollama.embed_requests == []
    nearest = [example_pairs({"messages": [r["messages"][0], *r["messages"][len(static_messages):]]})[-1][0]
               for r in requests_made]
    assert CONVERSATIONS[1][0] in nearest[0] and CONVERSATIONS[4][0] in nearest[1] and CONVERSATIONS[2][0] in nearest[2]


def test_a_classified_conversation_never_sees_itself(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    mongo_uri: str, mongo_db_name: str, reviewed_db: Any,
) -> None:
    api = start_api(api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="reviewed", few_shot_k=4))
    source = reviewed_db["conversation_set"].find_one({"conversation_number": "r1"})
    body = {"conversation_number": "again", "messages": source["messages"]}
    assert requests.post(f"{api.url}/classify", json=body, timeout=60).status_code == 200
    transcripts = [t for t, _ in example_pairs(fake_ollama.chat_requests[-1])]
    assert len(transcripts) == 3 and not any(CONVERSATIONS[1][0] in t for t in transcripts)


def test_a_new_review_reaches_the_next_prompt(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    mongo_uri: str, mongo_db_name: str, reviewed_db: Any,
) -> None:
    api = start_api(api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="reviewed", few_shot_k=1,
                                 api_host="127.0.0.1"))
    assert classify(api, "the parcel arrived, thanks").status_code == 200
    assert CONVERSATIONS[3][0] not in example_pairs(fake_ollama.chat_requests[-1])[-1][0]  # r3 not reviewed yet
    listed = requests.get(f"{api.url}/api/conversations", timeout=30).json()["items"]
    r3 = next(item for item in listed if item["conversation_number"] == "r3")
    assert requests.post(f"{api.url}/api/conversations/{r3['id']}/review", json={"labels": {"intent": "Feedback"}},
                         timeout=30).status_code == 200
    assert classify(api, "the parcel arrived, thanks", "new-2").status_code == 200
    transcript, answer = example_pairs(fake_ollama.chat_requests[-1])[-1]
    assert CONVERSATIONS[3][0] in transcript and answer["intent"] == "Feedback"


def test_without_mongodb_classification_goes_on_with_the_static_prefix(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = start_api(make_settings(mongodb_connection_string=" ", few_shot_source="reviewed"))
    assert classify(api, "where is my order").status_code == 200
    assert len(fake_ollama.chat_requests[-1]["messages"]) == 2  # system + conversation
    assert "reviewed few-shot examples could not be read" in caplog.text


def test_a_failing_embeddings_endpoint_falls_back_to_words(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], fake_ollama: FakeOllama,
    mongo_uri: str, mongo_db_name: str, reviewed_db: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    from fakes.ollama import ErrorReply

    fake_ollama.embed_error = ErrorReply(500, "embedding runner crashed")
    api = start_api(api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="reviewed", few_shot_k=1,
                                 embedding_model="nomic-embed-text"))
    assert classify(api, "my router drops the connection").status_code == 200
    assert CONVERSATIONS[4][0] in example_pairs(fake_ollama.chat_requests[-1])[-1][0]
    assert "using the lexical index" in caplog.text


# --- the batch processor -------------------------------------------------------------------------


def test_the_batch_processor_retrieves_reviewed_examples(
    make_settings: SettingsFactory, fake_ollama: FakeOllama, mongo_uri: str, mongo_db_name: str,
    reviewed_db: Any, tmp_path: Path,
) -> None:
    from cli import run as run_batch
    from utils.progress import monitoring_components

    reviewed_db["conversation_set"].insert_one({"conversation_number": "b1", "status": "pending", "messages": [
        {"sender": "customer", "text": "my router keeps dropping the wifi connection again"}]})
    settings = api_settings(make_settings, mongo_uri, mongo_db_name, few_shot_source="reviewed", few_shot_k=2,
                            embedding_model="nomic-embed-text", batch_monitoring_mode="production")
    from batch_processor import RunOptions

    code = asyncio.run(run_batch(settings, RunOptions(), monitoring_components("production")))
    assert code == 0
    [chat_request] = fake_ollama.chat_requests
    transcript, answer = example_pairs(chat_request)[-1]
    assert CONVERSATIONS[4][0] in transcript and answer["sentiment"] == "Neutral"  # r4's review
    assert reviewed_db["conversation_embeddings"].count_documents({}) == 4
