"""utils/json_items.py: a JSON list read item by item (pure functions)."""

from __future__ import annotations

import json

import pytest

from utils.json_items import UnreadableItem, json_list_items, json_value

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_list_without_trouble_is_read_as_json_loads_reads_it() -> None:
    text = json.dumps([1, "two", {"three": [3]}, None, [], {}])
    assert json_list_items(f" \n{text}\n ") == json.loads(text)
    assert json_list_items("[]") == json_list_items(" [ ] ") == []


def test_items_the_decoder_cannot_hold_are_unreadable_in_their_place() -> None:
    # Brackets and quotes inside strings do not count; an escaped quote does not end a string.
    text = '[1, {"a": "x]}\\"[{"}, ' + DEEP + ', "s", ' + "9" * 5000 + ', {"b": ' + DEEP + "}, [3]]"
    items = json_list_items(text)
    assert items[:2] == [1, {"a": 'x]}"[{'}] and items[3] == "s" and items[6] == [3]
    assert [type(item) for item in items] == [int, dict, UnreadableItem, str, UnreadableItem, UnreadableItem, list]
    assert items[2].reason.startswith("nested too deeply to read")
    assert items[4].reason.startswith("cannot be read: Exceeds the limit (4300 digits)")


@pytest.mark.parametrize("text", ["", "{}", "[1,", "[1 2]", "[1] x", '["abc', "[" + "[" * 5000, '[1, "x' + DEEP])
def test_text_that_is_not_a_json_list_raises_a_decode_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json_list_items(text)


def test_json_value_reads_one_value() -> None:
    assert json_value('{"a": 1}') == {"a": 1}
    assert isinstance(json_value(DEEP), UnreadableItem)
    with pytest.raises(json.JSONDecodeError):
        json_value("{nope")
