"""Section 6: several batch processors on one collection."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench.harness import (
    RESULTS_COLLECTION,
    SOURCE_COLLECTION,
    STARTED_PROCESSES,
    STOP_TIMEOUT_SECONDS,
    BenchmarkError,
    Context,
    Database,
    check_written,
    clean_env,
    log_tail,
    model_env,
    seed_database,
)
from scripts.bench.results import SectionResult, Target, fmt

PROCESSORS_CONCURRENCY = 5
PROCESSORS_BATCH_SIZE = 20
#: libfaketime's wrapper, for the clock-skewed processor (None: that run is skipped).
FAKETIME = shutil.which("faketime")


# --- 6. several processors ----------------------------------------------------------------------


def _start_processor(ctx: Context, db: Database, database: str, fake_url: str, name: str, *,
                     max_concurrent: int, lease: float, clock_ahead: float | None = None
                     ) -> tuple[subprocess.Popen[bytes], Path]:
    """``python batch_processor.py`` with its own batch folder and worker id (not waited for); with
    ``clock_ahead``, under libfaketime with its clock that many seconds ahead of the machine's."""
    directory = ctx.new_dir(f"processor_{name}")
    log = directory / "processor.log"
    env = clean_env({
        "MONGODB_CONNECTION_STRING": db.uri, "MONGODB_DATABASE_NAME": database,
        "MONGODB_SOURCE_COLLECTION": SOURCE_COLLECTION, "MONGODB_RESULTS_COLLECTION": RESULTS_COLLECTION,
        "MONGODB_BATCH_SIZE": str(PROCESSORS_BATCH_SIZE), "MONGODB_TIMEOUT_MS": "30000",
        **model_env(fake_url), "OLLAMA_TIMEOUT": "60",
        "BATCH_MAX_CONCURRENT": str(max_concurrent), "BATCH_FILES_DIR": str(directory / "batch_files"),
        "BATCH_MONITORING_MODE": "production", "BATCH_LEASE_SECONDS": repr(lease), "BATCH_WORKER_ID": name,
        "LOG_LEVEL": "INFO",
    })
    command = [sys.executable, str(ctx.code / "batch_processor.py"), "--mode", "batch"]
    if clock_ahead is not None:
        command = [FAKETIME or "faketime", "-f", f"+{clock_ahead:g}s", *command]
    process = ctx.processes.start(f"batch processor {name}", command, cwd=directory, env=env, log=log)
    STARTED_PROCESSES.append(("batch processor", process.pid, None))
    return process, log


def _wait_processors(ctx: Context, what: str, runs: list[tuple[subprocess.Popen[bytes], Path]],
                     timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process, log in runs:
        try:
            process.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"{what}: a processor did not finish within {timeout:.0f} s:\n    "
                                 f"{log_tail(log)}") from None
        finally:
            ctx.processes.stop(process)
        if process.returncode != 0:
            raise BenchmarkError(f"{what}: a processor exited with code {process.returncode}:\n    {log_tail(log)}")


def _llm_calls(fake: Any) -> tuple[int, int]:
    """(calls, conversations sent more than once) from the fake's records."""
    from fakes.ollama import last_user_content

    per_conversation: dict[str, int] = {}
    for request in fake.chat_requests:
        text = last_user_content(request)
        per_conversation[text] = per_conversation.get(text, 0) + 1
    return sum(per_conversation.values()), sum(1 for n in per_conversation.values() if n > 1)


def _duplicates(db: Database, name: str) -> int:
    """Source conversations with more than one result document."""
    pipeline = [{"$group": {"_id": "$source_conversation_id", "n": {"$sum": 1}}}, {"$match": {"n": {"$gt": 1}}},
                {"$count": "duplicates"}]
    found = list(db.client[name][RESULTS_COLLECTION].aggregate(pipeline))
    return int(found[0]["duplicates"]) if found else 0


def section_processors(ctx: Context) -> SectionResult:
    """N processors on one collection: exactly-once results and LLM calls; take-over after a SIGKILL.

    Several processors on one collection (issue 9), each its own batch folder and worker id:
    1 and 3 started together (duplicate results, LLM calls counted per conversation by a fake
    Ollama in the benchmark process; targets: 0 duplicates, calls <= conversations + 1 %), 2
    started together with one clock far ahead under libfaketime (issue 16; same targets; skipped
    without ``faketime``), and 2 with one SIGKILLed after a third of the results (target: the
    other finishes everything within the lease plus the one-processor time).
    """
    from fakes.ollama import FakeOllama

    preset = ctx.preset
    n, latency, lease, concurrency = (preset.processors_size, preset.processors_latency, preset.processors_lease,
                                      PROCESSORS_CONCURRENCY)
    timeout = 300 + 2 * n * latency + 4 * lease
    rows: list[list[str]] = []
    targets: list[Target] = []
    # The fake runs in this process (a thread) so that every LLM call can be counted per conversation.
    # The skewed run (issue 16): one of two processors has its clock far ahead (more than a lease): leases
    # come from the database server's clock, so it must not take the other's live claims.
    skew = 10 * lease + 60
    configs: list[tuple[int, float | None]] = [(1, None), (3, None)] + ([(2, skew)] if FAKETIME else [])
    skew_note = ([] if FAKETIME else ["The clock-skew run needs libfaketime (`apt-get install faketime`): skipped."])
    with FakeOllama(latency=latency) as fake:
        wall: dict[str, float] = {}
        for count, ahead in configs:
            fake.reset()
            ctx.say(f"  {count} processor(s) started together on {n} conversations"
                    + (f", one clock {ahead:g} s ahead ..." if ahead else " ..."))
            with ctx.database() as db:
                database = seed_database(db, n)
                started = time.perf_counter()
                runs = [_start_processor(ctx, db, database, fake.url, f"p{count}_{k}", max_concurrent=concurrency,
                                         lease=lease, clock_ahead=ahead if k == 0 else None) for k in range(count)]
                _wait_processors(ctx, f"{count} processors", runs, timeout)
                seconds = time.perf_counter() - started
                wall.setdefault(str(count), seconds)
                check_written(db, database, n, f"{count} processors")
                calls, repeated = _llm_calls(fake)
                duplicates = _duplicates(db, database)
            label = (f"{count} started together, one clock {ahead:g} s ahead" if ahead
                     else f"{count} started together" if count > 1 else "1 (reference)")
            rows.append([label, f"{n:,}", fmt(seconds, 1), str(duplicates), f"{calls:,}", str(repeated), "-"])
            if count > 1:
                what = f"{count} started together" + (f", one clock {ahead:g} s ahead" if ahead else "")
                targets.append(Target(f"Processors: {what}, duplicate results = 0", str(duplicates), duplicates == 0))
                targets.append(Target(f"Processors: {what}, LLM calls <= {n:,} + 1 %", f"{calls:,}",
                                      calls <= n * 1.01))

        fake.reset()
        ctx.say(f"  2 processors on {n} conversations, one SIGKILLed after a third (lease {lease:g} s) ...")
        with ctx.database() as db:
            database = seed_database(db, n)
            started = time.perf_counter()
            victim = _start_processor(ctx, db, database, fake.url, "victim", max_concurrent=concurrency, lease=lease)
            survivor = _start_processor(ctx, db, database, fake.url, "survivor", max_concurrent=concurrency,
                                        lease=lease)
            results = db.client[database][RESULTS_COLLECTION]
            deadline = time.monotonic() + timeout
            while results.count_documents({}) < n // 3:
                if victim[0].poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"the processor to kill ended (or stalled) before a third was done:\n    "
                                         f"{log_tail(victim[1])}")
                time.sleep(0.05)
            victim[0].send_signal(signal.SIGKILL)
            victim[0].wait(STOP_TIMEOUT_SECONDS)
            ctx.processes.stop(victim[0])
            held = db.client[database][SOURCE_COLLECTION].count_documents(
                {"claimed_by": "victim", "status": "processing"})
            _wait_processors(ctx, "the surviving processor", [survivor], timeout)
            elapsed = time.perf_counter() - started
            check_written(db, database, n, "the surviving processor")
            calls, repeated = _llm_calls(fake)
            duplicates = _duplicates(db, database)
        bound = lease + wall["1"]
        rows.append([f"2, one SIGKILLed ({held} claims held)", f"{n:,}", fmt(elapsed, 1), str(duplicates),
                     f"{calls:,}", str(repeated), fmt(bound, 1)])
        targets.append(Target("Processors: one of 2 SIGKILLed, the other finishes within lease + one processor's time",
                              f"{fmt(elapsed, 1)} s <= {fmt(bound, 1)} s", elapsed <= bound))
    return SectionResult(
        "processors",
        f"`python batch_processor.py` processes, each with its own batch folder and worker id, on one collection "
        f"of {n:,} conversations (a fresh SecantusDB per row); `--max-concurrent {concurrency}` each, batch size "
        f"{PROCESSORS_BATCH_SIZE}, `BATCH_LEASE_SECONDS={lease:g}`; a fake Ollama with {latency:g} s latency "
        "in the benchmark process, which counts the LLM calls per conversation. Wall time from the start of the "
        "processes to the exit of the last one, Python start-up included.",
        [("processors", "left"), ("conversations", "right"), ("wall time (s)", "right"),
         ("duplicate results", "right"), ("LLM calls", "right"), ("conversations sent twice", "right"),
         ("bound: lease + 1 processor (s)", "right")],
        rows,
        notes=["Conversations sent twice after a SIGKILL are the victim's claims in flight: taken over once their "
               "lease expired (the unique index still keeps one result each).",
               f"The clock-skew row runs its first processor under libfaketime, {skew:g} s ahead (more than the "
               "lease): lease times are the database server's, so it takes no live claim of the others.",
               *skew_note],
        targets=targets,
    )
