"""/ui driven as a person would: headless Chromium against a real server on the demo model.

The page gets its token typed into its API-key field, explains the demo
prompt, and the DOM is checked against the same explanation fetched
directly from /v1/explain: every unit, its score, the legend's scale, the
colours, the hover detail and the cost. Then generate-and-explain per token
(switching target tokens) and steering side by side. Screenshots go to the
test's temporary folder, or to $ATMAN_SCREENSHOT_DIR when set (docs/ui.png
is made that way). Tests ask for ``browser`` before ``ui_server``: without
Chromium they skip before a server is started.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

import httpx
import pytest

from atman_server.demo import DEMO_PROMPT, DEMO_TARGET
from atman_vllm.view.scale import POSITIVE_RGB

from .conftest import TOKEN

pytestmark = pytest.mark.engine
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _api(server, path: str, body: dict) -> dict:
    r = httpx.post(f"http://{server.http}{path}", json=body, headers=AUTH, timeout=120)
    r.raise_for_status()
    return r.json()


def _screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ATMAN_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _rgb(css_colour: str) -> tuple[int, int, int]:
    """'rgb(214, 96, 77)' or 'color(srgb 0.839 0.376 0.302)' (what Chromium reports for color-mix)."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", css_colour)]
    if css_colour.startswith("color("):
        return tuple(round(255 * x) for x in numbers[:3])  # type: ignore[return-value]
    return tuple(round(x) for x in numbers[:3])  # type: ignore[return-value]


def _units(browser, where: str = "prompt") -> list[dict]:
    return browser.evaluate(
        f"[...document.querySelectorAll('#heat-{where} .u')].map(e => ({{text: e.textContent, "
        "start: Number(e.dataset.start), length: Number(e.dataset.length), score: Number(e.dataset.score), "
        "background: getComputedStyle(e).backgroundColor}))")


def _run(browser, button: str = "explain") -> None:
    browser.evaluate("document.body.dataset.state = 'idle'")
    browser.evaluate(f"document.getElementById({json.dumps(button)}).click()")
    state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
    assert state == "done", browser.evaluate("document.getElementById('status').textContent")


def test_ui_is_served_without_a_token_and_its_api_needs_one(ui_server):
    page = httpx.get(f"http://{ui_server.http}/ui", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert 'id="atman-config"' in page.text and "/v1/explain" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing to fetch from elsewhere
    body = {"prompt": DEMO_PROMPT, "target": DEMO_TARGET}
    assert httpx.post(f"http://{ui_server.http}/v1/explain", json=body, timeout=60).status_code == 401


def test_page_explains_the_demo_prompt(browser, ui_server, tmp_path):
    # The address `make demo` prints: inputs from the query, run=1 starts the explanation at once.
    query = urllib.parse.urlencode({"prompt": DEMO_PROMPT, "target": DEMO_TARGET, "granularity": "word", "run": 1})
    browser.navigate(f"http://{ui_server.http}/ui?{query}")
    assert browser.evaluate("document.getElementById('prompt').value") == DEMO_PROMPT
    # It ran without the token, so the API refused, and the page says so.
    assert browser.wait_for("document.body.dataset.state === 'error'")
    assert "401" in browser.evaluate("document.getElementById('status').textContent") or \
        "Unauthorized" in browser.evaluate("document.getElementById('status').textContent")
    browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    _run(browser)

    expected = _api(ui_server, "/v1/explain", {"prompt": DEMO_PROMPT, "target": DEMO_TARGET,
                                                "options": {"granularity": "word"}})
    scores = expected["explanations"][0]["prompt_scores"]
    units = _units(browser)
    assert [(u["start"], u["length"], u["text"]) for u in units] == [(s["start"], s["length"], s["text"]) for s in scores]
    for u, s in zip(units, scores):  # the same engine and inputs: the same numbers up to float32 noise
        assert u["score"] == pytest.approx(s["score"], rel=1e-3, abs=1e-5)
    # The units and the text between them spell the prompt exactly.
    assert browser.evaluate("document.getElementById('heat-prompt').textContent") == DEMO_PROMPT

    scale = max(abs(s["score"]) for s in scores)
    assert float(browser.evaluate("document.getElementById('legend').dataset.scale")) == pytest.approx(scale, rel=1e-3)
    legend = browser.evaluate("document.getElementById('legend').textContent")
    assert f"{scale:.4g}"[:4] in legend and "−" in legend and "+" in legend
    assert "linear-gradient" in browser.evaluate(
        "getComputedStyle(document.querySelector('#legend .bar')).backgroundImage")
    # Colours: the largest |score| gets its sign's full colour, a zero score white.
    top = max(units, key=lambda u: abs(u["score"]))
    if top["score"] > 0:
        assert _rgb(top["background"]) == pytest.approx(POSITIVE_RGB, abs=2)
    weakest = min(units, key=lambda u: abs(u["score"]))
    assert all(c >= 255 * (1 - abs(weakest["score"]) / scale) - 3 for c in _rgb(weakest["background"]))

    # Hovering a unit shows its exact score.
    index = units.index(top)
    browser.hover(f"#heat-prompt .u:nth-of-type({index + 1})")
    detail = browser.wait_for("document.getElementById('detail').textContent.includes('score') && "
                              "document.getElementById('detail').textContent")
    assert json.dumps(top["text"]) in detail and repr(top["score"])[:6] in detail

    stats = browser.evaluate("document.getElementById('stats').textContent")
    assert f"{expected['stats']['forward_passes']} ({expected['stats']['perturbations']} perturbed + 1)" in stats
    assert "computed tokens" in stats and "cached tokens" in stats
    top_row = browser.evaluate("document.querySelector('#top tbody tr').textContent")
    best = max(scores, key=lambda s: s["score"])
    assert json.dumps(best["text"]) in top_row
    assert browser.console == [], browser.console
    browser.screenshot(_screenshot_dir(tmp_path) / "ui.png")


def test_page_generates_then_explains_and_switches_target_tokens(browser, ui_server, tmp_path):
    query = urllib.parse.urlencode({"prompt": DEMO_PROMPT, "granularity": "sentence", "target_granularity": "token",
                                    "max_tokens": 3})
    browser.navigate(f"http://{ui_server.http}/ui?{query}")
    browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    _run(browser)  # no target: the page generates one, then explains it
    generated = browser.evaluate("document.getElementById('target').value")
    completion = _api(ui_server, "/v1/completions", {"model": ui_server.model, "prompt": DEMO_PROMPT,
                                                      "max_tokens": 3, "temperature": 0})
    assert generated == completion["choices"][0]["text"] != ""
    assert browser.evaluate("window.atmanResult.target") == generated

    # A target of several tokens: one explanation per token, one tab each.
    target = " a pilot. Otto"
    browser.evaluate(f"document.getElementById('target').value = {json.dumps(target)}")
    _run(browser)
    result = browser.evaluate("window.atmanResult")
    assert result["target"] == target
    tabs = browser.evaluate("[...document.querySelectorAll('#targets [role=tab]')].map(b => b.textContent)")
    assert len(tabs) == len(result["explanations"]) == len(result["target_tokens"]) >= 2
    last = len(tabs) - 1
    browser.evaluate(f"document.querySelectorAll('#targets [role=tab]')[{last}].click()")
    selected = browser.evaluate("[...document.querySelectorAll('#targets [role=tab]')]"
                                ".map(b => b.getAttribute('aria-selected'))")
    assert selected == ["false"] * last + ["true"]
    exp = result["explanations"][last]
    assert [u["score"] for u in _units(browser)] == pytest.approx([s["score"] for s in exp["prompt_scores"]])
    # Later tokens can rest on earlier target tokens: those units are shown too.
    assert [u["text"] for u in _units(browser, "target")] == [s["text"] for s in exp["target_scores"]]
    assert len(exp["target_scores"]) >= 1
    browser.screenshot(_screenshot_dir(tmp_path) / "ui_tokens.png")


def test_page_steers_and_compares_side_by_side(browser, ui_server, tmp_path):
    query = urllib.parse.urlencode({"prompt": DEMO_PROMPT, "max_tokens": 4})
    browser.navigate(f"http://{ui_server.http}/ui?{query}")
    browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    start = DEMO_PROMPT.index("Mira works as a pilot.")
    length = len("Mira works as a pilot.")
    # Select the sentence in the prompt box as a person would with the mouse, then add it with factor 0.05.
    browser.evaluate(f"const p = document.getElementById('prompt'); p.focus(); p.setSelectionRange({start}, {start + length});"
                     "document.getElementById('steer_factor').value = '0.05';"
                     "document.getElementById('steer_add').click()")
    assert "Mira works as a pilot." in browser.evaluate("document.getElementById('steer_list').textContent")
    _run(browser, "steer_run")
    plain = browser.evaluate("document.getElementById('plain_out').textContent")
    steered = browser.evaluate("document.getElementById('steered_out').textContent")
    body = {"model": ui_server.model, "prompt": DEMO_PROMPT, "max_tokens": 4, "temperature": 0}
    assert plain == _api(ui_server, "/v1/completions", body)["choices"][0]["text"]
    controls = [{"start": start, "length": length, "factor": 0.05}]
    assert steered == _api(ui_server, "/v1/completions", {**body, "controls": controls,
                                                          "control_mode": "log-additive"})["choices"][0]["text"]
    browser.screenshot(_screenshot_dir(tmp_path) / "ui_steering.png")
