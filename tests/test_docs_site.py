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
from typing import Any

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
# The tests that walk every page in Chromium take a few seconds a page on a loaded 2-core machine: their
# bound grows with the site (a page per stage and the docs/*.md pages), as the pages do.
PAGE_COUNT = len(STAGES) + len(list((ROOT / "docs").glob("*.md")))
BROWSER_WALK_TIMEOUT = 30 + 6 * PAGE_COUNT
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


# The build takes ~9 s on an idle 2-core machine (23 stages) and over 60 s while 8 test workers share
# the cores, so its bound is its own: the subprocess's timeout, and the time of the first test that
# waits for it (the build runs in that test's setup, which pytest-timeout counts).
SITE_BUILD_TIMEOUT = 120
pytestmark = pytest.mark.timeout(SITE_BUILD_TIMEOUT + 60)


@pytest.fixture(scope="session")  # built once per test worker, for this module and test_docs_reader.py
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with `mkdocs build --strict` into a temporary folder (a warning fails it).

    DOCS_SITE=folder uses a site already built there instead (to rerun the browser tests on a build
    you just made; nothing checks that it is current).
    """
    if prebuilt := os.environ.get("DOCS_SITE"):
        assert (Path(prebuilt) / "index.html").is_file(), f"DOCS_SITE={prebuilt} holds no built site"
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        # No -q: it hides the warnings, and --strict then has none to fail on (an anchor that is missing passed).
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=SITE_BUILD_TIMEOUT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / f"{page}.html").read_text()))


def test_every_page_is_built(site: Path) -> None:
    for page in PAGES:
        assert (site / f"{page}.html").is_file(), page


def test_every_message_table_is_generated(site: Path) -> None:
    """Each `<!-- messages: stage_N -->` marker of the protocol page becomes that stage's table of
    messages, one- and two-digit stages alike (a marker left in the page is a table gone missing)."""
    markers = re.findall(r"<!-- messages: (stage_\d+) -->", (ROOT / "docs" / "protocol.md").read_text())
    assert "stage_13" in markers, markers  # the page has two-digit stages to show
    built = (site / "protocol.html").read_text()
    assert "<!-- messages:" not in built
    for stage in markers:  # each table names its stage's protocol.py, where its messages are defined
        assert f"Generated from the docstrings in <code>{stage}/protocol.py</code>" in built, stage


def test_every_stage_is_on_the_site() -> None:
    """The hook makes a page for every stage folder there is, in numeric order (stage_10 after
    stage_9), and mkdocs.yml lists each; mkdocs serve watches each (the hook adds them)."""
    stages = hook()
    assert list(stages.STAGES) == STAGES == list(range(len(STAGES))), (stages.STAGES, STAGES)
    nav = (ROOT / "mkdocs.yml").read_text()
    for n in STAGES:
        assert f": stage-{n}.md" in nav, f"mkdocs.yml's nav has no stage-{n}.md"
    config = stages.on_config(load_config(str(ROOT / "mkdocs.yml")))
    watched = [Path(p).resolve() for p in config.watch]
    assert [p for p in watched if p.parent == ROOT and p.name.startswith("stage_")] == [
        ROOT / f"stage_{n}" for n in STAGES
    ], watched


def test_stages_sort_numerically() -> None:
    """stage_10 comes after stage_9 wherever a list of stages is made (a text sort puts it after stage_1)."""
    assert sorted(["stage_10", "stage_9", "stage_1"], key=stage_number) == ["stage_1", "stage_9", "stage_10"]
    assert sorted(STAGES) == STAGES and hook().STAGES == STAGES
    assert all(isinstance(n, int) for n in STAGES)


def stage_number(name: str) -> int:
    return int(name.removeprefix("stage_"))


def hook() -> Any:
    """The site's hook module, docs/hooks/stages.py."""
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import stages
    finally:
        sys.path.pop(0)
    return stages


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
    previous = STAGES[STAGES.index(n) - 1]
    old = (ROOT / f"stage_{previous}" / "server.py").read_text().splitlines() if previous else []
    new = (ROOT / f"stage_{n}" / "server.py").read_text().splitlines()
    added = [line[1:] for line in difflib.unified_diff(old, new, lineterm="") if line.startswith("+")][1:]
    built = (site / f"stage-{n}.html").read_text()
    assert "language-diff" in built
    text = page_text(site, f"stage-{n}")
    missing = [line for line in added if line.strip() and line.strip() not in text]
    assert not missing, missing[:5]


def test_code_blocks_are_included_from_real_files() -> None:
    """No pasted code: every ```python block in the docs is one snippet line naming a file of the repository."""
    fence = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", re.M | re.S)
    files = [*ROOT.glob("docs/**/*.md"), *ROOT.glob("stage_*/README.md")]
    blocks = [(f, m[2]) for f in files for m in fence.finditer(f.read_text())]
    assert blocks
    for path, body in blocks:
        match = re.fullmatch(r'\s*--8<-- "([\w./-]+?)(:[\w-]+|#[\w.]*)?"\s*', body)
        assert match and (ROOT / match[1]).is_file(), f"{path}: {body[:80]!r}"
        # Stage code is included by symbol (#Name), never by marker sections: stage files have none.
        assert not (match[1].startswith("stage_") and (match[2] or "").startswith(":")), f"{path}: {body.strip()}"


def test_stage_files_have_no_snippet_markers() -> None:
    """Stage folders are plain Python a learner copies, with no `# --8<--` lines: listings number lines as the files."""
    found = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted(ROOT.glob("stage_*/**/*"))
        if path.is_file() and path.suffix in {".py", ".html", ".md"}
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(#|<!--)\s*--8<--", line)
    ]
    assert not found, found


def test_a_missing_snippet_fails_the_build() -> None:
    config = load_config(str(ROOT / "mkdocs.yml"))
    options = {**config.mdx_configs, "pymdownx.snippets": {**config.mdx_configs["pymdownx.snippets"]}}
    options["pymdownx.snippets"]["base_path"] = [str(ROOT)]
    md = markdown.Markdown(extensions=config.markdown_extensions, extension_configs=options)
    with pytest.raises(Exception, match="could not be found"):
        md.convert('```python\n--8<-- "stage_0/no_such_file.py"\n```\n')


def expand(info: str, spec: str, indent: str = "") -> str:
    """What the hook makes of a fence ```INFO / --8<-- "SPEC" / ```."""
    page = f'{indent}```{info}\n{indent}--8<-- "{spec}"\n{indent}```'
    return str(hook().SNIPPET_FENCE.sub(lambda m: hook().expand_fence(m, "test.md"), page))


def test_includes_by_symbol_show_real_line_numbers() -> None:
    """`path#Name` is that def or class with its decorators and comments, numbered as in the file."""
    lines = (ROOT / "stage_1" / "client.py").read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if "async def ping(" in line)
    last = next(i for i, line in enumerate(lines, 1) if i > first and "async def close(" in line) - 2
    assert expand("python", "stage_1/client.py#Client.ping") == (
        f'```python linenums="{first}"\n--8<-- "stage_1/client.py:{first}:{last}"\n```'
    )
    # Decorators and the comments right above a def come along.
    lines = (ROOT / "stage_2" / "pairing.py").read_text().splitlines()
    decorator = next(i for i, line in enumerate(lines, 1) if "@contextlib.contextmanager" in line)
    assert f'linenums="{decorator}"' in expand("python", "stage_2/pairing.py#Pairing.expect")
    # A module-level name, with the comment lines above it; a run of symbols; the whole file.
    lines = (ROOT / "stage_1" / "protocol.py").read_text().splitlines()
    assign = next(i for i, line in enumerate(lines, 1) if line.startswith("MAX_LINE ="))
    assert lines[assign - 2].startswith("#")
    comments = assign - 1
    while lines[comments - 2].startswith("#"):
        comments -= 1
    constant = f'```python linenums="{comments}"\n--8<-- "stage_1/protocol.py:{comments}:{assign}"\n```'
    assert expand("python", "stage_1/protocol.py#MAX_LINE") == constant
    assert '"stage_1/protocol.py:' in expand("python", "stage_1/protocol.py#Ping..encode")
    whole = expand('python linenums="1"', "stage_1/protocol.py#")
    assert (
        whole
        == expand('python linenums="1"', "stage_1/protocol.py")
        == ('```python linenums="1"\n--8<-- "stage_1/protocol.py"\n```')
    )
    # from= and to= narrow it; highlights count from the listing's first line; indentation is kept.
    narrowed = expand(
        'python title="t" from="started = " to="return time.perf_counter()" highlight="started = "',
        "stage_1/client.py#Client.ping",
        indent="    ",
    )
    lines = (ROOT / "stage_1" / "client.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines, 1) if "started = " in line)
    end = next(i for i, line in enumerate(lines, 1) if i > start and "return time.perf_counter()" in line)
    assert narrowed == (
        f'    ```python title="t" hl_lines="1" linenums="{start}"\n'
        f'    --8<-- "stage_1/client.py:{start}:{end}"\n    ```'
    )


@pytest.mark.parametrize(
    ("info", "spec", "error"),
    [
        ("python", "stage_1/client.py#Client.no_such_method", "'no_such_method' is not defined in Client"),
        ("python", "stage_1/client.py#NoSuchClass.ping", "'NoSuchClass' is not defined in the module"),
        ("python", "stage_1/no_such_file.py#x", "does not exist"),
        ('python from="no such text"', "stage_1/client.py#Client.ping", "from='no such text' matches no line"),
        ('python from="started" to="no such text"', "stage_1/client.py#Client.ping", "matches no line"),
        (
            'python highlight="no such text"',
            "stage_1/client.py#Client.ping",
            "highlight 'no such text' matches no line",
        ),
        ('python highlight="no such text anywhere"', "stage_0/relay.py", "matches no line"),
        ("python", "stage_1/protocol.py#decode..Ping", "comes before"),
        ("python", "tests/nat_lab.py#", "section markers"),  # a file that still has markers
    ],
)
def test_stale_includes_fail_the_build(info: str, spec: str, error: str) -> None:
    with pytest.raises(PluginError, match=re.escape(error)):
        expand(info, spec)


def test_stale_highlights_and_links_fail_the_build() -> None:
    stages = hook()
    good = expand('python linenums="1" highlight="await dst.drain()"', "stage_0/relay.py")
    lines = (ROOT / "stage_0" / "relay.py").read_text().splitlines()
    expected = [i for i, line in enumerate(lines, 1) if "await dst.drain()" in line]
    assert f'hl_lines="{" ".join(map(str, expected))}"' in good
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


@pytest.mark.timeout(BROWSER_WALK_TIMEOUT)
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
