"""Classifier: turn the model's answer into a validated classification, and the shared pipeline.

Models do not always answer with bare JSON, even with a schema: parsing tolerates code
fences, ``<think>`` blocks, prose around the object, a ``{"classification": {...}}``
wrapper, and odd case or spacing in keys and labels. Labels are normalised to the
taxonomy's spelling. An intent or topic outside the taxonomy becomes ``Other`` (a
warning); a missing key or an unknown sentiment makes the answer unusable.

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
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, Field

from aggregator import ConversationIn, Transcript, build_transcript, content_hash
from confidence import label_confidences
from config import Settings
from error_handler import LLMOutputError
from prompt_builder import (
    FALLBACK_LABEL,
    LABEL_KINDS,
    OUTPUT_KEYS,
    Example,
    PromptBuilder,
    Taxonomy,
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


class Confidence(BaseModel):
    """Per label: the probability of the chosen label among the allowed ones (see confidence.py)."""

    intent: float | None = Field(None, ge=0, le=1, description="Confidence of the intent, or null.")
    topic: float | None = Field(None, ge=0, le=1, description="Confidence of the topic, or null.")
    sentiment: float | None = Field(None, ge=0, le=1, description="Confidence of the sentiment, or null.")


class Classification(BaseModel):
    """The four labels of a conversation; intent, topic and sentiment are taxonomy values."""

    categorization: str = Field(description="One line saying what the customer wants.")
    intent: str = Field(description="Why the customer wrote (taxonomy intent).")
    topic: str = Field(description="What it is about (taxonomy topic).")
    sentiment: str = Field(description="The customer's sentiment: Positive, Neutral or Negative.")
    confidence: Confidence | None = Field(
        None, description="From the model's token log-probabilities; null when the server gave none."
    )
    needs_review: bool = Field(
        False, description="A label's confidence is below CONFIDENCE_THRESHOLD (the labels are kept)."
    )


def with_confidence(
    classification: Classification, chat: ChatResult, taxonomy: Taxonomy, threshold: float
) -> Classification:
    """``classification`` with its label confidences and ``needs_review`` (below ``threshold``)."""
    found = label_confidences(chat.logprobs, {kind: taxonomy.names(kind) for kind in LABEL_KINDS})
    if found is None:
        return classification
    values = {kind: (round(c.confidence, 4) if c is not None else None) for kind, c in found.items()}
    # A label whose confidence could not be read is not "below" the threshold: it is unknown.
    needs_review = threshold > 0 and any(v is not None and v < threshold for v in values.values())
    return classification.model_copy(update={"confidence": Confidence(**values), "needs_review": needs_review})


def _preview(content: str, limit: int = 120) -> str:
    text = " ".join(content.split())
    return text if len(text) <= limit else text[:limit] + "…"


def extract_json_object(content: str) -> dict[str, Any]:
    """The first JSON object in ``content`` that looks like a classification.

    Skips ``<think>`` blocks, code fences and prose; raises :class:`LLMOutputError`
    when there is none.
    """
    text = _THINK_BLOCK.sub("", content)
    decoder = json.JSONDecoder()
    first_object: dict[str, Any] | None = None
    position = text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            keys = {label_key(k) for k in value}
            if keys & {"classification", *OUTPUT_KEYS}:
                return value
            first_object = first_object or value
        position = text.find("{", end)
    if first_object is not None:
        return first_object
    raise LLMOutputError("The model's answer holds no JSON object.", answer=_preview(content))


def parse_classification(content: str, taxonomy: Taxonomy, *, conversation_number: str = "?") -> Classification:
    """Parse and validate the model's answer against ``taxonomy``."""
    obj = extract_json_object(content)
    by_key = {label_key(k): v for k, v in obj.items()}
    wrapped = by_key.get("classification")
    if isinstance(wrapped, dict):
        by_key = {label_key(k): v for k, v in wrapped.items()}

    values: dict[str, str] = {}
    for key in OUTPUT_KEYS:
        value = by_key.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str) or not value.strip():
            problem = "is missing" if value is None else f"is not a non-empty string ({value!r})"
            raise LLMOutputError(f"The model's answer is unusable: '{key}' {problem}.", answer=_preview(content))
        values[key] = value.strip()

    for kind in LABEL_KINDS:
        canonical = taxonomy.canonical(kind, values[kind])
        if canonical is None:
            if kind == "sentiment":
                raise LLMOutputError(
                    f"The model's answer is unusable: sentiment {values[kind]!r} is not one of "
                    f"{taxonomy.names('sentiment')}.",
                    answer=_preview(content),
                )
            logger.warning(
                "conversation %s: %s %r is not in the taxonomy; using %r",
                conversation_number,
                kind,
                values[kind],
                FALLBACK_LABEL,
            )
            canonical = taxonomy.canonical(kind, FALLBACK_LABEL)
        values[kind] = canonical or FALLBACK_LABEL

    categorization = " ".join(values["categorization"].split())
    if len(categorization) > MAX_CATEGORIZATION_CHARS:
        categorization = categorization[: MAX_CATEGORIZATION_CHARS - 1] + "…"
    values["categorization"] = categorization
    return Classification(**values)


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
        self.confidence_threshold = confidence_threshold
        self.retriever = retriever

    @classmethod
    def from_settings(cls, settings: Settings) -> ConversationClassifier:
        """Load the taxonomy and few-shot files named by ``settings`` (raises ConfigError)."""
        taxonomy = load_taxonomy(settings.taxonomy_file)
        # FEW_SHOT_SOURCE=reviewed: the reviewed examples replace the file's; both: they follow them.
        static = load_few_shots(settings.few_shots_file, taxonomy) if settings.few_shot_source != "reviewed" else []
        retriever = FewShotRetriever(settings) if settings.few_shot_source != "static" else None
        return cls(
            taxonomy,
            PromptBuilder(taxonomy, static, settings.conversation_char_budget),
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
        classification = parse_classification(
            chat.content, self.taxonomy, conversation_number=prepared.conversation_number
        )
        classification = with_confidence(classification, chat, self.taxonomy, self.confidence_threshold)
        duration_ms = int((time.perf_counter() - started) * 1000)
        logger.debug(
            "conversation %s classified in %d ms (%d turns, %d chars, prompt tokens %s, output tokens %s): "
            "intent=%s topic=%s sentiment=%s",
            prepared.conversation_number,
            duration_ms,
            prepared.transcript.turn_count,
            len(prepared.transcript.text),
            chat.prompt_eval_count,
            chat.eval_count,
            classification.intent,
            classification.topic,
            classification.sentiment,
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
