"""Classifier: turn the model's answer into a validated classification, and the shared pipeline.

Models do not always answer with bare JSON, even with a schema: parsing tolerates code
fences, ``<think>`` blocks, prose around the object, a ``{"classification": {...}}``
wrapper, and odd case or spacing in keys and labels. Labels are normalised to the
taxonomy's spelling. Every key of the taxonomy's fields is required. A label outside the
taxonomy becomes the field's ``Other`` when the field has that label (a warning), and makes the
answer unusable (:class:`LLMOutputError`) when it has not: with the default taxonomy, an unknown
intent or topic is ``Other``, an unknown sentiment is an error.

:class:`ConversationClassifier` is the pipeline both front doors share:
aggregate -> prompt -> (sync or async) LLM call -> parse.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from aggregator import ConversationIn, Transcript, build_transcript, content_hash
from confidence import join_tokens, label_confidence
from config import Settings
from error_handler import LLMOutputError
from prompt_builder import (
    ARRAY,
    CATEGORIZATION,
    AnswerFormat,
    Example,
    LabelField,
    PromptBuilder,
    Taxonomy,
    answer_format,
    label_key,
    load_few_shots,
    load_taxonomy,
)
from retrieval import FewShotRetriever

if TYPE_CHECKING:
    from llm_wrapper import ChatResult

logger = logging.getLogger(__name__)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
MAX_CATEGORIZATION_CHARS = 300


class ChatClient(Protocol):
    """What :meth:`ConversationClassifier.classify` needs: an LLM client or a pool of them (the API).
    ``embed`` is called only with retrieved few-shot examples by embeddings (EMBEDDING_MODEL)."""

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult: ...

    def embed(self, texts: list[str]) -> list[list[float]]: ...


class AsyncChatClient(Protocol):
    """What :meth:`ConversationClassifier.classify_async` needs: a client or a pool (the batch processor)."""

    async def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> ChatResult: ...

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


Probability = Annotated[float, Field(ge=0, le=1)]


class Classification(BaseModel):
    """The labels of a conversation: ``categorization`` (free text) and one key per label field of
    the taxonomy (``intent``, ``topic``, ``sentiment`` by default), each a label of that field."""

    model_config = ConfigDict(extra="allow", defer_build=True)
    #: The label fields: field name -> label (the keys the taxonomy declares, so not declared here).
    __pydantic_extra__: dict[str, str] = Field(init=False)

    categorization: str | None = Field(
        description="A few words saying what the customer wants; null when the service runs with CATEGORIZATION=off."
    )
    confidence: dict[str, Probability | None] | None = Field(
        None,
        description="Per label field, the probability of the chosen label among the field's labels (from the "
        "model's token log-probabilities; null for a field whose confidence could not be read); null when the "
        "server gave no log-probabilities.",
    )
    needs_review: bool = Field(
        False, description="A label's confidence is below CONFIDENCE_THRESHOLD (the labels are kept)."
    )

    @property
    def labels(self) -> dict[str, str]:
        """Field name -> label, in the taxonomy's order."""
        return dict(self.__pydantic_extra__ or {})

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The stored and answered shape: the labels right after ``categorization``, as the model writes them."""
        data = super().model_dump(**kwargs)
        first = [key for key in (CATEGORIZATION, *self.labels) if key in data]
        return {**{key: data[key] for key in first}, **{k: v for k, v in data.items() if k not in first}}


def document_label_fields(schema: dict[str, Any], taxonomy: Taxonomy) -> None:
    """Name the taxonomy's fields and labels in ``Classification``'s OpenAPI ``schema`` (changed in place)."""
    properties = schema.setdefault("properties", {})
    for field in taxonomy.fields:
        properties[field.name] = {
            "type": "string", "enum": field.names, "title": field.title,
            "description": field.description or f"A label of the taxonomy's field {field.name!r}.",
        }
    required = schema.setdefault("required", [])
    required.extend(name for name in taxonomy.field_names if name not in required)


def with_confidence(
    classification: Classification, chat: ChatResult, answer: AnswerFormat, threshold: float
) -> Classification:
    """``classification`` with its label confidences and ``needs_review`` (below ``threshold``)."""
    if not chat.logprobs:
        return classification
    values: dict[str, float | None] = {}
    joined = join_tokens(chat.logprobs)
    for field in answer.taxonomy.fields:
        # Read where the model wrote the label's code: at its position in the array, or under its short key;
        # else its name under the field's name (a server that ignored the schema).
        where = answer.names.index(field.name) if answer.shape == ARRAY else answer.keys[field.name]
        found = (label_confidence(chat.logprobs, where, list(answer.codes(field).values()), joined)
                 or label_confidence(chat.logprobs, field.name, field.names, joined))
        values[field.name] = round(found.confidence, 4) if found is not None else None
    # A label whose confidence could not be read is not "below" the threshold: it is unknown.
    needs_review = threshold > 0 and any(v is not None and v < threshold for v in values.values())
    return classification.model_copy(update={"confidence": values, "needs_review": needs_review})


def _preview(content: str, limit: int = 120) -> str:
    text = " ".join(content.split())
    return text if len(text) <= limit else text[:limit] + "…"


def extract_json_object(content: str, keys: list[str] | None = None, *, arrays: bool = False) -> Any:
    """The first JSON object in ``content`` that looks like a classification (has one of ``keys``,
    the answer's keys, or a ``classification`` key), else the first JSON object; with ``arrays``, a
    JSON array of strings (the array answer) looks like one too.

    Skips ``<think>`` blocks, code fences and prose; raises :class:`LLMOutputError`
    when there is none.
    """
    text = _THINK_BLOCK.sub("", content)
    wanted = {"classification", *(label_key(k) for k in keys or [CATEGORIZATION])}
    starts = "{[" if arrays else "{"
    decoder = json.JSONDecoder()
    first_object: dict[str, Any] | None = None
    position = _find_any(text, starts, 0)
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position = _find_any(text, starts, position + 1)
            continue
        except RecursionError as e:
            # Nested past the interpreter's limit: every later "{" of the run is nested as deep, so
            # scanning on would only repeat the failure (quadratic). An unusable answer, not a 500.
            raise LLMOutputError(
                "The model's answer holds no JSON object that can be read (nested too deeply).",
                answer=_preview(content),
            ) from e
        if isinstance(value, dict):
            if {label_key(k) for k in value} & wanted:
                return value
            first_object = first_object or value
        elif value and all(isinstance(v, str) for v in value):
            return value
        position = _find_any(text, starts, end)
    if first_object is not None:
        return first_object
    raise LLMOutputError("The model's answer holds no JSON object.", answer=_preview(content))


def _find_any(text: str, characters: str, start: int) -> int:
    """The first position at or after ``start`` of any of ``characters``, -1 when there is none."""
    found = [at for at in (text.find(c, start) for c in characters) if at != -1]
    return min(found, default=-1)


def parse_classification(
    content: str, spec: AnswerFormat | Taxonomy, *, conversation_number: str = "?"
) -> Classification:
    """Parse and validate the model's answer, written in ``spec``'s format (an array, or an object with
    short keys or whole names; a taxonomy: its default format)."""
    answer = answer_format(spec)
    value = extract_json_object(content, [*answer.keys.values(), *answer.names], arrays=answer.shape == ARRAY)
    if isinstance(value, dict):
        value = next((v for k, v in value.items() if label_key(str(k)) == "classification"), value)
    if isinstance(value, list) and len(value) != len(answer.names):
        raise LLMOutputError(f"The model's answer is unusable: {len(value)} values where {len(answer.names)} belong "
                             f"({', '.join(answer.names)}).", answer=_preview(content))
    found = answer.values(value)

    values: dict[str, Any] = {}
    for name in answer.names:
        item = found.get(name)
        if isinstance(item, list) and len(item) == 1:
            item = item[0]
        if not isinstance(item, str) or not item.strip():
            problem = "is missing" if item is None else f"is not a non-empty string ({item!r})"
            where = answer.describe(name, keyed=isinstance(value, dict))
            raise LLMOutputError(f"The model's answer is unusable: {where} {problem}.", answer=_preview(content))
        values[name] = item.strip()

    for field in answer.taxonomy.fields:
        values[field.name] = _normalised_label(answer, field, values[field.name], content, conversation_number)
    values[CATEGORIZATION] = _categorization(found[CATEGORIZATION], answer) if answer.categorization else None
    return Classification(**values)


def _categorization(raw: str, answer: AnswerFormat) -> str:
    """Whitespace collapsed; cut at a word with ``…`` when it reached the schema's bound (the grammar then
    closed it, most likely in the middle of a word) or is longer than any categorization should be."""
    text = " ".join(raw.split())
    limit = answer.categorization_max_chars
    if limit and len(raw) >= limit:
        head = text[:limit]
        return (head.rsplit(" ", 1)[0] if " " in head else head).rstrip(" ,;:-") + "…"
    if len(text) > MAX_CATEGORIZATION_CHARS:
        return text[: MAX_CATEGORIZATION_CHARS - 1] + "…"
    return text


def _normalised_label(answer: AnswerFormat, field: LabelField, raw: str, content: str, conversation_number: str) -> str:
    """The label ``raw`` (a code, or a label in any spelling) stands for, in the taxonomy's spelling; outside
    the taxonomy, the field's ``Other`` (a warning), or :class:`LLMOutputError` for a field without ``Other``."""
    canonical = answer.label(field, raw)
    if canonical is not None:
        return canonical
    if field.fallback is None:
        raise LLMOutputError(
            f"The model's answer is unusable: {field.name} {raw!r} is not one of {field.names}.",
            answer=_preview(content),
        )
    logger.warning("conversation %s: %s %r is not in the taxonomy; using %r",
                   conversation_number, field.name, raw, field.fallback)
    return field.fallback


@dataclass(frozen=True)
class PreparedConversation:
    """A conversation ready for the LLM: the chat messages and the transcript they carry."""

    conversation_number: str
    messages: list[dict[str, str]]
    transcript: Transcript


@dataclass(frozen=True)
class ClassificationOutcome:
    classification: Classification
    chat: ChatResult
    transcript: Transcript
    duration_ms: int


class ConversationClassifier:
    """The shared pipeline: builds the prompt for a conversation and reads the model's answer.

    With a ``retriever`` (FEW_SHOT_SOURCE reviewed or both), each prompt also carries the reviewed
    conversations most similar to this one, after the fixed prefix (retrieval.py).
    """

    def __init__(self, taxonomy: Taxonomy, prompt_builder: PromptBuilder, *, confidence_threshold: float = 0.0,
                 retriever: FewShotRetriever | None = None) -> None:
        self.taxonomy = taxonomy
        self.prompt_builder = prompt_builder
        self.answer = prompt_builder.answer
        self.confidence_threshold = confidence_threshold
        self.retriever = retriever

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversationClassifier:
        """Load the taxonomy and few-shot files named by ``settings`` (raises ConfigError)."""
        taxonomy = load_taxonomy(settings.taxonomy_file)
        answer = AnswerFormat(taxonomy, settings.categorization, settings.categorization_max_chars,
                              settings.answer_format)
        # FEW_SHOT_SOURCE=reviewed: the reviewed examples replace the file's; both: they follow them.
        static = load_few_shots(settings.few_shots_file, taxonomy) if settings.few_shot_source != "reviewed" else []
        retriever = FewShotRetriever(settings) if settings.few_shot_source != "static" else None
        return cls(
            taxonomy,
            PromptBuilder(taxonomy, static, settings.conversation_char_budget, answer),
            confidence_threshold=settings.confidence_threshold,
            retriever=retriever,
        )

    @property
    def schema(self) -> dict[str, Any]:
        return self.prompt_builder.schema

    def transcript(self, conversation: ConversationIn) -> Transcript:
        transcript = build_transcript(
            conversation.turns(),
            self.prompt_builder.char_budget,
            conversation_number=conversation.conversation_number,
        )
        logger.debug("conversation %s transcript:\n%s", conversation.conversation_number, transcript.text)
        return transcript

    def prepare(self, conversation: ConversationIn, examples: Sequence[Example] = (),
                transcript: Transcript | None = None) -> PreparedConversation:
        transcript = transcript or self.transcript(conversation)
        return PreparedConversation(
            conversation.conversation_number, self.prompt_builder.build_messages(transcript.text, examples), transcript
        )

    def _finish(self, prepared: PreparedConversation, chat: ChatResult, started: float) -> ClassificationOutcome:
        number = prepared.conversation_number
        classification = parse_classification(chat.content, self.answer, conversation_number=number)
        classification = with_confidence(classification, chat, self.answer, self.confidence_threshold)
        duration_ms = int((time.perf_counter() - started) * 1000)
        logger.debug(
            "conversation %s classified in %d ms (%d turns, %d chars, prompt tokens %s, output tokens %s): "
            "%s",
            prepared.conversation_number,
            duration_ms,
            prepared.transcript.turn_count,
            len(prepared.transcript.text),
            chat.prompt_eval_count,
            chat.eval_count,
            " ".join(f"{name}={label}" for name, label in classification.labels.items()),
        )
        return ClassificationOutcome(classification, chat, prepared.transcript, duration_ms)

    def classify(self, conversation: ConversationIn, client: ChatClient) -> ClassificationOutcome:
        """Classify with the synchronous client (the API)."""
        started = time.perf_counter()
        transcript = self.transcript(conversation)
        examples: Sequence[Example] = ()
        if self.retriever is not None:
            examples = self.retriever.select(transcript.text, content_hash(conversation), client.embed)
        prepared = self.prepare(conversation, examples, transcript)
        chat = client.chat(prepared.messages, self.schema)
        return self._finish(prepared, chat, started)

    async def classify_async(self, conversation: ConversationIn, client: AsyncChatClient) -> ClassificationOutcome:
        """Classify with the asynchronous client (the batch processor)."""
        started = time.perf_counter()
        transcript = self.transcript(conversation)
        examples: Sequence[Example] = ()
        if self.retriever is not None:
            examples = await self.retriever.select_async(transcript.text, content_hash(conversation), client.embed)
        prepared = self.prepare(conversation, examples, transcript)
        chat = await client.chat(prepared.messages, self.schema)
        return self._finish(prepared, chat, started)
