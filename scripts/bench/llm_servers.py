"""Section 7: several LLM servers behind one processor."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.bench.harness import (
    Context,
    Service,
    run_processor,
)
from scripts.bench.render import bars_against_ideal
from scripts.bench.results import SectionResult, Target, fmt
from utils.command_line import free_port

# --- 7. several LLM servers ------------------------------------------------------------------------


def _dead_url() -> str:
    """A loopback URL where nothing listens: a server that is down from the start."""
    return f"http://127.0.0.1:{free_port()}"


def section_servers(ctx: Context) -> SectionResult:
    """Several LLM servers (``LLM_ENDPOINT`` a comma-separated list): fake Ollama subprocesses
    that each serve ``--parallel`` chats at a time at a fixed latency (like ``OLLAMA_NUM_PARALLEL``).
    The processor at the same per-server concurrency with 1, 2 and 4 servers (target: >= 0.9 of
    linear), 3 servers of which one is dead from the start, and 3 of which one is SIGKILLed
    mid-run (target: both complete with >= 0.9 of the 2-server throughput).
    """
    preset = ctx.preset
    latency, parallel, per_server = preset.servers_latency, preset.servers_parallel, preset.servers_per_server
    rows: list[list[str]] = []
    chart: dict[str, Any] = {"labels": [], "measured": [], "ideal": []}
    throughput: dict[str, float] = {}

    def measure(key: str, label: str, fakes: list[Service], endpoint: str, live: float, n: int,
                during: Callable[[Path], None] | None = None, latency: float = latency) -> None:
        servers = len(endpoint.split(","))
        ctx.say(f"  {label}: {n} conversations ...")
        run = run_processor(ctx, what=label, fake=fakes[0], n=n, max_concurrent=parallel * servers,
                            latency=latency, endpoint=endpoint, during=during)
        ideal = live * parallel / latency
        throughput[key] = run.throughput
        rows.append([label, str(servers), f"{n:,}", str(parallel * servers), fmt(run.elapsed_seconds, 2),
                     fmt(run.throughput, 2), fmt(ideal, 2), fmt(run.throughput / ideal, 3)])
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

    # Issue 19's pair: its sizes and latency (0.25 s: shorter calls, so the processor's own work per
    # conversation weighs more than at the preset's latency above).
    issue_latency, issue_n = preset.servers_issue_latency, preset.servers_issue_per_server
    with contextlib.ExitStack() as stack:
        fakes = [stack.enter_context(ctx.fake_ollama(issue_latency, parallel)) for _ in range(3)]
        measure("issue 1", f"1 server, {issue_latency:g} s", fakes, fakes[0].url, 1, issue_n, latency=issue_latency)
        measure("issue 3", f"3 servers, {issue_latency:g} s", fakes, ",".join(f.url for f in fakes), 3, 3 * issue_n,
                latency=issue_latency)

    one = throughput["1"]
    targets = [Target(f"Servers: {k} servers' throughput >= 0.9 of {k} x 1 server's",
                      fmt(throughput[str(k)] / (k * one), 3), throughput[str(k)] >= 0.9 * k * one) for k in (2, 4)]
    issue_linear = throughput["issue 3"] / (3 * throughput["issue 1"])
    targets.append(Target(f"Servers: 3 servers' throughput >= 0.9 of 3 x 1 server's at {issue_latency:g} s, "
                          f"{3 * issue_n} conversations, --max-concurrent {3 * parallel} (issue 19)",
                          fmt(issue_linear, 3), issue_linear >= 0.9))
    two = throughput["2"]
    targets.append(Target("Servers: 3 with 1 dead from the start: throughput >= 0.9 of 2 servers'",
                          fmt(throughput["dead"] / two, 3), throughput["dead"] >= 0.9 * two))
    targets.append(Target("Servers: 3 with 1 killed mid-run: throughput >= 0.9 of 2 servers'",
                          fmt(throughput["killed"] / two, 3) if killed else "not killed mid-run",
                          killed and throughput["killed"] >= 0.9 * two))
    return SectionResult(
        "servers",
        f"`python batch_processor.py --max-concurrent N` with `LLM_ENDPOINT` listing several fake Ollama "
        f"servers (`python -m fakes.ollama --parallel {parallel}`: each serves {parallel} chats at a time, "
        f"like `OLLAMA_NUM_PARALLEL={parallel}`, at {latency:g} s each; more wait in its queue). N = {parallel} "
        "per server listed, the same per-server concurrency in every run; conversations in proportion to the "
        "live servers. A fresh SecantusDB per run. Ideal = live servers x parallel / latency; throughput is "
        "the processor's own job clock, as in section 1. A dead server is a loopback port where nothing "
        "listens; a killed one gets SIGKILL while the job runs (its calls in flight are retried elsewhere). "
        f"The last two rows are issue 19's pair: 1 and 3 servers at {preset.servers_issue_latency:g} s, "
        f"{preset.servers_issue_per_server} conversations per server.",
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


def draw_servers(axes: Any, data: dict[str, Any]) -> None:
    """Throughput per server set (bars) against the ideal (line); bar labels: efficiency."""
    bars_against_ideal(axes, [label.replace(", ", "\n") for label in data["labels"]], data["measured"], data["ideal"],
                       ideal_label="ideal (live servers x parallel / latency)",
                       xlabel="LLM servers (bar label: efficiency)", tick_fontsize=7)


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
