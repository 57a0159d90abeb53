"""Reviews of the model's labels: what a result holds, which labels count, and how they are compared.

A result (``mongo_client.ResultDocument``) keeps what the model said in ``classification``; a
person's correction lives beside it in ``review`` = ``{"labels": {field: label}, "by", "at",
"note", "content_hash"}``. Nothing here deletes or rewrites the model's labels (the audit trail):

* the **effective** label of a field is the review's when the review is *current* and names that
  field, else the model's;
* a review is **current** while its ``content_hash`` equals the result's: a later classification
  of changed content (a new ``content_hash`` written by the batch processor, which ``$set``\\ s its
  own fields and leaves ``review`` alone) makes it *stale*: kept, shown, no longer counted;
* **agreement** of a field: among current reviews that name it, the share where the model's label
  equals the reviewer's.

The same rules as Python functions (one result) and as MongoDB expressions (aggregations:
``/api/stats``, the report, the conversation list), so every reader counts alike.
Conversation ids in URLs are :func:`encode_id` of the source ``_id``, whatever its BSON type.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import bson
from bson.errors import BSONError

from error_handler import InputError
from prompt_builder import Taxonomy

#: Longest review note kept.
MAX_NOTE_CHARS = 2000


# --- ids in URLs ------------------------------------------------------------------------------


def encode_id(value: Any) -> str:
    """A URL-safe, opaque string for any BSON value (ObjectId, int, string, UUID, ...)."""
    return base64.urlsafe_b64encode(bson.encode({"v": value})).rstrip(b"=").decode("ascii")


def decode_id(text: str) -> Any:
    """The value :func:`encode_id` encoded; ValueError for a string it did not make."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        document = bson.decode(raw)
    except (ValueError, binascii.Error, BSONError, TypeError, IndexError) as e:
        raise ValueError("not an id of this API") from e
    if set(document) != {"v"}:
        raise ValueError("not an id of this API")
    return document["v"]


# --- one result -------------------------------------------------------------------------------


def review_is_current(result: Mapping[str, Any]) -> bool:
    review = result.get("review")
    return isinstance(review, dict) and review.get("content_hash") == result.get("content_hash")


def model_labels(result: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
    classification = result.get("classification") or {}
    return {f: classification[f] for f in fields if isinstance(classification.get(f), str)}


def reviewed_labels(result: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
    """The labels a current review set (empty without one, or when it is stale)."""
    if not review_is_current(result):
        return {}
    labels = result["review"].get("labels") or {}
    return {f: labels[f] for f in fields if isinstance(labels.get(f), str)}


def effective_labels(result: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
    """The labels that count: the model's, overridden field by field by a current review."""
    return {**model_labels(result, fields), **reviewed_labels(result, fields)}


def review_view(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The review as the API shows it: ``{"labels", "by", "at", "note", "stale"}``, or None."""
    review = result.get("review")
    if not isinstance(review, dict):
        return None
    return {"labels": dict(review.get("labels") or {}), "by": review.get("by"), "at": review.get("at"),
            "note": review.get("note"), "stale": not review_is_current(result)}


def new_review(result: Mapping[str, Any], labels: Mapping[str, str], *, by: str, at: datetime,
               note: str | None) -> dict[str, Any]:
    """The review to store: ``labels`` on top of the fields a current review already set (a reviewer
    may correct one field now and another later), for the result's current content."""
    kept = dict(result["review"].get("labels") or {}) if review_is_current(result) else {}
    return {"labels": {**kept, **labels}, "by": by, "at": at, "note": note,
            "content_hash": result.get("content_hash")}


def check_review_labels(raw: Any, taxonomy: Taxonomy, fields: Sequence[str]) -> dict[str, str]:
    """The review's labels in the taxonomy's spelling (compared like the model's: case, spacing and
    punctuation ignored); a 422 :class:`InputError` for an unknown field or label."""
    if not isinstance(raw, dict) or not raw:
        raise InputError("'labels' must be an object naming at least one field, e.g. {\"intent\": \"Refund\"}.",
                         field="labels")
    labels = {}
    for name, value in raw.items():
        if name not in fields:
            raise InputError(f"Unknown label field {str(name)[:60]!r}; the fields are {', '.join(fields)}.",
                             field=f"labels.{str(name)[:60]}")
        canonical = taxonomy.canonical(name, value) if isinstance(value, str) else None
        if canonical is None:
            allowed = ", ".join(taxonomy.names(name))
            raise InputError(f"{str(value)[:80]!r} is not a {name} of the taxonomy ({allowed}).",
                             field=f"labels.{name}")
        labels[name] = canonical
    return labels


def check_note(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InputError("'note' must be a string.", field="note")
    note = raw.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise InputError(f"'note' is longer than {MAX_NOTE_CHARS} characters.", field="note")
    return note or None


# --- the same rules in MongoDB's aggregation language -----------------------------------------

#: True for a result whose review is current (exists and was made for its content).
CURRENT_REVIEW = {"$and": [
    {"$eq": [{"$type": "$review"}, "object"]},
    {"$eq": ["$review.content_hash", "$content_hash"]},
]}


def _reviewed_label(field: str) -> dict[str, Any]:
    """The current review's label for ``field``, or null."""
    return {"$cond": [CURRENT_REVIEW, {"$ifNull": [f"$review.labels.{field}", None]}, None]}


def effective_label(field: str) -> dict[str, Any]:
    """The effective label of ``field`` (null when neither the model nor a review gave one)."""
    return {"$ifNull": [_reviewed_label(field), {"$ifNull": [f"$classification.{field}", None]}]}


def agreement_group(fields: Sequence[str]) -> dict[str, Any]:
    """A ``$group`` stage counting, per field, the current reviews naming it and those the model agreed with."""
    group: dict[str, Any] = {"_id": None}
    for field in fields:
        reviewed = _reviewed_label(field)
        has = {"$ne": [reviewed, None]}
        group[f"{field}_n"] = {"$sum": {"$cond": [has, 1, 0]}}
        group[f"{field}_agree"] = {"$sum": {"$cond": [
            {"$and": [has, {"$eq": [reviewed, f"$classification.{field}"]}]}, 1, 0]}}
    return {"$group": group}


def agreement_from(row: Mapping[str, Any] | None, fields: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{field: {"n", "accuracy"}}`` from :func:`agreement_group`'s row (accuracy null when n is 0)."""
    row = row or {}
    out = {}
    for field in fields:
        n = int(row.get(f"{field}_n", 0))
        agree = int(row.get(f"{field}_agree", 0))
        out[field] = {"n": n, "accuracy": round(agree / n, 4) if n else None}
    return out
