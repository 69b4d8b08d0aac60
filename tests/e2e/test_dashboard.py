"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium
through Debian's chromedriver (the same build, so their versions always match).

The browser opens the one-time login link, lands on the page, finds the
provider in the providers table, and streams a chat answer through the
network from the page's chat box. A screenshot of the page is kept in
``build/artifacts/`` (the README's picture, docs/dashboard.png, is one).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import openai
import pytest
import trio

from p2pnode.inference import dashboard, keys, openai_api
from p2pnode.tests.e2e.network import BOUND_S, MODEL, Network

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts"


def _browse(link: str, provider: str, screenshot: Path) -> tuple[str, str, list[str]]:
    """In a thread: the browser's run through the page. Returns the provider table's
    text, the chat answer, and what the browser's console said."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(flag)  # fmt: skip
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or ""))
    try:
        driver.set_page_load_timeout(BOUND_S)
        wait = WebDriverWait(driver, BOUND_S)
        driver.get(link)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        wait.until(lambda d: provider[:8] in d.find_element(By.ID, "providers").text)
        providers = driver.find_element(By.ID, "providers").text
        option = f"#chat-model option[value='{MODEL}']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, option))
        driver.find_element(By.ID, "chat-input").send_keys("Name one colour of the sky.")
        driver.find_element(By.ID, "chat-send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done]"))
        turn = driver.find_element(By.CSS_SELECTOR, ".turn.assistant")
        answer = turn.find_element(By.CLASS_NAME, "text").text
        assert turn.get_attribute("data-done") == "yes", answer
        # One more poll, so the picture shows the session and tokens the chat made.
        wait.until(lambda d: MODEL in d.find_element(By.ID, "sessions").text)
        team = driver.find_element(By.ID, "keys").text
        assert "ci-bot" in team, team
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        console = [entry["message"] for entry in driver.get_log("browser")]
        return providers, answer, console
    finally:
        driver.quit()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromium-driver (./dev setup installs them as root)",
)
async def test_the_page_lists_the_provider_and_streams_a_chat(
    network: Network, tmp_path: Path
) -> None:
    provider = await network.add_provider()
    logins = dashboard.Login()
    team_key = keys.add_key(tmp_path, "ci-bot", 10**18, 60)
    url = await network.nursery.start(
        functools.partial(openai_api.serve, logins=logins, ring=keys.KeyRing(tmp_path)),
        network.consumer,
        network.api_key,
        "127.0.0.1:0",
    )
    # A teammate's request first, with their own key: the page lists its use.
    bot = openai.AsyncOpenAI(base_url=url, api_key=team_key, max_retries=0)
    with trio.fail_after(BOUND_S):
        await bot.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    link = logins.new_link(url.removesuffix("/v1"))
    screenshot = ARTIFACTS / "dashboard.png"
    with trio.fail_after(BOUND_S * 3):
        providers, answer, console = await trio.to_thread.run_sync(
            _browse, link, provider.peer_id, screenshot
        )
    assert MODEL in providers
    assert answer.strip(), "the chat box showed no answer"
    assert network.consumer.consumer.counters.requests == 2  # the bot's, then the page's
    assert provider.provider is not None
    assert provider.provider.counters.requests == 2
    assert not [line for line in console if "SEVERE" in line or "Error" in line], console
    assert screenshot.stat().st_size > 10_000
