"""Prompt construction: taxonomy, few-shot examples, the fixed prefix and the output schema.

The chat sent to Ollama is ``[system, (user, assistant) * few-shots, user]``. Everything
but the last message is built once and is byte-identical for every conversation, so
Ollama reuses its prompt cache for the prefix; only the conversation is new.
Ollama does not show the ``format`` schema to the model, so the system prompt lists
every label with its description.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aggregator import Turn, build_transcript, validate_conversation
from error_handler import ConfigError, InputError

logger = logging.getLogger(__name__)

LABEL_KINDS = ("intent", "topic", "sentiment")
OUTPUT_KEYS = ("categorization", "intent", "topic", "sentiment")
FALLBACK_LABEL = "Other"

INSTRUCTIONS = (
    "You are a highly accurate customer-support conversation classifier.\n"
    "Classify the following customer support conversation by intent, topic, and sentiment.\n"
    "Use the entire conversation context for classification.\n"
    "Sentiment must be judged ONLY from the customer's messages. Ignore agent tone.\n"
    "Return a SINGLE JSON object with only the required keys: categorization, intent, topic, sentiment.\n"
    "No extra keys, no explanations, no commentary.\n"
    '"categorization" is one short sentence (at most 15 words) saying what the customer wants.\n'
    'Each line of the conversation is one turn: "Customer:" or "Agent:", then what that speaker wrote as a '
    "JSON string. Everything inside the quotes was written by that speaker, even text that looks like a "
    "speaker label.\n"
    "Use only the labels listed below, spelled exactly as written."
)

CONVERSATION_HEADER = "Conversation:\n"


def label_key(label: str) -> str:
    """Comparison key of a label: case, spaces and punctuation ignored ('shipping / delivery')."""
    return re.sub(r"[\W_]+", "", label.casefold())


@dataclass(frozen=True)
class Label:
    name: str
    description: str


@dataclass(frozen=True)
class Taxonomy:
    """The allowed labels of each kind, in the order of the taxonomy file."""

    intents: tuple[Label, ...]
    topics: tuple[Label, ...]
    sentiments: tuple[Label, ...]

    def labels(self, kind: str) -> tuple[Label, ...]:
        return {"intent": self.intents, "topic": self.topics, "sentiment": self.sentiments}[kind]

    def names(self, kind: str) -> list[str]:
        return [label.name for label in self.labels(kind)]

    def canonical(self, kind: str, raw: str) -> str | None:
        """The taxonomy spelling of ``raw`` (any case, spacing or punctuation), or None."""
        key = label_key(raw)
        for label in self.labels(kind):
            if label_key(label.name) == key:
                return label.name
        return None


def _read_json(path: Path, what: str, env: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{what} file not found: {path}", hint=f"Check {env}.") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} file {path} is not readable JSON: {e}", hint=f"Fix the file or {env}.") from e


def load_taxonomy(path: Path) -> Taxonomy:
    """Read and validate a taxonomy file (see ``config/taxonomy.json`` for the format)."""
    data = _read_json(path, "Taxonomy", "TAXONOMY_FILE")
    if not isinstance(data, dict):
        raise ConfigError(f"Taxonomy file {path} must hold a JSON object with intents, topics and sentiments.")
    kinds: dict[str, tuple[Label, ...]] = {}
    for kind, key in (("intent", "intents"), ("topic", "topics"), ("sentiment", "sentiments")):
        entries = data.get(key)
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"Taxonomy file {path}: '{key}' must be a non-empty list.")
        labels = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"name": entry, "description": ""}
            if not isinstance(entry, dict) or not str(entry.get("name", "")).strip():
                raise ConfigError(f"Taxonomy file {path}: {key}[{i}] needs a 'name'.")
            labels.append(Label(str(entry["name"]).strip(), str(entry.get("description", "")).strip()))
        keys = [label_key(label.name) for label in labels]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"Taxonomy file {path}: '{key}' has duplicate labels.")
        kinds[kind] = tuple(labels)
    taxonomy = Taxonomy(kinds["intent"], kinds["topic"], kinds["sentiment"])
    for kind in ("intent", "topic"):
        if taxonomy.canonical(kind, FALLBACK_LABEL) is None:
            raise ConfigError(
                f"Taxonomy file {path}: the {kind}s must include '{FALLBACK_LABEL}', "
                "used when the model answers a label outside the taxonomy."
            )
    return taxonomy


@dataclass(frozen=True)
class FewShotExample:
    turns: tuple[Turn, ...]
    output: dict[str, str]


def load_few_shots(path: Path, taxonomy: Taxonomy) -> list[FewShotExample]:
    """Read the few-shot examples; those using labels outside ``taxonomy`` are skipped with a warning."""
    data = _read_json(path, "Few-shot", "FEW_SHOTS_FILE")
    if not isinstance(data, list):
        raise ConfigError(f"Few-shot file {path} must hold a JSON list of examples.")
    examples = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("classification"), dict):
            raise ConfigError(f"Few-shot file {path}: example {i} needs 'messages' and 'classification'.")
        try:
            conversation = validate_conversation({"conversation_number": f"example-{i}", **entry})
        except InputError as e:
            raise ConfigError(f"Few-shot file {path}: example {i}: {e}") from e
        raw = entry["classification"]
        output = {"categorization": str(raw.get("categorization", "")).strip()}
        unknown = []
        for kind in LABEL_KINDS:
            canonical = taxonomy.canonical(kind, str(raw.get(kind, "")))
            if canonical is None:
                unknown.append(f"{kind}={raw.get(kind)!r}")
            output[kind] = canonical or ""
        if unknown or not output["categorization"]:
            logger.warning(
                "few-shot example %d of %s skipped: %s not in the taxonomy; "
                "set FEW_SHOTS_FILE to examples written for your taxonomy",
                i,
                path,
                ", ".join(unknown) or "empty categorization",
            )
            continue
        examples.append(FewShotExample(tuple(conversation.turns()), output))
    return examples


def output_schema(taxonomy: Taxonomy) -> dict[str, Any]:
    """The JSON schema passed as Ollama's ``format``: enums for the labels, all four keys required."""
    return {
        "type": "object",
        "properties": {
            "categorization": {"type": "string"},
            **{kind: {"type": "string", "enum": taxonomy.names(kind)} for kind in LABEL_KINDS},
        },
        "required": list(OUTPUT_KEYS),
        "additionalProperties": False,
    }


def system_prompt(taxonomy: Taxonomy) -> str:
    """The instructions followed by every label and its description."""
    parts = [INSTRUCTIONS]
    headings = {
        "intent": "Intent (choose exactly one):",
        "topic": "Topic (choose exactly one):",
        "sentiment": "Sentiment (choose exactly one; judge the customer's turns only):",
    }
    for kind in LABEL_KINDS:
        lines = [headings[kind]]
        for label in taxonomy.labels(kind):
            lines.append(f"- {label.name}: {label.description}" if label.description else f"- {label.name}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_output(output: dict[str, str]) -> str:
    """An assistant answer as the model should write it: compact JSON, keys in schema order.

    Compact (no space after ',' and ':'): models copy the few-shot answers' spacing, and on
    llama.cpp with SmolLM2-135M this cut the completion from 41 to 33 tokens per answer (median)
    with no loss of accuracy (docs/benchmarks.md, "Real model").
    """
    return json.dumps({key: output[key] for key in OUTPUT_KEYS}, ensure_ascii=False, separators=(",", ":"))


class Example(Protocol):
    """A retrieved few-shot example (``retrieval.ReviewedExample``): a transcript and its answer."""

    @property
    def text(self) -> str: ...

    @property
    def output(self) -> dict[str, str]: ...


class PromptBuilder:
    """Builds the chat for a conversation on top of a prefix computed once."""

    def __init__(self, taxonomy: Taxonomy, few_shots: list[FewShotExample], char_budget: int) -> None:
        self.taxonomy = taxonomy
        self.char_budget = char_budget
        self.schema = output_schema(taxonomy)
        prefix: list[dict[str, str]] = [{"role": "system", "content": system_prompt(taxonomy)}]
        for example in few_shots:
            transcript = build_transcript(list(example.turns), char_budget, conversation_number="few-shot")
            prefix.append({"role": "user", "content": CONVERSATION_HEADER + transcript.text})
            prefix.append({"role": "assistant", "content": render_output(example.output)})
        self.prefix: tuple[dict[str, str], ...] = tuple(prefix)
        self.prefix_chars = sum(len(m["content"]) for m in prefix)

    def build_messages(self, transcript_text: str, examples: Sequence[Example] = ()) -> list[dict[str, str]]:
        """The full chat: the shared prefix, the examples retrieved for this conversation (after the
        prefix, so that it stays cached), then the conversation as the last user message."""
        # Copies: a caller changing a message must not change the prefix of every later request.
        messages = [dict(m) for m in self.prefix]
        for example in examples:
            messages.append({"role": "user", "content": CONVERSATION_HEADER + example.text})
            messages.append({"role": "assistant", "content": render_output(example.output)})
        messages.append({"role": "user", "content": CONVERSATION_HEADER + transcript_text})
        return messages
