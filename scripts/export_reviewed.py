"""Export the reviewed conversations as a labelled set in evaluate's input format.

    python -m scripts.export_reviewed --output reviewed.jsonl [--since YYYY-MM-DD]

One JSON line per conversation with a current review (docs/architecture.md#reviews): the
conversation as a ``/classify`` body (``conversation_number`` and ``messages`` or ``tweets``, as
stored in the source collection), ``expected`` = the labels the reviewer set (the fields they
reviewed; ``make evaluate`` scores those), plus ``labels`` (the effective labels of every field) and
``categorization`` (the model's), which make it a pool of few-shot examples, and ``note`` (the
reviewer's). ``--since``: reviewed on or after that UTC day. Then
``make evaluate LABELLED=reviewed.jsonl`` measures any model on the team's own conversations, and
``python -m scripts.evaluate held_out.jsonl --examples reviewed.jsonl`` measures retrieved examples.

Stale reviews (the conversation was classified again after its text changed), reviews whose
source conversation is gone or no longer valid are left out and counted on stderr. The file is
written atomically. Exit codes: 0 written; 2 bad command line or output folder; 3 invalid
settings; 4 MongoDB unreachable; 5 written, but some reviews were left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from aggregator import Message, Tweet, validate_conversation
from config import Settings, load_settings
from error_handler import (
    EXIT_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    InputError,
    UsageError,
    run_command,
)
from logger import configure_logging
from mongo_client import storage_error, sync_database
from prompt_builder import load_taxonomy
from reviews import effective_labels, review_is_current, reviewed_labels
from utils.atomic_files import atomic_write_text
from utils.command_line import command_parser

logger = logging.getLogger("export_reviewed")
APP_NAME = "support-classifier-export"

EPILOG = f"""\
exit codes:
  {EXIT_OK} written, every current review exported
  {EXIT_USAGE} bad command line, or the output folder does not exist
  {EXIT_CONFIG} invalid settings or taxonomy
  {EXIT_UNAVAILABLE} MongoDB unreachable
  {EXIT_INCOMPLETE} written, but some reviews were left out (stale, or their conversation is gone)
"""


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day written YYYY-MM-DD") from None


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m scripts.export_reviewed",
                            "Write the reviewed conversations as JSON Lines in evaluate's input format.", EPILOG)
    parser.add_argument("--output", type=Path, required=True, metavar="reviewed.jsonl", help="the file to write")
    parser.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="only reviews made on or after this UTC day")
    return parser


def body_of(source: dict[str, Any]) -> dict[str, Any] | None:
    """The source conversation as a ``/classify`` body (only the fields the API reads; dates as ISO
    strings), or None when it is no longer a valid conversation."""
    number = str(source.get("conversation_number") or source.get("_id"))
    try:
        conversation = validate_conversation({**source, "conversation_number": number})
    except InputError:
        return None
    if conversation.messages is not None:
        return {"conversation_number": number, "messages": [
            {key: value for key, value in m.items() if key in Message.__annotations__ and value is not None}
            for m in conversation.messages]}
    tweets = conversation.tweets or []
    return {"conversation_number": number, "tweets": [
        t.model_dump(mode="json", include=set(Tweet.model_fields), exclude_none=True) for t in tweets]}


def export(database: Any, settings: Settings, fields: list[str], since: date | None) -> tuple[list[str], int]:
    """The lines to write and how many reviews were left out."""
    query: dict[str, Any] = {"review": {"$exists": True}}
    if since is not None:
        query["review.at"] = {"$gte": datetime.combine(since, time.min, tzinfo=UTC)}
    results = database[settings.mongodb_results_collection]
    source = database[settings.mongodb_source_collection]
    lines: list[str] = []
    left_out = 0
    try:
        for result in results.find(query).sort([("review.at", 1), ("_id", 1)]):
            expected = reviewed_labels(result, fields)
            raw = source.find_one({"_id": result["source_conversation_id"]}) if expected else None
            body = body_of(raw) if raw is not None else None
            if not review_is_current(result) or not expected or body is None:
                left_out += 1
                logger.warning("conversation %s left out: %s", result.get("conversation_number"),
                               "its review is stale" if not review_is_current(result) else
                               "its review names no label" if not expected else "its source conversation is gone "
                               "or invalid")
                continue
            item = {**body, "expected": expected, "labels": effective_labels(result, fields),
                    "categorization": (result.get("classification") or {}).get("categorization")}
            if result["review"].get("note"):
                item["note"] = result["review"]["note"]
            lines.append(json.dumps(item, ensure_ascii=False))
    except PyMongoError as e:
        raise storage_error(e, "read of reviewed conversations") from e
    return lines, left_out


def run(args: argparse.Namespace, settings: Settings) -> int:
    output: Path = args.output
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist")
    fields = load_taxonomy(settings.taxonomy_file).field_names
    with sync_database(settings, appname=APP_NAME) as database:
        lines, left_out = export(database, settings, fields, args.since)
    try:
        atomic_write_text(output, "".join(f"{line}\n" for line in lines))
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from e
    print(f"written: {output} ({len(lines)} reviewed conversation(s)"
          + (f"; {left_out} left out, see the warnings above" if left_out else "") + ")", file=sys.stderr)
    return EXIT_INCOMPLETE if left_out else EXIT_OK


def _run_from_args(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    return run(args, settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
