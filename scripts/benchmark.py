"""Benchmarks (GitHub issue #5): batch throughput, pipeline overhead, memory, API latency, prompt size.

    python -m scripts.benchmark [--full | --smoke] [--only SECTION[,SECTION]] [--label TEXT]
                                [--output FILE.md] [--chart FILE.png]

Runs the REAL batch processor (``python batch_processor.py``) and the REAL API (``python
main.py``) as subprocesses against the fake Ollama (``python -m fakes.ollama``, its own
subprocess, fixed latency) and SecantusDB (``python -m secantus``, its own subprocess, data in a
temporary folder), and writes ``docs/benchmarks.md`` (tables, targets with PASS/MISS,
the machine and the exact command) and a PNG chart (``docs/benchmarks.png``, matplotlib Agg).

Sections (``--only`` takes a comma-separated subset, ``--help`` lists them): the registry
``SECTIONS`` of scripts/bench/sections.py, in the order they run; what each measures and its
targets is the docstring of its ``section_*`` function (scripts/bench/, a module per area). A new
section is one entry in that registry (scripts/bench/sections.py says how); the harness, the
sections and the report are the package scripts/bench (its ``__init__`` lists the modules).

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
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from error_handler import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError, run_command
from scripts.bench.harness import (
    PRESETS,
    ROOT,
    STARTED_PROCESSES,
    BenchmarkError,
    Context,
    Processes,
)
from scripts.bench.render import (
    machine_info,
    previous_runs,
    print_section,
    render_run,
    targets_table,
    write_chart,
    write_markdown,
)
from scripts.bench.results import SectionResult
from scripts.bench.sections import SECTION_NAMES, SECTIONS, Section
from utils.command_line import command_parser

# Exit codes (error_handler): 0 every section ran, the file and the chart are written (targets may be
# missed); 1 a step failed (a server did not start, a run did not complete): nothing written; 2 bad
# command line, or the output files cannot be written; 130 interrupted.

DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_CHART = ROOT / "docs" / "benchmarks.png"


# --- command line ----------------------------------------------------------------------------------


def _sections(text: str) -> list[Section]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTION_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SECTION_NAMES)}")
    return [section for section in SECTIONS if section.key in names]


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
        f"sections: {', '.join(SECTION_NAMES)}\n\nexit codes:\n  {EXIT_OK} done (targets may be missed: see "
        f"the file)   {EXIT_FAILURE} a step failed (nothing written)\n  {EXIT_USAGE} bad command line or "
        f"unwritable output   {EXIT_INTERRUPTED} interrupted",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the issue's sizes (e.g. 20,000 conversations for memory)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the test suite's run)")
    parser.add_argument("--only", type=_sections, metavar="SECTION[,SECTION]",
                        help=f"run only these sections ({', '.join(SECTION_NAMES)}) [default: all]")
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
    selected: list[Section] = args.only or list(SECTIONS)
    label = args.label or preset.name
    command = "python -m scripts.benchmark" + (" " + shlex.join(argv) if argv else "")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.monotonic()
    names = ", ".join(section.key for section in selected)
    console.print(f"[bold]Benchmark[/] preset {preset.name}, sections {names}", highlight=False)

    processes = Processes()
    sections: list[SectionResult] = []
    current = "start-up"
    try:
        with tempfile.TemporaryDirectory(prefix="benchmark_") as workdir:
            ctx = Context(preset, processes, Path(workdir),
                          say=lambda text: console.print(text, style="dim", highlight=False))
            try:
                for entry in selected:
                    current = entry.title
                    console.print(f"[bold]{current}[/]", highlight=False)
                    section = entry.run(ctx)
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
