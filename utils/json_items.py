"""A JSON list read item by item: an item the decoder cannot hold is that item's problem, not the file's.

``json.loads`` of a whole list fails as a whole when one item is nested deeper than the decoder's
recursion limit (``RecursionError``) or holds an integer of more than 4300 digits (``ValueError``):
a labelled set or an import would stop at one bad item with a traceback and nothing read.
:func:`json_list_items` decodes each item on its own and puts an :class:`UnreadableItem` in the place
of one it cannot decode, after skipping its text without recursion. A file that is not valid JSON
(a syntax error) still fails as a whole: after a syntax error, where the next item starts is a guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SPACE = re.compile(r"[ \t\n\r]*")
_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}"]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # after the opening quote
_SCALAR = re.compile(r"[^,\]\s]*")


@dataclass(frozen=True)
class UnreadableItem:
    """Stands for an item of the list that could not be decoded; ``reason`` says why."""

    reason: str


def _skip_container(text: str, start: int) -> int:
    """The end of the array or object starting at ``start``, by counting brackets outside strings."""
    depth, position = 0, start
    while match := _BRACKET_OR_QUOTE.search(text, position):
        position = match.end()
        if match.group() == '"':
            rest = _STRING_REST.match(text, position)
            if rest is None:
                break
            position = rest.end()
        elif match.group() in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return position
    raise json.JSONDecodeError("Unterminated array or object", text, start)


def _skip_item(text: str, start: int) -> int:
    if text[start] in "[{":
        return _skip_container(text, start)
    if text[start] == '"':
        rest = _STRING_REST.match(text, start + 1)
        if rest is None:
            raise json.JSONDecodeError("Unterminated string", text, start)
        return rest.end()
    return _SCALAR.match(text, start).end()  # type: ignore[union-attr]  # (matches the empty string)


def _reason(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply to read (arrays or objects inside each other, about a thousand levels)"
    return f"cannot be read: {error}"


def json_list_items(text: str) -> list[Any]:
    """The items of the JSON list ``text`` (leading and trailing whitespace allowed), each decoded on its
    own; an item that cannot be (nested too deeply, an integer of thousands of digits) is an
    :class:`UnreadableItem` in its place. Raises :class:`json.JSONDecodeError` for text that is not
    a JSON list."""
    position = _SPACE.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("[", position):
        raise json.JSONDecodeError("Expecting '['", text, position)
    try:  # the whole list at once is twice as fast; item by item only when that fails
        whole = json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError):
        pass
    else:
        return list(whole)
    decoder = json.JSONDecoder()
    position = _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
    items: list[Any] = []
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                raise
            except (RecursionError, ValueError) as e:
                value, position = UnreadableItem(_reason(e)), _skip_item(text, position)
            items.append(value)
            position = _SPACE.match(text, position).end()  # type: ignore[union-attr]
            if text.startswith(",", position):
                position = _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
            elif text.startswith("]", position):
                position += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
    if _SPACE.match(text, position).end() != len(text):  # type: ignore[union-attr]
        raise json.JSONDecodeError("Extra data", text, position)
    return items


def json_value(text: str) -> Any:
    """``json.loads(text)``, except that a value nested too deeply or holding an integer of thousands of
    digits is an :class:`UnreadableItem` instead of an exception (one JSON Lines line, one document).
    Raises :class:`json.JSONDecodeError` for text that is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as e:
        return UnreadableItem(_reason(e))
