"""The batch processor's command line (cli.py) against real servers: what a user sees when the
batch files folder is damaged, unusable or shared, and which database a folder belongs to."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from bson import ObjectId

import cli
from tests.test_batch_processor import (  # noqa: F401 (fixtures)
    SOURCE,
    batch_env,
    files_dir,
    insert,
    make_conversation,
    statuses,
)
from utils.batch_file_manager import BatchConversation, BatchFileManager, PendingBatch


def _pending(files: BatchFileManager, number: int, docs: list[dict], ids: list[ObjectId]) -> Path:
    conversations = [
        BatchConversation(str(i), {k: d[k] for k in ("conversation_number", "tweets")}) for d, i in zip(docs, ids)
    ]
    return files.write_pending(PendingBatch(number, "batch_earlier", conversations))


def test_a_truncated_batch_file_is_quarantined_and_the_run_goes_on(batch_env, files_dir, mongo_db, fake_ollama,
                                                                   caplog):
    docs = [make_conversation(i, status="processing") for i in range(3)]
    ids = insert(mongo_db, docs)
    files = BatchFileManager(files_dir)
    files.prepare()
    damaged = _pending(files, 1, docs[:2], ids[:2])
    truncated = damaged.read_bytes()[:100]
    damaged.write_bytes(truncated)
    _pending(files, 2, docs[2:], ids[2:])
    caplog.set_level(logging.WARNING)

    assert cli.main([]) == cli.EXIT_OK
    assert (files_dir / "quarantine" / "batch_001_pending.json").read_bytes() == truncated
    assert not damaged.exists()
    assert any("batch_001_pending.json" in r.message and "quarantine" in r.message for r in caplog.records)
    assert mongo_db[SOURCE].find_one({"_id": ids[2]})["status"] == "processed"
    # The quarantined batch's conversations wait in 'processing' until --retry-failed takes them.
    assert statuses(mongo_db) == {"processing": 2, "processed": 1}
    assert cli.main(["--retry-failed"]) == cli.EXIT_OK
    assert statuses(mongo_db) == {"processed": 3}
    assert (files_dir / "quarantine" / "batch_001_pending.json").exists()  # kept, never deleted
