"""Claims between processors (issue 16): fencing tokens, bounded batch ends, server-time leases,
unique job ids, the identical-conversation cache and the lease renewal, against SecantusDB and the
fake LLM server; several processors are real processes, one of them under libfaketime.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient

import cli
import tests.test_batch_processor as batch
from aggregator import content_hash, validate_conversation
from batch_processor import BatchProcessor, new_job_id
from batch_source import BatchSource
from fakes.ollama import Reply, default_classification, last_user_content
from mongo_client import MongoStore, ProcessingMetadata, ResultDocument
from utils.identical_cache import ENTRY_OVERHEAD_BYTES, IdenticalCache, Reusable

# The processor tests' fixtures, shared (assigned rather than imported: they are parameters below).
batch_env = batch.batch_env
files_dir = batch.files_dir
start_processor = batch.start_processor
make_conversation, insert, statuses, RESULTS, SOURCE = (
    batch.make_conversation, batch.insert, batch.statuses, batch.RESULTS, batch.SOURCE)


def answer(categorization: str, delay: float | None = None) -> Any:
    """A responder answering with ``categorization`` (valid labels) after ``delay`` seconds, in the answer's
    shape: the array's first value (the default answer), or the key of an object."""

    def reply(request: dict[str, Any]) -> Reply:
        valid = default_classification(request)
        written: Any = ([categorization, *valid[1:]] if isinstance(valid, list)
                        else {**valid, "categorization": categorization})
        return Reply(content=json.dumps(written), delay=delay)

    return reply


def summary_count(output: str, label: str) -> int:
    match = re.search(rf"^  {label}\s+(\d+)", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


# --- 1. fencing: only the current claim writes a result ------------------------------------------


def test_a_late_writer_that_lost_its_claim_never_replaces_the_newer_result(start_processor, tmp_path, mongo_db,
                                                                           fake_ollama, capsys):
    # Processor A's model is slow on the old text; meanwhile the conversation is edited and reset to
    # pending, and the new text is classified (by processor B, or by A itself once it claims the
    # conversation again). A's late answer for the old text must not replace that result.
    [source_id] = insert(mongo_db, [make_conversation(1, text="@AcmeCare OLD TEXT where is my parcel")])
    old_answer, new_answer = answer("answer for the old text", delay=4.0), answer("answer for the new text")
    fake_ollama.responder = lambda r: (old_answer if "OLD TEXT" in last_user_content(r) else new_answer)(r)
    a = start_processor("--worker-id", "A", "--batch-files-dir", str(tmp_path / "a"))
    assert fake_ollama.wait_for_chats(1, timeout=60)

    edited = make_conversation(1, text="@AcmeCare NEW TEXT the parcel arrived, thanks")
    mongo_db[SOURCE].update_one({"_id": source_id}, {"$set": {"tweets": edited["tweets"], "status": "pending"}})
    assert cli.main(["--worker-id", "B", "--batch-files-dir", str(tmp_path / "b")]) == cli.EXIT_OK
    output, _ = a.communicate(timeout=60)

    assert a.returncode == cli.EXIT_OK, output
    [result] = mongo_db[RESULTS].find()
    assert result["classification"]["categorization"] == "answer for the new text"
    assert result["content_hash"] == content_hash(validate_conversation(edited))
    assert result["claim_generation"] == 2 == mongo_db[SOURCE].find_one({"_id": source_id})["claim_generation"]
    assert batch.statuses(mongo_db) == {"processed": 1}
    # A's late answer is the one lost claim; the new text was classified once (by B, or by A's next claim).
    assert summary_count(output, "lost claim") == 1
    assert summary_count(output, "classified") + summary_count(capsys.readouterr().out, "classified") == 1
    assert "claim generation 1 was no longer current at its result write" in output
    assert "OLD TEXT" not in output  # ids only


def test_a_queued_classification_is_not_written_over_an_edited_conversation(batch_env, mongo_db, fake_ollama,
                                                                            caplog):
    # A classification whose write failed waits in the retry queue; the conversation is edited and
    # reset before the next run. The paid answer is for the old text: it is classified again.
    mongo_db.create_collection(RESULTS, validator={"$jsonSchema": {"required": ["field_no_result_has"]}})
    [source_id] = insert(mongo_db, [make_conversation(1)])
    assert cli.main([]) == cli.EXIT_INCOMPLETE  # write_failed: queued with its classification
    edited = make_conversation(1, text="@AcmeCare the parcel came after all, thank you")
    mongo_db[SOURCE].update_one({"_id": source_id}, {"$set": {"tweets": edited["tweets"], "status": "pending"}})
    mongo_db.command("collMod", RESULTS, validator={})

    assert cli.main([]) == cli.EXIT_OK

    assert fake_ollama.chat_count == 2
    assert "the parcel came after all" in last_user_content(fake_ollama.chat_requests[-1])
    [result] = mongo_db[RESULTS].find()
    assert result["content_hash"] == content_hash(validate_conversation(edited))
    assert any("changed since its classification was queued" in r.message for r in caplog.records)


@contextlib.asynccontextmanager
async def result_store(settings: Any, uri: str) -> AsyncIterator[MongoStore]:
    """A MongoStore on the test database, its indexes created (the unique one on results among them)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    try:
        store = MongoStore(client, settings, uri=uri)
        await store.ensure_indexes(("intent", "topic", "sentiment"))
        yield store
    finally:
        await client.close()


def result_of(source_id: int, generation: int, label: str) -> ResultDocument:
    """A result of conversation ``source_id`` written under a claim of ``generation``."""
    metadata = ProcessingMetadata(datetime.now(UTC), "llama3", 5, "t", "job")
    return ResultDocument(str(source_id), source_id, {"categorization": label}, "sha256:x", metadata, generation)


async def test_the_result_upsert_is_fenced_by_the_claim_generation(make_settings, mongo_uri, mongo_db_name,
                                                                  mongo_db):
    # The race between a claim check and the write: the result of an older claim never replaces a
    # newer one, and fields others own (a review) survive every write.
    settings = make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name)
    async with result_store(settings, mongo_uri) as store:
        now = datetime.now(UTC)
        assert (await store.upsert_results([result_of(7, 5, "newer")], now))[0] is True
        mongo_db[RESULTS].update_one({"source_conversation_id": 7}, {"$set": {"review": {"intent": "Refund"}}})
        assert (await store.upsert_results([result_of(7, 4, "older")], now))[0] is False
        assert mongo_db[RESULTS].find_one()["classification"] == {"categorization": "newer"}
        assert (await store.upsert_results([result_of(7, 5, "same claim, written again")], now))[0] is True
        assert (await store.upsert_results([result_of(7, 6, "next claim")], now))[0] is True
        assert await store.stamp_result(7, "sha256:x", 5) is False  # an older claim cannot take it over
        [stored] = mongo_db[RESULTS].find()
        assert (stored["classification"], stored["claim_generation"]) == ({"categorization": "next claim"}, 6)
        assert stored["review"] == {"intent": "Refund"}


# --- 2. batch mode ends whatever the others hold ---------------------------------------------------


def test_two_processors_keeping_failures_in_their_retry_queues_both_end(start_processor, tmp_path, mongo_db,
                                                                        fake_ollama):
    # Each processor holds one conversation whose answers are always unusable (claimed from its
    # folder by a crashed earlier run: each takes its own, the other's lease is live), keeps it in
    # its retry queue, and then finds nothing to claim while the other holds a live claim.
    fake_ollama.responder = lambda request: Reply(content="no idea")
    folders = [tmp_path / f"w{n}" for n in range(2)]
    earlier = datetime.now(UTC) - timedelta(seconds=10)
    ids = insert(mongo_db, [make_conversation(
        n, status="processing", claimed_by=f"w{n}", claim_id=f"crashed-{n}", claim_run=f"crashed-{n}",
        claim_home=f"{socket.gethostname()}:{folders[n].resolve()}", claimed_at=earlier,
        lease_expires_at=earlier + timedelta(seconds=300)) for n in range(2)])
    processes = [start_processor("--batch-size", "1", "--worker-id", f"w{n}", "--batch-files-dir", str(folders[n]))
                 for n in range(2)]
    outputs = [p.communicate(timeout=90)[0] for p in processes]  # before the fix: both still running

    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == cli.EXIT_INCOMPLETE, output
        queued = summary_count(output, "in retry queue")
        assert queued >= 1
        assert re.search(rf"^  left +{queued} in the retry queue \({queued} llm_failed\) for the next run", output,
                         re.MULTILINE), output
    # Released at exit: anyone may take them now (their folders retry them on their next run).
    released = {"_id": {"$in": ids}, "status": "processing", "lease_expires_at": {"$lte": datetime.now(UTC)}}
    assert mongo_db[SOURCE].count_documents(released) == 2


def test_batch_mode_waits_for_a_live_claim_no_longer_than_its_lease(start_processor, tmp_path, monkeypatch,
                                                                    mongo_db, fake_ollama, capsys):
    # Another processor works on a conversation far longer than a lease and keeps renewing it: it is
    # alive and finishes it. A batch run ends after one lease of waiting, saying what it left.
    fake_ollama.responder = answer("slow", delay=40.0)
    [source_id] = insert(mongo_db, [make_conversation(1)])
    worker = start_processor("--worker-id", "slow", "--batch-files-dir", str(tmp_path / "slow"), OLLAMA_TIMEOUT="120",
                             BATCH_LEASE_SECONDS="1.5", BATCH_SHUTDOWN_GRACE_SECONDS="0.2")
    assert fake_ollama.wait_for_chats(1, timeout=60)
    monkeypatch.setenv("BATCH_LEASE_SECONDS", "1.5")

    assert cli.main(["--worker-id", "me"]) == cli.EXIT_OK

    # Ended while the other processor still held its (renewed) claim: it did not wait for the answer.
    doc = mongo_db[SOURCE].find_one({"_id": source_id})
    assert (doc["status"], doc.get("claimed_by")) == ("processing", "slow")
    assert "other processors hold 1 (1 being worked on, 0 in their retry queues)" in capsys.readouterr().out
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=60)


# --- 3. leases follow the database server's clock --------------------------------------------------


def faketime_command() -> list[str]:
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime; .ci/run installs it)")
    return [faketime, "-f"]


def test_a_processor_whose_clock_is_ahead_never_takes_live_claims(batch_env, tmp_path, mongo_db, fake_ollama):
    command = faketime_command()
    ids = insert(mongo_db, [make_conversation(i) for i in range(4)])
    fake_ollama.latency = 15.0  # the honest processor holds its claims (renewed) until well after the other starts
    env = {"BATCH_LEASE_SECONDS": "10", "OLLAMA_TIMEOUT": "60"}
    processes = [subprocess.Popen([sys.executable, str(batch.ROOT / "batch_processor.py"), "--max-concurrent", "4",
                                   "--worker-id", "honest", "--batch-files-dir", str(tmp_path / "honest")],
                                  cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]
    try:
        batch.wait_until(lambda: batch.statuses(mongo_db).get("processing") == 4, timeout=60,
                         what="the honest processor's claims")
        # 70 s ahead: its own clock calls every lease of the honest processor (10 s) expired.
        processes.append(subprocess.Popen(
            [*command, "+70s", sys.executable, str(batch.ROOT / "batch_processor.py"), "--worker-id", "skewed",
             "--batch-files-dir", str(tmp_path / "skewed")],
            cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == cli.EXIT_OK, output
    assert fake_ollama.chat_count == 4  # nothing taken over and classified twice
    assert "s ahead of the database server's: leases follow the server's" in outputs[1], outputs[1]
    assert batch.results_per_source(mongo_db) == {i: 1 for i in ids}
    [honest_job] = re.findall(r"^Job (batch_\S+) completed", outputs[0], re.MULTILINE)
    assert {r["processing_metadata"]["batch_job_id"] for r in mongo_db[RESULTS].find()} == {honest_job}


# --- 4. job ids ----------------------------------------------------------------------------------


def test_processors_started_in_the_same_second_get_their_own_job_ids():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ids = {new_job_id(now) for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"batch_20260102_030405_[0-9a-f]{6}", job_id) for job_id in ids)


# --- 5. the identical-conversation cache keeps only what reuse needs ------------------------------------


def deep_size(root: Any) -> int:
    """Bytes of the objects reachable from ``root`` (not through classes, modules, functions or the loop)."""
    stop = (type, type(sys), type(deep_size), asyncio.AbstractEventLoop)
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, stop):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def test_the_identical_conversation_cache_keeps_labels_not_transcripts(batch_env, monkeypatch, mongo_db,
                                                                       fake_ollama):
    processors: list[BatchProcessor] = []

    class Kept(BatchProcessor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            processors.append(self)

    monkeypatch.setattr(cli, "BatchProcessor", Kept)
    long_text = "@AcmeCare " + "my order has not arrived and nobody answers my emails " * 150  # ~8 KB
    insert(mongo_db, [make_conversation(i, text=f"{long_text} ({i})") for i in range(6)])

    assert cli.main([]) == cli.EXIT_OK

    cache = processors[0].identical
    assert len(cache) == 6
    per_entry = deep_size(cache) / len(cache)
    assert per_entry < 4096, f"{per_entry:.0f} bytes per entry: more than labels, confidences and counts"
    assert 0 < cache.bytes <= cache.max_bytes


async def test_the_identical_conversation_cache_is_bounded_in_bytes():
    entry = Reusable(1, {"intent": "Order Status", "categorization": "x" * 200}, "llama3", {"prompt_tokens": 9})
    cache = IdenticalCache(max_entries=100, max_bytes=3 * entry.size())
    for n in range(5):
        future = cache.begin(f"sha256:{n}")
        cache.finish(f"sha256:{n}", future, Reusable(n, entry.classification, entry.model, entry.llm_tokens))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("sha256:0") is None and cache.get("sha256:4") is not None  # oldest out first
    failed = cache.begin("sha256:failed")
    cache.finish("sha256:failed", failed, None)  # a failure is not remembered: the next one classifies
    assert cache.get("sha256:failed") is None and await failed is None
    assert entry.size() > ENTRY_OVERHEAD_BYTES


# --- 6. lease renewal never takes the end of the run down with it -------------------------------------


def test_a_renewal_that_fails_unexpectedly_is_logged_and_claims_are_still_released(
    batch_env, monkeypatch, mongo_db, fake_ollama, caplog
):
    async def broken_renew(self: BatchSource) -> int:
        raise RuntimeError("a bug in the renewal")

    monkeypatch.setattr(BatchSource, "renew", broken_renew)
    monkeypatch.setenv("BATCH_LEASE_SECONDS", "3")  # renewed every second; the run lasts longer
    fake_ollama.latency = 1.5
    fake_ollama.responder = lambda r: Reply(content="no idea") if "UNUSABLE" in last_user_content(r) else None
    [good, queued] = insert(mongo_db, [make_conversation(1), make_conversation(2, text="@AcmeCare UNUSABLE")])

    assert cli.main([]) == cli.EXIT_INCOMPLETE  # not a crash: the one left is in the retry queue

    failures = [r for r in caplog.records if "lease renewal failed unexpectedly" in r.message]
    assert failures and failures[0].exc_info and "a bug in the renewal" in str(failures[0].exc_info[1])
    assert mongo_db[SOURCE].find_one({"_id": good})["status"] == "processed"
    released = {"_id": queued, "status": "processing", "lease_expires_at": {"$lte": datetime.now(UTC)}}
    assert mongo_db[SOURCE].count_documents(released) == 1


@pytest.mark.timeout(90)
def test_the_run_ends_although_a_renewal_swallows_its_cancellation(batch_env, monkeypatch, mongo_db,
                                                                   fake_ollama):
    # On Python 3.11 asyncio.wait_for (in PyMongo's send) can lose a cancellation that lands as the
    # send completes (CPython gh-86296): a renewal must never need cancelling for the run to end.
    async def renew_losing_a_cancel(self: BatchSource) -> int:
        with contextlib.suppress(asyncio.CancelledError):  # what the race does: the cancellation is gone
            await asyncio.sleep(1.0)
        return 0

    monkeypatch.setattr(BatchSource, "renew", renew_losing_a_cancel)
    monkeypatch.setenv("BATCH_LEASE_SECONDS", "0.03")  # so the end of the run always finds a renewal going on
    insert(mongo_db, [make_conversation(1)])

    assert cli.main(["--limit", "1"]) == cli.EXIT_OK  # before the fix: waits for ever on the renewal task


