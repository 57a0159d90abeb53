"""Browsing and reviewing conversations: the real API over HTTP, results in SecantusDB.

Every status code and filter of ``/api/conversations`` and its review endpoint; access control
itself is ``tests/test_access.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import requests
from bson import ObjectId

from reviews import decode_id
from tests.conftest import RunningAPI, SettingsFactory
from tests.review_data import CONVERSATIONS, NOW, seed_reviewable

TOKENS = "alice:tok-alice-1,bob:tok-bob-22"
ALICE = {"Authorization": "Bearer tok-alice-1"}
BOB = {"Authorization": "Bearer tok-bob-22"}


@pytest.fixture
def review_api(make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_uri: str,
               mongo_db_name: str) -> RunningAPI:
    return start_api(make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name,
                                   api_tokens=TOKENS))


def listing(api: RunningAPI, **params: Any) -> requests.Response:
    return requests.get(f"{api.url}/api/conversations", params=params, headers=ALICE, timeout=30)


def numbers(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["conversation_number"] for item in response.json()["items"]]


def review(api: RunningAPI, conversation_id: str, body: Any, headers: dict[str, str] = ALICE) -> requests.Response:
    return requests.post(f"{api.url}/api/conversations/{conversation_id}/review", json=body, headers=headers,
                         timeout=30)


def item_of(api: RunningAPI, number: str) -> dict[str, Any]:
    for item in listing(api, limit=500).json()["items"]:
        if item["conversation_number"] == number:
            return item
    raise AssertionError(f"{number} not listed")


def test_list_newest_first_with_the_documented_shape(review_api: RunningAPI, mongo_db: Any) -> None:
    results = seed_reviewable(mongo_db)
    response = listing(review_api)
    assert numbers(response) == [f"r{n}" for n in range(len(CONVERSATIONS))]
    body = response.json()
    assert body["next_cursor"] is None
    first = body["items"][0]
    assert set(first) >= {"id", "conversation_number", "labels", "model_labels", "confidence", "needs_review",
                          "review", "processed_at", "job_id"}
    assert first["labels"] == first["model_labels"] == {"intent": "Order Status", "topic": "Shipping/Delivery",
                                                         "sentiment": "Neutral"}
    assert first["review"] is None and first["job_id"] == "batch_other"
    # Ids work for every BSON type of source _id, and survive a URL.
    assert [decode_id(item["id"]) for item in body["items"]] == [r["source_conversation_id"] for r in results]


def test_pages_follow_the_cursor_and_stay_stable_under_inserts(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    first = listing(review_api, limit=2)
    assert numbers(first) == ["r0", "r1"]
    # New results arrive between two pages: they are newer, so the next pages neither repeat nor skip.
    mongo_db["sentimental_analysis"].insert_many([
        {"conversation_number": f"new{i}", "source_conversation_id": ObjectId(), "content_hash": "x",
         "classification": {"intent": "Other", "topic": "Other", "sentiment": "Neutral"},
         "processing_metadata": {"processed_at": NOW + timedelta(minutes=1 + i), "batch_job_id": "batch_r"}}
        for i in range(3)])
    seen = numbers(first)
    cursor = first.json()["next_cursor"]
    while cursor:
        page = listing(review_api, limit=2, cursor=cursor)
        seen += numbers(page)
        cursor = page.json()["next_cursor"]
    assert seen == [f"r{n}" for n in range(len(CONVERSATIONS))]
    assert numbers(listing(review_api, limit=3)) == ["new2", "new1", "new0"]


def test_lowest_confidence_first_for_the_review_queue(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    queue = listing(review_api, order="confidence", needs_review="true", reviewed="false")
    assert numbers(queue) == ["r2", "r1", "r4"]  # 0.35, 0.42, 0.51
    paged = listing(review_api, order="confidence", limit=1)
    assert numbers(paged) == ["r2"]
    second = listing(review_api, order="confidence", limit=5, cursor=paged.json()["next_cursor"])
    assert numbers(second) == ["r1", "r4", "r3", "r0", "r5"]  # r5 has no confidence: last


@pytest.mark.parametrize(("params", "expected"), [
    ({"intent": "Order Status"}, ["r0", "r3"]),
    ({"intent": "order  status"}, ["r0", "r3"]),  # spelled like the model's labels are compared
    ({"topic": "Shipping/Delivery"}, ["r0", "r3", "r5"]),
    ({"sentiment": "Negative"}, ["r1", "r2", "r4"]),
    ({"sentiment": "Negative", "topic": "Account/Billing"}, ["r1"]),
    ({"needs_review": "true"}, ["r1", "r2", "r4"]),
    ({"needs_review": "false"}, ["r0", "r3", "r5"]),
    ({"job": "batch_r"}, ["r1", "r2", "r4", "r5"]),
    ({"q": "ROUTER"}, ["r4"]),
    ({"q": "Thanks"}, ["r0", "r1", "r2", "r3", "r4", "r5"]),  # agent turns are text of the transcript too
    ({"q": "case 3."}, ["r3"]),  # a literal, not a regular expression
    ({"from": NOW.date().isoformat(), "to": NOW.date().isoformat()}, None),
    ({"to": (NOW - timedelta(days=1)).date().isoformat()}, []),
    ({"from": (NOW + timedelta(days=1)).date().isoformat()}, []),
])
def test_filters(review_api: RunningAPI, mongo_db: Any, params: dict[str, str], expected: list[str] | None) -> None:
    results = seed_reviewable(mongo_db)
    if expected is None:  # every result whose processed_at falls in the days given
        expected = [r["conversation_number"] for r in results
                    if r["processing_metadata"]["processed_at"].date() == NOW.date()]
    assert numbers(listing(review_api, **params)) == expected


@pytest.mark.parametrize(("params", "field"), [
    ({"intnet": "Order Status"}, "intnet"),
    ({"intent": "Teleportation"}, "intent"),
    ({"needs_review": "maybe"}, "needs_review"),
    ({"reviewed": "2"}, "reviewed"),
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"from": "24/09/2025"}, "from"),
    ({"from": "2025-09-25", "to": "2025-09-24"}, "from"),
    ({"to": "9999-12-31"}, "to"),  # the day after cannot be represented: the dashboard's rule (#16 item 12)
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"order": "random"}, "order"),
    ({"q": "x" * 201}, "q"),
])
def test_bad_query_parameters_are_422_naming_the_parameter(review_api: RunningAPI, mongo_db: Any,
                                                          params: dict[str, str], field: str) -> None:
    seed_reviewable(mongo_db)
    response = listing(review_api, **params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "invalid_input"
    assert response.json()["error"]["field"] == field


def test_a_cursor_of_another_order_is_422(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    cursor = listing(review_api, limit=1).json()["next_cursor"]
    response = listing(review_api, limit=1, order="confidence", cursor=cursor)
    assert response.status_code == 422 and response.json()["error"]["field"] == "cursor"


def test_limit_500_is_the_most(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    assert len(numbers(listing(review_api, limit=500))) == len(CONVERSATIONS)


def test_detail_has_the_transcript_with_roles(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    item = item_of(review_api, "r2")
    response = requests.get(f"{review_api.url}/api/conversations/{item['id']}", headers=ALICE, timeout=30)
    assert response.status_code == 200
    detail = response.json()
    assert {k: detail[k] for k in item} == item
    assert detail["transcript"] == [
        {"role": "customer", "text": CONVERSATIONS[2][0], "time": "2025-09-24T10:02:00Z"},
        {"role": "agent", "text": "Thanks for writing, case 2.", "time": "2025-09-24T10:12:00Z"},
    ]
    assert detail["categorization"] == "customer writes about case 2" and detail["model"] == "llama3"


@pytest.mark.parametrize("conversation_id", ["nope", "AAAA", "x" * 300])
def test_unknown_ids_are_404(review_api: RunningAPI, mongo_db: Any, conversation_id: str) -> None:
    seed_reviewable(mongo_db)
    response = requests.get(f"{review_api.url}/api/conversations/{conversation_id}", headers=ALICE, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert review(review_api, conversation_id, {"labels": {"intent": "Other"}}).status_code == 404


def test_an_id_of_a_conversation_never_classified_is_404(review_api: RunningAPI, mongo_db: Any) -> None:
    from reviews import encode_id

    seed_reviewable(mongo_db)
    response = requests.get(f"{review_api.url}/api/conversations/{encode_id(ObjectId())}", headers=ALICE, timeout=30)
    assert response.status_code == 404


def test_a_review_wins_and_keeps_the_models_labels(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    item = item_of(review_api, "r1")
    response = review(review_api, item["id"], {"labels": {"intent": "complaint"}, "note": "angry, not a question"})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["labels"] == {"intent": "Complaint", "topic": "Account/Billing", "sentiment": "Negative"}
    assert updated["model_labels"] == item["model_labels"]
    assert updated["review"]["labels"] == {"intent": "Complaint"}
    assert updated["review"]["by"] == "alice" and updated["review"]["note"] == "angry, not a question"
    assert updated["review"]["stale"] is False
    stored = mongo_db["sentimental_analysis"].find_one({"conversation_number": "r1"})
    assert stored["classification"]["intent"] == "Billing Question"  # what the model said, kept

    # A second reviewer adds a field; the first correction stays.
    second = review(review_api, item["id"], {"labels": {"topic": "Service Quality"}}, headers=BOB).json()
    assert second["review"]["labels"] == {"intent": "Complaint", "topic": "Service Quality"}
    assert second["review"]["by"] == "bob" and second["review"]["note"] is None
    # Filters see the effective labels.
    assert numbers(listing(review_api, intent="Complaint")) == ["r1"]
    assert "r1" not in numbers(listing(review_api, intent="Billing Question"))
    assert numbers(listing(review_api, reviewed="true")) == ["r1"]
    assert "r1" not in numbers(listing(review_api, reviewed="false"))


@pytest.mark.parametrize(("body", "field"), [
    ({"labels": {"urgency": "High"}}, "labels.urgency"),
    ({"labels": {"intent": "Teleportation"}}, "labels.intent"),
    ({"labels": {"intent": 3}}, "labels.intent"),
    ({"labels": {}}, "labels"),
    ({"note": "no labels"}, "labels"),
    ({"labels": {"intent": "Other"}, "extra": 1}, "extra"),
    ({"labels": {"intent": "Other"}, "note": 5}, "note"),
    ({"labels": {"intent": "Other"}, "note": "x" * 2001}, "note"),
    ([1, 2], "body"),
])
def test_a_bad_review_is_422_and_changes_nothing(review_api: RunningAPI, mongo_db: Any, body: Any, field: str) -> None:
    seed_reviewable(mongo_db)
    item = item_of(review_api, "r0")
    response = review(review_api, item["id"], body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert "review" not in mongo_db["sentimental_analysis"].find_one({"conversation_number": "r0"})


def test_a_review_body_that_is_not_json_is_400(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    item = item_of(review_api, "r0")
    response = requests.post(f"{review_api.url}/api/conversations/{item['id']}/review", data=b"{labels",
                             headers={**ALICE, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400


def test_reclassifying_changed_content_makes_the_review_stale_not_gone(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    item = item_of(review_api, "r0")
    assert review(review_api, item["id"], {"labels": {"intent": "Complaint"}}).status_code == 200
    # The batch processor's upsert after the text changed: $set of its own fields, review untouched.
    mongo_db["sentimental_analysis"].update_one({"conversation_number": "r0"}, {"$set": {
        "content_hash": "sha256:changed", "classification": {"intent": "Cancellation", "topic": "Other",
                                                             "sentiment": "Neutral", "categorization": "new"}}})
    after = item_of(review_api, "r0")
    assert after["review"]["labels"] == {"intent": "Complaint"} and after["review"]["stale"] is True
    assert after["labels"] == after["model_labels"] == {"intent": "Cancellation", "topic": "Other",
                                                        "sentiment": "Neutral"}
    assert "r0" in numbers(listing(review_api, reviewed="false"))
    # Reviewing again starts from the new content.
    again = review(review_api, item["id"], {"labels": {"topic": "Orders/Returns"}}).json()
    assert again["review"]["labels"] == {"topic": "Orders/Returns"} and again["review"]["stale"] is False


def counts(stats: dict[str, Any], field: str) -> dict[str, int]:
    [entry] = [f for f in stats["fields"] if f["name"] == field]
    return {row["label"]: row["count"] for row in entry["counts"]}


def test_stats_count_effective_labels_and_agreement(review_api: RunningAPI, mongo_db: Any) -> None:
    seed_reviewable(mongo_db)
    before = requests.get(f"{review_api.url}/api/stats", timeout=30).json()
    assert before["agreement"] == {f: {"n": 0, "accuracy": None} for f in ("intent", "topic", "sentiment")}
    r1, r4 = item_of(review_api, "r1"), item_of(review_api, "r4")
    # r1: the model was wrong on intent, right on topic; r4: right on everything the reviewer set.
    review(review_api, r1["id"], {"labels": {"intent": "Complaint", "topic": "Account/Billing"}})
    review(review_api, r4["id"], {"labels": {"intent": "Technical Support", "sentiment": "Negative"}})
    stats = requests.get(f"{review_api.url}/api/stats", timeout=30).json()
    assert stats["agreement"] == {"intent": {"n": 2, "accuracy": 0.5}, "topic": {"n": 1, "accuracy": 1.0},
                                  "sentiment": {"n": 1, "accuracy": 1.0}}
    intents = counts(stats, "intent")
    assert intents["Complaint"] == 1 and "Billing Question" not in intents
    day = stats["per_day"][0]
    assert day["labels"]["intent"]["Complaint"] == 1
    # A stale review counts neither as a label nor as agreement.
    mongo_db["sentimental_analysis"].update_one({"conversation_number": "r1"}, {"$set": {"content_hash": "new"}})
    stale = requests.get(f"{review_api.url}/api/stats", timeout=30).json()
    assert stale["agreement"]["intent"] == {"n": 1, "accuracy": 1.0}
    assert counts(stale, "intent")["Billing Question"] == 1
