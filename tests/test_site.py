"""The built site, opened in a real headless browser.

Builds the book (``jupyter-book build . -W -n --keep-going``: warnings are errors;
notebook execution is cached), serves ``_build/html`` on 127.0.0.1 and opens every page
in Debian's Chromium through Playwright. On every page: all maths typeset with no
MathJax error, every image loaded, no JavaScript error, and no request to any host but
the local server. Every internal link (and its #anchor) resolves. Every figure a
notebook draws sits in a captioned, numbered <figure> and has a real alt text (not empty,
not a file path: a screen reader reads it aloud).

Without Chromium or Playwright the test is skipped locally, but fails when the
environment variable CI or TRANSFORMER_BOOK_REQUIRE_BROWSER is set.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _browser_or_skip():
    required = bool(os.environ.get("CI") or os.environ.get("TRANSFORMER_BOOK_REQUIRE_BROWSER"))
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem, sync_playwright = "the Python package playwright is not installed", None
    if problem is None and not Path(CHROMIUM).exists():
        problem = f"no Chromium at {CHROMIUM} (Debian package `chromium`)"
    if problem:
        if required:
            pytest.fail(f"browser test cannot run: {problem}")
        pytest.skip(problem)
    return sync_playwright


@pytest.fixture(scope="module")
def site():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("jupyter-book")), "build", ".", "-W", "-n", "--keep-going"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    server, base = _serve(HTML)
    yield base
    server.shutdown()


def _pages() -> list[str]:
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if "_static" not in p.parts and "_sources" not in p.parts)


WAIT_FOR_MATHJAX = """async () => {
  if (!window.MathJax) return 'absent';
  for (let i = 0; i < 200 && !(MathJax.startup && MathJax.startup.promise); i++)
    await new Promise(r => setTimeout(r, 50));
  await MathJax.startup.promise;
  if (MathJax.typesetPromise) await MathJax.typesetPromise();
  return 'done';
}"""

PAGE_FACTS = """async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  const maths = [...document.querySelectorAll('.math')];
  return {
    maths: maths.length,
    untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
    mathErrors: [...document.querySelectorAll('mjx-merror, .MathJax_Error')].map(e => e.textContent.slice(0, 80)),
    brokenImages: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 100)),
    badAlt: imgs.filter(i => i.closest('.cell_output') || i.closest('figure'))
        .map(i => i.getAttribute('alt') || '')
        .filter(a => a.trim().length < 8 || /[.](png|jpe?g|svg|gif)$/i.test(a.trim()) || a.includes('_images/'))
        .map(a => a.slice(0, 80) || '(empty)'),
    uncaptioned: imgs.filter(i => i.closest('.cell_output') &&
        !(i.closest('figure') && i.closest('figure').querySelector('figcaption .caption-number')))
        .map(i => i.src.slice(0, 100)),
    images: imgs.length,
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    text: document.body.innerText,
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(directory: Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def inspect_site(base: str, html_dir: Path, pages: list[str]) -> list[str]:
    """Open each page in Chromium; return every problem found (empty when all is well)."""
    sync_playwright = _browser_or_skip()
    local = urlparse(base).netloc
    problems: list[str] = []
    foreign: set[str] = set()
    links: dict[str, set[str]] = {}
    ids: dict[str, set[str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()

        def route(request_route):
            url = request_route.request.url
            parsed = urlparse(url)
            if parsed.scheme in ("data", "blob", "about") or parsed.netloc == local:
                request_route.continue_()
            else:
                foreign.add(url)
                request_route.abort()

        context.route("**/*", route)
        for name in pages:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error, errors=errors: errors.append(str(error)))
            redirect = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"',
                                 (html_dir / name).read_text(), re.IGNORECASE)
            if redirect:  # a redirect stub (index.html): check where it points
                links[name] = {urljoin(base + name, redirect.group(1))}
                page.close()
                continue
            response = page.goto(base + name, wait_until="load")
            if response is None or not response.ok:
                problems.append(f"{name}: HTTP error")
                continue
            mathjax = page.evaluate(WAIT_FOR_MATHJAX)
            facts = page.evaluate(PAGE_FACTS)
            if facts["maths"] and mathjax != "done":
                problems.append(f"{name}: has maths but MathJax did not load")
            for what in ("untypeset", "mathErrors", "brokenImages", "badAlt", "uncaptioned"):
                if facts[what]:
                    problems.append(f"{name}: {what}: {facts[what][:3]}")
            if "interactive figure (" in facts["text"]:
                problems.append(f"{name}: a widget's text fallback is shown instead of its figure")
            if errors:
                problems.append(f"{name}: JavaScript errors: {errors[:3]}")
            links[name] = set(facts["links"])
            ids[name] = set(facts["ids"])
            page.close()
        browser.close()

    problems += [f"request to another host: {url}" for url in sorted(foreign)]
    for name, hrefs in links.items():
        for href in sorted(hrefs):
            if urlparse(href).netloc != local:
                continue
            target, fragment = urldefrag(href)
            path = urlparse(target).path.lstrip("/") or "index.html"
            if path.endswith("/"):
                path += "index.html"
            if not (html_dir / path).exists():
                problems.append(f"{name}: broken link {href}")
            elif fragment and path in ids and fragment not in ids[path]:
                problems.append(f"{name}: link to a missing anchor {href}")
    return problems


def test_every_page_renders_offline_in_a_real_browser(site):
    pages = _pages()
    assert len(pages) >= 5, pages
    problems = inspect_site(site, HTML, pages)
    assert not problems, "\n".join(problems[:40])


BAD_PAGE = r"""<!doctype html><html><head>
<script>window.MathJax = {tex: {inlineMath: [["\\(", "\\)"]]}};</script>
<script src="mathjax/tex-chtml.js"></script>
<link rel="stylesheet" href="https://fonts.example.com/font.css"></head><body>
<span class="math">\(\frac{1}{\)</span>
<img src="missing.png" alt="x"> <a href="nowhere.html">x</a> <a href="#no-such-id">y</a>
<div class="cell_output"><figure><img src="missing.png" alt="../_images/eab7.png"></figure>
<img src="missing.png" alt="A bar chart of weights per key"></div>
</body></html>"""


def test_the_inspection_finds_what_it_looks_for(tmp_path):
    """Guard: a page with each fault is caught (so a green run above means something)."""
    _browser_or_skip()
    (tmp_path / "bad.html").write_text(BAD_PAGE)
    mathjax = HTML / "_static" / "mathjax"
    if not mathjax.exists():
        pytest.skip("build the site first (MathJax is copied from it)")
    import shutil

    shutil.copytree(mathjax, tmp_path / "mathjax")
    server, base = _serve(tmp_path)
    try:
        problems = "\n".join(inspect_site(base, tmp_path, ["bad.html"]))
    finally:
        server.shutdown()
    assert "request to another host: https://fonts.example.com/font.css" in problems
    assert "brokenImages" in problems and "missing.png" in problems
    assert "broken link" in problems and "nowhere.html" in problems
    assert "missing anchor" in problems
    assert "badAlt" in problems and "../_images/eab7.png" in problems
    assert "uncaptioned" in problems
    assert "mathErrors" in problems or "untypeset" in problems, problems


def test_chapters_show_figures_maths_and_colab_buttons(site):
    """The chapters' figures and equations reach the page, and every notebook page
    (chapter, exercise, solution) offers Colab, at the repository set in _config.yml."""
    sys.path.insert(0, str(ROOT / "tools"))
    import generate

    colab = "https://colab.research.google.com/github/" + generate.repository_url().split(
        "github.com/", 1
    )[1]
    for chapter in sorted((ROOT / "book").glob("*.ipynb")):
        html = (HTML / "book" / f"{chapter.stem}.html").read_text()
        assert re.search(r"<img[^>]+src=\"[^\"]+\.png\"", html), f"{chapter.name}: no figure"
        assert 'class="math' in html, f"{chapter.name}: no maths"
        assert "Colab setup" not in html, f"{chapter.name}: the Colab setup cell is shown"
        assert "import</span>" in html, f"{chapter.name}: the chapter's imports are not shown"
        assert 'caption-number">Figure ' in html, f"{chapter.name}: no numbered figure"
        for folder in ("book", "exercises", "solutions"):
            page = HTML / folder / f"{chapter.stem}.html"
            if folder == "book" or (ROOT / folder / chapter.name).exists():
                expected = f"{colab}/blob/main/{folder}/{chapter.name}"
                assert expected in page.read_text(), f"{page}: no Colab button for {expected}"


QUIZ_CHAPTER = "05_residual_connections"


def test_quiz_answers_in_the_browser(site):
    """Every chapter page carries its quiz with the code cell hidden; on one, clicking a
    wrong and then the right option shows the explanations, and the link leads to an
    anchor of the page."""
    from transformer_book.quiz import QUIZZES, anchor

    for chapter in sorted((ROOT / "book").glob("*.ipynb")):
        html = (HTML / "book" / f"{chapter.stem}.html").read_text()
        assert html.count('class="tbq"') == 1, f"{chapter.name}: no quiz, or two"
        assert "transformer_book.quiz" not in html, f"{chapter.name}: quiz cell input shown"

    question = QUIZZES[QUIZ_CHAPTER[:2]][1]  # a multiple-choice question
    wrong = next(i for i, o in enumerate(question.options) if not o.right)
    right = next(i for i, o in enumerate(question.options) if o.right)
    sync_playwright = _browser_or_skip()
    local = urlparse(site).netloc
    foreign: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda r: None if urlparse(r.url).netloc in ("", local)
                or urlparse(r.url).scheme in ("data", "blob", "about")
                else foreign.append(r.url))
        page.goto(f"{site}book/{QUIZ_CHAPTER}.html", wait_until="load")
        item = page.locator("li.tbq-q").nth(1)
        options = item.locator("button.tbq-opt")
        explanations = item.locator(".tbq-why")
        assert options.count() == len(question.options)
        assert not any(explanations.nth(i).is_visible() for i in range(options.count()))

        options.nth(wrong).click()
        shown = explanations.nth(wrong)
        assert shown.is_visible() and shown.inner_text().startswith("Not quite.")
        assert question.options[wrong].why.replace("`", "").replace("*", "") in shown.inner_text()
        assert not explanations.nth(right).is_visible()
        assert "tbq-wrong" in options.nth(wrong).get_attribute("class")

        options.nth(right).click()
        shown = explanations.nth(right)
        assert shown.is_visible() and shown.inner_text().startswith("Right.")
        assert question.options[right].why.replace("`", "").replace("*", "") in shown.inner_text()
        assert all(explanations.nth(i).is_visible() for i in range(options.count()))
        link = shown.locator("a.tbq-see")
        assert link.get_attribute("href") == f"#{anchor(question.section)}"
        assert page.locator(f"[id='{anchor(question.section)}']").count() == 1
        total = len(QUIZZES[QUIZ_CHAPTER[:2]])
        score = page.locator(".tbq-score").inner_text()
        assert score == f"1 of {total} answered, 0 of them at the first try.", score
        link.click()
        assert page.url.endswith(f"#{anchor(question.section)}")
        assert not errors, errors
        for scheme in ("light", "dark"):  # the theme's two modes: text stays readable
            themed = browser.new_page(color_scheme=scheme)
            themed.goto(f"{site}book/{QUIZ_CHAPTER}.html", wait_until="load")
            themed.wait_for_function("() => document.documentElement.dataset.theme")
            ratio = themed.evaluate(CONTRAST, "li.tbq-q .tbq-ask")
            assert ratio > 4.5, f"{scheme} mode: contrast {ratio:.2f} of the quiz text"
            themed.close()
        browser.close()
    assert not foreign, foreign


# WCAG contrast ratio between an element's text colour and the first opaque background
# behind it (the page's own background if none is set on the way up).
CONTRAST = """selector => {
  const rgb = c => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const el = document.querySelector(selector);
  let node = el, bg = null;
  while (node && node.nodeType === 1) {
    const c = rgb(getComputedStyle(node).backgroundColor);
    if (c.length < 4 || c[3] > 0.5) { bg = c; break; }
    node = node.parentNode;
  }
  bg = bg || [255, 255, 255];
  const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(bg)];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


JUPYTER_LIKE_PAGE = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<h2 id="Identity-mapping">Identity mapping<a class="anchor-link" href="#Identity-mapping">\u00b6</a></h2>
<div style="height: 3000px"></div><div id="output"></div>
<script>
// JupyterLab puts a trusted text/html output in place with innerHTML, then replaces each
// <script> by a fresh copy so that it runs (innerHTML alone never runs scripts).
const output = document.getElementById("output");
output.innerHTML = QUIZ_HTML;
output.querySelectorAll("script").forEach(old => {
  const fresh = document.createElement("script");
  fresh.textContent = old.textContent;
  old.replaceWith(fresh);
});
</script></body></html>"""


def test_quiz_works_when_inserted_as_a_jupyter_output(tmp_path):
    """Outside the site (no theme variables, Jupyter's heading ids): the quiz answers
    clicks, and its section link scrolls to the heading with the same text."""
    import json

    from transformer_book.quiz import quiz

    sync_playwright = _browser_or_skip()
    quiz_html = json.dumps(quiz("05")._repr_html_()).replace("</", "<\\/")  # stay in <script>
    page_html = JUPYTER_LIKE_PAGE.replace("QUIZ_HTML", quiz_html)
    (tmp_path / "notebook.html").write_text(page_html, encoding="utf-8")
    server, base = _serve(tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "notebook.html", wait_until="load")
            item = page.locator("li.tbq-q").nth(1)  # its answer is in "Identity mapping"
            right = item.locator("button.tbq-opt[data-right]")
            right.click()
            why = right.locator("xpath=following-sibling::div[1]")
            assert why.is_visible() and why.inner_text().startswith("Right.")
            heading = page.locator("h2#Identity-mapping")
            assert abs(heading.evaluate("h => h.getBoundingClientRect().top")) > 1000
            why.locator("a.tbq-see").click()
            page.wait_for_function(
                "() => Math.abs(document.querySelector('#Identity-mapping')"
                ".getBoundingClientRect().top) < 50")
            assert not page.url.endswith("#identity-mapping")  # the fallback took over
            assert not errors, errors
            browser.close()
    finally:
        server.shutdown()
