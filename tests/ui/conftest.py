"""Browser tests: `python app.py --demo` in a subprocess, driven by Playwright in Chromium.

Chromium is the Debian package (/usr/bin/chromium, installed by .ci/run), started headless with
everything that would reach the network switched off.
"""
from __future__ import annotations

import os

import pytest

from tests.ui.server import AppServer

CHROMIUM = os.environ.get("KS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("app"))
    yield server
    server.stop()


@pytest.fixture(scope="module")   # stopped after each module: Playwright's loop would stay marked running and
def browser():                    # break asyncio.run() in the tests after tests/ui (tests/test_app_api.py)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app_server.url)
    page.wait_for_selector("#generate")
    yield page
    context.close()
