"""The dashboard in a real browser (Debian's headless Chromium through its chromedriver) on the
whole system: sign in with a user's token, start a runner from the strategy's own form, see it
running with its position, `kill -9` its worker and see the crash and the restart arrive live
(the page is never reloaded), stop it with flatten, see it stopped; on a phone-sized screen too.
Screenshots are saved in the test's temporary directory."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.conftest import System

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(options=options, service=ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def until(driver: webdriver.Chrome, condition: Any, what: str, timeout: float = 30) -> Any:
    """Wait (polling the page, with a deadline) until `condition(driver)` is truthy."""
    def check(d: webdriver.Chrome) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:  # the card was just redrawn
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, message=what)


def card(driver: webdriver.Chrome, worker_id: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-worker-id="{worker_id}"]')


def field(driver: webdriver.Chrome, worker_id: str, name: str) -> str:
    return card(driver, worker_id).find_element(By.CLASS_NAME, name).text


async def test_sign_in_start_watch_a_crash_and_restart_live_then_stop_with_flatten(
        tmp_path: Path, browser: webdriver.Chrome) -> None:
    system = System(tmp_path)
    await system.start()
    try:
        token = await system.admin.add_user("carol")
        await system.admin.upgrade("carol", "pro", 30)

        browser.get(f"{system.base_url}/ui/")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#sign-in button").click()
        until(browser, lambda d: d.find_element(By.ID, "dashboard").is_displayed(), "signed in")
        until(browser, lambda d: d.find_element(By.ID, "live").text == "live", "stream live")
        loaded_at = browser.execute_script("return window.dashboardLoadedAt")
        assert browser.find_element(By.ID, "hosts-panel").is_displayed() is False  # a user

        # the form comes from the strategy's own parameter schema
        Select(browser.find_element(By.ID, "strategy")).select_by_value("hold")
        browser.find_element(By.NAME, "param-amount").send_keys("2")
        Select(browser.find_element(By.NAME, "param-side")).select_by_value("long")
        browser.find_element(By.ID, "start-button").click()
        until(browser, lambda d: "accepted" in d.find_element(By.ID, "message").text,
              "the start accepted")
        worker_id = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card"),
                          "the runner's card")[0].get_attribute("data-worker-id")
        until(browser, lambda d: card(d, worker_id).get_attribute("data-status") == "running"
              and "long 2 BTC-PERPETUAL" in field(d, worker_id, "positions"),
              "running with its position")
        pid = int(card(browser, worker_id).find_element(
            By.XPATH, ".//dt[.='pid']/following-sibling::dd[1]").text)
        browser.save_screenshot(str(tmp_path / "dashboard-running.png"))

        os.kill(pid, signal.SIGKILL)
        until(browser, lambda d: field(d, worker_id, "restarts") == "1"
              and card(d, worker_id).get_attribute("data-status") == "running",
              "the restart shown live")
        feed = browser.find_element(By.ID, "feed").text
        assert "WorkerCrashed" in feed and "WorkerRestarted" in feed
        assert browser.execute_script("return window.dashboardLoadedAt") == loaded_at
        browser.save_screenshot(str(tmp_path / "dashboard-restarted.png"))

        card(browser, worker_id).find_element(By.CLASS_NAME, "stop-flatten").click()
        until(browser, lambda d: card(d, worker_id).get_attribute("data-status") == "stopped",
              "stopped")
        until(browser, lambda d: "1 position flattened" in d.find_element(By.ID, "message").text,
              "the flatten reported")
        assert field(browser, worker_id, "positions") == "none"
        assert "PositionsFlattened" in browser.find_element(By.ID, "feed").text
        assert browser.execute_script("return window.dashboardLoadedAt") == loaded_at
        browser.save_screenshot(str(tmp_path / "dashboard-stopped.png"))

        # a phone-sized screen: one column, nothing wider than the screen
        browser.set_window_size(390, 844)
        until(browser, lambda d: d.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"),
            "no horizontal scrolling on a phone")
        browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    finally:
        await system.stop()
