"""Several LLM servers behind the interface of one client: least-busy routing, a breaker per server.

``LLM_ENDPOINT`` may list several base URLs (``settings.llm_endpoints``). A pool holds one
client per server, each built by the provider's factory from the settings with that server's URL
(``settings.model_copy(update={"llm_endpoint": url})``), so the pool knows nothing of the
provider (beyond the name log lines give a lone server: ``llm_wrapper.server_kind``): Ollama's
``/api/chat`` or an OpenAI-compatible server alike. It offers what the
classifier asks of a client, ``chat(messages, schema)`` and ``check_ready()``, so
``classifier.classify(conversation, pool)`` works unchanged.

* Routing: each call goes to the server with the fewest calls in flight (ties in turn), among
  the servers whose circuit is closed, or open with its pause over (that call is the probe).
* Each server has its own :class:`utils.circuit_breaker.CircuitBreaker`: consecutive failures that
  say the server is in trouble (unreachable, busy, 5xx, timeouts; not a bad answer of a working
  model) open it, so its share moves to the others; after the pause one probe tries it again and
  its success brings the server back.
* A call the server refused without doing the work (connection refused, 503 busy, model missing)
  is sent on at once to another server. When no server can take a call, the caller gets the
  usual typed error (:class:`LLMUnavailableError`, transient), never a wait of unknown length;
  the batch processor, which prefers to pause, awaits :meth:`AsyncLLMPool.wait_for_server` first.

:class:`LLMPool` (threads: the API) and :class:`AsyncLLMPool` (asyncio: the batch processor) share
the routing and the bookkeeping (:class:`_Routing`); only waiting and client lifetimes differ.
:class:`ConcurrencyController` and :class:`AdaptiveLimiter` implement ``--max-concurrent auto``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

from config import Settings
from error_handler import LLMBusyError, LLMError, LLMOutputError, LLMUnavailableError, ModelNotFoundError
from llm_wrapper import server_kind
from logger import redact_url
from utils.circuit_breaker import CircuitBreaker, CircuitState

logger = logging.getLogger(__name__)

#: Refusals that mean the server did not do the work: the call goes on to another server at once.
FAILOVER_ERRORS: tuple[type[LLMError], ...] = (LLMUnavailableError, LLMBusyError, ModelNotFoundError)

ClientFactory = Callable[[Settings], Any]


def server_name(url: str) -> str:
    """``scheme://host:port`` of a server URL: what logs and /ready show (no credentials, no path).

    Parsed from the redacted URL: a password with an unencoded ``/`` or ``@`` would otherwise be
    split in the wrong place and part of it taken for the host."""
    parts = urlsplit(redact_url(url))
    host = parts.hostname or "?"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port: int | str
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = "?"
    return f"{parts.scheme}://{host}:{port}"


def counts_against_server(error: BaseException) -> bool:
    """Failures that say the LLM server itself is in trouble (unreachable, busy, 5xx, timeouts, a
    missing model): they count towards its circuit. A bad answer of a working model does not."""
    return isinstance(error, LLMError) and not isinstance(error, LLMOutputError)


@dataclass
class Server:
    """One LLM server of a pool, with its client, its breaker and its counters."""

    url: str
    name: str
    client: Any
    breaker: CircuitBreaker
    in_flight: int = 0
    answered: int = 0  # calls it answered (a bad answer included: the server worked)
    failed: int = 0  # calls that failed against the server
    last_error: str | None = None  # the last failure's message, for the error when none can be called

    # The counters change only here: a call is taken (in flight) and finished (answered or failed).
    def take(self) -> bool | None:
        """Take a call if the breaker lets one through: whether it is the probe; None while paused."""
        probe = self.breaker.try_acquire()
        if probe is not None:
            self.in_flight += 1
        return probe

    def take_early_probe(self) -> bool:
        """Take a call as the probe before the pause is over (every server left is paused)."""
        if not self.breaker.probe_early():
            return False
        self.in_flight += 1
        return True

    def finish(self, probe: bool, error: BaseException | None) -> None:
        """Record how a call taken by :meth:`take` or :meth:`take_early_probe` ended: the counters, the breaker."""
        self.in_flight -= 1
        if error is None or isinstance(error, LLMOutputError):
            self.answered += 1
            self.breaker.record_success()  # the server answered; a bad answer is the model's fault
        elif counts_against_server(error):
            self.failed += 1
            self.last_error = str(error)
            self.breaker.record_failure(error)
        elif probe:  # cancelled, or a bug: no verdict, but the next caller may probe at once
            self.breaker.cancel_probe()


@dataclass(frozen=True)
class ServerStatus:
    """A server as /ready reports it."""

    name: str
    ready: bool
    circuit: str
    in_flight: int
    answered: int
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"server": self.name, "ready": self.ready, "circuit": self.circuit, "in_flight": self.in_flight,
               "answered": self.answered}
        return out if self.error is None else {**out, "error": self.error}


class CallObserver(Protocol):
    """Told the outcome of every call (the concurrency controller)."""

    def record(self, *, busy: bool = False) -> None: ...

    def summary(self) -> str: ...


class _Routing:
    """What both pools share: the servers, the choice of one, and the bookkeeping of an outcome.

    Not thread-safe by itself: the sync pool holds a lock around it, the async pool needs none.
    """

    def __init__(self, settings: Settings, factory: ClientFactory, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.servers: list[Server] = []
        urls = settings.llm_endpoints
        for url in urls:
            name = server_name(url)
            # One server keeps the name messages give it ("circuit Ollama open ...", or "the LLM server").
            breaker = CircuitBreaker(settings.circuit_breaker_failure_threshold,
                                     settings.circuit_breaker_recovery_seconds,
                                     name=server_kind(settings) if len(urls) == 1 else f"LLM server {name}",
                                     clock=clock)
            self.servers.append(Server(url, name, factory(settings.model_copy(update={"llm_endpoint": url})),
                                       breaker))
        self.observer: CallObserver | None = None
        self._turn = 0
        if len(self.servers) > 1:
            logger.info("LLM servers: %s (each call to the one with the fewest in flight)",
                        ", ".join(s.name for s in self.servers))

    def acquire(self, tried: Sequence[Server]) -> tuple[Server, bool] | None:
        """The server for the next call and whether it is a probe: a paused server whose pause is
        over first (one call finds out whether it is back), else the fewest in flight, ties in turn."""
        count = len(self.servers)

        def rank(i: int) -> tuple[bool, int, int]:
            server = self.servers[i]
            waiting_probe = server.breaker.state is CircuitState.OPEN and server.breaker.seconds_until_probe() <= 0
            return (not waiting_probe, server.in_flight, (i - self._turn) % count)

        order = sorted(range(count), key=rank)
        self._turn = (self._turn + 1) % count
        for i in order:
            server = self.servers[i]
            if server in tried:
                continue
            probe = server.take()
            if probe is not None:
                return server, probe
        # Every server left is paused. Rather than refuse, probe the one whose pause ends first: a
        # server that came back answers at once (no blackout of CIRCUIT_BREAKER_RECOVERY_SECONDS for
        # the API), one that did not gives the caller its own typed error. The batch processor
        # never gets here: it waits for a pause to end first (AsyncLLMPool.wait_for_server).
        paused = [s for s in self.servers if s not in tried and s.breaker.state is CircuitState.OPEN]
        if paused:
            server = min(paused, key=lambda s: s.breaker.seconds_until_probe())
            if server.take_early_probe():
                return server, True
        return None

    def release(self, server: Server, probe: bool, error: BaseException | None) -> None:
        """Record the outcome of a call on ``server``: its breaker, its counters, the observer."""
        server.finish(probe, error)
        if self.observer is not None:
            if error is None or isinstance(error, LLMOutputError):
                self.observer.record()  # a finished call: throughput
            elif isinstance(error, LLMBusyError):
                self.observer.record(busy=True)  # the signal to back off

    def no_server_error(self, last_error: LLMError | None) -> LLMError:
        """The error a caller gets when no server can take its call (each one refused it, or each
        one's circuit is open with its probe in flight)."""
        if last_error is not None:
            return last_error
        failures = "; ".join(f"{s.name}: {s.last_error}" for s in self.servers if s.last_error)
        return LLMUnavailableError(
            f"No LLM server can take a call: each of the {len(self.servers)} server(s) is paused after failures "
            f"and being probed" + (f" (last failures: {failures})" if failures else "") + ".",
            hint="Retry in a moment; check the servers named by LLM_ENDPOINT (running, with the model?).",
            endpoint=", ".join(s.name for s in self.servers),
        )

    def statuses(self, errors: list[LLMError | None]) -> list[ServerStatus]:
        """Each server's status, given its readiness error (None: ready), in the order of the servers."""
        statuses = []
        for s, error in zip(self.servers, errors, strict=True):
            statuses.append(ServerStatus(s.name, error is None, s.breaker.state.value, s.in_flight, s.answered,
                                         None if error is None else error.message))
        return statuses

    def distribution(self) -> dict[str, int]:
        """Calls answered per server, by name."""
        return {s.name: s.answered for s in self.servers}

    def pause_failed(self, errors: list[LLMError | None]) -> None:
        """Open the circuit of each server whose readiness check failed (only for a check its owner
        trusts to decide routing: the batch processor's start-up check; never /ready)."""
        for server, error in zip(self.servers, errors, strict=True):
            if error is not None:
                server.breaker.trip(error)


class _Failover:
    """One call's way through the servers, shared by the sync and the async pool: the servers tried
    and the last refusal. Each attempt releases its server (breaker, counters) however it ends."""

    def __init__(self, routing: _Routing, release: Callable[[Server, bool, BaseException | None], None]) -> None:
        self.routing = routing
        self.release = release
        self.tried: list[Server] = []
        self.last_error: LLMError | None = None

    def next_server(self) -> tuple[Server, bool]:
        """The server for the next attempt and whether it is a probe; raises when none can take it."""
        chosen = self.routing.acquire(self.tried)
        if chosen is None:
            raise self.routing.no_server_error(self.last_error)
        self.tried.append(chosen[0])
        return chosen

    @contextmanager
    def attempt(self, server: Server, probe: bool) -> Iterator[None]:
        """Around one call on ``server``: a refusal another server may answer (FAILOVER_ERRORS) is
        swallowed, so the caller's loop tries the next server; anything else propagates."""
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:
            error = e
            if not isinstance(e, FAILOVER_ERRORS):
                raise
            self.last_error = e
            logger.warning("LLM server %s refused a call (%s); trying another", server.name, e.code)
        finally:
            self.release(server, probe, error)


def _ready_result(routing: _Routing, errors: list[LLMError | None]) -> None:
    """Log each server that is not ready; raise the first one's error when none is."""
    failures = [error for error in errors if error is not None]
    for server, error in zip(routing.servers, errors, strict=True):
        if error is not None and len(routing.servers) > 1:
            logger.warning("LLM server %s is not ready: %s", server.name, error)
    if len(failures) == len(routing.servers):
        raise failures[0]


class LLMPool:
    """Synchronous pool (the API's worker threads): ``with LLMPool(settings, factory) as pool: pool.chat(...)``."""

    def __init__(self, settings: Settings, factory: ClientFactory, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._routing = _Routing(settings, factory, clock=clock)
        self._lock = threading.Lock()

    @property
    def servers(self) -> list[Server]:
        return self._routing.servers

    def distribution(self) -> dict[str, int]:
        with self._lock:
            return self._routing.distribution()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for server in self.servers:
            server.client.close()

    def _release(self, server: Server, probe: bool, error: BaseException | None) -> None:
        with self._lock:
            self._routing.release(server, probe, error)

    def _call(self, method: str, *args: Any) -> Any:
        failover = _Failover(self._routing, self._release)
        while True:
            with self._lock:
                server, probe = failover.next_server()
            with failover.attempt(server, probe):
                return getattr(server.client, method)(*args)

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> Any:
        """One classification call on the least busy server; raises an ``LLMError`` when none can answer."""
        return self._call("chat", messages, schema)

    def embed(self, texts: list[str]) -> Any:
        """Embeddings of ``texts`` (EMBEDDING_MODEL) from the least busy server."""
        return self._call("embed", texts)

    @staticmethod
    def _check(server: Server) -> LLMError | None:
        try:
            server.client.check_ready()
        except LLMError as e:
            return e
        return None

    def _check_all(self) -> list[LLMError | None]:
        if len(self.servers) == 1:
            return [self._check(self.servers[0])]
        # At once, not one after the other: a server that does not answer costs its timeout once.
        with ThreadPoolExecutor(len(self.servers), thread_name_prefix="llm-ready") as threads:
            return list(threads.map(self._check, self.servers))

    def readiness(self, *, require_one: bool = False) -> list[ServerStatus]:
        """Check every server (``check_ready`` of its client) and report; breakers are left as they are
        (``/ready`` is unauthenticated: a slow answer to it must not pause a server). With
        ``require_one``, raise the first server's error when none is ready."""
        errors = self._check_all()
        if require_one:
            _ready_result(self._routing, errors)
        with self._lock:
            return self._routing.statuses(errors)

    def check_ready(self) -> None:
        """Raise the first server's error unless at least one server is ready; log each one that is not.
        Reports only, like :meth:`readiness`."""
        _ready_result(self._routing, self._check_all())


class AsyncLLMPool:
    """Asyncio pool (the batch processor): ``async with AsyncLLMPool(settings, factory) as pool: ...``."""

    def __init__(self, settings: Settings, factory: ClientFactory, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._routing = _Routing(settings, factory, clock=clock)
        self._stack: AsyncExitStack | None = None
        self._changed: asyncio.Event | None = None

    @property
    def servers(self) -> list[Server]:
        return self._routing.servers

    @property
    def observer(self) -> CallObserver | None:
        return self._routing.observer

    @observer.setter
    def observer(self, value: CallObserver | None) -> None:
        self._routing.observer = value

    def distribution(self) -> dict[str, int]:
        return self._routing.distribution()

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            for server in self.servers:
                await stack.enter_async_context(server.client)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _release(self, server: Server, probe: bool, error: BaseException | None) -> None:
        self._routing.release(server, probe, error)
        self._notify()

    async def _call(self, method: str, *args: Any) -> Any:
        failover = _Failover(self._routing, self._release)
        while True:
            server, probe = failover.next_server()
            with failover.attempt(server, probe):
                return await getattr(server.client, method)(*args)

    async def chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> Any:
        """One classification call on the least busy server; raises an ``LLMError`` when none can answer."""
        return await self._call("chat", messages, schema)

    async def embed(self, texts: list[str]) -> Any:
        """Embeddings of ``texts`` (EMBEDDING_MODEL) from the least busy server."""
        return await self._call("embed", texts)

    async def wait_for_server(self) -> None:
        """Return when some server may take a call: at once unless every circuit is open.

        The batch processor awaits this before each attempt, so that with every server down its
        workers pause (as with one server) instead of spending their retries in a few seconds.
        """
        while True:
            wait = min(s.breaker.seconds_until_probe() for s in self.servers)
            if wait <= 0:
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=None if wait == float("inf") else wait)

    async def check_all(self) -> list[LLMError | None]:
        """Each server's readiness error (None: ready), all checked at once; nothing logged or paused
        (:meth:`settle_check` does that: the batch processor checks while it reaches MongoDB, and says
        nothing of the LLM when MongoDB is not there)."""
        async def check(server: Server) -> LLMError | None:
            try:
                await server.client.check_ready()
            except LLMError as e:
                return e
            return None

        return list(await asyncio.gather(*(check(s) for s in self.servers)))

    async def readiness(self, *, require_one: bool = False) -> list[ServerStatus]:
        """Check every server (``check_ready`` of its client) and report; breakers are left as they are.
        With ``require_one``, raise the first server's error when none is ready."""
        errors = await self.check_all()
        if require_one:
            _ready_result(self._routing, errors)
        return self._routing.statuses(errors)

    async def check_ready(self, *, pause_failed: bool = False) -> None:
        """Raise the first server's error unless at least one server is ready; log each one that is not.

        ``pause_failed``: also open the circuit of each server that failed, so that no call is spent
        finding out again (the batch processor's start-up check, made once by the process itself
        before any work; a readiness probe from outside only reports)."""
        self.settle_check(await self.check_all(), pause_failed=pause_failed)

    def settle_check(self, errors: list[LLMError | None], *, pause_failed: bool = False) -> None:
        """The second half of :meth:`check_ready`, on the errors :meth:`check_all` returned."""
        if pause_failed:
            self._routing.pause_failed(errors)
        _ready_result(self._routing, errors)


# --- --max-concurrent auto ------------------------------------------------------------------------


class ConcurrencyController:
    """AIMD concurrency: start low, add ``step`` per window while throughput rises and no server
    answered busy, halve on busy; hold when a rise brought no more throughput (settled).

    Fed one :meth:`record` per finished LLM call (by the pool, as its observer). A window closes when
    ``window_seconds`` have passed and at least ``limit`` calls finished (one full round), so a
    window's throughput is never read from a handful of calls.
    """

    def __init__(self, ceiling: int, *, start: int = 1, step: int = 1, floor: int = 1, window_seconds: float = 5.0,
                 min_gain: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.limit = max(self.floor, min(start, self.ceiling))
        self.step = max(1, step)
        self.window_seconds = window_seconds
        self.min_gain = min_gain
        self.settled = False
        self.history: list[tuple[int, float, str]] = []  # (limit in the window, throughput, decision)
        self._clock = clock
        self._window_start = clock()
        self._completed = 0
        self._busy = False
        self._last_throughput: float | None = None

    def record(self, *, busy: bool = False) -> None:
        """One call finished: answered (or failed) or, with ``busy``, refused by a busy server."""
        if busy:
            self._busy = True
        else:
            self._completed += 1
        elapsed = self._clock() - self._window_start
        if elapsed >= self.window_seconds and (self._busy or self._completed >= self.limit):
            self._close_window(elapsed)

    def _close_window(self, elapsed: float) -> None:
        throughput = self._completed / elapsed if elapsed > 0 else 0.0
        before = self.limit
        if self._busy:
            self.limit = max(self.floor, self.limit // 2)
            self.settled = False
            decision = "halved: a server answered busy"
            self._last_throughput = None  # a new level: compare from scratch
        elif self.settled:
            decision = "held"
        elif self._last_throughput is not None and throughput < self._last_throughput * (1 + self.min_gain):
            # The last raise brought nothing: go back to the level that gave this throughput.
            self.limit = max(self.floor, self.limit - self.step)
            self.settled = True
            decision = "settled: more concurrency brought no more throughput"
        elif self.limit >= self.ceiling:
            self.settled = True
            decision = "settled: at the ceiling"
        else:
            self.limit = min(self.ceiling, self.limit + self.step)
            decision = "raised"
        if not self._busy:
            self._last_throughput = throughput
        self.history.append((before, throughput, decision))
        if decision.startswith(("settled", "halved")):
            logger.info("auto concurrency %s; now %d (was %d, %.2f calls/s)", decision, self.limit, before, throughput)
        else:
            logger.debug("auto concurrency %s; now %d (was %d, %.2f calls/s)", decision, self.limit, before, throughput)
        self._window_start = self._clock()
        self._completed = 0
        self._busy = False

    def summary(self) -> str:
        state = "settled" if self.settled else "still adjusting"
        return f"auto concurrency {state} at {self.limit} (ceiling {self.ceiling}, {len(self.history)} windows)"


class AdaptiveLimiter:
    """An asyncio semaphore whose size is the controller's limit: ``async with limiter: ...``."""

    def __init__(self, controller: ConcurrencyController) -> None:
        self.controller = controller
        self.in_use = 0
        # A raised limit lets waiters in at the next release (calls finish all the time).
        self._condition: asyncio.Condition | None = None

    async def __aenter__(self) -> Self:
        if self._condition is None:
            self._condition = asyncio.Condition()
        async with self._condition:
            await self._condition.wait_for(lambda: self.in_use < self.controller.limit)
            self.in_use += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._condition is not None
        async with self._condition:
            self.in_use -= 1
            self._condition.notify_all()


def concurrency_limit(settings: Settings, llm: Any) -> asyncio.Semaphore | AdaptiveLimiter:
    """The batch processor's limit on conversations at once: BATCH_MAX_CONCURRENT in total, or with
    ``auto`` an AIMD limiter up to it, starting at one per server and told every call's outcome."""
    if not settings.batch_auto_concurrency:
        return asyncio.Semaphore(settings.batch_max_concurrent)
    servers = len(settings.llm_endpoints)
    controller = ConcurrencyController(settings.batch_max_concurrent, start=servers, step=servers)
    if hasattr(llm, "observer"):
        llm.observer = controller
    else:
        logger.warning("auto concurrency needs the LLM pool to observe calls; using %d", controller.limit)
    logger.info("auto concurrency: starting at %d, ceiling %d", controller.limit, controller.ceiling)
    return AdaptiveLimiter(controller)
