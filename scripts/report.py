"""Report on the classifications: counts per label field of the taxonomy, and their crossings.

    python -m scripts.report [--format table|csv|json] [--chart FILE.png] [--job BATCH_JOB_ID]

Reads the results collection of the batch processor with its MongoDB settings
(MONGODB_CONNECTION_STRING, 'embedded' included, MONGODB_DATABASE_NAME,
MONGODB_RESULTS_COLLECTION; environment, then ``.env``) and the taxonomy (TAXONOMY_FILE), whose
label fields (intent, topic and sentiment by default) are the report's.

Counting
--------
MongoDB does the counting: one aggregation pipeline groups the results by their labels of every
field - at most the product of the fields' label counts, whatever the number of results - and
every count and crossing of the report is a sum over those rows.
No result document is loaded into Python. The same pipeline takes the first and last
``processing_metadata.processed_at`` (a date as the batch processor writes it, or an
ISO-8601 string as in the design document's example).

The labels counted are the effective ones: a reviewer's correction (a current ``review``, see
README 'Reviewing labels') wins over the model's label; a stale review does not count.

Labels are listed in taxonomy order, each taxonomy label even with no results (zeros
keep every report the same shape and the crossing tables rectangular). Labels found in
the data but not in the taxonomy (an old taxonomy, a hand-edited result) follow the
known ones, most frequent first; a missing or empty label is counted as ``(missing)``.
Labels are compared exactly: the classifier stores the taxonomy's spelling.

Formats
-------
With the default taxonomy, FIELD is intent, topic or sentiment and the crossings are
``intent_by_topic``, ``intent_by_sentiment`` and ``topic_by_sentiment``: every pair of fields,
``A_by_B`` with A before B in the taxonomy.

* ``table`` (default): one rich table per field (results, share of all results, and the split
  by the field with the fewest labels, the sentiment by default), that field's own table last,
  with totals; a header line gives the number of results, database.collection and the
  processed_at range.
* ``json``: one object: ``total``, ``database``, ``collection``, ``batch_job_id``,
  ``processed_at`` ({"first", "last"}, ISO 8601 UTC or null), ``by_FIELD`` ({label: count})
  per field, the crossings ({row label: {column label: count}}),
  ``unknown_labels`` ({FIELD: [labels outside the taxonomy]}),
  ``skipped_no_customer_turn``: source conversations the batch processor did not send to the
  model because they have no customer turn (status ``skipped``; not part of ``total``) and
  ``needs_review`` (results whose ``classification.needs_review`` is true: a label's confidence
  was below CONFIDENCE_THRESHOLD when classified).
* ``csv``: one long table with the header ``section,row,column,count``; ``section`` is
  a key of the JSON report: ``total`` (row and column empty), ``by_FIELD`` (column empty), or a
  crossing. Every section sums to the total; a last row ``skipped_no_customer_turn`` counts the
  conversations skipped apart.

``--chart FILE.png`` also writes bar charts (each field stacked by the field with the fewest
labels, and that field's own bars) with matplotlib's Agg renderer: no display needed.

An empty report (no results yet, or none for ``--job``) is not an error: it exits 0,
prints the report with zero counts and says why on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pymongo.collection import Collection  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

from config import Settings, load_settings  # noqa: E402
from error_handler import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    run_command,
)
from logger import configure_logging  # noqa: E402
from mongo_client import STATUS_SKIPPED, storage_error, sync_database  # noqa: E402
from prompt_builder import Taxonomy, load_taxonomy  # noqa: E402
from reviews import effective_label  # noqa: E402
from scripts.tables import Column, console_table  # noqa: E402
from utils.command_line import command_parser  # noqa: E402

if TYPE_CHECKING:
    from rich.table import Table

logger = logging.getLogger("report")

# Exit codes are the shared ones (error_handler): 0 report printed (also an empty one: no results yet,
# or none for --job), 1 a MongoDB query failed after the connection check (e.g. not authorized),
# 2 bad command line or an unwritable chart file, 3 invalid settings or taxonomy, 4 MongoDB unreachable.

MISSING_LABEL = "(missing)"
CSV_HEADER = ("section", "row", "column", "count")
NO_RESULTS_HINT = "run python batch_processor.py first"
APP_NAME = "support-classifier-report"  # the client's name in MongoDB's logs and currentOp
LATEST_JOBS_SHOWN = 5

EPILOG = f"""\
settings (environment or .env, as for the batch processor):
  MONGODB_CONNECTION_STRING   MongoDB URI, or 'embedded' for a local SecantusDB in ./data/db
  MONGODB_DATABASE_NAME       database (default customer_support)
  MONGODB_RESULTS_COLLECTION  the classifications (default sentimental_analysis)
  MONGODB_TIMEOUT_MS          server selection timeout (default 30000)
  TAXONOMY_FILE               the label fields and their label order (default config/taxonomy.json)

labels are listed in taxonomy order, zeros included; labels found in the results but not
in the taxonomy follow, most frequent first.

csv: one long table, header {",".join(CSV_HEADER)}; section is total, by_FIELD (column empty)
for each label field (by_intent, by_topic, by_sentiment by default) or A_by_B for each pair of
fields, A before B in the taxonomy (intent_by_topic, intent_by_sentiment, topic_by_sentiment;
row label x column label). Each section sums to the total. json: the same sections as keys of
one object, plus database, collection, batch_job_id, processed_at and unknown_labels. Tables
and chart split each field by the field with the fewest labels (the sentiment by default); the
other crossings are in json and csv only (too wide for a table).

exit codes:
  {EXIT_OK} report printed; also an empty one (no results yet, or none for --job): the reason goes to stderr
  {EXIT_FAILURE} a MongoDB query failed     {EXIT_USAGE} bad command line, or the chart cannot be written
  {EXIT_CONFIG} invalid configuration or taxonomy   {EXIT_UNAVAILABLE} MongoDB unavailable
"""


# --- command line -------------------------------------------------------------------------


def _png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"must be a .png file name, got {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} does not exist")
    return path


def _job_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m scripts.report",
        "Count the classifications of the results collection by each label field of the taxonomy "
        "(intent, topic and sentiment by default), and cross every pair of fields. MongoDB does the counting.",
        EPILOG,
    )
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table",
                        help="table: rich tables with totals and percentages; csv: one long table "
                        "(section,row,column,count); json: one object [default: table]")
    parser.add_argument("--chart", type=_png_path, metavar="FILE.png",
                        help="also write bar charts (each field stacked by the one with the fewest labels) "
                        "to this PNG file, replacing it [default: no chart]")
    parser.add_argument("--job", type=_job_id, metavar="BATCH_JOB_ID",
                        help="only the results of this batch job (processing_metadata.batch_job_id, e.g. "
                        "batch_20250924_103000, as printed by the batch processor) [default: all results]")
    parser.add_argument("--verbose", action="store_true",
                        help="log each step at LOG_LEVEL (default INFO) on stderr [default: warnings only]")
    return parser


# --- counting -----------------------------------------------------------------------------


@dataclass
class Report:
    """The counts of one report, labels in display order (taxonomy first, then the others)."""

    database: str
    collection: str
    job: str | None
    #: The taxonomy's label fields, in its order, and their headings ('Intent').
    fields: list[str] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)
    total: int = 0
    #: Source conversations with status 'skipped' (no customer turn): never classified, counted apart.
    skipped: int = 0
    needs_review: int = 0
    first: datetime | None = None
    last: datetime | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)
    unknown: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    #: Every ordered pair of fields (row field, column field) -> (row label, column label) -> count.
    crossings: dict[tuple[str, str], Counter[tuple[str, str]]] = field(default_factory=dict)

    def crossing(self, row_kind: str, column_kind: str) -> dict[str, dict[str, int]]:
        cells = self.crossings[row_kind, column_kind]
        return {row: {column: cells[row, column] for column in self.labels[column_kind]}
                for row in self.labels[row_kind]}

    @property
    def pairs(self) -> list[tuple[str, str, str]]:
        """The crossings of the JSON and CSV reports: (key, row field, column field), every pair of
        fields once, the row field first in the taxonomy."""
        return [(f"{a}_by_{b}", a, b) for i, a in enumerate(self.fields) for b in self.fields[i + 1:]]

    @property
    def split(self) -> str:
        """The field the tables and the chart split the others by: the one with the fewest labels
        (the first of those), so the fewest columns and colours."""
        return min(self.fields, key=lambda name: len(self.labels[name]))

    @property
    def others(self) -> list[str]:
        return [name for name in self.fields if name != self.split]


def _label(value: Any) -> str:
    if value is None:
        return MISSING_LABEL
    text = str(value).strip()
    return text or MISSING_LABEL


def _as_utc(value: Any) -> datetime | None:
    """A processed_at value (a BSON date, or an ISO-8601 string as in the design document) in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _match(job: str | None) -> dict[str, Any]:
    return {"processing_metadata.batch_job_id": job} if job is not None else {}


def _typed(path: str, bson_type: str) -> dict[str, Any]:
    """``path`` when its value has ``bson_type``, else null ($min and $max skip nulls)."""
    return {"$cond": [{"$eq": [{"$type": path}, bson_type]}, path, None]}


def counts_pipeline(job: str | None, fields: list[str]) -> list[dict[str, Any]]:
    """One group per combination of labels of the ``fields`` present, with its count and processed_at range.

    Dates and strings are ranged apart: BSON orders every string before every date. Strings
    compare as text, which is time order for ISO-8601 strings written alike (all in UTC, "Z").
    """
    at = "$processing_metadata.processed_at"
    return [
        {"$match": _match(job)},
        {"$group": {
            # The effective labels: a current review's, else the model's (reviews.py).
            "_id": {kind: effective_label(kind) for kind in fields},
            "count": {"$sum": 1},
            "needs_review": {"$sum": {"$cond": [{"$eq": ["$classification.needs_review", True]}, 1, 0]}},
            "first_date": {"$min": _typed(at, "date")},
            "last_date": {"$max": _typed(at, "date")},
            "first_text": {"$min": _typed(at, "string")},
            "last_text": {"$max": _typed(at, "string")},
        }},
    ]


def _ordered(known: list[str], found: Counter[str]) -> tuple[list[str], list[str]]:
    """Taxonomy labels in their order, then the labels only the data has, most frequent first."""
    known_set = set(known)
    extra = sorted((label for label in found if label not in known_set), key=lambda label: (-found[label], label))
    return known + extra, extra


def build_report(collection: Collection[Any], taxonomy: Taxonomy, *, database: str, job: str | None) -> Report:
    fields = taxonomy.field_names
    report = Report(database=database, collection=collection.name, job=job, fields=fields,
                    titles={f.name: f.title for f in taxonomy.fields})
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in fields}
    crossings: dict[tuple[str, str], Counter[tuple[str, str]]] = {
        (r, c): Counter() for r in fields for c in fields if r != c}
    moments: list[datetime] = []
    started = time.monotonic()
    try:
        groups = list(collection.aggregate(counts_pipeline(job, fields)))
    except PyMongoError as e:
        raise storage_error(e, f"aggregation on {database}.{collection.name}") from e
    for group in groups:
        key = group["_id"] if isinstance(group.get("_id"), dict) else {}
        labels = {kind: _label(key.get(kind)) for kind in fields}
        n = int(group["count"])
        report.total += n
        report.needs_review += int(group.get("needs_review") or 0)
        for kind in fields:
            counts[kind][labels[kind]] += n
        for row_kind, column_kind in crossings:
            crossings[row_kind, column_kind][labels[row_kind], labels[column_kind]] += n
        for name in ("first_date", "last_date", "first_text", "last_text"):
            moment = _as_utc(group.get(name))
            if moment is not None:
                moments.append(moment)
    for kind in fields:
        report.labels[kind], report.unknown[kind] = _ordered(taxonomy.names(kind), counts[kind])
    report.counts = counts
    report.crossings = crossings
    if moments:
        report.first, report.last = min(moments), max(moments)
    logger.info("counted %d results of %s.%s (%d label groups) in %d ms", report.total, database, collection.name,
                len(groups), (time.monotonic() - started) * 1000)
    return report


def count_skipped(source: Collection[Any], job: str | None) -> int:
    """Source conversations the batch processor skipped for having no customer turn (of ``job``)."""
    query: dict[str, Any] = {"status": STATUS_SKIPPED}
    if job is not None:
        query["last_job_id"] = job
    try:
        return source.count_documents(query)
    except PyMongoError as e:
        raise storage_error(e, f"count of skipped conversations in {source.name}") from e


def latest_jobs(collection: Collection[Any], limit: int = LATEST_JOBS_SHOWN) -> list[str]:
    """The batch jobs with results, most recently processed first (for the --job hint)."""
    pipeline: list[dict[str, Any]] = [
        {"$match": {"processing_metadata.batch_job_id": {"$type": "string"}}},
        {"$group": {"_id": "$processing_metadata.batch_job_id", "last": {"$max": "$processing_metadata.processed_at"}}},
        {"$sort": {"last": -1, "_id": -1}},
        {"$limit": limit},
    ]
    try:
        return [str(group["_id"]) for group in collection.aggregate(pipeline)]
    except PyMongoError as e:
        raise storage_error(e, f"aggregation on {collection.full_name}") from e


# --- output -------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def as_dict(report: Report) -> dict[str, Any]:
    """The JSON report (keys in the order of the module docstring)."""
    data: dict[str, Any] = {
        "total": report.total,
        "database": report.database,
        "collection": report.collection,
        "batch_job_id": report.job,
        "processed_at": {"first": _iso(report.first), "last": _iso(report.last)},
    }
    for kind in report.fields:
        data[f"by_{kind}"] = {label: report.counts[kind][label] for label in report.labels[kind]}
    for key, row_kind, column_kind in report.pairs:
        data[key] = report.crossing(row_kind, column_kind)
    data["unknown_labels"] = {kind: report.unknown[kind] for kind in report.fields}
    data["skipped_no_customer_turn"] = report.skipped
    data["needs_review"] = report.needs_review
    return data


def csv_rows(report: Report) -> list[tuple[str, str, str, int]]:
    rows: list[tuple[str, str, str, int]] = [("total", "", "", report.total)]
    for kind in report.fields:
        rows += [(f"by_{kind}", label, "", report.counts[kind][label]) for label in report.labels[kind]]
    for key, row_kind, column_kind in report.pairs:
        for row, columns in report.crossing(row_kind, column_kind).items():
            rows += [(key, row, column, count) for column, count in columns.items()]
    rows.append(("skipped_no_customer_turn", "", "", report.skipped))
    return rows


def write_csv(report: Report) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(csv_rows(report))


def _marked(report: Report, kind: str, label: str) -> str:
    """``label``, with a star when it is not in the taxonomy (explained under the tables and the chart)."""
    return f"{label} *" if label in report.unknown[kind] else label


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def header_line(report: Report) -> str:
    noun = "result" if report.total == 1 else "results"
    line = f"{report.total} {noun} in {report.database}.{report.collection}"
    if report.job is not None:
        line += f", batch job {report.job}"
    if report.first and report.last:
        line += f", processed {report.first:%Y-%m-%d %H:%M:%S} to {report.last:%Y-%m-%d %H:%M:%S} UTC"
    if report.needs_review:
        line += f"; {report.needs_review} need review (confidence below the threshold)"
    return line


def _counts_table(report: Report, kind: str, title: str, split_labels: list[str]) -> Table:
    """A table of ``kind``'s labels: results and share of all, then a column per label of the split
    field (``split_labels``); totals in the footer."""
    columns: list[Column] = [(report.titles[kind], "left"), ("Results", "right"), ("% of all", "right"),
                             *((label, "right") for label in split_labels)]
    footers = ["Total", str(report.total), _percent(report.total, report.total),
               *(str(report.counts[report.split][label]) for label in split_labels)]
    return console_table(title, columns, footers)


def print_tables(report: Report) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a file or a pipe: do not squeeze long labels into 80 columns
    console.print(header_line(report), style="bold")
    if report.skipped:
        console.print(f"{report.skipped} conversation{'s' if report.skipped != 1 else ''} skipped apart: "
                      "no customer turn (status 'skipped', not sent to the model)")
    if report.total == 0:
        return  # tables of zeros say nothing; the reason is on stderr (json and csv keep their shape)
    split = report.split
    columns = report.labels[split]
    for kind in report.others:
        table = _counts_table(report, kind, f"{report.titles[kind]} by {split.replace('_', ' ')}", columns)
        cells = report.crossings[kind, split]
        for label in report.labels[kind]:
            n = report.counts[kind][label]
            table.add_row(
                _marked(report, kind, label), str(n), _percent(n, report.total),
                *(str(cells[label, column]) for column in columns),
                style="dim" if n == 0 else None,
            )
        console.print(table)
    table = _counts_table(report, split, report.titles[split], [])
    for label in columns:
        n = report.counts[split][label]
        table.add_row(_marked(report, split, label), str(n), _percent(n, report.total),
                      style="dim" if n == 0 else None)
    console.print(table)
    if any(report.unknown.values()):
        console.print("* not in the taxonomy (TAXONOMY_FILE)")


# --- chart --------------------------------------------------------------------------------

# Colours of labels that say what they mean (the default sentiments); other labels take the next
# colours of the tab10 cycle.
LABEL_COLOURS = {"positive": "#2e9e57", "neutral": "#9aa0a6", "negative": "#d1453b"}
OTHER_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _label_colours(labels: list[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    others = iter(OTHER_COLOURS * (len(labels) // len(OTHER_COLOURS) + 1))
    for label in labels:
        colours[label] = LABEL_COLOURS.get(label.casefold()) or next(others)
    return colours


def _tidy(axes: Any, counts_on: str) -> None:
    """Whole-number ticks and a light grid on the counts' axis (``"x"`` or ``"y"``); no top or right frame."""
    from matplotlib.ticker import MaxNLocator

    # The default AutoLocator is a MaxNLocator.
    cast(MaxNLocator, getattr(axes, f"{counts_on}axis").get_major_locator()).set_params(integer=True)
    axes.grid(axis=counts_on, alpha=0.3)
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)


def _stacked_bars(axes: Any, report: Report, kind: str, colours: dict[str, str], *, legend: bool) -> None:
    """``kind``'s labels as horizontal bars, each stacked by the labels of the report's split field."""
    split = report.split
    labels = report.labels[kind]
    cells = report.crossings[kind, split]
    left = [0] * len(labels)
    for column in report.labels[split]:
        widths = [cells[label, column] for label in labels]
        axes.barh(labels, widths, left=left, color=colours[column], label=column, height=0.7)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):
        axes.annotate(str(total), (total, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    axes.invert_yaxis()  # taxonomy order from the top
    axes.set_title(f"{report.titles[kind]} (stacked by {split.replace('_', ' ')})", loc="left", fontsize=11)
    axes.set_xlabel("results")
    axes.set_xlim(0, max(left + [1]) * 1.08)
    _tidy(axes, "x")
    axes.set_yticks(range(len(labels)), [_marked(report, kind, label) for label in labels])
    if legend:  # above the plot, right of its title: it never hides a bar
        axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=len(report.labels[split]), fontsize=8,
                    frameon=False)


def _split_bars(axes: Any, report: Report, colours: dict[str, str]) -> None:
    """The split field's own counts as vertical bars."""
    split = report.split
    labels = report.labels[split]
    values = [report.counts[split][label] for label in labels]
    bars = axes.bar([_marked(report, split, label) for label in labels], values,
                    color=[colours[label] for label in labels], width=0.6)
    axes.bar_label(bars, labels=[f"{v} ({_percent(v, report.total)})" for v in values], fontsize=8, padding=2)
    axes.set_title(report.titles[split], loc="left", fontsize=11)
    axes.set_ylabel("results")
    axes.set_ylim(0, max(values + [1]) * 1.2)
    _tidy(axes, "y")


def write_chart(report: Report, path: Path) -> None:
    """Bar charts of the report as a PNG, drawn by the Agg renderer (no display, no pyplot state):
    each field stacked by the split field, then the split field's own bars."""
    # Imported here: matplotlib takes a while to import, and only --chart needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = _label_colours(report.labels[report.split])
    rows = [len(report.labels[kind]) for kind in report.others]
    figure = Figure(figsize=(11, 1.6 + 0.32 * sum(rows) + 2.2), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(rows) + 1, 1, height_ratios=[n + 1.5 for n in rows] + [5.5])
    title = f"{report.total} classified conversations - {report.database}.{report.collection}"
    if report.job is not None:
        title += f" - batch job {report.job}"
    if report.total == 0:
        title += "\nno results yet" if report.job is None else "\nno results for this batch job"
    elif report.first and report.last:
        title += f"\nprocessed {report.first:%Y-%m-%d %H:%M} to {report.last:%Y-%m-%d %H:%M} UTC"
    figure.suptitle(title, fontsize=12)
    for position, kind in enumerate(report.others):
        _stacked_bars(figure.add_subplot(grid[position]), report, kind, colours, legend=position == 0)
    _split_bars(figure.add_subplot(grid[len(rows)]), report, colours)
    if any(report.unknown.values()):
        # supxlabel, not figure.text: the constrained layout makes room for it.
        figure.supxlabel("* not in the taxonomy (TAXONOMY_FILE)", x=0.01, ha="left", fontsize=8)
    try:
        figure.savefig(path, format="png", dpi=110)
    except OSError as e:
        raise UsageError(f"cannot write the chart {path}: {e.strerror or e}",
                         hint="Choose a writable file with --chart.") from e


# --- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings) -> int:
    taxonomy = load_taxonomy(settings.taxonomy_file)  # a bad taxonomy fails before any connection
    with sync_database(settings, appname=APP_NAME) as database:
        collection = database[settings.mongodb_results_collection]
        report = build_report(collection, taxonomy, database=database.name, job=args.job)
        report.skipped = count_skipped(database[settings.mongodb_source_collection], args.job)
        note = None
        if report.total == 0:
            where = f"{database.name}.{collection.name}"
            if args.job is None:
                note = f"no results yet in {where}: {NO_RESULTS_HINT}"
            else:
                jobs = latest_jobs(collection)
                known = (f"latest jobs: {', '.join(jobs)}" if jobs
                         else f"the collection holds no results yet: {NO_RESULTS_HINT}")
                note = f"no results for batch job {args.job!r} in {where} ({known})"
    if args.chart is not None:  # first: a chart that cannot be written fails the run before any output
        write_chart(report, args.chart)
        print(f"chart written to {args.chart}", file=sys.stderr, flush=True)
    if args.format == "json":
        print(json.dumps(as_dict(report), indent=2, ensure_ascii=False))
    elif args.format == "csv":
        write_csv(report)
    else:
        print_tables(report)
    sys.stdout.flush()
    if note:
        print(note, file=sys.stderr, flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, report, and turn the outcome into an exit code."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run_from_args(args))


def _run_from_args(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level if args.verbose else "WARNING")
    return run(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
