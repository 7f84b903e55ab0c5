"""The web chat in a real headless Chromium (Debian `chromium` + Playwright; skipped when absent).

Needs: `pip install playwright` and `apt-get install -y chromium` (never `playwright install`).
Screenshots are kept under the pytest tmp dir (path printed with -s / on failure).
"""

from __future__ import annotations

import os
import shutil

import pytest
from serve_helpers import ScriptedEngine, png_bytes

CHROMIUM = os.environ.get("QVL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, timeout=60_000)
        yield b
        b.close()


@pytest.fixture(scope="module")
def endless_server(tiny):
    """The tiny model with no end-of-sequence tokens: random weights may otherwise stop at once."""
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.serve.app import ServeSettings, create_app
    from serve_helpers import Running

    model, processor = tiny
    with TransformersEngine(model, processor, name="tiny") as engine:
        engine.eos_ids = set()
        r = Running(create_app(engine, ServeSettings(limit_mm_per_prompt={"image": 2, "video": 1})))
        yield r
        r.stop()


RECORD = """() => {
  window.__lens = [];
  new MutationObserver(() => {
    const a = [...document.querySelectorAll('.msg.assistant .answer')].pop();
    if (a) window.__lens.push(a.textContent.length);
  }).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
}"""


def test_upload_ask_streamed_answer(browser, endless_server, tmp_path):
    tiny_server = endless_server
    img = tmp_path / "red.png"
    img.write_bytes(png_bytes(96, 64))
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.set_default_timeout(60_000)
    page.goto(tiny_server.url + "/")
    page.wait_for_function("document.getElementById('temperature').value !== ''")  # config loaded
    assert page.input_value("#top_k") == "20"
    page.fill("#max_tokens", "40")
    page.set_input_files("#file", str(img))
    page.wait_for_selector("#attach .chip")
    page.fill("#prompt", "What colour is the picture?")
    page.evaluate(RECORD)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    answer = page.text_content(".msg.assistant .answer")
    lens = page.evaluate("window.__lens")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'chat.png'}")
    assert answer and len(answer) > 3 and lens  # piece by piece: test_answer_streams_into_the_page (the tiny model
    # can finish its 40 tokens before the page's first read, and then the server sends them in one write)
    assert page.locator(".msg.user img.thumb").count() == 1
    assert "prompt +" in page.text_content("#status")  # usage line
    # multi-turn: a second question keeps the history; regenerate replaces the last answer; clear empties
    page.fill("#prompt", "And now?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2")
    page.click("#regen")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2")
    assert page.locator(".msg.user").count() == 2
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    assert (tmp_path / "chat.png").stat().st_size > 1000


def test_answer_streams_into_the_page(browser, serve):
    """Tokens that arrive over time appear over time: the page grows the answer as events come."""
    answer = " ".join(f"word{i}" for i in range(24))
    server = serve(ScriptedEngine(answer, delay=0.03))  # ~0.7 s of tokens
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('temperature').value !== ''")
    page.fill("#prompt", "Count.")
    page.evaluate(RECORD)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    lens = page.evaluate("window.__lens")
    assert page.text_content(".msg.assistant .answer").strip() == answer
    assert len(set(lens)) >= 3, f"answer did not stream: {lens}"


def test_reasoning_folded_and_boxes_drawn(browser, serve, tmp_path):
    answer = ('<think>The red square is in the top-left quarter.</think>\n\n```json\n'
              '[{"bbox_2d": [100, 100, 500, 500], "label": "square"}]\n```')
    engine = ScriptedEngine(answer)
    server = serve(engine)
    img = tmp_path / "pic.png"
    img.write_bytes(png_bytes(200, 120, (20, 120, 200)))
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(img))
    page.fill("#system", "You are a detector.")
    page.fill("#prompt", "Locate the square.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    page.wait_for_selector(".msg.assistant .boxes canvas")
    details = page.locator(".msg.assistant details.reasoning")
    assert details.count() == 1 and not details.evaluate("d => d.open")  # folded once the answer starts
    assert "top-left" in details.text_content()
    assert "<think>" not in page.text_content(".msg.assistant .answer")
    size = page.eval_on_selector(".boxes canvas", "c => [c.width, c.height]")
    assert size == [200, 120]
    # a box pixel at the scaled (0-1000 -> pixels) corner has the stroke colour, not the image colour
    pixel = page.eval_on_selector(".boxes canvas", "c => Array.from(c.getContext('2d').getImageData(20, 40, 1, 1).data)")
    assert pixel[:3] != [20, 120, 200]
    page.screenshot(path=str(tmp_path / "boxes.png"), full_page=True)
    sent = engine.seen[-1].messages
    assert sent[0].role == "system" and sent[0].parts == ["You are a detector."]
    # stop: a long answer can be interrupted and the server keeps serving
    engine.answer, engine.delay = "word " * 400, 0.02
    page.fill("#prompt", "Talk a lot.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "[...document.querySelectorAll('.msg.assistant .answer')].pop().textContent.length > 10")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
