"""scripts/import_data.py against a real SecantusDB server (MongoDB wire protocol).

The TWCS-format CSV is written here (csv module, quoting); no TWCS text is shipped. Most
runs go through the script's ``main()`` in-process; one runs it as ``python
scripts/import_data.py`` in a subprocess to prove its sys.path handling.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cli
from config import Settings, env_name
from fakes.ollama import FakeOllama
from tests.net_helpers import free_port
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_data.py"
SAMPLES_FILE = ROOT / "data" / "sample_conversations.json"
SAMPLES = json.loads(SAMPLES_FILE.read_text(encoding="utf-8"))
SOURCE = "conversation_set"
RESULTS = "sentimental_analysis"
HEADER = ["tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id", "in_response_to_tweet_id"]


import_data = load_script("import_data")

# --- the test CSV -----------------------------------------------------------------------------

# Quoted texts spanning lines, with commas, quotes, a CRLF and (below) a lone CR: all kept as written;
# only '\n' ends a physical line.
MULTILINE = '@cust_a Also, check the cable.\nIf the light says "link down", DM us.\r\nThanks, ^JD'
REFUND = "@cust_b Refund was issued today,\rsorry for the wait."

# File order is deliberately not chronological. The comment gives the physical line each record starts on.
ROWS: list[list[str]] = [
    ["103", "cust_a", "True", "Tue Oct 31 22:20:00 +0000 2017", "@AcmeCare restarted, still dropping", "", "101"],  # 2
    ["101", "AcmeCare", "False", "Tue Oct 31 22:05:00 +0000 2017",
     "@cust_a Sorry to hear that! Have you restarted it?", "103.0", "105.0"],  # 3
    # 22:06 UTC written with a +0100 offset: it sorts between 22:05 and 22:20, not after them.
    ["102", "AcmeCare", "False", "Tue Oct 31 23:06:00 +0100 2017", MULTILINE, "", "105"],  # 4-6
    ["abc", "cust_x", "True", "Tue Oct 31 22:00:00 +0000 2017", "bad id", "", ""],  # 7
    # The earliest tweet of the thread has the largest id: the conversation is numbered 105.
    ["105", "cust_a", "True", "Tue Oct 31 22:00:00 +0000 2017", "@AcmeCare my router keeps dropping, help",
     "101,102", ""],  # 8
    # A reply to tweet 150, which is not in the file.
    ["201.0", "cust_b", "True", "Wed Nov 01 09:00:00 +0000 2017", "@AcmeCare any update on my refund?", "202",
     "150"],  # 9
    ["500", "cust_y", "maybe", "Wed Nov 01 10:00:00 +0000 2017", "bad inbound", "", ""],  # 10
    ["202", "AcmeCare", "False", "Wed Nov 01 09:30:00 +0000 2017", REFUND, "", "201.0"],  # 11
    ["300", "cust_c", "True", "Thu Nov 02 10:00:00 +0000 2017", "@OtherCo love the new app", "", ""],  # 12
    ["600", "cust_z", "True", "yesterday", "bad date", "", ""],  # 13
    ["400", "cust_d", "True", "Fri Nov 03 08:00:00 +0000 2017", "@OtherCo my bill is wrong", "401", ""],  # 14
    ["700", "cust_w"],  # 15: missing columns
    ["401", "OtherCo", "False", "Fri Nov 03 08:10:00 +0000 2017", "@cust_d Fixed it, sorry!", "", "400"],  # 16
    ["300", "cust_c", "True", "Thu Nov 02 11:00:00 +0000 2017", "@OtherCo again", "", ""],  # 17: duplicate id
    ["800", "cust_v", "True", "Sat Nov 04 08:00:00 +0000 2017", "   ", "", ""],  # 18: nothing to classify
]

EXPECTED_BAD = [
    "    line 7: tweet_id 'abc' is not a tweet id",
    "    line 10: inbound 'maybe' is not True or False",
    "    line 13: created_at 'yesterday' is not a date like 'Tue Oct 31 22:10:47 +0000 2017'",
    "    line 15: expected 7 fields, found 2 (missing columns or bad quoting?)",
    "    line 17: duplicate tweet_id 300 (first on line 12)",
    "    line 18: conversation 800 (line 18): Invalid conversation: every turn of the conversation has empty text",
]


def tweet(tweet_id: int, author: str, inbound: bool, created_at: str, text: str, responses: str | None,
          parent: int | None) -> dict[str, Any]:
    return {"tweet_id": tweet_id, "author_id": author, "inbound": inbound, "created_at": created_at, "text": text,
            "response_tweet_id": responses, "in_response_to_tweet_id": parent}


EXPECTED_DOCUMENTS = [
    {"conversation_number": "105", "status": "pending", "tweets": [
        tweet(105, "cust_a", True, "Tue Oct 31 22:00:00 +0000 2017", "@AcmeCare my router keeps dropping, help",
              "101,102", None),
        tweet(101, "AcmeCare", False, "Tue Oct 31 22:05:00 +0000 2017",
              "@cust_a Sorry to hear that! Have you restarted it?", "103", 105),
        tweet(102, "AcmeCare", False, "Tue Oct 31 23:06:00 +0100 2017", MULTILINE, None, 105),
        tweet(103, "cust_a", True, "Tue Oct 31 22:20:00 +0000 2017", "@AcmeCare restarted, still dropping", None,
              101),
    ]},
    {"conversation_number": "201", "status": "pending", "tweets": [
        tweet(201, "cust_b", True, "Wed Nov 01 09:00:00 +0000 2017", "@AcmeCare any update on my refund?", "202", 150),
        tweet(202, "AcmeCare", False, "Wed Nov 01 09:30:00 +0000 2017", REFUND, None, 201),
    ]},
    {"conversation_number": "300", "status": "pending", "tweets": [
        tweet(300, "cust_c", True, "Thu Nov 02 10:00:00 +0000 2017", "@OtherCo love the new app", None, None),
    ]},
    {"conversation_number": "400", "status": "pending", "tweets": [
        tweet(400, "cust_d", True, "Fri Nov 03 08:00:00 +0000 2017", "@OtherCo my bill is wrong", "401", None),
        tweet(401, "OtherCo", False, "Fri Nov 03 08:10:00 +0000 2017", "@cust_d Fixed it, sorry!", None, 400),
    ]},
]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # TWCS ends lines with \n; quotes only where needed
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


@pytest.fixture
def twcs_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "twcs_sample.csv", ROWS)


# --- environment and helpers ------------------------------------------------------------------


@pytest.fixture
def import_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mongo_uri: str, mongo_db_name: str) -> dict[str, str]:
    """This test's database, nothing else from the machine: no Settings variable, no .env (cwd is tmp_path)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    env = {"MONGODB_CONNECTION_STRING": mongo_uri, "MONGODB_DATABASE_NAME": mongo_db_name,
           "MONGODB_TIMEOUT_MS": "5000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return env


def run_import(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = import_data.main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stored(db: Any, **query: Any) -> list[dict[str, Any]]:
    """Source documents in insertion order, without _id."""
    return list(db[SOURCE].find(query, {"_id": 0}).sort("_id", 1))


def numbers(db: Any) -> list[str]:
    return [doc["conversation_number"] for doc in stored(db)]


def summary_value(out: str, label: str) -> str:
    [line] = [line for line in out.splitlines() if line.startswith(f"  {label} ")]
    return line[len(label) + 2:].split()[0]


# --- TWCS CSV -----------------------------------------------------------------------------------


def test_csv_is_grouped_into_conversations_with_bad_rows_by_physical_line(import_env, twcs_csv, mongo_db, capsys):
    code, out, err = run_import(capsys, str(twcs_csv))

    assert code == import_data.EXIT_BAD_ROWS
    assert stored(mongo_db) == EXPECTED_DOCUMENTS
    # The line numbers are physical lines of the file (the quoted text spans lines 4-6).
    physical = twcs_csv.read_bytes().decode("utf-8").split("\n")
    assert physical[6].startswith("abc,") and physical[9].startswith("500,") and physical[12].startswith("600,")
    assert physical[14] == "700,cust_w" and physical[16].startswith("300,") and physical[17].startswith("800,")
    lines = out.splitlines()
    assert lines[lines.index("  bad rows             6   (skipped, not imported)") + 1:] == EXPECTED_BAD
    assert summary_value(out, "CSV records read") == "15"
    assert summary_value(out, "valid tweets") == "11"
    assert summary_value(out, "conversations") == "4"
    assert summary_value(out, "added") == "4"
    assert summary_value(out, "already present") == "0"
    assert "links to tweets not in the file  1   (ignored)" in out
    assert "Traceback" not in err
    assert not list(Path.cwd().glob("*.bad_rows.tsv"))  # 20 or fewer: printed only

    # The index that makes re-imports idempotent, and documents the processor accepts.
    unique = [v for v in mongo_db[SOURCE].index_information().values() if v["key"] == [("conversation_number", 1)]]
    assert unique and unique[0].get("unique") is True
    assert mongo_db.list_collection_names() == [SOURCE]


def test_second_import_adds_nothing_and_says_so(import_env, twcs_csv, mongo_db, capsys):
    assert run_import(capsys, str(twcs_csv), "--no-progress")[0] == import_data.EXIT_BAD_ROWS
    first = list(mongo_db[SOURCE].find().sort("_id", 1))

    code, out, _ = run_import(capsys, str(twcs_csv), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS
    assert list(mongo_db[SOURCE].find().sort("_id", 1)) == first
    assert summary_value(out, "added") == "0"
    assert "already present      4   (nothing new: all were imported before)" in out


def test_company_keeps_conversations_the_company_takes_part_in(import_env, twcs_csv, mongo_db, capsys):
    code, out, _ = run_import(capsys, str(twcs_csv), "--company", "@ACMEcare", "--no-progress")
    assert code == import_data.EXIT_BAD_ROWS
    assert stored(mongo_db) == EXPECTED_DOCUMENTS[:2]
    assert "without acmecare     2   (left out by --company)" in out

    # Conversation 300 mentions @OtherCo, but OtherCo never answered it: only 400 is OtherCo's.
    code, out, _ = run_import(capsys, str(twcs_csv), "--company", "otherco", "--no-progress")
    assert numbers(mongo_db) == ["105", "201", "400"]
    assert summary_value(out, "added") == "1"


def test_limit_imports_the_first_conversations_and_a_rerun_completes(import_env, twcs_csv, mongo_db, capsys):
    code, out, _ = run_import(capsys, str(twcs_csv), "--limit", "2", "--no-progress")
    assert code == import_data.EXIT_BAD_ROWS
    assert stored(mongo_db) == EXPECTED_DOCUMENTS[:2]
    assert "conversations        2   (stopped at --limit 2)" in out

    code, out, _ = run_import(capsys, str(twcs_csv), "--no-progress")
    assert stored(mongo_db) == EXPECTED_DOCUMENTS
    assert (summary_value(out, "added"), summary_value(out, "already present")) == ("2", "2")


def test_drop_replaces_the_source_collection_and_leaves_results_alone(import_env, twcs_csv, mongo_db, capsys):
    mongo_db[SOURCE].insert_many([{"conversation_number": "stale-1", "tweets": [], "status": "processed"},
                                  {"conversation_number": "105", "tweets": [], "status": "processed"}])
    mongo_db[RESULTS].insert_one({"conversation_number": "stale-1", "classification": {"intent": "Other"}})

    code, out, _ = run_import(capsys, str(twcs_csv), "--drop", "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS
    assert f"dropped {mongo_db.name}.{SOURCE} (2 documents)" in out
    assert stored(mongo_db) == EXPECTED_DOCUMENTS
    assert mongo_db[RESULTS].count_documents({}) == 1


def test_drop_of_a_missing_collection_says_nothing_was_dropped(import_env, mongo_db, capsys):
    code, out, _ = run_import(capsys, str(SAMPLES_FILE), "--drop", "--no-progress")
    assert code == import_data.EXIT_OK
    assert f"--drop: {mongo_db.name}.{SOURCE} does not exist, nothing to drop" in out
    assert mongo_db[SOURCE].count_documents({}) == len(SAMPLES)


def test_many_bad_rows_print_twenty_and_go_to_a_file(import_env, tmp_path, mongo_db, capsys):
    rows = [["1", "cust", "True", "Tue Oct 31 22:00:00 +0000 2017", "@AcmeCare hello", "", ""]]
    rows += [[f"x{i}", "cust", "True", "Tue Oct 31 22:00:00 +0000 2017", "bad", "", ""] for i in range(25)]
    path = write_csv(tmp_path / "broken.csv", rows)

    code, out, _ = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS
    assert numbers(mongo_db) == ["1"]
    printed = [line for line in out.splitlines() if line.startswith("    line ")]
    assert printed == [f"    line {3 + i}: tweet_id 'x{i}' is not a tweet id" for i in range(20)]
    target = tmp_path / "broken.csv.bad_rows.tsv"
    assert f"... and 5 more; all 25 written to {target.name}" in out
    written = target.read_text(encoding="utf-8").splitlines()
    assert written[0] == "line\tkind\treason"
    assert written[1:] == [f"{3 + i}\tbad row\ttweet_id 'x{i}' is not a tweet id" for i in range(25)]


def test_csv_without_the_twcs_columns_is_a_usage_error(import_env, tmp_path, mongo_db, capsys):
    path = write_csv(tmp_path / "other.csv", [["1", "hello"]], header=["tweet_id", "text"])
    code, out, err = run_import(capsys, str(path))
    assert code == import_data.EXIT_USAGE
    assert err == (f"error: {path} is not a TWCS CSV: missing column(s) author_id, inbound, created_at, "
                   "response_tweet_id, in_response_to_tweet_id\n  The header must name: tweet_id,author_id,inbound,"
                   "created_at,text,response_tweet_id,in_response_to_tweet_id.\n")
    assert "Traceback" not in err
    assert SOURCE not in mongo_db.list_collection_names()


# --- JSON ------------------------------------------------------------------------------------------


def test_sample_json_is_imported_as_given(import_env, mongo_db, capsys):
    code, out, _ = run_import(capsys, str(SAMPLES_FILE))

    assert code == import_data.EXIT_OK
    assert stored(mongo_db) == SAMPLES  # `expected` and the link fields kept, status pending
    assert summary_value(out, "documents read") == "32"
    assert summary_value(out, "added") == "32"
    assert summary_value(out, "bad rows") == "0"


def test_single_json_object_with_messages(import_env, tmp_path, mongo_db, capsys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"_id": {"$oid": "0123456789abcdef01234567"}, "conversation_number": 77,
                                "messages": [{"sender": "Customer", "text": "Refund please"}]}), encoding="utf-8")

    code, _, _ = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_OK
    assert stored(mongo_db) == [{"conversation_number": "77", "status": "pending",
                                 "messages": [{"sender": "Customer", "text": "Refund please"}]}]


def test_invalid_json_documents_are_reported_by_index(import_env, tmp_path, mongo_db, capsys):
    valid = SAMPLES[0]
    path = tmp_path / "mixed.txt"  # no .json extension: recognised by its content
    path.write_text(json.dumps([
        valid,
        {"conversation_number": "x1", "tweets": []},
        "not a conversation",
        {**valid, "status": "processed"},
        {"conversation_number": "x2", "tweets": [{"tweet_id": 1, "author_id": "a", "inbound": "maybe",
                                                  "created_at": "Tue Oct 31 22:00:00 +0000 2017", "text": "hi"}]},
    ]), encoding="utf-8")

    code, out, _ = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS
    assert stored(mongo_db) == [valid]
    assert [line for line in out.splitlines() if line.startswith("    item ")] == [
        "    item 1: conversation x1: Invalid conversation: the conversation has no turns: "
        "'messages'/'tweets' is empty",
        "    item 2: not a JSON object but str",
        "    item 3: conversation 1001: conversation_number '1001' repeats item 0",
        "    item 4: conversation x2: Invalid conversation: tweets[0].inbound: Input should be a valid boolean, "
        "unable to interpret input",
    ]


def test_json_that_does_not_parse_is_a_usage_error(import_env, tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[{"conversation_number": "1",', encoding="utf-8")
    code, _, err = run_import(capsys, str(path))
    assert code == import_data.EXIT_USAGE
    assert err.startswith(f"error: {path} is not valid JSON: Expecting property name enclosed in double quotes: "
                          "line 1 column 30 (char 29)\n  Give a JSON list")
    assert len(err.splitlines()) == 2


# --- errors ----------------------------------------------------------------------------------------


def test_missing_file_is_a_usage_error(import_env, tmp_path, capsys):
    code, out, err = run_import(capsys, str(tmp_path / "nope.csv"))
    assert code == import_data.EXIT_USAGE == 2
    assert err == (f"error: input file not found: {tmp_path / 'nope.csv'}\n"
                   "  Give the path of a TWCS CSV (twcs.csv) or of a JSON file of conversations.\n")
    assert out == ""


def test_unknown_format_is_a_usage_error(import_env, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello\nworld\n", encoding="utf-8")
    code, _, err = run_import(capsys, str(path))
    assert code == import_data.EXIT_USAGE
    assert err.startswith(f"error: cannot tell the format of {path}\n  Expected a TWCS CSV")


def test_invalid_setting_is_a_config_error(import_env, monkeypatch, capsys):
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "soon")
    code, _, err = run_import(capsys, str(SAMPLES_FILE))
    assert code == import_data.EXIT_CONFIG == 3
    assert err.startswith("error: Invalid configuration: MONGODB_TIMEOUT_MS='soon'")


def test_unreachable_mongodb_exits_4_with_the_password_redacted(import_env, monkeypatch, twcs_csv, capsys):
    uri = f"mongodb://user:pass-3mWk@127.0.0.1:{free_port()}/"  # made-up credentials
    monkeypatch.setenv("MONGODB_CONNECTION_STRING", uri)
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "500")

    code, out, err = run_import(capsys, str(twcs_csv))

    assert code == import_data.EXIT_UNAVAILABLE == 4
    assert err.startswith(f"error: Cannot reach MongoDB at {uri.replace('pass-3mWk', '***')}")
    assert "3mWk" not in err
    assert err.splitlines()[1].startswith("  Start MongoDB, or set MONGODB_CONNECTION_STRING")
    assert len(err.splitlines()) == 2
    assert "3mWk" not in out + err
    assert "Traceback" not in err


# --- end to end ------------------------------------------------------------------------------------


def test_imported_samples_are_all_classified_by_the_batch_processor(
    import_env, monkeypatch, tmp_path, mongo_db, fake_ollama: FakeOllama, capsys
):
    assert run_import(capsys, str(SAMPLES_FILE), "--no-progress")[0] == import_data.EXIT_OK
    for key, value in {"LLM_ENDPOINT": fake_ollama.url, "OLLAMA_TIMEOUT": "10",
                       "BATCH_FILES_DIR": str(tmp_path / "batch_files"), "BATCH_MONITORING_MODE": "production",
                       "OLLAMA_RETRY_BASE_SECONDS": "0.01", "MONGODB_RETRY_BASE_SECONDS": "0.01"}.items():
        monkeypatch.setenv(key, value)

    assert cli.main([]) == cli.EXIT_OK

    assert fake_ollama.chat_count == len(SAMPLES)
    assert {doc["status"] for doc in mongo_db[SOURCE].find()} == {"processed"}
    results = {doc["conversation_number"] for doc in mongo_db[RESULTS].find()}
    assert results == {sample["conversation_number"] for sample in SAMPLES}
    assert mongo_db[RESULTS].count_documents({}) == len(SAMPLES)


def test_script_runs_as_a_subprocess_from_another_folder(mongo_uri, mongo_db, mongo_db_name, tmp_path, twcs_csv):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MONGODB_CONNECTION_STRING": mongo_uri,
           "MONGODB_DATABASE_NAME": mongo_db_name, "MONGODB_TIMEOUT_MS": "5000"}

    result = subprocess.run(
        [sys.executable, str(SCRIPT), twcs_csv.name, "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == import_data.EXIT_BAD_ROWS, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Imported {twcs_csv.name} (TWCS CSV) into {mongo_db_name}.{SOURCE} in ")
    assert stored(mongo_db) == EXPECTED_DOCUMENTS


def test_json_export_with_spelled_out_speakers_is_imported(import_env, tmp_path, mongo_db, capsys):
    # An export that names the speaker in `role` (the seed data's spelling), once without `inbound`,
    # and once with a role of its own vocabulary that `inbound` overrides.
    def export_tweet(tweet_id: int, author: str, role: str, **extra: Any) -> dict[str, Any]:
        return {"tweet_id": tweet_id, "author_id": author, "role": role,
                "created_at": "Tue Oct 31 22:00:00 +0000 2017", "text": f"text {tweet_id}", **extra}

    documents = [
        {"conversation_number": "e1", "tweets": [export_tweet(1, "cust", "Customer"),
                                                 export_tweet(2, "AcmeCare", "Service Provider")]},
        {"conversation_number": "e2", "tweets": [export_tweet(3, "cust", "Moderator", inbound=True),
                                                 export_tweet(4, "AcmeCare", "Moderator", inbound=False)]},
        {"conversation_number": "e3", "tweets": [export_tweet(5, "cust", "customer"),
                                                 export_tweet(6, "OtherCo", "Staff")]},
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(documents), encoding="utf-8")

    code, out, _ = run_import(capsys, str(path), "--company", "acmecare", "--no-progress")

    assert code == import_data.EXIT_OK, out
    assert numbers(mongo_db) == ["e1", "e2"]
    assert summary_value(out, "bad rows") == "0"
    assert "without acmecare     1   (left out by --company)" in out


# --- damaged exports: spreadsheet-mangled reply links (issue 8, item 6) -----------------------------


def spreadsheet_number(value: str, indian: bool) -> str:
    """How a spreadsheet displays (and then saves) an id it took for a number: digit grouping."""
    if not value:
        return value
    if not indian:
        return f"{int(value):,}"
    head, tail = value[:-3], value[-3:]
    groups = []
    while len(head) > 2:
        head, groups = head[:-2], [head[-2:], *groups]
    return ",".join([g for g in [head, *groups] if g] + [tail])


def test_spreadsheet_mangled_links_do_not_join_threads(import_env, tmp_path, mongo_db, capsys):
    at = "Tue Oct 31 {}:00 +0000 2017".format
    clean = [
        # Short threads whose small ids a mangled id splits into.
        ["1", "cust_1", "True", at("10:00"), "@AcmeCare my router is down", "2", ""],
        ["2", "AcmeCare", "False", at("10:05"), "@cust_1 DM us", "", "1"],
        ["55", "cust_2", "True", at("11:00"), "@OtherCo app crashes", "56", ""],
        ["56", "OtherCo", "False", at("11:05"), "@cust_2 update it", "", "55"],
        ["157", "cust_3", "True", at("12:00"), "@ThirdCo bill wrong", "158", ""],
        ["158", "ThirdCo", "False", at("12:05"), "@cust_3 refunded", "", "157"],
        # 155157 answers 155200: its parent's response_tweet_id becomes "1,55,157" in the saved file.
        ["155200", "cust_4", "True", at("13:00"), "@BigCo where is my parcel", "155157", ""],
        ["155157", "BigCo", "False", at("13:05"), "@cust_4 checking", "", "155200"],
        # Western grouping: "600,001" names 600 (not in the file) and 1 (in the file, no reply to 600000).
        ["600000", "cust_5", "True", at("14:00"), "@AcmeCare still waiting", "600001", ""],
        ["600001", "AcmeCare", "False", at("14:05"), "@cust_5 sorry", "", "600000"],
        # A "reply" dated before the tweet it answers: a link that cannot be right.
        ["300", "cust_6", "True", at("15:00"), "@AcmeCare thanks", "", ""],
        ["301", "cust_7", "True", at("09:00"), "@AcmeCare me too", "", "300"],
        # Answered by two companies: genuine, kept whole and counted.
        ["500", "cust_8", "True", at("16:00"), "@AcmeCare @OtherCo who broke my line?", "501,502", ""],
        ["501", "AcmeCare", "False", at("16:05"), "@cust_8 not us", "", "500"],
        ["502", "OtherCo", "False", at("16:06"), "@cust_8 checking", "", "500"],
    ]
    rows = []
    for row in clean:
        mangled = list(row)
        indian = row[0] == "155200"
        mangled[5] = ",".join(spreadsheet_number(part, indian) for part in row[5].split(",")) if row[5] else ""
        rows.append(mangled)
    assert [r[5] for r in rows if r[0] in ("155200", "600000")] == ["1,55,157", "600,001"]
    path = write_csv(tmp_path / "twcs_saved_by_a_spreadsheet.csv", rows)

    code, out, _ = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS, out
    threads = {doc["conversation_number"]: sorted(t["tweet_id"] for t in doc["tweets"]) for doc in stored(mongo_db)}
    assert threads == {
        "1": [1, 2], "55": [55, 56], "157": [157, 158], "155200": [155157, 155200], "600000": [600000, 600001],
        "300": [300], "301": [301], "500": [500, 501, 502],
    }
    assert summary_value(out, "bad rows") == "0"
    assert summary_value(out, "reply links dropped") == "5"
    assert "    4     response_tweet_id not confirmed by the reply" in out.splitlines()
    assert "    1     reply dated before its parent" in out.splitlines()
    assert summary_value(out, "answered by several companies") == "1"
    listed = [line.strip() for line in out.splitlines() if line.startswith("    line ")]
    assert listed == [
        "line 8: reply link dropped (response_tweet_id not confirmed by the reply): response_tweet_id names "
        "tweet 1 (line 2), which replies to nothing, not to 155200",
        "line 8: reply link dropped (response_tweet_id not confirmed by the reply): response_tweet_id names "
        "tweet 55 (line 4), which replies to nothing, not to 155200",
        "line 8: reply link dropped (response_tweet_id not confirmed by the reply): response_tweet_id names "
        "tweet 157 (line 6), which replies to nothing, not to 155200",
        "line 10: reply link dropped (response_tweet_id not confirmed by the reply): response_tweet_id names "
        "tweet 1 (line 2), which replies to nothing, not to 600000",
        "line 13: reply link dropped (reply dated before its parent): tweet 301 replies to tweet 300 (line 12) "
        "but is dated before it",
    ]


def test_lone_company_reply_is_a_bad_row_saying_no_customer_turn(import_env, tmp_path, mongo_db, capsys):
    # The customer's tweet is not in the file: the company's reply alone has nothing to classify.
    rows = [["10", "cust", "True", "Tue Oct 31 10:00:00 +0000 2017", "@AcmeCare help", "11", ""],
            ["11", "AcmeCare", "False", "Tue Oct 31 10:05:00 +0000 2017", "@cust DM us", "", "10"],
            ["21", "AcmeCare", "False", "Tue Oct 31 11:05:00 +0000 2017", "@other fixed now", "", "20"]]
    path = write_csv(tmp_path / "lone_reply.csv", rows)

    code, out, _ = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS
    assert numbers(mongo_db) == ["10"]
    [listed] = [line for line in out.splitlines() if line.startswith("    line ")]
    assert listed.startswith("    line 4: conversation 21 (line 4): Invalid conversation: the conversation has no "
                             "customer turn")


# --- items the JSON decoder or MongoDB cannot hold: bad rows, never the whole import -----------------

#: Arrays inside each other beyond the decoder's recursion limit.
DEEP = "[" * 100_000 + "]" * 100_000


def _json_list(*items: str) -> str:
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where", ["tweet_id", "extra field"])
def test_a_24_digit_integer_is_a_bad_row_and_the_others_are_imported(import_env, tmp_path, mongo_db, capsys, where):
    big = SAMPLES[1] | {"conversation_number": "big"}
    if where == "tweet_id":
        big["tweets"] = [big["tweets"][0] | {"tweet_id": 123456789012345678901234}, *big["tweets"][1:]]
    else:
        big["score"] = {"raw": [1, 123456789012345678901234]}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([SAMPLES[0], big, SAMPLES[2]]), encoding="utf-8")

    code, out, err = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS, err
    assert numbers(mongo_db) == [SAMPLES[0]["conversation_number"], SAMPLES[2]["conversation_number"]]
    [line] = [line for line in out.splitlines() if line.startswith("    item ")]
    path_shown = "tweets[0].tweet_id" if where == "tweet_id" else "score.raw[1]"
    assert line == (f"    item 1: conversation big: {path_shown}: 123456789012345678901234 is too large for MongoDB "
                    "(integers of 8 bytes at most: up to 9223372036854775807); write it as a string")
    assert summary_value(out, "bad rows") == "1"


def test_a_deeply_nested_item_is_a_bad_row_and_the_others_are_imported(import_env, tmp_path, mongo_db, capsys):
    path = tmp_path / "deep.json"
    path.write_text(_json_list(json.dumps(SAMPLES[0]), '{"conversation_number": "deep", "x": ' + DEEP + "}",
                               json.dumps(SAMPLES[2]), "9" * 5000), encoding="utf-8")

    code, out, err = run_import(capsys, str(path), "--no-progress")

    assert code == import_data.EXIT_BAD_ROWS, err
    assert "Traceback" not in err
    assert numbers(mongo_db) == [SAMPLES[0]["conversation_number"], SAMPLES[2]["conversation_number"]]
    lines = [line for line in out.splitlines() if line.startswith("    item ")]
    assert lines[0].startswith("    item 1: nested too deeply to read")
    assert lines[1].startswith("    item 3: cannot be read: Exceeds the limit (4300 digits)")
    assert summary_value(out, "documents read") == "4"


def test_one_document_nested_too_deeply_is_a_bad_row(import_env, tmp_path, mongo_db, capsys):
    path = tmp_path / "one.json"
    path.write_text('{"conversation_number": "deep", "x": ' + DEEP + "}", encoding="utf-8")
    code, out, err = run_import(capsys, str(path), "--no-progress")
    assert code == import_data.EXIT_BAD_ROWS, err
    assert "    item 0: nested too deeply to read" in out
    assert numbers(mongo_db) == []
