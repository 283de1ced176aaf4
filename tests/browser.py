"""Headless Chromium for the playground tests: Debian's `chromium` package driven by the `playwright`
Python package (never `playwright install`, which downloads browsers and fails offline).

Both come from the test set-up (`make test`: `apt-get install -y chromium`, `pip install playwright`). When
either is missing the browser tests fail and say so: they never skip.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling Google's hosts, refused on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_STEP = (
    "run `make test`: its install step runs `apt-get install -y chromium` and `pip install playwright`"
)
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 667}


def require_browser() -> None:
    """Fail (not skip) with what to install when Chromium or Playwright is missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian package `chromium`)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Python package `playwright`")
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}: {INSTALL_STEP}", pytrace=False)


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium; Playwright gives each launch a fresh, empty user-data directory."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageWatch:
    """What went wrong in a page: script errors, console errors, and requests to anything but `origins`."""

    origins: tuple[str, ...]
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> Page:
        page.on("pageerror", lambda exc: self.problems.append(f"script error: {exc}"))
        page.on("console", self._console)
        page.on("request", self._request)
        return page

    def _console(self, message) -> None:
        # Chromium also logs the HTTP errors the page asked for (a 401 for a bad key); the page shows those.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"console error: {message.text}")

    def _request(self, request) -> None:
        if not request.url.startswith((*(origin + "/" for origin in self.origins), "data:", "blob:")):
            self.problems.append(f"request outside the server: {request.url}")


@contextmanager
def open_page(
    browser: Browser, origin: str, viewport: dict[str, int] = DESKTOP, also_allowed: tuple[str, ...] = ()
) -> Iterator[Page]:
    """A page in a fresh context (empty sessionStorage) at `origin`/; fails the test if the page had script
    errors, console errors or requests to anything but the server (and the `also_allowed` origins)."""
    context = browser.new_context(viewport=viewport)
    watch = PageWatch((origin, *also_allowed))
    page = watch.attach(context.new_page())
    try:
        page.goto(origin + "/")
        yield page
    finally:
        context.close()
    assert not watch.problems, watch.problems


def screenshot(page: Page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"playground-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
