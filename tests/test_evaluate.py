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
