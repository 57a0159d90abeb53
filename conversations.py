"""Browse classified conversations and review their labels: ``/api/conversations``, ``/conversations``.

* ``GET /api/conversations``: results newest first (or lowest confidence first), filtered by
  every label field of the taxonomy (effective labels), ``needs_review``, ``reviewed``,
  ``from``/``to``, ``job``, ``q`` (text of the transcript); ``limit`` (50, at most 500) and an
  opaque ``cursor`` (the sort key of the last item: stable under inserts).
* ``GET /api/conversations/{id}``: one of them with its transcript (roles and times).
* ``POST /api/conversations/{id}/review``: ``{"labels": {field: label}, "note"}``; 200 with the
  updated item, 422 for an unknown field or a label outside the taxonomy, 404 for an unknown id.
* ``GET /conversations``: the page (``static/conversations.html``; its fields come from the
  dashboard's ``GET /api/taxonomy``).

Every endpoint but the page and the taxonomy serves customer data and depends on
``access.ReaderDep``. The rules for effective labels, stale reviews and ids are ``reviews.py``'s;
the database is the dashboard's lazily connected one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any

import bson
from bson.errors import BSONError
from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import FileResponse
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import PyMongoError
from starlette.concurrency import run_in_threadpool

from access import ReaderDep
from aggregator import validate_conversation
from api_dependencies import ClassifierDep, SettingsDep
from classifier import ConversationClassifier
from config import Settings
from dashboard import (  # query_day: one from/to rule
    STATIC_DIR,
    DashboardDatabase,
    DashboardDatabaseDep,
    query_day,
    results_match,
)
from error_handler import InputError, NotFoundError
from llm_pool import LLMPool
from retrieval import ExampleIndex, mongo_source
from reviews import (
    CURRENT_REVIEW,
    check_note,
    check_review_labels,
    decode_id,
    effective_label,
    effective_labels,
    encode_id,
    model_labels,
    new_review,
    review_view,
)

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_QUERY_CHARS = 200
ORDERS = ("newest", "confidence")
#: Query parameters besides the label fields.
KNOWN_PARAMETERS = frozenset({"needs_review", "reviewed", "from", "to", "job", "q", "limit", "cursor", "order"})
#: Sorts results without confidences after every one that has them ("lowest confidence first").
NO_CONFIDENCE = 2.0

router = APIRouter(tags=["conversations"])


# --- reading the query ------------------------------------------------------------------------


def _bool(name: str, value: str | None) -> bool | None:
    if value is None or value == "":
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InputError(f"'{name}' must be true or false, got {value[:40]!r}.", field=name)


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InputError(f"'limit' must be a whole number from 1 to {MAX_LIMIT}, got {value[:40]!r}.", field="limit")
    return int(value)


def encode_cursor(order: str, key: Any, last_id: Any) -> str:
    return base64.urlsafe_b64encode(bson.encode({"o": order, "k": key, "i": last_id})).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, order: str) -> tuple[Any, Any]:
    """(sort key, _id) of the last item of the previous page; 422 for a cursor not made for this order."""
    try:
        document = bson.decode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, BSONError, TypeError, IndexError) as e:
        raise InputError("'cursor' is not a cursor of this API: pass next_cursor as it was given.",
                         field="cursor") from e
    if document.get("o") != order or "i" not in document:
        raise InputError(f"'cursor' was made for another order than {order!r}.", field="cursor")
    return document.get("k"), document["i"]


def list_pipeline(params: dict[str, str], fields: list[str], canonical: Any, source_collection: str
                  ) -> tuple[list[dict[str, Any]], str, int]:
    """The aggregation of one page (it asks for one item more than ``limit``: whether a next page
    exists), the order and the limit. ``canonical(field, label)`` spells a label the taxonomy's way."""
    unknown = sorted(set(params) - KNOWN_PARAMETERS - set(fields))
    if unknown:
        raise InputError(f"Unknown query parameter {unknown[0][:60]!r}; filters are {', '.join(fields)}, "
                         f"{', '.join(sorted(KNOWN_PARAMETERS))}.", field=unknown[0][:60])
    order = params.get("order") or "newest"
    if order not in ORDERS:
        raise InputError(f"'order' must be one of {', '.join(ORDERS)}.", field="order")
    limit = _limit(params.get("limit"))
    date_from, date_to = query_day("from", params.get("from")), query_day("to", params.get("to"))
    if date_from and date_to and date_from > date_to:
        raise InputError(f"'from' ({date_from}) is after 'to' ({date_to}).", field="from")
    if date_to == date.max:
        date_to = None  # "up to the end of time": the day after it does not exist
    match = results_match(date_from, date_to, params.get("job") or None)
    exprs: list[dict[str, Any]] = []
    for field in fields:
        value = params.get(field)
        if value:
            label = canonical(field, value)
            if label is None:
                raise InputError(f"{value[:80]!r} is not a {field} of the taxonomy.", field=field)
            # Served by the label indexes first; the expression then keeps only effective labels.
            match.setdefault("$and", []).append(
                {"$or": [{f"classification.{field}": label}, {f"review.labels.{field}": label}]})
            exprs.append({"$eq": [effective_label(field), label]})
    needs_review = _bool("needs_review", params.get("needs_review"))
    if needs_review is not None:
        match["classification.needs_review"] = True if needs_review else {"$ne": True}
    reviewed = _bool("reviewed", params.get("reviewed"))
    if reviewed is not None:
        exprs.append(CURRENT_REVIEW if reviewed else {"$not": [CURRENT_REVIEW]})
    if exprs:
        match["$expr"] = {"$and": exprs}
    pipeline: list[dict[str, Any]] = [{"$match": match}]
    cursor = params.get("cursor")
    if order == "newest":
        pipeline.append({"$sort": {"processing_metadata.processed_at": DESCENDING, "_id": DESCENDING}})
        if cursor:
            pipeline.append({"$match": _after_newest(*decode_cursor(cursor, order))})
    else:
        lowest = {"$min": [f"$classification.confidence.{f}" for f in fields]}
        pipeline.append({"$addFields": {"_lowest": {"$ifNull": [lowest, NO_CONFIDENCE]}}})
        pipeline.append({"$sort": {"_lowest": ASCENDING, "_id": ASCENDING}})
        if cursor:
            key, last_id = decode_cursor(cursor, order)
            pipeline.append({"$match": {"$or": [{"_lowest": {"$gt": key}}, {"_lowest": key, "_id": {"$gt": last_id}}]}})
    query = (params.get("q") or "").strip()
    if query:
        if len(query) > MAX_QUERY_CHARS:
            raise InputError(f"'q' is longer than {MAX_QUERY_CHARS} characters.", field="q")
        pattern = {"$regex": re.escape(query), "$options": "i"}
        pipeline += [
            {"$lookup": {"from": source_collection, "localField": "source_conversation_id", "foreignField": "_id",
                         "as": "_source"}},
            {"$match": {"$or": [{"_source.messages.text": pattern}, {"_source.tweets.text": pattern}]}},
            {"$project": {"_source": 0}},
        ]
    pipeline.append({"$limit": limit + 1})
    return pipeline, order, limit


def _after_newest(key: Any, last_id: Any) -> dict[str, Any]:
    """Results after (older than) the last one shown; one without a date sorts after every dated one."""
    at = "processing_metadata.processed_at"
    if key is None:
        return {at: None, "_id": {"$lt": last_id}}
    return {"$or": [{at: {"$lt": key}}, {at: key, "_id": {"$lt": last_id}}, {at: None}]}


# --- shaping answers --------------------------------------------------------------------------


def item_view(result: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """A result as the API shows it (one item of the list, the base of the detail)."""
    classification = result.get("classification") or {}
    metadata = result.get("processing_metadata") or {}
    return {
        "id": encode_id(result.get("source_conversation_id")),
        "conversation_number": None if result.get("conversation_number") is None
        else str(result["conversation_number"]),
        "labels": effective_labels(result, fields),
        "model_labels": model_labels(result, fields),
        "confidence": classification.get("confidence"),
        "needs_review": bool(classification.get("needs_review", False)),
        "review": review_view(result),
        "categorization": classification.get("categorization"),
        "model": metadata.get("model_used"),
        "processed_at": metadata.get("processed_at"),
        "job_id": metadata.get("batch_job_id"),
    }


def _time(value: Any) -> str | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return None if value is None else str(value)


def transcript_of(source: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The source conversation's turns ``{"role", "text", "time"}``; None when it is gone or unreadable."""
    if source is None:
        return None
    try:
        conversation = validate_conversation({**source, "conversation_number": "review"})
    except InputError:
        return None
    if conversation.messages is not None:
        return [{"role": m["sender"], "text": m["text"], "time": _time(m.get("timestamp"))}
                for m in conversation.messages]
    return [{"role": t.speaker, "text": t.text, "time": _time(t.created_at)} for t in conversation.tweets or []]


def _query_params(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in params:
            raise InputError(f"'{name[:60]}' is given twice.", field=name[:60])
        params[name] = value
    return params


ID_PATH = Path(description="The conversation's id (the 'id' of a list item).", max_length=400)


async def _result_by_id(collection: Any, conversation_id: str) -> tuple[Any, dict[str, Any]]:
    try:
        source_id = decode_id(conversation_id)
    except ValueError as e:
        raise NotFoundError(f"No conversation has the id {conversation_id[:60]!r}.") from e
    result = await collection.find_one({"source_conversation_id": source_id})
    if result is None:
        raise NotFoundError(f"No conversation has the id {conversation_id[:60]!r}.")
    return source_id, result


# --- endpoints --------------------------------------------------------------------------------


@router.get("/api/conversations", summary="Classified conversations, filtered and paged (needs a token)")
async def list_conversations(request: Request, principal: ReaderDep, settings: SettingsDep,
                             classifier: ClassifierDep, holder: DashboardDatabaseDep) -> dict[str, Any]:
    """Query parameters: one per label field (``intent=...``), ``needs_review``, ``reviewed``
    (true/false), ``from``/``to`` (YYYY-MM-DD), ``job``, ``q`` (text in the transcript), ``order``
    (``newest`` or ``confidence``: lowest first), ``limit`` (1-500, default 50), ``cursor``."""
    fields = classifier.taxonomy.field_names
    pipeline, order, limit = list_pipeline(_query_params(request), fields, classifier.taxonomy.canonical,
                                           settings.mongodb_source_collection)
    database = await holder.database(settings)
    try:
        docs = await (await database[settings.mongodb_results_collection].aggregate(pipeline)).to_list(limit + 1)
    except PyMongoError as e:
        raise holder.unavailable(e) from e
    more = len(docs) > limit
    docs = docs[:limit]
    next_cursor = None
    if more and docs:
        last = docs[-1]
        key = (last.get("processing_metadata") or {}).get("processed_at") if order == "newest" else last["_lowest"]
        next_cursor = encode_cursor(order, key, last["_id"])
    return {"items": [item_view(doc, fields) for doc in docs], "next_cursor": next_cursor}


@router.get("/api/conversations/{conversation_id}", summary="One conversation with its transcript (needs a token)")
async def get_conversation(principal: ReaderDep, settings: SettingsDep, classifier: ClassifierDep,
                           holder: DashboardDatabaseDep,
                           conversation_id: Annotated[str, ID_PATH]) -> dict[str, Any]:
    database = await holder.database(settings)
    try:
        source_id, result = await _result_by_id(database[settings.mongodb_results_collection], conversation_id)
        source = await database[settings.mongodb_source_collection].find_one({"_id": source_id})
    except PyMongoError as e:
        raise holder.unavailable(e) from e
    return {**item_view(result, classifier.taxonomy.field_names), "transcript": transcript_of(source)}


@router.post("/api/conversations/{conversation_id}/review",
             summary="Correct or confirm a conversation's labels (needs a token)")
async def review_conversation(request: Request, principal: ReaderDep, settings: SettingsDep,
                              classifier: ClassifierDep, holder: DashboardDatabaseDep,
                              conversation_id: Annotated[str, ID_PATH]) -> dict[str, Any]:
    """Body ``{"labels": {field: label, ...}, "note": "..."}`` (any subset of the fields). The model's
    labels stay as they were; the review records who (the token's name) and when."""
    labels, note = _review_body(await request.body(), classifier)
    fields = classifier.taxonomy.field_names
    database = await holder.database(settings)
    results = database[settings.mongodb_results_collection]
    try:
        source_id, result = await _result_by_id(results, conversation_id)
        review = new_review(result, labels, by=principal.name, at=datetime.now(UTC), note=note)
        # Only onto the content it was made for: a re-classification in between makes the caller look again.
        updated = await results.find_one_and_update(
            {"_id": result["_id"], "content_hash": result.get("content_hash")}, {"$set": {"review": review}},
            return_document=True)
    except PyMongoError as e:
        raise holder.unavailable(e) from e
    if updated is None:
        raise InputError("The conversation was classified again while you reviewed it; open it again.",
                         field="labels", status_code=409)
    logger.info("conversation %s reviewed by %s: %s", updated.get("conversation_number"), principal.name,
                ", ".join(f"{k}={v}" for k, v in labels.items()))
    if classifier.retriever is not None:
        classifier.retriever.mark_stale()  # the next conversation may learn from this one
    return item_view(updated, fields)


def _review_body(body: bytes, classifier: Any) -> tuple[dict[str, str], str | None]:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise InputError(f"The body is not valid JSON: {e}", field="body", status_code=400) from e
    if not isinstance(data, dict):
        raise InputError("The body must be a JSON object: {\"labels\": {...}, \"note\": \"...\"}.", field="body")
    extra = sorted(set(data) - {"labels", "note"})
    if extra:
        raise InputError(f"Unknown key {extra[0][:60]!r}; a review has 'labels' and 'note'.", field=extra[0][:60])
    fields = classifier.taxonomy.field_names
    return check_review_labels(data.get("labels"), classifier.taxonomy, fields), check_note(data.get("note"))


@router.get("/conversations", include_in_schema=False)
async def conversations_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "conversations.html", media_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def fresh_examples(settings: Settings, classifier: ConversationClassifier, llm_client: LLMPool,
                         holder: DashboardDatabase) -> None:
    """Before a classification (``POST /classify`` awaits it first): the reviewed few-shot examples
    are read (the first time, waiting for them) or refreshed in the background when old. Nothing
    without FEW_SHOT_SOURCE reviewed/both. A plain coroutine, not a dependency of the route: its own
    four dependencies were solved on every request (issue 19)."""
    retriever = classifier.retriever
    if retriever is None:
        return
    if retriever.source is None:
        embed = None
        if settings.embedding_model:
            async def embed(texts: list[str]) -> list[list[float]]:
                result: list[list[float]] = await run_in_threadpool(llm_client.embed, texts)
                return result

        async def load() -> ExampleIndex:
            database = await holder.database(settings)
            return await mongo_source(database, settings, classifier.taxonomy, embed)()

        retriever.source = load
    await retriever.refresh_if_stale()



def install(app: FastAPI) -> None:
    """Add the conversation endpoints and page (the dashboard must be installed too: its database)."""
    app.include_router(router)
