"""The built website, checked in headless Chromium as a reader would see it.

The tests read the book in ``_build/html`` (running ``make site`` first if it
is missing or older than its sources), serve it on 127.0.0.1 and open every
page of the table of contents. Requests to any other host get
an empty response, so the checks hold with no network. Screenshots of every
chapter in light and dark mode go to ``_build/screenshots``.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

playwright_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def toc_pages() -> list[str]:
    """Return every page of _toc.yml as a path without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [entry["file"] for entry in part.get("chapters", [])]
    return pages


PAGES = toc_pages()
CHAPTERS = [page for page in PAGES if page.startswith("chapters/")]


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/")


def ensure_built() -> None:
    """Build the site unless an up-to-date build exists (make decides)."""
    lock_path = ROOT / "_build" / ".site.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["make", "--no-print-directory", "site"], cwd=ROOT, check=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site_url() -> Iterator[str]:
    ensure_built()
    handler = functools.partial(QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("Chromium not found: `make test` installs Debian's chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


class PageVisit:
    """One page opened in a fresh context, with its errors recorded."""

    def __init__(self, browser, site_url: str, color_scheme: str = "light"):
        self.site_url = site_url
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, color_scheme=color_scheme
        )
        # A light visit is a reader's first: nothing stored. A dark visit sets
        # the mode the theme's switch stores, read before the page paints.
        if color_scheme == "dark":
            self.context.add_init_script("localStorage.setItem('mode', 'dark');")
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.failed_requests: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("response", self._on_response)

    def _is_local(self, url: str) -> bool:
        return url.startswith(self.site_url)

    def _route(self, route) -> None:
        url = route.request.url
        if self._is_local(url) or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            route.fulfill(status=204, body="")

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _on_request_failed(self, request) -> None:
        if self._is_local(request.url):
            self.failed_requests.append(f"{request.url}: {request.failure}")

    def _on_response(self, response) -> None:
        if self._is_local(response.url) and response.status >= 400:
            self.failed_requests.append(f"{response.url}: HTTP {response.status}")

    def open(self, path: str):
        self.page.goto(f"{self.site_url}/{path}", wait_until="load")
        self.page.wait_for_load_state("networkidle")
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser, site_url) -> Iterator[PageVisit]:
    opened = PageVisit(browser, site_url)
    yield opened
    opened.close()


def wait_for_mathjax(page) -> None:
    page.wait_for_function("() => window.MathJax && MathJax.startup")
    page.evaluate("() => MathJax.startup.promise")


@pytest.mark.parametrize("page_name", PAGES)
def test_page_loads_cleanly(visit: PageVisit, page_name: str) -> None:
    visit.open(f"{page_name}.html")
    assert visit.console_errors == []
    assert visit.failed_requests == []


@pytest.mark.parametrize("page_name", PAGES)
def test_images_loaded_with_alt_text(visit: PageVisit, page_name: str) -> None:
    page = visit.open(f"{page_name}.html")
    images = page.eval_on_selector_all(
        "article img",
        """images => images.map(image => ({
            src: image.getAttribute('src'),
            loaded: image.complete && image.naturalWidth > 0,
            alt: (image.getAttribute('alt') || '').trim(),
        }))""",
    )
    not_loaded = [image["src"] for image in images if not image["loaded"]]
    without_alt = [image["src"] for image in images if not image["alt"]]
    assert not_loaded == []
    assert without_alt == []


@pytest.mark.parametrize("page_name", PAGES)
def test_formulas_rendered_offline(visit: PageVisit, page_name: str) -> None:
    page = visit.open(f"{page_name}.html")
    math_count = page.locator("article .math").count()
    if math_count:
        wait_for_mathjax(page)
        mathjax_src = page.evaluate(
            "() => [...document.scripts].map(s => s.src).find(s => s.includes('tex-'))"
        )
        assert mathjax_src.startswith(visit.site_url)
        rendered = page.locator("article mjx-container").count()
        assert rendered >= math_count
    # Raw TeX left in the text would mean MathJax skipped it.
    text = page.evaluate(
        """() => {
            const article = document.querySelector('article').cloneNode(true);
            article.querySelectorAll('pre, code, mjx-container, script')
                .forEach(node => node.remove());
            return article.innerText;
        }"""
    )
    for delimiter in ("$$", "\\(", "\\[", "\\frac", "\\sqrt", "^{", "_{"):
        assert delimiter not in text
    # A single-$ span such as $O(n^2)$ left unrendered.
    assert re.search(r"\$[^$\s][^$]*\$", text) is None


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_launch_buttons(visit: PageVisit, chapter: str) -> None:
    page = visit.open(f"{chapter}.html")
    links = page.eval_on_selector_all(
        "a", "links => links.map(link => link.getAttribute('href') || '')"
    )
    owner_repo = repository_url().removeprefix("https://github.com/")
    colab = (
        f"https://colab.research.google.com/github/{owner_repo}/blob/main/"
        f"{chapter}.ipynb"
    )
    assert colab in links
    downloads = page.locator(f"a[href$='{Path(chapter).name}.ipynb']")
    assert downloads.count() >= 1


def test_search_finds_softmax(visit: PageVisit) -> None:
    page = visit.open("search.html?q=softmax")
    page.wait_for_selector("#search-results ul li", timeout=20_000)
    assert page.locator("#search-results ul li").count() >= 1


@pytest.mark.parametrize("page_name", PAGES)
def test_dark_theme_renders(browser, site_url: str, page_name: str) -> None:
    visit = PageVisit(browser, site_url, color_scheme="dark")
    try:
        page = visit.open(f"{page_name}.html")
        theme = page.evaluate("() => document.documentElement.dataset.theme")
        background = page.evaluate(
            "() => getComputedStyle(document.body).backgroundColor"
        )
        errors = visit.console_errors
    finally:
        visit.close()
    assert theme == "dark"
    assert errors == []
    red, green, blue = (int(part) for part in background[4:-1].split(",")[:3])
    assert max(red, green, blue) < 80, background


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_exercise_solutions_hidden(visit: PageVisit, chapter: str) -> None:
    page = visit.open(f"{chapter}.html")
    solutions = page.locator("article .cell.tag_hide-cell")
    assert solutions.count() >= 2
    for index in range(solutions.count()):
        solution = solutions.nth(index)
        assert not solution.locator(".cell_input").first.is_visible()
        outputs = solution.locator(".cell_output")
        if outputs.count():
            assert not outputs.first.is_visible()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_screenshots(browser, site_url: str, chapter: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for mode in ("light", "dark"):
        visit = PageVisit(browser, site_url, color_scheme=mode)
        try:
            page = visit.open(f"{chapter}.html")
            if page.locator("article .math").count():
                wait_for_mathjax(page)
            path = SCREENSHOTS / f"{Path(chapter).name}-{mode}.png"
            page.screenshot(path=str(path), full_page=True)
        finally:
            visit.close()
        assert path.stat().st_size > 10_000
