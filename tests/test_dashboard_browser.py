"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

The API runs under uvicorn on a SecantusDB database with known results; the test loads /dashboard,
waits for the charts, and checks what the page shows against the database (counted here with plain
queries, independently of the dashboard's pipeline). It also checks the page refreshes by itself
while a job runs, fits a phone's width, and takes a screenshot (``UPDATE_SCREENSHOTS=1`` writes it
to docs/dashboard.png for the README; otherwise it stays in the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from api_dependencies import get_embedded_llm
from tests.conftest import RunningAPI, SettingsFactory
from tests.test_batch_processor import RESULTS, batch_env  # noqa: F401  (a fixture)
from tests.test_dashboard import DEFAULT_FIELDS, NOW, URGENCY_FILE, classify_with_a_fourth_field, seed
from utils.embedded_llm import NOTE

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_SECONDS = 90  # generous: the machine is shared

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
    ".ci/run does)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1280,2400"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER or "", log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard_api(
    make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_uri: str, mongo_db_name: str
) -> RunningAPI:
    return start_api(make_settings(mongodb_connection_string=mongo_uri, mongodb_database_name=mongo_db_name))


def wait_until(driver: Any, script: str, expected: Any = True) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.2).until(
        lambda d: d.execute_script(script) == expected,
        message=f"page never reached: {script} == {expected!r}",
    )


def table_rows(driver: Any, testid: str) -> list[list[str]]:
    """The body rows of a table, read from the DOM (also when its <details> is closed)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"' + arguments[0] + '\"] tbody tr'))"
        ".map(r => Array.from(r.cells).map(c => c.textContent.trim()));",
        testid,
    )


def text_of(driver: Any, testid: str) -> str:
    return driver.execute_script(
        "return document.querySelector('[data-testid=\"' + arguments[0] + '\"]').textContent.trim();", testid)


def db_label_counts(database: Any, field: str) -> dict[str, int]:
    labels = database["sentimental_analysis"].distinct(f"classification.{field}")
    return {label: database["sentimental_analysis"].count_documents({f"classification.{field}": label})
            for label in labels}


def assert_charts_show_the_database(driver: Any, database: Any, fields: list[str]) -> None:
    """One chart and one table per label field, each with the database's counts."""
    for field in fields:
        shown = {row[0]: int(row[1]) for row in table_rows(driver, f"table-{field}")}
        assert shown == db_label_counts(database, field), field
        drawn = driver.execute_script(
            "const c = Chart.getChart('chart-' + arguments[0]);"
            "return {labels: c.data.labels, data: c.data.datasets[0].data, area: c.chartArea.width > 0};", field)
        assert dict(zip(drawn["labels"], drawn["data"], strict=True)) == shown
        assert drawn["area"]


def figure_captions(driver: Any) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#charts figcaption')).map(e => e.textContent);")


def test_dashboard_shows_the_database_and_refreshes_while_a_job_runs(
    browser: Any, dashboard_api: RunningAPI, mongo_db: Any, tmp_path: Path
) -> None:
    seed(mongo_db)
    browser.get(f"{dashboard_api.url}/dashboard")
    wait_until(browser, "return document.body.dataset.state", "ready")
    for chart in [*DEFAULT_FIELDS, "trend"]:
        wait_until(browser, f"return document.getElementById('chart-{chart}').dataset.rendered", "true")

    results = mongo_db["sentimental_analysis"]
    assert text_of(browser, "total") == str(results.count_documents({}))
    assert_charts_show_the_database(browser, mongo_db, DEFAULT_FIELDS)
    assert figure_captions(browser) == ["Intent", "Topic", "Sentiment (customer's turns)"]
    # The trend is split by the field with the fewest labels at first.
    assert browser.execute_script("return document.getElementById('trend-field').value") == "sentiment"
    per_day = {row[0]: int(row[1]) for row in table_rows(browser, "table-trend")}
    days: dict[str, int] = {}
    for doc in results.find({}, {"processing_metadata.processed_at": 1}):
        day = doc["processing_metadata"]["processed_at"].strftime("%Y-%m-%d")
        days[day] = days.get(day, 0) + 1
    assert per_day == days
    with_confidence = results.count_documents({"classification.confidence": {"$exists": True}})
    flagged = results.count_documents({"classification.needs_review": True})
    assert text_of(browser, "review") == f"{100 * flagged / with_confidence:.1f}% ({flagged} of {with_confidence})"
    source = mongo_db["conversation_set"]
    assert text_of(browser, "pending") == str(source.count_documents({"status": {"$in": ["pending", None]}}))
    assert text_of(browser, "failed") == str(source.count_documents({"status": "failed"}))
    failures = table_rows(browser, "failures")
    assert [(row[1], row[2], row[3]) for row in failures] == [
        (doc["conversation_number"], doc["failure_type"], doc["failure_reason"])
        for doc in source.find({"status": "failed"}).sort("last_processed_at", -1)
    ]
    jobs = {row[0]: row for row in table_rows(browser, "jobs")}
    assert set(jobs) == {f"{doc['_id']} ({doc['mode']})" for doc in mongo_db["jobs"].find()}
    running = jobs["batch_a (batch)"]
    assert running[1] == "running" and "14 / 40" in running[2] and running[3:6] == ["12", "1", "1"]
    assert jobs["batch_c (continuous)"][1] == "unresponsive"

    # The README's picture.
    screenshot = tmp_path / "dashboard.png"
    height = browser.execute_script("return document.querySelector('footer').getBoundingClientRect().bottom")
    browser.set_window_size(1280, max(900, int(height) + 200))  # the window's frame included
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(screenshot, ROOT / "docs" / "dashboard.png")

    # Live: a job is running, so the page polls; new results appear without a reload.
    before = int(text_of(browser, "total"))
    results.insert_many([{
        "conversation_number": f"live{i}", "source_conversation_id": ObjectId(),
        "classification": {"intent": "Complaint", "topic": "Account/Billing", "sentiment": "Negative"},
        "processing_metadata": {"processed_at": NOW, "batch_job_id": "batch_a"},
    } for i in range(5)])
    mongo_db["jobs"].update_one({"_id": "batch_a"}, {"$set": {"processed": 19, "successful": 17,
                                                              "updated_at": datetime.now(UTC)}})
    wait_until(browser, "return document.querySelector('[data-testid=\"total\"]').textContent.trim()", str(before + 5))
    wait_until(browser, "return document.querySelector('tr[data-job=\"batch_a\"] td:nth-child(4)').textContent", "17")


@pytest.mark.usefixtures("batch_env")  # the processor's environment: this database and the fake Ollama
def test_a_fourth_label_field_goes_from_the_taxonomy_file_to_the_page(
    browser: Any, make_settings: SettingsFactory, start_api: Callable[..., RunningAPI], mongo_db: Any,
    mongo_uri: str, mongo_db_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """TAXONOMY_FILE = the urgency example, and nothing else: the batch processor classifies with four
    fields, and the page draws a fourth chart from /api/stats with the database's counts."""
    results = classify_with_a_fourth_field(mongo_db, monkeypatch)
    api = start_api(make_settings(taxonomy_file=URGENCY_FILE, mongodb_connection_string=mongo_uri,
                                  mongodb_database_name=mongo_db_name))
    browser.get(f"{api.url}/dashboard")
    wait_until(browser, "return document.body.dataset.state", "ready")
    wait_until(browser, "return document.getElementById('chart-urgency').dataset.rendered", "true")
    assert text_of(browser, "total") == str(len(results))
    assert_charts_show_the_database(browser, mongo_db[RESULTS].database, [*DEFAULT_FIELDS, "urgency"])
    assert figure_captions(browser) == ["Intent", "Topic", "Sentiment (customer's turns)", "Urgency"]
    assert browser.execute_script(
        "return document.querySelector('figure[data-field=\"urgency\"]').title") == \
        "how soon the customer needs an answer"
    choices = browser.execute_script(
        "return Array.from(document.getElementById('trend-field').options).map(o => o.value);")
    assert choices == [*DEFAULT_FIELDS, "urgency"]
    browser.execute_script("const s = document.getElementById('trend-field'); s.value = 'urgency';"
                           "s.dispatchEvent(new Event('change'));")
    header = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"table-trend\"] thead th'))"
        ".map(e => e.textContent);")
    assert header[:2] == ["day", "total"] and set(header[2:]) == set(db_label_counts(mongo_db, "urgency"))
    assert browser.save_screenshot(str(tmp_path / "dashboard-urgency.png"))  # to look at, when in doubt


def test_dashboard_filters_by_job_and_fits_a_phone(
    browser: Any, dashboard_api: RunningAPI, mongo_db: Any, tmp_path: Path
) -> None:
    seed(mongo_db)
    browser.set_window_size(390, 844)
    browser.get(f"{dashboard_api.url}/dashboard?job=batch_b")
    wait_until(browser, "return document.body.dataset.state", "ready")
    of_job = mongo_db["sentimental_analysis"].count_documents({"processing_metadata.batch_job_id": "batch_b"})
    assert text_of(browser, "total") == str(of_job)
    assert browser.execute_script("return document.getElementById('job').value") == "batch_b"
    # Nothing wider than the phone's screen but the tables, which scroll inside their own box.
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('input, select')).every(e => e.labels && e.labels.length > 0)")
    assert labels, "every form control has a label"
    assert browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))  # to look at, when in doubt


def test_dashboard_says_why_it_is_empty_without_mongodb(
    browser: Any, make_settings: SettingsFactory, start_api: Callable[..., RunningAPI]
) -> None:
    api = start_api(make_settings(mongodb_connection_string=" "))
    browser.get(f"{api.url}/dashboard")
    wait_until(browser, "return document.body.dataset.state", "error")
    message = browser.execute_script("return document.getElementById('error').textContent")
    assert "MongoDB is not configured" in message and "MONGODB_CONNECTION_STRING" in message
    wait_until(browser, "return document.getElementById('embedded').dataset.checked", "true")
    assert browser.execute_script("return document.getElementById('embedded').hidden")  # a real model


def test_dashboard_says_when_the_labels_are_the_embedded_models(
    browser: Any, make_settings: SettingsFactory, start_api: Callable[..., RunningAPI]
) -> None:
    # The lifespan's state with LLM_ENDPOINT=embedded (the real start: tests/llm/test_embedded_model.py).
    api = start_api(make_settings(mongodb_connection_string=" "), {get_embedded_llm: lambda: NOTE})
    browser.get(f"{api.url}/dashboard")
    wait_until(browser, "return document.getElementById('embedded').dataset.checked", "true")
    assert browser.execute_script("return document.getElementById('embedded').hidden") is False
    notice = browser.execute_script("return document.getElementById('embedded').textContent")
    assert f"embedded model {NOTE}" in notice and "LLM_ENDPOINT" in notice


def test_docs_render_from_local_assets(browser: Any, api_server: RunningAPI) -> None:
    """/docs is Swagger UI served by the API itself: it renders with no other host reachable."""
    browser.get(f"{api_server.url}/docs")
    wait_until(browser, "return !!document.querySelector('.swagger-ui .info .title')")
    wait_until(browser, "return document.querySelectorAll('.opblock').length > 0")
    paths = browser.execute_script(
        "return Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.textContent.trim());")
    assert {"/classify", "/api/stats", "/api/jobs"} <= {p.replace("\u200b", "") for p in paths}
    hosts = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).host);")
    assert set(hosts) <= {api_server.url.removeprefix("http://")}, hosts
