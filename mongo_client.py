"""MongoDB access of the batch processor, over PyMongo's native asyncio client.

One ``AsyncMongoClient`` (one connection pool) per process, opened and closed by
:meth:`MongoStore.connect`. Driver errors are raised as :class:`StorageError` whose
``transient`` flag drives the retries (``utils.retry_utils``).

Source documents move ``pending`` (or no status) -> ``processing`` (claimed with a lease,
``batch_source.py``) -> ``processed`` | ``failed`` | ``skipped`` (no customer turn). Results
(:class:`ResultDocument`) are upserted on ``source_conversation_id`` behind a unique index:
no run, crash or retry creates a second result for a conversation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
from pymongo import ASCENDING, AsyncMongoClient, IndexModel, MongoClient, UpdateOne
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
    WriteError,
)

from config import Settings
from error_handler import StorageError, StorageUnavailableError
from logger import redact_url
from utils.embedded_db import embedded_database

logger = logging.getLogger(__name__)

STATUS_PENDING = "pending"
STATUS_PROCESSING = "processing"
STATUS_PROCESSED = "processed"
STATUS_FAILED = "failed"
#: Terminal: nothing to classify (no customer turn); never retried unless reset to pending.
STATUS_SKIPPED = "skipped"

#: The batch processor's application name (server logs; failpoints in tests target it).
BATCH_APPNAME = "support-classifier-batch"
#: Seconds the start-up check waits for MongoDB before giving up.
PING_TIMEOUT_SECONDS = 10.0
#: The server's code of a unique-index violation.
DUPLICATE_KEY = 11000

# Created by the batch processor (MongoStore.ensure_indexes) and the importer (scripts/import_data.py).
SOURCE_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("status", ASCENDING)], {}),
    ([("conversation_number", ASCENDING)], {"unique": True}),
    ([("last_processed_at", ASCENDING)], {}),
    ([("status", ASCENDING), ("_id", ASCENDING)], {}),
    # Claims (batch_source.py): expired leases, a claim's documents, a worker's documents.
    ([("status", ASCENDING), ("lease_expires_at", ASCENDING)], {}),
    ([("claim_id", ASCENDING)], {"sparse": True}),
    ([("claimed_by", ASCENDING)], {"sparse": True}),
]
RESULT_INDEXES: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
    ([("conversation_number", ASCENDING)], {}),
    ([("source_conversation_id", ASCENDING)], {"unique": True}),
    ([("processing_metadata.batch_job_id", ASCENDING)], {}),
    ([("processing_metadata.processed_at", ASCENDING)], {}),
    ([("content_hash", ASCENDING)], {}),
]


def result_indexes(label_fields: Iterable[str]) -> list[tuple[list[tuple[str, int]], dict[str, Any]]]:
    """The results collection's indexes: :data:`RESULT_INDEXES` and one per label field of the
    taxonomy (``classification.<field>``: the dashboard, the report and review filters use them)."""
    return [*RESULT_INDEXES, *(([(f"classification.{name}", ASCENDING)], {}) for name in label_fields)]


@dataclass
class ProcessingMetadata:
    processed_at: datetime
    model_used: str
    processing_duration_ms: int
    processor_version: str
    batch_job_id: str
    #: Set when the classification was copied from an identical conversation of the same job.
    reused_from: Any = None
    #: What the answer cost: prompt, cached prompt and completion tokens (None where the server did not say).
    llm_tokens: dict[str, int | None] | None = None

    def to_mongo(self) -> dict[str, Any]:
        data = {
            "processed_at": self.processed_at,
            "model_used": self.model_used,
            "processing_duration_ms": self.processing_duration_ms,
            "processor_version": self.processor_version,
            "batch_job_id": self.batch_job_id,
        }
        if self.llm_tokens is not None:
            data["llm_tokens"] = self.llm_tokens
        if self.reused_from is not None:
            data["classification_reused"] = True
            data["reused_from"] = self.reused_from
        return data

    @classmethod
    def from_mongo(cls, data: dict[str, Any]) -> ProcessingMetadata:
        return cls(
            processed_at=data["processed_at"],
            model_used=str(data.get("model_used", "")),
            processing_duration_ms=int(data.get("processing_duration_ms", 0)),
            processor_version=str(data.get("processor_version", "")),
            batch_job_id=str(data.get("batch_job_id", "")),
            reused_from=data.get("reused_from"),
            llm_tokens=data.get("llm_tokens"),
        )


@dataclass
class ResultDocument:
    """One result: the only place its shape is defined (docs/architecture.md#results-and-indexes).

    ``classification`` is ``classifier.Classification.model_dump()``: ``categorization``, one key
    per label field of the taxonomy (``classification.<field>``), ``confidence`` ({field: p} or
    None) and ``needs_review``.

    ``source_conversation_id`` is the source ``_id`` as it is, of any BSON type;
    ``content_hash`` (aggregator.content_hash) tells a later run whether the conversation
    changed since it was classified; ``claim_generation`` is the fencing token of the claim
    it was written under (docs/architecture.md#exactly-once-the-fencing-rule).
    """

    conversation_number: str
    source_conversation_id: Any
    classification: dict[str, Any]
    content_hash: str | None  # None only for a write_failed entry queued before hashes were kept
    processing_metadata: ProcessingMetadata
    #: None only for a result written outside a claim (never by the batch processor).
    claim_generation: int | None = None

    def to_mongo(self) -> dict[str, Any]:
        """The fields a result owns; everything else on the document (a review, ...) is someone else's."""
        data = {
            "conversation_number": self.conversation_number,
            "source_conversation_id": self.source_conversation_id,
            "classification": self.classification,
            "content_hash": self.content_hash,
            "processing_metadata": self.processing_metadata.to_mongo(),
        }
        if self.claim_generation is not None:
            data["claim_generation"] = self.claim_generation
        return data

    @classmethod
    def from_mongo(cls, data: dict[str, Any]) -> ResultDocument:
        """A result as :meth:`to_mongo` gave it (kept in a retry-queue entry whose write failed)."""
        return cls(
            conversation_number=str(data["conversation_number"]),
            source_conversation_id=data["source_conversation_id"],
            classification=dict(data["classification"]),
            content_hash=data.get("content_hash"),
            processing_metadata=ProcessingMetadata.from_mongo(data["processing_metadata"]),
            claim_generation=data.get("claim_generation"),
        )


def not_newer_than(generation: int | None) -> dict[str, Any]:
    """Filter on results that a claim of ``generation`` may replace: written under the same or an
    older claim, or before generations existed (``$not $gt`` also matches a missing field)."""
    return {} if generation is None else {"claim_generation": {"$not": {"$gt": generation}}}


def unprocessed_filter(include_failed: bool) -> dict[str, Any]:
    """Documents waiting for classification: status pending or absent (and failed, when asked)."""
    statuses: list[Any] = [STATUS_PENDING, None]
    if include_failed:
        statuses.append(STATUS_FAILED)
    return {"status": {"$in": statuses}}


def unreachable_error(uri: str, error: PyMongoError) -> StorageUnavailableError:
    # The driver's message goes on with timeouts and a topology dump: keep its first clause.
    first_line = re.split(r", Timeout: | \(configured timeouts|\n", str(error))[0]
    return StorageUnavailableError(
        f"Cannot reach MongoDB at {redact_url(uri)}: {first_line}",
        hint="Start MongoDB, or set MONGODB_CONNECTION_STRING ('embedded' for a local development database).",
    )


def _client_options(settings: Settings, appname: str) -> dict[str, Any]:
    """Options of every client: timeouts from MONGODB_TIMEOUT_MS (a server that stops answering
    must not hang anything), an application name (server logs, failpoints), aware datetimes."""
    return {
        "serverSelectionTimeoutMS": settings.mongodb_timeout_ms,
        "connectTimeoutMS": min(settings.mongodb_timeout_ms, 20000),
        "socketTimeoutMS": settings.mongodb_timeout_ms,
        "appname": appname,
        "tz_aware": True,
    }


def invalid_uri_error(uri: str, error: Exception) -> StorageUnavailableError:
    shown = redact_url(uri)
    if shown != uri:
        # PyMongo split a URI with credentials in the wrong place: its message may quote a piece of
        # the password ('Bad database name "word@host/db"' for an unencoded '/'). Its type only.
        return StorageUnavailableError(
            f"Invalid MongoDB connection string {shown!r}: PyMongo cannot parse it ({type(error).__name__}).",
            hint="Fix MONGODB_CONNECTION_STRING (mongodb://user:password@host:27017); percent-encode special "
            "characters of the user name and password (/ as %2F, @ as %40, : as %3A).",
        )
    return StorageUnavailableError(
        f"Invalid MongoDB connection string {shown!r}: {error}",
        hint="Fix MONGODB_CONNECTION_STRING (mongodb://host:27017 or 'embedded').",
    )


@contextmanager
def mongo_connection(settings: Settings, appname: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The one way to reach the configured MongoDB, for synchronous and asynchronous clients alike:
    the connection string (the embedded database's, started for the duration, when configured) and
    the client options of :func:`_client_options`."""
    options = _client_options(settings, appname)
    if settings.uses_embedded_database:
        with embedded_database(settings) as uri:
            yield uri, options
    else:
        yield settings.mongodb_connection_string.strip(), options


@contextmanager
def sync_database(settings: Settings, *, appname: str = "support-classifier-tools") -> Iterator[Database[Any]]:
    """The configured database over a synchronous client, for the scripts (import, report).

    Starts the embedded database when configured, checks MongoDB answers (raising
    :class:`StorageUnavailableError` with a clear message otherwise) and closes the client.
    """
    with mongo_connection(settings, appname) as (uri, options), _sync_client(settings, uri, options) as database:
        yield database


@contextmanager
def _sync_client(settings: Settings, uri: str, options: dict[str, Any]) -> Iterator[Database[Any]]:
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(uri, **options)
    except (PyMongoError, ValueError, TypeError) as e:
        raise invalid_uri_error(uri, e) from e
    try:
        try:
            with pymongo.timeout(min(PING_TIMEOUT_SECONDS, settings.mongodb_timeout_ms / 1000)):
                client.admin.command("ping")
        except PyMongoError as e:
            raise unreachable_error(uri, e) from e
        yield client[settings.mongodb_database_name]
    finally:
        client.close()


def mongodb_address(uri: str) -> str:
    """The servers a connection string names, spelled one way (no credentials, options or path):
    ``localhost:27017``, ``mongodb://localhost`` and ``mongodb://user:pass@LOCALHOST:27017/?w=1`` are all
    ``mongodb://localhost:27017``."""
    scheme, sep, rest = uri.strip().partition("://")
    if not sep:  # PyMongo takes a bare host[:port] list too
        scheme, rest = "mongodb", uri.strip()
    scheme = scheme.lower()
    authority = rest.split("?", 1)[0].rpartition("@")[2].split("/", 1)[0]
    hosts = []
    for host in filter(None, (h.strip().lower() for h in authority.split(","))):
        if scheme == "mongodb" and not re.search(r":\d+$", host) and not host.endswith(".sock"):
            host += ":27017"
        hosts.append(host)
    return f"{scheme}://{','.join(sorted(hosts))}"


def data_identity(settings: Settings) -> str:
    """A stable name for the source and results collections (no password), to tie batch files to them."""
    if settings.uses_embedded_database:
        where = f"embedded:{Path(settings.embedded_db_path).resolve()}"
    else:
        where = mongodb_address(settings.mongodb_connection_string)
    return (
        f"{where} {settings.mongodb_database_name}."
        f"{settings.mongodb_source_collection} -> {settings.mongodb_results_collection}"
    )


class MongoStore:
    """The source and results collections of one database."""

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], settings: Settings, *, uri: str) -> None:
        self.client = client
        self.settings = settings
        self.uri = uri
        database = client[settings.mongodb_database_name]
        self.source = database[settings.mongodb_source_collection]
        self.results = database[settings.mongodb_results_collection]

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings) -> AsyncIterator[MongoStore]:
        """Open the client (starting the embedded database when configured); close it on exit."""
        with mongo_connection(settings, BATCH_APPNAME) as (uri, options):
            async with cls._open(settings, uri, options) as store:
                yield store

    @classmethod
    @asynccontextmanager
    async def _open(cls, settings: Settings, uri: str, options: dict[str, Any]) -> AsyncIterator[MongoStore]:
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                uri, maxPoolSize=max(20, 2 * settings.batch_max_concurrent), maxIdleTimeMS=30000, **options
            )
        except (PyMongoError, ValueError, TypeError) as e:
            raise invalid_uri_error(uri, e) from e
        try:
            yield cls(client, settings, uri=uri)
        finally:
            await client.close()

    @property
    def description(self) -> str:
        """Where the data lives, for logs (password redacted)."""
        return (
            f"{redact_url(self.uri)} database {self.settings.mongodb_database_name} "
            f"({self.settings.mongodb_source_collection} -> {self.settings.mongodb_results_collection})"
        )

    async def ping(self) -> None:
        """Raise :class:`StorageUnavailableError` unless MongoDB answers within a few seconds."""
        try:
            with pymongo.timeout(min(PING_TIMEOUT_SECONDS, self.settings.mongodb_timeout_ms / 1000)):
                await self.client.admin.command("ping")
        except PyMongoError as e:
            raise unreachable_error(self.uri, e) from e

    async def ensure_indexes(self, label_fields: Iterable[str]) -> None:
        """Create the indexes of docs/architecture.md#results-and-indexes (idempotent), one per
        label field of the taxonomy among them.

        Three ``createIndexes`` commands, not one per index (15 round trips at every start, issue 19):
        the source's unique index alone, since dirty source data may refuse it (logged, the run goes
        on), then the source's other indexes, then the results'.
        """
        unique = [IndexModel(keys, **options) for keys, options in SOURCE_INDEXES if options.get("unique")]
        others = [IndexModel(keys, **options) for keys, options in SOURCE_INDEXES if not options.get("unique")]
        try:
            await self.source.create_indexes(unique)
        except OperationFailure as e:
            # Dirty source data must not stop classification; results stay unique.
            logger.warning(
                "cannot create the unique index on %s.conversation_number (%s); "
                "duplicate conversation numbers exist in the source collection",
                self.source.name, e.details.get("errmsg") if e.details else e,
            )
        except PyMongoError as e:
            raise storage_error(e, f"index creation on {self.source.name}") from e
        for collection, models in ((self.source, others),
                                   (self.results, [IndexModel(k, **o) for k, o in result_indexes(label_fields)])):
            try:
                await collection.create_indexes(models)
            except PyMongoError as e:
                raise storage_error(e, f"index creation on {collection.name}") from e

    async def result_hashes(self, ids: list[Any]) -> list[tuple[Any, str | None]]:
        """(source id, content hash) of the results that exist for ``ids`` (hash None for results
        written before content hashes)."""
        if not ids:
            return []
        try:
            cursor = self.results.find({"source_conversation_id": {"$in": ids}},
                                       projection={"source_conversation_id": 1, "content_hash": 1})
            return [(doc["source_conversation_id"], doc.get("content_hash")) async for doc in cursor]
        except PyMongoError as e:
            raise storage_error(e, "read of existing results") from e

    async def upsert_results(self, results: list[ResultDocument], created_at: datetime) -> list[bool | StorageError]:
        """Insert or update the result of each ``result.source_conversation_id`` (never a second one), unless a
        result of a newer claim is there: then nothing is written and its answer is False. One statement for
        them all (an unordered ``bulk_write``); a write the server refused alone (a validator) answers with
        its :class:`StorageError`, a failure of the whole statement is raised.

        Only the result's own fields are set (``$set``/``$setOnInsert``, never a replacement), so fields
        others add to the document (a review) survive a new classification.
        """
        if not results:
            return []
        writes = [({"source_conversation_id": result.source_conversation_id, **not_newer_than(result.claim_generation)},
                   {"$set": result.to_mongo(), "$setOnInsert": {"created_at": created_at}}) for result in results]
        answers: list[bool | StorageError] = [True] * len(writes)
        try:
            try:
                await self.results.bulk_write([UpdateOne(query, update, upsert=True) for query, update in writes],
                                              ordered=False)
                return answers
            except BulkWriteError as e:
                refused = e.details.get("writeErrors", [])
            for error in refused:
                index = int(error["index"])
                if error.get("code") == DUPLICATE_KEY:
                    # The query matched nothing and the insert hit the unique index: either a result of a
                    # newer claim is there, or a racing writer inserted first. Try once more as an update.
                    written = await self.results.update_one(*writes[index])
                    answers[index] = written.matched_count == 1
                else:
                    answers[index] = refused_write(error, "result write")
        except PyMongoError as e:
            raise storage_error(e, "result write") from e
        return answers

    async def stamp_result(self, source_id: Any, digest: str, generation: int) -> bool:
        """Mark the existing result of ``source_id`` as this claim's (its transcript unchanged): a late
        writer of an older claim can then no longer replace it. False when it is not there any more,
        has another content hash, or belongs to a newer claim."""
        try:
            stamped = await self.results.update_one(
                {"source_conversation_id": source_id, "content_hash": digest, **not_newer_than(generation)},
                {"$set": {"claim_generation": generation}},
            )
        except PyMongoError as e:
            raise storage_error(e, "result write") from e
        return stamped.matched_count == 1

    async def server_time(self) -> datetime | None:
        """The server's clock (``hello.localTime``; None when the server does not report it)."""
        try:
            reply = await self.client.admin.command("hello")
        except PyMongoError as e:
            raise storage_error(e, "read of the server's time") from e
        local_time = reply.get("localTime")
        return local_time if isinstance(local_time, datetime) else None


__all__ = [
    "MongoStore", "ProcessingMetadata", "ResultDocument", "StorageError", "sync_database", "STATUS_FAILED",
    "STATUS_PENDING", "STATUS_PROCESSED", "STATUS_PROCESSING", "STATUS_SKIPPED", "unprocessed_filter",
]


# --- driver errors ------------------------------------------------------------------------------

# Server error codes that mean "try again": network, failover, interruption, time limits.
TRANSIENT_MONGO_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50, 112, 134, 150, 317, 358}
)
# Out of disk space, exceeded memory limits: worth trying again later too.
RESOURCE_MONGO_CODES = frozenset({14031, 146, 292})


def is_transient_mongo_error(error: PyMongoError) -> bool:
    """Whether trying the same operation again later may succeed: lost connections, retryable
    labels, and the server codes above. Anything else (validation, duplicate keys) is permanent."""
    if isinstance(error, ConnectionFailure):  # AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
        return True
    if error.has_error_label("RetryableWriteError") or error.has_error_label("TransientTransactionError"):
        return True
    if isinstance(error, DuplicateKeyError):
        return False
    code = getattr(error, "code", None)
    return isinstance(error, (OperationFailure, WriteConcernError)) and (
        code in TRANSIENT_MONGO_CODES or code in RESOURCE_MONGO_CODES
    )


def refused_write(error: dict[str, Any], operation: str) -> StorageError:
    """The :class:`StorageError` of one write a ``bulk_write`` reports refused (an entry of
    ``BulkWriteError.details["writeErrors"]``): that write alone failed, not its statement."""
    return storage_error(WriteError(str(error.get("errmsg", "write error")), error.get("code"), error), operation)


def storage_error(error: PyMongoError, operation: str) -> StorageError:
    """Wrap a driver error as a :class:`StorageError` whose ``transient`` says whether to retry."""
    message = f"MongoDB {operation} failed: {error}"
    if isinstance(error, ConnectionFailure):
        return StorageUnavailableError(message)
    return StorageError(message, transient=is_transient_mongo_error(error))
