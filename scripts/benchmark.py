"""Benchmarks (GitHub issue #5): batch throughput, pipeline overhead, memory, API latency, prompt size.

    python -m scripts.benchmark [--full | --smoke] [--only SECTION[,SECTION]] [--label TEXT]
                                [--output FILE.md] [--chart FILE.png]

Runs the REAL batch processor (``python batch_processor.py``) and the REAL API (``python
main.py``) as subprocesses against the test suite's fake Ollama (``python -m tests.fake_ollama``,
its own subprocess, fixed latency) and SecantusDB (``python -m secantus``, its own subprocess,
data in a temporary folder), and writes ``docs/benchmarks.md`` (tables, targets with PASS/MISS,
the machine and the exact command) and a PNG chart (``docs/benchmarks.png``, matplotlib Agg).

Sections (``--only`` takes a comma-separated subset):

``concurrency``
    Fake latency 0.5 s; ``--max-concurrent`` 1, 5, 10, 20. Throughput from the processor's own
    job clock: the final ``progress_<job>.json``'s ``successful / elapsed_seconds`` (Python
    start-up, index creation and the service checks are not in it). Efficiency = throughput /
    ideal, ideal = concurrency / latency. Target: efficiency >= 0.95 at 10.
``overhead``
    Fake latency 0; the processor (``--max-concurrent 10``, batch size 100) beside a baseline
    doing only the same MongoDB reads and writes with PyMongo's AsyncMongoClient on the same
    data: ``_id > last`` batches of 100 with the same status filter, ``update_many`` to
    processing, then per conversation (``asyncio.Semaphore(10)``) an upsert of a result of the
    same shape and an update of the source status to processed. Fresh database per run, the
    processor's indexes created for the baseline too. Target: ours / baseline >= 0.8.
``memory``
    Fake latency 0; peak RSS of the processor process (``os.wait4`` on its pid: ``ru_maxrss``
    of that child alone, taken by a small launcher process: see ``RUSAGE_LAUNCHER``) over a
    small and a large collection. Target: the larger run within 10 % of the smaller.
``api``
    p50/p95/p99 latency and requests/s of ``POST /classify`` at 1, 10 and 50 concurrent
    clients against a zero-latency fake, beside the fake's own latency measured the same way
    (``POST /api/chat`` with the payload the API sends). asyncio load generator, one
    aiohttp session (keep-alive) per level, warm-up requests not counted, non-200 answers
    counted as errors. Target: p50 overhead under 5 ms at 1 client; no error at 50.
``prompt``
    Prompt characters per request, split into the cached prefix (system prompt + few-shots)
    and the conversation, and the fake's ``prompt_eval_count`` for a cold cache and with the
    prefix cached, for the shortest, median and longest sample conversation and a synthetic
    conversation over the character budget: real requests through ``LLMClient``.
``processors``
    Several processors on one collection (issue 9), each its own batch folder and worker id:
    1 and 3 started together (duplicate results, LLM calls counted per conversation by a fake
    Ollama in the benchmark process; targets: 0 duplicates, calls <= conversations + 1 %), and 2
    with one SIGKILLed after a third of the results (target: the other finishes everything within
    the lease plus the one-processor time).
``servers``
    Several LLM servers (``OLLAMA_ENDPOINT`` a comma-separated list): fake Ollama subprocesses
    that each serve ``--parallel`` chats at a time at a fixed latency (like ``OLLAMA_NUM_PARALLEL``).
    The processor at the same per-server concurrency with 1, 2 and 4 servers (target: >= 0.9 of
    linear), 3 servers of which one is dead from the start, and 3 of which one is SIGKILLed
    mid-run (target: both complete with >= 0.9 of the 2-server throughput).

Presets: fast (default, a few minutes), ``--full`` (the issue's sizes), ``--smoke`` (tiny
sizes, seconds: run by the test suite so the script never rots; its numbers mean nothing).

Every processor run and baseline run gets a fresh SecantusDB server: SecantusDB slows down over
its lifetime, which would make each run slower than the one before. CPU seconds of each process
are reported beside the times, to show where the time goes.

Subprocesses run with their working directory in a temporary folder (no ``.env`` is read) and
the MONGODB_*/OLLAMA_*/BATCH_* settings passed explicitly; every one is stopped in a
``finally`` (terminate, wait, kill). Servers listen on 127.0.0.1 only.

The markdown file keeps earlier runs: each run is written under ``## Run: <label> (<date>)``,
newest first; ``--label`` defaults to the preset's name. The chart shows the newest run.

A failed step (a server that does not start, a processor exit code other than 0, a count
that does not add up) prints which step and why and exits 1; no file is written then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The project (installed by `make install`) imports from anywhere; ROOT finds its data files.
ROOT = Path(__file__).resolve().parents[1]

from config import Settings, env_name, load_settings  # noqa: E402
from error_handler import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, run_command  # noqa: E402
from utils.batch_file_manager import atomic_write_text  # noqa: E402
from utils.command_line import command_parser, free_port  # noqa: E402

# Exit codes (error_handler): 0 every section ran, the file and the chart are written (targets may be
# missed); 1 a step failed (a server did not start, a run did not complete): nothing written; 2 bad
# command line, or the output files cannot be written; 130 interrupted.

SECTIONS = ("concurrency", "overhead", "memory", "api", "prompt", "processors", "servers")
SECTION_TITLES = {
    "concurrency": "1. Concurrency scaling",
    "overhead": "2. Pipeline overhead",
    "memory": "3. Memory",
    "api": "4. API latency",
    "prompt": "5. Prompt size",
    "processors": "6. Several processors",
    "servers": "7. Several LLM servers",
}
SOURCE_COLLECTION = "conversation_set"
RESULTS_COLLECTION = "sentimental_analysis"
MODEL = "llama3"
PROCESSORS_CONCURRENCY = 5
PROCESSORS_BATCH_SIZE = 20
SAMPLES_FILE = ROOT / "data" / "sample_conversations.json"
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_CHART = ROOT / "docs" / "benchmarks.png"

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
RUN_HEADING = re.compile(r"^## Run: ", re.MULTILINE)

#: Every subprocess of the last main() call: (name, pid, port or None). The smoke test checks them.
STARTED_PROCESSES: list[tuple[str, int, int | None]] = []

FILE_HEADER = """\
# Benchmarks

Measured by [`scripts/benchmark.py`](../scripts/benchmark.py) (issue #5): the real batch processor
(`python batch_processor.py`) and the real API (`python main.py`) run as subprocesses against the
test suite's fake Ollama (`tests/fake_ollama.py`, its own process, fixed latency) and SecantusDB
(a MongoDB-wire-compatible server, its own process). Nothing here is estimated: every number
comes from the run it is listed under, on the machine described there.

Reproduce, from the project root with `.venv` activated (`source .venv/bin/activate`, see the README):
`python -m scripts.benchmark` (fast preset, a few minutes; `make bench`), `python -m scripts.benchmark
--full` (the issue's sizes), `--only api,prompt` for a subset, `--label after` to name a run. Runs are
kept, newest first; the chart shows the newest run.
"""


class BenchmarkError(Exception):
    """A step failed: the message says which and why."""


# --- presets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    concurrency_latency: float
    concurrency_sizes: dict[int, int]  # --max-concurrent -> conversations
    overhead_size: int
    memory_sizes: tuple[int, int]
    api_requests: int  # measured requests per level (and per target: API, fake)
    api_warmup: int  # requests per level sent first and not counted
    api_levels: tuple[int, ...] = (1, 10, 50)
    overhead_repeats: int = 1  # processor and baseline runs, alternating; the medians are compared
    batch_size: int = 100
    overhead_concurrency: int = 10
    processors_size: int = 1000  # conversations shared by several processors (issue 9)
    processors_latency: float = 0.2  # the model is the bottleneck, as in real jobs
    processors_lease: float = 5.0  # BATCH_LEASE_SECONDS of the SIGKILL run
    # Several LLM servers: each fake serves `servers_parallel` chats at a time at `servers_latency`.
    servers_latency: float = 0.5
    servers_parallel: int = 2
    servers_per_server: int = 40  # conversations per live server (so every run lasts about as long)


PRESETS = {
    # ~45 s of concurrency runs; sizes are multiples of the concurrency (no half-empty last round).
    "fast": Preset("fast", 0.5, {1: 20, 5: 100, 10: 200, 20: 300}, 1000, (1000, 5000), 400, 20,
                   overhead_repeats=5),
    "full": Preset("full", 0.5, {1: 60, 5: 300, 10: 400, 20: 600}, 5000, (1000, 20000), 3000, 50,
                   overhead_repeats=5, servers_per_server=100),
    # Seconds, not minutes: proves the harness works end to end; the numbers mean nothing.
    "smoke": Preset("smoke", 0.05, {1: 10, 5: 10, 10: 10, 20: 10}, 10, (10, 20), 20, 2,
                    processors_size=60, processors_latency=0.05, processors_lease=1.5, servers_latency=0.05,
                    servers_per_server=6),
}


# --- results --------------------------------------------------------------------------------


@dataclass
class Target:
    description: str
    measured: str
    passed: bool


@dataclass
class SectionResult:
    key: str
    intro: str
    columns: list[tuple[str, str]]  # (heading, "left" | "right")
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    chart: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return SECTION_TITLES[self.key]


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of ``values`` (linear interpolation between closest ranks)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * p / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# --- subprocesses ---------------------------------------------------------------------------


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def clean_env(values: dict[str, str]) -> dict[str, str]:
    """The environment for a subprocess: none of the developer's settings, then ``values``."""
    settings_names = {env_name(name) for name in Settings.model_fields}
    env = {
        key: value for key, value in os.environ.items()
        if key not in settings_names and not key.startswith(("MONGODB_", "OLLAMA_", "BATCH_", "API_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    ".join(text[-lines:]) or "(empty log)"


class Processes:
    """Starts subprocesses with their output in a log file; :meth:`stop_all` stops every one still running."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []
        self._groups: set[int] = set()  # processes started as the leader of their own process group

    def start(self, name: str, command: list[str], *, cwd: Path, env: dict[str, str], log: Path,
              port: int | None = None, group: bool = False) -> subprocess.Popen[bytes]:
        """Start ``command``; with ``group`` in a new session, so what it starts can be stopped with it."""
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=group)
        self.running.append(process)
        if group:
            self._groups.add(process.pid)
        STARTED_PROCESSES.append((name, process.pid, port))
        return process

    def record_port(self, process: subprocess.Popen[bytes], port: int) -> None:
        """Note the port a process chose itself (the fake Ollama's --port 0)."""
        for i, (name, pid, _) in enumerate(STARTED_PROCESSES):
            if pid == process.pid:
                STARTED_PROCESSES[i] = (name, pid, port)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Terminate, wait, kill if it does not stop (a group leader: its whole group)."""
        group = process.pid in self._groups
        if process.returncode is None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                if group:
                    _kill_group(process.pid)
                process.kill()
                process.wait(STOP_TIMEOUT_SECONDS)
        if group:
            _kill_group(process.pid)  # nothing it started may outlive it (normally the group is empty)
            self._groups.discard(process.pid)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            try:
                self.stop(process)
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop pid {process.pid}: {e}", file=sys.stderr)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


#: Starts a command, waits for it with os.wait4 and writes its exit code, peak RSS and CPU time to a
#: JSON file; SIGTERM is passed on. Measured from the benchmark process itself, ru_maxrss would not be
#: the processor's own: Linux carries the parent's high-water RSS into a child when it execs (the
#: vfork'ed image counts), so every run after the benchmark process grew would report at least that.
#: This launcher is a small process: its own size stays far below what it measures.
RUSAGE_LAUNCHER = """\
import json, os, signal, subprocess, sys
report, command = sys.argv[1], sys.argv[2:]
child = subprocess.Popen(command)
signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
signal.signal(signal.SIGINT, signal.SIG_IGN)
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(report, "w") as out:
    json.dump({"pid": child.pid, "exit_code": child.returncode, "maxrss_kb": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime}, out)
"""


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path,
                timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise BenchmarkError(f"{what} exited with code {process.returncode} before it was ready:\n    "
                                 f"{log_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{what} was not ready within {timeout:.0f} s:\n    {log_tail(log)}")
        time.sleep(0.05)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a running process has used so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _cpu(value: float | None) -> str:
    return "n/a" if value is None else _f(value, 2)


@dataclass
class Service:
    """A server subprocess: where it answers and its pid (for its CPU time)."""

    url: str
    pid: int


@dataclass
class Database:
    """A SecantusDB server of one run: its URI and a synchronous client on it."""

    uri: str
    pid: int
    client: Any


@dataclass
class Context:
    """What every section needs: the preset, the process registry and the work folder."""

    preset: Preset
    processes: Processes
    workdir: Path
    say: Callable[[str], None] = print
    _counter: int = 0

    def new_dir(self, name: str) -> Path:
        self._counter += 1
        path = self.workdir / f"{self._counter:03d}_{name}"
        path.mkdir()
        return path

    @contextmanager
    def database(self) -> Iterator[Database]:
        """A fresh SecantusDB server (its own data folder) for one measured run, stopped afterwards.

        One server per run, not one per benchmark: SecantusDB gets slower over its lifetime
        (every write scans the retryable-write records it keeps), so a shared server would make
        each run slower than the one before it.
        """
        from pymongo import MongoClient

        directory = self.new_dir("secantus")
        port = free_port()
        log = directory / "secantus.log"
        command = [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
                   "--storage-path", str(directory / "db"), "--log-level", "WARNING"]
        process = self.processes.start("SecantusDB", command, cwd=directory, env=clean_env({}), log=log, port=port)
        client = None
        try:
            _wait_until(lambda: port_open(port), process, "SecantusDB", log)
            uri = f"mongodb://127.0.0.1:{port}/"
            client = MongoClient[dict[str, Any]](uri, serverSelectionTimeoutMS=10000, tz_aware=True)
            client.admin.command("ping")
            yield Database(uri, process.pid, client)
        finally:
            if client is not None:
                client.close()
            self.processes.stop(process)

    @contextmanager
    def fake_ollama(self, latency: float, parallel: int | None = None) -> Iterator[Service]:
        """A fake Ollama subprocess with a fixed latency (serving ``parallel`` chats at a time), stopped afterwards."""
        directory = self.new_dir(f"fake_ollama_{latency:g}")
        log = directory / "fake_ollama.log"
        command = [sys.executable, "-m", "tests.fake_ollama", "--host", "127.0.0.1", "--port", "0",
                   "--latency", repr(latency)] + (["--parallel", str(parallel)] if parallel else [])
        process = self.processes.start("fake Ollama", command, cwd=directory,
                                       env=clean_env({"PYTHONPATH": str(ROOT)}), log=log)
        try:
            found: list[str] = []

            def listening() -> bool:
                match = re.search(r"fake Ollama listening on (http://\S+)", log.read_text(errors="replace"))
                if match:
                    found.append(match.group(1))
                return bool(match)

            _wait_until(listening, process, f"the fake Ollama (latency {latency:g} s)", log)
            url = found[0]
            self.processes.record_port(process, int(url.rsplit(":", 1)[1]))
            yield Service(url, process.pid)
        finally:
            self.processes.stop(process)

    @contextmanager
    def api(self, ollama_url: str) -> Iterator[Service]:
        """``python main.py`` on a free loopback port; yields it once /health and /ready answer 200."""
        directory = self.new_dir("api")
        log = directory / "api.log"
        port = free_port()
        env = clean_env({"OLLAMA_ENDPOINT": ollama_url, "OLLAMA_MODEL": MODEL, "OLLAMA_TIMEOUT": "30",
                         "LOG_LEVEL": "INFO"})
        command = [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port)]
        process = self.processes.start("API", command, cwd=directory, env=env, log=log, port=port)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until(lambda: _http_ok(f"{url}/health"), process, "the API (python main.py)", log)
            if not _http_ok(f"{url}/ready"):
                raise BenchmarkError(f"the API answers /health but not /ready (fake Ollama at {ollama_url}):\n    "
                                     f"{log_tail(log)}")
            yield Service(url, process.pid)
        finally:
            self.processes.stop(process)


# --- data -------------------------------------------------------------------------------------


def make_conversation(i: int) -> dict[str, Any]:
    """A source document in the conversation_set schema (as tests/test_batch_processor.py builds them)."""
    base = 100_000 + 10 * i
    return {
        "conversation_number": str(5000 + i),
        "tweets": [
            {"tweet_id": base, "author_id": f"cust{i}", "inbound": True,
             "created_at": "Tue Oct 31 21:45:10 +0000 2017",
             "text": f"@AcmeCare my order {i} has not arrived and I am annoyed"},
            {"tweet_id": base + 1, "author_id": "AcmeCare", "inbound": False,
             "created_at": "Tue Oct 31 21:50:10 +0000 2017",
             "text": f"@cust{i} Sorry to hear that, please DM us your order number."},
        ],
        "status": "pending",
    }


def seed_database(db: Database, n: int) -> str:
    """A new database holding ``n`` pending conversations; returns its name."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    collection = db.client[name][SOURCE_COLLECTION]
    for start in range(0, n, 5000):
        collection.insert_many([make_conversation(i) for i in range(start, min(n, start + 5000))])
    return name


def check_written(db: Database, name: str, n: int, what: str) -> None:
    """Every one of the ``n`` conversations has exactly one result and the status processed."""
    results = db.client[name][RESULTS_COLLECTION].count_documents({})
    processed = db.client[name][SOURCE_COLLECTION].count_documents({"status": "processed"})
    if results != n or processed != n:
        raise BenchmarkError(f"{what}: {results} results and {processed} processed sources for {n} conversations")


def load_samples() -> list[dict[str, Any]]:
    """The sample conversations as /classify bodies (the evaluation labels and status dropped)."""
    data = json.loads(SAMPLES_FILE.read_text(encoding="utf-8"))
    return [{key: doc[key] for key in ("conversation_number", "tweets", "messages") if key in doc} for doc in data]


# --- the batch processor -----------------------------------------------------------------------


@dataclass
class ProcessorRun:
    conversations: int
    successful: int
    elapsed_seconds: float  # the processor's job clock (progress file)
    wall_seconds: float  # process start to exit, Python start-up included
    peak_rss_kb: int
    cpu_processor: float  # user + system seconds of the processor process (wait4 in the launcher)
    cpu_database: float | None  # SecantusDB's CPU seconds while the processor ran
    cpu_fake: float | None  # the fake Ollama's CPU seconds while the processor ran

    @property
    def throughput(self) -> float:
        return self.successful / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def cpu_split(self) -> str:
        return f"{_cpu(self.cpu_processor)} / {_cpu(self.cpu_database)} / {_cpu(self.cpu_fake)}"


CPU_SPLIT_COLUMN = ("CPU s: processor / SecantusDB / fake", "right")
CPU_SPLIT_NOTE = ("CPU s: user + system CPU seconds each process used during the run (the processor's from "
                  "`os.wait4`, its start-up and imports included; the servers' from /proc); the machine has "
                  "{cores} core(s). A server whose CPU seconds come close to the job time is the bottleneck.")


def run_processor(ctx: Context, *, what: str, fake: Service, n: int, max_concurrent: int,
                  latency: float, endpoint: str | None = None,
                  during: Callable[[Path], None] | None = None) -> ProcessorRun:
    """A fresh SecantusDB with ``n`` conversations; ``python batch_processor.py`` over it; everything checked."""
    with ctx.database() as db:
        database = seed_database(db, n)
        directory = ctx.new_dir(f"processor_{n}_{max_concurrent}")
        files_dir = directory / "batch_files"
        log = directory / "processor.log"
        batch_size = ctx.preset.batch_size
        env = clean_env({
            "MONGODB_CONNECTION_STRING": db.uri,
            "MONGODB_DATABASE_NAME": database,
            "MONGODB_SOURCE_COLLECTION": SOURCE_COLLECTION,
            "MONGODB_RESULTS_COLLECTION": RESULTS_COLLECTION,
            "MONGODB_BATCH_SIZE": str(batch_size),
            "MONGODB_TIMEOUT_MS": "30000",
            "OLLAMA_ENDPOINT": endpoint or fake.url,  # endpoint: several servers, comma-separated
            "OLLAMA_MODEL": MODEL,
            "OLLAMA_TIMEOUT": "60",
            "BATCH_PROCESSOR_MODE": "batch",
            "BATCH_MAX_CONCURRENT": str(max_concurrent),
            "BATCH_FILES_DIR": str(files_dir),
            "BATCH_MONITORING_MODE": "production",
            "LOG_LEVEL": "INFO",
        })
        report = directory / "rusage.json"
        command = [sys.executable, "-c", RUSAGE_LAUNCHER, str(report),
                   sys.executable, str(ROOT / "batch_processor.py"), "--mode", "batch",
                   "--max-concurrent", str(max_concurrent), "--batch-size", str(batch_size)]
        timeout = 300 + 4 * math.ceil(n / max_concurrent) * latency + 0.2 * n
        database_cpu, fake_cpu = cpu_seconds(db.pid), cpu_seconds(fake.pid)
        started = time.perf_counter()
        # The launcher runs os.wait4(pid, 0) on the processor: that process's own ru_maxrss
        # (RUSAGE_CHILDREN would mix every child). Its own session: stopping it stops the processor.
        process = ctx.processes.start("batch processor launcher", command, cwd=directory, env=env, log=log,
                                      group=True)
        try:
            if during is not None:
                during(files_dir)  # e.g. a watcher that kills one of the servers mid-run
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchmarkError(f"{what}: the batch processor did not finish within {timeout:.0f} s:\n    "
                                     f"{log_tail(log)}") from None
            wall = time.perf_counter() - started
        finally:
            ctx.processes.stop(process)
        database_cpu = _cpu_delta(database_cpu, cpu_seconds(db.pid))
        fake_cpu = _cpu_delta(fake_cpu, cpu_seconds(fake.pid))
        try:
            usage = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BenchmarkError(f"{what}: the launcher exited with code {process.returncode} and wrote no "
                                 f"usage report ({e}):\n    {log_tail(log)}") from e
        STARTED_PROCESSES.append(("batch processor", int(usage["pid"]), None))
        if usage["exit_code"] != 0:
            raise BenchmarkError(f"{what}: the batch processor exited with code {usage['exit_code']}:\n    "
                                 f"{log_tail(log)}")
        progress_files = sorted(files_dir.glob("progress_*.json"))
        if len(progress_files) != 1:
            raise BenchmarkError(f"{what}: expected one progress_<job>.json in {files_dir}, "
                                 f"found {len(progress_files)}")
        progress = json.loads(progress_files[0].read_text(encoding="utf-8"))
        if progress.get("status") != "completed" or progress.get("successful") != n or progress.get("failed"):
            raise BenchmarkError(
                f"{what}: the job did not classify all {n} conversations: status {progress.get('status')}, "
                f"successful {progress.get('successful')}, failed {progress.get('failed')}, "
                f"queued {progress.get('queued_for_retry')}"
            )
        check_written(db, database, n, what)
    elapsed = float(progress["elapsed_seconds"])
    if elapsed <= 0:
        raise BenchmarkError(f"{what}: the progress file says elapsed_seconds={elapsed}")
    return ProcessorRun(n, int(progress["successful"]), elapsed, wall, int(usage["maxrss_kb"]),
                        float(usage["cpu_seconds"]), database_cpu, fake_cpu)


# --- 1. concurrency -----------------------------------------------------------------------------


def section_concurrency(ctx: Context) -> SectionResult:
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
            rows.append([str(level), f"{n:,}", _f(run.elapsed_seconds, 2), _f(run.throughput, 2), _f(ideal, 2),
                         _f(efficiency, 3), run.cpu_split()])
            chart["levels"].append(level)
            chart["measured"].append(run.throughput)
            chart["ideal"].append(ideal)
    targets = []
    if efficiency_at_10 is not None:
        targets.append(Target("Concurrency: efficiency at --max-concurrent 10 >= 0.95",
                              _f(efficiency_at_10, 3), efficiency_at_10 >= 0.95))
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
    from config import load_settings
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
        database_cpu = _cpu_delta(database_cpu, cpu_seconds(db.pid))
        if done != n:
            raise BenchmarkError(f"overhead (PyMongo baseline): {done} conversations written, expected {n}")
        check_written(db, database, n, "overhead (PyMongo baseline)")
    own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
    return n / seconds, own, database_cpu


def _median_cpu(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


def section_overhead(ctx: Context) -> SectionResult:
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
        ["batch processor (classify + write)", f"{n:,}", str(repeats), _f(ours_rate, 1),
         ", ".join(_f(r, 1) for r in ours_rates),
         f"{_cpu(_median_cpu([r.cpu_processor for r in ours]))} / {_cpu(_median_cpu([r.cpu_database for r in ours]))}"],
        ["PyMongo baseline (the same reads and writes only)", f"{n:,}", str(repeats), _f(base_rate, 1),
         ", ".join(_f(r, 1) for r in base_rates),
         f"{_cpu(_median_cpu([c for _, c, _ in baseline]))} / {_cpu(_median_cpu([d for _, _, d in baseline]))}"],
        ["ratio ours / baseline (medians; each pair)", "", "", _f(ratio, 3),
         ", ".join(_f(r, 2) for r in pair_ratios), ""],
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
        targets=[Target("Overhead: processor throughput >= 0.8 x the PyMongo baseline", _f(ratio, 3),
                        ratio >= 0.8)],
        chart={"ours": ours_rate, "baseline": base_rate, "ratio": ratio},
    )


# --- 3. memory -----------------------------------------------------------------------------------


def section_memory(ctx: Context) -> SectionResult:
    small, large = ctx.preset.memory_sizes
    runs: list[ProcessorRun] = []
    with ctx.fake_ollama(0.0) as fake:
        for n in (small, large):
            ctx.say(f"  batch processor: {n:,} conversations, fake latency 0 ...")
            runs.append(run_processor(ctx, what=f"memory ({n} conversations)", fake=fake, n=n,
                                      max_concurrent=ctx.preset.overhead_concurrency, latency=0.0))
    growth = (runs[1].peak_rss_kb - runs[0].peak_rss_kb) / runs[0].peak_rss_kb
    rows = [[f"{run.conversations:,}", _f(run.peak_rss_kb / 1024, 1), _f(run.elapsed_seconds, 2),
             _f(run.throughput, 1), run.cpu_split()] for run in runs]
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


# --- 4. API --------------------------------------------------------------------------------------


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


def section_api(ctx: Context) -> SectionResult:
    from aggregator import validate_conversation
    from classifier import ConversationClassifier
    from llm_wrapper import build_chat_payload

    preset = ctx.preset
    samples = load_samples()
    rows: list[list[str]] = []
    notes: list[str] = []
    chart: dict[str, Any] = {"levels": [], "api": [], "fake": []}
    overhead_at_1: float | None = None
    errors_at_50: int | None = None
    with ctx.fake_ollama(0.0) as fake, ctx.api(fake.url) as api:
        fake_url, api_url = fake.url, api.url
        settings = load_settings({"ollama_endpoint": fake_url, "ollama_model": MODEL}, environ={}, env_file=None)
        classifier = ConversationClassifier.from_settings(settings)
        api_bodies = [json.dumps(body).encode() for body in samples]
        fake_bodies = [
            json.dumps(build_chat_payload(settings, classifier.prepare(validate_conversation(body)).messages,
                                          classifier.schema)).encode()
            for body in samples
        ]
        for clients in preset.api_levels:
            measured: dict[str, LoadResult] = {}
            for name, path, url, bodies in (("fake", "/api/chat", f"{fake_url}/api/chat", fake_bodies),
                                            ("api", "/classify", f"{api_url}/classify", api_bodies)):
                ctx.say(f"  {clients} client(s): {preset.api_requests} x POST {path} ({name}) ...")
                before = (cpu_seconds(api.pid), cpu_seconds(fake.pid), _own_cpu())
                result = asyncio.run(load_test(url, bodies, clients=clients, requests=preset.api_requests,
                                               warmup=preset.api_warmup))
                after = (cpu_seconds(api.pid), cpu_seconds(fake.pid), _own_cpu())
                result.cpu = [_cpu_delta(b, a) for b, a in zip(before, after, strict=True)]
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
            if clients == 50:
                errors_at_50 = api_result.errors
            for label, result, extra in (("POST /classify (API)", api_result, _f(overhead, 2)),
                                         ("POST /api/chat (fake, direct)", fake_result, "")):
                rows.append([str(clients), label, f"{result.requests:,}", str(result.errors), _f(result.p(50), 2),
                             _f(result.p(95), 2), _f(result.p(99), 2), _f(result.requests / result.seconds, 1),
                             extra, " / ".join(_cpu(c) for c in result.cpu)])
            chart["levels"].append(clients)
            chart["api"].append((api_result.p(50), api_result.p(95), api_result.p(99)))
            chart["fake"].append((fake_result.p(50), fake_result.p(95), fake_result.p(99)))
    targets = []
    if overhead_at_1 is not None:
        targets.append(Target("API: p50 overhead (API p50 - fake p50) under 5 ms at 1 client",
                              f"{overhead_at_1:.2f} ms", overhead_at_1 < 5.0))
    if errors_at_50 is not None:
        targets.append(Target("API: no error at 50 clients", f"{errors_at_50} errors", errors_at_50 == 0))
    return SectionResult(
        "api",
        f"`python main.py` against a zero-latency fake Ollama; an asyncio load generator in the benchmark "
        f"process, one aiohttp session (keep-alive) per level, {preset.api_requests:,} measured requests per "
        f"level after {preset.api_warmup} warm-up requests, the {len(samples)} conversations of "
        "data/sample_conversations.json in turn. The fake is measured the same way with the payload the API "
        "sends it (llm_wrapper.build_chat_payload of ConversationClassifier.prepare). Latencies of 200 answers; "
        "anything else counts as an error.",
        [("clients", "right"), ("endpoint", "left"), ("requests", "right"), ("errors", "right"),
         ("p50 (ms)", "right"), ("p95 (ms)", "right"), ("p99 (ms)", "right"), ("requests/s", "right"),
         ("p50 overhead (ms)", "right"), ("CPU s: API / fake / load generator", "right")],
        rows,
        notes=notes + [f"The load generator, the API and the fake share the machine's {os.cpu_count()} core(s): "
                       "at 10 and 50 clients the latencies include waiting for a CPU. CPU s: user + system CPU "
                       "seconds of each process during the measured requests of that row (the API's stays near "
                       "0 on the fake rows)."],
        targets=targets,
        chart=chart,
    )


# --- 5. prompt -----------------------------------------------------------------------------------


def synthetic_long_conversation(char_budget: int) -> dict[str, Any]:
    """A chat well over the character budget: alternating turns of about 300 characters."""
    sentence = ("I am writing again about the replacement router that was promised three weeks ago; the "
                "tracking page still shows label created and nobody answers my emails. ")
    messages: list[dict[str, Any]] = []
    i = 0
    while sum(len(m["text"]) for m in messages) < 2 * char_budget:
        sender = "customer" if i % 2 == 0 else "agent"
        text = (f"[{i}] " + sentence * 2) if sender == "customer" else (
            f"[{i}] Thank you for your patience, I have escalated the case to our logistics team once more "
            "and will update you as soon as I hear back from them about the shipment.")
        messages.append({"sender": sender, "text": text})
        i += 1
    return {"conversation_number": "synthetic-long", "messages": messages}


def section_prompt(ctx: Context) -> SectionResult:
    from aggregator import validate_conversation
    from classifier import ConversationClassifier
    from llm_wrapper import LLMClient

    samples = load_samples()
    rows: list[list[str]] = []
    chart: dict[str, Any] = {"names": [], "prefix": [], "conversation": []}
    with ctx.fake_ollama(0.0) as fake:
        settings = load_settings({"ollama_endpoint": fake.url, "ollama_model": MODEL}, environ={}, env_file=None)
        classifier = ConversationClassifier.from_settings(settings)
        prepared = sorted(
            ((body, classifier.prepare(validate_conversation(body))) for body in samples),
            key=lambda pair: len(pair[1].messages[-1]["content"]),
        )
        picks = [("shortest sample", prepared[0][0]), ("median sample", prepared[len(prepared) // 2][0]),
                 ("longest sample", prepared[-1][0]),
                 ("synthetic, over the budget", synthetic_long_conversation(settings.conversation_char_budget))]
        other = validate_conversation({"conversation_number": "warm-up", "messages": [
            {"sender": "customer", "text": "Hello, I have a question about my bill."},
            {"sender": "agent", "text": "Happy to help."}]})
        with LLMClient(settings) as client:
            for name, body in picks:
                conversation = validate_conversation(body)
                ready = classifier.prepare(conversation)
                # A chat with another first message empties the fake's (and Ollama's) prompt cache.
                client.chat([{"role": "system", "content": f"benchmark cache reset {uuid.uuid4().hex}"}],
                            classifier.schema)
                cold = classifier.classify(conversation, client).chat.prompt_eval_count
                classifier.classify(other, client)  # the prefix is cached, this conversation is not
                warm = classifier.classify(conversation, client).chat.prompt_eval_count
                prefix = classifier.prompt_builder.prefix_chars
                own = len(ready.messages[-1]["content"])
                total = sum(len(m["content"]) for m in ready.messages)
                if total != prefix + own:
                    raise BenchmarkError(f"prompt ({name}): {total} characters sent, prefix {prefix} + "
                                         f"conversation {own}")
                if cold is None or warm is None:
                    raise BenchmarkError(f"prompt ({name}): the fake's answer has no prompt_eval_count")
                transcript = ready.transcript
                cut = (f"yes: {transcript.original_chars:,} -> {len(transcript.text):,} chars, "
                       f"{transcript.omitted_turns} turns omitted") if transcript.truncated else "no"
                rows.append([f"{name} ({conversation.conversation_number})", str(transcript.turn_count),
                             f"{prefix:,}", f"{own:,}", f"{total:,}", f"{100 * prefix / total:.0f} %",
                             f"{cold:,}", f"{warm:,}", cut])
                chart["names"].append(name)
                chart["prefix"].append(prefix)
                chart["conversation"].append(own)
    return SectionResult(
        "prompt",
        "Characters of one `/api/chat` request (message contents), split into the prefix shared by every "
        "request (system prompt with the taxonomy + few-shot examples) and the conversation (the last user "
        "message), and the fake's `prompt_eval_count` (prompt tokens evaluated, about 4 characters a token; "
        "the fake counts only what differs from the previous request, as Ollama's prompt cache does). "
        "Real requests through `LLMClient` and `ConversationClassifier.classify`. Cold: after a request "
        "with another prefix. Prefix cached: right after another conversation.",
        [("conversation", "left"), ("turns", "right"), ("prefix chars", "right"), ("conversation chars", "right"),
         ("total chars", "right"), ("prefix share", "right"), ("tokens cold", "right"),
         ("tokens prefix cached", "right"), ("cut to the budget", "left")],
        rows,
        notes=[f"Character budget (CONVERSATION_CHAR_BUDGET): {settings.conversation_char_budget:,}."],
        chart=chart,
    )


# --- 6. several processors ----------------------------------------------------------------------


def _start_processor(ctx: Context, db: Database, database: str, fake_url: str, name: str, *,
                     max_concurrent: int, lease: float) -> tuple[subprocess.Popen[bytes], Path]:
    """``python batch_processor.py`` with its own batch folder and worker id (not waited for)."""
    directory = ctx.new_dir(f"processor_{name}")
    log = directory / "processor.log"
    env = clean_env({
        "MONGODB_CONNECTION_STRING": db.uri, "MONGODB_DATABASE_NAME": database,
        "MONGODB_SOURCE_COLLECTION": SOURCE_COLLECTION, "MONGODB_RESULTS_COLLECTION": RESULTS_COLLECTION,
        "MONGODB_BATCH_SIZE": str(PROCESSORS_BATCH_SIZE), "MONGODB_TIMEOUT_MS": "30000",
        "OLLAMA_ENDPOINT": fake_url, "OLLAMA_MODEL": MODEL, "OLLAMA_TIMEOUT": "60",
        "BATCH_MAX_CONCURRENT": str(max_concurrent), "BATCH_FILES_DIR": str(directory / "batch_files"),
        "BATCH_MONITORING_MODE": "production", "BATCH_LEASE_SECONDS": repr(lease), "BATCH_WORKER_ID": name,
        "LOG_LEVEL": "INFO",
    })
    command = [sys.executable, str(ROOT / "batch_processor.py"), "--mode", "batch"]
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
    from tests.fake_ollama import last_user_content

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
    """N processors on one collection: exactly-once results and LLM calls; take-over after a SIGKILL."""
    from tests.fake_ollama import FakeOllama

    preset = ctx.preset
    n, latency, lease, concurrency = (preset.processors_size, preset.processors_latency, preset.processors_lease,
                                      PROCESSORS_CONCURRENCY)
    timeout = 300 + 2 * n * latency + 4 * lease
    rows: list[list[str]] = []
    targets: list[Target] = []
    # The fake runs in this process (a thread) so that every LLM call can be counted per conversation.
    with FakeOllama(latency=latency) as fake:
        wall: dict[str, float] = {}
        for count in (1, 3):
            fake.reset()
            ctx.say(f"  {count} processor(s) started together on {n} conversations ...")
            with ctx.database() as db:
                database = seed_database(db, n)
                started = time.perf_counter()
                runs = [_start_processor(ctx, db, database, fake.url, f"p{count}_{k}", max_concurrent=concurrency,
                                         lease=lease) for k in range(count)]
                _wait_processors(ctx, f"{count} processors", runs, timeout)
                wall[str(count)] = time.perf_counter() - started
                check_written(db, database, n, f"{count} processors")
                calls, repeated = _llm_calls(fake)
                duplicates = _duplicates(db, database)
            label = f"{count} started together" if count > 1 else "1 (reference)"
            rows.append([label, f"{n:,}", _f(wall[str(count)], 1), str(duplicates), f"{calls:,}", str(repeated),
                         "-"])
            if count == 3:
                targets.append(Target("Processors: 3 started together, duplicate results = 0", str(duplicates),
                                      duplicates == 0))
                targets.append(Target(f"Processors: 3 started together, LLM calls <= {n:,} + 1 %", f"{calls:,}",
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
        rows.append([f"2, one SIGKILLed ({held} claims held)", f"{n:,}", _f(elapsed, 1), str(duplicates),
                     f"{calls:,}", str(repeated), _f(bound, 1)])
        targets.append(Target("Processors: one of 2 SIGKILLed, the other finishes within lease + one processor's time",
                              f"{_f(elapsed, 1)} s <= {_f(bound, 1)} s", elapsed <= bound))
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
               "lease expired (the unique index still keeps one result each)."],
        targets=targets,
    )


# --- 7. several LLM servers ------------------------------------------------------------------------


def _dead_url() -> str:
    """A loopback URL where nothing listens: a server that is down from the start."""
    return f"http://127.0.0.1:{free_port()}"


def section_servers(ctx: Context) -> SectionResult:
    preset = ctx.preset
    latency, parallel, per_server = preset.servers_latency, preset.servers_parallel, preset.servers_per_server
    rows: list[list[str]] = []
    chart: dict[str, Any] = {"labels": [], "measured": [], "ideal": []}
    throughput: dict[str, float] = {}

    def measure(key: str, label: str, fakes: list[Service], endpoint: str, live: float, n: int,
                during: Callable[[Path], None] | None = None) -> None:
        servers = len(endpoint.split(","))
        ctx.say(f"  {label}: {n} conversations ...")
        run = run_processor(ctx, what=label, fake=fakes[0], n=n, max_concurrent=parallel * servers,
                            latency=latency, endpoint=endpoint, during=during)
        ideal = live * parallel / latency
        throughput[key] = run.throughput
        rows.append([label, str(servers), f"{n:,}", str(parallel * servers), _f(run.elapsed_seconds, 2),
                     _f(run.throughput, 2), _f(ideal, 2), _f(run.throughput / ideal, 3)])
        chart["labels"].append(label)
        chart["measured"].append(run.throughput)
        chart["ideal"].append(ideal)

    with contextlib.ExitStack() as stack:
        fakes = [stack.enter_context(ctx.fake_ollama(latency, parallel)) for _ in range(4)]
        for count in (1, 2, 4):
            endpoint = ",".join(f.url for f in fakes[:count])
            measure(str(count), f"{count} server(s)", fakes, endpoint, count, per_server * count)
        endpoint = f"{fakes[0].url},{_dead_url()},{fakes[1].url}"
        measure("dead", "3 servers, 1 dead from the start", fakes, endpoint, 2, per_server * 2)

    with contextlib.ExitStack() as stack:
        fakes = [stack.enter_context(ctx.fake_ollama(latency, parallel)) for _ in range(3)]
        n = per_server * 3
        killer = _KillWhenProgressed(fakes[2].pid, n // 3)
        try:
            measure("killed", "3 servers, 1 SIGKILLed mid-run", fakes, ",".join(f.url for f in fakes), 2, n,
                    during=killer.start)
        finally:
            killer.stop()
        rows[-1][0] = f"3 servers, 1 SIGKILLed {killer.describe(n)}"
        killed = killer.killed_at is not None
        chart["labels"][-1] = "3 servers, 1 killed"

    one = throughput["1"]
    targets = [Target(f"Servers: {k} servers' throughput >= 0.9 of {k} x 1 server's",
                      _f(throughput[str(k)] / (k * one), 3), throughput[str(k)] >= 0.9 * k * one) for k in (2, 4)]
    two = throughput["2"]
    targets.append(Target("Servers: 3 with 1 dead from the start: throughput >= 0.9 of 2 servers'",
                          _f(throughput["dead"] / two, 3), throughput["dead"] >= 0.9 * two))
    targets.append(Target("Servers: 3 with 1 killed mid-run: throughput >= 0.9 of 2 servers'",
                          _f(throughput["killed"] / two, 3) if killed else "not killed mid-run",
                          killed and throughput["killed"] >= 0.9 * two))
    return SectionResult(
        "servers",
        f"`python batch_processor.py --max-concurrent N` with `OLLAMA_ENDPOINT` listing several fake Ollama "
        f"servers (`python -m tests.fake_ollama --parallel {parallel}`: each serves {parallel} chats at a time, "
        f"like `OLLAMA_NUM_PARALLEL={parallel}`, at {latency:g} s each; more wait in its queue). N = {parallel} "
        "per server listed, the same per-server concurrency in every run; conversations in proportion to the "
        "live servers. A fresh SecantusDB per run. Ideal = live servers x parallel / latency; throughput is "
        "the processor's own job clock, as in section 1. A dead server is a loopback port where nothing "
        "listens; a killed one gets SIGKILL while the job runs (its calls in flight are retried elsewhere).",
        [("servers", "left"), ("listed", "right"), ("conversations", "right"), ("--max-concurrent", "right"),
         ("job time (s)", "right"), ("throughput (conv/s)", "right"), ("ideal (conv/s)", "right"),
         ("efficiency", "right")],
        rows,
        notes=[("Scaling = throughput with k servers / (k x throughput with 1 server), measured in one run. "
                "With a server down, its share of the concurrency goes to the live ones (least in flight "
                "first; its circuit opens), which queue it: throughput is that of the live servers. The killed "
                "run's ideal counts 2 servers, though the third served the first part of the run.")],
        targets=targets,
        chart=chart,
    )


class _KillWhenProgressed:
    """Watches the processor's progress file; SIGKILLs one server (``pid``, a fake we started) once
    ``after`` conversations are classified. The file is rewritten about once a second."""

    def __init__(self, pid: int, after: int) -> None:
        self.pid = pid
        self.after = after
        self.killed_at: int | None = None  # conversations classified when the kill was sent
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, files_dir: Path) -> None:
        self._thread = threading.Thread(target=self._watch, args=(files_dir,), daemon=True)
        self._thread.start()

    def _watch(self, files_dir: Path) -> None:
        while not self._done.wait(0.05):
            for path in files_dir.glob("progress_*.json"):
                try:
                    progress = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                successful = int(progress.get("successful") or 0)
                if successful >= self.after and progress.get("status") != "completed":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self.killed_at = successful
                    return

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(10)

    def describe(self, n: int) -> str:
        if self.killed_at is None:
            return "(not killed: the job ended before its progress file said a third was done)"
        return f"after {self.killed_at} of {n}"


SECTION_RUNNERS: dict[str, Callable[[Context], SectionResult]] = {
    "concurrency": section_concurrency,
    "overhead": section_overhead,
    "memory": section_memory,
    "api": section_api,
    "prompt": section_prompt,
    "processors": section_processors,
    "servers": section_servers,
}


# --- machine ---------------------------------------------------------------------------------------


def git_commit(root: Path = ROOT) -> str:
    """The checked-out commit, read from .git without running git; 'unknown' when not a repository."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().strip().removeprefix("gitdir:").strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.removeprefix("ref:").strip()
        branch = ref.removeprefix("refs/heads/")
        for base in (git, common):
            if (base / ref).is_file():
                return f"{(base / ref).read_text().strip()[:12]} ({branch})"
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return f"{line.split()[0][:12]} ({branch})"
        return f"no commit yet ({branch})"
    except OSError:
        return "unknown"


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    os_name = platform.platform()
    try:
        release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        os_name = f"{release.get('PRETTY_NAME', '').strip(chr(34))} ({os_name})"
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for package in ("secantusdb", "pymongo", "fastapi", "uvicorn", "aiohttp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "RAM": ram,
        "OS": os_name,
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "git commit": git_commit() + " (uncommitted changes are not detected)",
    }


# --- output ----------------------------------------------------------------------------------------


def markdown_table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(name) for name, _ in columns) + " |",
             "|" + "|".join("---:" if align == "right" else "---" for _, align in columns) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(sections: list[SectionResult]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    rows = [[t.description, t.measured, "PASS" if t.passed else "MISS"] for s in sections for t in s.targets]
    return [("target", "left"), ("measured", "right"), ("result", "left")], rows


def render_run(label: str, date: str, command: str, preset: Preset, seconds: float, machine: dict[str, str],
               sections: list[SectionResult], chart_link: str | None) -> str:
    parts = [f"## Run: {label} ({date})", ""]
    line = f"Preset **{preset.name}**, {len(sections)} section(s), {seconds:.0f} s in all."
    if chart_link:
        line += f" Chart: [{Path(chart_link).name}]({chart_link}) (newest run)."
    parts += [line, ""]
    columns, rows = targets_table(sections)
    if rows:
        parts += ["**Targets**", "", markdown_table(columns, rows), ""]
    parts += ["**Machine and command**", "", "```"]
    parts += [f"{key + ':':<12} {value}" for key, value in machine.items()]
    parts += [f"{'date:':<12} {date}", f"{'command:':<12} {command}", "```", ""]
    for section in sections:
        parts += [f"### {section.title}", "", section.intro, "", markdown_table(section.columns, section.rows), ""]
        for note in section.notes:
            parts.append(f"- {note}")
        if section.notes:
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def previous_runs(path: Path) -> str:
    """The runs already in ``path`` (from the first '## Run:' heading on), or ''."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    match = RUN_HEADING.search(text)
    if match is None:
        if text.strip():
            raise UsageError(f"{path} exists but holds no benchmark run ('## Run:' heading); "
                             "choose another --output or remove it")
        return ""
    return text[match.start():].rstrip() + "\n"


def preamble(path: Path) -> str:
    """The text above the first run of ``path`` (editable notes kept from run to run), or FILE_HEADER."""
    if not path.exists():
        return FILE_HEADER
    text = path.read_text(encoding="utf-8")
    match = RUN_HEADING.search(text)
    kept = text[: match.start()].rstrip() if match else ""
    return (kept + "\n") if kept else FILE_HEADER


def write_markdown(path: Path, run_text: str) -> None:
    earlier = previous_runs(path)
    text = preamble(path) + "\n" + run_text + ("\n" + earlier if earlier else "")
    atomic_write_text(path, text)


def print_section(console: Any, section: SectionResult) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=section.title, box=box.SIMPLE_HEAD, title_justify="left")
    for name, align in section.columns:
        table.add_column(name, justify="right" if align == "right" else "left")
    for row in section.rows:
        table.add_row(*row)
    console.print(table)
    for note in section.notes:
        console.print(f"  - {note}", highlight=False)
    for target in section.targets:
        verdict = "[green]PASS[/]" if target.passed else "[red]MISS[/]"
        console.print(f"  {verdict} {target.description}: {target.measured}", highlight=False)


def write_chart(path: Path, sections: list[SectionResult], title: str) -> None:
    """One panel per section, drawn by the Agg renderer (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [s for s in sections if s.chart]
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(12, 4.2 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=12)
    for index, section in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        data = section.chart
        if section.key == "concurrency":
            x = list(range(len(data["levels"])))
            bars = axes.bar(x, data["measured"], width=0.6, color="#1f77b4", label="measured")
            axes.plot(x, data["ideal"], "o--", color="#d1453b", label="ideal (concurrency / latency)")
            ratios = [f"{m / i:.2f}" for m, i in zip(data["measured"], data["ideal"], strict=True)]
            axes.bar_label(bars, labels=ratios, fontsize=8, padding=2)
            axes.set_xticks(list(x), [str(level) for level in data["levels"]])
            axes.set_xlabel("--max-concurrent (bar label: efficiency)")
            axes.set_ylabel("conversations/s")
            axes.legend(fontsize=8, frameon=False)
        elif section.key == "overhead":
            bars = axes.bar(["batch processor", "PyMongo baseline"], [data["ours"], data["baseline"]],
                            color=["#1f77b4", "#9aa0a6"], width=0.5)
            axes.bar_label(bars, labels=[f"{data['ours']:.0f}", f"{data['baseline']:.0f}"], fontsize=8, padding=2)
            axes.set_ylabel("conversations/s")
            axes.set_xlabel(f"ratio {data['ratio']:.2f} (target >= 0.8)")
        elif section.key == "memory":
            labels = [f"{n:,} conversations" for n in data["sizes"]]
            bars = axes.bar(labels, data["peak_mib"], color="#2e9e57", width=0.5)
            axes.bar_label(bars, labels=[f"{v:.1f} MiB" for v in data["peak_mib"]], fontsize=8, padding=2)
            axes.set_ylabel("peak RSS (MiB)")
        elif section.key == "api":
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
        elif section.key == "prompt":
            y = list(range(len(data["names"])))
            axes.barh(y, data["prefix"], color="#9aa0a6", label="cached prefix")
            axes.barh(y, data["conversation"], left=data["prefix"], color="#1f77b4", label="conversation")
            axes.set_yticks(y, data["names"])
            axes.invert_yaxis()
            axes.set_xlabel("prompt characters per request")
            axes.legend(fontsize=8, frameon=False, loc="upper right")
        elif section.key == "servers":
            x = list(range(len(data["labels"])))
            bars = axes.bar(x, data["measured"], width=0.6, color="#1f77b4", label="measured")
            axes.plot(x, data["ideal"], "o--", color="#d1453b", label="ideal (live servers x parallel / latency)")
            ratios = [f"{m / i:.2f}" for m, i in zip(data["measured"], data["ideal"], strict=True)]
            axes.bar_label(bars, labels=ratios, fontsize=8, padding=2)
            axes.set_xticks(x, [label.replace(", ", "\n") for label in data["labels"]], fontsize=7)
            axes.set_xlabel("LLM servers (bar label: efficiency)")
            axes.set_ylabel("conversations/s")
            axes.legend(fontsize=8, frameon=False)
        axes.set_title(section.title, loc="left", fontsize=11)
        axes.grid(axis="x" if section.key == "prompt" else "y", alpha=0.3)
        axes.set_axisbelow(True)
        axes.spines[["top", "right"]].set_visible(False)
    figure.savefig(path, format="png", dpi=100)


# --- command line ----------------------------------------------------------------------------------


def _sections(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in names]


def _label(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m scripts.benchmark",
        "Benchmark the batch processor and the API (real subprocesses) against the fake Ollama "
        "and SecantusDB; write the tables to a markdown file and a PNG chart.",
        f"sections: {', '.join(SECTIONS)}\n\nexit codes:\n  {EXIT_OK} done (targets may be missed: see "
        f"the file)   {EXIT_FAILURE} a step failed (nothing written)\n  {EXIT_USAGE} bad command line or "
        f"unwritable output   {EXIT_INTERRUPTED} interrupted",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the issue's sizes (e.g. 20,000 conversations for memory)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the test suite's run)")
    parser.add_argument("--only", type=_sections, metavar="SECTION[,SECTION]",
                        help=f"run only these sections ({', '.join(SECTIONS)}) [default: all]")
    parser.add_argument("--label", type=_label, metavar="TEXT",
                        help="name of this run in the file, e.g. before / after [default: the preset's name]")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE.md",
                        help="markdown file; earlier runs in it are kept below this one [default: docs/benchmarks.md]")
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART, metavar="FILE.png",
                        help="PNG chart of this run, replaced [default: docs/benchmarks.png]")
    return parser


def _check_outputs(output: Path, chart: Path) -> None:
    for path in (output, chart):
        if not path.parent.is_dir():
            raise UsageError(f"folder {path.parent} does not exist (for {path})")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"{path} is not writable")
    if chart.suffix.lower() != ".png":
        raise UsageError(f"--chart must be a .png file name, got {chart}")
    previous_runs(output)  # refuses a file that is not ours before minutes of benchmarks


def run(args: argparse.Namespace, argv: list[str], console: Any) -> int:
    preset = PRESETS["full" if args.full else "smoke" if args.smoke else "fast"]
    selected = args.only or list(SECTIONS)
    label = args.label or preset.name
    command = "python -m scripts.benchmark" + (" " + shlex.join(argv) if argv else "")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.monotonic()
    console.print(f"[bold]Benchmark[/] preset {preset.name}, sections {', '.join(selected)}", highlight=False)

    processes = Processes()
    sections: list[SectionResult] = []
    current = "start-up"
    try:
        with tempfile.TemporaryDirectory(prefix="benchmark_") as workdir:
            ctx = Context(preset, processes, Path(workdir),
                          say=lambda text: console.print(text, style="dim", highlight=False))
            try:
                for name in selected:
                    current = SECTION_TITLES[name]
                    console.print(f"[bold]{current}[/]", highlight=False)
                    section = SECTION_RUNNERS[name](ctx)
                    sections.append(section)
                    print_section(console, section)
            finally:
                processes.stop_all()
    except BenchmarkError as e:
        print(f"error: {current}: {e}", file=sys.stderr, flush=True)
        print("no file written: the results of this run are incomplete", file=sys.stderr, flush=True)
        return EXIT_FAILURE

    seconds = time.monotonic() - started
    chart_link = os.path.relpath(args.chart.resolve(), args.output.resolve().parent)
    title = f"Benchmarks - run {label} ({date}), preset {preset.name}"
    try:
        write_chart(args.chart, sections, title)
    except OSError as e:
        raise UsageError(f"cannot write the chart {args.chart}: {e.strerror or e}") from e
    run_text = render_run(label, date, command, preset, seconds, machine_info(), sections, chart_link)
    write_markdown(args.output, run_text)
    columns, rows = targets_table(sections)
    console.print(f"\n[bold]Targets[/] ({seconds:.0f} s in all)", highlight=False)
    for description, measured, verdict in rows:
        colour = "green" if verdict == "PASS" else "red"
        console.print(f"  [{colour}]{verdict}[/] {description}: {measured}", highlight=False)
    console.print(f"written: {args.output} and {args.chart}", highlight=False)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the sections, write the files; returns an exit code."""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    STARTED_PROCESSES.clear()
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a file or a pipe: keep table rows on one line

    def body() -> int:
        _check_outputs(args.output, args.chart)
        return run(args, argv, console)

    return run_command(body, interrupted="interrupted: every subprocess was stopped, no file written")


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the finally blocks stop every subprocess


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    raise SystemExit(main())
