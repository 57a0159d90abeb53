"""Unit tests of utils/atomic_files.py: whole-or-nothing writes, Extended JSON round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId

from error_handler import BatchFileError
from utils.atomic_files import atomic_write_json, read_json

# BSON dates (and so Extended JSON) keep milliseconds: test values are millisecond-precise.
PROCESSED_AT = datetime(2025, 9, 24, 10, 30, 0, 123000, tzinfo=UTC)


def _temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- atomic_write_json / read_json ------------------------------------------------------------


def test_atomic_write_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    data = {"a": 1, "b": [1, 2, {"c": "é"}], "d": None}
    atomic_write_json(path, data)
    assert read_json(path) == data
    assert json.loads(path.read_text(encoding="utf-8")) == data  # plain JSON for plain data
    atomic_write_json(path, {"replaced": True})
    assert read_json(path) == {"replaced": True}
    assert _temp_files(tmp_path) == []


def test_atomic_write_of_unserializable_data_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    atomic_write_json(path, {"version": 1})
    before = path.read_bytes()
    with pytest.raises(BatchFileError) as raised:
        atomic_write_json(path, {"version": 2, "bad": object()})
    assert str(path) in raised.value.message
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_atomic_write_that_cannot_replace_the_target_cleans_up(tmp_path: Path) -> None:
    # The target is a non-empty directory: the temporary file is written, os.replace fails.
    # (Works as root too, unlike a read-only folder.)
    target = tmp_path / "batch_001_pending.json"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(BatchFileError) as raised:
        atomic_write_json(target, {"new": True})
    assert raised.value.hint
    assert (target / "keep.txt").read_text() == "old"
    assert _temp_files(tmp_path) == []



def test_objectid_and_datetime_round_trip_as_extended_json(tmp_path: Path) -> None:
    path = tmp_path / "ext.json"
    oid = ObjectId()
    data = {"_id": oid, "nested": {"when": PROCESSED_AT, "ids": [oid]}}
    atomic_write_json(path, data)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["_id"] == {"$oid": str(oid)}
    assert "$date" in raw["nested"]["when"]
    loaded = read_json(path)
    assert loaded == data
    assert isinstance(loaded["_id"], ObjectId)
    assert loaded["nested"]["when"].tzinfo is not None


def test_read_json_of_a_missing_file_is_a_batch_file_error(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError) as raised:
        read_json(tmp_path / "nope.json")
    assert "nope.json" in raised.value.message
