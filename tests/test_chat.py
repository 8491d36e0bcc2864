"""The chat page: streaming replies of two models, the Gradio API, and the page driven in a real browser
(Debian's chromium + chromedriver, installed by `make setup`)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from layerprune.chat import respond

from conftest import save_tiny

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    dense = save_tiny(root / "dense")
    from layerprune.cli import main

    assert main(["prune", str(dense), "--remove", "2,3", "--out", str(root / "pruned")]) == 0
    from layerprune.chat import load_chat_model

    return [load_chat_model(str(root / "pruned")), load_chat_model(str(dense))]


def test_describe_reads_the_manifest(pair):
    assert pair[0].num_layers == 4 and "[2, 3] of 6" in pair[0].note
    assert pair[1].num_layers == 6 and "not pruned" in pair[1].note


def test_respond_streams_both_models(pair):
    steps = list(respond(pair, "w1 w2 w3", max_new_tokens=6))
    final = steps[-1]
    assert final[0] and final[1]  # both replies
    assert "tokens/s" in final[2] and "4 layers" in final[2] and "6 layers" in final[3]
    assert len(steps) > 3  # streamed, not one final answer
    # Greedy is deterministic; seeded sampling too.
    again = list(respond(pair, "w1 w2 w3", max_new_tokens=6))[-1]
    assert again[:2] == final[:2]
    s1 = list(respond(pair, "w1 w2 w3", mode="sample", seed=3, max_new_tokens=6))[-1]
    s2 = list(respond(pair, "w1 w2 w3", mode="sample", seed=3, max_new_tokens=6))[-1]
    assert s1[:2] == s2[:2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pair):
    pytest.importorskip("gradio")
    from layerprune.chat import launch

    port = _free_port()
    app = launch(pair, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_gradio_api(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    out = client.predict("w5 w6", "greedy", 0.7, 0.95, 5, 0, api_name="/respond")
    assert out[0] and out[1] and "tokens/s" in out[2] and "tokens/s" in out[3]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def drive(url: str, prompt: str, screenshot: Path | None = None, timeout: float = 120) -> list[str]:
    """Type ``prompt`` into the page at ``url`` in headless chromium, press Send, wait for every reply and its
    speed label; returns the replies (and saves a screenshot)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or "chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=opts)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, timeout)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        n = len(driver.find_elements(By.CSS_SELECTOR, "[id^=speed-]"))
        wait.until(lambda d: all("tokens/s" in d.find_element(By.ID, f"speed-{i}").text for i in range(n)))
        replies = [driver.find_element(By.CSS_SELECTOR, f"#out-{i} textarea").get_attribute("value") or ""
                   for i in range(n)]
        if screenshot is not None:
            time.sleep(0.5)
            driver.save_screenshot(str(screenshot))
        return replies
    finally:
        driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium/chromedriver not installed (make setup)")
def test_page_in_a_real_browser(server, tmp_path):
    pytest.importorskip("selenium")
    shot = tmp_path / "chat.png"
    replies = drive(server, "w7 w8 w9", shot)
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert shot.stat().st_size > 10_000


def test_without_gradio_one_line(pair, tmp_path, capsys, monkeypatch):
    import importlib.util

    from layerprune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    save_tiny(tmp_path / "m")
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'layerprune[ui]'" in err
