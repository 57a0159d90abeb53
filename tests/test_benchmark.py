"""scripts/benchmark.py in its smoke preset: tiny sizes, every section, real subprocesses.

Proves the harness still runs end to end (the real batch processor and API against the fake
Ollama and SecantusDB) and writes a complete report; the numbers themselves mean nothing at
these sizes, so no target is asserted here: the targets live in the benchmark's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import benchmark
from scripts.bench.harness import PRESETS, RUSAGE_LAUNCHER, STARTED_PROCESSES
from scripts.bench.processors import FAKETIME
from scripts.bench.render import render_run, write_markdown
from utils.child_process import accepts_connections

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"^[+-]?[\d,]+(\.\d+)?( %)?$")


def child_pids() -> set[int]:
    """Processes whose parent is this one (Linux /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (header excluded) of the first markdown table after ``heading``."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    assert len(rows) >= 3, f"no table under {heading!r}"
    return rows[2:]  # skip the header and the |---| line


# A hang guard, not a speed limit: seven sections of real subprocesses took over the suite's 180 s on
# a loaded 2-core machine (load average 7, 2026-12-02; section 6 alone took 75 s of it there).
@pytest.mark.timeout(480)
def test_smoke_run_writes_every_section_and_leaves_no_process(tmp_path):
    output, chart = tmp_path / "b.md", tmp_path / "b.png"
    before = child_pids()

    code = benchmark.main(["--smoke", "--output", str(output), "--chart", str(chart)])

    assert code == benchmark.EXIT_OK
    text = output.read_text(encoding="utf-8")
    assert text.count("## Run: smoke (") == 1
    assert "python -m scripts.benchmark --smoke" in text
    for key in ("CPU:", "cores:", "RAM:", "OS:", "Python:", "git commit:", "date:"):
        assert key in text

    # Every section's table, with numbers where numbers belong.
    concurrency = table_after(text, "### 1. Concurrency scaling")
    assert [row[0] for row in concurrency] == ["1", "5", "10", "20"]
    for row in concurrency:
        assert all(NUMBER.match(cell) for cell in row[1:6]), row
        assert float(row[3].replace(",", "")) > 0
    overhead = table_after(text, "### 2. Pipeline overhead")
    assert len(overhead) == 3
    for row in overhead:
        assert NUMBER.match(row[3]) and float(row[3].replace(",", "")) > 0, row
    memory = table_after(text, "### 3. Memory")
    assert [row[0] for row in memory[:2]] == ["10", "20"]
    for row in memory[:2]:
        assert all(NUMBER.match(cell) for cell in row[:4]), row
        assert float(row[1].replace(",", "")) > 10  # MiB: a Python process is never smaller
    assert NUMBER.match(memory[2][1])
    api = table_after(text, "### 4. API latency")
    assert [row[0] for row in api] == ["1", "1", "1", "1", "10", "10", "50", "50"]  # 1: API, fake, two floors
    for row in api:
        assert all(NUMBER.match(cell) for cell in row[2:8]), row
    assert all(NUMBER.match(row[8]) for row in api if "/classify" in row[1])
    assert "minimal FastAPI app: the floor" in api[2][1]  # the stack's own cost, beside the API's
    assert "aiohttp on the loop" in api[3][1]  # and without the design's synchronous client
    assert re.search(r"CPU per request at 1 client .*: the API \d+\.\d\d ms, the minimal app with requests "
                     r"\d+\.\d\d ms, with aiohttp \d+\.\d\d ms", text)
    assert re.search(r"The floor \(1 client\): .* It adds -?\d+\.\d\d ms to the fake's p50", text)
    prompt = table_after(text, "### 5. Prompt size")
    assert len(prompt) == 4
    for row in prompt:
        assert all(NUMBER.match(cell) for cell in row[1:8]), row
    assert prompt[-1][8].startswith("yes")  # the synthetic conversation is cut to the budget

    processors = table_after(text, "### 6. Several processors")
    skewed = ["2"] if FAKETIME else []  # one of two processors' clock ahead (libfaketime)
    assert [row[0].split(" ")[0] for row in processors] == ["1", "3", *skewed, "2,"]
    for row in processors:
        assert all(NUMBER.match(cell) for cell in row[1:6]), row
        assert row[3] == "0"  # duplicate results: never, whatever the timing

    servers = table_after(text, "### 7. Several LLM servers")
    assert [row[0] for row in servers][:4] == ["1 server(s)", "2 server(s)", "4 server(s)",
                                               "3 servers, 1 dead from the start"]
    assert servers[4][0].startswith("3 servers, 1 SIGKILLed")
    assert [row[1] for row in servers] == ["1", "2", "4", "3", "3", "1", "3"]  # the last two: issue 19's pair
    for row in servers:
        assert all(NUMBER.match(cell) for cell in row[1:8]), row
        assert float(row[5].replace(",", "")) > 0

    startup = table_after(text, "### 8. Fixed cost of a run")
    assert [row[0] for row in startup] == ["wall time, start to exit (s)", "CPU seconds of the process",
                                           "job clock (s)", "floor: `python -c pass`, wall time (s)",
                                           "floor: `python -c 'import asyncio, pydantic, pymongo'`, wall time (s)"]
    for row in startup:
        assert NUMBER.match(row[1]) and float(row[1]) > 0, row
    assert float(startup[4][1]) > float(startup[3][1])  # importing the three packages takes longer than nothing
    assert "load avg:" in text

    targets = table_after(text, "**Targets**")
    # (+1: /health at worst while large bodies wait for the API's one LLM slot; +1: the fixed cost)
    assert len(targets) == 5 + 3 + 2 * len(skewed) + 5 + 1 + 1 and all(row[2] in ("PASS", "MISS") for row in targets)
    assert re.search(r"Large bodies waiting: 2 POST /classify .* answers 2 x 200\. GET /health alone: p50 ", text)

    assert chart.read_bytes()[:8] == PNG_SIGNATURE

    # Every subprocess was stopped and reaped; every port it listened on is closed.
    started = STARTED_PROCESSES
    assert {name for name, _, _ in started} >= {"SecantusDB", "fake Ollama", "API", "batch processor",
                                                 "minimal FastAPI app"}
    assert child_pids() <= before
    for name, pid, port in started:
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) is still there"
        if port is not None:
            assert not accepts_connections(port), f"{name} still listens on {port}"


def test_a_second_run_is_written_above_the_first(tmp_path):
    output = tmp_path / "b.md"
    first = render_run("before", "2026-01-01 10:00 UTC", "python -m scripts.benchmark --label before",
                                 PRESETS["fast"], 1.0, {"CPU": "x"}, [], None)
    write_markdown(output, first)
    second = render_run("after", "2026-01-02 10:00 UTC", "python -m scripts.benchmark --label after",
                                  PRESETS["fast"], 1.0, {"CPU": "x"}, [], None)
    write_markdown(output, second)

    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks")
    assert text.count("# Benchmarks") == 1
    assert text.index("## Run: after (") < text.index("## Run: before (")


def test_notes_above_the_runs_are_kept_by_the_next_run(tmp_path):
    output = tmp_path / "b.md"
    run = render_run("before", "2026-01-01 10:00 UTC", "python -m scripts.benchmark --label before",
                               PRESETS["fast"], 1.0, {"CPU": "x"}, [], None)
    write_markdown(output, run)
    text = output.read_text(encoding="utf-8")
    notes = "## What the numbers say\n\nThe database is the bottleneck.\n\n"
    output.write_text(text.replace("## Run: before", notes + "## Run: before", 1), encoding="utf-8")

    write_markdown(output, run.replace("## Run: before", "## Run: after"))
    text = output.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks")
    assert text.count("The database is the bottleneck.") == 1
    bottleneck = text.index("The database is the bottleneck.")
    assert bottleneck < text.index("## Run: after (") < text.index("## Run: before (")


def test_a_file_that_is_not_a_benchmark_report_is_not_overwritten(tmp_path, capsys):
    output = tmp_path / "notes.md"
    output.write_text("# My notes\n", encoding="utf-8")
    code = benchmark.main(["--smoke", "--only", "prompt", "--output", str(output),
                           "--chart", str(tmp_path / "b.png")])
    assert code == benchmark.EXIT_USAGE
    assert output.read_text(encoding="utf-8") == "# My notes\n"
    assert "holds no benchmark run" in capsys.readouterr().err


def test_peak_rss_is_the_processes_own_not_the_benchmark_processes(tmp_path):
    """Linux carries a parent's high-water RSS into a child at exec: the launcher keeps it out."""
    ballast = bytearray(200 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # this process now peaked above 200 MiB
    del ballast
    report = tmp_path / "rusage.json"
    subprocess.run([sys.executable, "-c", RUSAGE_LAUNCHER, str(report), sys.executable, "-c", "pass"],
                   check=True, timeout=60)
    usage = json.loads(report.read_text())
    assert usage["exit_code"] == 0
    assert usage["maxrss_kb"] < 100 * 1024  # a bare Python: ~10 MiB, not this process's 200+
    assert 0 < usage["wall_seconds"] < 60  # the child's own start to exit


def test_code_runs_another_checkout_s_processor_and_is_named(tmp_path):
    other = tmp_path / "other_checkout"
    other.mkdir()
    (other / "main.py").symlink_to(ROOT / "main.py")
    # Its processor: this tree's, after leaving a mark that it was the one started.
    (other / "batch_processor.py").write_text(
        "import pathlib, runpy, sys\n"
        "pathlib.Path(__file__).with_name('started').touch()\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"runpy.run_path({str(ROOT / 'batch_processor.py')!r}, run_name='__main__')\n", encoding="utf-8")
    output = tmp_path / "b.md"
    code = benchmark.main(["--smoke", "--only", "startup", "--code", str(other), "--output", str(output),
                           "--chart", str(tmp_path / "b.png")])
    assert code == benchmark.EXIT_OK
    assert (other / "started").exists()
    text = output.read_text(encoding="utf-8")
    assert f"code run:    {other.resolve()} (unknown): its main.py and batch_processor.py (--code)" in text
    assert table_after(text, "### 8. Fixed cost of a run")


def test_code_must_be_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--smoke", "--only", "startup", "--code", str(tmp_path)])
    assert exit_info.value.code == benchmark.EXIT_USAGE
    assert "has no main.py or batch_processor.py" in capsys.readouterr().err


def test_the_real_model_benchmarks_client_runs_a_tree_against_a_server(tmp_path: Path) -> None:
    """scripts/benchmark_llm's client side (the part that runs inside the tree under test, before or after)
    against the fake OpenAI-compatible server: one line per conversation, with its labels and counts."""
    from fakes.openai import FakeOpenAI
    from scripts import benchmark_llm

    with FakeOpenAI(models=["smollm2-135m"]) as fake:
        job = {"endpoint": fake.base_url, "model": "smollm2-135m", "slots": 2, "settings": {"categorization": False},
               "conversations": str(benchmark_llm.SAMPLE), "limit": 3}
        wall, prefix_chars, answers = benchmark_llm.run_client(ROOT, job)
        requests = fake.chat_requests
    assert wall > 0 and prefix_chars > 1000
    assert [a["number"] for a in answers] == ["1001", "1002", "1003"] and len(requests) == 3
    for answer in answers:
        assert set(answer["labels"]) == {"intent", "topic", "sentiment"} and answer["categorization"] is None
        assert answer["completion"] > 0 and answer["expected"]
    # The job's settings reached the pipeline: no categorization in the schema sent.
    assert len(requests[0]["response_format"]["json_schema"]["schema"]["prefixItems"]) == 3
