"""Conversation aggregator: validate a conversation and turn it into a role-labelled transcript.

A conversation arrives either as ``messages`` (``sender`` customer/agent, any case)
or as ``tweets`` (the source schema of the batch collection: ``inbound`` true is the
customer; an explicit ``role`` wins). Both become a list of :class:`Turn`, rendered
one line per turn (``Customer: ...`` / ``Agent: ...``) so the model can judge
sentiment from the customer's turns only. Very long transcripts are cut to a
character budget, keeping the opening and the latest turns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from error_handler import InputError

logger = logging.getLogger(__name__)

Role = Literal["customer", "agent"]
ROLE_LABELS: dict[str, str] = {"customer": "Customer", "agent": "Agent"}
_WHITESPACE = re.compile(r"\s+")


def _normalise_role(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ROLE_LABELS:
        return value.strip().lower()
    raise ValueError("must be 'customer' or 'agent' (any case)")


class Message(BaseModel):
    """One turn of a chat transcript."""

    model_config = ConfigDict(extra="allow")

    sender: Role = Field(description="Who wrote the message: customer or agent (any case).")
    text: str = Field(description="What was written.")
    timestamp: str | int | float | None = Field(None, description="When it was written (ISO 8601 preferred).")

    @field_validator("sender", mode="before")
    @classmethod
    def _sender(cls, value: Any) -> Any:
        return _normalise_role(value)


class Tweet(BaseModel):
    """One tweet of a Twitter support thread (the source collection's schema)."""

    model_config = ConfigDict(extra="allow")

    tweet_id: int | str = Field(description="Tweet id.")
    author_id: str = Field(description="Author handle or id.")
    inbound: bool = Field(description="True when the customer wrote it, false for the company.")
    created_at: str | datetime = Field(description="When it was posted, e.g. 'Tue Oct 31 21:45:10 +0000 2017'.")
    text: str = Field(description="Tweet text.")
    role: Role | None = Field(None, description="Optional explicit speaker; overrides inbound.")

    @field_validator("author_id", mode="before")
    @classmethod
    def _author_as_string(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Any:
        return None if value is None else _normalise_role(value)

    @property
    def speaker(self) -> Role:
        if self.role is not None:
            return self.role
        return "customer" if self.inbound else "agent"


class ConversationIn(BaseModel):
    """A conversation to classify: ``messages`` or ``tweets``, exactly one, non-empty."""

    model_config = ConfigDict(extra="ignore")

    conversation_number: str = Field(min_length=1, max_length=200, description="Your id for the conversation.")
    messages: list[Message] | None = Field(None, description="Chat turns, oldest first.")
    tweets: list[Tweet] | None = Field(None, description="Twitter thread, oldest first.")

    @field_validator("conversation_number", mode="before")
    @classmethod
    def _number_as_string(cls, value: Any) -> Any:
        # Numeric ids (as in TWCS exports) are accepted and answered as strings.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value.strip()
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ConversationIn:
        if self.messages is None and self.tweets is None:
            raise ValueError("give either 'messages' or 'tweets'")
        if self.messages is not None and self.tweets is not None:
            raise ValueError("give 'messages' or 'tweets', not both")
        if not (self.messages or self.tweets):
            raise ValueError("the conversation has no turns: 'messages'/'tweets' is empty")
        if not any(turn.text.strip() for turn in self.turns()):
            raise ValueError("every turn of the conversation has empty text")
        return self

    @property
    def source_field(self) -> Literal["messages", "tweets"]:
        return "messages" if self.messages is not None else "tweets"

    def turns(self) -> list[Turn]:
        """The conversation as speaker-labelled turns, in the order received."""
        if self.messages is not None:
            return [Turn(m.sender, m.text) for m in self.messages]
        return [Turn(t.speaker, t.text) for t in self.tweets or []]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str

    def render(self) -> str:
        # One line per turn: collapsing whitespace keeps speaker labels at line starts
        # (a message containing "\nAgent: ..." cannot impersonate a turn) and saves tokens.
        return f"{ROLE_LABELS[self.role]}: {_WHITESPACE.sub(' ', self.text).strip()}"


@dataclass(frozen=True)
class Transcript:
    """The text sent to the model, and what was cut to fit the budget."""

    text: str
    turn_count: int
    original_chars: int
    omitted_turns: int = 0
    truncated: bool = False


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "body"


def validate_conversation(data: Any) -> ConversationIn:
    """Validate a request body or source document; raise :class:`InputError` naming the field."""
    if not isinstance(data, dict):
        raise InputError("The conversation must be a JSON object.", field="body", status_code=400)
    try:
        return ConversationIn.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = _field_path(tuple(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        where = "" if field == "body" else f"{field}: "  # a problem of the whole conversation names no field
        raise InputError(f"Invalid conversation: {where}{message}{more}", field=field) from e


def build_transcript(turns: list[Turn], char_budget: int, *, conversation_number: str = "?") -> Transcript:
    """Render ``turns`` as one line each, within ``char_budget`` characters.

    Over budget, the opening turn (the customer's request) and as many of the latest
    turns as fit are kept, with a marker line saying how many turns were left out
    between them; a single turn longer than its share is cut at the end.
    """
    lines = [turn.render() for turn in turns if turn.text.strip()]
    full = "\n".join(lines)
    if len(full) <= char_budget:
        return Transcript(full, len(lines), len(full))

    def clip(line: str, limit: int) -> str:
        return line if len(line) <= limit else line[: max(limit - 1, 0)] + "…"

    marker_room = 60  # "[... 12345 turns omitted ...]" plus newlines
    # A lone turn may use the whole budget; otherwise the opening gets a third at most.
    first = clip(lines[0], char_budget if len(lines) == 1 else char_budget // 3)
    remaining = char_budget - len(first) - marker_room
    tail: list[str] = []
    for line in reversed(lines[1:]):
        if len(line) + 1 <= remaining:
            tail.append(line)
            remaining -= len(line) + 1
        else:
            if not tail and remaining > 40:
                tail.append(clip(line, remaining - 1))
            break
    tail.reverse()
    omitted = len(lines) - 1 - len(tail)
    marker = f"[... {omitted} turn{'s' if omitted != 1 else ''} omitted ...]"
    kept = [first] + ([marker] if omitted else []) + tail
    text = "\n".join(kept)
    logger.info(
        "conversation %s: transcript cut from %d to %d characters (%d of %d turns omitted)",
        conversation_number,
        len(full),
        len(text),
        omitted,
        len(lines),
    )
    return Transcript(text, len(lines), len(full), omitted_turns=omitted, truncated=True)


def content_hash(conversation: ConversationIn) -> str:
    """SHA-256 of the transcript's turns (speaker and text, whitespace-normalised).

    Stored with each result: a conversation whose turns changed since it was classified has
    another hash and is classified again; one whose status was merely reset is not. Hashes the
    turns, not the rendered prompt text, so a change of rendering does not reclassify everything.
    """
    import hashlib
    import json

    turns = [[turn.role, _WHITESPACE.sub(" ", turn.text).strip()] for turn in conversation.turns()]
    encoded = json.dumps(turns, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()
