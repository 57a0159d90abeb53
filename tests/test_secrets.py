"""Passwords in URLs that do not parse: one table of malformed URLs, every surface searched.

A URL that does not parse (a port typo, nothing after the ``@``, a host no parser accepts) is
where a password is most at risk: the libraries quote such a URL whole (aiohttp's InvalidURL is
the URL itself; requests' InvalidURL quotes the piece it choked on, which may be half a
password). Each case is run through every place a URL or a library's message can reach: the
configuration error (what ``python main.py`` prints before exiting 3), the API's ``/ready`` and
``/classify`` answers, the batch side's client, the dashboard's ``/api/stats``, the scripts'
MongoDB connection, and every log record (with its traceback). The assertion is the search for
the password in all of it.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from async_llm_wrapper import create_async_llm_client
from config import Settings
from error_handler import ClassifierError, ConfigError, LLMError, StorageError
from logger import redact_url
from mongo_client import MongoStore, sync_database
from tests.conftest import RunningAPI, SettingsFactory
from tests.net_helpers import closed_port_url
from tests.test_main import clean_env

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my order?"}]}

# Placeholder passwords (pass-...), written as users write them: not percent-encoded. Every piece
# between '/', '@' and ':' is long enough for the search to find it alone.
PASSWORD = "pass-Kx7Tq2"
SLASHED = "pass-Rw4/word-Jn8"
AT_SIGN = "pass-Lm3@word-Vb6"

# (URL template, password): {userinfo} by user:<password>, {closed} by a refused loopback URL.
LLM_ENDPOINTS: dict[str, tuple[str, str]] = {
    "port typo": ("http://{userinfo}@127.0.0.1:1x", PASSWORD),
    "port out of range": ("http://{userinfo}@127.0.0.1:99999", PASSWORD),
    "nothing after the @": ("http://{userinfo}@", PASSWORD),
    "non-ASCII host": ("http://{userinfo}@h\u00f4st.invalid:11434", PASSWORD),
    "space in the host": ("http://{userinfo}@local host:11434", PASSWORD),
    "unclosed IPv6 bracket": ("http://{userinfo}@[::1:11434", PASSWORD),
    "/ in the password and a port typo": ("http://{userinfo}@127.0.0.1:1x", SLASHED),
    "@ in the password and nothing after": ("http://{userinfo}@", AT_SIGN),
    "second server has a port typo": ("{closed},http://{userinfo}@127.0.0.1:1x", PASSWORD),
    # Refused by the settings: the configuration error is the surface.
    "one slash after the scheme": ("http:/{userinfo}@127.0.0.1:1x", PASSWORD),
    "no scheme": ("{userinfo}@127.0.0.1:11434", PASSWORD),
    "second server is not http": ("{closed},ftp://{userinfo}@127.0.0.1:1x", PASSWORD),
    "second server not http, / in the password": ("{closed},ftp://{userinfo}@h\u00f4st", SLASHED),
    "a server listed twice": ("http://{userinfo}@127.0.0.1:1x,http://{userinfo}@127.0.0.1:1x", PASSWORD),
}

MONGODB_URIS: dict[str, tuple[str, str]] = {
    "port typo": ("mongodb://{userinfo}@127.0.0.1:1x", PASSWORD),
    "nothing after the @": ("mongodb://{userinfo}@", PASSWORD),
    "unclosed IPv6 bracket": ("mongodb://{userinfo}@[::1:1", PASSWORD),
    "non-ASCII host": ("mongodb://{userinfo}@h\u00f4st.invalid:27017", PASSWORD),
    "/ in the password": ("mongodb://{userinfo}@127.0.0.1:27017", SLASHED),
    # PyMongo splits at the first '/': 'Bad database name "word-Jn8@mongohost/db"'.
    "/ in the password, and a database": ("mongodb://{userinfo}@mongohost/db", SLASHED),
    "@ in the password and a port typo": ("mongodb://{userinfo}@127.0.0.1:1x", AT_SIGN),
    "srv with a port": ("mongodb+srv://{userinfo}@cluster0.example.invalid:27017", PASSWORD),
}


def _url(template: str, password: str) -> str:
    # The credentials are put in here, so that no URL with a password stands in the source.
    return template.replace("{closed}", closed_port_url()).replace("{userinfo}", "user:" + password)


def assert_secret_free(outputs: list[str], password: str) -> None:
    text = "\n".join(outputs)
    for fragment in [password, *password.replace("@", "/").split("/")]:
        assert fragment not in text, f"{fragment!r} leaked in:\n{text}"


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record as formatted (tracebacks included), and each message and exception on its own."""
    records = [f"{r.getMessage()} {r.exc_info[1] if r.exc_info else ''}" for r in caplog.records]
    return [caplog.text, *records]


def _main_py_output(variable: str, value: str) -> str:
    """What ``python main.py`` prints when the setting is refused (it must exit 3 with one line)."""
    result = subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=clean_env(**{variable: value}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stdout + result.stderr


async def _batch_client_errors(settings: Settings) -> list[str]:
    """What the batch side's client (aiohttp) says: readiness and a chat, each server alone."""
    messages = []
    for url in settings.llm_endpoints:
        async with create_async_llm_client(settings.model_copy(update={"llm_endpoint": url})) as client:
            for call in (client.check_ready, lambda c=client: c.chat([{"role": "user", "content": "hi"}], {})):
                try:
                    await call()
                except LLMError as e:
                    messages.append(f"{e} {e.details}")
    return messages


@pytest.mark.parametrize("case", list(LLM_ENDPOINTS))
def test_a_malformed_llm_endpoint_never_shows_its_password(
    case: str,
    make_settings: SettingsFactory,
    start_api: Callable[[Settings], RunningAPI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    template, password = LLM_ENDPOINTS[case]
    url = _url(template, password)
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []
    try:
        settings = make_settings(llm_endpoint=url, ollama_timeout=1)
    except ConfigError as e:
        outputs += [str(e), _main_py_output("LLM_ENDPOINT", url)]
        assert "error: Invalid configuration: LLM_ENDPOINT: " in outputs[-1]
    else:
        api = start_api(settings)
        with requests.Session() as http:
            ready = http.get(f"{api.url}/ready", timeout=30)
            classify = http.post(f"{api.url}/classify", json=CONVERSATION, timeout=30)
        assert (ready.status_code, classify.status_code) == (503, 503), (ready.text, classify.text)
        assert classify.json()["error"]["type"] == "llm_unavailable"
        outputs += [ready.text, classify.text, *asyncio.run(_batch_client_errors(settings))]
    outputs += logged(caplog)
    assert_secret_free(outputs, password)


@pytest.mark.parametrize("case", list(MONGODB_URIS))
def test_a_malformed_mongodb_uri_never_shows_its_password(
    case: str,
    make_settings: SettingsFactory,
    start_api: Callable[[Settings], RunningAPI],
    caplog: pytest.LogCaptureFixture,
) -> None:
    template, password = MONGODB_URIS[case]
    caplog.set_level(logging.DEBUG)
    settings = make_settings(mongodb_connection_string=_url(template, password), mongodb_timeout_ms=300)
    api = start_api(settings)
    stats = requests.get(f"{api.url}/api/stats", timeout=30)
    assert stats.status_code == 503, stats.text
    assert stats.json()["error"]["type"] == "storage_unavailable"
    outputs = [stats.text]
    # The scripts (import, report) and the batch processor reach MongoDB through these two.
    with pytest.raises(StorageError) as raised, sync_database(settings):
        pass
    outputs.append(str(raised.value))

    async def connect() -> None:
        async with MongoStore.connect(settings) as store:
            await store.client.admin.command("ping")

    try:
        asyncio.run(connect())
    except ClassifierError as e:
        outputs.append(str(e))
    except Exception as e:  # the driver's own error: what the batch processor's edge would print
        outputs.append(f"{type(e).__name__}: {e}")
    outputs += logged(caplog)
    assert_secret_free(outputs, password)


@pytest.mark.parametrize("template, password", [*LLM_ENDPOINTS.values(), *MONGODB_URIS.values()])
def test_redact_url_hides_the_password_of_every_malformed_url(template: str, password: str) -> None:
    assert_secret_free([redact_url(_url(template, password))], password)


@pytest.mark.parametrize(
    "url, redacted",
    [
        ("http://user:pass-Kx7Tq2@127.0.0.1:1x", "http://***@127.0.0.1:1x"),
        ("http://user:pass-Kx7Tq2@", "http://***@"),
        ("http://user:pass-Kx7Tq2@h\u00f4st:11434/v1", "http://***@h\u00f4st:11434/v1"),
        ("http://user:pass-Lm3@word-Vb6@[::1:1", "http://***@[::1:1"),
        ("user:pass-Kx7Tq2@127.0.0.1:11434", "***@127.0.0.1:11434"),
        ("http://127.0.0.1:1,http://user:pass-Kx7Tq2@127.0.0.1:1x", "http://***@127.0.0.1:1x"),
    ],
)
def test_a_url_that_does_not_parse_is_hidden_up_to_its_last_at_sign(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
