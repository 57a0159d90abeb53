"""Reviewing labels in a real browser: Debian's headless Chromium driven by Selenium.

The API runs with API_TOKENS on a SecantusDB database of classified conversations, one of which
holds ``<script>`` and ``<img onerror>`` in its text. The test logs in on /login, filters the
list, opens that conversation (its text must show as text and run nothing), corrects a label, and
sees the dashboard count the correction and the agreement move. ``UPDATE_SCREENSHOTS=1`` writes
the page to docs/review.png for the README.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import RunningAPI, SettingsFactory
from tests.review_data import XSS_TEXT, seed_reviewable
from tests.test_dashboard_browser import CHROMEDRIVER, CHROMIUM, ROOT, browser, text_of, wait_until  # noqa: F401

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium (see test_dashboard_browser)")


@pytest.fixture
def review_api(make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_uri: str,
               mongo_db_name: str, mongo_db: Any) -> RunningAPI:
    seed_reviewable(mongo_db, extra_text=XSS_TEXT)
    return start_api(make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name,
                                   api_tokens="alice:tok-alice-1,bob:tok-bob-22"))


def rows(driver: Any) -> list[dict[str, str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#list tbody tr[data-id]')).map(r => ({"
        "number: r.dataset.number, intent: r.querySelector('[data-field=intent]').textContent}));")


def test_log_in_filter_open_review_and_see_the_dashboard_change(
    browser: Any, review_api: RunningAPI, mongo_db: Any, tmp_path: Path  # noqa: F811 - the imported fixture
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    # Without a login the page says so and links to /login.
    browser.get(f"{review_api.url}/conversations?needs_review=true")
    wait_until(browser, "return document.body.dataset.state", "login")
    browser.find_element(By.ID, "login-link").click()
    wait_until(browser, "return !!document.getElementById('token')")
    browser.find_element(By.ID, "token").send_keys("tok-alice-1")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_until(browser, "return document.body.dataset.state", "ready")
    assert browser.current_url.endswith("/conversations?needs_review=true")
    assert text_of(browser, "who") == "alice"
    cookies = {c["name"]: c for c in browser.get_cookies()}
    assert cookies["classifier_session"]["httpOnly"] and cookies["classifier_session"]["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # out of reach of the page's scripts
    flagged = {r["number"] for r in rows(browser)}
    assert flagged == {"r1", "r2", "r4", "r6"}  # the needs_review filter from the URL

    # Filter by a label and by text.
    Select(browser.find_element(By.ID, "filter-topic")).select_by_visible_text("Service Quality")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait_until(browser, "return document.querySelectorAll('#list tbody tr[data-id]').length", 1)
    assert rows(browser) == [{"number": "r6", "intent": "Complaint"}]

    # Open it: the markup in the customer's text is shown as text and runs nothing.
    browser.find_element(By.CSS_SELECTOR, "#list tbody tr[data-id] button").click()
    wait_until(browser, "return document.getElementById('transcript').children.length", 2)
    first_turn = browser.execute_script("return document.querySelector('#transcript li').lastChild.textContent")
    assert first_turn == XSS_TEXT
    assert browser.execute_script("return document.querySelectorAll('#detail script, #detail img').length") == 0
    assert browser.execute_script("return window.pwned === undefined")
    intent = browser.execute_script("return document.querySelector('[data-fact=intent]').textContent")
    assert "confidence 0.20" in intent

    stats = requests.get(f"{review_api.url}/api/stats", timeout=30).json()
    assert stats["agreement"]["intent"] == {"n": 0, "accuracy": None}
    [intent_counts] = [f["counts"] for f in stats["fields"] if f["name"] == "intent"]
    complaints = {row["label"]: row["count"] for row in intent_counts}["Complaint"]

    # Correct the intent: the list, the detail and the database show the review, by alice.
    Select(browser.find_element(By.ID, "review-intent")).select_by_visible_text("Service Outage")
    browser.find_element(By.ID, "note").send_keys("the outage, not the agent")
    browser.find_element(By.ID, "save").click()
    wait_until(browser, "return document.getElementById('saved').textContent", "Saved.")
    assert rows(browser) == [{"number": "r6", "intent": "Service Outage"}]
    assert "Reviewed by alice" in text_of(browser, "review-state")
    stored = mongo_db["sentimental_analysis"].find_one({"conversation_number": "r6"})
    assert stored["review"]["labels"]["intent"] == "Service Outage" and stored["review"]["by"] == "alice"
    assert stored["classification"]["intent"] == "Complaint"  # the model's answer, kept

    screenshot = tmp_path / "review.png"
    browser.set_window_size(1280, 1400)
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(screenshot, ROOT / "docs" / "review.png")

    # "Next needing review": the lowest confidence among the flagged ones not reviewed yet (r2, 0.35).
    browser.find_element(By.ID, "next-review").click()
    wait_until(browser, "return document.getElementById('detail-number').textContent", "r2")

    # The dashboard counts the effective labels, and the agreement moved: the model disagreed once.
    browser.get(f"{review_api.url}/dashboard")
    wait_until(browser, "return document.body.dataset.state", "ready")
    shown = {row[0]: int(row[1]) for row in browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"table-intent\"] tbody tr'))"
        ".map(r => Array.from(r.cells).map(c => c.textContent.trim()));")}
    assert shown.get("Complaint", 0) == complaints - 1 and shown["Service Outage"] == 1
    assert text_of(browser, "agreement") == "intent 0% (0 of 1); topic 100% (1 of 1); sentiment 100% (1 of 1)"
    link = browser.execute_script("return document.querySelector('[data-testid=\"review-link\"]').getAttribute('href')")
    assert link.startswith("/conversations?") and "needs_review=true" in link
