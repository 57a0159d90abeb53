"""Label confidences from token log-probabilities: known log-probabilities -> known confidence.

The unit tests feed token streams shaped like llama.cpp's (pre-grammar alternatives, labels split
across spellings, shared prefixes); the end-to-end tests script the fake servers' log-probabilities
and read the confidence back from the API and from both providers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import requests

from aggregator import validate_conversation
from classifier import ConversationClassifier
from confidence import label_confidence
from config import Settings
from fakes.ollama import FakeOllama, Reply
from llm_wrapper import TokenLogprob
from tests.test_llm_providers import TRANSPORTS, Server, run, server  # noqa: F401 - the fixture

SENTIMENTS = ["Positive", "Neutral", "Negative"]
INTENTS = ["Order Status", "Complaint", "Cancellation", "Change Request", "Other"]
LN = math.log


def tok(token: str, p: float = 1.0, **alternatives: float) -> TokenLogprob:
    """A token chosen with probability ``p`` and its alternatives (name -> probability)."""
    top = [(token, LN(p))] + [(text, LN(q)) for text, q in alternatives.items()]
    return TokenLogprob(token, LN(p), tuple(top))


def alts(token: str, p: float, pairs: list[tuple[str, float]]) -> TokenLogprob:
    return TokenLogprob(token, LN(p), tuple([(token, LN(p))] + [(t, LN(q)) for t, q in pairs]))


def stream(*middle: TokenLogprob, key: str = "sentiment") -> list[TokenLogprob]:
    return [tok('{"'), tok(key), tok('":'), tok(' "'), *middle, tok('"}')]


def test_a_certain_label_is_one() -> None:
    found = label_confidence(stream(tok("Neutral")), "sentiment", SENTIMENTS)
    assert found is not None
    assert found.label == "Neutral" and found.confidence == pytest.approx(1.0) and found.allowed_share == 1.0


def test_mass_split_across_spellings_is_summed_and_shared_prefixes_follow_the_evidence() -> None:
    # As measured on llama.cpp: Positive 0.41 chosen; Negative 0.40 + Ne 0.11 + Neg 0.01.
    # "Ne" is shared by Neutral and Negative, off the chosen path: it goes with the evidence
    # at this position (all Negative), so P(Positive) = 0.41 / (0.41 + 0.52).
    tokens = stream(alts("Positive", 0.41, [("Negative", 0.40), ("Ne", 0.11), ("Neg", 0.01)]))
    found = label_confidence(tokens, "sentiment", SENTIMENTS)
    assert found is not None and found.label == "Positive"
    assert found.confidence == pytest.approx(0.41 / 0.93)
    assert found.allowed_share == pytest.approx(0.93)


def test_labels_outside_the_taxonomy_are_dropped_and_show_in_the_allowed_share() -> None:
    # Pre-grammar alternatives: "Mixed" and "Angry" are not allowed labels.
    tokens = stream(alts("Negative", 0.5, [("Positive", 0.1), ("Mixed", 0.3), ("Angry", 0.1)]))
    found = label_confidence(tokens, "sentiment", SENTIMENTS)
    assert found is not None
    assert found.confidence == pytest.approx(0.5 / 0.6)
    assert found.allowed_share == pytest.approx(0.6)


def test_a_shared_prefix_on_the_chosen_path_is_split_by_the_next_token() -> None:
    # "C" (0.6) then "omplaint" (0.5 of it) vs "ancellation" (0.3) vs "hange Request" (0.2);
    # "Order Status" 0.4 at the first token.
    tokens = stream(
        alts("C", 0.6, [("Order", 0.4)]),
        alts("omplaint", 0.5, [("ancellation", 0.3), ("hange", 0.2)]),
        key="intent",
    )
    found = label_confidence(tokens, "intent", INTENTS)
    assert found is not None and found.label == "Complaint"
    assert found.confidence == pytest.approx(0.6 * 0.5)
    assert found.allowed_share == pytest.approx(1.0)
    other = label_confidence(
        stream(alts("Order", 0.4, [("C", 0.6)]), tok(" Status"), key="intent"), "intent", INTENTS
    )
    # "C" off the path, no evidence for its labels at that position: split evenly; Order stays 0.4.
    assert other is not None and other.confidence == pytest.approx(0.4)


def test_the_quote_inside_the_label_token() -> None:
    # Tokenisers often glue the opening quote to the label: ' "Negative' vs ' "Ne' vs ' "Positive'.
    tokens = [tok('{"sentiment":'), alts(' "Negative', 0.7, [(' "Positive', 0.2), (' "', 0.1)]), tok('"}')]
    found = label_confidence(tokens, "sentiment", SENTIMENTS)
    assert found is not None and found.label == "Negative"
    # ' "' alone could lead anywhere: split like the evidence (0.7 : 0.2), so the share is unchanged.
    assert found.confidence == pytest.approx(0.7 / 0.9)


def test_the_chosen_token_outside_the_top_alternatives_still_counts() -> None:
    # Grammar-constrained sampling can pick a token the model ranked below the top N.
    token = TokenLogprob("Neutral", LN(0.05), ((("Mixed"), LN(0.6)), ("Negative", LN(0.15))))
    found = label_confidence(stream(token), "sentiment", SENTIMENTS)
    assert found is not None
    assert found.confidence == pytest.approx(0.05 / 0.20)


@pytest.mark.parametrize(
    "tokens",
    [
        [tok('{"intent": "Order Status"}')],  # no sentiment key
        stream(tok("Mixed")),  # a label outside the taxonomy
        stream(tok("neutral")),  # not the taxonomy's spelling: nothing to match the alternatives with
    ],
)
def test_no_confidence_when_it_cannot_be_read(tokens: list[TokenLogprob]) -> None:
    assert label_confidence(tokens, "sentiment", SENTIMENTS) is None


def test_no_logprobs_no_confidence() -> None:
    assert label_confidence([], "sentiment", SENTIMENTS) is None
    assert label_confidence([], 2, SENTIMENTS) is None


def test_a_label_in_an_array_answer_is_found_by_its_position() -> None:
    """The array answer has no keys: the label is the string at the field's position (commas and
    escaped quotes inside the categorization do not shift it)."""
    tokens = [tok('["'), tok('Says \\"hi, there\\", ok'), tok('","'), tok("Order"), tok('","'),
              TokenLogprob("Ne", math.log(0.5), (("Ne", math.log(0.5)), ("Pos", math.log(0.3)))),
              tok("gative"), tok('"]')]
    found = label_confidence(tokens, 2, SENTIMENTS)
    assert found is not None and found.label == "Negative"
    assert found.confidence == pytest.approx(0.5 / 0.8 * 1.0)  # Ne: Neutral or Negative, split by what follows
    assert label_confidence(tokens, 1, ["Order", "Refund"]).label == "Order"  # type: ignore[union-attr]
    assert label_confidence(tokens, 3, SENTIMENTS) is None  # no fourth value


# --- through the pipeline, with the fakes ---------------------------------------------------


def scripted_answer(sentiment_token: TokenLogprob, sentiment: str) -> Reply:
    """A full answer whose sentiment token carries the given alternatives; all else is certain."""
    head = '{"categorization": "Customer asks about an order", "intent": "Order Status", ' \
           '"topic": "Shipping/Delivery", "sentiment": "'
    content = head + sentiment + '"}'
    entries = [{"token": head, "logprob": 0.0, "top_logprobs": [{"token": head, "logprob": 0.0}]},
               {"token": sentiment_token.token, "logprob": sentiment_token.logprob,
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in sentiment_token.top]},
               {"token": '"}', "logprob": 0.0, "top_logprobs": [{"token": '"}', "logprob": 0.0}]}]
    return Reply(content=content, logprobs=entries)


POSITIVE_041 = alts("Positive", 0.41, [("Negative", 0.40), ("Ne", 0.11), ("Neg", 0.01)])


def classify_once(settings: Settings, transport: str) -> Any:
    """One conversation classified through a fresh client of ``transport``; its classification."""
    classifier = ConversationClassifier.from_settings(settings)
    conversation = validate_conversation({"conversation_number": "7", "messages": [
        {"sender": "customer", "text": "Where is my order?"}]})
    if transport == "sync":
        outcome = run(transport, settings, lambda client: classifier.classify(conversation, client))
    else:
        outcome = run(transport, settings, lambda client: classifier.classify_async(conversation, client))
    return outcome.classification


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("threshold, review", [(0.0, False), (0.4, False), (0.5, True)])
def test_known_logprobs_give_known_confidence_with_both_providers(
    server: Server, transport: str, threshold: float, review: bool  # noqa: F811
) -> None:
    settings = server.settings(confidence_threshold=threshold)
    server.fake.enqueue(scripted_answer(POSITIVE_041, "Positive"))
    classification = classify_once(settings, transport)
    assert classification.sentiment == "Positive"
    assert classification.confidence is not None
    assert classification.confidence == {
        "intent": 1.0, "topic": 1.0, "sentiment": round(0.41 / 0.93, 4)
    }
    assert classification.needs_review is review  # the label is kept either way


def test_api_answer_carries_the_confidence(
    make_settings: Callable[..., Settings], start_api: Callable[[Settings], Any], fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(confidence_threshold=0.5))
    fake_ollama.enqueue(scripted_answer(POSITIVE_041, "Positive"))
    body = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Thanks, all good now!"}]}
    response = requests.post(f"{api.url}/classify", json=body, timeout=10)
    assert response.status_code == 200, response.text
    classification = response.json()["classification"]
    assert classification["sentiment"] == "Positive"
    assert classification["confidence"] == {"intent": 1.0, "topic": 1.0, "sentiment": 0.4409}
    assert classification["needs_review"] is True


def test_a_server_without_logprobs_gives_null(
    make_settings: Callable[..., Settings], start_api: Callable[[Settings], Any], fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings(llm_top_logprobs=0, confidence_threshold=0.9))
    body = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my parcel?"}]}
    response = requests.post(f"{api.url}/classify", json=body, timeout=10)
    assert response.status_code == 200, response.text
    classification = response.json()["classification"]
    assert classification["confidence"] is None
    assert classification["needs_review"] is False  # unknown is not "below"
    assert json.loads(json.dumps(classification))["intent"]


# --- garbage from the server: no confidence for that field, never an error ----------------------

#: Log-probabilities no model gives: above 0 (a probability above 1; exp(1000) overflows), NaN,
#: infinity, and values of other types (a TokenLogprob is built from whatever JSON said).
GARBAGE = {"1000": 1000.0, "0.5": 0.5, "NaN": math.nan, "infinity": math.inf, "a string": "-0.1",
           "null": None, "true": True, "a 400-digit integer": 10**400}


def _garbage_at_the_label(value: Any, *, in_alternatives: bool) -> list[TokenLogprob]:
    if in_alternatives:  # the chosen token is sane, one alternative is not
        label = TokenLogprob("Positive", LN(0.6), (("Positive", LN(0.6)), ("Negative", value)))
    else:
        label = TokenLogprob("Positive", value, (("Positive", value), ("Negative", LN(0.3))))
    return [tok('{"intent": "Complaint", "sentiment": "'), label, tok('"}')]


@pytest.mark.parametrize("in_alternatives", [False, True], ids=["chosen", "alternative"])
@pytest.mark.parametrize("value", list(GARBAGE.values()), ids=list(GARBAGE))
def test_a_garbage_logprob_gives_no_confidence_for_its_field_only(value: Any, in_alternatives: bool) -> None:
    tokens = _garbage_at_the_label(value, in_alternatives=in_alternatives)
    assert label_confidence(tokens, "sentiment", SENTIMENTS) is None
    intent = label_confidence(tokens, "intent", INTENTS)
    assert intent is not None and intent.confidence == pytest.approx(1.0)


def test_minus_infinity_is_a_probability_of_zero() -> None:
    tokens = stream(TokenLogprob("Positive", LN(0.6), (("Positive", LN(0.6)), ("Negative", -math.inf))))
    found = label_confidence(tokens, "sentiment", SENTIMENTS)
    assert found is not None and found.confidence == pytest.approx(1.0) and found.allowed_share == pytest.approx(0.6)


def _garbage_answer(value: Any) -> Reply:
    """A full answer whose sentiment token carries ``value`` as its log-probability (as JSON sends it)."""
    head = '{"categorization": "Customer asks about an order", "intent": "Order Status", ' \
           '"topic": "Shipping/Delivery", "sentiment": "'
    entries = [{"token": head, "logprob": 0.0, "top_logprobs": [{"token": head, "logprob": 0.0}]},
               {"token": "Negative", "logprob": value,
                "top_logprobs": [{"token": "Negative", "logprob": value}, {"token": "Positive", "logprob": -2.0}]},
               {"token": '"}', "logprob": 0.0, "top_logprobs": [{"token": '"}', "logprob": 0.0}]}]
    return Reply(content=head + 'Negative"}', logprobs=entries)


#: What a server can send (JSON: json.dumps writes NaN and Infinity as Python reads them back).
WIRE_GARBAGE = {"1000": (1000, "sentiment"), "NaN": (math.nan, "sentiment"), "Infinity": (math.inf, "sentiment"),
                "'1e999'": ("1e999", "sentiment"), "a 400-digit integer": (10**400, "all"),
                "a word": ("certain", "all"), "an object": ({"value": -0.1}, "all")}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(WIRE_GARBAGE), ids=list(WIRE_GARBAGE))
def test_garbage_logprobs_from_either_provider_never_fail_the_classification(
    server: Server, transport: str, case: str  # noqa: F811
) -> None:
    value, lost = WIRE_GARBAGE[case]
    settings = server.settings(confidence_threshold=0.5)
    server.fake.enqueue(_garbage_answer(value))
    classification = classify_once(settings, transport)
    assert classification.sentiment == "Negative"  # the label is kept
    if lost == "all":  # a log-probability that is not a number at all: the server's list is unreadable
        assert classification.confidence is None
    else:
        assert classification.confidence is not None
        # dict(): the confidence is a model here, a plain mapping once fields come from the taxonomy.
        assert dict(classification.confidence) == {"intent": 1.0, "topic": 1.0, "sentiment": None}
    assert classification.needs_review is False  # unknown is not "below"


def test_the_api_answers_200_for_a_logprob_of_1000(
    make_settings: Callable[..., Settings], start_api: Callable[[Settings], Any], fake_ollama: FakeOllama
) -> None:
    api = start_api(make_settings())
    fake_ollama.enqueue(_garbage_answer(1000), _garbage_answer(math.nan))
    body = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my parcel?"}]}
    for _ in range(2):
        response = requests.post(f"{api.url}/classify", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["classification"]["confidence"] == {"intent": 1.0, "topic": 1.0, "sentiment": None}
