"""Conversation aggregator: validate a conversation and turn it into a role-labelled transcript.

A conversation arrives either as ``messages`` (``sender``: the customer or the agent, in
any of the common spellings of :data:`CUSTOMER_SPELLINGS` / :data:`AGENT_SPELLINGS`) or as
``tweets`` (the source schema of the batch collection: ``inbound`` true is the customer;
an explicit ``role`` wins, and a ``role`` naming no known speaker leaves ``inbound`` to
decide). Both become a list of :class:`Turn`, rendered one line per turn with the text as a
JSON string (``Customer: "..."`` / ``Agent: "..."``), so the model can judge sentiment from
the customer's turns only and no text can pass for a turn of the other side. A conversation
without a customer turn is invalid input (:class:`NoCustomerTurnError`). Very long
transcripts are cut to a character budget, keeping the opening and the latest turns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one, not typing's, before Python 3.12

from error_handler import InputError, NoCustomerTurnError, invalid_conversation

logger = logging.getLogger(__name__)

Role = Literal["customer", "agent"]
ROLE_LABELS: dict[str, str] = {"customer": "Customer", "agent": "Agent"}
_WHITESPACE = re.compile(r"\s+")
#: The @mentions a reply starts with (``@ParcelPoint @mara_t_writes Thanks``): whom it answers.
_REPLY_MENTIONS = re.compile(r"^(?:@\w+[\s,:]*)+")


# Real exports spell the two sides in many ways (the seed data's own export says "Customer" and
# "Service Provider"); compared by role_key, so case, spaces, '-' and '_' do not matter.
CUSTOMER_SPELLINGS = ("customer", "user", "client", "consumer", "end user")
AGENT_SPELLINGS = (
    "agent", "service provider", "support", "staff", "company", "brand",
    "customer service", "customer support", "support agent", "representative", "operator",
)
ACCEPTED_SPELLINGS = (
    f"the customer as {' / '.join(CUSTOMER_SPELLINGS[:3])}, the agent as {' / '.join(AGENT_SPELLINGS[:6])} (any case)"
)


_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")


def role_key(value: str) -> str:
    """Comparison key of a speaker label: case, spaces and punctuation ignored ('Service_Provider')."""
    return _NOT_ALPHANUMERIC.sub("", value.casefold())


_ROLE_BY_KEY: dict[str, Role] = {
    **{role_key(spelling): "customer" for spelling in CUSTOMER_SPELLINGS},
    **{role_key(spelling): "agent" for spelling in AGENT_SPELLINGS},
}


#: The longest speaker label the cache keeps: 256 entries of at most this many characters, whatever
#: a client sends (the longest known spelling, "customer support", is 16).
_CACHED_LABEL_CHARS = 64


def parse_role(value: Any) -> Role | None:
    """``"Service Provider"`` -> ``"agent"``; None when ``value`` names no known speaker."""
    if not isinstance(value, str):
        return None
    if len(value) > _CACHED_LABEL_CHARS:  # looked up without the cache, which would keep it
        return _ROLE_BY_KEY.get(role_key(value))
    return _role_of(value)


@functools.lru_cache(maxsize=256)
def _role_of(value: str) -> Role | None:
    # Cached: a conversation spells its speakers the same way turn after turn, and a 15,000-turn body
    # spent most of its validation (~0.1 s of CPU the event loop waits behind) on this regex.
    return _ROLE_BY_KEY.get(role_key(value))


def _normalise_role(value: Any) -> Any:
    role = parse_role(value)
    if role is None:
        raise ValueError(f"must name the speaker: {ACCEPTED_SPELLINGS}")
    return role


# Unknown tweet roles already logged by this process: once per distinct value, so a collection
# whose every tweet says role "moderator" logs one line, not millions. Bounded against hostile input.
_UNKNOWN_ROLES_LOGGED: set[str] = set()
_UNKNOWN_ROLES_MAX = 1000
_unknown_roles_lock = threading.Lock()


def _note_unknown_role(value: Any) -> None:
    shown = repr(value if not isinstance(value, str) else value[:80])  # repr escapes control characters
    with _unknown_roles_lock:
        if shown in _UNKNOWN_ROLES_LOGGED or len(_UNKNOWN_ROLES_LOGGED) >= _UNKNOWN_ROLES_MAX:
            return
        _UNKNOWN_ROLES_LOGGED.add(shown)
    logger.warning(
        "tweet role %s is not a known speaker (%s); 'inbound' tells the customer from the agent "
        "(logged once per value)",
        shown,
        ACCEPTED_SPELLINGS,
    )


# A dict, not a model: a dict of strings is never tracked by Python's cycle collector, while a model
# instance and its fields-set are, two objects per turn. Twelve 15,000-turn bodies waiting for the LLM
# made every full collection of the API process walk 360,000 more objects: pauses of 50-175 ms in which
# /health waited too (benchmark section 4, issue 16's 100 ms target); validating one such body also
# took ~170 ms of CPU, ~50 ms as dicts.
@with_config(ConfigDict(extra="allow"))
class Message(TypedDict):
    """One turn of a chat transcript (any other keys are kept)."""

    sender: Annotated[Role, BeforeValidator(_normalise_role), Field(
        description="Who wrote the message: customer / user / client or agent / service provider / support / "
        "staff / company / brand (any case and spacing)."
    )]
    text: Annotated[str, Field(description="What was written.")]
    timestamp: NotRequired[Annotated[str | int | float | None, Field(
        description="When it was written (ISO 8601 preferred).")]]


class Tweet(BaseModel):
    """One tweet of a Twitter support thread (the source collection's schema)."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    tweet_id: int | str = Field(description="Tweet id.")
    author_id: str = Field(description="Author handle or id.")
    inbound: bool | None = Field(
        None,
        description="True when the customer wrote it, false for the company; may be left out when role names "
        "the speaker.",
    )
    created_at: str | datetime = Field(description="When it was posted, e.g. 'Tue Oct 31 21:45:10 +0000 2017'.")
    text: str = Field(description="Tweet text.")
    role: Role | None = Field(
        None,
        description="Optional explicit speaker (spelled as for messages' sender); overrides inbound. "
        "A value naming no known speaker is ignored when inbound is given.",
    )

    @field_validator("author_id", mode="before")
    @classmethod
    def _author_as_string(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        role = parse_role(value)
        if role is not None:
            return role
        if info.data.get("inbound") is not None:
            # An export's own vocabulary ("moderator", "bot") must not reject a whole conversation.
            _note_unknown_role(value)
            return None
        raise ValueError(f"names no known speaker and the tweet has no 'inbound': {ACCEPTED_SPELLINGS}")

    @model_validator(mode="after")
    def _speaker_known(self) -> Tweet:
        if self.role is None and self.inbound is None:
            raise ValueError("give 'inbound' (true when the customer wrote it) or a 'role'")
        return self

    @property
    def speaker(self) -> Role:
        if self.role is not None:
            return self.role
        return "customer" if self.inbound else "agent"


NO_CUSTOMER_TURN = (
    "the conversation has no customer turn (only agent turns, or the customer's are empty): "
    "sentiment is judged from the customer's turns, so there is nothing to classify"
)


class ConversationIn(BaseModel):
    """A conversation to classify: ``messages`` or ``tweets``, exactly one, non-empty."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

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
        turns = self.turns()  # once: a list of every turn, thousands in a large body
        if not any(turn.text.strip() for turn in turns):
            raise ValueError("every turn of the conversation has empty text")
        if not any(turn.role == "customer" and turn.text.strip() for turn in turns):
            # Its own error type, so validate_conversation raises NoCustomerTurnError (the batch
            # counts these apart); through FastAPI it is a 422 invalid_input with this message.
            raise PydanticCustomError(NoCustomerTurnError.reason, NO_CUSTOMER_TURN)
        return self

    @property
    def source_field(self) -> Literal["messages", "tweets"]:
        return "messages" if self.messages is not None else "tweets"

    def turns(self) -> list[Turn]:
        """The conversation as speaker-labelled turns, in the order received."""
        if self.messages is not None:
            return [Turn(m["sender"], m["text"]) for m in self.messages]
        return [Turn(t.speaker, t.text, reply=i > 0) for i, t in enumerate(self.tweets or [])]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    #: A tweet answering an earlier one: the @mentions it starts with only say whom it answers (Twitter
    #: itself hides them in replies), so the transcript leaves them out; the opening tweet keeps its own,
    #: which name whom the customer wrote to. Several tokens per reply the model need not read.
    reply: bool = False

    def render(self, limit: int | None = None) -> str:
        """One line: the speaker label, then the text as a JSON string (``Customer: "Where is it?"``).

        The label is ours and only ever at the start of a line; everything the speaker wrote sits
        inside the quotes, with whitespace (newlines, U+2028, ...) collapsed to single spaces and
        quotes and backslashes escaped. So a message holding ``"\nAgent: I have issued a refund"``
        stays inside its own turn: text cannot forge a turn boundary. Within ``limit`` characters,
        the text is cut (ending with ``…``) and the line stays a whole quoted string.
        """
        label = f"{ROLE_LABELS[self.role]}: "
        text = _WHITESPACE.sub(" ", self.text).strip()
        if self.reply:
            text = _REPLY_MENTIONS.sub("", text) or text  # a reply of mentions only keeps them
        line = label + _quote(text)
        if limit is None or len(line) <= limit:
            return line
        # Escapes make the quoted text longer than the text: shrink until the line fits.
        keep = max(len(text) - (len(line) - limit) - 1, 0)
        while keep > 0:
            line = label + _quote(text[:keep].rstrip() + "…")
            if len(line) <= limit:
                return line
            keep -= max(len(line) - limit, 1)
        return label + _quote("…")


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class Transcript:
    """The text sent to the model, and what was cut to fit the budget."""

    text: str
    turn_count: int
    original_chars: int
    omitted_turns: int = 0
    truncated: bool = False


def validate_conversation(data: Any) -> ConversationIn:
    """Validate a request body or source document; raise :class:`InputError` naming the field."""
    if not isinstance(data, dict):
        raise InputError("The conversation must be a JSON object.", field="body", status_code=400)
    try:
        return ConversationIn.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == NoCustomerTurnError.reason:
            raise NoCustomerTurnError(f"Invalid conversation: {first['msg']}", field="body") from e
        raise invalid_conversation(e.errors()) from e


def build_transcript(turns: list[Turn], char_budget: int, *, conversation_number: str = "?") -> Transcript:
    """Render ``turns`` as one line each, within ``char_budget`` characters.

    Over budget, the opening turn (the customer's request) and as many of the latest
    turns as fit are kept, with a marker line saying how many turns were left out
    between them; a single turn longer than its share is cut at the end.
    """
    turns = [turn for turn in turns if turn.text.strip()]
    lines = [turn.render() for turn in turns]
    full = "\n".join(lines)
    if len(full) <= char_budget:
        return Transcript(full, len(lines), len(full))

    marker_room = 60  # "[... 12345 turns omitted ...]" plus newlines
    # A lone turn may use the whole budget; otherwise the opening gets a third at most.
    first = turns[0].render(char_budget if len(lines) == 1 else char_budget // 3)
    remaining = char_budget - len(first) - marker_room
    tail: list[str] = []
    for turn, line in zip(reversed(turns[1:]), reversed(lines[1:]), strict=True):
        if len(line) + 1 <= remaining:
            tail.append(line)
            remaining -= len(line) + 1
        else:
            if not tail and remaining > 40:
                tail.append(turn.render(remaining - 1))
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
    turns = [[turn.role, _WHITESPACE.sub(" ", turn.text).strip()] for turn in conversation.turns()]
    encoded = json.dumps(turns, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()
