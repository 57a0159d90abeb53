"""Section 4: the API's latency under load and while large bodies wait."""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import load_settings
from scripts.bench.harness import (
    MODEL,
    BenchmarkError,
    Context,
    cpu_delta,
    cpu_seconds,
    cpu_text,
    load_samples,
)
from scripts.bench.results import SectionResult, Target, fmt, percentile

# --- 4. API --------------------------------------------------------------------------------------

#: What the API may add to a /classify at one client, p50 (issue 19; the first target, issue 5, was 5 ms).
OVERHEAD_TARGET_MS = 1.5


@dataclass
class LoadResult:
    clients: int
    latencies_ms: list[float]
    errors: int
    seconds: float
    first_error: str | None = None
    cpu: list[float | None] = field(default_factory=list)  # API, fake, load generator

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + self.errors

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


async def load_test(url: str, bodies: list[bytes], *, clients: int, requests: int, warmup: int) -> LoadResult:
    """``requests`` POSTs of ``bodies`` (in turn) by ``clients`` concurrent workers over one keep-alive session."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def run(count: int, record: LoadResult | None) -> None:
            numbers = iter(range(count))

            async def worker() -> None:
                for i in numbers:
                    body = bodies[i % len(bodies)]
                    started = time.perf_counter()
                    error: str | None
                    try:
                        async with session.post(url, data=body, headers=headers) as response:
                            await response.read()
                            status = response.status
                    except (TimeoutError, aiohttp.ClientError) as e:
                        status, error = None, f"{type(e).__name__}: {e}"
                    else:
                        error = None if status == 200 else f"HTTP {status}"
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    if record is None:
                        continue
                    if error is None:
                        record.latencies_ms.append(elapsed_ms)
                    else:
                        record.errors += 1
                        record.first_error = record.first_error or error

            await asyncio.gather(*(worker() for _ in range(clients)))

        await run(warmup, None)
        result = LoadResult(clients, [], 0, 0.0)
        started = time.perf_counter()
        await run(requests, result)
        result.seconds = time.perf_counter() - started
    return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb(pid: int) -> float | None:
    """The high-water resident memory of a running process (Linux /proc VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def large_body() -> bytes:
    """A conversation of about 0.9 MB (under the default API_MAX_BODY_BYTES of 1 MB) in 15,000 short turns:
    the costly shape (every turn a JSON object to parse and a model to validate), not one long text."""
    messages = [{"sender": "customer" if i % 2 == 0 else "agent", "text": f"turn {i}: where is it?"}
                for i in range(15_000)]
    return json.dumps({"conversation_number": "large", "messages": messages}).encode()


async def _health_while_bodies_wait(url: str, body: bytes, count: int) -> tuple[list[float], list[float], list[int]]:
    """/health latencies alone, then while ``count`` copies of ``body`` are posted at once; their statuses."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def health() -> float:
            started = time.perf_counter()
            async with session.get(f"{url}/health") as response:
                await response.read()
            return (time.perf_counter() - started) * 1000

        idle = [await health() for _ in range(20)]

        async def post() -> int:
            async with session.post(f"{url}/classify", data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status

        posts = [asyncio.create_task(post()) for _ in range(count)]
        loaded: list[float] = []
        while not all(task.done() for task in posts):
            loaded.append(await health())
            await asyncio.sleep(0.05)
        return idle, loaded, list(await asyncio.gather(*posts))


def measure_waiting_bodies(ctx: Context) -> tuple[str, Target]:
    """/health latency and the API's peak memory while a dozen ~0.9 MB bodies wait for one LLM slot."""
    body = large_body()
    count, latency = ctx.preset.waiting_bodies, ctx.preset.waiting_latency
    waiting = {"API_MAX_CONCURRENCY": "1", "API_MAX_WAITING": str(count)}
    ctx.say(f"  /health while {count} bodies of {len(body) / 1e6:.1f} MB wait for one LLM slot ...")
    with ctx.fake_ollama(latency) as fake, ctx.api(fake.url, waiting) as api:
        rss_before = _peak_rss_mb(api.pid)
        idle, loaded, statuses = asyncio.run(_health_while_bodies_wait(api.url, body, count))
        rss_after = _peak_rss_mb(api.pid)
    worst = max(loaded) if loaded else float("nan")
    note = (f"Large bodies waiting: {count} POST /classify of {len(body) / 1e6:.2f} MB each sent at once "
            f"to an API with API_MAX_CONCURRENCY=1 and API_MAX_WAITING={count} (the fake answers in "
            f"{latency:g} s, so they wait their turn one by one); answers "
            f"{', '.join(f'{statuses.count(s)} x {s}' for s in sorted(set(statuses)))}. GET /health alone: "
            f"p50 {percentile(idle, 50):.1f} ms; meanwhile ({len(loaded)} requests): p50 "
            f"{percentile(loaded, 50):.1f} ms, max {worst:.1f} ms. The API's peak resident memory: "
            f"{fmt(rss_before or 0, 0)} MB before, {fmt(rss_after or 0, 0)} MB after.")
    return note, Target(f"API: /health under 100 ms at worst while {count} large bodies wait",
                        f"{worst:.1f} ms", worst < 100)


def section_api(ctx: Context) -> SectionResult:
    """p50/p95/p99 latency and requests/s of ``POST /classify`` at 1, 10 and 50 concurrent
    clients against a zero-latency fake, beside the fake's own latency measured the same way
    (``POST /api/chat`` with the payload the API sends). asyncio load generator, one
    aiohttp session (keep-alive) per level, warm-up requests not counted, non-200 answers
    counted as errors. Target: p50 overhead at most 1.5 ms at 1 client (issue 19; issue 5 asked
    for 5 ms); no error at 50. Then
    ``GET /health`` alone and while a dozen ~0.9 MB bodies of 15,000 short turns wait for the
    API's one LLM slot (API_MAX_CONCURRENCY=1), and the API's peak RSS (``VmHWM``). Target:
    /health under 100 ms at worst meanwhile.
    """
    from aggregator import validate_conversation
    from classifier import ConversationClassifier
    from llm_wrapper import provider_for

    preset = ctx.preset
    samples = load_samples()
    rows: list[list[str]] = []
    notes: list[str] = []
    chart: dict[str, Any] = {"levels": [], "api": [], "fake": []}
    overhead_at_1: float | None = None
    errors_at_50: int | None = None
    # Every client of the highest level may wait: this section measures latency, not the bound on
    # waiting requests (API_MAX_WAITING, by default 2 x API_MAX_CONCURRENCY = 16, would answer the
    # clients beyond it 503 at once); that bound is measured below (measure_waiting_bodies).
    waiting = {"API_MAX_WAITING": str(max(preset.api_levels))}
    floors_at_1: dict[str, float] = {}
    cpu_ms_at_1: dict[str, float] = {}  # the server's CPU ms per request at 1 client: steadier than latency
    with ctx.fake_ollama(0.0) as fake, ctx.api(fake.url, waiting) as api, ctx.floor_api(fake.url) as floor, \
            ctx.floor_api(fake.url, "aiohttp") as floor_async:
        fake_url, api_url = fake.url, api.url
        settings = load_settings({"llm_endpoint": fake_url, "llm_model": MODEL}, environ={}, env_file=None)
        classifier = ConversationClassifier.from_settings(settings)
        api_bodies = [json.dumps(body).encode() for body in samples]
        fake_bodies = [
            json.dumps(provider_for(settings).build_payload(
                settings, classifier.prepare(validate_conversation(body)).messages, classifier.schema)).encode()
            for body in samples
        ]
        for clients in preset.api_levels:
            measured: dict[str, LoadResult] = {}
            targets_here = [("fake", "/api/chat", f"{fake_url}/api/chat", fake_bodies, api.pid),
                            ("api", "/classify", f"{api_url}/classify", api_bodies, api.pid)]
            if clients == 1:  # the stack's floor, at the level of the target
                targets_here.append(("floor", "/classify", f"{floor.url}/classify", api_bodies, floor.pid))
                targets_here.append(("floor-async", "/classify", f"{floor_async.url}/classify", api_bodies,
                                     floor_async.pid))
            for name, path, url, bodies, server_pid in targets_here:
                ctx.say(f"  {clients} client(s): {preset.api_requests} x POST {path} ({name}) ...")
                before = (cpu_seconds(server_pid), cpu_seconds(fake.pid), _own_cpu())
                result = asyncio.run(load_test(url, bodies, clients=clients, requests=preset.api_requests,
                                               warmup=preset.api_warmup))
                after = (cpu_seconds(server_pid), cpu_seconds(fake.pid), _own_cpu())
                result.cpu = [cpu_delta(b, a) for b, a in zip(before, after, strict=True)]
                if not result.latencies_ms:
                    raise BenchmarkError(f"api ({clients} clients): every request to {url} failed "
                                         f"({result.first_error})")
                if result.errors:
                    notes.append(f"{clients} client(s), POST {path}: {result.errors} of {result.requests} "
                                 f"requests failed; the first: {result.first_error}")
                measured[name] = result
            api_result, fake_result = measured["api"], measured["fake"]
            overhead = api_result.p(50) - fake_result.p(50)
            if clients == 1:
                overhead_at_1 = overhead
                cpu_ms_at_1 = {name: result.cpu[0] / result.requests * 1000 for name, result in measured.items()
                               if name != "fake" and result.cpu[0] is not None and result.requests}
            if clients == 50:
                errors_at_50 = api_result.errors
            shown = [("POST /classify (API)", api_result, fmt(overhead, 2)),
                     ("POST /api/chat (fake, direct)", fake_result, "")]
            for name, label in (("floor", "POST /classify (minimal FastAPI app: the floor)"),
                                ("floor-async", "POST /classify (minimal FastAPI app, aiohttp on the loop)")):
                if name in measured:
                    floors_at_1[name] = measured[name].p(50) - fake_result.p(50)
                    shown.append((label, measured[name], fmt(floors_at_1[name], 2)))
            for label, result, extra in shown:
                rows.append([str(clients), label, f"{result.requests:,}", str(result.errors), fmt(result.p(50), 2),
                             fmt(result.p(95), 2), fmt(result.p(99), 2), fmt(result.requests / result.seconds, 1),
                             extra, " / ".join(cpu_text(c) for c in result.cpu)])
            chart["levels"].append(clients)
            chart["api"].append((api_result.p(50), api_result.p(95), api_result.p(99)))
            chart["fake"].append((fake_result.p(50), fake_result.p(95), fake_result.p(99)))
    waiting_note, waiting_target = measure_waiting_bodies(ctx)
    notes.append(waiting_note)
    targets = [waiting_target]
    if floors_at_1:
        notes.append(
            "The floor (1 client): a minimal FastAPI app under the same uvicorn (python -m scripts.bench.floor_api, "
            "this tree's) that parses the body, posts the payload the API would send with one requests.Session in "
            "a worker thread and answers the model's message: no validation, prompt, parsing, slots, middleware or "
            f"logging. It adds {floors_at_1.get('floor', math.nan):.2f} ms to the fake's p50: the stack's own cost "
            "per request, under the API's. The same app posting with one aiohttp session on the event loop (no "
            f"worker thread; not the design's synchronous wrapper) adds {floors_at_1.get('floor-async', math.nan):.2f}"
            " ms: what leaving requests would win back, and what it would not.")
        if {"api", "floor", "floor-async"} <= cpu_ms_at_1.keys():
            notes.append(
                "CPU per request at 1 client (the server process's user + system CPU over the measured requests, "
                "steadier than a latency on a shared machine): the API "
                f"{cpu_ms_at_1['api']:.2f} ms, the minimal app with requests {cpu_ms_at_1['floor']:.2f} ms, with "
                f"aiohttp {cpu_ms_at_1['floor-async']:.2f} ms. At one client nearly all of a request's CPU in the "
                "server lies on its path (the client waits meanwhile): a server spending more CPU per request than "
                "the target adds about that much latency at least.")
    if overhead_at_1 is not None:
        targets.append(Target(f"API: p50 overhead (API p50 - fake p50) at most {OVERHEAD_TARGET_MS:g} ms at 1 client",
                              f"{overhead_at_1:.2f} ms", overhead_at_1 <= OVERHEAD_TARGET_MS))
    if errors_at_50 is not None:
        targets.append(Target("API: no error at 50 clients", f"{errors_at_50} errors", errors_at_50 == 0))
    return SectionResult(
        "api",
        f"`python main.py` (API_MAX_WAITING={max(preset.api_levels)}: every client may wait its turn) against a "
        "zero-latency fake Ollama; an asyncio load generator in the benchmark "
        f"process, one aiohttp session (keep-alive) per level, {preset.api_requests:,} measured requests per "
        f"level after {preset.api_warmup} warm-up requests, the {len(samples)} conversations of "
        "data/sample_conversations.json in turn. The fake is measured the same way with the payload the API "
        "sends it (the Ollama provider's build_payload of ConversationClassifier.prepare). Latencies of 200 answers; "
        "anything else counts as an error.",
        [("clients", "right"), ("endpoint", "left"), ("requests", "right"), ("errors", "right"),
         ("p50 (ms)", "right"), ("p95 (ms)", "right"), ("p99 (ms)", "right"), ("requests/s", "right"),
         ("p50 overhead (ms)", "right"), ("CPU s: API / fake / load generator", "right")],
        rows,
        notes=notes + [f"The load generator, the API and the fake share the machine's {os.cpu_count()} core(s): "
                       "at 10 and 50 clients the latencies include waiting for a CPU. CPU s: user + system CPU "
                       "seconds of each process during the measured requests of that row (the first: the API's, "
                       "the minimal app's on its row; near 0 on the fake rows)."],
        targets=targets,
        chart=chart,
    )


def draw_api(axes: Any, data: dict[str, Any]) -> None:
    """p50 latency per level (bars), p99 as the whisker, API beside the fake."""
    x = list(range(len(data["levels"])))
    width = 0.38
    for offset, key, colour, name in ((-width / 2, "api", "#1f77b4", "API /classify"),
                                      (width / 2, "fake", "#9aa0a6", "fake /api/chat")):
        p50 = [v[0] for v in data[key]]
        upper = [v[2] - v[0] for v in data[key]]
        axes.bar([i + offset for i in x], p50, width=width, color=colour, label=f"{name} p50",
                 yerr=[[0] * len(p50), upper], capsize=3)
    axes.set_xticks(x, [str(level) for level in data["levels"]])
    axes.set_xlabel("concurrent clients (whisker: p99)")
    axes.set_ylabel("latency (ms)")
    axes.legend(fontsize=8, frameon=False)
    axes.grid(axis="y", alpha=0.3)
