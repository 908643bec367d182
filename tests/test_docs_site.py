"""The docs site: it builds strictly, its code comes from real files, and it renders in a real browser.

The build runs once per module (a few seconds). The browser test serves the built site on
127.0.0.1, opens every page in headless Chromium, and checks what a reader sees: the stage
pages, the diagrams drawn as SVG by the bundled mermaid, the code listings and diffs, and
that no request left 127.0.0.1 (the site must work offline).
"""

import difflib
import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import markdown
import pytest
from mkdocs.config import load_config
from mkdocs.exceptions import PluginError

from support import HttpServer

ROOT = Path(__file__).resolve().parent.parent
# Every stage_N folder has a page; the site's hook finds them the same way (docs/hooks/stages.py).
STAGES = sorted(int(p.name.removeprefix("stage_")) for p in ROOT.glob("stage_*") if re.fullmatch(r"stage_\d+", p.name))
# The site is built for reading from disk too (Material's offline plugin): a page is NAME.html.
PAGES = ["index", *(f"stage-{n}" for n in STAGES), "protocol", "differences", "instructor"]
PAGES += ["troubleshooting", "real-tunnels"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless Chromium as root, talking to nothing but loopback (see FACTS: every flag is needed here).
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with `mkdocs build --strict` into a temporary folder (a warning fails it)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        # No -q: it hides the warnings, and --strict then has none to fail on (an anchor that is missing passed).
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / f"{page}.html").read_text()))


def test_every_page_is_built(site: Path) -> None:
    for page in PAGES:
        assert (site / f"{page}.html").is_file(), page


def test_every_stage_is_on_the_site() -> None:
    """The hook makes a page for every stage folder there is, and mkdocs.yml lists and watches each."""
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import stages
    finally:
        sys.path.pop(0)
    assert list(stages.STAGES) == STAGES == list(range(len(STAGES))), (stages.STAGES, STAGES)
    nav = (ROOT / "mkdocs.yml").read_text()
    for n in STAGES:
        assert f": stage-{n}.md" in nav, f"mkdocs.yml's nav has no stage-{n}.md"
        assert f"  - stage_{n}\n" in nav, f"mkdocs.yml does not watch stage_{n}"


@pytest.mark.parametrize("n", STAGES)
def test_stage_page_is_made_from_its_readme(site: Path, n: int) -> None:
    """One source: every heading and every command of stage_N/README.md is on the stage page."""
    readme = (ROOT / f"stage_{n}" / "README.md").read_text()
    text = page_text(site, f"stage-{n}")
    for heading in re.findall(r"^#+ (.+)$", readme, re.M):
        assert heading.replace("\\_", "_") in text, heading
    for command in re.findall(r"^\$ (.+)$", readme, re.M):
        assert command in text, command
    assert "github-only" not in text and "site: code" not in text


@pytest.mark.parametrize("n", STAGES[1:])
def test_stage_diff_is_generated_from_the_code(site: Path, n: int) -> None:
    """Every line the code's diff adds to server.py is on the page, in a diff block."""
    old = (ROOT / f"stage_{n - 1}" / "server.py").read_text().splitlines() if n > 1 else []
    new = (ROOT / f"stage_{n}" / "server.py").read_text().splitlines()
    added = [line[1:] for line in difflib.unified_diff(old, new, lineterm="") if line.startswith("+")][1:]
    built = (site / f"stage-{n}.html").read_text()
    assert "language-diff" in built
    text = page_text(site, f"stage-{n}")
    # Snippet markers (`# --8<-- [start:name]`) are comments that only name sections for the pages:
    # pymdownx.snippets drops them everywhere, the generated diff included, by design.
    missing = [line for line in added if line.strip() and "--8<--" not in line and line.strip() not in text]
    assert not missing, missing[:5]


def test_code_blocks_are_included_from_real_files() -> None:
    """No pasted code: every ```python block in the docs is one snippet line naming a file of the repository."""
    fence = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", re.M | re.S)
    files = [*ROOT.glob("docs/**/*.md"), *ROOT.glob("stage_*/README.md")]
    blocks = [(f, m[2]) for f in files for m in fence.finditer(f.read_text())]
    assert blocks
    for path, body in blocks:
        match = re.fullmatch(r'\s*--8<-- "([\w./-]+?)(:[\w-]+)?"\s*', body)
        assert match and (ROOT / match[1]).is_file(), f"{path}: {body[:80]!r}"


def test_a_missing_snippet_fails_the_build() -> None:
    config = load_config(str(ROOT / "mkdocs.yml"))
    options = {**config.mdx_configs, "pymdownx.snippets": {**config.mdx_configs["pymdownx.snippets"]}}
    options["pymdownx.snippets"]["base_path"] = [str(ROOT)]
    md = markdown.Markdown(extensions=config.markdown_extensions, extension_configs=options)
    with pytest.raises(Exception, match="could not be found"):
        md.convert('```python\n--8<-- "stage_0/no_such_file.py"\n```\n')


def test_stale_highlights_and_links_fail_the_build() -> None:
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import stages
    finally:
        sys.path.pop(0)
    page = '```python highlight="no such text anywhere"\n--8<-- "stage_0/relay.py"\n```'
    with pytest.raises(PluginError, match="matches no line"):
        stages.SNIPPET_FENCE.sub(lambda m: stages.highlight_fence(m, "test.md"), page)
    good = '```python highlight="await dst.drain()"\n--8<-- "stage_0/relay.py"\n```'
    # Line numbers as rendered: pymdownx.snippets leaves out the `# --8<-- [start:name]` marker lines.
    lines = [line for line in (ROOT / "stage_0" / "relay.py").read_text().splitlines() if "--8<--" not in line]
    expected = [i for i, line in enumerate(lines, 1) if "await dst.drain()" in line]
    assert f'hl_lines="{" ".join(map(str, expected))}"' in stages.SNIPPET_FENCE.sub(
        lambda m: stages.highlight_fence(m, "test.md"), good
    )
    with pytest.raises(PluginError, match="no page on the site"):
        stages.site_link(0, "../tests/test_stage_0.py")
    assert stages.site_link(1, "../stage_2/README.md#run-it") == "stage-2.md#run-it"


# --- in a real browser --------------------------------------------------------------------------

OPEN_SHADOW_ROOTS = """
// Material draws each diagram into a closed shadow root; open them so the test can look inside.
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) { return attach.call(this, { ...init, mode: "open" }); };
"""


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on http://127.0.0.1:<free port>/."""
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = HttpServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_pages_render_in_chromium_with_no_network(site: Path, served: str, tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"needs Chromium at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the `playwright` package (test extra)")
    outside: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=BROWSER_ARGS,
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_init_script(OPEN_SHADOW_ROOTS)

            def only_local(route: "sync_api.Route") -> None:
                if route.request.url.startswith(served) or route.request.url.startswith(("data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            context.route("**/*", only_local)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
            page.on("console", lambda msg: errors.append(f"{page.url}: {msg.text}") if msg.type == "error" else None)
            for path in built_pages(site):
                check_page(page, f"{served}{path}.html", (site / f"{path}.html").read_text(), path)
                page.screenshot(path=str(tmp_path / f"{path}.png"))
        finally:
            browser.close()
    assert not outside, f"requests left 127.0.0.1: {outside}"
    assert not errors, errors


def built_pages(site: Path) -> list[str]:
    """Every page of the built site (other helpers' pages included), as paths below the root."""
    pages = sorted(p.relative_to(site).with_suffix("").as_posix() for p in site.glob("**/*.html"))
    pages = [p for p in pages if not p.startswith(("assets/", "search/")) and p != "404"]
    assert set(PAGES) <= set(pages), set(PAGES) - set(pages)
    return pages


def check_page(page: "object", url: str, built: str, path: str) -> None:
    """One page: it loads, its diagrams became SVG, its code is there."""
    diagrams = built.count('class="mermaid"')
    page.goto(url, wait_until="load")  # type: ignore[attr-defined]
    assert page.locator("h1").first.inner_text().strip(), path  # type: ignore[attr-defined]
    if diagrams:
        # Drawn: each diagram's (opened) shadow root holds a drawing, not mermaid's error picture.
        page.wait_for_function(  # type: ignore[attr-defined]
            """n => [...document.querySelectorAll("div.mermaid")]
                    .filter(d => d.shadowRoot && d.shadowRoot.querySelector("svg g")
                                 && !d.shadowRoot.innerHTML.includes("Syntax error")).length >= n""",
            arg=diagrams,
            timeout=15_000,
        )
        body = page.locator("article").inner_text()  # type: ignore[attr-defined]
        assert "sequenceDiagram" not in body and "flowchart LR" not in body, f"{path}: a diagram left as text"
    if path.startswith("stage-"):
        assert diagrams >= 1, f"{path} has no diagram"
        assert page.locator(".highlight code").count() >= 2, path  # type: ignore[attr-defined]
        assert page.locator(".highlight .hll").count() >= 1, f"{path}: no highlighted lines"  # type: ignore[attr-defined]
        if path != "stage-0":
            assert page.locator("code.language-diff, .language-diff").count() >= 1, f"{path}: no diff"  # type: ignore[attr-defined]
