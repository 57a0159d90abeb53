"""The benchmark's harness: presets, subprocesses, a fresh SecantusDB per run, the fake Ollama and the API as
subprocesses, CPU time, the data, and one batch processor run measured end to end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import Settings, env_names
from scripts.bench.results import fmt
from scripts.tables import Column
from utils.child_process import accepts_connections
from utils.command_line import free_port

# The project (installed by `make install`) imports from anywhere; ROOT finds its data files.
ROOT = Path(__file__).resolve().parents[2]

SOURCE_COLLECTION = "conversation_set"
RESULTS_COLLECTION = "sentimental_analysis"
MODEL = "llama3"
SAMPLES_FILE = ROOT / "data" / "sample_conversations.json"

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0

#: Every subprocess of the last main() call: (name, pid, port or None). The smoke test checks them.
STARTED_PROCESSES: list[tuple[str, int, int | None]] = []


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
    # Issue 19's pair: 1 and 3 servers of 2 slots at 0.25 s, 120 conversations per server (its figure: 0.74 of linear).
    servers_issue_latency: float = 0.25
    servers_issue_per_server: int = 120
    # Large bodies waiting at once for the API's one LLM slot (issue 16: /health took 5.4 s behind 12).
    waiting_bodies: int = 12
    waiting_latency: float = 0.3
    startup_repeats: int = 5  # processor runs on an empty collection (the fixed cost; the median is kept)


PRESETS = {
    # ~45 s of concurrency runs; sizes are multiples of the concurrency (no half-empty last round).
    "fast": Preset("fast", 0.5, {1: 20, 5: 100, 10: 200, 20: 300}, 1000, (1000, 5000), 400, 20,
                   overhead_repeats=5),
    "full": Preset("full", 0.5, {1: 60, 5: 300, 10: 400, 20: 600}, 5000, (1000, 20000), 3000, 50,
                   overhead_repeats=5, servers_per_server=100),
    # Seconds, not minutes: proves the harness works end to end; the numbers mean nothing.
    "smoke": Preset("smoke", 0.05, {1: 10, 5: 10, 10: 10, 20: 10}, 10, (10, 20), 20, 2,
                    processors_size=60, processors_latency=0.05, processors_lease=1.5, servers_latency=0.05,
                    servers_per_server=6, servers_issue_latency=0.05, servers_issue_per_server=6,
                    waiting_bodies=2, waiting_latency=0.05, startup_repeats=1),
}



# --- subprocesses ---------------------------------------------------------------------------


def model_env(endpoint: str) -> dict[str, str]:
    """The model server's settings, also under their former names (OLLAMA_ENDPOINT, OLLAMA_MODEL): a
    checkout from before the rename (a60a31f) runs under ``--code`` too; this tree reads the new names
    first and stays quiet when both say the same."""
    return {"LLM_ENDPOINT": endpoint, "LLM_MODEL": MODEL, "OLLAMA_ENDPOINT": endpoint, "OLLAMA_MODEL": MODEL}


def clean_env(values: dict[str, str]) -> dict[str, str]:
    """The environment for a subprocess: none of the developer's settings, then ``values``."""
    settings_names = {variable for name in Settings.model_fields for variable in env_names(name)}
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
import json, os, signal, subprocess, sys, time
report, command = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
child = subprocess.Popen(command)
signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
signal.signal(signal.SIGINT, signal.SIG_IGN)
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - started
child.returncode = os.waitstatus_to_exitcode(status)
with open(report, "w") as out:
    json.dump({"pid": child.pid, "exit_code": child.returncode, "maxrss_kb": usage.ru_maxrss,
               "cpu_seconds": usage.ru_utime + usage.ru_stime, "wall_seconds": wall}, out)
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


def cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def cpu_text(value: float | None) -> str:
    return "n/a" if value is None else fmt(value, 2)


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
    #: Whose ``main.py`` and ``batch_processor.py`` run (``--code``: another checkout, e.g. the commit
    #: before a change); the harness, the fakes and the data are this tree's.
    code: Path = ROOT
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
            _wait_until(lambda: accepts_connections(port), process, "SecantusDB", log)
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
        command = [sys.executable, "-m", "fakes.ollama", "--host", "127.0.0.1", "--port", "0",
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
    def api(self, ollama_url: str, settings: dict[str, str] | None = None) -> Iterator[Service]:
        """``python main.py`` on a free loopback port (``settings``: more environment variables); yields it
        once /health and /ready answer 200."""
        directory = self.new_dir("api")
        log = directory / "api.log"
        port = free_port()
        env = clean_env({**model_env(ollama_url), "OLLAMA_TIMEOUT": "30",
                         "LOG_LEVEL": "INFO", **(settings or {})})
        command = [sys.executable, str(self.code / "main.py"), "--host", "127.0.0.1", "--port", str(port)]
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


    @contextmanager
    def floor_api(self, ollama_url: str, client: str = "requests") -> Iterator[Service]:
        """``python -m scripts.bench.floor_api --client CLIENT`` (this tree's: the least a FastAPI service
        calling the model with that client does per request) on a free loopback port, once /health answers."""
        directory = self.new_dir(f"floor_api_{client}")
        log = directory / "floor_api.log"
        port = free_port()
        command = [sys.executable, "-m", "scripts.bench.floor_api", "--port", str(port), "--llm", ollama_url,
                   "--client", client]
        process = self.processes.start("minimal FastAPI app", command, cwd=ROOT,
                                       env=clean_env({"PYTHONPATH": str(ROOT)}), log=log, port=port)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until(lambda: _http_ok(f"{url}/health"), process, "the minimal FastAPI app", log)
            yield Service(url, process.pid)
        finally:
            self.processes.stop(process)


# --- data -------------------------------------------------------------------------------------


def make_conversation(i: int) -> dict[str, Any]:
    """A source document in the conversation_set schema (tests/test_batch_processor.py builds its own from it)."""
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
    wall_seconds: float  # process start to exit, Python start-up included (timed by the launcher)
    peak_rss_kb: int
    cpu_processor: float  # user + system seconds of the processor process (wait4 in the launcher)
    cpu_database: float | None  # SecantusDB's CPU seconds while the processor ran
    cpu_fake: float | None  # the fake Ollama's CPU seconds while the processor ran

    @property
    def throughput(self) -> float:
        return self.successful / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def cpu_split(self) -> str:
        return f"{cpu_text(self.cpu_processor)} / {cpu_text(self.cpu_database)} / {cpu_text(self.cpu_fake)}"


CPU_SPLIT_COLUMN: Column = ("CPU s: processor / SecantusDB / fake", "right")
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
            **model_env(endpoint or fake.url),  # endpoint: several servers, comma-separated
            "OLLAMA_TIMEOUT": "60",
            "BATCH_PROCESSOR_MODE": "batch",
            "BATCH_MAX_CONCURRENT": str(max_concurrent),
            "BATCH_FILES_DIR": str(files_dir),
            "BATCH_MONITORING_MODE": "production",
            "LOG_LEVEL": "INFO",
        })
        report = directory / "rusage.json"
        command = [sys.executable, "-c", RUSAGE_LAUNCHER, str(report),
                   sys.executable, str(ctx.code / "batch_processor.py"), "--mode", "batch",
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
        database_cpu = cpu_delta(database_cpu, cpu_seconds(db.pid))
        fake_cpu = cpu_delta(fake_cpu, cpu_seconds(fake.pid))
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
    wall = float(usage.get("wall_seconds", wall))  # the launcher's start-up left out
    return ProcessorRun(n, int(progress["successful"]), elapsed, wall, int(usage["maxrss_kb"]),
                        float(usage["cpu_seconds"]), database_cpu, fake_cpu)
