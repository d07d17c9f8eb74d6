"""GET /dashboard: sign-in, sessions and headers over HTTP, then the page in a real headless Chromium.

The browser test drives Debian's ``chromium`` with its ``chromedriver`` (Selenium): it signs
in through the form, waits for the data, checks that every chart drew the traffic sent
here and that the console has no errors (a CSP violation would be one), and saves a
screenshot to ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Deployed, create_key, ledger_row

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHARTS = ["chart-requests", "chart-cost", "chart-latency", "chart-cache"]


def send_traffic(deployed: Deployed, n: int) -> None:
    headers = {"Authorization": f"Bearer {deployed.api_key}"}
    ids = []
    for _ in range(n):
        body = {"model": "echo", "messages": [{"role": "user", "content": f"dashboard {uuid.uuid4()}"}]}
        answer = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200
        ids.append(answer.headers["x-request-id"])
    ledger_row(deployed, ids[-1])


def test_login_form_sessions_and_headers(deployed: Deployed) -> None:
    base = deployed.base_url
    page = httpx.get(f"{base}/dashboard")
    assert page.status_code == 200 and 'action="/dashboard/login"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"

    assert httpx.get(f"{base}/dashboard/data").status_code == 401
    wrong = httpx.post(f"{base}/dashboard/login", data={"key": "rg-nope-nope"})
    assert wrong.status_code == 401 and "not a valid admin key" in wrong.text
    user_key = create_key(deployed.redis_url, "acme", "dash-user", "free")
    assert httpx.post(f"{base}/dashboard/login", data={"key": user_key}).status_code == 403

    with httpx.Client(base_url=base) as browser:
        signed_in = browser.post("/dashboard/login", data={"key": deployed.admin_key})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
        assert deployed.admin_key not in signed_in.headers["set-cookie"]
        assert 'id="chart-requests"' in browser.get("/dashboard").text
        data = browser.get("/dashboard/data", params={"window_s": 900}).json()
        assert data["overview"]["object"] == "overview" and len(data["series"]["points"]) == 30
        assert browser.post("/dashboard/logout").status_code == 303
        assert browser.get("/dashboard/data").status_code == 401

    by_header = httpx.get(f"{base}/dashboard", headers={"Authorization": f"Bearer {deployed.admin_key}"})
    assert 'id="chart-requests"' in by_header.text and "raygate_dashboard=" in by_header.headers["set-cookie"]
    assert httpx.get(f"{base}/dashboard/static/uPlot.iife.min.js").status_code == 200
    assert httpx.get(f"{base}/dashboard/static/login.html").status_code == 404


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless Chromium (Debian's package) under Selenium, with the console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "install Debian's chromium and chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def wait_for(browser: Any, script: str, timeout_s: float = 30.0) -> Any:
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout_s
    while not (value := browser.execute_script(f"return {script};")):
        assert time.monotonic() < deadline, f"never true: {script}"
    return value


def test_dashboard_in_headless_chromium(deployed: Deployed, chromium: Any) -> None:
    from selenium.webdriver.common.by import By

    send_traffic(deployed, 3)
    chromium.get(f"{deployed.base_url}/dashboard")
    chromium.find_element(By.ID, "key").send_keys(deployed.admin_key)
    chromium.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(chromium, "document.body.dataset.loaded === '1'")

    for chart in CHARTS:  # a drawn uPlot canvas per chart, with non-blank pixels
        drawn = chromium.execute_script(
            "const c = document.querySelector('#' + arguments[0] + ' canvas');"
            "if (!c) return 0; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;", chart)
        assert drawn > 100, chart
    requests_drawn = chromium.execute_script("return plots['chart-requests'].data[1].reduce((a, b) => a + b, 0);")
    assert requests_drawn >= 3
    numbers = chromium.find_element(By.ID, "numbers").text
    assert "Requests" in numbers and "Cost" in numbers
    assert chromium.find_elements(By.CSS_SELECTOR, "#health td")  # deployment health rows
    assert chromium.find_element(By.ID, "error").text == ""

    refreshes = int(chromium.execute_script("return document.body.dataset.refreshes;"))
    chromium.execute_script("document.getElementById('window').value = '900';"
                            "document.getElementById('window').dispatchEvent(new Event('change'));")
    wait_for(chromium, f"Number(document.body.dataset.refreshes) > {refreshes}")

    ARTIFACTS.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    errors = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
