"""Classifier: parsing what models really answer, label normalisation, and the shared pipeline."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator import validate_conversation
from async_llm_wrapper import AsyncLLMClient
from classifier import Classification, ConversationClassifier, extract_json_object, parse_classification
from config import CONFIG_DIR, Settings
from error_handler import ConfigError, LLMOutputError
from fakes.ollama import FakeOllama, Reply
from llm_wrapper import LLMClient
from prompt_builder import CATEGORIZATION_MAX_CHARS, AnswerFormat, Taxonomy, load_taxonomy, short_keys

TAXONOMY = load_taxonomy(CONFIG_DIR / "taxonomy.json")
URGENCY = load_taxonomy(CONFIG_DIR / "taxonomy-urgency.example.json")
GOOD = {
    "categorization": "Customer asks where the order is",
    "intent": "Order Status",
    "topic": "Shipping/Delivery",
    "sentiment": "Neutral",
}
EXPECTED = Classification(**GOOD)
#: The same answer as the schema asks for it: a compact array of the categorization and the label codes...
ARRAY = json.dumps([GOOD["categorization"], "Order", "Shipping", "Neutral"], separators=(",", ":"))
#: ... or, with ANSWER_FORMAT=object, one-letter keys.
SHORT = json.dumps({"c": GOOD["categorization"], "i": "Order", "t": "Shipping", "s": "Neutral"},
                   separators=(",", ":"))
KEYED = AnswerFormat(TAXONOMY, shape="object")


def parse(content: str, spec: AnswerFormat | Taxonomy = TAXONOMY) -> Classification:
    return parse_classification(content, spec, conversation_number="c-1")


def unusable(content: str) -> LLMOutputError:
    return unusable_with(content, TAXONOMY)


def unusable_with(content: str, spec: AnswerFormat | Taxonomy) -> LLMOutputError:
    with pytest.raises(LLMOutputError) as info:
        parse(content, spec)
    return info.value


# --- tolerated shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        json.dumps(GOOD),
        json.dumps(GOOD, indent=2),
        "```json\n" + json.dumps(GOOD) + "\n```",
        "```\n" + json.dumps(GOOD) + "\n```",
        "<think>The customer asks about {an order}. Maybe {\"intent\": \"Complaint\"}?</think>\n" + json.dumps(GOOD),
        "<THINK>\nreasoning\n</THINK>" + json.dumps(GOOD),
        "Here is the classification:\n" + json.dumps(GOOD) + "\nLet me know if you need more.",
        "Sure! {not json} " + json.dumps(GOOD),
        json.dumps({"classification": GOOD}),
        "Result: " + json.dumps({"Classification": GOOD}) + " done",
        json.dumps({"meta": {"model": "x"}}) + " and then " + json.dumps(GOOD),
    ],
)
def test_tolerated_answer_shapes(content: str) -> None:
    """A model that ignores the schema writes the fields' names: read as well as the short keys."""
    assert parse(content) == EXPECTED


def test_the_array_answer_is_read_by_position_and_its_codes_mapped_back() -> None:
    assert parse(ARRAY) == EXPECTED
    assert parse("Here: " + ARRAY.replace(",", ", ") + " (done)") == EXPECTED
    # Codes or whole labels, in any case or spacing.
    assert parse(json.dumps([GOOD["categorization"], "order status", "SHIPPING", " neutral "])) == EXPECTED
    assert parse(json.dumps({"classification": json.loads(ARRAY)})) == EXPECTED
    assert parse(ARRAY[:-1] + ',"High"]', URGENCY).labels["urgency"] == "High"
    # A value out of place is a label of the wrong field, a value too few or too many is unusable.
    assert "3 values where 4 belong (categorization, intent, topic, sentiment)" in unusable(ARRAY[:-11] + "]").message
    assert "5 values where 4 belong" in unusable(ARRAY[:-1] + ',"High"]').message
    assert "value 4 (sentiment) is not a non-empty string ('')" in unusable(ARRAY.replace("Neutral", "")).message


def test_the_short_keys_of_the_object_answer_are_mapped_back_to_the_fields() -> None:
    assert parse(SHORT, KEYED) == EXPECTED
    # Codes or whole labels, in any case or spacing.
    assert parse(json.dumps({"C": GOOD["categorization"], " I ": "order status", "t": "SHIPPING",
                             "s": "neutral"}), KEYED) == EXPECTED
    assert parse(json.dumps({"classification": json.loads(SHORT)}), KEYED) == EXPECTED
    assert "'s' (sentiment) is missing" in unusable_with(SHORT.replace('"s"', '"x"'), KEYED).message
    # A fourth field gets its own letter; a field named like another's start gets a longer key.
    assert parse(SHORT[:-1] + ',"u":"high"}', AnswerFormat(URGENCY, shape="object")).labels["urgency"] == "High"
    assert short_keys(["categorization", "intent", "topic", "tone", "tier"]) == {
        "categorization": "c", "intent": "i", "topic": "top", "tone": "ton", "tier": "ti"}
    assert short_keys(["categorization", "product", "product_line", "c"]) == {
        "categorization": "ca", "product": "product", "product_line": "product_", "c": "c"}


def test_categorization_off_reads_labels_only() -> None:
    result = parse_classification('["Order","Shipping","Neutral"]', AnswerFormat(TAXONOMY, categorization=False))
    assert result.categorization is None and result.labels == EXPECTED.labels
    assert result.model_dump()["categorization"] is None  # the key stays in results and answers
    keyed = AnswerFormat(TAXONOMY, categorization=False, shape="object")
    assert keyed.schema()["required"] == ["i", "t", "s"]
    assert parse_classification('{"i":"Order","t":"Shipping","s":"Neutral"}', keyed).labels == EXPECTED.labels


def test_keys_in_odd_case_and_labels_in_odd_case_and_spacing() -> None:
    content = json.dumps(
        {
            "Categorization": "Customer asks where the order is",
            "INTENT": "  order status ",
            " Topic ": "SHIPPING / DELIVERY",
            "sentiment": "neutral",
        }
    )
    assert parse(content) == EXPECTED


def test_single_element_lists_are_unwrapped() -> None:
    content = json.dumps({**GOOD, "intent": ["order status"]})
    assert parse(content).intent == "Order Status"


def test_categorization_whitespace_is_collapsed() -> None:
    content = json.dumps({**GOOD, "categorization": "  Customer\n asks   where\tthe order is  "})
    assert parse(content).categorization == "Customer asks where the order is"


def test_very_long_categorization_is_bounded() -> None:
    content = json.dumps({**GOOD, "categorization": "word " * 500})
    categorization = parse(content, AnswerFormat(TAXONOMY, categorization_max_chars=0)).categorization
    assert categorization is not None and len(categorization) <= 300
    assert categorization.endswith("…")


def test_a_categorization_that_reached_its_bound_is_cut_at_a_word() -> None:
    """The grammar closes the string at maxLength, most likely inside a word: shown cut, not misspelt."""
    cut = "BrightCart Hi, I ordered a desk lamp on Mo"[:CATEGORIZATION_MAX_CHARS]
    answer = json.dumps([cut, "Order", "Shipping", "Neutral"])
    assert parse(answer).categorization == "BrightCart Hi, I ordered a desk lamp…"
    assert parse(json.dumps(["x" * 60, "Order", "Shipping", "Neutral"])).categorization == "x" * 40 + "…"
    assert parse(json.dumps(["Refund, now", "Order", "Shipping", "Neutral"])).categorization == "Refund, now"


@pytest.mark.parametrize("kind", ["intent", "topic"])
def test_unknown_intent_or_topic_becomes_other_with_a_warning(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="classifier")
    result = parse(json.dumps({**GOOD, kind: "Weather Forecast"}))
    assert getattr(result, kind) == "Other"
    warnings = [r for r in caplog.records if r.name == "classifier" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "c-1" in message and "Weather Forecast" in message and "Other" in message


def test_known_labels_log_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="classifier")
    parse(json.dumps(GOOD))
    assert [r for r in caplog.records if r.name == "classifier"] == []


def test_fallback_uses_the_taxonomy_spelling_of_other(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps({"intents": ["Refund", "OTHER"], "topics": ["Billing", "other"], "sentiments": ["Good", "Bad"]}),
        encoding="utf-8",
    )
    answer = {"categorization": "x", "intent": "nope", "topic": "nope", "sentiment": "bad"}
    result = parse(json.dumps(answer), load_taxonomy(path))
    assert (result.intent, result.topic, result.sentiment) == ("OTHER", "other", "Bad")


# --- unusable answers -----------------------------------------------------------------------


def test_unknown_sentiment_is_unusable() -> None:
    error = unusable(json.dumps({**GOOD, "sentiment": "Furious"}))
    assert "sentiment 'Furious'" in error.message
    assert "Positive" in error.message  # says what was allowed


def test_the_fallback_rule_is_the_taxonomys_a_field_with_other_falls_back_else_unusable(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": 2, "fields": [
        {"name": "mood", "labels": ["Calm", "Other"]},  # has Other: falls back
        {"name": "topic", "labels": ["Billing", "Travel"]},  # no Other: unusable
    ]}), encoding="utf-8")
    taxonomy = load_taxonomy(path)
    result = parse(json.dumps({"categorization": "x", "mood": "Furious", "topic": "travel"}), taxonomy)
    assert result.labels == {"mood": "Other", "topic": "Travel"}
    with pytest.raises(LLMOutputError) as info:
        parse(json.dumps({"categorization": "x", "mood": "Calm", "topic": "Weather"}), taxonomy)
    assert "topic 'Weather' is not one of ['Billing', 'Travel']" in info.value.message


def test_a_fourth_field_is_parsed_and_required() -> None:
    result = parse(json.dumps({**GOOD, "Urgency": " HIGH "}), URGENCY)
    assert result.labels == {"intent": "Order Status", "topic": "Shipping/Delivery", "sentiment": "Neutral",
                             "urgency": "High"}
    assert result.urgency == "High"  # type: ignore[attr-defined]  # a label field is an attribute too
    assert list(result.model_dump()) == ["categorization", "intent", "topic", "sentiment", "urgency",
                                         "confidence", "needs_review"]
    with pytest.raises(LLMOutputError) as info:
        parse(json.dumps(GOOD), URGENCY)
    assert "'urgency' is missing" in info.value.message
    with pytest.raises(LLMOutputError) as info:
        parse(json.dumps({**GOOD, "urgency": "Yesterday"}), URGENCY)  # no Other among its labels
    assert "urgency 'Yesterday' is not one of ['Low', 'Medium', 'High']" in info.value.message


@pytest.mark.parametrize("key", ["categorization", "intent", "topic", "sentiment"])
def test_missing_key_is_unusable(key: str) -> None:
    answer = {k: v for k, v in GOOD.items() if k != key}
    error = unusable(json.dumps(answer))
    assert f"'{key}' is missing" in error.message  # an object where the array belonged: named by the field
    assert error.status_code == 502


@pytest.mark.parametrize("value", ["", "   ", 3, None, ["a", "b"], {"name": "Order Status"}])
def test_non_string_or_empty_label_is_unusable(value: object) -> None:
    error = unusable(json.dumps({**GOOD, "intent": value}))
    assert "'intent'" in error.message


@pytest.mark.parametrize(
    "content",
    [
        "I cannot classify this conversation.",
        "",
        "[1, 2, 3]",
        "<think>{\"intent\": \"Order Status\"}</think> no answer after thinking",
        "{\"intent\": \"Order Status\", \"topic\": ",  # cut off
        '{"intent": ' * 5000 + '"Order Status"' + "}" * 5000,  # past the recursion limit: was RecursionError
    ],
)
def test_no_json_object_is_unusable(content: str) -> None:
    with pytest.raises(LLMOutputError) as info:
        extract_json_object(content)
    assert "no JSON object" in info.value.message  # also when nested too deeply to read


def test_wrapper_without_the_keys_is_unusable() -> None:
    error = unusable(json.dumps({"classification": {"label": "Order Status"}}))
    assert "is missing" in error.message


@pytest.mark.parametrize(
    "content",
    ["My card 4111 was charged twice, says the customer.", '{"intent": "Order Status", "note": "card 4111"}'],
)
def test_the_answer_stays_out_of_the_message_that_gets_logged(content: str) -> None:
    # The model may quote the conversation; conversation text is only logged at DEBUG.
    with pytest.raises(LLMOutputError) as info:
        parse_classification(content, TAXONOMY)
    assert "4111" not in info.value.message and "4111" not in str(info.value)
    assert "4111" in info.value.details["answer"]


def test_error_carries_a_preview_of_the_answer() -> None:
    answer = {"sentiment": "Furious", **{k: v for k, v in GOOD.items() if k != "sentiment"}}
    error = unusable(json.dumps(answer) + " " + "z" * 1000)
    assert "Furious" in error.details["answer"]
    assert len(error.details["answer"]) < 200


# --- the shared pipeline --------------------------------------------------------------------

CONVERSATION = {
    "conversation_number": 501,
    "messages": [
        {"sender": "Customer", "text": "My parcel   never arrived."},
        {"sender": "AGENT", "text": "Sorry, let me check."},
    ],
}


def test_from_settings_missing_taxonomy_is_a_config_error(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError):
        ConversationClassifier.from_settings(make_settings(taxonomy_file=tmp_path / "none.json"))


def test_classify_with_the_sync_client(make_settings: Callable[..., Settings], fake_ollama: FakeOllama) -> None:
    settings = make_settings()
    classifier = ConversationClassifier.from_settings(settings)
    fake_ollama.enqueue(Reply(content="```json\n" + ARRAY.replace('"Order"', '"ORDER status"') + "\n```"))
    with LLMClient(settings) as client:
        outcome = classifier.classify(validate_conversation(CONVERSATION), client)
    assert outcome.classification.model_dump(exclude={"confidence", "needs_review"}) == EXPECTED.model_dump(
        exclude={"confidence", "needs_review"}
    )
    # "ORDER status" is not the taxonomy's spelling: its confidence cannot be read (null, not a guess).
    assert outcome.classification.confidence is not None
    assert outcome.classification.confidence == {"intent": None, "topic": 1.0, "sentiment": 1.0}
    assert outcome.transcript.text == 'Customer: "My parcel never arrived."\nAgent: "Sorry, let me check."'
    assert outcome.chat.prompt_eval_count is not None and outcome.chat.eval_count is not None
    [request] = fake_ollama.chat_requests
    assert request["messages"][-1]["content"] == "Conversation:\n" + outcome.transcript.text
    assert request["format"] == classifier.schema


async def test_classify_async_with_the_async_client(
    make_settings: Callable[..., Settings], fake_ollama: FakeOllama
) -> None:
    settings = make_settings()
    classifier = ConversationClassifier.from_settings(settings)
    fake_ollama.enqueue(Reply(content=json.dumps({"classification": GOOD})))  # a server that ignored the schema
    async with AsyncLLMClient(settings) as client:
        outcome = await classifier.classify_async(validate_conversation(CONVERSATION), client)
    assert outcome.classification == EXPECTED.model_copy(
        update={"confidence": {"intent": 1.0, "topic": 1.0, "sentiment": 1.0}}
    )
    assert fake_ollama.chat_count == 1


def test_prepare_keeps_the_prefix_for_every_conversation(make_settings: Callable[..., Settings]) -> None:
    classifier = ConversationClassifier.from_settings(make_settings())
    one = classifier.prepare(validate_conversation(CONVERSATION))
    two = classifier.prepare(
        validate_conversation({"conversation_number": "2", "messages": [{"sender": "customer", "text": "Refund me"}]})
    )
    assert json.dumps(one.messages[:-1]) == json.dumps(two.messages[:-1])
    assert one.messages[-1] != two.messages[-1]
    assert (one.conversation_number, two.conversation_number) == ("501", "2")
