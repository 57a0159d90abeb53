"""scripts/evaluate.py and the labelled set it ships with (data/labelled_conversations.json)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from aggregator import ConversationIn
from prompt_builder import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "data" / "labelled_conversations.json"
TAXONOMY = ROOT / "config" / "taxonomy.json"


# --- the labelled set ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    return json.loads(LABELLED.read_text(encoding="utf-8"))


def test_labelled_set_covers_every_label_of_the_taxonomy(labelled: list[dict]) -> None:
    taxonomy = load_taxonomy(TAXONOMY)
    assert len(labelled) >= 90
    for kind in ("intent", "topic"):
        counts = Counter(item["expected"][kind] for item in labelled)
        assert set(counts) <= set(taxonomy.names(kind)), f"{kind} labels outside the taxonomy"
        too_few = {name: counts[name] for name in taxonomy.names(kind) if counts[name] < 3}
        assert not too_few, f"{kind} labels with fewer than 3 conversations: {too_few}"
    sentiments = Counter(item["expected"]["sentiment"] for item in labelled)
    assert set(sentiments) == set(taxonomy.names("sentiment"))
    # A realistic mix: no sentiment missing or dominant (support traffic leans neutral/negative).
    for name, count in sentiments.items():
        assert 0.1 <= count / len(labelled) <= 0.6, (name, count)


def test_labelled_items_are_classify_bodies_with_a_customer_turn(labelled: list[dict]) -> None:
    numbers = [item["conversation_number"] for item in labelled]
    assert len(set(numbers)) == len(numbers), "conversation numbers repeat"
    sources = Counter("messages" if "messages" in item else "tweets" for item in labelled)
    assert sources["messages"] > 0 and sources["tweets"] > 0  # both shapes of the API are exercised
    for item in labelled:
        conversation = ConversationIn.model_validate(item)
        assert any(turn.role == "customer" for turn in conversation.turns()), item["conversation_number"]
        assert set(item["expected"]) == {"intent", "topic", "sentiment"}
        assert isinstance(item.get("note", ""), str)


def test_labelled_set_holds_hard_cases_with_notes(labelled: list[dict]) -> None:
    notes = " ".join(item.get("note", "") for item in labelled).lower()
    for case in ("sarcas", "mixed sentiment", "ends grateful", "off-topic"):
        assert case in notes, case


# --- metrics against hand-computed values -----------------------------------------------------

from fakes.ollama import FakeOllama, Reply  # noqa: E402
from tests.net_helpers import closed_port_url  # noqa: E402
from tests.scripts import load_script  # noqa: E402

evaluate = load_script("evaluate")

# Taxonomy order B, A, E, C, D. E is in neither list; C is expected but never predicted;
# D is predicted but never expected.
TAXONOMY_ORDER = ["B", "A", "E", "C", "D"]
EXPECTED = ["A", "A", "B", "B", "C"]
PREDICTED = ["A", "B", "B", "D", "A"]


def test_field_metrics_match_hand_computed_values() -> None:
    metrics = evaluate.field_metrics(EXPECTED, PREDICTED, TAXONOMY_ORDER)
    assert metrics["n"] == 5
    assert metrics["accuracy"] == 0.4  # 2 of 5 right
    # A: tp 1, fp 1, fn 1; B: tp 1, fp 1, fn 1; C: tp 0, fn 1, never predicted; D: fp 1, never expected.
    assert metrics["per_label"] == {
        "B": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "A": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "C": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "D": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    # Averaged over B, A, C, D (present in expected or predicted), not E: (0.5 + 0.5 + 0 + 0) / 4.
    assert metrics["macro_f1"] == 0.25
    assert metrics["confusion"] == {
        "labels": ["B", "A", "C", "D"],  # rows expected, columns predicted, taxonomy order
        "matrix": [[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
    }
    assert "calibration" not in metrics  # no confidences, no calibration


def test_labels_outside_the_taxonomy_follow_the_known_ones() -> None:
    assert evaluate.label_order(["A", "Zed"], ["Yak", "B"], TAXONOMY_ORDER) == ["B", "A", "Yak", "Zed"]


def test_calibration_buckets_hold_hand_computed_accuracy() -> None:
    confidences = [0.95, 0.9, 0.3, None, 1.0]  # right, wrong, right, (no confidence), wrong
    expected = ["A", "A", "B", "B", "C"]
    predicted = ["A", "B", "B", "D", "A"]
    metrics = evaluate.field_metrics(expected, predicted, TAXONOMY_ORDER, confidences)
    assert metrics["calibration"] == [
        {"range": [0.2, 0.4], "n": 1, "accuracy": 1.0, "mean_confidence": 0.3},
        {"range": [0.8, 1.0], "n": 3, "accuracy": 0.3333, "mean_confidence": 0.95},
    ]


# --- reading labelled files ------------------------------------------------------------------


def _taxonomy():
    return load_taxonomy(TAXONOMY)


def _item(text: str, **expected: str) -> dict:
    return {"messages": [{"sender": "customer", "text": text}], "expected": expected}


def test_json_list_items_are_read_malformed_ones_named_and_off_taxonomy_labels_counted_apart(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([
        _item("Where is my parcel?", intent="order status", sentiment="Neutral"),  # any case, like the API
        {"messages": [], "expected": {"intent": "Complaint"}},
        _item("Hello", intent="Small Talk", topic="Other"),
        "just a string",
        {"messages": [{"sender": "customer", "text": "hi"}]},
        _item("x", intnet="Complaint"),
    ]))
    labelled = evaluate.load_labelled(path, _taxonomy())
    assert [(i.where, i.expected) for i in labelled.items] == [
        ("item 1", {"intent": "Order Status", "sentiment": "Neutral"}),
        ("item 3", {"topic": "Other"}),
    ]
    assert labelled.items[0].conversation.conversation_number == "item-1"  # filled in when absent
    assert [(o.where, o.field, o.label) for o in labelled.off_taxonomy] == [("item 3", "intent", "Small Talk")]
    problems = "\n".join(labelled.malformed)
    assert problems.startswith("item 2: ")
    assert "item 4: an item must be a JSON object, not str" in problems
    assert "item 5: 'expected' must be an object" in problems
    assert "item 6: 'expected' has unknown key(s) 'intnet'" in problems


def test_json_lines_name_the_line_of_a_broken_item(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    good = json.dumps(_item("My bill doubled", intent="Billing Question"))
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    labelled = evaluate.load_labelled(path, _taxonomy())
    assert [i.where for i in labelled.items] == ["line 1", "line 4"]
    assert len(labelled.malformed) == 1 and labelled.malformed[0].startswith("line 3: not a JSON value")


def test_limit_counts_usable_items(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(["[]", *(json.dumps(_item(f"q{i}", intent="Other")) for i in range(5))]))
    labelled = evaluate.load_labelled(path, _taxonomy(), limit=2)
    assert [i.where for i in labelled.items] == ["line 2", "line 3"]


def test_csv_conversations_are_split_into_turns(tmp_path: Path) -> None:
    path = tmp_path / "set.csv"
    path.write_text(
        "Conversation,Intent,Topic,Sentiment\n"
        '"Customer: My app crashes\non start.\nAGENT: Which phone?\ncustomer:Android",Technical Support,Software/App,\n'
        '"no prefix here",Other,Other,Neutral\n'
        '"Customer: thanks!",Feedback,,Great\n'
    )
    labelled = evaluate.load_labelled(path, _taxonomy())
    first = labelled.items[0]
    assert first.body["messages"] == [
        {"sender": "customer", "text": "My app crashes\non start."},
        {"sender": "agent", "text": "Which phone?"},
        {"sender": "customer", "text": "Android"},
    ]
    assert first.expected == {"intent": "Technical Support", "topic": "Software/App"}  # empty cell: not scored
    assert labelled.malformed == ["row 2: the conversation's first line has no 'Customer:' or 'Agent:' prefix"]
    assert [(o.where, o.field, o.label) for o in labelled.off_taxonomy] == [("row 3", "sentiment", "Great")]


def test_csv_without_a_conversation_column_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "set.csv"
    path.write_text("text,intent\nhi,Other\n")
    with pytest.raises(evaluate.UsageError, match="no 'conversation' column"):
        evaluate.load_labelled(path, _taxonomy())


# --- end to end against the fake Ollama and the API ------------------------------------------

ANSWERS = {  # a word of each conversation -> the fake's answer
    "parcel": {"intent": "Order Status", "topic": "Shipping/Delivery", "sentiment": "Neutral"},
    "refund": {"intent": "Complaint", "topic": "Product Quality", "sentiment": "Negative"},
    "password": {"intent": "Account Access", "topic": "Login/Security", "sentiment": "Negative"},
}
E2E_ITEMS = [
    {"conversation_number": "e1", "messages": [{"sender": "customer", "text": "Where is my parcel?"},
                                               {"sender": "agent", "text": "On its way."}],
     "expected": {"intent": "Order Status", "topic": "Shipping/Delivery", "sentiment": "Neutral"}},
    {"conversation_number": "e2", "tweets": [{"tweet_id": 1, "author_id": "u1", "inbound": True,
                                             "created_at": "Tue Oct 31 10:00:00 +0000 2017",
                                             "text": "@Shop I want a refund for this broken kettle"}],
     "expected": {"intent": "Refund Request", "topic": "Product Quality", "sentiment": "Negative"}},
    {"conversation_number": "e3", "messages": [{"sender": "customer", "text": "I forgot my password"}],
     "expected": {"intent": "Account Access", "sentiment": "Neutral"}},
    {"conversation_number": "e4", "messages": [{"sender": "customer", "text": "garbled"}],
     "expected": {"intent": "Other"}},
    {"conversation_number": "e5", "messages": "not a list", "expected": {"intent": "Other"}},
    {"conversation_number": "e6", "messages": [{"sender": "customer", "text": "hi"}], "expected": {"intent": "Nope"}},
]


def _respond(request: dict) -> Reply:
    from fakes.ollama import last_user_content

    content = last_user_content(request)
    for word, answer in ANSWERS.items():
        if word in content:
            return Reply(json.dumps({"categorization": "scripted", **answer}))
    return Reply("I cannot classify this.")  # no JSON: the classification of e4 fails


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """The script reads its settings from the environment and ./.env: only the test's count."""
    monkeypatch.chdir(tmp_path)
    for name in ("LLM_MODEL", "OLLAMA_MODEL", "TAXONOMY_FILE", "FEW_SHOTS_FILE", "LLM_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_ENDPOINT", endpoint)


@pytest.fixture
def e2e_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ollama: FakeOllama) -> Path:
    fake_ollama.responder = _respond
    _isolate(monkeypatch, tmp_path, fake_ollama.url)
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(E2E_ITEMS))
    return path


def _check_e2e_report(report: dict) -> None:
    assert set(report) == {"n", "model", "fields", "errors", "seconds_per_item", "prompt_tokens_per_item"}
    assert report["n"] == 4 and report["errors"] == 1 and report["model"] == "llama3"
    assert isinstance(report["seconds_per_item"], float)
    assert set(report["fields"]) == {"intent", "topic", "sentiment"}
    for metrics in report["fields"].values():
        assert set(metrics) - {"calibration"} == {"n", "accuracy", "macro_f1", "per_label", "confusion"}
        for scores in metrics["per_label"].values():
            assert set(scores) == {"precision", "recall", "f1", "support"}
    intent = report["fields"]["intent"]
    # e1 right, e2 Refund Request -> Complaint, e3 right (e4 failed, e5 malformed, e6 off-taxonomy).
    assert intent["n"] == 3 and intent["accuracy"] == 0.6667
    assert intent["confusion"] == {
        "labels": ["Order Status", "Complaint", "Refund Request", "Account Access"],
        "matrix": [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
    }
    assert intent["macro_f1"] == 0.5  # (1 + 0 + 0 + 1) / 4
    assert report["fields"]["topic"]["n"] == 2 and report["fields"]["topic"]["accuracy"] == 1.0
    sentiment = report["fields"]["sentiment"]
    assert sentiment["accuracy"] == 0.6667  # e3: Neutral expected, Negative predicted
    # Neutral: e1 right, e3 missed (predicted Negative): precision 1/1, recall 1/2, F1 2/3.
    assert sentiment["per_label"]["Neutral"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}


def test_end_to_end_direct_writes_the_report_markdown_and_chart(
    e2e_file: Path, tmp_path: Path, fake_ollama: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    out, md, png = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "confusion.png"
    code = evaluate.main([str(e2e_file), "--max-concurrent", "2", "--output", str(out),
                          "--markdown", str(md), "--chart", str(png)])
    captured = capsys.readouterr()
    assert code == evaluate.EXIT_INCOMPLETE, captured.err  # one malformed item, one failed classification
    assert fake_ollama.chat_count == 4
    _check_e2e_report(json.loads(out.read_text()))
    assert "item 5: " in captured.out and "item 6: intent 'Nope'" in captured.out
    assert "item 4 (e4): llm_bad_output" in captured.out
    markdown = md.read_text()
    assert "| intent | 3 | 66.7% | 0.500 |" in markdown
    assert "| Refund Request | 0 | 1 | 0 | 0 |" in markdown  # a confusion row
    assert "item 6: intent 'Nope'" in markdown
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_end_to_end_via_the_api_gives_the_same_report(
    e2e_file: Path, tmp_path: Path, make_settings, start_api, fake_ollama: FakeOllama,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = start_api(make_settings())
    out = tmp_path / "report.json"
    assert evaluate.main([str(e2e_file), "--url", api.url + "/", "--output", str(out)]) == evaluate.EXIT_INCOMPLETE
    _check_e2e_report(json.loads(out.read_text()))
    # The API's 502 answer is named with its error type.
    assert "item 4 (e4): llm_bad_output: The model's answer holds no JSON object." in capsys.readouterr().out


def test_every_field_of_the_taxonomy_present_in_expected_is_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ollama: FakeOllama, capsys: pytest.CaptureFixture[str],
) -> None:
    """--taxonomy with a fourth field: expected.urgency (JSON) or an urgency column (CSV) is scored."""
    urgency_of = {"parcel": "Medium", "refund": "High", "password": "High"}

    def respond(request: dict) -> Reply:
        from fakes.ollama import last_user_content

        word = next(w for w in ANSWERS if w in last_user_content(request))
        return Reply(json.dumps({"categorization": "scripted", **ANSWERS[word], "urgency": urgency_of[word]}))

    fake_ollama.responder = respond
    _isolate(monkeypatch, tmp_path, fake_ollama.url)
    labelled = tmp_path / "set.json"
    labelled.write_text(json.dumps([
        {**E2E_ITEMS[0], "expected": {**E2E_ITEMS[0]["expected"], "urgency": "medium"}},  # right
        {**E2E_ITEMS[1], "expected": {**E2E_ITEMS[1]["expected"], "urgency": "Low"}},  # wrong
        E2E_ITEMS[2],  # no urgency: scored on its other fields
    ]))
    out = tmp_path / "report.json"
    taxonomy = str(ROOT / "config" / "taxonomy-urgency.example.json")
    assert evaluate.main([str(labelled), "--taxonomy", taxonomy, "--output", str(out)]) == evaluate.EXIT_OK
    report = json.loads(out.read_text())
    assert list(report["fields"]) == ["intent", "topic", "sentiment", "urgency"]
    assert (report["fields"]["urgency"]["n"], report["fields"]["urgency"]["accuracy"]) == (2, 0.5)
    assert report["fields"]["urgency"]["confusion"]["labels"] == ["Low", "Medium", "High"]
    assert report["fields"]["intent"]["n"] == 3
    assert "urgency" in capsys.readouterr().out  # the console table has its row

    csv_file = tmp_path / "set.csv"
    csv_file.write_text("conversation,intent,urgency\n\"Customer: where is my parcel\",Order Status,High\n"
                        "\"Customer: a refund please\",Refund Request,High\n")
    assert evaluate.main([str(csv_file), "--taxonomy", taxonomy, "--output", str(out)]) == evaluate.EXIT_OK
    report = json.loads(out.read_text())
    assert set(report["fields"]) == {"intent", "urgency"}
    assert report["fields"]["urgency"]["accuracy"] == 0.5  # parcel: Medium answered, High expected


def test_expected_keys_are_the_taxonomys_fields(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([_item("Where is it?", intent="Order Status", urgency="High")]))
    labelled = evaluate.load_labelled(path, _taxonomy())  # the default taxonomy has no urgency
    assert labelled.items == []
    assert labelled.malformed == ["item 1: 'expected' has unknown key(s) 'urgency': the taxonomy's fields are "
                                  "intent, topic, sentiment"]
    urgency = load_taxonomy(ROOT / "config" / "taxonomy-urgency.example.json")
    [item] = evaluate.load_labelled(path, urgency).items
    assert item.expected == {"intent": "Order Status", "urgency": "High"}


# --- bad input and unavailable servers: clear messages, exit codes ----------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = evaluate.main(argv)
    return code, capsys.readouterr().err


def test_missing_file_is_a_usage_error(e2e_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["nowhere.json"], capsys)
    assert code == 2 and "error: labelled file not found: nowhere.json" in err and "Traceback" not in err


def test_invalid_json_names_the_place(e2e_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"messages": [}\n]')
    code, err = _run([str(path)], capsys)
    assert code == 2 and "is not valid JSON" in err and "line 1 column 16" in err


def test_a_file_without_usable_items_says_why(e2e_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              fake_ollama: FakeOllama) -> None:
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"messages": [{"sender": "customer", "text": "hi"}]}) + "\n")
    code, err = _run([str(path)], capsys)
    assert code == 2 and "no usable item" in err and "line 1: 'expected' must be an object" in err
    assert fake_ollama.chat_count == 0


def test_missing_output_folder_fails_before_classifying(e2e_file: Path, capsys: pytest.CaptureFixture[str],
                                                        fake_ollama: FakeOllama) -> None:
    code, err = _run([str(e2e_file), "--chart", "no/such/folder/c.png"], capsys)
    assert code == 2 and "the folder no/such/folder does not exist" in err
    assert fake_ollama.chat_count == 0


def test_wrong_output_suffix_is_refused(e2e_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(e2e_file), "--chart", "c.jpg"])
    assert exit_info.value.code == 2 and "must end with .png" in capsys.readouterr().err


def test_unreachable_llm_server_exits_4(e2e_file: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLM_ENDPOINT", closed_port_url())
    code, err = _run([str(e2e_file)], capsys)
    assert code == 4 and err.startswith("error: ") and "Traceback" not in err


def test_missing_model_exits_4(e2e_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([str(e2e_file), "--model", "not-pulled"], capsys)
    assert code == 4 and "not-pulled" in err


def test_unreachable_api_exits_4(e2e_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    code, err = _run([str(e2e_file), "--url", url], capsys)
    assert code == 4 and f"the API at {url} cannot be reached" in err


def test_model_with_url_is_a_usage_error(e2e_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([str(e2e_file), "--url", "http://127.0.0.1:1", "--model", "x"], capsys)
    assert code == 2 and "--model only applies to direct runs" in err


def test_bad_taxonomy_is_a_config_error(e2e_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run([str(e2e_file), "--taxonomy", str(tmp_path / "missing.json")], capsys)
    assert code == 3 and "Taxonomy file not found" in err


def _first_customer_text(item: dict) -> str:
    if "messages" in item:
        return next(m["text"] for m in item["messages"] if m["sender"] == "customer")
    return next(t["text"] for t in item["tweets"] if t["inbound"])


def test_an_oracle_scores_100_percent_on_the_labelled_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ollama: FakeOllama, labelled: list[dict]
) -> None:
    """The fake answers each conversation with its expected labels: every field must score 1.0.

    Together with the chance-level baseline of docs/quality.md, this shows that the scores come
    from the answers, and that every conversation of the set goes through the pipeline.
    """
    from fakes.ollama import last_user_content

    keys = [(" ".join(_first_customer_text(item).split()), item["expected"]) for item in labelled]

    def oracle(request: dict) -> Reply:
        content = " ".join(last_user_content(request).split())
        answer = next(expected for text, expected in keys if text in content)
        return Reply(json.dumps({"categorization": "oracle", **answer}))

    fake_ollama.responder = oracle
    _isolate(monkeypatch, tmp_path, fake_ollama.url)
    out = tmp_path / "report.json"
    assert evaluate.main([str(LABELLED), "--max-concurrent", "4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(labelled) and report["errors"] == 0
    for name in ("intent", "topic", "sentiment"):
        assert (report["fields"][name]["accuracy"], report["fields"][name]["macro_f1"]) == (1.0, 1.0), name


# --- one bad item never stops the report -------------------------------------------------------


def test_a_logprob_of_1000_for_one_item_still_gives_the_report(
    e2e_file: Path, tmp_path: Path, fake_ollama: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    def respond(request: dict) -> Reply:
        reply = _respond(request)
        if reply.content and "Order Status" in reply.content:  # e1's answer: its first token is garbage
            return Reply(reply.content, logprobs=[{"token": reply.content, "logprob": 1000.0, "top_logprobs": []}])
        return reply

    fake_ollama.responder = respond
    out = tmp_path / "report.json"
    assert evaluate.main([str(e2e_file), "--output", str(out)]) == evaluate.EXIT_INCOMPLETE, capsys.readouterr().err
    _check_e2e_report(json.loads(out.read_text()))  # e1 scored as before, without a confidence


def test_an_unexpected_error_of_one_item_is_recorded_and_the_others_classified() -> None:
    from aggregator import validate_conversation

    items = [evaluate.LabelledItem(f"item {i}", {}, validate_conversation(
        {"conversation_number": str(i), "messages": [{"sender": "customer", "text": "hi"}]}), {"intent": "Other"})
        for i in (1, 2, 3)]

    async def classify(item: object) -> dict:
        if item is items[1]:
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")
        return {"intent": "Other", "topic": "Other", "sentiment": "Neutral"}

    import asyncio

    predictions = asyncio.run(evaluate.classify_all(items, classify, 2))
    assert [p.labels is not None for p in predictions] == [True, False, True]
    assert predictions[1].error == ("unexpected_error: RecursionError: maximum recursion depth exceeded while "
                                    "decoding a JSON object")


DEEP = "[" * 100_000 + "]" * 100_000


def test_an_item_nested_too_deeply_is_named_and_the_rest_read(tmp_path: Path) -> None:
    good = json.dumps(_item("Where is my parcel?", intent="Order Status"))
    deep = '{"messages": [{"sender": "customer", "text": "hi"}], "expected": {"intent": "Other"}, "x": ' + DEEP + "}"
    listed, lines = tmp_path / "set.json", tmp_path / "set.jsonl"
    listed.write_text(f"[{good}, {deep}, {good}]")
    lines.write_text(f"{good}\n{deep}\n{good}\n")
    for path, (first, bad, last) in ((listed, ("item 1", "item 2", "item 3")), (lines, ("line 1", "line 2", "line 3"))):
        labelled = evaluate.load_labelled(path, _taxonomy())
        assert [i.where for i in labelled.items] == [first, last]
        assert len(labelled.malformed) == 1
        assert labelled.malformed[0].startswith(f"{bad}: nested too deeply to read"), labelled.malformed


def test_evaluate_with_a_deeply_nested_item_writes_the_report(
    e2e_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [json.dumps(item) for item in E2E_ITEMS]
    items.insert(1, '{"messages": [{"sender": "customer", "text": "hi"}], "expected": {"intent": "Other"}, "x": '
                 + DEEP + "}")
    e2e_file.write_text("[" + ",".join(items) + "]")
    out = tmp_path / "report.json"
    code = evaluate.main([str(e2e_file), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == evaluate.EXIT_INCOMPLETE, captured.err
    assert "Traceback" not in captured.err
    assert "item 2: nested too deeply to read" in captured.out
    assert json.loads(out.read_text())["n"] == 4
