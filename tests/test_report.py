"""scripts/report.py against a real SecantusDB server (MongoDB wire protocol).

The result documents are written here in the results schema (docs/architecture.md#results-and-indexes):
processed_at as a BSON date (what the batch processor writes) and, for two of them, as an
ISO-8601 string (the design document's example). Expected counts are written out by hand.
Most runs go through the script's ``main()`` in-process; one runs it as ``python
scripts/report.py`` in a subprocess to prove its sys.path handling.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import monitoring

from config import Settings, env_name
from tests.net_helpers import free_port
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "report.py"
RESULTS = "sentimental_analysis"
TAXONOMY = json.loads((ROOT / "config" / "taxonomy.json").read_text(encoding="utf-8"))
INTENTS = [entry["name"] for entry in TAXONOMY["fields"][0]["labels"]]
TOPICS = [entry["name"] for entry in TAXONOMY["fields"][1]["labels"]]
SENTIMENTS = ["Positive", "Neutral", "Negative"]


report = load_script("report")

# --- the data -------------------------------------------------------------------------------

JOB_A = "batch_20250924_103000"
JOB_B = "batch_20250925_090000"
START_A = datetime(2025, 9, 24, 10, 30, tzinfo=UTC)
START_B = datetime(2025, 9, 25, 9, 0, tzinfo=UTC)

# (intent, topic, sentiment). "Warranty Claim" and "Mixed" are not in the taxonomy;
# Service Outage, Cancellation, Change Request, Product Inquiry, Travel/Flights and
# Pricing/Promotions have no results.
JOB_A_LABELS = [
    ("Order Status", "Shipping/Delivery", "Negative"),
    ("Order Status", "Shipping/Delivery", "Neutral"),
    ("Order Status", "Shipping/Delivery", "Negative"),
    ("Complaint", "Service Quality", "Negative"),
    ("Complaint", "Product Quality", "Negative"),
    ("Complaint", "Shipping/Delivery", "Negative"),
    ("Refund Request", "Account/Billing", "Negative"),
    ("Refund Request", "Orders/Returns", "Neutral"),
    ("Billing Question", "Account/Billing", "Neutral"),
    ("Technical Support", "Network/Connectivity", "Negative"),
    ("Technical Support", "Software/App", "Neutral"),
    ("Feedback", "Service Quality", "Positive"),
    ("Feedback", "Software/App", "Positive"),
    ("Warranty Claim", "Product Quality", "Neutral"),
]
JOB_B_LABELS = [
    ("Account Access", "Login/Security", "Negative"),
    ("Technical Support", "Network/Connectivity", "Positive"),
    ("Order Status", "Shipping/Delivery", "Positive"),
    ("Warranty Claim", "Product Quality", "Negative"),
    ("Other", "Other", "Mixed"),
    ("Billing Question", "Account/Billing", "Negative"),
]

EXPECTED_BY_INTENT = {
    "Order Status": 4, "Complaint": 3, "Refund Request": 2, "Billing Question": 2, "Technical Support": 3,
    "Service Outage": 0, "Account Access": 1, "Cancellation": 0, "Change Request": 0, "Product Inquiry": 0,
    "Feedback": 2, "Other": 1, "Warranty Claim": 2,
}
EXPECTED_BY_TOPIC = {
    "Shipping/Delivery": 5, "Account/Billing": 3, "Service Quality": 2, "Product Quality": 3,
    "Network/Connectivity": 2, "Software/App": 2, "Travel/Flights": 0, "Orders/Returns": 1,
    "Pricing/Promotions": 0, "Login/Security": 1, "Other": 1,
}
EXPECTED_BY_SENTIMENT = {"Positive": 4, "Neutral": 5, "Negative": 10, "Mixed": 1}
# Non-zero cells only; every other cell of the crossing must be 0.
EXPECTED_INTENT_SENTIMENT = {
    ("Order Status", "Positive"): 1, ("Order Status", "Neutral"): 1, ("Order Status", "Negative"): 2,
    ("Complaint", "Negative"): 3,
    ("Refund Request", "Neutral"): 1, ("Refund Request", "Negative"): 1,
    ("Billing Question", "Neutral"): 1, ("Billing Question", "Negative"): 1,
    ("Technical Support", "Positive"): 1, ("Technical Support", "Neutral"): 1, ("Technical Support", "Negative"): 1,
    ("Account Access", "Negative"): 1,
    ("Feedback", "Positive"): 2,
    ("Other", "Mixed"): 1,
    ("Warranty Claim", "Neutral"): 1, ("Warranty Claim", "Negative"): 1,
}
EXPECTED_TOPIC_SENTIMENT = {
    ("Shipping/Delivery", "Positive"): 1, ("Shipping/Delivery", "Neutral"): 1, ("Shipping/Delivery", "Negative"): 3,
    ("Account/Billing", "Neutral"): 1, ("Account/Billing", "Negative"): 2,
    ("Service Quality", "Positive"): 1, ("Service Quality", "Negative"): 1,
    ("Product Quality", "Neutral"): 1, ("Product Quality", "Negative"): 2,
    ("Network/Connectivity", "Positive"): 1, ("Network/Connectivity", "Negative"): 1,
    ("Software/App", "Positive"): 1, ("Software/App", "Neutral"): 1,
    ("Orders/Returns", "Neutral"): 1,
    ("Login/Security", "Negative"): 1,
    ("Other", "Mixed"): 1,
}


def result_document(n: int, intent: str, topic: str, sentiment: str, job: str, processed_at: Any) -> dict[str, Any]:
    """A result in the design's results collection schema."""
    return {
        "conversation_number": str(n),
        "source_conversation_id": ObjectId(),
        "classification": {"intent": intent, "topic": topic, "sentiment": sentiment,
                           "categorization": f"Customer {n} wants help"},
        "processing_metadata": {"processed_at": processed_at, "model_used": "llama3",
                                "processing_duration_ms": 45000 + n, "processor_version": "1.0.0",
                                "batch_job_id": job},
        "created_at": processed_at,
    }


def known_results() -> list[dict[str, Any]]:
    docs = [result_document(i + 1, *labels, JOB_A, START_A + timedelta(minutes=i))
            for i, labels in enumerate(JOB_A_LABELS)]
    for i, labels in enumerate(JOB_B_LABELS):
        at: Any = START_B + timedelta(minutes=i)
        if i in (2, 5):  # the design document's example stores processed_at as an ISO-8601 string
            at = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        docs.append(result_document(100 + i, *labels, JOB_B, at))
    return docs


@pytest.fixture
def report_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongo_uri: str, mongo_db_name: str) -> dict[str, str]:
    """This test's database, nothing else from the machine: no Settings variable, no .env (cwd is tmp_path)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    env = {"MONGODB_CONNECTION_STRING": mongo_uri, "MONGODB_DATABASE_NAME": mongo_db_name,
           "MONGODB_TIMEOUT_MS": "5000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return env


@pytest.fixture
def results(report_env: dict[str, str], mongo_db: Any) -> Any:
    mongo_db[RESULTS].insert_many(known_results())
    return mongo_db[RESULTS]


def run_report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = report.main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run_report(capsys, "--format", "json", *args)
    assert code == report.EXIT_OK, err
    return json.loads(out)


def full_crossing(
    nonzero: dict[tuple[str, str], int], rows: list[str], columns: list[str]
) -> dict[str, dict[str, int]]:
    assert {row for row, _ in nonzero} <= set(rows) and {column for _, column in nonzero} <= set(columns)
    return {row: {column: nonzero.get((row, column), 0) for column in columns} for row in rows}


# --- counts ----------------------------------------------------------------------------------


def test_json_report_counts_and_crosses_exactly(results, mongo_db_name, capsys):
    data = json_report(capsys)

    assert list(data) == [
        "total", "database", "collection", "batch_job_id", "processed_at", "by_intent", "by_topic", "by_sentiment",
        "intent_by_topic", "intent_by_sentiment", "topic_by_sentiment", "unknown_labels",
        "skipped_no_customer_turn", "needs_review",
    ]
    assert data["skipped_no_customer_turn"] == 0
    assert data["total"] == 20
    assert data["needs_review"] == 0
    assert (data["database"], data["collection"], data["batch_job_id"]) == (mongo_db_name, RESULTS, None)
    # The first is a BSON date, the last an ISO string: both kinds count.
    assert data["processed_at"] == {"first": "2025-09-24T10:30:00Z", "last": "2025-09-25T09:05:00Z"}
    # Taxonomy order, zeros kept, the label outside the taxonomy last; dict order is JSON order.
    assert list(data["by_intent"].items()) == list(EXPECTED_BY_INTENT.items())
    assert list(data["by_topic"].items()) == list(EXPECTED_BY_TOPIC.items())
    assert list(data["by_sentiment"].items()) == list(EXPECTED_BY_SENTIMENT.items())
    intents, topics, sentiments = list(EXPECTED_BY_INTENT), list(EXPECTED_BY_TOPIC), list(EXPECTED_BY_SENTIMENT)
    assert data["intent_by_sentiment"] == full_crossing(EXPECTED_INTENT_SENTIMENT, intents, sentiments)
    assert data["topic_by_sentiment"] == full_crossing(EXPECTED_TOPIC_SENTIMENT, topics, sentiments)
    # Rectangular, in order: every row has every column.
    for key, rows, columns in (("intent_by_sentiment", intents, sentiments), ("topic_by_sentiment", topics, sentiments),
                               ("intent_by_topic", intents, topics)):
        assert list(data[key]) == rows
        assert all(list(cells) == columns for cells in data[key].values())
    assert data["intent_by_topic"]["Order Status"]["Shipping/Delivery"] == 4
    assert data["intent_by_topic"]["Warranty Claim"]["Product Quality"] == 2
    assert sum(sum(cells.values()) for cells in data["intent_by_topic"].values()) == 20
    assert data["unknown_labels"] == {"intent": ["Warranty Claim"], "topic": [], "sentiment": ["Mixed"]}


def test_counting_is_done_by_mongodb_not_by_loading_results(results, capsys):
    """Extra results share three label triples: only three grouped rows come back over the wire."""

    class Recorder(monitoring.CommandListener):
        active = True

        def __init__(self) -> None:
            self.commands: list[str] = []
            self.targets: list[tuple[str, Any]] = []
            self.returned: list[int] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if self.active:
                self.commands.append(event.command_name)
                self.targets.append((event.command_name, event.command.get(event.command_name)))

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            if self.active and event.command_name in ("aggregate", "getMore"):
                cursor = event.reply.get("cursor", {})
                self.returned.append(len(cursor.get("firstBatch", cursor.get("nextBatch", []))))

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    results.delete_many({})
    triples = [("Complaint", "Other", "Negative"), ("Feedback", "Other", "Positive"), ("Other", "Other", "Neutral")]
    results.insert_many([result_document(i, *triples[i % 3], JOB_A, START_A) for i in range(300)])
    recorder = Recorder()
    # pymongo has no unregister: the listener stays, switched off, for clients made later in the session.
    monitoring.register(recorder)
    try:
        data = json_report(capsys)
    finally:
        recorder.active = False

    assert data["total"] == 300
    assert data["by_intent"]["Complaint"] == data["by_intent"]["Feedback"] == data["by_intent"]["Other"] == 100
    assert "find" not in recorder.commands
    assert recorder.targets.count(("aggregate", RESULTS)) == 1  # (the other counts skipped source conversations)
    assert sum(recorder.returned) == 3


def test_labels_follow_the_order_of_the_configured_taxonomy(results, report_env, monkeypatch, tmp_path, capsys):
    custom = {
        "intents": ["Other", "Feedback", "Complaint", "Order Status"],
        "topics": ["Other", "Shipping/Delivery"],
        "sentiments": ["Negative", "Mixed", "Neutral", "Positive", "Ecstatic"],
    }
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(custom), encoding="utf-8")
    monkeypatch.setenv("TAXONOMY_FILE", str(path))

    data = json_report(capsys)

    # Taxonomy labels first in file order (Ecstatic with 0), then the others, most frequent first, ties by name.
    assert list(data["by_intent"].items()) == [
        ("Other", 1), ("Feedback", 2), ("Complaint", 3), ("Order Status", 4),
        ("Technical Support", 3), ("Billing Question", 2), ("Refund Request", 2), ("Warranty Claim", 2),
        ("Account Access", 1),
    ]
    assert list(data["by_sentiment"].items()) == [
        ("Negative", 10), ("Mixed", 1), ("Neutral", 5), ("Positive", 4), ("Ecstatic", 0),
    ]
    assert list(data["by_topic"])[:4] == ["Other", "Shipping/Delivery", "Account/Billing", "Product Quality"]
    assert list(data["topic_by_sentiment"]["Other"]) == ["Negative", "Mixed", "Neutral", "Positive", "Ecstatic"]
    assert data["unknown_labels"]["sentiment"] == []


def test_a_fourth_field_of_the_taxonomy_is_counted_crossed_tabled_and_charted(
        report_env, mongo_db, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TAXONOMY_FILE", str(ROOT / "config" / "taxonomy-urgency.example.json"))
    urgencies = ["High", "Low", "High", "Medium", "High"]
    docs = [result_document(i, "Order Status", "Shipping/Delivery", ("Negative", "Neutral")[i % 2], JOB_A, START_A)
            for i in range(len(urgencies))]
    for doc, urgency in zip(docs, urgencies, strict=True):
        doc["classification"]["urgency"] = urgency
    mongo_db[RESULTS].insert_many(docs)

    data = json_report(capsys)
    assert data["by_urgency"] == {"Low": 1, "Medium": 1, "High": 3}
    assert [key for key in data if "_by_" in key] == [
        "intent_by_topic", "intent_by_sentiment", "intent_by_urgency", "topic_by_sentiment", "topic_by_urgency",
        "sentiment_by_urgency"]
    assert data["sentiment_by_urgency"]["Negative"] == {"Low": 0, "Medium": 0, "High": 3}
    assert data["unknown_labels"]["urgency"] == []

    code, out, _ = run_report(capsys, "--format", "csv")
    assert "by_urgency,High,,3" in out.splitlines() and "topic_by_urgency,Shipping/Delivery,Low,1" in out

    chart = tmp_path / "chart.png"
    code, out, err = run_report(capsys, "--chart", str(chart))
    assert code == report.EXIT_OK, err
    # Split by the field with the fewest labels, the first of them: sentiment (urgency has three too).
    titles = [line.strip() for line in out.splitlines() if line.strip().endswith("by sentiment")]
    assert titles == ["Intent by sentiment", "Topic by sentiment", "Urgency by sentiment"]
    assert table_row(out, "High") == ["3", "60.0%", "0", "0", "3"]
    assert png_size(chart.read_bytes())[1] > 800


def test_job_filter_counts_only_that_batch_job(results, capsys):
    data = json_report(capsys, "--job", JOB_B)

    assert data["total"] == 6
    assert data["batch_job_id"] == JOB_B
    assert data["processed_at"] == {"first": "2025-09-25T09:00:00Z", "last": "2025-09-25T09:05:00Z"}
    assert {label: n for label, n in data["by_intent"].items() if n} == {
        "Order Status": 1, "Billing Question": 1, "Technical Support": 1, "Account Access": 1, "Other": 1,
        "Warranty Claim": 1,
    }
    assert data["by_sentiment"] == {"Positive": 2, "Neutral": 0, "Negative": 3, "Mixed": 1}
    assert data["intent_by_sentiment"]["Warranty Claim"] == {"Positive": 0, "Neutral": 0, "Negative": 1, "Mixed": 0}
    assert data["topic_by_sentiment"]["Other"] == {"Positive": 0, "Neutral": 0, "Negative": 0, "Mixed": 1}

    job_a = json_report(capsys, "--job", JOB_A)
    assert job_a["total"] == 14
    assert job_a["by_sentiment"] == {"Positive": 2, "Neutral": 5, "Negative": 7}
    assert job_a["processed_at"] == {"first": "2025-09-24T10:30:00Z", "last": "2025-09-24T10:43:00Z"}


# --- formats ---------------------------------------------------------------------------------


def table_row(out: str, label: str) -> list[str]:
    """The cells after ``label`` on its table line (rich's SIMPLE_HEAD box has no vertical rules)."""
    lines = [line for line in out.splitlines() if re.match(rf"\s*{re.escape(label)}(\s\*)?\s{{2,}}\d", line)]
    assert len(lines) == 1, (label, lines)
    return lines[0].strip()[len(label):].replace("*", "").split()


def test_table_shows_counts_percentages_and_totals(results, mongo_db_name, capsys):
    code, out, err = run_report(capsys)  # table is the default

    assert code == report.EXIT_OK
    assert err == ""
    assert out.splitlines()[0] == (f"20 results in {mongo_db_name}.{RESULTS}, "
                                   "processed 2025-09-24 10:30:00 to 2025-09-25 09:05:00 UTC")
    assert "Traceback" not in out
    # Intents by sentiment: results, % of all, Positive, Neutral, Negative, Mixed.
    assert table_row(out, "Order Status") == ["4", "20.0%", "1", "1", "2", "0"]
    assert table_row(out, "Complaint") == ["3", "15.0%", "0", "0", "3", "0"]
    assert table_row(out, "Service Outage") == ["0", "0.0%", "0", "0", "0", "0"]
    assert table_row(out, "Warranty Claim") == ["2", "10.0%", "0", "1", "1", "0"]
    # Topics by sentiment.
    assert table_row(out, "Shipping/Delivery") == ["5", "25.0%", "1", "1", "3", "0"]
    assert table_row(out, "Travel/Flights") == ["0", "0.0%", "0", "0", "0", "0"]
    # Sentiments, and the totals of the footers (once per intent and topic table, once for sentiments).
    assert table_row(out, "Negative") == ["10", "50.0%"]
    assert table_row(out, "Mixed") == ["1", "5.0%"]
    totals = [line.split() for line in out.splitlines() if line.strip().startswith("Total")]
    assert totals == [["Total", "20", "100.0%", "4", "5", "10", "1"]] * 2 + [["Total", "20", "100.0%"]]
    # Labels outside the taxonomy are marked and explained.
    assert "Warranty Claim *" in out and "Mixed *" in out
    assert out.rstrip().endswith("* not in the taxonomy (TAXONOMY_FILE)")


def test_csv_is_one_long_table_whose_sections_sum_to_the_total(results, capsys):
    code, out, err = run_report(capsys, "--format", "csv")

    assert code == report.EXIT_OK, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["section", "row", "column", "count"]
    assert rows[0] == {"section": "total", "row": "", "column": "", "count": "20"}
    sections = Counter(row["section"] for row in rows)
    assert sections == {"total": 1, "by_intent": 13, "by_topic": 11, "by_sentiment": 4, "intent_by_sentiment": 13 * 4,
                        "topic_by_sentiment": 11 * 4, "intent_by_topic": 13 * 11, "skipped_no_customer_turn": 1}
    assert rows[-1] == {"section": "skipped_no_customer_turn", "row": "", "column": "", "count": "0"}
    sums: Counter[str] = Counter()
    for row in rows[:-1]:
        sums[row["section"]] += int(row["count"])
    assert set(sums.values()) == {20}
    cells = {(row["section"], row["row"], row["column"]): int(row["count"]) for row in rows}
    assert cells["by_intent", "Warranty Claim", ""] == 2
    assert cells["by_intent", "Cancellation", ""] == 0
    assert cells["intent_by_sentiment", "Complaint", "Negative"] == 3
    assert cells["topic_by_sentiment", "Product Quality", "Negative"] == 2
    assert cells["intent_by_topic", "Refund Request", "Orders/Returns"] == 1
    # Sections in taxonomy order, the same order as the JSON report.
    assert [row["row"] for row in rows if row["section"] == "by_topic"] == list(EXPECTED_BY_TOPIC)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def test_chart_is_a_real_png(results, tmp_path, capsys):
    chart = tmp_path / "report.png"
    code, out, err = run_report(capsys, "--format", "json", "--chart", str(chart))

    assert code == report.EXIT_OK, err
    assert json.loads(out)["total"] == 20  # stdout stays machine-readable
    assert err == f"chart written to {chart}\n"
    data = chart.read_bytes()
    width, height = png_size(data)
    assert len(data) > 20_000
    assert width >= 1000 and height >= 800

    from matplotlib import image

    pixels = image.imread(str(chart))
    assert pixels.shape[:2] == (height, width)
    # Not a blank canvas: the sentiment colours are drawn (green, grey and red bars).
    colours = {tuple(round(float(c) * 255) for c in pixel[:3]) for pixel in pixels.reshape(-1, pixels.shape[2])[::7]}
    assert {(0x2E, 0x9E, 0x57), (0x9A, 0xA0, 0xA6), (0xD1, 0x45, 0x3B)} <= colours


def test_chart_usage_errors(report_env, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--chart", str(tmp_path / "report.jpg")])
    assert exit_info.value.code == report.EXIT_USAGE
    assert "must be a .png file name" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        report.main(["--chart", str(tmp_path / "missing" / "report.png")])
    assert exit_info.value.code == report.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err

    # A folder named like the chart: it cannot be written, and nothing is printed on stdout.
    (tmp_path / "taken.png").mkdir()
    code, out, err = run_report(capsys, "--chart", str(tmp_path / "taken.png"))
    assert code == report.EXIT_USAGE
    assert out == ""
    assert err.startswith(f"error: cannot write the chart {tmp_path / 'taken.png'}: ")
    assert err.splitlines()[1] == "  Choose a writable file with --chart."


# --- empty reports and errors -----------------------------------------------------------------


def test_empty_collection_says_so_and_exits_0(report_env, mongo_db, mongo_db_name, capsys):
    code, out, err = run_report(capsys)

    assert code == report.EXIT_OK
    assert err == f"no results yet in {mongo_db_name}.{RESULTS}: run python batch_processor.py first\n"
    assert out.splitlines()[0] == f"0 results in {mongo_db_name}.{RESULTS}"

    data = json_report(capsys)
    assert data["total"] == 0
    assert data["processed_at"] == {"first": None, "last": None}
    assert list(data["by_intent"]) == INTENTS and set(data["by_intent"].values()) == {0}
    assert list(data["by_sentiment"]) == SENTIMENTS
    assert data["unknown_labels"] == {"intent": [], "topic": [], "sentiment": []}


def test_unknown_job_lists_the_latest_jobs(results, mongo_db_name, capsys):
    code, out, err = run_report(capsys, "--format", "csv", "--job", "batch_19990101_000000")

    assert code == report.EXIT_OK
    assert out.splitlines()[:2] == ["section,row,column,count", "total,,,0"]
    assert err == (f"no results for batch job 'batch_19990101_000000' in {mongo_db_name}.{RESULTS} "
                   f"(latest jobs: {JOB_B}, {JOB_A})\n")


def test_bad_taxonomy_is_a_config_error(report_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TAXONOMY_FILE", str(tmp_path / "nowhere.json"))

    code, out, err = run_report(capsys)

    assert code == report.EXIT_CONFIG == 3
    assert out == ""
    assert err == f"error: Taxonomy file not found: {tmp_path / 'nowhere.json'}\n  Check TAXONOMY_FILE.\n"


def test_failing_aggregation_exits_1_in_one_line(results, mongo_db, mongo_db_name, capsys):
    mongo_db.client.admin.command({
        "configureFailPoint": "failCommand", "mode": {"times": 1},
        "data": {"failCommands": ["aggregate"], "errorCode": 13, "appName": report.APP_NAME},
    })
    try:
        code, out, err = run_report(capsys, "--format", "json")
    finally:
        mongo_db.client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    assert code == report.EXIT_FAILURE == 1
    assert out == ""
    assert err.startswith(f"error: MongoDB aggregation on {mongo_db_name}.{RESULTS} failed: ")
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_unreachable_mongodb_exits_4_with_the_password_redacted(report_env, monkeypatch, capsys):
    uri = f"mongodb://user:pass-8Rvt@127.0.0.1:{free_port()}/"  # made-up credentials
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", uri)
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "500")

    code, out, err = run_report(capsys, "--format", "json")

    assert code == report.EXIT_UNAVAILABLE == 4
    assert out == ""
    assert err.startswith(f"error: Cannot reach MongoDB at {uri.replace('pass-8Rvt', '***')}")
    assert "8Rvt" not in err
    assert err.splitlines()[1].startswith("  Start MongoDB, or set MONGODB_CONNECTION_STRING")
    assert len(err.splitlines()) == 2
    assert "8Rvt" not in out + err
    assert "Traceback" not in err


def test_script_runs_as_a_subprocess_from_another_folder(mongo_uri, mongo_db, mongo_db_name, tmp_path):
    mongo_db[RESULTS].insert_many(known_results())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
           "MONGODB_CONNECTION_STRING": mongo_uri, "MONGODB_DATABASE_NAME": mongo_db_name,
           "MONGODB_TIMEOUT_MS": "5000"}

    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--format", "json", "--job", JOB_A, "--chart", "chart.png"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == report.EXIT_OK, result.stderr
    assert result.stderr == "chart written to chart.png\n"
    data = json.loads(result.stdout)
    assert (data["total"], data["batch_job_id"]) == (14, JOB_A)
    assert png_size((tmp_path / "chart.png").read_bytes())[0] >= 1000


def test_conversations_skipped_for_no_customer_turn_are_counted_apart(results, mongo_db, capsys):
    mongo_db["conversation_set"].insert_many([
        {"conversation_number": "s1", "status": "skipped", "error_type": "no_customer_turn", "last_job_id": "job_a"},
        {"conversation_number": "s2", "status": "skipped", "error_type": "no_customer_turn", "last_job_id": "job_b"},
        {"conversation_number": "p1", "status": "processed"},
    ])
    data = json_report(capsys)
    assert (data["total"], data["skipped_no_customer_turn"]) == (20, 2)
    code, out, _ = run_report(capsys)
    assert code == report.EXIT_OK
    assert "2 conversations skipped apart: no customer turn" in out
    code, out, _ = run_report(capsys, "--format", "csv", "--job", "job_a")
    assert out.strip().splitlines()[-1] == "skipped_no_customer_turn,,,1"


def test_results_needing_review_are_counted(report_env, mongo_db, capsys):
    docs = [result_document(i, "Order Status", "Shipping/Delivery", "Neutral", JOB_A, START_A) for i in range(5)]
    for doc in docs[:2]:
        doc["classification"].update(confidence={"intent": 0.3, "topic": 0.9, "sentiment": 0.8}, needs_review=True)
    docs[2]["classification"].update(confidence={"intent": 0.9, "topic": 0.9, "sentiment": 0.8}, needs_review=False)
    mongo_db[RESULTS].insert_many(docs)

    assert json_report(capsys)["needs_review"] == 2
    code, out, _ = run_report(capsys)
    assert code == report.EXIT_OK
    header = " ".join(out.split())  # the console may wrap the header line
    assert "5 results" in header and "2 need review" in header


def test_reviewed_labels_win_and_stale_reviews_do_not(report_env, mongo_db, capsys):
    docs = [result_document(i, "Order Status", "Shipping/Delivery", "Neutral", JOB_A, START_A) for i in range(4)]
    for i, doc in enumerate(docs):
        doc["content_hash"] = f"sha256:{i}"
    # A reviewer corrected two intents; the second review was made before the text changed (stale).
    docs[0]["review"] = {"labels": {"intent": "Complaint"}, "by": "alice", "content_hash": "sha256:0"}
    docs[1]["review"] = {"labels": {"intent": "Complaint"}, "by": "alice", "content_hash": "sha256:old"}
    mongo_db[RESULTS].insert_many(docs)

    data = json_report(capsys)
    assert data["by_intent"]["Complaint"] == 1 and data["by_intent"]["Order Status"] == 3
    assert data["by_topic"]["Shipping/Delivery"] == 4  # fields nobody reviewed stay the model's
    assert data["intent_by_sentiment"]["Complaint"]["Neutral"] == 1
