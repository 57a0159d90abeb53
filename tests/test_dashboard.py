"""The dashboard's JSON endpoints and offline docs, over real HTTP against SecantusDB.

The browser test of the page itself is in ``tests/test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from bson import ObjectId

import cli
from config import CONFIG_DIR
from dashboard import results_match, stats_pipeline
from mongo_client import result_indexes
from prompt_builder import load_taxonomy
from tests.conftest import RunningAPI, SettingsFactory
from tests.net_helpers import free_port
from tests.test_batch_processor import RESULTS, batch_env, insert, make_conversation  # noqa: F401  (a fixture)

INTENTS = ["Order Status", "Complaint", "Refund Request"]
TOPICS = ["Shipping/Delivery", "Account/Billing"]
SENTIMENTS = ["Negative", "Neutral", "Positive"]
DEFAULT_FIELDS = load_taxonomy(CONFIG_DIR / "taxonomy.json").field_names
URGENCY_FILE = CONFIG_DIR / "taxonomy-urgency.example.json"
NOW = datetime.now(UTC).replace(microsecond=0)


def seed(database: Any, *, days: int = 3, per_day: int = 7) -> list[dict[str, Any]]:
    """Results over ``days`` days (two jobs, some with confidences), sources with every status, jobs.

    Returns the result documents inserted, for the tests to compute their expectations from.
    """
    results = []
    n = 0
    for day in range(days):
        for i in range(per_day + 3 * (day % 2)):
            n += 1
            classification: dict[str, Any] = {
                "intent": INTENTS[(0, 0, 0, 1, 2)[n % 5]],  # uneven, like real traffic
                "topic": TOPICS[(0, 1, 0)[n % 3]],
                "sentiment": SENTIMENTS[(0, 0, 1, 2, 0, 1, 0)[n % 7]],
                "categorization": f"conversation {n}",
            }
            if n % 2 == 0:  # half carry confidences; a third of those need review
                low = n % 3 == 0
                classification["confidence"] = {"intent": 0.4 if low else 0.95, "topic": 0.9, "sentiment": 0.9}
                classification["needs_review"] = low
            results.append({
                "conversation_number": str(n),
                "source_conversation_id": ObjectId(),
                "classification": classification,
                "processing_metadata": {
                    "processed_at": NOW - timedelta(days=day, minutes=i),
                    "model_used": "llama3",
                    "batch_job_id": "batch_a" if day < 2 else "batch_b",
                },
            })
    database["sentimental_analysis"].insert_many(results)
    for index, options in result_indexes(DEFAULT_FIELDS):
        database["sentimental_analysis"].create_index(index, **options)
    database["conversation_set"].insert_many(
        [{"conversation_number": f"p{i}", "status": "pending"} for i in range(3)]
        + [{"conversation_number": "new"}]  # no status yet: counts as pending
        + [{"conversation_number": "w1", "status": "processing"}]
        + [{"conversation_number": "s1", "status": "skipped"}]
        + [{"conversation_number": f"f{i}", "status": "failed", "failure_type": "llm_bad_output",
            "failure_reason": f"unusable answer {i}", "last_processed_at": NOW - timedelta(minutes=i)}
           for i in range(2)]
    )
    database["jobs"].insert_many([
        {"_id": "batch_a", "mode": "batch", "status": "running", "started_at": NOW - timedelta(minutes=5),
         "updated_at": datetime.now(UTC), "total": 40, "processed": 14, "successful": 12, "failed": 1,
         "queued_for_retry": 1, "rate": 2.5, "percentage": 35.0, "eta": NOW + timedelta(seconds=10)},
        {"_id": "batch_b", "mode": "batch", "status": "completed", "started_at": NOW - timedelta(days=3),
         "updated_at": NOW - timedelta(days=2), "finished_at": NOW - timedelta(days=2), "total": 7,
         "processed": 7, "successful": 7},
        {"_id": "batch_c", "mode": "continuous", "status": "running", "started_at": NOW - timedelta(days=4),
         "updated_at": NOW - timedelta(hours=1)},  # its process died without saying so
    ])
    return results


@pytest.fixture
def dashboard_api(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_uri: str, mongo_db_name: str
) -> RunningAPI:
    return start_api(make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name))


def expected_counts(results: list[dict[str, Any]], field: str) -> dict[str, int]:
    return dict(Counter(r["classification"][field] for r in results))


def counts_of(body: dict[str, Any], field: str) -> dict[str, int]:
    """One field's label counts in an /api/stats answer."""
    [entry] = [f for f in body["fields"] if f["name"] == field]
    return {row["label"]: row["count"] for row in entry["counts"]}


def classify_with_a_fourth_field(database: Any, monkeypatch: pytest.MonkeyPatch, n: int = 12) -> list[dict[str, Any]]:
    """``n`` conversations through the real batch processor with TAXONOMY_FILE = the urgency example
    (needs the ``batch_env`` fixture); returns the result documents it wrote."""
    insert(database, [make_conversation(i, f"@AcmeCare conversation {i}: my parcel is late") for i in range(n)])
    monkeypatch.setenv("TAXONOMY_FILE", str(URGENCY_FILE))
    assert cli.main([]) == cli.EXIT_OK
    return list(database[RESULTS].find())


def test_stats_match_the_database(dashboard_api: RunningAPI, mongo_db: Any) -> None:
    results = seed(mongo_db)
    body = requests.get(f"{dashboard_api.url}/api/stats", timeout=30).json()
    assert body["total"] == len(results)
    assert [f["name"] for f in body["fields"]] == DEFAULT_FIELDS
    for field in body["fields"]:
        assert counts_of(body, field["name"]) == expected_counts(results, field["name"])
        counts = [row["count"] for row in field["counts"]]
        assert counts == sorted(counts, reverse=True)
    [sentiment] = [f for f in body["fields"] if f["name"] == "sentiment"]
    assert sentiment["customer_only"] is True and sentiment["labels"] == ["Positive", "Neutral", "Negative"]
    assert sentiment["description"] == "how the customer feels" and sentiment["title"] == "Sentiment"
    days = Counter(r["processing_metadata"]["processed_at"].strftime("%Y-%m-%d") for r in results)
    assert {d["date"]: d["total"] for d in body["per_day"]} == dict(days)
    assert [d["date"] for d in body["per_day"]] == sorted(days)
    for entry in body["per_day"]:
        on_day = [r for r in results if r["processing_metadata"]["processed_at"].strftime("%Y-%m-%d") == entry["date"]]
        assert entry["labels"] == {field: expected_counts(on_day, field) for field in DEFAULT_FIELDS}
    with_confidence = [r for r in results if "confidence" in r["classification"]]
    flagged = [r for r in with_confidence if r["classification"]["needs_review"]]
    assert body["review"] == {
        "with_confidence": len(with_confidence),
        "needs_review": len(flagged),
        "share": round(len(flagged) / len(with_confidence), 4),
    }
    assert body["statuses"] == {"pending": 4, "processing": 1, "processed": 0, "failed": 2, "skipped": 1}
    assert [f["conversation_number"] for f in body["failures"]] == ["f0", "f1"]  # latest first
    assert body["failures"][0]["reason"] == "unusable answer 0"
    assert body["failures"][0]["failure_type"] == "llm_bad_output"
    assert body["job_ids"] == ["batch_a", "batch_b"]


def test_stats_filters_by_date_range_and_job(dashboard_api: RunningAPI, mongo_db: Any) -> None:
    results = seed(mongo_db)
    today = NOW.date()
    yesterday = today - timedelta(days=1)
    body = requests.get(f"{dashboard_api.url}/api/stats",
                        params={"from": str(yesterday), "to": str(today)}, timeout=30).json()
    in_range = [r for r in results if r["processing_metadata"]["processed_at"].date() >= yesterday]
    assert body["total"] == len(in_range) > 0
    assert body["from"] == str(yesterday) and body["to"] == str(today)
    assert counts_of(body, "intent") == expected_counts(in_range, "intent")

    body = requests.get(f"{dashboard_api.url}/api/stats", params={"job": "batch_b"}, timeout=30).json()
    of_job = [r for r in results if r["processing_metadata"]["batch_job_id"] == "batch_b"]
    assert body["total"] == len(of_job) > 0
    assert body["job"] == "batch_b"
    assert counts_of(body, "topic") == expected_counts(of_job, "topic")

    body = requests.get(f"{dashboard_api.url}/api/stats", params={"job": "no_such_job"}, timeout=30).json()
    assert body["total"] == 0 and counts_of(body, "intent") == {} and body["per_day"] == []
    assert body["review"] == {"with_confidence": 0, "needs_review": 0, "share": None}


@pytest.mark.usefixtures("batch_env")  # the processor's environment: this database and the fake Ollama
def test_a_fourth_field_goes_from_the_taxonomy_file_to_the_stats(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_db: Any, mongo_uri: str,
    mongo_db_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TAXONOMY_FILE is the only change: results, their indexes, /api/stats and /api/taxonomy follow."""
    results = classify_with_a_fourth_field(mongo_db, monkeypatch)
    assert all(r["classification"]["urgency"] in ("Low", "Medium", "High") for r in results)
    assert all(set(r["classification"]["confidence"]) == {*DEFAULT_FIELDS, "urgency"} for r in results)
    indexes = [v["key"] for v in mongo_db[RESULTS].index_information().values()]
    assert [("classification.urgency", 1)] in indexes

    api = start_api(make_settings(taxonomy_file=URGENCY_FILE, mongodb_connection_string=mongo_uri,
                                  mongodb_database_name=mongo_db_name))
    body = requests.get(f"{api.url}/api/stats", timeout=30).json()
    assert [f["name"] for f in body["fields"]] == [*DEFAULT_FIELDS, "urgency"]
    assert counts_of(body, "urgency") == expected_counts(results, "urgency")
    assert len(counts_of(body, "urgency")) > 1  # the fake's answers spread over the labels
    assert all(set(day["labels"]) == {*DEFAULT_FIELDS, "urgency"} for day in body["per_day"])
    taxonomy = requests.get(f"{api.url}/api/taxonomy", timeout=30).json()
    assert taxonomy == load_taxonomy(URGENCY_FILE).as_dict()
    assert taxonomy["fields"][3]["labels"][2] == {
        "name": "High", "description": json.loads(URGENCY_FILE.read_text())["fields"][3]["labels"][2]["description"]}


def test_stats_reject_a_reversed_or_malformed_range(dashboard_api: RunningAPI, mongo_db: Any) -> None:
    response = requests.get(f"{dashboard_api.url}/api/stats", params={"from": "2026-02-02", "to": "2026-02-01"},
                            timeout=30)
    assert response.status_code == 422
    assert "after" in response.json()["error"]["message"]
    response = requests.get(f"{dashboard_api.url}/api/stats", params={"from": "yesterday"}, timeout=30)
    assert response.status_code == 422
    assert response.json()["error"] == {"type": "invalid_input", "field": "from",
                                        "message": "'from' must be a day written YYYY-MM-DD, got 'yesterday'."}


@pytest.mark.parametrize("name", ["from", "to"])
@pytest.mark.parametrize("day", ["9999-12-31", "10000-01-01", "0000-12-31", "2026-02-30"])
def test_stats_reject_a_day_out_of_range_with_422(dashboard_api: RunningAPI, mongo_db: Any, name: str,
                                                   day: str) -> None:
    # 9999-12-31: its end (the next day's start) cannot be written; the others are no days at all.
    response = requests.get(f"{dashboard_api.url}/api/stats", params={name: day}, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_input", name)
    assert day in error["message"] and "YYYY-MM-DD" in error["message"]


def test_stats_accept_the_first_and_last_days_that_can_be_written(dashboard_api: RunningAPI, mongo_db: Any) -> None:
    results = seed(mongo_db)
    body = requests.get(f"{dashboard_api.url}/api/stats", params={"from": "0001-01-01", "to": "9999-12-30"},
                        timeout=30).json()
    assert body["total"] == len(results)


def test_jobs_most_recent_first_and_silent_ones_unresponsive(dashboard_api: RunningAPI, mongo_db: Any) -> None:
    seed(mongo_db)
    body = requests.get(f"{dashboard_api.url}/api/jobs", timeout=30).json()
    assert [j["job_id"] for j in body["jobs"]] == ["batch_a", "batch_b", "batch_c"]
    assert [j["status"] for j in body["jobs"]] == ["running", "completed", "unresponsive"]
    assert body["running"] == 1
    first = body["jobs"][0]
    assert (first["processed"], first["total"], first["successful"], first["failed"], first["queued_for_retry"]) \
        == (14, 40, 12, 1, 1)
    assert requests.get(f"{dashboard_api.url}/api/jobs", params={"limit": 1}, timeout=30).json()["jobs"][0][
        "job_id"] == "batch_a"


def test_stats_pipeline_uses_the_results_indexes(mongo_db: Any) -> None:
    seed(mongo_db)
    for match in (results_match(NOW.date(), NOW.date(), None), results_match(None, None, "batch_a")):
        pipeline = stats_pipeline(match, DEFAULT_FIELDS)
        plan = mongo_db.command("explain", {"aggregate": "sentimental_analysis", "pipeline": pipeline,
                                            "cursor": {}})
        assert "IXSCAN" in str(plan), plan
        assert "COLLSCAN" not in str(plan), plan


def test_without_mongodb_the_dashboard_answers_503_and_the_rest_works(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI]
) -> None:
    api = start_api(make_settings(mongodb_connection_string=f"mongodb://127.0.0.1:{free_port()}"))
    for path in ("/api/stats", "/api/jobs"):
        response = requests.get(f"{api.url}{path}", timeout=30)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "storage_unavailable"
        assert "Cannot reach MongoDB at mongodb://127.0.0.1:" in error["message"]
        assert "MONGODB_CONNECTION_STRING" in error["hint"]
    assert requests.get(f"{api.url}/health", timeout=10).json() == {"status": "ok"}
    classified = requests.post(f"{api.url}/classify", json={
        "conversation_number": "1",
        "messages": [{"sender": "customer", "text": "Where is my parcel?"}],
    }, timeout=30)
    assert classified.status_code == 200, classified.text
    assert requests.get(f"{api.url}/dashboard", timeout=10).status_code == 200  # the page says why it is empty


def test_not_configured_mongodb_answers_503(make_settings: SettingsFactory,
                                            start_api: Callable[..., RunningAPI]) -> None:
    api = start_api(make_settings(mongodb_connection_string=" "))
    response = requests.get(f"{api.url}/api/jobs", timeout=30)
    assert response.status_code == 503
    assert "not configured" in response.json()["error"]["message"]


def test_docs_and_dashboard_load_nothing_from_other_hosts(api_server: RunningAPI) -> None:
    for path in ("/docs", "/dashboard"):
        page = requests.get(f"{api_server.url}{path}", timeout=10)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', page.text)
        assert assets, path
        for asset in assets:
            assert asset.startswith("/"), f"{path} loads {asset} from elsewhere"
            assert requests.get(f"{api_server.url}{asset}", timeout=10).status_code == 200, asset
    assert "/api/stats" in requests.get(f"{api_server.url}/openapi.json", timeout=10).json()["paths"]
    assert requests.get(f"{api_server.url}/redoc", timeout=10).status_code == 404


def test_embedded_database_is_started_on_first_use_and_stopped_with_the_api(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], tmp_path: Any
) -> None:
    """`make demo` then `make run`: the dashboard reads the embedded database (started lazily)."""
    from pymongo import MongoClient

    from utils.embedded_db import embedded_database

    settings = make_settings(mongodb_connection_string="embedded", embedded_db_path=tmp_path / "db")
    with embedded_database(settings) as uri, MongoClient(uri) as client:  # what the demo leaves behind
        seed(client[settings.mongodb_database_name], days=1, per_day=4)
    api = start_api(settings)
    assert requests.get(f"{api.url}/health", timeout=10).status_code == 200
    body = requests.get(f"{api.url}/api/stats", timeout=120).json()
    assert body["total"] == 4
    assert requests.get(f"{api.url}/api/jobs", timeout=30).json()["jobs"][0]["job_id"] == "batch_a"
