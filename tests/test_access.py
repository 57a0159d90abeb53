"""Who may read transcripts: bearer tokens, login sessions with CSRF, loopback-only without tokens.

The real API over HTTP on loopback (uvicorn), results in SecantusDB. ``X-Forwarded-Proto: https``
from 127.0.0.1 is how uvicorn (proxy headers, trusted from loopback) learns a request came over
HTTPS behind a proxy: the cookie's Secure flag follows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from config import load_settings
from error_handler import ConfigError
from tests.conftest import RunningAPI, SettingsFactory
from tests.review_data import seed_reviewable

TOKENS = "alice:tok-alice-1,bob:tok-bob-22"
StartAPI = Callable[..., RunningAPI]


@pytest.fixture
def database_settings(mongo_uri: str, mongo_db_name: str) -> dict[str, Any]:
    return {"mongodb_connection_string": mongo_uri, "mongodb_database_name": mongo_db_name}


@pytest.fixture
def token_api(make_settings: SettingsFactory, start_api: StartAPI, database_settings: dict[str, Any],
              mongo_db: Any) -> RunningAPI:
    seed_reviewable(mongo_db)
    return start_api(make_settings(api_tokens=TOKENS, **database_settings))


def first_id(api: RunningAPI) -> str:
    response = requests.get(f"{api.url}/api/conversations", headers={"Authorization": "Bearer tok-bob-22"},
                            timeout=30)
    return str(response.json()["items"][0]["id"])


def login(api: RunningAPI, token: str, **headers: str) -> requests.Response:
    return requests.post(f"{api.url}/login", data={"token": token, "next": "/conversations?needs_review=true"},
                         headers=headers, allow_redirects=False, timeout=30)


# --- bearer tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer tok-alice-1x"},
    {"Authorization": "Basic YWxpY2U6dG9rLWFsaWNlLTE="},
    {"Authorization": "Bearer"},
])
def test_conversation_endpoints_need_a_valid_bearer_token(token_api: RunningAPI, headers: dict[str, str]) -> None:
    conversation_id = first_id(token_api)
    for method, path in [("GET", "/api/conversations"), ("GET", f"/api/conversations/{conversation_id}"),
                         ("POST", f"/api/conversations/{conversation_id}/review"), ("GET", "/api/session")]:
        response = requests.request(method, f"{token_api.url}{path}", headers=headers,
                                    json={"labels": {"intent": "Other"}} if method == "POST" else None, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_review_records_the_tokens_name(token_api: RunningAPI) -> None:
    conversation_id = first_id(token_api)
    response = requests.post(f"{token_api.url}/api/conversations/{conversation_id}/review",
                             json={"labels": {"intent": "Other"}}, headers={"Authorization": "Bearer tok-alice-1"},
                             timeout=30)
    assert response.status_code == 200 and response.json()["review"]["by"] == "alice"


def test_aggregates_and_classify_need_no_token(token_api: RunningAPI) -> None:
    assert requests.get(f"{token_api.url}/api/stats", timeout=30).status_code == 200
    assert requests.get(f"{token_api.url}/dashboard", timeout=30).status_code == 200
    assert requests.get(f"{token_api.url}/conversations", timeout=30).status_code == 200  # the page; its data needs one
    body = {"conversation_number": "1", "messages": [{"sender": "customer", "text": "Where is my order?"}]}
    assert requests.post(f"{token_api.url}/classify", json=body, timeout=30).status_code == 200


# --- browser sessions ------------------------------------------------------------------------


def test_login_sets_a_hardened_session_cookie_and_csrf_guards_changes(token_api: RunningAPI) -> None:
    form = requests.get(f"{token_api.url}/login", timeout=30)
    assert form.status_code == 200 and 'name="token"' in form.text and 'method="post"' in form.text

    response = login(token_api, "tok-alice-1")
    assert response.status_code == 303
    assert response.headers["Location"] == "/conversations?needs_review=true"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the HTTPS test below

    browser = requests.Session()
    browser.cookies.update(response.cookies)
    assert browser.get(f"{token_api.url}/api/conversations", timeout=30).status_code == 200
    session = browser.get(f"{token_api.url}/api/session", timeout=30).json()
    assert session["user"] == "alice" and session["via"] == "session" and len(session["csrf_token"]) >= 32

    conversation_id = first_id(token_api)
    url = f"{token_api.url}/api/conversations/{conversation_id}/review"
    without = browser.post(url, json={"labels": {"intent": "Other"}}, timeout=30)
    assert without.status_code == 403 and "X-CSRF-Token" in without.json()["error"]["message"]
    wrong = browser.post(url, json={"labels": {"intent": "Other"}}, headers={"X-CSRF-Token": "guess"}, timeout=30)
    assert wrong.status_code == 403
    right = browser.post(url, json={"labels": {"intent": "Other"}}, headers={"X-CSRF-Token": session["csrf_token"]},
                         timeout=30)
    assert right.status_code == 200 and right.json()["review"]["by"] == "alice"

    out = browser.post(f"{token_api.url}/logout", allow_redirects=False, timeout=30)
    assert out.status_code == 303 and 'classifier_session=""' in out.headers["Set-Cookie"]
    assert browser.get(f"{token_api.url}/api/conversations", timeout=30).status_code == 401


def test_a_wrong_token_at_login_is_401_with_the_form(token_api: RunningAPI) -> None:
    response = login(token_api, "tok-nobody-9")
    assert response.status_code == 401 and "not valid" in response.text and "Set-Cookie" not in response.headers


def test_login_redirects_only_within_the_site(token_api: RunningAPI) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = requests.post(f"{token_api.url}/login", data={"token": "tok-alice-1", "next": target},
                                 allow_redirects=False, timeout=30)
        assert response.headers["Location"] == "/conversations", target


def test_a_login_posted_from_another_site_is_403(token_api: RunningAPI) -> None:
    response = login(token_api, "tok-alice-1", Origin="https://evil.example")
    assert response.status_code == 403 and "Set-Cookie" not in response.headers
    assert login(token_api, "tok-alice-1", Origin=token_api.url).status_code == 303


def test_the_cookie_is_secure_over_https(token_api: RunningAPI) -> None:
    response = login(token_api, "tok-alice-1", **{"X-Forwarded-Proto": "https"})
    assert response.status_code == 303 and "Secure" in response.headers["Set-Cookie"]


def test_a_forged_cookie_is_401(token_api: RunningAPI) -> None:
    value = login(token_api, "tok-alice-1").cookies["classifier_session"]
    payload, _, signature = value.rpartition(".")
    forged = f"{payload}.{'A' * len(signature)}"
    response = requests.get(f"{token_api.url}/api/conversations", cookies={"classifier_session": forged}, timeout=30)
    assert response.status_code == 401 and "expired or was ended" in response.json()["error"]["message"]


def test_sessions_expire(make_settings: SettingsFactory, start_api: StartAPI, database_settings: dict[str, Any],
                         mongo_db: Any) -> None:
    api = start_api(make_settings(api_tokens=TOKENS, api_session_hours=0.0005, **database_settings))  # 1 s
    cookies = login(api, "tok-alice-1").cookies
    assert requests.get(f"{api.url}/api/conversations", cookies=cookies, timeout=30).status_code == 200
    time.sleep(2.2)
    assert requests.get(f"{api.url}/api/conversations", cookies=cookies, timeout=30).status_code == 401


def test_changing_a_users_token_ends_that_users_sessions(
    make_settings: SettingsFactory, start_api: StartAPI, database_settings: dict[str, Any], mongo_db: Any
) -> None:
    before = start_api(make_settings(api_tokens=TOKENS, **database_settings))
    alice = login(before, "tok-alice-1").cookies
    # The same deployment restarted with alice's token rotated (bob's unchanged).
    after = start_api(make_settings(api_tokens="alice:tok-alice-NEW,bob:tok-bob-22", **database_settings))
    assert requests.get(f"{after.url}/api/conversations", cookies=alice, timeout=30).status_code == 401
    same = start_api(make_settings(api_tokens=TOKENS, **database_settings))
    assert requests.get(f"{same.url}/api/conversations", cookies=alice, timeout=30).status_code == 200


def test_tokens_never_reach_the_log(token_api: RunningAPI, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        login(token_api, "tok-alice-1")
        login(token_api, "tok-wrong-77")
        requests.get(f"{token_api.url}/api/conversations", headers={"Authorization": "Bearer tok-bob-22"}, timeout=30)
        requests.get(f"{token_api.url}/api/conversations", headers={"Authorization": "Bearer tok-wrong-88"},
                     timeout=30)
    text = caplog.text
    assert "alice logged in" in text and "not in API_TOKENS" in text
    for secret in ("tok-alice-1", "tok-wrong-77", "tok-bob-22", "tok-wrong-88"):
        assert secret not in text


# --- without tokens --------------------------------------------------------------------------


def test_without_tokens_a_loopback_api_serves_conversations(
    make_settings: SettingsFactory, start_api: StartAPI, database_settings: dict[str, Any], mongo_db: Any
) -> None:
    seed_reviewable(mongo_db)
    api = start_api(make_settings(api_host="127.0.0.1", **database_settings))
    listed = requests.get(f"{api.url}/api/conversations", timeout=30)
    assert listed.status_code == 200
    conversation_id = listed.json()["items"][0]["id"]
    reviewed = requests.post(f"{api.url}/api/conversations/{conversation_id}/review",
                             json={"labels": {"intent": "Other"}}, timeout=30)
    assert reviewed.status_code == 200 and reviewed.json()["review"]["by"] == "local"
    assert requests.get(f"{api.url}/api/session", timeout=30).json()["tokens_required"] is False
    # A page of another site that made its name resolve to 127.0.0.1 (DNS rebinding) names itself.
    rebound = requests.get(f"{api.url}/api/conversations", headers={"Host": "evil.example:8000"}, timeout=30)
    assert rebound.status_code == 403
    assert requests.get(f"{api.url}/api/conversations", headers={"Host": "localhost:8000"}, timeout=30).ok


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "api.internal"])
def test_without_tokens_an_api_bound_elsewhere_answers_403_naming_api_tokens(
    make_settings: SettingsFactory, start_api: StartAPI, database_settings: dict[str, Any], mongo_db: Any, host: str
) -> None:
    seed_reviewable(mongo_db)
    api = start_api(make_settings(api_host=host, **database_settings))
    for path in ("/api/conversations", "/api/session"):
        response = requests.get(f"{api.url}{path}", timeout=30)
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "forbidden" and "API_TOKENS" in response.json()["error"]["message"]
    assert requests.get(f"{api.url}/api/stats", timeout=30).status_code == 200


def test_login_without_tokens_says_there_is_nothing_to_log_in_to(
    make_settings: SettingsFactory, start_api: StartAPI
) -> None:
    api = start_api(make_settings(api_host="127.0.0.1"))
    assert "API_TOKENS is not set" in requests.get(f"{api.url}/login", timeout=30).text
    assert login(api, "anything-at-all").status_code == 400


# --- the setting ---------------------------------------------------------------------------------


def test_api_tokens_is_a_secret_and_parsed() -> None:
    settings = load_settings({"api_tokens": " alice:tok-alice-1 , bob:tok-bob-22 "}, environ={}, env_file=None)
    assert isinstance(settings.api_tokens, SecretStr)
    assert "tok-alice-1" not in repr(settings) and "tok-alice-1" not in str(settings.api_tokens)
    assert settings.api_token_names == {"tok-alice-1": "alice", "tok-bob-22": "bob"}
    assert load_settings({"api_tokens": "  "}, environ={}, env_file=None).api_token_names == {}


@pytest.mark.parametrize(("value", "says"), [
    ("alice", "entry 1 must be 'name:token'"),
    ("alice:Zq7w", "shorter than 8"),
    ("alice:tok-alice-1,alice:tok-alice-2", "named twice"),
    ("alice:tok-same-111,bob:tok-same-111", "same token"),
    ("al ice:tok-alice-1", "entry 1"),
])
def test_a_malformed_api_tokens_is_a_config_error_that_shows_no_token(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({}, environ={"API_TOKENS": value}, env_file=None)
    message = str(error.value)
    assert "API_TOKENS" in message and says in message
    for secret in ("tok-alice-1", "tok-alice-2", "tok-same-111", "Zq7w"):
        assert secret not in message
