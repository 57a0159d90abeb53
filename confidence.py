"""Per-label confidence from token log-probabilities (pure functions, no I/O).

For each label field of the taxonomy (intent, topic, sentiment, ...: the caller passes every field's
labels): the probability of the chosen label among the labels the field allows, read where the model
wrote the label. What real servers return makes this
more than "the probability of the first token" (measured on llama.cpp with this project's prompt):

* log-probabilities are the model's *before* the schema's grammar filtered them, so the top tokens
  include labels that are not allowed (that mass is dropped, and kept as ``allowed_share``);
* one label's mass is split across spellings (``Negative`` 0.40 + ``Ne`` 0.11 + ``Neg`` 0.01):
  every alternative that is a prefix of exactly one allowed label counts for that label;
* short prefixes are shared (``C``: Complaint / Cancellation / Change Request; ``Ne``: Neutral /
  Negative). On the path the model took, the next token's alternatives say how the shared prefix
  splits (recursively); a shared prefix off that path is split in proportion to what its labels
  already got at that position (evenly if nothing), since the server showed no more;
* the result is renormalised over the allowed labels. The chosen token's probability alone is
  never the answer: with ``Positive`` 0.41 chosen against ``Negative`` 0.52 in three spellings,
  the confidence of Positive is 0.44, not 0.41 (and not 1.0, which the grammar would suggest).

A log-probability no model gives (above 0, NaN, infinite, not a number) where a label is read
makes that label's confidence unknown (None), never an error: the answer was paid for, and its
labels stand without it. ``-inf`` is a probability of 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llm_wrapper import TokenLogprob

#: Log-probabilities up to this much above 0 are rounding (servers send 1e-7 for a certain token).
_ROUNDING = 1e-4


class _Unreadable(Exception):
    """A log-probability that is not one: the confidence of the label being read is unknown."""


def _probability(logprob: object) -> float:
    """``exp(logprob)``, or :class:`_Unreadable` for anything that is not a log-probability."""
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        raise _Unreadable
    try:
        value = float(logprob)
    except OverflowError:  # an integer of hundreds of digits
        raise _Unreadable from None
    if math.isnan(value) or value > _ROUNDING:  # +inf included; exp(1000) would overflow
        raise _Unreadable
    return min(1.0, math.exp(value))


@dataclass(frozen=True)
class LabelConfidence:
    label: str
    #: P(label | allowed labels), in [0, 1].
    confidence: float
    #: Probability mass, at the label's first token, of alternatives that lead to an allowed label:
    #: low means the model wanted to write something the taxonomy does not have.
    allowed_share: float


def _value_start(text: str, key: str | int) -> int | None:
    """Offset of the first character of a string value in the generated JSON text: ``key``'s in an
    object, or the one at position ``key`` (an int) of the first array."""
    if isinstance(key, int):
        return _element_start(text, key)
    match = re.search(rf'(?<!\\)"{re.escape(key)}"\s*:\s*"', text)
    return match.end() if match else None


#: The characters that matter when walking JSON text: the rest are skipped by the regex, not one by one in Python.
_STRUCTURE = re.compile(r'[\\"\[\]{},]')


def _element_start(text: str, index: int) -> int | None:
    """Offset of the first character of the string at position ``index`` of the first JSON array in ``text``."""
    at = text.find("[")
    if at == -1:
        return None
    depth, element, in_string, escaped_until = 0, 0, False, -1
    for match in _STRUCTURE.finditer(text, at):
        i = match.start()
        if i < escaped_until:  # the character after a backslash
            continue
        ch = text[i]
        if in_string:
            if ch == "\\":
                escaped_until = i + 2
            elif ch == '"':
                in_string = False
        elif ch == '"':
            if depth == 1 and element == index:
                return i + 1
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return None
        elif ch == "," and depth == 1:
            element += 1
    return None


def _after_lead(text: str, lead: str) -> str | None:
    """What an alternative token adds to the value, given the chosen token began with ``lead``
    (e.g. the opening quote); None when the alternative does not continue the same JSON."""
    if text.startswith(lead):
        return text[len(lead) :]
    stripped_text, stripped_lead = text.lstrip(), lead.lstrip()
    if stripped_text.startswith(stripped_lead):
        return stripped_text[len(stripped_lead) :]
    if stripped_lead.startswith(stripped_text):
        return ""  # e.g. only the quote: any label may follow
    return None


def _matches(value: str, candidates: Sequence[str]) -> list[str]:
    """Labels ``value`` (the value text so far, maybe with its closing quote) can still become."""
    if '"' in value:
        name = value[: value.index('"')]
        return [c for c in candidates if c == name]
    return [c for c in candidates if c.startswith(value)]


def _distribution(
    tokens: Sequence[TokenLogprob], index: int, consumed: str, lead: str, candidates: Sequence[str]
) -> tuple[dict[str, float], float] | None:
    """P(label) over ``candidates`` at token ``index``, and the allowed share; None without evidence."""
    entry = tokens[index]
    alternatives = dict(entry.top)
    alternatives.setdefault(entry.token, entry.logprob)  # the chosen token may lie outside the top N
    mass = dict.fromkeys(candidates, 0.0)
    shared: list[tuple[float, list[str]]] = []
    allowed = 0.0
    for text, logprob in alternatives.items():
        p = _probability(logprob)
        rest = _after_lead(text, lead) if lead else text
        if rest is None:
            continue
        matches = _matches(consumed + rest, candidates)
        if not matches:
            continue
        allowed += p
        if len(matches) == 1:
            mass[matches[0]] += p
        elif text == entry.token and rest and index + 1 < len(tokens):
            below = _distribution(tokens, index + 1, consumed + rest, "", matches)
            if below is None:
                shared.append((p, matches))
            else:
                for label, q in below[0].items():
                    mass[label] += p * q
        else:
            shared.append((p, matches))
    evidence = dict(mass)
    for p, matches in shared:
        base = sum(evidence[label] for label in matches)
        for label in matches:
            mass[label] += p * (evidence[label] / base if base > 0 else 1 / len(matches))
    total = sum(mass.values())
    if total <= 0:
        return None
    return {label: m / total for label, m in mass.items()}, allowed


@dataclass(frozen=True)
class Joined:
    """The generated text and where each token starts in it: worked out once per answer, read per label."""

    text: str
    starts: tuple[int, ...]


def join_tokens(tokens: Sequence[TokenLogprob]) -> Joined:
    starts, offset = [], 0
    for token in tokens:
        starts.append(offset)
        offset += len(token.token)
    return Joined("".join(token.token for token in tokens), tuple(starts))


def label_confidence(
    tokens: Sequence[TokenLogprob], key: str | int, allowed: Sequence[str], joined: Joined | None = None
) -> LabelConfidence | None:
    """The confidence of the label written for ``key`` (an object's key, or a position in an array answer);
    None when it cannot be read from ``tokens`` (no such key, a label outside ``allowed``, no probability
    on any allowed label, or a log-probability that is not one where the label was read). ``joined``:
    :func:`join_tokens` of ``tokens``, when the caller reads several labels of one answer."""
    if joined is None:
        joined = join_tokens(tokens)
    text, starts = joined.text, joined.starts
    start = _value_start(text, key)
    if start is None:
        return None
    end = text.find('"', start)
    chosen = text[start:end] if end != -1 else None
    if chosen is None or chosen not in allowed:
        return None
    index = next(i for i in range(len(tokens)) if starts[i] <= start < starts[i] + len(tokens[i].token))
    try:
        result = _distribution(tokens, index, "", text[starts[index] : start], allowed)
    except _Unreadable:
        return None
    if result is None:
        return None
    distribution, allowed_share = result
    return LabelConfidence(chosen, distribution[chosen], min(1.0, allowed_share))
