"""Section 5: prompt characters and tokens per request."""

from __future__ import annotations

import uuid
from typing import Any

from config import load_settings
from scripts.bench.harness import (
    MODEL,
    BenchmarkError,
    Context,
    load_samples,
)
from scripts.bench.results import SectionResult

# --- 5. prompt -----------------------------------------------------------------------------------


def synthetic_long_conversation(char_budget: int) -> dict[str, Any]:
    """A chat well over the character budget: alternating turns of about 300 characters."""
    sentence = ("I am writing again about the replacement router that was promised three weeks ago; the "
                "tracking page still shows label created and nobody answers my emails. ")
    messages: list[dict[str, Any]] = []
    i = 0
    while sum(len(m["text"]) for m in messages) < 2 * char_budget:
        sender = "customer" if i % 2 == 0 else "agent"
        text = (f"[{i}] " + sentence * 2) if sender == "customer" else (
            f"[{i}] Thank you for your patience, I have escalated the case to our logistics team once more "
            "and will update you as soon as I hear back from them about the shipment.")
        messages.append({"sender": sender, "text": text})
        i += 1
    return {"conversation_number": "synthetic-long", "messages": messages}


def section_prompt(ctx: Context) -> SectionResult:
    """Prompt characters per request, split into the cached prefix (system prompt + few-shots)
    and the conversation, and the fake's ``prompt_eval_count`` for a cold cache and with the
    prefix cached, for the shortest, median and longest sample conversation and a synthetic
    conversation over the character budget: real requests through ``LLMClient``.
    """
    from aggregator import validate_conversation
    from classifier import ConversationClassifier
    from llm_wrapper import LLMClient

    samples = load_samples()
    rows: list[list[str]] = []
    chart: dict[str, Any] = {"names": [], "prefix": [], "conversation": []}
    with ctx.fake_ollama(0.0) as fake:
        settings = load_settings({"llm_endpoint": fake.url, "llm_model": MODEL}, environ={}, env_file=None)
        classifier = ConversationClassifier.from_settings(settings)
        prepared = sorted(
            ((body, classifier.prepare(validate_conversation(body))) for body in samples),
            key=lambda pair: len(pair[1].messages[-1]["content"]),
        )
        picks = [("shortest sample", prepared[0][0]), ("median sample", prepared[len(prepared) // 2][0]),
                 ("longest sample", prepared[-1][0]),
                 ("synthetic, over the budget", synthetic_long_conversation(settings.conversation_char_budget))]
        other = validate_conversation({"conversation_number": "warm-up", "messages": [
            {"sender": "customer", "text": "Hello, I have a question about my bill."},
            {"sender": "agent", "text": "Happy to help."}]})
        with LLMClient(settings) as client:
            for name, body in picks:
                conversation = validate_conversation(body)
                ready = classifier.prepare(conversation)
                # A chat with another first message empties the fake's (and Ollama's) prompt cache.
                client.chat([{"role": "system", "content": f"benchmark cache reset {uuid.uuid4().hex}"}],
                            classifier.schema)
                cold = classifier.classify(conversation, client).chat.prompt_eval_count
                classifier.classify(other, client)  # the prefix is cached, this conversation is not
                warm = classifier.classify(conversation, client).chat.prompt_eval_count
                prefix = classifier.prompt_builder.prefix_chars
                own = len(ready.messages[-1]["content"])
                total = sum(len(m["content"]) for m in ready.messages)
                if total != prefix + own:
                    raise BenchmarkError(f"prompt ({name}): {total} characters sent, prefix {prefix} + "
                                         f"conversation {own}")
                if cold is None or warm is None:
                    raise BenchmarkError(f"prompt ({name}): the fake's answer has no prompt_eval_count")
                transcript = ready.transcript
                cut = (f"yes: {transcript.original_chars:,} -> {len(transcript.text):,} chars, "
                       f"{transcript.omitted_turns} turns omitted") if transcript.truncated else "no"
                rows.append([f"{name} ({conversation.conversation_number})", str(transcript.turn_count),
                             f"{prefix:,}", f"{own:,}", f"{total:,}", f"{100 * prefix / total:.0f} %",
                             f"{cold:,}", f"{warm:,}", cut])
                chart["names"].append(name)
                chart["prefix"].append(prefix)
                chart["conversation"].append(own)
    return SectionResult(
        "prompt",
        "Characters of one `/api/chat` request (message contents), split into the prefix shared by every "
        "request (system prompt with the taxonomy + few-shot examples) and the conversation (the last user "
        "message), and the fake's `prompt_eval_count` (prompt tokens evaluated, about 4 characters a token; "
        "the fake counts only what differs from the previous request, as Ollama's prompt cache does). "
        "Real requests through `LLMClient` and `ConversationClassifier.classify`. Cold: after a request "
        "with another prefix. Prefix cached: right after another conversation.",
        [("conversation", "left"), ("turns", "right"), ("prefix chars", "right"), ("conversation chars", "right"),
         ("total chars", "right"), ("prefix share", "right"), ("tokens cold", "right"),
         ("tokens prefix cached", "right"), ("cut to the budget", "left")],
        rows,
        notes=[f"Character budget (CONVERSATION_CHAR_BUDGET): {settings.conversation_char_budget:,}."],
        chart=chart,
    )


def draw_prompt(axes: Any, data: dict[str, Any]) -> None:
    """Characters per request: the cached prefix and the conversation, stacked."""
    y = list(range(len(data["names"])))
    axes.barh(y, data["prefix"], color="#9aa0a6", label="cached prefix")
    axes.barh(y, data["conversation"], left=data["prefix"], color="#1f77b4", label="conversation")
    axes.set_yticks(y, data["names"])
    axes.invert_yaxis()
    axes.set_xlabel("prompt characters per request")
    axes.legend(fontsize=8, frameon=False, loc="upper right")
    axes.grid(axis="x", alpha=0.3)
