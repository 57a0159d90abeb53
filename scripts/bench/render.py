"""The benchmark's report: the Markdown file (runs kept, newest first), the console tables, the chart, the
machine description."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from error_handler import UsageError
from scripts.bench.harness import (
    ROOT,
    Preset,
)
from scripts.bench.results import SectionResult
from scripts.tables import Column, console_table, markdown_table
from utils.batch_file_manager import atomic_write_text

RUN_HEADING = re.compile(r"^## Run: ", re.MULTILINE)

FILE_HEADER = """\
# Benchmarks

Measured by [`scripts/benchmark.py`](../scripts/benchmark.py) (issue #5): the real batch processor
(`python batch_processor.py`) and the real API (`python main.py`) run as subprocesses against
the fake Ollama (`fakes/ollama.py`, its own process, fixed latency) and SecantusDB
(a MongoDB-wire-compatible server, its own process). Nothing here is estimated: every number
comes from the run it is listed under, on the machine described there.

Reproduce, from the project root with `.venv` activated (`source .venv/bin/activate`, see the README):
`python -m scripts.benchmark` (fast preset, a few minutes; `make bench`), `python -m scripts.benchmark
--full` (the issue's sizes), `--only api,prompt` for a subset, `--label after` to name a run. Runs are
kept, newest first; the chart shows the newest run.
"""


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


def targets_table(sections: list[SectionResult]) -> tuple[list[Column], list[list[str]]]:
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
    table = console_table(section.title, section.columns)
    for row in section.rows:
        table.add_row(*row)
    console.print(table)
    for note in section.notes:
        console.print(f"  - {note}", highlight=False)
    for target in section.targets:
        verdict = "[green]PASS[/]" if target.passed else "[red]MISS[/]"
        console.print(f"  {verdict} {target.description}: {target.measured}", highlight=False)


def bars_against_ideal(axes: Any, ticks: list[str], measured: list[float], ideal: list[float], *, ideal_label: str,
                       xlabel: str, tick_fontsize: float | str = "medium") -> None:
    """A chart panel of throughput: measured as bars, the ideal as a dashed line, each bar labelled with
    its efficiency (measured / ideal)."""
    x = list(range(len(ticks)))
    bars = axes.bar(x, measured, width=0.6, color="#1f77b4", label="measured")
    axes.plot(x, ideal, "o--", color="#d1453b", label=ideal_label)
    ratios = [f"{m / i:.2f}" for m, i in zip(measured, ideal, strict=True)]
    axes.bar_label(bars, labels=ratios, fontsize=8, padding=2)
    axes.set_xticks(x, ticks, fontsize=tick_fontsize)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("conversations/s")
    axes.legend(fontsize=8, frameon=False)
    axes.grid(axis="y", alpha=0.3)


def write_chart(path: Path, sections: list[SectionResult], title: str) -> None:
    """One panel per section that has chart data, drawn by its own ``draw`` (sections.py) on the Agg
    renderer (no display, no pyplot state); the title, frame and layout are the same for every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [s for s in sections if s.chart and s.draw is not None]
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(12, 4.2 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=12)
    for index, section in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        assert section.draw is not None  # panels have one
        section.draw(axes, section.chart)
        axes.set_title(section.title, loc="left", fontsize=11)
        axes.set_axisbelow(True)
        axes.spines[["top", "right"]].set_visible(False)
    figure.savefig(path, format="png", dpi=100)
