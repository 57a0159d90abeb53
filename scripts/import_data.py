"""Load conversations into the source collection: a TWCS CSV or a JSON file of documents.

    python -m scripts.import_data FILE [--company AUTHOR_ID] [--limit N] [--drop]

Uses the processor's MongoDB settings (MONGODB_CONNECTION_STRING, 'embedded' included,
MONGODB_DATABASE_NAME, MONGODB_SOURCE_COLLECTION; environment, then ``.env``).

Inputs
------
* **TWCS CSV** (the Twitter customer-support dataset, ``twcs.csv``; columns tweet_id,
  author_id, inbound, created_at, text, response_tweet_id, in_response_to_tweet_id).
  A conversation is every tweet connected by reply links (either link column; links to
  tweets missing from the file are ignored), ordered by created_at (ties: tweet_id), and
  numbered by the id of its earliest tweet. A link that cannot be right joins nothing and is
  reported: a ``response_tweet_id`` naming a tweet whose ``in_response_to_tweet_id`` is not
  this one (spreadsheets save 155157 as ``1,55,157``), or a reply dated before its parent.
  Conversations answered by several companies are counted (they can be genuine), not split. Document::

      {"conversation_number": "8", "status": "pending", "tweets": [{"tweet_id": 8,
       "author_id": "115712", "inbound": true, "created_at": "Tue Oct 31 21:45:10 +0000 2017",
       "text": "...", "response_tweet_id": "6,9" | null, "in_response_to_tweet_id": 3 | null}]}

  Ids written ``3.0`` become 3; response_tweet_id is kept as its ids joined by commas.
* **JSON** (extension ``.json`` or content starting with ``[`` / ``{``): a list of
  documents in the source schema (``tweets`` or ``messages``) or one document. Documents
  are stored as given - extra keys such as ``expected`` are kept - except that
  ``conversation_number`` is stored as the validated string, ``status`` defaults to
  "pending", and ``_id`` is dropped (MongoDB assigns a new one). The whole file is read
  into memory: JSON is meant for samples and exports, the CSV path for big data.

Every document is checked with ``aggregator.validate_conversation`` (the processor's own
check). Bad rows - unparseable ids, inbound not True/False, bad dates, wrong field count,
duplicate tweet ids, invalid documents; in JSON also items nested too deeply for the decoder
(``utils.json_items``) and documents MongoDB cannot store (an integer beyond 8 bytes, named
by its field) - are skipped, counted and reported by position
(CSV: the physical line where the record starts, counting '\\n'; JSON: the index in the
list): the first 20 on screen, all of them in a TSV file when there are more.

Re-importing adds nothing: a unique index on conversation_number, and unordered bulk
inserts whose duplicate-key errors (11000) count as "already present". ``--drop`` drops
the source collection (never the results collection) after the file was read and just
before inserting, so an unreadable file never costs the existing data.

Memory (the full TWCS file, 2.8 million tweets, ~500 MB)
-------------------------------------------------------
No tweet text is held in memory beyond one insert batch. Design:

1. One streaming read of the CSV: each valid row goes, in batches, to a temporary
   on-disk SQLite database (``tempfile.TemporaryDirectory``, ``--temp-dir``) as
   ``tweets(idx, line, tweet_id, ...)`` with ``idx`` its compact row number, and each
   reply link as ``links(src_idx, target_tweet_id)``.
2. SQLite indexes ``tweet_id`` (duplicates become bad rows) and resolves the links with a
   join, so the tweet-id -> index map lives on disk, not in a dict. The resolved pairs
   feed a union-find with path compression over one ``array('q')`` (8 bytes per tweet)
   whose root is always the smallest row number of its component.
3. ``comp(root, idx)`` is written to SQLite and read back joined to ``tweets`` in root
   order: one conversation at a time is built, validated and queued; inserts go in
   batches of 1000. Conversations arrive in order of first appearance in the file.

The CSV is read once (not twice, as a design keeping ids in memory would need); the price is
the links table on disk. ``--limit`` still reads the whole CSV: a conversation is only known
to be complete at its end.

Resident memory is the interpreter and libraries (~45 MB), the 8-byte-per-tweet array and
SQLite's page cache (16 MB). Measured on a synthetic 2.8-million-tweet TWCS-format CSV (542 MB)
into a local SecantusDB: peak RSS 111 MB, 4 minutes (35 s reading, 13 s linking, the rest
inserting), temporary disk 1.2 times the CSV.

Exit codes (``--help`` lists them): 0 imported, 5 imported but bad rows were skipped (or reply links dropped),
1 the import broke off, 2 usage error, 3 configuration error, 4 MongoDB unavailable.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sqlite3
import tempfile
import time
from array import array
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

import bson  # noqa: E402
from bson.errors import InvalidDocument  # noqa: E402
from pymongo.collection import Collection  # noqa: E402
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from aggregator import validate_conversation  # noqa: E402
from config import Settings, load_settings  # noqa: E402
from error_handler import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    InputError,
    StorageError,
    UsageError,
    fail,
    field_path,
    run_command,
)
from logger import configure_logging  # noqa: E402
from mongo_client import SOURCE_INDEXES, STATUS_PENDING, storage_error, sync_database  # noqa: E402
from utils.command_line import command_parser, positive_int  # noqa: E402
from utils.json_items import UnreadableItem, json_list_items, json_value  # noqa: E402

logger = logging.getLogger("import_data")

# Exit codes (error_handler): 0 ok, 1 the import broke off (MongoDB error mid-import, temporary
# database failure), 2 bad command line or unreadable file, 3 invalid settings, 4 MongoDB unreachable,
# 130 interrupted; 5 (EXIT_INCOMPLETE) means here: every valid conversation imported, bad rows skipped.
EXIT_BAD_ROWS = EXIT_INCOMPLETE

TWCS_COLUMNS = (
    "tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id", "in_response_to_tweet_id",
)
INSERT_BATCH = 1000
SQLITE_BATCH = 5000
PRINTED_BAD_ROWS = 20
MAX_ID = 2**63 - 1  # BSON int64 and SQLite INTEGER
SQLITE_CACHE_KIB = 16384  # page cache (and sorter) budget; more bought no speed in measurements

LINK_PARENT, LINK_RESPONSE = 0, 1  # in_response_to_tweet_id, response_tweet_id
# Kinds of entries in the bad-rows report: a skipped row, or a reply link that was not followed.
ROW_SKIPPED = "bad row"
LINK_UNCONFIRMED = "response_tweet_id not confirmed by the reply"
LINK_BEFORE_PARENT = "reply dated before its parent"
LINK_KINDS = (LINK_UNCONFIRMED, LINK_BEFORE_PARENT)


EPILOG = f"""\
settings (environment or .env, as for the batch processor):
  MONGODB_CONNECTION_STRING  MongoDB URI, or 'embedded' for a local SecantusDB in ./data/db
  MONGODB_DATABASE_NAME      database (default customer_support)
  MONGODB_SOURCE_COLLECTION  collection the conversations go to (default conversation_set)
  MONGODB_TIMEOUT_MS         server selection timeout (default 30000)

bad rows (unparseable ids, inbound not True/False, bad dates, wrong field count, duplicate
tweet ids, documents that fail validation, e.g. no customer turn; JSON items nested too deeply
to read, or holding an integer too large for MongoDB) are skipped and reported with
their CSV line (where the record starts) or JSON list index; past {PRINTED_BAD_ROWS}, all go to
--bad-rows-file (columns: line, kind, reason).

reply links that cannot be right are dropped (the tweets are imported) and reported the same way,
per kind: "{LINK_UNCONFIRMED}" (response_tweet_id names a tweet of the
file that does not reply to it: a spreadsheet saved 155157 as 1,55,157) and "{LINK_BEFORE_PARENT}".
Conversations answered by several companies are counted, never split.

exit codes:
  {EXIT_OK} imported (conversations already present are skipped, not errors)
  {EXIT_BAD_ROWS} imported every valid conversation, but bad rows were skipped or reply links dropped (see the
    report)
  {EXIT_FAILURE} the import broke off (rerun: what was imported is skipped)
  {EXIT_USAGE} usage error: bad option, missing or unreadable file, unknown format
  {EXIT_CONFIG} invalid configuration   {EXIT_UNAVAILABLE} MongoDB unavailable
"""


class RowError(ValueError):
    """One CSV row is unusable; the message says which field and why (never the tweet text)."""


# --- command line -------------------------------------------------------------------------


def _company(text: str) -> str:
    value = normalise_author(text)
    if not value:
        raise argparse.ArgumentTypeError("must name an author, e.g. AppleSupport")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m scripts.import_data",
        "Load conversations into the source collection of the batch processor, from the TWCS "
        "Twitter customer-support CSV (tweets grouped into conversations by their reply links) or from a "
        "JSON file of documents. Re-importing the same file adds nothing.",
        EPILOG,
    )
    parser.add_argument("file", type=Path, metavar="FILE",
                        help="twcs.csv (or any CSV with the TWCS columns), or a .json file holding a list of "
                        "conversation documents or one document")
    parser.add_argument("--company", type=_company, metavar="AUTHOR_ID",
                        help="keep only conversations in which this company (a non-inbound author_id; any case, "
                        "with or without @) takes part")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="import at most N conversations (the first ones of the file; already present ones "
                        "count) [default: all]")
    parser.add_argument("--drop", action="store_true",
                        help="drop the source collection before inserting (after the file was read); the results "
                        "collection is never touched")
    parser.add_argument("--bad-rows-file", type=Path, metavar="PATH",
                        help="where all bad rows are written when there are more than "
                        f"{PRINTED_BAD_ROWS} [default: FILE's name + .bad_rows.tsv in the current folder]")
    parser.add_argument("--temp-dir", type=Path, metavar="DIR",
                        help="folder for the temporary SQLite database (about 1.2x the CSV's size) "
                        "[default: the system's, $TMPDIR]")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="log each step with counts and durations at LOG_LEVEL (default INFO; no tweet text "
                        "below DEBUG)")
    return parser


# --- field parsing -----------------------------------------------------------------------

_DECIMAL_ID = re.compile(r"(\d+)\.0*", re.ASCII)
_MONTHS = {name: number for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_WEEKDAYS = frozenset(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))


def _show(value: str, limit: int = 40) -> str:
    """A field value for a bad-row message: quoted, escaped, cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def parse_id(value: str, column: str) -> int:
    """A tweet id written ``3`` or ``3.0``."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        number = int(text)
    elif match := _DECIMAL_ID.fullmatch(text):
        number = int(match[1])
    else:
        raise RowError(f"{column} {_show(value)} is not a tweet id")
    if number > MAX_ID:
        raise RowError(f"{column} {_show(value)} is too large for a tweet id")
    return number


def parse_optional_id(value: str, column: str) -> int | None:
    return None if not value.strip() else parse_id(value, column)


def parse_id_list(value: str, column: str) -> list[int]:
    """``"3,5"`` -> [3, 5]; empty -> []."""
    if not value.strip():
        return []
    try:
        return [parse_id(part, column) for part in value.split(",")]
    except RowError:
        raise RowError(f"{column} {_show(value)} is not a comma-separated list of tweet ids") from None


def parse_inbound(value: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise RowError(f"inbound {_show(value)} is not True or False")


def parse_created_at(value: str) -> int:
    """``Tue Oct 31 22:10:47 +0000 2017`` -> seconds since the epoch (UTC)."""
    parts = value.split()
    try:
        if len(parts) != 6 or parts[0].lower() not in _WEEKDAYS:
            raise ValueError
        hours, minutes, seconds = parts[3].split(":")
        offset = parts[4]
        if len(offset) != 5 or offset[0] not in "+-" or not (offset[1:].isascii() and offset[1:].isdigit()):
            raise ValueError
        moment = datetime(int(parts[5]), _MONTHS[parts[1].lower()], int(parts[2]),
                          int(hours), int(minutes), int(seconds), tzinfo=UTC)
        shift = int(offset[1:3]) * 3600 + int(offset[3:5]) * 60
        return int(moment.timestamp()) - (shift if offset[0] == "+" else -shift)
    except (ValueError, KeyError, OverflowError):
        raise RowError(
            f"created_at {_show(value)} is not a date like 'Tue Oct 31 22:10:47 +0000 2017'"
        ) from None


def normalise_author(value: str) -> str:
    return value.strip().lstrip("@").lower()


# --- the temporary work database and bad rows ---------------------------------------------------


@contextmanager
def work_database(temp_dir: Path | None) -> Iterator[sqlite3.Connection]:
    """A throw-away SQLite database in a temporary folder, removed on exit."""
    if temp_dir is not None and not temp_dir.is_dir():
        raise UsageError(f"--temp-dir folder does not exist: {temp_dir}")
    with (tempfile.TemporaryDirectory(prefix="import_data_", dir=temp_dir) as folder,
          closing(sqlite3.connect(Path(folder) / "work.sqlite3")) as db):
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        db.execute("CREATE TABLE bad_rows (position INTEGER NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL)")
        yield db


class BadRows:
    """Every bad row and dropped reply link, kept in the work database (there may be millions in a
    broken file). ``count`` is the rows skipped; ``links`` the reply links dropped, per kind."""

    def __init__(self, db: sqlite3.Connection, unit: str) -> None:
        self.db = db
        self.unit = unit  # "line" (CSV) or "item" (JSON)
        self.count = 0
        self.links = dict.fromkeys(LINK_KINDS, 0)

    @property
    def entries(self) -> int:
        return self.count + sum(self.links.values())

    def add(self, position: int, reason: str, *, kind: str = ROW_SKIPPED) -> None:
        reason = reason.replace("\t", " ").replace("\n", " ")
        self.db.execute("INSERT INTO bad_rows VALUES (?, ?, ?)", (position, kind, reason))
        if kind == ROW_SKIPPED:
            self.count += 1
        else:
            self.links[kind] += 1
        logger.debug("bad %s %d: %s", self.unit, position, reason)

    def first(self, count: int) -> list[tuple[int, str]]:
        return self.db.execute(
            "SELECT position, reason FROM bad_rows ORDER BY position, rowid LIMIT ?", (count,)
        ).fetchall()

    def export(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="") as out:
            out.write(f"{self.unit}\tkind\treason\n")
            for row in self.db.execute("SELECT position, kind, reason FROM bad_rows ORDER BY position, rowid"):
                out.write("\t".join(map(str, row)) + "\n")


# --- input detection ------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """``"csv"`` or ``"json"``; :class:`UsageError` when missing, unreadable or neither."""
    if not path.exists():
        raise UsageError(f"input file not found: {path}",
                         hint="Give the path of a TWCS CSV (twcs.csv) or of a JSON file of conversations.")
    if not path.is_file():
        raise UsageError(f"not a file: {path}", hint="Give the path of a TWCS CSV or of a JSON file.")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not text:
        raise UsageError(f"{path} is empty", hint="Nothing to import.")
    suffix = path.suffix.lower()
    if suffix == ".json" or text[0] in "[{":
        return "json"
    first_line = text.splitlines()[0].lower()
    if suffix == ".csv" or "tweet_id" in first_line:
        return "csv"
    raise UsageError(
        f"cannot tell the format of {path}",
        hint="Expected a TWCS CSV (header tweet_id,author_id,inbound,...) or JSON (.json, a list of documents).",
    )


# --- TWCS CSV -------------------------------------------------------------------------------------


@dataclass
class Counts:
    records: int = 0  # CSV records or JSON items read
    tweets: int = 0  # valid CSV rows
    conversations: int = 0  # valid conversations met (before --company / --limit)
    added: int = 0
    present: int = 0
    other_company: int = 0
    unresolved_links: int = 0
    several_companies: int = 0  # conversations answered by more than one company (kept whole)
    limit_reached: bool = False


def twcs_header(path: Path, header: list[str] | None) -> list[str]:
    """The normalised column names; :class:`UsageError` unless every TWCS column is there."""
    if header is None:
        raise UsageError(f"{path} is empty", hint="Nothing to import.")
    names = [name.strip().lower() for name in header]
    missing = [column for column in TWCS_COLUMNS if column not in names]
    if missing:
        raise UsageError(
            f"{path} is not a TWCS CSV: missing column(s) {', '.join(missing)}",
            hint="The header must name: " + ",".join(TWCS_COLUMNS) + ".",
        )
    return names


def check_twcs_header(path: Path) -> None:
    """Fail fast (before connecting, before any progress bar) on a CSV that is not TWCS."""
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            twcs_header(path, next(csv.reader(f), None))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text: {e.reason}",
                         hint="Convert it first, e.g. iconv -f LATIN1 -t UTF-8.") from e
    except csv.Error as e:
        raise UsageError(f"{path}: unreadable CSV header: {e}") from e


def read_twcs(path: Path, db: sqlite3.Connection, bad: BadRows, counts: Counts, progress: Progress) -> None:
    """Pass 1: stream the CSV into the work database (valid rows and their links); bad rows to ``bad``."""
    db.execute("""CREATE TABLE tweets (
        idx INTEGER PRIMARY KEY, line INTEGER NOT NULL, tweet_id INTEGER NOT NULL, author_id TEXT NOT NULL,
        inbound INTEGER NOT NULL, created_at TEXT NOT NULL, created_ts INTEGER NOT NULL, text TEXT NOT NULL,
        response_tweet_id TEXT, in_response_to INTEGER)""")
    # kind: LINK_PARENT (src replies to target) or LINK_RESPONSE (src names target as a reply).
    db.execute("CREATE TABLE links (src INTEGER NOT NULL, target INTEGER NOT NULL, kind INTEGER NOT NULL)")
    rows: list[tuple[Any, ...]] = []
    links: list[tuple[int, int, int]] = []

    def flush() -> None:
        db.executemany("INSERT INTO tweets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO links VALUES (?, ?, ?)", links)
        rows.clear()
        links.clear()

    # newline="\n": records may span lines (quoted texts); line numbers count '\n' like editors do.
    with progress.open(path, "r", encoding="utf-8-sig", newline="\n", description="reading CSV") as f:
        reader = csv.reader(f)
        try:
            names = twcs_header(path, next(reader, None))
            width = len(names)
            ti, ai, ii, ci, xi, ri, pi = (names.index(column) for column in TWCS_COLUMNS)
            idx = 0
            start = reader.line_num + 1
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    counts.records += 1
                    bad.add(start, f"unreadable CSV record: {e}")
                    start = reader.line_num + 1
                    continue
                line, start = start, reader.line_num + 1
                if not record:
                    continue  # a blank line holds no record
                counts.records += 1
                if len(record) != width:
                    bad.add(line, f"expected {width} fields, found {len(record)} (missing columns or bad quoting?)")
                    continue
                try:
                    tweet_id = parse_id(record[ti], "tweet_id")
                    author_id = record[ai].strip()
                    if not author_id:
                        raise RowError("author_id is empty")
                    inbound = parse_inbound(record[ii])
                    created_at = record[ci]
                    created_ts = parse_created_at(created_at)
                    responses = parse_id_list(record[ri], "response_tweet_id")
                    parent = parse_optional_id(record[pi], "in_response_to_tweet_id")
                except RowError as e:
                    bad.add(line, str(e))
                    continue
                rows.append((idx, line, tweet_id, author_id, inbound, created_at, created_ts, record[xi],
                             ",".join(map(str, responses)) or None, parent))
                if parent is not None:
                    links.append((idx, parent, LINK_PARENT))
                for response in responses:
                    links.append((idx, response, LINK_RESPONSE))
                idx += 1
                if len(rows) >= SQLITE_BATCH:
                    flush()
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} is not UTF-8 text (near line {start}): {e.reason}",
                             hint="Convert it first, e.g. iconv -f LATIN1 -t UTF-8.") from e
        flush()
    counts.tweets = idx


def check_link(kind: int, src_id: int, src_ts: int, dst_line: int, dst_id: int, dst_parent: int | None,
               dst_ts: int) -> bool | tuple[str, str] | None:
    """Whether a reply link between two tweets of the file may join their threads.

    True: join. None: redundant (a response link that its reply confirms; the reply's own
    in_response_to link joins them). ``(kind, reason)``: a link that cannot be right, dropped.
    A spreadsheet that saved ``response_tweet_id`` 155157 as ``1,55,157`` makes it name tweets 1,
    55 and 157, which reply to something else: without this check one "conversation" would join
    unrelated threads of several companies.
    """
    if kind == LINK_RESPONSE:
        if dst_parent == src_id:
            return None
        replies_to = "nothing" if dst_parent is None else f"tweet {dst_parent}"
        return (LINK_UNCONFIRMED, f"response_tweet_id names tweet {dst_id} (line {dst_line}), which replies to "
                                  f"{replies_to}, not to {src_id}")
    if src_ts < dst_ts:
        return (LINK_BEFORE_PARENT, f"tweet {src_id} replies to tweet {dst_id} (line {dst_line}) but is dated "
                                    "before it")
    return True


def link_conversations(db: sqlite3.Connection, bad: BadRows, counts: Counts, progress: Progress) -> int:
    """Group the tweets into conversations; return how many there are.

    Fills ``comp(root, idx)``: ``root`` is the smallest row number of the tweet's conversation.
    """
    n = counts.tweets
    task = progress.add_task("linking replies", total=None)
    db.execute("CREATE INDEX tweets_by_id ON tweets (tweet_id)")
    # A repeated tweet_id: the first row wins, the others are bad rows (and link nothing).
    excluded = bytearray(n)
    duplicates = 0
    for idx, line, tweet_id, first_line in db.execute("""
            SELECT t.idx, t.line, t.tweet_id, f.line FROM
              (SELECT tweet_id, MIN(idx) AS first FROM tweets GROUP BY tweet_id HAVING COUNT(*) > 1) d
              JOIN tweets t ON t.tweet_id = d.tweet_id AND t.idx != d.first
              JOIN tweets f ON f.idx = d.first"""):
        bad.add(line, f"duplicate tweet_id {tweet_id} (first on line {first_line})")
        excluded[idx] = 1
        duplicates += 1
    if duplicates:
        db.execute("DELETE FROM tweets WHERE idx NOT IN (SELECT MIN(idx) FROM tweets GROUP BY tweet_id)")

    parent = array("q", range(n))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    total_links = db.execute("SELECT COUNT(*) FROM links").fetchone()[0]
    progress.update(task, total=total_links + n)
    resolved = 0
    # Both ends of every link whose target is in the file (a duplicate's own row is gone from tweets:
    # its links join nothing). Each link is checked before it may join two threads: see check_link.
    cursor = db.execute("""
        SELECT l.src, l.kind, d.idx, s.tweet_id, s.created_ts, d.line, d.tweet_id, d.in_response_to, d.created_ts,
               s.line
        FROM links l JOIN tweets d ON d.tweet_id = l.target LEFT JOIN tweets s ON s.idx = l.src""")
    while chunk := cursor.fetchmany(10000):
        for src, kind, dst, *ends, src_line in chunk:
            if excluded[src]:
                continue
            verdict = check_link(kind, *ends)
            if verdict is None:
                continue  # a response link its reply confirms: the reply's own link joins them
            if isinstance(verdict, tuple):
                bad.add(src_line, f"reply link dropped ({verdict[0]}): {verdict[1]}", kind=verdict[0])
                continue
            a, b = find(src), find(dst)
            if a < b:
                parent[b] = a
            elif b < a:
                parent[a] = b
        resolved += len(chunk)
        progress.advance(task, len(chunk))
    progress.update(task, completed=total_links)
    counts.unresolved_links = total_links - resolved  # replies to (or from) tweets missing from the file

    db.execute("CREATE TABLE comp (root INTEGER NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (root, idx)) "
               "WITHOUT ROWID")
    conversations = 0

    def members() -> Iterator[tuple[int, int]]:
        nonlocal conversations
        for i in range(n):
            if excluded[i]:
                continue
            root = find(i)
            if root == i:
                conversations += 1
            if i % 10000 == 9999:
                progress.advance(task, 10000)
            yield root, i

    db.executemany("INSERT INTO comp VALUES (?, ?)", members())
    progress.update(task, completed=total_links + n)
    return conversations


def twcs_documents(db: sqlite3.Connection, counts: Counts) -> Generator[tuple[int, str, dict[str, Any]], None, None]:
    """Pass 2: one ``(line, label, document)`` per conversation, in order of first appearance."""
    cursor = db.execute("""
        SELECT c.root, t.line, t.tweet_id, t.author_id, t.inbound, t.created_at, t.created_ts, t.text,
               t.response_tweet_id, t.in_response_to
        FROM comp c JOIN tweets t ON t.idx = c.idx ORDER BY c.root, c.idx""")
    for _, group in groupby(cursor, key=itemgetter(0)):
        rows = sorted(group, key=lambda r: (r[6], r[2]))  # created_at, then tweet_id
        lines = sorted(r[1] for r in rows)
        shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
        number = str(rows[0][2])
        if len({normalise_author(r[3]) for r in rows if not r[4]}) > 1:
            # Can be genuine (a customer addressing two companies): counted, never split.
            counts.several_companies += 1
        document = {
            "conversation_number": number,
            "tweets": [
                {"tweet_id": r[2], "author_id": r[3], "inbound": bool(r[4]), "created_at": r[5], "text": r[7],
                 "response_tweet_id": r[8], "in_response_to_tweet_id": r[9]}
                for r in rows
            ],
            "status": STATUS_PENDING,
        }
        yield lines[0], f"conversation {number} (line{'s' if len(lines) > 1 else ''} {shown}): ", document


# --- JSON -----------------------------------------------------------------------------------------


def read_json(path: Path) -> list[Any]:
    """The items of a JSON file: a list as is, one object as a list of one. An item the decoder cannot
    hold (nested too deeply, an integer of thousands of digits) is an :class:`UnreadableItem` in its
    place: a bad row, not the end of the import."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json_list_items(text) if text.lstrip().startswith("[") else json_value(text)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text: {e.reason}", hint="Save it as UTF-8.") from e
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON: {e}",
                         hint="Give a JSON list of conversation documents, or one document.") from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if isinstance(data, (dict, UnreadableItem)):
        return [data]
    if isinstance(data, list):
        return data
    raise UsageError(f"{path} must hold a JSON object or a list of objects, not {type(data).__name__}")


def json_documents(items: list[Any], bad: BadRows) -> Generator[tuple[int, str, dict[str, Any]], None, None]:
    """``(index, label, document)`` for every object of the list; anything else is a bad row."""
    for index, item in enumerate(items):
        if isinstance(item, UnreadableItem):
            bad.add(index, item.reason)
            continue
        if not isinstance(item, dict):
            bad.add(index, f"not a JSON object but {type(item).__name__}")
            continue
        number = item.get("conversation_number")
        yield index, (f"conversation {number}: " if isinstance(number, (str, int)) else ""), item


# --- MongoDB --------------------------------------------------------------------------------------


def drop_source(collection: Collection[dict[str, Any]]) -> str:
    """Drop the source collection; say what was dropped."""
    name = collection.full_name
    try:
        if not collection.database.list_collection_names(filter={"name": collection.name}):
            return f"--drop: {name} does not exist, nothing to drop"
        count = collection.estimated_document_count()
        collection.drop()
    except PyMongoError as e:
        raise storage_error(e, f"drop of {name}") from e
    logger.info("dropped %s (%d documents)", name, count)
    return f"dropped {name} ({count} documents)"


def ensure_source_indexes(collection: Collection[dict[str, Any]]) -> None:
    """The source collection's indexes, the batch processor's own (mongo_client.SOURCE_INDEXES).
    The importer needs the unique one on conversation_number (re-imports add nothing): where the
    batch processor only warns, a failure here stops the import with the fix."""
    for keys, options in SOURCE_INDEXES:
        try:
            collection.create_index(keys, **options)
        except OperationFailure as e:
            if not options.get("unique"):
                raise storage_error(e, f"index creation on {collection.full_name}") from e
            reason = (e.details or {}).get("errmsg") or str(e)
            raise StorageError(
                f"cannot create the unique index on {collection.full_name}.conversation_number: {reason}",
                hint="The collection holds repeated conversation numbers (or a non-unique index on it): "
                "rerun with --drop to replace the collection, or remove the duplicates first.",
            ) from e
        except PyMongoError as e:
            raise storage_error(e, f"index creation on {collection.full_name}") from e


def insert_batch(collection: Collection[dict[str, Any]], batch: list[dict[str, Any]], counts: Counts) -> None:
    """Insert ``batch``; conversations already present (duplicate key 11000) are counted, not errors."""
    try:
        result = collection.insert_many(batch, ordered=False)
        counts.added += len(result.inserted_ids)
    except BulkWriteError as e:
        details = e.details or {}
        errors = details.get("writeErrors") or []
        counts.added += int(details.get("nInserted", 0))
        counts.present += sum(1 for error in errors if error.get("code") == 11000)
        others = [error for error in errors if error.get("code") != 11000]
        if others:
            raise StorageError(
                f"MongoDB insert into {collection.full_name} failed: {others[0].get('errmsg')}"
                + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
            ) from e
        if details.get("writeConcernErrors"):
            raise StorageError(f"MongoDB insert into {collection.full_name} failed: "
                               f"{details['writeConcernErrors'][0].get('errmsg')}") from e
    except PyMongoError as e:
        raise storage_error(e, f"insert into {collection.full_name}") from e
    logger.debug("inserted a batch of %d: %d added, %d already present so far", len(batch), counts.added,
                 counts.present)


def _oversized_integer(document: dict[str, Any]) -> str | None:
    """``path: value`` of the first integer BSON cannot hold (8 bytes), in document order; None if none.
    Walked with a stack: a document's depth is the file's to choose."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), document)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*loc, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, int) and not isinstance(value, bool) and not -MAX_ID - 1 <= value <= MAX_ID:
            return f"{field_path(loc)}: {value}"
    return None


def unstorable(document: dict[str, Any]) -> str | None:
    """Why MongoDB cannot store ``document`` (a JSON item is stored as given), or None.

    PyMongo encodes a whole insert batch at once: one such document would fail the batch (and,
    uncaught, the import), so each is checked on its own first."""
    try:
        bson.encode(document)
    except (InvalidDocument, OverflowError, RecursionError, ValueError, TypeError) as e:
        oversized = _oversized_integer(document)
        if oversized is not None:
            return (f"{oversized} is too large for MongoDB (integers of 8 bytes at most: up to {MAX_ID}); "
                    "write it as a string")
        return f"cannot be stored in MongoDB: {type(e).__name__}: {e}"
    return None


def takes_part(tweets: list[Any] | None, company: str) -> bool:
    """True when ``company`` wrote one of the company-side tweets (``inbound`` false, or an agent ``role``)."""
    return any(tweet.speaker == "agent" and normalise_author(tweet.author_id) == company for tweet in tweets or [])


def import_documents(
    candidates: Iterator[tuple[int, str, dict[str, Any]]],
    collection: Collection[dict[str, Any]],
    bad: BadRows,
    counts: Counts,
    *,
    company: str | None,
    limit: int | None,
    check_repeats: bool,
    check_storable: bool = False,
    advance: Callable[[], None],
) -> None:
    """Validate each candidate document, filter, and insert in batches of :data:`INSERT_BATCH`.
    ``check_storable``: documents as the user gave them (JSON), checked one by one with :func:`unstorable`."""
    first_seen: dict[str, int] = {}
    batch: list[dict[str, Any]] = []
    taken = 0
    for position, label, document in candidates:
        advance()
        try:
            conversation = validate_conversation(document)
        except InputError as e:
            bad.add(position, label + e.message)
            continue
        number = conversation.conversation_number
        document.pop("_id", None)
        document["conversation_number"] = number
        if document.get("status") is None:
            document["status"] = STATUS_PENDING
        if check_storable and (problem := unstorable(document)):
            bad.add(position, label + problem)
            continue
        if check_repeats:
            if number in first_seen:
                bad.add(position, f"{label}conversation_number {number!r} repeats {bad.unit} {first_seen[number]}")
                continue
            first_seen[number] = position
        counts.conversations += 1
        if company is not None and not takes_part(conversation.tweets, company):
            counts.other_company += 1
            continue
        batch.append(document)
        taken += 1
        if limit is not None and taken >= limit:
            counts.limit_reached = True
            break
        if len(batch) >= INSERT_BATCH:
            insert_batch(collection, batch, counts)
            batch = []
    if batch:
        insert_batch(collection, batch, counts)


# --- the run --------------------------------------------------------------------------------------


def make_progress(disabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=disabled,
    )


def default_bad_rows_file(path: Path) -> Path:
    return Path(f"{path.name}.bad_rows.tsv")


def report(args: argparse.Namespace, kind: str, collection: str, counts: Counts, bad: BadRows,
           seconds: float) -> list[str]:
    """The summary printed at the end (and the bad-rows file written when they are many)."""
    what = "TWCS CSV" if kind == "csv" else "JSON"
    lines = [f"Imported {args.file} ({what}) into {collection} in {seconds:.1f} s"]
    if kind == "csv":
        lines.append(f"  CSV records read     {counts.records}")
        lines.append(f"  valid tweets         {counts.tweets}")
    else:
        lines.append(f"  documents read       {counts.records}")
    lines.append(f"  conversations        {counts.conversations}"
                 + (f"   (stopped at --limit {args.limit})" if counts.limit_reached else ""))
    if args.company is not None:
        lines.append(f"  without {args.company:<12} {counts.other_company}   (left out by --company)")
    lines.append(f"  added                {counts.added}")
    lines.append(f"  already present      {counts.present}"
                 + ("   (nothing new: all were imported before)" if counts.present and not counts.added else ""))
    if counts.unresolved_links:
        lines.append(f"  links to tweets not in the file  {counts.unresolved_links}   (ignored)")
    if any(bad.links.values()):
        lines.append(f"  reply links dropped  {sum(bad.links.values())}   (the tweets are imported; these links "
                     "join no threads)")
        lines.extend(f"    {count:<5} {kind}" for kind, count in bad.links.items() if count)
    if counts.several_companies:
        lines.append(f"  answered by several companies  {counts.several_companies}   (kept whole: can be genuine)")
    lines.append(f"  bad rows             {bad.count}" + ("   (skipped, not imported)" if bad.count else ""))
    for position, reason in bad.first(PRINTED_BAD_ROWS):
        lines.append(f"    {bad.unit} {position}: {reason}")
    if bad.entries > PRINTED_BAD_ROWS:
        target = args.bad_rows_file or default_bad_rows_file(args.file)
        more = bad.entries - PRINTED_BAD_ROWS
        try:
            bad.export(target)
            lines.append(f"    ... and {more} more; all {bad.entries} written to {target}")
        except OSError as e:
            lines.append(f"    ... and {more} more; could not write them to {target}: {e.strerror or e}")
    return lines


def run(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    kind = detect_format(args.file)
    # Problems with the file itself show before anything is connected, dropped or displayed.
    items = read_json(args.file) if kind == "json" else []
    if kind == "csv":
        check_twcs_header(args.file)
    counts = Counts()
    with sync_database(settings) as database, work_database(args.temp_dir) as db:
        collection = database[settings.mongodb_source_collection]
        bad = BadRows(db, "line" if kind == "csv" else "item")
        with make_progress(args.no_progress) as progress:
            candidates: Generator[tuple[int, str, dict[str, Any]], None, None]
            if kind == "csv":
                read_twcs(args.file, db, bad, counts, progress)
                logger.info("read %d CSV records: %d valid tweets, %d bad rows (%.1f s)",
                            counts.records, counts.tweets, bad.count, time.monotonic() - started)
                total = link_conversations(db, bad, counts, progress)
                logger.info("%d conversations, %d links to tweets not in the file (%.1f s)",
                            total, counts.unresolved_links, time.monotonic() - started)
                candidates = twcs_documents(db, counts)
            else:
                counts.records = total = len(items)
                candidates = json_documents(items, bad)
            if args.drop:
                print(drop_source(collection), flush=True)
            ensure_source_indexes(collection)
            task = progress.add_task("importing", total=total)
            try:
                import_documents(
                    candidates, collection, bad, counts, company=args.company, limit=args.limit,
                    check_repeats=kind == "json", check_storable=kind == "json",
                    advance=lambda: progress.advance(task),
                )
            except StorageError as e:
                e.hint = e.hint or (f"{counts.added} conversation(s) were added before it stopped; rerun the same "
                                    "command to continue (conversations already imported are skipped).")
                raise
            finally:
                candidates.close()  # releases the SQLite cursor when --limit stopped early
            progress.update(task, completed=total)
        logger.info("imported: %d added, %d already present, %d bad rows (%.1f s)",
                    counts.added, counts.present, bad.count, time.monotonic() - started)
        lines = report(args, kind, collection.full_name, counts, bad, time.monotonic() - started)
    print("\n".join(lines), flush=True)
    return EXIT_BAD_ROWS if bad.entries else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, import, and turn the outcome into an exit code."""
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: _run_from_args(args),
        interrupted="interrupted; rerun the same command to continue (conversations already imported are skipped)",
    )


def _run_from_args(args: argparse.Namespace) -> int:
    settings = load_settings()
    # Quiet by default (the summary says it all); --verbose logs each step at LOG_LEVEL (default INFO).
    configure_logging(settings.log_level if args.verbose else "WARNING")
    try:
        return run(args, settings)
    except (sqlite3.Error, OSError) as e:
        return fail(UsageError(
            f"the temporary database failed: {e}",
            hint="It needs free disk space of about 1.2x the CSV; choose another folder with --temp-dir.",
        ), EXIT_FAILURE)


if __name__ == "__main__":
    raise SystemExit(main())
