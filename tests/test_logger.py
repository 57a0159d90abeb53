"""Logging: URI redaction and the one handler configure_logging installs."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from logger import LOG_FORMAT, ProjectHandler, configure_logging, redact_url


# Made-up credentials, spelled user:pass... so the repository's secret scan knows them for placeholders.
@pytest.mark.parametrize(
    "uri, password",
    [
        ("mongodb://user:pass-7Xq2@host:27017/db", "pass-7Xq2"),
        ("mongodb+srv://user:pass%40word@cluster0.example.net/?retryWrites=true", "pass%40word"),
        ("mongodb://user:pass-9Kd@a:1,b:2/x", "pass-9Kd"),
        ("http://user:pass-hunter2@proxy:3128", "pass-hunter2"),
    ],
)
def test_redact_uri_hides_passwords(uri: str, password: str) -> None:
    redacted = redact_url(uri)
    assert redacted == uri.replace(password, "***")
    assert password not in redacted


def test_redact_uri_marks_an_empty_password_too() -> None:
    assert redact_url("mongodb://user:@host") == "mongodb://user:" + "***" + "@host"


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://localhost:27017",
        "mongodb://host:27017/db?authSource=admin",
        "mongodb://user@host:27017",
        "http://localhost:11434",
        "embedded",
        "",
    ],
)
def test_redact_uri_leaves_uris_without_credentials_unchanged(uri: str) -> None:
    assert redact_url(uri) == uri


# Passwords as users really write them: not percent-encoded, with '/', '@', ':', spaces, '?', '#'.
@pytest.mark.parametrize(
    "url, password",
    [
        ("http://user:pass-tok3n@ollama.internal:11434", "pass-tok3n"),
        ("https://user:pass/with/slashes@llm.example.com/v1", "pass/with/slashes"),
        ("http://user:pass@with@ats@10.0.0.5:11434/api", "pass@with@ats"),
        ("http://user:pass with spaces@localhost:11434", "pass with spaces"),
        ("http://user:pass:colon?q#frag@[::1]:11434/", "pass:colon?q#frag"),
        ("mongodb://user:pass/@x@a.example:1,b.example:2/db?authSource=admin", "pass/@x"),
        ("mongodb+srv://user:pass%2F%40@cluster0.example.net/?retryWrites=true", "pass%2F%40"),
        ("http://user:@host:11434", ""),
    ],
)
def test_redact_url_hides_any_password_by_parsing_the_url(url: str, password: str) -> None:
    from logger import redact_url

    scheme, rest = url.split("://", 1)
    host_and_path = rest[len("user:" + password + "@") :]
    redacted = redact_url(url)
    assert redacted == f"{scheme}://user:***@{host_and_path}"
    for fragment in password.split("@") + password.split("/") + password.split(" "):
        if len(fragment) > 2:
            assert fragment not in redacted


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:11434",
        "http://user@host:11434",
        "https://llm.example.com/v1/chat?x=1",
        "mongodb://a:1,b:2/db?replicaSet=rs0",
        "embedded",
        "localhost:11434",
        "",
    ],
)
def test_redact_url_leaves_urls_without_a_password_unchanged(url: str) -> None:
    from logger import redact_url

    assert redact_url(url) == url


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("urllib3", "pymongo", "uvicorn.access")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


def test_configure_logging_installs_one_formatted_handler(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first)
    configure_logging("INFO", stream=second)  # called again: replaces, does not add
    ours = [h for h in logging.getLogger().handlers if isinstance(h, ProjectHandler)]
    assert len(ours) == 1
    assert logging.getLogger().level == logging.INFO

    logging.getLogger("tests.some_module").info("classified conversation %s", "c-1")
    logging.getLogger("tests.some_module").debug("conversation text at debug only")
    assert first.getvalue() == ""
    line = second.getvalue().strip()
    assert line.endswith(" - INFO - tests.some_module - classified conversation c-1")
    assert "debug only" not in second.getvalue()
    assert "%(name)s" in LOG_FORMAT


def test_libraries_are_quiet_unless_debug(restore_logging: None) -> None:
    configure_logging("INFO", stream=io.StringIO())
    assert logging.getLogger("urllib3").level == logging.WARNING
    configure_logging("DEBUG", stream=io.StringIO())
    assert logging.getLogger("urllib3").level == logging.DEBUG


# --- log forging: no value can start a new log line ------------------------------------------

FORGED = "2026-01-01 00:00:00,000 - INFO - batch_processor - all conversations deleted"


@pytest.mark.parametrize("separator", ["\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_a_value_with_a_line_break_stays_on_its_line(restore_logging: None, separator: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    logging.getLogger("batch_processor").warning("conversation %s failed: %s", "c-1" + separator + FORGED, "x")
    output = stream.getvalue()
    assert output.endswith("\n")
    assert len(output.splitlines()) == 1, output  # str.splitlines knows every Unicode line boundary
    assert " - WARNING - batch_processor - conversation c-1" in output
    assert repr(separator).strip("'") in output  # escaped, visible: "\\n", "\\x85", "\\u2028"


def test_terminal_escapes_are_shown_not_interpreted(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    logging.getLogger("api").info("label %s", "\x1b[2K\x1b[1Aerased\x00\x7f\x9b")
    assert stream.getvalue().rstrip("\n").endswith("label \\x1b[2K\\x1b[1Aerased\\x00\\x7f\\x9b")
    logging.getLogger("api").info("tab\tstays")
    assert stream.getvalue().splitlines()[-1].endswith("tab\tstays")


def test_a_traceback_cannot_forge_a_line_either(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    try:
        raise ValueError("bad label\n" + FORGED)
    except ValueError:
        logging.getLogger("api").exception("conversation %s failed", "c-2")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(" - ERROR - api - conversation c-2 failed")
    assert len(lines) > 2 and "Traceback" in lines[1]
    assert all(line.startswith(" ") for line in lines[1:]), lines  # every continuation is indented
    assert not any(line.startswith(FORGED[:10]) for line in lines[1:])
