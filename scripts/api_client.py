"""Send conversations to the running API's ``POST /classify`` and save the answers.

    python -m scripts.api_client INPUT.json [--url http://localhost:8000] [--output answers.json] [--timeout S]

INPUT.json holds one conversation (a ``/classify`` body) or a JSON list of them;
documents of the source collection (``conversation_number`` + ``tweets``) work as
they are, extra keys such as ``expected`` or ``status`` are ignored by the API.
Each conversation is posted in turn over one HTTP session; one line is printed per
conversation (number, HTTP status, labels or the error message), every answer
(successes and errors alike, each with its ``conversation_number`` and ``status``)
is written to the output file, and a summary ends the run.

Exit codes: 0 every conversation was classified, 1 at least one failed,
2 usage error (missing or unreadable input file, not JSON, output folder missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import requests

from error_handler import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

DEFAULT_URL = "http://localhost:8000"
DEFAULT_OUTPUT = "answers.json"
# Above the server's default OLLAMA_TIMEOUT (120 s), so the server's 504 arrives first.
DEFAULT_TIMEOUT = 150.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.api_client",
        description="Classify the conversations of a JSON file with the running API (POST /classify) "
        "and write every answer to a JSON file.",
        epilog="Exit codes: 0 all classified, 1 some failed, 2 usage error.",
    )
    parser.add_argument(
        "input",
        type=Path,
        metavar="INPUT.json",
        help="a conversation (a /classify body) or a JSON list of them; source-collection documents "
        "with 'tweets' work as they are",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="base URL of the API (default: %(default)s)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(DEFAULT_OUTPUT),
        help="file the answers are written to, successes and errors (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for each answer (default: %(default)s)",
    )
    return parser


def load_conversations(path: Path) -> list[Any]:
    """The conversations of ``path``: a JSON list, or one object made a list of one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UsageError(f"input file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read input file {path}: {e}") from e
    except ValueError as e:
        raise UsageError(f"input file {path} is not valid JSON: {e}") from e
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data:
        return data
    if isinstance(data, list):
        raise UsageError(f"input file {path} holds an empty list: no conversation to classify")
    raise UsageError(f"input file {path} must hold a JSON object or a list of objects, not {type(data).__name__}")


def _number_of(conversation: Any) -> str | None:
    number = conversation.get("conversation_number") if isinstance(conversation, dict) else None
    return None if number is None else str(number)


def classify_one(session: requests.Session, url: str, conversation: Any, timeout: float) -> dict[str, Any]:
    """Post one conversation; the answer record written to the output file."""
    number = _number_of(conversation)
    try:
        response = session.post(f"{url}/classify", json=conversation, timeout=timeout)
    except requests.exceptions.Timeout:
        error = {"type": "client_timeout", "message": f"no answer from {url} within {timeout:g} s"}
        return {"conversation_number": number, "status": None, "error": error}
    except requests.exceptions.ConnectionError as e:
        error = {
            "type": "api_unreachable",
            "message": f"cannot reach the API at {url} ({type(e).__name__}); is it running (`python main.py`)?",
        }
        return {"conversation_number": number, "status": None, "error": error}
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and "classification" in body:
        return {"conversation_number": str(body.get("conversation_number", number)), "status": 200, **body}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    else:
        error = {"type": "unexpected_answer", "message": f"HTTP {response.status_code}: {response.text[:200]!r}"}
    return {"conversation_number": number, "status": response.status_code, "error": error}


def describe(answer: dict[str, Any]) -> str:
    """One line for the console: number, status, labels or the error message."""
    number = answer["conversation_number"] or "(no number)"
    status = answer["status"] if answer["status"] is not None else "---"
    if "classification" in answer:
        c = answer["classification"]
        labels = " | ".join(str(v) for k, v in c.items() if k not in ("categorization", "confidence", "needs_review"))
        return f"{number}  {status}  {labels}  - {c['categorization']}"
    return f"{number}  {status}  error {answer['error'].get('type')}: {answer['error'].get('message')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.url.rstrip("/")
    try:
        if args.timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
        if not args.output.resolve().parent.is_dir():
            raise UsageError(f"output folder does not exist: {args.output.parent}")
        conversations = load_conversations(args.input)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    answers = []
    with requests.Session() as session:
        for conversation in conversations:
            answer = classify_one(session, url, conversation, args.timeout)
            answers.append(answer)
            print(describe(answer), flush=True)

    try:
        args.output.write_text(json.dumps(answers, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return EXIT_USAGE
    failed = sum(1 for answer in answers if "error" in answer)
    print(
        f"{len(answers)} conversation(s): {len(answers) - failed} classified, {failed} failed; "
        f"answers written to {args.output}"
    )
    return EXIT_FAILURE if failed else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
