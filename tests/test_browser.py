"""The built pages in a real browser: Debian's Chromium driven by Playwright, served on 127.0.0.1.

Every page in the table of contents must load with no failed request, no request leaving the
machine, and no console error; math must be typeset, every image must load, and pages with
widgets must render them. Screenshots (light and dark theme) go to _build/screenshots/.
"""

import functools
import http.server
import threading
from urllib.parse import urlparse

import pytest

from conftest import ROOT, toc_files
from provision_browser import recorded_browser

pytestmark = pytest.mark.browser

SCREENSHOTS = ROOT / "_build" / "screenshots"

# Console messages that are known and harmless; each needs a reason.
ALLOWED_CONSOLE = [
    # sphinx-thebe declares THEBE_JS_URL in a script that Jupyter Book includes twice (a page error).
    "THEBE_JS_URL",
    # The ipywidgets HTML manager 1.0 calls MathJax 2's MathJax.Hub.Queue to typeset widget labels;
    # the book uses MathJax 3, which has no Hub, so the call fails (a page error). Widgets render regardless.
    "Cannot read properties of undefined (reading 'Queue')",
]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(built_book):
    handler = functools.partial(QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    found = recorded_browser()  # what make test's setup found or installed (tests/provision_browser.py)
    if found.executable is None:
        pytest.fail(found.failure_message())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=found.executable, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-gpu", "--no-first-run"])
        yield browser
        browser.close()


def visit(browser, url, theme="light"):
    """Open ``url`` in the given theme and record every problem the page shows."""
    problems = []
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=theme)
    # the theme switcher's stored choice, as if the reader had picked it
    context.add_init_script(f"localStorage.setItem('mode', '{theme}'); localStorage.setItem('theme', '{theme}');")
    page = context.new_page()
    host = urlparse(url).netloc

    def route(r):
        if urlparse(r.request.url).netloc == host or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:  # the book must work offline: nothing may leave the machine
            problems.append(f"external request: {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})")
            if "external request: " + r.url not in problems else None)
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}")
            if not any(a in str(e) for a in ALLOWED_CONSOLE) else None)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and not any(a in m.text for a in ALLOWED_CONSOLE) else None)
    page.goto(url, wait_until="networkidle")
    return context, page, problems


PAGES = toc_files()


@pytest.mark.parametrize("doc", PAGES)
def test_page(browser, site, built_book, doc):
    html = (built_book / f"{doc}.html").read_text()
    context, page, problems = visit(browser, f"{site}/{doc}.html")
    try:
        # Math: wait for MathJax 3 to finish, then every math element must be typeset without errors.
        if 'class="math' in html:
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                   timeout=20_000)
            page.evaluate("() => MathJax.startup.promise")
            typeset = page.locator("mjx-container").count()
            assert typeset > 0, "math on the page was not typeset"
            assert page.locator("mjx-merror").count() == 0, "MathJax reported a TeX error"

        # Widgets: every embedded widget view must render; interact outputs show their figure.
        views = html.count("application/vnd.jupyter.widget-view+json")
        if views:
            page.wait_for_selector(".jupyter-widgets", timeout=20_000)
            assert page.locator(".widget-slider, .widget-dropdown, .widget-hprogress").count() > 0
            if "interactive" in html or "widget-interact" in html:
                page.wait_for_selector(".widget-output img", timeout=20_000)

        # Images: every <img> loaded with a nonzero size.
        page.wait_for_load_state("networkidle")
        broken = page.evaluate("""() => Array.from(document.images)
            .filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src)""")
        assert not broken, f"images that did not load: {broken}"

        # The page names its icon, and the icon is served (no request for a missing /favicon.ico).
        icon = page.evaluate("() => document.querySelector('link[rel~=icon]')?.href")
        assert icon, "the page declares no favicon"
        assert page.request.get(icon).status == 200, f"favicon {icon} does not load"

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{doc.replace('/', '_')}.png"), full_page=True)
        assert not problems, "\n".join(problems)
    finally:
        context.close()


def test_dark_theme_screenshots(browser, site):
    """The dark theme loads cleanly too; screenshots let a person check figure readability."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for doc in PAGES:
        context, page, problems = visit(browser, f"{site}/{doc}.html", theme="dark")
        try:
            assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
            page.screenshot(path=str(SCREENSHOTS / f"{doc.replace('/', '_')}-dark.png"), full_page=False)
            assert not problems, "\n".join(problems)
        finally:
            context.close()
