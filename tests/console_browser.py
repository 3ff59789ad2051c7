"""What the console's browser tests share: Debian's chromium driven by Playwright.

Importing this module skips the importing test module (saying why) when Playwright for Python
or chromium is missing (``scripts/system-packages.sh`` installs chromium; ``TAILOR_CHROMIUM``
names another binary). ``browser`` (one chromium per test module) and ``shots`` (where
screenshots go: ``$TAILOR_CONSOLE_SCREENSHOTS`` when set, else a temporary folder) are fixtures
for the test modules to import; ``sign_in`` signs a page in with an API key.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("TAILOR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
XSS = "<img src=x onerror=alert(1)>"  # tenant text that must stay text
TIMEOUT_MS = 60_000

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (scripts/system-packages.sh installs Debian's chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TAILOR_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(page: Any, key: str) -> None:
    page.goto("/ui/")
    page.fill("#api-key", key)
    page.click("form.signin button[type=submit]")
    page.wait_for_selector("#sign-out")
