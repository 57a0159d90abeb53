"""Classified conversations for the review tests: source documents and their results, in SecantusDB.

Each conversation has a source document (``messages``; ``_id`` of several BSON types) and a result
as the batch processor writes it (``mongo_client.ResultDocument`` plus confidences), so the tests
read them through the API exactly as a team would after a batch run.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import Binary, ObjectId

from aggregator import content_hash, validate_conversation
from mongo_client import RESULT_INDEXES, SOURCE_INDEXES

NOW = datetime.now(UTC).replace(microsecond=0)

#: (customer text, intent, topic, sentiment, lowest confidence) of each seeded conversation.
CONVERSATIONS: list[tuple[str, str, str, str, float | None]] = [
    ("Where is my order? It was due on Monday.", "Order Status", "Shipping/Delivery", "Neutral", 0.91),
    ("I was charged twice on my card this month.", "Billing Question", "Account/Billing", "Negative", 0.42),
    ("Please refund my money, the jacket was torn.", "Refund Request", "Product Quality", "Negative", 0.35),
    ("Thanks, the parcel arrived today!", "Order Status", "Shipping/Delivery", "Positive", 0.88),
    ("My router keeps dropping the connection.", "Technical Support", "Network/Connectivity", "Negative", 0.51),
    ("How do I change my delivery address?", "Change Request", "Shipping/Delivery", "Neutral", None),
]
XSS_TEXT = 'Help <script>window.pwned=1</script> and <img src=x onerror="window.pwned=2"> now'


def source_ids() -> list[Any]:
    """One _id of each type the source collection may hold."""
    return [ObjectId(), 1001, "conv-abc/def?x=1&y", Binary.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678")),
            ObjectId(), 1002.5]


def seed_reviewable(database: Any, *, extra_text: str | None = None, job: str = "batch_r") -> list[dict[str, Any]]:
    """Sources and results of :data:`CONVERSATIONS` (plus one whose customer text is ``extra_text``);
    results processed one minute apart, newest first in list order. Returns the results inserted."""
    rows = list(CONVERSATIONS)
    if extra_text is not None:
        rows.append((extra_text, "Complaint", "Service Quality", "Negative", 0.2))
    ids = source_ids()
    sources, results = [], []
    for n, (text, intent, topic, sentiment, lowest) in enumerate(rows):
        source_id = ids[n] if n < len(ids) else ObjectId()
        source = {"_id": source_id, "conversation_number": f"r{n}", "status": "processed", "messages": [
            {"sender": "customer", "text": text, "timestamp": f"2025-09-24T10:0{n % 10}:00Z"},
            {"sender": "agent", "text": f"Thanks for writing, case {n}.", "timestamp": f"2025-09-24T10:1{n % 10}:00Z"},
        ]}
        sources.append(source)
        classification: dict[str, Any] = {"categorization": f"customer writes about case {n}", "intent": intent,
                                          "topic": topic, "sentiment": sentiment}
        if lowest is not None:
            classification["confidence"] = {"intent": lowest, "topic": min(0.99, lowest + 0.3), "sentiment": 0.97}
            classification["needs_review"] = lowest < 0.6
        results.append({
            "conversation_number": f"r{n}", "source_conversation_id": source_id, "classification": classification,
            "content_hash": content_hash(validate_conversation(source)),
            "processing_metadata": {"processed_at": NOW - timedelta(minutes=n), "model_used": "llama3",
                                    "processing_duration_ms": 900, "processor_version": "1.0.0",
                                    "batch_job_id": job if n % 3 else "batch_other"},
            "created_at": NOW - timedelta(minutes=n),
        })
    database["conversation_set"].insert_many(sources)
    database["sentimental_analysis"].insert_many(results)
    for keys, options in SOURCE_INDEXES:
        database["conversation_set"].create_index(keys, **options)
    for keys, options in RESULT_INDEXES:
        database["sentimental_analysis"].create_index(keys, **options)
    return results
