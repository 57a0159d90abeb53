"""The monitoring dashboard: ``GET /dashboard``, its JSON (``/api/stats``, ``/api/jobs``,
``/api/taxonomy``) and offline ``/docs``.

Everything here reads MongoDB and nothing else needs it: the client is created lazily on the
first dashboard request (with a short server-selection timeout) and closed by this router's
lifespan, so the API starts, classifies and answers ``/health`` without MongoDB. When MongoDB is
not configured or does not answer, the JSON endpoints answer 503 with the reason.

Statistics come from one aggregation pipeline over the results collection whose ``$match`` on
``processing_metadata.processed_at`` (and ``batch_job_id``) is served by the indexes that
``mongo_client`` creates; the source collection is only counted by status (the status index).
Jobs are the documents :mod:`utils.job_recorder` keeps up to date in the jobs collection.
The label fields counted are the taxonomy's (the classifier the API loaded): the page draws one
chart per field that ``/api/stats`` lists, and names none itself.

:func:`install` wires it all into the app: the router, ``/static`` and the Swagger UI page.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from pymongo import DESCENDING, AsyncMongoClient
from pymongo.errors import PyMongoError
from starlette.concurrency import run_in_threadpool

from api_dependencies import ClassifierDep, SettingsDep
from config import Settings
from error_handler import ClassifierError, InputError, StorageUnavailableError
from mongo_client import invalid_uri_error, mongo_connection, unreachable_error
from prompt_builder import Taxonomy
from reviews import agreement_from, agreement_group, effective_label

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The dashboard gives up on MongoDB quickly: a page waiting 30 s helps nobody.
SERVER_SELECTION_TIMEOUT_MS = 3000
DASHBOARD_APPNAME = "support-classifier-dashboard"
#: Latest failures shown, and jobs listed by default.
FAILURES_SHOWN = 20
JOBS_SHOWN = 20
#: A running job whose record was not refreshed for this long is shown as unresponsive
#: (the recorder writes at least every 10 s while its process lives).
STALE_AFTER = timedelta(seconds=60)
SOURCE_STATUSES = ("pending", "processing", "processed", "failed", "skipped")
NO_LABEL = "(none)"


# --- response models ------------------------------------------------------------------------
class LabelCount(BaseModel):
    label: str
    count: int


class FieldCounts(BaseModel):
    """One label field of the taxonomy (TAXONOMY_FILE) and how often each of its labels was given."""

    name: str = Field(description="The field's key in classification (classification.<name>).")
    title: str = Field(description="The name as people read it ('Product line' for product_line).")
    description: str = Field(description="What the field says, from the taxonomy file.")
    customer_only: bool = Field(description="Judged from the customer's turns only.")
    labels: list[str] = Field(description="The field's labels, in the taxonomy's order.")
    counts: list[LabelCount] = Field(description=f"Results per label, most frequent first (labels no longer in "
                                     f"the taxonomy included; {NO_LABEL} for results without the field).")


class DayCounts(BaseModel):
    date: str = Field(description="UTC day, YYYY-MM-DD.")
    total: int
    labels: dict[str, dict[str, int]] = Field(description="Per label field: results per label that day.")


class ReviewShare(BaseModel):
    with_confidence: int = Field(description="Results that carry label confidences.")
    needs_review: int = Field(description="Results flagged needs_review (a confidence below CONFIDENCE_THRESHOLD).")
    share: float | None = Field(description="needs_review / with_confidence; null when no result has confidences.")


class Agreement(BaseModel):
    n: int = Field(description="Results in the range whose current review set this field.")
    accuracy: float | None = Field(description="Share of those where the model's label equals the reviewer's; "
                                   "null when n is 0.")


class Failure(BaseModel):
    conversation_number: str | None
    failure_type: str | None
    reason: str | None
    failed_at: datetime | None


class StatsResponse(BaseModel):
    """Label distributions and trends of the results in a date range (and job), with source status counts."""

    date_from: date | None = Field(alias="from", description="First UTC day included (none: from the start).")
    date_to: date | None = Field(alias="to", description="Last UTC day included (none: up to now).")
    job: str | None = Field(description="Only results of this batch job.")
    total: int = Field(description="Results in the range.")
    fields: list[FieldCounts] = Field(description="Every label field of the taxonomy, in its order.")
    per_day: list[DayCounts]
    review: ReviewShare
    agreement: dict[str, Agreement] = Field(
        description="Per label field: how often the model agreed with the reviewers (the live quality figure).")
    statuses: dict[str, int] = Field(description="Source conversations per status (all jobs, all dates).")
    failures: list[Failure] = Field(description=f"The {FAILURES_SHOWN} latest failed conversations in the range.")
    job_ids: list[str] = Field(description="Batch jobs that wrote results (for the job filter).")
    generated_at: datetime

    model_config = {"populate_by_name": True}


class TaxonomyLabel(BaseModel):
    name: str
    description: str


class TaxonomyField(BaseModel):
    name: str = Field(description="The field's key in classification (classification.<name>).")
    description: str
    customer_only: bool = Field(description="Judged from the customer's turns only.")
    labels: list[TaxonomyLabel] = Field(description="In the taxonomy's order.")


class TaxonomyResponse(BaseModel):
    """The taxonomy the API classifies with (TAXONOMY_FILE), as a version 2 taxonomy file holds it."""

    version: int = Field(description="Always 2: the format of the answer, whatever the file's.")
    fields: list[TaxonomyField] = Field(description="The label fields, in the order of the answer's keys.")


class Job(BaseModel):
    job_id: str
    mode: str | None = None
    status: str = Field(description="running | completed | stopped | failed | unresponsive (no news for 60 s).")
    host: str | None = None
    pid: int | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    total: int = 0
    processed: int = 0
    successful: int = 0
    failed: int = 0
    queued_for_retry: int = Field(0, description="In the job's retry queues.")
    already_classified: int = 0
    rate: float = Field(0.0, description="Conversations per second over the last minute.")
    eta: datetime | None = Field(None, description="Estimated completion (running jobs).")
    percentage: float = 0.0


class JobsResponse(BaseModel):
    running: int = Field(description="Jobs running now.")
    jobs: list[Job] = Field(description="Most recent first.")


DASHBOARD_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "MongoDB is not configured or does not answer.",
        "content": {"application/json": {"example": {"error": {
            "type": "storage_unavailable",
            "message": "Cannot reach MongoDB at mongodb://localhost:27017: connection refused",
            "hint": "Start MongoDB, or set MONGODB_CONNECTION_STRING.",
        }}}},
    },
}


# --- the lazily connected database ------------------------------------------------------------
class DashboardDatabase:
    """MongoDB for the dashboard: connected on first use (starting the embedded database when
    configured), closed by :meth:`close`. Safe to share between requests of one event loop."""

    def __init__(self) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._embedded = ExitStack()
        self._lock = asyncio.Lock()
        self.uri = ""

    async def database(self, settings: Settings) -> Any:
        if not settings.mongodb_connection_string.strip():
            raise StorageUnavailableError(
                "MongoDB is not configured: the dashboard reads the results from MongoDB.",
                hint="Set MONGODB_CONNECTION_STRING (mongodb://host:27017, or 'embedded').",
            )
        async with self._lock:
            if self._client is None:
                self._client = await self._connect(settings)
        return self._client[settings.mongodb_database_name]

    async def _connect(self, settings: Settings) -> AsyncMongoClient[dict[str, Any]]:
        try:
            # Starting the embedded database blocks (a child process); keep the event loop free meanwhile.
            uri, options = await run_in_threadpool(self._embedded.enter_context,
                                                   mongo_connection(settings, DASHBOARD_APPNAME))
        except ClassifierError as e:
            raise StorageUnavailableError(f"The embedded database is not available: {e.message}",
                                          hint=e.hint) from e
        self.uri = uri
        # A page waits for MongoDB a few seconds at most before saying it is unavailable.
        wait_ms = min(SERVER_SELECTION_TIMEOUT_MS, settings.mongodb_timeout_ms)
        options = options | {"serverSelectionTimeoutMS": wait_ms, "connectTimeoutMS": wait_ms}
        try:
            return AsyncMongoClient(uri, **options)
        except (PyMongoError, ValueError, TypeError) as e:
            raise invalid_uri_error(uri, e) from e

    def unavailable(self, error: PyMongoError) -> StorageUnavailableError:
        return unreachable_error(self.uri, error)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        await run_in_threadpool(self._embedded.close)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # FastAPI merges this state into the app's lifespan state: requests see it on request.state.
    holder = DashboardDatabase()
    try:
        yield {"dashboard_database": holder}
    finally:
        await holder.close()


router = APIRouter(lifespan=_lifespan)


# --- queries ----------------------------------------------------------------------------------
def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def results_match(date_from: date | None, date_to: date | None, job: str | None) -> dict[str, Any]:
    """The ``$match`` of the results: processed in [from, to] (whole UTC days), of ``job``."""
    match: dict[str, Any] = {}
    processed_at: dict[str, datetime] = {}
    if date_from is not None:
        processed_at["$gte"] = _day_start(date_from)
    if date_to is not None:
        processed_at["$lt"] = _day_start(date_to + timedelta(days=1))
    if processed_at:
        match["processing_metadata.processed_at"] = processed_at
    if job:
        match["processing_metadata.batch_job_id"] = job
    return match


def _label(field: str) -> dict[str, Any]:
    # The effective label: a current review's, else the model's (reviews.py).
    return {"$ifNull": [effective_label(field), NO_LABEL]}


def _facet(field: str) -> str:
    return f"by_{field}"  # never "total" or "review", whatever the taxonomy names its fields


def stats_pipeline(match: dict[str, Any], label_fields: list[str]) -> list[dict[str, Any]]:
    """One pass over the matching results: label counts per field, per-day counts, review share."""
    day = {"$dateToString": {"format": "%Y-%m-%d", "date": "$processing_metadata.processed_at"}}
    facets: dict[str, Any] = {
        "total": [{"$group": {"_id": None, "n": {"$sum": 1}}}],
        "review": [{"$group": {
            "_id": None,
            "with_confidence": {"$sum": {"$cond": [
                {"$ne": [{"$ifNull": ["$classification.confidence", None]}, None]}, 1, 0]}},
            "needs_review": {"$sum": {"$cond": [{"$eq": ["$classification.needs_review", True]}, 1, 0]}},
        }}],
        "day_total": [{"$group": {"_id": day, "n": {"$sum": 1}}}],
        "agreement": [agreement_group(label_fields)],
    }
    for field in label_fields:
        facets[_facet(field)] = [{"$group": {"_id": _label(field), "n": {"$sum": 1}}},
                                 {"$sort": {"n": -1, "_id": 1}}]
        facets[f"day_{_facet(field)}"] = [
            {"$group": {"_id": {"day": day, "label": _label(field)}, "n": {"$sum": 1}}}]
    return [{"$match": match}, {"$facet": facets}]


def shape_stats(facets: dict[str, Any], taxonomy: Taxonomy) -> dict[str, Any]:
    """The pipeline's one document as the fields of :class:`StatsResponse`."""
    days: dict[str, dict[str, Any]] = {}
    for row in facets.get("day_total", []):
        if row["_id"] is not None:  # a result without processed_at has no day
            days[row["_id"]] = {"date": row["_id"], "total": row["n"], "labels": {f: {} for f in taxonomy.field_names}}
    for field in taxonomy.field_names:
        for row in facets.get(f"day_{_facet(field)}", []):
            entry = days.get(row["_id"].get("day"))
            if entry is not None:
                entry["labels"][field][str(row["_id"]["label"])] = row["n"]
    agreement = agreement_from((facets.get("agreement") or [None])[0], taxonomy.field_names)
    review = (facets.get("review") or [{}])[0]
    with_confidence = int(review.get("with_confidence", 0))
    needs_review = int(review.get("needs_review", 0))
    return {
        "total": (facets.get("total") or [{"n": 0}])[0]["n"],
        "fields": [
            {"name": f.name, "title": f.title, "description": f.description, "customer_only": f.customer_only,
             "labels": f.names,
             "counts": [{"label": str(r["_id"]), "count": r["n"]} for r in facets.get(_facet(f.name), [])]}
            for f in taxonomy.fields
        ],
        "per_day": [days[d] for d in sorted(days)],
        "agreement": agreement,
        "review": {
            "with_confidence": with_confidence,
            "needs_review": needs_review,
            "share": round(needs_review / with_confidence, 4) if with_confidence else None,
        },
    }


async def _source_statuses(source: Any) -> dict[str, int]:
    counts = {}
    for status in SOURCE_STATUSES:
        # 'pending' includes documents without a status (never looked at yet), as the processor reads them.
        query = {"status": {"$in": ["pending", None]}} if status == "pending" else {"status": status}
        counts[status] = await source.count_documents(query)
    return counts


async def _latest_failures(source: Any, date_from: date | None, date_to: date | None) -> list[dict[str, Any]]:
    query: dict[str, Any] = {"status": "failed"}
    when = results_match(date_from, date_to, None).get("processing_metadata.processed_at")
    if when:
        query["last_processed_at"] = when
    cursor = source.find(
        query, projection={"conversation_number": 1, "failure_type": 1, "failure_reason": 1, "last_processed_at": 1}
    ).sort("last_processed_at", DESCENDING).limit(FAILURES_SHOWN)
    return [
        {
            "conversation_number": None if doc.get("conversation_number") is None else str(doc["conversation_number"]),
            "failure_type": doc.get("failure_type"),
            "reason": doc.get("failure_reason"),
            "failed_at": doc.get("last_processed_at"),
        }
        async for doc in cursor
    ]


def job_view(doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A jobs-collection document as a :class:`Job`; a running job silent for too long is unresponsive."""
    view = {key: value for key, value in doc.items() if key in Job.model_fields}
    view["job_id"] = str(doc["_id"])
    updated = doc.get("updated_at")
    if view.get("status") == "running" and isinstance(updated, datetime) and now - updated > STALE_AFTER:
        view["status"] = "unresponsive"
        view["eta"] = None
    view.setdefault("status", "running")
    return view


# --- endpoints --------------------------------------------------------------------------------
def query_day(name: str, value: str | None) -> date | None:
    """A query parameter's UTC day; a clear 422 (not a validation dump) when it is not YYYY-MM-DD."""
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError as e:
        raise InputError(f"'{name}' must be a day written YYYY-MM-DD, got {value[:40]!r}.", field=name,
                         status_code=422) from e
    if day == date.max:  # a range ends at the next day's start, which cannot be written (a 500 before)
        raise InputError(f"'{name}' must be a day written YYYY-MM-DD up to {date.max - timedelta(days=1)}, "
                         f"got {value[:40]!r}.", field=name, status_code=422)
    return day


def get_dashboard_database(request: Request) -> DashboardDatabase:
    return request.state.dashboard_database


DashboardDatabaseDep = Annotated[DashboardDatabase, Depends(get_dashboard_database)]


@router.get(
    "/api/stats",
    summary="Label distributions, daily trends, review share and latest failures (MongoDB)",
    response_model=StatsResponse,
    response_model_by_alias=True,
    responses=DASHBOARD_ERRORS,
    tags=["dashboard"],
)
async def stats(
    settings: SettingsDep,
    classifier: ClassifierDep,
    holder: DashboardDatabaseDep,
    from_: Annotated[str | None, Query(alias="from", description="First UTC day, YYYY-MM-DD.",
                                       json_schema_extra={"format": "date"})] = None,
    to: Annotated[str | None, Query(description="Last UTC day, YYYY-MM-DD (included).",
                                    json_schema_extra={"format": "date"})] = None,
    job: Annotated[str | None, Query(max_length=200,
                                     description="A batch job id (processing_metadata.batch_job_id).")] = None,
) -> dict[str, Any]:
    date_from, date_to = query_day("from", from_), query_day("to", to)
    if date_from and date_to and date_from > date_to:
        raise InputError(f"'from' ({date_from}) is after 'to' ({date_to}).", field="from", status_code=422)
    database = await holder.database(settings)
    results = database[settings.mongodb_results_collection]
    source = database[settings.mongodb_source_collection]
    job = job or None
    try:
        pipeline = stats_pipeline(results_match(date_from, date_to, job), classifier.taxonomy.field_names)
        facets = await (await results.aggregate(pipeline)).to_list(1)
        statuses = await _source_statuses(source)
        failures = await _latest_failures(source, date_from, date_to)
        job_ids = sorted(str(j) for j in await results.distinct("processing_metadata.batch_job_id") if j)
    except PyMongoError as e:
        raise holder.unavailable(e) from e
    return {
        "from": date_from, "to": date_to, "job": job,
        **shape_stats(facets[0] if facets else {}, classifier.taxonomy),
        "statuses": statuses, "failures": failures, "job_ids": job_ids,
        "generated_at": datetime.now(UTC),
    }


@router.get(
    "/api/taxonomy",
    summary="The label fields and labels the API classifies with (TAXONOMY_FILE)",
    response_model=TaxonomyResponse,
    tags=["dashboard"],
)
async def taxonomy(classifier: ClassifierDep) -> dict[str, Any]:
    return classifier.taxonomy.as_dict()


@router.get(
    "/api/jobs",
    summary="Running and recent batch jobs with their progress (MongoDB)",
    response_model=JobsResponse,
    responses=DASHBOARD_ERRORS,
    tags=["dashboard"],
)
async def jobs(
    settings: SettingsDep,
    holder: DashboardDatabaseDep,
    limit: Annotated[int, Query(ge=1, le=200, description="Most recent jobs to list.")] = JOBS_SHOWN,
) -> dict[str, Any]:
    database = await holder.database(settings)
    collection = database[settings.mongodb_jobs_collection]
    now = datetime.now(UTC)
    try:
        docs = await collection.find().sort("started_at", DESCENDING).limit(limit).to_list(limit)
    except PyMongoError as e:
        raise holder.unavailable(e) from e
    views = [job_view(doc, now) for doc in docs]
    return {"running": sum(1 for v in views if v["status"] == "running"), "jobs": views}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


def install(app: FastAPI) -> None:
    """Add the dashboard, ``/static`` and a ``/docs`` whose Swagger UI is served locally (no CDN).

    The app must be created with ``docs_url=None, redoc_url=None`` (ReDoc loads from a CDN).
    """
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui/favicon-32x32.png",
        )
