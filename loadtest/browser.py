"""Headless Chromium for the web page's tests and screenshots: Debian's ``chromium`` driven by
Playwright for Python (``chromium.launch(executable_path=...)``: Playwright's own browser
download is not used).

``find_chromium()`` looks at ``PATHGUARD_CHROMIUM``, then ``chromium`` and
``chromium-browser`` on the PATH; ``missing_reason()`` says why the browser tests cannot run
here (None when they can).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Chromium flags: root in a container needs --no-sandbox; no GPU on these machines.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """The Chromium executable to drive: ``PATHGUARD_CHROMIUM``, else one on the PATH; None."""
    configured = os.environ.get("PATHGUARD_CHROMIUM")
    if configured:
        return configured if os.path.isfile(configured) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason() -> str | None:
    """Why a browser cannot be driven here (what to install), or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (it is in the dev extra: pip install -e '.[dev]')"
    if find_chromium() is None:
        return ("no Chromium browser: install Debian's (apt-get install -y chromium; .ci/run "
                "does) or point PATHGUARD_CHROMIUM at one")
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (a Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
