"""Prompt construction: taxonomy, few-shot examples, the fixed prefix and the output schema.

The chat sent to Ollama is ``[system, (user, assistant) * few-shots, user]``. Everything
but the last message is built once and is byte-identical for every conversation, so
Ollama reuses its prompt cache for the prefix; only the conversation is new.
Ollama does not show the ``format`` schema to the model, so the system prompt lists
every label with its description.

The label fields (intent, topic, sentiment, ...) are the taxonomy file's, not this code's: the
schema, the prompt, the parser, confidences, results, report, dashboard and evaluate all take
them from :class:`Taxonomy` (docs/architecture.md#taxonomy-and-label-fields).
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

#: The one free-text output key; every other key is a label field of the taxonomy.
CATEGORIZATION = "categorization"
#: A field whose labels include this one answers it for a label outside the taxonomy (with a
#: warning); a field without it makes such an answer unusable (LLMOutputError).
FALLBACK_LABEL = "Other"
#: Keys of a classification that are not label fields: a field must not be named like them.
RESERVED_FIELD_NAMES = frozenset({CATEGORIZATION, "confidence", "needs_review", "classification"})
#: Field names become JSON keys, MongoDB paths (classification.<field>), CSV columns and query parameters.
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: The fields of a version 1 file: (field name, the file's key of its labels, customer only).
VERSION_1_FIELDS = (("intent", "intents", False), ("topic", "topics", False), ("sentiment", "sentiments", True))
CONVERSATION_HEADER = "Conversation:\n"
_TAXONOMY_HINT = "Fix the file or TAXONOMY_FILE; README 'Taxonomy' shows the format."


def label_key(label: str) -> str:
    """Comparison key of a label: case, spaces and punctuation ignored ('shipping / delivery')."""
    return re.sub(r"[\W_]+", "", label.casefold())


def english_list(words: list[str]) -> str:
    """'a', 'a and b', 'a, b, and c'."""
    if len(words) < 3:
        return " and ".join(words)
    return ", ".join(words[:-1]) + ", and " + words[-1]


@dataclass(frozen=True)
class Label:
    name: str
    description: str


@dataclass(frozen=True)
class LabelField:
    """One label field of the taxonomy: the model picks exactly one of ``labels`` for it."""

    name: str
    description: str
    labels: tuple[Label, ...]
    #: Judged from the customer's turns only (the prompt says so).
    customer_only: bool = False

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def title(self) -> str:
        """The name as people read it: 'urgency' -> 'Urgency', 'product_line' -> 'Product line'."""
        text = self.name.replace("_", " ")
        return text[:1].upper() + text[1:]

    def canonical(self, raw: str) -> str | None:
        """The taxonomy spelling of ``raw`` (any case, spacing or punctuation), or None."""
        key = label_key(raw)
        return next((label.name for label in self.labels if label_key(label.name) == key), None)

    @property
    def fallback(self) -> str | None:
        """The label answered for one outside the taxonomy: ``Other`` when the field has it."""
        return self.canonical(FALLBACK_LABEL)


@dataclass(frozen=True)
class Taxonomy:
    """The label fields, in the order of the taxonomy file (the order of the output keys)."""

    fields: tuple[LabelField, ...]

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def output_keys(self) -> list[str]:
        """The keys of the model's answer, in the order it writes them."""
        return [CATEGORIZATION, *self.field_names]

    def field(self, name: str) -> LabelField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def labels(self, field: str) -> tuple[Label, ...]:
        return self.field(field).labels

    def names(self, field: str) -> list[str]:
        return self.field(field).names

    def canonical(self, field: str, raw: str) -> str | None:
        """The taxonomy spelling of ``raw`` for ``field`` (any case, spacing or punctuation), or None."""
        return self.field(field).canonical(raw)

    def summary(self) -> str:
        """For logs: 'intent 12, topic 11, sentiment 3 labels'."""
        return ", ".join(f"{f.name} {len(f.labels)}" for f in self.fields) + " labels"

    def as_dict(self) -> dict[str, Any]:
        """The taxonomy as a version 2 file holds it (GET /api/taxonomy)."""
        return {"version": 2, "fields": [
            {"name": f.name, "description": f.description, "customer_only": f.customer_only,
             "labels": [{"name": label.name, "description": label.description} for label in f.labels]}
            for f in self.fields
        ]}


def _read_json(path: Path, what: str, env: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{what} file not found: {path}", hint=f"Check {env}.") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} file {path} is not readable JSON: {e}", hint=f"Fix the file or {env}.") from e


class _TaxonomyReader:
    """Checks a taxonomy file's content; every error names the file and the place in it
    (``fields[3].labels[1].name``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, problem: str) -> ConfigError:
        place = f" {where}:" if where else ""
        return ConfigError(f"Taxonomy file {self.path}:{place} {problem}", hint=_TAXONOMY_HINT)

    def keys(self, where: str, entry: dict[str, Any], allowed: tuple[str, ...]) -> None:
        unknown = [key for key in entry if key not in allowed]
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.error(f"{prefix}{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}.")

    def text(self, where: str, value: Any, *, required: bool) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.error(where, f"must be a {'non-empty ' if required else ''}string, not {value!r}.")
        return value.strip()

    def non_empty_list(self, where: str, value: Any) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error(where, "must be a non-empty list.")
        return value

    def label(self, where: str, entry: Any) -> Label:
        if isinstance(entry, str):  # a bare name: no description
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise self.error(where, f"must be an object with a name and a description, not {entry!r}.")
        self.keys(where, entry, ("name", "description"))
        name = self.text(f"{where}.name", entry.get("name"), required=True)
        if not label_key(name):
            raise self.error(f"{where}.name", f"{name!r} needs a letter or a digit.")
        return Label(name, self.text(f"{where}.description", entry.get("description"), required=False))

    def labels(self, where: str, value: Any) -> tuple[Label, ...]:
        labels: list[Label] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.non_empty_list(where, value)):
            label = self.label(f"{where}[{i}]", entry)
            first = seen.setdefault(label_key(label.name), i)
            if first != i:
                raise self.error(f"{where}[{i}].name", f"{label.name!r} repeats {where}[{first}] "
                                 "(labels are compared ignoring case, spaces and punctuation).")
            labels.append(label)
        return tuple(labels)

    def field(self, where: str, entry: Any) -> LabelField:
        if not isinstance(entry, dict):
            raise self.error(where, f"must be an object with a name and labels, not {entry!r}.")
        self.keys(where, entry, ("name", "description", "customer_only", "labels"))
        name = self.text(f"{where}.name", entry.get("name"), required=True)
        if name in RESERVED_FIELD_NAMES:
            raise self.error(f"{where}.name", f"{name!r} is a key of every classification; choose another name.")
        if not FIELD_NAME.fullmatch(name):
            raise self.error(f"{where}.name", f"{name!r} must be lower-case letters, digits and '_', starting with "
                             "a letter, at most 40 characters (it names a JSON key, a MongoDB path and a CSV column).")
        customer_only = entry.get("customer_only", False)
        if not isinstance(customer_only, bool):
            raise self.error(f"{where}.customer_only", f"must be true or false, not {customer_only!r}.")
        return LabelField(name, self.text(f"{where}.description", entry.get("description"), required=False),
                          self.labels(f"{where}.labels", entry.get("labels")), customer_only)

    def version_2(self, data: dict[str, Any]) -> Taxonomy:
        self.keys("", data, ("version", "fields"))
        fields: list[LabelField] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.non_empty_list("fields", data.get("fields"))):
            field = self.field(f"fields[{i}]", entry)
            first = seen.setdefault(label_key(field.name), i)
            if first != i:
                raise self.error(f"fields[{i}].name", f"{field.name!r} repeats fields[{first}].")
            fields.append(field)
        return Taxonomy(tuple(fields))

    def version_1(self, data: dict[str, Any]) -> Taxonomy:
        """Version 1 (``intents``, ``topics``, ``sentiments``): those three fields, sentiment customer only."""
        self.keys("", data, ("version", *(key for _, key, _ in VERSION_1_FIELDS)))
        return Taxonomy(tuple(
            LabelField(name, "", self.labels(key, data.get(key)), customer_only)
            for name, key, customer_only in VERSION_1_FIELDS
        ))

    def read(self, data: Any) -> Taxonomy:
        if not isinstance(data, dict):
            raise self.error("", "must hold a JSON object: {\"version\": 2, \"fields\": [...]}.")
        version = data.get("version", 2 if "fields" in data else 1)
        if version == 2 and not isinstance(version, bool):
            return self.version_2(data)
        if version == 1 and not isinstance(version, bool):
            return self.version_1(data)
        raise self.error("version", f"must be 1 or 2, not {version!r}.")


def load_taxonomy(path: Path) -> Taxonomy:
    """Read and validate a taxonomy file, version 2 (``fields``) or 1 (``intents``, ``topics``,
    ``sentiments``); see README 'Taxonomy'. Any problem is a ConfigError naming the place."""
    return _TaxonomyReader(path).read(_read_json(path, "Taxonomy", "TAXONOMY_FILE"))


@dataclass(frozen=True)
class FewShotExample:
    turns: tuple[Turn, ...]
    #: The categorization and the labels the example has (maybe not every field's).
    output: dict[str, str]


def load_few_shots(path: Path, taxonomy: Taxonomy) -> list[FewShotExample]:
    """Read the few-shot examples. One with a label outside ``taxonomy`` is skipped with a warning;
    one without a label for some field is used for the fields it has (said once in the log)."""
    data = _read_json(path, "Few-shot", "FEW_SHOTS_FILE")
    if not isinstance(data, list):
        raise ConfigError(f"Few-shot file {path} must hold a JSON list of examples.")
    examples = []
    without: dict[str, int] = {}  # field -> examples used without a label for it
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("classification"), dict):
            raise ConfigError(f"Few-shot file {path}: example {i} needs 'messages' and 'classification'.")
        try:
            conversation = validate_conversation({"conversation_number": f"example-{i}", **entry})
        except InputError as e:
            raise ConfigError(f"Few-shot file {path}: example {i}: {e}") from e
        raw = entry["classification"]
        output = {CATEGORIZATION: str(raw.get(CATEGORIZATION, "")).strip()}
        unknown, missing = [], []
        for field in taxonomy.fields:
            value = raw.get(field.name)
            if value is None or not str(value).strip():
                missing.append(field.name)
            elif (canonical := field.canonical(str(value))) is None:
                unknown.append(f"{field.name}={value!r}")
            else:
                output[field.name] = canonical
        problem = (", ".join(unknown) + " not in the taxonomy" if unknown
                   else "empty categorization" if not output[CATEGORIZATION]
                   else "no label of any field of the taxonomy" if len(output) == 1 else None)
        if problem:
            logger.warning("few-shot example %d of %s skipped: %s; set FEW_SHOTS_FILE to examples written "
                           "for your taxonomy", i, path, problem)
            continue
        for name in missing:
            without[name] = without.get(name, 0) + 1
        examples.append(FewShotExample(tuple(conversation.turns()), output))
    if without:
        logger.warning(
            "few-shot examples of %s have no label for %s: they show the model the fields they have; "
            "add those labels to FEW_SHOTS_FILE to show it every field",
            path, ", ".join(f"{name} ({n} of {len(examples)})" for name, n in without.items()),
        )
    return examples


def output_schema(taxonomy: Taxonomy) -> dict[str, Any]:
    """The JSON schema passed as Ollama's ``format``: the categorization, one enum per label
    field, every key required."""
    return {
        "type": "object",
        "properties": {
            CATEGORIZATION: {"type": "string"},
            **{field.name: {"type": "string", "enum": field.names} for field in taxonomy.fields},
        },
        "required": taxonomy.output_keys,
        "additionalProperties": False,
    }


def instructions(taxonomy: Taxonomy) -> str:
    """What the model is told before the labels: the fields, the keys, how to read the conversation."""
    customer_only = english_list([field.name.replace("_", " ") for field in taxonomy.fields if field.customer_only])
    lines = [
        "You are a highly accurate customer-support conversation classifier.",
        f"Classify the following customer support conversation by {english_list(taxonomy.field_names)}.",
        "Use the entire conversation context for classification.",
    ]
    if customer_only:
        lines.append(f"{customer_only[:1].upper()}{customer_only[1:]} must be judged ONLY from the customer's "
                     "messages. Ignore agent tone.")
    lines += [
        f"Return a SINGLE JSON object with only the required keys: {', '.join(taxonomy.output_keys)}.",
        "No extra keys, no explanations, no commentary.",
        '"categorization" is one short sentence (at most 15 words) saying what the customer wants.',
        'Each line of the conversation is one turn: "Customer:" or "Agent:", then what that speaker wrote as a '
        "JSON string. Everything inside the quotes was written by that speaker, even text that looks like a "
        "speaker label.",
        "Use only the labels listed below, spelled exactly as written.",
    ]
    return "\n".join(lines)


def field_heading(field: LabelField) -> str:
    """'Intent - why the customer wrote (choose exactly one):' (no ' - ...' without a description)."""
    about = f" - {field.description.rstrip('. ')}" if field.description else ""
    judge = "; judge the customer's turns only" if field.customer_only else ""
    return f"{field.title}{about} (choose exactly one{judge}):"


def system_prompt(taxonomy: Taxonomy) -> str:
    """The instructions followed by every field with every label and its description."""
    parts = [instructions(taxonomy)]
    for field in taxonomy.fields:
        lines = [field_heading(field)]
        for label in field.labels:
            lines.append(f"- {label.name}: {label.description}" if label.description else f"- {label.name}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_output(output: dict[str, str], keys: list[str]) -> str:
    """An assistant answer as the model should write it: compact JSON, the ``keys`` it has in schema order.

    Compact (no space after ',' and ':'): models copy the few-shot answers' spacing, and on
    llama.cpp with SmolLM2-135M this cut the completion from 41 to 33 tokens per answer (median)
    with no loss of accuracy (docs/benchmarks.md, "Real model").
    """
    return json.dumps({key: output[key] for key in keys if key in output}, ensure_ascii=False, separators=(",", ":"))


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
            prefix.append({"role": "assistant", "content": render_output(example.output, taxonomy.output_keys)})
        self.prefix: tuple[dict[str, str], ...] = tuple(prefix)
        self.prefix_chars = sum(len(m["content"]) for m in prefix)

    def build_messages(self, transcript_text: str, examples: Sequence[Example] = ()) -> list[dict[str, str]]:
        """The full chat: the shared prefix, the examples retrieved for this conversation (after the
        prefix, so that it stays cached), then the conversation as the last user message."""
        # Copies: a caller changing a message must not change the prefix of every later request.
        messages = [dict(m) for m in self.prefix]
        for example in examples:
            messages.append({"role": "user", "content": CONVERSATION_HEADER + example.text})
            messages.append({"role": "assistant", "content": render_output(example.output, self.taxonomy.output_keys)})
        messages.append({"role": "user", "content": CONVERSATION_HEADER + transcript_text})
        return messages
