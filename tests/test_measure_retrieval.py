"""scripts/measure_retrieval's pure parts (the run itself needs the real model: docs/quality.md)."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.measure_retrieval import END, START, markdown, split


def test_the_labelled_set_is_split_by_position(tmp_path: Path) -> None:
    source = tmp_path / "set.json"
    source.write_text(json.dumps([{"conversation_number": str(i)} for i in range(7)]))
    pool, scored = split(source, tmp_path)
    assert [i["conversation_number"] for i in json.loads(pool.read_text())] == ["0", "2", "4", "6"]
    assert [i["conversation_number"] for i in json.loads(scored.read_text())] == ["1", "3", "5"]


def test_the_table_has_a_row_per_configuration() -> None:
    row = {"fields": {"intent": {"accuracy": 0.5, "macro_f1": 0.25}}, "prompt_tokens_per_item": 812.5,
           "seconds_per_item": 3.14159, "errors": 1}
    text = markdown({"rows": [{"name": "static", **row}, {"name": "reviewed-bm25", **row}], "scored": 12,
                     "pool": 49, "k": 2, "command": "python -m scripts.measure_retrieval --k 2", "when": "now",
                     "machine": "x86_64"})
    assert text.startswith(START) and text.endswith(END)
    assert "| static | 50.0% / 0.250 | 812.5 | 3.14 | 1 |" in text
    assert "| reviewed-bm25 |" in text and "12 scored conversations" in text
