"""MongoStore.ensure_indexes against SecantusDB: every index of docs/architecture.md#results-and-indexes
in three ``createIndexes`` commands (one per index before: 15 round trips at every start of the
processor, issue 19), and dirty source data that refuses the unique index stops nothing."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from mongo_client import SOURCE_INDEXES, MongoStore, result_indexes

LABEL_FIELDS = ("intent", "topic", "sentiment")


class CreateIndexesCommands(monitoring.CommandListener):
    """Counts the ``createIndexes`` commands a client sends (PyMongo's command monitoring)."""

    def __init__(self) -> None:
        self.collections: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "createIndexes":
            self.collections.append(event.command["createIndexes"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def _ensure(make_settings: Any, mongo_uri: str, mongo_db_name: str) -> list[str]:
    """Run ensure_indexes once on the test's database; the collections of the createIndexes sent."""
    settings = make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name)
    commands = CreateIndexesCommands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[commands])
    try:
        await MongoStore(client, settings, uri=mongo_uri).ensure_indexes(LABEL_FIELDS)
    finally:
        await client.close()
    return commands.collections


def _keys(collection: Any) -> dict[tuple[tuple[str, int], ...], dict[str, Any]]:
    return {tuple(map(tuple, info["key"])): info for info in collection.index_information().values()}


async def test_every_index_in_three_commands(make_settings, mongo_uri, mongo_db_name, mongo_db) -> None:
    sent = await _ensure(make_settings, mongo_uri, mongo_db_name)

    settings = make_settings(mongodb_database_name=mongo_db_name)
    source, results = settings.mongodb_source_collection, settings.mongodb_results_collection
    assert sorted(sent) == sorted([source, source, results])
    source_indexes, result_info = _keys(mongo_db[source]), _keys(mongo_db[results])
    for keys, options in SOURCE_INDEXES:
        assert tuple(keys) in source_indexes, keys
        assert bool(source_indexes[tuple(keys)].get("unique")) == bool(options.get("unique")), keys
    for keys, options in result_indexes(LABEL_FIELDS):
        assert tuple(keys) in result_info, keys
        assert bool(result_info[tuple(keys)].get("unique")) == bool(options.get("unique")), keys
    # Again on a database that has them all: nothing changes, no error.
    await _ensure(make_settings, mongo_uri, mongo_db_name)
    assert _keys(mongo_db[source]).keys() == source_indexes.keys()


async def test_duplicate_conversation_numbers_leave_out_only_the_unique_index(
    make_settings, mongo_uri, mongo_db_name, mongo_db, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(mongodb_database_name=mongo_db_name)
    source = mongo_db[settings.mongodb_source_collection]
    source.insert_many([{"conversation_number": "7", "status": "pending"} for _ in range(2)])
    caplog.set_level(logging.WARNING, logger="mongo_client")

    await _ensure(make_settings, mongo_uri, mongo_db_name)

    assert "duplicate conversation numbers exist" in caplog.text
    source_indexes = _keys(source)
    assert (("conversation_number", 1),) not in source_indexes
    for keys, options in SOURCE_INDEXES:
        if not options.get("unique"):
            assert tuple(keys) in source_indexes, keys
    result_info = _keys(mongo_db[settings.mongodb_results_collection])
    assert all(tuple(keys) in result_info for keys, _ in result_indexes(LABEL_FIELDS))
