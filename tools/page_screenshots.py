"""Screenshots of the web page for the README and docs/SERVICE.md, from the code as it is.

    python tools/page_screenshots.py    # writes docs/page/*.png (needs Chromium + Playwright)

Starts ``python -m service`` on the committed MNIST and CIFAR-10 bundles with the perturb demo
on, picks a sample image, asks for a PGD copy, and saves the page at desktop width and at a
phone's 360 px.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from loadtest.browser import chromium, missing_reason
from loadtest.server import serving

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "page"
#: (name, bundle, sample file, eps for the perturb demo)
SHOTS = [("mnist", ROOT / "models" / "mnist" / "bundle", "3.png", "0.3"),
         ("cifar10", ROOT / "models" / "cifar10" / "bundle", "3-cat.png", "0.0314")]


def shoot(browser: object, url: str, sample: str, eps: str, path: Path, width: int,
          perturb: bool) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900},  # type: ignore[attr-defined]
                                  device_scale_factor=1 if width > 500 else 2)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#samples button.sample")
    page.click(f'#samples button.sample:has(img[src$="/{sample}"])')
    page.wait_for_selector("#result figure.path-own rect")
    if perturb:
        page.select_option("#attack", "pgd")
        page.fill("#eps", eps)
        page.click("#perturb-button")
        page.wait_for_selector("#perturb-body .compare", timeout=60_000)
    page.screenshot(path=str(path), full_page=True)
    context.close()
    with Image.open(path) as im:  # a palette PNG: a third of the size, same look for a UI
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    print(f"wrote {path}")  # noqa: T201


def main() -> int:
    reason = missing_reason()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)  # noqa: T201
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        for name, bundle, sample, eps in SHOTS:
            with serving(bundle, env={"PATHGUARD_PERTURB": "true"}) as server:
                shoot(browser, server.url, sample, eps, OUT / f"{name}.png", 1200, True)
                shoot(browser, server.url, sample, eps, OUT / f"{name}-360.png", 360, False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
