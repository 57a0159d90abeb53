"""Measure retrieved few-shot examples on the real small model: static vs reviewed examples.

    python -m scripts.measure_retrieval [--k 3] [--limit N] [--write]

The labelled set (data/labelled_conversations.json) is split in two by position: the even items
play the team's reviewed conversations (the pool of examples), the odd ones are scored. Each
configuration classifies the scored half through the real pipeline (``scripts.evaluate``'s direct
run: ``ConversationClassifier.classify_async`` on llama.cpp's llama-server with SmolLM2-135M,
OpenAI-compatible provider, one request at a time):

* ``static``: the examples of config/few_shots.json (FEW_SHOT_SOURCE=static, the default);
* ``reviewed-bm25``: only the k most similar pool items, by words;
* ``both-bm25``: the static examples, then the k most similar pool items;
* ``reviewed-embeddings``: the k most similar by the server's own ``/v1/embeddings`` (llama-server
  started with ``--embeddings --pooling mean``; SmolLM2 is a chat model, so these are weak embeddings).

Reported per configuration: accuracy and macro-F1 per field, prompt tokens and seconds per item.
All configurations run in one invocation against one server, so their figures compare with each
other (the machine is shared: compare within a run, not across runs). ``--write`` puts the table
into docs/quality.md between markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from classifier import ConversationClassifier
from config import load_settings
from error_handler import UsageError, run_command
from prompt_builder import load_taxonomy
from scripts.evaluate import build_report, load_labelled, run_direct
from scripts.llama_server import LlamaServer
from scripts.tables import Column, markdown_table
from utils.batch_file_manager import atomic_write_text
from utils.command_line import command_parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "data" / "labelled_conversations.json"
DOC = ROOT / "docs" / "quality.md"
START, END = "<!-- retrieval:start -->", "<!-- retrieval:end -->"
#: name -> (FEW_SHOT_SOURCE, embeddings?)
CONFIGURATIONS = {"static": ("static", False), "reviewed-bm25": ("reviewed", False), "both-bm25": ("both", False),
                  "reviewed-embeddings": ("reviewed", True)}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m scripts.measure_retrieval",
                            "Accuracy, macro-F1, prompt tokens and seconds per item with static and retrieved "
                            "few-shot examples, on llama-server with SmolLM2-135M.", "")
    parser.add_argument("--k", type=positive_int, default=3, help="FEW_SHOT_K [default: 3]")
    parser.add_argument("--limit", type=positive_int, help="only the first N scored items")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS), metavar="A,B",
                        help=f"which to run, in this order [default: {','.join(CONFIGURATIONS)}]")
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.relative_to(ROOT)}")
    return parser


def split(path: Path, folder: Path) -> tuple[Path, Path]:
    """The pool (even positions) and the scored half (odd positions) as two JSON files."""
    items = json.loads(path.read_text(encoding="utf-8"))
    pool, scored = folder / "pool.json", folder / "scored.json"
    pool.write_text(json.dumps(items[0::2]), encoding="utf-8")
    scored.write_text(json.dumps(items[1::2]), encoding="utf-8")
    return pool, scored


def measure(args: argparse.Namespace) -> dict[str, Any]:
    taxonomy = load_taxonomy(load_settings(environ={}, env_file=None).taxonomy_file)
    rows: list[dict[str, Any]] = []
    # One server for every configuration (chat and embeddings): their figures compare with each other.
    with tempfile.TemporaryDirectory() as folder, LlamaServer(
            parallel=1, extra_args=["--embeddings", "--pooling", "mean", "--ubatch-size", "2048"]) as server:
        pool, scored = split(LABELLED, Path(folder))
        items = load_labelled(scored, taxonomy, args.limit).items
        pool_size = len(load_labelled(pool, taxonomy).items)
        for name in args.configurations.split(","):
            if name not in CONFIGURATIONS:
                raise UsageError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGURATIONS)}")
            source, embeddings = CONFIGURATIONS[name]
            settings = load_settings({
                "llm_provider": "openai", "llm_endpoint": server.base_url, "llm_model": server.alias,
                "ollama_timeout": 300, "few_shot_source": source, "few_shot_k": args.k,
                "embedding_model": server.alias if embeddings else "", "batch_max_concurrent": 1,
            }, environ={}, env_file=None)
            pipeline = ConversationClassifier.from_settings(settings)
            started = time.perf_counter()
            model, predictions = asyncio.run(run_direct(items, settings, pipeline, 1,
                                                        pool if source != "static" else None))
            report = build_report(predictions, model, time.perf_counter() - started, taxonomy)
            rows.append({"name": name, **report})
            print(f"{name}: " + ", ".join(f"{f} {m['accuracy']:.3f}/{m['macro_f1']:.3f}"
                                          for f, m in report["fields"].items())
                  + f", {report['prompt_tokens_per_item']} prompt tokens, {report['seconds_per_item']} s/item",
                  flush=True)
    flags = [f"--k {args.k}", f"--configurations {args.configurations}"] + ([f"--limit {args.limit}"] if args.limit
                                                                            else [])
    command = "python -m scripts.measure_retrieval " + " ".join(flags)
    return {"rows": rows, "scored": len(items), "pool": pool_size, "k": args.k, "command": command,
            "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {platform.python_version()}"}


def markdown(result: dict[str, Any]) -> str:
    fields = list(result["rows"][0]["fields"])
    columns: list[Column] = [("configuration", "left"), *((f"{f} acc / macro-F1", "left") for f in fields),
                             ("prompt tokens / item", "right"), ("s / item", "right"), ("errors", "right")]
    rows = []
    for row in result["rows"]:
        cells = [row["name"]]
        for f in fields:
            m = row["fields"].get(f)
            cells.append(f"{m['accuracy'] * 100:.1f}% / {m['macro_f1']:.3f}" if m else "-")
        rows.append([*cells, row["prompt_tokens_per_item"], f"{row['seconds_per_item']:.2f}", row["errors"]])
    return "\n".join([
        START, "",
        f"Measured {result['when']} on this machine ({result['machine']}), llama-server with SmolLM2-135M, "
        f"one request at a time: {result['scored']} scored conversations (the first odd positions of "
        f"data/labelled_conversations.json), a pool of {result['pool']} \"reviewed\" ones (even positions), "
        f"FEW_SHOT_K={result['k']}. Command: `{result['command']}`.", "",
        markdown_table(columns, rows), "", END,
    ])


def write_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else f"# Quality\n\n{START}\n{END}\n"
    if START not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    atomic_write_text(DOC, before + section + after)


def _run(args: argparse.Namespace) -> int:
    result = measure(args)
    section = markdown(result)
    print(section)
    if args.write:
        write_doc(section)
        print(f"written: {DOC}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
