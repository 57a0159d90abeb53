"""Continuous mode's wake-up on change streams, against SecantusDB (which has them).

Unit tests drive :class:`utils.change_watch.ChangeWatcher` over a real AsyncMongoClient (faults
injected with SecantusDB's ``configureFailPoint``); the last test runs the real processor in
continuous mode with a 600 s poll interval and sees a conversation inserted while it waits
classified long before that.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from config import Settings, env_name
from fakes.ollama import FakeOllama
from utils.change_watch import ChangeWatcher

ROOT = Path(__file__).resolve().parents[1]
APP = "change-watch-test"
WAIT = 60.0  # generous: the machine is shared; nothing here depends on speed


@pytest.fixture
async def source(mongo_uri: str, mongo_db_name: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, appname=APP,
                                                                serverSelectionTimeoutMS=5000)
    try:
        yield client[mongo_db_name]["conversation_set"]
    finally:
        await client.close()


def fail_point(mongo_db: Any, mode: Any, **data: Any) -> None:
    mongo_db.client.admin.command("configureFailPoint", "failCommand", mode=mode, data={"appName": APP, **data})


async def next_wake(watcher: ChangeWatcher) -> str:
    return await watcher.wait(asyncio.Event(), WAIT)


async def test_wakes_on_work_for_the_processor_and_only_on_it(source: Any, mongo_db: Any) -> None:
    async with ChangeWatcher(source) as watcher:
        assert watcher.supported is True
        # The processor's own status changes, and documents it will not read, are filtered out.
        done = mongo_db["conversation_set"].insert_one({"conversation_number": "1", "status": "processed"}).inserted_id
        mongo_db["conversation_set"].update_one({"_id": done}, {"$set": {"status": "failed"}})
        new = mongo_db["conversation_set"].insert_one({"conversation_number": "2", "status": "pending"}).inserted_id
        assert await next_wake(watcher) == "change"
        assert (watcher.events, watcher.last_document_key) == (1, new)

        mongo_db["conversation_set"].update_one({"_id": new}, {"$set": {"status": "processing"}})
        mongo_db["conversation_set"].update_one({"_id": done}, {"$set": {"status": "pending"}})  # set back to pending
        assert await next_wake(watcher) == "change"
        assert (watcher.events, watcher.last_document_key) == (2, done)

        no_status = mongo_db["conversation_set"].insert_one({"conversation_number": "3"}).inserted_id
        assert await next_wake(watcher) == "change"
        assert (watcher.events, watcher.last_document_key) == (3, no_status)


async def test_a_reset_to_no_status_wakes_it_too(source: Any, mongo_db: Any) -> None:
    # "pending, or no status" is what waits for classification: $unset and null reset it as well.
    collection = mongo_db["conversation_set"]
    first, second = collection.insert_many([{"conversation_number": str(n), "status": "processed"}
                                            for n in (1, 2)]).inserted_ids
    async with ChangeWatcher(source) as watcher:
        collection.update_one({"_id": first}, {"$set": {"lease_expires_at": 1}})  # leaves status alone: no wake
        collection.update_one({"_id": first}, {"$unset": {"status": ""}})
        assert await watcher.wait(asyncio.Event(), 20) == "change"
        assert (watcher.events, watcher.last_document_key) == (1, first)
        collection.update_one({"_id": second}, {"$set": {"status": None}})
        assert await watcher.wait(asyncio.Event(), 20) == "change"
        assert (watcher.events, watcher.last_document_key) == (2, second)


class LosesACancellation:
    """The real collection, whose change streams lose the first cancellation of a read: what PyMongo's
    do on Python 3.11 when it lands as a getMore's send completes (asyncio.wait_for, CPython gh-86296;
    seen as a processor that never exited after SIGTERM)."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection
        self.name = collection.name
        self.lost = 0

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        return _Stream(await self.collection.watch(*args, **kwargs), self)


class _Stream:
    def __init__(self, stream: Any, owner: LosesACancellation) -> None:
        self.stream = stream
        self.owner = owner

    @property
    def alive(self) -> bool:
        return bool(self.stream.alive)

    @property
    def resume_token(self) -> Any:
        return self.stream.resume_token

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stream.close()

    async def try_next(self) -> Any:
        read = asyncio.ensure_future(self.stream.try_next())
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            if self.owner.lost:
                read.cancel()
                raise
            self.owner.lost += 1
            return await read  # the cancellation is gone; the read completes

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        while True:
            change = await self.try_next()
            if change is not None:
                return change


async def test_it_closes_although_a_read_loses_its_cancellation(source: Any) -> None:
    flaky = LosesACancellation(source)
    watcher = ChangeWatcher(flaky)
    await watcher.__aenter__()
    assert watcher.supported is True
    await asyncio.sleep(0.3)  # reading
    closing = asyncio.ensure_future(watcher.__aexit__(None, None, None))
    done, _ = await asyncio.wait({closing}, timeout=20)
    if not done:  # before the fix: the cancelled watch read on, and closing waited for it for ever
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
    assert done, "the watcher did not close"


async def test_wait_ends_on_stop_or_timeout_when_nothing_changes(source: Any) -> None:
    async with ChangeWatcher(source) as watcher:
        assert await watcher.wait(asyncio.Event(), 0.2) == "timeout"
        stop = asyncio.Event()
        stop.set()
        assert await watcher.wait(stop, WAIT) == "stop"


async def test_a_server_without_change_streams_means_polling(source: Any, mongo_db: Any) -> None:
    # What a standalone mongod answers to $changeStream.
    fail_point(mongo_db, "alwaysOn", failCommands=["aggregate"], errorCode=40573,
               errmsg="The $changeStream stage is only supported on replica sets")
    try:
        async with ChangeWatcher(source) as watcher:
            assert watcher.supported is False
            mongo_db["conversation_set"].insert_one({"conversation_number": "1", "status": "pending"})
            assert await watcher.wait(asyncio.Event(), 0.5) == "timeout"  # the poll interval, as before
    finally:
        fail_point(mongo_db, "off")


async def test_disabled_watcher_polls_without_opening_a_stream(source: Any) -> None:
    async with ChangeWatcher(source, enabled=False) as watcher:
        assert watcher.supported is False
        assert await watcher.wait(asyncio.Event(), 0.2) == "timeout"


async def test_after_a_lost_connection_it_resumes_with_its_token(source: Any, mongo_db: Any) -> None:
    async with ChangeWatcher(source, retry_delays=(0.2,)) as watcher:
        first = mongo_db["conversation_set"].insert_one({"conversation_number": "1"}).inserted_id
        assert await next_wake(watcher) == "change"
        assert watcher.last_document_key == first and watcher.resume_token is not None
        # The watcher's connections break (reads and the driver's own resume attempt) until told otherwise.
        fail_point(mongo_db, "alwaysOn", failCommands=["getMore", "aggregate"], closeConnection=True)
        try:
            deadline = time.monotonic() + WAIT
            while not watcher.interruptions:
                assert time.monotonic() < deadline, "the watcher never noticed the lost connection"
                await asyncio.sleep(0.05)
            # Inserted while the watcher cannot read: only a resumed stream can report it.
            missed = mongo_db["conversation_set"].insert_one({"conversation_number": "2"}).inserted_id
        finally:
            fail_point(mongo_db, "off")
        deadline = time.monotonic() + WAIT
        while watcher.last_document_key != missed:
            assert time.monotonic() < deadline, "the change made while away was never reported"
            await asyncio.wait_for(next_wake(watcher), WAIT)
        assert watcher.reconnects >= 1
        assert watcher.events == 2


# --- the real processor in continuous mode ------------------------------------------------------
@pytest.fixture
def processor_env(tmp_path: Path, mongo_uri: str, mongo_db_name: str, fake_ollama: FakeOllama) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in {env_name(n) for n in Settings.model_fields}}
    env.update({
        "MONGODB_CONNECTION_STRING": mongo_uri,
        "MONGODB_DATABASE_NAME": mongo_db_name,
        "LLM_ENDPOINT": fake_ollama.url,
        "BATCH_FILES_DIR": str(tmp_path / "batch_files"),
        "BATCH_MONITORING_MODE": "production",
        "MONGODB_TIMEOUT_MS": "5000",
    })
    return env


@pytest.fixture
def run_processor(tmp_path: Path, processor_env: dict[str, str]) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*args: str) -> Running:
        running = Running(subprocess.Popen(
            [sys.executable, str(ROOT / "batch_processor.py"), *args], cwd=tmp_path, env=processor_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


class Running:
    """A processor process whose output is read as it comes (to see when it waits)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def saw(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def conversation(i: int) -> dict[str, Any]:
    return {"conversation_number": str(i), "status": "pending",
            "messages": [{"sender": "customer", "text": f"Where is my order {i}?"}]}


def test_continuous_mode_wakes_on_an_insert_long_before_the_poll_interval(
    run_processor: Callable[..., Running], mongo_db: Any
) -> None:
    mongo_db["conversation_set"].insert_many([conversation(i) for i in range(3)])
    running = run_processor("--mode", "continuous", "--poll-interval", "600", "--verbose")
    idle = "no new conversations; waiting for a change"
    wait_until(lambda: running.saw(idle) >= 1, "the processor to finish the first conversations and wait")
    assert mongo_db["sentimental_analysis"].count_documents({}) == 3
    assert running.saw("continuous mode wakes on change streams of conversation_set")

    # The processor now sleeps for up to 600 s; only the change stream can wake it within the test.
    late = mongo_db["conversation_set"].insert_one(conversation(99)).inserted_id
    wait_until(lambda: mongo_db["sentimental_analysis"].find_one({"source_conversation_id": late}),
               "the conversation inserted while the processor waited")
    # The result is written first, then the source is marked processed (a crash between the two
    # re-classifies; it never loses a result), so the status may trail the result by a moment.
    wait_until(lambda: mongo_db["conversation_set"].find_one({"_id": late})["status"] == "processed",
               "the source marked processed")
    wait_until(lambda: running.saw(idle) >= 2, "the processor to wait again")
    running.stop()
    assert running.process.returncode == 0, "".join(running.lines[-30:])


def test_wakeup_benchmark_smoke_run() -> None:
    """scripts/bench_wakeup.py at tiny sizes, so it never rots (its numbers mean nothing here).
    Run as documented: ``python -m scripts.bench_wakeup`` from the project root (it uses the fake)."""
    done = subprocess.run([sys.executable, "-m", "scripts.bench_wakeup", "--inserts", "1", "--poll-interval", "0.5"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| polling every 0.5 s |" in done.stdout and "| change streams |" in done.stdout
    assert "median ratio polling / change streams" in done.stdout
