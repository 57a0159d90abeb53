"""Section 8: the batch processor's fixed cost, a run on an empty collection from start to exit."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from scripts.bench.harness import Context, ProcessorRun, clean_env, run_processor
from scripts.bench.results import SectionResult, Target, fmt

#: The issue 19 target: a run that finds nothing to do starts and finishes within this (seconds).
FIXED_COST_TARGET_SECONDS = 0.5

#: The floor under the fixed cost: the interpreter alone, and the interpreter importing the three packages
#: the design's processor cannot start without (asyncio, pydantic for the settings, PyMongo).
FLOORS = (("python -c pass", "pass"),
          ("python -c 'import asyncio, pydantic, pymongo'", "import asyncio, pydantic, pymongo"))


def _wall_seconds(code: str) -> float:
    """Wall time of ``python -c code`` from start to exit, as the runs' launcher would see it."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=clean_env({}), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def section_startup(ctx: Context) -> SectionResult:
    """``python batch_processor.py --mode batch`` on an empty collection (a fresh SecantusDB per run),
    ``startup_repeats`` times: the wall time from the process's start to its exit (timed by the
    launcher that starts it: Python start-up, imports, the service checks, index creation, the job
    and the interpreter's exit), its CPU seconds, and the job clock (progress file). Target: median
    wall time <= 0.5 s.
    """
    repeats = ctx.preset.startup_repeats
    runs: list[ProcessorRun] = []
    floors: dict[str, list[float]] = {}
    with ctx.fake_ollama(0.0) as fake:
        for attempt in range(1, repeats + 1):
            ctx.say(f"  [{attempt}/{repeats}] batch processor on an empty collection ...")
            runs.append(run_processor(ctx, what="fixed cost (empty collection)", fake=fake, n=0,
                                      max_concurrent=ctx.preset.overhead_concurrency, latency=0.0))
            for label, code in FLOORS:  # interleaved with the runs: the same moments of a noisy machine
                floors.setdefault(label, []).append(_wall_seconds(code))
    wall = statistics.median(run.wall_seconds for run in runs)
    rows = [
        ["wall time, start to exit (s)", fmt(wall, 2), ", ".join(fmt(run.wall_seconds, 2) for run in runs)],
        ["CPU seconds of the process", fmt(statistics.median(run.cpu_processor for run in runs), 2),
         ", ".join(fmt(run.cpu_processor, 2) for run in runs)],
        ["job clock (s)", fmt(statistics.median(run.elapsed_seconds for run in runs), 2),
         ", ".join(fmt(run.elapsed_seconds, 2) for run in runs)],
    ] + [[f"floor: `{label}`, wall time (s)", fmt(statistics.median(times), 2), ", ".join(fmt(t, 2) for t in times)]
         for label, times in floors.items()]
    load = os.getloadavg()
    return SectionResult(
        "startup",
        f"`python batch_processor.py --mode batch --max-concurrent {ctx.preset.overhead_concurrency}` on an empty "
        f"collection, {repeats} runs, each on a fresh SecantusDB server, the fake Ollama at zero latency. Wall "
        "time from the start of the process to its exit as the launcher that starts it measures it (Python "
        "start-up, imports, the MongoDB and LLM checks, index creation, the job, the interpreter's exit); the "
        "job clock is the progress file's `elapsed_seconds`. The floor rows, timed the same way after each run: "
        "this interpreter doing nothing, and importing the three packages the design's processor cannot start "
        "without (asyncio; pydantic, for the settings; PyMongo): what any processor on this machine pays "
        "before its first line of work.",
        [("measure", "left"), ("median", "right"), ("each run", "right")],
        rows,
        notes=[f"The machine's load average at the end of the section: {load[0]:.1f} / {load[1]:.1f} / "
               f"{load[2]:.1f} (1 / 5 / 15 min) on {os.cpu_count()} core(s): under load the wall time is "
               "mostly waiting for a CPU; compare runs taken together."],
        targets=[Target(f"Fixed cost: a run on an empty collection within {FIXED_COST_TARGET_SECONDS:g} s "
                        "(median wall time)", f"{wall:.2f} s", wall <= FIXED_COST_TARGET_SECONDS)],
    )
