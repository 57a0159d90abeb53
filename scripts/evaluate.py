"""Measure classification quality on a labelled set: accuracy, macro-F1, per-label scores, confusions.

    python -m scripts.evaluate LABELLED_FILE [--url URL] [--model MODEL] [--taxonomy FILE]
        [--max-concurrent N] [--limit N] [--output report.json] [--markdown report.md]
        [--chart confusion.png] [--verbose]

Input
-----
* JSON (a list) or JSON Lines (one item a line; ``.jsonl``/``.ndjson``, or any file that does not
  start with ``[``): each item a ``/classify`` body (``messages`` or ``tweets``) plus
  ``"expected": {"intent": ..., "topic": ..., "sentiment": ...}`` (any subset of the label fields of
  the taxonomy: every field present is scored) and an optional ``note``. Without a
  ``conversation_number`` the item's position is used.
* CSV (``.csv``) with a header: ``conversation`` (one turn per line, ``Customer:`` / ``Agent:``
  prefixes; a line without a prefix continues the turn above), one column per label field of the
  taxonomy (``intent``, ``topic``, ``sentiment`` by default; empty cells: not scored) and
  optionally ``conversation_number``.

An item that cannot be read (not an object, no ``expected``, an invalid conversation, nested too
deeply for the JSON decoder) is named by
its place (``item 3`` of a JSON list, ``line 7`` of JSON Lines, ``row 4`` of a CSV) and skipped.
An expected label outside the taxonomy is reported and counted apart: that field of that item is
not scored (its other fields are), because no prediction could ever match it.

Classification
--------------
The same pipeline as the API: directly (``ConversationClassifier`` and the LLM client the settings
name: ``LLM_ENDPOINT``, ``LLM_MODEL``, ...) or, with ``--url``, by ``POST /classify`` to a
running API. ``--max-concurrent`` defaults to 1 because a server that batches parallel requests
(llama.cpp, vLLM) does not give repeatable answers at temperature 0; raise it for speed.

Output
------
A table on the console; ``--output`` writes the report as JSON::

    {"n": int, "model": str, "errors": int, "seconds_per_item": float,
     "fields": {FIELD: {"n": int, "accuracy": float, "macro_f1": float,
                "per_label": {label: {"precision", "recall", "f1", "support"}},
                "confusion": {"labels": [...], "matrix": [[...]]}}}}

``n`` counts the items sent for classification, ``errors`` those whose classification failed
(an unexpected exception too: ``unexpected_error``, logged with its traceback; the report goes on);
a field's ``n`` counts the items scored on it (classified, with an expected label in the taxonomy),
and a field nobody labelled is left out. Confusion rows are the expected labels, columns the
predicted ones, both in ``labels`` order (the taxonomy's, for the labels present in the expected or
predicted values); ``macro_f1`` averages over those same labels. When the model's answers carry
confidences, each field also gets ``"calibration": [{"range": [lo, hi], "n", "accuracy",
"mean_confidence"}]`` (buckets with items only). ``seconds_per_item`` is wall time over ``n``.
``--markdown`` writes the same as Markdown tables, ``--chart`` a PNG with one confusion matrix per
field. Output folders are checked before the first classification.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from aggregator import ConversationIn, validate_conversation
from async_llm_wrapper import create_async_llm_client
from classifier import ConversationClassifier
from config import Settings, load_settings
from error_handler import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ClassifierError,
    InputError,
    UsageError,
    run_command,
)
from llm_pool import AsyncLLMPool
from logger import configure_logging
from mongo_client import MongoStore
from prompt_builder import Taxonomy, load_taxonomy
from retrieval import AsyncEmbed, ExampleIndex, Reviewed, build_index, mongo_source
from scripts.tables import Column, console_table, markdown_table
from utils.command_line import command_parser, positive_int
from utils.json_items import UnreadableItem, json_list_items, json_value

logger = logging.getLogger("evaluate")
ROOT = Path(__file__).resolve().parents[1]

NOT_IN_BODY = ("expected", "note")  # keys of a labelled item that are not part of the /classify body
NOT_LABELS = ("categorization", "confidence", "needs_review")  # keys of a classification that are not label fields
PROMPT_TOKENS = "_prompt_tokens"  # a direct run's prompt size, carried beside the classification
MISSING_LABEL = "(missing)"  # a prediction without the field (an API of --url with another taxonomy)
# EXIT_INCOMPLETE (5): the report is written, but some items were skipped or could not be classified
CALIBRATION_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
API_TIMEOUT_SECONDS = 300.0  # above the API's default OLLAMA_TIMEOUT (120 s): its own 504 arrives first
_TURN_PREFIX = re.compile(r"^\s*(customer|agent)\s*:\s?(.*)$", re.IGNORECASE)

EPILOG = f"""\
exit codes:
  {EXIT_OK} report written, every item classified
  {EXIT_FAILURE} the run broke off
  {EXIT_USAGE} bad command line, unreadable labelled file, no usable item, or an output folder missing
  {EXIT_CONFIG} invalid settings, taxonomy or few-shot file
  {EXIT_UNAVAILABLE} the LLM server (or the API of --url) is unreachable or lacks the model
  {EXIT_INCOMPLETE} report written, but some items were skipped (malformed) or failed to classify
"""


class APIUnavailableError(ClassifierError):
    """The API given with --url does not answer, or is not ready."""

    code = "api_unavailable"
    exit_code = EXIT_UNAVAILABLE


class APIAnswerError(ClassifierError):
    """The API of --url answered one conversation with an error; ``code`` is the API's error type."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- command line ------------------------------------------------------------------------------


def _suffixed(suffix: str) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        if not text.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"{text!r} must end with {suffix}")
        return Path(text)

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m scripts.evaluate",
        "Classify a labelled set of conversations and measure accuracy, macro-F1, "
        "per-label precision/recall/F1 and the confusion matrices.",
        EPILOG,
    )
    parser.add_argument("labelled_file", type=Path, metavar="LABELLED_FILE",
                        help="JSON list, JSON Lines or CSV of conversations with expected labels")
    parser.add_argument("--url", help="classify through a running API (e.g. http://localhost:8000) "
                        "instead of calling the LLM server directly [default: direct]")
    parser.add_argument("--model", help="model to evaluate, overrides LLM_MODEL (direct runs only)")
    parser.add_argument("--taxonomy", type=Path, metavar="FILE",
                        help="taxonomy file, overrides TAXONOMY_FILE [default: the setting]")
    parser.add_argument("--max-concurrent", type=positive_int, default=1, metavar="N",
                        help="conversations classified at once [default: 1, repeatable answers]")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N usable items")
    parser.add_argument("--few-shot-source", choices=("static", "reviewed", "both"),
                        help="overrides FEW_SHOT_SOURCE (direct runs only) [default: the setting]")
    parser.add_argument("--examples", type=Path, metavar="REVIEWED_FILE",
                        help="the reviewed examples to retrieve from: a labelled file (export_reviewed's output) "
                        "instead of MongoDB's reviewed conversations [default: MongoDB]")
    parser.add_argument("--output", type=_suffixed(".json"), metavar="report.json",
                        help="write the report as JSON")
    parser.add_argument("--markdown", type=_suffixed(".md"), metavar="report.md",
                        help="write the report as Markdown")
    parser.add_argument("--chart", type=_suffixed(".png"), metavar="confusion.png",
                        help="write one confusion matrix per field as a PNG")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at LOG_LEVEL (default: errors only)")
    return parser


# --- reading the labelled file -----------------------------------------------------------------


@dataclass
class LabelledItem:
    where: str  # "item 3", "line 7", "row 4": how the file's author finds it
    body: dict[str, Any]  # the /classify body
    conversation: ConversationIn
    expected: dict[str, str]  # in-taxonomy labels only, in the taxonomy's spelling


@dataclass
class OffTaxonomy:
    where: str
    field: str
    label: str


@dataclass
class LabelledSet:
    items: list[LabelledItem] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "line 7: why", each skipped
    off_taxonomy: list[OffTaxonomy] = field(default_factory=list)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"labelled file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a labelled file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the labelled file {path}: {e}") from e


def read_raw_items(path: Path, fields: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The file's items as (place, value), and the places that are not even JSON (JSON Lines);
    ``fields`` are the taxonomy's label fields (a CSV file's label columns)."""
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        return _csv_items(text, path, fields), []
    stripped = text.lstrip()
    if not stripped:
        raise UsageError(f"the labelled file {path} is empty")
    if stripped.startswith("[") and path.suffix.lower() not in (".jsonl", ".ndjson"):
        try:
            data = json_list_items(text)  # an item nested too deeply is that item's problem
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON: {e}",
                             hint="Give a JSON list of items, JSON Lines, or a CSV file.") from e
        return [(f"item {i}", _readable(value)) for i, value in enumerate(data, 1)], []
    items: list[tuple[str, Any]] = []
    broken: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"line {number}", _readable(json_value(line))))
        except ValueError as e:
            broken.append(f"line {number}: not a JSON value ({e})")
    return items, broken


def _readable(value: Any) -> Any:
    """An item as read_item takes it: one the decoder could not hold becomes the ValueError saying why."""
    return ValueError(value.reason) if isinstance(value, UnreadableItem) else value


def parse_turns(conversation: str) -> list[dict[str, str]]:
    """``Customer: ...`` / ``Agent: ...`` lines as /classify messages; other lines continue a turn."""
    messages: list[dict[str, str]] = []
    for line in conversation.splitlines():
        if not line.strip():
            continue
        match = _TURN_PREFIX.match(line)
        if match:
            messages.append({"sender": match.group(1).lower(), "text": match.group(2).strip()})
        elif messages:
            messages[-1]["text"] += "\n" + line.strip()
        else:
            raise ValueError("the conversation's first line has no 'Customer:' or 'Agent:' prefix")
    if not messages:
        raise ValueError("the conversation is empty")
    return messages


def _csv_items(text: str, path: Path, fields: list[str]) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip().lower() for name in reader.fieldnames or []]
    if "conversation" not in columns:
        raise UsageError(f"the CSV file {path} has no 'conversation' column (columns: {', '.join(columns) or 'none'})",
                         hint=f"Columns: conversation, {', '.join(fields)} (and optionally conversation_number).")
    reader.fieldnames = columns
    items: list[tuple[str, Any]] = []
    for number, row in enumerate(reader, 1):
        where = f"row {number}"
        try:
            messages = parse_turns(row.get("conversation") or "")
        except ValueError as e:
            items.append((where, ValueError(str(e))))
            continue
        expected = {name: (row.get(name) or "").strip() for name in fields if (row.get(name) or "").strip()}
        body: dict[str, Any] = {"messages": messages, "expected": expected}
        if (row.get("conversation_number") or "").strip():
            body["conversation_number"] = row["conversation_number"].strip()
        items.append((where, body))
    return items


def _check_expected(raw: Any, fields: list[str]) -> dict[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"'expected' must be an object with labels of {', '.join(fields)} (any of them)")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"'expected' has unknown key(s) {', '.join(map(repr, unknown))}: the taxonomy's fields are "
                         f"{', '.join(fields)}")
    for name, value in raw.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {name} must be a non-empty string, not {value!r}")
    return {name: value.strip() for name, value in raw.items()}


def read_item(where: str, raw: Any, index: int, taxonomy: Taxonomy, into: LabelledSet) -> None:
    """Validate one item; add it to ``into`` (usable, malformed, off-taxonomy labels)."""
    try:
        if isinstance(raw, ValueError):  # a CSV row whose conversation could not be read, an unreadable item
            raise raw
        if not isinstance(raw, dict):
            raise ValueError(f"an item must be a JSON object, not {type(raw).__name__}")
        expected_raw = _check_expected(raw.get("expected"), taxonomy.field_names)
        body = {key: value for key, value in raw.items() if key not in NOT_IN_BODY}
        body.setdefault("conversation_number", f"item-{index}")
        conversation = validate_conversation(body)
    except InputError as e:
        into.malformed.append(f"{where}: {e.message}")
        return
    except ValueError as e:
        into.malformed.append(f"{where}: {e}")
        return
    expected: dict[str, str] = {}
    for name, label in expected_raw.items():
        canonical = taxonomy.canonical(name, label)
        if canonical is None:
            into.off_taxonomy.append(OffTaxonomy(where, name, label))
        else:
            expected[name] = canonical
    if expected:  # an item whose every label is off the taxonomy could not be scored at all
        into.items.append(LabelledItem(where, body, conversation, expected))


def load_labelled(path: Path, taxonomy: Taxonomy, limit: int | None = None) -> LabelledSet:
    raw_items, broken = read_raw_items(path, taxonomy.field_names)
    labelled = LabelledSet(malformed=list(broken))
    for index, (where, raw) in enumerate(raw_items, 1):
        if limit is not None and len(labelled.items) >= limit:
            break
        read_item(where, raw, index, taxonomy, labelled)
    return labelled


# --- classifying -------------------------------------------------------------------------------


@dataclass
class Prediction:
    item: LabelledItem
    labels: dict[str, str] | None = None  # None: the classification failed
    confidence: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    prompt_tokens: int | None = None  # direct runs: the whole prompt, as the server counted it


def _confidences(classification: dict[str, Any]) -> dict[str, float | None]:
    """``classification.confidence`` when the provider gives one ({field: float or null})."""
    raw = classification.get("confidence")
    if not isinstance(raw, dict):
        return {}
    values: dict[str, float | None] = {}
    for name, value in raw.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        values[name] = float(value) if ok and value is not None else None
    return values


def make_llm_client(settings: Settings) -> AsyncLLMPool:
    """The LLM client of a direct run, as the batch processor builds it: any provider, and every
    server LLM_ENDPOINT lists."""
    return AsyncLLMPool(settings, create_async_llm_client)


Classify = Callable[[LabelledItem], Awaitable[dict[str, Any]]]


async def classify_all(items: list[LabelledItem], classify: Classify, max_concurrent: int,
                       on_done: Callable[[], None] = lambda: None) -> list[Prediction]:
    """Classify every item, at most ``max_concurrent`` at once; a failed item is recorded, not fatal."""
    gate = asyncio.Semaphore(max_concurrent)

    async def one(item: LabelledItem) -> Prediction:
        async with gate:
            try:
                classification = await classify(item)
            except ClassifierError as e:
                logger.warning("%s (%s) failed: %s", item.where, item.conversation.conversation_number, e)
                return Prediction(item, error=f"{e.code}: {e.message}")
            except Exception as e:  # a bug or a server's garbage: this item's failure, not the report's
                logger.warning("%s (%s) failed unexpectedly", item.where, item.conversation.conversation_number,
                               exc_info=True)
                return Prediction(item, error=f"unexpected_error: {type(e).__name__}: {e}")
            finally:
                on_done()
        tokens = classification.pop(PROMPT_TOKENS, None)
        labels = {name: str(value) for name, value in classification.items() if name not in NOT_LABELS}
        return Prediction(item, labels, _confidences(classification),
                          prompt_tokens=tokens if isinstance(tokens, int) else None)

    return list(await asyncio.gather(*(one(item) for item in items)))


def _progress(total: int) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal or total == 0)


def examples_from_file(path: Path, settings: Settings, taxonomy: Taxonomy,
                       embed: AsyncEmbed | None) -> Callable[[], Awaitable[ExampleIndex]]:
    """Retrieved examples read from a labelled file: ``labels`` (export_reviewed writes the effective
    labels there) or else ``expected``; a conversation of the scored set is never its own example."""

    async def load() -> ExampleIndex:
        pool = load_labelled(path, taxonomy)
        items = []
        for item in pool.items:
            labels = item.body.get("labels")
            labels = {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, dict) else {}
            items.append(Reviewed(item.conversation, {**labels, **item.expected},
                                  str(item.body.get("categorization") or "")))
        return await build_index(items, settings, taxonomy.field_names, embed=embed)

    return load


@asynccontextmanager
async def bound_examples(pipeline: ConversationClassifier, settings: Settings, client: AsyncLLMPool,
                         examples: Path | None) -> AsyncIterator[None]:
    """Bind the retriever (FEW_SHOT_SOURCE reviewed/both) to ``examples``, or else to MongoDB."""
    retriever = pipeline.retriever
    embed = client.embed if settings.embedding_model else None
    if retriever is None:
        yield
    elif examples is not None:
        retriever.source = examples_from_file(examples, settings, pipeline.taxonomy, embed)
        yield
    else:
        async with MongoStore.connect(settings) as store:
            await store.ping()
            retriever.source = mongo_source(store.results.database, settings, pipeline.taxonomy, embed)
            yield


async def run_direct(items: list[LabelledItem], settings: Settings, pipeline: ConversationClassifier,
                     max_concurrent: int, examples: Path | None = None) -> tuple[str, list[Prediction]]:
    async with make_llm_client(settings) as client, bound_examples(pipeline, settings, client, examples):
        await client.check_ready()  # an unreachable server or a missing model stops here, once
        if pipeline.retriever is not None:
            await pipeline.retriever.refresh_if_stale()
            logger.info("few-shot retrieval from %d reviewed example(s)", len(pipeline.retriever.index))

        async def classify(item: LabelledItem) -> dict[str, Any]:
            outcome = await pipeline.classify_async(item.conversation, client)
            # Its "confidence" is {field: float | None} or None; the prompt's size rides along.
            return {**outcome.classification.model_dump(), PROMPT_TOKENS: outcome.chat.prompt_tokens}

        with _progress(len(items)) as progress:
            task = progress.add_task("classify", total=len(items))
            predictions = await classify_all(items, classify, max_concurrent, lambda: progress.advance(task))
    return settings.llm_model, predictions


def _api_error(status: int, body: bytes) -> tuple[str, str]:
    try:
        error = json.loads(body)["error"]
        return str(error.get("type", f"http_{status}")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"http_{status}", body[:200].decode("utf-8", "replace")


async def _api_ready(session: aiohttp.ClientSession, url: str) -> str:
    """The API's model, once ``GET /ready`` says it can classify."""
    try:
        async with session.get(f"{url}/ready") as response:
            status, body = response.status, await response.read()
    except (TimeoutError, aiohttp.ClientError) as e:
        raise APIUnavailableError(f"the API at {url} cannot be reached: {str(e) or type(e).__name__}",
                                  hint="Start it (make run) or check --url.") from e
    if status != 200:
        kind, message = _api_error(status, body)
        raise APIUnavailableError(f"the API at {url} is not ready ({status} {kind}): {message}")
    try:
        return str(json.loads(body).get("model", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


async def run_via_api(items: list[LabelledItem], url: str, max_concurrent: int) -> tuple[str, list[Prediction]]:
    url = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=API_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_concurrent)) as session:
        model = await _api_ready(session, url)

        async def classify(item: LabelledItem) -> dict[str, Any]:
            try:
                async with session.post(f"{url}/classify", json=item.body) as response:
                    status, body = response.status, await response.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                raise APIUnavailableError(f"POST {url}/classify failed: {str(e) or type(e).__name__}") from e
            if status != 200:
                kind, message = _api_error(status, body)
                raise APIAnswerError(kind, message or f"HTTP {status}")
            try:
                return dict(json.loads(body)["classification"])
            except (ValueError, KeyError, TypeError) as e:
                problem = f"the API's 200 answer has no classification: {body[:120]!r}"
                raise APIAnswerError("bad_api_answer", problem) from e

        with _progress(len(items)) as progress:
            task = progress.add_task("classify", total=len(items))
            predictions = await classify_all(items, classify, max_concurrent, lambda: progress.advance(task))
    return model, predictions


# --- metrics -----------------------------------------------------------------------------------


def label_order(expected: list[str], predicted: list[str], taxonomy_labels: list[str]) -> list[str]:
    """The labels present in the expected or predicted values: taxonomy order, then others sorted."""
    present = set(expected) | set(predicted)
    return [label for label in taxonomy_labels if label in present] + sorted(present - set(taxonomy_labels))


def calibration(
    expected: list[str], predicted: list[str], confidences: list[float | None]
) -> list[dict[str, Any]] | None:
    """Accuracy per confidence bucket (None when no answer carried a confidence)."""
    scored = [(c, e == p) for e, p, c in zip(expected, predicted, confidences, strict=True) if c is not None]
    if not scored:
        return None
    buckets = []
    for low, high in itertools.pairwise(CALIBRATION_EDGES):
        inside = [(c, ok) for c, ok in scored if low <= c < high or (high == CALIBRATION_EDGES[-1] and c == high)]
        if inside:
            buckets.append({
                "range": [low, high],
                "n": len(inside),
                "accuracy": round(sum(ok for _, ok in inside) / len(inside), 4),
                "mean_confidence": round(sum(c for c, _ in inside) / len(inside), 4),
            })
    return buckets


def field_metrics(expected: list[str], predicted: list[str], taxonomy_labels: list[str],
                  confidences: list[float | None] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label scores and the confusion matrix of one field (scikit-learn)."""
    # Imported here: scikit-learn is the evaluation extra (requirements-eval.txt), slow to import.
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    labels = label_order(expected, predicted, taxonomy_labels)
    report = classification_report(expected, predicted, labels=labels, output_dict=True, zero_division=0)
    metrics: dict[str, Any] = {
        "n": len(expected),
        "accuracy": round(float(accuracy_score(expected, predicted)), 4),
        "macro_f1": round(float(f1_score(expected, predicted, labels=labels, average="macro", zero_division=0)), 4),
        "per_label": {
            label: {
                "precision": round(float(report[label]["precision"]), 4),
                "recall": round(float(report[label]["recall"]), 4),
                "f1": round(float(report[label]["f1-score"]), 4),
                "support": int(report[label]["support"]),
            }
            for label in labels
        },
        "confusion": {"labels": labels, "matrix": confusion_matrix(expected, predicted, labels=labels).tolist()},
    }
    buckets = calibration(expected, predicted, confidences or [None] * len(expected))
    if buckets is not None:
        metrics["calibration"] = buckets
    return metrics


def build_report(predictions: list[Prediction], model: str, seconds: float, taxonomy: Taxonomy) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in taxonomy.field_names:
        scored = [p for p in predictions if p.labels is not None and name in p.item.expected]
        if scored:
            fields[name] = field_metrics(
                [p.item.expected[name] for p in scored],
                [p.labels.get(name, MISSING_LABEL) for p in scored if p.labels is not None],
                taxonomy.names(name),
                [p.confidence.get(name) for p in scored],
            )
    tokens = [p.prompt_tokens for p in predictions if p.prompt_tokens is not None]
    return {
        "n": len(predictions),
        "model": model,
        "fields": fields,
        "errors": sum(p.labels is None for p in predictions),
        "seconds_per_item": round(seconds / len(predictions), 3) if predictions else 0.0,
        "prompt_tokens_per_item": round(sum(tokens) / len(tokens), 1) if tokens else None,
    }


# --- output ------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | str, what: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write the {what} {path}: {e.strerror or e}") from e


def check_destinations(args: argparse.Namespace) -> None:
    """Fail before any classification when an output file could not be written."""
    for option in ("output", "markdown", "chart"):
        path: Path | None = getattr(args, option)
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"--{option} {path}: the folder {path.parent} does not exist")
        if path is not None and path.is_dir():
            raise UsageError(f"--{option} {path} is a folder")


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def print_report(report: dict[str, Any], labelled: LabelledSet, failures: list[Prediction], console: Console) -> None:
    summary = console_table(f"{report['n']} conversations, model {report['model']}, "
                            f"{report['seconds_per_item']:.2f} s per conversation",
                            [("field", "left"), ("scored", "right"), ("accuracy", "right"), ("macro-F1", "right")])
    for name, metrics in report["fields"].items():
        summary.add_row(name, str(metrics["n"]), _pct(metrics["accuracy"]), f"{metrics['macro_f1']:.3f}")
    console.print(summary)
    for name, metrics in report["fields"].items():
        table = console_table(f"{name}: per label", [("label", "left"), *((column, "right") for column in (
            "precision", "recall", "F1", "support"))])
        for label, scores in metrics["per_label"].items():
            table.add_row(label, f"{scores['precision']:.2f}", f"{scores['recall']:.2f}", f"{scores['f1']:.2f}",
                          str(scores["support"]))
        console.print(table)
        if "calibration" in metrics:
            table = console_table(f"{name}: accuracy per confidence bucket",
                                  [(column, "right") for column in ("confidence", "n", "accuracy", "mean confidence")])
            for bucket in metrics["calibration"]:
                low, high = bucket["range"]
                table.add_row(f"{low:.1f}-{high:.1f}", str(bucket["n"]), _pct(bucket["accuracy"]),
                              f"{bucket['mean_confidence']:.2f}")
            console.print(table)
    for line in not_scored_lines(labelled, failures):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def not_scored_lines(labelled: LabelledSet, failures: list[Prediction]) -> list[str]:
    """What the metrics leave out, each named: malformed items, off-taxonomy labels, failed calls."""
    lines: list[str] = []
    if labelled.malformed:
        lines.append(f"{len(labelled.malformed)} malformed item(s) skipped:")
        lines += [f"  {problem}" for problem in labelled.malformed]
    if labelled.off_taxonomy:
        lines.append(f"{len(labelled.off_taxonomy)} expected label(s) outside the taxonomy, not scored:")
        lines += [f"  {o.where}: {o.field} {o.label!r}" for o in labelled.off_taxonomy]
    if failures:
        lines.append(f"{len(failures)} item(s) could not be classified:")
        lines += [f"  {p.item.where} ({p.item.conversation.conversation_number}): {p.error}" for p in failures]
    return lines


def _md_table(header: list[str], rows: list[list[Any]], right_from: int = 1) -> list[str]:
    """The lines of a Markdown table (the columns from ``right_from`` on right-aligned) and a blank one."""
    columns: list[Column] = [(name, "left" if i < right_from else "right") for i, name in enumerate(header)]
    return [markdown_table(columns, rows), ""]


def render_markdown(report: dict[str, Any], labelled: LabelledSet, failures: list[Prediction], source: str) -> str:
    counts = (f"{report['n']} conversations classified, {report['errors']} failed, "
              f"{report['seconds_per_item']:.2f} s per conversation.")
    lines = [f"# Evaluation of {report['model']} on {source}", "", counts, ""]
    summary = [[name, m["n"], _pct(m["accuracy"]), f"{m['macro_f1']:.3f}"] for name, m in report["fields"].items()]
    lines += _md_table(["field", "scored", "accuracy", "macro-F1"], summary)
    for name, metrics in report["fields"].items():
        lines += [f"## {name}", ""]
        lines += _md_table(["label", "precision", "recall", "F1", "support"],
                           [[label, f"{s['precision']:.2f}", f"{s['recall']:.2f}", f"{s['f1']:.2f}", s["support"]]
                            for label, s in metrics["per_label"].items()])
        labels, matrix = metrics["confusion"]["labels"], metrics["confusion"]["matrix"]
        lines += ["Confusion matrix (rows: expected, columns: predicted):", ""]
        rows = [[label, *row] for label, row in zip(labels, matrix, strict=True)]
        lines += _md_table(["expected \\ predicted", *labels], rows)
        if "calibration" in metrics:
            lines += ["Accuracy per confidence bucket:", ""]
            lines += _md_table(["confidence", "n", "accuracy", "mean confidence"],
                               [[f"{b['range'][0]:.1f}-{b['range'][1]:.1f}", b["n"], _pct(b["accuracy"]),
                                 f"{b['mean_confidence']:.2f}"] for b in metrics["calibration"]], right_from=0)
    extra = not_scored_lines(labelled, failures)
    if extra:
        lines += ["## Not scored", "", "```", *extra, "```", ""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any]) -> bytes:
    """One confusion matrix per field, counts in the cells, as PNG bytes (Agg renderer, no display)."""
    # Imported here: matplotlib takes a while to import, and only --chart needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fields = list(report["fields"].items())
    sizes = [max(3.0, 0.55 * len(m["confusion"]["labels"]) + 2.2) for _, m in fields] or [3.0]
    figure = Figure(figsize=(max(sizes) + 1.5, sum(sizes) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"Confusion matrices - {report['model']}, {report['n']} conversations", fontsize=12)
    grid = figure.add_gridspec(max(1, len(fields)), 1, height_ratios=sizes if fields else [1])
    for position, (name, metrics) in enumerate(fields):
        labels, matrix = metrics["confusion"]["labels"], metrics["confusion"]["matrix"]
        axes = figure.add_subplot(grid[position])
        axes.imshow(matrix, cmap="Blues", vmin=0)  # no colour bar: the counts are written in the cells
        peak = max((max(row) for row in matrix), default=0)
        for row, counts in enumerate(matrix):
            for column, count in enumerate(counts):
                if count:
                    axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                              color="white" if count > peak / 2 else "black")
        axes.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        axes.set_yticks(range(len(labels)), labels, fontsize=8)
        axes.set_xlabel("predicted")
        axes.set_ylabel("expected")
        axes.set_title(f"{name}: accuracy {_pct(metrics['accuracy'])}, macro-F1 {metrics['macro_f1']:.3f}",
                       loc="left", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# --- main --------------------------------------------------------------------------------------


def load_run_settings(args: argparse.Namespace) -> Settings:
    if args.url and args.model:
        raise UsageError("--model only applies to direct runs: the API of --url uses its own LLM_MODEL",
                         hint="Restart the API with LLM_MODEL set, or drop --url.")
    if args.url and (args.few_shot_source or args.examples):
        raise UsageError("--few-shot-source and --examples only apply to direct runs: the API of --url uses its own "
                         "FEW_SHOT_SOURCE and reviewed conversations")
    settings = load_settings({"llm_model": args.model, "taxonomy_file": args.taxonomy,
                              "batch_max_concurrent": min(args.max_concurrent, 256),
                              "few_shot_source": args.few_shot_source})
    if args.examples is not None and settings.few_shot_source == "static":
        raise UsageError("--examples needs retrieved examples: add --few-shot-source reviewed (or both)")
    return settings


def write_outputs(args: argparse.Namespace, report: dict[str, Any], labelled: LabelledSet,
                  failures: list[Prediction]) -> None:
    if args.output is not None:
        _write_atomic(args.output, json.dumps(report, indent=2, ensure_ascii=False) + "\n", "report")
    if args.markdown is not None:
        markdown = render_markdown(report, labelled, failures, args.labelled_file.name)
        _write_atomic(args.markdown, markdown, "Markdown report")
    if args.chart is not None:
        _write_atomic(args.chart, render_chart(report), "chart")
    for path in (args.output, args.markdown, args.chart):
        if path is not None:
            print(f"written: {path}", file=sys.stderr)


def run(args: argparse.Namespace, settings: Settings) -> int:
    check_destinations(args)
    if args.url:
        taxonomy, pipeline = load_taxonomy(settings.taxonomy_file), None
    else:
        pipeline = ConversationClassifier.from_settings(settings)
        taxonomy = pipeline.taxonomy
    labelled = load_labelled(args.labelled_file, taxonomy, args.limit)
    if not labelled.items:
        problems = not_scored_lines(labelled, [])
        raise UsageError(f"no usable item in {args.labelled_file}" + (":\n" + "\n".join(problems) if problems else ""),
                         hint="Each item needs 'messages' or 'tweets' and 'expected' labels of the taxonomy.")
    started = time.perf_counter()
    if pipeline is None:
        model, predictions = asyncio.run(run_via_api(labelled.items, args.url, args.max_concurrent))
    else:
        model, predictions = asyncio.run(run_direct(labelled.items, settings, pipeline, args.max_concurrent,
                                                    args.examples))
    report = build_report(predictions, model, time.perf_counter() - started, taxonomy)
    failures = [p for p in predictions if p.labels is None]
    print_report(report, labelled, failures, Console())
    write_outputs(args, report, labelled, failures)
    return EXIT_INCOMPLETE if failures or labelled.malformed else EXIT_OK


def _run_from_args(args: argparse.Namespace) -> int:
    settings = load_run_settings(args)
    configure_logging(settings.log_level if args.verbose else "ERROR")
    return run(args, settings)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, evaluate, and turn the outcome into an exit code (error_handler.run_command)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
