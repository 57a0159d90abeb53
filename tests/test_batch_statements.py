"""The database work one conversation costs the batch processor, counted on the server (issue 19:
the processor's extra statements were most of SecantusDB's CPU, and its throughput's gap to a minimal
script). Counts, never times: the server's ``serverStatus.opcounters`` before and after a real run.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import cli
import tests.test_batch_processor as batch
from batch_source import BatchSource, Claim
from tests.test_batch_claims import result_of, result_store
from utils.group_commit import GroupCommit

batch_env, files_dir = batch.batch_env, batch.files_dir
make_conversation, insert, statuses = batch.make_conversation, batch.insert, batch.statuses

#: Statements on collections (commands such as hello, heartbeats and index creation are not counted).
STATEMENTS = ("insert", "query", "update", "delete", "getmore")


def opcounters(db: Any) -> Counter[str]:
    counters = db.client.admin.command("serverStatus")["opcounters"]
    return Counter({name: int(counters[name]) for name in STATEMENTS})


def test_results_and_statuses_of_conversations_ready_together_are_written_together(batch_env, mongo_db,
                                                                                   fake_ollama):
    # Ten conversations at a time, their answers coming back together: their claim checks, result
    # upserts and status updates go to the database as one statement per group, not one per
    # conversation (three each before: a claim check, the upsert, the status update).
    n = 40
    fake_ollama.latency = 0.05
    insert(mongo_db, [make_conversation(i) for i in range(n)])
    before = opcounters(mongo_db)

    assert cli.main(["--max-concurrent", "10"]) == cli.EXIT_OK

    spent = opcounters(mongo_db) - before
    assert statuses(mongo_db) == {"processed": n}
    assert mongo_db[batch.RESULTS].count_documents({}) == n
    assert sum(spent.values()) / n <= 2.0, spent


# --- a group with a lost claim in it: each write still gets its own answer -------------------------


async def test_in_a_group_only_the_writes_whose_claim_was_lost_are_dropped(make_settings, mongo_uri, mongo_db_name,
                                                                           mongo_db):
    settings = make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name)
    async with result_store(settings, mongo_uri) as store:
        source = BatchSource(store, worker_id="w", home="h:/b", job_id="job", lease_seconds=60)
        await source.sync_clock()
        insert(mongo_db, [make_conversation(i, _id=i) for i in range(4)])
        token, won = await source.claim(4)
        claims = {doc["_id"]: Claim(token, doc["claim_generation"]) for doc in won}
        # Conversation 1 is reset by a user, 2 taken over by another claim (a newer generation).
        mongo_db[batch.SOURCE].update_one({"_id": 1}, {"$set": {"status": "pending"}, "$unset": {"claim_id": ""}})
        mongo_db[batch.SOURCE].update_one({"_id": 2}, {"$set": {"claim_id": "other"}, "$inc": {"claim_generation": 1}})

        assert await source.held([(i, claims[i]) for i in range(4)]) == [True, False, False, True]

        await store.upsert_results([result_of(3, claims[3].generation + 1, "newer")], datetime.now(UTC))
        written = await store.upsert_results([result_of(i, claims[i].generation, "mine") for i in (0, 3)],
                                             datetime.now(UTC))
        assert written == [True, False]  # 3: a result of a newer claim is there

        # Sent at once, the four go as one statement; each still answers for itself.
        finished = await asyncio.gather(*(source.finish(i, claims[i], "processed") for i in range(4)))
        assert finished == [True, False, False, True]
        assert (source._finishes.groups, source._finishes.writes) == (1, 4)
        assert statuses(mongo_db) == {"processed": 2, "pending": 1, "processing": 1}


# --- GroupCommit: pure logic --------------------------------------------------------------------------


def test_writes_arriving_during_a_flush_go_in_the_next_one_and_each_gets_its_answer() -> None:
    sent: list[list[int]] = []

    async def flush(writes: list[int]) -> list[int | BaseException]:
        sent.append(writes)
        await asyncio.sleep(0.01)
        return [ValueError(w) if w == 3 else w * 10 for w in writes]

    async def run() -> list[Any]:
        group: GroupCommit[int, int] = GroupCommit(flush)
        return await asyncio.gather(*(group.submit(i) for i in range(5)), return_exceptions=True)

    answers = asyncio.run(run())
    assert sent == [[0, 1, 2, 3, 4]]  # submitted in one tick: one group
    assert answers[:3] == [0, 10, 20] and isinstance(answers[3], ValueError) and answers[4] == 40


def test_a_failed_flush_fails_its_group_only_and_a_cancelled_caller_is_left_out() -> None:
    sent: list[list[str]] = []

    async def flush(writes: list[str]) -> list[str | BaseException]:
        sent.append(writes)
        await asyncio.sleep(0.01)
        if "bad" in writes:
            raise ConnectionError("lost")
        return writes

    async def run() -> tuple[Any, Any, Any]:
        group: GroupCommit[str, str] = GroupCommit(flush)
        first = asyncio.ensure_future(group.submit("bad"))
        await asyncio.sleep(0)  # the first group is on its way
        cancelled = asyncio.ensure_future(group.submit("gone"))
        second = asyncio.ensure_future(group.submit("good"))
        await asyncio.sleep(0)
        cancelled.cancel()
        return await asyncio.gather(first, second, return_exceptions=True), cancelled.cancelled(), group.groups

    (first, second), was_cancelled, groups = asyncio.run(run())
    assert isinstance(first, ConnectionError) and second == "good" and was_cancelled
    assert sent == [["bad"], ["good"]] and groups == 2
