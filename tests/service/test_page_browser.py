"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright, against
``python -m service`` serving the committed MNIST and CIFAR-10 bundles.

Skipped, with the reason, where Playwright or Chromium is missing; ``.ci/run`` installs
Chromium so CI runs them. Every control is driven with the keyboard at least once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.browser import chromium, missing_reason
from loadtest.server import serving
from service.web import SAMPLES_DIR

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "models" / "mnist" / "bundle"
CIFAR10 = ROOT / "models" / "cifar10" / "bundle"
KEY = "browser-test-key"


def gated_layers(bundle: Path) -> dict[str, int]:
    """The bundle's gated layers and their filters, from its manifest."""
    return json.loads((bundle / "manifest.json").read_text())["gated_layers"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def mnist_url() -> Iterator[str]:
    """The committed MNIST bundle with the perturb demo on."""
    with serving(MNIST, env={"PATHGUARD_PERTURB": "true"}, ready_timeout=120) as server:
        yield server.url


@pytest.fixture(scope="module")
def cifar_url() -> Iterator[str]:
    """The committed CIFAR-10 bundle behind an API key (perturb off, the default)."""
    with serving(CIFAR10, env={"PATHGUARD_API_KEY": KEY}, ready_timeout=120) as server:
        yield server.url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(30_000)
    yield page
    context.close()
    # 4xx answers the tests provoke show up as console errors of the failed fetch
    assert not [e for e in errors if "status of 4" not in e], errors


def own_cells(page: Any, scope: str = "#result") -> int:
    return page.locator(f"{scope} figure.path-own rect").count()


def test_page_loads_with_samples_and_the_perturb_control(page, mnist_url):
    page.goto(mnist_url)
    assert page.title().startswith("pathguard")
    expect_samples = sorted((SAMPLES_DIR / "mnist").glob("*.png"))
    page.wait_for_selector("#samples button.sample")
    assert page.locator("#samples button.sample").count() == len(expect_samples) == 10
    assert page.locator("#perturb").is_visible()
    assert page.locator("#perturb-button").is_disabled()  # nothing chosen yet


def test_uploading_a_test_image_shows_prediction_verdict_and_path(page, mnist_url):
    page.goto(mnist_url)
    page.set_input_files("#file", str(SAMPLES_DIR / "mnist" / "7.png"))
    page.wait_for_selector("#result figure.path-own rect")
    assert page.locator("#result .prediction .label").inner_text() == "7"
    assert page.locator("#result .topk li").count() == 5
    assert page.locator("#result .verdict").inner_text().startswith(("Clean", "Adversarial"))
    layers = gated_layers(MNIST)
    assert own_cells(page) == sum(layers.values())  # one cell per filter of every gated layer
    assert page.locator("#result figure.path-own .path-row").count() == len(layers)
    assert page.locator("#result figure.path-typical rect").count() == sum(layers.values())
    assert page.locator("#result .anomalies li").count() == 3
    title = page.locator("#result figure.path-own rect").first.locator("title").text_content()
    assert "filter 0" in title and 'of "7" images open it' in title


def test_a_non_image_shows_the_api_error_as_a_message(page, mnist_url, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    page.goto(mnist_url)
    page.set_input_files("#file", str(text))
    alert = page.locator("#message")
    alert.wait_for(state="visible")
    assert "not an image" in alert.inner_text() and "not_an_image" in alert.inner_text()
    assert page.locator("#result").is_hidden()


def test_perturb_shows_both_paths_and_verdicts(page, mnist_url):
    page.goto(mnist_url)
    page.set_input_files("#file", str(SAMPLES_DIR / "mnist" / "3.png"))
    page.wait_for_selector("#result figure.path-own rect")
    page.select_option("#attack", "pgd")
    page.fill("#eps", "0.3")
    page.click("#perturb-button")
    page.wait_for_selector("#perturb-body .compare")
    columns = page.locator("#perturb-body .compare .column")
    assert columns.count() == 2
    assert page.locator("#perturb-body figure.path-own").count() == 2
    assert own_cells(page, "#perturb-body") == 2 * sum(gated_layers(MNIST).values())
    assert page.locator("#perturb-body .verdict").count() == 2
    src = columns.nth(1).locator("img.preview").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert "prediction" in page.locator("#perturb-body .perturb-summary").inner_text()


def test_every_control_works_with_the_keyboard(page, mnist_url):
    page.goto(mnist_url)
    page.wait_for_selector("#samples button.sample")
    # Tab from the file input to the first sample, Enter picks it
    page.focus("#file")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "sample"
    page.keyboard.press("Enter")
    page.wait_for_selector("#result figure.path-own rect")
    assert page.locator("#result .prediction .label").inner_text() == "0"
    # the path picture: focus it and walk the cells with the arrow keys
    grid = page.locator("#result figure.path-own .path-grid")
    grid.focus()
    info = page.locator("#result figure.path-own .cell-info")
    assert "filter 0" in info.inner_text()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    assert "features.7, filter 2" in info.inner_text()
    page.keyboard.press("End")
    assert "filter 63" in info.inner_text()
    # perturb: the select, the number and the button, by keyboard only
    page.focus("#attack")
    page.keyboard.press("ArrowDown")  # PGD -> FGSM
    assert page.input_value("#attack") == "fgsm"
    page.focus("#eps")
    page.keyboard.press("Control+A")
    page.keyboard.type("0.2")
    page.keyboard.press("Tab")  # the eps/255 output is not focusable: straight to the button
    assert page.evaluate("document.activeElement.id") == "perturb-button"
    page.keyboard.press("Enter")
    page.wait_for_selector("#perturb-body .compare")
    assert "FGSM" in page.locator("#status").inner_text()
    # the API key box opens and takes a key
    page.focus("#key-box summary")
    page.keyboard.press("Enter")
    assert page.locator("#key").is_visible()


def test_phone_width_has_no_sideways_scrolling(browser, mnist_url):
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(mnist_url)
    page.set_input_files("#file", str(SAMPLES_DIR / "mnist" / "7.png"))
    page.wait_for_selector("#result figure.path-own rect")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    box = page.locator("#result figure.path-own rect").first.bounding_box()
    assert box["width"] >= 3  # cells stay visible at phone width
    context.close()


def test_cifar10_upload_needs_and_then_uses_the_api_key(page, cifar_url):
    page.goto(cifar_url)
    page.wait_for_selector("#samples button.sample")
    assert page.locator("#key-box").get_attribute("open") is not None  # the server wants a key
    assert page.locator("#perturb").is_hidden()  # off by default
    cat = SAMPLES_DIR / "cifar10" / "3-cat.png"
    page.set_input_files("#file", str(cat))
    alert = page.locator("#message")
    alert.wait_for(state="visible")
    assert "API key" in alert.inner_text() and "unauthorized" in alert.inner_text()
    page.fill("#key", KEY)
    page.set_input_files("#file", [])
    page.set_input_files("#file", str(cat))
    page.wait_for_selector("#result figure.path-own rect")
    assert page.locator("#message").is_hidden()
    assert page.locator("#result .prediction .label").inner_text() == "cat"
    rows = page.locator("#result figure.path-own .path-row").count()
    assert rows == len(gated_layers(CIFAR10))  # 6 on airbench, 20 on the ResNet-20
