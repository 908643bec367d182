"""The docs site as a reader meets it: what issue 13 found wrong must stay fixed.

Each test guards one class of defect that a change to the theme, the CSS, the hook or mermaid can
bring back: diff titles mangled by Markdown, stage code that scrolls sideways on a laptop screen,
sequence-diagram arrowheads invisible in dark mode, generated diffs crowding the search, a built
site that does not work opened from disk, and (issue 24) diagrams shrunk to unreadable text and
pages too long to read. The browser tests use the site built (strict) by
tests/test_docs_site.py's fixtures, in headless Chromium that may not leave 127.0.0.1.
"""

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_docs_site
from test_docs_site import CHROMIUM, OPEN_SHADOW_ROOTS, STAGES, built_pages

# The same fixtures: the site built strict into a temporary folder, and served on 127.0.0.1.
site = test_docs_site.site
pytestmark = test_docs_site.pytestmark  # the site's build runs in the setup of the first test that needs it
served = test_docs_site.served

# The docs site test's browser, which may also read the built site from disk (file://).
BROWSER_ARGS = [*test_docs_site.BROWSER_ARGS, "--allow-file-access-from-files"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (the Debian package), driven by Playwright."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs Chromium at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the `playwright` package (test extra)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# --- without a browser ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", STAGES[1:])
def test_diff_titles_name_each_file_as_written(site: Path, n: int) -> None:
    """`__init__.py` in an admonition title is Markdown for a bold "init.py": the titles show code."""
    built = (site / f"stage-{n}.html").read_text()
    titles = re.findall(r"<summary>(.*?)</summary>", built, re.S)
    changed = [t for t in titles if re.search(r"lines added|new file|removed", t)]
    assert changed, f"stage-{n}: no diff titles found"
    for title in changed:
        assert re.match(r"<code>[\w.]+\.py</code>: ", title), title
        assert "<strong>" not in title and "<em>" not in title, title
    assert any("<code>__init__.py</code>" in t for t in changed), changed


def test_generated_diffs_are_not_in_the_search_index(site: Path) -> None:
    """Search finds the pages that teach a word, not every diff line that contains it."""
    index = json.loads((site / "search" / "search_index.json").read_text())["docs"]
    diffs = [d["location"] for d in index if re.search(r"^(?:\+\+\+|---) stage_\d/", d["text"], re.M)]
    diffs += [d["location"] for d in index if "Generated from the code when this site was built" in d["text"]]
    assert not diffs, diffs
    # ... while the teaching prose around them stays searchable.
    assert any(d["location"].startswith("stage-0.html#") and "half-close" in d["text"].lower() for d in index)


# --- in a real browser ------------------------------------------------------------------------------


@pytest.mark.timeout(test_docs_site.BROWSER_WALK_TIMEOUT)
def test_stage_code_fits_a_1280_px_screen(site: Path, served: str, browser: Any) -> None:
    """Stage code is 120 columns (ruff's line length): at 1280 px no listing or diff scrolls sideways."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    too_wide: list[str] = []
    for n in STAGES:
        page.goto(f"{served}stage-{n}.html", wait_until="load")
        # Folded listings and diffs are measured too: open them all.
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        found = page.evaluate(
            """() => [...document.querySelectorAll('.md-typeset pre > code')]
                   .filter(c => c.scrollWidth > c.clientWidth + 1)
                   .map(c => (c.closest('.highlight')?.querySelector('.filename')?.textContent
                              || c.textContent.split('\\n')[0]).slice(0, 60)
                             + ` (${c.scrollWidth} > ${c.clientWidth} px)`)"""
        )
        too_wide += [f"stage-{n}: {what}" for what in found]
        blocks = page.locator(".md-typeset pre > code").count()
        assert blocks >= 3, f"stage-{n}: only {blocks} code blocks"
    context.close()
    assert not too_wide, "\n".join(too_wide)


def luminance(css_color: str) -> float:
    """Relative luminance (WCAG) of an `rgb(...)`/`rgba(...)` computed colour."""
    r, g, b = (int(float(v)) for v in re.findall(r"[\d.]+", css_color)[:3])

    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("path", ["index", "stage-2", "protocol"])
def test_sequence_arrowheads_are_visible_in_dark_mode(served: str, browser: Any, path: str) -> None:
    """Which way each connection is opened is the point of the diagrams: arrowheads stand out in dark mode."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    context.add_init_script(OPEN_SHADOW_ROOTS)  # test-only: Material draws diagrams in closed shadow roots
    page = context.new_page()
    page.goto(f"{served}{path}.html", wait_until="load")
    page.wait_for_function("document.querySelector('div.mermaid')?.shadowRoot?.querySelector('marker')", timeout=15_000)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert luminance(background) < 0.05, f"not dark mode: {background}"
    heads = page.evaluate(
        """() => [...document.querySelectorAll('div.mermaid')].flatMap(d =>
               [...d.shadowRoot.querySelectorAll('marker[id$="-arrowhead"] path')]
                 .map(p => [d.shadowRoot.querySelector('marker').id, getComputedStyle(p).fill]))"""
    )
    context.close()
    assert heads, f"{path}: no sequence-diagram arrowheads found"
    faint = [(marker, fill) for marker, fill in heads if contrast(fill, background) < 3]
    assert not faint, f"{path}: arrowheads hard to see on {background}: {faint}"


@pytest.mark.timeout(test_docs_site.BROWSER_WALK_TIMEOUT)
def test_the_built_site_works_opened_from_disk(site: Path, browser: Any) -> None:
    """site/ opened with file://: links lead to pages (not folder listings), diagrams draw, search answers."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    context.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:")) else outside.append(r.url))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((site / "index.html").as_uri(), wait_until="load")
    links = page.evaluate(
        """() => [...document.querySelectorAll('a[href]')].map(a => a.href)
                 .filter(h => h.startsWith('file:')).map(h => h.split('#')[0])"""
    )
    assert links
    for link in set(links):
        assert link.endswith((".html", ".txt", ".svg")), f"a link to a folder, shown from disk as a listing: {link}"
        assert Path(link.removeprefix("file://")).is_file(), link
    page.click("nav.md-nav--primary a[href='stage-0.html']")
    page.wait_for_url("**/stage-0.html")
    assert "Stage 0" in page.locator("h1").first.inner_text()
    page.wait_for_function("document.querySelector('div.mermaid')", timeout=15_000)
    page.click("label.md-search__icon, input.md-search__input")
    page.keyboard.type("client-side proxy", delay=20)  # stage 0's title: the page it must find
    page.wait_for_function("document.querySelectorAll('.md-search-result__item').length > 0", timeout=15_000)
    hits = page.evaluate("[...document.querySelectorAll('.md-search-result__link')].map(a => a.href)")
    context.close()
    assert any("stage-0.html" in h for h in hits), hits
    assert not outside, f"requests left the disk: {outside}"
    assert not errors, errors


# --- issue 24: diagrams a reader can read, pages a reader can finish -----------------------------------

# A laptop screen: 1280 px wide (the width the code is made to fit), 800 px of it for the page.
SCREEN = {"width": 1280, "height": 800}
MIN_DIAGRAM_TEXT_PX = 10  # smaller, and a diagram's labels are a squint (a 2,531 px wide one had 6.3 px)
MAX_SCREENS = 40  # a page longer than this, with every fold closed, is more than one sitting

# How big each diagram's text is on screen: its font size times the scale the SVG is drawn at
# (mermaid sizes an SVG to the column, so a wide diagram is shrunk). Sequence diagrams label with
# SVG <text>/<tspan>, flowcharts with HTML inside <foreignObject>: both are measured.
DIAGRAM_TEXT = """() => [...document.querySelectorAll('div.mermaid')].map((d, i) => {
    const svg = d.shadowRoot && d.shadowRoot.querySelector('svg');
    if (!svg) return {index: i + 1, smallest: null};
    let smallest = Infinity, sample = '';
    for (const el of svg.querySelectorAll('text, tspan, foreignObject *')) {
        const text = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
        if (!text) continue;
        const matrix = (el.closest('foreignObject') || el).getScreenCTM();
        if (!matrix) continue;
        const px = parseFloat(getComputedStyle(el).fontSize) * Math.hypot(matrix.a, matrix.b);
        if (px < smallest) { smallest = px; sample = text; }
    }
    return {index: i + 1, smallest, sample: sample.slice(0, 40),
            shown: Math.round(svg.getBoundingClientRect().width), natural: Math.round(svg.viewBox.baseVal.width)};
})"""


def wait_for_diagrams(page: Any, built: str, path: str) -> None:
    """Until every diagram of the page is drawn: their size is what the page and the reader get."""
    diagrams = built.count('class="mermaid"')
    if diagrams:
        page.wait_for_function(  # the page's shadow roots opened by OPEN_SHADOW_ROOTS
            """n => [...document.querySelectorAll('div.mermaid')]
                     .filter(d => d.shadowRoot?.querySelector('svg g')).length >= n""",
            arg=diagrams,
            timeout=15_000,
        )


@pytest.mark.timeout(test_docs_site.BROWSER_WALK_TIMEOUT)
def test_no_diagram_text_is_smaller_than_10_px_at_1280_px(site: Path, served: str, browser: Any) -> None:
    """A diagram too wide for the column is shrunk to fit: its labels must stay readable (issue 24)."""
    context = browser.new_context(viewport=SCREEN)
    context.add_init_script(OPEN_SHADOW_ROOTS)  # test-only: Material draws diagrams in closed shadow roots
    page = context.new_page()
    too_small: list[str] = []
    measured = 0
    for path in built_pages(site):
        built = (site / f"{path}.html").read_text()
        if 'class="mermaid"' not in built:
            continue
        page.goto(f"{served}{path}.html", wait_until="load")
        wait_for_diagrams(page, built, path)
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")  # folded ones too
        for found in page.evaluate(DIAGRAM_TEXT):
            measured += 1
            if found["smallest"] is None or found["smallest"] < MIN_DIAGRAM_TEXT_PX:
                too_small.append(
                    f"{path}: diagram {found['index']}: text {found['smallest']:.1f} px ({found['sample']!r}), "
                    f"{found['natural']} px wide shrunk to {found['shown']} px"
                    if found["smallest"] is not None
                    else f"{path}: diagram {found['index']}: not drawn"
                )
    context.close()
    assert measured, "no diagrams measured"
    assert not too_small, (
        f"{len(too_small)} diagram(s) with text under {MIN_DIAGRAM_TEXT_PX} px at {SCREEN['width']} px wide:\n"
        + "\n".join(too_small)
    )


def page_order(item: tuple[float, str]) -> tuple[str, int]:
    """stage-13 before stage-16 (numeric order), other pages by name."""
    name = item[1]
    return (name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :] or -1))


@pytest.mark.timeout(test_docs_site.BROWSER_WALK_TIMEOUT)
def test_no_page_is_longer_than_40_screens(site: Path, served: str, browser: Any) -> None:
    """At 1280x800 with every <details> closed, a page is at most 40 screens (issue 24): fold or split the rest."""
    context = browser.new_context(viewport=SCREEN)
    context.add_init_script(OPEN_SHADOW_ROOTS)  # to see when the diagrams are drawn
    page = context.new_page()
    lengths: dict[str, float] = {}
    for path in built_pages(site):
        built = (site / f"{path}.html").read_text()
        page.goto(f"{served}{path}.html", wait_until="load")
        wait_for_diagrams(page, built, path)
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = false)")
        height = page.evaluate("document.documentElement.scrollHeight")
        lengths[path] = height / SCREEN["height"]
    context.close()
    assert any(p.startswith("stage-") for p in lengths), lengths
    too_long = sorted(((screens, path) for path, screens in lengths.items() if screens > MAX_SCREENS), key=page_order)
    assert not too_long, (
        f"{len(too_long)} page(s) longer than {MAX_SCREENS} screens of {SCREEN['width']}x{SCREEN['height']} px "
        "with every <details> closed:\n" + "\n".join(f"{path}: {screens:.1f} screens" for screens, path in too_long)
    )
