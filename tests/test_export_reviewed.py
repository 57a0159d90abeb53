"""Reviewed conversations as the team's labelled set: export, then evaluate on it (SecantusDB, fake LLM)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from classifier import parse_classification
from config import CONFIG_DIR
from error_handler import EXIT_INCOMPLETE, EXIT_OK
from fakes.ollama import FakeOllama, Reply, last_user_content
from prompt_builder import CONVERSATION_HEADER, load_taxonomy
from scripts import evaluate, export_reviewed
from tests.review_data import CONVERSATIONS, seed_reviewable

#: What the reviewers said, by conversation (r5 is not reviewed).
REVIEWS = {
    "r0": {"intent": "Order Status"},
    "r1": {"intent": "Complaint", "topic": "Account/Billing", "sentiment": "Negative"},
    "r2": {"sentiment": "Neutral"},
    "r3": {"intent": "Feedback", "sentiment": "Positive"},
    "r4": {"topic": "Network/Connectivity"},
}


@pytest.fixture
def reviewed(mongo_db: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongo_uri: str, mongo_db_name: str,
             fake_ollama: FakeOllama) -> Any:
    """Seeded results with :data:`REVIEWS` (r0 reviewed days ago, its review later made stale), the
    environment of the scripts pointing at the test's database and fake Ollama."""
    monkeypatch.chdir(tmp_path)  # no .env of the developer
    for name in ("LLM_MODEL", "OLLAMA_MODEL", "OLLAMA_ENDPOINT", "TAXONOMY_FILE", "FEW_SHOTS_FILE", "LLM_PROVIDER",
                 "FEW_SHOT_SOURCE", "EMBEDDING_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", mongo_uri)
    monkeypatch.setenv("MONGODB_DATABASE_NAME", mongo_db_name)
    monkeypatch.setenv("LLM_ENDPOINT", fake_ollama.url)
    seed_reviewable(mongo_db)
    results = mongo_db["sentimental_analysis"]
    now = datetime.now(UTC)
    for n, (number, labels) in enumerate(REVIEWS.items()):
        doc = results.find_one({"conversation_number": number})
        at = now - timedelta(days=10) if number == "r0" else now - timedelta(minutes=n)
        results.update_one({"_id": doc["_id"]}, {"$set": {"review": {
            "labels": labels, "by": "alice", "at": at, "note": f"note {number}", "content_hash": doc["content_hash"]}}})
    return mongo_db


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_writes_evaluates_format_with_the_reviewed_labels(reviewed: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reviewed.jsonl"
    assert export_reviewed.main(["--output", str(out)]) == EXIT_OK
    lines = read_lines(out)
    assert [line["conversation_number"] for line in lines] == ["r0", "r4", "r3", "r2", "r1"]  # oldest review first
    by_number = {line["conversation_number"]: line for line in lines}
    for number, labels in REVIEWS.items():
        assert by_number[number]["expected"] == labels
    r2 = by_number["r2"]
    assert r2["messages"] == [
        {"sender": "customer", "text": CONVERSATIONS[2][0], "timestamp": "2025-09-24T10:02:00Z"},
        {"sender": "agent", "text": "Thanks for writing, case 2.", "timestamp": "2025-09-24T10:12:00Z"}]
    assert r2["labels"] == {"intent": "Refund Request", "topic": "Product Quality", "sentiment": "Neutral"}
    assert r2["note"] == "note r2" and r2["categorization"] == "customer writes about case 2"
    assert "written:" in capsys.readouterr().err


def test_since_stale_and_vanished_reviews(reviewed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recent.jsonl"
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert export_reviewed.main(["--output", str(out), "--since", since]) == EXIT_OK
    assert [line["conversation_number"] for line in read_lines(out)] == ["r4", "r3", "r2", "r1"]

    # r1 classified again after an edit (its review is stale), r2's source deleted.
    reviewed["sentimental_analysis"].update_one({"conversation_number": "r1"}, {"$set": {"content_hash": "new"}})
    reviewed["conversation_set"].delete_one({"conversation_number": "r2"})
    assert export_reviewed.main(["--output", str(out), "--since", since]) == EXIT_INCOMPLETE
    assert [line["conversation_number"] for line in read_lines(out)] == ["r4", "r3"]
    err = capsys.readouterr().err
    assert "r1 left out: its review is stale" in err and "r2 left out: its source conversation is gone" in err


def test_export_usage_errors(reviewed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_reviewed.main(["--output", str(tmp_path / "missing" / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_reviewed.main(["--output", str(tmp_path / "x.jsonl"), "--since", "yesterday"])
    assert exit_info.value.code == 2


def test_evaluate_scores_a_model_on_the_exported_set(reviewed: Any, tmp_path: Path, fake_ollama: FakeOllama) -> None:
    out = tmp_path / "reviewed.jsonl"
    assert export_reviewed.main(["--output", str(out)]) == EXIT_OK
    expected = {CONVERSATIONS[int(n[1:])][0]: labels for n, labels in REVIEWS.items()}

    def reviewer_like(request: dict[str, Any]) -> Reply:
        # Agrees with the reviewers on intent, says "Other"/"Neutral" otherwise.
        content = last_user_content(request)
        labels = next(v for text, v in expected.items() if text in content)
        intent = labels.get("intent", "Other")
        return Reply(json.dumps({"categorization": "x", "intent": intent, "topic": "Other", "sentiment": "Neutral"}))

    fake_ollama.responder = reviewer_like
    report_path = tmp_path / "report.json"
    assert evaluate.main([str(out), "--output", str(report_path)]) == EXIT_OK
    report = json.loads(report_path.read_text())
    assert report["n"] == 5
    assert report["fields"]["intent"] == {**report["fields"]["intent"], "n": 3, "accuracy": 1.0}
    assert report["fields"]["topic"]["n"] == 2 and report["fields"]["topic"]["accuracy"] == 0.0
    assert report["fields"]["sentiment"]["n"] == 3 and report["fields"]["sentiment"]["accuracy"] == 0.3333
    assert report["prompt_tokens_per_item"] > 0


def test_evaluate_with_retrieved_examples_from_a_file_and_from_mongodb(
    reviewed: Any, tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    pool = tmp_path / "reviewed.jsonl"
    assert export_reviewed.main(["--output", str(pool)]) == EXIT_OK
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps([{"conversation_number": "h1", "expected": {"intent": "Technical Support"},
                                     "messages": [{"sender": "customer", "text": "the router dropped the wifi"}]}]))
    assert evaluate.main([str(held_out), "--few-shot-source", "reviewed", "--examples", str(pool)]) == EXIT_OK
    messages = fake_ollama.chat_requests[-1]["messages"]
    assert len(messages) == 1 + 2 * 3 + 1  # system, FEW_SHOT_K=3 examples, the conversation
    assert CONVERSATIONS[4][0] in messages[-3]["content"].removeprefix(CONVERSATION_HEADER)  # the router one, last
    # The example's answer is written as the model writes its own (AnswerFormat): read it back as the parser does.
    example = parse_classification(messages[-2]["content"], load_taxonomy(CONFIG_DIR / "taxonomy.json"))
    assert example.model_dump()["topic"] == "Network/Connectivity"

    # Without --examples: the reviewed conversations of MongoDB; a scored one is never its own example.
    assert evaluate.main([str(pool), "--few-shot-source", "both"]) == EXIT_OK
    for chat_request in fake_ollama.chat_requests[-5:]:
        conversation = chat_request["messages"][-1]["content"]
        shown = [m["content"] for m in chat_request["messages"][1:-1] if m["role"] == "user"]
        assert conversation not in shown


def test_examples_without_retrieval_is_a_usage_error(reviewed: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "reviewed.jsonl"
    pool.write_text("")
    assert evaluate.main([str(pool), "--examples", str(pool)]) == 2
    assert "--few-shot-source reviewed" in capsys.readouterr().err
