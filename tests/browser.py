"""A real headless browser for tests: the system's Chromium driven by Playwright.

Playwright's own browser download is never used (it fetches a build from outside the package registries);
`launch(executable_path=...)` drives the Chromium that `.ci/run` installs from Debian's packages. Where
either is missing, the browser tests skip and say which, so a machine without a browser still runs the
rest. Screenshots go to `$MLLM_TEST_ARTEFACTS` (default: a folder under pytest's temporary root), kept
as the tests' artefacts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def chromium_path() -> str | None:
    return os.environ.get("MLLM_CHROMIUM") or next(filter(None, (shutil.which(b) for b in BROWSERS)), None)


@contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright page in headless Chromium; skips the test (with the reason) where there is none."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser tests: playwright is not installed (pip install -e '.[dev]')")
    exe = chromium_path()
    if exe is None:
        pytest.skip(
            f"no browser tests: no Chromium on PATH ({', '.join(BROWSERS)}; apt-get install chromium, "
            "or set MLLM_CHROMIUM)"
        )
    with sync_playwright() as p:
        try:  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except PlaywrightError as e:
            pytest.skip(f"no browser tests: {exe} did not start under Playwright: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.errors = errors  # what the page's own scripts threw: a test asserts there is none
            yield page
        finally:
            browser.close()


def artefact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are kept: $MLLM_TEST_ARTEFACTS, else pytest's temporary root."""
    env = os.environ.get("MLLM_TEST_ARTEFACTS")
    out = Path(env) if env else tmp_path_factory.getbasetemp() / "artefacts"
    out.mkdir(parents=True, exist_ok=True)
    return out
