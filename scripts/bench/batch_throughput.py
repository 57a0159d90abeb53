"""Sections 1-3: the batch processor's throughput as concurrency grows, its overhead beside a PyMongo
baseline, and its memory over a small and a large collection."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from config import load_settings
from scripts.bench.harness import (
    CPU_SPLIT_COLUMN,
    CPU_SPLIT_NOTE,
    MODEL,
    RESULTS_COLLECTION,
    SOURCE_COLLECTION,
    BenchmarkError,
    Context,
    ProcessorRun,
    check_written,
    cpu_delta,
    cpu_seconds,
    cpu_text,
    run_processor,
    seed_database,
)
from scripts.bench.render import bars_against_ideal
from scripts.bench.results import SectionResult, Target, fmt

# --- 1. concurrency -----------------------------------------------------------------------------


def section_concurrency(ctx: Context) -> SectionResult:
    """Fake latency 0.5 s; ``--max-concurrent`` 1, 5, 10, 20. Throughput from the processor's own
    job clock: the final ``progress_<job>.json``'s ``successful / elapsed_seconds`` (Python
    start-up, index creation and the service checks are not in it). Efficiency = throughput /
    ideal, ideal = concurrency / latency. Target: efficiency >= 0.95 at 10.
    """
    latency = ctx.preset.concurrency_latency
    rows: list[list[str]] = []
    chart: dict[str, list[Any]] = {"levels": [], "measured": [], "ideal": []}
    efficiency_at_10: float | None = None
    with ctx.fake_ollama(latency) as fake:
        for level, n in ctx.preset.concurrency_sizes.items():
            ctx.say(f"  concurrency {level}: {n} conversations at {latency:g} s latency ...")
            run = run_processor(ctx, what=f"concurrency {level}", fake=fake, n=n, max_concurrent=level,
                                latency=latency)
            ideal = level / latency
            efficiency = run.throughput / ideal
            if level == 10:
                efficiency_at_10 = efficiency
            rows.append([str(level), f"{n:,}", fmt(run.elapsed_seconds, 2), fmt(run.throughput, 2), fmt(ideal, 2),
                         fmt(efficiency, 3), run.cpu_split()])
            chart["levels"].append(level)
            chart["measured"].append(run.throughput)
            chart["ideal"].append(ideal)
    targets = []
    if efficiency_at_10 is not None:
        targets.append(Target("Concurrency: efficiency at --max-concurrent 10 >= 0.95",
                              fmt(efficiency_at_10, 3), efficiency_at_10 >= 0.95))
    return SectionResult(
        "concurrency",
        f"`python batch_processor.py --max-concurrent N --batch-size {ctx.preset.batch_size}` against the fake "
        f"Ollama with a fixed latency of {latency:g} s per chat; a fresh SecantusDB server per run. Throughput "
        "is the processor's own job clock: the final progress file's `successful / elapsed_seconds` (Python "
        "start-up, the service checks and index creation are not in it). Ideal = concurrency / latency; "
        "efficiency = throughput / ideal.",
        [("--max-concurrent", "right"), ("conversations", "right"), ("job time (s)", "right"),
         ("throughput (conv/s)", "right"), ("ideal (conv/s)", "right"), ("efficiency", "right"),
         CPU_SPLIT_COLUMN],
        rows,
        notes=[CPU_SPLIT_NOTE.format(cores=os.cpu_count())],
        targets=targets,
        chart=chart,
    )


# --- 2. overhead ---------------------------------------------------------------------------------


async def _baseline(uri: str, database: str, concurrency: int, batch_size: int) -> tuple[int, float]:
    """The processor's MongoDB reads and writes and nothing else; returns (conversations, seconds)."""
    from pymongo import ASCENDING, AsyncMongoClient

    from batch_processor import BATCH_LOOKAHEAD, PROCESSOR_VERSION
    from mongo_client import SOURCE_INDEXES, STATUS_PROCESSED, STATUS_PROCESSING, result_indexes, unprocessed_filter
    from prompt_builder import load_taxonomy

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, maxPoolSize=max(20, 2 * concurrency), tz_aware=True, appname="benchmark-baseline"
    )
    try:
        db = client[database]
        source, results = db[SOURCE_COLLECTION], db[RESULTS_COLLECTION]
        await client.admin.command("ping")
        # The processor's indexes: those of its (default) taxonomy's label fields included.
        label_fields = load_taxonomy(load_settings({}, environ={}, env_file=None).taxonomy_file).field_names
        for collection, indexes in ((source, SOURCE_INDEXES), (results, result_indexes(label_fields))):
            for keys, options in indexes:
                await collection.create_index(keys, **options)
        semaphore = asyncio.Semaphore(concurrency)
        job_id = f"baseline_{datetime.now(UTC):%Y%m%d_%H%M%S}"
        done = 0

        async def one(document: dict[str, Any]) -> None:
            nonlocal done
            async with semaphore:
                now = datetime.now(UTC)
                result = {
                    "conversation_number": document["conversation_number"],
                    "source_conversation_id": document["_id"],
                    "classification": {"categorization": "Customer contacts support about their issue",
                                       "intent": "Order Status", "topic": "Shipping/Delivery",
                                       "sentiment": "Negative"},
                    "processing_metadata": {"processed_at": now, "model_used": MODEL, "processing_duration_ms": 1,
                                            "processor_version": PROCESSOR_VERSION, "batch_job_id": job_id},
                }
                await results.update_one({"source_conversation_id": document["_id"]},
                                         {"$set": result, "$setOnInsert": {"created_at": now}}, upsert=True)
                await source.update_one(
                    {"_id": document["_id"]},
                    {"$set": {"status": STATUS_PROCESSED, "last_processed_at": now},
                     "$unset": {"failure_reason": "", "failure_type": ""}},
                )
                done += 1

        started = time.perf_counter()
        last = None
        running: set[asyncio.Future[Any]] = set()
        while True:
            query = unprocessed_filter(False)
            if last is not None:
                query["_id"] = {"$gt": last}
            documents = await source.find(query).sort("_id", ASCENDING).limit(batch_size).to_list(length=batch_size)
            if not documents:
                break
            last = documents[-1]["_id"]
            await source.update_many(
                {"_id": {"$in": [d["_id"] for d in documents]}},
                {"$set": {"status": STATUS_PROCESSING, "last_processed_at": datetime.now(UTC)}},
            )
            running.add(asyncio.ensure_future(asyncio.gather(*(one(d) for d in documents))))
            # As the processor: the next batch is read while the current one finishes.
            while len(running) >= BATCH_LOOKAHEAD:
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()
        if running:
            await asyncio.gather(*running)
        return done, time.perf_counter() - started
    finally:
        await client.close()


def _baseline_run(ctx: Context, n: int) -> tuple[float, float, float | None]:
    """One baseline run on a fresh SecantusDB: (conv/s, the benchmark process's CPU s, SecantusDB's CPU s)."""
    concurrency, batch_size = ctx.preset.overhead_concurrency, ctx.preset.batch_size
    with ctx.database() as db:
        database = seed_database(db, n)
        database_cpu = cpu_seconds(db.pid)
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            done, seconds = asyncio.run(_baseline(db.uri, database, concurrency, batch_size))
        except Exception as e:
            raise BenchmarkError(f"overhead (PyMongo baseline): {type(e).__name__}: {e}") from e
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        database_cpu = cpu_delta(database_cpu, cpu_seconds(db.pid))
        if done != n:
            raise BenchmarkError(f"overhead (PyMongo baseline): {done} conversations written, expected {n}")
        check_written(db, database, n, "overhead (PyMongo baseline)")
    own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    return n / seconds, own, database_cpu


def _median_cpu(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


def _median_cpus(own: list[float | None], database: list[float | None]) -> str:
    """The CPU column of the overhead table: own process / SecantusDB, medians over the runs."""
    return f"{cpu_text(_median_cpu(own))} / {cpu_text(_median_cpu(database))}"


def section_overhead(ctx: Context) -> SectionResult:
    """Fake latency 0; the processor (``--max-concurrent 10``, batch size 100) beside a baseline
    doing only the same MongoDB reads and writes with PyMongo's AsyncMongoClient on the same
    data: ``_id > last`` batches of 100 with the same status filter, ``update_many`` to
    processing, then per conversation (``asyncio.Semaphore(10)``) an upsert of a result of the
    same shape and an update of the source status to processed. Fresh database per run, the
    processor's indexes created for the baseline too. Target: ours / baseline >= 0.8.
    """
    n, concurrency, batch_size = ctx.preset.overhead_size, ctx.preset.overhead_concurrency, ctx.preset.batch_size
    repeats = ctx.preset.overhead_repeats
    ours: list[ProcessorRun] = []
    baseline: list[tuple[float, float, float | None]] = []
    with ctx.fake_ollama(0.0) as fake:
        for attempt in range(1, repeats + 1):  # interleaved, so drift on the machine hits both alike
            ctx.say(f"  [{attempt}/{repeats}] batch processor: {n:,} conversations, --max-concurrent "
                    f"{concurrency}, fake latency 0 ...")
            ours.append(run_processor(ctx, what="overhead (batch processor)", fake=fake, n=n,
                                      max_concurrent=concurrency, latency=0.0))
            ctx.say(f"  [{attempt}/{repeats}] PyMongo baseline: {n:,} conversations, Semaphore({concurrency}) ...")
            baseline.append(_baseline_run(ctx, n))
    ours_rates = [run.throughput for run in ours]
    base_rates = [rate for rate, _, _ in baseline]
    ours_rate, base_rate = statistics.median(ours_rates), statistics.median(base_rates)
    ratio = ours_rate / base_rate
    pair_ratios = [a / b for a, b in zip(ours_rates, base_rates, strict=True)]
    rows = [
        ["batch processor (classify + write)", f"{n:,}", str(repeats), fmt(ours_rate, 1),
         ", ".join(fmt(r, 1) for r in ours_rates),
         _median_cpus([r.cpu_processor for r in ours], [r.cpu_database for r in ours])],
        ["PyMongo baseline (the same reads and writes only)", f"{n:,}", str(repeats), fmt(base_rate, 1),
         ", ".join(fmt(r, 1) for r in base_rates),
         _median_cpus([c for _, c, _ in baseline], [d for _, _, d in baseline])],
        ["ratio ours / baseline (medians; each pair)", "", "", fmt(ratio, 3),
         ", ".join(fmt(r, 2) for r in pair_ratios), ""],
    ]
    return SectionResult(
        "overhead",
        f"Fake latency 0. The processor (`--max-concurrent {concurrency} --batch-size {batch_size}`, job clock) "
        f"beside a baseline doing only its MongoDB reads and writes with PyMongo's AsyncMongoClient on the same "
        f"data: `_id > last` batches of {batch_size} with the same status filter, `update_many` to processing, "
        f"then per conversation (asyncio.Semaphore({concurrency})) an upsert of a result of the same shape on "
        "`source_conversation_id` and an update of the source status to processed; the next batch is read "
        "while the current one finishes, as the processor does. Every run on a fresh SecantusDB server with "
        "the processor's indexes (mongo_client.SOURCE_INDEXES / result_indexes); processor and baseline runs "
        "alternate.",
        [("run", "left"), ("conversations", "right"), ("runs", "right"), ("conv/s (median)", "right"),
         ("conv/s (each run)", "right"), ("CPU s: own process / SecantusDB (median)", "right")],
        rows,
        notes=[
            f"Runs alternate processor, baseline, processor, ...; the per-pair ratios range from "
            f"{min(pair_ratios):.2f} to {max(pair_ratios):.2f}: differences smaller than that spread are noise.",
            "The baseline's clock starts after its connection check and index creation, as the processor's "
            "job clock does; it runs inside the benchmark process (its CPU column is that process).",
            "What the processor does beyond the baseline is its overhead: the HTTP call to the fake Ollama "
            "(latency 0), prompt building and answer parsing, batch files written with fsync, the checkpoint, "
            "progress files, one log line per conversation, a count of the pending documents and a per-batch "
            "lookup of existing results.",
            "Read the CPU columns with the times: where SecantusDB's CPU seconds come close to a run's time, "
            "the database is the bottleneck of that side, and the ratio says how much the processor slows the "
            "database path down (on this stand-in server), not how fast MongoDB would be.",
        ],
        targets=[Target("Overhead: processor throughput >= 0.8 x the PyMongo baseline", fmt(ratio, 3),
                        ratio >= 0.8)],
        chart={"ours": ours_rate, "baseline": base_rate, "ratio": ratio},
    )


# --- 3. memory -----------------------------------------------------------------------------------


def section_memory(ctx: Context) -> SectionResult:
    """Fake latency 0; peak RSS of the processor process (``os.wait4`` on its pid: ``ru_maxrss``
    of that child alone, taken by a small launcher process: see ``RUSAGE_LAUNCHER``) over a
    small and a large collection. Target: the larger run within 10 % of the smaller.
    """
    small, large = ctx.preset.memory_sizes
    runs: list[ProcessorRun] = []
    with ctx.fake_ollama(0.0) as fake:
        for n in (small, large):
            ctx.say(f"  batch processor: {n:,} conversations, fake latency 0 ...")
            runs.append(run_processor(ctx, what=f"memory ({n} conversations)", fake=fake, n=n,
                                      max_concurrent=ctx.preset.overhead_concurrency, latency=0.0))
    growth = (runs[1].peak_rss_kb - runs[0].peak_rss_kb) / runs[0].peak_rss_kb
    rows = [[f"{run.conversations:,}", fmt(run.peak_rss_kb / 1024, 1), fmt(run.elapsed_seconds, 2),
             fmt(run.throughput, 1), run.cpu_split()] for run in runs]
    rows.append([f"growth {small:,} -> {large:,}", f"{100 * growth:+.1f} %", "", "", ""])
    return SectionResult(
        "memory",
        f"Peak RSS of the batch processor process (`--max-concurrent {ctx.preset.overhead_concurrency} "
        f"--batch-size {ctx.preset.batch_size}`, fake latency 0, a fresh SecantusDB server per run): "
        "`ru_maxrss` from `os.wait4` on its pid, that process alone, Python start-up and imports included. "
        "The processor is started by a small launcher process that makes the `os.wait4` call: measured from "
        "the benchmark process, `ru_maxrss` would never be below the benchmark process's own high-water RSS, "
        "which Linux carries into a child when it execs.",
        [("conversations", "right"), ("peak RSS (MiB)", "right"), ("job time (s)", "right"),
         ("conv/s", "right"), CPU_SPLIT_COLUMN],
        rows,
        notes=[CPU_SPLIT_NOTE.format(cores=os.cpu_count()),
               "Throughput is listed to show what the processor was doing while its memory was measured; "
               "compare the CPU columns for where the time went."],
        targets=[Target(f"Memory: peak RSS over {large:,} within 10 % of {small:,}", f"{100 * growth:+.1f} %",
                        growth <= 0.10)],
        chart={"sizes": [small, large], "peak_mib": [run.peak_rss_kb / 1024 for run in runs]},
    )


def draw_concurrency(axes: Any, data: dict[str, Any]) -> None:
    """Throughput per --max-concurrent (bars) against the ideal (line); bar labels: efficiency."""
    bars_against_ideal(axes, [str(level) for level in data["levels"]], data["measured"], data["ideal"],
                       ideal_label="ideal (concurrency / latency)", xlabel="--max-concurrent (bar label: efficiency)")


def draw_overhead(axes: Any, data: dict[str, Any]) -> None:
    """The processor's and the baseline's throughput."""
    bars = axes.bar(["batch processor", "PyMongo baseline"], [data["ours"], data["baseline"]],
                    color=["#1f77b4", "#9aa0a6"], width=0.5)
    axes.bar_label(bars, labels=[f"{data['ours']:.0f}", f"{data['baseline']:.0f}"], fontsize=8, padding=2)
    axes.set_ylabel("conversations/s")
    axes.set_xlabel(f"ratio {data['ratio']:.2f} (target >= 0.8)")
    axes.grid(axis="y", alpha=0.3)


def draw_memory(axes: Any, data: dict[str, Any]) -> None:
    """Peak RSS of the small and the large run."""
    labels = [f"{n:,} conversations" for n in data["sizes"]]
    bars = axes.bar(labels, data["peak_mib"], color="#2e9e57", width=0.5)
    axes.bar_label(bars, labels=[f"{v:.1f} MiB" for v in data["peak_mib"]], fontsize=8, padding=2)
    axes.set_ylabel("peak RSS (MiB)")
    axes.grid(axis="y", alpha=0.3)
