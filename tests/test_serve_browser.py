"""The web chat page in a real browser: Debian's headless Chromium driven by Selenium (chromium-driver).

The page is opened from a running server, switched between Korean and English, given a system prompt, and
sent a Korean message; the test waits for the streamed answer (watching the DOM change piece by piece),
sends a second turn to check that the conversation is carried over, and saves a screenshot.

Outside CI the test skips when Chromium, chromedriver or selenium is missing; in CI (.ci/run installs them)
their absence is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import pytest

from engine_apps import ENGINES, serving

from kfoundry.serve.app import ServeConfig
from kfoundry.serve.smoke import random_checkpoint

MODEL = "kf-browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-default-apps", "--disable-extensions", "--window-size=1000,800"]

# Records the bodies the page POSTs, so the test can check what a second turn sends.
FETCH_SPY = """
window.__bodies = [];
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body) window.__bodies.push(opts.body);
  return realFetch(url, opts);
};
"""

# Counts how often the text of an assistant message changes: a streamed answer changes many times.
UPDATE_COUNTER = """
window.__updates = 0;
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    if (el && el.classList.contains("assistant")) window.__updates++;
  }
}).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
"""


def browser_or_skip():
    """(chromium, chromedriver) paths, or skip — or fail in CI, where .ci/run installs them."""
    missing = []
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium:
        missing.append("chromium")
    if not driver:
        missing.append("chromedriver (Debian: chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"browser test needs {', '.join(missing)}"
        if os.environ.get("KFOUNDRY_REQUIRE_SHARED") or os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (required in CI)")
        pytest.skip(reason)
    return chromium, driver


@contextlib.contextmanager
def chromium_driver(chromium: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="kfoundry-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium  # with both paths given, Selenium never tries to download a driver
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        d = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        try:
            yield d
        finally:
            d.quit()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("browser") / "ckpt", max_seq_len=512)


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_page_streams_a_korean_answer(ckpt, tmp_path, engine):
    """The same page, whatever engine runs the model behind our front (torch, or llama.cpp's llama-server)."""
    chromium, driver = browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(ckpt, ServeConfig(model_name=MODEL), engine, max_batch=4, max_queue=64) as srv, \
            chromium_driver(chromium, driver) as d:
        d.get(srv.url + "/")
        wait = WebDriverWait(d, 60)
        by_id = lambda name: d.find_element(By.ID, name)
        wait.until(lambda _: by_id("model").text.startswith(MODEL))  # the page asked /v1/models

        # Korean interface (switch to it if the browser's language chose English).
        if by_id("send").text != "보내기":
            by_id("lang").click()
        assert by_id("send").text == "보내기" and by_id("new-chat").text == "새 대화"
        assert d.execute_script("return document.documentElement.lang") == "ko"

        by_id("toggle-settings").click()
        by_id("system").send_keys("당신은 친절한 한국어 도우미입니다.")
        for name, value in (("temperature", "1"), ("max-tokens", "24")):
            by_id(name).clear()
            by_id(name).send_keys(value)
        d.execute_script(FETCH_SPY + UPDATE_COUNTER)

        def ask(text: str, turn: int) -> str:
            by_id("input").send_keys(text)
            by_id("send").click()
            wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn
                       and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state")
                       in ("done", "error"))
            last = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            assert last.get_attribute("data-state") == "done", last.text
            return d.execute_script("return arguments[0].textContent", last)

        first = ask("안녕하세요! 한국어로 자기소개를 해 주세요.", 1)
        assert first.strip()
        assert d.execute_script("return window.__updates") >= 3  # the answer arrived in pieces
        assert "완료" in by_id("status").text
        second = ask("고맙습니다. 조금 더 말해 주세요.", 2)
        assert second.strip()

        bodies = [json.loads(b) for b in d.execute_script("return window.__bodies")]
        assert len(bodies) == 2 and all(b["stream"] is True and b["model"] == MODEL for b in bodies)
        assert [m["role"] for m in bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
        assert bodies[1]["messages"][0]["content"] == "당신은 친절한 한국어 도우미입니다."
        assert bodies[1]["messages"][1]["content"] == "안녕하세요! 한국어로 자기소개를 해 주세요."
        assert bodies[1]["messages"][2]["content"] == first  # multi-turn: the first answer is sent back
        assert bodies[1]["max_tokens"] == 24 and bodies[1]["temperature"] == 1

        shot = tmp_path / "kfoundry-chat.png"
        assert d.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000

        # English interface; "new chat" clears the conversation.
        by_id("lang").click()
        assert by_id("send").text == "Send" and d.execute_script("return document.documentElement.lang") == "en"
        by_id("new-chat").click()
        assert d.find_elements(By.CSS_SELECTOR, ".msg") == [] and by_id("empty").is_displayed()
