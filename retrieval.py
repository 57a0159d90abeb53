"""Few-shot examples retrieved from reviewed conversations (docs/architecture.md#few-shot-retrieval).

With ``FEW_SHOT_SOURCE=reviewed`` (or ``both``), each conversation's prompt gets the
``FEW_SHOT_K`` reviewed conversations most similar to it, each as a user/assistant pair carrying
its effective labels, *after* the fixed prefix (system prompt, and with ``both`` the static
examples): the prefix stays byte-identical, so the server's prompt-prefix cache still serves it,
and only the retrieved pairs and the conversation are new for each request.

Similarity:

* ``EMBEDDING_MODEL`` set: cosine similarity of embeddings from the LLM server's embeddings
  endpoint (Ollama ``/api/embed``, OpenAI-compatible ``/embeddings``; ``llm_wrapper``). The
  reviewed conversations' embeddings are computed once per (model, content) and kept in
  ``MONGODB_EMBEDDINGS_COLLECTION``; each conversation to classify costs one embeddings call.
* otherwise, or when that call fails: BM25 over the transcripts' words (``bm25s``).

An :class:`ExampleIndex` is an immutable snapshot, swapped whole when it is read again (every
``FEW_SHOT_REFRESH_SECONDS``, or sooner after a review), so worker threads (the API) and tasks
(the batch) read it without locks. A conversation is never its own example (same content hash).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bm25s
import numpy as np
from pymongo import ReplaceOne
from pymongo.errors import PyMongoError

from aggregator import ConversationIn, build_transcript, content_hash, validate_conversation
from config import Settings
from error_handler import ClassifierError, InputError, LLMError
from mongo_client import storage_error
from prompt_builder import CATEGORIZATION, Taxonomy
from reviews import effective_labels, review_is_current

logger = logging.getLogger(__name__)

#: Reviewed conversations read into the index at most (the most recently reviewed).
MAX_EXAMPLES = 5000
#: Texts per embeddings request while embedding reviewed conversations: small, so that one request
#: of long transcripts stays well within OLLAMA_TIMEOUT on a slow server (docs/quality.md).
EMBED_BATCH = 8
#: A failing embeddings call is logged at most this often (the lexical index answers meanwhile).
WARN_EVERY_SECONDS = 60.0

Embed = Callable[[list[str]], list[list[float]]]
AsyncEmbed = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass(frozen=True)
class ReviewedExample:
    """One reviewed conversation as a few-shot example: its transcript and the answer to show."""

    content_hash: str
    text: str
    output: dict[str, str]  # categorization and every label field, in the prompt's answer shape


class ExampleIndex:
    """The examples, a BM25 index of their words and, when given, their unit-length embeddings."""

    def __init__(self, examples: Sequence[ReviewedExample], vectors: np.ndarray | None = None) -> None:
        self.examples = list(examples)
        self.vectors = vectors
        self._bm25: bm25s.BM25 | None = None
        if self.examples:
            self._bm25 = bm25s.BM25()
            self._bm25.index(_tokens([e.text for e in self.examples]), show_progress=False)

    def __len__(self) -> int:
        return len(self.examples)

    def nearest(self, k: int, *, text: str, vector: Sequence[float] | None = None,
                exclude: str | None = None) -> list[ReviewedExample]:
        """The ``k`` examples most similar to the conversation (by ``vector`` when given and the index
        has embeddings, else by ``text``), the most similar LAST (nearest the conversation)."""
        if not self.examples:
            return []
        if vector is not None and self.vectors is not None and len(vector) == self.vectors.shape[1]:
            query = np.asarray(vector, dtype=np.float32)
            scores = self.vectors @ (query / (np.linalg.norm(query) or 1.0))
        else:
            assert self._bm25 is not None
            words = _tokens([text]).vocab  # the query's words; those unknown to the index score nothing
            known = [w for w in words if w in self._bm25.vocab_dict]
            scores = self._bm25.get_scores(known) if known else np.zeros(len(self.examples))
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        chosen = [self.examples[i] for i in order if self.examples[i].content_hash != exclude][:k]
        return list(reversed(chosen))


def _tokens(texts: list[str]) -> Any:
    # English stop words dropped: "the", "my", "is" say nothing about intent or topic.
    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def unit_rows(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms


class FewShotRetriever:
    """The examples a conversation gets: the current index, refreshed from its ``source``."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.k = settings.few_shot_k
        self.uses_embeddings = bool(settings.embedding_model)
        self.refresh_seconds = settings.few_shot_refresh_seconds
        self.index = ExampleIndex([])
        #: Reads the index anew (MongoDB, or a file); set by the front door that has the database.
        self.source: Callable[[], Awaitable[ExampleIndex]] | None = None
        self._clock = clock
        self._loaded_at: float | None = None
        self._stale = False
        self._lock: asyncio.Lock | None = None
        self._loading: asyncio.Task[None] | None = None
        self._last_warning = -WARN_EVERY_SECONDS

    def mark_stale(self) -> None:
        """Read the index again, and wait for it, before the next conversation (a review changed it)."""
        self._stale = True

    async def refresh_if_stale(self) -> None:
        """Read the index when it never was or a review changed it (waiting for it), or in the
        background when it is older than FEW_SHOT_REFRESH_SECONDS (the current one serves meanwhile)."""
        if self.source is None:
            return
        if self._loaded_at is None or self._stale:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._loaded_at is None or self._stale:
                    self._stale = False
                    if self._loading is not None and not self._loading.done():
                        await self._loading  # an older read must not land after this one
                    await self._load()
            return
        if self._clock() - self._loaded_at >= self.refresh_seconds and (
                self._loading is None or self._loading.done()):
            self._loading = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        assert self.source is not None
        started = self._clock()
        try:
            index = await self.source()
        except ClassifierError as e:
            # Classification goes on with the index it has; the next conversation tries again later.
            logger.warning("reviewed few-shot examples could not be read (%s); retrying in %g s", e,
                           self.refresh_seconds)
            self._loaded_at = started
            return
        if len(index) != len(self.index):
            logger.info("few-shot retrieval: %d reviewed example(s)%s", len(index),
                        " with embeddings" if index.vectors is not None else " (lexical index)")
        self.index = index
        self._loaded_at = started

    def _wants_vector(self, index: ExampleIndex, embed: object) -> bool:
        return self.uses_embeddings and embed is not None and index.vectors is not None and bool(len(index))

    def select(self, text: str, exclude: str | None, embed: Embed | None) -> list[ReviewedExample]:
        """The examples for a conversation (synchronous: the API's worker threads)."""
        index, vector = self.index, None
        if embed is not None and self._wants_vector(index, embed):
            try:
                vector = embed([text])[0]
            except LLMError as e:
                self._warn(e)
        return index.nearest(self.k, text=text, vector=vector, exclude=exclude)

    async def select_async(self, text: str, exclude: str | None, embed: AsyncEmbed | None) -> list[ReviewedExample]:
        """The examples for a conversation (asynchronous: the batch processor, evaluate)."""
        await self.refresh_if_stale()
        index, vector = self.index, None
        if embed is not None and self._wants_vector(index, embed):
            try:
                vector = (await embed([text]))[0]
            except LLMError as e:
                self._warn(e)
        return index.nearest(self.k, text=text, vector=vector, exclude=exclude)

    def _warn(self, error: LLMError) -> None:
        now = self._clock()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            logger.warning("embeddings call failed (%s); similar examples are found by words until it works", error)


# --- building an index ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reviewed:
    """A reviewed conversation before it becomes an example."""

    conversation: ConversationIn
    labels: dict[str, str]  # effective labels
    categorization: str


def example_of(item: Reviewed, char_budget: int, fields: Sequence[str]) -> ReviewedExample | None:
    """The few-shot example of a reviewed conversation; None when a field has no label at all."""
    if any(f not in item.labels for f in fields):
        return None
    transcript = build_transcript(item.conversation.turns(), char_budget,
                                  conversation_number=item.conversation.conversation_number)
    # A labelled file has no categorization: the labels themselves say what the conversation is about.
    output = {CATEGORIZATION: item.categorization or " / ".join(item.labels[f] for f in fields)}
    return ReviewedExample(content_hash(item.conversation), transcript.text,
                           {**output, **{f: item.labels[f] for f in fields}})


async def build_index(items: Iterable[Reviewed], settings: Settings, fields: Sequence[str], *,
                      embed: AsyncEmbed | None = None, store: EmbeddingStore | None = None) -> ExampleIndex:
    """An index of ``items``; with ``embed``, their embeddings (from ``store`` when it has them,
    else computed now and kept in it)."""
    examples = [e for e in (example_of(i, settings.conversation_char_budget, fields) for i in items) if e]
    if not examples or embed is None or not settings.embedding_model:
        return ExampleIndex(examples)
    known = await store.get(settings.embedding_model, [e.content_hash for e in examples]) if store else {}
    missing = [e for e in examples if e.content_hash not in known]
    for start in range(0, len(missing), EMBED_BATCH):
        chunk = missing[start:start + EMBED_BATCH]
        try:
            vectors = await embed([e.text for e in chunk])
        except LLMError as e:
            logger.warning("embeddings of reviewed conversations failed (%s); using the lexical index", e)
            return ExampleIndex(examples)
        computed = {e.content_hash: v for e, v in zip(chunk, vectors, strict=True)}
        known.update(computed)
        if store is not None:
            await store.put(settings.embedding_model, computed)
    dimensions = {len(v) for v in known.values()}
    if len(dimensions) != 1:  # vectors of another model version: compute them again next time
        logger.warning("stored embeddings of %s have different lengths; using the lexical index",
                       settings.embedding_model)
        if store is not None:
            await store.forget(settings.embedding_model)
        return ExampleIndex(examples)
    return ExampleIndex(examples, unit_rows([known[e.content_hash] for e in examples]))


class EmbeddingStore:
    """Embeddings of conversations kept in MongoDB, one document per (model, content hash)."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection

    @staticmethod
    def _key(model: str, digest: str) -> str:
        return f"{model}\n{digest}"

    async def get(self, model: str, digests: list[str]) -> dict[str, list[float]]:
        keys = [self._key(model, d) for d in digests]
        try:
            return {doc["content_hash"]: list(doc["vector"])
                    async for doc in self.collection.find({"_id": {"$in": keys}})}
        except PyMongoError as e:
            raise storage_error(e, "read of stored embeddings") from e

    async def put(self, model: str, vectors: Mapping[str, list[float]]) -> None:
        now = datetime.now(UTC)
        writes = [ReplaceOne({"_id": self._key(model, digest)},
                             {"model": model, "content_hash": digest, "vector": vector, "created_at": now},
                             upsert=True) for digest, vector in vectors.items()]
        try:
            if writes:
                await self.collection.bulk_write(writes, ordered=False)
        except PyMongoError as e:
            raise storage_error(e, "write of embeddings") from e

    async def forget(self, model: str) -> None:
        try:
            await self.collection.delete_many({"model": model})
        except PyMongoError as e:
            raise storage_error(e, "removal of embeddings") from e


async def reviewed_from_mongo(database: Any, settings: Settings, fields: Sequence[str]) -> list[Reviewed]:
    """The conversations with a current review (the most recent :data:`MAX_EXAMPLES`), with their
    source transcripts; a review whose source changed or disappeared since is left out."""
    results = database[settings.mongodb_results_collection]
    source = database[settings.mongodb_source_collection]
    try:
        docs = await results.find(
            {"review": {"$exists": True}},
            projection={"source_conversation_id": 1, "content_hash": 1, "classification": 1, "review": 1},
        ).sort("review.at", -1).limit(MAX_EXAMPLES).to_list(None)
        current = [d for d in docs if review_is_current(d)]
        sources = {}
        ids = [d["source_conversation_id"] for d in current]
        for start in range(0, len(ids), 500):
            async for doc in source.find({"_id": {"$in": ids[start:start + 500]}}):
                sources[_key(doc["_id"])] = doc
    except PyMongoError as e:
        raise storage_error(e, "read of reviewed conversations") from e
    items = []
    for doc in current:
        raw = sources.get(_key(doc["source_conversation_id"]))
        if raw is None:
            continue
        try:
            conversation = validate_conversation({**raw, "conversation_number": str(raw.get("conversation_number")
                                                                                    or doc["source_conversation_id"])})
        except InputError:
            continue
        if content_hash(conversation) != doc.get("content_hash"):
            continue  # the text was edited since: the review judged another text
        items.append(Reviewed(conversation, effective_labels(doc, fields),
                              str((doc.get("classification") or {}).get("categorization") or "")))
    return items


def _key(value: Any) -> Any:
    # _ids of several BSON types: 1 and 1.0 or "1" must not meet; type name plus repr keeps them apart.
    return (type(value).__name__, repr(value))


def mongo_source(database: Any, settings: Settings, taxonomy: Taxonomy,
                 embed: AsyncEmbed | None) -> Callable[[], Awaitable[ExampleIndex]]:
    """The ``source`` of a retriever reading reviewed conversations from MongoDB."""
    fields = taxonomy.field_names
    store = EmbeddingStore(database[settings.mongodb_embeddings_collection])

    async def load() -> ExampleIndex:
        items = await reviewed_from_mongo(database, settings, fields)
        return await build_index(items, settings, fields, embed=embed, store=store)

    return load
