"""The playground (runtime/serving/static/) in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright) against the real server process with an API key. The page asks for the key, the example image is
uploaded, questions are asked over two turns, the canvas shows masked positions before the final answer, and each
final answer equals the API's answer to the same request.

PLAYGROUND_SCREENSHOT=docs/playground.png python -m pytest tests/test_playground.py  # the README's screenshot
"""

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from benchmarks.server_process import ServerProcess

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see .ci/run)")

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "eval_009_two_step.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Playwright's own browser download cannot run here: it drives the system's Chromium.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTINGS = {"max_tokens": 32, "block_length": 8, "cache": "dual", "refresh_interval": 4}


@pytest.fixture(scope="module")
def server(engines_dir):
    server = ServerProcess("--engines", str(engines_dir), "--api-key", "playground-key", "--model-name", "llada-v-demo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        browser.close()


def api_answer(server, messages) -> str:
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, **SETTINGS}, timeout=60,
                       headers={"Authorization": "Bearer playground-key"})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def ask(page, question: str, turn: int):
    page.fill("#question", question)
    page.click("#send")
    view = page.locator(".turn.assistant[data-done]").nth(turn)
    view.wait_for(timeout=60_000)
    assert view.get_attribute("data-done") == "true", view.inner_text()
    return view


def test_the_playground_denoises_in_place_and_answers_as_the_api(server, page, tmp_path):
    page.goto(server.url)
    page.locator("#key-form").wait_for(state="visible")  # the server has a key: the page asks for it
    page.fill("#key", "playground-key")
    page.click("#key-form button")
    # A locator assertion, not wait_for_function: that evaluates its string with eval(), which the page's CSP
    # (script-src 'self') refuses.
    playwright_api.expect(page.locator("#status")).to_have_text("ready", timeout=30_000)
    assert page.inner_text("#model") == "llada-v-demo"

    page.set_input_files("#file", str(EXAMPLE))
    page.locator("#preview").wait_for(state="visible")
    page.fill("#max-tokens", str(SETTINGS["max_tokens"]))
    page.fill("#block-length", str(SETTINGS["block_length"]))
    page.select_option("#cache", SETTINGS["cache"])
    page.fill("#refresh-interval", str(SETTINGS["refresh_interval"]))

    first = ask(page, "Describe the picture.", 0)
    image_url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    turn_one = {"role": "user", "content": [{"type": "text", "text": "Describe the picture."},
                                            {"type": "image_url", "image_url": {"url": image_url}}]}
    answer = api_answer(server, [turn_one])
    assert first.locator(".answer").inner_text() == answer and answer
    # Every step was drawn: the first canvases had masked positions, the last one none before the answer's end.
    assert int(first.get_attribute("data-masked-canvases")) >= 1
    assert int(first.get_attribute("data-canvases")) > int(first.get_attribute("data-masked-canvases"))
    assert first.locator(".tok:not(.mask)").count() > 0 and "denoiser calls" in first.locator(".stats").inner_text()

    # The next turn keeps the image: the conversation so far is sent again.
    second = ask(page, "What colour is the shape right of the square?", 1)
    follow_up = api_answer(server, [turn_one, {"role": "assistant", "content": answer},
                                    {"role": "user", "content": "What colour is the shape right of the square?"}])
    assert second.locator(".answer").inner_text() == follow_up

    screenshot = Path(os.environ.get("PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
