"""The pool of LLM servers (llm_pool.py) against several real fake-Ollama servers on loopback.

Routing, per-server circuit breakers, failover and readiness are checked with counts and
distributions (which server answered how many calls), never with timings. The AIMD controller
is pure logic with an injected clock.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from aggregator import ConversationIn
from async_llm_wrapper import AsyncLLMClient
from classifier import ConversationClassifier
from config import Settings, load_settings
from config.settings import AUTO_CONCURRENCY_CEILING
from error_handler import (
    ConfigError,
    InputError,
    LLMBusyError,
    LLMOutputError,
    LLMRequestRejectedError,
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    ModelNotFoundError,
    StorageUnavailableError,
)
from fakes.ollama import BUSY, RUNNER_CRASHED, FakeOllama, Reply
from llm_pool import (
    AdaptiveLimiter,
    AsyncLLMPool,
    ConcurrencyController,
    LLMPool,
    concurrency_limit,
    counts_against_server,
    server_name,
)
from llm_wrapper import LLMClient
from utils.circuit_breaker import CircuitState

SCHEMA: dict[str, Any] = {"type": "object"}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"conversation {i}"}]


def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def settings_for(*urls: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"llm_endpoint": ",".join(urls), "ollama_timeout": 5,
                              "circuit_breaker_failure_threshold": 2, "circuit_breaker_recovery_seconds": 60}
    values.update(overrides)
    return load_settings(values, environ={}, env_file=None)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    servers = [FakeOllama().start() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- settings -------------------------------------------------------------------------------------


def test_one_endpoint_works_as_before() -> None:
    settings = settings_for("http://localhost:11434/")
    assert settings.llm_endpoint == "http://localhost:11434"
    assert settings.llm_endpoints == ["http://localhost:11434"]


def test_a_comma_separated_list_names_several_servers() -> None:
    settings = settings_for("http://a:11434 ", " http://b:11434/", "https://c")
    assert settings.llm_endpoints == ["http://a:11434", "http://b:11434", "https://c"]


@pytest.mark.parametrize("value", ["http://a:1,b:2", "http://a:1,,http://b:2", "http://a:1,http://a:1/", " , "])
def test_a_bad_list_is_a_clear_configuration_error(value: str) -> None:
    with pytest.raises(ConfigError, match="LLM_ENDPOINT"):
        load_settings({}, environ={"LLM_ENDPOINT": value}, env_file=None)


def test_max_concurrent_auto_turns_the_controller_on_with_a_ceiling() -> None:
    settings = load_settings({}, environ={"BATCH_MAX_CONCURRENT": "auto"}, env_file=None)
    assert settings.batch_auto_concurrency is True
    assert settings.batch_max_concurrent == AUTO_CONCURRENCY_CEILING
    assert load_settings({}, environ={"BATCH_MAX_CONCURRENT": "8"}, env_file=None).batch_auto_concurrency is False


def test_server_names_carry_no_credentials_or_path() -> None:
    assert server_name("http://user:secret@gpu1.internal:11434/v1") == "http://gpu1.internal:11434"
    assert server_name("https://llm.example.com") == "https://llm.example.com:443"
    assert server_name("http://[::1]:8080") == "http://[::1]:8080"


# --- the fake's OLLAMA_NUM_PARALLEL -----------------------------------------------------------------


def test_the_fake_serves_a_fixed_number_at_a_time_and_answers_busy_beyond_its_queue() -> None:
    with FakeOllama(latency=0.2, parallel=2, max_queue=2) as fake:
        settings = settings_for(fake.url)
        with LLMClient(settings) as client, ThreadPoolExecutor(8) as threads:
            outcomes = list(threads.map(lambda i: _outcome(client, i), range(8)))
        assert fake.max_in_flight == 2
        assert outcomes.count("busy") == fake.busy_count >= 1
        assert outcomes.count("ok") == 8 - fake.busy_count


def _outcome(client: LLMClient, i: int) -> str:
    try:
        client.chat(messages(i), SCHEMA)
    except LLMServerError:
        return "error"
    except Exception as e:  # noqa: BLE001 (the test sorts the outcomes)
        return "busy" if getattr(e, "code", "") == "llm_busy" else repr(e)
    return "ok"


# --- routing ---------------------------------------------------------------------------------------


async def test_each_call_goes_to_the_server_with_the_fewest_in_flight(fakes: list[FakeOllama]) -> None:
    first, second, _ = fakes
    first.enqueue(Reply(delay=1.0))  # the first call holds the first server
    async with AsyncLLMPool(settings_for(first.url, second.url), AsyncLLMClient) as pool:
        slow = asyncio.ensure_future(pool.chat(messages(0), SCHEMA))
        assert await asyncio.to_thread(first.wait_for_chats, 1)
        for i in range(1, 5):  # one at a time: the second server has 0 in flight, the first 1
            await pool.chat(messages(i), SCHEMA)
        await slow
        assert (first.chat_count, second.chat_count) == (1, 4)
        assert pool.distribution() == {server_name(first.url): 1, server_name(second.url): 4}


async def test_concurrent_calls_are_spread_over_the_servers(fakes: list[FakeOllama]) -> None:
    for fake in fakes:
        fake.latency = 0.05
    async with AsyncLLMPool(settings_for(*(f.url for f in fakes)), AsyncLLMClient) as pool:
        await asyncio.gather(*(pool.chat(messages(i), SCHEMA) for i in range(30)))
    assert [f.chat_count for f in fakes] == [10, 10, 10]


def test_the_sync_pool_routes_worker_threads_too(fakes: list[FakeOllama]) -> None:
    for fake in fakes[:2]:
        fake.latency = 0.05
    with LLMPool(settings_for(fakes[0].url, fakes[1].url), LLMClient) as pool, ThreadPoolExecutor(6) as threads:
        list(threads.map(lambda i: pool.chat(messages(i), SCHEMA), range(24)))
        assert sum(pool.distribution().values()) == 24
    assert fakes[0].chat_count >= 6 and fakes[1].chat_count >= 6
    assert fakes[0].chat_count + fakes[1].chat_count == 24


async def test_the_classifier_uses_a_pool_as_it_uses_a_client(fakes: list[FakeOllama]) -> None:
    settings = settings_for(fakes[0].url, fakes[1].url)
    classifier = ConversationClassifier.from_settings(settings)
    conversation = ConversationIn.model_validate(
        {"conversation_number": "7", "messages": [{"sender": "customer", "text": "Where is my parcel?"}]}
    )
    async with AsyncLLMPool(settings, AsyncLLMClient) as pool:
        outcome = await classifier.classify_async(conversation, pool)
    with LLMPool(settings, LLMClient) as pool:
        assert classifier.classify(conversation, pool).classification == outcome.classification


# --- dead, busy and recovering servers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (LLMUnavailableError("down"), True),
        (LLMTimeoutError("slow"), True),
        (LLMServerError("500"), True),
        (LLMBusyError("busy"), True),
        (ModelNotFoundError("llama3", "http://localhost:11434"), True),
        (LLMRequestRejectedError("400"), True),
        (LLMOutputError("not JSON"), False),
        (StorageUnavailableError("MongoDB down"), False),
        (InputError("bad"), False),
        (TimeoutError(), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_what_counts_against_a_servers_circuit(error: BaseException, counts: bool) -> None:
    assert counts_against_server(error) is counts



async def test_a_dead_server_gets_no_share_and_no_call_fails(fakes: list[FakeOllama]) -> None:
    settings = settings_for(fakes[0].url, dead_url(), fakes[1].url)
    async with AsyncLLMPool(settings, AsyncLLMClient) as pool:
        await asyncio.gather(*(pool.chat(messages(i), SCHEMA) for i in range(20)))
        dead = pool.servers[1]
        # Calls that were already on their way when it failed twice (the threshold) failed
        # over too; then its circuit opened and no call goes there any more.
        assert dead.answered == 0 and dead.failed >= 2
        assert dead.breaker.state is CircuitState.OPEN
        refused = dead.failed
        await asyncio.gather(*(pool.chat(messages(i), SCHEMA) for i in range(20, 40)))
        assert dead.failed == refused
    assert fakes[0].chat_count + fakes[1].chat_count == 40


async def test_a_server_found_dead_at_start_up_is_skipped_from_the_first_call(fakes: list[FakeOllama]) -> None:
    settings = settings_for(dead_url(), fakes[0].url)
    async with AsyncLLMPool(settings, AsyncLLMClient) as pool:
        await pool.check_ready(pause_failed=True)  # the batch processor's start-up check; one server is enough
        statuses = await pool.readiness()
        assert [s.ready for s in statuses] == [False, True]
        assert statuses[0].circuit == "open" and "Cannot reach" in (statuses[0].error or "")
        assert "127.0.0.1" in statuses[0].as_dict()["server"]
        for i in range(5):
            await pool.chat(messages(i), SCHEMA)
        assert pool.servers[0].failed == 0 and fakes[0].chat_count == 5


async def test_readiness_reports_and_never_moves_a_breaker(fakes: list[FakeOllama]) -> None:
    # Issue 16 item 9: /ready (the sync pool's readiness) is a report; only calls move breakers.
    fakes[0].ready_delay = 2  # too slow for the readiness timeout, min(5 s, OLLAMA_TIMEOUT = 1 s)
    settings = settings_for(fakes[0].url, dead_url(), fakes[1].url, ollama_timeout=1)
    with LLMPool(settings, LLMClient) as pool:
        pool.check_ready()
        statuses = pool.readiness(require_one=True)
        assert [(s.ready, s.circuit) for s in statuses] == [(False, "closed"), (False, "closed"), (True, "closed")]
        assert "did not answer" in (statuses[0].error or "") and "Cannot reach" in (statuses[1].error or "")
    async with AsyncLLMPool(settings, AsyncLLMClient) as async_pool:
        await async_pool.check_ready()
        assert [s.breaker.state for s in async_pool.servers] == [CircuitState.CLOSED] * 3
        await async_pool.check_ready(pause_failed=True)  # only the start-up check that asks for it pauses
        assert [s.breaker.state for s in async_pool.servers] == [CircuitState.OPEN] * 2 + [CircuitState.CLOSED]


async def test_no_ready_server_raises_the_typed_error() -> None:
    async with AsyncLLMPool(settings_for(dead_url(), dead_url()), AsyncLLMClient) as pool:
        with pytest.raises(LLMUnavailableError):
            await pool.check_ready()


async def test_a_busy_servers_share_moves_to_the_others(fakes: list[FakeOllama]) -> None:
    busy, healthy, _ = fakes
    busy.responder = lambda request: BUSY
    async with AsyncLLMPool(settings_for(busy.url, healthy.url), AsyncLLMClient) as pool:
        for i in range(10):
            await pool.chat(messages(i), SCHEMA)  # refused by the busy one: sent on, never an error
        assert pool.servers[0].breaker.state is CircuitState.OPEN
    assert busy.chat_count == 2 and healthy.chat_count == 10


async def test_a_failing_servers_share_moves_away_and_comes_back_after_recovery(fakes: list[FakeOllama]) -> None:
    sick, healthy, _ = fakes
    sick.responder = lambda request: RUNNER_CRASHED
    clock = ManualClock()
    async with AsyncLLMPool(settings_for(sick.url, healthy.url), AsyncLLMClient, clock=clock) as pool:
        failures = 0
        for i in range(10):
            try:
                await pool.chat(messages(i), SCHEMA)
            except LLMServerError:  # a 500 may have done work: the caller decides whether to retry
                failures += 1
        assert failures == 2 and pool.servers[0].breaker.state is CircuitState.OPEN
        assert pool.distribution()[server_name(healthy.url)] == 8

        sick.responder = None  # the server recovers; its circuit stays open until the pause is over
        await pool.chat(messages(10), SCHEMA)
        assert sick.chat_count == 2
        clock.now += 61
        await pool.chat(messages(11), SCHEMA)  # the probe: to the paused server (nothing in flight)
        assert sick.chat_count == 3 and pool.servers[0].breaker.state is CircuitState.CLOSED
        await asyncio.gather(*(pool.chat(messages(i), SCHEMA) for i in range(12, 32)))
        assert sick.chat_count == 3 + 10 and healthy.chat_count == 9 + 10


async def test_with_every_circuit_open_a_call_probes_the_server_paused_longest(fakes: list[FakeOllama]) -> None:
    clock = ManualClock()
    settings = settings_for(fakes[0].url, fakes[1].url, circuit_breaker_failure_threshold=1)
    for fake in fakes[:2]:
        fake.responder = lambda request: RUNNER_CRASHED
    async with AsyncLLMPool(settings, AsyncLLMClient, clock=clock) as pool:
        for i in range(2):
            with pytest.raises(LLMServerError):
                await pool.chat(messages(i), SCHEMA)
            clock.now += 1
        assert [s.breaker.state for s in pool.servers] == [CircuitState.OPEN] * 2
        # Both paused: the call goes to the one whose pause ends first and gets its own typed error.
        with pytest.raises(LLMServerError, match="llama runner process has terminated"):
            await pool.chat(messages(2), SCHEMA)
        assert (fakes[0].chat_count, fakes[1].chat_count) == (2, 1)
        fakes[1].responder = None  # it came back: the next call finds out at once, no pause to sit out
        clock.now += 1
        await pool.chat(messages(3), SCHEMA)
        assert pool.servers[1].breaker.state is CircuitState.CLOSED


async def test_with_every_probe_in_flight_the_caller_gets_a_typed_error_and_can_wait(
    fakes: list[FakeOllama],
) -> None:
    settings = settings_for(fakes[0].url, circuit_breaker_failure_threshold=1, circuit_breaker_recovery_seconds=0.3)
    fakes[0].enqueue(RUNNER_CRASHED, Reply(delay=1.0))
    async with AsyncLLMPool(settings, AsyncLLMClient) as pool:
        with pytest.raises(LLMServerError):
            await pool.chat(messages(0), SCHEMA)
        slow_probe = asyncio.ensure_future(pool.chat(messages(1), SCHEMA))
        assert await asyncio.to_thread(fakes[0].wait_for_chats, 2)
        with pytest.raises(LLMUnavailableError, match="No LLM server can take a call") as caught:
            await pool.chat(messages(2), SCHEMA)
        assert caught.value.transient and "llama runner" in caught.value.message
        await pool.wait_for_server()  # returns when the probe has answered
        await slow_probe
        await pool.chat(messages(3), SCHEMA)


def test_the_sync_pool_fails_over_and_raises_the_typed_error_when_all_are_down(fakes: list[FakeOllama]) -> None:
    with LLMPool(settings_for(dead_url(), fakes[0].url), LLMClient) as pool:
        assert pool.chat(messages(0), SCHEMA).content
        assert [s.ready for s in pool.readiness()] == [False, True]
    with LLMPool(settings_for(dead_url(), dead_url()), LLMClient) as pool:
        with pytest.raises(LLMUnavailableError):
            pool.chat(messages(0), SCHEMA)
        with pytest.raises(LLMUnavailableError):
            pool.check_ready()


def test_the_sync_pool_is_safe_across_threads(fakes: list[FakeOllama]) -> None:
    with LLMPool(settings_for(*(f.url for f in fakes)), LLMClient) as pool:
        barrier = threading.Barrier(6)

        def burst(worker: int) -> None:
            barrier.wait()
            for i in range(5):
                pool.chat(messages(worker * 10 + i), SCHEMA)

        with ThreadPoolExecutor(6) as threads:
            list(threads.map(burst, range(6)))
        assert sum(pool.distribution().values()) == 30
        assert all(server.in_flight == 0 for server in pool.servers)


# --- --max-concurrent auto --------------------------------------------------------------------------


def feed(controller: ConcurrencyController, clock: ManualClock, calls: int, seconds: float, *,
         busy: bool = False) -> None:
    """A window: a busy answer first if ``busy``, then ``calls`` calls spread over ``seconds``."""
    start = clock.now
    if busy:
        controller.record(busy=True)
    for k in range(calls):
        clock.now = start + seconds * (k + 1) / calls  # the last call exactly at the window's end
        controller.record()


def test_the_controller_raises_while_throughput_rises_then_settles() -> None:
    clock = ManualClock()
    controller = ConcurrencyController(64, start=2, step=2, window_seconds=5, clock=clock)
    capacity = 8.0  # calls per second the servers can give, whatever the concurrency
    while not controller.settled:
        throughput = min(capacity, controller.limit * 1.0)  # 1 s per call
        feed(controller, clock, int(throughput * 5), 5)
        assert len(controller.history) < 20
    assert controller.limit == 8
    assert "settled at 8" in controller.summary()
    assert [h[2] for h in controller.history][:3] == ["raised", "raised", "raised"]


def test_the_controller_halves_on_busy_and_climbs_again() -> None:
    clock = ManualClock()
    controller = ConcurrencyController(64, start=16, step=2, window_seconds=5, clock=clock)
    feed(controller, clock, 40, 5, busy=True)
    assert controller.limit == 8 and not controller.settled
    feed(controller, clock, 40, 5)
    assert controller.limit == 10


def test_the_controller_stays_within_floor_and_ceiling() -> None:
    clock = ManualClock()
    controller = ConcurrencyController(6, start=4, step=4, window_seconds=1, clock=clock)
    feed(controller, clock, 10, 1)
    assert controller.limit == 6
    feed(controller, clock, 100, 1)
    assert controller.settled and controller.limit == 6
    for _ in range(5):
        feed(controller, clock, 1, 1, busy=True)
    assert controller.limit == 1


def test_a_window_needs_a_full_round_of_calls() -> None:
    clock = ManualClock()
    controller = ConcurrencyController(64, start=10, window_seconds=1, clock=clock)
    feed(controller, clock, 5, 10)
    assert controller.history == []  # 10 s passed but only 5 of 10 calls: not read yet
    feed(controller, clock, 5, 1)
    assert len(controller.history) == 1


async def test_the_adaptive_limiter_holds_the_controllers_limit() -> None:
    controller = ConcurrencyController(64, start=3)
    limiter = AdaptiveLimiter(controller)
    running, peak = 0, 0

    async def work() -> None:
        nonlocal running, peak
        async with limiter:
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(work() for _ in range(12)))
    assert peak == 3 and limiter.in_use == 0


async def test_auto_concurrency_observes_the_pools_calls(fakes: list[FakeOllama]) -> None:
    settings = settings_for(fakes[0].url, fakes[1].url, batch_max_concurrent="auto")
    async with AsyncLLMPool(settings, AsyncLLMClient) as pool:
        limiter = concurrency_limit(settings, pool)
        assert isinstance(limiter, AdaptiveLimiter) and limiter.controller.limit == 2
        assert pool.observer is limiter.controller

        async def one(i: int) -> None:
            async with limiter:
                await pool.chat(messages(i), SCHEMA)

        await asyncio.gather(*(one(i) for i in range(10)))
    fixed = load_settings({"batch_max_concurrent": 7}, environ={}, env_file=None)
    assert isinstance(concurrency_limit(fixed, None), asyncio.Semaphore)


# --- the batch processor over several servers (the real CLI, SecantusDB, fake servers) ---------------


@pytest.fixture
def batch_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, mongo_uri: str, mongo_db: Any) -> Any:
    """``batch_run(urls, n, *flags)``: n pending conversations, then ``cli.main`` with LLM_ENDPOINT=urls."""
    import cli
    from config import env_name

    def run(urls: list[str], n: int, *flags: str) -> int:
        for name in Settings.model_fields:
            monkeypatch.delenv(env_name(name), raising=False)
        env = {"MONGODB_CONNECTION_STRING": mongo_uri, "MONGODB_DATABASE_NAME": mongo_db.name,
               "LLM_ENDPOINT": ",".join(urls), "OLLAMA_TIMEOUT": "10",
               "BATCH_FILES_DIR": str(tmp_path / "batch_files"), "BATCH_MONITORING_MODE": "production",
               "OLLAMA_RETRY_BASE_SECONDS": "0.01", "MONGODB_RETRY_BASE_SECONDS": "0.01",
               "CIRCUIT_BREAKER_RECOVERY_SECONDS": "30", "MONGODB_TIMEOUT_MS": "5000"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        mongo_db["conversation_set"].insert_many([batch_conversation(i) for i in range(n)])
        return cli.main(list(flags))

    return run


def batch_conversation(i: int) -> dict[str, Any]:
    return {"conversation_number": str(7000 + i), "status": "pending",
            "messages": [{"sender": "customer", "text": f"Order {i} is late, where is it?"},
                         {"sender": "agent", "text": "Let me check."}]}


def one_result_each(mongo_db: Any, n: int) -> bool:
    sources = [doc["source_conversation_id"] for doc in mongo_db["sentimental_analysis"].find({})]
    processed = mongo_db["conversation_set"].count_documents({"status": "processed"})
    return len(sources) == len(set(sources)) == processed == n


@pytest.mark.parametrize("servers", [1, 2, 4])
def test_a_batch_job_spreads_over_the_servers(batch_run: Any, mongo_db: Any, servers: int) -> None:
    fakes = [FakeOllama(latency=0.02, parallel=2).start() for _ in range(servers)]
    try:
        n = 12 * servers
        assert batch_run([f.url for f in fakes], n, "--max-concurrent", str(2 * servers)) == 0
        assert one_result_each(mongo_db, n)
        counts = [f.chat_count for f in fakes]
        assert sum(counts) == n and all(count > 0 for count in counts)
        assert all(f.max_in_flight <= 2 for f in fakes)
    finally:
        for fake in fakes:
            fake.stop()


def test_a_batch_job_completes_with_one_of_three_servers_dead_from_the_start(
    batch_run: Any, mongo_db: Any, fakes: list[FakeOllama]
) -> None:
    live = fakes[:2]
    assert batch_run([live[0].url, dead_url(), live[1].url], 30, "--max-concurrent", "6") == 0
    assert one_result_each(mongo_db, 30)
    assert live[0].chat_count + live[1].chat_count == 30
    assert live[0].chat_count > 0 and live[1].chat_count > 0


def test_a_batch_job_completes_when_a_server_is_killed_mid_run(
    batch_run: Any, mongo_db: Any, fakes: list[FakeOllama]
) -> None:
    for fake in fakes:
        fake.latency = 0.05
    victim = fakes[2]

    def kill_after_some_calls() -> None:
        victim.wait_for_chats(4, timeout=60)
        victim.stop()  # in-flight calls are dropped; later ones are refused

    killer = threading.Thread(target=kill_after_some_calls)
    killer.start()
    try:
        assert batch_run([f.url for f in fakes], 40, "--max-concurrent", "6") == 0
    finally:
        killer.join(60)
    assert one_result_each(mongo_db, 40)
    assert 4 <= victim.chat_count < 40
    assert fakes[0].chat_count + fakes[1].chat_count >= 40 - victim.chat_count


def test_a_batch_job_with_auto_concurrency_completes_and_says_where_it_stands(
    batch_run: Any, mongo_db: Any, fakes: list[FakeOllama], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    assert batch_run([fakes[0].url, fakes[1].url], 20, "--max-concurrent", "auto") == 0
    assert one_result_each(mongo_db, 20)
    messages_logged = [record.getMessage() for record in caplog.records]
    assert "auto concurrency: starting at 2, ceiling 64" in messages_logged
    assert any(m.startswith("auto concurrency ") and "(ceiling 64," in m for m in messages_logged)


# --- the API over several servers ---------------------------------------------------------------------


def test_the_api_routes_over_the_servers_and_ready_reports_each(fakes: list[FakeOllama], start_api: Any) -> None:
    import requests

    dead = dead_url()
    api = start_api(settings_for(fakes[0].url, dead, fakes[1].url))
    body = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my parcel?"}]}
    with requests.Session() as http:
        for _ in range(6):
            assert http.post(f"{api.url}/classify", json=body, timeout=10).status_code == 200
        ready = http.get(f"{api.url}/ready", timeout=10)
    assert ready.status_code == 200
    servers = ready.json()["servers"]
    assert [(s["server"], s["ready"]) for s in servers] == [(fakes[0].url, True), (dead, False), (fakes[1].url, True)]
    assert servers[1]["circuit"] == "open" and "Cannot reach" in servers[1]["error"]
    assert fakes[0].chat_count + fakes[1].chat_count == 6 and fakes[0].chat_count > 0 and fakes[1].chat_count > 0


def test_the_api_is_not_ready_when_no_server_is(start_api: Any) -> None:
    import requests

    api = start_api(settings_for(dead_url(), dead_url()))
    with requests.Session() as http:
        ready = http.get(f"{api.url}/ready", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["error"]["type"] == "llm_unavailable"
