"""Continuous mode: latency from a conversation's insert to its result, polling vs change streams.

    python -m scripts.bench_wakeup [--inserts N] [--poll-interval S]

Runs the REAL processor (``python batch_processor.py --mode continuous``) twice against SecantusDB
(its own server, in memory) and the fake Ollama of fakes/ollama.py (zero latency): once with
``BATCH_CHANGE_STREAMS=false`` (it sleeps ``--poll-interval`` between polls), once with change
streams. Each run inserts N conversations one at a time, at a random moment of the poll cycle
(a random pause of 0 to S seconds after the previous result), and measures the wall time from
the insert to the moment its result is readable. Prints a markdown table (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from fakes.ollama import FakeOllama
from scripts.bench.harness import ROOT, Processes, clean_env
from scripts.tables import Column, markdown_table


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out waiting for {what}")
        time.sleep(0.005)


def conversation(i: int) -> dict[str, Any]:
    return {"conversation_number": str(i), "status": "pending",
            "messages": [{"sender": "customer", "text": f"Where is my order {i}?"}]}


def measure(uri: str, ollama_url: str, *, change_streams: bool, inserts: int, interval: float,
            rng: random.Random) -> list[float]:
    database = f"wakeup_{'streams' if change_streams else 'polling'}"
    processes = Processes()
    with tempfile.TemporaryDirectory() as temporary, MongoClient[dict[str, Any]](uri) as client:
        db, work = client[database], Path(temporary)
        env = clean_env({
            "MONGODB_CONNECTION_STRING": uri, "MONGODB_DATABASE_NAME": database, "LLM_ENDPOINT": ollama_url,
            "BATCH_FILES_DIR": str(work / "batch_files"), "BATCH_MONITORING_MODE": "production",
            "BATCH_CHANGE_STREAMS": "true" if change_streams else "false", "LOG_LEVEL": "WARNING",
        })
        command = [sys.executable, str(ROOT / "batch_processor.py"), "--mode", "continuous",
                   "--poll-interval", str(interval)]
        process = processes.start("batch processor", command, cwd=work, env=env, log=work / "processor.log")
        try:
            # Warm-up: the first conversation proves the processor is up (not measured).
            db.conversation_set.insert_one(conversation(0))
            wait_for(lambda: db.sentimental_analysis.count_documents({}) == 1, 120, "the processor to start")
            latencies = []
            for i in range(1, inserts + 1):
                time.sleep(rng.uniform(0, interval))
                started = time.perf_counter()
                query = {"source_conversation_id": db.conversation_set.insert_one(conversation(i)).inserted_id}
                wait_for(lambda q=query: db.sentimental_analysis.find_one(q, projection={"_id": 1}),
                         interval * 3 + 60, f"the result of conversation {i}")
                latencies.append(time.perf_counter() - started)
            return latencies
        finally:
            processes.stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_wakeup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inserts", type=int, default=10, help="conversations per run [default: %(default)s]")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds [default: %(default)s]")
    parser.add_argument("--seed", type=int, default=12, help="random pauses' seed [default: %(default)s]")
    args = parser.parse_args(argv)
    from secantus import SecantusDBServer

    rows = []
    with SecantusDBServer(port=0, storage_path=":memory:") as server, FakeOllama() as fake:
        for change_streams in (False, True):
            values = measure(server.uri, fake.url, change_streams=change_streams, inserts=args.inserts,
                             interval=args.poll_interval, rng=random.Random(args.seed))
            rows.append(("change streams" if change_streams else f"polling every {args.poll_interval:g} s", values))
    print(f"{args.inserts} inserts per run, each at a random moment of the {args.poll_interval:g} s poll cycle; "
          "seconds from insert to result\n")
    table = []
    for name, values in rows:
        figures = (statistics.median(values), statistics.fmean(values), min(values), max(values))
        table.append([name, *(f"{figure:.2f}" for figure in figures)])
    columns: list[Column] = [("wake-up", "left"), *((name, "right") for name in ("median", "mean", "min", "max"))]
    print(markdown_table(columns, table))
    polling, streams = (statistics.median(v) for _, v in rows)
    print(f"\nmedian ratio polling / change streams: {polling / streams:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
